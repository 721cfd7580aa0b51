//! Errors a client can see, each with a stable machine-readable reason.
//!
//! Library code returns [`KvError`]; the gRPC layer turns it into a status
//! whose code fits the failure and whose details carry a
//! `google.rpc.ErrorInfo { reason, domain: "geokv.io", metadata }`. The
//! reasons are part of the API: they never change meaning, and
//! `docs/error-codes.md` lists them.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A request-level failure with its stable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("field `{field}` is required")]
    MissingField { field: &'static str },
    #[error("field `{field}` is invalid: {why}")]
    InvalidField { field: &'static str, why: String },
    #[error("unknown table `{table}`")]
    UnknownTable { table: String },
    #[error("unknown region `{region}`; known regions: {known:?}")]
    UnknownRegion { region: String, known: Vec<String> },
    #[error("locality value `{value}` is not mapped to a region by table `{table}`")]
    UnknownLocality { table: String, value: String },
    #[error(
        "table `{table}` is homed by row and has no default home: set a home region or a locality value"
    )]
    MissingLocality { table: String },
    #[error("key is {len} bytes; the limit is {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value is {len} bytes; the limit is {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("batch has {len} operations; the limit is {max}")]
    BatchTooLarge { len: usize, max: usize },
    #[error("causal context does not decode: {why}")]
    MalformedContext { why: String },
    #[error("session token does not decode: {why}")]
    MalformedSessionToken { why: String },
    #[error("unknown consistency level {value} for field `{field}`")]
    UnknownConsistency { field: &'static str, value: i32 },
    #[error("consistency level {level} needs other regions, which this deployment cannot reach yet")]
    LevelUnavailable { level: String },
    #[error("row is stored in region `{home}`; this node is in `{here}` and cannot route there yet")]
    NotHome { home: String, here: String },
    #[error("row may only be stored in {allowed:?} (zone `{zone}`); region `{region}` is outside it")]
    ResidencyViolation { zone: String, allowed: Vec<String>, region: String },
    #[error("row `{key}` is homed in `{existing}`, not `{requested}`")]
    HomeMismatch { key: String, existing: String, requested: String },
    #[error("row `{key}` holds a {actual}, not a {expected}")]
    WrongType { key: String, expected: &'static str, actual: &'static str },
    #[error("idempotency key `{key}` was already used for a different request")]
    IdempotencyKeyReused { key: String },
    #[error("stored record for {what} is corrupt: {why}")]
    Corrupt { what: String, why: String },
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("clock of the request is {ahead_ms} ms ahead; the limit is {max_ms} ms")]
    ClockOffset { ahead_ms: u64, max_ms: u64 },
    #[error("the replica in this region is not fresh enough ({why}); region `{region}` can answer")]
    ReplicaStale { region: String, why: String },
    #[error("region `{region}` cannot be reached: {why}")]
    RegionUnreachable { region: String, why: String },
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("counter overflow")]
    CounterOverflow,
    #[error(
        "replication to `{destination}` is {backlog_entries} entries behind (bound {bound_entries}); retry after {retry_after_ms} ms"
    )]
    ReplicationBackpressure {
        destination: String,
        backlog_entries: u64,
        bound_entries: u64,
        retry_after_ms: u64,
    },
    #[error("home `{home}`: {why} (this region holds epoch {epoch}, the current epoch is {current})")]
    Fenced {
        home: String,
        epoch: u64,
        current: u64,
        why: String,
        /// The region serving the home now, when known (a request that was
        /// not forwarded yet is sent there).
        holder: Option<String>,
    },
    #[error("home `{home}` has no region serving it right now: {why}")]
    HomeUnavailable { home: String, why: String },
    #[error("consensus group `{group}` cannot commit: {why}")]
    QuorumUnavailable { group: String, why: String },
}

impl KvError {
    /// The stable reason string carried in `ErrorInfo.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            KvError::MissingField { .. } => "MISSING_FIELD",
            KvError::InvalidField { .. } => "INVALID_ARGUMENT",
            KvError::UnknownTable { .. } => "UNKNOWN_TABLE",
            KvError::UnknownRegion { .. } => "UNKNOWN_REGION",
            KvError::UnknownLocality { .. } => "UNKNOWN_LOCALITY",
            KvError::MissingLocality { .. } => "MISSING_LOCALITY",
            KvError::KeyTooLarge { .. } => "KEY_TOO_LARGE",
            KvError::ValueTooLarge { .. } => "VALUE_TOO_LARGE",
            KvError::BatchTooLarge { .. } => "BATCH_TOO_LARGE",
            KvError::MalformedContext { .. } => "MALFORMED_CONTEXT",
            KvError::MalformedSessionToken { .. } => "MALFORMED_SESSION_TOKEN",
            KvError::UnknownConsistency { .. } => "UNKNOWN_CONSISTENCY",
            KvError::LevelUnavailable { .. } => "LEVEL_UNAVAILABLE",
            KvError::NotHome { .. } => "NOT_HOME",
            KvError::ResidencyViolation { .. } => "RESIDENCY_VIOLATION",
            KvError::HomeMismatch { .. } => "HOME_MISMATCH",
            KvError::WrongType { .. } => "WRONG_TYPE",
            KvError::IdempotencyKeyReused { .. } => "IDEMPOTENCY_KEY_REUSED",
            KvError::Corrupt { .. } => "DATA_CORRUPTION",
            KvError::Storage(_) => "STORAGE_FAILURE",
            KvError::ClockOffset { .. } => "CLOCK_OFFSET",
            KvError::ShuttingDown => "SHUTTING_DOWN",
            KvError::ReplicaStale { .. } => "REPLICA_STALE",
            KvError::RegionUnreachable { .. } => "REGION_UNREACHABLE",
            KvError::CounterOverflow => "COUNTER_OVERFLOW",
            KvError::ReplicationBackpressure { .. } => "REPLICATION_BACKPRESSURE",
            KvError::Fenced { .. } => "FENCED",
            KvError::HomeUnavailable { .. } => "HOME_UNAVAILABLE",
            KvError::QuorumUnavailable { .. } => "QUORUM_UNAVAILABLE",
        }
    }

    /// The gRPC code that fits the failure.
    pub fn code(&self) -> Code {
        match self {
            KvError::MissingField { .. }
            | KvError::InvalidField { .. }
            | KvError::UnknownRegion { .. }
            | KvError::UnknownLocality { .. }
            | KvError::MissingLocality { .. }
            | KvError::KeyTooLarge { .. }
            | KvError::ValueTooLarge { .. }
            | KvError::BatchTooLarge { .. }
            | KvError::MalformedContext { .. }
            | KvError::MalformedSessionToken { .. }
            | KvError::UnknownConsistency { .. } => Code::InvalidArgument,
            KvError::UnknownTable { .. } => Code::NotFound,
            KvError::LevelUnavailable { .. }
            | KvError::ShuttingDown
            | KvError::ReplicaStale { .. }
            | KvError::RegionUnreachable { .. }
            | KvError::HomeUnavailable { .. }
            | KvError::QuorumUnavailable { .. } => Code::Unavailable,
            KvError::NotHome { .. }
            | KvError::ResidencyViolation { .. }
            | KvError::HomeMismatch { .. }
            | KvError::WrongType { .. }
            | KvError::IdempotencyKeyReused { .. }
            | KvError::ClockOffset { .. }
            | KvError::CounterOverflow
            | KvError::Fenced { .. } => Code::FailedPrecondition,
            KvError::Corrupt { .. } => Code::DataLoss,
            KvError::ReplicationBackpressure { .. } => Code::ResourceExhausted,
            KvError::Storage(_) => Code::Internal,
        }
    }

    /// Machine-readable facts that clients may act on (e.g. the allowed
    /// regions of a residency violation).
    fn metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        match self {
            KvError::MissingField { field } | KvError::InvalidField { field, .. } => {
                m.insert("field".into(), field.to_string());
            }
            KvError::UnknownConsistency { field, value } => {
                m.insert("field".into(), field.to_string());
                m.insert("value".into(), value.to_string());
            }
            KvError::UnknownTable { table } | KvError::MissingLocality { table } => {
                m.insert("table".into(), table.clone());
            }
            KvError::ResidencyViolation { zone, allowed, region } => {
                m.insert("zone".into(), zone.clone());
                m.insert("allowed_regions".into(), allowed.join(","));
                m.insert("region".into(), region.clone());
            }
            KvError::ReplicaStale { region, .. } | KvError::RegionUnreachable { region, .. } => {
                m.insert("region".into(), region.clone());
            }
            KvError::Fenced { home, epoch, current, holder, .. } => {
                m.insert("home".into(), home.clone());
                if let Some(h) = holder {
                    m.insert("holder".into(), h.clone());
                }
                m.insert("epoch".into(), epoch.to_string());
                m.insert("current_epoch".into(), current.to_string());
            }
            KvError::HomeUnavailable { home, .. } => {
                m.insert("home".into(), home.clone());
            }
            KvError::QuorumUnavailable { group, .. } => {
                m.insert("group".into(), group.clone());
            }
            KvError::NotHome { home, here } => {
                m.insert("home_region".into(), home.clone());
                m.insert("region".into(), here.clone());
            }
            KvError::ReplicationBackpressure {
                destination,
                backlog_entries,
                bound_entries,
                retry_after_ms,
            } => {
                m.insert("destination".into(), destination.clone());
                m.insert("backlog_entries".into(), backlog_entries.to_string());
                m.insert("bound_entries".into(), bound_entries.to_string());
                m.insert("retry_after_ms".into(), retry_after_ms.to_string());
            }
            KvError::KeyTooLarge { len, max } | KvError::ValueTooLarge { len, max } => {
                m.insert("len".into(), len.to_string());
                m.insert("max".into(), max.to_string());
            }
            _ => {}
        }
        m
    }

    /// Converts to a gRPC status with an `ErrorInfo` detail.
    pub fn to_status(&self) -> Status {
        let message = format!("{}: {}", self.reason(), self);
        let details =
            ErrorDetails::with_error_info(self.reason(), geokv_proto::ERROR_DOMAIN, self.metadata());
        Status::with_error_details(self.code(), message, details)
    }
}

impl From<KvError> for Status {
    fn from(e: KvError) -> Self {
        e.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_reason_and_metadata() {
        let e = KvError::ResidencyViolation {
            zone: "eu".into(),
            allowed: vec!["eu-west-1".into(), "eu-central-1".into()],
            region: "us-east-1".into(),
        };
        let status = e.to_status();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().starts_with("RESIDENCY_VIOLATION: "));
        let info = status.get_details_error_info().expect("error info present");
        assert_eq!(info.reason, "RESIDENCY_VIOLATION");
        assert_eq!(info.domain, "geokv.io");
        assert_eq!(info.metadata["allowed_regions"], "eu-west-1,eu-central-1");
    }
}
