//! One home holder per epoch, and no write accepted under a superseded
//! epoch.
//!
//! Two kinds of observations feed it:
//! - the home leases every region's node reported while the run went on
//!   (polled region status) and those a failover call returned
//!   ([`EpochRecord`]);
//! - the acknowledgements of LOCAL writes, which name the region that
//!   accepted the write and the epoch it was accepted under ([`Ack`]).
//!
//! Rules:
//! 1. every (home, epoch) has one holder, in the leases and in the acks;
//! 2. once an epoch of a home was in force (seen by any observer, or a
//!    write acknowledged under it), no write invoked later is accepted
//!    under an older epoch of that home. The old holder stops before a
//!    planned transfer commits, and an unplanned one is granted only after
//!    the old lease (plus the clock offset) ran out, so a write invoked
//!    after the newer epoch was observed can only be accepted under it.
//!
//! No observation at all is `Unknown`: a checker that saw nothing decides
//! nothing.

use std::collections::{BTreeMap, BTreeSet};

use super::{Outcome, Verdict};
use crate::history::{Ack, EpochRecord, Kind, Op};

const NAME: &str = "one-home-per-epoch";

/// Problems listed in a failing verdict, at most.
const SHOWN_MAX: usize = 5;

pub fn check(ops: &[Op], epochs: &[EpochRecord]) -> Verdict {
    let acks: Vec<(&Op, &Ack)> =
        ops.iter().filter(|o| o.outcome == Kind::Ok).filter_map(|o| o.ack.as_ref().map(|a| (o, a))).collect();
    let leases: Vec<&EpochRecord> = epochs.iter().filter(|e| !e.holder.is_empty()).collect();
    if acks.is_empty() && leases.is_empty() {
        return Verdict::new(
            NAME,
            Outcome::Unknown,
            "no home lease observed and no LOCAL write acknowledged",
        );
    }
    let mut problems = Vec::new();

    // Rule 1, leases: (home, epoch) -> holders.
    let mut holders: BTreeMap<(&str, u64), BTreeSet<&str>> = BTreeMap::new();
    for e in &leases {
        holders.entry((&e.home, e.epoch)).or_default().insert(&e.holder);
    }
    for ((home, epoch), h) in &holders {
        if h.len() > 1 {
            problems.push(format!("home {home} epoch {epoch} held by {h:?}"));
        }
    }
    // Rule 1, acks: (home region, epoch) -> accepting regions.
    let mut acceptors: BTreeMap<(&str, u64), BTreeSet<&str>> = BTreeMap::new();
    for (_, a) in &acks {
        acceptors.entry((&a.home, a.epoch)).or_default().insert(&a.by);
    }
    for ((home, epoch), by) in &acceptors {
        if by.len() > 1 {
            problems.push(format!("writes homed in {home} accepted under epoch {epoch} by {by:?}"));
        }
    }

    // Rule 2. Acks name the home region only; lease observations are used
    // for a home region that has one home key (one zone), where they
    // cannot belong to another zone's lease.
    let mut keys_of_region: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in &leases {
        keys_of_region.entry(&e.home_region).or_default().insert(&e.home);
    }
    // (home region, epoch) -> (first time in force, by whom).
    let mut first_seen: BTreeMap<(&str, u64), (u64, String)> = BTreeMap::new();
    for e in &leases {
        if keys_of_region.get(e.home_region.as_str()).is_some_and(|k| k.len() == 1) {
            let seen = first_seen.entry((&e.home_region, e.epoch)).or_insert((u64::MAX, String::new()));
            if e.time_us < seen.0 {
                *seen = (e.time_us, format!("{} reported {} holding it", e.observed_by, e.holder));
            }
        }
    }
    for (o, a) in &acks {
        let seen = first_seen.entry((&a.home, a.epoch)).or_insert((u64::MAX, String::new()));
        if o.complete_us < seen.0 {
            *seen = (o.complete_us, format!("op {} acknowledged by {}", o.id, a.by));
        }
    }
    for (o, a) in &acks {
        let newer = first_seen
            .range((a.home.as_str(), a.epoch + 1)..=(a.home.as_str(), u64::MAX))
            .filter(|(_, (t, _))| *t < o.invoke_us)
            .min_by_key(|(_, (t, _))| *t);
        if let Some(((_, epoch), (t, how))) = newer {
            problems.push(format!(
                "op {} (invoked at {:.3} s) was accepted by {} under epoch {} of {}, but epoch {epoch} was in force from {:.3} s ({how})",
                o.id,
                o.invoke_us as f64 / 1e6,
                a.by,
                a.epoch,
                a.home,
                *t as f64 / 1e6
            ));
        }
    }

    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(SHOWN_MAX);
        return Verdict::new(NAME, Outcome::Fail, format!("{n} violations: {}", problems.join("; ")));
    }
    Verdict::new(
        NAME,
        Outcome::Pass,
        format!(
            "{} lease observations over {} (home, epoch) pairs and {} acknowledged LOCAL writes: one holder each, none accepted under a superseded epoch",
            leases.len(),
            holders.len(),
            acks.len()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Value, F};

    fn lease(t: u64, epoch: u64, holder: &str) -> EpochRecord {
        EpochRecord {
            time_us: t,
            home: "us-east-1".into(),
            home_region: "us-east-1".into(),
            holder: holder.into(),
            epoch,
            observed_by: "eu-west-1".into(),
        }
    }

    fn write(id: u64, invoke: u64, complete: u64, epoch: u64, by: &str) -> Op {
        Op {
            id,
            client: "c".into(),
            region: "us-east-1".into(),
            level: "LOCAL".into(),
            f: F::Write,
            key: "r0".into(),
            value: Value::Int(id as i64),
            invoke_us: invoke,
            complete_us: complete,
            outcome: Kind::Ok,
            error: None,
            ack: Some(Ack { home: "us-east-1".into(), epoch, by: by.into() }),
        }
    }

    #[test]
    fn handover_in_order_passes() {
        let leases = [lease(0, 1, "us-east-1"), lease(5_000, 2, "eu-west-1")];
        let ops = [write(1, 100, 200, 1, "us-east-1"), write(2, 6_000, 6_100, 2, "eu-west-1")];
        assert_eq!(check(&ops, &leases).outcome, Outcome::Pass);
        // A write under the old epoch that was invoked before the new one
        // was seen is fine, even if it completed after.
        let ops = [write(1, 4_000, 7_000, 1, "us-east-1"), write(2, 6_000, 6_100, 2, "eu-west-1")];
        assert_eq!(check(&ops, &leases).outcome, Outcome::Pass);
    }

    #[test]
    fn a_write_accepted_under_a_superseded_epoch_fails() {
        let leases = [lease(0, 1, "us-east-1"), lease(5_000, 2, "eu-west-1")];
        let ops = [write(1, 6_000, 6_100, 1, "us-east-1")];
        let v = check(&ops, &leases);
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.detail);
        assert!(v.detail.contains("epoch 2 was in force"), "{}", v.detail);
        // Seen through acknowledgements alone, without lease observations.
        let ops = [write(2, 1_000, 1_100, 2, "eu-west-1"), write(1, 2_000, 2_100, 1, "us-east-1")];
        assert_eq!(check(&ops, &[]).outcome, Outcome::Fail);
    }

    #[test]
    fn two_holders_of_one_epoch_fail_and_nothing_seen_is_unknown() {
        let v = check(&[], &[lease(0, 1, "us-east-1"), lease(10, 1, "eu-west-1")]);
        assert_eq!(v.outcome, Outcome::Fail);
        let ops = [write(1, 0, 10, 3, "us-east-1"), write(2, 0, 10, 3, "eu-west-1")];
        assert_eq!(check(&ops, &[]).outcome, Outcome::Fail);
        assert_eq!(check(&[], &[]).outcome, Outcome::Unknown);
    }
}
