//! The access audit log: who asked for what, where, and whether it was
//! allowed.
//!
//! The log stays in the region that wrote it. Records go to the column
//! family [`Cf::Audit`], which replication, digests and repair never read
//! (they name [`Cf::Data`], [`Cf::ReplLog`] and [`Cf::Meta`] explicitly), so
//! an audit record never crosses a residency boundary even when the request
//! it describes was forwarded. A record holds no row key either: only
//! [`AuditLog::key_hash`], a hash keyed with a per-node secret, so the log
//! can say "the same key as that other request" without saying which key.
//!
//! Auditing must not slow the request path down or hold it up:
//! [`AuditLog::append`] only pushes onto a bounded in-memory queue and never
//! blocks; a full queue drops the record and counts it in
//! `geokv_audit_dropped_total`. A background task ([`AuditLog::start_background`])
//! writes the queue every [`FLUSH_EVERY`] as unsynced batches (an fsync per
//! request would cost more than the log is worth; a crash loses at most the
//! last moments of it) and prunes by age every [`PRUNE_EVERY`], and by
//! size after any flush that left the log over its bound. A prune that
//! reached its cap goes on after the next flush, and the cap is at least
//! what one flush writes, so pruning keeps pace with any append rate.
//! Each prune starts where the last one stopped: the records it deleted
//! stay on disk as tombstones until compaction, and a scan from the first
//! key would step over all of them every time.
//!
//! # On disk
//! - key: big-endian `time_ms` (8 bytes) then a big-endian sequence number
//!   (8 bytes), so a scan is in time order and two records of the same
//!   millisecond never collide; the sequence continues from the highest one
//!   stored when the log is opened.
//! - value: a 0 byte and the record as protobuf (the API's `AuditEntry`,
//!   `node` empty) inside the versioned, checksummed envelope of [`crate::codec`]; a
//!   flipped bit reads as [`AuditError::Corrupt`]. Records written before
//!   that hold JSON (no leading 0 byte) and still read, with fields
//!   missing from an older record read as empty.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::causality::PhysicalClock;
use crate::codec;
use crate::storage::{Cf, Engine, StorageError, WriteBatch};

/// Records waiting in memory for the next flush; beyond this, appends drop.
pub const QUEUE_RECORDS_MAX: usize = 65_536;
/// Approximate bytes waiting in memory; beyond this, appends drop too.
pub const QUEUE_BYTES_MAX: usize = 16 << 20;
/// Each text field of a record is clipped to this many bytes on append, so
/// a record is small whatever a client sent (a long denial reason, say).
pub const FIELD_BYTES_MAX: usize = 256;
/// How often the background task writes the queue.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// How often the background task prunes.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// A queue this long wakes the background task before its next tick.
const FLUSH_EARLY_RECORDS: usize = 4_096;
/// Records per write batch, so one flush never builds one huge batch.
const WRITE_BATCH_RECORDS_MAX: usize = 4_096;
/// Records read per scan call.
const SCAN_PAGE: usize = 4_096;
/// Records the open scan reads to recompute the log's size; past this the
/// size is what was seen (an under-estimate until age pruning catches up).
const OPEN_SCAN_RECORDS_MAX: usize = 1 << 21;
/// Records one [`AuditLog::prune`] deletes at most; the next flush tick
/// goes on.
pub const PRUNE_RECORDS_MAX: usize = 65_536;
// A prune after every flush then deletes at least what the flush wrote.
const _: () = assert!(PRUNE_RECORDS_MAX >= QUEUE_RECORDS_MAX);
/// Records one [`AuditLog::query`] returns at most.
pub const QUERY_LIMIT_MAX: usize = 10_000;
/// Records one [`AuditLog::query`] examines at most; a query with narrow
/// filters over a long log pages on by raising `since_ms`.
const QUERY_SCAN_MAX: usize = 1 << 20;
/// Bytes of a record's storage key.
pub const KEY_BYTES: usize = 16;
/// Where the node's key-hash secret lives in [`Cf::Meta`].
pub const SECRET_KEY: &[u8] = b"audit/secret";
/// Bytes of the key-hash secret.
pub const SECRET_BYTES: usize = 32;
/// Bytes of HMAC-SHA256 kept in a key hash (hex doubles it).
const KEY_HASH_BYTES: usize = 16;

/// How long and how much of the log a node keeps (`[security.audit]`).
/// Zero switches a bound off here; a node's config refuses that, so a real
/// log always has both bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditRetention {
    /// Records older than this many seconds are deleted.
    pub age_s: u64,
    /// While the stored records exceed this many bytes, the oldest go.
    pub bytes_max: u64,
}

impl Default for AuditRetention {
    fn default() -> Self {
        Self { age_s: 30 * 24 * 3600, bytes_max: 1 << 30 }
    }
}

/// One authorization decision.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditRecord {
    /// Wall-clock milliseconds since the Unix epoch when the request was
    /// decided.
    pub time_ms: u64,
    /// The authenticated principal (certificate CN, token subject).
    pub principal: String,
    /// The RPC, e.g. `kv.put`, `control.failover`.
    pub operation: String,
    /// The table, empty when the operation has none.
    pub table: String,
    /// [`AuditLog::key_hash`] of the row key, empty when there is none.
    pub key_hash: String,
    /// The region the request entered the cluster at.
    pub entry_region: String,
    /// The region that decided it (this node's).
    pub serving_region: String,
    pub allowed: bool,
    /// Why it was denied; empty when allowed.
    pub reason: String,
}

impl AuditRecord {
    /// Approximate bytes the record takes in memory and on disk.
    fn approx_bytes(&self) -> usize {
        // Field names and JSON punctuation come to roughly this much.
        const OVERHEAD: usize = 160;
        OVERHEAD
            + self.principal.len()
            + self.operation.len()
            + self.table.len()
            + self.key_hash.len()
            + self.entry_region.len()
            + self.serving_region.len()
            + self.reason.len()
    }

    fn clip(&mut self) {
        for field in [
            &mut self.principal,
            &mut self.operation,
            &mut self.table,
            &mut self.key_hash,
            &mut self.entry_region,
            &mut self.serving_region,
            &mut self.reason,
        ] {
            clip(field, FIELD_BYTES_MAX);
        }
    }
}

/// Shortens `s` to at most `max` bytes, at a character boundary.
fn clip(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A stored record (or its key) does not decode; `key` is the key in
    /// hex.
    #[error("audit record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// The stored key-hash secret does not decode.
    #[error("audit key-hash secret in meta `audit/secret` is unusable: {0}")]
    Secret(String),
}

/// What one [`AuditLog::prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub by_age: usize,
    pub by_bytes: usize,
    /// The prune stopped at its cap with records still due.
    pub more: bool,
}

/// The storage key of the `seq`-th record written at `time_ms`.
pub fn record_key(time_ms: u64, seq: u64) -> [u8; KEY_BYTES] {
    let mut k = [0u8; KEY_BYTES];
    k[..8].copy_from_slice(&time_ms.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `(time_ms, seq)` of a storage key, None when it is not one.
pub fn parse_key(key: &[u8]) -> Option<(u64, u64)> {
    let key: &[u8; KEY_BYTES] = key.try_into().ok()?;
    let (time, seq) = key.split_at(8);
    Some((u64::from_be_bytes(time.try_into().ok()?), u64::from_be_bytes(seq.try_into().ok()?)))
}

/// The stored form of `record`.
pub fn encode_record(record: AuditRecord) -> Vec<u8> {
    use prost::Message;
    let proto = geokv_proto::v1::AuditEntry::from(record);
    let mut payload = Vec::with_capacity(1 + proto.encoded_len());
    payload.push(PROTOBUF_MARK);
    proto.encode(&mut payload).expect("a Vec grows to fit");
    codec::seal(&payload)
}

/// A record as the API sends it (and as it is stored), `node` empty.
impl From<AuditRecord> for geokv_proto::v1::AuditEntry {
    fn from(r: AuditRecord) -> Self {
        Self {
            time_ms: r.time_ms,
            principal: r.principal,
            operation: r.operation,
            table: r.table,
            key_hash: r.key_hash,
            entry_region: r.entry_region,
            serving_region: r.serving_region,
            allowed: r.allowed,
            reason: r.reason,
            node: String::new(),
        }
    }
}

/// A stored record read back (the entry's `node` is not stored: the
/// answering node names itself).
impl From<geokv_proto::v1::AuditEntry> for AuditRecord {
    fn from(p: geokv_proto::v1::AuditEntry) -> Self {
        Self {
            time_ms: p.time_ms,
            principal: p.principal,
            operation: p.operation,
            table: p.table,
            key_hash: p.key_hash,
            entry_region: p.entry_region,
            serving_region: p.serving_region,
            allowed: p.allowed,
            reason: p.reason,
        }
    }
}

/// First byte of a protobuf record's payload. Records written before it
/// are JSON, which starts with `{` (or white space), never with a 0 byte.
const PROTOBUF_MARK: u8 = 0;

/// Reads a stored record back, protobuf or the JSON of older records;
/// `key` only names it in the error.
pub fn decode_record(key: &[u8], value: &[u8]) -> Result<AuditRecord, AuditError> {
    use prost::Message;
    let corrupt = |reason: String| AuditError::Corrupt { key: hex::encode(key), reason };
    let payload = codec::open(value).map_err(|e| corrupt(e.to_string()))?;
    let Some(proto) = payload.strip_prefix(&[PROTOBUF_MARK]) else {
        return serde_json::from_slice(payload).map_err(|e| corrupt(format!("payload does not decode: {e}")));
    };
    let p = geokv_proto::v1::AuditEntry::decode(proto)
        .map_err(|e| corrupt(format!("payload does not decode: {e}")))?;
    Ok(p.into())
}

/// HMAC-SHA256 (RFC 2104) of the concatenation of `parts` under `key`.
///
/// Written out over `sha2` rather than pulling in a crate for twenty
/// lines; the tests check it against RFC 4231.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The node's key-hash secret: read from [`Cf::Meta`] under
/// [`SECRET_KEY`], or drawn at random and stored (synced, before any hash
/// made with it can be written) the first time.
///
/// The secret never leaves the node, so the hashes of two nodes are not
/// comparable; they only link records of one node's log. A stored secret
/// that does not decode is an error rather than replaced, since a new
/// secret would silently unlink every record already written.
pub fn load_or_create_secret(engine: &dyn Engine) -> Result<[u8; SECRET_BYTES], AuditError> {
    if let Some(stored) = engine.get(Cf::Meta, SECRET_KEY)? {
        let payload = codec::open(&stored).map_err(|e| AuditError::Secret(e.to_string()))?;
        return payload
            .try_into()
            .map_err(|_| AuditError::Secret(format!("{} bytes, expected {SECRET_BYTES}", payload.len())));
    }
    let mut secret = [0u8; SECRET_BYTES];
    // The thread generator is a CSPRNG seeded from the operating system.
    rand::Rng::fill(&mut rand::rng(), &mut secret[..]);
    let mut batch = WriteBatch::new();
    batch.put(Cf::Meta, SECRET_KEY.to_vec(), codec::seal(&secret));
    engine.write(batch, true)?;
    Ok(secret)
}

/// Records not yet written, with their approximate size.
#[derive(Default)]
struct Queue {
    records: Vec<AuditRecord>,
    bytes: usize,
}

/// A node's audit log. Shared as `Arc<AuditLog>` between request handlers
/// (which append) and its background task (which flushes and prunes).
pub struct AuditLog {
    engine: Arc<dyn Engine>,
    secret: [u8; SECRET_BYTES],
    retention: AuditRetention,
    queue: Mutex<Queue>,
    /// Wakes the background task when the queue grows long between ticks.
    wake: Notify,
    next_seq: AtomicU64,
    /// Approximate bytes of the stored records (keys and values).
    stored_bytes: AtomicU64,
    /// Serializes flushes and prunes, so the size estimate and the
    /// "oldest records" a prune deletes agree with what is on disk.
    work: Mutex<()>,
    /// Whether the last write failed, so a persistent failure is logged
    /// once rather than every tick.
    failing: AtomicBool,
    /// Records one prune deletes at most ([`PRUNE_RECORDS_MAX`]).
    prune_records_max: usize,
    /// Where pruning stands (taken under `work`).
    prune: Mutex<PruneState>,
}

/// Where the next prune starts, and whether one is due before the next
/// age tick.
#[derive(Default)]
struct PruneState {
    /// Every stored key below this was pruned (empty: start of the log).
    from: Vec<u8>,
    /// The last prune stopped at its cap.
    more: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind
    // (a queue, nothing), still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The first key after `key`: where the next page of a scan starts.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

fn dropped(reason: &'static str, count: usize) {
    metrics::counter!("geokv_audit_dropped_total", "reason" => reason).increment(count as u64);
}

impl AuditLog {
    /// Opens the log over `engine`. Reads the stored records once (at most
    /// [`OPEN_SCAN_RECORDS_MAX`] of them, keys and sizes only) to recover
    /// the next sequence number and the log's size.
    pub fn new(
        engine: Arc<dyn Engine>,
        key_secret: [u8; SECRET_BYTES],
        retention: AuditRetention,
    ) -> Result<Self, AuditError> {
        let mut bytes = 0u64;
        let mut max_seq = None::<u64>;
        let mut seen = 0usize;
        let mut start = Vec::new();
        while seen < OPEN_SCAN_RECORDS_MAX {
            let page = engine.scan(Cf::Audit, &start, None, SCAN_PAGE.min(OPEN_SCAN_RECORDS_MAX - seen))?;
            let Some((last, _)) = page.last() else { break };
            start = successor(last);
            seen += page.len();
            for (k, v) in &page {
                bytes += (k.len() + v.len()) as u64;
                if let Some((_, seq)) = parse_key(k) {
                    max_seq = max_seq.max(Some(seq));
                }
            }
            if page.len() < SCAN_PAGE {
                break;
            }
        }
        if seen >= OPEN_SCAN_RECORDS_MAX {
            tracing::warn!(
                records = seen,
                "audit log larger than the open scan; its size is under-estimated until pruning catches up"
            );
        }
        // The last key is the newest by time; with a clock that went back,
        // an older-looking key may hold a higher sequence, which the scan saw.
        if let Some((_, seq)) = engine.last(Cf::Audit)?.and_then(|(k, _)| parse_key(&k)) {
            max_seq = max_seq.max(Some(seq));
        }
        metrics::gauge!("geokv_audit_bytes").set(bytes as f64);
        Ok(Self {
            engine,
            secret: key_secret,
            retention,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            next_seq: AtomicU64::new(max_seq.map_or(0, |s| s.saturating_add(1))),
            stored_bytes: AtomicU64::new(bytes),
            work: Mutex::new(()),
            failing: AtomicBool::new(false),
            prune_records_max: PRUNE_RECORDS_MAX,
            prune: Mutex::new(PruneState::default()),
        })
    }

    /// A keyed hash of a row key, hex: the first 16 bytes of
    /// HMAC-SHA256(node secret, table length, table, key). The table is
    /// length-prefixed so (`ab`, `c`) and (`a`, `bc`) hash apart. Without
    /// the secret the hash cannot be reversed by hashing guessed keys.
    pub fn key_hash(&self, table: &str, key: &[u8]) -> String {
        let table_len = u32::try_from(table.len()).unwrap_or(u32::MAX).to_be_bytes();
        let mac = hmac_sha256(&self.secret, &[&table_len, table.as_bytes(), key]);
        hex::encode(&mac[..KEY_HASH_BYTES])
    }

    /// Queues `record` for the next flush. Never blocks on IO: when the
    /// queue is full the record is dropped and counted.
    pub fn append(&self, mut record: AuditRecord) {
        let allowed = if record.allowed { "true" } else { "false" };
        metrics::counter!("geokv_audit_records_total", "allowed" => allowed).increment(1);
        record.clip();
        let size = record.approx_bytes();
        let queued = {
            let mut q = lock(&self.queue);
            if q.records.len() >= QUEUE_RECORDS_MAX || q.bytes + size > QUEUE_BYTES_MAX {
                None
            } else {
                q.records.push(record);
                q.bytes += size;
                Some(q.records.len())
            }
        };
        match queued {
            None => dropped("queue_full", 1),
            Some(len) if len >= FLUSH_EARLY_RECORDS => self.wake.notify_one(),
            Some(_) => {}
        }
    }

    /// Records waiting for the next flush.
    pub fn queued(&self) -> usize {
        lock(&self.queue).records.len()
    }

    /// Approximate bytes of the stored records.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Acquire)
    }

    /// Writes every queued record, unsynced, in batches of at most
    /// [`WRITE_BATCH_RECORDS_MAX`]; returns how many were written. Records
    /// of a batch that fails to write are dropped and counted, so a failing
    /// disk cannot grow the queue.
    pub fn flush(&self) -> Result<usize, AuditError> {
        let _work = lock(&self.work);
        let records = std::mem::take(&mut *lock(&self.queue)).records;
        let total = records.len();
        let mut written = 0;
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let mut count = 0;
            let mut batch = WriteBatch::new();
            let mut bytes = 0u64;
            let mut oldest: Option<[u8; KEY_BYTES]> = None;
            for rec in records.by_ref().take(WRITE_BATCH_RECORDS_MAX) {
                count += 1;
                let seq = self.next_seq.fetch_add(1, Ordering::AcqRel);
                let key = record_key(rec.time_ms, seq);
                oldest = Some(oldest.map_or(key, |o| o.min(key)));
                let value = encode_record(rec);
                bytes += (KEY_BYTES + value.len()) as u64;
                batch.put(Cf::Audit, key.to_vec(), value);
            }
            // A record stamped before where pruning stands (a clock that
            // went back) moves the next prune's start down to it.
            if let Some(oldest) = oldest {
                let mut prune = lock(&self.prune);
                if oldest.as_slice() < prune.from.as_slice() {
                    prune.from = oldest.to_vec();
                }
            }
            if let Err(e) = self.engine.write(batch, false) {
                dropped("write_failed", total - written);
                if !self.failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e, "audit log write failed; records are dropped until it recovers");
                }
                return Err(e.into());
            }
            self.failing.store(false, Ordering::Release);
            written += count;
            let now = self.stored_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
            metrics::gauge!("geokv_audit_bytes").set(now as f64);
        }
        Ok(written)
    }

    /// Deletes records older than the retention age at `now_ms`, then the
    /// oldest ones while the log exceeds its byte bound; at most
    /// [`PRUNE_RECORDS_MAX`] records per call (`more` says it stopped there).
    /// It reads from where the last prune stopped, never from the first key.
    pub fn prune(&self, now_ms: u64) -> Result<PruneReport, AuditError> {
        let _work = lock(&self.work);
        let cap = self.prune_records_max;
        let mut report = PruneReport::default();
        let mut start = lock(&self.prune).from.clone();
        if self.retention.age_s > 0 {
            let cutoff = now_ms.saturating_sub(self.retention.age_s.saturating_mul(1000));
            // Keys of records before `cutoff` sort below its 8 bytes alone.
            let end = cutoff.to_be_bytes();
            while report.by_age < cap && start.as_slice() < end.as_slice() {
                let budget = SCAN_PAGE.min(cap - report.by_age);
                let page = self.engine.scan(Cf::Audit, &start, Some(&end), budget)?;
                let Some((last, _)) = page.last() else {
                    start = end.to_vec();
                    break;
                };
                start = successor(last);
                let n = page.len();
                self.delete(page.into_iter().map(|(k, v)| (k, v.len())))?;
                report.by_age += n;
                if n < budget {
                    start = start.max(end.to_vec());
                    break;
                }
            }
            report.more |= report.by_age >= cap;
        }
        if self.retention.bytes_max > 0 {
            while self.stored_bytes() > self.retention.bytes_max && report.by_age + report.by_bytes < cap {
                let budget = SCAN_PAGE.min(cap - report.by_age - report.by_bytes);
                let page = self.engine.scan(Cf::Audit, &start, None, budget)?;
                if page.is_empty() {
                    // Nothing stored past the start: the estimate drifted;
                    // start it over.
                    self.stored_bytes.store(0, Ordering::Release);
                    break;
                }
                let mut excess = self.stored_bytes().saturating_sub(self.retention.bytes_max);
                let mut doomed = Vec::new();
                for (k, v) in page {
                    if excess == 0 {
                        break;
                    }
                    excess = excess.saturating_sub((k.len() + v.len()) as u64);
                    start = successor(&k);
                    doomed.push((k, v.len()));
                }
                report.by_bytes += doomed.len();
                self.delete(doomed.into_iter())?;
            }
            report.more |= self.stored_bytes() > self.retention.bytes_max;
        }
        {
            let mut prune = lock(&self.prune);
            prune.from = start;
            prune.more = report.more;
        }
        if report.by_age > 0 {
            metrics::counter!("geokv_audit_pruned_total", "reason" => "age").increment(report.by_age as u64);
        }
        if report.by_bytes > 0 {
            metrics::counter!("geokv_audit_pruned_total", "reason" => "bytes")
                .increment(report.by_bytes as u64);
        }
        metrics::gauge!("geokv_audit_bytes").set(self.stored_bytes() as f64);
        Ok(report)
    }

    /// Whether a prune is due before the next age tick: the log is over
    /// its byte bound, or the last prune stopped at its cap.
    pub fn prune_due(&self) -> bool {
        (self.retention.bytes_max > 0 && self.stored_bytes() > self.retention.bytes_max)
            || lock(&self.prune).more
    }

    /// One flush tick's work: writes the queue, then prunes when `age_tick`
    /// or [`AuditLog::prune_due`].
    pub fn maintain(&self, now_ms: u64, age_tick: bool) -> Result<(), AuditError> {
        if self.queued() > 0 {
            self.flush()?;
        }
        if age_tick || self.prune_due() {
            self.prune(now_ms)?;
        }
        Ok(())
    }

    /// Deletes `(key, value length)` pairs in one unsynced batch and takes
    /// their size off the estimate.
    fn delete(&self, doomed: impl Iterator<Item = (Vec<u8>, usize)>) -> Result<(), AuditError> {
        let mut batch = WriteBatch::new();
        let mut bytes = 0u64;
        for (k, value_len) in doomed {
            bytes += (k.len() + value_len) as u64;
            batch.delete(Cf::Audit, k);
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.engine.write(batch, false)?;
        // The closure always returns Some, so fetch_update cannot fail.
        let _ = self
            .stored_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| Some(b.saturating_sub(bytes)));
        Ok(())
    }

    /// Stored records from `since_ms` on, oldest first, of `principal` and
    /// on `table` when given, at most `limit` (and [`QUERY_LIMIT_MAX`]).
    /// Queued records show once flushed. At most [`QUERY_SCAN_MAX`] records
    /// are examined. A record that does not decode fails the query with
    /// [`AuditError::Corrupt`] naming its key.
    pub fn query(
        &self,
        since_ms: u64,
        principal: Option<&str>,
        table: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, AuditError> {
        let limit = limit.min(QUERY_LIMIT_MAX);
        let mut out = Vec::new();
        let mut start = since_ms.to_be_bytes().to_vec();
        let mut examined = 0usize;
        while out.len() < limit && examined < QUERY_SCAN_MAX {
            let page = self.engine.scan(Cf::Audit, &start, None, SCAN_PAGE)?;
            let Some((last, _)) = page.last() else { break };
            start = successor(last);
            examined += page.len();
            let full = page.len() == SCAN_PAGE;
            for (k, v) in page {
                if parse_key(&k).is_none() {
                    return Err(AuditError::Corrupt {
                        key: hex::encode(&k),
                        reason: format!("key is {} bytes, expected {KEY_BYTES}", k.len()),
                    });
                }
                let rec = decode_record(&k, &v)?;
                if principal.is_some_and(|p| p != rec.principal) || table.is_some_and(|t| t != rec.table) {
                    continue;
                }
                out.push(rec);
                if out.len() == limit {
                    break;
                }
            }
            if !full {
                break;
            }
        }
        Ok(out)
    }

    /// Starts the task that flushes every [`FLUSH_EVERY`] (sooner when the
    /// queue grows long), prunes every [`PRUNE_EVERY`] by `clock`, and
    /// prunes after a flush while [`AuditLog::prune_due`]. On
    /// `cancel` it flushes once more and ends. Storage work runs on the
    /// blocking pool, as every engine call may block on IO.
    pub fn start_background(
        self: &Arc<Self>,
        clock: Arc<dyn PhysicalClock>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut flush_tick = tokio::time::interval(FLUSH_EVERY);
            flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut prune_tick = tokio::time::interval(PRUNE_EVERY);
            prune_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_warned = None;
            loop {
                let age_tick = tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = flush_tick.tick() => false,
                    _ = me.wake.notified() => false,
                    _ = prune_tick.tick() => true,
                };
                if !age_tick && me.queued() == 0 && !me.prune_due() {
                    continue;
                }
                let log = me.clone();
                let now_ms = clock.now_ms();
                // A failed write is counted and logged by `flush` itself. A
                // prune that keeps failing is retried every tick while it is
                // due, and logged once per age tick.
                let failed = match tokio::task::spawn_blocking(move || log.maintain(now_ms, age_tick)).await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("audit log flush or prune failed: {e}")),
                    Err(e) => Some(format!("audit log task failed: {e}")),
                };
                if let Some(why) = failed {
                    metrics::counter!("geokv_audit_maintenance_failures_total").increment(1);
                    if last_warned.is_none_or(|at: std::time::Instant| at.elapsed() >= PRUNE_EVERY) {
                        tracing::warn!("{why}");
                        last_warned = Some(std::time::Instant::now());
                    }
                }
            }
            me.flush_in_background().await;
        })
    }

    async fn flush_in_background(self: &Arc<Self>) {
        if self.queued() == 0 {
            return;
        }
        let log = self.clone();
        // A failed write is counted and logged by `flush` itself.
        if let Err(e) = tokio::task::spawn_blocking(move || log.flush()).await {
            tracing::warn!(error = %e, "audit log flush task failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryEngine;

    fn record(time_ms: u64, principal: &str, table: &str, allowed: bool) -> AuditRecord {
        AuditRecord {
            time_ms,
            principal: principal.to_string(),
            operation: "kv.put".to_string(),
            table: table.to_string(),
            key_hash: String::new(),
            entry_region: "eu-west-1".to_string(),
            serving_region: "us-east-1".to_string(),
            allowed,
            reason: if allowed { String::new() } else { "write on table `a`".to_string() },
        }
    }

    fn open(engine: &Arc<MemoryEngine>, retention: AuditRetention) -> AuditLog {
        AuditLog::new(engine.clone(), [7; SECRET_BYTES], retention).unwrap()
    }

    const NO_LIMITS: AuditRetention = AuditRetention { age_s: 0, bytes_max: 0 };

    #[test]
    fn append_flush_query_with_filters() {
        let engine = Arc::new(MemoryEngine::new());
        let log = open(&engine, NO_LIMITS);
        log.append(record(1_000, "alice", "a", true));
        log.append(record(1_000, "bob", "a", false));
        log.append(record(2_000, "alice", "b", true));
        log.append(record(3_000, "alice", "a", false));
        assert!(log.query(0, None, None, 100).unwrap().is_empty(), "nothing is stored before a flush");
        assert_eq!(log.flush().unwrap(), 4);
        assert_eq!(log.queued(), 0);

        let all = log.query(0, None, None, 100).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0], record(1_000, "alice", "a", true), "records decode back whole");
        assert_eq!(all[1].principal, "bob", "same millisecond: kept in append order");
        assert!(all.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));

        let alice = log.query(0, Some("alice"), None, 100).unwrap();
        assert_eq!(alice.iter().map(|r| r.time_ms).collect::<Vec<_>>(), [1_000, 2_000, 3_000]);
        let alice_a = log.query(0, Some("alice"), Some("a"), 100).unwrap();
        assert_eq!(alice_a.iter().map(|r| r.time_ms).collect::<Vec<_>>(), [1_000, 3_000]);
        assert_eq!(log.query(2_000, None, None, 100).unwrap().len(), 2);
        assert_eq!(log.query(0, None, None, 1).unwrap().len(), 1);
        assert!(log.query(0, Some("carol"), None, 100).unwrap().is_empty());
        assert!(log.query(0, None, None, 0).unwrap().is_empty());
        assert!(engine.scan(Cf::Data, b"", None, 10).unwrap().is_empty(), "nothing leaks into rows");
        assert!(engine.scan(Cf::ReplLog, b"", None, 10).unwrap().is_empty(), "nothing is replicated");
    }

    #[test]
    fn sequence_continues_after_reopen() {
        let engine = Arc::new(MemoryEngine::new());
        let log = open(&engine, NO_LIMITS);
        log.append(record(5_000, "alice", "a", true));
        log.flush().unwrap();
        drop(log);
        let log = open(&engine, NO_LIMITS);
        // The same millisecond again must not overwrite the first record.
        log.append(record(5_000, "bob", "a", true));
        log.flush().unwrap();
        assert_eq!(log.query(0, None, None, 10).unwrap().len(), 2);
        assert_eq!(log.stored_bytes(), open(&engine, NO_LIMITS).stored_bytes(), "reopen recounts the size");
    }

    #[test]
    fn full_queue_drops_without_blocking() {
        let engine = Arc::new(MemoryEngine::new());
        let log = open(&engine, NO_LIMITS);
        for i in 0..QUEUE_RECORDS_MAX + 10 {
            log.append(record(i as u64, "alice", "a", true));
        }
        assert_eq!(log.queued(), QUEUE_RECORDS_MAX);
        assert_eq!(log.flush().unwrap(), QUEUE_RECORDS_MAX);
    }

    #[test]
    fn fields_are_clipped() {
        let engine = Arc::new(MemoryEngine::new());
        let log = open(&engine, NO_LIMITS);
        let mut rec = record(1, "alice", "a", false);
        rec.reason = "é".repeat(FIELD_BYTES_MAX);
        log.append(rec);
        log.flush().unwrap();
        let stored = log.query(0, None, None, 1).unwrap();
        assert!(stored[0].reason.len() <= FIELD_BYTES_MAX);
        assert!(stored[0].reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn key_hash_is_keyed_and_hides_the_key() {
        let engine = Arc::new(MemoryEngine::new());
        let a = AuditLog::new(engine.clone(), [1; SECRET_BYTES], NO_LIMITS).unwrap();
        let b = AuditLog::new(engine.clone(), [2; SECRET_BYTES], NO_LIMITS).unwrap();
        let key = b"user:alice";
        let h = a.key_hash("users", key);
        assert_eq!(h.len(), 2 * KEY_HASH_BYTES);
        assert_eq!(h, a.key_hash("users", key), "stable for one secret");
        assert_ne!(h, b.key_hash("users", key), "a different secret, a different hash");
        assert_ne!(h, a.key_hash("users", b"user:bob"));
        assert_ne!(a.key_hash("ab", b"c"), a.key_hash("a", b"bc"), "table and key do not run together");
        assert!(!h.contains("alice") && !h.contains(&hex::encode(key)), "no raw key in the hash");
        // Not the plain (unkeyed) SHA-256 either.
        assert!(!hex::encode(Sha256::digest(key)).starts_with(&h));
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        let case1 = hmac_sha256(&[0x0b; 20], &[b"Hi There"]);
        assert_eq!(hex::encode(case1), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
        let case2 = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(hex::encode(case2), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        // Case 6: a key longer than the block is hashed first.
        let case6 = hmac_sha256(&[0xaa; 131], &[b"Test Using Larger Than Block-Size Key - Hash Key First"]);
        assert_eq!(hex::encode(case6), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    }

    #[test]
    fn prune_by_age() {
        let engine = Arc::new(MemoryEngine::new());
        let log = open(&engine, AuditRetention { age_s: 60, bytes_max: 0 });
        for t in [1_000, 30_000, 61_000, 90_000, 120_000] {
            log.append(record(t, "alice", "a", true));
        }
        log.flush().unwrap();
        let before = log.stored_bytes();
        // At 121 s, records before 61 s are older than 60 s.
        let report = log.prune(121_000).unwrap();
        assert_eq!(report, PruneReport { by_age: 2, by_bytes: 0, more: false });
        let left = log.query(0, None, None, 10).unwrap();
        assert_eq!(left.iter().map(|r| r.time_ms).collect::<Vec<_>>(), [61_000, 90_000, 120_000]);
        assert!(log.stored_bytes() < before);
        assert_eq!(log.stored_bytes(), open(&engine, NO_LIMITS).stored_bytes(), "estimate matches a recount");
        assert_eq!(log.prune(121_000).unwrap(), PruneReport::default(), "nothing more to do");
    }

    #[test]
    fn prune_by_bytes_deletes_the_oldest() {
        let engine = Arc::new(MemoryEngine::new());
        let unbounded = open(&engine, NO_LIMITS);
        for t in 1..=10 {
            unbounded.append(record(t, "alice", "a", true));
        }
        unbounded.flush().unwrap();
        let total = unbounded.stored_bytes();
        let one = total / 10;
        drop(unbounded);

        // Room for about four records: the six oldest go.
        let log = open(&engine, AuditRetention { age_s: 0, bytes_max: 4 * one + one / 2 });
        assert_eq!(log.stored_bytes(), total, "the size is recounted at open");
        let report = log.prune(u64::MAX).unwrap();
        assert_eq!(report, PruneReport { by_age: 0, by_bytes: 6, more: false });
        let left = log.query(0, None, None, 100).unwrap();
        assert_eq!(left.iter().map(|r| r.time_ms).collect::<Vec<_>>(), [7, 8, 9, 10]);
        assert!(log.stored_bytes() <= 4 * one + one / 2);
    }

    /// Bytes of one stored test record with a time as long as the flood
    /// test's last ones (the largest of them).
    fn one_record_bytes() -> u64 {
        let engine = Arc::new(MemoryEngine::new());
        let log = open(&engine, NO_LIMITS);
        log.append(record(40_000, "alice", "a", true));
        log.flush().unwrap();
        log.stored_bytes()
    }

    /// Appends far faster than one prune per age tick deletes: each flush
    /// tick prunes what went over the bound, so the log stays within it
    /// (it grew without end before, by what the appends outran).
    #[test]
    fn pruning_keeps_pace_with_a_flood_of_appends() {
        let one = one_record_bytes();
        let engine = Arc::new(MemoryEngine::new());
        let mut log = open(&engine, AuditRetention { age_s: 0, bytes_max: 50 * one });
        // A cap per prune of just more than a flush tick's appends, as
        // PRUNE_RECORDS_MAX is to QUEUE_RECORDS_MAX.
        log.prune_records_max = 120;
        for tick in 0..50u64 {
            for i in 0..100 {
                log.append(record(tick * 1_000 + i, "alice", "a", true));
            }
            log.maintain(tick * 1_000 + 999, false).unwrap();
            assert!(
                log.stored_bytes() <= 50 * one,
                "tick {tick}: {} records stored, bound 50",
                log.stored_bytes() / one
            );
        }
        let left = log.query(0, None, None, 1_000).unwrap();
        assert_eq!(left.len(), 50);
        assert_eq!(left[0].time_ms, 49_050, "the oldest went first");
        assert_eq!(log.stored_bytes(), open(&engine, NO_LIMITS).stored_bytes(), "estimate matches a recount");
    }

    /// Age pruning that finds more than its cap goes on at the next flush
    /// tick, not at the next age tick.
    #[test]
    fn an_age_prune_stopped_at_its_cap_goes_on_at_the_next_tick() {
        let engine = Arc::new(MemoryEngine::new());
        let mut log = open(&engine, AuditRetention { age_s: 1, bytes_max: 0 });
        log.prune_records_max = 100;
        for t in 0..250 {
            log.append(record(t, "alice", "a", true));
        }
        log.flush().unwrap();
        let report = log.prune(10_000).unwrap();
        assert_eq!((report.by_age, report.more), (100, true));
        assert!(log.prune_due());
        log.maintain(10_000, false).unwrap();
        log.maintain(10_000, false).unwrap();
        assert!(log.query(0, None, None, 1_000).unwrap().is_empty(), "all 250 expired records are gone");
        assert!(!log.prune_due());
    }

    /// A prune starts where the last one stopped, and a record written
    /// after it with an older time (a clock stepped back) is still pruned.
    #[test]
    fn a_record_older_than_where_pruning_stands_is_still_pruned() {
        let engine = Arc::new(MemoryEngine::new());
        let log = open(&engine, AuditRetention { age_s: 1, bytes_max: 0 });
        for t in [1_000, 2_000, 50_000] {
            log.append(record(t, "alice", "a", true));
        }
        log.flush().unwrap();
        assert_eq!(log.prune(40_000).unwrap().by_age, 2);
        log.append(record(500, "alice", "a", true));
        log.flush().unwrap();
        assert_eq!(log.prune(40_000).unwrap().by_age, 1, "the late, older record");
        let left = log.query(0, None, None, 10).unwrap();
        assert_eq!(left.iter().map(|r| r.time_ms).collect::<Vec<_>>(), [50_000]);
    }

    #[test]
    fn records_round_trip_and_corruption_is_typed() {
        let rec = record(42, "alice", "a", false);
        let key = record_key(42, 9);
        assert_eq!(parse_key(&key), Some((42, 9)));
        assert_eq!(parse_key(&key[..15]), None);
        let sealed = encode_record(rec.clone());
        assert_eq!(decode_record(&key, &sealed).unwrap(), rec);
        for byte in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[byte] ^= 0x10;
            assert!(matches!(decode_record(&key, &bad), Err(AuditError::Corrupt { .. })), "byte {byte}");
        }
        assert!(matches!(decode_record(&key, &[]), Err(AuditError::Corrupt { .. })));
        // A valid envelope around something that is not a record.
        assert!(matches!(
            decode_record(&key, &codec::seal(br#""not a record""#)),
            Err(AuditError::Corrupt { .. })
        ));
        // A record stored as JSON by an older build reads as it was.
        let json = codec::seal(&serde_json::to_vec(&rec).unwrap());
        assert_eq!(decode_record(&key, &json).unwrap(), rec);
        assert_eq!(codec::open(&sealed).unwrap()[0], PROTOBUF_MARK, "new records are protobuf");
        // An older record without newer fields still reads.
        let old =
            decode_record(&key, &codec::seal(br#"{"time_ms":5,"principal":"p","allowed":true}"#)).unwrap();
        assert_eq!(
            (old.time_ms, old.principal.as_str(), old.allowed, old.table.as_str()),
            (5, "p", true, "")
        );
    }

    #[test]
    fn corrupt_stored_record_fails_the_query_with_a_typed_error() {
        let engine = Arc::new(MemoryEngine::new());
        let log = open(&engine, NO_LIMITS);
        log.append(record(1, "alice", "a", true));
        log.flush().unwrap();
        let mut batch = WriteBatch::new();
        batch.put(Cf::Audit, record_key(2, 1_000).to_vec(), b"\x01garbage".to_vec());
        engine.write(batch, false).unwrap();
        match log.query(0, None, None, 10) {
            Err(AuditError::Corrupt { key, .. }) => assert_eq!(key, hex::encode(record_key(2, 1_000))),
            other => panic!("expected a corrupt-record error, got {other:?}"),
        }
        let mut batch = WriteBatch::new();
        batch.delete(Cf::Audit, record_key(2, 1_000).to_vec());
        batch.put(Cf::Audit, b"short".to_vec(), encode_record(record(3, "x", "", true)));
        engine.write(batch, false).unwrap();
        assert!(matches!(log.query(0, None, None, 10), Err(AuditError::Corrupt { .. })));
        // A log with a malformed key still opens and prunes.
        let reopened =
            AuditLog::new(engine.clone(), [7; SECRET_BYTES], AuditRetention { age_s: 1, bytes_max: 0 });
        assert_eq!(reopened.unwrap().prune(1_000_000).unwrap().by_age, 1);
    }

    #[test]
    fn secret_is_created_once_and_kept() {
        let engine = MemoryEngine::new();
        let first = load_or_create_secret(&engine).unwrap();
        assert_ne!(first, [0; SECRET_BYTES]);
        assert_eq!(load_or_create_secret(&engine).unwrap(), first);
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, SECRET_KEY.to_vec(), b"\x01\x00\x00".to_vec());
        engine.write(batch, true).unwrap();
        assert!(matches!(load_or_create_secret(&engine), Err(AuditError::Secret(_))));
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, SECRET_KEY.to_vec(), codec::seal(&[1; 5]));
        engine.write(batch, true).unwrap();
        assert!(matches!(load_or_create_secret(&engine), Err(AuditError::Secret(_))));
    }

    #[tokio::test]
    async fn background_task_flushes_and_flushes_again_on_shutdown() {
        let engine = Arc::new(MemoryEngine::new());
        let log = Arc::new(open(&engine, NO_LIMITS));
        let cancel = CancellationToken::new();
        let clock = Arc::new(crate::causality::ManualClock::new(1_000));
        let task = log.start_background(clock, cancel.clone());
        log.append(record(1, "alice", "a", true));
        // A few ticks at most; bounded so a broken task fails the test.
        for _ in 0..100 {
            if log.queued() == 0 && !log.query(0, None, None, 10).unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(FLUSH_EVERY).await;
        }
        assert_eq!(log.query(0, None, None, 10).unwrap().len(), 1);
        log.append(record(2, "alice", "a", true));
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(log.query(0, None, None, 10).unwrap().len(), 2, "shutdown flushes what is queued");
    }
}
