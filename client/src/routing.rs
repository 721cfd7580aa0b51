//! Where a request goes: pure decisions over the cluster's topology and the
//! client's view of region health, with no IO (docs/architecture.md
//! section 14).
//!
//! [`Topology`] is what a node's `Control.Topology` answer says: regions
//! and their nodes, zones, table policies, the partition count and the
//! holder of every home. From it, [`Topology::placement`] finds a row's home,
//! residency zone and replica regions the way a node does, and [`plan`]
//! orders the regions a call may go to. A row's request is only ever planned
//! to regions of its replica set: residency holds before a byte leaves the
//! client.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use geokv_proto::v1 as pb;

use crate::{Consistency, Locality, ReadConsistency, Row};

pub use geokv_proto::partition::partition_of;

/// A table's placement policy, as the cluster configures it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TablePolicy {
    pub locality: String,
    pub home_region: String,
    pub default_home_region: String,
    pub zone: String,
    pub localities: BTreeMap<String, String>,
    pub default_consistency: String,
}

impl TablePolicy {
    fn strong(&self) -> bool {
        self.default_consistency == "strong"
    }
}

/// One region: its zone and its nodes' client addresses, in partition order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegionNodes {
    pub zone: String,
    /// (node id, client address), sorted by node id.
    pub nodes: Vec<(String, String)>,
}

/// The cluster as one node described it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    pub answered_by: String,
    pub partitions: u32,
    /// Regions in configuration order.
    pub region_order: Vec<String>,
    pub regions: HashMap<String, RegionNodes>,
    pub zones: BTreeMap<String, Vec<String>>,
    pub localities: BTreeMap<String, String>,
    pub tables: HashMap<String, TablePolicy>,
    /// Home key ("region" or "region@zone") to (holder, epoch).
    pub holders: HashMap<String, (String, u64)>,
    /// Home key to the region leading its STRONG group, where known.
    pub strong_leaders: HashMap<String, String>,
}

/// Where a row lives, as the client computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub home_region: String,
    /// "" when the row may live in any region.
    pub zone: String,
    /// The regions allowed to hold the row; never empty.
    pub replicas: Vec<String>,
    /// The region serving the home now (the home itself before any failover).
    pub holder: String,
    /// The region leading the home's STRONG group, when the topology says.
    pub strong_leader: Option<String>,
    pub partition: u32,
    /// The row's table routes every write and read through its STRONG group.
    pub strong_table: bool,
    /// The table's level for a write that names none.
    pub default_write: Consistency,
}

impl Topology {
    pub fn from_proto(t: pb::TopologyResponse) -> Self {
        Self {
            answered_by: t.answered_by_region,
            partitions: t.partitions.max(1),
            region_order: t.regions.iter().map(|r| r.name.clone()).collect(),
            regions: t
                .regions
                .into_iter()
                .map(|r| {
                    let mut nodes: Vec<(String, String)> =
                        r.nodes.into_iter().map(|n| (n.node_id, n.client_addr)).collect();
                    nodes.sort();
                    (r.name, RegionNodes { zone: r.zone, nodes })
                })
                .collect(),
            zones: t.zones.into_iter().map(|z| (z.name, z.regions)).collect(),
            localities: t.localities.into_iter().collect(),
            tables: t
                .tables
                .into_iter()
                .map(|t| {
                    (
                        t.name,
                        TablePolicy {
                            locality: t.locality,
                            home_region: t.home_region,
                            default_home_region: t.default_home_region,
                            zone: t.zone,
                            localities: t.localities.into_iter().collect(),
                            default_consistency: t.default_consistency,
                        },
                    )
                })
                .collect(),
            strong_leaders: t
                .homes
                .iter()
                .filter(|h| !h.strong_leader_region.is_empty())
                .map(|h| (h.home.clone(), h.strong_leader_region.clone()))
                .collect(),
            holders: t.homes.into_iter().map(|h| (h.home, (h.holder, h.epoch))).collect(),
        }
    }

    fn known(&self, region: &str) -> Option<String> {
        self.regions.contains_key(region).then(|| region.to_string())
    }

    /// The row's placement, or None when the client cannot tell (unknown
    /// table, region or locality value, a row without a locality where the
    /// table needs one): the node then answers with the typed error, and no
    /// row is stored.
    pub fn placement(&self, row: &Row, here: Option<&str>) -> Option<Placement> {
        let table = self.tables.get(&row.table)?;
        let home = match (table.locality.as_str(), &row.locality) {
            ("by_table", _) => self.known(&table.home_region)?,
            (_, Locality::HomeRegion(r)) => self.known(r)?,
            (_, Locality::Value(v)) => {
                let mapped = table.localities.get(v).or_else(|| self.localities.get(v))?;
                self.known(mapped)?
            }
            // A global row without a locality is homed where it is written.
            ("global", Locality::TableDefault) => self.known(here?)?,
            (_, Locality::TableDefault) => self.known(&table.default_home_region)?,
        };
        let zone = if table.zone.is_empty() {
            self.zones.iter().find(|(_, regions)| regions.contains(&home)).map(|(name, _)| name.clone())
        } else {
            Some(table.zone.clone())
        };
        let (zone, replicas) = match zone {
            Some(z) => {
                let regions = self.zones.get(&z)?.clone();
                (z, regions)
            }
            None => (String::new(), self.region_order.clone()),
        };
        if !replicas.contains(&home) || replicas.is_empty() {
            return None;
        }
        let key = if zone.is_empty() { home.clone() } else { format!("{home}@{zone}") };
        let holder = self.holders.get(&key).map(|(h, _)| h.clone()).unwrap_or_else(|| home.clone());
        Some(Placement {
            strong_leader: self.strong_leaders.get(&key).cloned(),
            holder,
            home_region: home,
            zone,
            replicas,
            partition: partition_of(self.partitions, &row.table, &row.key),
            strong_table: table.strong(),
            default_write: match table.default_consistency.as_str() {
                "eventual" => Consistency::Eventual,
                "quorum" => Consistency::Quorum,
                "strong" => Consistency::Strong,
                _ => Consistency::Local,
            },
        })
    }

    /// The regions a scan of `table` may be served by: the table's zone
    /// when it names one, else every region.
    pub fn scan_regions(&self, table: &str) -> Vec<String> {
        match self.tables.get(table).map(|t| t.zone.as_str()).filter(|z| !z.is_empty()) {
            Some(z) => self.zones.get(z).cloned().unwrap_or_default(),
            None => self.region_order.clone(),
        }
    }

    /// The client address of the node owning `partition` in `region`
    /// (partition p belongs to the p-th node modulo the region's size).
    pub fn node_for(&self, region: &str, partition: Option<u32>) -> Option<&str> {
        let nodes = &self.regions.get(region)?.nodes;
        if nodes.is_empty() {
            return None;
        }
        let i = partition.map_or(0, |p| p as usize % nodes.len());
        Some(nodes[i].1.as_str())
    }
}

/// What a call does to its row, for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOp {
    Write(Option<Consistency>),
    Read(ReadConsistency),
}

/// The client's view of one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionView {
    /// The circuit breaker is open: recent calls failed and no probe has
    /// succeeded since.
    pub open: bool,
    /// Moving average of the health-ping round trip.
    pub rtt: Option<Duration>,
}

/// Orders `regions` nearest first: healthy before open breakers, the local
/// region first among the healthy, then by measured round trip (unmeasured
/// last), then configuration order.
pub fn by_nearness(
    regions: &[String],
    local: Option<&str>,
    view: &dyn Fn(&str) -> RegionView,
) -> Vec<String> {
    let mut out: Vec<(usize, String)> = regions.iter().cloned().enumerate().collect();
    out.sort_by_key(|(i, r)| {
        let v = view(r);
        (v.open, local != Some(r.as_str()), v.rtt.unwrap_or(Duration::MAX), *i)
    });
    out.into_iter().map(|(_, r)| r).collect()
}

/// The regions a row's call is tried in, in order. Every one is in the
/// row's replica set. Anything on a STRONG table or at STRONG goes to the
/// region leading the home's STRONG group first (the holder when the
/// leader is unknown), LOCAL writes to the home's holder; the rest go to
/// the nearest region that may serve them.
pub fn plan(
    placement: &Placement,
    op: RowOp,
    local: Option<&str>,
    view: &dyn Fn(&str) -> RegionView,
) -> Vec<String> {
    let strong = match op {
        _ if placement.strong_table => true,
        RowOp::Write(level) => level.unwrap_or(placement.default_write) == Consistency::Strong,
        RowOp::Read(level) => level == ReadConsistency::Strong,
    };
    let first = match op {
        _ if strong => Some(placement.strong_leader.as_ref().unwrap_or(&placement.holder)),
        RowOp::Write(level) if level.unwrap_or(placement.default_write) == Consistency::Local => {
            Some(&placement.holder)
        }
        _ => None,
    };
    let mut order = by_nearness(&placement.replicas, local, view);
    if let Some(first) = first {
        if let Some(i) = order.iter().position(|r| r == first) {
            let region = order.remove(i);
            order.insert(0, region);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Topology {
        let region = |name: &str, zone: &str| pb::TopologyRegion {
            name: name.into(),
            zone: zone.into(),
            nodes: vec![
                pb::TopologyNode { node_id: "n2".into(), client_addr: format!("{name}-b:7700") },
                pb::TopologyNode { node_id: "n1".into(), client_addr: format!("{name}-a:7700") },
            ],
        };
        let table = |name: &str, locality: &str, zone: &str, level: &str| pb::TopologyTable {
            name: name.into(),
            locality: locality.into(),
            home_region: if locality == "by_table" { "us-east-1".into() } else { String::new() },
            default_home_region: if name == "default" { "us-east-1".into() } else { String::new() },
            zone: zone.into(),
            localities: Default::default(),
            default_consistency: level.into(),
        };
        Topology::from_proto(pb::TopologyResponse {
            answered_by_region: "us-east-1".into(),
            partitions: 8,
            regions: vec![
                region("us-east-1", ""),
                region("eu-west-1", "eu"),
                region("eu-central-1", "eu"),
                region("ap-southeast-1", ""),
            ],
            zones: vec![pb::TopologyZone {
                name: "eu".into(),
                regions: vec!["eu-west-1".into(), "eu-central-1".into()],
            }],
            localities: [("DE".to_string(), "eu-central-1".to_string()), ("US".into(), "us-east-1".into())]
                .into_iter()
                .collect(),
            tables: vec![
                table("default", "by_row", "", "local"),
                table("users", "by_row", "", "local"),
                table("eu_users", "by_row", "eu", "eventual"),
                table("registers", "by_table", "", "strong"),
            ],
            homes: vec![
                pb::TopologyHome {
                    home: "eu-west-1@eu".into(),
                    holder: "eu-central-1".into(),
                    epoch: 3,
                    strong_leader_region: String::new(),
                },
                pb::TopologyHome {
                    home: "us-east-1".into(),
                    holder: "us-east-1".into(),
                    epoch: 1,
                    strong_leader_region: "eu-west-1".into(),
                },
            ],
            healthy_regions: vec![],
        })
    }

    fn healthy(_: &str) -> RegionView {
        RegionView::default()
    }

    #[test]
    fn placement_follows_locality_zone_and_holder() {
        let t = topo();
        let p = t.placement(&Row::new("users", "k").locality("DE"), None).unwrap();
        assert_eq!((p.home_region.as_str(), p.zone.as_str()), ("eu-central-1", "eu"));
        assert_eq!(p.replicas, ["eu-west-1", "eu-central-1"]);
        assert_eq!(p.holder, "eu-central-1");
        let moved = t.placement(&Row::new("users", "k").home("eu-west-1"), None).unwrap();
        assert_eq!(moved.holder, "eu-central-1", "the failed-over home's holder, not its region");
        let us = t.placement(&Row::new("default", "k"), None).unwrap();
        assert_eq!((us.home_region.as_str(), us.replicas.len()), ("us-east-1", 4));
        let strong = t.placement(&Row::new("registers", "r"), None).unwrap();
        assert!(strong.strong_table);
        assert_eq!(t.placement(&Row::new("users", "k"), None), None, "no locality, no default");
        assert_eq!(t.placement(&Row::new("users", "k").locality("XX"), None), None);
        assert_eq!(t.placement(&Row::new("nope", "k"), None), None);
        assert_eq!(t.placement(&Row::new("eu_users", "k").home("us-east-1"), None), None);
    }

    #[test]
    fn nodes_are_chosen_by_partition_in_id_order() {
        let t = topo();
        assert_eq!(t.node_for("eu-west-1", Some(0)), Some("eu-west-1-a:7700"));
        assert_eq!(t.node_for("eu-west-1", Some(3)), Some("eu-west-1-b:7700"));
        assert_eq!(t.node_for("mars-1", Some(0)), None);
    }

    #[test]
    fn plans_never_leave_the_zone() {
        let t = topo();
        let row = Row::new("eu_users", "k").home("eu-west-1");
        let p = t.placement(&row, None).unwrap();
        for op in [
            RowOp::Write(None),
            RowOp::Write(Some(Consistency::Local)),
            RowOp::Write(Some(Consistency::Quorum)),
            RowOp::Read(ReadConsistency::Local),
            RowOp::Read(ReadConsistency::Strong),
        ] {
            let order = plan(&p, op, Some("us-east-1"), &healthy);
            assert_eq!(order.len(), 2, "{op:?}");
            assert!(order.iter().all(|r| r.starts_with("eu-")), "{op:?}: {order:?}");
        }
    }

    #[test]
    fn local_writes_go_to_the_holder_and_reads_to_the_nearest() {
        let t = topo();
        let p = t.placement(&Row::new("users", "k").home("us-east-1"), None).unwrap();
        let local = Some("eu-west-1");
        assert_eq!(plan(&p, RowOp::Write(None), local, &healthy)[0], "us-east-1");
        assert_eq!(plan(&p, RowOp::Read(ReadConsistency::Local), local, &healthy)[0], "eu-west-1");
        assert_eq!(plan(&p, RowOp::Write(Some(Consistency::Eventual)), local, &healthy)[0], "eu-west-1");
        let strong = t.placement(&Row::new("registers", "r"), None).unwrap();
        assert_eq!(strong.strong_leader.as_deref(), Some("eu-west-1"));
        let from_asia = Some("ap-southeast-1");
        assert_eq!(plan(&strong, RowOp::Read(ReadConsistency::Local), from_asia, &healthy)[0], "eu-west-1");
        assert_eq!(plan(&strong, RowOp::Write(None), from_asia, &healthy)[0], "eu-west-1", "to the leader");
    }

    #[test]
    fn nearness_puts_open_breakers_last_and_measured_before_unmeasured() {
        let regions: Vec<String> =
            ["us-east-1", "eu-west-1", "eu-central-1", "ap-southeast-1"].map(String::from).to_vec();
        let view = |r: &str| match r {
            "eu-west-1" => RegionView { open: true, rtt: Some(Duration::from_millis(1)) },
            "eu-central-1" => RegionView { open: false, rtt: Some(Duration::from_millis(20)) },
            "ap-southeast-1" => RegionView { open: false, rtt: Some(Duration::from_millis(5)) },
            _ => RegionView::default(),
        };
        assert_eq!(
            by_nearness(&regions, Some("eu-west-1"), &view),
            ["ap-southeast-1", "eu-central-1", "us-east-1", "eu-west-1"]
        );
        assert_eq!(by_nearness(&regions, Some("us-east-1"), &view)[0], "us-east-1");
    }
}
