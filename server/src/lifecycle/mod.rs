//! Data subjects: finding a subject's rows, the erasure fence and ledger
//! (docs/architecture.md section 13, docs/decisions/028-data-lifecycle.md).
//!
//! A table that declares `subject_separator` gives every row whose key
//! contains it a subject: the key up to the separator. The subject's rows
//! of a table are therefore one contiguous key range (`table \0 subject
//! sep ...`), which is the subject index: a prefix scan finds them on
//! every node, with no second copy of the id to keep in step or to erase.
//! Everything kept *about* a subject (the ledger, receipts, fences) is
//! keyed by its keyed hash, HMAC-SHA256 under the cluster's
//! `lifecycle.subject_key`, never by the id.
//!
//! Erasure fences a subject at an HLC stamp F: every register value of a
//! subject's row written at or before F is stripped to a tombstone of its
//! dot (the row keeps its clock), at once on erasure and on every later
//! arrival (replicated entries and anti-entropy repairs merge into the
//! stored row and are fenced again in the same step), and by compaction in
//! the replication log. A value written after F (a stamp past F: every
//! node that applies the fence moves its clock past F first) stays. The
//! fence is kept in the erasure ledger (hash, F, when, counts) in the
//! `meta` column family, loaded at start, and outlives the data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::causality::HlcTimestamp;
use crate::codec;
use crate::config::Config;
use crate::error::KvError;
use crate::kv::row::Row;
use crate::kv::row::RowValue;
use crate::storage::{Cf, Engine, WriteBatch};

/// Bytes of a subject hash kept (of the 32 of HMAC-SHA256).
pub const HASH_BYTES: usize = 16;

/// A subject's keyed hash.
pub type SubjectHash = [u8; HASH_BYTES];

/// Longest subject id accepted, in bytes.
pub const SUBJECT_BYTES_MAX: usize = 512;

const LEDGER_PREFIX: &[u8] = b"lifecycle/ledger/";

fn ledger_key(hash: &SubjectHash) -> Vec<u8> {
    let mut k = LEDGER_PREFIX.to_vec();
    k.extend_from_slice(hex::encode(hash).as_bytes());
    k
}

/// One erased subject, as every node keeps it: hashes and counts only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Hex of the subject's keyed hash.
    pub subject_hash: String,
    /// The fence: values written at or before this HLC stamp are erased.
    pub fence_hlc: u64,
    /// Wall-clock millisecond this node applied the erasure.
    pub erased_at_ms: u64,
    /// Rows of the subject this node fenced, and value bytes removed.
    pub rows: u64,
    pub bytes: u64,
}

/// The subject rules of a node, and the fences it applies.
pub struct Lifecycle {
    key: Option<Vec<u8>>,
    /// Table -> separator, for the tables that declare subjects.
    separators: HashMap<String, Vec<u8>>,
    fences: RwLock<HashMap<SubjectHash, u64>>,
    /// Whether any fence exists (a read of one flag on the hot path).
    fenced: AtomicBool,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Lifecycle")
            .field("subject_tables", &self.separators.keys().collect::<Vec<_>>())
            .field("fenced", &self.fenced.load(Ordering::Relaxed))
            .finish()
    }
}

impl Lifecycle {
    pub fn new(cfg: &Config) -> Self {
        let key = cfg.lifecycle.subject_key.as_deref().and_then(|k| hex::decode(k).ok());
        let separators = cfg
            .tables
            .iter()
            .filter_map(|t| t.subject_separator.as_ref().map(|s| (t.name.clone(), s.as_bytes().to_vec())))
            .collect();
        Self { key, separators, fences: RwLock::new(HashMap::new()), fenced: AtomicBool::new(false) }
    }

    /// Tables whose rows have subjects, with their separators.
    pub fn subject_tables(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.separators.iter().map(|(t, s)| (t.as_str(), s.as_slice()))
    }

    /// The subject of `key` in `table`, if the table declares subjects and
    /// the key has one.
    pub fn subject_of<'a>(&self, table: &str, key: &'a [u8]) -> Option<&'a [u8]> {
        let sep = self.separators.get(table)?;
        let at = key.windows(sep.len()).position(|w| w == sep.as_slice())?;
        (at > 0).then(|| &key[..at])
    }

    /// The key prefix of `subject`'s rows in a table with separator `sep`.
    pub fn key_prefix(subject: &[u8], sep: &[u8]) -> Vec<u8> {
        [subject, sep].concat()
    }

    /// The keyed hash of `subject`; an error when the cluster has no
    /// subject key or the id is not acceptable.
    pub fn hash(&self, subject: &[u8]) -> Result<SubjectHash, KvError> {
        check_subject(subject)?;
        let key = self.key.as_deref().ok_or_else(|| KvError::InvalidField {
            field: "subject",
            why: "no table of this cluster declares subjects (lifecycle.subject_key is unset)".into(),
        })?;
        let mac = crate::security::audit::hmac_sha256(key, &[b"geokv subject\0", subject]);
        let mut out = [0u8; HASH_BYTES];
        out.copy_from_slice(&mac[..HASH_BYTES]);
        Ok(out)
    }

    /// The fence of the subject of `key` in `table`, if it was erased.
    pub fn fence_of(&self, table: &str, key: &[u8]) -> Option<u64> {
        if !self.fenced.load(Ordering::Acquire) {
            return None;
        }
        let subject = self.subject_of(table, key)?;
        let hash = self.hash(subject).ok()?;
        self.fences.read().unwrap_or_else(|p| p.into_inner()).get(&hash).copied()
    }

    /// Whether any subject was erased (a fence is installed).
    pub fn any_fence(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Empties the set members a remembered reply (an idempotency record)
    /// holds for rows of erased subjects, as of writes through the fence;
    /// returns how many members. A retry of such a write is still answered
    /// as applied, with no members. Records from before replies named their
    /// rows (JSON replies, outcomes without a table) are left: they expire
    /// with `storage.idempotency_ttl_s`.
    pub fn purge_reply(&self, record: &mut geokv_proto::storage::IdempotencyRecord) -> usize {
        if !self.any_fence() {
            return 0;
        }
        let Some(reply) = record.outcomes.as_mut() else { return 0 };
        let mut purged = 0;
        for o in &mut reply.outcomes {
            if o.members.is_empty() || o.table.is_empty() {
                continue;
            }
            if self.fence_of(&o.table, &o.key).is_some_and(|fence| o.hlc <= fence) {
                purged += o.members.len();
                o.members.clear();
            }
        }
        purged
    }

    /// Applies a fence from now on (the highest one wins).
    pub fn install(&self, hash: SubjectHash, fence_hlc: u64) {
        let mut fences = self.fences.write().unwrap_or_else(|p| p.into_inner());
        let f = fences.entry(hash).or_insert(fence_hlc);
        *f = (*f).max(fence_hlc);
        self.fenced.store(true, Ordering::Release);
    }

    /// Loads the ledger from `engine` and installs its fences; returns
    /// how many entries it holds.
    pub fn load(&self, engine: &dyn Engine) -> Result<usize, KvError> {
        let entries = ledger(engine)?;
        for e in &entries {
            match parse_hash(&e.subject_hash) {
                Some(h) => self.install(h, e.fence_hlc),
                None => {
                    return Err(KvError::Corrupt {
                        what: "erasure ledger".into(),
                        why: format!("subject hash `{}` is not {HASH_BYTES} hex bytes", e.subject_hash),
                    })
                }
            }
        }
        Ok(entries.len())
    }

    /// Stores `entry` durably (synced) and installs its fence.
    pub fn record(&self, engine: &dyn Engine, hash: SubjectHash, entry: &LedgerEntry) -> Result<(), KvError> {
        let json = serde_json::to_vec(entry).map_err(|e| KvError::Storage(e.to_string()))?;
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, ledger_key(&hash), codec::seal(&json));
        engine.write(batch, true).map_err(|e| KvError::Storage(e.to_string()))?;
        self.install(hash, entry.fence_hlc);
        Ok(())
    }
}

/// Folder of the erasure ledger under a backup destination.
pub const LEDGER_DIR: &str = "erasure-ledger";

/// Copies `entry` into every backup destination configured on this node
/// (`<dir>/erasure-ledger/<hash>.json`, written to a temporary name,
/// synced and renamed), so a restore of any backup, older or newer,
/// applies the erasure again (hashes and counts only: the same in every
/// zone's destination).
pub fn publish(cfg: &Config, entry: &LedgerEntry) -> Result<(), KvError> {
    let json = serde_json::to_vec_pretty(entry).map_err(|e| KvError::Storage(e.to_string()))?;
    for d in &cfg.backup.destinations {
        let dir = d.dir.join(LEDGER_DIR);
        let fail = |e: std::io::Error| {
            KvError::Storage(format!("writing the erasure ledger into {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(fail)?;
        let path = dir.join(format!("{}.json", entry.subject_hash));
        let tmp = dir.join(format!(".{}.{}.tmp", entry.subject_hash, std::process::id()));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(fail)?;
            f.write_all(&json).map_err(fail)?;
            f.sync_all().map_err(fail)?;
        }
        std::fs::rename(&tmp, &path).map_err(fail)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Every ledger entry found in the backup destinations configured on this
/// node (bounded: a destination's ledger is read up to 1,000,000 entries).
pub fn published(cfg: &Config) -> Result<Vec<LedgerEntry>, KvError> {
    let mut out = Vec::new();
    for d in &cfg.backup.destinations {
        let dir = d.dir.join(LEDGER_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten().take(1_000_000) {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let corrupt = |why: String| KvError::Corrupt { what: path.display().to_string(), why };
            let bytes = std::fs::read(&path).map_err(|e| corrupt(e.to_string()))?;
            let entry: LedgerEntry = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
            if parse_hash(&entry.subject_hash).is_none() {
                return Err(corrupt("not a subject hash".into()));
            }
            out.push(entry);
        }
    }
    Ok(out)
}

impl Lifecycle {
    /// Applies ledger entries from elsewhere (a restore): each is stored in
    /// this node's ledger (the highest fence of a subject wins) and fences
    /// from now on. Returns how many subjects.
    pub fn adopt(&self, engine: &dyn Engine, entries: &[LedgerEntry]) -> Result<usize, KvError> {
        for e in entries {
            let hash = parse_hash(&e.subject_hash).ok_or_else(|| KvError::Corrupt {
                what: "erasure ledger".into(),
                why: format!("`{}` is not a subject hash", e.subject_hash),
            })?;
            let known = self.fences.read().unwrap_or_else(|p| p.into_inner()).get(&hash).copied();
            if known.is_some_and(|f| f >= e.fence_hlc) {
                continue;
            }
            self.record(engine, hash, e)?;
        }
        Ok(entries.len())
    }

    /// The highest fence of any subject (0 when none).
    pub fn highest_fence(&self) -> u64 {
        self.fences.read().unwrap_or_else(|p| p.into_inner()).values().copied().max().unwrap_or(0)
    }
}

/// Checks a subject id a client sent.
pub fn check_subject(subject: &[u8]) -> Result<(), KvError> {
    if subject.is_empty() {
        return Err(KvError::MissingField { field: "subject" });
    }
    if subject.len() > SUBJECT_BYTES_MAX {
        return Err(KvError::InvalidField {
            field: "subject",
            why: format!("{} bytes; the limit is {SUBJECT_BYTES_MAX}", subject.len()),
        });
    }
    Ok(())
}

fn parse_hash(text: &str) -> Option<SubjectHash> {
    hex::decode(text).ok()?.try_into().ok()
}

/// Every entry of the ledger stored in `engine`.
pub fn ledger(engine: &dyn Engine) -> Result<Vec<LedgerEntry>, KvError> {
    let end = crate::storage::prefix_end(LEDGER_PREFIX);
    let mut out = Vec::new();
    let mut start = LEDGER_PREFIX.to_vec();
    // Bounded pages; the ledger grows by one entry per erased subject.
    loop {
        let page = engine
            .scan(Cf::Meta, &start, end.as_deref(), 1024)
            .map_err(|e| KvError::Storage(e.to_string()))?;
        let full = page.len() == 1024;
        for (k, v) in &page {
            let corrupt =
                |why: String| KvError::Corrupt { what: String::from_utf8_lossy(k).into_owned(), why };
            let json = codec::open(v).map_err(|e| corrupt(e.to_string()))?;
            out.push(serde_json::from_slice(json).map_err(|e| corrupt(e.to_string()))?);
        }
        match page.last() {
            Some((k, _)) if full => {
                start = k.clone();
                start.push(0);
            }
            _ => return Ok(out),
        }
    }
}

/// What fencing took out of one row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fenced {
    pub values: usize,
    pub bytes: usize,
}

/// Strips every value of `row` written at or before HLC stamp `fence`.
/// Registers keep the stripped writes as tombstones of their dots; a set
/// loses every member (an observed remove of all of them); a counter is
/// left as it is (a counter cannot forget increments: reported by the
/// caller, docs/decisions/028-data-lifecycle.md).
pub fn fence_row(row: &mut Row, fence: u64) -> Fenced {
    let fence_ts = HlcTimestamp(fence);
    match &mut row.value {
        RowValue::Register(d) => {
            let (values, bytes) = d.strip_where(|s| s.hlc <= fence_ts);
            Fenced { values, bytes }
        }
        RowValue::Lww(l) => {
            let bytes = l.strip_through(fence_ts);
            Fenced { values: usize::from(bytes > 0), bytes }
        }
        RowValue::Set(s) => {
            if row.hlc > fence {
                return Fenced::default();
            }
            let members: Vec<Vec<u8>> = s.members().into_iter().map(<[u8]>::to_vec).collect();
            let context = s.context().clone();
            let bytes = members.iter().map(Vec::len).sum();
            for m in &members {
                s.remove(m, Some(&context));
            }
            Fenced { values: members.len(), bytes }
        }
        RowValue::Counter(_) => Fenced::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causality::{DvvSet, VersionVector};
    use crate::storage::memory::MemoryEngine;

    fn cfg() -> Config {
        let mut c = Config::default();
        c.lifecycle.subject_key = Some("11".repeat(32));
        c.tables.push(crate::config::TableConfig {
            name: "users".into(),
            subject_separator: Some(":".into()),
            ..Default::default()
        });
        c.tables.push(crate::config::TableConfig { name: "plain".into(), ..Default::default() });
        c
    }

    #[test]
    fn subjects_come_from_the_key_prefix_of_tables_that_declare_them() {
        let l = Lifecycle::new(&cfg());
        assert_eq!(l.subject_of("users", b"alice:email"), Some(&b"alice"[..]));
        assert_eq!(l.subject_of("users", b"alice"), None, "no separator, no subject");
        assert_eq!(l.subject_of("users", b":x"), None, "an empty subject is none");
        assert_eq!(l.subject_of("plain", b"alice:email"), None);
        // Keyed: another key gives another hash; the id is not in it.
        let h = l.hash(b"alice").unwrap();
        assert_ne!(h, l.hash(b"bob").unwrap());
        let mut other = cfg();
        other.lifecycle.subject_key = Some("22".repeat(32));
        assert_ne!(h, Lifecycle::new(&other).hash(b"alice").unwrap());
        assert!(l.hash(b"").is_err());
        assert!(l.hash(&[b'x'; SUBJECT_BYTES_MAX + 1]).is_err());
    }

    #[test]
    fn the_ledger_survives_a_reload_and_fences_only_its_subjects() {
        let engine = MemoryEngine::new();
        let l = Lifecycle::new(&cfg());
        assert_eq!(l.fence_of("users", b"alice:email"), None);
        let h = l.hash(b"alice").unwrap();
        let entry =
            LedgerEntry { subject_hash: hex::encode(h), fence_hlc: 77, erased_at_ms: 5, rows: 3, bytes: 9 };
        l.record(&engine, h, &entry).unwrap();
        assert_eq!(l.fence_of("users", b"alice:email"), Some(77));
        assert_eq!(l.fence_of("users", b"bob:email"), None);
        let again = Lifecycle::new(&cfg());
        assert_eq!(again.load(&engine).unwrap(), 1);
        assert_eq!(again.fence_of("users", b"alice:phone"), Some(77));
        assert_eq!(ledger(&engine).unwrap(), vec![entry]);
    }

    #[test]
    fn remembered_replies_lose_the_members_of_erased_rows_written_through_the_fence() {
        use geokv_proto::storage as spb;
        let l = Lifecycle::new(&cfg());
        let outcome = |key: &[u8], hlc: u64| spb::StoredOutcome {
            hlc,
            members: vec![b"m1".to_vec(), b"m2".to_vec()],
            has_members: true,
            table: "users".into(),
            key: key.to_vec(),
            ..Default::default()
        };
        let mut record = spb::IdempotencyRecord {
            outcomes: Some(spb::StoredReply {
                outcomes: vec![
                    outcome(b"alice:tags", 50),
                    outcome(b"alice:tags", 90),
                    outcome(b"bob:tags", 50),
                ],
            }),
            ..Default::default()
        };
        assert_eq!(l.purge_reply(&mut record), 0, "nothing erased yet");
        l.install(l.hash(b"alice").unwrap(), 77);
        assert_eq!(l.purge_reply(&mut record), 2, "alice's write through the fence");
        let left: Vec<usize> = record.outcomes.unwrap().outcomes.iter().map(|o| o.members.len()).collect();
        assert_eq!(left, vec![0, 2, 2], "a later write of alice's and bob's keep theirs");
    }

    #[test]
    fn fencing_strips_values_written_through_the_fence_and_keeps_later_ones() {
        let mut d = DvvSet::new();
        let old = HlcTimestamp::from_parts(1_000, 0);
        let new = HlcTimestamp::from_parts(3_000, 0);
        d.write("us/n1", &VersionVector::new(), Some(b"old-a".to_vec()), old);
        d.write("eu/n1", &VersionVector::new(), Some(b"old-b".to_vec()), old);
        let before = d.clone();
        d.write("eu/n1", &VersionVector::new(), Some(b"new".to_vec()), new);
        let mut row = Row {
            home_region: "us".into(),
            zone: String::new(),
            epoch: 1,
            hlc: new.0,
            value: RowValue::Register(d),
        };
        let fence = HlcTimestamp::from_parts(2_000, 0).0;
        assert_eq!(fence_row(&mut row, fence), Fenced { values: 2, bytes: 10 });
        let RowValue::Register(d) = &row.value else { unreachable!() };
        assert_eq!(d.live_values(), vec![&b"new"[..]]);
        // A stale copy holding the old values merges in and brings none back.
        let mut merged = d.clone();
        merged.merge(&before);
        assert_eq!(merged.live_values(), vec![&b"new"[..]]);
        // Fencing again changes nothing.
        assert_eq!(fence_row(&mut row, fence), Fenced::default());
    }
}
