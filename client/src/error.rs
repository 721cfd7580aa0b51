//! A failed call: the gRPC code, geokv's stable reason, and the details the
//! server attached (for example the allowed regions of a residency violation).

use std::collections::HashMap;
use std::fmt;

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
    pub(crate) fn local(message: String) -> Self {
        Self {
            code: Code::InvalidArgument,
            reason: Some("CLIENT_ERROR".into()),
            message,
            metadata: HashMap::new(),
        }
    }

    pub(crate) fn transport(endpoint: &str, e: tonic::transport::Error) -> Self {
        let mut message = format!("cannot connect to {endpoint}: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        Self {
            code: Code::Unavailable,
            reason: Some("UNREACHABLE".into()),
            message,
            metadata: HashMap::new(),
        }
    }

    /// The reason, or the gRPC code's name when the server gave none.
    pub fn reason_or_code(&self) -> String {
        self.reason.clone().unwrap_or_else(|| format!("{:?}", self.code).to_uppercase())
    }

    /// Worth retrying: the request may not have been processed, and the
    /// idempotency key makes a repeat safe.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.code,
            Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::ResourceExhausted
        ) && self.reason.as_deref() != Some("LEVEL_UNAVAILABLE")
            && self.reason.as_deref() != Some("SHUTTING_DOWN")
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
