//! The control plane's state machine: home leases, epochs and failover
//! state (docs/architecture.md section 8).
//!
//! A *home* is a pair (home region, residency zone): rows homed in a
//! region fail over only inside their zone, so each zone a region belongs
//! to is a separate home with its own lease and epoch, and the pair with no
//! zone covers unrestricted rows. A lease names the region serving the
//! home (its holder), the epoch, and how many renewals committed under it.
//! Everything here is pure: no clock reading decides anything here. When a
//! lease lapses is judged by each node on its monotonic clock
//! ([`crate::failover::lease_clock`], docs/architecture.md section 18); a
//! failover grant names the renewal count its proposer saw lapse, and is
//! refused if a renewal committed since. The wall-clock times commands
//! carry are for status output and for fencing replicated entries only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Epoch records kept one by one per home; older ones are folded into
/// [`PrunedEpochs`], which still fences their late entries.
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
    /// The holder's HLC time of its last renewal plus the lease length:
    /// no write accepted under the lease carries a later stamp (plus the
    /// max clock offset). For fencing entries and status only: validity is
    /// timed on monotonic clocks.
    pub expires_ms: u64,
    pub granted_ms: u64,
    /// Renewals committed under this epoch: a failover grant must name the
    /// count it saw lapse.
    #[serde(default)]
    pub renewals: u64,
    /// Length of the lease as last granted or renewed, in ms (0: the
    /// configured default).
    #[serde(default)]
    pub lease_ms: u64,
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

/// Epoch records of a home that left the bounded history, folded into one
/// bound: an entry of one of these epochs is valid only if stamped before
/// the latest of their ends (plus the offset), never merely because its
/// record is gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunedEpochs {
    /// Every epoch up to this one was pruned.
    pub through_epoch: u64,
    /// The latest `ended_ms` of the pruned epochs.
    pub ended_ms_max: u64,
}

/// The replicated control-plane state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    pub leases: BTreeMap<String, HomeLease>,
    pub history: BTreeMap<String, Vec<EpochRecord>>,
    /// Per home, the epochs folded out of `history`.
    #[serde(default)]
    pub pruned: BTreeMap<String, PrunedEpochs>,
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
    /// The holder renews its lease (`now_ms`: its HLC time, for fencing
    /// entries and status).
    Renew {
        home: String,
        holder: String,
        epoch: u64,
        now_ms: u64,
        lease_ms: u64,
    },
    /// Gives the home to `holder` with epoch `expected_epoch + 1`, if the
    /// current epoch is still `expected_epoch`. A failover grant names the
    /// renewal count its proposer saw lapse (on its monotonic clock) and is
    /// refused if a renewal committed since; a planned one is only valid
    /// once the holder drained toward `holder`.
    Grant {
        home: String,
        expected_epoch: u64,
        holder: String,
        now_ms: u64,
        lease_ms: u64,
        max_offset_ms: u64,
        reason: GrantReason,
        #[serde(default)]
        expected_renewals: Option<u64>,
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

/// Whether the test-only `proposer-clock-leases` bug is switched on.
fn proposer_clock_leases() -> bool {
    #[cfg(feature = "bugs")]
    {
        crate::bugs::active(crate::bugs::Bug::ProposerClockLeases)
    }
    #[cfg(not(feature = "bugs"))]
    {
        false
    }
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
                // A renewal after the holder's own lapse is safe: a failover
                // grant in flight names the renewal count it saw lapse and
                // is refused once this one commits.
                lease.renewals += 1;
                lease.lease_ms = *lease_ms;
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
                expected_renewals,
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
                            if proposer_clock_leases() && expected_renewals.is_none() {
                                // Put-back bug: validity by the proposer's wall clock.
                                let safe_after = old.expires_ms.saturating_add(*max_offset_ms);
                                if *now_ms <= safe_after {
                                    return ControlReply::Rejected {
                                        why: format!("lease of {home} is valid until {safe_after}"),
                                    };
                                }
                            } else if *expected_renewals != Some(old.renewals) {
                                return ControlReply::Rejected {
                                    why: format!(
                                        "lease of {home} was renewed ({} renewals, the proposer saw {expected_renewals:?} lapse)",
                                        old.renewals
                                    ),
                                };
                            }
                            unavailable_ms = now_ms.saturating_sub(old.expires_ms);
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
                    renewals: 0,
                    lease_ms: *lease_ms,
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
                    let gone = history.remove(0);
                    let p = self.pruned.entry(home.clone()).or_default();
                    p.through_epoch = p.through_epoch.max(gone.epoch);
                    // An epoch pruned while current cannot happen (the
                    // current one is the newest); without an end, its grant
                    // time is the safest bound known.
                    p.ended_ms_max = p.ended_ms_max.max(gone.ended_ms.unwrap_or(gone.granted_ms));
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
            expected_renewals: Some(0),
        }
    }

    fn failover(home: &str, expected: u64, holder: &str, now: u64, renewals: Option<u64>) -> ControlCommand {
        match grant(home, expected, holder, now, GrantReason::Failover) {
            ControlCommand::Grant {
                home,
                expected_epoch,
                holder,
                now_ms,
                lease_ms,
                max_offset_ms,
                reason,
                ..
            } => ControlCommand::Grant {
                home,
                expected_epoch,
                holder,
                now_ms,
                lease_ms,
                max_offset_ms,
                reason,
                expected_renewals: renewals,
            },
            other => other,
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
    fn failover_needs_the_renewal_count_it_saw_lapse_and_fences_the_old_epoch() {
        let mut s = ControlState::default();
        lease(s.apply(&grant("a", 0, "a", 1000, GrantReason::Initial)));
        let renew = |epoch, now_ms| ControlCommand::Renew {
            home: "a".into(),
            holder: "a".into(),
            epoch,
            now_ms,
            lease_ms: 3000,
        };
        assert_eq!(lease(s.apply(&renew(1, 2000))).renewals, 1);
        // Wall-clock times decide nothing: a proposer whose clock runs far
        // ahead cannot take the home while renewals go on.
        for seen in [None, Some(0)] {
            assert!(matches!(
                s.apply(&failover("a", 1, "b", 1_000_000, seen)),
                ControlReply::Rejected { .. }
            ));
        }
        let l = lease(s.apply(&failover("a", 1, "b", 0, Some(1))));
        assert_eq!((l.holder.as_str(), l.epoch, l.renewals), ("b", 2, 0));
        assert_eq!(s.epoch_record("a", 1).and_then(|r| r.ended_ms), Some(5000));
        // The old holder can no longer renew, under either epoch.
        for epoch in [1, 2] {
            assert!(matches!(s.apply(&renew(epoch, 4600)), ControlReply::Rejected { .. }));
        }
        // A duplicate failover proposal for the same epoch is refused.
        assert!(matches!(s.apply(&failover("a", 1, "c", 4700, Some(1))), ControlReply::Rejected { .. }));
        assert_eq!(s.events.len(), 1);
    }

    #[test]
    fn a_renewal_after_a_lapse_voids_the_failover_in_flight() {
        let mut s = ControlState::default();
        lease(s.apply(&grant("a", 0, "a", 1000, GrantReason::Initial)));
        // The holder renews late (its proposer clock far behind, even); the
        // grant proposed for the count 0 must not pass after it.
        let renew = ControlCommand::Renew {
            home: "a".into(),
            holder: "a".into(),
            epoch: 1,
            now_ms: 1,
            lease_ms: 3000,
        };
        assert_eq!(lease(s.apply(&renew)).renewals, 1);
        assert!(matches!(s.apply(&failover("a", 1, "b", 9000, Some(0))), ControlReply::Rejected { .. }));
        assert_eq!(s.leases["a"].holder, "a");
    }

    #[test]
    fn pruned_epochs_keep_their_bound() {
        let mut s = ControlState::default();
        lease(s.apply(&grant("a", 0, "r0", 0, GrantReason::Initial)));
        for e in 1..=(EPOCH_HISTORY_MAX as u64 + 10) {
            let holder = format!("r{}", e % 3);
            lease(s.apply(&failover("a", e, &holder, e * 10_000, Some(0))));
        }
        assert_eq!(s.history["a"].len(), EPOCH_HISTORY_MAX);
        let p = s.pruned["a"];
        assert_eq!(p.through_epoch, 11);
        // Epoch 11 was granted at 100000 and ended with its lease at 103000.
        assert_eq!(p.ended_ms_max, 103_000);
        assert!(s.epoch_record("a", 5).is_none());
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
