//! Cross-region replication (docs/architecture.md section 6).
//!
//! # Layout
//! - [`frame`]: building and opening frames: residency filtering at the
//!   source, lz4 compression, CRC32, and the checks a receiver makes.
//! - [`ship`]: one shipper task per destination node, tailing the durable
//!   replication log and streaming frames with bounded pipelining.
//! - [`receive`]: the `Replication` gRPC service that checks, merges and
//!   acknowledges frames, and answers repair sessions.
//! - [`merkle`]: Merkle trees over rows (pure).
//! - [`repair`]: anti-entropy for a destination behind log retention.
//! - [`backpressure`]: when writers are slowed or refused (pure).
//! - [`Replicator`]: owns the shippers, answers status, pause and resume,
//!   and is the node's write gate.
//!
//! Every node ships its own log. The source ships each entry directly to
//! the owner of its partition in every region its residency zone allows;
//! receivers never re-ship. Every step is idempotent: entries carry full
//! CRDT states, and a receiver stores its position per source node in the
//! same batch as the merged rows.

pub mod backpressure;
pub mod frame;
pub mod merkle;
pub mod receive;
pub mod repair;
pub mod ship;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

// The runtime's clock (the OS clock in production), so region health
// follows a simulation's time.
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kv::Node;
use ship::{LinkState, Shipper};

/// Owns one shipper per destination node.
pub struct Replicator {
    node: Arc<Node>,
    /// Per (destination region, destination node).
    links: BTreeMap<(String, String), Arc<LinkState>>,
    /// Last time each region was heard from (acks or frames).
    contact: Arc<std::sync::Mutex<BTreeMap<String, Instant>>>,
    cancel: CancellationToken,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Replicator {
    /// Starts a shipper to each node of every other region, and installs
    /// itself as the node's write gate (back-pressure).
    pub fn start(cfg: &Config, node: Arc<Node>) -> Arc<Self> {
        let cancel = CancellationToken::new();
        let contact = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let mut links = BTreeMap::new();
        let mut tasks = Vec::new();
        if cfg.replication.enabled {
            let topology = node.topology().clone();
            for region in cfg.peer_regions() {
                for peer in topology.nodes(&region.name) {
                    let state = Arc::new(LinkState::new(&cfg.region, &cfg.node_id, &region.name, &peer.id));
                    let shipper = Shipper::new(
                        node.clone(),
                        state.clone(),
                        peer.addr.clone(),
                        cfg.replication.clone(),
                        contact.clone(),
                    );
                    tasks.push(tokio::spawn(shipper.run(cancel.child_token())));
                    links.insert((region.name.clone(), peer.id.clone()), state);
                }
            }
        }
        let me = Arc::new(Self { node, links, contact, cancel, tasks: std::sync::Mutex::new(tasks) });
        me.node.set_write_gate(Arc::new(Gate(Arc::downgrade(&me))));
        let metrics_me = me.clone();
        let token = me.cancel.child_token();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => metrics_me.publish_metrics(),
                }
            }
        });
        me.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
        me
    }

    pub fn links(&self) -> Vec<Arc<LinkState>> {
        self.links.values().cloned().collect()
    }

    /// The links to every node of `destination` (a region).
    pub fn links_to(&self, destination: &str) -> Vec<Arc<LinkState>> {
        self.links.iter().filter(|((r, _), _)| r == destination).map(|(_, l)| l.clone()).collect()
    }

    /// Each link's backlog as back-pressure sees it.
    pub fn loads(&self) -> Vec<backpressure::LinkLoad> {
        let head = self.node.log_seq();
        self.links
            .values()
            .map(|l| backpressure::LinkLoad {
                destination: crate::topology::actor(&l.destination, &l.destination_node),
                backlog_entries: l.backlog(head),
                healthy: l.connected.load(std::sync::atomic::Ordering::Acquire)
                    && !l.paused.load(std::sync::atomic::Ordering::Acquire)
                    && !l.repairing.load(std::sync::atomic::Ordering::Acquire)
                    && self.is_healthy(&l.destination),
            })
            .collect()
    }

    fn bounds(&self) -> backpressure::Bounds {
        let cfg = self.node.config();
        backpressure::Bounds {
            soft_entries: cfg.replication.backpressure_soft_entries,
            hard_entries: cfg.replication.backpressure_hard_entries,
            delay_max: Duration::from_millis(cfg.replication.backpressure_delay_ms_max),
            retention_entries: cfg.storage.log_retention_entries,
        }
    }

    /// Highest log position of this node that every node of `region`
    /// acknowledged, when this node ships to it.
    pub fn acked_through(&self, region: &str) -> Option<u64> {
        self.links
            .iter()
            .filter(|((r, _), _)| r == region)
            .map(|(_, l)| l.snapshot(&self.node).acked_seq)
            .min()
    }

    /// The lowest log position every destination node acknowledged and
    /// this node stored as its cursor: what the log may be trimmed through
    /// (None when this node ships nowhere). The stored cursor, not only the
    /// one in memory, as a restart resumes from it: entries between the two
    /// must still be there, or the restart would need a repair.
    pub fn acked_by_all(&self) -> Option<u64> {
        self.links
            .values()
            .map(|l| {
                let key = ship::cursor_key(&l.destination, &l.destination_node);
                let stored = self.node.engine().get(crate::storage::Cf::Meta, &key).ok().flatten();
                let stored =
                    stored.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok()).map(u64::from_be_bytes);
                stored.unwrap_or(0).min(l.acked_seq.load(std::sync::atomic::Ordering::Acquire))
            })
            .min()
    }

    /// What each destination node has applied from this node's store, as
    /// it said in its last handshake and acknowledged since (one entry per
    /// link). The destination is the authority: a position here is never
    /// ahead of what it applied. docs/architecture.md section 16.
    pub fn positions(&self) -> Vec<ship::LinkPosition> {
        self.links.values().map(|l| l.position(&self.node)).collect()
    }

    /// Whether this node ships its log to `region` at all.
    pub fn ships_to(&self, region: &str) -> bool {
        self.links.keys().any(|(r, _)| r == region)
    }

    /// Records contact with `region` (an inbound frame).
    pub fn heard_from(&self, region: &str) {
        self.contact.lock().unwrap_or_else(|p| p.into_inner()).insert(region.to_string(), Instant::now());
    }

    /// Time since `region` was last heard from, if ever.
    pub fn last_contact(&self, region: &str) -> Option<Duration> {
        self.contact.lock().unwrap_or_else(|p| p.into_inner()).get(region).map(|t| t.elapsed())
    }

    /// Publishes lag and health gauges.
    pub fn publish_metrics(&self) {
        let cfg = self.node.config();
        for link in self.links.values() {
            let s = link.snapshot(&self.node);
            let labels = [
                ("source", s.source.clone()),
                ("destination", s.destination.clone()),
                ("destination_node", s.destination_node.clone()),
            ];
            metrics::gauge!("geokv_replication_lag_seconds", &labels).set(s.lag_seconds);
            metrics::gauge!("geokv_replication_lag_entries", &labels).set(s.lag_entries as f64);
            metrics::gauge!("geokv_replication_lag_bytes", &labels).set(s.lag_bytes as f64);
            metrics::gauge!("geokv_replication_paused", &labels).set(if s.paused { 1.0 } else { 0.0 });
        }
        for region in &cfg.regions {
            let healthy = self.is_healthy(&region.name);
            metrics::gauge!("geokv_region_healthy", "region" => region.name.clone()).set(if healthy {
                1.0
            } else {
                0.0
            });
        }
    }

    /// Whether `region` answered within the unhealthy threshold.
    pub fn is_healthy(&self, region: &str) -> bool {
        let cfg = self.node.config();
        let limit = Duration::from_millis(
            cfg.replication.heartbeat_ms * u64::from(cfg.replication.unhealthy_after_misses),
        )
        .max(Duration::from_millis(500));
        region == cfg.region || self.last_contact(region).is_some_and(|d| d <= limit)
    }

    /// Stops every shipper and waits for them.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// The node's write gate: back-pressure from this replicator's links. Holds
/// a weak reference, so the node and the replicator do not keep each other alive.
struct Gate(std::sync::Weak<Replicator>);

impl crate::kv::WriteGate for Gate {
    fn check(&self) -> crate::kv::GateDecision {
        use crate::kv::GateDecision;
        let Some(r) = self.0.upgrade() else { return GateDecision::Admit };
        let bounds = r.bounds();
        match backpressure::decide(&bounds, &r.loads()) {
            backpressure::Decision::Admit => GateDecision::Admit,
            backpressure::Decision::Delay { delay, .. } => GateDecision::Delay(delay),
            backpressure::Decision::Reject { destination, backlog_entries } => {
                GateDecision::Reject(crate::error::KvError::ReplicationBackpressure {
                    destination,
                    backlog_entries,
                    bound_entries: bounds.hard_entries,
                    retry_after_ms: bounds.delay_max.as_millis().max(1) as u64,
                })
            }
        }
    }
}

/// The acknowledgement of a frame applied through `through`, with what this
/// node has applied from every source and its own log head, read in that
/// order (tombstone collection at the source, docs/architecture.md section 17).
pub fn progress_ack(node: &Node, through: u64) -> geokv_proto::v1::ShipAck {
    let applied_from = node
        .inbound()
        .into_iter()
        .map(|(source, i)| geokv_proto::v1::SourcePosition { source, applied_through: i.applied_through })
        .collect();
    geokv_proto::v1::ShipAck {
        applied_through_seq: through,
        applied_from,
        destination_log_seq: node.log_seq(),
    }
}

/// Hands a destination's reported progress to tombstone collection.
pub fn note_peer_progress(node: &Node, link: &ship::LinkState, ack: &geokv_proto::v1::ShipAck) {
    let report = crate::kv::gc::PeerReport {
        applied: ack.applied_from.iter().map(|p| (p.source.clone(), p.applied_through)).collect(),
        log_seq: ack.destination_log_seq,
    };
    node.gc().note_report(&crate::topology::actor(&link.destination, &link.destination_node), report);
}
