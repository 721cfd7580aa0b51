//! The simulated cluster: one turmoil host per region, each running the
//! real node (`server::serve_with`: tonic services, replication shippers and
//! receivers, the control plane on openraft, failover and leases) over the
//! in-memory engine, with the committer inline on the host's runtime.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use geokv_server::causality::PhysicalClock;
use geokv_server::config::{
    Config, ConflictPolicy, EngineKind, Level, LocalityMode, PeerConfig, RegionConfig, TableConfig,
    ZoneConfig,
};
use geokv_server::kv::{CommitMode, Node, NodeOptions};
use geokv_server::server::{serve_with, Wiring};
use geokv_server::storage::memory::MemoryEngine;
use geokv_server::storage::Engine;

/// The regions, in config order: the first three vote in the control plane.
pub const REGIONS: [&str; 4] = ["us-east", "eu-west", "eu-central", "ap-south"];
/// The residency zone `eu` and its regions. Rows homed there never leave it.
pub const EU_ZONE: &str = "eu";
pub const EU_REGIONS: [&str; 2] = ["eu-west", "eu-central"];
/// Register table (siblings): blind writes accumulate, so every
/// acknowledged value must survive as a sibling.
pub const TABLE_KV: &str = "kv";
/// PN-counter table.
pub const TABLE_COUNTERS: &str = "counters";
/// Largest clock skew given to a region, in ms (pairwise at most twice
/// this, inside `clock.max_offset_ms`).
pub const SKEW_MS_MAX: i64 = 200;
/// `clock.max_offset_ms` of the simulated cluster.
pub const MAX_OFFSET_MS: u64 = 500;

/// Wall clock of a simulated host: turmoil's logical time plus a fixed skew.
struct SimClock {
    skew_ms: i64,
}

impl PhysicalClock for SimClock {
    fn now_ms(&self) -> u64 {
        // Outside a host (the test thread after the run) there is no
        // logical time; the HLC then runs on its counter.
        let now = turmoil::since_epoch().map(|d| d.as_millis() as u64).unwrap_or(0);
        now.saturating_add_signed(self.skew_ms)
    }
}

/// The regions a row homed in `home` may be stored in.
pub fn zone_regions(home: &str) -> Vec<&'static str> {
    if EU_REGIONS.contains(&home) {
        EU_REGIONS.to_vec()
    } else {
        REGIONS.to_vec()
    }
}

/// The regions of a zone as rows record it ("" for rows homed outside
/// every zone, which may live anywhere).
pub fn regions_of_zone(zone: &str) -> Vec<&'static str> {
    match zone {
        "" => REGIONS.to_vec(),
        EU_ZONE => EU_REGIONS.to_vec(),
        _ => Vec::new(),
    }
}

/// The configuration of `region`'s node.
pub fn config(region: &str) -> Config {
    let mut cfg = Config {
        node_id: "n1".into(),
        region: region.into(),
        data_dir: std::path::PathBuf::from("/nonexistent/geokv-sim"),
        listen: format!("0.0.0.0:{}", crate::net::GRPC_PORT).parse().expect("literal address"),
        // One port serves every service in the simulation.
        listen_peer: format!("0.0.0.0:{}", crate::net::GRPC_PORT).parse().expect("literal address"),
        ..Config::default()
    };
    cfg.regions = REGIONS
        .iter()
        .map(|r| RegionConfig {
            name: r.to_string(),
            nodes: if *r == region {
                Vec::new()
            } else {
                vec![PeerConfig {
                    id: "n1".into(),
                    addr: format!("{r}:{}", crate::net::GRPC_PORT),
                    client_addr: None,
                }]
            },
        })
        .collect();
    cfg.zones = vec![ZoneConfig {
        name: EU_ZONE.into(),
        regions: EU_REGIONS.iter().map(|r| r.to_string()).collect(),
    }];
    let table = |name: &str| TableConfig {
        name: name.into(),
        locality: LocalityMode::ByRow,
        default_consistency: Level::Eventual,
        conflict: ConflictPolicy::Siblings,
        ..TableConfig::default()
    };
    cfg.tables = vec![table(TABLE_KV), table(TABLE_COUNTERS)];
    cfg.storage.engine = EngineKind::Memory;
    cfg.partitions = 8;
    cfg.clock.max_offset_ms = MAX_OFFSET_MS;
    // One election timeout, not a range: openraft draws the timeout from
    // the thread's OS-seeded generator, which a seed cannot fix; a range of
    // one millisecond leaves nothing to draw. Elections still break ties
    // through the seeded network latencies.
    cfg.consensus.election_timeout_min_ms = 900;
    cfg.consensus.election_timeout_max_ms = 901;
    cfg.consensus.failback_after_ms = 3000;
    cfg.consensus.lease_wait_ms = 1500;
    cfg.finish().expect("the simulated cluster's config is valid")
}

/// The nodes as last started on each host, for the checks.
#[derive(Default)]
pub struct Nodes {
    by_region: Mutex<BTreeMap<String, Arc<Node>>>,
}

impl Nodes {
    pub fn get(&self, region: &str) -> Option<Arc<Node>> {
        self.by_region.lock().unwrap_or_else(|p| p.into_inner()).get(region).cloned()
    }

    fn set(&self, region: &str, node: &Arc<Node>) {
        self.by_region.lock().unwrap_or_else(|p| p.into_inner()).insert(region.to_string(), node.clone());
    }
}

/// The software of `region`'s host: a node over `engine`, which outlives
/// crashes (it stands for the disk: every acknowledged write was synced).
pub fn host(
    region: &'static str,
    engine: Arc<MemoryEngine>,
    skew_ms: i64,
    nodes: Arc<Nodes>,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = turmoil::Result>>> {
    move || {
        let engine = engine.clone() as Arc<dyn Engine>;
        let nodes = nodes.clone();
        Box::pin(async move {
            let cfg = config(region);
            let incoming = crate::net::incoming().await?;
            let wiring = Wiring {
                grpc_addr: format!("{region}:{}", crate::net::GRPC_PORT),
                engine,
                clock: Arc::new(SimClock { skew_ms }),
                node: NodeOptions {
                    commit: CommitMode::Task,
                    dialer: crate::net::dialer(),
                    tls: None,
                    lifecycle: None,
                },
                admin: None,
                on_start: Some(Box::new(move |node: &Arc<Node>| nodes.set(region, node))),
                audit: false,
            };
            // One plaintext port serves every service in the simulation.
            serve_with(cfg, wiring, incoming, None, std::future::pending::<()>())
                .await
                .map_err(|e| format!("node {region} stopped: {e:#}"))?;
            Ok(())
        })
    }
}
