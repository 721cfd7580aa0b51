//! The geokv wire and storage formats, generated from `proto/v1/*.proto`.
//!
//! # Layout
//! - [`v1`]: the public gRPC API (package `geokv.v1`): the KV and Admin services.
//! - [`consensus`]: the internal Raft transport between nodes
//!   (package `geokv.consensus.v1`).
//! - [`storage`]: internal records (rows, log entries, contexts), package
//!   `geokv.storage.v1`; the server wraps each in a versioned, checksummed envelope.
//! - [`envelope`]: the versioned, checksummed wrapper of every stored record
//!   and opaque token.
//! - [`reasons`]: every stable error reason (`ErrorInfo.reason`) with its gRPC
//!   code and whether a retry may succeed; the server, the client and
//!   `docs/error-codes.md` all follow it.
//! - [`partition`]: the partition function every node and client agrees on.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, served by gRPC reflection.

pub mod envelope;
pub mod partition;
pub mod reasons;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("geokv.v1");
}

#[allow(clippy::all, missing_docs)]
pub mod consensus {
    tonic::include_proto!("geokv.consensus.v1");
}

#[allow(clippy::all, missing_docs)]
pub mod storage {
    tonic::include_proto!("geokv.storage.v1");
}

/// Encoded `FileDescriptorSet` of every geokv proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("geokv_descriptor");

/// The domain of every `google.rpc.ErrorInfo` that geokv returns.
pub const ERROR_DOMAIN: &str = "geokv.io";
