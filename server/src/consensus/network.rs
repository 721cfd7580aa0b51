//! Raft messages over gRPC (`geokv.consensus.v1.Consensus/Raft`).
//!
//! Each message carries its group's name, so one connection per peer node
//! serves every group. Peer addresses come from the local config, not from
//! the membership stored in the log: in an emulated WAN each node reaches
//! another through its own proxy link, so the address depends on the caller.
//!
//! A leader's appends to a follower go over one `RaftStream` call per
//! replication session (openraft's `stream_append`): requests are written
//! as openraft produces them, without waiting for the previous reply, and
//! the follower answers them in order over the same HTTP/2 stream, so
//! several appends are in flight per follower. Heartbeats, votes,
//! pre-votes, snapshots and leader transfers are single `Raft` calls; the
//! heartbeat has its own connection object so that it never queues behind
//! a replication stream.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use geokv_proto::consensus as pb;
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, RaftNetworkV2};
use pb::consensus_client::ConsensusClient;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tonic::transport::Channel;

use super::{NodeId, Snapshot, SnapshotMeta, TypeConfig, Vote};

/// Shortest deadline of one Raft message.
const RPC_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// gRPC clients of the other nodes, by Raft node id, connected lazily.
pub struct Peers {
    addrs: BTreeMap<NodeId, String>,
    clients: Mutex<BTreeMap<NodeId, ConsensusClient<Channel>>>,
    /// How channels connect (real TCP outside simulations, TLS when secure).
    channels: crate::transport::Channels,
}

impl Peers {
    pub fn new(addrs: BTreeMap<NodeId, String>) -> Self {
        Self::with_channels(
            addrs,
            crate::transport::Channels::plaintext(crate::transport::ChannelSettings::PEER),
        )
    }

    /// Peers reached through `channels`.
    pub fn with_channels(addrs: BTreeMap<NodeId, String>, channels: crate::transport::Channels) -> Self {
        Self { addrs, clients: Mutex::new(BTreeMap::new()), channels }
    }

    /// A client of node `id`, or None when the node is not configured.
    pub fn client(&self, id: NodeId) -> Option<ConsensusClient<Channel>> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&id) {
            return Some(c.clone());
        }
        let addr = self.addrs.get(&id)?;
        let channel = match self.channels.lazy(addr, None) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "bad consensus peer address");
                return None;
            }
        };
        let client = ConsensusClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        clients.insert(id, client.clone());
        Some(client)
    }
}

impl Peers {
    /// Member `id`'s state of `group` (a `STATE` message).
    pub async fn member_state(&self, id: NodeId, group: &str) -> Result<super::fence::MemberState, String> {
        let mut client = self.client(id).ok_or_else(|| format!("node {id} has no configured address"))?;
        let mut request = tonic::Request::new(pb::RaftRequest {
            group: group.to_string(),
            kind: pb::RaftKind::State as i32,
            payload: Vec::new(),
        });
        request.set_timeout(RPC_TIMEOUT_MIN);
        let reply = client.raft(request).await.map_err(|s| format!("{}: {}", s.code(), s.message()))?;
        serde_json::from_slice(&reply.into_inner().payload).map_err(|e| e.to_string())
    }
}

/// Creates a connection per (group, target).
#[derive(Clone)]
pub struct NetworkFactory {
    pub peers: Arc<Peers>,
    pub group: String,
    /// This node's Raft id (named in timeout errors).
    pub me: NodeId,
    /// Largest piece of a snapshot per message (`consensus.snapshot_chunk_bytes`).
    pub chunk_bytes: u64,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        Connection {
            peers: self.peers.clone(),
            group: self.group.clone(),
            me: self.me,
            target,
            heartbeat: false,
            chunk_bytes: self.chunk_bytes.max(1),
        }
    }

    async fn new_heartbeat_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        Connection {
            peers: self.peers.clone(),
            group: self.group.clone(),
            me: self.me,
            target,
            heartbeat: true,
            chunk_bytes: self.chunk_bytes.max(1),
        }
    }
}

/// Sends one group's messages to one node.
pub struct Connection {
    peers: Arc<Peers>,
    group: String,
    me: NodeId,
    target: NodeId,
    /// The leader's heartbeat connection: its `stream_append` carries one
    /// empty append, sent as a single `Raft` call.
    heartbeat: bool,
    chunk_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

/// A whole snapshot in one `INSTALL_SNAPSHOT` message, as builds before
/// snapshot chunks sent it (still accepted).
#[derive(Serialize, Deserialize)]
pub struct SnapshotMessage {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub data: Vec<u8>,
}

/// The header of one `INSTALL_SNAPSHOT_CHUNK` message: the piece of the
/// snapshot (`meta`, `total` bytes in all) that starts at `offset`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub offset: u64,
    pub total: u64,
}

impl SnapshotChunk {
    /// The message: the header's length (u32, big-endian), the header as
    /// JSON, then the piece.
    pub fn encode(&self, piece: &[u8]) -> Result<Vec<u8>, String> {
        let header = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        let len = u32::try_from(header.len()).map_err(|_| "snapshot chunk header over 4 GiB".to_string())?;
        let mut out = Vec::with_capacity(4 + header.len() + piece.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(piece);
        Ok(out)
    }

    /// The header and the piece of a message.
    pub fn decode(message: &[u8]) -> Result<(Self, &[u8]), String> {
        let (len, rest) =
            message.split_first_chunk::<4>().ok_or("snapshot chunk shorter than its header length")?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return Err(format!("snapshot chunk header of {len} bytes cut short at {}", rest.len()));
        }
        let (header, piece) = rest.split_at(len);
        let header = serde_json::from_slice(header).map_err(|e| format!("snapshot chunk header: {e}"))?;
        Ok((header, piece))
    }
}

/// One reply on a `RaftStream`: an append's outcome, or why the member's
/// group could not take it (it stopped).
pub type StreamReply = Result<StreamAppendResult<TypeConfig>, String>;

fn unreachable(why: impl ToString) -> Unreachable<TypeConfig> {
    Unreachable::new(&TransportError(why.to_string()))
}

/// How a failed gRPC call is reported to openraft: a refusal of the
/// message itself is a network error (retried at once); anything else
/// means the peer cannot be reached now (backed off).
fn status_error(status: &tonic::Status) -> RPCError<TypeConfig> {
    let e = TransportError(format!("{}: {}", status.code(), status.message()));
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound => RPCError::Network(NetworkError::new(&e)),
        _ => RPCError::Unreachable(Unreachable::new(&e)),
    }
}

impl Connection {
    fn client(&self) -> Result<ConsensusClient<Channel>, Unreachable<TypeConfig>> {
        self.peers
            .client(self.target)
            .ok_or_else(|| unreachable(format!("node {} has no configured address", self.target)))
    }

    fn timeout(&self, action: RPCTypes, after: Duration) -> Timeout<TypeConfig> {
        Timeout { action, id: self.me, target: self.target, timeout: after }
    }

    /// One `Raft` call: `req` as JSON, the reply as JSON of
    /// `Result<Resp, RaftError>`. A member whose group stopped answers with
    /// a fatal error, reported as unreachable.
    async fn call<Req, Resp>(
        &self,
        kind: pb::RaftKind,
        req: &Req,
        deadline: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let payload = serde_json::to_vec(req)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e.to_string()))))?;
        self.call_raw(kind, payload, deadline).await
    }

    /// One `Raft` call with an encoded payload; the reply as JSON of
    /// `Result<Resp, RaftError>`.
    async fn call_raw<Resp: DeserializeOwned>(
        &self,
        kind: pb::RaftKind,
        payload: Vec<u8>,
        deadline: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let mut client = self.client()?;
        let mut request =
            tonic::Request::new(pb::RaftRequest { group: self.group.clone(), kind: kind as i32, payload });
        request.set_timeout(deadline);
        let reply = client.raft(request).await.map_err(|s| status_error(&s))?.into_inner();
        let result: Result<Resp, RaftError<TypeConfig>> = serde_json::from_slice(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e.to_string()))))?;
        result.map_err(|e| RPCError::Unreachable(unreachable(format!("member {}: {e}", self.target))))
    }

    /// A snapshot in pieces of at most `chunk_bytes`, one message each,
    /// in order; the member installs it on the last. A member that answers
    /// a piece with a higher vote ends the transfer (the leader steps down).
    async fn send_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot,
        deadline: Duration,
    ) -> Result<SnapshotResponse<TypeConfig>, RPCError<TypeConfig>> {
        // A member's own snapshot is a view of its store, read and framed
        // here, off the state machine's worker (decision 035), one piece
        // ahead of the sending (decision 038): the whole state is never
        // held in memory.
        let encode_error = |e: io::Error| {
            RPCError::Network(NetworkError::new(&TransportError(format!("snapshot encode: {e}"))))
        };
        let mut pieces = snapshot.snapshot.pieces().await.map_err(encode_error)?;
        let total = pieces.total();
        let piece_max = usize::try_from(self.chunk_bytes).unwrap_or(usize::MAX);
        let mut offset = 0u64;
        loop {
            let piece = pieces.next(piece_max).await.map_err(encode_error)?;
            let end = offset + piece.len() as u64;
            let header = SnapshotChunk { vote, meta: snapshot.meta.clone(), offset, total };
            let payload = header
                .encode(&piece)
                .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e))))?;
            drop(piece);
            let reply: SnapshotResponse<TypeConfig> =
                self.call_raw(pb::RaftKind::InstallSnapshotChunk, payload, deadline).await?;
            if end >= total || reply.vote > vote {
                return Ok(reply);
            }
            offset = end;
        }
    }

    /// openraft derives deadlines from the heartbeat interval, which can be
    /// shorter than a WAN round trip; a floor keeps far members reachable
    /// (a slow reply only delays that member's stream).
    fn deadline(option: &RPCOption) -> Duration {
        option.hard_ttl().max(RPC_TIMEOUT_MIN)
    }

    /// The pipelined append stream (see the module documentation).
    async fn open_stream<S>(
        &mut self,
        input: S,
        option: RPCOption,
    ) -> Result<
        BoxStream<'static, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
        RPCError<TypeConfig>,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        // openraft sleeps its replication backoff inside the request
        // stream, before it yields a request. A call that fails before it
        // reads its input (a peer that refuses connections, or is cut off)
        // would never reach that sleep, and the replication task would
        // retry at once, forever: so take the first request before the call.
        let mut input = input;
        let Some(first) = input.next().await else {
            return Ok(Box::pin(futures_util::stream::empty()));
        };
        let input = futures_util::stream::iter([first]).chain(input);
        let mut client = self.client()?;
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let group = self.group.clone();
        // A request that cannot be encoded ends the stream; the replies
        // received so far still count, and openraft starts a new session.
        let outbound = input.scan((), move |_, req| {
            let msg = match serde_json::to_vec(&req) {
                Ok(payload) => {
                    counter.fetch_add(1, Ordering::AcqRel);
                    Some(pb::RaftRequest {
                        group: group.clone(),
                        kind: pb::RaftKind::AppendEntries as i32,
                        payload,
                    })
                }
                Err(e) => {
                    tracing::error!(error = %e, "an append does not encode; ending the replication stream");
                    None
                }
            };
            futures_util::future::ready(msg)
        });
        let wait = Self::deadline(&RPCOption::new(option.soft_ttl()));
        let replies =
            match tokio::time::timeout(wait, client.raft_stream(tonic::Request::new(outbound))).await {
                Err(_) => return Err(RPCError::Timeout(self.timeout(RPCTypes::AppendEntries, wait))),
                Ok(Err(status)) => return Err(status_error(&status)),
                Ok(Ok(r)) => r.into_inner(),
            };
        let timeout = self.timeout(RPCTypes::AppendEntries, wait);
        let target = self.target;
        let state = ReplyState { replies, sent, received: 0, wait, timeout, target };
        let out = futures_util::stream::unfold(Some(state), |state| async move {
            let mut st = state?;
            let (item, more) = st.next().await?;
            Some((item, if more { Some(st) } else { None }))
        });
        Ok(Box::pin(out))
    }
}

/// The reading side of a `RaftStream`.
struct ReplyState {
    replies: tonic::Streaming<pb::RaftReply>,
    /// Requests written so far, and replies read: while some are
    /// unanswered, a reply must come within `wait`.
    sent: Arc<AtomicU64>,
    received: u64,
    wait: Duration,
    timeout: Timeout<TypeConfig>,
    target: NodeId,
}

impl ReplyState {
    /// The next reply, and whether the stream goes on after it; None at
    /// the end of the stream.
    async fn next(&mut self) -> Option<(Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>, bool)> {
        loop {
            match tokio::time::timeout(self.wait, self.replies.message()).await {
                Err(_) if self.sent.load(Ordering::Acquire) > self.received => {
                    return Some((Err(RPCError::Timeout(self.timeout.clone())), false));
                }
                // Idle: nothing is waiting for an answer.
                Err(_) => continue,
                Ok(Ok(None)) => return None,
                Ok(Err(status)) => return Some((Err(status_error(&status)), false)),
                Ok(Ok(Some(reply))) => {
                    self.received += 1;
                    let parsed: StreamReply = match serde_json::from_slice(&reply.payload) {
                        Ok(p) => p,
                        Err(e) => {
                            let e = TransportError(format!("append reply does not parse: {e}"));
                            return Some((Err(RPCError::Network(NetworkError::new(&e))), false));
                        }
                    };
                    return Some(match parsed {
                        Ok(result) => {
                            let more = result.is_ok();
                            (Ok(result), more)
                        }
                        Err(why) => (
                            Err(RPCError::Unreachable(unreachable(format!("member {}: {why}", self.target)))),
                            false,
                        ),
                    });
                }
            }
        }
    }
}

impl RaftNetworkV2<TypeConfig> for Connection {
    type SnapshotData = super::store::SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(pb::RaftKind::AppendEntries, &rpc, Self::deadline(&option)).await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        if self.heartbeat {
            return openraft::network::stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let out: BoxStream<'s, _> = self.open_stream(input, option).await?;
            Ok(out)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(pb::RaftKind::Vote, &rpc, Self::deadline(&option)).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(pb::RaftKind::PreVote, &rpc, Self::deadline(&option)).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let deadline = Self::deadline(&option);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = self.send_snapshot(vote, snapshot, deadline) => match sent {
                Ok(r) => Ok(r),
                Err(RPCError::Timeout(t)) => Err(StreamingError::Timeout(t)),
                Err(RPCError::Network(e)) => Err(StreamingError::Network(e)),
                Err(RPCError::Unreachable(e)) => Err(StreamingError::Unreachable(e)),
                Err(RPCError::RemoteError(e)) => Err(StreamingError::Unreachable(unreachable(e))),
            },
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(pb::RaftKind::TransferLeader, &req, Self::deadline(&option)).await
    }
}
