//! Protocol types stop here: each request is converted once into domain
//! types, with a typed error naming any missing or invalid field.

use geokv_proto::v1 as pb;

use crate::config::Level;
use crate::error::KvError;
use crate::kv::commit::{Idempotency, WriteOutcome};
use crate::kv::row::RowValue;
use crate::kv::{parse_context, Node, ReadInfo, RowOp, RowRef, SiblingValue, WriteOp};
use crate::residency::{Locality, ReadLevel};

/// Idempotency keys longer than this are refused: they are stored per write.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;

pub fn row_ref(row: Option<pb::RowRef>) -> Result<RowRef, KvError> {
    let row = row.ok_or(KvError::MissingField { field: "row" })?;
    let locality = match row.locality {
        None => Locality::Unset,
        Some(pb::row_ref::Locality::HomeRegion(r)) if r.is_empty() => Locality::Unset,
        Some(pb::row_ref::Locality::HomeRegion(r)) => Locality::HomeRegion(r),
        Some(pb::row_ref::Locality::LocalityValue(v)) if v.is_empty() => Locality::Unset,
        Some(pb::row_ref::Locality::LocalityValue(v)) => Locality::Value(v),
    };
    Ok(RowRef { table: row.table, key: row.key, locality })
}

pub fn write_level(value: i32, field: &'static str) -> Result<Option<Level>, KvError> {
    match pb::WriteConsistency::try_from(value) {
        Ok(pb::WriteConsistency::Unspecified) => Ok(None),
        Ok(pb::WriteConsistency::WriteLocal) => Ok(Some(Level::Local)),
        Ok(pb::WriteConsistency::WriteEventual) => Ok(Some(Level::Eventual)),
        Ok(pb::WriteConsistency::WriteQuorum) => Ok(Some(Level::Quorum)),
        Ok(pb::WriteConsistency::WriteStrong) => Ok(Some(Level::Strong)),
        Err(_) => Err(KvError::UnknownConsistency { field, value }),
    }
}

pub fn read_level(value: i32, max_staleness_ms: u64) -> Result<ReadLevel, KvError> {
    match pb::ReadConsistency::try_from(value) {
        Ok(pb::ReadConsistency::Unspecified) | Ok(pb::ReadConsistency::ReadLocal) => Ok(ReadLevel::Local),
        Ok(pb::ReadConsistency::ReadBounded) => {
            if max_staleness_ms == 0 {
                return Err(KvError::InvalidField {
                    field: "max_staleness_ms",
                    why: "READ_BOUNDED needs a staleness bound above 0".into(),
                });
            }
            Ok(ReadLevel::Bounded { max_staleness_ms })
        }
        Ok(pb::ReadConsistency::ReadSession) => Ok(ReadLevel::Session),
        Ok(pb::ReadConsistency::ReadQuorum) => Ok(ReadLevel::Quorum),
        Ok(pb::ReadConsistency::ReadStrong) => Ok(ReadLevel::Strong),
        Err(_) => Err(KvError::UnknownConsistency { field: "consistency", value }),
    }
}

fn optional_context(bytes: &[u8]) -> Result<Option<crate::causality::VersionVector>, KvError> {
    if bytes.is_empty() {
        Ok(None)
    } else {
        parse_context(bytes).map(Some)
    }
}

pub fn idempotency(key: String, request: &impl prost::Message) -> Result<Option<Idempotency>, KvError> {
    if key.is_empty() {
        return Ok(None);
    }
    if key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(KvError::InvalidField {
            field: "idempotency_key",
            why: format!("{} bytes; the limit is {IDEMPOTENCY_KEY_BYTES_MAX}", key.len()),
        });
    }
    // The request was encoded with its idempotency key cleared by the caller,
    // so the hash covers exactly what the request asks for.
    let bytes = request.encode_to_vec();
    let hash = (u64::from(crc32fast::hash(&bytes)) << 32) | bytes.len() as u64;
    Ok(Some(Idempotency { key, request_hash: hash }))
}

pub fn put_op(req: pb::PutRequest) -> Result<WriteOp, KvError> {
    let context = parse_context(&req.context)?;
    Ok(WriteOp { row: row_ref(req.row)?, op: RowOp::Put { value: req.value, context, ttl_ms: req.ttl_ms } })
}

pub fn delete_op(req: pb::DeleteRequest) -> Result<WriteOp, KvError> {
    let context = optional_context(&req.context)?;
    Ok(WriteOp { row: row_ref(req.row)?, op: RowOp::Delete { context } })
}

pub fn set_remove_op(req: pb::SetRemoveRequest) -> Result<WriteOp, KvError> {
    let context = optional_context(&req.context)?;
    Ok(WriteOp { row: row_ref(req.row)?, op: RowOp::SetRemove { members: req.members, context } })
}

pub fn ack(o: &WriteOutcome, session_token: Vec<u8>) -> pb::WriteAck {
    pb::WriteAck {
        context: o.context.clone(),
        hlc: o.hlc,
        home_region: o.home_region.clone(),
        epoch: o.epoch,
        accepted_by_region: o.accepted_by_region.clone(),
        session_token,
        replayed: o.replayed,
        version: 0,
    }
}

pub fn read_info(i: ReadInfo) -> pb::ReadInfo {
    pb::ReadInfo {
        served_by_region: i.served_by_region,
        staleness_ms_max: i.staleness_ms_max,
        session_token: i.session_token,
    }
}

pub fn siblings(values: Vec<SiblingValue>) -> Vec<pb::Sibling> {
    values.into_iter().map(|s| pb::Sibling { value: s.value, hlc: s.hlc, origin: s.origin }).collect()
}

/// One node's erasure receipt.
pub fn receipt(node: &Node, r: crate::kv::subject::Receipt) -> pb::ErasureReceipt {
    pb::ErasureReceipt {
        region: node.config().region.clone(),
        node: node.config().node_id.clone(),
        subject_hash: r.subject_hash,
        fence_hlc: r.fence_hlc,
        rows: r.rows,
        values: r.values,
        bytes: r.bytes,
        counters_kept: r.counters_kept,
        erased_at_ms: r.erased_at_ms,
        took_ms: r.took_ms,
    }
}

/// A subject's row as this node holds it, for an export.
pub fn exported_row(
    node: &Node,
    r: &crate::kv::subject::SubjectRow,
    now_ms: u64,
    read_hlc: u64,
) -> pb::ExportedRow {
    let (values, _) = crate::kv::register_view(&r.row, now_ms, read_hlc);
    let (counter_value, set_members) = match &r.row.value {
        RowValue::Counter(c) => (c.value(), Vec::new()),
        RowValue::Set(s) => (0, s.members().into_iter().map(<[u8]>::to_vec).collect()),
        _ => (0, Vec::new()),
    };
    pb::ExportedRow {
        table: r.table.clone(),
        key: r.key.clone(),
        kind: r.row.value.kind().to_string(),
        siblings: siblings(values),
        counter_value,
        set_members,
        home_region: r.row.home_region.clone(),
        zone: r.row.zone.clone(),
        region: node.config().region.clone(),
        node: node.config().node_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_levels_are_typed() {
        assert_eq!(write_level(99, "consistency").unwrap_err().reason(), "UNKNOWN_CONSISTENCY");
        assert_eq!(read_level(-1, 0).unwrap_err().reason(), "UNKNOWN_CONSISTENCY");
        assert_eq!(
            read_level(pb::ReadConsistency::ReadBounded as i32, 0).unwrap_err().reason(),
            "INVALID_ARGUMENT"
        );
        assert_eq!(write_level(0, "consistency").unwrap(), None);
    }

    #[test]
    fn missing_row_and_bad_context_are_typed() {
        assert_eq!(row_ref(None).unwrap_err().reason(), "MISSING_FIELD");
        let req = pb::PutRequest {
            row: Some(pb::RowRef { table: "t".into(), key: b"k".to_vec(), locality: None }),
            value: b"v".to_vec(),
            context: b"\x01garbage".to_vec(),
            ..Default::default()
        };
        assert_eq!(put_op(req).unwrap_err().reason(), "MALFORMED_CONTEXT");
    }
}
