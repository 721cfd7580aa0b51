//! Put-back bugs, compiled only with the test-only `bugs` feature, so the
//! chaos harness (`jepsen/`) can show that each of its checkers catches the
//! bug it exists for. A normal build has none of this.
//!
//! `GEOKV_BUG=<name>` in the node's environment switches one on:
//! - `residency-filter-off`: replication ships rows outside their zone and
//!   the receiver accepts them (`replication::frame::zone_allows` says yes).
//! - `ack-before-fsync`: the committer replies to a group before writing
//!   it, then waits [`ACK_BEFORE_FSYNC_DELAY_MS`] (a slow disk's sync) before
//!   the write, so a `kill -9` in that window loses acknowledged writes.
//! - `fencing-off`: a region that held a home keeps accepting LOCAL writes
//!   for it under its old epoch after another region took it over (or its
//!   lease ran out), and receivers take entries of superseded epochs as
//!   current (`failover::Leases`).

use std::sync::OnceLock;
use std::time::Duration;

/// The bugs that can be put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    ResidencyFilterOff,
    AckBeforeFsync,
    FencingOff,
}

/// Time between the early replies and the write, in ms.
pub const ACK_BEFORE_FSYNC_DELAY_MS: u64 = 100;

/// The bug switched on by `GEOKV_BUG`, read once.
fn switched_on() -> Option<Bug> {
    static ON: OnceLock<Option<Bug>> = OnceLock::new();
    *ON.get_or_init(|| {
        let name = std::env::var("GEOKV_BUG").ok()?;
        let bug = match name.as_str() {
            "residency-filter-off" => Bug::ResidencyFilterOff,
            "ack-before-fsync" => Bug::AckBeforeFsync,
            "fencing-off" => Bug::FencingOff,
            "" => return None,
            other => {
                tracing::error!(bug = other, "unknown GEOKV_BUG; no bug switched on");
                return None;
            }
        };
        tracing::warn!(?bug, "put-back bug switched on: this node is deliberately broken");
        Some(bug)
    })
}

pub fn active(bug: Bug) -> bool {
    switched_on() == Some(bug)
}

/// With `ack-before-fsync`, sends every reply now and sleeps before the
/// caller writes the group; otherwise does nothing.
pub fn ack_before_fsync<T>(replies: &mut Vec<(tokio::sync::oneshot::Sender<T>, T)>) {
    if !active(Bug::AckBeforeFsync) {
        return;
    }
    for (reply, result) in replies.drain(..) {
        let _ = reply.send(result);
    }
    std::thread::sleep(Duration::from_millis(ACK_BEFORE_FSYNC_DELAY_MS));
}
