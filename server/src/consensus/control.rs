//! The control plane's state machine: home leases, epochs and failover
//! state (docs/architecture.md section 8).
//!
//! A *home* is a pair (home region, residency zone): rows homed in a
//! region fail over only inside their zone, so each zone a region belongs
//! to is a separate home with its own lease and epoch, and the pair with no
//! zone covers unrestricted rows. A lease names the region serving the
//! home (its holder), the epoch, and when it expires by the proposer's
//! wall clock. Everything here is pure: commands carry the time they were
//! proposed at, so every member applies them to the same result.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Epoch records kept per home, oldest dropped first.
pub const EPOCH_HISTORY_MAX: usize = 64;

/// Name of a home: `region` for unrestricted rows, `region@zone` otherwise.
pub fn home_key(region: &str, zone: &str) -> String {
    if zone.is_empty() {
        region.to_string()
    } else {
        format!("{region}@{zone}")
    }
}

/// The (region, zone) of a home key.
pub fn split_home_key(key: &str) -> (&str, &str) {
    key.split_once('@').unwrap_or((key, ""))
}

/// Why a lease changed hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrantReason {
    /// First grant of a home to its own region.
    Initial,
    /// The holder's lease lapsed and another region took over.
    Failover,
    /// A planned handover after draining (also used for failback).
    Planned,
}

impl GrantReason {
    /// The name status output, the dashboard and metrics use.
    pub fn name(self) -> &'static str {
        match self {
            GrantReason::Initial => "initial",
            GrantReason::Failover => "failover",
            GrantReason::Planned => "planned",
        }
    }
}

/// The lease of one home.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeLease {
    pub home: String,
    pub holder: String,
    pub epoch: u64,
    /// Wall-clock milliseconds (of the proposer) after which the lease is void.
    pub expires_ms: u64,
    pub granted_ms: u64,
    pub reason: GrantReason,
    /// When set, the holder stops accepting writes and hands the home to
    /// this region once it has shipped its tail.
    pub draining_to: Option<String>,
}

/// One finished or current epoch of a home.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub holder: String,
    pub granted_ms: u64,
    /// The last expiry of the epoch's lease: no write accepted under the
    /// epoch can carry a later wall-clock time (plus the max clock offset).
    /// None while the epoch is current.
    pub ended_ms: Option<u64>,
    pub reason: GrantReason,
}

/// A finished failover or handover, for status output and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverEvent {
    pub home: String,
    pub from: String,
    pub to: String,
    pub epoch: u64,
    pub at_ms: u64,
    /// How long the home had no valid lease (0 for a planned handover).
    pub unavailable_ms: u64,
    pub reason: GrantReason,
}

/// The replicated control-plane state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    pub leases: BTreeMap<String, HomeLease>,
    pub history: BTreeMap<String, Vec<EpochRecord>>,
    /// Cluster setting: when true, lapsed leases are never moved
    /// automatically (manual-only operation).
    pub manual_only: bool,
    /// Most recent failovers, newest last, bounded.
    pub events: Vec<FailoverEvent>,
}

/// Failover events kept in the state.
pub const EVENTS_MAX: usize = 32;

/// A change to the control-plane state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlCommand {
    /// The holder extends its lease to `now_ms + lease_ms`.
    Renew {
        home: String,
        holder: String,
        epoch: u64,
        now_ms: u64,
        lease_ms: u64,
    },
    /// Gives the home to `holder` with epoch `expected_epoch + 1`, if the
    /// current epoch is still `expected_epoch`. A failover grant is only
    /// valid once the old lease has lapsed by more than `max_offset_ms`; a
    /// planned one only once the holder drained toward `holder`.
    Grant {
        home: String,
        expected_epoch: u64,
        holder: String,
        now_ms: u64,
        lease_ms: u64,
        max_offset_ms: u64,
        reason: GrantReason,
    },
    /// Starts (`to: Some`) or cancels (`to: None`) a planned handover.
    Drain {
        home: String,
        epoch: u64,
        to: Option<String>,
    },
    SetManualOnly {
        manual_only: bool,
    },
}

/// The outcome of a control command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlReply {
    Lease(HomeLease),
    Done,
    Rejected { why: String },
}

impl ControlState {
    /// The epoch record of `home` at `epoch`, if still kept.
    pub fn epoch_record(&self, home: &str, epoch: u64) -> Option<&EpochRecord> {
        self.history.get(home)?.iter().find(|r| r.epoch == epoch)
    }

    /// Applies a command; deterministic.
    pub fn apply(&mut self, cmd: &ControlCommand) -> ControlReply {
        match cmd {
            ControlCommand::Renew { home, holder, epoch, now_ms, lease_ms } => {
                let Some(lease) = self.leases.get_mut(home) else {
                    return ControlReply::Rejected { why: format!("home {home} has no lease") };
                };
                if &lease.holder != holder || lease.epoch != *epoch {
                    return ControlReply::Rejected {
                        why: format!("home {home} is held by {} at epoch {}", lease.holder, lease.epoch),
                    };
                }
                if lease.draining_to.is_some() {
                    return ControlReply::Rejected { why: format!("home {home} is draining") };
                }
                if *now_ms >= lease.expires_ms {
                    // A lapsed lease is not revived: the holder may already
                    // have been judged dead, and a failover grant may be in
                    // flight. It must take the home again with a new epoch.
                    return ControlReply::Rejected { why: format!("lease of {home} lapsed") };
                }
                lease.expires_ms = lease.expires_ms.max(now_ms.saturating_add(*lease_ms));
                ControlReply::Lease(lease.clone())
            }
            ControlCommand::Grant {
                home,
                expected_epoch,
                holder,
                now_ms,
                lease_ms,
                max_offset_ms,
                reason,
            } => {
                let current = self.leases.get(home);
                let current_epoch = current.map_or(0, |l| l.epoch);
                if current_epoch != *expected_epoch {
                    return ControlReply::Rejected {
                        why: format!("home {home} is at epoch {current_epoch}, not {expected_epoch}"),
                    };
                }
                let mut unavailable_ms = 0;
                if let Some(old) = current {
                    match reason {
                        GrantReason::Initial => {
                            return ControlReply::Rejected {
                                why: format!("home {home} was already granted"),
                            };
                        }
                        GrantReason::Failover => {
                            let safe_after = old.expires_ms.saturating_add(*max_offset_ms);
                            if *now_ms <= safe_after {
                                return ControlReply::Rejected {
                                    why: format!("lease of {home} is valid until {safe_after}"),
                                };
                            }
                            unavailable_ms = now_ms - old.expires_ms;
                        }
                        GrantReason::Planned => {
                            if old.draining_to.as_deref() != Some(holder.as_str()) {
                                return ControlReply::Rejected {
                                    why: format!("home {home} is not draining to {holder}"),
                                };
                            }
                        }
                    }
                }
                let history = self.history.entry(home.clone()).or_default();
                if let Some(old) = current {
                    if let Some(rec) = history.iter_mut().find(|r| r.epoch == old.epoch) {
                        // No write under the old epoch carries a later
                        // wall-clock time: the holder accepts writes only
                        // before its lease expires, and a planned handover
                        // is proposed by the drained holder itself.
                        rec.ended_ms = Some(if *reason == GrantReason::Planned {
                            old.expires_ms.min(*now_ms)
                        } else {
                            old.expires_ms
                        });
                    }
                    self.events.push(FailoverEvent {
                        home: home.clone(),
                        from: old.holder.clone(),
                        to: holder.clone(),
                        epoch: expected_epoch + 1,
                        at_ms: *now_ms,
                        unavailable_ms,
                        reason: *reason,
                    });
                    if self.events.len() > EVENTS_MAX {
                        self.events.remove(0);
                    }
                }
                let lease = HomeLease {
                    home: home.clone(),
                    holder: holder.clone(),
                    epoch: expected_epoch + 1,
                    expires_ms: now_ms.saturating_add(*lease_ms),
                    granted_ms: *now_ms,
                    reason: *reason,
                    draining_to: None,
                };
                history.push(EpochRecord {
                    epoch: lease.epoch,
                    holder: holder.clone(),
                    granted_ms: *now_ms,
                    ended_ms: None,
                    reason: *reason,
                });
                if history.len() > EPOCH_HISTORY_MAX {
                    history.remove(0);
                }
                self.leases.insert(home.clone(), lease.clone());
                ControlReply::Lease(lease)
            }
            ControlCommand::Drain { home, epoch, to } => {
                let Some(lease) = self.leases.get_mut(home) else {
                    return ControlReply::Rejected { why: format!("home {home} has no lease") };
                };
                if lease.epoch != *epoch {
                    return ControlReply::Rejected {
                        why: format!("home {home} is at epoch {}, not {epoch}", lease.epoch),
                    };
                }
                if to.as_deref() == Some(lease.holder.as_str()) {
                    return ControlReply::Rejected { why: format!("{} already holds {home}", lease.holder) };
                }
                lease.draining_to = to.clone();
                ControlReply::Lease(lease.clone())
            }
            ControlCommand::SetManualOnly { manual_only } => {
                self.manual_only = *manual_only;
                ControlReply::Done
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(home: &str, expected: u64, holder: &str, now: u64, reason: GrantReason) -> ControlCommand {
        ControlCommand::Grant {
            home: home.into(),
            expected_epoch: expected,
            holder: holder.into(),
            now_ms: now,
            lease_ms: 3000,
            max_offset_ms: 500,
            reason,
        }
    }

    fn lease(reply: ControlReply) -> HomeLease {
        match reply {
            ControlReply::Lease(l) => l,
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    #[test]
    fn initial_grant_then_renew_extends() {
        let mut s = ControlState::default();
        let l = lease(s.apply(&grant("a", 0, "a", 1000, GrantReason::Initial)));
        assert_eq!((l.epoch, l.expires_ms), (1, 4000));
        let renew = ControlCommand::Renew {
            home: "a".into(),
            holder: "a".into(),
            epoch: 1,
            now_ms: 2000,
            lease_ms: 3000,
        };
        assert_eq!(lease(s.apply(&renew)).expires_ms, 5000);
        // A second initial grant is refused.
        assert!(matches!(
            s.apply(&grant("a", 1, "a", 2000, GrantReason::Initial)),
            ControlReply::Rejected { .. }
        ));
    }

    #[test]
    fn failover_waits_for_expiry_plus_offset_and_fences_the_old_epoch() {
        let mut s = ControlState::default();
        lease(s.apply(&grant("a", 0, "a", 1000, GrantReason::Initial)));
        // Lease valid until 4000; with 500 ms offset no grant before 4500.
        assert!(matches!(
            s.apply(&grant("a", 1, "b", 4500, GrantReason::Failover)),
            ControlReply::Rejected { .. }
        ));
        let l = lease(s.apply(&grant("a", 1, "b", 4501, GrantReason::Failover)));
        assert_eq!((l.holder.as_str(), l.epoch), ("b", 2));
        assert_eq!(s.epoch_record("a", 1).and_then(|r| r.ended_ms), Some(4000));
        // The old holder can no longer renew, under either epoch.
        for epoch in [1, 2] {
            let renew = ControlCommand::Renew {
                home: "a".into(),
                holder: "a".into(),
                epoch,
                now_ms: 4600,
                lease_ms: 3000,
            };
            assert!(matches!(s.apply(&renew), ControlReply::Rejected { .. }));
        }
        // A duplicate failover proposal for the same epoch is refused.
        assert!(matches!(
            s.apply(&grant("a", 1, "c", 4700, GrantReason::Failover)),
            ControlReply::Rejected { .. }
        ));
        assert_eq!(s.events.len(), 1);
    }

    #[test]
    fn lapsed_lease_is_not_revived_by_renew() {
        let mut s = ControlState::default();
        lease(s.apply(&grant("a", 0, "a", 1000, GrantReason::Initial)));
        let renew = ControlCommand::Renew {
            home: "a".into(),
            holder: "a".into(),
            epoch: 1,
            now_ms: 4000,
            lease_ms: 3000,
        };
        assert!(matches!(s.apply(&renew), ControlReply::Rejected { .. }));
    }

    #[test]
    fn planned_handover_needs_drain_and_blocks_renewal() {
        let mut s = ControlState::default();
        lease(s.apply(&grant("a", 0, "a", 1000, GrantReason::Initial)));
        assert!(matches!(
            s.apply(&grant("a", 1, "b", 1500, GrantReason::Planned)),
            ControlReply::Rejected { .. }
        ));
        let drain = ControlCommand::Drain { home: "a".into(), epoch: 1, to: Some("b".into()) };
        assert_eq!(lease(s.apply(&drain)).draining_to.as_deref(), Some("b"));
        let renew = ControlCommand::Renew {
            home: "a".into(),
            holder: "a".into(),
            epoch: 1,
            now_ms: 1600,
            lease_ms: 3000,
        };
        assert!(matches!(s.apply(&renew), ControlReply::Rejected { .. }));
        let l = lease(s.apply(&grant("a", 1, "b", 1700, GrantReason::Planned)));
        assert_eq!((l.holder.as_str(), l.epoch, l.draining_to.clone()), ("b", 2, None));
        // A planned handover ends the old epoch at the handover time.
        assert_eq!(s.epoch_record("a", 1).and_then(|r| r.ended_ms), Some(1700));
    }

    #[test]
    fn home_keys_round_trip() {
        assert_eq!(home_key("eu-west-1", "eu"), "eu-west-1@eu");
        assert_eq!(split_home_key("eu-west-1@eu"), ("eu-west-1", "eu"));
        assert_eq!(split_home_key("us-east-1"), ("us-east-1", ""));
    }
}
