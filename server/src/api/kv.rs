//! The `geokv.v1.KV` service: authorize, route (decisions in `kv::route`),
//! then serve from this node, its consensus groups, or a peer
//! (docs/architecture.md sections 2 and 19).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use geokv_proto::v1 as pb;
use pb::kv_client::KvClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::access::{authorize_call, batch_rows, Target};
use super::convert;
use super::forward::{on_behalf, HasRow, Hops, Peers, FORWARD_TIMEOUT};
use crate::config::Level;
use crate::consensus::control::home_key;
use crate::consensus::quorum::Quorum;
use crate::consensus::strong::{StrongCommand, StrongReply, StrongValue};
use crate::consensus::{strong_group, Command, Consensus, Reply as ConsensusReply};
use crate::error::KvError;
use crate::kv::commit::{Idempotency, WriteOutcome};
use crate::kv::route::{self, ReadPath, StrongRead, WritePath};
use crate::kv::row::RowValue;
use crate::kv::{
    parse_session, register_view, Node, ReadInfo, ReadResult, RowOp, RowRef, WriteOp, WriteRequest,
};
use crate::residency::{Placement, ReadLevel};
use crate::topology::NodeRef;

/// Metadata carrying a client's idempotency key on calls whose message has
/// no field for it (compare-and-set).
pub const IDEMPOTENCY_HEADER: &str = "geokv-idempotency-key";
/// How long a SESSION read waits for replication before it is forwarded.
const SESSION_WAIT: Duration = Duration::from_millis(300);
const SESSION_POLL: Duration = Duration::from_millis(5);

/// The `geokv.v1.KV` service over one node.
#[derive(Clone)]
pub struct KvService {
    node: Arc<Node>,
    peers: Peers,
    /// STRONG groups and QUORUM replicas (absent in single-process tests).
    consensus: Option<(Arc<Consensus>, Arc<Quorum>)>,
}

impl KvService {
    pub fn new(node: Arc<Node>, peers: Peers, consensus: Option<Arc<Consensus>>) -> Self {
        let consensus = consensus.map(|c| (c.clone(), Arc::new(Quorum::new(c, node.clone()))));
        Self { node, peers, consensus }
    }

    /// The path of a write at `level` (None = the table's default) to
    /// `row` (decided by `kv::route::write_path`).
    fn write_path(&self, row: &RowRef, level: Option<Level>) -> Result<WritePath, KvError> {
        let table = row.table.as_str();
        let cfg = self.node.config();
        let t = cfg.table(table).ok_or_else(|| KvError::UnknownTable { table: table.into() })?;
        let strong_table = t.default_consistency == Level::Strong;
        route::write_path(self.consensus.is_some(), strong_table, level.unwrap_or(t.default_consistency))
            .or_else(|route::NotAStrongTable| {
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
            })
    }

    /// The path of a read of `row` at `level` (decided by
    /// `kv::route::choose`).
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
        Ok(route::choose(self.consensus.is_some(), strong_table, member, level))
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
        // The command's time is its HLC time: it dates idempotency records
        // and TTL expiry the same way on every replica.
        let at_ms = self.node.hlc().now().physical_ms();
        let reply = consensus.propose(&group, Command::Strong { request_id, op, at_ms }, 0).await?;
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
    /// when it has one. An expired value reads as absent.
    async fn strong_read(&self, row: &RowRef, how: StrongRead) -> Result<Option<StrongValue>, KvError> {
        let (consensus, group, _) = self.strong_target(row)?;
        let value = match how {
            StrongRead::LocalCopy => consensus.read_local(&group, &row.table, &row.key)?,
            StrongRead::Linearizable => consensus.read(&group, &row.table, &row.key, 0).await?,
        };
        let now_ms = crate::kv::expiry::read_ms(self.node.hlc());
        Ok(value.filter(|v| !v.is_expired(now_ms)))
    }

    /// The TTL of a STRONG put: its own, else the table's default, bounded
    /// by `limits.ttl_s_max`.
    fn strong_ttl(&self, table: &str, ttl_ms: u64) -> Result<u64, KvError> {
        let cfg = self.node.config();
        let t = cfg.table(table).ok_or_else(|| KvError::UnknownTable { table: table.to_string() })?;
        crate::kv::resolve_ttl(t, &cfg.limits, ttl_ms)
    }

    /// Authorizes a KV request and learns its hops.
    fn enter<T: Target>(&self, request: &Request<T>) -> Result<Hops, Status> {
        let (tables, key) = request.get_ref().target();
        let (_, access) = authorize_call(&self.node, request, T::OP, Some(T::PRIVILEGE), &tables, key)?;
        let mut hops = Hops::of(request, &self.node.config().region);
        hops.access = Some(Arc::new(access));
        Ok(hops)
    }

    /// The owner of the request's row in this region, when the request
    /// goes there (decided by `kv::route::forward_in_region`).
    fn owner_here(&self, req: &impl HasRow, hops: &Hops) -> Option<NodeRef> {
        let row = req.row_ref().filter(|r| !r.table.is_empty() && !r.key.is_empty())?;
        let topology = self.node.topology();
        let owner = topology.owner_of(&self.node.config().region, &row.table, &row.key);
        route::forward_in_region(hops.in_region, owner).cloned()
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
        idempotency: Result<Option<Idempotency>, KvError>,
    ) -> Result<WriteOutcome, KvError> {
        let result = async {
            let op = op?;
            let level = convert::write_level(level, "consistency")?;
            match (self.write_path(&op.row, level)?, &self.consensus) {
                (WritePath::Quorum, Some((_, quorum))) => return quorum.write(op, idempotency?).await,
                (WritePath::Strong, _) => {
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

    /// Commits a one-row write here, or, when this node may not commit it
    /// (`kv::route::redirect_write`), sends the original request on with
    /// `call`; `respond` builds the reply from the outcome.
    async fn write_or_redirect<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        (op, level, idempotency): (Result<WriteOp, KvError>, i32, Result<Option<Idempotency>, KvError>),
        hops: &Hops,
        original: Req,
        call: F,
        respond: impl FnOnce(WriteOutcome) -> Resp,
    ) -> Result<Response<Resp>, Status>
    where
        Req: HasRow,
        F: FnOnce(KvClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        match self.write_one(method, op, level, idempotency).await {
            Ok(o) => Ok(Response::new(respond(o))),
            Err(e) => match route::redirect_write(&e, hops.cross_region) {
                Some(home) => self.forward_region(home, hops, original, call).await,
                None => Err(e.into()),
            },
        }
    }

    /// Answers a read, or, when this region's copy was too stale for it
    /// (`kv::route::redirect_read`), sends the original request on with
    /// `call`.
    async fn read_reply<Req, Resp, F, Fut>(
        &self,
        result: Result<Resp, KvError>,
        hops: &Hops,
        original: Req,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: HasRow,
        F: FnOnce(KvClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        match result {
            Ok(response) => Ok(Response::new(response)),
            Err(e) => match route::redirect_read(&e, hops.cross_region) {
                Some(region) => self.forward_region(region, hops, original, call).await,
                None => Err(e.into()),
            },
        }
    }

    /// Runs a put (`value: Some`, with its TTL) or delete on a STRONG
    /// table; None when the row is not in one.
    async fn strong_put_or_delete(
        &self,
        row: &Option<pb::RowRef>,
        value: Option<(Vec<u8>, u64)>,
        level: i32,
        idempotency_key: &str,
    ) -> Result<Option<pb::WriteAck>, Status> {
        let method = if value.is_some() { "put" } else { "delete" };
        let result = async {
            let row = convert::row_ref(row.clone())?;
            let level = convert::write_level(level, "consistency")?;
            if self.write_path(&row, level)? != WritePath::Strong {
                return Ok(None);
            }
            let op = match value {
                Some((value, ttl_ms)) => StrongCommand::Put {
                    table: row.table.clone(),
                    key: row.key.clone(),
                    value,
                    ttl_ms: self.strong_ttl(&row.table, ttl_ms)?,
                },
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
    /// this one (decided by `kv::route::batch_owner`).
    fn batch_owner(&self, req: &pb::BatchRequest) -> Result<Option<NodeRef>, KvError> {
        let topology = self.node.topology();
        let region = &self.node.config().region;
        let owners = batch_rows(req).filter_map(|row| topology.owner_of(region, &row.table, &row.key));
        Ok(route::batch_owner(owners)?.cloned())
    }

    /// Checks a watch: a known table, a region inside the table's zone, a
    /// change feed on, one node in the region (the feed is per node), and
    /// a cursor the feed still covers.
    fn admit_watch(&self, req: pb::WatchRequest) -> Result<crate::kv::feed::Watch, KvError> {
        let cfg = self.node.config();
        if req.table.is_empty() {
            return Err(KvError::MissingField { field: "table" });
        }
        let table =
            cfg.table(&req.table).ok_or_else(|| KvError::UnknownTable { table: req.table.clone() })?;
        if let Some(zone) = table.zone.as_ref().and_then(|z| cfg.zone(z)) {
            if !zone.regions.contains(&cfg.region) {
                return Err(KvError::ResidencyViolation {
                    zone: zone.name.clone(),
                    allowed: zone.regions.clone(),
                    region: cfg.region.clone(),
                });
            }
        }
        if cfg.watch.retention_entries == 0 {
            return Err(KvError::InvalidField {
                field: "table",
                why: "this cluster keeps no change feed (watch.retention_entries = 0)".into(),
            });
        }
        let region_nodes = self.node.topology().nodes(&cfg.region).len();
        if region_nodes > 1 {
            return Err(KvError::InvalidField {
                field: "table",
                why: format!(
                    "region `{}` has {region_nodes} nodes: watches are served by regions of one node so far",
                    cfg.region
                ),
            });
        }
        if req.prefix.len() > cfg.limits.key_bytes_max {
            return Err(KvError::KeyTooLarge { len: req.prefix.len(), max: cfg.limits.key_bytes_max });
        }
        let cursor = if req.cursor.is_empty() {
            None
        } else {
            let c = crate::kv::feed::Cursor::decode(&req.cursor)?;
            crate::kv::feed::check_cursor(&self.node, &c)?;
            Some(c)
        };
        Ok(crate::kv::feed::Watch { table: req.table, prefix: req.prefix, cursor })
    }

    fn token(&self, log_seq: u64) -> Vec<u8> {
        self.node.session_token(&[], log_seq).unwrap_or_default()
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    type WatchStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let _hops = self.enter(&request)?;
        let req = request.into_inner();
        let watch = self.admit_watch(req).map_err(Status::from)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(crate::kv::feed::serve(self.node.clone(), watch, tx));
        metrics::counter!("geokv_watches_total").increment(1);
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let hops = self.enter(&request)?;
        let req = request.into_inner();
        if let Some(owner) = self.owner_here(&req, &hops) {
            return self.forward_to(&owner, &hops, req, |mut c, r| async move { c.get(r).await }).await;
        }
        let copy = req.clone();
        let result = async {
            let (row, level) =
                read_request(req.row, req.consistency, req.max_staleness_ms, &req.session_token)?;
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
                        staleness_ms_max: route::strong_staleness_ms(how),
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
                    let (siblings, context) = register_view(
                        r,
                        crate::kv::expiry::read_ms(self.node.hlc()),
                        self.node.hlc().now().0,
                    );
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
        let call = |mut c: KvClient<Channel>, r| async move { c.get(r).await };
        self.read_reply(result, &hops, copy, call).await
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let hops = self.enter(&request)?;
        let mut req = request.into_inner();
        if let Some(owner) = self.owner_here(&req, &hops) {
            return self.forward_to(&owner, &hops, req, |mut c, r| async move { c.put(r).await }).await;
        }
        let copy = req.clone();
        let key = std::mem::take(&mut req.idempotency_key);
        if let Some(ack) = self
            .strong_put_or_delete(&req.row, Some((req.value.clone(), req.ttl_ms)), req.consistency, &key)
            .await?
        {
            return Ok(Response::new(pb::PutResponse { ack: Some(ack) }));
        }
        let idem = convert::idempotency(key, &req);
        let level = req.consistency;
        let write = (
            self.node.check_context(&req.row, &req.context).and_then(|()| convert::put_op(req)),
            level,
            idem,
        );
        let call = |mut c: KvClient<Channel>, r| async move { c.put(r).await };
        self.write_or_redirect("put", write, &hops, copy, call, |o| pb::PutResponse {
            ack: Some(convert::ack(&o, self.token(o.log_seq))),
        })
        .await
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
        let write = (
            self.node.check_context(&req.row, &req.context).and_then(|()| convert::delete_op(req)),
            level,
            idem,
        );
        let call = |mut c: KvClient<Channel>, r| async move { c.delete(r).await };
        self.write_or_redirect("delete", write, &hops, copy, call, |o| pb::DeleteResponse {
            ack: Some(convert::ack(&o, self.token(o.log_seq))),
        })
        .await
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
                        self.node.check_context(&p.row, &p.context)?;
                        (convert::put_op(p)?, l)
                    }
                    Some(pb::batch_op::Op::Delete(d)) => {
                        let l = d.consistency;
                        self.node.check_context(&d.row, &d.context)?;
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
        let local =
            scan_response(result?, crate::kv::expiry::read_ms(self.node.hlc()), self.node.hlc().now().0);
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
        let write = (op, req.consistency, idem);
        let call = |mut c: KvClient<Channel>, r| async move { c.counter_add(r).await };
        self.write_or_redirect("counter_add", write, &hops, copy, call, |o| pb::CounterAddResponse {
            value: o.counter_value.unwrap_or(0),
            ack: Some(convert::ack(&o, self.token(o.log_seq))),
        })
        .await
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
            let (row, level) =
                read_request(req.row, req.consistency, req.max_staleness_ms, &req.session_token)?;
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
        let call = |mut c: KvClient<Channel>, r| async move { c.counter_get(r).await };
        self.read_reply(result, &hops, copy, call).await
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
        let write = (op, req.consistency, idem);
        let call = |mut c: KvClient<Channel>, r| async move { c.set_add(r).await };
        self.write_or_redirect("set_add", write, &hops, copy, call, |o| pb::SetWriteResponse {
            members: o.members.clone().unwrap_or_default(),
            ack: Some(convert::ack(&o, self.token(o.log_seq))),
        })
        .await
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
        let write = (
            self.node.check_context(&req.row, &req.context).and_then(|()| convert::set_remove_op(req)),
            level,
            idem,
        );
        let call = |mut c: KvClient<Channel>, r| async move { c.set_remove(r).await };
        self.write_or_redirect("set_remove", write, &hops, copy, call, |o| pb::SetWriteResponse {
            members: o.members.clone().unwrap_or_default(),
            ack: Some(convert::ack(&o, self.token(o.log_seq))),
        })
        .await
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
            if self.write_path(&row, None)? != WritePath::Strong {
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
                ttl_ms: self.strong_ttl(&row.table, 0)?,
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
            let (row, level) =
                read_request(req.row, req.consistency, req.max_staleness_ms, &req.session_token)?;
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
        let call = |mut c: KvClient<Channel>, r| async move { c.set_members(r).await };
        self.read_reply(result, &hops, copy, call).await
    }
}

/// The row and level of a read request, its session token checked.
fn read_request(
    row: Option<pb::RowRef>,
    consistency: i32,
    max_staleness_ms: u64,
    session_token: &[u8],
) -> Result<(RowRef, ReadLevel), KvError> {
    let row = convert::row_ref(row)?;
    let level = convert::read_level(consistency, max_staleness_ms)?;
    parse_session(session_token)?;
    Ok((row, level))
}

fn scan_response(page: crate::kv::ScanPage, now_ms: u64, read_hlc: u64) -> pb::ScanResponse {
    let rows = page
        .rows
        .into_iter()
        .map(|r| {
            let (siblings, context) = register_view(&r.row, now_ms, read_hlc);
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
