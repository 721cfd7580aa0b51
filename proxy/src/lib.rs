//! A fault-injecting TCP proxy: every inter-region link of a local geokv
//! cluster goes through one, so WAN latency, partitions, stalls and resets
//! exist on a single machine without netem.
//!
//! It works on TCP streams, not packets. What it guarantees about the bytes:
//! the receiver always sees a prefix of what the sender sent, in order, as a
//! real TCP connection would. So a partition that drops bytes of a
//! connection also dooms it: the connection gets nothing more and is reset
//! when the partition heals (as a real stack resets a connection whose
//! retransmissions ran out). See `docs/fault-proxy.md` for the full model.
//!
//! # Layout
//! - [`faults`]: [`LinkFaults`] (per-direction latency, jitter and bandwidth;
//!   link-wide partition, stall, refuse), [`FaultsPatch`] for partial
//!   changes, validation with typed errors.
//! - [`link`](Proxy): one link, [`Proxy::start`] returning a [`ProxyHandle`]
//!   (change faults at run time, stats, reset, shutdown); a task per
//!   connection racing its pumps against control signals.
//! - `pump`: one direction of one connection, a reader and a writer joined
//!   by a delay queue bounded in bytes and chunks (back-pressure, pipelining,
//!   pacing); `timer`: delivery at the delay itself, not on the next
//!   millisecond tick.
//! - [`stats`]: [`LinkStats`] counters.
//! - [`ProxySet`]: many named links; [`control`]: the HTTP JSON control API
//!   for a set; [`ControlClient`]: its client.
//! - [`LinkSpec`]: the `NAME=LISTEN=UPSTREAM[,key=value...]` command-line form.
//! - [`Error`]: typed errors with stable reasons.
//!
//! ```no_run
//! # async fn demo() -> Result<(), geokv_proxy::Error> {
//! use geokv_proxy::{LinkFaults, Proxy};
//! let upstream = "127.0.0.1:7001".parse().unwrap();
//! let link = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream, LinkFaults::symmetric_latency(40)).await?;
//! // Connect to link.local_addr() instead of the upstream ...
//! link.set_faults(LinkFaults { partition: true, ..link.faults() })?;
//! link.heal();
//! link.shutdown().await;
//! # Ok(()) }
//! ```

mod client;
pub mod control;
mod error;
pub mod faults;
mod link;
mod pump;
mod set;
mod spec;
pub mod stats;
mod timer;

pub use client::{ControlClient, ControlError};
pub use control::{ControlServer, ResetReply};
pub use error::Error;
pub use faults::{
    Direction, DirectionFaults, DirectionPatch, FaultsError, FaultsPatch, LinkFaults, SpecError,
};
pub use link::{Proxy, ProxyHandle, ProxyOptions};
pub use set::{validate_link_name, LinkStatus, ProxySet, LINKS_MAX, LINK_NAME_BYTES_MAX};
pub use spec::LinkSpec;
pub use stats::{DirectionStats, LinkStats};
