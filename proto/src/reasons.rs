//! Every stable error reason of geokv, as data.
//!
//! A failed call carries a `google.rpc.ErrorInfo` whose `reason` is one of
//! the names below. The reasons are part of the API, so they live in one
//! table that every side reads: the server takes each failure's reason and
//! gRPC code from it, the client takes its notion of a retryable failure
//! from it, and a test holds `docs/error-codes.md` to it. A reason added
//! here and nowhere else therefore fails that test instead of drifting.
//!
//! A name never changes meaning once released; a new failure gets a new
//! name. Names are SCREAMING_SNAKE_CASE and unique across the table.

use tonic::Code;

/// Which side of a call produces a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A geokv server sends it in `ErrorInfo.reason`.
    Server,
    /// The client library sets it on a failure that never reached a server
    /// (no connection, bad local input), so callers handle every failure by
    /// reason alike.
    Client,
}

/// One stable reason: its name, the gRPC code it travels with, and whether
/// the same request may be sent again unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason {
    /// The value of `ErrorInfo.reason`; the status message starts with it.
    pub name: &'static str,
    /// The gRPC status code of every failure with this reason.
    pub code: Code,
    /// Whether the same request, sent again unchanged to the same endpoint
    /// after a short wait, may succeed; the client retries a call that
    /// failed with such a reason. Only failures that pass without a change
    /// by the caller qualify: an unreachable or lagging region, a home
    /// between holders, a quorum out of reach, replication back-pressure, a
    /// failed connection. A draining node (`SHUTTING_DOWN`) does not: the
    /// client's endpoint is the very node that is going away.
    pub retryable: bool,
    /// Which side produces it.
    pub origin: Origin,
    /// One line on when it is returned.
    pub doc: &'static str,
}

impl Reason {
    /// Whether `name` is this reason's name, for matching the `reason` of a
    /// received `ErrorInfo`.
    pub fn is(&self, name: &str) -> bool {
        self.name == name
    }
}

/// Defines one constant per reason (named as the reason, so the name in the
/// wire format and the Rust name cannot differ) and [`ALL`] in the same order.
macro_rules! reasons {
    ($($name:ident: $code:ident, $origin:ident, retryable = $retryable:literal, $doc:literal;)*) => {
        $(
            #[doc = $doc]
            pub const $name: Reason = Reason {
                name: stringify!($name),
                code: Code::$code,
                retryable: $retryable,
                origin: Origin::$origin,
                doc: $doc,
            };
        )*

        /// Every reason: the server's, then the client's.
        pub const ALL: &[Reason] = &[$($name),*];
    };
}

reasons! {
    MISSING_FIELD: InvalidArgument, Server, retryable = false,
        "A required field of the request is empty.";
    INVALID_ARGUMENT: InvalidArgument, Server, retryable = false,
        "A field of the request has an invalid value.";
    UNKNOWN_TABLE: NotFound, Server, retryable = false,
        "The table is not configured.";
    UNKNOWN_REGION: InvalidArgument, Server, retryable = false,
        "The home region is not a region of the cluster.";
    UNKNOWN_LOCALITY: InvalidArgument, Server, retryable = false,
        "The locality value is not mapped to a region.";
    MISSING_LOCALITY: InvalidArgument, Server, retryable = false,
        "A table homed by row, with no default home, got neither a home region nor a locality value.";
    KEY_TOO_LARGE: InvalidArgument, Server, retryable = false,
        "The key is over the configured key size limit.";
    VALUE_TOO_LARGE: InvalidArgument, Server, retryable = false,
        "The value (or the set members) is over the configured value size limit.";
    BATCH_TOO_LARGE: InvalidArgument, Server, retryable = false,
        "The batch has more operations (or members) than the configured limit.";
    MALFORMED_CONTEXT: InvalidArgument, Server, retryable = false,
        "The causal context does not decode.";
    MALFORMED_SESSION_TOKEN: InvalidArgument, Server, retryable = false,
        "The session token does not decode.";
    UNKNOWN_CONSISTENCY: InvalidArgument, Server, retryable = false,
        "A consistency level this server does not know.";
    LEVEL_UNAVAILABLE: Unavailable, Server, retryable = false,
        "The consistency level needs other regions, which this deployment cannot reach.";
    NOT_HOME: FailedPrecondition, Server, retryable = false,
        "A LOCAL write reached a region that is not the row's home, and cross-region routing is not available.";
    RESIDENCY_VIOLATION: FailedPrecondition, Server, retryable = false,
        "The row may not be stored in, or pass through, this region.";
    HOME_MISMATCH: FailedPrecondition, Server, retryable = false,
        "The row exists under another home region.";
    WRONG_TYPE: FailedPrecondition, Server, retryable = false,
        "The operation does not fit the type of the stored row.";
    IDEMPOTENCY_KEY_REUSED: FailedPrecondition, Server, retryable = false,
        "The idempotency key was used for a different request.";
    ROW_TOO_LARGE: FailedPrecondition, Server, retryable = false,
        "The write would take the row past the configured row size or set member limit; nothing was stored.";
    TOO_MANY_SIBLINGS: FailedPrecondition, Server, retryable = false,
        "The write would leave the row more concurrent values than the configured limit; resolve them with a context write.";
    COUNTER_OVERFLOW: FailedPrecondition, Server, retryable = false,
        "The add would take the counter past the 64-bit range.";
    CLOCK_OFFSET: FailedPrecondition, Server, retryable = false,
        "A peer's clock is further ahead than the configured maximum offset.";
    CONFIG_MISMATCH: FailedPrecondition, Server, retryable = false,
        "A peer node has another cluster policy (regions, zones, tables, partitions, localities); the message names the difference.";
    DATA_CORRUPTION: DataLoss, Server, retryable = false,
        "A stored record failed its checksum or version check.";
    STORAGE_FAILURE: Internal, Server, retryable = false,
        "The storage engine failed; the write was not acknowledged.";
    SHUTTING_DOWN: Unavailable, Server, retryable = false,
        "The node is draining; another node may serve the request.";
    REPLICA_STALE: Unavailable, Server, retryable = true,
        "The replica in this region is not fresh enough for the read; the error names a region that can answer.";
    REGION_UNREACHABLE: Unavailable, Server, retryable = true,
        "A region the request must reach cannot be reached.";
    FENCED: FailedPrecondition, Server, retryable = false,
        "This region may not accept a write for the row's home: its lease lapsed, or another region holds the home under a newer epoch.";
    HOME_UNAVAILABLE: Unavailable, Server, retryable = true,
        "No region holds the home's lease right now.";
    CLOCK_OFFSET_EXCEEDED: Unavailable, Server, retryable = true,
        "This node's clock is further from its peers' than the configured maximum offset, so it serves no home lease until it is back within it.";
    CURSOR_COMPACTED: OutOfRange, Server, retryable = false,
        "A watch cursor is older than the change feed's retention; start a new watch.";
    SUBJECT_ERASED: FailedPrecondition, Server, retryable = false,
        "The write's causal context was read before the row's data subject was erased; read again or write without a context.";
    QUORUM_UNAVAILABLE: Unavailable, Server, retryable = true,
        "A consensus group, or a majority of the row's replica regions, cannot be reached.";
    REPLICATION_BACKPRESSURE: ResourceExhausted, Server, retryable = true,
        "A healthy replication destination is too far behind this node; the write is refused until it catches up.";
    UNAUTHENTICATED: Unauthenticated, Server, retryable = false,
        "The request carries no credentials, or credentials that do not verify.";
    PERMISSION_DENIED: PermissionDenied, Server, retryable = false,
        "The authenticated principal lacks a grant the request needs.";
    BACKUP_DESTINATION_MISSING: FailedPrecondition, Server, retryable = false,
        "A node holds rows of a residency zone with no backup destination configured, or one it cannot write; the backup fails rather than write them anywhere else.";
    BACKUP_MISMATCH: FailedPrecondition, Server, retryable = false,
        "The backup does not fit this cluster (another cluster policy, or no part for this node), or its manifest does not decode.";
    RESTORE_NOT_EMPTY: FailedPrecondition, Server, retryable = false,
        "A restore was refused because the node's store already holds rows.";
    BACKUP_CORRUPT: DataLoss, Server, retryable = false,
        "A backup file fails its checksum, row count or zone check; nothing of it was restored.";
    UNREACHABLE: Unavailable, Client, retryable = true,
        "The client cannot connect to the endpoint.";
    ZONE_UNREACHABLE: Unavailable, Client, retryable = true,
        "No region that may hold the row (its residency zone) is reachable; the client did not send the request anywhere else.";
    CLIENT_ERROR: InvalidArgument, Client, retryable = false,
        "Bad local input, caught by the client before any call.";
}

/// The reason named `name`, or None for a name this build does not know (a
/// newer server's reason, or a status from something other than geokv).
pub fn lookup(name: &str) -> Option<&'static Reason> {
    ALL.iter().find(|r| r.name == name)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_are_unique_and_screaming_snake() {
        let mut seen = HashSet::new();
        for r in ALL {
            assert!(seen.insert(r.name), "{} is in the table twice", r.name);
            let bytes = r.name.as_bytes();
            assert!(
                !bytes.is_empty()
                    && bytes[0].is_ascii_uppercase()
                    && bytes.last().is_some_and(|b| *b != b'_')
                    && !r.name.contains("__")
                    && bytes.iter().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_'),
                "{} is not SCREAMING_SNAKE_CASE",
                r.name
            );
        }
    }

    #[test]
    fn lookup_finds_every_reason_and_nothing_else() {
        for r in ALL {
            assert_eq!(lookup(r.name), Some(r));
            assert!(r.is(r.name));
        }
        assert_eq!(lookup("NO_SUCH_REASON"), None);
        assert_eq!(lookup("residency_violation"), None, "names match exactly");
    }

    #[test]
    fn every_reason_is_a_failure_with_a_doc_line() {
        for r in ALL {
            assert_ne!(r.code, Code::Ok, "{} has code OK", r.name);
            assert!(!r.doc.is_empty() && !r.doc.contains('\n'), "{} needs a one-line doc", r.name);
        }
    }

    #[test]
    fn the_security_reasons_have_their_own_codes() {
        assert_eq!(UNAUTHENTICATED.code, Code::Unauthenticated);
        assert_eq!(PERMISSION_DENIED.code, Code::PermissionDenied);
        const { assert!(!UNAUTHENTICATED.retryable && !PERMISSION_DENIED.retryable) };
    }
}
