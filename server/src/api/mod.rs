//! gRPC handlers: protobuf in, domain call, protobuf out. Nothing here
//! decides anything: routing and read-path decisions are pure functions in
//! `kv::route` (docs/architecture.md sections 2 and 19), and [`convert`]
//! turns requests into domain types once.
//!
//! # Layout, one file per service
//! - [`kv`]: the `geokv.v1.KV` service ([`KvService`]).
//! - [`admin`]: the `geokv.v1.Admin` service ([`AdminService`]).
//! - [`control`]: the internal control-plane service (peer port only).
//! - [`forward`]: channels to peers ([`Peers`]) and the hops of a request
//!   forwarded on behalf of its caller.
//! - [`access`]: what each request targets, authorization and its audit record.
//! - [`convert`]: proto <-> domain conversions and field validation.

mod access;
pub mod admin;
pub mod control;
pub mod convert;
mod forward;
pub mod kv;

pub(crate) use access::authorize_call;
pub use admin::AdminService;
pub use forward::{Peers, FORWARDED_HEADER};
pub use kv::{KvService, IDEMPOTENCY_HEADER};
