//! Nodes inside a region and the partitions they own (docs/architecture.md section 2).
//!
//! Every table's keys are hash-partitioned into `partitions` partitions,
//! cluster-wide: a key's partition is the same in every region. Inside a
//! region, partition `p` belongs to `nodes[p % n]`, the region's nodes
//! sorted by id. The mapping is a pure function of the configured node
//! lists, kept as data ([`Topology`]) with a [`Topology::check`] that
//! rejects impossible layouts at load time, and printed by
//! `geokv region partitions` and `geokv locate`.
//!
//! A row is stored on exactly one node per region it may live in: the
//! owner of its partition there. Every node accepts every request and
//! forwards it to the owner (inside the region) or to the right region.

pub mod policy;

use std::collections::BTreeSet;

use crate::config::Config;

/// A topology problem, naming the field as written in the TOML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("topology `{field}`: {why}")]
pub struct TopologyError {
    pub field: String,
    pub why: String,
}

/// One node of the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRef {
    pub region: String,
    pub id: String,
    /// Address this node uses to reach it (through a proxy in `geokv dev`).
    pub addr: String,
    /// Address clients use to reach it.
    pub client_addr: String,
    /// Whether this is the node that built the topology.
    pub is_self: bool,
}

impl NodeRef {
    /// The node's actor id ("region/node"), stamped on its writes and used
    /// to key replication positions and session tokens.
    pub fn actor(&self) -> String {
        actor(&self.region, &self.id)
    }
}

/// "region/node".
pub fn actor(region: &str, node: &str) -> String {
    format!("{region}/{node}")
}

/// The region part of an actor id ("region/node" -> "region").
pub fn actor_region(actor: &str) -> &str {
    actor.split_once('/').map(|(r, _)| r).unwrap_or(actor)
}

/// A region's nodes, sorted by id: the order that maps partitions to nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionLayout {
    pub name: String,
    pub nodes: Vec<NodeRef>,
}

/// Partitions and the nodes that own them, per region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub partitions: u32,
    pub regions: Vec<RegionLayout>,
    pub self_region: String,
    pub self_id: String,
}

pub use geokv_proto::partition::partition_of;

impl Topology {
    /// The layout the configuration describes. This node is always a member
    /// of its region, listed or not.
    pub fn from_config(cfg: &Config) -> Self {
        let regions = cfg
            .regions
            .iter()
            .map(|r| {
                let mut nodes: Vec<NodeRef> = r
                    .nodes
                    .iter()
                    .map(|n| NodeRef {
                        region: r.name.clone(),
                        id: n.id.clone(),
                        addr: n.addr.clone(),
                        client_addr: n.client_addr.clone().unwrap_or_else(|| n.addr.clone()),
                        is_self: r.name == cfg.region && n.id == cfg.node_id,
                    })
                    .collect();
                if r.name == cfg.region && !nodes.iter().any(|n| n.is_self) {
                    nodes.push(NodeRef {
                        region: r.name.clone(),
                        id: cfg.node_id.clone(),
                        addr: cfg.listen_peer.to_string(),
                        client_addr: cfg.listen.to_string(),
                        is_self: true,
                    });
                }
                nodes.sort_by(|a, b| a.id.cmp(&b.id));
                RegionLayout { name: r.name.clone(), nodes }
            })
            .collect();
        Self {
            partitions: cfg.partitions,
            regions,
            self_region: cfg.region.clone(),
            self_id: cfg.node_id.clone(),
        }
    }

    /// Rejects layouts no node could route by.
    pub fn check(&self) -> Result<(), TopologyError> {
        let bad = |field: String, why: String| Err(TopologyError { field, why });
        if self.partitions == 0 || self.partitions > crate::config::PARTITIONS_MAX {
            return bad("partitions".into(), format!("must be 1..={}", crate::config::PARTITIONS_MAX));
        }
        let mut names = BTreeSet::new();
        for r in &self.regions {
            if !names.insert(r.name.as_str()) {
                return bad(format!("regions.{}", r.name), "region listed twice".into());
            }
            if !r.nodes.windows(2).all(|w| w[0].id < w[1].id) {
                return bad(format!("regions.{}.nodes", r.name), "node ids must be unique".into());
            }
            if r.nodes.len() > self.partitions as usize {
                return bad(
                    format!("regions.{}.nodes", r.name),
                    format!(
                        "{} nodes but only {} partitions: some nodes would own none",
                        r.nodes.len(),
                        self.partitions
                    ),
                );
            }
        }
        let mine = self.region(&self.self_region).map(|r| r.nodes.iter().filter(|n| n.is_self).count());
        if mine != Some(1) {
            return bad("region".into(), "this node must be exactly once in its own region".into());
        }
        Ok(())
    }

    pub fn region(&self, name: &str) -> Option<&RegionLayout> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The nodes of `region` (empty when none is configured).
    pub fn nodes(&self, region: &str) -> &[NodeRef] {
        self.region(region).map(|r| r.nodes.as_slice()).unwrap_or(&[])
    }

    pub fn partition_of(&self, table: &str, key: &[u8]) -> u32 {
        partition_of(self.partitions, table, key)
    }

    /// The node of `region` that owns `partition`.
    pub fn owner(&self, region: &str, partition: u32) -> Option<&NodeRef> {
        let nodes = self.nodes(region);
        if nodes.is_empty() {
            return None;
        }
        nodes.get((partition as usize) % nodes.len())
    }

    /// The owner of `(table, key)` in `region`.
    pub fn owner_of(&self, region: &str, table: &str, key: &[u8]) -> Option<&NodeRef> {
        self.owner(region, self.partition_of(table, key))
    }

    /// Partitions `node` owns in `region`, ascending.
    pub fn owned_by(&self, region: &str, node: &str) -> Vec<u32> {
        (0..self.partitions).filter(|p| self.owner(region, *p).is_some_and(|n| n.id == node)).collect()
    }

    /// Whether this node owns `partition` in its region.
    pub fn is_mine(&self, partition: u32) -> bool {
        self.owner(&self.self_region, partition).is_some_and(|n| n.is_self)
    }

    /// This node's own entry.
    pub fn me(&self) -> Option<&NodeRef> {
        self.nodes(&self.self_region).iter().find(|n| n.is_self)
    }

    /// The other nodes of this node's region.
    pub fn region_peers(&self) -> Vec<&NodeRef> {
        self.nodes(&self.self_region).iter().filter(|n| !n.is_self).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::from_toml(text).unwrap().finish().unwrap()
    }

    const TWO_BY_TWO: &str = r#"
        region = "a"
        node_id = "n2"
        partitions = 8
        [[regions]]
        name = "a"
        nodes = [{ id = "n2", addr = "x:2" }, { id = "n1", addr = "x:1" }]
        [[regions]]
        name = "b"
        nodes = [{ id = "m1", addr = "y:1" }, { id = "m2", addr = "y:2" }]
    "#;

    #[test]
    fn partitions_map_round_robin_over_nodes_sorted_by_id() {
        let t = Topology::from_config(&cfg(TWO_BY_TWO));
        t.check().unwrap();
        let ids: Vec<_> = t.nodes("a").iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["n1", "n2"]);
        assert_eq!(t.owner("a", 0).unwrap().id, "n1");
        assert_eq!(t.owner("a", 5).unwrap().id, "n2");
        assert_eq!(t.owned_by("b", "m2"), vec![1, 3, 5, 7]);
        assert!(t.is_mine(1) && !t.is_mine(2));
        assert_eq!(t.region_peers().len(), 1);
    }

    #[test]
    fn partition_of_is_stable_and_spreads_keys() {
        use geokv_proto::partition::fnv1a;
        // A fixed value: changing the hash would move every stored row.
        assert_eq!(partition_of(64, "default", b"user:1"), partition_of(64, "default", b"user:1"));
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        let mut seen = BTreeSet::new();
        for i in 0..1000 {
            seen.insert(partition_of(16, "t", format!("k{i}").as_bytes()));
        }
        assert_eq!(seen.len(), 16, "1000 keys reach every one of 16 partitions");
        assert_ne!(partition_of(1 << 12, "t1", b"k"), partition_of(1 << 12, "t2", b"k"));
    }

    #[test]
    fn a_node_alone_owns_everything_and_is_added_to_its_region() {
        let t = Topology::from_config(&cfg(""));
        t.check().unwrap();
        assert_eq!(t.owned_by(&t.self_region, "n1").len(), 64);
        assert!(t.me().is_some());
    }

    #[test]
    fn impossible_layouts_are_refused() {
        let mut t = Topology::from_config(&cfg(TWO_BY_TWO));
        t.partitions = 1;
        assert_eq!(t.check().unwrap_err().field, "regions.a.nodes");
        let dup = TWO_BY_TWO.replace("\"m2\"", "\"m1\"");
        let err = Config::from_toml(&dup).unwrap().finish().unwrap_err();
        assert_eq!(err.field, "regions[1].nodes[1].id");
    }

    #[test]
    fn actor_region_splits_actor_ids() {
        assert_eq!(actor_region("eu-west-1/n2"), "eu-west-1");
        assert_eq!(actor_region("eu-west-1"), "eu-west-1");
    }
}
