//! Cross-region replication (DESIGN.md section 6).
//!
//! # Layout
//! - [`frame`]: building and opening frames: residency filtering at the
//!   source, lz4 compression, CRC32, and the checks a receiver makes.
//! - [`ship`]: one shipper task per destination region, tailing the durable
//!   replication log and streaming frames with bounded pipelining.
//! - [`receive`]: the `Replication` gRPC service that checks, merges and
//!   acknowledges frames.
//! - [`Replicator`]: owns the shippers and answers status, pause and resume.
//!
//! The source ships each entry directly to every region its residency zone
//! allows; receivers never re-ship. Every step is idempotent: entries carry
//! full CRDT states, and a receiver stores its position per source in the
//! same batch as the merged rows.

pub mod frame;
pub mod receive;
pub mod ship;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kv::Node;
use ship::{LinkState, Shipper};

/// Owns one shipper per destination region.
pub struct Replicator {
    node: Arc<Node>,
    links: BTreeMap<String, Arc<LinkState>>,
    /// Last time each region was heard from (acks or frames).
    contact: Arc<std::sync::Mutex<BTreeMap<String, Instant>>>,
    cancel: CancellationToken,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Replicator {
    /// Starts a shipper to each other region that has a configured node.
    pub fn start(cfg: &Config, node: Arc<Node>) -> Arc<Self> {
        let cancel = CancellationToken::new();
        let contact = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let mut links = BTreeMap::new();
        let mut tasks = Vec::new();
        if cfg.replication.enabled {
            for region in cfg.peer_regions() {
                let Some(peer) = region.nodes.first() else { continue };
                let state = Arc::new(LinkState::new(&cfg.region, &region.name));
                let shipper = Shipper::new(
                    node.clone(),
                    state.clone(),
                    peer.addr.clone(),
                    cfg.replication.clone(),
                    contact.clone(),
                );
                tasks.push(tokio::spawn(shipper.run(cancel.child_token())));
                links.insert(region.name.clone(), state);
            }
        }
        let me = Arc::new(Self { node, links, contact, cancel, tasks: std::sync::Mutex::new(tasks) });
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

    pub fn link(&self, destination: &str) -> Option<Arc<LinkState>> {
        self.links.get(destination).cloned()
    }

    /// Highest log position of this node that `region` acknowledged, when
    /// this node ships to it.
    pub fn acked_through(&self, region: &str) -> Option<u64> {
        self.links.get(region).map(|l| l.snapshot(&self.node).acked_seq)
    }

    /// Whether this node ships its log to `region` at all.
    pub fn ships_to(&self, region: &str) -> bool {
        self.links.contains_key(region)
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
            let labels = [("source", s.source.clone()), ("destination", s.destination.clone())];
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
