//! The `geokv.v1.Control` service: home leases, consensus groups, planned
//! failover and failback, and the failover-conflict report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use geokv_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::consensus::control::{split_home_key, ControlCommand, ControlReply, HomeLease};
use crate::consensus::{Command, Consensus, Reply, CONTROL_GROUP};
use crate::error::KvError;
use crate::kv::Node;
use crate::replication::Replicator;
use crate::security::grants::Privilege;

/// How long a planned failover or failback may take before the call fails
/// (the handover itself goes on or is cancelled by its holder).
const HANDOVER_WAIT: Duration = Duration::from_secs(20);

#[derive(Clone)]
pub struct ControlService {
    consensus: Arc<Consensus>,
    node: Arc<Node>,
    replicator: Arc<Replicator>,
}

impl ControlService {
    pub fn new(consensus: Arc<Consensus>, node: Arc<Node>, replicator: Arc<Replicator>) -> Self {
        Self { consensus, node, replicator }
    }

    fn home_info(&self, l: &HomeLease) -> pb::HomeInfo {
        let (region, zone) = split_home_key(&l.home);
        let remaining = self.consensus.lease_clock.lease_remaining_ms(l, &self.node.config().region);
        pb::HomeInfo {
            home: l.home.clone(),
            home_region: region.to_string(),
            zone: zone.to_string(),
            holder: l.holder.clone(),
            epoch: l.epoch,
            lease_remaining_ms: remaining,
            draining_to: l.draining_to.clone().unwrap_or_default(),
            reason: l.reason.name().into(),
        }
    }

    /// This node's clock against its peers' (docs/architecture.md section 18).
    fn clock_status(&self) -> pb::ClockStatus {
        let clock = &self.consensus.lease_clock;
        let status = clock.offset_status();
        pb::ClockStatus {
            offset_exceeded: status.exceeded,
            max_offset_ms: clock.max_offset_ms(),
            max_measured_offset_ms: status.max_abs_offset_ms,
            peers: clock
                .offsets()
                .into_iter()
                .map(|(region, offset_ms, uncertainty_ms)| pb::PeerClockOffset {
                    region,
                    offset_ms,
                    uncertainty_ms,
                })
                .collect(),
        }
    }

    /// The regions this node currently sees as healthy.
    fn healthy_regions(&self) -> Vec<String> {
        let cfg = self.node.config();
        cfg.region_names().into_iter().filter(|r| self.replicator.is_healthy(r)).collect()
    }

    /// The region leading `home`'s STRONG group, when this node is one of
    /// its members and knows the leader.
    fn strong_leader_region(&self, home: &str) -> Option<String> {
        let name = crate::consensus::strong_group(home);
        let group = self.consensus.group(&name)?;
        let leader = crate::consensus::metrics_of(&group.raft).current_leader?;
        let members = self.consensus.members(&name)?;
        let actor = &members.iter().find(|m| m.id == leader)?.actor;
        Some(crate::topology::actor_region(actor).to_string())
    }

    /// What a region-aware client routes by (docs/architecture.md section 14):
    /// the configuration's regions, zones and table policies, the partition
    /// layout, and the current holder of every home.
    fn topology_answer(&self) -> pb::TopologyResponse {
        let cfg = self.node.config();
        let topology = self.node.topology();
        let regions = cfg
            .regions
            .iter()
            .map(|r| pb::TopologyRegion {
                name: r.name.clone(),
                zone: cfg.zone_of(&r.name).map(|z| z.name.clone()).unwrap_or_default(),
                nodes: topology
                    .nodes(&r.name)
                    .iter()
                    .map(|n| pb::TopologyNode { node_id: n.id.clone(), client_addr: n.client_addr.clone() })
                    .collect(),
            })
            .collect();
        let tables = cfg
            .tables
            .iter()
            .map(|t| pb::TopologyTable {
                name: t.name.clone(),
                locality: t.locality.as_str().into(),
                home_region: t.home_region.clone().unwrap_or_default(),
                default_home_region: t.default_home_region.clone().unwrap_or_default(),
                zone: t.zone.clone().unwrap_or_default(),
                localities: t.localities.clone().into_iter().collect(),
                default_consistency: t.default_consistency.as_str().into(),
            })
            .collect();
        let state = self.consensus.control_state();
        pb::TopologyResponse {
            answered_by_region: cfg.region.clone(),
            partitions: topology.partitions,
            regions,
            zones: cfg
                .zones
                .iter()
                .map(|z| pb::TopologyZone { name: z.name.clone(), regions: z.regions.clone() })
                .collect(),
            localities: cfg.localities.clone().into_iter().collect(),
            tables,
            homes: state
                .leases
                .values()
                .map(|l| pb::TopologyHome {
                    home: l.home.clone(),
                    holder: l.holder.clone(),
                    epoch: l.epoch,
                    strong_leader_region: self.strong_leader_region(&l.home).unwrap_or_default(),
                })
                .collect(),
            healthy_regions: self.healthy_regions(),
        }
    }

    fn known_region(&self, field: &'static str, region: &str) -> Result<(), KvError> {
        let cfg = self.node.config();
        if region.is_empty() {
            return Err(KvError::MissingField { field });
        }
        if !cfg.regions.iter().any(|r| r.name == region) {
            return Err(KvError::UnknownRegion { region: region.into(), known: cfg.region_names() });
        }
        Ok(())
    }

    async fn propose(&self, cmd: ControlCommand) -> Result<ControlReply, KvError> {
        match self.consensus.propose(CONTROL_GROUP, Command::Control(cmd), 0).await? {
            (Reply::Control(r), _) => Ok(r),
            (other, _) => Err(KvError::Storage(format!("unexpected control reply {other:?}"))),
        }
    }

    /// Starts handovers of `homes` to `to` and waits until they completed.
    async fn hand_over(&self, homes: Vec<HomeLease>, to: &str) -> Result<pb::FailoverResponse, KvError> {
        for l in &homes {
            let cmd =
                ControlCommand::Drain { home: l.home.clone(), epoch: l.epoch, to: Some(to.to_string()) };
            if let ControlReply::Rejected { why } = self.propose(cmd).await? {
                return Err(KvError::HomeUnavailable { home: l.home.clone(), why });
            }
        }
        let mut state = self.consensus.subscribe_control();
        let started = Instant::now();
        loop {
            let done = {
                let s = state.borrow_and_update();
                homes.iter().all(|h| s.leases.get(&h.home).is_some_and(|l| l.holder == to))
            };
            if done {
                break;
            }
            let left = HANDOVER_WAIT.saturating_sub(started.elapsed());
            if left.is_zero() || tokio::time::timeout(left, state.changed()).await.is_err() {
                return Err(KvError::HomeUnavailable {
                    home: homes.iter().map(|h| h.home.clone()).collect::<Vec<_>>().join(","),
                    why: format!("the handover to {to} did not finish within {} s", HANDOVER_WAIT.as_secs()),
                });
            }
        }
        let s = self.consensus.control_state();
        Ok(pb::FailoverResponse {
            homes: homes.iter().filter_map(|h| s.leases.get(&h.home)).map(|l| self.home_info(l)).collect(),
        })
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn region_status(
        &self,
        request: Request<pb::RegionStatusRequest>,
    ) -> Result<Response<pb::RegionStatusResponse>, Status> {
        let (_caller, _access) =
            crate::api::authorize_call(&self.node, &request, "control.region_status", None, &[], None)?;
        let state = self.consensus.control_state();
        let cfg = self.node.config();
        let mut groups = Vec::new();
        let mut names: Vec<String> = vec![CONTROL_GROUP.to_string()];
        for (home, zone) in crate::consensus::strong_homes(cfg) {
            names.push(crate::consensus::strong_group(&crate::consensus::control::home_key(&home, &zone)));
        }
        for name in names {
            let members = self.consensus.members(&name).cloned().unwrap_or_default();
            let actor_of =
                |id: u64| members.iter().find(|m| m.id == id).map(|m| m.actor.clone()).unwrap_or_default();
            let mut info = pb::GroupInfo {
                name: name.clone(),
                members: members.iter().map(|m| m.actor.clone()).collect(),
                preferred_region: name
                    .strip_prefix("strong/")
                    .map(|h| split_home_key(h).0.to_string())
                    .unwrap_or_default(),
                ..Default::default()
            };
            if let Some(g) = self.consensus.group(&name) {
                let m = crate::consensus::metrics_of(&g.raft);
                info.leader = m.current_leader.map(actor_of).unwrap_or_default();
                info.term = m.current_term;
                info.local_member = true;
                info.last_applied = m.last_applied.map_or(0, |l| l.index);
            }
            groups.push(info);
        }
        Ok(Response::new(pb::RegionStatusResponse {
            homes: state.leases.values().map(|l| self.home_info(l)).collect(),
            groups,
            manual_only: state.manual_only,
            recent_failovers: state
                .events
                .iter()
                .map(|e| pb::FailoverEventInfo {
                    home: e.home.clone(),
                    from: e.from.clone(),
                    to: e.to.clone(),
                    epoch: e.epoch,
                    at_ms: e.at_ms,
                    unavailable_ms: e.unavailable_ms,
                    reason: e.reason.name().into(),
                })
                .collect(),
            healthy_regions: self.healthy_regions(),
            clock: Some(self.clock_status()),
        }))
    }

    async fn topology(
        &self,
        request: Request<pb::TopologyRequest>,
    ) -> Result<Response<pb::TopologyResponse>, Status> {
        let (_caller, _access) =
            crate::api::authorize_call(&self.node, &request, "control.topology", None, &[], None)?;
        Ok(Response::new(self.topology_answer()))
    }

    async fn failover(
        &self,
        request: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::FailoverResponse>, Status> {
        let (_caller, _access) = crate::api::authorize_call(
            &self.node,
            &request,
            "control.failover",
            Some(Privilege::Admin),
            &[],
            None,
        )?;
        let req = request.into_inner();
        let result = async {
            self.known_region("from", &req.from)?;
            self.known_region("to", &req.to)?;
            if req.from == req.to {
                return Err(KvError::InvalidField { field: "to", why: "must differ from `from`".into() });
            }
            let cfg = self.node.config();
            let state = self.consensus.control_state();
            let homes: Vec<HomeLease> = state
                .leases
                .values()
                .filter(|l| l.holder == req.from)
                .filter(|l| cfg.zone_regions(split_home_key(&l.home).1).contains(&req.to))
                .cloned()
                .collect();
            if homes.is_empty() {
                return Err(KvError::InvalidField {
                    field: "from",
                    why: format!("{} holds no home that {} may take (residency zones)", req.from, req.to),
                });
            }
            self.hand_over(homes, &req.to).await
        }
        .await;
        Ok(Response::new(result?))
    }

    async fn failback(
        &self,
        request: Request<pb::FailbackRequest>,
    ) -> Result<Response<pb::FailoverResponse>, Status> {
        let (_caller, _access) = crate::api::authorize_call(
            &self.node,
            &request,
            "control.failback",
            Some(Privilege::Admin),
            &[],
            None,
        )?;
        let req = request.into_inner();
        let result = async {
            self.known_region("region", &req.region)?;
            let state = self.consensus.control_state();
            let homes: Vec<HomeLease> = state
                .leases
                .values()
                .filter(|l| split_home_key(&l.home).0 == req.region && l.holder != req.region)
                .cloned()
                .collect();
            if homes.is_empty() {
                return Ok(pb::FailoverResponse {
                    homes: state
                        .leases
                        .values()
                        .filter(|l| split_home_key(&l.home).0 == req.region)
                        .map(|l| self.home_info(l))
                        .collect(),
                });
            }
            self.hand_over(homes, &req.region).await
        }
        .await;
        Ok(Response::new(result?))
    }

    async fn set_auto_failover(
        &self,
        request: Request<pb::SetAutoFailoverRequest>,
    ) -> Result<Response<pb::SetAutoFailoverResponse>, Status> {
        let (_caller, _access) = crate::api::authorize_call(
            &self.node,
            &request,
            "control.set_auto_failover",
            Some(Privilege::Admin),
            &[],
            None,
        )?;
        let enabled = request.into_inner().enabled;
        self.propose(ControlCommand::SetManualOnly { manual_only: !enabled }).await.map_err(Status::from)?;
        Ok(Response::new(pb::SetAutoFailoverResponse { manual_only: !enabled }))
    }

    async fn failover_conflicts(
        &self,
        request: Request<pb::FailoverConflictsRequest>,
    ) -> Result<Response<pb::FailoverConflictsResponse>, Status> {
        let (_caller, _access) = crate::api::authorize_call(
            &self.node,
            &request,
            "control.failover_conflicts",
            Some(Privilege::Admin),
            &[],
            None,
        )?;
        let conflicts = self
            .node
            .failover_conflicts()
            .into_iter()
            .map(|c| pb::FailoverConflict {
                table: c.table,
                key: c.key,
                home: c.home,
                epoch: c.epoch,
                current_epoch: c.current_epoch,
                hlc: c.hlc,
                source: c.source,
            })
            .collect();
        Ok(Response::new(pb::FailoverConflictsResponse { conflicts }))
    }
}
