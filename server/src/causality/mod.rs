//! Causality: who saw which write, and how concurrent writes combine
//! (docs/architecture.md section 4).
//!
//! Everything here is pure: no IO, no global clock. The replication and API
//! layers call into it, and the property tests check it without a cluster.
//!
//! # Layout
//! - [`hlc`]: hybrid logical clock; stamps every write, refuses stamps from a
//!   peer whose clock runs too far ahead.
//! - [`vv`]: dots (one write each) and version vectors (a set of writes).
//! - [`dvv`]: the dotted version vector set behind multi-value rows: siblings
//!   for concurrent writes, a causal context for the next write.
//! - [`crdt`]: the [`Crdt`] trait and its merge laws; LWW register,
//!   PN-counter, add-wins OR-set, and the DVV set as the MV register.
//! - [`encoding`]: conversions to and from the `geokv.storage.v1` protos,
//!   and the opaque context bytes handed to clients.
//! - `tests`: property tests of the merge laws and of encoding round trips.

pub mod crdt;
pub mod dvv;
pub mod encoding;
pub mod hlc;
pub mod vv;

#[cfg(test)]
mod tests;

pub use crdt::{Crdt, LwwRegister, MvRegister, OrSet, PnCounter};
pub use dvv::{DvvSet, Sibling};
pub use encoding::{
    context_stamp, decode_context, encode_context, encode_context_at, ContextError, DecodeError,
    CONTEXT_BYTES_MAX,
};
pub use hlc::{ClockOffsetError, Hlc, HlcTimestamp, ManualClock, PhysicalClock, SystemClock};
pub use vv::{Actor, Dot, VersionVector};
