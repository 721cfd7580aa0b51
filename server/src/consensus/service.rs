//! The `geokv.consensus.v1.Consensus` service: Raft messages in, leader-only
//! requests (proposals, linearizable reads) served or forwarded.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt};
use geokv_proto::consensus as pb;
use openraft::error::RaftError;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendError, VoteResponse,
};
use serde::{de::DeserializeOwned, Serialize};
use tonic::{Request, Response, Status, Streaming};

use super::fence::{Fence, Refusal};
use super::network::{SnapshotChunk, SnapshotMessage, StreamReply};
use super::{Command, Consensus, Raft, TypeConfig, Vote};
use crate::kv::row::Row;
use crate::kv::Node;
use crate::security::authn::Caller;

/// Serves consensus RPCs for every group of this node.
#[derive(Clone)]
pub struct ConsensusService {
    consensus: Arc<Consensus>,
    node: Arc<Node>,
    /// Snapshots being received, one per group (a newer one replaces it).
    incoming: Arc<Mutex<std::collections::BTreeMap<String, Incoming>>>,
}

/// A snapshot whose pieces are arriving.
struct Incoming {
    vote: Vote,
    meta: super::SnapshotMeta,
    total: u64,
    data: Vec<u8>,
}

impl ConsensusService {
    pub fn new(consensus: Arc<Consensus>, node: Arc<Node>) -> Self {
        Self { consensus, node, incoming: Default::default() }
    }

    /// Adds one piece to the group's incoming snapshot; the whole snapshot
    /// once `piece` is its last, else None.
    fn assemble(
        &self,
        group: &str,
        header: SnapshotChunk,
        piece: &[u8],
    ) -> Result<Option<(Vote, super::Snapshot)>, Status> {
        let max = self.node.config().consensus.snapshot_bytes_max;
        if header.total > max {
            return Err(Status::resource_exhausted(format!(
                "a snapshot of `{group}` of {} bytes is over this member's consensus.snapshot_bytes_max ({max})",
                header.total
            )));
        }
        let mut incoming = self.incoming.lock().unwrap_or_else(|p| p.into_inner());
        if header.offset == 0 {
            incoming.remove(group);
        }
        let entry = incoming.entry(group.to_string()).or_insert_with(|| Incoming {
            vote: header.vote,
            meta: header.meta.clone(),
            total: header.total,
            data: Vec::new(),
        });
        let follows = entry.vote == header.vote
            && entry.meta == header.meta
            && entry.total == header.total
            && entry.data.len() as u64 == header.offset
            && header.offset + piece.len() as u64 <= header.total;
        if !follows {
            let have = entry.data.len();
            incoming.remove(group);
            return Err(Status::failed_precondition(format!(
                "a snapshot piece of `{group}` at offset {} does not follow the {have} bytes received: the \
                 transfer starts again",
                header.offset
            )));
        }
        entry.data.extend_from_slice(piece);
        metrics::counter!("geokv_raft_snapshot_chunks_received_total", "group" => group.to_string())
            .increment(1);
        if (entry.data.len() as u64) < entry.total {
            return Ok(None);
        }
        let done = incoming.remove(group).expect("the entry was just updated");
        Ok(Some((
            done.vote,
            super::Snapshot { meta: done.meta, snapshot: super::store::SnapshotData::encoded(done.data) },
        )))
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
fn leader_of(vote: &Vote) -> (u64, super::NodeId) {
    (vote.leader_id().term, vote.leader_id().node_id)
}

/// The fence's answer to a leader below it: its own vote, higher, so the
/// leader steps down.
fn fenced_leader(fence: Option<&Arc<Fence>>, vote: &Vote) -> Option<Vote> {
    let (term, leader) = leader_of(vote);
    match fence.and_then(|f| f.refuses_leader(term, leader)) {
        Some(Refusal::Old(t, n)) => Some(Vote::new(t, n)),
        _ => None,
    }
}

/// Replies of a `RaftStream`.
type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::RaftReply, Status>> + Send + 'static>>;

fn stream_reply(reply: &StreamReply) -> Result<pb::RaftReply, Status> {
    serde_json::to_vec(reply)
        .map(|payload| pb::RaftReply { payload })
        .map_err(|e| Status::internal(e.to_string()))
}

fn parse_append(req: &pb::RaftRequest, group: &str) -> Result<AppendEntriesRequest<TypeConfig>, Status> {
    if req.group != group {
        return Err(Status::invalid_argument(format!(
            "a Raft stream of group `{group}` carries a message of group `{}`",
            req.group
        )));
    }
    if pb::RaftKind::try_from(req.kind) != Ok(pb::RaftKind::AppendEntries) {
        return Err(Status::invalid_argument(format!(
            "a Raft stream carries only appends, not kind {}",
            req.kind
        )));
    }
    parse(&req.payload, "append-entries request")
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
    type RaftStreamStream = ReplyStream;

    /// A leader's pipelined appends (network.rs): every request goes to
    /// openraft as it arrives, and the replies go back in order. The stream
    /// speaks for one leader: a request of another group or leader, or one
    /// that does not parse, ends it; so does the vote fence, whose higher
    /// vote is then the last reply (the leader steps down).
    async fn raft_stream(
        &self,
        request: Request<Streaming<pb::RaftRequest>>,
    ) -> Result<Response<Self::RaftStreamStream>, Status> {
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        let Some(first) = inbound.message().await? else {
            return Ok(Response::new(Box::pin(futures_util::stream::empty())));
        };
        let group = first.group.clone();
        let raft = self.raft(&group)?.clone();
        let head = parse_append(&first, &group)?;
        let leader = *head.vote.leader_id();
        self.check_sender(&caller, Some(leader.node_id))?;
        let fence = self.consensus.fence(&group).cloned();
        if let Some(higher) = fenced_leader(fence.as_ref(), &head.vote) {
            let refused: StreamReply = Ok(Err(StreamAppendError::HigherVote(higher)));
            let one = stream_reply(&refused);
            return Ok(Response::new(Box::pin(futures_util::stream::once(async move { one }))));
        }
        let refused: Arc<Mutex<Option<Vote>>> = Arc::new(Mutex::new(None));
        let record = refused.clone();
        let rest = inbound.scan((), move |_, next| {
            let req = match next {
                Ok(msg) => match parse_append(&msg, &group) {
                    Ok(r) if r.vote.leader_id() == &leader => match fenced_leader(fence.as_ref(), &r.vote) {
                        Some(higher) => {
                            *record.lock().unwrap_or_else(|p| p.into_inner()) = Some(higher);
                            None
                        }
                        None => Some(r),
                    },
                    Ok(r) => {
                        tracing::debug!(group = %group, vote = %r.vote, "a Raft stream changed leader; ending it");
                        None
                    }
                    Err(status) => {
                        tracing::warn!(group = %group, error = %status, "a Raft stream message is refused; ending it");
                        None
                    }
                },
                Err(status) => {
                    tracing::debug!(group = %group, error = %status, "a Raft stream broke");
                    None
                }
            };
            futures_util::future::ready(req)
        });
        let input = futures_util::stream::once(async move { head }).chain(rest);
        let answers = Box::pin(raft.stream_append(input)).map(|r| {
            let r: StreamReply = r.map_err(|fatal| fatal.to_string());
            stream_reply(&r)
        });
        let tail = futures_util::stream::once(async move {
            let higher = refused.lock().unwrap_or_else(|p| p.into_inner()).take();
            higher.map(|h| stream_reply(&Ok(Err(StreamAppendError::HigherVote(h)))))
        })
        .filter_map(|r| async move { r });
        Ok(Response::new(Box::pin(answers.chain(tail))))
    }

    async fn raft(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let raft = self.raft(&req.group)?;
        match pb::RaftKind::try_from(req.kind) {
            Ok(pb::RaftKind::AppendEntries) => {
                let r: AppendEntriesRequest<TypeConfig> = parse(&req.payload, "append-entries request")?;
                self.check_sender(&caller, Some(r.vote.leader_id().node_id))?;
                if let Some(higher) = fenced_leader(self.consensus.fence(&req.group), &r.vote) {
                    let higher = AppendEntriesResponse::<TypeConfig>::HigherVote(higher);
                    return reply(&Ok::<_, RaftError<TypeConfig>>(higher));
                }
                reply(&raft.append_entries(r).await)
            }
            Ok(kind @ (pb::RaftKind::Vote | pb::RaftKind::PreVote)) => {
                let r: openraft::raft::VoteRequest<TypeConfig> = parse(&req.payload, "vote request")?;
                self.check_sender(&caller, Some(r.vote.leader_id().node_id))?;
                // A member whose state is gone votes in no old term
                // (consensus::fence), and answers no pre-vote either.
                let (term, candidate) = leader_of(&r.vote);
                match self.consensus.fence(&req.group).and_then(|f| f.refuses_vote(term, candidate)) {
                    Some(Refusal::Pending) => Err(Status::unavailable(format!(
                        "this member of `{}` lost its state and is still learning the group's terms: it does not vote yet",
                        req.group
                    ))),
                    Some(Refusal::Old(t, n)) => {
                        let refused = VoteResponse::<TypeConfig>::new(Vote::new(t, n), None, false);
                        reply(&Ok::<_, RaftError<TypeConfig>>(refused))
                    }
                    None if kind == pb::RaftKind::PreVote => reply(&raft.pre_vote(r).await),
                    None => reply(&raft.vote(r).await),
                }
            }
            Ok(pb::RaftKind::State) => {
                let initialized = raft.is_initialized().await.map_err(|e| Status::internal(e.to_string()))?;
                let vote = leader_of(&super::metrics_of(raft).vote);
                let fence = self.consensus.fence(&req.group).map(|f| f.leader_id()).unwrap_or((0, 0));
                let (term, voted_for) = vote.max(fence);
                // A fenced member not yet caught up has no log, but the group
                // exists: it answers as initialized, with its fence.
                let initialized = initialized || fence.0 > 0;
                reply(&super::fence::MemberState { initialized, term, voted_for })
            }
            Ok(pb::RaftKind::InstallSnapshot) => {
                let r: SnapshotMessage = parse(&req.payload, "install-snapshot request")?;
                self.check_sender(&caller, Some(r.vote.leader_id().node_id))?;
                if let Some(higher) = fenced_leader(self.consensus.fence(&req.group), &r.vote) {
                    return reply(&Ok::<_, RaftError<TypeConfig>>(SnapshotResponse::<TypeConfig>::new(
                        higher,
                    )));
                }
                let snapshot =
                    super::Snapshot { meta: r.meta, snapshot: super::store::SnapshotData::encoded(r.data) };
                reply(
                    &raft
                        .install_full_snapshot(r.vote, snapshot)
                        .await
                        .map_err(RaftError::<TypeConfig>::Fatal),
                )
            }
            Ok(pb::RaftKind::InstallSnapshotChunk) => {
                let (header, piece) = SnapshotChunk::decode(&req.payload).map_err(|why| {
                    Status::invalid_argument(format!("install-snapshot-chunk request does not parse: {why}"))
                })?;
                self.check_sender(&caller, Some(header.vote.leader_id().node_id))?;
                if let Some(higher) = fenced_leader(self.consensus.fence(&req.group), &header.vote) {
                    return reply(&Ok::<_, RaftError<TypeConfig>>(SnapshotResponse::<TypeConfig>::new(
                        higher,
                    )));
                }
                match self.assemble(&req.group, header, piece)? {
                    None => {
                        let vote = super::metrics_of(raft).vote;
                        reply(&Ok::<_, RaftError<TypeConfig>>(SnapshotResponse::<TypeConfig>::new(vote)))
                    }
                    Some((vote, snapshot)) => reply(
                        &raft
                            .install_full_snapshot(vote, snapshot)
                            .await
                            .map_err(RaftError::<TypeConfig>::Fatal),
                    ),
                }
            }
            Ok(pb::RaftKind::TransferLeader) => {
                let r: openraft::raft::TransferLeaderRequest<TypeConfig> =
                    parse(&req.payload, "transfer-leader request")?;
                self.check_sender(&caller, Some(r.from_leader().leader_id().node_id))?;
                if self.consensus.fence(&req.group).is_some_and(|f| f.pending()) {
                    return Err(Status::unavailable(format!(
                        "this member of `{}` lost its state and is still learning the group's terms",
                        req.group
                    )));
                }
                reply(&raft.handle_transfer_leader(r).await.map_err(RaftError::<TypeConfig>::Fatal))
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
