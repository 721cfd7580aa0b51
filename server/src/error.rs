//! Errors a client can see, each with a stable machine-readable reason.
//!
//! Library code returns [`KvError`]; the gRPC layer turns it into a status
//! whose code fits the failure and whose details carry a
//! `google.rpc.ErrorInfo { reason, domain: "geokv.io", metadata }`. The
//! reasons are part of the API: they never change meaning. Each reason and
//! its code are an entry of [`geokv_proto::reasons`], which the client and
//! `docs/error-codes.md` follow too.

use std::collections::HashMap;

use geokv_proto::reasons::{self, Reason};
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
    /// The write would take the row past a size bound (`measure` is
    /// `bytes`, the encoded row, or `members`, a set's members).
    #[error("row `{key}` would hold {len} {measure}; the limit is {max} (nothing was stored)")]
    RowTooLarge { key: String, measure: &'static str, len: usize, max: usize },
    /// A peer has another cluster policy (docs/architecture.md section 16).
    #[error("node `{peer}` has another cluster policy than this node ({}): it may not join", differences.join("; "))]
    ConfigMismatch { peer: String, differences: Vec<String> },
    #[error(
        "row `{key}` would hold {len} siblings; the limit is {max} (nothing was stored): read it and write with its context"
    )]
    TooManySiblings { key: String, len: usize, max: usize },
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
    #[error(
        "home `{home}`: this node's clock is {offset_ms} ms from its peers', more than the {max_ms} ms maximum offset; it serves no lease until it is back within it"
    )]
    ClockOffsetExceeded { home: String, offset_ms: u64, max_ms: u64 },
    #[error("consensus group `{group}` cannot commit: {why}")]
    QuorumUnavailable { group: String, why: String },
    /// The request carried no credentials, or credentials that do not verify.
    /// The message says which, never the credential itself.
    #[error("not authenticated: {why}")]
    Unauthenticated { why: String },
    /// The principal is known but holds no grant for the request; the
    /// metadata names both, so an operator can add the grant.
    #[error("principal `{principal}` lacks the grant `{missing_grant}`: {why}")]
    PermissionDenied { principal: String, missing_grant: String, why: String },
    /// A write carried a causal context read before the row's subject was
    /// erased (docs/architecture.md section 13).
    #[error(
        "row `{key}`: its subject was erased after this write's context was read (fence {fence_hlc}); read the row again, or write without a context"
    )]
    SubjectErased { key: String, fence_hlc: u64 },
    /// A watch cursor is behind the change feed's retention.
    #[error("the cursor cannot resume here: {why}; start a new watch (and read the rows again)")]
    CursorCompacted { origin: String, why: String },
    /// Rows of `zone` have no usable backup destination on `node`
    /// (docs/decisions/029-zone-strict-backups.md).
    #[error(
        "node `{node}` holds rows of zone `{}` but {why}; nothing of that zone was written anywhere",
        display_zone(zone)
    )]
    BackupDestinationMissing { zone: String, node: String, why: String },
    #[error("the backup does not fit this cluster: {why}")]
    BackupMismatch { why: String },
    #[error("node `{node}` is not empty ({why}): a backup is restored into a fresh cluster only")]
    RestoreNotEmpty { node: String, why: String },
    #[error("backup file {file} is corrupt: {why}")]
    BackupCorrupt { file: String, why: String },
}

/// A zone's name for messages ("" is the rows of no zone).
fn display_zone(zone: &str) -> &str {
    if zone.is_empty() {
        "(none: unrestricted rows)"
    } else {
        zone
    }
}

impl KvError {
    /// The entry of [`geokv_proto::reasons`] for this failure. Each variant
    /// names its entry once here; the reason string and the gRPC code both
    /// come from it, so the server cannot send a reason with a code that
    /// `docs/error-codes.md` and the client do not expect.
    pub fn reason_entry(&self) -> &'static Reason {
        match self {
            KvError::MissingField { .. } => &reasons::MISSING_FIELD,
            KvError::InvalidField { .. } => &reasons::INVALID_ARGUMENT,
            KvError::UnknownTable { .. } => &reasons::UNKNOWN_TABLE,
            KvError::UnknownRegion { .. } => &reasons::UNKNOWN_REGION,
            KvError::UnknownLocality { .. } => &reasons::UNKNOWN_LOCALITY,
            KvError::MissingLocality { .. } => &reasons::MISSING_LOCALITY,
            KvError::KeyTooLarge { .. } => &reasons::KEY_TOO_LARGE,
            KvError::ValueTooLarge { .. } => &reasons::VALUE_TOO_LARGE,
            KvError::BatchTooLarge { .. } => &reasons::BATCH_TOO_LARGE,
            KvError::MalformedContext { .. } => &reasons::MALFORMED_CONTEXT,
            KvError::MalformedSessionToken { .. } => &reasons::MALFORMED_SESSION_TOKEN,
            KvError::UnknownConsistency { .. } => &reasons::UNKNOWN_CONSISTENCY,
            KvError::LevelUnavailable { .. } => &reasons::LEVEL_UNAVAILABLE,
            KvError::NotHome { .. } => &reasons::NOT_HOME,
            KvError::ResidencyViolation { .. } => &reasons::RESIDENCY_VIOLATION,
            KvError::HomeMismatch { .. } => &reasons::HOME_MISMATCH,
            KvError::WrongType { .. } => &reasons::WRONG_TYPE,
            KvError::IdempotencyKeyReused { .. } => &reasons::IDEMPOTENCY_KEY_REUSED,
            KvError::Corrupt { .. } => &reasons::DATA_CORRUPTION,
            KvError::Storage(_) => &reasons::STORAGE_FAILURE,
            KvError::ClockOffset { .. } => &reasons::CLOCK_OFFSET,
            KvError::ClockOffsetExceeded { .. } => &reasons::CLOCK_OFFSET_EXCEEDED,
            KvError::ShuttingDown => &reasons::SHUTTING_DOWN,
            KvError::ReplicaStale { .. } => &reasons::REPLICA_STALE,
            KvError::RegionUnreachable { .. } => &reasons::REGION_UNREACHABLE,
            KvError::CounterOverflow => &reasons::COUNTER_OVERFLOW,
            KvError::RowTooLarge { .. } => &reasons::ROW_TOO_LARGE,
            KvError::ConfigMismatch { .. } => &reasons::CONFIG_MISMATCH,
            KvError::TooManySiblings { .. } => &reasons::TOO_MANY_SIBLINGS,
            KvError::ReplicationBackpressure { .. } => &reasons::REPLICATION_BACKPRESSURE,
            KvError::Fenced { .. } => &reasons::FENCED,
            KvError::HomeUnavailable { .. } => &reasons::HOME_UNAVAILABLE,
            KvError::QuorumUnavailable { .. } => &reasons::QUORUM_UNAVAILABLE,
            KvError::Unauthenticated { .. } => &reasons::UNAUTHENTICATED,
            KvError::PermissionDenied { .. } => &reasons::PERMISSION_DENIED,
            KvError::SubjectErased { .. } => &reasons::SUBJECT_ERASED,
            KvError::CursorCompacted { .. } => &reasons::CURSOR_COMPACTED,
            KvError::BackupDestinationMissing { .. } => &reasons::BACKUP_DESTINATION_MISSING,
            KvError::BackupMismatch { .. } => &reasons::BACKUP_MISMATCH,
            KvError::RestoreNotEmpty { .. } => &reasons::RESTORE_NOT_EMPTY,
            KvError::BackupCorrupt { .. } => &reasons::BACKUP_CORRUPT,
        }
    }

    /// The stable reason string carried in `ErrorInfo.reason`.
    pub fn reason(&self) -> &'static str {
        self.reason_entry().name
    }

    /// The gRPC code that fits the failure: the table's code for its reason.
    pub fn code(&self) -> Code {
        self.reason_entry().code
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
            KvError::ClockOffsetExceeded { home, offset_ms, max_ms } => {
                m.insert("home".into(), home.clone());
                m.insert("offset_ms".into(), offset_ms.to_string());
                m.insert("max_offset_ms".into(), max_ms.to_string());
            }
            KvError::QuorumUnavailable { group, .. } => {
                m.insert("group".into(), group.clone());
            }
            KvError::CursorCompacted { origin, .. } => {
                m.insert("origin".into(), origin.clone());
            }
            KvError::SubjectErased { key, fence_hlc } => {
                m.insert("key".into(), key.clone());
                m.insert("fence_hlc".into(), fence_hlc.to_string());
            }
            KvError::PermissionDenied { principal, missing_grant, .. } => {
                m.insert("principal".into(), principal.clone());
                m.insert("missing_grant".into(), missing_grant.clone());
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
            KvError::RowTooLarge { key, measure, len, max } => {
                m.insert("key".into(), key.clone());
                m.insert("measure".into(), measure.to_string());
                m.insert("len".into(), len.to_string());
                m.insert("max".into(), max.to_string());
            }
            KvError::ConfigMismatch { peer, differences } => {
                m.insert("peer".into(), peer.clone());
                m.insert("differences".into(), differences.join("; "));
            }
            KvError::TooManySiblings { key, len, max } => {
                m.insert("key".into(), key.clone());
                m.insert("len".into(), len.to_string());
                m.insert("max".into(), max.to_string());
            }
            KvError::BackupDestinationMissing { zone, node, .. } => {
                m.insert("zone".into(), zone.clone());
                m.insert("node".into(), node.clone());
            }
            KvError::RestoreNotEmpty { node, .. } => {
                m.insert("node".into(), node.clone());
            }
            KvError::BackupCorrupt { file, .. } => {
                m.insert("file".into(), file.clone());
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

    /// One failure of every variant.
    fn one_of_each() -> Vec<KvError> {
        let s = || String::from("x");
        vec![
            KvError::MissingField { field: "row" },
            KvError::InvalidField { field: "row", why: s() },
            KvError::UnknownTable { table: s() },
            KvError::UnknownRegion { region: s(), known: vec![] },
            KvError::UnknownLocality { table: s(), value: s() },
            KvError::MissingLocality { table: s() },
            KvError::KeyTooLarge { len: 2, max: 1 },
            KvError::ValueTooLarge { len: 2, max: 1 },
            KvError::BatchTooLarge { len: 2, max: 1 },
            KvError::MalformedContext { why: s() },
            KvError::MalformedSessionToken { why: s() },
            KvError::UnknownConsistency { field: "consistency", value: 99 },
            KvError::LevelUnavailable { level: s() },
            KvError::NotHome { home: s(), here: s() },
            KvError::ResidencyViolation { zone: s(), allowed: vec![], region: s() },
            KvError::HomeMismatch { key: s(), existing: s(), requested: s() },
            KvError::WrongType { key: s(), expected: "counter", actual: "register" },
            KvError::IdempotencyKeyReused { key: s() },
            KvError::Corrupt { what: s(), why: s() },
            KvError::Storage(s()),
            KvError::ClockOffset { ahead_ms: 2, max_ms: 1 },
            KvError::ClockOffsetExceeded { home: s(), offset_ms: 2, max_ms: 1 },
            KvError::ReplicaStale { region: s(), why: s() },
            KvError::RegionUnreachable { region: s(), why: s() },
            KvError::ShuttingDown,
            KvError::CounterOverflow,
            KvError::RowTooLarge { key: s(), measure: "bytes", len: 2, max: 1 },
            KvError::ConfigMismatch { peer: s(), differences: vec![s()] },
            KvError::TooManySiblings { key: s(), len: 2, max: 1 },
            KvError::ReplicationBackpressure {
                destination: s(),
                backlog_entries: 2,
                bound_entries: 1,
                retry_after_ms: 10,
            },
            KvError::Fenced { home: s(), epoch: 1, current: 2, why: s(), holder: None },
            KvError::HomeUnavailable { home: s(), why: s() },
            KvError::QuorumUnavailable { group: s(), why: s() },
            KvError::Unauthenticated { why: s() },
            KvError::PermissionDenied { principal: s(), missing_grant: s(), why: s() },
            KvError::SubjectErased { key: s(), fence_hlc: 1 },
            KvError::CursorCompacted { origin: s(), why: s() },
            KvError::BackupDestinationMissing { zone: s(), node: s(), why: s() },
            KvError::BackupMismatch { why: s() },
            KvError::RestoreNotEmpty { node: s(), why: s() },
            KvError::BackupCorrupt { file: s(), why: s() },
        ]
    }

    #[test]
    fn the_server_sends_exactly_the_server_reasons_of_the_table() {
        let sent: std::collections::BTreeSet<&str> = one_of_each().iter().map(KvError::reason).collect();
        let table: std::collections::BTreeSet<&str> =
            reasons::ALL.iter().filter(|r| r.origin == reasons::Origin::Server).map(|r| r.name).collect();
        assert_eq!(sent, table, "every server reason of the table has a variant, and no variant invents one");
        for e in one_of_each() {
            let status = e.to_status();
            assert_eq!(status.code(), e.reason_entry().code, "{e:?}");
            assert_eq!(reasons::lookup(e.reason()), Some(e.reason_entry()));
            assert_eq!(status.get_details_error_info().expect("error info").reason, e.reason());
        }
    }

    #[test]
    fn security_failures_name_the_principal_and_the_missing_grant() {
        let status = KvError::Unauthenticated { why: "no credentials".into() }.to_status();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(status.message().starts_with("UNAUTHENTICATED: "));

        let e = KvError::PermissionDenied {
            principal: "app".into(),
            missing_grant: "write".into(),
            why: "no role grants it".into(),
        };
        let status = e.to_status();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().starts_with("PERMISSION_DENIED: "));
        let info = status.get_details_error_info().expect("error info present");
        assert_eq!(info.reason, "PERMISSION_DENIED");
        assert_eq!(info.metadata["principal"], "app");
        assert_eq!(info.metadata["missing_grant"], "write");
    }
}
