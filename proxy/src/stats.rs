//! Counters of one link, updated lock-free by the connection tasks and read
//! as a [`LinkStats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::faults::Direction;

/// A snapshot of a link's counters since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Connections accepted on the listener, refused ones included.
    pub connections_accepted: u64,
    /// Connections open right now.
    pub connections_active: u64,
    /// Connections reset right after accept because `refuse` was set.
    pub connections_refused: u64,
    /// Connections the proxy closed with RST: the reset action, a heal after
    /// a partition dropped their bytes, an I/O error on either side, a failed
    /// upstream dial, or shutdown.
    pub connections_reset: u64,
    /// Client-to-upstream counters.
    pub to_upstream: DirectionStats,
    /// Upstream-to-client counters.
    pub to_client: DirectionStats,
}

impl LinkStats {
    /// The counters of one direction.
    pub fn direction(&self, direction: Direction) -> &DirectionStats {
        match direction {
            Direction::ToUpstream => &self.to_upstream,
            Direction::ToClient => &self.to_client,
        }
    }
}

/// Byte counters of one direction of a link.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionStats {
    /// Bytes read from the sending side.
    pub bytes_read: u64,
    /// Bytes written to the receiving side.
    pub bytes_written: u64,
    /// Bytes read and thrown away by a partition.
    pub bytes_dropped: u64,
    /// Bytes read but not yet written: in the delay queue, stalled, or being
    /// paced (a gauge, bounded by `queue_bytes_max` per connection).
    pub bytes_queued: u64,
}

#[derive(Debug, Default)]
pub(crate) struct DirectionCounters {
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) bytes_dropped: AtomicU64,
    pub(crate) bytes_queued: AtomicU64,
}

impl DirectionCounters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            bytes_dropped: self.bytes_dropped.load(Ordering::Relaxed),
            bytes_queued: self.bytes_queued.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_active: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) connections_reset: AtomicU64,
    pub(crate) to_upstream: DirectionCounters,
    pub(crate) to_client: DirectionCounters,
}

impl Counters {
    pub(crate) fn direction(&self, direction: Direction) -> &DirectionCounters {
        match direction {
            Direction::ToUpstream => &self.to_upstream,
            Direction::ToClient => &self.to_client,
        }
    }

    pub(crate) fn snapshot(&self) -> LinkStats {
        LinkStats {
            connections_accepted: self.connections_accepted.load(Ordering::Relaxed),
            connections_active: self.connections_active.load(Ordering::Relaxed),
            connections_refused: self.connections_refused.load(Ordering::Relaxed),
            connections_reset: self.connections_reset.load(Ordering::Relaxed),
            to_upstream: self.to_upstream.snapshot(),
            to_client: self.to_client.snapshot(),
        }
    }
}

pub(crate) fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

pub(crate) fn sub(counter: &AtomicU64, n: usize) {
    counter.fetch_sub(n as u64, Ordering::Relaxed);
}
