//! Clock-safe lease timing (docs/architecture.md section 18).
//!
//! Leases are timed on each node's monotonic clock, never on wall clocks:
//! - the holder's renewer may serve a home until `sent + lease_ms -
//!   max_offset_ms`, where `sent` is when it sent the renewal that
//!   committed (the grant cannot have started before it was sent);
//! - any other node (the control-plane leader above all) counts a lease as
//!   lapsed only `lease_ms + max_offset_ms` after it *observed* the last
//!   change of the lease (grant or renewal), which is after it was sent;
//! - the other nodes of the holder's region learn how long the renewer may
//!   still serve by asking it, and count that remainder from when they
//!   asked.
//!
//! A failover grant names the renewal count it saw lapse, and the state
//! machine refuses it when a renewal committed since, so the deciding clock
//! reading never enters the replicated state.
//!
//! The wall clock is only measured here: each node compares its clock with
//! its peers' ([`LeaseClock::record_offset`]); while a majority of the peers
//! it measured is further off than `max_offset_ms`, it serves no lease
//! (as CockroachDB does).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

// The runtime's clock: the OS monotonic clock in production, simulated
// time under the deterministic simulation.
use tokio::time::Instant;

use crate::consensus::control::{ControlState, HomeLease};

/// A measurement older than this no longer counts.
pub const OFFSET_FRESH: Duration = Duration::from_secs(5);

/// What this node measured of one peer's clock.
#[derive(Debug, Clone, Copy)]
pub struct OffsetSample {
    /// Peer wall clock minus ours, at the midpoint of the round trip, in ms.
    pub offset_ms: i64,
    /// Half the round trip: the measurement's uncertainty, in ms.
    pub uncertainty_ms: u64,
    pub at: Instant,
}

/// The clock-offset verdict of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetStatus {
    /// Largest offset to a peer, in ms, beyond its uncertainty (0 when
    /// none is measured).
    pub max_abs_offset_ms: u64,
    /// Fresh measurements.
    pub peers_measured: usize,
    /// Peers further off than the maximum (beyond uncertainty).
    pub peers_beyond: usize,
    /// True while a majority of the measured peers is beyond the maximum:
    /// this node serves no lease.
    pub exceeded: bool,
}

#[derive(Default)]
struct Inner {
    /// home -> (epoch, serve until): what this node may serve.
    held: BTreeMap<String, (u64, Instant)>,
    /// home -> (epoch, renewals, first observed): the last lease change seen.
    seen: BTreeMap<String, (u64, u64, Instant)>,
    /// region -> last measurement of its clock.
    offsets: BTreeMap<String, OffsetSample>,
}

/// A node's lease timing and clock-offset view.
pub struct LeaseClock {
    max_offset_ms: u64,
    /// Default lease length for leases recorded before lengths were kept.
    lease_ms: u64,
    inner: Mutex<Inner>,
}

impl LeaseClock {
    pub fn new(max_offset_ms: u64, lease_ms: u64) -> Self {
        Self { max_offset_ms, lease_ms, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn max_offset_ms(&self) -> u64 {
        self.max_offset_ms
    }

    /// Records the lease changes of `state` not seen before, as of now.
    pub fn observe(&self, state: &ControlState) {
        self.observe_at(state, Instant::now());
    }

    fn observe_at(&self, state: &ControlState, now: Instant) {
        let mut inner = self.lock();
        for (home, l) in &state.leases {
            let key = (l.epoch, l.renewals);
            match inner.seen.get(home) {
                Some((e, r, _)) if (*e, *r) == key => {}
                _ => {
                    inner.seen.insert(home.clone(), (l.epoch, l.renewals, now));
                }
            }
        }
        // A lease this node no longer holds under that epoch is not served.
        inner.held.retain(|home, (epoch, _)| state.leases.get(home).is_some_and(|l| l.epoch == *epoch));
    }

    /// Whether the lease of `home` at (`epoch`, `renewals`) has gone
    /// unchanged for longer than `lease_ms + max_offset_ms` since this node
    /// observed it: only then may another region be granted the home.
    pub fn lapsed(&self, home: &str, epoch: u64, renewals: u64, lease_ms: u64) -> bool {
        self.lapsed_at(home, epoch, renewals, lease_ms, Instant::now())
    }

    fn lapsed_at(&self, home: &str, epoch: u64, renewals: u64, lease_ms: u64, now: Instant) -> bool {
        let lease_ms = if lease_ms == 0 { self.lease_ms } else { lease_ms };
        let wait = Duration::from_millis(lease_ms.saturating_add(self.max_offset_ms));
        self.lock().seen.get(home).is_some_and(|(e, r, at)| {
            (*e, *r) == (epoch, renewals) && now.saturating_duration_since(*at) > wait
        })
    }

    /// How long ago (ms) this node first saw the lease of `home` as it is now.
    pub fn observed_ms_ago(&self, home: &str, epoch: u64, renewals: u64) -> Option<u64> {
        self.lock()
            .seen
            .get(home)
            .filter(|(e, r, _)| (*e, *r) == (epoch, renewals))
            .map(|(_, _, at)| at.elapsed().as_millis() as u64)
    }

    /// For status: ms this node may still serve `l` when `region` (this
    /// node's) holds it and it knows, else ms until this node would count
    /// it lapsed (negative once lapsed; 0 when never observed).
    pub fn lease_remaining_ms(&self, l: &HomeLease, region: &str) -> i64 {
        if l.holder == region {
            if let Some(ms) = self.remaining_ms(&l.home, l.epoch) {
                return ms;
            }
        }
        let lease_ms = if l.lease_ms == 0 { self.lease_ms } else { l.lease_ms };
        match self.observed_ms_ago(&l.home, l.epoch, l.renewals) {
            Some(ago) => lease_ms.saturating_add(self.max_offset_ms) as i64 - ago as i64,
            None => 0,
        }
    }

    /// The renewer's renewal sent at `sent` committed: serve `home` under
    /// `epoch` until `sent + lease_ms - max_offset_ms`.
    pub fn renewed(&self, home: &str, epoch: u64, sent: Instant, lease_ms: u64) {
        let until = sent + Duration::from_millis(lease_ms.saturating_sub(self.max_offset_ms));
        self.hold(home, epoch, until);
    }

    /// This node may serve `home` under `epoch` until `until` (never
    /// shortens a later deadline of the same epoch).
    pub fn hold(&self, home: &str, epoch: u64, until: Instant) {
        let mut inner = self.lock();
        match inner.held.get_mut(home) {
            Some((e, u)) if *e == epoch => *u = (*u).max(until),
            _ => {
                inner.held.insert(home.to_string(), (epoch, until));
            }
        }
    }

    /// Stops serving `home` (a drain started, or the lease moved).
    pub fn release(&self, home: &str) {
        self.lock().held.remove(home);
    }

    /// Milliseconds this node may still serve `home` under `epoch`
    /// (negative once lapsed, None when it holds nothing for it).
    pub fn remaining_ms(&self, home: &str, epoch: u64) -> Option<i64> {
        self.remaining_ms_at(home, epoch, Instant::now())
    }

    fn remaining_ms_at(&self, home: &str, epoch: u64, now: Instant) -> Option<i64> {
        let inner = self.lock();
        let (e, until) = inner.held.get(home)?;
        if *e != epoch {
            return None;
        }
        Some(if *until >= now {
            (*until - now).as_millis() as i64
        } else {
            -((now - *until).as_millis() as i64)
        })
    }

    /// What this node may serve, for the other nodes of its region:
    /// (home, epoch, remaining ms), lapsed ones left out.
    pub fn held_remaining(&self) -> Vec<(String, u64, u64)> {
        self.held_remaining_at(Instant::now())
    }

    fn held_remaining_at(&self, now: Instant) -> Vec<(String, u64, u64)> {
        self.lock()
            .held
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(h, (e, until))| (h.clone(), *e, (*until - now).as_millis() as u64))
            .collect()
    }

    /// Records a measurement of `region`'s clock.
    pub fn record_offset(&self, region: &str, sample: OffsetSample) {
        self.lock().offsets.insert(region.to_string(), sample);
        let status = self.offset_status();
        metrics::gauge!("geokv_clock_offset_ms", "peer" => region.to_string()).set(sample.offset_ms as f64);
        metrics::gauge!("geokv_clock_offset_exceeded").set(if status.exceeded { 1.0 } else { 0.0 });
    }

    /// The verdict from the fresh measurements.
    pub fn offset_status(&self) -> OffsetStatus {
        self.offset_status_at(Instant::now())
    }

    fn offset_status_at(&self, now: Instant) -> OffsetStatus {
        let inner = self.lock();
        let mut s = OffsetStatus::default();
        for sample in inner.offsets.values().filter(|x| now.saturating_duration_since(x.at) <= OFFSET_FRESH) {
            s.peers_measured += 1;
            let beyond = sample.offset_ms.unsigned_abs().saturating_sub(sample.uncertainty_ms);
            s.max_abs_offset_ms = s.max_abs_offset_ms.max(beyond);
            if beyond > self.max_offset_ms {
                s.peers_beyond += 1;
            }
        }
        s.exceeded = s.peers_measured > 0 && s.peers_beyond * 2 > s.peers_measured;
        s
    }

    /// Per peer region: (offset ms, uncertainty ms) of fresh measurements.
    pub fn offsets(&self) -> Vec<(String, i64, u64)> {
        self.lock()
            .offsets
            .iter()
            .filter(|(_, x)| x.at.elapsed() <= OFFSET_FRESH)
            .map(|(r, x)| (r.clone(), x.offset_ms, x.uncertainty_ms))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::control::{ControlCommand, ControlState, GrantReason};

    fn state_with(epoch_to: u64) -> ControlState {
        let mut s = ControlState::default();
        for e in 0..epoch_to {
            let reason = if e == 0 { GrantReason::Initial } else { GrantReason::Planned };
            if e > 0 {
                s.apply(&ControlCommand::Drain {
                    home: "a".into(),
                    epoch: e,
                    to: Some(format!("r{}", e + 1)),
                });
            }
            s.apply(&ControlCommand::Grant {
                home: "a".into(),
                expected_epoch: e,
                holder: format!("r{}", e + 1),
                now_ms: 0,
                lease_ms: 1000,
                max_offset_ms: 100,
                reason,
                expected_renewals: None,
            });
        }
        s
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn renew(s: &mut ControlState) {
        s.apply(&ControlCommand::Renew {
            home: "a".into(),
            holder: "r1".into(),
            epoch: 1,
            now_ms: 0,
            lease_ms: 1000,
        });
    }

    #[test]
    fn lapse_is_counted_from_the_observation_and_reset_by_a_renewal() {
        let clock = LeaseClock::new(100, 1000);
        let t0 = Instant::now();
        let mut s = state_with(1);
        clock.observe_at(&s, t0);
        assert!(!clock.lapsed_at("a", 1, 0, 1000, t0 + ms(1050)), "inside lease + offset");
        renew(&mut s);
        clock.observe_at(&s, t0 + ms(1050));
        assert!(!clock.lapsed_at("a", 1, 0, 2000, t0 + ms(9000)), "an older renewal count is never lapsed");
        assert!(!clock.lapsed_at("a", 1, 1, 1000, t0 + ms(2100)));
        assert!(clock.lapsed_at("a", 1, 1, 1000, t0 + ms(2151)));
    }

    #[test]
    fn the_holder_serves_until_send_plus_lease_less_offset() {
        let clock = LeaseClock::new(100, 1000);
        let t0 = Instant::now();
        clock.observe_at(&state_with(1), t0);
        clock.renewed("a", 1, t0, 1000);
        assert_eq!(clock.remaining_ms_at("a", 1, t0 + ms(300)), Some(600));
        assert!(clock.remaining_ms_at("a", 1, t0 + ms(901)).is_some_and(|r| r < 0));
        assert!(clock.held_remaining_at(t0 + ms(901)).is_empty());
        assert_eq!(clock.held_remaining_at(t0 + ms(100)), vec![("a".to_string(), 1, 800)]);
        // A newer epoch elsewhere drops what was held.
        clock.observe_at(&state_with(2), t0 + ms(100));
        assert_eq!(clock.remaining_ms_at("a", 1, t0 + ms(100)), None);
    }

    #[test]
    fn a_majority_of_peers_beyond_the_maximum_exceeds() {
        let clock = LeaseClock::new(500, 3000);
        let at = Instant::now();
        clock.record_offset("b", OffsetSample { offset_ms: 2000, uncertainty_ms: 10, at });
        assert!(clock.offset_status_at(at).exceeded, "one peer measured, beyond");
        clock.record_offset("c", OffsetSample { offset_ms: 30, uncertainty_ms: 10, at });
        assert!(!clock.offset_status_at(at).exceeded, "one of two is no majority");
        clock.record_offset("d", OffsetSample { offset_ms: -900, uncertainty_ms: 100, at });
        let s = clock.offset_status_at(at);
        assert!(s.exceeded && s.peers_beyond == 2 && s.max_abs_offset_ms == 1990, "{s:?}");
        // Uncertainty is given the benefit of the doubt.
        clock.record_offset("d", OffsetSample { offset_ms: -900, uncertainty_ms: 450, at });
        assert!(!clock.offset_status_at(at).exceeded);
        let later = at + OFFSET_FRESH + ms(1);
        assert_eq!(clock.offset_status_at(later), OffsetStatus::default(), "stale measurements do not count");
    }
}
