//! How a node opens connections to its peers. The builder of every
//! outgoing channel lives in `geokv_net::channel` (shared with the client
//! library); this module names what the node uses from it, so a test can
//! inject a simulated network (`tests/simulation`, turmoil) through
//! [`Dialer::custom`] while the real services, shippers and Raft network
//! run unchanged. Incoming connections are injected the same way:
//! `server::serve_with` takes any stream of connections.

pub use geokv_net::channel::{ChannelSettings, Channels, DialFn, DialFuture, Dialer, Expect, Io};
