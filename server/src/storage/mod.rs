//! The storage-engine abstraction and its two implementations.
//!
//! # Layout
//! - [`Engine`]: what the node needs from a store: point reads, ordered
//!   scans, and atomic multi-column-family batches with optional sync.
//! - [`rocks`]: the RocksDB engine used by every real node.
//! - [`memory`]: an in-memory engine for simulation tests only.
//! - [`identity`]: the store's UUID and incarnation, made at first open.
//!
//! Column families separate the row data, the replication log and node
//! metadata so each can have its own compaction and retention.

pub mod identity;
pub mod memory;
pub mod rocks;

use std::fmt;
use std::sync::Arc;

/// A column family of the node's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// Rows: `table \0 key` -> sealed `storage::Row`.
    Data,
    /// Replication log: big-endian sequence number -> sealed `storage::LogEntry`.
    ReplLog,
    /// Node metadata: counters, idempotency records, cursors.
    Meta,
    /// Consensus: Raft logs, votes and state machines of every group,
    /// keyed `g/<group>/...`.
    Raft,
    /// The access audit log (`security::audit`): big-endian time and
    /// sequence -> sealed record. It stays in the region that wrote it:
    /// replication ships only [`Cf::ReplLog`] entries, and digests and
    /// repair read only [`Cf::Data`], so nothing here is ever replicated,
    /// digested or repaired.
    Audit,
    /// The change feed (`kv::feed`): `l/<local seq>` -> sealed
    /// `storage::FeedEntry`, and `f/<origin>` -> the highest origin
    /// position trimmed. Local to the node, like the audit log.
    Feed,
}

impl Cf {
    /// Every column family; the RocksDB engine opens (and creates) these.
    pub const ALL: [Cf; 6] = [Cf::Data, Cf::ReplLog, Cf::Meta, Cf::Raft, Cf::Audit, Cf::Feed];

    /// The column family's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Data => "data",
            Cf::ReplLog => "repl_log",
            Cf::Meta => "meta",
            Cf::Raft => "raft",
            Cf::Audit => "audit",
            Cf::Feed => "feed",
        }
    }
}

impl fmt::Display for Cf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One change inside a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
    /// Deletes every key in `[start, end)`: one record, whatever the
    /// number of keys it covers.
    DeleteRange {
        cf: Cf,
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// Changes applied all together or not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<BatchOp>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Put { cf, key: key.into(), value: value.into() });
    }

    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Delete { cf, key: key.into() });
    }

    /// Deletes every key from `start` (included) to `end` (excluded).
    pub fn delete_range(&mut self, cf: Cf, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::DeleteRange { cf, start: start.into(), end: end.into() });
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Appends every operation of `other`, keeping order.
    pub fn extend(&mut self, other: WriteBatch) {
        self.ops.extend(other.ops);
    }
}

/// A storage failure. Callers do not branch on the variants beyond
/// reporting them, so they carry the context needed to diagnose.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("read from column family {cf} failed: {reason}")]
    Read { cf: Cf, reason: String },
    #[error("write batch of {ops} operations failed: {reason}")]
    Write { ops: usize, reason: String },
}

/// What a compaction does with one stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compacted {
    Keep,
    Remove,
    /// Keep the key with this value instead.
    Change(Vec<u8>),
}

/// A rule that compaction applies to every record of one column family
/// (expired values leave the disk this way: docs/architecture.md section
/// 13). It must only make changes no reader can see.
pub trait CompactionRule: Send + Sync + 'static {
    /// A name for RocksDB's log.
    fn name(&self) -> &'static str;
    fn filter(&self, key: &[u8], value: &[u8]) -> Compacted;
}

/// One key and its value.
pub type KvPair = (Vec<u8>, Vec<u8>);
/// Ordered key-value pairs returned by a scan.
pub type KvPairs = Vec<KvPair>;

/// The storage engine behind a node. Implementations are shared between
/// threads; every method may block on IO, so async callers use
/// `spawn_blocking` or a dedicated thread.
pub trait Engine: Send + Sync + 'static {
    /// A short name for status output ("rocksdb", "memory").
    fn kind(&self) -> &'static str;

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Applies `batch` atomically. With `sync`, returns only once the batch
    /// is on stable storage (survives power loss and `kill -9`).
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError>;

    /// Puts every write made so far on stable storage (an unsynced write
    /// followed by `sync` is as durable as a synced write).
    fn sync(&self) -> Result<(), StorageError>;

    /// Pairs with `start <= key < end` (no end bound when `end` is None), in
    /// key order, at most `limit` of them.
    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, StorageError>;

    /// The last pair of the column family, if any (used to recover the log's
    /// highest sequence number).
    fn last(&self, cf: Cf) -> Result<Option<KvPair>, StorageError>;

    /// Flushes every column family and compacts each whole, through its
    /// compaction rule, so data removed or stripped leaves the files now
    /// (and write-ahead logs holding it become obsolete). The in-memory
    /// engine keeps nothing on disk and does nothing.
    fn compact(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// A point-in-time view of every column family: reads through it see
    /// the store as it was when it was taken, whatever is written after
    /// (backups read one node's store as one cut through it:
    /// docs/decisions/029-zone-strict-backups.md).
    fn snapshot(&self) -> Box<dyn Snapshot + '_>;

    /// The same view, holding the engine itself rather than borrowing it,
    /// so it can move to another thread and outlive its caller: a STRONG
    /// group takes one between two applies and reads its snapshot from it on
    /// a blocking thread while applies go on (docs/architecture.md
    /// section 8).
    fn snapshot_owned(self: Arc<Self>) -> Box<dyn Snapshot + Send + Sync>;
}

/// What [`Snapshot::for_each`] calls per pair: true to go on.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StorageError> + 'a;

/// A consistent, read-only view of a store at one point in time
/// ([`Engine::snapshot`]).
pub trait Snapshot {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Visits the pairs with `start <= key < end` (no end bound when `end`
    /// is None) in key order, one at a time (nothing is gathered in
    /// memory), until `visit` returns false or fails.
    fn for_each(
        &self,
        cf: Cf,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut Visit<'_>,
    ) -> Result<(), StorageError>;

    /// The last pair of the column family in this view, if any.
    fn last(&self, cf: Cf) -> Result<Option<KvPair>, StorageError>;
}

/// The smallest key greater than every key that starts with `prefix`, or
/// None when no such key exists (prefix of all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The same behavioural checks run against every engine.
    use super::*;

    pub fn check(engine: &dyn Engine) {
        assert_eq!(engine.get(Cf::Data, b"a").unwrap(), None);
        let mut batch = WriteBatch::new();
        batch.put(Cf::Data, b"a".to_vec(), b"1".to_vec());
        batch.put(Cf::Data, b"b".to_vec(), b"2".to_vec());
        batch.put(Cf::Data, b"c".to_vec(), b"3".to_vec());
        batch.put(Cf::Meta, b"a".to_vec(), b"meta".to_vec());
        engine.write(batch, true).unwrap();
        assert_eq!(engine.get(Cf::Data, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(engine.get(Cf::Meta, b"a").unwrap(), Some(b"meta".to_vec()));
        assert_eq!(engine.get(Cf::ReplLog, b"a").unwrap(), None);

        let all = engine.scan(Cf::Data, b"", None, 10).unwrap();
        assert_eq!(all.iter().map(|(k, _)| k.as_slice()).collect::<Vec<_>>(), [b"a", b"b", b"c"]);
        let bounded = engine.scan(Cf::Data, b"b", Some(b"c"), 10).unwrap();
        assert_eq!(bounded, vec![(b"b".to_vec(), b"2".to_vec())]);
        assert_eq!(engine.scan(Cf::Data, b"", None, 2).unwrap().len(), 2);
        assert_eq!(engine.last(Cf::Data).unwrap(), Some((b"c".to_vec(), b"3".to_vec())));
        assert_eq!(engine.last(Cf::ReplLog).unwrap(), None);

        let mut batch = WriteBatch::new();
        batch.delete(Cf::Data, b"b".to_vec());
        engine.write(batch, false).unwrap();
        assert_eq!(engine.get(Cf::Data, b"b").unwrap(), None);

        // A snapshot keeps its point in time while the store changes.
        let snap = engine.snapshot();
        let mut batch = WriteBatch::new();
        batch.put(Cf::Data, b"d".to_vec(), b"4".to_vec());
        batch.delete(Cf::Data, b"c".to_vec());
        engine.write(batch, false).unwrap();
        let mut seen = Vec::new();
        snap.for_each(Cf::Data, b"", None, &mut |k, v| {
            seen.push((k.to_vec(), v.to_vec()));
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, vec![(b"a".to_vec(), b"1".to_vec()), (b"c".to_vec(), b"3".to_vec())]);
        assert_eq!(snap.get(Cf::Data, b"c").unwrap(), Some(b"3".to_vec()));
        assert_eq!(snap.get(Cf::Data, b"d").unwrap(), None);
        assert_eq!(snap.last(Cf::Data).unwrap(), Some((b"c".to_vec(), b"3".to_vec())));
        let mut first = Vec::new();
        snap.for_each(Cf::Data, b"b", Some(b"z"), &mut |k, _| {
            first.push(k.to_vec());
            Ok(false)
        })
        .unwrap();
        assert_eq!(first, vec![b"c".to_vec()]);
        drop(snap);
        assert_eq!(engine.get(Cf::Data, b"c").unwrap(), None);
        assert_eq!(engine.get(Cf::Data, b"d").unwrap(), Some(b"4".to_vec()));
    }

    #[test]
    fn every_cf_is_listed_once_with_its_own_name() {
        let names: std::collections::BTreeSet<&str> = Cf::ALL.iter().map(|cf| cf.name()).collect();
        assert_eq!(names.len(), Cf::ALL.len());
        assert!(Cf::ALL.contains(&Cf::Audit));
    }

    #[test]
    fn prefix_end_bounds() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }
}
