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
use std::time::{Duration, Instant};

use geokv_proto::v1 as pb;
use pb::kv_client::KvClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::config::Level;
use crate::consensus::control::home_key;
use crate::consensus::quorum::Quorum;
use crate::consensus::strong::{StrongCommand, StrongReply, StrongValue};
use crate::consensus::{strong_group, Command, Consensus, Reply as ConsensusReply};
use crate::error::KvError;
use crate::kv::row::RowValue;
use crate::kv::{parse_session, register_view, Node, ReadInfo, ReadResult, RowOp, RowRef, WriteOp, WriteRequest};
use crate::residency::{Placement, ReadLevel};

/// Metadata set on a request one node forwards to another, so it is never
/// forwarded twice.
pub const FORWARDED_HEADER: &str = "geokv-forwarded-by";
/// Metadata carrying a client's idempotency key on calls whose message has
/// no field for it (compare-and-set).
pub const IDEMPOTENCY_HEADER: &str = "geokv-idempotency-key";
/// How long a SESSION read waits for replication before it is forwarded.
const SESSION_WAIT: Duration = Duration::from_millis(300);
const SESSION_POLL: Duration = Duration::from_millis(5);
/// Deadline of a forwarded request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// KV clients of one node per other region, connected lazily.
#[derive(Clone, Default)]
pub struct Peers {
    kv: BTreeMap<String, KvClient<Channel>>,
}

impl Peers {
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        let mut kv = BTreeMap::new();
        for region in cfg.peer_regions() {
            let Some(node) = region.nodes.first() else { continue };
            let url =
                if node.addr.contains("://") { node.addr.clone() } else { format!("http://{}", node.addr) };
            match tonic::transport::Endpoint::from_shared(url) {
                Ok(ep) => {
                    let ep = ep
                        .connect_timeout(Duration::from_secs(2))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(1))
                        .keep_alive_timeout(Duration::from_secs(3))
                        .keep_alive_while_idle(true);
                    kv.insert(region.name.clone(), KvClient::new(ep.connect_lazy()));
                }
                Err(e) => tracing::warn!(region = %region.name, error = %e, "bad peer address"),
            }
        }
        Self { kv }
    }
}

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

fn forwarded<T>(r: &Request<T>) -> bool {
    r.metadata().contains_key(FORWARDED_HEADER)
}

impl KvService {
    pub fn new(node: Arc<Node>, peers: Peers, consensus: Option<Arc<Consensus>>) -> Self {
        let consensus = consensus.map(|c| (c.clone(), Arc::new(Quorum::new(c, node.clone()))));
        Self { node, peers, consensus }
    }

    /// The path of a write at `level` (None = the table's default) to `table`.
    /// Every write to a STRONG table goes through its consensus group; a
    /// STRONG level on another table is refused.
    fn write_path(&self, table: &str, level: Option<Level>) -> Result<Path, KvError> {
        let t = self.node.config().table(table).ok_or_else(|| KvError::UnknownTable { table: table.into() })?;
        let strong_table = t.default_consistency == Level::Strong;
        match level.unwrap_or(t.default_consistency) {
            _ if strong_table && self.consensus.is_some() => Ok(Path::Strong),
            Level::Strong if self.consensus.is_some() => Err(KvError::InvalidField {
                field: "consistency",
                why: format!(
                    "table `{table}` is not a STRONG table; STRONG rows live in tables with \
                     default_consistency = \"strong\""
                ),
            }),
            Level::Quorum if self.consensus.is_some() => Ok(Path::Quorum),
            _ => Ok(Path::Normal),
        }
    }

    /// The path of a read at `level` from `table`.
    fn read_path(&self, table: &str, level: ReadLevel) -> Result<Path, KvError> {
        let t = self.node.config().table(table).ok_or_else(|| KvError::UnknownTable { table: table.into() })?;
        Ok(match (&self.consensus, t.default_consistency == Level::Strong, level) {
            (Some(_), true, _) => Path::Strong,
            (Some(_), false, ReadLevel::Quorum) => Path::Quorum,
            _ => Path::Normal,
        })
    }

    /// Reads a row at any level but STRONG-table ones.
    async fn read_row(&self, row: &RowRef, level: ReadLevel, token: &[u8]) -> Result<ReadResult, KvError> {
        match (self.read_path(&row.table, level)?, &self.consensus) {
            (Path::Quorum, Some((_, quorum))) => {
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
            (Path::Strong, _) => Err(KvError::WrongType {
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
        let table = cfg.table(&row.table).ok_or_else(|| KvError::UnknownTable { table: row.table.clone() })?;
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
    async fn strong_read(&self, row: &RowRef, level: ReadLevel) -> Result<Option<StrongValue>, KvError> {
        let (consensus, group, _) = self.strong_target(row)?;
        if level != ReadLevel::Strong && consensus.group(&group).is_some() {
            return consensus.read_local(&group, &row.table, &row.key);
        }
        consensus.read(&group, &row.table, &row.key, 0).await
    }

    /// Sends the request to a node of `region`, marked as forwarded.
    async fn forward<Req, Resp, F, Fut>(
        &self,
        region: &str,
        req: Req,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(KvClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let Some(client) = self.peers.kv.get(region).cloned() else {
            return Err(KvError::RegionUnreachable {
                region: region.into(),
                why: "no node configured".into(),
            }
            .into());
        };
        let mut request = Request::new(req);
        request.set_timeout(FORWARD_TIMEOUT);
        if let Ok(v) = self.node.config().region.parse() {
            request.metadata_mut().insert(FORWARDED_HEADER, v);
        }
        metrics::counter!("geokv_forwarded_total", "to" => region.to_string()).increment(1);
        call(client, request).await
    }

    /// Reads a row, giving SESSION reads a bounded wait for replication.
    async fn read_waiting(
        &self,
        row: &crate::kv::RowRef,
        level: crate::residency::ReadLevel,
        token: &[u8],
    ) -> Result<crate::kv::ReadResult, KvError> {
        let started = Instant::now();
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
            match (self.write_path(&op.row.table, level)?, &self.consensus) {
                (Path::Quorum, Some((_, quorum))) => return quorum.write(op, idempotency?).await,
                (Path::Strong, _) => {
                    return Err(KvError::InvalidField {
                        field: "consistency",
                        why: format!("table `{}` is STRONG and holds registers: use put, delete or compare-and-set", op.row.table),
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
            if self.write_path(&row.table, level)? != Path::Strong {
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

    fn token(&self, log_seq: u64) -> Vec<u8> {
        self.node.session_token(&[], log_seq).unwrap_or_default()
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let was_forwarded = forwarded(&request);
        let req = request.into_inner();
        let copy = req.clone();
        let result = async {
            let row = convert::row_ref(req.row)?;
            let level = convert::read_level(req.consistency, req.max_staleness_ms)?;
            parse_session(&req.session_token)?;
            if self.read_path(&row.table, level)? == Path::Strong {
                let value = self.strong_read(&row, level).await?;
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
                        staleness_ms_max: 0,
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
            Err(KvError::ReplicaStale { region, .. }) if !was_forwarded => {
                self.forward(&region, copy, |mut c, r| async move { c.get(r).await }).await
            }
            other => Ok(Response::new(other?)),
        }
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let was_forwarded = forwarded(&request);
        let mut req = request.into_inner();
        let copy = req.clone();
        let key = std::mem::take(&mut req.idempotency_key);
        if let Some(ack) = self.strong_put_or_delete(&req.row, Some(req.value.clone()), req.consistency, &key).await? {
            return Ok(Response::new(pb::PutResponse { ack: Some(ack) }));
        }
        let idem = convert::idempotency(key, &req);
        let level = req.consistency;
        let o = match self.write_one("put", convert::put_op(req), level, idem).await {
            Err(KvError::NotHome { home, .. }) if !was_forwarded => {
                return self.forward(&home, copy, |mut c, r| async move { c.put(r).await }).await;
            }
            other => other?,
        };
        Ok(Response::new(pb::PutResponse { ack: Some(convert::ack(&o, self.token(o.log_seq))) }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let was_forwarded = forwarded(&request);
        let mut req = request.into_inner();
        let copy = req.clone();
        let key = std::mem::take(&mut req.idempotency_key);
        if let Some(ack) = self.strong_put_or_delete(&req.row, None, req.consistency, &key).await? {
            return Ok(Response::new(pb::DeleteResponse { ack: Some(ack) }));
        }
        let idem = convert::idempotency(key, &req);
        let level = req.consistency;
        let o = match self.write_one("delete", convert::delete_op(req), level, idem).await {
            Err(KvError::NotHome { home, .. }) if !was_forwarded => {
                return self.forward(&home, copy, |mut c, r| async move { c.delete(r).await }).await;
            }
            other => other?,
        };
        Ok(Response::new(pb::DeleteResponse { ack: Some(convert::ack(&o, self.token(o.log_seq))) }))
    }

    async fn batch(&self, request: Request<pb::BatchRequest>) -> Result<Response<pb::BatchResponse>, Status> {
        let mut req = request.into_inner();
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
        let req = request.into_inner();
        let limit = if req.limit == 0 { 100 } else { req.limit as usize };
        let result = self.node.scan(&req.table, &req.prefix, &req.start_after, limit, req.include_deleted);
        Self::count("scan", &result);
        let page = result?;
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
        Ok(Response::new(pb::ScanResponse {
            rows,
            more: page.next_start_after.is_some(),
            next_start_after: page.next_start_after.unwrap_or_default(),
            info: Some(convert::read_info(page.info)),
        }))
    }

    async fn counter_add(
        &self,
        request: Request<pb::CounterAddRequest>,
    ) -> Result<Response<pb::CounterAddResponse>, Status> {
        let was_forwarded = forwarded(&request);
        let mut req = request.into_inner();
        let copy = req.clone();
        let key = std::mem::take(&mut req.idempotency_key);
        let idem = convert::idempotency(key, &req);
        let op = convert::row_ref(req.row.take())
            .map(|row| WriteOp { row, op: RowOp::CounterAdd { delta: req.delta } });
        let o = match self.write_one("counter_add", op, req.consistency, idem).await {
            Err(KvError::NotHome { home, .. }) if !was_forwarded => {
                return self.forward(&home, copy, |mut c, r| async move { c.counter_add(r).await }).await;
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
        let was_forwarded = forwarded(&request);
        let req = request.into_inner();
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
            Err(KvError::ReplicaStale { region, .. }) if !was_forwarded => {
                self.forward(&region, copy, |mut c, r| async move { c.counter_get(r).await }).await
            }
            other => Ok(Response::new(other?)),
        }
    }

    async fn set_add(
        &self,
        request: Request<pb::SetAddRequest>,
    ) -> Result<Response<pb::SetWriteResponse>, Status> {
        let was_forwarded = forwarded(&request);
        let mut req = request.into_inner();
        let copy = req.clone();
        let key = std::mem::take(&mut req.idempotency_key);
        let idem = convert::idempotency(key, &req);
        let members = std::mem::take(&mut req.members);
        let op = convert::row_ref(req.row.take()).map(|row| WriteOp { row, op: RowOp::SetAdd { members } });
        let o = match self.write_one("set_add", op, req.consistency, idem).await {
            Err(KvError::NotHome { home, .. }) if !was_forwarded => {
                return self.forward(&home, copy, |mut c, r| async move { c.set_add(r).await }).await;
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
        let was_forwarded = forwarded(&request);
        let mut req = request.into_inner();
        let copy = req.clone();
        let key = std::mem::take(&mut req.idempotency_key);
        let idem = convert::idempotency(key, &req);
        let level = req.consistency;
        let o = match self.write_one("set_remove", convert::set_remove_op(req), level, idem).await {
            Err(KvError::NotHome { home, .. }) if !was_forwarded => {
                return self.forward(&home, copy, |mut c, r| async move { c.set_remove(r).await }).await;
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
        let idempotency_key = request
            .metadata()
            .get(IDEMPOTENCY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let req = request.into_inner();
        let result = async {
            let row = convert::row_ref(req.row)?;
            self.node.config().table(&row.table).ok_or_else(|| KvError::UnknownTable { table: row.table.clone() })?;
            if self.write_path(&row.table, None)? != Path::Strong {
                return Err(KvError::InvalidField {
                    field: "row.table",
                    why: format!("compare-and-set needs a STRONG table; `{}` is not one", row.table),
                });
            }
            if let Some(v) = &req.value {
                if v.len() > self.node.config().limits.value_bytes_max {
                    return Err(KvError::ValueTooLarge { len: v.len(), max: self.node.config().limits.value_bytes_max });
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
        let was_forwarded = forwarded(&request);
        let req = request.into_inner();
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
            Err(KvError::ReplicaStale { region, .. }) if !was_forwarded => {
                self.forward(&region, copy, |mut c, r| async move { c.set_members(r).await }).await
            }
            other => Ok(Response::new(other?)),
        }
    }
}

/// The `geokv.v1.Admin` service over one node.
#[derive(Clone)]
pub struct AdminService {
    node: Arc<Node>,
    replicator: Arc<crate::replication::Replicator>,
}

impl AdminService {
    pub fn new(node: Arc<Node>, replicator: Arc<crate::replication::Replicator>) -> Self {
        Self { node, replicator }
    }

    fn link(&self, s: crate::replication::ship::LinkSnapshot) -> pb::ReplicationLink {
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
        }
    }

    fn control(&self, destination: &str, paused: bool) -> Result<pb::ReplicationControlResponse, Status> {
        let Some(link) = self.replicator.link(destination) else {
            return Err(KvError::UnknownRegion {
                region: destination.to_string(),
                known: self.replicator.links().iter().map(|l| l.destination.clone()).collect(),
            }
            .into());
        };
        link.set_paused(paused);
        tracing::info!(destination, paused, "replication control");
        Ok(pb::ReplicationControlResponse { link: Some(self.link(link.snapshot(&self.node))) })
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn node_status(
        &self,
        _request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusResponse>, Status> {
        let cfg = self.node.config();
        let conflicts = self.node.conflicts();
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
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let cfg = self.node.config();
        let regions = cfg
            .regions
            .iter()
            .map(|r| {
                let is_self = r.name == cfg.region;
                let mut client_addrs: Vec<String> =
                    r.nodes.iter().map(|n| n.client_addr.clone().unwrap_or_else(|| n.addr.clone())).collect();
                if is_self && client_addrs.is_empty() {
                    client_addrs.push(cfg.listen.to_string());
                }
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
        _request: Request<pb::ReplicationStatusRequest>,
    ) -> Result<Response<pb::ReplicationStatusResponse>, Status> {
        let links = self.replicator.links().into_iter().map(|l| self.link(l.snapshot(&self.node))).collect();
        Ok(Response::new(pb::ReplicationStatusResponse { links }))
    }

    async fn pause_replication(
        &self,
        request: Request<pb::ReplicationControlRequest>,
    ) -> Result<Response<pb::ReplicationControlResponse>, Status> {
        Ok(Response::new(self.control(&request.into_inner().destination, true)?))
    }

    async fn resume_replication(
        &self,
        request: Request<pb::ReplicationControlRequest>,
    ) -> Result<Response<pb::ReplicationControlResponse>, Status> {
        Ok(Response::new(self.control(&request.into_inner().destination, false)?))
    }

    async fn residency_audit(
        &self,
        _request: Request<pb::ResidencyAuditRequest>,
    ) -> Result<Response<pb::ResidencyAuditResponse>, Status> {
        let node = self.node.clone();
        let (checked, findings) = tokio::task::spawn_blocking(move || node.residency_audit())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let region = self.node.config().region.clone();
        let violations = findings
            .into_iter()
            .map(|f| pb::ResidencyViolationRow {
                table: f.table,
                key: f.key,
                zone: f.zone,
                allowed_regions: f.allowed_regions,
                stored_in_region: region.clone(),
            })
            .collect();
        Ok(Response::new(pb::ResidencyAuditResponse { region, rows_checked: checked, violations }))
    }

    async fn digest(
        &self,
        _request: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestResponse>, Status> {
        let node = self.node.clone();
        let digests = tokio::task::spawn_blocking(move || node.digest())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::DigestResponse {
            region: self.node.config().region.clone(),
            digests: digests
                .into_iter()
                .map(|d| pb::ZoneDigest { table: d.table, zone: d.zone, rows: d.rows, digest: d.digest })
                .collect(),
        }))
    }
}
