//! gRPC handlers: protobuf in, domain call, protobuf out. Nothing here
//! decides anything; [`convert`] turns requests into domain types once.
//!
//! # Layout
//! - [`convert`]: proto <-> domain conversions and field validation.
//! - [`KvService`]: the `geokv.v1.KV` service.
//! - [`AdminService`]: the `geokv.v1.Admin` service.

pub mod control;
pub mod convert;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use geokv_proto::v1 as pb;
use pb::admin_client::AdminClient;
use pb::kv_client::KvClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::config::Level;
use crate::consensus::control::home_key;
use crate::consensus::quorum::Quorum;
use crate::consensus::strong::{StrongCommand, StrongReply, StrongValue};
use crate::consensus::{strong_group, Command, Consensus, Reply as ConsensusReply};
use crate::error::KvError;
use crate::kv::read_path::{self, ReadPath, StrongRead};
use crate::kv::row::RowValue;
use crate::kv::{
    parse_session, register_view, Node, ReadInfo, ReadResult, RowOp, RowRef, WriteOp, WriteRequest,
};
use crate::residency::{Placement, ReadLevel};
use crate::topology::{actor_region, NodeRef, Topology};

/// Metadata a node adds (its actor id, "region/node") to a request it
/// forwards. A request is forwarded at most once inside a region and at
/// most once across regions, so it never loops: entry node -> owner in the
/// entry region -> owner in the row's region. Accepted only on the peer
/// port, from the node named last (`security::authn`).
pub use crate::security::authn::FORWARDED_HEADER;
use crate::security::authn::{Access, Caller, PRINCIPAL_HEADER};
use crate::security::grants::Privilege;
/// Metadata carrying a client's idempotency key on calls whose message has
/// no field for it (compare-and-set).
pub const IDEMPOTENCY_HEADER: &str = "geokv-idempotency-key";
/// How long a SESSION read waits for replication before it is forwarded.
const SESSION_WAIT: Duration = Duration::from_millis(300);
const SESSION_POLL: Duration = Duration::from_millis(5);
/// Deadline of a forwarded request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

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

    fn channel(&self, node: &NodeRef) -> Result<Channel, KvError> {
        self.channels.get(&node.actor()).cloned().ok_or_else(|| KvError::RegionUnreachable {
            region: node.region.clone(),
            why: format!("no connection to node `{}`", node.actor()),
        })
    }

    fn admin(&self, node: &NodeRef) -> Result<AdminClient<Channel>, KvError> {
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
struct Hops {
    /// Actor ids of the nodes that forwarded it, in order.
    via: Vec<String>,
    /// A node of this region forwarded it: it reached its owner here.
    in_region: bool,
    /// A node of another region forwarded it: it reached its region.
    cross_region: bool,
    caller: Caller,
    access: Option<Arc<Access>>,
}

impl Hops {
    fn of<T>(request: &Request<T>, here: &str) -> Self {
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

/// What a KV request needs, for authorization and the audit log.
trait Target {
    /// Operation name in the audit log.
    const OP: &'static str;
    const PRIVILEGE: Privilege;
    /// Tables it touches and the key of its row, if it names one row.
    fn target(&self) -> (Vec<&str>, Option<&[u8]>);
}

macro_rules! target_row {
    ($($t:ty => $op:literal, $p:ident);* $(;)?) => {$(
        impl Target for $t {
            const OP: &'static str = $op;
            const PRIVILEGE: Privilege = Privilege::$p;
            fn target(&self) -> (Vec<&str>, Option<&[u8]>) {
                match &self.row {
                    Some(r) => (vec![r.table.as_str()], Some(r.key.as_slice())),
                    None => (Vec::new(), None),
                }
            }
        }
    )*};
}

target_row!(
    pb::GetRequest => "kv.get", Read;
    pb::PutRequest => "kv.put", Write;
    pb::DeleteRequest => "kv.delete", Write;
    pb::CounterAddRequest => "kv.counter_add", Write;
    pb::CounterGetRequest => "kv.counter_get", Read;
    pb::SetAddRequest => "kv.set_add", Write;
    pb::SetRemoveRequest => "kv.set_remove", Write;
    pb::SetMembersRequest => "kv.set_members", Read;
    pb::CompareAndSetRequest => "kv.compare_and_set", Write;
);

impl Target for pb::BatchRequest {
    const OP: &'static str = "kv.batch";
    const PRIVILEGE: Privilege = Privilege::Write;
    fn target(&self) -> (Vec<&str>, Option<&[u8]>) {
        let mut tables: Vec<&str> = self
            .ops
            .iter()
            .filter_map(|op| match &op.op {
                Some(pb::batch_op::Op::Put(p)) => p.row.as_ref(),
                Some(pb::batch_op::Op::Delete(d)) => d.row.as_ref(),
                None => None,
            })
            .map(|r| r.table.as_str())
            .collect();
        tables.sort_unstable();
        tables.dedup();
        (tables, None)
    }
}

impl Target for pb::ScanRequest {
    const OP: &'static str = "kv.scan";
    const PRIVILEGE: Privilege = Privilege::Read;
    fn target(&self) -> (Vec<&str>, Option<&[u8]>) {
        (vec![self.table.as_str()], None)
    }
}

/// Authorizes a request's caller for `privilege` (None: any authenticated
/// caller) and opens its audit record; a denial is audited and returned.
pub(crate) fn authorize_call<T>(
    node: &Node,
    request: &Request<T>,
    op: &'static str,
    privilege: Option<Privilege>,
    tables: &[&str],
    key: Option<&[u8]>,
) -> Result<(Caller, Access), Status> {
    let caller = Caller::of(request);
    let security = node.security();
    let mut access = None;
    if tables.is_empty() {
        access = Some(security.authorize(&caller, op, privilege, None, key)?);
    }
    for table in tables {
        // One record for the request: the first table's access is kept,
        // the others only authorize.
        let a = security.authorize(&caller, op, privilege, Some(table), key)?;
        match &access {
            None => access = Some(a),
            Some(_) => a.forwarded(),
        }
    }
    let access = access.ok_or_else(|| Status::internal("no access record"))?;
    Ok((caller, access))
}

/// Adds the forwarding hops and the caller's principal to a request a
/// node sends on behalf of its caller.
fn on_behalf<T>(msg: T, via: &[String], me: String, caller: &Caller) -> Request<T> {
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
trait HasRow {
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

/// The `geokv.v1.KV` service over one node.
#[derive(Clone)]
pub struct KvService {
    node: Arc<Node>,
    peers: Peers,
    /// STRONG groups and QUORUM replicas (absent in single-process tests).
    consensus: Option<(Arc<Consensus>, Arc<Quorum>)>,
}

/// How a request on a row is carried out, from its table and level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Normal,
    Quorum,
    Strong,
}

impl KvService {
    pub fn new(node: Arc<Node>, peers: Peers, consensus: Option<Arc<Consensus>>) -> Self {
        let consensus = consensus.map(|c| (c.clone(), Arc::new(Quorum::new(c, node.clone()))));
        Self { node, peers, consensus }
    }

    /// The path of a write at `level` (None = the table's default) to `table`.
    /// Every write to a STRONG table goes through its consensus group; a
    /// STRONG level on another table is refused.
    fn write_path(&self, row: &RowRef, level: Option<Level>) -> Result<Path, KvError> {
        let table = row.table.as_str();
        let cfg = self.node.config();
        let t = cfg.table(table).ok_or_else(|| KvError::UnknownTable { table: table.into() })?;
        let strong_table = t.default_consistency == Level::Strong;
        match level.unwrap_or(t.default_consistency) {
            _ if strong_table && self.consensus.is_some() => Ok(Path::Strong),
            Level::Strong if self.consensus.is_some() => {
                // Residency comes first: a row that may not pass through
                // this region is refused as such, whatever the level.
                let placement = crate::residency::resolve(cfg, t, &row.locality)?;
                crate::residency::admit_write(&cfg.region, &placement, Level::Eventual)?;
                Err(KvError::InvalidField {
                    field: "consistency",
                    why: format!(
                        "table `{table}` is not a STRONG table; STRONG rows live in tables with \
                     default_consistency = \"strong\""
                    ),
                })
            }
            Level::Quorum if self.consensus.is_some() => Ok(Path::Quorum),
            _ => Ok(Path::Normal),
        }
    }

    /// The path of a read of `row` at `level` (decided by
    /// `kv::read_path::choose`).
    fn read_path(&self, row: &RowRef, level: ReadLevel) -> Result<ReadPath, KvError> {
        let t = self
            .node
            .config()
            .table(&row.table)
            .ok_or_else(|| KvError::UnknownTable { table: row.table.clone() })?;
        let strong_table = t.default_consistency == Level::Strong;
        let member = strong_table
            && self.consensus.is_some()
            && self.strong_target(row).is_ok_and(|(consensus, group, _)| consensus.group(&group).is_some());
        Ok(read_path::choose(self.consensus.is_some(), strong_table, member, level))
    }

    /// Reads a row at any level but STRONG-table ones.
    async fn read_row(&self, row: &RowRef, level: ReadLevel, token: &[u8]) -> Result<ReadResult, KvError> {
        match (self.read_path(row, level)?, &self.consensus) {
            (ReadPath::Quorum, Some((_, quorum))) => {
                let stored = quorum.read(row).await?;
                Ok(ReadResult {
                    row: stored,
                    info: ReadInfo {
                        served_by_region: self.node.config().region.clone(),
                        staleness_ms_max: 0,
                        session_token: self.node.session_token(token, 0).unwrap_or_default(),
                    },
                })
            }
            (ReadPath::Strong(_), _) => Err(KvError::WrongType {
                key: crate::kv::row::display_key(&row.table, &row.key),
                expected: "counter or set",
                actual: "STRONG register",
            }),
            _ => self.read_waiting(row, level, token).await,
        }
    }

    /// The STRONG group of a row, after the residency check of its region.
    fn strong_target(&self, row: &RowRef) -> Result<(Arc<Consensus>, String, Placement), KvError> {
        let Some((consensus, _)) = &self.consensus else {
            return Err(KvError::LevelUnavailable { level: "STRONG".into() });
        };
        let cfg = self.node.config();
        let table =
            cfg.table(&row.table).ok_or_else(|| KvError::UnknownTable { table: row.table.clone() })?;
        let placement = crate::residency::resolve(cfg, table, &row.locality)?;
        crate::residency::admit_write(&cfg.region, &placement, Level::Eventual)?;
        let group = strong_group(&home_key(&placement.home_region, &placement.zone));
        Ok((consensus.clone(), group, placement))
    }

    /// Commits a STRONG write and builds its acknowledgement.
    async fn strong_write(
        &self,
        row: &RowRef,
        op: StrongCommand,
        request_id: Option<String>,
    ) -> Result<(StrongReply, pb::WriteAck), KvError> {
        let (consensus, group, placement) = self.strong_target(row)?;
        let reply = consensus.propose(&group, Command::Strong { request_id, op }, 0).await?;
        let (reply, index) = match reply {
            (ConsensusReply::Strong(StrongReply::Failed { why }), _) => {
                return Err(KvError::Corrupt { what: format!("STRONG row in {group}"), why })
            }
            (ConsensusReply::Strong(r), i) => (r, i),
            (other, _) => return Err(KvError::Storage(format!("unexpected consensus reply {other:?}"))),
        };
        let epoch = self
            .node
            .leases()
            .map(|l| l.current_epoch(&home_key(&placement.home_region, &placement.zone)))
            .unwrap_or(crate::kv::commit::INITIAL_EPOCH);
        let ack = pb::WriteAck {
            context: Vec::new(),
            hlc: self.node.hlc().now().0,
            home_region: placement.home_region,
            epoch,
            accepted_by_region: self.node.config().region.clone(),
            session_token: Vec::new(),
            replayed: false,
            version: match &reply {
                StrongReply::Written { version } => *version,
                _ => index,
            },
        };
        Ok((reply, ack))
    }

    /// A STRONG read: linearizable at STRONG, else this region's replica
    /// when it has one.
    async fn strong_read(&self, row: &RowRef, how: StrongRead) -> Result<Option<StrongValue>, KvError> {
        let (consensus, group, _) = self.strong_target(row)?;
        match how {
            StrongRead::LocalCopy => consensus.read_local(&group, &row.table, &row.key),
            StrongRead::Linearizable => consensus.read(&group, &row.table, &row.key, 0).await,
        }
    }

    /// Authorizes a KV request and learns its hops.
    fn enter<T: Target>(&self, request: &Request<T>) -> Result<Hops, Status> {
        let (tables, key) = request.get_ref().target();
        let (_, access) = authorize_call(&self.node, request, T::OP, Some(T::PRIVILEGE), &tables, key)?;
        let mut hops = Hops::of(request, &self.node.config().region);
        hops.access = Some(Arc::new(access));
        Ok(hops)
    }

    /// The owner of the request's row in this region, when it is another
    /// node and the request was not already forwarded inside this region.
    fn owner_here(&self, req: &impl HasRow, hops: &Hops) -> Option<NodeRef> {
        if hops.in_region {
            return None;
        }
        let row = req.row_ref().filter(|r| !r.table.is_empty() && !r.key.is_empty())?;
        let owner = self.node.topology().owner_of(&self.node.config().region, &row.table, &row.key)?;
        (!owner.is_self).then(|| owner.clone())
    }

    /// Sends the request to `target`, adding this node to its hops.
    async fn forward_to<Req, Resp, F, Fut>(
        &self,
        target: &NodeRef,
        hops: &Hops,
        req: Req,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(KvClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let client = KvClient::new(self.peers.channel(target)?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let mut request = on_behalf(req, &hops.via, self.node.actor(), &hops.caller);
        request.set_timeout(FORWARD_TIMEOUT);
        if let Some(access) = &hops.access {
            access.forwarded();
        }
        let scope = if target.region == self.node.config().region { "in_region" } else { "cross_region" };
        metrics::counter!("geokv_forwarded_total", "to" => target.region.clone(), "scope" => scope)
            .increment(1);
        call(client, request).await
    }

    /// Sends the request to the owner of its row in `region`.
    async fn forward_region<Req: HasRow, Resp, F, Fut>(
        &self,
        region: &str,
        hops: &Hops,
        req: Req,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(KvClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let topology = self.node.topology();
        let owner = req.row_ref().and_then(|r| topology.owner_of(region, &r.table, &r.key)).cloned();
        let Some(owner) = owner else {
            return Err(KvError::RegionUnreachable {
                region: region.into(),
                why: "no node configured".into(),
            }
            .into());
        };
        self.forward_to(&owner, hops, req, call).await
    }

    /// Reads a row, giving SESSION reads a bounded wait for replication.
    async fn read_waiting(
        &self,
        row: &crate::kv::RowRef,
        level: crate::residency::ReadLevel,
        token: &[u8],
    ) -> Result<crate::kv::ReadResult, KvError> {
        // The runtime's clock, so a simulation's time bounds the wait.
        let started = tokio::time::Instant::now();
        loop {
            match self.node.read(row, level, token) {
                Err(KvError::ReplicaStale { .. })
                    if level == crate::residency::ReadLevel::Session && started.elapsed() < SESSION_WAIT =>
                {
                    tokio::time::sleep(SESSION_POLL).await;
                }
                other => return other,
            }
        }
    }

    fn count(method: &'static str, result: &Result<impl Sized, KvError>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        };
        metrics::counter!("geokv_requests_total", "method" => method, "outcome" => outcome).increment(1);
    }

    async fn write_one(
        &self,
        method: &'static str,
        op: Result<WriteOp, KvError>,
        level: i32,
        idempotency: Result<Option<crate::kv::commit::Idempotency>, KvError>,
    ) -> Result<crate::kv::commit::WriteOutcome, KvError> {
        let result = async {
            let op = op?;
            let level = convert::write_level(level, "consistency")?;
            match (self.write_path(&op.row, level)?, &self.consensus) {
                (Path::Quorum, Some((_, quorum))) => return quorum.write(op, idempotency?).await,
                (Path::Strong, _) => {
                    return Err(KvError::InvalidField {
                        field: "consistency",
                        why: format!(
                            "table `{}` is STRONG and holds registers: use put, delete or compare-and-set",
                            op.row.table
                        ),
                    })
                }
                _ => {}
            }
            let req = WriteRequest { ops: vec![op], level, idempotency: idempotency? };
            let mut outcomes = self.node.write(req).await?;
            outcomes.pop().ok_or(KvError::Storage("committer returned no outcome".into()))
        }
        .await;
        Self::count(method, &result);
        result
    }

    /// Runs a put (`value: Some`) or delete on a STRONG table; None when
    /// the row is not in one.
    async fn strong_put_or_delete(
        &self,
        row: &Option<pb::RowRef>,
        value: Option<Vec<u8>>,
        level: i32,
        idempotency_key: &str,
    ) -> Result<Option<pb::WriteAck>, Status> {
        let method = if value.is_some() { "put" } else { "delete" };
        let result = async {
            let row = convert::row_ref(row.clone())?;
            let level = convert::write_level(level, "consistency")?;
            if self.write_path(&row, level)? != Path::Strong {
                return Ok(None);
            }
            let op = match value {
                Some(value) => StrongCommand::Put { table: row.table.clone(), key: row.key.clone(), value },
                None => StrongCommand::Delete { table: row.table.clone(), key: row.key.clone() },
            };
            let id = (!idempotency_key.is_empty()).then(|| idempotency_key.to_string());
            let (_, ack) = self.strong_write(&row, op, id).await?;
            Ok(Some(ack))
        }
        .await;
        if let Ok(Some(_)) | Err(_) = &result {
            Self::count(method, &result);
        }
        result.map_err(Status::from)
    }

    /// The node of this region owning every row of a batch, when it is not
    /// this one. A batch commits atomically on one node, so its rows must
    /// share an owner.
    fn batch_owner(&self, req: &pb::BatchRequest) -> Result<Option<NodeRef>, KvError> {
        let topology = self.node.topology();
        let region = &self.node.config().region;
        let mut owner: Option<&NodeRef> = None;
        for op in &req.ops {
            let row = match &op.op {
                Some(pb::batch_op::Op::Put(p)) => p.row.as_ref(),
                Some(pb::batch_op::Op::Delete(d)) => d.row.as_ref(),
                None => None,
            };
            let Some(row) = row else { continue };
            let Some(o) = topology.owner_of(region, &row.table, &row.key) else { continue };
            match owner {
                Some(prev) if prev.id != o.id => {
                    return Err(KvError::InvalidField {
                        field: "ops",
                        why: format!(
                            "the rows of one batch must be owned by one node of the region; `{}` and `{}` own some (see `geokv locate`)",
                            prev.actor(),
                            o.actor()
                        ),
                    })
                }
                _ => owner = Some(o),
            }
        }
        Ok(owner.filter(|o| !o.is_self).cloned())
    }

    fn token(&self, log_seq: u64) -> Vec<u8> {
        self.node.session_token(&[], log_seq).unwrap_or_default()
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let hops = self.enter(&request)?;
        let req = request.into_inner();
        if let Some(owner) = self.owner_here(&req, &hops) {
            return self.forward_to(&owner, &hops, req, |mut c, r| async move { c.get(r).await }).await;
        }
        let copy = req.clone();
        let result = async {
            let row = convert::row_ref(req.row)?;
            let level = convert::read_level(req.consistency, req.max_staleness_ms)?;
            parse_session(&req.session_token)?;
            if let ReadPath::Strong(how) = self.read_path(&row, level)? {
                let value = self.strong_read(&row, how).await?;
                return Ok(pb::GetResponse {
                    found: value.is_some(),
                    siblings: value
                        .map(|v| {
                            vec![pb::Sibling { value: v.value, hlc: v.version, origin: "strong".into() }]
                        })
                        .unwrap_or_default(),
                    context: Vec::new(),
                    info: Some(pb::ReadInfo {
                        served_by_region: self.node.config().region.clone(),
                        staleness_ms_max: read_path::strong_staleness_ms(how),
                        session_token: req.session_token.clone(),
                    }),
                });
            }
            let read = self.read_row(&row, level, &req.session_token).await?;
            let (found, siblings, context) = match &read.row {
                None => (false, Vec::new(), Vec::new()),
                Some(r) => {
                    if matches!(r.value, RowValue::Counter(_) | RowValue::Set(_)) {
                        return Err(KvError::WrongType {
                            key: crate::kv::row::display_key(&row.table, &row.key),
                            expected: "register",
                            actual: r.value.kind(),
                        });
                    }
                    let (siblings, context) = register_view(r);
                    (!siblings.is_empty(), siblings, context)
                }
            };
            Ok(pb::GetResponse {
                found,
                siblings: convert::siblings(siblings),
                context,
                info: Some(convert::read_info(read.info)),
            })
        }
        .await;
        Self::count("get", &result);
        match result {
            Err(KvError::ReplicaStale { region, .. }) if !hops.cross_region => {
                self.forward_region(&region, &hops, copy, |mut c, r| async move { c.get(r).await }).await
            }
            other => Ok(Response::new(other?)),
        }
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let hops = self.enter(&request)?;
        let mut req = request.into_inner();
        if let Some(owner) = self.owner_here(&req, &hops) {
            return self.forward_to(&owner, &hops, req, |mut c, r| async move { c.put(r).await }).await;
        }
        let copy = req.clone();
        let key = std::mem::take(&mut req.idempotency_key);
        if let Some(ack) =
            self.strong_put_or_delete(&req.row, Some(req.value.clone()), req.consistency, &key).await?
        {
            return Ok(Response::new(pb::PutResponse { ack: Some(ack) }));
        }
        let idem = convert::idempotency(key, &req);
        let level = req.consistency;
        let o = match self.write_one("put", convert::put_op(req), level, idem).await {
            Err(KvError::NotHome { home, .. } | KvError::Fenced { holder: Some(home), .. })
                if !hops.cross_region =>
            {
                return self
                    .forward_region(&home, &hops, copy, |mut c, r| async move { c.put(r).await })
                    .await;
            }
            other => other?,
        };
        Ok(Response::new(pb::PutResponse { ack: Some(convert::ack(&o, self.token(o.log_seq))) }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let hops = self.enter(&request)?;
        let mut req = request.into_inner();
        if let Some(owner) = self.owner_here(&req, &hops) {
            return self.forward_to(&owner, &hops, req, |mut c, r| async move { c.delete(r).await }).await;
        }
        let copy = req.clone();
        let key = std::mem::take(&mut req.idempotency_key);
        if let Some(ack) = self.strong_put_or_delete(&req.row, None, req.consistency, &key).await? {
            return Ok(Response::new(pb::DeleteResponse { ack: Some(ack) }));
        }
        let idem = convert::idempotency(key, &req);
        let level = req.consistency;
        let o = match self.write_one("delete", convert::delete_op(req), level, idem).await {
            Err(KvError::NotHome { home, .. } | KvError::Fenced { holder: Some(home), .. })
                if !hops.cross_region =>
            {
                return self
                    .forward_region(&home, &hops, copy, |mut c, r| async move { c.delete(r).await })
                    .await;
            }
            other => other?,
        };
        Ok(Response::new(pb::DeleteResponse { ack: Some(convert::ack(&o, self.token(o.log_seq))) }))
    }

    async fn batch(&self, request: Request<pb::BatchRequest>) -> Result<Response<pb::BatchResponse>, Status> {
        let hops = self.enter(&request)?;
        let mut req = request.into_inner();
        if !hops.in_region {
            if let Some(owner) = self.batch_owner(&req)? {
                return self.forward_to(&owner, &hops, req, |mut c, r| async move { c.batch(r).await }).await;
            }
        }
        let key = std::mem::take(&mut req.idempotency_key);
        let result = async {
            let idempotency = convert::idempotency(key, &req)?;
            let level = convert::write_level(req.consistency, "consistency")?;
            let mut ops = Vec::with_capacity(req.ops.len());
            for op in req.ops {
                let (op, op_level) = match op.op {
                    Some(pb::batch_op::Op::Put(p)) => {
                        let l = p.consistency;
                        (convert::put_op(p)?, l)
                    }
                    Some(pb::batch_op::Op::Delete(d)) => {
                        let l = d.consistency;
                        (convert::delete_op(d)?, l)
                    }
                    None => return Err(KvError::MissingField { field: "ops.op" }),
                };
                let op_level = convert::write_level(op_level, "ops.consistency")?;
                if op_level.is_some() && op_level != level {
                    return Err(KvError::InvalidField {
                        field: "ops.consistency",
                        why: "must be unset or equal to the batch's consistency".into(),
                    });
                }
                ops.push(op);
            }
            self.node.write(WriteRequest { ops, level, idempotency }).await
        }
        .await;
        Self::count("batch", &result);
        let acks = result?.iter().map(|o| convert::ack(o, self.token(o.log_seq))).collect();
        Ok(Response::new(pb::BatchResponse { acks }))
    }

    async fn scan(&self, request: Request<pb::ScanRequest>) -> Result<Response<pb::ScanResponse>, Status> {
        let hops = self.enter(&request)?;
        let req = request.into_inner();
        let limit = if req.limit == 0 { 100 } else { req.limit as usize };
        let result = self.node.scan(&req.table, &req.prefix, &req.start_after, limit, req.include_deleted);
        Self::count("scan", &result);
        let local = scan_response(result?);
        let peers: Vec<NodeRef> = self.node.topology().region_peers().into_iter().cloned().collect();
        if hops.in_region || peers.is_empty() {
            return Ok(Response::new(local));
        }
        // Rows of this region are spread over its nodes: ask each for the
        // same page and merge in key order.
        let mut pages = vec![local];
        for peer in &peers {
            let page =
                self.forward_to(peer, &hops, req.clone(), |mut c, r| async move { c.scan(r).await }).await?;
            pages.push(page.into_inner());
        }
        let limit = limit.clamp(1, self.node.config().limits.scan_rows_max);
        Ok(Response::new(merge_scan_pages(pages, limit)))
    }

    async fn counter_add(
        &self,
        request: Request<pb::CounterAddRequest>,
    ) -> Result<Response<pb::CounterAddResponse>, Status> {
        let hops = self.enter(&request)?;
        let mut req = request.into_inner();
        if let Some(owner) = self.owner_here(&req, &hops) {
            return self
                .forward_to(&owner, &hops, req, |mut c, r| async move { c.counter_add(r).await })
                .await;
        }
        let copy = req.clone();
        let key = std::mem::take(&mut req.idempotency_key);
        let idem = convert::idempotency(key, &req);
        let op = convert::row_ref(req.row.take())
            .map(|row| WriteOp { row, op: RowOp::CounterAdd { delta: req.delta } });
        let o = match self.write_one("counter_add", op, req.consistency, idem).await {
            Err(KvError::NotHome { home, .. } | KvError::Fenced { holder: Some(home), .. })
                if !hops.cross_region =>
            {
                return self
                    .forward_region(&home, &hops, copy, |mut c, r| async move { c.counter_add(r).await })
                    .await;
            }
            other => other?,
        };
        Ok(Response::new(pb::CounterAddResponse {
            value: o.counter_value.unwrap_or(0),
            ack: Some(convert::ack(&o, self.token(o.log_seq))),
        }))
    }

    async fn counter_get(
        &self,
        request: Request<pb::CounterGetRequest>,
    ) -> Result<Response<pb::CounterGetResponse>, Status> {
        let hops = self.enter(&request)?;
        let req = request.into_inner();
        if let Some(owner) = self.owner_here(&req, &hops) {
            return self
                .forward_to(&owner, &hops, req, |mut c, r| async move { c.counter_get(r).await })
                .await;
        }
        let copy = req.clone();
        let result = async {
            let row = convert::row_ref(req.row)?;
            let level = convert::read_level(req.consistency, req.max_staleness_ms)?;
            parse_session(&req.session_token)?;
            let read = self.read_row(&row, level, &req.session_token).await?;
            let value = match &read.row {
                None => None,
                Some(r) => match &r.value {
                    RowValue::Counter(c) => Some(c.value()),
                    other => {
                        return Err(KvError::WrongType {
                            key: crate::kv::row::display_key(&row.table, &row.key),
                            expected: "counter",
                            actual: other.kind(),
                        })
                    }
                },
            };
            Ok(pb::CounterGetResponse {
                found: value.is_some(),
                value: value.unwrap_or(0),
                info: Some(convert::read_info(read.info)),
            })
        }
        .await;
        Self::count("counter_get", &result);
        match result {
            Err(KvError::ReplicaStale { region, .. }) if !hops.cross_region => {
                self.forward_region(&region, &hops, copy, |mut c, r| async move { c.counter_get(r).await })
                    .await
            }
            other => Ok(Response::new(other?)),
        }
    }

    async fn set_add(
        &self,
        request: Request<pb::SetAddRequest>,
    ) -> Result<Response<pb::SetWriteResponse>, Status> {
        let hops = self.enter(&request)?;
        let mut req = request.into_inner();
        if let Some(owner) = self.owner_here(&req, &hops) {
            return self.forward_to(&owner, &hops, req, |mut c, r| async move { c.set_add(r).await }).await;
        }
        let copy = req.clone();
        let key = std::mem::take(&mut req.idempotency_key);
        let idem = convert::idempotency(key, &req);
        let members = std::mem::take(&mut req.members);
        let op = convert::row_ref(req.row.take()).map(|row| WriteOp { row, op: RowOp::SetAdd { members } });
        let o = match self.write_one("set_add", op, req.consistency, idem).await {
            Err(KvError::NotHome { home, .. } | KvError::Fenced { holder: Some(home), .. })
                if !hops.cross_region =>
            {
                return self
                    .forward_region(&home, &hops, copy, |mut c, r| async move { c.set_add(r).await })
                    .await;
            }
            other => other?,
        };
        Ok(Response::new(pb::SetWriteResponse {
            members: o.members.clone().unwrap_or_default(),
            ack: Some(convert::ack(&o, self.token(o.log_seq))),
        }))
    }

    async fn set_remove(
        &self,
        request: Request<pb::SetRemoveRequest>,
    ) -> Result<Response<pb::SetWriteResponse>, Status> {
        let hops = self.enter(&request)?;
        let mut req = request.into_inner();
        if let Some(owner) = self.owner_here(&req, &hops) {
            return self
                .forward_to(&owner, &hops, req, |mut c, r| async move { c.set_remove(r).await })
                .await;
        }
        let copy = req.clone();
        let key = std::mem::take(&mut req.idempotency_key);
        let idem = convert::idempotency(key, &req);
        let level = req.consistency;
        let o = match self.write_one("set_remove", convert::set_remove_op(req), level, idem).await {
            Err(KvError::NotHome { home, .. } | KvError::Fenced { holder: Some(home), .. })
                if !hops.cross_region =>
            {
                return self
                    .forward_region(&home, &hops, copy, |mut c, r| async move { c.set_remove(r).await })
                    .await;
            }
            other => other?,
        };
        Ok(Response::new(pb::SetWriteResponse {
            members: o.members.clone().unwrap_or_default(),
            ack: Some(convert::ack(&o, self.token(o.log_seq))),
        }))
    }

    async fn compare_and_set(
        &self,
        request: Request<pb::CompareAndSetRequest>,
    ) -> Result<Response<pb::CompareAndSetResponse>, Status> {
        let _hops = self.enter(&request)?;
        let idempotency_key =
            request.metadata().get(IDEMPOTENCY_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let req = request.into_inner();
        let result = async {
            let row = convert::row_ref(req.row)?;
            self.node
                .config()
                .table(&row.table)
                .ok_or_else(|| KvError::UnknownTable { table: row.table.clone() })?;
            if self.write_path(&row, None)? != Path::Strong {
                return Err(KvError::InvalidField {
                    field: "row.table",
                    why: format!("compare-and-set needs a STRONG table; `{}` is not one", row.table),
                });
            }
            if let Some(v) = &req.value {
                if v.len() > self.node.config().limits.value_bytes_max {
                    return Err(KvError::ValueTooLarge {
                        len: v.len(),
                        max: self.node.config().limits.value_bytes_max,
                    });
                }
            }
            let op = StrongCommand::Cas {
                table: row.table.clone(),
                key: row.key.clone(),
                expected: req.expected,
                value: req.value,
            };
            let (reply, ack) = self.strong_write(&row, op, idempotency_key).await?;
            Ok(match reply {
                StrongReply::CasFailed { current } => pb::CompareAndSetResponse {
                    succeeded: false,
                    found: current.is_some(),
                    current_version: current.as_ref().map_or(0, |c| c.version),
                    current: current.map(|c| c.value).unwrap_or_default(),
                    ack: Some(ack),
                },
                _ => pb::CompareAndSetResponse {
                    succeeded: true,
                    found: false,
                    current: Vec::new(),
                    current_version: 0,
                    ack: Some(ack),
                },
            })
        }
        .await;
        Self::count("compare_and_set", &result);
        Ok(Response::new(result?))
    }

    async fn set_members(
        &self,
        request: Request<pb::SetMembersRequest>,
    ) -> Result<Response<pb::SetMembersResponse>, Status> {
        let hops = self.enter(&request)?;
        let req = request.into_inner();
        if let Some(owner) = self.owner_here(&req, &hops) {
            return self
                .forward_to(&owner, &hops, req, |mut c, r| async move { c.set_members(r).await })
                .await;
        }
        let copy = req.clone();
        let result = async {
            let row = convert::row_ref(req.row)?;
            let level = convert::read_level(req.consistency, req.max_staleness_ms)?;
            parse_session(&req.session_token)?;
            let read = self.read_row(&row, level, &req.session_token).await?;
            let (found, members, context) = match &read.row {
                None => (false, Vec::new(), Vec::new()),
                Some(r) => match &r.value {
                    RowValue::Set(s) => {
                        let members = s.members().into_iter().map(<[u8]>::to_vec).collect();
                        (true, members, crate::causality::encode_context(s.context()))
                    }
                    other => {
                        return Err(KvError::WrongType {
                            key: crate::kv::row::display_key(&row.table, &row.key),
                            expected: "set",
                            actual: other.kind(),
                        })
                    }
                },
            };
            Ok(pb::SetMembersResponse { found, members, context, info: Some(convert::read_info(read.info)) })
        }
        .await;
        Self::count("set_members", &result);
        match result {
            Err(KvError::ReplicaStale { region, .. }) if !hops.cross_region => {
                self.forward_region(&region, &hops, copy, |mut c, r| async move { c.set_members(r).await })
                    .await
            }
            other => Ok(Response::new(other?)),
        }
    }
}

fn scan_response(page: crate::kv::ScanPage) -> pb::ScanResponse {
    let rows = page
        .rows
        .into_iter()
        .map(|r| {
            let (siblings, context) = register_view(&r.row);
            let (counter_value, set_members) = match &r.row.value {
                RowValue::Counter(c) => (c.value(), Vec::new()),
                RowValue::Set(s) => (0, s.members().into_iter().map(<[u8]>::to_vec).collect()),
                _ => (0, Vec::new()),
            };
            pb::ScanRow {
                key: r.key,
                home_region: r.row.home_region.clone(),
                kind: r.row.value.kind().to_string(),
                siblings: convert::siblings(siblings),
                context,
                counter_value,
                set_members,
            }
        })
        .collect();
    pb::ScanResponse {
        rows,
        more: page.next_start_after.is_some(),
        next_start_after: page.next_start_after.unwrap_or_default(),
        info: Some(convert::read_info(page.info)),
    }
}

/// Merges the pages of one scan from every node of a region: each node
/// returned its first `limit` rows after the same start, so the first
/// `limit` rows of the union, in key order, are the region's first `limit`.
fn merge_scan_pages(pages: Vec<pb::ScanResponse>, limit: usize) -> pb::ScanResponse {
    let mut more = false;
    let mut info = None;
    let mut rows = Vec::new();
    for page in pages {
        more |= page.more;
        info = info.or(page.info);
        rows.extend(page.rows);
    }
    rows.sort_by(|a, b| a.key.cmp(&b.key));
    rows.dedup_by(|a, b| a.key == b.key);
    if rows.len() > limit {
        rows.truncate(limit);
        more = true;
    }
    let next_start_after =
        if more { rows.last().map(|r| r.key.clone()).unwrap_or_default() } else { Vec::new() };
    pb::ScanResponse { rows, more, next_start_after, info }
}

/// The `geokv.v1.Admin` service over one node.
#[derive(Clone)]
pub struct AdminService {
    node: Arc<Node>,
    replicator: Arc<crate::replication::Replicator>,
    /// For region-wide answers (status, audit, digest) from every node.
    peers: Peers,
}

impl AdminService {
    pub fn new(node: Arc<Node>, replicator: Arc<crate::replication::Replicator>, peers: Peers) -> Self {
        Self { node, replicator, peers }
    }

    fn link(&self, s: crate::replication::ship::LinkSnapshot) -> pb::ReplicationLink {
        let backlog_entries = s.head_seq.saturating_sub(s.acked_seq);
        pb::ReplicationLink {
            source: s.source,
            destination: s.destination,
            paused: s.paused,
            connected: s.connected,
            acked_seq: s.acked_seq,
            head_seq: s.head_seq,
            lag_seconds: s.lag_seconds,
            lag_entries: s.lag_entries,
            lag_bytes: s.lag_bytes,
            skipped_by_residency: s.skipped_by_residency,
            shipped_bytes: s.shipped_bytes,
            last_error: s.last_error,
            destination_node: s.destination_node,
            source_node: s.source_node,
            repair_state: s.repair_state,
            repairs_started: s.repairs_started,
            repairs_finished: s.repairs_finished,
            rows_repaired: s.rows_repaired,
            repair_bytes: s.repair_bytes,
            backlog_entries,
        }
    }

    fn control(&self, destination: &str, paused: bool) -> Result<Vec<pb::ReplicationLink>, KvError> {
        let links = self.replicator.links_to(destination);
        if links.is_empty() && self.node.config().regions.iter().all(|r| r.name != destination) {
            return Err(KvError::UnknownRegion {
                region: destination.to_string(),
                known: self.replicator.links().iter().map(|l| l.destination.clone()).collect(),
            });
        }
        for link in &links {
            link.set_paused(paused);
        }
        tracing::info!(destination, paused, "replication control");
        Ok(links.iter().map(|l| self.link(l.snapshot(&self.node))).collect())
    }

    /// Pauses or resumes this node's links to a region and, unless the
    /// request is node-only, those of every other node of this region.
    async fn control_region(
        &self,
        caller: &Caller,
        req: pb::ReplicationControlRequest,
        paused: bool,
    ) -> Result<Response<pb::ReplicationControlResponse>, Status> {
        let mut links = self.control(&req.destination, paused)?;
        if !req.node_only {
            let fan = pb::ReplicationControlRequest { node_only: true, ..req };
            let others = self
                .on_region_peers(caller, fan, |mut c, r| async move {
                    if paused {
                        c.pause_replication(r).await
                    } else {
                        c.resume_replication(r).await
                    }
                })
                .await?;
            links.extend(others.into_iter().filter_map(|o| o.link));
        }
        Ok(Response::new(pb::ReplicationControlResponse { link: links.into_iter().next() }))
    }

    /// Runs `call` on every other node of this region (node-only requests),
    /// failing if any node cannot answer: a partial answer would pass for a
    /// whole one.
    async fn on_region_peers<Req, Resp, F, Fut>(
        &self,
        caller: &Caller,
        req: Req,
        call: F,
    ) -> Result<Vec<Resp>, Status>
    where
        Req: Clone,
        F: Fn(AdminClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let mut out = Vec::new();
        for peer in self.node.topology().region_peers() {
            let client = self.peers.admin(peer)?;
            let mut request = on_behalf(req.clone(), &[], self.node.actor(), caller);
            request.set_timeout(ADMIN_FANOUT_TIMEOUT);
            let resp = call(client, request).await.map_err(|s| {
                Status::new(s.code(), format!("node {} of this region: {}", peer.actor(), s.message()))
            })?;
            out.push(resp.into_inner());
        }
        Ok(out)
    }
}

/// Audit records returned when a request names no limit, and at most.
const AUDIT_READ_DEFAULT: usize = 1000;
const AUDIT_READ_MAX: usize = 10_000;

/// Deadline of one node's part of a region-wide admin request (a full
/// scan of its store for audits and digests).
const ADMIN_FANOUT_TIMEOUT: Duration = Duration::from_secs(120);

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn node_status(
        &self,
        request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusResponse>, Status> {
        let (_caller, _access) = authorize_call(&self.node, &request, "admin.node_status", None, &[], None)?;
        let cfg = self.node.config();
        let conflicts = self.node.conflicts();
        let gc = self.node.gc().stats();
        let tables = cfg
            .tables
            .iter()
            .map(|t| pb::TableInfo {
                name: t.name.clone(),
                locality: t.locality.as_str().into(),
                default_consistency: t.default_consistency.as_str().into(),
                conflict_policy: t.conflict.as_str().into(),
                home_region: t
                    .home_region
                    .clone()
                    .or_else(|| t.default_home_region.clone())
                    .unwrap_or_default(),
                zone: t.zone.clone().unwrap_or_default(),
                conflicts: conflicts.get(&t.name).copied().unwrap_or(0),
            })
            .collect();
        Ok(Response::new(pb::NodeStatusResponse {
            node_id: cfg.node_id.clone(),
            region: cfg.region.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.node.uptime().as_millis() as u64,
            data_dir: cfg.data_dir.display().to_string(),
            regions: cfg.region_names(),
            tables,
            log_seq: self.node.log_seq(),
            hlc: self.node.hlc().now().0,
            durable_writes: cfg.storage.sync,
            storage_engine: self.node.engine().kind().into(),
            tombstones: gc.tombstones,
            tombstone_sweeps: gc.sweeps,
            tombstones_collected: self.node.tombstones_collected(),
            log_entries_trimmed: gc.log_trimmed,
        }))
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let (_caller, _access) =
            authorize_call(&self.node, &request, "admin.cluster_status", None, &[], None)?;
        let cfg = self.node.config();
        let regions = cfg
            .regions
            .iter()
            .map(|r| {
                let is_self = r.name == cfg.region;
                let client_addrs: Vec<String> =
                    self.node.topology().nodes(&r.name).iter().map(|n| n.client_addr.clone()).collect();
                let health = if is_self {
                    "self"
                } else if self.replicator.is_healthy(&r.name) {
                    "healthy"
                } else {
                    "unreachable"
                };
                pb::RegionInfo {
                    name: r.name.clone(),
                    zone: cfg.zone_of(&r.name).map(|z| z.name.clone()).unwrap_or_default(),
                    client_addrs,
                    peer_addrs: self.node.topology().nodes(&r.name).iter().map(|n| n.addr.clone()).collect(),
                    health: health.into(),
                    last_contact_ms: if is_self {
                        0
                    } else {
                        self.replicator
                            .last_contact(&r.name)
                            .map(|d| d.as_millis() as u64)
                            .unwrap_or(u64::MAX)
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::ClusterStatusResponse { answered_by_region: cfg.region.clone(), regions }))
    }

    async fn replication_status(
        &self,
        request: Request<pb::ReplicationStatusRequest>,
    ) -> Result<Response<pb::ReplicationStatusResponse>, Status> {
        let (caller, _access) =
            authorize_call(&self.node, &request, "admin.replication_status", None, &[], None)?;
        let node_only = request.into_inner().node_only;
        let mut links: Vec<pb::ReplicationLink> =
            self.replicator.links().into_iter().map(|l| self.link(l.snapshot(&self.node))).collect();
        if !node_only {
            let req = pb::ReplicationStatusRequest { node_only: true };
            for other in self
                .on_region_peers(&caller, req, |mut c, r| async move { c.replication_status(r).await })
                .await?
            {
                links.extend(other.links);
            }
        }
        Ok(Response::new(pb::ReplicationStatusResponse { links }))
    }

    async fn pause_replication(
        &self,
        request: Request<pb::ReplicationControlRequest>,
    ) -> Result<Response<pb::ReplicationControlResponse>, Status> {
        let (caller, _access) = authorize_call(
            &self.node,
            &request,
            "admin.pause_replication",
            Some(Privilege::Admin),
            &[],
            None,
        )?;
        self.control_region(&caller, request.into_inner(), true).await
    }

    async fn resume_replication(
        &self,
        request: Request<pb::ReplicationControlRequest>,
    ) -> Result<Response<pb::ReplicationControlResponse>, Status> {
        let (caller, _access) = authorize_call(
            &self.node,
            &request,
            "admin.resume_replication",
            Some(Privilege::Admin),
            &[],
            None,
        )?;
        self.control_region(&caller, request.into_inner(), false).await
    }

    async fn residency_audit(
        &self,
        request: Request<pb::ResidencyAuditRequest>,
    ) -> Result<Response<pb::ResidencyAuditResponse>, Status> {
        let (caller, _access) =
            authorize_call(&self.node, &request, "admin.residency_audit", Some(Privilege::Admin), &[], None)?;
        let node_only = request.into_inner().node_only;
        let node = self.node.clone();
        let (checked, findings) = tokio::task::spawn_blocking(move || node.residency_audit())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let region = self.node.config().region.clone();
        let node_id = self.node.config().node_id.clone();
        let violations = findings
            .into_iter()
            .map(|f| pb::ResidencyViolationRow {
                table: f.table,
                key: f.key,
                zone: f.zone,
                allowed_regions: f.allowed_regions,
                stored_in_region: region.clone(),
                stored_on_node: node_id.clone(),
            })
            .collect();
        let mut out = pb::ResidencyAuditResponse { region, rows_checked: checked, violations, nodes: 1 };
        if !node_only {
            let req = pb::ResidencyAuditRequest { node_only: true };
            for other in self
                .on_region_peers(&caller, req, |mut c, r| async move { c.residency_audit(r).await })
                .await?
            {
                out.rows_checked += other.rows_checked;
                out.violations.extend(other.violations);
                out.nodes += other.nodes;
            }
        }
        Ok(Response::new(out))
    }

    async fn digest(
        &self,
        request: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestResponse>, Status> {
        let (caller, _access) =
            authorize_call(&self.node, &request, "admin.digest", Some(Privilege::Admin), &[], None)?;
        let node_only = request.into_inner().node_only;
        let node = self.node.clone();
        let mine = tokio::task::spawn_blocking(move || node.digest())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let region = self.node.config().region.clone();
        let mut parts: Vec<pb::PartitionDigest> = mine
            .into_iter()
            .map(|d| pb::PartitionDigest {
                table: d.table,
                zone: d.zone,
                partition: d.partition,
                rows: d.rows,
                digest: d.digest,
            })
            .collect();
        if node_only {
            return Ok(Response::new(pb::DigestResponse {
                region,
                digests: Vec::new(),
                partitions: parts,
                nodes: 1,
            }));
        }
        let mut nodes = 1;
        let req = pb::DigestRequest { node_only: true };
        for other in self.on_region_peers(&caller, req, |mut c, r| async move { c.digest(r).await }).await? {
            parts.extend(other.partitions);
            nodes += other.nodes;
        }
        let combined = crate::kv::combine_digests(
            parts
                .into_iter()
                .map(|p| crate::kv::PartitionDigest {
                    table: p.table,
                    zone: p.zone,
                    partition: p.partition,
                    rows: p.rows,
                    digest: p.digest,
                })
                .collect(),
        );
        Ok(Response::new(pb::DigestResponse {
            region,
            digests: combined
                .into_iter()
                .map(|d| pb::ZoneDigest { table: d.table, zone: d.zone, rows: d.rows, digest: d.digest })
                .collect(),
            partitions: Vec::new(),
            nodes,
        }))
    }

    async fn partition_map(
        &self,
        request: Request<pb::PartitionMapRequest>,
    ) -> Result<Response<pb::PartitionMapResponse>, Status> {
        let (_caller, _access) =
            authorize_call(&self.node, &request, "admin.partition_map", None, &[], None)?;
        let t = self.node.topology();
        let regions = t
            .regions
            .iter()
            .map(|r| pb::RegionPartitions {
                region: r.name.clone(),
                node_ids: r.nodes.iter().map(|n| n.id.clone()).collect(),
                owners: (0..t.partitions)
                    .filter_map(|p| {
                        t.owner(&r.name, p)
                            .map(|n| pb::PartitionOwner { partition: p, node_id: n.id.clone() })
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::PartitionMapResponse {
            partitions: t.partitions,
            regions,
            answered_by_node: self.node.actor(),
        }))
    }

    async fn audit_log(
        &self,
        request: Request<pb::AuditLogRequest>,
    ) -> Result<Response<pb::AuditLogResponse>, Status> {
        let (caller, _access) =
            authorize_call(&self.node, &request, "admin.audit_log", Some(Privilege::Admin), &[], None)?;
        let req = request.into_inner();
        let limit = match req.limit {
            0 => AUDIT_READ_DEFAULT,
            n => (n as usize).min(AUDIT_READ_MAX),
        };
        let region = self.node.config().region.clone();
        let mut records = Vec::new();
        if let Some(audit) = self.node.security().audit() {
            let principal = (!req.principal.is_empty()).then_some(req.principal.as_str());
            let table = (!req.table.is_empty()).then_some(req.table.as_str());
            let found = audit
                .query(req.since_ms, principal, table, limit)
                .map_err(|e| Status::from(KvError::Storage(e.to_string())))?;
            let me = self.node.actor();
            records.extend(found.into_iter().map(|r| pb::AuditEntry {
                time_ms: r.time_ms,
                principal: r.principal,
                operation: r.operation,
                table: r.table,
                key_hash: r.key_hash,
                entry_region: r.entry_region,
                serving_region: r.serving_region,
                allowed: r.allowed,
                reason: r.reason,
                node: me.clone(),
            }));
        }
        if !req.node_only {
            let fan = pb::AuditLogRequest { node_only: true, ..req };
            for other in
                self.on_region_peers(&caller, fan, |mut c, r| async move { c.audit_log(r).await }).await?
            {
                records.extend(other.records);
            }
            records.sort_by_key(|r| r.time_ms);
            records.truncate(limit);
        }
        Ok(Response::new(pb::AuditLogResponse { region, records }))
    }

    async fn locate(
        &self,
        request: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        let (_caller, _access) = authorize_call(&self.node, &request, "admin.locate", None, &[], None)?;
        let row = convert::row_ref(request.into_inner().row)?;
        let cfg = self.node.config();
        let table =
            cfg.table(&row.table).ok_or_else(|| KvError::UnknownTable { table: row.table.clone() })?;
        let placement = crate::residency::resolve(cfg, table, &row.locality)?;
        let t = self.node.topology();
        let partition = t.partition_of(&row.table, &row.key);
        let replicas = placement
            .replica_regions
            .iter()
            .map(|region| {
                let owner = t.owner(region, partition);
                pb::LocateReplica {
                    region: region.clone(),
                    node_id: owner.map(|n| n.id.clone()).unwrap_or_default(),
                    client_addr: owner.map(|n| n.client_addr.clone()).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::LocateResponse {
            table: row.table.clone(),
            partition,
            home_node_id: t
                .owner(&placement.home_region, partition)
                .map(|n| n.id.clone())
                .unwrap_or_default(),
            home_region: placement.home_region,
            zone: placement.zone,
            replicas,
        }))
    }
}
