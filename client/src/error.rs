//! A failed call: the gRPC code, geokv's stable reason, and the details the
//! server attached (for example the allowed regions of a residency violation).
//!
//! Reasons, their codes, and which of them a retry may get past are the
//! entries of [`geokv_proto::reasons`], shared with the server.

use std::collections::HashMap;
use std::fmt;

use geokv_proto::reasons::{self, Reason};
use tonic::Code;
use tonic_types::StatusExt;

#[derive(Debug, Clone)]
pub struct Error {
    pub code: Code,
    /// The stable reason, e.g. `RESIDENCY_VIOLATION`; None for failures that
    /// did not come from a geokv server (transport, bad endpoint).
    pub reason: Option<String>,
    pub message: String,
    /// Facts from the server's `ErrorInfo`, e.g. `allowed_regions`.
    pub metadata: HashMap<String, String>,
}

impl Error {
    /// A failure of the client's own: it carries a reason of the table, so
    /// callers handle it like a server's.
    pub(crate) fn client_side(reason: &Reason, message: String) -> Self {
        Self { code: reason.code, reason: Some(reason.name.into()), message, metadata: HashMap::new() }
    }

    pub(crate) fn local(message: String) -> Self {
        Self::client_side(&reasons::CLIENT_ERROR, message)
    }

    pub(crate) fn transport(endpoint: &str, e: tonic::transport::Error) -> Self {
        let mut message = format!("cannot connect to {endpoint}: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        Self::client_side(&reasons::UNREACHABLE, message)
    }

    /// The reason, or the gRPC code's name when the server gave none.
    pub fn reason_or_code(&self) -> String {
        self.reason.clone().unwrap_or_else(|| format!("{:?}", self.code).to_uppercase())
    }

    /// The table's entry for the reason; None when there is no reason (not
    /// a geokv server) or this client does not know it (a newer server).
    pub fn known_reason(&self) -> Option<&'static Reason> {
        self.reason.as_deref().and_then(reasons::lookup)
    }

    /// Worth retrying: the request may not have been processed, and the
    /// idempotency key makes a repeat safe. A known reason decides by the
    /// table's `retryable`; without one, the code decides, since a status
    /// from a proxy or a newer server says no more than its code.
    pub fn is_transient(&self) -> bool {
        match self.known_reason() {
            Some(reason) => reason.retryable,
            None => matches!(
                self.code,
                Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::ResourceExhausted
            ),
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let info = status.get_details_error_info();
        let (reason, metadata) = match info {
            Some(i) => (Some(i.reason), i.metadata),
            None => (None, HashMap::new()),
        };
        Self { code: status.code(), reason, message: status.message().to_string(), metadata }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = self.reason_or_code();
        if self.message.starts_with(&reason) {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{reason}: {}", self.message)
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(code: Code, reason: Option<&str>) -> Error {
        Error { code, reason: reason.map(String::from), message: String::new(), metadata: HashMap::new() }
    }

    /// The rule before the table: a transient code, less the two reasons
    /// that a retry to the same endpoint cannot get past. The table keeps it.
    fn code_rule(e: &Error) -> bool {
        matches!(e.code, Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::ResourceExhausted)
            && !matches!(e.reason.as_deref(), Some("LEVEL_UNAVAILABLE" | "SHUTTING_DOWN"))
    }

    #[test]
    fn retries_follow_the_table() {
        for r in reasons::ALL {
            let e = with(r.code, Some(r.name));
            assert_eq!(e.known_reason(), Some(r));
            assert_eq!(e.is_transient(), r.retryable, "{}", r.name);
            assert_eq!(e.is_transient(), code_rule(&e), "{} changed its retry behaviour", r.name);
        }
        assert!(with(Code::ResourceExhausted, Some("REPLICATION_BACKPRESSURE")).is_transient());
        assert!(!with(Code::Unavailable, Some("SHUTTING_DOWN")).is_transient());
        assert!(!with(Code::PermissionDenied, Some("PERMISSION_DENIED")).is_transient());
        assert!(!with(Code::Unauthenticated, Some("UNAUTHENTICATED")).is_transient());
    }

    #[test]
    fn without_a_known_reason_the_code_decides() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Aborted, Code::ResourceExhausted] {
            assert!(with(code, None).is_transient(), "{code:?}");
            assert!(with(code, Some("A_NEWER_REASON")).is_transient(), "{code:?}");
        }
        for code in [Code::InvalidArgument, Code::FailedPrecondition, Code::Internal, Code::Unknown] {
            assert!(!with(code, None).is_transient(), "{code:?}");
        }
        assert_eq!(with(Code::Unavailable, Some("A_NEWER_REASON")).known_reason(), None);
    }

    #[test]
    fn client_side_failures_carry_reasons_of_the_table() {
        let e = Error::local("bad context".into());
        assert_eq!(e.known_reason(), Some(&reasons::CLIENT_ERROR));
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(!e.is_transient());
        let e = with(Code::Unavailable, Some(reasons::UNREACHABLE.name));
        assert_eq!(e.known_reason().map(|r| r.origin), Some(reasons::Origin::Client));
        assert!(e.is_transient(), "a failed connection may succeed on the next try");
    }
}
