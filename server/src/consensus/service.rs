//! The `geokv.consensus.v1.Consensus` service: Raft messages in, leader-only
//! requests (proposals, linearizable reads) served or forwarded.

use std::sync::Arc;

use geokv_proto::consensus as pb;
use serde::{de::DeserializeOwned, Serialize};
use tonic::{Request, Response, Status};

use super::{Command, Consensus, Raft};
use crate::kv::row::Row;
use crate::kv::Node;
use crate::security::authn::Caller;

/// Serves consensus RPCs for every group of this node.
#[derive(Clone)]
pub struct ConsensusService {
    consensus: Arc<Consensus>,
    node: Arc<Node>,
}

impl ConsensusService {
    pub fn new(consensus: Arc<Consensus>, node: Arc<Node>) -> Self {
        Self { consensus, node }
    }

    /// A Raft message speaks for the member whose certificate sent it: the
    /// leader or candidate in its vote must be that node's member id.
    fn check_sender(&self, caller: &Caller, member: Option<super::NodeId>) -> Result<(), Status> {
        let security = self.node.security();
        if !security.is_secure() || !crate::security::authn::claims_checked() {
            return Ok(());
        }
        let Some(node) = caller.node() else {
            return security.check_claim(caller, "", None, "a Raft message");
        };
        if member != Some(super::raft_id(&node.actor())) {
            geokv_net::incoming::count_refused("peer", "claim_mismatch");
            return Err(crate::error::KvError::PermissionDenied {
                principal: node.actor(),
                missing_grant: "node".into(),
                why: format!("a Raft message from `{}` claims another member ({member:?})", node.actor()),
            }
            .into());
        }
        Ok(())
    }

    fn raft(&self, group: &str) -> Result<&Raft, Status> {
        self.consensus
            .group(group)
            .map(|g| &g.raft)
            .ok_or_else(|| Status::not_found(format!("this node is not a member of group `{group}`")))
    }
}

/// A vote's leader id as (term, candidate), as openraft orders them.
fn leader_of(vote: &openraft::Vote<super::NodeId>) -> (u64, super::NodeId) {
    (vote.leader_id().get_term(), vote.leader_id().voted_for().unwrap_or(0))
}

fn parse<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Status> {
    serde_json::from_slice(bytes).map_err(|e| Status::invalid_argument(format!("{what} does not parse: {e}")))
}

fn reply<T: Serialize>(value: &T) -> Result<Response<pb::RaftReply>, Status> {
    serde_json::to_vec(value)
        .map(|payload| Response::new(pb::RaftReply { payload }))
        .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl pb::consensus_server::Consensus for ConsensusService {
    async fn raft(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let raft = self.raft(&req.group)?;
        match pb::RaftKind::try_from(req.kind) {
            Ok(pb::RaftKind::AppendEntries) => {
                let r: openraft::raft::AppendEntriesRequest<super::TypeConfig> =
                    parse(&req.payload, "append-entries request")?;
                self.check_sender(&caller, r.vote.leader_id().voted_for())?;
                let (term, leader) = leader_of(&r.vote);
                if let Some(super::fence::Refusal::Old(t, n)) =
                    self.consensus.fence(&req.group).and_then(|f| f.refuses_leader(term, leader))
                {
                    let higher = openraft::raft::AppendEntriesResponse::HigherVote(openraft::Vote::new(t, n));
                    return reply(&Ok::<_, openraft::error::RaftError<super::NodeId>>(higher));
                }
                reply(&raft.append_entries(r).await)
            }
            Ok(pb::RaftKind::Vote) => {
                let r: openraft::raft::VoteRequest<super::NodeId> = parse(&req.payload, "vote request")?;
                self.check_sender(&caller, r.vote.leader_id().voted_for())?;
                // A member whose state is gone votes in no old term
                // (consensus::fence).
                let (term, candidate) = leader_of(&r.vote);
                match self.consensus.fence(&req.group).and_then(|f| f.refuses_vote(term, candidate)) {
                    Some(super::fence::Refusal::Pending) => Err(Status::unavailable(format!(
                        "this member of `{}` lost its state and is still learning the group's terms: it does not vote yet",
                        req.group
                    ))),
                    Some(super::fence::Refusal::Old(t, n)) => {
                        let refused = openraft::raft::VoteResponse::new(openraft::Vote::new(t, n), None, false);
                        reply(&Ok::<_, openraft::error::RaftError<super::NodeId>>(refused))
                    }
                    None => reply(&raft.vote(r).await),
                }
            }
            Ok(pb::RaftKind::State) => {
                let initialized = raft.is_initialized().await.map_err(|e| Status::internal(e.to_string()))?;
                let vote = leader_of(&raft.metrics().borrow().vote);
                let fence = self.consensus.fence(&req.group).map(|f| f.leader_id()).unwrap_or((0, 0));
                let (term, voted_for) = vote.max(fence);
                // A fenced member not yet caught up has no log, but the group
                // exists: it answers as initialized, with its fence.
                let initialized = initialized || fence.0 > 0;
                reply(&super::fence::MemberState { initialized, term, voted_for })
            }
            Ok(pb::RaftKind::InstallSnapshot) => {
                let r: openraft::raft::InstallSnapshotRequest<super::TypeConfig> =
                    parse(&req.payload, "install-snapshot request")?;
                self.check_sender(&caller, r.vote.leader_id().voted_for())?;
                let (term, leader) = leader_of(&r.vote);
                if let Some(super::fence::Refusal::Old(t, n)) =
                    self.consensus.fence(&req.group).and_then(|f| f.refuses_leader(term, leader))
                {
                    let higher = openraft::raft::InstallSnapshotResponse { vote: openraft::Vote::new(t, n) };
                    return reply(&Ok::<
                        _,
                        openraft::error::RaftError<super::NodeId, openraft::error::InstallSnapshotError>,
                    >(higher));
                }
                reply(&raft.install_snapshot(r).await)
            }
            _ => Err(Status::invalid_argument(format!("unknown raft message kind {}", req.kind))),
        }
    }

    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        let req = request.into_inner();
        let cmd: Command = parse(&req.command, "command")?;
        let (reply, index) = self.consensus.propose(&req.group, cmd, req.hops).await.map_err(Status::from)?;
        let reply = serde_json::to_vec(&reply).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ProposeReply { reply, index }))
    }

    async fn read(&self, request: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        let req = request.into_inner();
        // The key is a state-machine key `r/<table>\0<key>`.
        let rest =
            req.key.strip_prefix(b"r/").ok_or_else(|| Status::invalid_argument("key is not a row key"))?;
        let split =
            rest.iter().position(|b| *b == 0).ok_or_else(|| Status::invalid_argument("key has no table"))?;
        let table = String::from_utf8_lossy(&rest[..split]).into_owned();
        let value = self
            .consensus
            .read(&req.group, &table, &rest[split + 1..], req.hops)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(match value {
            Some(v) => pb::ReadReply {
                found: true,
                value: serde_json::to_vec(&v).map_err(|e| Status::internal(e.to_string()))?,
            },
            None => pb::ReadReply { found: false, value: Vec::new() },
        }))
    }

    async fn replica_write(
        &self,
        request: Request<pb::ReplicaWriteRequest>,
    ) -> Result<Response<pb::ReplicaWriteReply>, Status> {
        let req = request.into_inner();
        let row = Row::open(&req.row, || format!("{}/{}", req.table, String::from_utf8_lossy(&req.key)))
            .map_err(Status::from)?;
        self.node.merge_rows(vec![(req.table, req.key, row)]).await.map_err(Status::from)?;
        Ok(Response::new(pb::ReplicaWriteReply {}))
    }

    async fn replica_read(
        &self,
        request: Request<pb::ReplicaReadRequest>,
    ) -> Result<Response<pb::ReplicaReadReply>, Status> {
        let req = request.into_inner();
        let row = self.node.stored_row(&req.table, &req.key).map_err(Status::from)?;
        Ok(Response::new(match row {
            Some(r) => pb::ReplicaReadReply { found: true, row: r.seal() },
            None => pb::ReplicaReadReply { found: false, row: Vec::new() },
        }))
    }

    async fn control_state(
        &self,
        _request: Request<pb::ControlStateRequest>,
    ) -> Result<Response<pb::ControlStateReply>, Status> {
        let state = serde_json::to_vec(&self.consensus.control_state())
            .map_err(|e| Status::internal(e.to_string()))?;
        let held = self
            .consensus
            .lease_clock
            .held_remaining()
            .into_iter()
            .map(|(home, epoch, remaining_ms)| pb::HeldLease { home, epoch, remaining_ms })
            .collect();
        Ok(Response::new(pb::ControlStateReply { state, wall_ms: self.node.hlc().wall_ms(), held }))
    }
}
