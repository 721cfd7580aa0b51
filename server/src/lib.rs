//! The geokv node.
//!
//! # Layout
//! - [`config`]: TOML configuration with validation naming the bad field.
//! - [`storage`]: the engine trait, RocksDB and in-memory engines.
//! - [`codec`]: the versioned, checksummed envelope of every stored record.
//! - [`causality`]: hybrid logical clock, version vectors, CRDTs.
//! - [`residency`]: placement of rows (home region, zone) and admission.
//! - [`topology`]: partitions and the nodes that own them in each region.
//! - [`kv`]: the key-value domain: admission, group commit, reads.
//! - [`replication`]: cross-region shipping and receiving of the log.
//! - [`api`]: gRPC handlers (proto <-> domain only).
//! - [`admin`]: admin HTTP (`/metrics`, `/health`).
//! - [`server`]: running a node: listeners, shutdown, drain.
//! - [`error`]: client-visible errors with stable reasons.
//! - [`security`]: grants (authorization) and the in-region access audit log.
//! - [`transport`]: the injectable dialer of outgoing gRPC channels.
//!
//! Dependencies point one way: `api -> kv -> (residency, causality) -> storage`.

pub mod admin;
pub mod api;
pub mod backup;
#[cfg(feature = "bugs")]
pub mod bugs;
pub mod causality;
pub mod codec;
pub mod config;
pub mod consensus;
pub mod error;
pub mod failover;
pub mod kv;
pub mod lifecycle;
pub mod replication;
pub mod residency;
pub mod security;
pub mod server;
pub mod storage;
pub mod topology;
pub mod transport;
