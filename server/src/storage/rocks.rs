//! The RocksDB engine: one database per node, one column family per [`Cf`].

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::compaction_filter::{CompactionFilter, Decision};
use rocksdb::compaction_filter_factory::{CompactionFilterContext, CompactionFilterFactory};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteOptions, DB};

use super::{
    BatchOp, Cf, Compacted, CompactionRule, Engine, KvPair, KvPairs, Snapshot, StorageError, Visit,
    WriteBatch,
};

/// Tuning that the node passes explicitly rather than trusting defaults.
#[derive(Clone)]
pub struct RocksOptions {
    /// Memtable size per column family, in bytes.
    pub write_buffer_bytes: usize,
    /// Block cache shared by every column family, in bytes.
    pub block_cache_bytes: usize,
    /// Background compaction and flush threads.
    pub background_jobs: i32,
    /// Compaction rules, at most one per column family.
    pub rules: Vec<(Cf, Arc<dyn CompactionRule>)>,
}

impl std::fmt::Debug for RocksOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksOptions")
            .field("write_buffer_bytes", &self.write_buffer_bytes)
            .field("block_cache_bytes", &self.block_cache_bytes)
            .field("background_jobs", &self.background_jobs)
            .field("rules", &self.rules.iter().map(|(cf, r)| (cf.name(), r.name())).collect::<Vec<_>>())
            .finish()
    }
}

impl Default for RocksOptions {
    fn default() -> Self {
        Self {
            write_buffer_bytes: 64 << 20,
            block_cache_bytes: 256 << 20,
            background_jobs: 2,
            rules: Vec::new(),
        }
    }
}

/// Makes one filter per compaction run, so a filter is only ever called
/// from one thread.
struct RuleFactory {
    rule: Arc<dyn CompactionRule>,
    name: CString,
}

impl CompactionFilterFactory for RuleFactory {
    type Filter = RuleFilter;

    fn create(&mut self, _context: CompactionFilterContext) -> RuleFilter {
        RuleFilter { rule: self.rule.clone(), name: self.name.clone(), changed: Vec::new() }
    }

    fn name(&self) -> &CStr {
        &self.name
    }
}

struct RuleFilter {
    rule: Arc<dyn CompactionRule>,
    name: CString,
    /// The last changed value, kept until the next call.
    changed: Vec<u8>,
}

impl CompactionFilter for RuleFilter {
    fn filter(&mut self, _level: u32, key: &[u8], value: &[u8]) -> Decision {
        match self.rule.filter(key, value) {
            Compacted::Keep => Decision::Keep,
            Compacted::Remove => Decision::Remove,
            Compacted::Change(v) => {
                self.changed = v;
                // SAFETY: `Decision::Change` wants a `'static` slice, but
                // RocksDB's C shim copies the new value into its own string
                // before the callback returns (rocksdb_compactionfilter_t::
                // Filter in db/c.cc, `new_value->assign`), and `changed` is
                // not touched again until this filter's next call, which
                // comes from the same compaction thread after that copy.
                let bytes: &'static [u8] =
                    unsafe { std::slice::from_raw_parts(self.changed.as_ptr(), self.changed.len()) };
                Decision::Change(bytes)
            }
        }
    }

    fn name(&self) -> &CStr {
        &self.name
    }
}

pub struct RocksEngine {
    db: DB,
    path: PathBuf,
}

impl RocksEngine {
    /// Opens (creating if needed) the store at `path`. RocksDB replays its
    /// write-ahead log here, which is how acknowledged writes survive a crash.
    pub fn open(path: &Path, tuning: &RocksOptions) -> Result<Self, StorageError> {
        let open_err = |reason: String| StorageError::Open { path: path.display().to_string(), reason };
        std::fs::create_dir_all(path).map_err(|e| open_err(e.to_string()))?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(tuning.background_jobs);
        // Writes from the group-commit thread arrive one batch at a time;
        // pipelining lets the WAL write of the next batch overlap the memtable
        // insert of the previous one.
        db_opts.set_enable_pipelined_write(true);
        // Point reads dominate the write path: the row a write merges into
        // and its idempotency key, which is almost always absent. Bloom
        // filters (on disk and in the memtable) answer "absent" without a
        // skip-list walk or a block read; one block cache holds the data
        // blocks of every column family. Index and filter blocks stay in
        // the table readers' memory (about 2 bytes per key), not in the
        // cache: there random reads over a store larger than the cache
        // evicted them, and every get read and decompressed an index block
        // again (10M keys: 1,480 gets/s instead of 28,700).
        let cache = rocksdb::Cache::new_lru_cache(tuning.block_cache_bytes);
        let cfs = Cf::ALL.iter().map(|cf| {
            let mut o = Options::default();
            o.set_write_buffer_size(tuning.write_buffer_bytes);
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_bloom_filter(10.0, false);
            o.set_block_based_table_factory(&table);
            o.set_memtable_whole_key_filtering(true);
            o.set_memtable_prefix_bloom_ratio(0.05);
            if *cf == Cf::Data {
                o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            }
            if let Some((_, rule)) = tuning.rules.iter().find(|(c, _)| c == cf) {
                let name = CString::new(rule.name()).unwrap_or_else(|_| c"geokv-rule".to_owned());
                o.set_compaction_filter_factory(RuleFactory { rule: rule.clone(), name });
            }
            ColumnFamilyDescriptor::new(cf.name(), o)
        });
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| open_err(e.to_string()))?;
        Ok(Self { db, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn handle(&self, cf: Cf) -> Result<std::sync::Arc<rocksdb::BoundColumnFamily<'_>>, StorageError> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StorageError::Read { cf, reason: "column family missing".into() })
    }
}

impl Engine for RocksEngine {
    fn kind(&self) -> &'static str {
        "rocksdb"
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.db.get_cf(&self.handle(cf)?, key).map_err(|e| StorageError::Read { cf, reason: e.to_string() })
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        let ops = batch.len();
        let mut wb = rocksdb::WriteBatch::default();
        for op in &batch.ops {
            match op {
                BatchOp::Put { cf, key, value } => wb.put_cf(&self.handle(*cf)?, key, value),
                BatchOp::Delete { cf, key } => wb.delete_cf(&self.handle(*cf)?, key),
                BatchOp::DeleteRange { cf, start, end } => wb.delete_range_cf(&self.handle(*cf)?, start, end),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo).map_err(|e| StorageError::Write { ops, reason: e.to_string() })
    }

    fn sync(&self) -> Result<(), StorageError> {
        // The write-ahead log holds every write in order; syncing it makes
        // all of them durable.
        self.db.flush_wal(true).map_err(|e| StorageError::Write { ops: 0, reason: format!("WAL sync: {e}") })
    }

    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, StorageError> {
        let handle = self.handle(cf)?;
        let mut out = Vec::new();
        let mode = IteratorMode::From(start, Direction::Forward);
        for item in self.db.iterator_cf_opt(&handle, bounded(end), mode) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| StorageError::Read { cf, reason: e.to_string() })?;
            if end.is_some_and(|e| k.as_ref() >= e) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    fn last(&self, cf: Cf) -> Result<Option<KvPair>, StorageError> {
        let handle = self.handle(cf)?;
        match self.db.iterator_cf(&handle, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item.map_err(|e| StorageError::Read { cf, reason: e.to_string() })?;
                Ok(Some((k.into_vec(), v.into_vec())))
            }
        }
    }

    fn compact(&self) -> Result<(), StorageError> {
        let fail = |cf: Cf, e: rocksdb::Error| StorageError::Write {
            ops: 0,
            reason: format!("compacting {cf}: {e}"),
        };
        let mut flush = rocksdb::FlushOptions::default();
        flush.set_wait(true);
        for cf in Cf::ALL.iter().copied() {
            self.db.flush_cf_opt(&self.handle(cf)?, &flush).map_err(|e| fail(cf, e))?;
        }
        // Every file, the bottommost level included, goes through the
        // rules; a plain compaction would leave the last level as it is.
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        opts.set_exclusive_manual_compaction(true);
        for cf in Cf::ALL.iter().copied() {
            self.db.compact_range_cf_opt(&self.handle(cf)?, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        Ok(())
    }

    fn snapshot(&self) -> Box<dyn Snapshot + '_> {
        Box::new(RocksSnapshot { engine: self, snap: self.db.snapshot(), _owner: None })
    }

    fn snapshot_owned(self: Arc<Self>) -> Box<dyn Snapshot + Send + Sync> {
        // SAFETY: the engine sits on the heap behind the Arc the view keeps
        // in `_owner`, so it stays alive and in place for as long as the
        // view exists, and `snap` (the only other user of the borrow) is
        // dropped before `_owner`. The 'static borrow never leaves the
        // view: `Snapshot`'s methods hand out owned data only.
        let engine: &'static RocksEngine = unsafe { &*Arc::as_ptr(&self) };
        Box::new(RocksSnapshot { engine, snap: engine.db.snapshot(), _owner: Some(self) })
    }
}

/// Read options of a forward scan that stops at `end`: RocksDB itself
/// stops there, instead of stepping over every deleted key past `end`
/// (tombstones not yet compacted) to find the first live one, which the
/// scan would then drop.
fn bounded(end: Option<&[u8]>) -> rocksdb::ReadOptions {
    let mut opts = rocksdb::ReadOptions::default();
    if let Some(end) = end {
        opts.set_iterate_upper_bound(end.to_vec());
    }
    opts
}

/// A RocksDB snapshot: every read through it sees the sequence number at
/// which it was taken, in every column family.
struct RocksSnapshot<'a> {
    engine: &'a RocksEngine,
    snap: rocksdb::SnapshotWithThreadMode<'a, DB>,
    /// The engine `engine` borrows, for a view that owns its hold on it
    /// ([`Engine::snapshot_owned`]); declared after `snap`, so the RocksDB
    /// snapshot is released first (fields drop in declaration order).
    _owner: Option<Arc<RocksEngine>>,
}

impl Snapshot for RocksSnapshot<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.snap
            .get_cf(&self.engine.handle(cf)?, key)
            .map_err(|e| StorageError::Read { cf, reason: e.to_string() })
    }

    fn for_each(
        &self,
        cf: Cf,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut Visit<'_>,
    ) -> Result<(), StorageError> {
        let handle = self.engine.handle(cf)?;
        let mode = IteratorMode::From(start, Direction::Forward);
        for item in self.snap.iterator_cf_opt(&handle, bounded(end), mode) {
            let (k, v) = item.map_err(|e| StorageError::Read { cf, reason: e.to_string() })?;
            if end.is_some_and(|e| k.as_ref() >= e) {
                break;
            }
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, cf: Cf) -> Result<Option<KvPair>, StorageError> {
        let handle = self.engine.handle(cf)?;
        match self.snap.iterator_cf(&handle, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item.map_err(|e| StorageError::Read { cf, reason: e.to_string() })?;
                Ok(Some((k.into_vec(), v.into_vec())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drops keys starting with `x`, turns a leading `d` of a value into
    /// `e` (rules must be idempotent: a record may pass through several
    /// compactions, and a full one runs it twice).
    struct TestRule;

    impl CompactionRule for TestRule {
        fn name(&self) -> &'static str {
            "test-rule"
        }

        fn filter(&self, key: &[u8], value: &[u8]) -> Compacted {
            if key.starts_with(b"x") {
                Compacted::Remove
            } else if value.starts_with(b"d") {
                Compacted::Change([&b"e"[..], &value[1..]].concat())
            } else {
                Compacted::Keep
            }
        }
    }

    #[test]
    fn compaction_applies_the_column_family_rule_to_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let tuning =
            RocksOptions { rules: vec![(Cf::Data, Arc::new(TestRule) as _)], ..RocksOptions::default() };
        let engine = RocksEngine::open(dir.path(), &tuning).unwrap();
        let mut batch = WriteBatch::default();
        for (k, v) in [(&b"xa"[..], &b"1"[..]), (b"b", b"d2"), (b"c", b"3")] {
            batch.put(Cf::Data, k.to_vec(), v.to_vec());
            batch.put(Cf::Meta, k.to_vec(), v.to_vec());
        }
        engine.write(batch, true).unwrap();
        // Before a compaction nothing changed.
        assert_eq!(engine.get(Cf::Data, b"xa").unwrap(), Some(b"1".to_vec()));
        engine.compact().unwrap();
        assert_eq!(engine.get(Cf::Data, b"xa").unwrap(), None);
        assert_eq!(engine.get(Cf::Data, b"b").unwrap(), Some(b"e2".to_vec()));
        assert_eq!(engine.get(Cf::Data, b"c").unwrap(), Some(b"3".to_vec()));
        // Another column family has no rule.
        assert_eq!(engine.get(Cf::Meta, b"xa").unwrap(), Some(b"1".to_vec()));
        assert_eq!(engine.get(Cf::Meta, b"b").unwrap(), Some(b"d2".to_vec()));
    }

    #[test]
    fn conforms_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let engine = RocksEngine::open(dir.path(), &RocksOptions::default()).unwrap();
            super::super::conformance::check(&engine);
        }
        let reopened = RocksEngine::open(dir.path(), &RocksOptions::default()).unwrap();
        assert_eq!(reopened.get(Cf::Data, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(reopened.get(Cf::Data, b"b").unwrap(), None);
    }

    /// An owned view moves to another thread, keeps the engine open after
    /// every other handle is gone, and sees the store as it was when it
    /// was taken.
    #[test]
    fn an_owned_snapshot_outlives_its_handle_and_ignores_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(RocksEngine::open(dir.path(), &RocksOptions::default()).unwrap());
        let put = |k: &[u8], v: &[u8]| {
            let mut batch = WriteBatch::default();
            batch.put(Cf::Raft, k.to_vec(), v.to_vec());
            engine.write(batch, false).unwrap();
        };
        put(b"a", b"1");
        put(b"b", b"2");
        let view = engine.clone().snapshot_owned();
        put(b"a", b"changed");
        put(b"c", b"3");
        drop(engine);
        let seen = std::thread::spawn(move || {
            let mut pairs = Vec::new();
            view.for_each(Cf::Raft, b"", None, &mut |k, v| {
                pairs.push((k.to_vec(), v.to_vec()));
                Ok(true)
            })
            .unwrap();
            (pairs, view.get(Cf::Raft, b"c").unwrap(), view.last(Cf::Raft).unwrap())
        })
        .join()
        .unwrap();
        let pairs = vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())];
        assert_eq!(seen, (pairs, None, Some((b"b".to_vec(), b"2".to_vec()))));
    }
}
