//! Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).
//!
//! A stamp is wall-clock milliseconds plus a logical counter. It stays close
//! to real time, so "last writer wins" picks the write a human would expect,
//! yet it never goes backwards and always moves past every stamp a node has
//! observed, so a write that causally follows another gets a larger stamp
//! even when the two nodes' clocks disagree.
//!
//! A peer whose clock runs far ahead would drag every clock that observes it
//! into the future, and stamps cannot come back. [`Hlc::observe`] therefore
//! refuses a stamp more than `max_offset_ms` ahead of the local clock and
//! counts the refusal, so an operator sees the misconfigured node.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time, injected so tests run under simulated time.
pub trait PhysicalClock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The operating system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl PhysicalClock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock set before 1970 reads as 0; the HLC then runs on its
        // logical counter until the wall clock is fixed.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        now.saturating_add_signed(clock_skew_ms()).saturating_add_signed(live_clock_offset_ms())
    }
}

/// An offset of this process's wall clock changed at run time, in ms (see
/// [`set_live_clock_offset_ms`]).
static LIVE_OFFSET_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

fn live_clock_offset_ms() -> i64 {
    LIVE_OFFSET_MS.load(Ordering::Relaxed)
}

/// Shifts this process's wall clock ([`SystemClock`]) by `offset_ms` from
/// now on, as an NTP step would: a test control, reached only through the
/// `clock.offset_control` setting (`crate::server` then follows the file
/// `<data_dir>/clock-offset-ms`). The monotonic clock leases are timed on
/// does not move.
pub fn set_live_clock_offset_ms(offset_ms: i64) {
    let old = LIVE_OFFSET_MS.swap(offset_ms, Ordering::Relaxed);
    if old != offset_ms {
        tracing::warn!(old_ms = old, new_ms = offset_ms, "wall clock offset changed by the test control");
    }
}

/// The file `clock.offset_control` follows, under the data directory.
pub const CLOCK_OFFSET_FILE: &str = "clock-offset-ms";

/// Follows `path` (an integer of ms, absent or empty for 0) every
/// `every` until `cancel`, applying it with [`set_live_clock_offset_ms`].
/// A malformed file is logged and leaves the offset as it was.
pub async fn follow_clock_offset_file(
    path: std::path::PathBuf,
    every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        match std::fs::read_to_string(&path) {
            Ok(text) if text.trim().is_empty() => set_live_clock_offset_ms(0),
            Ok(text) => match text.trim().parse::<i64>() {
                Ok(ms) => set_live_clock_offset_ms(ms),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "clock offset file is not an integer")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => set_live_clock_offset_ms(0),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot read the clock offset file"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// A deliberate offset of this process's wall clock, in ms, from the
/// `GEOKV_CLOCK_SKEW_MS` environment variable (read once; 0 when unset or
/// not a number). The chaos harness uses it to skew one node's clock, as a
/// misconfigured NTP would; nothing else should set it.
fn clock_skew_ms() -> i64 {
    static SKEW_MS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *SKEW_MS.get_or_init(|| {
        std::env::var("GEOKV_CLOCK_SKEW_MS").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    })
}

/// A clock that moves only when told to, for deterministic tests. Clones
/// share the same time, so a test keeps one handle and gives another to the
/// [`Hlc`].
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    /// Shared so every clone sees a `set` or `advance` at once.
    now_ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `now_ms` until moved.
    pub fn new(now_ms: u64) -> Self {
        Self { now_ms: Arc::new(AtomicU64::new(now_ms)) }
    }

    /// Sets the time, backwards too, to test clocks that jump.
    pub fn set(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `delta_ms`, saturating at `u64::MAX`.
    pub fn advance(&self, delta_ms: u64) {
        // The closure always returns Some, so fetch_update cannot fail.
        let _ = self
            .now_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| Some(now.saturating_add(delta_ms)));
    }
}

impl PhysicalClock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// One HLC stamp: `physical_ms << 16 | logical`.
///
/// Packing both parts in one `u64` makes the derived ordering the HLC
/// ordering, lets a stamp be stored and sent as a plain integer, and makes
/// "one more than the last stamp" carry a full logical counter into the
/// physical part. 48 bits of milliseconds last until the year 10889.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HlcTimestamp(pub u64);

impl HlcTimestamp {
    /// Bits of the logical counter.
    pub const LOGICAL_BITS: u32 = 16;
    /// The largest physical time a stamp can hold.
    pub const PHYSICAL_MS_MAX: u64 = u64::MAX >> Self::LOGICAL_BITS;

    /// Builds a stamp; a physical time beyond [`Self::PHYSICAL_MS_MAX`]
    /// saturates rather than wrapping into a stamp from the past.
    pub fn from_parts(physical_ms: u64, logical: u16) -> Self {
        let physical_ms = physical_ms.min(Self::PHYSICAL_MS_MAX);
        Self((physical_ms << Self::LOGICAL_BITS) | u64::from(logical))
    }

    /// Wall-clock milliseconds since the Unix epoch.
    pub fn physical_ms(self) -> u64 {
        self.0 >> Self::LOGICAL_BITS
    }

    /// Events stamped within the same millisecond, in order.
    pub fn logical(self) -> u16 {
        // Masked to 16 bits, so the cast keeps every bit.
        (self.0 & 0xFFFF) as u16
    }

    /// The next stamp after this one. Saturates at `u64::MAX`, which
    /// [`Self::PHYSICAL_MS_MAX`] puts nine millennia away.
    fn successor(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for HlcTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

/// A remote stamp ran further ahead of the local clock than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "remote HLC stamp {remote} is {ahead_ms} ms ahead of the local clock \
     ({remote_physical_ms} ms vs {local_physical_ms} ms), more than the \
     {max_offset_ms} ms maximum clock offset"
)]
pub struct ClockOffsetError {
    /// The refused stamp.
    pub remote: HlcTimestamp,
    /// The physical part of the refused stamp.
    pub remote_physical_ms: u64,
    /// The local wall clock when the stamp was refused.
    pub local_physical_ms: u64,
    /// How far ahead the remote stamp was.
    pub ahead_ms: u64,
    /// The configured bound it exceeded.
    pub max_offset_ms: u64,
}

/// A node's hybrid logical clock, shared by every task on the node.
///
/// The state is one `AtomicU64` updated by compare-and-swap, so stamping a
/// write takes no lock and two tasks never receive the same stamp.
pub struct Hlc {
    /// Where wall-clock time comes from.
    clock: Arc<dyn PhysicalClock>,
    /// Largest distance a remote stamp may run ahead of the local wall
    /// clock before [`Hlc::observe`] refuses it.
    max_offset_ms: u64,
    /// The last stamp handed out or observed, as `HlcTimestamp.0`.
    last: AtomicU64,
    /// Remote stamps refused for running too far ahead, for metrics.
    rejected: AtomicU64,
}

impl Hlc {
    /// A clock reading `clock`, refusing remote stamps further than
    /// `max_offset_ms` ahead of it.
    pub fn new(clock: Arc<dyn PhysicalClock>, max_offset_ms: u64) -> Self {
        Self { clock, max_offset_ms, last: AtomicU64::new(0), rejected: AtomicU64::new(0) }
    }

    /// A stamp larger than every stamp this clock has issued or observed.
    pub fn now(&self) -> HlcTimestamp {
        self.advance(
            |last, physical| {
                if physical.physical_ms() > last.physical_ms() {
                    physical
                } else {
                    last.successor()
                }
            },
        )
    }

    /// A stamp larger than every stamp issued or observed and than `floor`,
    /// however far ahead `floor` is: a write stamps past the row it
    /// replaces, so a node whose wall clock went back (a restart with a
    /// clock behind) never gives a newer write a smaller stamp than the
    /// stored one.
    pub fn now_after(&self, floor: HlcTimestamp) -> HlcTimestamp {
        self.advance(|last, physical| {
            let base = if floor > last { floor } else { last };
            if physical.physical_ms() > base.physical_ms() {
                physical
            } else {
                base.successor()
            }
        })
    }

    /// Moves the clock past a stamp received from another node and returns
    /// a fresh stamp larger than both, to stamp the event of receiving it.
    ///
    /// A stamp more than `max_offset_ms` ahead of the local wall clock is
    /// refused and counted, and the clock does not move.
    pub fn observe(&self, remote: HlcTimestamp) -> Result<HlcTimestamp, ClockOffsetError> {
        let local_physical_ms = self.physical_now().physical_ms();
        let remote_physical_ms = remote.physical_ms();
        if remote_physical_ms > local_physical_ms.saturating_add(self.max_offset_ms) {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ClockOffsetError {
                remote,
                remote_physical_ms,
                local_physical_ms,
                ahead_ms: remote_physical_ms - local_physical_ms,
                max_offset_ms: self.max_offset_ms,
            });
        }
        Ok(self.advance(|last, physical| {
            let known = last.max(remote);
            if physical.physical_ms() > known.physical_ms() {
                physical
            } else {
                known.successor()
            }
        }))
    }

    /// The last stamp issued or observed, without advancing the clock.
    pub fn last(&self) -> HlcTimestamp {
        HlcTimestamp(self.last.load(Ordering::Acquire))
    }

    /// How many remote stamps [`Hlc::observe`] has refused.
    pub fn rejected_count(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// The configured maximum clock offset.
    pub fn max_offset_ms(&self) -> u64 {
        self.max_offset_ms
    }

    /// The time a read judges expiry by, in milliseconds: the wall clock,
    /// or the latest stamp issued or observed when that is ahead (so a
    /// value that expired for a writer this node heard from is expired
    /// here too). Does not advance the clock.
    pub fn read_ms(&self) -> u64 {
        self.clock.now_ms().max(self.last().physical_ms())
    }

    /// The node's wall clock in milliseconds (the clock leases are judged by).
    pub fn wall_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The wall clock as a stamp with a zero logical part.
    fn physical_now(&self) -> HlcTimestamp {
        HlcTimestamp::from_parts(self.clock.now_ms(), 0)
    }

    /// Replaces the state with `next(last, physical_now)` atomically and
    /// returns the new stamp. `next` must return a stamp above `last`.
    fn advance(&self, next: impl Fn(HlcTimestamp, HlcTimestamp) -> HlcTimestamp) -> HlcTimestamp {
        let mut last = HlcTimestamp(self.last.load(Ordering::Acquire));
        // Each failed exchange means another task issued a stamp; with a
        // bounded number of tasks this loop ends after as many retries.
        loop {
            let candidate = next(last, self.physical_now());
            debug_assert!(candidate > last || last.0 == u64::MAX);
            match self.last.compare_exchange_weak(last.0, candidate.0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return candidate,
                Err(current) => last = HlcTimestamp(current),
            }
        }
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hlc")
            .field("last", &self.last())
            .field("max_offset_ms", &self.max_offset_ms)
            .field("rejected", &self.rejected_count())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn manual(now_ms: u64, max_offset_ms: u64) -> (ManualClock, Hlc) {
        let clock = ManualClock::new(now_ms);
        let hlc = Hlc::new(Arc::new(clock.clone()), max_offset_ms);
        (clock, hlc)
    }

    #[test]
    fn hlc_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Hlc>();
    }

    #[test]
    fn timestamp_parts_round_trip() {
        let ts = HlcTimestamp::from_parts(1_700_000_000_000, 42);
        assert_eq!(ts.physical_ms(), 1_700_000_000_000);
        assert_eq!(ts.logical(), 42);
        assert!(HlcTimestamp::from_parts(5, u16::MAX) < HlcTimestamp::from_parts(6, 0));
        let huge = HlcTimestamp::from_parts(u64::MAX, 0);
        assert_eq!(huge.physical_ms(), HlcTimestamp::PHYSICAL_MS_MAX);
        assert_eq!(ts.to_string(), "1700000000000.42");
    }

    #[test]
    fn now_after_passes_a_floor_ahead_of_the_wall_clock() {
        let (clock, hlc) = manual(1_000, 500);
        let floor = HlcTimestamp::from_parts(5_000, 3);
        let t = hlc.now_after(floor);
        assert!(t > floor, "{t:?} after {floor:?}");
        // The clock stays past the floor afterwards.
        assert!(hlc.now() > t);
        clock.set(9_000);
        assert_eq!(hlc.now_after(floor).physical_ms(), 9_000);
    }

    #[test]
    fn now_is_strictly_monotonic_under_a_frozen_clock() {
        let (_clock, hlc) = manual(1_000, 500);
        let mut previous = hlc.now();
        assert_eq!(previous, HlcTimestamp::from_parts(1_000, 0));
        for _ in 0..1_000 {
            let next = hlc.now();
            assert!(next > previous);
            assert_eq!(next.physical_ms(), 1_000);
            previous = next;
        }
    }

    #[test]
    fn now_follows_the_wall_clock_and_survives_it_going_backwards() {
        let (clock, hlc) = manual(1_000, 500);
        hlc.now();
        hlc.now();
        clock.advance(10);
        assert_eq!(hlc.now(), HlcTimestamp::from_parts(1_010, 0));
        clock.set(900);
        let after_jump = hlc.now();
        assert_eq!(after_jump, HlcTimestamp::from_parts(1_010, 1));
    }

    #[test]
    fn logical_overflow_carries_into_the_physical_part() {
        let (_clock, hlc) = manual(5, 500);
        let mut previous = hlc.now();
        for _ in 0..=u32::from(u16::MAX) {
            let next = hlc.now();
            assert!(next > previous);
            previous = next;
        }
        assert_eq!(previous, HlcTimestamp::from_parts(6, 0));
    }

    #[test]
    fn observe_moves_past_a_remote_stamp_within_the_offset() {
        let (_clock, hlc) = manual(1_000, 500);
        let remote = HlcTimestamp::from_parts(1_400, 7);
        let received = hlc.observe(remote).expect("within the offset");
        assert_eq!(received, HlcTimestamp::from_parts(1_400, 8));
        assert!(hlc.now() > remote);
        // A stamp from the past moves nothing backwards.
        let old = hlc.observe(HlcTimestamp::from_parts(10, 0)).expect("past stamps are fine");
        assert!(old > received);
        assert_eq!(hlc.rejected_count(), 0);
    }

    #[test]
    fn observe_refuses_and_counts_a_far_future_stamp() {
        let (_clock, hlc) = manual(1_000, 500);
        let before = hlc.now();
        let remote = HlcTimestamp::from_parts(1_501, 0);
        let err = hlc.observe(remote).expect_err("501 ms ahead with a 500 ms bound");
        assert_eq!(
            err,
            ClockOffsetError {
                remote,
                remote_physical_ms: 1_501,
                local_physical_ms: 1_000,
                ahead_ms: 501,
                max_offset_ms: 500,
            }
        );
        assert_eq!(hlc.rejected_count(), 1);
        assert_eq!(hlc.last(), before, "a refused stamp must not move the clock");
        // Exactly at the bound is accepted.
        assert!(hlc.observe(HlcTimestamp::from_parts(1_500, 0)).is_ok());
        assert_eq!(hlc.rejected_count(), 1);
    }

    #[test]
    fn concurrent_callers_never_share_a_stamp() {
        let (_clock, hlc) = manual(1_000, 500);
        let hlc = Arc::new(hlc);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let hlc = Arc::clone(&hlc);
                std::thread::spawn(move || (0..2_000).map(|_| hlc.now()).collect::<Vec<_>>())
            })
            .collect();
        let mut seen = HashSet::new();
        for thread in threads {
            for stamp in thread.join().expect("stamping thread panicked") {
                assert!(seen.insert(stamp), "stamp {stamp} issued twice");
            }
        }
    }

    #[test]
    fn system_clock_reads_a_plausible_time() {
        // 2020-01-01 in milliseconds.
        assert!(SystemClock.now_ms() > 1_577_836_800_000);
    }
}
