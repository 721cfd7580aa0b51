//! The key-value domain: admission, writes through group commit, reads.
//!
//! # Layout
//! - [`row`]: the stored row and the data key layout.
//! - [`commit`]: the group-commit thread, the only writer of rows.
//! - [`gc`]: tombstone collection (causal stability from replication
//!   positions) and replication-log trimming.
//! - this file: [`Node`], which validates and admits requests (limits,
//!   tables, placement, residency, levels) and serves reads.
//!
//! Requests arrive here already converted from protobuf by `api`; nothing
//! in this module knows about gRPC.

pub mod commit;
pub mod expiry;
pub mod feed;
pub mod gc;
pub mod route;
pub mod row;
pub mod row_cache;
pub mod subject;

/// A replicated row state: (table, key, row).
pub type ReplicatedRow = (String, Vec<u8>, Row);

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geokv_proto::storage as pb;
use tokio::sync::{mpsc, oneshot};

use crate::causality::{decode_context, encode_context_at, Hlc, VersionVector};
use crate::codec;
use crate::config::{Config, ConflictPolicy, Level};
use crate::error::KvError;
use crate::residency::{self, Locality, Placement, ReadLevel};
use crate::storage::{prefix_end, Cf, Engine};
use crate::topology::{actor_region, Topology};
use commit::{CommitJob, CommitSettings, CommitState, Idempotency, Inbound, RemoteApply, Work, WriteOutcome};
use row::{data_key, display_key, split_data_key, Row, RowValue};

/// Identifies a row and how it is homed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRef {
    pub table: String,
    pub key: Vec<u8>,
    pub locality: Locality,
}

/// A change to one row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOp {
    Put {
        value: Vec<u8>,
        context: VersionVector,
        /// Time to live in milliseconds from the write's HLC time; 0 means
        /// the table's default at admission, and none after it.
        ttl_ms: u64,
    },
    /// `context: None` deletes what the accepting region currently stores.
    Delete {
        context: Option<VersionVector>,
    },
    CounterAdd {
        delta: i64,
    },
    SetAdd {
        members: Vec<Vec<u8>>,
    },
    SetRemove {
        members: Vec<Vec<u8>>,
        context: Option<VersionVector>,
    },
}

impl RowOp {
    fn payload_bytes(&self) -> usize {
        match self {
            RowOp::Put { value, .. } => value.len(),
            RowOp::SetAdd { members } | RowOp::SetRemove { members, .. } => {
                members.iter().map(Vec::len).sum()
            }
            RowOp::Delete { .. } | RowOp::CounterAdd { .. } => 8,
        }
    }
}

/// One write of a request, before admission.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOp {
    pub row: RowRef,
    pub op: RowOp,
}

/// A write request: its ops commit atomically.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub ops: Vec<WriteOp>,
    /// None means each table's default level.
    pub level: Option<Level>,
    pub idempotency: Option<Idempotency>,
}

/// A write that passed admission, ready for the committer.
#[derive(Debug, Clone)]
pub struct AdmittedWrite {
    pub table: String,
    pub key: Vec<u8>,
    pub placement: Placement,
    pub conflict: ConflictPolicy,
    pub op: RowOp,
    /// The home whose lease a LOCAL write needs (checked again at commit).
    pub lease_home: Option<String>,
    /// The epoch of the home the write is accepted under.
    pub epoch: u64,
}

/// What a replicated entry's epoch means for a receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryFence {
    /// Accepted under the home's current epoch (or without a lease).
    Current,
    /// Accepted under an older epoch while that epoch's lease was valid: a
    /// write the old home had not shipped before a failover. Merged, and
    /// reported as a failover conflict.
    LateButValid { current: u64 },
    /// Stamped after its epoch ended: the sender was fenced. Refused.
    Fenced { current: u64 },
}

/// Failover conflicts kept in memory per node.
pub const FAILOVER_CONFLICTS_MAX: usize = 10_000;

/// A write accepted by an old home under its then-valid epoch and received
/// after the home moved on (docs/architecture.md section 8: merged, never dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverConflict {
    pub table: String,
    pub key: Vec<u8>,
    pub home: String,
    pub epoch: u64,
    pub current_epoch: u64,
    pub hlc: u64,
    pub source: String,
}

/// Home leases as the write path needs them (implemented by the failover
/// module over the control plane's state).
pub trait LeaseGuard: Send + Sync + 'static {
    /// The epoch this region serves `home` under, or why it cannot accept
    /// a LOCAL write for it now: `NotHome` naming the holder region,
    /// `HomeUnavailable` while no region holds it, `Fenced` when this
    /// region's lease lapsed or was superseded.
    fn check_local(&self, home: &str) -> Result<u64, KvError>;
    /// The current epoch of `home` (0 when it has no lease yet).
    fn current_epoch(&self, home: &str) -> u64;
    /// How a receiver treats an entry accepted under `epoch` at `hlc_ms`.
    fn fence_entry(&self, home: &str, epoch: u64, hlc_ms: u64) -> EntryFence;
}

/// One live value of a register row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiblingValue {
    pub value: Vec<u8>,
    pub hlc: u64,
    pub origin: String,
}

/// How a read was served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadInfo {
    pub served_by_region: String,
    pub staleness_ms_max: u64,
    pub session_token: Vec<u8>,
}

/// What a read of one row found.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadResult {
    /// None when the row was never written.
    pub row: Option<Row>,
    pub info: ReadInfo,
}

/// A row returned by a scan.
#[derive(Debug, Clone, PartialEq)]
pub struct ScannedRow {
    pub key: Vec<u8>,
    pub row: Row,
}

/// A page of a scan.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanPage {
    pub rows: Vec<ScannedRow>,
    pub next_start_after: Option<Vec<u8>>,
    pub info: ReadInfo,
}

/// Decides whether a client write may go ahead now. Replication implements
/// it (back-pressure); the node asks it after admission, before commit.
pub trait WriteGate: Send + Sync {
    fn check(&self) -> GateDecision;
}

/// What a [`WriteGate`] tells a writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateDecision {
    Admit,
    /// Wait this long, then commit.
    Delay(Duration),
    /// Fail fast with this (retryable) error.
    Reject(KvError),
}

/// Scan pages stop after reading this many stored rows, so a table full of
/// deleted rows cannot make one request unbounded.
const SCAN_EXAMINED_MAX: usize = 10_000;

/// How a node's committer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitMode {
    /// A dedicated thread: a storage sync never holds an async worker.
    #[default]
    Thread,
    /// A task of the runtime that starts the node, for deterministic
    /// simulation with the in-memory engine (docs/decisions/010-simulation.md).
    Task,
}

/// What a node is started with besides its config, engine and clock.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    pub commit: CommitMode,
    /// How the node's gRPC clients (forwarding, replication) connect.
    pub dialer: crate::transport::Dialer,
    /// The node's TLS identity and roots; None for plaintext.
    pub tls: Option<Arc<geokv_net::tls::Tls>>,
    /// Subjects and erasure fences, shared with the engine's compaction
    /// rules; None makes the node its own.
    pub lifecycle: Option<Arc<crate::lifecycle::Lifecycle>>,
}

/// A node's key-value service: owns the engine, the clock and the committer.
pub struct Node {
    cfg: Arc<Config>,
    /// Who owns which partition, in every region (from `cfg`).
    topology: Arc<Topology>,
    engine: Arc<dyn Engine>,
    hlc: Arc<Hlc>,
    /// Queue to the committer; taken on shutdown so the committer drains and exits.
    commit_tx: Mutex<Option<mpsc::Sender<CommitJob>>>,
    commit_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    state: Arc<CommitState>,
    started: Instant,
    failover_conflicts: Mutex<std::collections::VecDeque<FailoverConflict>>,
    /// Back-pressure on client writes, set once replication starts.
    gate: std::sync::OnceLock<Arc<dyn WriteGate>>,
    /// Every outgoing channel to a peer's port (real TCP outside
    /// simulations, TLS when the node has certificates).
    channels: crate::transport::Channels,
    /// Authentication, grants and the audit log (`set_security`).
    security: std::sync::OnceLock<Arc<crate::security::authn::Security>>,
    /// Tombstone collection: peers' reports, the current round, counts.
    gc: gc::GcState,
    /// The store's identity (docs/architecture.md section 16).
    identity: crate::storage::identity::Opened,
    /// Subjects and erasure fences (docs/architecture.md section 13).
    lifecycle: Arc<crate::lifecycle::Lifecycle>,
}

/// The actor id stamped on the writes this node accepts: the node's name
/// and its store incarnation (the bare name under the put-back bug
/// `identity-off`).
fn write_actor(cfg: &Config, identity: &crate::storage::identity::StoreIdentity) -> String {
    if crate::storage::identity::identity_off() {
        return cfg.actor();
    }
    identity.write_actor(&cfg.actor())
}

/// Whether the test-only `staleness-home-only` bug is switched on: staleness
/// measured from the configured home alone (see `crate::bugs`).
fn staleness_home_only() -> bool {
    #[cfg(feature = "bugs")]
    {
        crate::bugs::active(crate::bugs::Bug::StalenessHomeOnly)
    }
    #[cfg(not(feature = "bugs"))]
    {
        false
    }
}
impl Node {
    /// Starts the node's committer over `engine`. The highest log sequence
    /// number is recovered from the engine, so numbering continues after a restart.
    pub fn start(cfg: Arc<Config>, engine: Arc<dyn Engine>, hlc: Arc<Hlc>) -> anyhow::Result<Arc<Self>> {
        Self::start_with(cfg, engine, hlc, NodeOptions::default())
    }

    /// [`Node::start`] with explicit options (committer mode, dialer).
    pub fn start_with(
        cfg: Arc<Config>,
        engine: Arc<dyn Engine>,
        hlc: Arc<Hlc>,
        options: NodeOptions,
    ) -> anyhow::Result<Arc<Self>> {
        let state = Arc::new(CommitState::default());
        if let Some((k, _)) = engine.last(Cf::ReplLog)? {
            let seq = <[u8; 8]>::try_from(k.as_slice()).map(u64::from_be_bytes).map_err(|_| {
                anyhow::anyhow!("replication log key of {} bytes is not a sequence number", k.len())
            })?;
            state.log_seq.store(seq, Ordering::Release);
            state.log_watch.send_replace(seq);
        }
        {
            let mut inbound = state.inbound.lock().unwrap_or_else(|p| p.into_inner());
            // Positions per (source, store incarnation); each source's
            // latest incarnation is the one in memory.
            for (k, v) in engine.scan(Cf::Meta, b"recv/", Some(b"recv0"), 4096)? {
                let Some((source, store)) = commit::parse_inbound_key(&k) else { continue };
                let through = <[u8; 8]>::try_from(v.as_slice()).map(u64::from_be_bytes).unwrap_or(0);
                let e = inbound.entry(source).or_default();
                if store >= e.store {
                    *e = Inbound { store, applied_through: through, fresh_as_of_hlc: 0 };
                }
            }
        }
        // A memory store (simulations) takes its UUID from its node's name,
        // so a run stays reproducible from its seed.
        let opened = if engine.kind() == "memory" {
            let digest = <sha2::Sha256 as sha2::Digest>::digest(cfg.actor().as_bytes());
            let mut uuid = [0u8; 16];
            uuid.copy_from_slice(&digest[..16]);
            crate::storage::identity::load_or_create(engine.as_ref(), || uuid, 1)?
        } else {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(1);
            crate::storage::identity::load_or_create(engine.as_ref(), rand::random, now_ms)?
        };
        tracing::info!(node = %cfg.actor(), store = %opened.identity.tag(), created_empty = opened.created_empty,
            "store identity");
        let lifecycle =
            options.lifecycle.clone().unwrap_or_else(|| Arc::new(crate::lifecycle::Lifecycle::new(&cfg)));
        let erased = lifecycle.load(engine.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
        if erased > 0 {
            tracing::info!(subjects = erased, "erasure ledger loaded: fences applied");
        }
        // The change feed continues after its last stored position.
        let feed_head = feed::newest(engine.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
        state.feed_seq.store(feed_head, Ordering::Release);
        state.feed_watch.send_replace(feed_head);
        let settings = CommitSettings {
            actor: write_actor(&cfg, &opened.identity),
            region: cfg.region.clone(),
            sync: cfg.storage.sync,
            writes_max: cfg.storage.group_commit_writes_max,
            bytes_max: cfg.storage.group_commit_bytes_max,
            log_retention_entries: cfg.storage.log_retention_entries,
            idempotency_ttl: Duration::from_secs(cfg.storage.idempotency_ttl_s),
            row_limits: row::RowLimits::from_config(&cfg.limits),
            pipeline: cfg.storage.commit_pipeline,
            lifecycle: lifecycle.clone(),
            origin: format!(
                "{}#{}",
                cfg.actor(),
                if crate::storage::identity::identity_off() { String::new() } else { opened.identity.tag() }
            ),
            feed: cfg.watch.retention_entries > 0,
            row_cache_bytes: cfg.storage.row_cache_mib << 20,
        };
        let (tx, rx) = mpsc::channel(cfg.storage.commit_queue_max);
        let thread = match options.commit {
            CommitMode::Thread => {
                Some(commit::spawn(engine.clone(), hlc.clone(), settings, state.clone(), rx)?)
            }
            CommitMode::Task => {
                // Ends by itself once the queue's senders are dropped (shutdown).
                drop(commit::spawn_task(engine.clone(), hlc.clone(), settings, state.clone(), rx));
                None
            }
        };
        let topology = Arc::new(Topology::from_config(&cfg));
        topology.check().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Arc::new(Self {
            cfg,
            topology,
            engine,
            hlc,
            commit_tx: Mutex::new(Some(tx)),
            commit_thread: Mutex::new(thread),
            state,
            started: Instant::now(),
            failover_conflicts: Mutex::new(Default::default()),
            gate: std::sync::OnceLock::new(),
            channels: crate::transport::Channels::new(
                crate::transport::ChannelSettings::PEER,
                options.dialer,
                options.tls,
            ),
            security: std::sync::OnceLock::new(),
            gc: gc::GcState::default(),
            identity: opened,
            lifecycle,
        }))
    }

    /// This node's store: its UUID and incarnation, and whether it was made
    /// empty at this start (docs/architecture.md section 16).
    pub fn store(&self) -> &crate::storage::identity::Opened {
        &self.identity
    }

    /// This node's store incarnation as replication positions key it
    /// (`StoreIdentity::tag`; "" under the put-back bug `identity-off`,
    /// which keys positions by node name and sequence only).
    pub fn store_tag(&self) -> String {
        if crate::storage::identity::identity_off() {
            return String::new();
        }
        self.identity.identity.tag()
    }

    /// What this node has applied from the store incarnation `store` of
    /// the node `source` (an actor): every entry of that incarnation's log
    /// through the returned position. The destination is the authority on
    /// this; sources learn it in the link handshake.
    pub fn applied_from(&self, source: &str, store: &str) -> Result<u64, KvError> {
        let stored = self
            .engine
            .get(Cf::Meta, &commit::inbound_key(source, store))
            .map_err(|e| KvError::Storage(e.to_string()))?;
        Ok(stored.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok()).map(u64::from_be_bytes).unwrap_or(0))
    }

    /// Installs the write gate (once; later calls are ignored).
    pub fn set_write_gate(&self, gate: Arc<dyn WriteGate>) {
        let _ = self.gate.set(gate);
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// This node's actor id ("region/node").
    pub fn actor(&self) -> String {
        self.cfg.actor()
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub fn hlc(&self) -> &Hlc {
        &self.hlc
    }

    /// How this node's gRPC clients connect to peers.
    pub fn channels(&self) -> &crate::transport::Channels {
        &self.channels
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn log_seq(&self) -> u64 {
        self.state.log_seq.load(Ordering::Acquire)
    }

    /// An HLC time through which every write this node stamped is published
    /// ([`commit::CommitState::stable_hlc`]).
    pub fn stable_hlc(&self) -> u64 {
        self.state.stable_hlc(&self.hlc)
    }

    /// Conflicts counted per table since start.
    pub fn conflicts(&self) -> HashMap<String, u64> {
        self.state.conflicts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A receiver of each new durable log position, for shippers.
    pub fn subscribe_log(&self) -> tokio::sync::watch::Receiver<u64> {
        self.state.log_watch.subscribe()
    }

    /// Inbound replication positions per source node (actor "region/node").
    pub fn inbound(&self) -> HashMap<String, Inbound> {
        self.state.inbound.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records that `source` (an actor) said, at `hlc`, that this node had
    /// all of its log through `through`.
    pub fn note_fresh(&self, source: &str, through: u64, hlc: u64) {
        let mut inbound = self.state.inbound.lock().unwrap_or_else(|p| p.into_inner());
        let e = inbound.entry(source.to_string()).or_default();
        if e.applied_through >= through {
            e.fresh_as_of_hlc = e.fresh_as_of_hlc.max(hlc);
        }
    }

    /// Merges a replicated frame through the committer.
    pub async fn apply_remote(&self, remote: RemoteApply) -> Result<(), KvError> {
        let tx =
            self.commit_tx.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or(KvError::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        tx.send(CommitJob { work: Work::Apply(remote), reply }).await.map_err(|_| KvError::ShuttingDown)?;
        rx.await.map_err(|_| KvError::ShuttingDown)??;
        Ok(())
    }

    /// How stale this node's copy of what `source` (an actor) wrote may be, in ms.
    pub fn source_staleness_ms(&self, source: &str) -> u64 {
        let fresh = self.inbound().get(source).map(|i| i.fresh_as_of_hlc).unwrap_or(0);
        if fresh == 0 {
            return u64::MAX;
        }
        let now = self.hlc.now().physical_ms();
        now.saturating_sub(crate::causality::HlcTimestamp(fresh).physical_ms())
    }

    /// How stale this node's copy of a row of `partition` placed by
    /// `placement` may be, in ms: the worst freshness over every region that
    /// may write the row, from the node of each that owns the partition.
    /// Those are every region of the row's zone: each accepts EVENTUAL and
    /// QUORUM writes, and whichever holds the home's lease (the home, or
    /// the region a failover moved it to) accepts its LOCAL writes. A region
    /// never heard from makes the bound unknown (`u64::MAX`); this node's
    /// own region adds nothing, as only this node writes its partitions
    /// here (docs/architecture.md section 19).
    pub fn staleness_ms(&self, placement: &Placement, partition: u32) -> u64 {
        self.stalest_writer(placement, partition).map_or(0, |(_, ms)| ms)
    }

    /// The writer region of the row this copy trails most, and by how much.
    fn stalest_writer(&self, placement: &Placement, partition: u32) -> Option<(String, u64)> {
        let home_only;
        let writers = if staleness_home_only() {
            home_only = [placement.home_region.clone()];
            &home_only[..]
        } else {
            &placement.replica_regions[..]
        };
        crate::kv::route::stalest_writer(&self.cfg.region, writers, |region| {
            self.topology.owner(region, partition).map(|owner| self.source_staleness_ms(&owner.actor()))
        })
        .map(|(region, ms)| (region.to_string(), ms))
    }

    /// Checks a SESSION token against what this node has applied: the first
    /// node whose writes the client saw but this node lacks. Nodes of this
    /// node's own region are skipped: they own other partitions, and rows of
    /// this node's partitions are written here only.
    fn session_gap(&self, token: &pb::SessionToken) -> Option<String> {
        let inbound = self.inbound();
        token.seen.iter().find_map(|e| {
            if actor_region(&e.actor) == self.cfg.region {
                return None;
            }
            let applied = inbound.get(&e.actor).map(|i| i.applied_through).unwrap_or(0);
            (applied < e.counter).then(|| e.actor.clone())
        })
    }

    /// Stops taking writes, lets the committer finish what is queued, and
    /// waits for it. Idempotent.
    pub fn shutdown(&self) {
        drop(self.commit_tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = self.commit_thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::MissingField { field: "row.key" });
        }
        let max = self.cfg.limits.key_bytes_max;
        if key.len() > max {
            return Err(KvError::KeyTooLarge { len: key.len(), max });
        }
        Ok(())
    }

    fn check_value(&self, len: usize) -> Result<(), KvError> {
        let max = self.cfg.limits.value_bytes_max;
        if len > max {
            return Err(KvError::ValueTooLarge { len, max });
        }
        Ok(())
    }

    fn table(&self, name: &str) -> Result<&crate::config::TableConfig, KvError> {
        if name.is_empty() {
            return Err(KvError::MissingField { field: "row.table" });
        }
        self.cfg.table(name).ok_or_else(|| KvError::UnknownTable { table: name.to_string() })
    }

    /// Validates and admits every op, then commits them together.
    pub async fn write(&self, req: WriteRequest) -> Result<Vec<WriteOutcome>, KvError> {
        if req.ops.is_empty() {
            return Err(KvError::MissingField { field: "ops" });
        }
        if req.ops.len() > self.cfg.limits.batch_ops_max {
            return Err(KvError::BatchTooLarge { len: req.ops.len(), max: self.cfg.limits.batch_ops_max });
        }
        let mut admitted = Vec::with_capacity(req.ops.len());
        for mut w in req.ops {
            let table = self.table(&w.row.table)?;
            self.check_key(&w.row.key)?;
            match &mut w.op {
                RowOp::Put { value, ttl_ms, .. } => {
                    self.check_value(value.len())?;
                    *ttl_ms = resolve_ttl(table, &self.cfg.limits, *ttl_ms)?;
                }
                RowOp::SetAdd { members } | RowOp::SetRemove { members, .. } => {
                    if members.is_empty() {
                        return Err(KvError::MissingField { field: "members" });
                    }
                    if members.len() > self.cfg.limits.batch_ops_max {
                        return Err(KvError::BatchTooLarge {
                            len: members.len(),
                            max: self.cfg.limits.batch_ops_max,
                        });
                    }
                    self.check_value(members.iter().map(Vec::len).sum())?;
                }
                RowOp::Delete { .. } | RowOp::CounterAdd { .. } => {}
            }
            let placement = residency::resolve(&self.cfg, table, &w.row.locality)?;
            let level = req.level.unwrap_or(table.default_consistency);
            let home = crate::consensus::control::home_key(&placement.home_region, &placement.zone);
            let (lease_home, epoch) = match (self.state.leases.get(), level) {
                (Some(guard), Level::Local) => {
                    // The zone check of admission still applies; the lease
                    // decides which region is the home now.
                    residency::admit_write(&self.cfg.region, &placement, Level::Eventual)?;
                    (Some(home.clone()), self.wait_for_lease(guard.as_ref(), &home).await?)
                }
                (Some(guard), _) => {
                    residency::admit_write(&self.cfg.region, &placement, level)?;
                    (None, guard.current_epoch(&home).max(commit::INITIAL_EPOCH))
                }
                (None, _) => {
                    residency::admit_write(&self.cfg.region, &placement, level)?;
                    (None, commit::INITIAL_EPOCH)
                }
            };
            admitted.push(AdmittedWrite {
                table: table.name.clone(),
                key: w.row.key,
                placement,
                conflict: table.conflict,
                op: w.op,
                lease_home,
                epoch,
            });
        }
        if let Some(gate) = self.gate.get() {
            match gate.check() {
                GateDecision::Admit => {}
                GateDecision::Delay(d) => {
                    metrics::counter!("geokv_backpressure_throttled_total").increment(1);
                    metrics::histogram!("geokv_backpressure_delay_seconds").record(d.as_secs_f64());
                    tokio::time::sleep(d).await;
                }
                GateDecision::Reject(e) => {
                    metrics::counter!("geokv_backpressure_rejected_total").increment(1);
                    return Err(e);
                }
            }
        }
        let tx =
            self.commit_tx.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or(KvError::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        tx.send(CommitJob { work: Work::Client { writes: admitted, idempotency: req.idempotency }, reply })
            .await
            .map_err(|_| KvError::ShuttingDown)?;
        let outcomes = rx.await.map_err(|_| KvError::ShuttingDown)??;
        Ok(outcomes)
    }

    /// Drops replicated entries whose epoch ended before they were stamped
    /// (their sender was fenced), and records entries accepted under an
    /// older, then-valid epoch as failover conflicts: merged, never lost.
    ///
    /// `attached` holds one item per entry (what travelled with it, such as
    /// its idempotency record); the items of refused entries are dropped
    /// with them.
    pub fn fence_entries<T>(
        &self,
        source: &str,
        entries: Vec<ReplicatedRow>,
        accepted: &[(u64, u64)],
        attached: Vec<T>,
    ) -> (Vec<ReplicatedRow>, Vec<T>) {
        let Some(guard) = self.state.leases.get() else { return (entries, attached) };
        let mut kept = Vec::with_capacity(entries.len());
        let mut kept_attached = Vec::with_capacity(attached.len());
        for (((table, key, row), (epoch, hlc)), item) in
            entries.into_iter().zip(accepted.iter().copied()).zip(attached)
        {
            if epoch == 0 {
                kept.push((table, key, row));
                kept_attached.push(item);
                continue;
            }
            let home = crate::consensus::control::home_key(&row.home_region, &row.zone);
            let hlc_ms = crate::causality::HlcTimestamp(hlc).physical_ms();
            match guard.fence_entry(&home, epoch, hlc_ms) {
                EntryFence::Current => {
                    kept.push((table, key, row));
                    kept_attached.push(item);
                }
                EntryFence::LateButValid { current } => {
                    metrics::counter!("geokv_failover_conflicts_total", "home" => home.clone()).increment(1);
                    let mut list = self.failover_conflicts.lock().unwrap_or_else(|p| p.into_inner());
                    if list.len() >= FAILOVER_CONFLICTS_MAX {
                        list.pop_front();
                    }
                    list.push_back(FailoverConflict {
                        table: table.clone(),
                        key: key.clone(),
                        home,
                        epoch,
                        current_epoch: current,
                        hlc,
                        source: source.to_string(),
                    });
                    kept.push((table, key, row));
                    kept_attached.push(item);
                }
                EntryFence::Fenced { current } => {
                    metrics::counter!("geokv_fenced_total", "kind" => "replication").increment(1);
                    tracing::warn!(
                        source, home = %home, epoch, current, key = %display_key(&table, &key),
                        "refusing a replicated write stamped after its epoch ended (FENCED)"
                    );
                }
            }
        }
        (kept, kept_attached)
    }

    /// Drops repaired rows (anti-entropy) whose newest write was stamped
    /// after its epoch ended: a write fenced when it was shipped must not
    /// come back through repair (docs/architecture.md section 18). A row
    /// whose epoch is older but ended after its stamp is a plain old row
    /// and kept, without a failover-conflict record: repair carries merged
    /// states, not writes. Returns the rows kept and how many were refused.
    pub fn fence_repaired_rows(
        &self,
        source: &str,
        entries: Vec<(String, Vec<u8>, Row)>,
    ) -> (Vec<(String, Vec<u8>, Row)>, u64) {
        let Some(guard) = self.state.leases.get() else { return (entries, 0) };
        let mut kept = Vec::with_capacity(entries.len());
        let mut refused = 0;
        for (table, key, row) in entries {
            if row.epoch == 0 {
                kept.push((table, key, row));
                continue;
            }
            let home = crate::consensus::control::home_key(&row.home_region, &row.zone);
            let hlc_ms = crate::causality::HlcTimestamp(row.hlc).physical_ms();
            match guard.fence_entry(&home, row.epoch, hlc_ms) {
                EntryFence::Fenced { current } => {
                    refused += 1;
                    metrics::counter!("geokv_fenced_total", "kind" => "repair").increment(1);
                    tracing::warn!(
                        source, home = %home, epoch = row.epoch, current, key = %display_key(&table, &key),
                        "refusing a repaired row whose newest write was stamped after its epoch ended (FENCED)"
                    );
                }
                EntryFence::Current | EntryFence::LateButValid { .. } => kept.push((table, key, row)),
            }
        }
        (kept, refused)
    }

    /// Writes an old home accepted before a failover and shipped after it,
    /// as received here (newest last, bounded).
    pub fn failover_conflicts(&self) -> Vec<FailoverConflict> {
        self.failover_conflicts.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Merges row states durably (QUORUM replicas, read repair).
    pub async fn merge_rows(&self, entries: Vec<(String, Vec<u8>, Row)>) -> Result<(), KvError> {
        self.merge_rows_as(entries, commit::ApplyMode::RepairRows).await
    }

    /// Merges restored rows (a backup's, docs/decisions/029-zone-strict-backups.md)
    /// with the same residency checks as [`Node::merge_rows`], and logs
    /// each merged state so it replicates like any write.
    pub async fn restore_rows(&self, entries: Vec<(String, Vec<u8>, Row)>) -> Result<(), KvError> {
        self.merge_rows_as(entries, commit::ApplyMode::Restore).await
    }

    async fn merge_rows_as(
        &self,
        entries: Vec<(String, Vec<u8>, Row)>,
        mode: commit::ApplyMode,
    ) -> Result<(), KvError> {
        for (table, _, row) in &entries {
            let t = self.table(table)?;
            // The zone a row declares must be the one this node's policy
            // gives its home: a sender cannot widen a row's residency.
            let placement = crate::residency::resolve(
                &self.cfg,
                t,
                &crate::residency::Locality::HomeRegion(row.home_region.clone()),
            )?;
            if placement.zone != row.zone {
                return Err(KvError::InvalidField {
                    field: "row.zone",
                    why: format!(
                        "the row declares zone `{}` but table `{table}` places rows homed in `{}` in zone `{}`",
                        row.zone, row.home_region, placement.zone
                    ),
                });
            }
            if !self.cfg.zone_regions(&row.zone).contains(&self.cfg.region) {
                return Err(KvError::ResidencyViolation {
                    zone: row.zone.clone(),
                    allowed: self.cfg.zone_regions(&row.zone),
                    region: self.cfg.region.clone(),
                });
            }
        }
        let tx =
            self.commit_tx.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or(KvError::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        let remote = RemoteApply {
            source: "quorum".into(),
            source_store: String::new(),
            first_seq: 0,
            through_seq: 0,
            entries,
            mode,
            idempotency: Vec::new(),
            seqs: Vec::new(),
        };
        tx.send(CommitJob { work: Work::Apply(remote), reply }).await.map_err(|_| KvError::ShuttingDown)?;
        rx.await.map_err(|_| KvError::ShuttingDown)?.map(|_| ())
    }

    /// The stored state of one row, if any.
    pub fn stored_row(&self, table: &str, key: &[u8]) -> Result<Option<Row>, KvError> {
        self.table(table)?;
        match self.engine.get(Cf::Data, &data_key(table, key)).map_err(|e| KvError::Storage(e.to_string()))? {
            None => Ok(None),
            Some(bytes) => Row::open(&bytes, || display_key(table, key)).map(Some),
        }
    }

    /// Tombstone collection state (reports from peers, counts).
    pub fn gc(&self) -> &gc::GcState {
        &self.gc
    }

    /// Tombstones collected since start.
    pub fn tombstones_collected(&self) -> u64 {
        self.state.tombstones_collected.load(Ordering::Relaxed)
    }

    /// Removes the rows judged causally stable, each only if it is still
    /// stored as the judged bytes (through the committer, so no write or
    /// merge of the same row interleaves).
    pub async fn collect(&self, rows: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), KvError> {
        let tx =
            self.commit_tx.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or(KvError::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        tx.send(CommitJob { work: Work::Collect(rows), reply }).await.map_err(|_| KvError::ShuttingDown)?;
        rx.await.map_err(|_| KvError::ShuttingDown)?.map(|_| ())
    }

    /// Returns once every write queued before the call is committed.
    pub async fn barrier(&self) -> Result<(), KvError> {
        let tx =
            self.commit_tx.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or(KvError::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        tx.send(CommitJob { work: Work::Client { writes: Vec::new(), idempotency: None }, reply })
            .await
            .map_err(|_| KvError::ShuttingDown)?;
        rx.await.map_err(|_| KvError::ShuttingDown)?.map(|_| ())
    }

    /// Installs the node's security (once; later calls are ignored).
    pub fn set_security(&self, security: Arc<crate::security::authn::Security>) {
        let _ = self.security.set(security);
    }

    /// Who may do what, and the audit log; plaintext with everyone `root`
    /// where none was installed (the simulation, in-process tests).
    pub fn security(&self) -> &Arc<crate::security::authn::Security> {
        self.security.get_or_init(|| Arc::new(crate::security::authn::Security::insecure(&self.cfg)))
    }

    /// Installs the home leases; LOCAL writes need a valid lease from then on.
    pub fn set_leases(&self, guard: Arc<dyn LeaseGuard>) {
        let _ = self.state.leases.set(guard);
    }

    /// The home leases, when the control plane runs.
    pub fn leases(&self) -> Option<&Arc<dyn LeaseGuard>> {
        self.state.leases.get()
    }

    /// The epoch this region serves `home` under, waiting (bounded by
    /// `consensus.lease_wait_ms`) while no region holds the home, as during
    /// startup or a failover.
    async fn wait_for_lease(&self, guard: &dyn LeaseGuard, home: &str) -> Result<u64, KvError> {
        // The runtime's clock, so a simulation's time bounds the wait.
        let started = tokio::time::Instant::now();
        let wait = Duration::from_millis(self.cfg.consensus.lease_wait_ms);
        loop {
            match guard.check_local(home) {
                Err(KvError::HomeUnavailable { .. }) if started.elapsed() < wait => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// The session token after observing `log_seq` on this node, merged
    /// with the token the client sent.
    pub fn session_token(&self, previous: &[u8], log_seq: u64) -> Result<Vec<u8>, KvError> {
        let mut token = decode_session(previous)?;
        let here = self.cfg.actor();
        let here = here.as_str();
        match token.seen.iter_mut().find(|e| e.actor == here) {
            Some(e) => e.counter = e.counter.max(log_seq),
            None => token.seen.push(pb::VvEntry { actor: here.to_string(), counter: log_seq }),
        }
        Ok(codec::seal_message(&token))
    }

    fn read_info(&self, placement: &Placement, partition: u32, session: &[u8]) -> Result<ReadInfo, KvError> {
        Ok(ReadInfo {
            served_by_region: self.cfg.region.clone(),
            staleness_ms_max: self.staleness_ms(placement, partition),
            session_token: self.read_session_token(session)?,
        })
    }

    /// The token after a read here: the reader may have seen everything this
    /// region wrote and everything it applied from other regions, so a later
    /// SESSION read elsewhere must have applied at least as much (monotonic
    /// reads across regions).
    fn read_session_token(&self, previous: &[u8]) -> Result<Vec<u8>, KvError> {
        let mut token = decode_session(previous)?;
        let mut raise = |region: &str, seq: u64| match token.seen.iter_mut().find(|e| e.actor == region) {
            Some(e) => e.counter = e.counter.max(seq),
            None if seq > 0 => token.seen.push(pb::VvEntry { actor: region.to_string(), counter: seq }),
            None => {}
        };
        raise(&self.cfg.actor(), self.log_seq());
        for (source, inbound) in self.inbound() {
            raise(&source, inbound.applied_through);
        }
        token.seen.sort_by(|a, b| a.actor.cmp(&b.actor));
        Ok(codec::seal_message(&token))
    }

    /// Whether this region's copy is fresh enough for `level`; otherwise the
    /// region that has what the reader needs.
    fn check_freshness(
        &self,
        placement: &Placement,
        partition: u32,
        level: ReadLevel,
        session: &[u8],
    ) -> Result<(), KvError> {
        match level {
            ReadLevel::Bounded { max_staleness_ms } => {
                let (writer, stale) = self.stalest_writer(placement, partition).unwrap_or_default();
                if stale > max_staleness_ms {
                    // The reader is sent to the writer this copy trails most:
                    // its own writes are there.
                    return Err(KvError::ReplicaStale {
                        region: writer,
                        why: format!("copy here may be {stale} ms stale; the bound is {max_staleness_ms} ms"),
                    });
                }
            }
            ReadLevel::Session => {
                if let Some(missing) = self.session_gap(&decode_session(session)?) {
                    let missing_region = actor_region(&missing);
                    let region = if placement.allows(missing_region) {
                        missing_region.to_string()
                    } else {
                        placement.home_region.clone()
                    };
                    return Err(KvError::ReplicaStale {
                        region,
                        why: format!("this region has not yet applied the session's writes from `{missing}`"),
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Reads one row after checking that this region may serve it at `level`.
    pub fn read(&self, row: &RowRef, level: ReadLevel, session: &[u8]) -> Result<ReadResult, KvError> {
        let table = self.table(&row.table)?;
        self.check_key(&row.key)?;
        let resolved = match residency::resolve(&self.cfg, table, &row.locality) {
            Ok(p) => Some(p),
            // A read may omit the locality: the stored row says where it lives.
            Err(KvError::MissingLocality { .. }) => None,
            Err(e) => return Err(e),
        };
        let partition = self.topology.partition_of(&table.name, &row.key);
        if let Some(p) = &resolved {
            residency::admit_read(&self.cfg.region, p, level)?;
            self.check_freshness(p, partition, level, session)?;
        }
        let dk = data_key(&table.name, &row.key);
        let stored = self.engine.get(Cf::Data, &dk).map_err(|e| KvError::Storage(e.to_string()))?;
        let stored = match stored {
            Some(bytes) => Some(Row::open(&bytes, || display_key(&table.name, &row.key))?),
            None => None,
        };
        let placement = match (resolved, &stored) {
            (Some(p), _) => p,
            (None, Some(r)) => {
                let p = self.stored_placement(r);
                residency::admit_read(&self.cfg.region, &p, level)?;
                self.check_freshness(&p, partition, level, session)?;
                p
            }
            (None, None) => return Err(KvError::MissingLocality { table: table.name.clone() }),
        };
        metrics::counter!("geokv_reads_total", "table" => table.name.clone()).increment(1);
        Ok(ReadResult { row: stored, info: self.read_info(&placement, partition, session)? })
    }

    /// Placement of a row as recorded when it was written.
    pub fn stored_placement(&self, row: &Row) -> Placement {
        let replica_regions = match self.cfg.zone(&row.zone) {
            Some(z) => z.regions.clone(),
            None if row.zone.is_empty() => self.cfg.region_names(),
            // A zone no longer configured: only the home may serve it.
            None => vec![row.home_region.clone()],
        };
        Placement { home_region: row.home_region.clone(), zone: row.zone.clone(), replica_regions }
    }

    /// Scans a table's rows whose key starts with `prefix`, after `start_after`.
    /// Rows this region may not hold are never returned.
    pub fn scan(
        &self,
        table: &str,
        prefix: &[u8],
        start_after: &[u8],
        limit: usize,
        include_deleted: bool,
    ) -> Result<ScanPage, KvError> {
        let table = self.table(table)?;
        let limit = limit.clamp(1, self.cfg.limits.scan_rows_max);
        let base = data_key(&table.name, prefix);
        let end = prefix_end(&base);
        let mut start = if start_after.is_empty() || !start_after.starts_with(prefix) {
            base.clone()
        } else {
            let mut s = data_key(&table.name, start_after);
            s.push(0);
            s
        };
        if start < base {
            start = base.clone();
        }
        let mut rows = Vec::new();
        let mut examined = 0usize;
        let now_ms = expiry::read_ms(&self.hlc);
        let mut last_key: Option<Vec<u8>> = None;
        let mut exhausted = false;
        while rows.len() < limit && examined < SCAN_EXAMINED_MAX {
            let chunk = self
                .engine
                .scan(Cf::Data, &start, end.as_deref(), limit - rows.len() + 16)
                .map_err(|e| KvError::Storage(e.to_string()))?;
            if chunk.is_empty() {
                exhausted = true;
                break;
            }
            let chunk_len = chunk.len();
            for (k, v) in chunk {
                examined += 1;
                let Some((_, key)) = split_data_key(&k) else { continue };
                let key = key.to_vec();
                let row = Row::open(&v, || display_key(&table.name, &key))?;
                start = k.clone();
                start.push(0);
                last_key = Some(key.clone());
                let placement = self.stored_placement(&row);
                if !placement.allows(&self.cfg.region) {
                    continue;
                }
                if !include_deleted && row_is_invisible(&row, now_ms) {
                    continue;
                }
                rows.push(ScannedRow { key, row });
                if rows.len() >= limit {
                    break;
                }
            }
            if chunk_len < limit + 16 && rows.len() < limit {
                exhausted = true;
                break;
            }
        }
        let next_start_after = if exhausted { None } else { last_key };
        let placement = Placement {
            home_region: self.cfg.region.clone(),
            zone: String::new(),
            replica_regions: vec![self.cfg.region.clone()],
        };
        Ok(ScanPage { rows, next_start_after, info: self.read_info(&placement, 0, &[])? })
    }
}

/// The TTL a put gets, in milliseconds: its own, else the table's default
/// (0 = none), refused past `limits.ttl_s_max`.
pub fn resolve_ttl(
    table: &crate::config::TableConfig,
    limits: &crate::config::Limits,
    ttl_ms: u64,
) -> Result<u64, KvError> {
    let ttl_ms = if ttl_ms == 0 { table.ttl_s.saturating_mul(1000) } else { ttl_ms };
    let max_ms = limits.ttl_s_max.saturating_mul(1000);
    if ttl_ms > max_ms {
        return Err(KvError::InvalidField {
            field: "ttl_ms",
            why: format!("{ttl_ms} ms; the limit is {max_ms} ms (limits.ttl_s_max)"),
        });
    }
    Ok(ttl_ms)
}

/// Whether a reader at wall-clock millisecond `now_ms` sees nothing in
/// the row: deleted, expired, or an empty set.
pub fn row_is_invisible(row: &Row, now_ms: u64) -> bool {
    match &row.value {
        RowValue::Register(d) => d.visible_siblings(now_ms).next().is_none(),
        RowValue::Lww(l) => l.visible_value(now_ms).is_none(),
        RowValue::Counter(_) => false,
        RowValue::Set(s) => s.is_empty(),
    }
}

/// A register row whose every value is deleted, or an empty set.
pub fn row_is_deleted(row: &Row) -> bool {
    match &row.value {
        RowValue::Register(d) => d.is_deleted(),
        RowValue::Lww(l) => l.value().is_none(),
        RowValue::Counter(_) => false,
        RowValue::Set(s) => s.is_empty(),
    }
}

/// The values of a register row a reader at wall-clock millisecond
/// `now_ms` sees (live and not expired), with the context to write back,
/// stamped with the HLC time of the read, `read_hlc`.
pub fn register_view(row: &Row, now_ms: u64, read_hlc: u64) -> (Vec<SiblingValue>, Vec<u8>) {
    match &row.value {
        RowValue::Register(d) => {
            let siblings = d
                .visible_siblings(now_ms)
                .filter_map(|s| {
                    s.value.as_ref().map(|v| SiblingValue {
                        value: v.clone(),
                        hlc: s.hlc.0,
                        origin: s.dot.actor.clone(),
                    })
                })
                .collect();
            (siblings, encode_context_at(d.context(), read_hlc))
        }
        RowValue::Lww(l) => {
            let siblings = l
                .visible_value(now_ms)
                .map(|v| {
                    vec![SiblingValue { value: v.to_vec(), hlc: l.hlc().0, origin: l.actor().to_string() }]
                })
                .unwrap_or_default();
            (siblings, encode_context_at(&VersionVector::default(), read_hlc))
        }
        RowValue::Counter(_) | RowValue::Set(_) => (Vec::new(), Vec::new()),
    }
}

/// Decodes a client's causal context.
pub fn parse_context(bytes: &[u8]) -> Result<VersionVector, KvError> {
    decode_context(bytes).map_err(|e| KvError::MalformedContext { why: e.to_string() })
}

fn decode_session(bytes: &[u8]) -> Result<pb::SessionToken, KvError> {
    if bytes.is_empty() {
        return Ok(pb::SessionToken::default());
    }
    codec::open_message(bytes).map_err(|e| KvError::MalformedSessionToken { why: e.to_string() })
}

/// Checks a session token sent by a client.
pub fn parse_session(bytes: &[u8]) -> Result<(), KvError> {
    decode_session(bytes).map(|_| ())
}

/// A row stored in a region outside its residency zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidencyFinding {
    pub table: String,
    pub key: Vec<u8>,
    pub zone: String,
    pub allowed_regions: Vec<String>,
}

/// Digest of the rows of one (table, zone), over their canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneDigest {
    pub table: String,
    pub zone: String,
    pub rows: u64,
    pub digest: String,
}

/// Digest of the rows of one (table, zone, partition) on one node, in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionDigest {
    pub table: String,
    pub zone: String,
    pub partition: u32,
    pub rows: u64,
    pub digest: String,
}

/// Combines partition digests (of every node of a region) into one digest
/// per (table, zone): a hash over the partition digests in partition
/// order. A key's partition is the same in every region, so two regions
/// holding the same rows give equal digests whatever their node counts.
pub fn combine_digests(parts: Vec<PartitionDigest>) -> Vec<ZoneDigest> {
    use sha2::Digest as _;
    let mut by_zone: std::collections::BTreeMap<
        (String, String),
        std::collections::BTreeMap<u32, (u64, String)>,
    > = Default::default();
    for p in parts {
        by_zone.entry((p.table, p.zone)).or_default().insert(p.partition, (p.rows, p.digest));
    }
    by_zone
        .into_iter()
        .map(|((table, zone), parts)| {
            let mut h = sha2::Sha256::new();
            let mut rows = 0;
            for (partition, (n, digest)) in parts {
                rows += n;
                h.update(partition.to_be_bytes());
                h.update(n.to_be_bytes());
                h.update(digest.as_bytes());
            }
            ZoneDigest { table, zone, rows, digest: hex::encode(h.finalize()) }
        })
        .collect()
}

/// A row's contents in a canonical encoding: two regions holding the same
/// merged state give the same bytes. Where the row was last written from
/// (its HLC stamp) is not part of its contents.
pub fn canonical_row_bytes(row: &Row) -> Vec<u8> {
    let mut canonical = row.to_proto();
    canonical.hlc = 0;
    prost::Message::encode_to_vec(&canonical)
}

/// Rows read per storage scan by audits and digests.
const FULL_SCAN_CHUNK: usize = 1024;

impl Node {
    /// Visits every stored row in key order, a chunk at a time.
    pub fn for_each_row(&self, mut visit: impl FnMut(&str, &[u8], Row)) -> Result<u64, KvError> {
        let mut start: Vec<u8> = Vec::new();
        let mut seen = 0u64;
        loop {
            let chunk = self
                .engine
                .scan(Cf::Data, &start, None, FULL_SCAN_CHUNK)
                .map_err(|e| KvError::Storage(e.to_string()))?;
            let done = chunk.len() < FULL_SCAN_CHUNK;
            for (k, v) in chunk {
                let Some((table, key)) = split_data_key(&k) else { continue };
                let row = Row::open(&v, || display_key(table, key))?;
                visit(table, key, row);
                seen += 1;
                start = k.clone();
                start.push(0);
            }
            if done {
                return Ok(seen);
            }
        }
    }

    /// Lists every row this node stores outside its residency zone. The
    /// expected answer is none, always.
    pub fn residency_audit(&self) -> Result<(u64, Vec<ResidencyFinding>), KvError> {
        let here = self.cfg.region.clone();
        let mut findings = Vec::new();
        let checked = self.for_each_row(|table, key, row| {
            let allowed = self.cfg.zone_regions(&row.zone);
            let known_zone = row.zone.is_empty() || self.cfg.zone(&row.zone).is_some();
            if !known_zone || !allowed.contains(&here) {
                findings.push(ResidencyFinding {
                    table: table.to_string(),
                    key: key.to_vec(),
                    zone: row.zone.clone(),
                    allowed_regions: if known_zone { allowed } else { vec![row.home_region.clone()] },
                });
            }
        })?;
        Ok((checked, findings))
    }

    /// Digests of every (table, zone, partition) this node stores, so
    /// regions can be compared (see [`combine_digests`]).
    pub fn digest(&self) -> Result<Vec<PartitionDigest>, KvError> {
        use sha2::Digest as _;
        type Acc = std::collections::BTreeMap<(String, String, u32), (u64, sha2::Sha256)>;
        let mut acc: Acc = Default::default();
        self.for_each_row(|table, key, row| {
            let partition = self.topology.partition_of(table, key);
            let (count, hasher) = acc.entry((table.to_string(), row.zone.clone(), partition)).or_default();
            *count += 1;
            let bytes = canonical_row_bytes(&row);
            hasher.update((key.len() as u64).to_be_bytes());
            hasher.update(key);
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(&bytes);
        })?;
        Ok(acc
            .into_iter()
            .map(|((table, zone, partition), (rows, h))| PartitionDigest {
                table,
                zone,
                partition,
                rows,
                digest: hex::encode(h.finalize()),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests;
