//! Row TTL on disk: the compaction rules that take expired values off the
//! disk (docs/architecture.md section 13).
//!
//! A value's expiry is fixed when it is written (its HLC time plus its
//! TTL) and travels with it, so every region hides it at the same moment;
//! reads hide it at once (`register_view`, `row_is_invisible`). Compaction
//! then strips it: an expired register value becomes a tombstone of the
//! same dot (the row keeps its clock, so an older copy of the row arriving
//! later is still superseded and nothing comes back), which tombstone
//! collection removes once every region has it (section 17). An expired
//! STRONG value is removed outright: every replica applies the same
//! commands and treats it as absent already.
//!
//! The same rules apply erasure fences (`crate::lifecycle`): a value of an
//! erased subject written through its fence is stripped wherever a
//! compaction finds it, in a stored row or a replication-log entry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use geokv_proto::storage as pb;

use crate::causality::hlc::{Hlc, PhysicalClock};
use crate::consensus::strong::decode_value;
use crate::storage::{Compacted, CompactionRule};

use super::row::RowValue;
use super::row::{split_data_key, Row};
use crate::lifecycle::{fence_row, Lifecycle};

/// Expired values stripped or removed by compaction since the process
/// started (also `geokv_ttl_values_stripped_total`).
static STRIPPED: AtomicU64 = AtomicU64::new(0);

/// How many expired values compaction has taken off the disk so far.
pub fn stripped_total() -> u64 {
    STRIPPED.load(Ordering::Relaxed)
}

fn count(n: u64) {
    STRIPPED.fetch_add(n, Ordering::Relaxed);
    metrics::counter!("geokv_ttl_values_stripped_total").increment(n);
}

/// Whether values expire (not with the put-back bug `ttl-ignored`).
fn enforced() -> bool {
    #[cfg(feature = "bugs")]
    if crate::bugs::active(crate::bugs::Bug::TtlIgnored) {
        return false;
    }
    true
}

/// The time reads judge expiry by ([`Hlc::read_ms`]); 0, before every
/// expiry, with the put-back bug `ttl-ignored`.
pub fn read_ms(hlc: &Hlc) -> u64 {
    if enforced() {
        hlc.read_ms()
    } else {
        0
    }
}

/// Strips the values of `row` expired at `now_ms`; returns how many.
pub fn strip_row(row: &mut Row, now_ms: u64) -> usize {
    if !enforced() {
        return 0;
    }
    match &mut row.value {
        RowValue::Register(d) => d.strip_expired(now_ms),
        RowValue::Lww(l) => usize::from(l.strip_expired(now_ms)),
        RowValue::Counter(_) | RowValue::Set(_) => 0,
    }
}

/// Strips what `row` (of `table`, `key`) may no longer hold at `now_ms`:
/// expired values, and values of an erased subject through its fence.
fn strip_all(lifecycle: &Lifecycle, table: &str, key: &[u8], row: &mut Row, now_ms: u64) -> usize {
    let mut n = strip_row(row, now_ms);
    if let Some(fence) = lifecycle.fence_of(table, key) {
        n += fence_row(row, fence).values;
    }
    n
}

/// The rule of the `data` column family: expired and erased values become
/// tombstones of their dots.
pub struct DataExpiry {
    clock: Arc<dyn PhysicalClock>,
    lifecycle: Arc<Lifecycle>,
}

impl DataExpiry {
    pub fn new(clock: Arc<dyn PhysicalClock>, lifecycle: Arc<Lifecycle>) -> Self {
        Self { clock, lifecycle }
    }
}

impl CompactionRule for DataExpiry {
    fn name(&self) -> &'static str {
        "geokv-data-expiry"
    }

    fn filter(&self, key: &[u8], value: &[u8]) -> Compacted {
        // A row that does not decode is kept as it is: reads report it.
        let Some((table, row_key)) = split_data_key(key) else { return Compacted::Keep };
        let Ok(mut row) = Row::open(value, || String::from_utf8_lossy(key).into_owned()) else {
            return Compacted::Keep;
        };
        match strip_all(&self.lifecycle, table, row_key, &mut row, self.clock.now_ms()) {
            0 => Compacted::Keep,
            n => {
                count(n as u64);
                Compacted::Change(row.seal())
            }
        }
    }
}

/// An encoded entry carrying a row's whole state: a replication-log or a
/// change-feed entry.
trait RowEntry: prost::Message + Default {
    /// The entry's table, key and row.
    fn parts(&mut self) -> (&str, &[u8], &mut Option<pb::Row>);

    /// Empties the erased set members of a reply the entry carries;
    /// returns how many.
    fn purge_reply(&mut self, _lifecycle: &Lifecycle) -> usize {
        0
    }
}

impl RowEntry for pb::LogEntry {
    fn parts(&mut self) -> (&str, &[u8], &mut Option<pb::Row>) {
        (&self.table, &self.key, &mut self.row)
    }

    /// A log entry carries its request's idempotency record to the other
    /// regions, with the reply.
    fn purge_reply(&mut self, lifecycle: &Lifecycle) -> usize {
        self.idempotency.as_mut().and_then(|t| t.record.as_mut()).map_or(0, |r| lifecycle.purge_reply(r))
    }
}

impl RowEntry for pb::FeedEntry {
    fn parts(&mut self) -> (&str, &[u8], &mut Option<pb::Row>) {
        (&self.table, &self.key, &mut self.row)
    }
}

/// Strips what the row carried by the entry `value` may no longer hold;
/// an entry that does not decode is kept as it is.
fn strip_entry<E: RowEntry>(lifecycle: &Lifecycle, now_ms: u64, value: &[u8]) -> Compacted {
    let Ok(mut entry) = crate::codec::open_message::<E>(value) else {
        return Compacted::Keep;
    };
    let mut n = entry.purge_reply(lifecycle);
    let (table, key, slot) = entry.parts();
    if let Some(proto) = slot.take() {
        // A row that does not decode keeps its entry as it is.
        let Ok(mut row) = Row::from_proto(proto) else { return Compacted::Keep };
        n += strip_all(lifecycle, table, key, &mut row, now_ms);
        if n > 0 {
            *slot = Some(row.to_proto());
        }
    }
    if n == 0 {
        return Compacted::Keep;
    }
    count(n as u64);
    Compacted::Change(crate::codec::seal_message(&entry))
}

/// The rule of the `repl_log` column family: a log entry carries its row's
/// whole state, so its expired values are stripped the same way (a
/// receiver merging the stripped state gets the tombstone, which is what
/// it would end at anyway).
pub struct LogExpiry {
    clock: Arc<dyn PhysicalClock>,
    lifecycle: Arc<Lifecycle>,
}

impl LogExpiry {
    pub fn new(clock: Arc<dyn PhysicalClock>, lifecycle: Arc<Lifecycle>) -> Self {
        Self { clock, lifecycle }
    }
}

impl CompactionRule for LogExpiry {
    fn name(&self) -> &'static str {
        "geokv-log-expiry"
    }

    fn filter(&self, _key: &[u8], value: &[u8]) -> Compacted {
        strip_entry::<pb::LogEntry>(&self.lifecycle, self.clock.now_ms(), value)
    }
}

/// The rule of the `feed` column family: a change-feed entry carries the
/// row's state, stripped as in the replication log.
pub struct FeedExpiry {
    clock: Arc<dyn PhysicalClock>,
    lifecycle: Arc<Lifecycle>,
}

impl FeedExpiry {
    pub fn new(clock: Arc<dyn PhysicalClock>, lifecycle: Arc<Lifecycle>) -> Self {
        Self { clock, lifecycle }
    }
}

impl CompactionRule for FeedExpiry {
    fn name(&self) -> &'static str {
        "geokv-feed-expiry"
    }

    fn filter(&self, key: &[u8], value: &[u8]) -> Compacted {
        if !key.starts_with(b"l/") {
            return Compacted::Keep;
        }
        strip_entry::<pb::FeedEntry>(&self.lifecycle, self.clock.now_ms(), value)
    }
}

/// The rule of the `meta` column family: remembered replies (idempotency
/// records) lose the set members of erased subjects.
pub struct ReplyErasure {
    lifecycle: Arc<Lifecycle>,
}

impl ReplyErasure {
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self { lifecycle }
    }
}

impl CompactionRule for ReplyErasure {
    fn name(&self) -> &'static str {
        "geokv-reply-erasure"
    }

    fn filter(&self, key: &[u8], value: &[u8]) -> Compacted {
        if !self.lifecycle.any_fence() || !key.starts_with(super::commit::IDEM_PREFIX) {
            return Compacted::Keep;
        }
        let Ok(mut record) = crate::codec::open_message::<pb::IdempotencyRecord>(value) else {
            return Compacted::Keep;
        };
        match self.lifecycle.purge_reply(&mut record) {
            0 => Compacted::Keep,
            n => {
                count(n as u64);
                Compacted::Change(crate::codec::seal_message(&record))
            }
        }
    }
}

/// The rule of the `raft` column family: expired STRONG values leave the
/// state machines (`g/<group>/sm/r/<table>\0<key>`).
pub struct StrongExpiry {
    clock: Arc<dyn PhysicalClock>,
}

impl StrongExpiry {
    pub fn new(clock: Arc<dyn PhysicalClock>) -> Self {
        Self { clock }
    }
}

/// Whether `key` names a STRONG row in a group's state machine.
fn is_strong_row(key: &[u8]) -> bool {
    key.starts_with(b"g/") && key.windows(6).any(|w| w == b"/sm/r/")
}

impl CompactionRule for StrongExpiry {
    fn name(&self) -> &'static str {
        "geokv-strong-expiry"
    }

    fn filter(&self, key: &[u8], value: &[u8]) -> Compacted {
        if !is_strong_row(key) {
            return Compacted::Keep;
        }
        match decode_value(value) {
            Ok(v) if enforced() && v.is_expired(self.clock.now_ms()) => {
                count(1);
                Compacted::Remove
            }
            _ => Compacted::Keep,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causality::hlc::{HlcTimestamp, ManualClock};
    use crate::causality::{DvvSet, VersionVector};

    fn no_subjects() -> Arc<Lifecycle> {
        Arc::new(Lifecycle::new(&crate::config::Config::default()))
    }

    fn row(value: RowValue) -> Row {
        Row { home_region: "eu-west-1".into(), zone: "eu".into(), epoch: 1, hlc: 0, value }
    }

    #[test]
    fn compaction_strips_expired_register_values_and_keeps_their_dots() {
        let clock = Arc::new(ManualClock::new(1_000));
        let rule = DataExpiry::new(clock.clone(), no_subjects());
        let mut d = DvvSet::new();
        d.write_expiring("eu/n1", &VersionVector::new(), Some(b"short".to_vec()), HlcTimestamp(1), 2_000);
        d.write(
            "eu/n1",
            &VersionVector::new(),
            Some(b"forever".to_vec()),
            HlcTimestamp::from_parts(1_500, 0),
        );
        let sealed = row(RowValue::Register(d.clone())).seal();
        // Not yet expired: kept as it is.
        assert_eq!(rule.filter(b"t\0k", &sealed), Compacted::Keep);
        clock.set(2_000);
        let Compacted::Change(bytes) = rule.filter(b"t\0k", &sealed) else { panic!("not changed") };
        let stripped = Row::open(&bytes, || "t/k".into()).unwrap();
        let RowValue::Register(s) = &stripped.value else { panic!("kind changed") };
        assert_eq!(s.live_values(), vec![&b"forever"[..]]);
        assert_eq!(s.sibling_count(), 2, "the expired write stays as a tombstone of its dot");
        assert_eq!(s.context(), d.context());
        assert!(!bytes.windows(5).any(|w| w == b"short"), "the expired value's bytes are gone");
        // Merging the unstripped copy back keeps the tombstone: both
        // replicas converge on the stripped state.
        let mut merged = s.clone();
        merged.merge(&d);
        assert_eq!(&merged, s);
        let mut other = d.clone();
        other.merge(s);
        assert_eq!(&other, s);
    }

    #[test]
    fn compaction_strips_expired_values_from_log_entries() {
        let clock = Arc::new(ManualClock::new(10_000));
        let rule = LogExpiry::new(clock, no_subjects());
        let mut d = DvvSet::new();
        d.write_expiring("eu/n1", &VersionVector::new(), Some(b"marker".to_vec()), HlcTimestamp(1), 9_000);
        let entry = pb::LogEntry {
            seq: 7,
            table: "t".into(),
            key: b"k".to_vec(),
            row: Some(row(RowValue::Register(d)).to_proto()),
            ..Default::default()
        };
        let Compacted::Change(bytes) = rule.filter(&7u64.to_be_bytes(), &crate::codec::seal_message(&entry))
        else {
            panic!("not changed")
        };
        assert!(!bytes.windows(6).any(|w| w == b"marker"));
        let back: pb::LogEntry = crate::codec::open_message(&bytes).unwrap();
        assert_eq!(back.seq, 7);
        let back = Row::from_proto(back.row.unwrap()).unwrap();
        assert!(crate::kv::row_is_invisible(&back, 0));
    }

    #[test]
    fn expired_strong_values_are_removed_and_other_records_kept() {
        let clock = Arc::new(ManualClock::new(5_000));
        let rule = StrongExpiry::new(clock);
        let value = |expires_ms: u64| {
            serde_json::to_vec(&crate::consensus::strong::StrongValue {
                value: b"v".to_vec(),
                version: 3,
                expires_ms,
            })
            .unwrap()
        };
        assert_eq!(rule.filter(b"g/s-eu/sm/r/t\0k", &value(4_000)), Compacted::Remove);
        assert_eq!(rule.filter(b"g/s-eu/sm/r/t\0k", &value(6_000)), Compacted::Keep);
        assert_eq!(rule.filter(b"g/s-eu/sm/r/t\0k", &value(0)), Compacted::Keep);
        // Not a STRONG row: log entries, votes, idempotency records.
        assert_eq!(rule.filter(b"g/s-eu/log/1", &value(4_000)), Compacted::Keep);
        assert_eq!(rule.filter(b"g/s-eu/sm/i/x", &value(4_000)), Compacted::Keep);
    }
}
