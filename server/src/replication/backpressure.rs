//! Back-pressure from replication on writers: pure decision, tested alone.
//!
//! Writers are slowed when the backlog (unshipped log entries) towards a
//! healthy destination node passes the soft bound, by a delay growing
//! linearly up to `delay_max` at the hard bound, and refused beyond the
//! hard bound with `REPLICATION_BACKPRESSURE` (retryable). A destination
//! that is down, unhealthy, paused by the operator, being repaired, or
//! already behind log retention never holds writers back: it falls behind
//! retention instead and Merkle-tree anti-entropy repairs it.

use std::time::Duration;

/// The configured bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub soft_entries: u64,
    pub hard_entries: u64,
    pub delay_max: Duration,
    pub retention_entries: u64,
}

/// One link as back-pressure sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkLoad {
    /// "region/node" of the destination.
    pub destination: String,
    pub backlog_entries: u64,
    /// Connected, its region healthy, not paused, not being repaired.
    pub healthy: bool,
}

/// What a write must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admit,
    Delay { delay: Duration, destination: String, backlog_entries: u64 },
    Reject { destination: String, backlog_entries: u64 },
}

/// Decides from the most backlogged link that may hold writers back.
pub fn decide(bounds: &Bounds, links: &[LinkLoad]) -> Decision {
    let worst = links
        .iter()
        .filter(|l| l.healthy && l.backlog_entries < bounds.retention_entries)
        .max_by_key(|l| l.backlog_entries);
    let Some(worst) = worst else { return Decision::Admit };
    let backlog = worst.backlog_entries;
    if backlog > bounds.hard_entries {
        return Decision::Reject { destination: worst.destination.clone(), backlog_entries: backlog };
    }
    if backlog > bounds.soft_entries {
        let span = bounds.hard_entries.saturating_sub(bounds.soft_entries).max(1);
        let over = backlog - bounds.soft_entries;
        let delay = bounds.delay_max.mul_f64((over as f64 / span as f64).min(1.0));
        return Decision::Delay { delay, destination: worst.destination.clone(), backlog_entries: backlog };
    }
    Decision::Admit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds {
        Bounds {
            soft_entries: 100,
            hard_entries: 300,
            delay_max: Duration::from_millis(200),
            retention_entries: 1000,
        }
    }

    fn link(backlog: u64, healthy: bool) -> LinkLoad {
        LinkLoad { destination: "b/n1".into(), backlog_entries: backlog, healthy }
    }

    #[test]
    fn engages_between_the_bounds_and_releases_below() {
        assert_eq!(decide(&bounds(), &[link(100, true)]), Decision::Admit);
        match decide(&bounds(), &[link(200, true), link(50, true)]) {
            Decision::Delay { delay, backlog_entries, .. } => {
                assert_eq!(delay, Duration::from_millis(100), "half way between the bounds");
                assert_eq!(backlog_entries, 200);
            }
            other => panic!("expected a delay, got {other:?}"),
        }
        assert!(matches!(decide(&bounds(), &[link(301, true)]), Decision::Reject { .. }));
        assert_eq!(decide(&bounds(), &[link(20, true)]), Decision::Admit, "released once drained");
    }

    #[test]
    fn unhealthy_paused_or_trimmed_destinations_never_hold_writers() {
        assert_eq!(decide(&bounds(), &[link(900, false)]), Decision::Admit);
        assert_eq!(
            decide(&bounds(), &[link(1000, true)]),
            Decision::Admit,
            "behind retention: repaired instead"
        );
        assert_eq!(decide(&bounds(), &[]), Decision::Admit);
    }
}
