//! Tombstone collection and replication-log trimming
//! (docs/architecture.md section 17, docs/decisions/021-tombstone-collection.md).
//!
//! A deleted row (a register whose siblings are all tombstones, a deleted
//! LWW register, an empty set) is kept so that an older state of it that
//! arrives later is recognised as superseded instead of bringing the value
//! back. It may go once no older state can arrive any more. That is decided
//! from replication positions alone (causal stability), in rounds:
//!
//! 1. A round scans a bounded slice of the store for deleted rows (the
//!    candidates), then takes `v0`: this node's log head and what it has
//!    applied from every source node, read after the scan through a commit
//!    barrier, so every candidate's state is made of entries within `v0`.
//! 2. Peers acknowledge frames with what they have applied from every
//!    source and their own log head ([`PeerReport`], read in that order).
//!    A peer *covers* the round once it has applied at least `v0` from
//!    every source outside its own region: its state of every candidate
//!    then descends from this node's. The log head of its first covering
//!    report is its `settle_seq`.
//! 3. A peer is *settled* once this node has applied its log through
//!    `settle_seq`: every entry it wrote before it held the candidates'
//!    states is applied here, and every later entry descends from them.
//! 4. A candidate still stored as the bytes that were scanned is removed
//!    once the owner of its partition in every other region of its zone is
//!    settled. A region that is away (stopped, partitioned) never settles,
//!    so nothing it may still hold an older state of is collected.
//!
//! Log trimming: entries every destination node acknowledged are deleted
//! (bounded per pass), besides the committer's count-based retention. The
//! newest entry always stays: its key is how a restart finds the log head.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::row::{display_key, split_data_key, Row};
use super::{row_is_deleted, Node};
use crate::error::KvError;
use crate::storage::{Cf, WriteBatch};
use crate::topology::actor_region;

/// Rows read per storage scan.
const SCAN_CHUNK: usize = 1024;

/// Longest time a sweep's finding of no deleted row stands in for the
/// sweeps after it while no deleted row is written (a safety net: every
/// path that stores rows counts the deleted ones).
const CLEAN_SWEEP_STANDS_FOR: Duration = Duration::from_secs(600);

/// What a peer node said, when it acknowledged a frame, about its progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerReport {
    /// Source node (actor "region/node") -> position applied through.
    pub applied: HashMap<String, u64>,
    /// The peer's own log head, read after `applied`.
    pub log_seq: u64,
}

/// Whether `report`, from a node of `peer_region`, shows that it applied at
/// least `v0` from every source outside its own region (sources of its own
/// region do not ship to it: they own other partitions).
pub fn covers(report: &PeerReport, peer_region: &str, v0: &BTreeMap<String, u64>) -> bool {
    v0.iter()
        .filter(|(source, _)| actor_region(source) != peer_region)
        .all(|(source, seq)| report.applied.get(source.as_str()).copied().unwrap_or(0) >= *seq)
}

/// Whether a candidate whose replicas elsewhere are `peers` is causally
/// stable: every peer covered the round (`settle`: its settle position) and
/// this node applied each peer's log through that position (`applied_here`).
pub fn stable(peers: &[String], settle: &HashMap<String, u64>, applied_here: &HashMap<String, u64>) -> bool {
    peers
        .iter()
        .all(|p| settle.get(p).is_some_and(|through| applied_here.get(p).copied().unwrap_or(0) >= *through))
}

/// A deleted row found by a round's scan.
#[derive(Debug, Clone)]
struct Candidate {
    dk: Vec<u8>,
    /// The stored bytes when scanned: removed only if still these.
    sealed: Vec<u8>,
    /// The owner of the row's partition in every other region of its zone
    /// ("" marks a region with no owner: never stable).
    peers: Vec<String>,
}

struct Round {
    v0: BTreeMap<String, u64>,
    /// Peer -> settle position, for peers that covered `v0`.
    settle: HashMap<String, u64>,
    candidates: Vec<Candidate>,
    started: Instant,
}

#[derive(Default)]
struct Inner {
    /// The latest report of every peer.
    reports: HashMap<String, PeerReport>,
    round: Option<Round>,
    /// Where the next scan starts (empty: the start of the store).
    cursor: Vec<u8>,
    /// Deleted rows seen so far by the sweep in progress.
    sweep_tombstones: u64,
    /// `tombstones_written` as the sweep in progress began, and when.
    sweep_began: Option<(u64, Instant)>,
    /// The last complete sweep's start, when it found no deleted row.
    clean: Option<(u64, Instant)>,
    /// Log entries through this position are trimmed already.
    trimmed_through: u64,
}

/// What collection reports (node status, metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Deleted rows counted by the last complete sweep of the store.
    pub tombstones: u64,
    /// Complete sweeps since start, counting the passes that knew the
    /// answer without a scan (no deleted row written since a sweep that
    /// found none).
    pub sweeps: u64,
    /// Tombstones collected since start.
    pub collected: u64,
    /// Log entries trimmed because every destination had them, since start.
    pub log_trimmed: u64,
}

/// Collection state of one node.
#[derive(Default)]
pub struct GcState {
    inner: Mutex<Inner>,
    stats: Mutex<GcStats>,
}

/// Bounds of one pass, from the storage config.
#[derive(Debug, Clone, Copy)]
pub struct GcSettings {
    pub scan_rows_max: usize,
    pub rows_max: usize,
    pub round_max: Duration,
    pub trim_entries_max: usize,
    /// See [`CLEAN_SWEEP_STANDS_FOR`].
    pub clean_stands_for: Duration,
}

impl GcSettings {
    pub fn from_config(s: &crate::config::StorageConfig) -> Self {
        Self {
            scan_rows_max: s.tombstone_gc_scan_rows_max,
            rows_max: s.tombstone_gc_rows_max,
            round_max: Duration::from_millis(s.tombstone_gc_round_ms_max),
            trim_entries_max: s.log_trim_entries_max,
            clean_stands_for: CLEAN_SWEEP_STANDS_FOR,
        }
    }
}

impl GcState {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counts so far.
    pub fn stats(&self) -> GcStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records `peer`'s report (from a frame acknowledgement).
    pub fn note_report(&self, peer: &str, report: PeerReport) {
        let mut inner = self.inner();
        if let Some(round) = inner.round.as_mut() {
            if !round.settle.contains_key(peer) && covers(&report, actor_region(peer), &round.v0) {
                round.settle.insert(peer.to_string(), report.log_seq);
            }
        }
        inner.reports.insert(peer.to_string(), report);
    }
}

/// What one scan of a slice of the store found.
struct Slice {
    candidates: Vec<Candidate>,
    tombstones: u64,
    /// Where the next scan starts; None when this one reached the end.
    next: Option<Vec<u8>>,
}

/// Scans from `cursor`, reading at most `rows_max` rows and keeping at most
/// `candidates_max` deleted rows.
fn scan_slice(node: &Node, cursor: &[u8], rows_max: usize, candidates_max: usize) -> Result<Slice, KvError> {
    let cfg = node.config();
    let topology = node.topology().clone();
    let mut start = cursor.to_vec();
    let mut candidates = Vec::new();
    let mut tombstones = 0u64;
    let mut examined = 0usize;
    loop {
        let chunk = node
            .engine()
            .scan(Cf::Data, &start, None, SCAN_CHUNK.min(rows_max - examined).max(1))
            .map_err(|e| KvError::Storage(e.to_string()))?;
        let end = chunk.len() < SCAN_CHUNK.min(rows_max - examined).max(1);
        for (k, v) in chunk {
            examined += 1;
            start = k.clone();
            start.push(0);
            let Some((table, key)) = split_data_key(&k) else { continue };
            // A row that cannot be read is reported by reads and audits; it is
            // never collected.
            let Ok(row) = Row::open(&v, || display_key(table, key)) else { continue };
            if !row_is_deleted(&row) {
                continue;
            }
            tombstones += 1;
            let partition = topology.partition_of(table, key);
            let peers = node
                .stored_placement(&row)
                .replica_regions
                .iter()
                .filter(|r| **r != cfg.region)
                .map(|r| topology.owner(r, partition).map(|n| n.actor()).unwrap_or_default())
                .collect();
            candidates.push(Candidate { dk: k, sealed: v, peers });
            if candidates.len() >= candidates_max {
                return Ok(Slice { candidates, tombstones, next: Some(start) });
            }
        }
        if end {
            return Ok(Slice { candidates, tombstones, next: None });
        }
        if examined >= rows_max {
            return Ok(Slice { candidates, tombstones, next: Some(start) });
        }
    }
}

/// Deletes log entries through `floor` (every destination acknowledged
/// them), keeping the newest entry; at most `max` per call.
fn trim_log(node: &Node, floor: u64, max: usize) -> Result<u64, KvError> {
    let through = floor.min(node.log_seq().saturating_sub(1));
    let from = node.gc().inner().trimmed_through + 1;
    if through < from {
        return Ok(0);
    }
    let end = (through + 1).to_be_bytes();
    let entries = node
        .engine()
        .scan(Cf::ReplLog, &from.to_be_bytes(), Some(&end), max)
        .map_err(|e| KvError::Storage(e.to_string()))?;
    let done_through = if entries.len() < max {
        through
    } else {
        entries
            .last()
            .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(from - 1)
    };
    let mut batch = WriteBatch::new();
    for (k, _) in &entries {
        batch.delete(Cf::ReplLog, k.clone());
    }
    if !batch.is_empty() {
        // Not synced: a trim lost in a crash is done again.
        node.engine().write(batch, false).map_err(|e| KvError::Storage(e.to_string()))?;
    }
    node.gc().inner().trimmed_through = done_through;
    Ok(entries.len() as u64)
}

/// Where this node stands: its log head and what it applied from every
/// source, after every write queued before the call is committed.
async fn positions(node: &Node) -> Result<BTreeMap<String, u64>, KvError> {
    node.barrier().await?;
    let mut v0: BTreeMap<String, u64> =
        node.inbound().into_iter().map(|(source, i)| (source, i.applied_through)).collect();
    v0.insert(node.actor(), node.log_seq());
    Ok(v0)
}

/// One pass: trims the log through `ack_floor` (the lowest position every
/// destination acknowledged; None: no destination, nothing trimmed by
/// acknowledgement), collects the stable candidates of the current round,
/// and starts the next round once this one is done or too old.
pub async fn pass(node: &Arc<Node>, ack_floor: Option<u64>, settings: GcSettings) -> Result<(), KvError> {
    if let Some(floor) = ack_floor {
        let trimmed = trim_log(node, floor, settings.trim_entries_max)?;
        if trimmed > 0 {
            metrics::counter!("geokv_repl_log_trimmed_total").increment(trimmed);
            node.gc().stats.lock().unwrap_or_else(|p| p.into_inner()).log_trimmed += trimmed;
        }
    }
    let applied_here: HashMap<String, u64> =
        node.inbound().into_iter().map(|(source, i)| (source, i.applied_through)).collect();
    let ready: Vec<(Vec<u8>, Vec<u8>)> = {
        let mut inner = node.gc().inner();
        match inner.round.as_mut() {
            Some(round) => {
                let (ready, waiting): (Vec<Candidate>, Vec<Candidate>) =
                    std::mem::take(&mut round.candidates)
                        .into_iter()
                        .partition(|c| stable(&c.peers, &round.settle, &applied_here));
                round.candidates = waiting;
                metrics::gauge!("geokv_tombstones_waiting").set(round.candidates.len() as f64);
                if round.candidates.is_empty() || round.started.elapsed() > settings.round_max {
                    inner.round = None;
                }
                ready.into_iter().map(|c| (c.dk, c.sealed)).collect()
            }
            None => Vec::new(),
        }
    };
    if !ready.is_empty() {
        node.collect(ready).await?;
    }
    let collected = node.tombstones_collected();
    node.gc().stats.lock().unwrap_or_else(|p| p.into_inner()).collected = collected;
    if node.gc().inner().round.is_some() {
        return Ok(());
    }
    let cursor = node.gc().inner().cursor.clone();
    if cursor.is_empty() {
        // A new sweep. With no deleted row written since one that found
        // none, its answer is known: none. Nothing is scanned (a full scan
        // decodes every row: on a store of ten thousand rows that was a
        // few percent of a busy node's CPU, and on a large one a constant
        // read of cold blocks through the cache).
        // Deleted rows the committer staged, and values compaction stripped
        // (an expired or erased value becomes a tombstone there; counted
        // per process, so a node may scan for another's strips, never miss
        // its own but for a compaction still writing its files as the
        // scan reads, which the ten-minute bound covers).
        let written = node.state.tombstones_written.load(Ordering::Acquire) + super::expiry::stripped_total();
        {
            let mut inner = node.gc().inner();
            let clean = inner
                .clean
                .is_some_and(|(n, began)| n == written && began.elapsed() < settings.clean_stands_for);
            if clean {
                drop(inner);
                finish_sweep(node, 0);
                return Ok(());
            }
            inner.sweep_began = Some((written, Instant::now()));
        }
        // Every deleted row counted so far is in the store before the scan.
        node.barrier().await?;
    }
    let scan_node = node.clone();
    let slice = tokio::task::spawn_blocking(move || {
        scan_slice(&scan_node, &cursor, settings.scan_rows_max, settings.rows_max)
    })
    .await
    .map_err(|e| KvError::Storage(e.to_string()))??;
    let v0 = positions(node).await?;
    let mut inner = node.gc().inner();
    inner.sweep_tombstones += slice.tombstones;
    match slice.next {
        Some(next) => inner.cursor = next,
        None => {
            inner.cursor.clear();
            let found = std::mem::take(&mut inner.sweep_tombstones);
            let began = inner.sweep_began.take();
            inner.clean = began.filter(|_| found == 0);
            finish_sweep(node, found);
        }
    }
    if !slice.candidates.is_empty() {
        let settle = inner
            .reports
            .iter()
            .filter(|(peer, report)| covers(report, actor_region(peer), &v0))
            .map(|(peer, report)| (peer.clone(), report.log_seq))
            .collect();
        inner.round = Some(Round { v0, settle, candidates: slice.candidates, started: Instant::now() });
    }
    Ok(())
}

/// Records a complete sweep that counted `found` deleted rows.
fn finish_sweep(node: &Node, found: u64) {
    let mut stats = node.gc().stats.lock().unwrap_or_else(|p| p.into_inner());
    stats.tombstones = found;
    stats.sweeps += 1;
    metrics::gauge!("geokv_tombstones").set(found as f64);
    metrics::counter!("geokv_tombstone_sweeps_total").increment(1);
}

/// Runs passes every `interval` until cancelled. `ack_floor` gives the
/// lowest log position every destination node acknowledged.
pub async fn run(
    node: Arc<Node>,
    ack_floor: impl Fn() -> Option<u64> + Send + 'static,
    interval: Duration,
    cancel: CancellationToken,
) {
    let settings = GcSettings::from_config(&node.config().storage);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = pass(&node, ack_floor(), settings).await {
            if matches!(e, KvError::ShuttingDown) {
                return;
            }
            tracing::warn!(error = %e, "tombstone collection pass failed; retried next pass");
            metrics::counter!("geokv_tombstone_gc_failures_total").increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(applied: &[(&str, u64)], log_seq: u64) -> PeerReport {
        PeerReport { applied: applied.iter().map(|(a, s)| (a.to_string(), *s)).collect(), log_seq }
    }

    fn v0(entries: &[(&str, u64)]) -> BTreeMap<String, u64> {
        entries.iter().map(|(a, s)| (a.to_string(), *s)).collect()
    }

    #[test]
    fn a_peer_covers_a_round_once_it_applied_v0_from_every_source_outside_its_region() {
        // This node is eu/n1 (log head 10); it applied us/n1 through 7 and ap/n1 through 3.
        let v0 = v0(&[("eu/n1", 10), ("us/n1", 7), ("ap/n1", 3)]);
        // The us peer needs eu through 10 and ap through 3; its own log is
        // not asked of it.
        assert!(covers(&report(&[("eu/n1", 10), ("ap/n1", 3)], 50), "us", &v0));
        assert!(covers(&report(&[("eu/n1", 11), ("ap/n1", 9), ("us/n2", 1)], 50), "us", &v0));
        // Behind this node on one source: not covered.
        assert!(!covers(&report(&[("eu/n1", 9), ("ap/n1", 3)], 50), "us", &v0));
        assert!(!covers(&report(&[("eu/n1", 10)], 50), "us", &v0), "a source it never reported");
        // The ap peer must have what this node applied from us.
        assert!(!covers(&report(&[("eu/n1", 10)], 50), "ap", &v0));
        assert!(covers(&report(&[("eu/n1", 10), ("us/n1", 7)], 50), "ap", &v0));
        // A report with no positions (a peer that does not report) covers nothing.
        assert!(!covers(&PeerReport::default(), "us", &v0));
    }

    #[test]
    fn a_candidate_is_stable_only_when_every_peer_covered_and_this_node_caught_up_with_it() {
        let peers = vec!["us/n1".to_string(), "ap/n1".to_string()];
        let settle: HashMap<String, u64> = [("us/n1".to_string(), 40), ("ap/n1".to_string(), 5)].into();
        let applied = |us: u64, ap: u64| -> HashMap<String, u64> {
            [("us/n1".to_string(), us), ("ap/n1".to_string(), ap)].into()
        };
        assert!(stable(&peers, &settle, &applied(40, 5)));
        assert!(stable(&peers, &settle, &applied(41, 9)));
        // Entries us/n1 wrote before it covered the round are not all here yet.
        assert!(!stable(&peers, &settle, &applied(39, 5)));
        // A peer that never covered the round (stopped, partitioned) blocks it.
        let only_us: HashMap<String, u64> = [("us/n1".to_string(), 40)].into();
        assert!(!stable(&peers, &only_us, &applied(100, 100)));
        // A region with no owner of the partition is never stable.
        assert!(!stable(&["".to_string()], &settle, &applied(100, 100)));
        // A row held by this region alone has no peer to wait for.
        assert!(stable(&[], &settle, &HashMap::new()));
    }

    #[test]
    fn a_report_that_covers_a_round_fixes_its_settle_position_once() {
        let gc = GcState::default();
        gc.inner().round = Some(Round {
            v0: v0(&[("eu/n1", 10)]),
            settle: HashMap::new(),
            candidates: Vec::new(),
            started: Instant::now(),
        });
        gc.note_report("us/n1", report(&[("eu/n1", 9)], 20));
        assert!(gc.inner().round.as_ref().unwrap().settle.is_empty(), "not yet covered");
        gc.note_report("us/n1", report(&[("eu/n1", 10)], 30));
        gc.note_report("us/n1", report(&[("eu/n1", 12)], 45));
        // The first covering report's log head counts: a later, higher one
        // would make the round wait for entries that descend from v0 anyway.
        assert_eq!(gc.inner().round.as_ref().unwrap().settle.get("us/n1"), Some(&30));
        assert_eq!(gc.inner().reports["us/n1"].log_seq, 45, "the latest report is kept for the next round");
    }
}
