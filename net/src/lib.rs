//! geokv's connections, shared by the node, the client library and the
//! command line (none of which this crate depends on).
//!
//! # Layout
//! - [`certs`]: issuing the cluster CA, node and client certificates
//!   (`geokv cert`), PEM files in a certs directory.
//! - [`identity`]: what a certificate says: a user's name (CN) or a node's
//!   cluster, region and node (its `geokv://` URI SAN).
//! - [`tls`]: a reloadable TLS identity and CA bundle, and the rustls
//!   configs built from it.
//! - [`incoming`]: accepting connections on a node's ports (TLS
//!   termination, plaintext and handshake refusals counted).
//! - [`channel`]: the one builder of every outgoing gRPC channel.

pub mod certs;
pub mod channel;
pub mod identity;
pub mod incoming;
pub mod tls;
