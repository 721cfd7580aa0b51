//! One shipper per destination node: tails this node's durable replication
//! log, leaves out entries the destination may not hold (residency) and
//! entries of partitions another node of the destination region owns, and
//! streams frames over one gRPC stream with at most `in_flight_frames_max`
//! unacknowledged. A destination found behind log retention is repaired by
//! Merkle-tree anti-entropy ([`super::repair`]) before shipping resumes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// The runtime's clock (the OS clock in production), so a simulation's
// time drives contact and cursor persistence.
use tokio::time::Instant;

use geokv_proto::storage as spb;
use geokv_proto::v1 as pb;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::codec;
use crate::config::ReplicationConfig;
use crate::error::KvError;
use crate::kv::Node;
use crate::storage::Cf;

/// The state of one link, shared with status and metrics.
pub struct LinkState {
    pub source: String,
    pub source_node: String,
    pub destination: String,
    /// The node of `destination` this link ships to: the owner there of
    /// every partition whose entries it carries.
    pub destination_node: String,
    pub paused: AtomicBool,
    pub connected: AtomicBool,
    /// Highest position the destination acknowledged.
    pub acked_seq: AtomicU64,
    pub skipped_by_residency: AtomicU64,
    pub shipped_bytes: AtomicU64,
    /// Uncompressed bytes of entries sent and not yet acknowledged.
    pub in_flight_bytes: AtomicU64,
    /// Average uncompressed entry size seen, for the lag estimate.
    pub avg_entry_bytes: AtomicU64,
    pub last_error: Mutex<String>,
    /// Wakes the shipper on resume.
    pub resume: Notify,
    /// A repair of this destination is running.
    pub repairing: AtomicBool,
    pub repairs_started: AtomicU64,
    pub repairs_finished: AtomicU64,
    pub rows_repaired: AtomicU64,
    pub repair_bytes: AtomicU64,
    /// Why the last repair failed ("" when it did not).
    pub repair_error: Mutex<String>,
    /// Entries (or repaired rows) that can never ship to this destination
    /// and were skipped, so the stream behind them moves on.
    pub unshippable: AtomicU64,
    /// The last of them, for status ("" when none).
    pub last_unshippable: Mutex<String>,
    /// Set when the destination refused a frame as too large: frames carry
    /// one entry each through this position, so the entry it refuses is
    /// found and skipped alone (0 = not set).
    pub solo_through: AtomicU64,
    /// The last entry skipped as unshippable, as (position before it, its
    /// position): the destination never applies it, so a handshake that
    /// answers "before it" resumes after it instead of sending it again.
    pub skipped: Mutex<(u64, u64)>,
    /// The destination's store incarnation as its last handshake gave it
    /// ("" before the first).
    pub destination_store: Mutex<String>,
    /// The destination is a new store incarnation (a wiped or replaced
    /// disk): it is re-seeded by anti-entropy before shipping resumes.
    pub reseed: AtomicBool,
}

/// What a destination has applied from this node's store, as it said in
/// the last handshake and acknowledged since (docs/architecture.md
/// section 16): every entry of `source_store`'s log through
/// `applied_through` is applied at `destination_store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPosition {
    pub destination: String,
    pub destination_node: String,
    /// "" until the first handshake.
    pub destination_store: String,
    pub source_store: String,
    pub applied_through: u64,
}

/// A point-in-time view of a link.
#[derive(Debug, Clone)]
pub struct LinkSnapshot {
    pub source: String,
    pub source_node: String,
    pub destination: String,
    pub destination_node: String,
    pub paused: bool,
    pub connected: bool,
    pub acked_seq: u64,
    pub head_seq: u64,
    pub lag_seconds: f64,
    pub lag_entries: u64,
    pub lag_bytes: u64,
    pub skipped_by_residency: u64,
    pub shipped_bytes: u64,
    pub last_error: String,
    /// "idle", "running" or "failed: <why>".
    pub repair_state: String,
    pub repairs_started: u64,
    pub repairs_finished: u64,
    pub rows_repaired: u64,
    pub repair_bytes: u64,
}

impl LinkState {
    pub fn new(source: &str, source_node: &str, destination: &str, destination_node: &str) -> Self {
        Self {
            source: source.to_string(),
            source_node: source_node.to_string(),
            destination: destination.to_string(),
            destination_node: destination_node.to_string(),
            paused: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            acked_seq: AtomicU64::new(0),
            skipped_by_residency: AtomicU64::new(0),
            shipped_bytes: AtomicU64::new(0),
            in_flight_bytes: AtomicU64::new(0),
            avg_entry_bytes: AtomicU64::new(256),
            last_error: Mutex::new(String::new()),
            resume: Notify::new(),
            repairing: AtomicBool::new(false),
            repairs_started: AtomicU64::new(0),
            repairs_finished: AtomicU64::new(0),
            rows_repaired: AtomicU64::new(0),
            repair_bytes: AtomicU64::new(0),
            repair_error: Mutex::new(String::new()),
            unshippable: AtomicU64::new(0),
            last_unshippable: Mutex::new(String::new()),
            solo_through: AtomicU64::new(0),
            skipped: Mutex::new((0, 0)),
            destination_store: Mutex::new(String::new()),
            reseed: AtomicBool::new(false),
        }
    }

    /// What the destination has applied from `node`'s store.
    pub fn position(&self, node: &Node) -> LinkPosition {
        LinkPosition {
            destination: self.destination.clone(),
            destination_node: self.destination_node.clone(),
            destination_store: self.destination_store.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            source_store: node.store_tag(),
            applied_through: self.acked_seq.load(Ordering::Acquire),
        }
    }

    /// Records an entry (or row) that can never ship to this destination: a
    /// loud error and a metric, never a retry. `seq` is 0 for a repaired
    /// row; `key` is "" when not known.
    pub fn unshippable(&self, seq: u64, key: &str, why: &str) {
        self.unshippable.fetch_add(1, Ordering::Relaxed);
        let what = match (seq, key) {
            (0, key) => format!("row {key}"),
            (seq, "") => format!("log entry {seq}"),
            (seq, key) => format!("log entry {seq} ({key})"),
        };
        tracing::error!(destination = %self.destination, node = %self.destination_node, %what, why,
            "UNSHIPPABLE replication entry: skipped for this destination, never retried");
        metrics::counter!("geokv_replication_unshippable_total", "destination" => self.destination.clone())
            .increment(1);
        *self.last_unshippable.lock().unwrap_or_else(|p| p.into_inner()) = format!("{what}: {why}");
    }

    /// Unshipped entries: the log head minus the acknowledged position.
    pub fn backlog(&self, head: u64) -> u64 {
        head.saturating_sub(self.acked_seq.load(Ordering::Acquire))
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
        if !paused {
            self.resume.notify_waiters();
        }
    }

    fn set_error(&self, e: impl ToString) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
    }

    /// Lag as CockroachDB reports replicated time: the age of the oldest
    /// entry not yet applied at the destination, plus entry and byte counts
    /// (bytes not yet read from the log are estimated from the average size).
    pub fn snapshot(&self, node: &Node) -> LinkSnapshot {
        let head = node.log_seq();
        let acked = self.acked_seq.load(Ordering::Acquire).min(head);
        let lag_entries = head - acked;
        let lag_seconds = if lag_entries == 0 {
            0.0
        } else {
            match oldest_unacked_hlc(node, acked + 1) {
                Some(hlc) => {
                    let now = node.hlc().now().physical_ms();
                    now.saturating_sub(crate::causality::HlcTimestamp(hlc).physical_ms()) as f64 / 1000.0
                }
                None => 0.0,
            }
        };
        let repair_error = self.repair_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let repair_state = if self.repairing.load(Ordering::Acquire) {
            "running".to_string()
        } else if !repair_error.is_empty() {
            format!("failed: {repair_error}")
        } else {
            "idle".to_string()
        };
        LinkSnapshot {
            source: self.source.clone(),
            source_node: self.source_node.clone(),
            destination: self.destination.clone(),
            destination_node: self.destination_node.clone(),
            paused: self.paused.load(Ordering::Acquire),
            connected: self.connected.load(Ordering::Acquire),
            acked_seq: acked,
            head_seq: head,
            lag_seconds,
            lag_entries,
            lag_bytes: lag_entries.saturating_mul(self.avg_entry_bytes.load(Ordering::Relaxed)),
            skipped_by_residency: self.skipped_by_residency.load(Ordering::Relaxed),
            shipped_bytes: self.shipped_bytes.load(Ordering::Relaxed),
            last_error: self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            repair_state,
            repairs_started: self.repairs_started.load(Ordering::Relaxed),
            repairs_finished: self.repairs_finished.load(Ordering::Relaxed),
            rows_repaired: self.rows_repaired.load(Ordering::Relaxed),
            repair_bytes: self.repair_bytes.load(Ordering::Relaxed),
        }
    }
}

fn oldest_unacked_hlc(node: &Node, seq: u64) -> Option<u64> {
    let bytes = node.engine().get(Cf::ReplLog, &seq.to_be_bytes()).ok()??;
    let entry: spb::LogEntry = codec::open_message(&bytes).ok()?;
    Some(entry.hlc)
}

/// Meta key of the position acknowledged by one destination node.
pub(crate) fn cursor_key(destination: &str, node: &str) -> Vec<u8> {
    let mut k = b"ship/".to_vec();
    k.extend_from_slice(crate::topology::actor(destination, node).as_bytes());
    k
}

/// Meta key of the store incarnation of one destination node, as its last
/// handshake gave it.
fn destination_store_key(destination: &str, node: &str) -> Vec<u8> {
    let mut k = b"shipstore/".to_vec();
    k.extend_from_slice(crate::topology::actor(destination, node).as_bytes());
    k
}

/// Ships this node's log to one destination node.
pub struct Shipper {
    node: Arc<Node>,
    state: Arc<LinkState>,
    addr: String,
    cfg: ReplicationConfig,
    contact: Arc<Mutex<BTreeMap<String, Instant>>>,
}

/// A frame sent and not yet acknowledged.
struct InFlight {
    through_seq: u64,
    bytes: u64,
    /// Entries in the frame.
    entries: u32,
}

impl Shipper {
    pub fn new(
        node: Arc<Node>,
        state: Arc<LinkState>,
        addr: String,
        cfg: ReplicationConfig,
        contact: Arc<Mutex<BTreeMap<String, Instant>>>,
    ) -> Self {
        Self { node, state, addr, cfg, contact }
    }

    /// Runs until cancelled: connect, stream, and on any failure back off
    /// (bounded) and resume from the last acknowledged position.
    pub async fn run(self, cancel: CancellationToken) {
        let key = cursor_key(&self.state.destination, &self.state.destination_node);
        let stored = self.node.engine().get(Cf::Meta, &key).ok().flatten();
        let start =
            stored.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok()).map(u64::from_be_bytes).unwrap_or(0);
        self.state.acked_seq.store(start, Ordering::Release);
        let key = destination_store_key(&self.state.destination, &self.state.destination_node);
        if let Some(store) = self.node.engine().get(Cf::Meta, &key).ok().flatten() {
            *self.state.destination_store.lock().unwrap_or_else(|p| p.into_inner()) =
                String::from_utf8_lossy(&store).into_owned();
        }
        let mut backoff = Duration::from_millis(self.cfg.reconnect_ms);
        while !cancel.is_cancelled() {
            let result = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.stream_once(&cancel) => r,
            };
            self.state.connected.store(false, Ordering::Release);
            self.state.in_flight_bytes.store(0, Ordering::Relaxed);
            match result {
                Ok(()) => backoff = Duration::from_millis(self.cfg.reconnect_ms),
                Err(e) => {
                    tracing::debug!(destination = %self.state.destination, error = %e, "replication link down");
                    match &e {
                        KvError::ConfigMismatch { .. } => {
                            self.state.set_error(format!("{}: {e}", e.reason()))
                        }
                        _ => self.state.set_error(&e),
                    }
                    metrics::counter!("geokv_replication_link_errors_total", "destination" => self.state.destination.clone())
                        .increment(1);
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        self.persist_cursor();
    }

    fn persist_cursor(&self) {
        let acked = self.state.acked_seq.load(Ordering::Acquire);
        let mut batch = crate::storage::WriteBatch::new();
        batch.put(
            Cf::Meta,
            cursor_key(&self.state.destination, &self.state.destination_node),
            acked.to_be_bytes().to_vec(),
        );
        // Not synced: a lost cursor only means frames are sent again, and
        // the destination skips what it already applied.
        if let Err(e) = self.node.engine().write(batch, false) {
            tracing::warn!(error = %e, "cannot store the replication cursor");
        }
    }

    /// The link handshake: both nodes must have the same cluster policy,
    /// and the destination says who it is and what it has applied from
    /// this node's store incarnation. The destination is the authority on
    /// that: shipping resumes from its answer, and a destination that is a
    /// new store incarnation (wiped or replaced) is re-seeded by
    /// anti-entropy first (docs/architecture.md section 16).
    async fn handshake(
        &self,
        client: &mut pb::replication_client::ReplicationClient<tonic::transport::Channel>,
    ) -> Result<(), KvError> {
        let cfg = self.node.config();
        let policy = crate::topology::policy::items(cfg);
        let fingerprint = crate::topology::policy::fingerprint(&policy);
        let hello = pb::ShipHello {
            source_region: cfg.region.clone(),
            source_node: cfg.node_id.clone(),
            source_store: self.node.store_tag(),
            destination_node: self.state.destination_node.clone(),
            policy: crate::topology::policy::to_wire(&policy),
            policy_fingerprint: fingerprint.clone(),
        };
        let peer = crate::topology::actor(&self.state.destination, &self.state.destination_node);
        let welcome = match client.hello(hello).await {
            Ok(w) => w.into_inner(),
            Err(status) => {
                use tonic_types::StatusExt;
                let mismatch = status
                    .get_details_error_info()
                    .filter(|i| geokv_proto::reasons::CONFIG_MISMATCH.is(&i.reason));
                if let Some(info) = mismatch {
                    tracing::error!(peer = %peer, why = %status.message(),
                        "the peer refuses this node: another cluster policy");
                    metrics::counter!("geokv_config_mismatch_total", "peer" => peer.clone()).increment(1);
                    let theirs = info.metadata.get("differences").cloned().unwrap_or_default();
                    return Err(KvError::ConfigMismatch {
                        differences: vec![format!("as {peer} says (there = this node): {theirs}")],
                        peer,
                    });
                }
                return Err(KvError::RegionUnreachable {
                    region: self.state.destination.clone(),
                    why: format!("handshake: {}: {}", status.code(), status.message()),
                });
            }
        };
        if welcome.policy_fingerprint != fingerprint {
            let differences = crate::topology::policy::differences(
                &policy,
                &crate::topology::policy::from_wire(&welcome.policy),
            );
            let err = KvError::ConfigMismatch { peer: peer.clone(), differences };
            tracing::error!(peer = %peer, error = %err, "refusing a node with another cluster policy");
            metrics::counter!("geokv_config_mismatch_total", "peer" => peer).increment(1);
            return Err(err);
        }
        let known = self.state.destination_store.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if crate::storage::identity::identity_off() {
            // Put back: the source keeps its own cursor, whoever answers.
            return Ok(());
        }
        let had = self.state.acked_seq.load(Ordering::Acquire);
        if !known.is_empty() && known != welcome.destination_store {
            tracing::warn!(peer = %peer, was = %known, now = %welcome.destination_store, acked = had,
                "the destination is a new store incarnation (wiped or replaced): re-seeding it by anti-entropy");
            metrics::counter!("geokv_replication_new_destination_incarnations_total",
                "destination" => self.state.destination.clone())
            .increment(1);
            self.state.reseed.store(true, Ordering::Release);
        }
        if welcome.applied_through_seq != had {
            tracing::info!(peer = %peer, cursor = had, applied = welcome.applied_through_seq,
                "the destination says where this node's store stands there");
        }
        // The destination stands just before an entry skipped as
        // unshippable: it will never have it, so shipping resumes after it.
        let (skipped_after, skipped_through) = *self.state.skipped.lock().unwrap_or_else(|p| p.into_inner());
        let resume = if welcome.applied_through_seq == skipped_after && skipped_through > skipped_after {
            skipped_through
        } else {
            welcome.applied_through_seq
        };
        self.state.acked_seq.store(resume, Ordering::Release);
        *self.state.destination_store.lock().unwrap_or_else(|p| p.into_inner()) =
            welcome.destination_store.clone();
        let mut batch = crate::storage::WriteBatch::new();
        // A new incarnation is remembered only once re-seeded, so a restart
        // before that re-seeds it again.
        if !self.state.reseed.load(Ordering::Acquire) {
            batch.put(
                Cf::Meta,
                destination_store_key(&self.state.destination, &self.state.destination_node),
                welcome.destination_store.into_bytes(),
            );
        }
        batch.put(
            Cf::Meta,
            cursor_key(&self.state.destination, &self.state.destination_node),
            resume.to_be_bytes().to_vec(),
        );
        self.node.engine().write(batch, false).map_err(|e| KvError::Storage(e.to_string()))?;
        Ok(())
    }

    async fn stream_once(&self, cancel: &CancellationToken) -> Result<(), KvError> {
        let unreachable =
            |why: String| KvError::RegionUnreachable { region: self.state.destination.clone(), why };
        let expect = crate::transport::Expect {
            region: self.state.destination.clone(),
            node: Some(self.state.destination_node.clone()),
        };
        let channel = self
            .node
            .channels()
            .connect(&self.addr, Some(expect))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let wire_max = super::frame::wire_bytes_max(self.node.config());
        let mut client = pb::replication_client::ReplicationClient::new(channel.clone())
            .max_decoding_message_size(wire_max)
            .max_encoding_message_size(wire_max);
        self.handshake(&mut client).await?;
        let (tx, rx) = mpsc::channel::<pb::ShipFrame>(self.cfg.in_flight_frames_max);
        let mut acks = client
            .ship(ReceiverStream::new(rx))
            .await
            .map_err(|s| unreachable(format!("{}: {}", s.code(), s.message())))?
            .into_inner();
        self.state.connected.store(true, Ordering::Release);
        self.state.set_error("");
        let mut log = self.node.subscribe_log();
        let mut read_pos = self.state.acked_seq.load(Ordering::Acquire);
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut heartbeat = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_persist = Instant::now();
        loop {
            let paused = self.state.paused.load(Ordering::Acquire);
            // Taken before the head: every write stamped by `stable` is at
            // or below `head`, so a frame through `head` is fresh as of it.
            let stable = self.node.stable_hlc();
            let head = self.node.log_seq();
            if !paused && in_flight.is_empty() && self.state.reseed.load(Ordering::Acquire) {
                let through = self.repair(channel.clone()).await?;
                self.state.reseed.store(false, Ordering::Release);
                let store = self.state.destination_store.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let mut batch = crate::storage::WriteBatch::new();
                batch.put(
                    Cf::Meta,
                    destination_store_key(&self.state.destination, &self.state.destination_node),
                    store.into_bytes(),
                );
                self.node.engine().write(batch, false).map_err(|e| KvError::Storage(e.to_string()))?;
                read_pos = read_pos.max(through);
                self.state.acked_seq.fetch_max(through, Ordering::AcqRel);
                self.persist_cursor();
                last_persist = Instant::now();
                continue;
            }
            if !paused && read_pos < head && in_flight.len() < self.cfg.in_flight_frames_max {
                if self.behind_retention(read_pos)? {
                    if in_flight.is_empty() {
                        let through = self.repair(channel.clone()).await?;
                        read_pos = read_pos.max(through);
                        self.state.acked_seq.fetch_max(through, Ordering::AcqRel);
                        self.persist_cursor();
                        last_persist = Instant::now();
                        continue;
                    }
                    // Frames still in flight: wait for their acks, then repair.
                } else {
                    let (frame, bytes) = self.next_frame(read_pos, head, stable)?;
                    read_pos = frame.through_seq;
                    let wire = frame.entries.len() as u64;
                    in_flight.push_back(InFlight {
                        through_seq: frame.through_seq,
                        bytes,
                        entries: frame.entry_count,
                    });
                    self.state.in_flight_bytes.fetch_add(bytes, Ordering::Relaxed);
                    tx.send(frame).await.map_err(|_| unreachable("stream closed".into()))?;
                    self.state.shipped_bytes.fetch_add(wire, Ordering::Relaxed);
                    metrics::counter!("geokv_replication_shipped_bytes_total", "destination" => self.state.destination.clone())
                    .increment(wire);
                    continue;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                ack = acks.message() => {
                    let ack = match ack {
                        Ok(a) => a,
                        Err(status) => {
                            self.note_refusal(&status, &in_flight);
                            return Err(unreachable(format!("{}: {}", status.code(), status.message())));
                        }
                    };
                    let ack = ack.ok_or_else(|| unreachable("destination closed the stream".into()))?;
                    self.contact.lock().unwrap_or_else(|p| p.into_inner())
                        .insert(self.state.destination.clone(), Instant::now());
                    while in_flight.front().is_some_and(|f| f.through_seq <= ack.applied_through_seq) {
                        if let Some(f) = in_flight.pop_front() {
                            self.state.in_flight_bytes.fetch_sub(f.bytes.min(self.state.in_flight_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
                        }
                    }
                    self.state.acked_seq.fetch_max(ack.applied_through_seq, Ordering::AcqRel);
                    super::note_peer_progress(&self.node, &self.state, &ack);
                    if last_persist.elapsed() > Duration::from_secs(1) {
                        self.persist_cursor();
                        last_persist = Instant::now();
                    }
                }
                changed = log.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = self.state.resume.notified() => {}
                _ = heartbeat.tick() => {
                    // An idle, caught-up link says so, which is how the
                    // destination knows how fresh its copy is.
                    // The freshness it claims is taken before the head
                    // it is checked against (as above, but now).
                    let stable = self.node.stable_hlc();
                    let head = self.node.log_seq();
                    if in_flight.is_empty() && read_pos >= head && !paused {
                        let mut frame = super::frame::build(
                            &self.state.source, &self.node.config().node_id, read_pos + 1, read_pos,
                            Vec::new(), head, stable)?;
                        frame.source_store = self.node.store_tag();
                        in_flight.push_back(InFlight { through_seq: read_pos, bytes: 0, entries: 0 });
                        tx.send(frame).await.map_err(|_| unreachable("stream closed".into()))?;
                    }
                }
            }
        }
    }

    /// After the destination refused a frame as too large (its row limit is
    /// smaller than this node's), the entries of the oldest frame in flight
    /// are sent one per frame; a single entry it refuses is skipped as
    /// unshippable, so the stream behind it moves on instead of resending
    /// the same frame forever.
    fn note_refusal(&self, status: &tonic::Status, in_flight: &VecDeque<InFlight>) {
        use tonic_types::StatusExt;
        let too_large = status
            .get_details_error_info()
            .is_some_and(|i| geokv_proto::reasons::ROW_TOO_LARGE.is(&i.reason));
        if !too_large {
            return;
        }
        let Some(refused) = in_flight.front() else { return };
        let solo = self.state.solo_through.load(Ordering::Acquire);
        if solo >= refused.through_seq && refused.entries <= 1 {
            // A frame of one entry, refused alone: it can never ship there.
            self.state.unshippable(refused.through_seq, "", status.message());
            let before = self.state.acked_seq.fetch_max(refused.through_seq, Ordering::AcqRel);
            *self.state.skipped.lock().unwrap_or_else(|p| p.into_inner()) = (before, refused.through_seq);
            self.persist_cursor();
        } else {
            self.state.solo_through.store(refused.through_seq, Ordering::Release);
        }
    }

    /// Whether entries after `after` were trimmed from the log before this
    /// link sent them.
    fn behind_retention(&self, after: u64) -> Result<bool, KvError> {
        let start = (after + 1).to_be_bytes();
        let first = self
            .node
            .engine()
            .scan(Cf::ReplLog, &start, None, 1)
            .map_err(|e| KvError::Storage(e.to_string()))?;
        Ok(match first.first() {
            Some((k, _)) => {
                <[u8; 8]>::try_from(k.as_slice()).map(u64::from_be_bytes).unwrap_or(0) > after + 1
            }
            // Nothing at or after `after + 1` although the head is beyond it.
            None => true,
        })
    }

    /// Runs Merkle-tree anti-entropy towards this link's destination node
    /// and returns the log position it now has everything through.
    async fn repair(&self, channel: tonic::transport::Channel) -> Result<u64, KvError> {
        let labels = [("destination", self.state.destination.clone())];
        self.state.repairing.store(true, Ordering::Release);
        self.state.repairs_started.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("geokv_antientropy_repairs_started_total", &labels).increment(1);
        tracing::info!(destination = %self.state.destination, node = %self.state.destination_node,
            acked = self.state.acked_seq.load(Ordering::Acquire), reseed = self.state.reseed.load(Ordering::Acquire),
            "repairing the destination (behind log retention, or a new store incarnation)");
        let result =
            super::repair::run(&self.node, &self.state, channel, self.cfg.repair_batch_rows_max).await;
        self.state.repairing.store(false, Ordering::Release);
        let mut error = self.state.repair_error.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(o) => {
                error.clear();
                self.state.repairs_finished.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("geokv_antientropy_repairs_finished_total", &labels).increment(1);
                tracing::info!(destination = %self.state.destination, node = %self.state.destination_node,
                    through = o.through_seq, leaves = o.leaves_differing, rows = o.rows_sent, bytes = o.bytes_sent,
                    "repair finished");
                Ok(o.through_seq)
            }
            Err(e) => {
                *error = e.to_string();
                metrics::counter!("geokv_antientropy_repairs_failed_total", &labels).increment(1);
                Err(e)
            }
        }
    }

    /// Reads the next run of log entries after `after` (up to `head`, the
    /// log's head when the HLC time `stable` had every write published;
    /// the frame claims that time), leaving out those
    /// the destination may not hold and those of partitions another node of
    /// the destination region owns; returns the frame and its raw bytes.
    fn next_frame(&self, after: u64, head: u64, stable: u64) -> Result<(pb::ShipFrame, u64), KvError> {
        let cfg = self.node.config();
        let topology = self.node.topology();
        let start = (after + 1).to_be_bytes();
        let rows = self
            .node
            .engine()
            .scan(Cf::ReplLog, &start, None, self.cfg.batch_entries_max)
            .map_err(|e| KvError::Storage(e.to_string()))?;
        let entry_max = super::frame::entry_bytes_max(cfg);
        // One entry per frame while finding an entry the destination refuses.
        let solo = self.state.solo_through.load(Ordering::Acquire);
        let solo = solo > after;
        let mut entries = Vec::new();
        let mut bytes = 0u64;
        let mut through = after;
        let mut first = after + 1;
        for (i, (k, v)) in rows.into_iter().enumerate() {
            let seq = <[u8; 8]>::try_from(k.as_slice()).map(u64::from_be_bytes).map_err(|_| {
                KvError::Corrupt { what: "replication log key".into(), why: format!("{} bytes", k.len()) }
            })?;
            if i == 0 && seq > after + 1 {
                // Entries were trimmed by retention before this link sent them.
                first = seq;
            }
            let full = bytes as usize >= self.cfg.batch_bytes_max
                || (!entries.is_empty() && (solo || bytes as usize + v.len() > self.cfg.batch_bytes_max));
            if full {
                // The frame holds at least one entry and at most the batch
                // bound beyond its last one (frame::frame_bytes_max).
                break;
            }
            let entry: spb::LogEntry = codec::open_message(&v).map_err(|e| KvError::Corrupt {
                what: format!("replication log entry {seq}"),
                why: e.to_string(),
            })?;
            let zone = entry.row.as_ref().map(|r| r.zone.as_str()).unwrap_or("");
            through = seq;
            let owned = topology
                .owner_of(&self.state.destination, &entry.table, &entry.key)
                .is_some_and(|n| n.id == self.state.destination_node);
            if !owned {
                // Another node of the destination region owns this partition.
            } else if !super::frame::zone_allows(cfg, zone, &self.state.destination) {
                self.state.skipped_by_residency.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("geokv_replication_skipped_by_residency_total", "destination" => self.state.destination.clone())
                    .increment(1);
            } else if v.len() > entry_max {
                // Larger than any row the cluster's limits allow (written
                // before the limits, or under larger ones): no frame can
                // carry it, so it is skipped rather than sent forever.
                self.state.unshippable(
                    seq,
                    &crate::kv::row::display_key(&entry.table, &entry.key),
                    &format!("{} bytes, over the entry bound of {entry_max} (limits.row_bytes_max)", v.len()),
                );
            } else {
                bytes += v.len() as u64;
                entries.push(entry);
            }
            if seq >= head {
                break;
            }
        }
        if !entries.is_empty() {
            let avg = bytes / entries.len() as u64;
            self.state.avg_entry_bytes.store(avg.max(1), Ordering::Relaxed);
        }
        let mut frame =
            super::frame::build(&self.state.source, &cfg.node_id, first, through, entries, head, stable)?;
        frame.source_store = self.node.store_tag();
        Ok((frame, bytes))
    }
}
