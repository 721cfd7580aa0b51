//! Group commit: writes are applied in arrival order and each group of them
//! is made durable with a single synced storage batch.
//!
//! Writers hand an admitted write to the committer through a bounded queue
//! and wait for its reply. The preparing thread takes the first waiting
//! write, then every other write already queued (up to
//! `group_commit_writes_max` writes or `group_commit_bytes_max` bytes),
//! computes each new row state by merging into the stored one, and builds
//! one `WriteBatch` of rows, replication-log entries and idempotency
//! records. The syncing thread writes it with one WAL sync (several groups
//! waiting share one), and only then are the replies sent, so an
//! acknowledged write is on disk. While one group syncs, the next is
//! prepared over it: the preparer reads rows of groups not yet written
//! from their overlays, so being the only preparer still makes each
//! read-merge-write atomic. A group that fails to be written fails every
//! group prepared over it (docs/decisions/025-commit-cpu.md).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use geokv_proto::storage as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::row::{data_key, display_key, Row, RowLimits, RowMeasure, RowValue};
use super::row_cache::RowCache;
use super::{AdmittedWrite, RowOp};
use crate::causality::{
    encode_context_at, Crdt, DvvSet, Hlc, HlcTimestamp, LwwRegister, OrSet, PnCounter, VersionVector,
};
use crate::codec;
use crate::config::ConflictPolicy;
use crate::error::KvError;
use crate::storage::{BatchOp, Cf, Engine, WriteBatch};

/// Epoch of every home until failover arrives: nothing fences yet.
pub const INITIAL_EPOCH: u64 = 1;

/// What one acknowledged write produced, as the client sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteOutcome {
    pub context: Vec<u8>,
    pub hlc: u64,
    pub home_region: String,
    pub epoch: u64,
    pub accepted_by_region: String,
    /// Replication-log position of the write (0 when nothing was written).
    pub log_seq: u64,
    pub counter_value: Option<i64>,
    pub members: Option<Vec<Vec<u8>>>,
    pub replayed: bool,
}

/// A client-chosen key that makes a retried request apply once.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub key: String,
    /// Hash of the request, to refuse the same key for another request.
    pub request_hash: u64,
}

/// One unit of work for the committer: all its writes commit together.
pub struct CommitJob {
    pub work: Work,
    pub reply: oneshot::Sender<Result<Vec<WriteOutcome>, KvError>>,
}

/// What a job asks the committer to do.
pub enum Work {
    /// Client writes accepted by this region.
    Client { writes: Vec<AdmittedWrite>, idempotency: Option<Idempotency> },
    /// Row states replicated from another region: merged, never logged again
    /// (the source ships to every region itself). The source's position is
    /// stored in the same batch, so a frame is applied exactly once.
    Apply(RemoteApply),
    /// Tombstones found causally stable ([`super::gc`]): each
    /// `(data key, sealed row)` is removed if the stored row is still
    /// exactly those bytes (nothing merged into it since it was judged).
    Collect(Vec<(Vec<u8>, Vec<u8>)>),
    /// An erasure: the values of these rows (table, key) written at or
    /// before the HLC stamp `fence` are stripped (`lifecycle::fence_row`).
    Fence { rows: Vec<(String, Vec<u8>)>, fence: u64 },
}

/// A replication frame to merge.
pub struct RemoteApply {
    /// The source node's actor id ("region/node"): positions are kept per
    /// source node, since every node ships its own log.
    pub source: String,
    /// The source's store incarnation (`StoreIdentity::tag`, "" when not
    /// known): positions are kept per incarnation, so a wiped source's new
    /// log is never taken for the old one's (docs/architecture.md section 16).
    pub source_store: String,
    pub first_seq: u64,
    pub through_seq: u64,
    pub entries: Vec<(String, Vec<u8>, Row)>,
    pub mode: ApplyMode,
    /// Idempotency records that travelled with the entries (key, record):
    /// stored here so a retry that lands in this region is replayed.
    pub idempotency: Vec<(String, pb::IdempotencyRecord)>,
    /// Per entry, its position in the source's log (shipped entries; empty
    /// for repairs, which carry rows, not log entries).
    pub seqs: Vec<u64>,
}

/// How a [`RemoteApply`] relates to the source's log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    /// Shipped log entries `first_seq..=through_seq`: applied once, and the
    /// position stored with them.
    Log,
    /// Rows sent by anti-entropy: merged (idempotent), position untouched.
    RepairRows,
    /// Anti-entropy finished: every row the source had at `through_seq` was
    /// sent, so the position moves up to it (never down).
    RepairDone,
    /// Rows of a backup being restored: merged like repaired rows, and each
    /// merged state appended to this node's log (accepted under no epoch,
    /// like a compensation) so it ships to every region that may hold it.
    Restore,
}

impl CommitJob {
    fn bytes(&self) -> usize {
        match &self.work {
            Work::Client { writes, .. } => writes.iter().map(|w| w.key.len() + w.op.payload_bytes()).sum(),
            Work::Apply(a) => a.entries.iter().map(|(_, k, _)| k.len() + 64).sum(),
            Work::Collect(rows) => rows.iter().map(|(k, _)| k.len()).sum(),
            Work::Fence { rows, .. } => rows.iter().map(|(t, k)| t.len() + k.len()).sum(),
        }
    }

    fn writes(&self) -> usize {
        match &self.work {
            Work::Client { writes, .. } => writes.len(),
            Work::Apply(a) => a.entries.len().max(1),
            Work::Collect(rows) => rows.len().max(1),
            Work::Fence { rows, .. } => rows.len().max(1),
        }
    }
}

/// Where an inbound replication stream stands, per source node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inbound {
    /// The source's store incarnation these positions are of (its latest
    /// seen here; `StoreIdentity::tag`).
    pub store: String,
    /// Every entry of the source through this position is applied here.
    pub applied_through: u64,
    /// HLC stamp at which the source last said this region had everything
    /// (0 = never): reads here are at most `now - fresh_as_of` stale.
    pub fresh_as_of_hlc: u64,
}

/// Settings of the committer, taken from the storage config.
#[derive(Debug, Clone)]
pub struct CommitSettings {
    pub actor: String,
    pub region: String,
    pub sync: bool,
    pub writes_max: usize,
    pub bytes_max: usize,
    pub log_retention_entries: u64,
    pub idempotency_ttl: Duration,
    /// Bounds every row a client write leaves (merges from other regions
    /// are never refused: docs/decisions/015-bounded-rows.md).
    pub row_limits: RowLimits,
    /// Prepare the next group while the current one syncs.
    pub pipeline: bool,
    /// Subjects and their erasure fences (docs/architecture.md section 13).
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// This node's origin in change feeds ("region/node#store").
    pub origin: String,
    /// Whether changes go to the change feed (`watch.retention_entries` > 0).
    pub feed: bool,
    /// Bytes of decoded rows the committer keeps of what it wrote
    /// (`storage.row_cache_mib`; 0: none).
    pub row_cache_bytes: usize,
}

/// Shared facts the committer publishes for readers.
pub struct CommitState {
    /// Home leases, once the control plane is running (absent in
    /// single-process simulations: then every home is served at the
    /// initial epoch without fencing).
    pub leases: std::sync::OnceLock<Arc<dyn super::LeaseGuard>>,
    /// Highest replication-log sequence number durably written.
    pub log_seq: AtomicU64,
    /// Conflicts per table (siblings created, LWW overwrites).
    pub conflicts: std::sync::Mutex<HashMap<String, u64>>,
    /// Inbound replication positions per source node (actor id).
    pub inbound: std::sync::Mutex<HashMap<String, Inbound>>,
    /// Announces each new durable log position (to shippers).
    pub log_watch: tokio::sync::watch::Sender<u64>,
    /// Tombstones removed by collection since start.
    pub tombstones_collected: AtomicU64,
    /// Deleted rows staged for the store since start (counted as a group
    /// is prepared, so a group that fails counts too). Tombstone collection
    /// skips its scan while this has not moved since a sweep that found no
    /// deleted row (`kv::gc`).
    pub tombstones_written: AtomicU64,
    /// Highest change-feed position durably written, announced to watchers.
    pub feed_seq: AtomicU64,
    pub feed_watch: tokio::sync::watch::Sender<u64>,
    /// Every change-feed position below this is trimmed (0: not known
    /// yet; the trimmer finds the oldest stored entry once).
    pub feed_trimmed_below: AtomicU64,
    /// Commit groups being prepared or written, oldest first: (token, the
    /// HLC time taken as the group began). Every write a group stamps is
    /// stamped after its entry, and the entry leaves once the group is
    /// published or failed; see [`CommitState::stable_hlc`].
    stamping: std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>,
    stamping_next: AtomicU64,
}

impl CommitState {
    /// An HLC time through which every write this node stamped is published
    /// (in the replication log, the change feed, the store): the clock now,
    /// or just before the oldest group still in flight began stamping,
    /// whichever is earlier. What shippers claim as a link's freshness and
    /// the change feed as its resolved time (docs/architecture.md section 13).
    pub fn stable_hlc(&self, hlc: &Hlc) -> u64 {
        // The clock first, then the groups: a group that registers after
        // this look takes its time, and its stamps, after `now`.
        let now = hlc.now().0;
        let stamping = self.stamping.lock().unwrap_or_else(|p| p.into_inner());
        stamping.front().map_or(now, |(_, began)| now.min(*began))
    }

    /// Registers a group about to stamp writes; its entry leaves when the
    /// returned guard drops.
    fn begin_stamping(self: &Arc<Self>, hlc: &Hlc) -> Stamping {
        let token = self.stamping_next.fetch_add(1, Ordering::Relaxed);
        let mut stamping = self.stamping.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock, so `stable_hlc` either sees the entry or
        // read the clock before this did.
        stamping.push_back((token, hlc.now().0));
        Stamping { state: self.clone(), token }
    }
}

/// A commit group's place in [`CommitState`]'s stamping list, held until
/// the group is published, failed, or found to write nothing.
struct Stamping {
    state: Arc<CommitState>,
    token: u64,
}

impl Drop for Stamping {
    fn drop(&mut self) {
        let mut stamping = self.state.stamping.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = stamping.iter().position(|(t, _)| *t == self.token) {
            stamping.remove(i);
        }
    }
}

impl Default for CommitState {
    fn default() -> Self {
        Self {
            leases: std::sync::OnceLock::new(),
            log_seq: AtomicU64::new(0),
            conflicts: Default::default(),
            inbound: Default::default(),
            log_watch: tokio::sync::watch::channel(0).0,
            tombstones_collected: AtomicU64::new(0),
            tombstones_written: AtomicU64::new(0),
            feed_seq: AtomicU64::new(0),
            feed_watch: tokio::sync::watch::channel(0).0,
            feed_trimmed_below: AtomicU64::new(0),
            stamping: Default::default(),
            stamping_next: AtomicU64::new(0),
        }
    }
}

/// Meta key of the position applied from the store incarnation `store`
/// of `source` (an actor, "region/node"): `recv/<source>` when the
/// incarnation is not known (""), `recv/<source>#<store>` otherwise.
pub fn inbound_key(source: &str, store: &str) -> Vec<u8> {
    let mut k = b"recv/".to_vec();
    k.extend_from_slice(source.as_bytes());
    if !store.is_empty() {
        k.push(b'#');
        k.extend_from_slice(store.as_bytes());
    }
    k
}

/// The (source, store incarnation) of an [`inbound_key`].
pub fn parse_inbound_key(k: &[u8]) -> Option<(String, String)> {
    let rest = std::str::from_utf8(k.strip_prefix(b"recv/")?).ok()?;
    Some(match rest.split_once('#') {
        Some((source, store)) => (source.to_string(), store.to_string()),
        None => (rest.to_string(), String::new()),
    })
}

pub(crate) const IDEM_PREFIX: &[u8] = b"idem/";
const IDEM_EXPIRY_PREFIX: &[u8] = b"idemx/";
/// Expired idempotency records removed per sweep, bounding the work of one batch.
const IDEM_SWEEP_MAX: usize = 256;
pub(super) const IDEM_SWEEP_EVERY: Duration = Duration::from_secs(1);

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts the committer: a preparing thread (merges, encodes, log entries,
/// idempotency records) and a syncing thread (the storage write and its
/// sync, then the replies), so the next group is prepared while the
/// current one syncs. The returned thread ends once every sender is
/// dropped and the queue is drained, and only after the syncer has written
/// (or failed) every group it was handed.
pub fn spawn(
    engine: Arc<dyn Engine>,
    hlc: Arc<Hlc>,
    settings: CommitSettings,
    state: Arc<CommitState>,
    mut rx: mpsc::Receiver<CommitJob>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let pipeline = Arc::new(Pipeline::default());
    let syncer = Syncer {
        engine: engine.clone(),
        state: state.clone(),
        sync: settings.sync,
        pipeline: pipeline.clone(),
    };
    if !settings.pipeline {
        // One thread: each group is written before the next is prepared.
        return std::thread::Builder::new().name("geokv-commit".into()).spawn(move || {
            let mut committer = Committer::new(engine, hlc, settings, state, pipeline);
            while let Some(first) = rx.blocking_recv() {
                let jobs = committer.gather(first, &mut rx);
                if let Some(prepared) = committer.prepare_group(jobs) {
                    syncer.write(vec![prepared]);
                }
            }
        });
    }
    let (to_sync, from_prepare) = std::sync::mpsc::sync_channel::<Prepared>(PIPELINE_GROUPS_MAX);
    let sync_thread =
        std::thread::Builder::new().name("geokv-sync".into()).spawn(move || syncer.run(from_prepare))?;
    std::thread::Builder::new().name("geokv-commit".into()).spawn(move || {
        let mut committer = Committer::new(engine, hlc, settings, state, pipeline);
        while let Some(first) = rx.blocking_recv() {
            let jobs = committer.gather(first, &mut rx);
            if let Some(prepared) = committer.prepare_group(jobs) {
                if let Err(std::sync::mpsc::SendError(p)) = to_sync.send(prepared) {
                    // The syncer is gone (it panicked): nothing is written.
                    p.fail(&KvError::Storage("the commit syncer stopped".into()));
                }
            }
        }
        drop(to_sync);
        if sync_thread.join().is_err() {
            tracing::error!("the commit syncer panicked");
        }
    })
}

/// Starts the committer as a task of the current tokio runtime instead of
/// a thread: the same groups, commits and replies, but run inline on the
/// runtime, so a single-threaded deterministic simulation (turmoil) owns
/// every step. Only for engines whose writes do not block (the in-memory
/// engine): a commit holds the runtime's thread while it runs. See
/// docs/decisions/010-simulation.md. The task ends once every sender is
/// dropped and the queue is drained.
pub fn spawn_task(
    engine: Arc<dyn Engine>,
    hlc: Arc<Hlc>,
    settings: CommitSettings,
    state: Arc<CommitState>,
    mut rx: mpsc::Receiver<CommitJob>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pipeline = Arc::new(Pipeline::default());
        let mut committer =
            Committer::new(engine.clone(), hlc, settings.clone(), state.clone(), pipeline.clone());
        let syncer = Syncer { engine, state, sync: settings.sync, pipeline };
        while let Some(first) = rx.recv().await {
            let jobs = committer.gather(first, &mut rx);
            if let Some(prepared) = committer.prepare_group(jobs) {
                // Written at once: nothing is carried between groups.
                syncer.write(vec![prepared]);
            }
        }
    })
}

/// Prepared groups waiting for the syncer at most; the preparer blocks
/// behind them (and writers queue behind it), which bounds the memory of
/// groups not yet durable.
const PIPELINE_GROUPS_MAX: usize = 2;

/// What the preparer and the syncer share.
#[derive(Default)]
struct Pipeline {
    /// Highest group number written or failed: the preparer drops its
    /// overlays of groups at or below it (the store answers for them now).
    settled_group: AtomicU64,
    /// Era of groups that must fail: a group failed to be written, and every
    /// group prepared over it (same era) is failed unwritten. The preparer
    /// starts a new era from the store. 0 = none.
    failed_era: AtomicU64,
}

/// What a job's writer is answered.
type JobResult = Result<Vec<WriteOutcome>, KvError>;
/// Where a job's answer goes.
type ReplyTo = oneshot::Sender<JobResult>;

/// A group ready to be written: its batch and everything published once it
/// is durable.
struct Prepared {
    group: u64,
    era: u64,
    batch: WriteBatch,
    replies: Vec<(ReplyTo, JobResult)>,
    /// Highest log sequence number in the batch (None: no log entry).
    through_seq: Option<u64>,
    /// Highest change-feed position in the batch (None: no change).
    feed_through: Option<u64>,
    inbound: HashMap<(String, String), u64>,
    conflicts: Vec<String>,
    collected: u64,
    write_count: usize,
    started: Instant,
    /// Dropped once the group is published or failed (after its effects
    /// are visible), which advances [`CommitState::stable_hlc`].
    _stamping: Stamping,
}

impl Prepared {
    /// Answers every job of the group with `e` (jobs that failed on their
    /// own keep their own error).
    fn fail(self, e: &KvError) {
        for (reply, result) in self.replies {
            let _ = reply.send(result.and(Err(e.clone())));
        }
    }
}

/// Writes prepared groups in order, syncing once for all groups waiting,
/// and publishes and answers each once it is durable.
struct Syncer {
    engine: Arc<dyn Engine>,
    state: Arc<CommitState>,
    sync: bool,
    pipeline: Arc<Pipeline>,
}

impl Syncer {
    fn run(self, rx: std::sync::mpsc::Receiver<Prepared>) {
        while let Ok(first) = rx.recv() {
            let mut groups = vec![first];
            while groups.len() < PIPELINE_GROUPS_MAX {
                match rx.try_recv() {
                    Ok(g) => groups.push(g),
                    Err(_) => break,
                }
            }
            self.write(groups);
        }
    }

    /// Writes `groups` (in preparation order) as one synced batch.
    fn write(&self, groups: Vec<Prepared>) {
        let failed_era = self.pipeline.failed_era.load(Ordering::Acquire);
        let (doomed, groups): (Vec<Prepared>, Vec<Prepared>) =
            groups.into_iter().partition(|g| failed_era != 0 && g.era == failed_era);
        for g in doomed {
            self.settle(g.group);
            g.fail(&KvError::Storage("an earlier commit group failed; this one was prepared over it".into()));
        }
        let Some(last) = groups.last() else { return };
        let last_group = last.group;
        let mut groups = groups;
        let mut batch = std::mem::take(&mut groups[0].batch);
        for g in groups.iter_mut().skip(1) {
            batch.extend(std::mem::take(&mut g.batch));
        }
        #[cfg(feature = "bugs")]
        let sync = crate::bugs::wal_sync(self.sync);
        #[cfg(not(feature = "bugs"))]
        let sync = self.sync;
        match self.engine.write(batch, sync) {
            Ok(()) => {
                // Settled before anyone is answered: once a write is
                // acknowledged, the next group reads its row from the store,
                // never from a stale overlay (a stored row damaged after the
                // acknowledgement is then reported, not merged over).
                self.settle(last_group);
                for g in groups {
                    self.publish(g);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed; the group's writes are not acknowledged");
                metrics::counter!("geokv_commit_failures_total").increment(1);
                if let Some(era) = groups.iter().map(|g| g.era).max() {
                    self.pipeline.failed_era.store(era, Ordering::Release);
                }
                self.settle(last_group);
                let e = KvError::Storage(e.to_string());
                for g in groups {
                    g.fail(&e);
                }
            }
        }
    }

    fn settle(&self, group: u64) {
        self.pipeline.settled_group.fetch_max(group, Ordering::AcqRel);
    }

    /// Publishes a durable group's effects and answers its jobs.
    fn publish(&self, g: Prepared) {
        if let Some(seq) = g.through_seq {
            self.state.log_seq.store(seq, Ordering::Release);
            self.state.log_watch.send_replace(seq);
        }
        if let Some(seq) = g.feed_through {
            self.state.feed_seq.store(seq, Ordering::Release);
            self.state.feed_watch.send_replace(seq);
        }
        if !g.inbound.is_empty() {
            let mut inbound = self.state.inbound.lock().unwrap_or_else(|p| p.into_inner());
            for ((source, store), through) in &g.inbound {
                let e = inbound.entry(source.clone()).or_default();
                if *store > e.store {
                    // A newer incarnation of the source: its own positions.
                    *e = Inbound { store: store.clone(), applied_through: 0, fresh_as_of_hlc: 0 };
                }
                if *store == e.store {
                    e.applied_through = e.applied_through.max(*through);
                }
            }
        }
        metrics::histogram!("geokv_commit_group_writes").record(g.write_count as f64);
        metrics::histogram!("geokv_commit_seconds").record(g.started.elapsed().as_secs_f64());
        if let Some(seq) = g.through_seq {
            metrics::gauge!("geokv_log_seq").set(seq as f64);
        }
        if g.collected > 0 {
            self.state.tombstones_collected.fetch_add(g.collected, Ordering::Relaxed);
            metrics::counter!("geokv_tombstones_collected_total").increment(g.collected);
        }
        if !g.conflicts.is_empty() {
            let mut map = self.state.conflicts.lock().unwrap_or_else(|p| p.into_inner());
            for table in g.conflicts {
                metrics::counter!("geokv_conflicts_total", "table" => table.clone()).increment(1);
                *map.entry(table).or_default() += 1;
            }
        }
        for (reply, result) in g.replies {
            let _ = reply.send(result);
        }
    }
}

struct Committer {
    engine: Arc<dyn Engine>,
    hlc: Arc<Hlc>,
    settings: CommitSettings,
    state: Arc<CommitState>,
    last_sweep: Instant,
    /// Where the next idempotency sweep starts (an expiry key): every
    /// expiry key below it is swept, or belongs to a record the sweep
    /// deleted. Never above an expiry key still to be written (see
    /// [`Committer::sweep_idempotency`]).
    sweep_from: Vec<u8>,
    /// Oldest `stored_at_ms` of a record stored since the last sweep: a
    /// record stored with a time the sweep already passed (one that
    /// travelled from another region, or a clock stepped back) moves the
    /// next sweep's start down to it.
    stored_oldest_ms: std::cell::Cell<u64>,
    /// Shared with the syncer (a thread of its own, or called inline).
    pipeline: Arc<Pipeline>,
    /// Overlays of groups handed to the syncer and not yet settled, newest
    /// last, with their group numbers.
    carried: std::collections::VecDeque<(u64, Arc<Overlay>)>,
    /// Next log sequence number to assign (None: read the store's).
    next_seq: Option<u64>,
    /// Next change-feed position to assign (0: read the published one).
    feed_next: std::cell::Cell<u64>,
    /// Rows of settled groups, decoded (`kv::row_cache`): read after the
    /// overlays, before the store.
    rows: std::cell::RefCell<RowCache>,
    group: u64,
    era: u64,
}

impl Committer {
    fn new(
        engine: Arc<dyn Engine>,
        hlc: Arc<Hlc>,
        settings: CommitSettings,
        state: Arc<CommitState>,
        pipeline: Arc<Pipeline>,
    ) -> Self {
        let rows = std::cell::RefCell::new(RowCache::new(settings.row_cache_bytes));
        Self {
            engine,
            hlc,
            settings,
            state,
            last_sweep: Instant::now(),
            sweep_from: IDEM_EXPIRY_PREFIX.to_vec(),
            stored_oldest_ms: std::cell::Cell::new(u64::MAX),
            pipeline,
            carried: Default::default(),
            next_seq: None,
            feed_next: std::cell::Cell::new(0),
            rows,
            group: 0,
            era: 1,
        }
    }
}

/// Rows and idempotency records changed earlier in the same group, which the
/// store does not have yet, over those of earlier groups still on their way
/// to the store (`carried`, newest first).
#[derive(Default)]
struct Overlay {
    rows: HashMap<Vec<u8>, Row>,
    idem: HashMap<String, pb::IdempotencyRecord>,
    /// Positions per (source, store incarnation).
    inbound: HashMap<(String, String), u64>,
    /// Every `data` key the group's batch writes: the encoded row's size,
    /// or None for a deletion. Set once the group is prepared.
    data_writes: HashMap<Vec<u8>, Option<usize>>,
    /// The batch deletes a range of `data` keys.
    data_range_deleted: bool,
    carried: Vec<Arc<Overlay>>,
}

impl Overlay {
    fn over(carried: Vec<Arc<Overlay>>) -> Self {
        Self { carried, ..Default::default() }
    }

    fn row(&self, dk: &[u8]) -> Option<&Row> {
        self.rows.get(dk).or_else(|| self.carried.iter().find_map(|o| o.rows.get(dk)))
    }

    fn idem_record(&self, key: &str) -> Option<&pb::IdempotencyRecord> {
        self.idem.get(key).or_else(|| self.carried.iter().find_map(|o| o.idem.get(key)))
    }

    fn inbound_of(&self, position: &(String, String)) -> Option<u64> {
        self.inbound
            .get(position)
            .or_else(|| self.carried.iter().find_map(|o| o.inbound.get(position)))
            .copied()
    }

    /// Oldest `stored_at_ms` of the idempotency records not yet in the
    /// store (this group's and those it was laid over).
    fn oldest_idem_ms(&self) -> Option<u64> {
        let own = self.idem.values().map(|r| r.stored_at_ms);
        let carried = self.carried.iter().flat_map(|o| o.idem.values().map(|r| r.stored_at_ms));
        own.chain(carried).min()
    }

    /// This group's own changes, without what it was laid over.
    fn own(self) -> Overlay {
        Overlay {
            rows: self.rows,
            idem: self.idem,
            inbound: self.inbound,
            data_writes: self.data_writes,
            data_range_deleted: self.data_range_deleted,
            carried: Vec::new(),
        }
    }

    /// Records the `data` keys `batch` writes, and forgets their cached
    /// rows: until the group settles, they are read from the overlays.
    fn note_data_writes(&mut self, batch: &WriteBatch, cache: &mut RowCache) {
        for op in &batch.ops {
            match op {
                BatchOp::Put { cf: Cf::Data, key, value } => {
                    cache.forget(key);
                    self.data_writes.insert(key.clone(), Some(value.len()));
                }
                BatchOp::Delete { cf: Cf::Data, key } => {
                    cache.forget(key);
                    self.data_writes.insert(key.clone(), None);
                }
                BatchOp::DeleteRange { cf: Cf::Data, .. } => {
                    cache.clear();
                    self.data_range_deleted = true;
                }
                _ => {}
            }
        }
    }

    /// Moves a written group's rows into `cache`: they are what the store
    /// holds now.
    fn settle_into(self, cache: &mut RowCache) {
        if self.data_range_deleted {
            cache.clear();
        }
        let mut rows = self.rows;
        for (dk, written) in self.data_writes {
            match (written, rows.remove(&dk)) {
                (Some(bytes), Some(row)) => cache.put(dk, row, bytes),
                _ => cache.forget(&dk),
            }
        }
    }
}

impl Committer {
    /// Takes `first` and every job already queued behind it, up to the
    /// group bounds.
    fn gather(&mut self, first: CommitJob, rx: &mut mpsc::Receiver<CommitJob>) -> Vec<CommitJob> {
        let mut jobs = vec![first];
        let mut bytes = jobs[0].bytes();
        let mut writes = jobs[0].writes();
        while writes < self.settings.writes_max && bytes < self.settings.bytes_max {
            match rx.try_recv() {
                Ok(job) => {
                    bytes += job.bytes();
                    writes += job.writes();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        jobs
    }

    /// Drops the overlays of groups the syncer settled, and after a failed
    /// group starts a new era from what the store holds.
    fn catch_up_with_syncer(&mut self) {
        let pipeline = &self.pipeline;
        // Settled before failed: the syncer records a failure before it
        // settles the failed group, so a failed group read as settled here
        // is read as failed below, and its rows never reach the cache.
        let settled = pipeline.settled_group.load(Ordering::Acquire);
        if pipeline.failed_era.load(Ordering::Acquire) == self.era {
            // Groups of this era after the failed one fail unwritten; what
            // they carried never reached the store.
            self.era += 1;
            self.carried.clear();
            self.rows.get_mut().clear();
            // A failed group's sweep deleted nothing: sweep again from the start.
            self.sweep_from = IDEM_EXPIRY_PREFIX.to_vec();
            self.next_seq = None;
            self.feed_next.set(0);
            return;
        }
        let cache = self.rows.get_mut();
        if !cache.enabled() {
            while self.carried.front().is_some_and(|(g, _)| *g <= settled) {
                self.carried.pop_front();
            }
            return;
        }
        while self.carried.front().is_some_and(|(g, _)| *g <= settled) {
            let Some((_, overlay)) = self.carried.pop_front() else { break };
            match Arc::try_unwrap(overlay) {
                Ok(overlay) => overlay.settle_into(cache),
                // Still shared (not expected once a group is prepared): its
                // rows are read from the store instead.
                Err(overlay) => overlay.data_writes.keys().for_each(|dk| cache.forget(dk)),
            }
        }
        let (hits, misses) = cache.take_counts();
        if hits > 0 {
            metrics::counter!("geokv_commit_row_cache_hits_total").increment(hits);
        }
        if misses > 0 {
            metrics::counter!("geokv_commit_row_cache_misses_total").increment(misses);
        }
        metrics::gauge!("geokv_commit_row_cache_bytes").set(cache.bytes() as f64);
    }

    /// Applies `jobs` over the stored rows and the groups not yet written,
    /// and returns the group's batch with its replies; None when it writes
    /// nothing (its replies are sent).
    fn prepare_group(&mut self, jobs: Vec<CommitJob>) -> Option<Prepared> {
        let started = Instant::now();
        let stamping = self.state.begin_stamping(&self.hlc);
        self.catch_up_with_syncer();
        let first_seq = match self.next_seq {
            Some(seq) => seq,
            None => self.state.log_seq.load(Ordering::Acquire) + 1,
        };
        if self.feed_next.get() == 0 {
            self.feed_next.set(self.state.feed_seq.load(Ordering::Acquire) + 1);
        }
        let first_feed = self.feed_next.get();
        let mut next_seq = first_seq;
        let mut overlay = Overlay::over(self.carried.iter().rev().map(|(_, o)| o.clone()).collect());
        let mut batch = WriteBatch::new();
        let mut replies = Vec::with_capacity(jobs.len());
        let mut conflicts: Vec<String> = Vec::new();
        let mut write_count = 0usize;
        let mut collected = 0u64;
        for job in jobs {
            let result = match &job.work {
                Work::Client { writes, idempotency } => self.apply_job(
                    writes,
                    idempotency.as_ref(),
                    &mut overlay,
                    &mut batch,
                    &mut next_seq,
                    &mut conflicts,
                ),
                Work::Apply(remote) => {
                    self.apply_remote(remote, &mut overlay, &mut batch, &mut next_seq, &mut conflicts)
                }
                Work::Collect(rows) => self.collect(rows, &overlay, &mut batch).map(|n| {
                    collected += n;
                    Vec::new()
                }),
                Work::Fence { rows, fence } => {
                    self.fence(rows, *fence, &mut overlay, &mut batch).map(|()| Vec::new())
                }
            };
            if result.is_ok() {
                write_count += job.writes();
            }
            replies.push((job.reply, result));
        }
        self.sweep_idempotency(&mut batch, &overlay);
        if batch.is_empty() {
            for (reply, result) in replies {
                let _ = reply.send(result);
            }
            return None;
        }
        self.group += 1;
        self.next_seq = Some(next_seq);
        let mut own = overlay.own();
        // With the cache off there is nothing to forget or settle later.
        if self.rows.get_mut().enabled() {
            own.note_data_writes(&batch, self.rows.get_mut());
        }
        let inbound = own.inbound.clone();
        self.carried.push_back((self.group, Arc::new(own)));
        Some(Prepared {
            group: self.group,
            era: self.era,
            batch,
            replies,
            through_seq: (next_seq > first_seq).then(|| next_seq - 1),
            feed_through: (self.feed_next.get() > first_feed).then(|| self.feed_next.get() - 1),
            inbound,
            conflicts,
            collected,
            write_count,
            started,
            _stamping: stamping,
        })
    }

    /// Applies one job against the overlay. On error nothing of the job
    /// reaches the batch or the overlay.
    #[allow(clippy::too_many_arguments)]
    fn apply_job(
        &mut self,
        writes: &[AdmittedWrite],
        idempotency: Option<&Idempotency>,
        overlay: &mut Overlay,
        batch: &mut WriteBatch,
        next_seq: &mut u64,
        conflicts: &mut Vec<String>,
    ) -> Result<Vec<WriteOutcome>, KvError> {
        // The time of an expired record of the key, overwritten below.
        let mut replaces = None;
        if let Some(idem) = idempotency {
            let lookup = self.idempotency_record(&idem.key, overlay)?;
            replaces = lookup.stored_at_ms();
            if let IdemLookup::Live(record) = &lookup {
                if record.request_hash != idem.request_hash {
                    return Err(KvError::IdempotencyKeyReused { key: idem.key.clone() });
                }
                metrics::counter!("geokv_idempotent_replays_total").increment(1);
                let mut outcomes = stored_outcomes(record).map_err(|why| KvError::Corrupt {
                    what: format!("idempotency record `{}`", idem.key),
                    why,
                })?;
                outcomes.iter_mut().for_each(|o| o.replayed = true);
                return Ok(outcomes);
            }
        }
        // Leases are checked again here, where the writes get their HLC
        // stamps: a write admitted just before its home's lease lapsed (or
        // before the process was paused) is refused, never stamped late.
        let mut epochs = Vec::with_capacity(writes.len());
        for w in writes {
            epochs.push(match (&w.lease_home, self.state.leases.get()) {
                (Some(home), Some(guard)) => guard.check_local(home)?,
                _ => w.epoch,
            });
        }
        let mut staged: HashMap<Vec<u8>, Row> = HashMap::new();
        let mut job_batch = WriteBatch::new();
        let mut outcomes = Vec::with_capacity(writes.len());
        let mut seq = *next_seq;
        let mut job_conflicts = Vec::new();
        let mut entries: Vec<pb::LogEntry> = Vec::with_capacity(writes.len());
        let mut counter_deltas = Vec::new();
        for (w, epoch) in writes.iter().zip(epochs) {
            let dk = data_key(&w.table, &w.key);
            let current = match staged.get(&dk).or_else(|| overlay.row(&dk)) {
                Some(r) => Some(r.clone()),
                None => self.load_row(&dk, &w.table, &w.key)?,
            };
            // Stamp past the stored row: with a wall clock that went back
            // (restart, skew), a newer write must still win over it.
            let hlc = match &current {
                Some(r) => self.hlc.now_after(HlcTimestamp(r.hlc)).0,
                None => self.hlc.now().0,
            };
            // The row's size before the write matters only for writes that
            // add no value; measured now, as `apply_op` consumes the row.
            let adds = matches!(w.op, RowOp::Put { .. } | RowOp::SetAdd { .. });
            let before = match (&current, adds) {
                (Some(r), false) => RowMeasure::of(r, &r.to_proto()),
                _ => RowMeasure::default(),
            };
            let applied = self.apply_op(w, current, hlc, epoch)?;
            let Some((row, mut outcome, conflicted)) = applied else {
                outcomes.push(WriteOutcome {
                    context: Vec::new(),
                    hlc,
                    home_region: w.placement.home_region.clone(),
                    epoch,
                    accepted_by_region: self.settings.region.clone(),
                    log_seq: 0,
                    counter_value: None,
                    members: None,
                    replayed: false,
                });
                continue;
            };
            // Bounded before anything is stored: an error here drops the
            // whole job, and its batch never reaches the engine.
            let proto = row.to_proto();
            self.settings.row_limits.check(
                || display_key(&w.table, &w.key),
                adds,
                || before,
                RowMeasure::of(&row, &proto),
            )?;
            if conflicted {
                job_conflicts.push(w.table.clone());
            }
            let sealed_row = codec::seal_message(&proto);
            if let RowOp::CounterAdd { delta } = w.op {
                counter_deltas.push(pb::CounterDelta { table: w.table.clone(), key: w.key.clone(), delta });
            }
            entries.push(pb::LogEntry {
                seq,
                table: w.table.clone(),
                key: w.key.clone(),
                row: Some(proto),
                hlc,
                origin: self.settings.actor.clone(),
                accepted_epoch: if w.lease_home.is_some() { epoch } else { 0 },
                idempotency: None,
            });
            self.count_tombstone(&row);
            job_batch.put(Cf::Data, dk.clone(), sealed_row);
            outcome.log_seq = seq;
            seq += 1;
            staged.insert(dk, row);
            outcomes.push(outcome);
        }
        if let Some(idem) = idempotency {
            let stored_at_ms = now_ms();
            let record = pb::IdempotencyRecord {
                stored_at_ms,
                request_hash: idem.request_hash,
                reply: Vec::new(),
                outcomes: Some(stored_reply(&outcomes, writes)),
                origin: self.settings.actor.clone(),
                hlc: outcomes.iter().map(|o| o.hlc).max().unwrap_or(0),
                counter_deltas,
            };
            if let Some(last) = entries.last_mut() {
                if travels_with_entry(writes, &record) {
                    last.idempotency =
                        Some(pb::IdempotencyTransfer { key: idem.key.clone(), record: Some(record.clone()) });
                } else {
                    metrics::counter!("geokv_idempotency_records_kept_local_total").increment(1);
                }
            }
            self.put_idempotency(&mut job_batch, &idem.key, &record, replaces);
            overlay.idem.insert(idem.key.clone(), record);
        }
        for entry in &entries {
            self.put_log_entry(&mut job_batch, entry);
        }
        *next_seq = seq;
        overlay.rows.extend(staged);
        batch.extend(job_batch);
        conflicts.extend(job_conflicts);
        Ok(outcomes)
    }

    /// Merges a replicated frame into the stored rows and records the
    /// source's position in the same batch. A frame at or below the stored
    /// position was applied before and changes nothing.
    fn apply_remote(
        &mut self,
        remote: &RemoteApply,
        overlay: &mut Overlay,
        batch: &mut WriteBatch,
        next_seq: &mut u64,
        conflicts: &mut Vec<String>,
    ) -> Result<Vec<WriteOutcome>, KvError> {
        let position = (remote.source.clone(), remote.source_store.clone());
        let applied = match overlay.inbound_of(&position) {
            Some(seq) => seq,
            None => self.inbound_position(&remote.source, &remote.source_store)?,
        };
        let source_region = crate::topology::actor_region(&remote.source).to_string();
        match remote.mode {
            ApplyMode::Log if remote.through_seq <= applied => {
                metrics::counter!("geokv_replication_duplicate_frames_total", "source" => source_region)
                    .increment(1);
                return Ok(Vec::new());
            }
            ApplyMode::Log if remote.first_seq > applied + 1 => {
                tracing::warn!(source = %remote.source, applied, first = remote.first_seq,
                    "replication gap: entries were trimmed at the source before this node got them");
                metrics::counter!("geokv_replication_gaps_total", "source" => source_region.clone())
                    .increment(1);
            }
            ApplyMode::RepairDone => {
                if remote.through_seq > applied {
                    batch.put(
                        Cf::Meta,
                        inbound_key(&remote.source, &remote.source_store),
                        remote.through_seq.to_be_bytes().to_vec(),
                    );
                    overlay.inbound.insert(position, remote.through_seq);
                }
                return Ok(Vec::new());
            }
            _ => {}
        }
        let mut staged: HashMap<Vec<u8>, Row> = HashMap::new();
        let mut job_batch = WriteBatch::new();
        let mut job_conflicts = Vec::new();
        let now = self.hlc.now();
        let origin = format!("{}#{}", remote.source, remote.source_store);
        let mut seq = *next_seq;
        for (i, (table, key, incoming)) in remote.entries.iter().enumerate() {
            let dk = data_key(table, key);
            let current = match staged.get(&dk).or_else(|| overlay.row(&dk)) {
                Some(r) => Some(r.clone()),
                None => self.load_row(&dk, table, key)?,
            };
            // A repaired row reaches the feed only if the merge changed it.
            let before = (remote.mode == ApplyMode::RepairRows && self.settings.feed)
                .then(|| current.as_ref().map(Row::to_proto));
            let mut merged = match current {
                None => incoming.clone(),
                Some(mut row) => {
                    if merge_row(&mut row, incoming) {
                        job_conflicts.push(table.clone());
                    }
                    row
                }
            };
            // An erased subject's values from before its fence, late from
            // a region that had not erased yet or from a repair, are
            // stripped in the same step: never stored live again.
            if let Some(fence) = self.settings.lifecycle.fence_of(table, key).filter(|_| !arrivals_unfenced())
            {
                let fenced = crate::lifecycle::fence_row(&mut merged, fence);
                if fenced.values > 0 {
                    metrics::counter!("geokv_erasure_fenced_arrivals_total").increment(fenced.values as u64);
                }
            }
            let delay_s =
                now.physical_ms().saturating_sub(HlcTimestamp(incoming.hlc).physical_ms()) as f64 / 1000.0;
            if remote.mode == ApplyMode::Log {
                metrics::histogram!("geokv_replication_apply_delay_seconds", "source" => source_region.clone())
                    .record(delay_s);
            }
            let proto = merged.to_proto();
            self.count_tombstone(&merged);
            job_batch.put(Cf::Data, dk.clone(), codec::seal_message(&proto));
            // Shipped log entries are changes watchers see, named by their
            // position in the origin's log.
            if let (ApplyMode::Log, Some(origin_seq), false) =
                (remote.mode, remote.seqs.get(i), feed_local_only())
            {
                self.put_feed(&mut job_batch, &origin, *origin_seq, table, key, proto.clone(), incoming.hlc);
            }
            // Rows a repair changed are changes too, though not log
            // entries: named by the source and this feed's own position
            // (docs/architecture.md section 13).
            if before.is_some_and(|b| b.as_ref() != Some(&proto)) && !feed_local_only() {
                let repair_origin = format!("{origin}{REPAIR_ORIGIN_SUFFIX}");
                let position = self.feed_next.get();
                self.put_feed(
                    &mut job_batch,
                    &repair_origin,
                    position,
                    table,
                    key,
                    proto.clone(),
                    merged.hlc,
                );
            }
            // Restored rows are logged as this node's writes (and so reach
            // the feed and every other region).
            if remote.mode == ApplyMode::Restore {
                let entry = pb::LogEntry {
                    seq,
                    table: table.clone(),
                    key: key.clone(),
                    row: Some(proto),
                    hlc: self.hlc.now_after(HlcTimestamp(merged.hlc)).0,
                    origin: self.settings.actor.clone(),
                    accepted_epoch: 0,
                    idempotency: None,
                };
                self.put_log_entry(&mut job_batch, &entry);
                seq += 1;
            }
            staged.insert(dk, merged);
        }
        for (key, record) in &remote.idempotency {
            self.take_idempotency(key, record, overlay, &mut staged, &mut job_batch, &mut seq)?;
        }
        *next_seq = seq;
        if remote.mode == ApplyMode::Log {
            job_batch.put(
                Cf::Meta,
                inbound_key(&remote.source, &remote.source_store),
                remote.through_seq.to_be_bytes().to_vec(),
            );
            overlay.inbound.insert(position, remote.through_seq);
        }
        metrics::counter!("geokv_replication_applied_entries_total", "source" => source_region)
            .increment(remote.entries.len() as u64);
        overlay.rows.extend(staged);
        batch.extend(job_batch);
        conflicts.extend(job_conflicts);
        Ok(Vec::new())
    }

    /// Strips from each of `rows` the values written at or before `fence`
    /// (an erasure), in this group's batch; rows with nothing to strip are
    /// left alone.
    fn fence(
        &self,
        rows: &[(String, Vec<u8>)],
        fence: u64,
        overlay: &mut Overlay,
        batch: &mut WriteBatch,
    ) -> Result<(), KvError> {
        for (table, key) in rows {
            let dk = data_key(table, key);
            let current = match overlay.row(&dk) {
                Some(r) => Some(r.clone()),
                None => self.load_row(&dk, table, key)?,
            };
            let Some(mut row) = current else { continue };
            if crate::lifecycle::fence_row(&mut row, fence).values > 0 {
                self.count_tombstone(&row);
                batch.put(Cf::Data, dk.clone(), row.seal());
                overlay.rows.insert(dk, row);
            }
        }
        Ok(())
    }

    /// Removes each row of `rows` still stored as exactly the judged bytes;
    /// a row written earlier in this group, or changed in the store, stays
    /// (the next round judges it again). Returns how many are removed.
    fn collect(
        &self,
        rows: &[(Vec<u8>, Vec<u8>)],
        overlay: &Overlay,
        batch: &mut WriteBatch,
    ) -> Result<u64, KvError> {
        let mut removed = 0;
        for (dk, judged) in rows {
            if overlay.row(dk).is_some() {
                continue;
            }
            let stored = self.engine.get(Cf::Data, dk).map_err(|e| KvError::Storage(e.to_string()))?;
            if stored.as_deref() == Some(judged.as_slice()) {
                batch.delete(Cf::Data, dk.clone());
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn inbound_position(&self, source: &str, store: &str) -> Result<u64, KvError> {
        let stored = self
            .engine
            .get(Cf::Meta, &inbound_key(source, store))
            .map_err(|e| KvError::Storage(e.to_string()))?;
        Ok(stored.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok()).map(u64::from_be_bytes).unwrap_or(0))
    }

    /// The stored row of `dk` (of `table`, `key`), for a key no overlay
    /// holds, to write it: taken from the row cache, else read from the
    /// store. Either way the written row enters the cache when its group
    /// settles.
    fn load_row(&self, dk: &[u8], table: &str, key: &[u8]) -> Result<Option<Row>, KvError> {
        if let Some(row) = self.rows.borrow_mut().take(dk) {
            return Ok(Some(row));
        }
        match self.engine.get(Cf::Data, dk).map_err(|e| KvError::Storage(e.to_string()))? {
            None => Ok(None),
            Some(bytes) => Row::open(&bytes, || display_key(table, key)).map(Some),
        }
    }

    /// Computes the row after `w`. None means the write changes nothing (a
    /// delete of a row that does not exist).
    fn apply_op(
        &self,
        w: &AdmittedWrite,
        current: Option<Row>,
        hlc: u64,
        epoch: u64,
    ) -> Result<Option<(Row, WriteOutcome, bool)>, KvError> {
        let actor = self.settings.actor.as_str();
        let shown = || display_key(&w.table, &w.key);
        // A write lands on the fenced state, whether or not the erasure's
        // own step ran yet.
        let current = match (current, self.settings.lifecycle.fence_of(&w.table, &w.key)) {
            (Some(mut row), Some(fence)) => {
                crate::lifecycle::fence_row(&mut row, fence);
                Some(row)
            }
            (current, _) => current,
        };
        if let Some(existing) = &current {
            if existing.home_region != w.placement.home_region {
                return Err(KvError::HomeMismatch {
                    key: shown(),
                    existing: existing.home_region.clone(),
                    requested: w.placement.home_region.clone(),
                });
            }
        }
        if current.is_none() && matches!(w.op, RowOp::Delete { .. } | RowOp::SetRemove { .. }) {
            return Ok(None);
        }
        let wrong = |expected: &'static str, actual: &RowValue| KvError::WrongType {
            key: shown(),
            expected,
            actual: actual.kind(),
        };
        let mut row = current.unwrap_or_else(|| Row {
            home_region: w.placement.home_region.clone(),
            zone: w.placement.zone.clone(),
            epoch,
            hlc,
            value: match (&w.op, w.conflict) {
                (RowOp::CounterAdd { .. }, _) => RowValue::Counter(PnCounter::default()),
                (RowOp::SetAdd { .. }, _) => RowValue::Set(OrSet::default()),
                (_, ConflictPolicy::Lww) => RowValue::Lww(LwwRegister::default()),
                (_, ConflictPolicy::Siblings) => RowValue::Register(DvvSet::default()),
            },
        });
        row.hlc = row.hlc.max(hlc);
        row.epoch = row.epoch.max(epoch);
        let mut conflicted = false;
        let mut counter_value = None;
        let mut members = None;
        let context: VersionVector = match (&w.op, &mut row.value) {
            (RowOp::Put { value, context, ttl_ms }, RowValue::Register(dvv)) => {
                let expires_ms = expiry_ms(hlc, *ttl_ms);
                dvv.write_expiring(actor, context, Some(value.clone()), HlcTimestamp(hlc), expires_ms);
                conflicted = dvv.live_values().len() > 1;
                dvv.context().clone()
            }
            (RowOp::Delete { context }, RowValue::Register(dvv)) => {
                let seen = context.clone().unwrap_or_else(|| dvv.context().clone());
                dvv.write(actor, &seen, None, HlcTimestamp(hlc));
                dvv.context().clone()
            }
            (RowOp::Put { value, ttl_ms, .. }, RowValue::Lww(reg)) => {
                let incoming = LwwRegister::new(actor, Some(value.clone()), HlcTimestamp(hlc))
                    .expiring(expiry_ms(hlc, *ttl_ms));
                reg.merge_reporting(&incoming);
                VersionVector::default()
            }
            (RowOp::Delete { .. }, RowValue::Lww(reg)) => {
                let incoming = LwwRegister::new(actor, None, HlcTimestamp(hlc));
                reg.merge_reporting(&incoming);
                VersionVector::default()
            }
            (RowOp::CounterAdd { delta }, RowValue::Counter(c)) => {
                let value = c.value().checked_add(*delta).ok_or(KvError::CounterOverflow)?;
                c.add(actor, *delta);
                counter_value = Some(value);
                VersionVector::default()
            }
            (RowOp::SetAdd { members: add }, RowValue::Set(s)) => {
                for m in add {
                    s.add(actor, m.clone());
                }
                members = Some(owned(s.members()));
                s.context().clone()
            }
            (RowOp::SetRemove { members: remove, context }, RowValue::Set(s)) => {
                for m in remove {
                    s.remove(m, context.as_ref());
                }
                members = Some(owned(s.members()));
                s.context().clone()
            }
            (RowOp::Delete { context }, RowValue::Set(s)) => {
                for m in owned(s.members()) {
                    s.remove(&m, context.as_ref());
                }
                members = Some(owned(s.members()));
                s.context().clone()
            }
            (RowOp::Put { .. }, v) | (RowOp::Delete { .. }, v) => return Err(wrong("register or set", v)),
            (RowOp::CounterAdd { .. }, v) => return Err(wrong("counter", v)),
            (RowOp::SetAdd { .. }, v) | (RowOp::SetRemove { .. }, v) => return Err(wrong("set", v)),
        };
        let outcome = WriteOutcome {
            context: encode_context_at(&context, hlc),
            hlc,
            home_region: row.home_region.clone(),
            epoch,
            accepted_by_region: self.settings.region.clone(),
            log_seq: 0,
            counter_value,
            members,
            replayed: false,
        };
        Ok(Some((row, outcome, conflicted)))
    }

    /// Writes a log entry at its position, trimming the entry that falls
    /// out of the retention window.
    fn put_log_entry(&self, batch: &mut WriteBatch, entry: &pb::LogEntry) {
        let seq = entry.seq;
        if let Some(row) = &entry.row {
            self.put_feed(
                batch,
                &self.settings.origin,
                seq,
                &entry.table,
                &entry.key,
                row.clone(),
                entry.hlc,
            );
        }
        batch.put(Cf::ReplLog, seq.to_be_bytes().to_vec(), codec::seal_message(entry));
        if seq > self.settings.log_retention_entries {
            batch.delete(Cf::ReplLog, (seq - self.settings.log_retention_entries).to_be_bytes().to_vec());
        }
    }

    /// Appends one change to the change feed at the next position
    /// (`kv::feed`; trimmed to its retention in the background).
    #[allow(clippy::too_many_arguments)]
    fn put_feed(
        &self,
        batch: &mut WriteBatch,
        origin: &str,
        origin_seq: u64,
        table: &str,
        key: &[u8],
        row: pb::Row,
        hlc: u64,
    ) {
        if !self.settings.feed {
            return;
        }
        let local_seq = self.feed_next.get();
        self.feed_next.set(local_seq + 1);
        let entry = pb::FeedEntry {
            local_seq,
            origin: origin.to_string(),
            origin_seq,
            table: table.to_string(),
            key: key.to_vec(),
            row: Some(row),
            hlc,
        };
        batch.put(Cf::Feed, super::feed::entry_key(local_seq), codec::seal_message(&entry));
    }

    /// Counts `row`, about to be staged for the store, if it is deleted.
    fn count_tombstone(&self, row: &Row) {
        if super::row_is_deleted(row) {
            self.state.tombstones_written.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Stores `record` under `key`, with its expiry key. `replaces` is the
    /// time of a record of the same key this one overwrites (expired, or
    /// one a record from another region displaces): its expiry key goes in
    /// the same batch, since it names the same record key and its sweep
    /// would delete the new record long before that one expires.
    fn put_idempotency(
        &self,
        batch: &mut WriteBatch,
        key: &str,
        record: &pb::IdempotencyRecord,
        replaces: Option<u64>,
    ) {
        self.stored_oldest_ms.set(self.stored_oldest_ms.get().min(record.stored_at_ms));
        if let Some(at) = replaces.filter(|at| *at != record.stored_at_ms) {
            batch.delete(Cf::Meta, idem_expiry_key(at, key));
        }
        batch.put(Cf::Meta, idem_key(key), codec::seal_message(record));
        batch.put(Cf::Meta, idem_expiry_key(record.stored_at_ms, key), Vec::new());
    }

    /// Takes an idempotency record that arrived with a replicated entry.
    ///
    /// With no record of the key here, it is stored, so a retry landing
    /// here is replayed. With a record of another application of the same
    /// key (a retry a new home applied before the original reached it),
    /// the two are ordered by (hlc, origin): the earlier one stands, and
    /// when the later one is this node's own, this node undoes its counter
    /// changes with a compensating write of its own, in the same batch as
    /// the apply, so it happens exactly once and survives a crash.
    fn take_idempotency(
        &mut self,
        key: &str,
        incoming: &pb::IdempotencyRecord,
        overlay: &mut Overlay,
        staged: &mut HashMap<Vec<u8>, Row>,
        batch: &mut WriteBatch,
        next_seq: &mut u64,
    ) -> Result<(), KvError> {
        let expired =
            now_ms().saturating_sub(incoming.stored_at_ms) > self.settings.idempotency_ttl.as_millis() as u64;
        if expired || incoming.origin.is_empty() {
            return Ok(());
        }
        let lookup = self.idempotency_record(key, overlay)?;
        if let IdemLookup::Live(local) = &lookup {
            if local.origin == incoming.origin || local.origin.is_empty() {
                return Ok(());
            }
            if (local.hlc, &local.origin) < (incoming.hlc, &incoming.origin) {
                metrics::counter!("geokv_idempotent_duplicates_seen_total").increment(1);
                return Ok(());
            }
            if local.origin == self.settings.actor {
                self.compensate(key, local, overlay, staged, batch, next_seq)?;
            }
        }
        self.put_idempotency(batch, key, incoming, lookup.stored_at_ms());
        overlay.idem.insert(key.to_string(), incoming.clone());
        Ok(())
    }

    /// Undoes this node's counter changes of a duplicate application of an
    /// idempotent request: each counter gets the opposite delta under this
    /// node's actor, logged and shipped like any write.
    fn compensate(
        &mut self,
        key: &str,
        duplicate: &pb::IdempotencyRecord,
        overlay: &Overlay,
        staged: &mut HashMap<Vec<u8>, Row>,
        batch: &mut WriteBatch,
        next_seq: &mut u64,
    ) -> Result<(), KvError> {
        for d in &duplicate.counter_deltas {
            let dk = data_key(&d.table, &d.key);
            let current = match staged.get(&dk).or_else(|| overlay.row(&dk)) {
                Some(r) => Some(r.clone()),
                None => self.load_row(&dk, &d.table, &d.key)?,
            };
            let Some(mut row) = current else {
                tracing::warn!(idempotency_key = key, row = %display_key(&d.table, &d.key),
                    "a duplicate application's counter is gone; nothing to undo");
                continue;
            };
            let RowValue::Counter(counter) = &mut row.value else {
                tracing::warn!(idempotency_key = key, row = %display_key(&d.table, &d.key),
                    "a duplicate application's row is no longer a counter; nothing to undo");
                continue;
            };
            counter.add(&self.settings.actor, d.delta.saturating_neg());
            let hlc = self.hlc.now_after(HlcTimestamp(row.hlc)).0;
            row.hlc = hlc;
            let proto = row.to_proto();
            batch.put(Cf::Data, dk.clone(), codec::seal_message(&proto));
            let entry = pb::LogEntry {
                seq: *next_seq,
                table: d.table.clone(),
                key: d.key.clone(),
                row: Some(proto),
                hlc,
                origin: self.settings.actor.clone(),
                accepted_epoch: 0,
                idempotency: None,
            };
            self.put_log_entry(batch, &entry);
            *next_seq += 1;
            staged.insert(dk, row);
            metrics::counter!("geokv_idempotent_duplicates_compensated_total").increment(1);
            tracing::info!(idempotency_key = key, row = %display_key(&d.table, &d.key), delta = d.delta,
                "undid this node's duplicate application of an idempotent request");
        }
        Ok(())
    }

    /// The record of an idempotency key: one of a group not yet written,
    /// or the stored one, which is live while younger than the TTL.
    fn idempotency_record(&self, key: &str, overlay: &Overlay) -> Result<IdemLookup, KvError> {
        if let Some(r) = overlay.idem_record(key) {
            return Ok(IdemLookup::Live(r.clone()));
        }
        let Some(bytes) =
            self.engine.get(Cf::Meta, &idem_key(key)).map_err(|e| KvError::Storage(e.to_string()))?
        else {
            return Ok(IdemLookup::Absent);
        };
        let record: pb::IdempotencyRecord = codec::open_message(&bytes).map_err(|e| KvError::Corrupt {
            what: format!("idempotency record `{key}`"),
            why: e.to_string(),
        })?;
        let expired =
            now_ms().saturating_sub(record.stored_at_ms) > self.settings.idempotency_ttl.as_millis() as u64;
        Ok(if expired {
            IdemLookup::Expired { stored_at_ms: record.stored_at_ms }
        } else {
            IdemLookup::Live(record)
        })
    }

    /// Deletes idempotency records older than the TTL, at most
    /// `IDEM_SWEEP_MAX` per group. A sweep runs once a second, and on the
    /// next group again while the last one found more than it could take,
    /// so records go at least as fast as writes store them: up to 256 per
    /// group, where writes store at most `writes_max` (the record count of a
    /// node under steady load stays near its write rate times the TTL).
    ///
    /// Each sweep starts where the last one stopped (`sweep_from`), not at
    /// the first expiry key: the keys it deleted stay in the store as
    /// tombstones until compaction, and a scan from the start would step
    /// over every one of them each time. The start never passes a record
    /// not yet in the store (one of this group or of a group still being
    /// written, which the scan cannot see), and comes back down to any
    /// record stored since with an older time.
    fn sweep_idempotency(&mut self, batch: &mut WriteBatch, overlay: &Overlay) {
        let stored_oldest = self.stored_oldest_ms.replace(u64::MAX);
        if stored_oldest != u64::MAX {
            let oldest = idem_expiry_key(stored_oldest, "");
            if oldest < self.sweep_from {
                self.sweep_from = oldest;
            }
        }
        if self.last_sweep.elapsed() < IDEM_SWEEP_EVERY {
            return;
        }
        let cutoff = now_ms().saturating_sub(self.settings.idempotency_ttl.as_millis() as u64);
        let end = idem_expiry_key(cutoff, "");
        if self.sweep_from >= end {
            self.last_sweep = Instant::now();
            return;
        }
        let Ok(expired) = self.engine.scan(Cf::Meta, &self.sweep_from, Some(&end), IDEM_SWEEP_MAX) else {
            self.last_sweep = Instant::now();
            return;
        };
        let full = expired.len() >= IDEM_SWEEP_MAX;
        // Where the next sweep may start: past what this one read, or its
        // end when it read everything, but never past a pending record.
        let mut next = match expired.last() {
            Some((k, _)) if full => {
                let mut after = k.clone();
                after.push(0);
                after
            }
            _ => end,
        };
        if let Some(pending) = overlay.oldest_idem_ms() {
            next = next.min(idem_expiry_key(pending, ""));
        }
        // Lower is always safe (it only reads some keys again).
        self.sweep_from = next;
        // A full sweep leaves more behind: the next group sweeps again.
        if !full {
            self.last_sweep = Instant::now();
        }
        let mut swept = 0u64;
        for (k, _) in expired {
            match idem_key_of_expiry(&k) {
                // A record stored again (the key reused after it expired)
                // in a group not yet written stays.
                Ok(idem) if idem_record_pending(overlay, &idem) => {}
                Ok(idem) => {
                    batch.delete(Cf::Meta, idem);
                    swept += 1;
                }
                Err(e) => {
                    // A malformed expiry key names no record; it is dropped so
                    // it cannot take a slot of every later sweep.
                    metrics::counter!("geokv_corruption_detected_total").increment(1);
                    tracing::error!(error = %e, "dropping a malformed idempotency expiry key");
                }
            }
            batch.delete(Cf::Meta, k);
        }
        metrics::counter!("geokv_idempotency_records_expired_total").increment(swept);
    }
}

/// Merges `incoming` into `row`; true when the merge is a conflict
/// (siblings created, or an LWW value discarded).
pub fn merge_row(row: &mut Row, incoming: &Row) -> bool {
    #[cfg(feature = "bugs")]
    if crate::bugs::active(crate::bugs::Bug::MergeOff) {
        *row = incoming.clone();
        return false;
    }
    row.hlc = row.hlc.max(incoming.hlc);
    if incoming.epoch > row.epoch {
        row.epoch = incoming.epoch;
        row.home_region = incoming.home_region.clone();
    }
    match (&mut row.value, &incoming.value) {
        (RowValue::Register(a), RowValue::Register(b)) => {
            let before = a.live_values().len().max(b.live_values().len());
            a.merge(b);
            a.live_values().len() > before
        }
        (RowValue::Lww(a), RowValue::Lww(b)) => a.merge_reporting(b),
        (RowValue::Counter(a), RowValue::Counter(b)) => {
            a.merge(b);
            false
        }
        (RowValue::Set(a), RowValue::Set(b)) => {
            a.merge(b);
            false
        }
        (mine, theirs) => {
            // Two regions created the row with different kinds concurrently.
            // Keep the local kind, deterministically reported, never silent.
            tracing::warn!(
                local = mine.kind(),
                remote = theirs.kind(),
                "row kind conflict; keeping the local kind"
            );
            metrics::counter!("geokv_kind_conflicts_total").increment(1);
            true
        }
    }
}

fn owned(members: Vec<&[u8]>) -> Vec<Vec<u8>> {
    members.into_iter().map(<[u8]>::to_vec).collect()
}

/// Largest idempotency record shipped with a log entry: bigger replies
/// (a batch's set members) stay on the committing node, so a record never
/// makes an entry unshippable.
const IDEM_TRANSFER_BYTES_MAX: usize = 64 * 1024;

/// Whether a request's idempotency record may ride on its last log entry:
/// every write of the request is in the same zone (the record's reply holds
/// their contexts and values, which may go only where their rows may), and
/// the record is small.
fn travels_with_entry(writes: &[AdmittedWrite], record: &pb::IdempotencyRecord) -> bool {
    use prost::Message as _;
    #[cfg(feature = "bugs")]
    if crate::bugs::active(crate::bugs::Bug::IdempotencyLocal) {
        return false;
    }
    let zone = writes.last().map(|w| &w.placement.zone);
    writes.iter().all(|w| Some(&w.placement.zone) == zone) && record.encoded_len() <= IDEM_TRANSFER_BYTES_MAX
}

/// A request's outcomes (one per write of `writes`) as stored in its
/// idempotency record. An outcome holding set members names its row, so an
/// erasure of the row's subject finds them (`Lifecycle::purge_reply`).
fn stored_reply(outcomes: &[WriteOutcome], writes: &[AdmittedWrite]) -> pb::StoredReply {
    pb::StoredReply {
        outcomes: outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let row = writes.get(i).filter(|_| o.members.is_some());
                (o, row)
            })
            .map(|(o, row)| pb::StoredOutcome {
                context: o.context.clone(),
                hlc: o.hlc,
                home_region: o.home_region.clone(),
                epoch: o.epoch,
                accepted_by_region: o.accepted_by_region.clone(),
                log_seq: o.log_seq,
                counter_value: o.counter_value,
                members: o.members.clone().unwrap_or_default(),
                has_members: o.members.is_some(),
                table: row.map(|w| w.table.clone()).unwrap_or_default(),
                key: row.map(|w| w.key.clone()).unwrap_or_default(),
            })
            .collect(),
    }
}

/// The outcomes a record remembers: from `outcomes`, or from the JSON
/// `reply` of a record written before it existed.
fn stored_outcomes(record: &pb::IdempotencyRecord) -> Result<Vec<WriteOutcome>, String> {
    let Some(reply) = &record.outcomes else {
        return serde_json::from_slice(&record.reply).map_err(|e| e.to_string());
    };
    Ok(reply
        .outcomes
        .iter()
        .map(|o| WriteOutcome {
            context: o.context.clone(),
            hlc: o.hlc,
            home_region: o.home_region.clone(),
            epoch: o.epoch,
            accepted_by_region: o.accepted_by_region.clone(),
            log_seq: o.log_seq,
            counter_value: o.counter_value,
            members: o.has_members.then(|| o.members.clone()),
            replayed: false,
        })
        .collect())
}

/// What an idempotency key has on this node.
enum IdemLookup {
    Absent,
    /// A record within the TTL: its request is answered from it.
    Live(pb::IdempotencyRecord),
    /// A stored record past the TTL, not yet swept: as if absent, but a
    /// new record of the key must take its expiry key out.
    Expired {
        stored_at_ms: u64,
    },
}

impl IdemLookup {
    /// The time of the record a new one of the same key overwrites.
    fn stored_at_ms(&self) -> Option<u64> {
        match self {
            IdemLookup::Absent => None,
            IdemLookup::Live(r) => Some(r.stored_at_ms),
            IdemLookup::Expired { stored_at_ms } => Some(*stored_at_ms),
        }
    }
}

/// Whether the record stored under the meta key `idem` was written by a
/// group not yet in the store.
fn idem_record_pending(overlay: &Overlay, idem: &[u8]) -> bool {
    let Some(key) = idem.strip_prefix(IDEM_PREFIX).and_then(|k| std::str::from_utf8(k).ok()) else {
        return false;
    };
    overlay.idem_record(key).is_some()
}

pub(super) fn idem_key(key: &str) -> Vec<u8> {
    let mut k = IDEM_PREFIX.to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

pub(super) fn idem_expiry_key(stored_at_ms: u64, key: &str) -> Vec<u8> {
    let mut k = IDEM_EXPIRY_PREFIX.to_vec();
    k.extend_from_slice(&stored_at_ms.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

/// The record key (`idem/<key>`) an expiry key (`idemx/<stored_at_ms><key>`)
/// read from the store points at; an error, never a panic, when the bytes
/// are not such a key.
fn idem_key_of_expiry(k: &[u8]) -> Result<Vec<u8>, KvError> {
    let key = k.strip_prefix(IDEM_EXPIRY_PREFIX).and_then(|rest| rest.get(8..)).ok_or_else(|| {
        KvError::Corrupt {
            what: "idempotency expiry key".into(),
            why: format!("{} bytes, shorter than its prefix and 8-byte time", k.len()),
        }
    })?;
    let mut idem = IDEM_PREFIX.to_vec();
    idem.extend_from_slice(key);
    Ok(idem)
}

/// Appended to a source's origin in the change feed for rows an
/// anti-entropy repair from it changed; their positions are the feed's own.
pub const REPAIR_ORIGIN_SUFFIX: &str = "~repair";

/// Whether the put-back bug `feed-local-only` is on: applied entries from
/// other regions stay out of the change feed.
fn feed_local_only() -> bool {
    #[cfg(feature = "bugs")]
    if crate::bugs::active(crate::bugs::Bug::FeedLocalOnly) {
        return true;
    }
    false
}

/// Whether the put-back bug `erasure-unfenced` is on: rows arriving after
/// an erasure merge without its fence.
fn arrivals_unfenced() -> bool {
    #[cfg(feature = "bugs")]
    if crate::bugs::active(crate::bugs::Bug::ErasureUnfenced) {
        return true;
    }
    false
}

/// When a value written at HLC stamp `hlc` with `ttl_ms` to live expires
/// (wall-clock milliseconds; 0 = never), so every region agrees.
pub fn expiry_ms(hlc: u64, ttl_ms: u64) -> u64 {
    if ttl_ms == 0 {
        return 0;
    }
    HlcTimestamp(hlc).physical_ms().saturating_add(ttl_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causality::SystemClock;
    use crate::storage::memory::MemoryEngine;

    fn committer(engine: Arc<dyn Engine>) -> Committer {
        let settings = CommitSettings {
            actor: "eu-west-1/n1".into(),
            region: "eu-west-1".into(),
            sync: false,
            writes_max: 16,
            bytes_max: 1 << 20,
            log_retention_entries: 100,
            idempotency_ttl: Duration::from_millis(1),
            row_limits: RowLimits::from_config(&crate::config::Limits::default()),
            pipeline: true,
            lifecycle: Arc::new(crate::lifecycle::Lifecycle::new(&crate::config::Config::default())),
            origin: "eu-west-1/n1#test".into(),
            feed: true,
            row_cache_bytes: 1 << 20,
        };
        let hlc = Arc::new(Hlc::new(Arc::new(SystemClock), 500));
        Committer::new(engine, hlc, settings, Arc::new(CommitState::default()), Arc::new(Pipeline::default()))
    }

    fn outcome(members: Option<Vec<Vec<u8>>>, counter_value: Option<i64>) -> WriteOutcome {
        WriteOutcome {
            context: vec![1, 2, 3],
            hlc: 42,
            home_region: "eu-west-1".into(),
            epoch: 3,
            accepted_by_region: "eu-central-1".into(),
            log_seq: 9,
            counter_value,
            members,
            replayed: false,
        }
    }

    /// A write stamped by a group still in flight is never covered by the
    /// stable time (what feeds resolve through and shippers claim), and
    /// the stable time moves past it once the group is done.
    #[test]
    fn the_stable_time_stays_before_every_write_of_a_group_in_flight() {
        let state = Arc::new(CommitState::default());
        let hlc = Hlc::new(Arc::new(SystemClock), 500);
        let idle = state.stable_hlc(&hlc);
        let first = state.begin_stamping(&hlc);
        let stamped_by_first = hlc.now().0;
        let second = state.begin_stamping(&hlc);
        let stamped_by_second = hlc.now().0;
        let stable = state.stable_hlc(&hlc);
        assert!(stable > idle, "the clock still moves it up to the group's start");
        assert!(stable < stamped_by_first, "the first group's write is not published");
        drop(first);
        let stable = state.stable_hlc(&hlc);
        assert!(stable >= stamped_by_first, "the first group is done");
        assert!(stable < stamped_by_second, "the second is not");
        drop(second);
        assert!(state.stable_hlc(&hlc) > stamped_by_second, "nothing in flight: the clock");
    }

    #[test]
    fn a_stored_reply_reads_back_as_it_was_and_old_json_records_still_read() {
        let outcomes = vec![
            outcome(None, Some(-4)),
            outcome(Some(Vec::new()), None),
            outcome(Some(vec![b"a".to_vec(), b"b".to_vec()]), None),
        ];
        let record =
            pb::IdempotencyRecord { outcomes: Some(stored_reply(&outcomes, &[])), ..Default::default() };
        let sealed = codec::seal_message(&record);
        let opened: pb::IdempotencyRecord = codec::open_message(&sealed).unwrap();
        assert_eq!(stored_outcomes(&opened).unwrap(), outcomes, "an empty set is not taken for no set");

        let old =
            pb::IdempotencyRecord { reply: serde_json::to_vec(&outcomes).unwrap(), ..Default::default() };
        assert_eq!(stored_outcomes(&old).unwrap(), outcomes);
        let torn = pb::IdempotencyRecord { reply: b"[{".to_vec(), ..Default::default() };
        assert!(stored_outcomes(&torn).is_err());
    }

    #[test]
    fn an_expiry_key_maps_to_its_record_or_to_an_error() {
        assert_eq!(idem_key_of_expiry(&idem_expiry_key(5, "abc")).unwrap(), idem_key("abc"));
        assert_eq!(idem_key_of_expiry(&idem_expiry_key(5, "")).unwrap(), idem_key(""));
        for short in [&b""[..], b"idemx/", b"idemx/\0\0\0", b"other/12345678k"] {
            assert_eq!(idem_key_of_expiry(short).unwrap_err().reason(), "DATA_CORRUPTION", "{short:?}");
        }
    }

    #[test]
    fn a_short_expiry_key_on_disk_is_dropped_without_stopping_the_sweep() {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let mut seed = WriteBatch::new();
        // Shorter than the prefix and the time, and sorted among expired
        // keys (its first time byte is 0): the sweep used to panic on it.
        seed.put(Cf::Meta, b"idemx/\0\0".to_vec(), Vec::new());
        seed.put(Cf::Meta, idem_key("old"), b"record".to_vec());
        seed.put(Cf::Meta, idem_expiry_key(1, "old"), Vec::new());
        engine.write(seed, false).unwrap();
        let mut c = committer(engine.clone());
        c.last_sweep = Instant::now() - IDEM_SWEEP_EVERY * 2;
        let mut batch = WriteBatch::new();
        c.sweep_idempotency(&mut batch, &Overlay::default());
        engine.write(batch, false).unwrap();
        assert_eq!(engine.get(Cf::Meta, b"idemx/\0\0").unwrap(), None, "the malformed key is dropped");
        assert_eq!(engine.get(Cf::Meta, &idem_key("old")).unwrap(), None, "the expired record is swept");
        assert_eq!(engine.get(Cf::Meta, &idem_expiry_key(1, "old")).unwrap(), None);
    }

    fn seed_expired(engine: &Arc<dyn Engine>, keys: impl Iterator<Item = (u64, String)>) {
        let mut seed = WriteBatch::new();
        for (at, key) in keys {
            let record = pb::IdempotencyRecord { stored_at_ms: at, ..Default::default() };
            seed.put(Cf::Meta, idem_key(&key), codec::seal_message(&record));
            seed.put(Cf::Meta, idem_expiry_key(at, &key), Vec::new());
        }
        engine.write(seed, false).unwrap();
    }

    fn idem_count(engine: &Arc<dyn Engine>) -> (usize, usize) {
        let records = engine.scan(Cf::Meta, IDEM_PREFIX, Some(b"idem0"), usize::MAX).unwrap().len();
        let expiry = engine.scan(Cf::Meta, IDEM_EXPIRY_PREFIX, Some(b"idemx0"), usize::MAX).unwrap().len();
        (records, expiry)
    }

    /// One group's sweep, written as the syncer would.
    fn sweep_once(c: &mut Committer, engine: &Arc<dyn Engine>, overlay: &Overlay) {
        let mut batch = WriteBatch::new();
        c.sweep_idempotency(&mut batch, overlay);
        if !batch.is_empty() {
            engine.write(batch, false).unwrap();
        }
    }

    /// Records expire as fast as writes store them: a backlog larger than
    /// one sweep takes goes in the groups right after, not at one sweep a
    /// second (which let a node writing more than 256 records a second
    /// keep every record it ever stored).
    #[test]
    fn a_backlog_of_expired_records_goes_in_the_next_groups() {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        seed_expired(&engine, (0..2000u64).map(|i| (1 + i / 7, format!("k{i:05}"))));
        let mut c = committer(engine.clone());
        c.last_sweep = Instant::now() - IDEM_SWEEP_EVERY * 2;
        for _ in 0..2000 / IDEM_SWEEP_MAX + 1 {
            sweep_once(&mut c, &engine, &Overlay::default());
        }
        assert_eq!(idem_count(&engine), (0, 0), "every expired record and expiry key is gone");
        assert!(c.last_sweep.elapsed() < IDEM_SWEEP_EVERY, "with the backlog cleared it waits again");
    }

    /// A sweep never steps past a record still on its way to the store,
    /// nor past one stored later with an older time: both go in a later
    /// sweep.
    #[test]
    fn the_sweep_start_waits_for_pending_and_late_old_records() {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        seed_expired(&engine, [(10, "a".to_string()), (30, "c".to_string())].into_iter());
        let mut c = committer(engine.clone());
        c.last_sweep = Instant::now() - IDEM_SWEEP_EVERY * 2;
        // "b" (time 20) is in a group not yet written.
        let pending = pb::IdempotencyRecord { stored_at_ms: 20, ..Default::default() };
        let mut overlay = Overlay::default();
        overlay.idem.insert("b".into(), pending.clone());
        let mut write_b = WriteBatch::new();
        c.put_idempotency(&mut write_b, "b", &pending, None);
        sweep_once(&mut c, &engine, &overlay);
        assert_eq!(idem_count(&engine), (0, 0), "a and c are swept");
        engine.write(write_b, false).unwrap();
        assert_eq!(idem_count(&engine), (1, 1), "b is written after the sweep");
        c.last_sweep = Instant::now() - IDEM_SWEEP_EVERY * 2;
        sweep_once(&mut c, &engine, &Overlay::default());
        assert_eq!(idem_count(&engine), (0, 0), "b is swept once in the store");

        // A record that travelled from another region, stored with a time
        // the sweep passed long ago, between two sweeps.
        let late = pb::IdempotencyRecord { stored_at_ms: 5, ..Default::default() };
        let mut write_late = WriteBatch::new();
        c.put_idempotency(&mut write_late, "late", &late, None);
        engine.write(write_late, false).unwrap();
        c.last_sweep = Instant::now() - IDEM_SWEEP_EVERY * 2;
        sweep_once(&mut c, &engine, &Overlay::default());
        assert_eq!(idem_count(&engine), (0, 0), "the late record is swept too");
    }
}
