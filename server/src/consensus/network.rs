//! Raft messages over gRPC (`geokv.consensus.v1.Consensus/Raft`).
//!
//! Each message carries its group's name, so one connection per peer node
//! serves every group. Peer addresses come from the local config, not from
//! the membership stored in the log: in an emulated WAN each node reaches
//! another through its own proxy link, so the address depends on the caller.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use geokv_proto::consensus as pb;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use pb::consensus_client::ConsensusClient;
use serde::{de::DeserializeOwned, Serialize};
use tonic::transport::Channel;

use super::{NodeId, TypeConfig};

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
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        Connection { peers: self.peers.clone(), group: self.group.clone(), target }
    }
}

/// Sends one group's messages to one node.
pub struct Connection {
    peers: Arc<Peers>,
    group: String,
    target: NodeId,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl Connection {
    async fn call<Req, Resp, E>(
        &self,
        kind: pb::RaftKind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(mut client) = self.peers.client(self.target) else {
            return Err(RPCError::Unreachable(Unreachable::new(&TransportError(format!(
                "node {} has no configured address",
                self.target
            )))));
        };
        let payload = serde_json::to_vec(req)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e.to_string()))))?;
        let mut request =
            tonic::Request::new(pb::RaftRequest { group: self.group.clone(), kind: kind as i32, payload });
        // openraft derives the deadline from the heartbeat interval, which
        // can be shorter than a WAN round trip; a floor keeps far members
        // reachable (a slow reply only delays that member's stream).
        request.set_timeout(option.hard_ttl().max(RPC_TIMEOUT_MIN));
        let reply = match client.raft(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let e = TransportError(format!("{}: {}", status.code(), status.message()));
                // Everything but a refusal of the message itself means the
                // peer cannot be reached now: openraft backs off on
                // Unreachable, while it retries a NetworkError at once.
                return Err(match status.code() {
                    tonic::Code::InvalidArgument | tonic::Code::NotFound => {
                        RPCError::Network(NetworkError::new(&e))
                    }
                    _ => RPCError::Unreachable(Unreachable::new(&e)),
                });
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e.to_string()))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(pb::RaftKind::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(pb::RaftKind::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(pb::RaftKind::Vote, &rpc, &option).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
