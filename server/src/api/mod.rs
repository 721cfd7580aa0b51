//! gRPC handlers: protobuf in, domain call, protobuf out. Nothing here
//! decides anything; [`convert`] turns requests into domain types once.
//!
//! # Layout
//! - [`convert`]: proto <-> domain conversions and field validation.
//! - [`KvService`]: the `geokv.v1.KV` service.
//! - [`AdminService`]: the `geokv.v1.Admin` service.

pub mod convert;

use std::sync::Arc;

use geokv_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::error::KvError;
use crate::kv::row::RowValue;
use crate::kv::{parse_session, register_view, Node, RowOp, WriteOp, WriteRequest};

/// The `geokv.v1.KV` service over one node.
#[derive(Clone)]
pub struct KvService {
    node: Arc<Node>,
}

impl KvService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
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
            let req = WriteRequest { ops: vec![op], level, idempotency: idempotency? };
            let mut outcomes = self.node.write(req).await?;
            outcomes.pop().ok_or(KvError::Storage("committer returned no outcome".into()))
        }
        .await;
        Self::count(method, &result);
        result
    }

    fn token(&self, log_seq: u64) -> Vec<u8> {
        self.node.session_token(&[], log_seq).unwrap_or_default()
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        let result = (|| {
            let row = convert::row_ref(req.row)?;
            let level = convert::read_level(req.consistency, req.max_staleness_ms)?;
            parse_session(&req.session_token)?;
            let read = self.node.read(&row, level, &req.session_token)?;
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
        })();
        Self::count("get", &result);
        Ok(Response::new(result?))
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let mut req = request.into_inner();
        let key = std::mem::take(&mut req.idempotency_key);
        let idem = convert::idempotency(key, &req);
        let level = req.consistency;
        let o = self.write_one("put", convert::put_op(req), level, idem).await?;
        Ok(Response::new(pb::PutResponse { ack: Some(convert::ack(&o, self.token(o.log_seq))) }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let mut req = request.into_inner();
        let key = std::mem::take(&mut req.idempotency_key);
        let idem = convert::idempotency(key, &req);
        let level = req.consistency;
        let o = self.write_one("delete", convert::delete_op(req), level, idem).await?;
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
        let mut req = request.into_inner();
        let key = std::mem::take(&mut req.idempotency_key);
        let idem = convert::idempotency(key, &req);
        let op = convert::row_ref(req.row.take())
            .map(|row| WriteOp { row, op: RowOp::CounterAdd { delta: req.delta } });
        let o = self.write_one("counter_add", op, req.consistency, idem).await?;
        Ok(Response::new(pb::CounterAddResponse {
            value: o.counter_value.unwrap_or(0),
            ack: Some(convert::ack(&o, self.token(o.log_seq))),
        }))
    }

    async fn counter_get(
        &self,
        request: Request<pb::CounterGetRequest>,
    ) -> Result<Response<pb::CounterGetResponse>, Status> {
        let req = request.into_inner();
        let result = (|| {
            let row = convert::row_ref(req.row)?;
            let level = convert::read_level(req.consistency, req.max_staleness_ms)?;
            parse_session(&req.session_token)?;
            let read = self.node.read(&row, level, &req.session_token)?;
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
        })();
        Self::count("counter_get", &result);
        Ok(Response::new(result?))
    }

    async fn set_add(
        &self,
        request: Request<pb::SetAddRequest>,
    ) -> Result<Response<pb::SetWriteResponse>, Status> {
        let mut req = request.into_inner();
        let key = std::mem::take(&mut req.idempotency_key);
        let idem = convert::idempotency(key, &req);
        let members = std::mem::take(&mut req.members);
        let op = convert::row_ref(req.row.take()).map(|row| WriteOp { row, op: RowOp::SetAdd { members } });
        let o = self.write_one("set_add", op, req.consistency, idem).await?;
        Ok(Response::new(pb::SetWriteResponse {
            members: o.members.clone().unwrap_or_default(),
            ack: Some(convert::ack(&o, self.token(o.log_seq))),
        }))
    }

    async fn set_remove(
        &self,
        request: Request<pb::SetRemoveRequest>,
    ) -> Result<Response<pb::SetWriteResponse>, Status> {
        let mut req = request.into_inner();
        let key = std::mem::take(&mut req.idempotency_key);
        let idem = convert::idempotency(key, &req);
        let level = req.consistency;
        let o = self.write_one("set_remove", convert::set_remove_op(req), level, idem).await?;
        Ok(Response::new(pb::SetWriteResponse {
            members: o.members.clone().unwrap_or_default(),
            ack: Some(convert::ack(&o, self.token(o.log_seq))),
        }))
    }

    async fn set_members(
        &self,
        request: Request<pb::SetMembersRequest>,
    ) -> Result<Response<pb::SetMembersResponse>, Status> {
        let req = request.into_inner();
        let result = (|| {
            let row = convert::row_ref(req.row)?;
            let level = convert::read_level(req.consistency, req.max_staleness_ms)?;
            parse_session(&req.session_token)?;
            let read = self.node.read(&row, level, &req.session_token)?;
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
        })();
        Self::count("set_members", &result);
        Ok(Response::new(result?))
    }
}

/// The `geokv.v1.Admin` service over one node.
#[derive(Clone)]
pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
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
}
