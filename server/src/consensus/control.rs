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
    /// Per home, the highest epoch of a restored backup: every epoch
    /// granted from then on is above it (docs/decisions/029-zone-strict-backups.md).
    #[serde(default)]
    pub epoch_floors: BTreeMap<String, u64>,
}

/// A home's epochs as a restored backup knew them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredHome {
    pub home: String,
    /// The highest epoch of the backup.
    pub floor: u64,
    /// The backup's epochs with their ends: (epoch, holder, ended_ms).
    pub ended: Vec<(u64, String, u64)>,
    pub pruned: PrunedEpochs,
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
    /// After a backup is restored: each home's epoch history becomes the
    /// backup's (so a replicated entry of one of its epochs is fenced
    /// exactly as it was), and its lease moves to an epoch above every
    /// epoch of the backup, as does every later grant. Applied once per
    /// floor: a repeat is a no-op.
    RestoreEpochs {
        homes: Vec<RestoredHome>,
        now_ms: u64,
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
                let new_epoch = (*expected_epoch).max(self.epoch_floors.get(home).copied().unwrap_or(0)) + 1;
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
                        epoch: new_epoch,
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
                    epoch: new_epoch,
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
            ControlCommand::RestoreEpochs { homes, now_ms } => {
                for h in homes {
                    if self.epoch_floors.get(&h.home).is_some_and(|f| *f >= h.floor) {
                        continue;
                    }
                    self.epoch_floors.insert(h.home.clone(), h.floor);
                    let mut history: Vec<EpochRecord> = h
                        .ended
                        .iter()
                        .filter(|(epoch, _, _)| *epoch <= h.floor)
                        .map(|(epoch, holder, ended_ms)| EpochRecord {
                            epoch: *epoch,
                            holder: holder.clone(),
                            granted_ms: 0,
                            ended_ms: Some(*ended_ms),
                            reason: GrantReason::Initial,
                        })
                        .collect();
                    let mut pruned = h.pruned;
                    if let Some(lease) = self.leases.get_mut(&h.home) {
                        if lease.epoch <= h.floor {
                            // Same holder, a new epoch: it serves again
                            // after its first renewal under it.
                            lease.epoch = h.floor + 1;
                            lease.renewals = 0;
                            lease.granted_ms = *now_ms;
                            lease.draining_to = None;
                        }
                        history.push(EpochRecord {
                            epoch: lease.epoch,
                            holder: lease.holder.clone(),
                            granted_ms: *now_ms,
                            ended_ms: None,
                            reason: lease.reason,
                        });
                    }
                    while history.len() > EPOCH_HISTORY_MAX {
                        let gone = history.remove(0);
                        pruned.through_epoch = pruned.through_epoch.max(gone.epoch);
                        pruned.ended_ms_max =
                            pruned.ended_ms_max.max(gone.ended_ms.unwrap_or(gone.granted_ms));
                    }
                    self.history.insert(h.home.clone(), history);
                    if pruned.through_epoch > 0 {
                        self.pruned.insert(h.home.clone(), pruned);
                    } else {
                        self.pruned.remove(&h.home);
                    }
                }
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
    fn a_restore_moves_epochs_above_the_backup_and_keeps_its_ends() {
        let mut s = ControlState::default();
        assert!(matches!(s.apply(&grant("us", 0, "us", 1000, GrantReason::Initial)), ControlReply::Lease(_)));
        let restore = ControlCommand::RestoreEpochs {
            homes: vec![RestoredHome {
                home: "us".into(),
                floor: 3,
                ended: vec![(2, "eu".into(), 5000), (3, "us".into(), 9000)],
                pruned: PrunedEpochs { through_epoch: 1, ended_ms_max: 2000 },
            }],
            now_ms: 20_000,
        };
        assert_eq!(s.apply(&restore), ControlReply::Done);
        let l = &s.leases["us"];
        assert_eq!((l.holder.as_str(), l.epoch, l.renewals), ("us", 4, 0));
        assert_eq!(s.epoch_record("us", 3).and_then(|r| r.ended_ms), Some(9000));
        assert_eq!(s.epoch_record("us", 2).and_then(|r| r.ended_ms), Some(5000));
        assert_eq!(s.epoch_record("us", 4).and_then(|r| r.ended_ms), None);
        assert_eq!(s.pruned["us"].through_epoch, 1);
        // Applied again: nothing changes.
        let before = s.clone();
        assert_eq!(s.apply(&restore), ControlReply::Done);
        assert_eq!(s, before);
        // A home first granted after the restore starts above its floor.
        let restore_eu = ControlCommand::RestoreEpochs {
            homes: vec![RestoredHome {
                home: "eu".into(),
                floor: 7,
                ended: vec![],
                pruned: PrunedEpochs::default(),
            }],
            now_ms: 20_000,
        };
        s.apply(&restore_eu);
        match s.apply(&grant("eu", 0, "eu", 21_000, GrantReason::Initial)) {
            ControlReply::Lease(l) => assert_eq!(l.epoch, 8),
            other => panic!("{other:?}"),
        }
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
