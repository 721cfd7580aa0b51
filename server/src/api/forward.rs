//! Channels to the other nodes, and the hops of a request a node forwards
//! on behalf of its caller (docs/architecture.md section 2). Where a request
//! goes is decided in `kv::route`; this module carries it there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use geokv_proto::v1 as pb;
use pb::admin_client::AdminClient;
use tonic::transport::Channel;
use tonic::Request;

use crate::error::KvError;
/// Metadata a node adds (its actor id, "region/node") to a request it
/// forwards. A request is forwarded at most once inside a region and at
/// most once across regions, so it never loops: entry node -> owner in the
/// entry region -> owner in the row's region. Accepted only on the peer
/// port, from the node named last (`security::authn`).
pub use crate::security::authn::FORWARDED_HEADER;
use crate::security::authn::{Access, Caller, PRINCIPAL_HEADER};
use crate::topology::{actor_region, NodeRef, Topology};

/// Deadline of a forwarded request.
pub(super) const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Channels to every other node of the cluster (by actor id), connected lazily.
#[derive(Clone, Default)]
pub struct Peers {
    channels: BTreeMap<String, Channel>,
}

impl Peers {
    pub fn from_topology(topology: &Topology) -> Self {
        let channels = crate::transport::Channels::plaintext(crate::transport::ChannelSettings::PEER);
        Self::from_topology_with(topology, &channels)
    }

    /// Channels to every peer's peer port, made by `channels`; each must
    /// answer with the certificate of the node it is configured as.
    pub fn from_topology_with(topology: &Topology, channels: &crate::transport::Channels) -> Self {
        let mut out = BTreeMap::new();
        for node in topology.regions.iter().flat_map(|r| r.nodes.iter()).filter(|n| !n.is_self) {
            let expect =
                crate::transport::Expect { region: node.region.clone(), node: Some(node.id.clone()) };
            match channels.lazy(&node.addr, Some(expect)) {
                Ok(channel) => {
                    out.insert(node.actor(), channel);
                }
                Err(e) => tracing::warn!(node = %node.actor(), error = %e, "bad peer address"),
            }
        }
        Self { channels: out }
    }

    pub(super) fn channel(&self, node: &NodeRef) -> Result<Channel, KvError> {
        self.channels.get(&node.actor()).cloned().ok_or_else(|| KvError::RegionUnreachable {
            region: node.region.clone(),
            why: format!("no connection to node `{}`", node.actor()),
        })
    }

    pub(super) fn admin(&self, node: &NodeRef) -> Result<AdminClient<Channel>, KvError> {
        Ok(AdminClient::new(self.channel(node)?).max_decoding_message_size(64 << 20))
    }

    /// An Admin client to `node`'s peer port (the dashboard's cluster view).
    pub(crate) fn admin_client(&self, node: &NodeRef) -> Result<AdminClient<Channel>, KvError> {
        self.admin(node)
    }
}

/// Where a request has been forwarded from already, who it acts for, and
/// its audit record (written when the last clone is dropped, unless the
/// request was forwarded: the node that serves it records it).
#[derive(Clone)]
pub(super) struct Hops {
    /// Actor ids of the nodes that forwarded it, in order.
    pub(super) via: Vec<String>,
    /// A node of this region forwarded it: it reached its owner here.
    pub(super) in_region: bool,
    /// A node of another region forwarded it: it reached its region.
    pub(super) cross_region: bool,
    pub(super) caller: Caller,
    pub(super) access: Option<Arc<Access>>,
}

impl Hops {
    pub(super) fn of<T>(request: &Request<T>, here: &str) -> Self {
        let mut hops = Hops {
            via: Vec::new(),
            in_region: false,
            cross_region: false,
            caller: Caller::of(request),
            access: None,
        };
        for v in request.metadata().get_all(FORWARDED_HEADER) {
            let Ok(v) = v.to_str() else { continue };
            if actor_region(v) == here {
                hops.in_region = true;
            } else {
                hops.cross_region = true;
            }
            hops.via.push(v.to_string());
        }
        hops
    }
}

/// Adds the forwarding hops and the caller's principal to a request a
/// node sends on behalf of its caller.
pub(super) fn on_behalf<T>(msg: T, via: &[String], me: String, caller: &Caller) -> Request<T> {
    let mut request = Request::new(msg);
    for v in via.iter().cloned().chain([me]) {
        if let Ok(v) = v.parse() {
            request.metadata_mut().append(FORWARDED_HEADER, v);
        }
    }
    if let Ok(p) = caller.principal.parse() {
        request.metadata_mut().insert(PRINCIPAL_HEADER, p);
    }
    request
}

/// Requests that name one row.
pub(super) trait HasRow {
    fn row_ref(&self) -> Option<&pb::RowRef>;
}

macro_rules! has_row {
    ($($t:ty),*) => {$(
        impl HasRow for $t {
            fn row_ref(&self) -> Option<&pb::RowRef> {
                self.row.as_ref()
            }
        }
    )*};
}

has_row!(
    pb::GetRequest,
    pb::PutRequest,
    pb::DeleteRequest,
    pb::CounterAddRequest,
    pb::CounterGetRequest,
    pb::SetAddRequest,
    pb::SetRemoveRequest,
    pb::SetMembersRequest
);
