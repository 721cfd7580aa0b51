//! Big rows after the heal: every region reads the same values of every hot
//! key, no acknowledged write is lost, and no refused write was stored.
//!
//! Values carry unique ids. A write with a read's context supersedes
//! exactly the values that read returned, so an acknowledged value may be
//! missing at the end only when a resolve that may have applied (ok or
//! unknown) saw it. A write refused with a definite failure (a row bound,
//! `ROW_TOO_LARGE` / `TOO_MANY_SIBLINGS`, among them) must not appear: the
//! bounds hold before anything is stored. Every value read at the end must
//! have been written.

use std::collections::{BTreeMap, BTreeSet};

use super::{is_final, Outcome, Verdict};
use crate::history::{Kind, Op, Value, F};

/// Problems listed in a failing verdict, at most.
const PROBLEMS_SHOWN: usize = 10;

#[derive(Default)]
struct KeyFacts {
    acked: BTreeSet<i64>,
    maybe: BTreeSet<i64>,
    refused: BTreeSet<i64>,
    superseded: BTreeSet<i64>,
    /// A resolve that may have applied but whose read was not recorded (it
    /// timed out): a missing value may be its doing, so it is undecided.
    blind_resolve: bool,
    /// Region -> the ids read there after the heal.
    finals: BTreeMap<String, Vec<i64>>,
}

/// The value written (first) and, for a resolve, the values it saw.
fn written(o: &Op) -> Option<(i64, &[i64])> {
    match (&o.f, &o.value) {
        (F::Write, Value::Int(id)) | (F::Write, Value::Pair([id, _])) => Some((*id, &[])),
        (F::Resolve, Value::List(all)) => all.split_first().map(|(id, seen)| (*id, seen)),
        (F::Resolve, Value::Int(id)) => Some((*id, &[])),
        _ => None,
    }
}

pub fn check(ops: &[Op]) -> Verdict {
    let mut keys: BTreeMap<&str, KeyFacts> = BTreeMap::new();
    let mut refusals: BTreeMap<String, u64> = BTreeMap::new();
    let mut undecided = Vec::new();
    for o in ops {
        let facts = keys.entry(o.key.as_str()).or_default();
        if is_final(o) {
            match (o.outcome, &o.value) {
                (Kind::Ok, Value::List(ids)) => {
                    facts.finals.insert(o.region.clone(), ids.clone());
                }
                (Kind::Ok, Value::None) => {
                    facts.finals.insert(o.region.clone(), Vec::new());
                }
                _ => undecided
                    .push(format!("final read of {} in {} did not complete: {:?}", o.key, o.region, o.error)),
            }
            continue;
        }
        let Some((id, seen)) = written(o) else { continue };
        match o.outcome {
            Kind::Ok => {
                facts.acked.insert(id);
                facts.superseded.extend(seen);
            }
            Kind::Unknown => {
                facts.maybe.insert(id);
                facts.superseded.extend(seen);
                facts.blind_resolve |= o.f == F::Resolve && !matches!(o.value, Value::List(_));
            }
            Kind::Fail => {
                facts.refused.insert(id);
                *refusals.entry(o.error.clone().unwrap_or_default()).or_default() += 1;
            }
            Kind::Invoke => {}
        }
    }
    keys.retain(|_, f| !f.acked.is_empty() || !f.finals.is_empty() || !f.maybe.is_empty());
    if keys.is_empty() {
        undecided.push("no big-rows write or final read in the history".into());
    }
    if !undecided.is_empty() {
        return Verdict::new("big-rows", Outcome::Unknown, undecided.join("; "));
    }
    let mut problems = Vec::new();
    let mut acked_total = 0;
    for (key, f) in &keys {
        acked_total += f.acked.len();
        let Some((first_region, first)) = f.finals.iter().next() else {
            problems.push(format!("{key}: no final read"));
            continue;
        };
        for (region, ids) in &f.finals {
            if ids != first {
                problems.push(format!("{key}: {region} reads {ids:?}, {first_region} reads {first:?}"));
            }
        }
        let present: BTreeSet<i64> = first.iter().copied().collect();
        for id in f.acked.difference(&present) {
            if f.superseded.contains(id) {
                continue;
            }
            if f.blind_resolve {
                undecided.push(format!(
                    "{key}: value {id} missing, and a resolve whose read is unknown may have superseded it"
                ));
            } else {
                problems.push(format!("{key}: acknowledged value {id} lost (no resolve saw it)"));
            }
        }
        for id in &present {
            if f.refused.contains(id) {
                problems.push(format!("{key}: value {id} was refused but is stored"));
            } else if !f.acked.contains(id) && !f.maybe.contains(id) {
                problems.push(format!("{key}: value {id} was never written"));
            }
        }
    }
    if !problems.is_empty() {
        let shown = problems.len().min(PROBLEMS_SHOWN);
        return Verdict::new(
            "big-rows",
            Outcome::Fail,
            format!("{} problems, first {shown}: {}", problems.len(), problems[..shown].join("; ")),
        );
    }
    if !undecided.is_empty() {
        let shown = undecided.len().min(PROBLEMS_SHOWN);
        return Verdict::new("big-rows", Outcome::Unknown, undecided[..shown].join("; "));
    }
    Verdict::new(
        "big-rows",
        Outcome::Pass,
        format!(
            "{} hot keys read alike in every region; {acked_total} acknowledged values kept or superseded by a resolve that saw them; refusals {refusals:?}, none stored",
            keys.len()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::test_support::op;

    fn base() -> Vec<Op> {
        vec![
            op(1, "c1", "us-east-1", F::Write, "b0", Value::Int(1), Kind::Ok),
            op(2, "c2", "eu-west-1", F::Write, "b0", Value::Int(2), Kind::Ok),
            op(3, "c2", "eu-west-1", F::Write, "b0", Value::Int(3), Kind::Fail),
            // Saw 1 and wrote 4 with its context.
            op(4, "c1", "us-east-1", F::Resolve, "b0", Value::List(vec![4, 1]), Kind::Ok),
            op(5, "c3", "ap-southeast-1", F::Write, "b0", Value::Int(5), Kind::Unknown),
        ]
    }

    fn finals(ids: &[i64]) -> Vec<Op> {
        ["us-east-1", "eu-west-1"]
            .iter()
            .enumerate()
            .map(|(i, r)| {
                op(
                    100 + i as u64,
                    &format!("final-{r}"),
                    r,
                    F::Read,
                    "b0",
                    Value::List(ids.to_vec()),
                    Kind::Ok,
                )
            })
            .collect()
    }

    #[test]
    fn kept_or_superseded_values_pass() {
        let mut h = base();
        h.extend(finals(&[2, 4]));
        assert_eq!(check(&h).outcome, Outcome::Pass, "{:?}", check(&h));
        // The unknown write may be there too.
        let mut h = base();
        h.extend(finals(&[2, 4, 5]));
        assert_eq!(check(&h).outcome, Outcome::Pass, "{:?}", check(&h));
    }

    #[test]
    fn a_lost_a_refused_or_an_invented_value_fails() {
        for (ids, why) in
            [(&[4][..], "lost"), (&[2, 3, 4][..], "refused but is stored"), (&[2, 4, 9][..], "never written")]
        {
            let mut h = base();
            h.extend(finals(ids));
            let v = check(&h);
            assert_eq!(v.outcome, Outcome::Fail, "{ids:?}");
            assert!(v.detail.contains(why), "{ids:?}: {}", v.detail);
        }
    }

    #[test]
    fn regions_that_disagree_fail_and_a_missing_final_read_is_unknown() {
        let mut h = base();
        h.extend(finals(&[2, 4]));
        h.push(op(
            200,
            "final-ap-southeast-1",
            "ap-southeast-1",
            F::Read,
            "b0",
            Value::List(vec![2]),
            Kind::Ok,
        ));
        assert_eq!(check(&h).outcome, Outcome::Fail);
        let mut h = base();
        h.push(op(200, "final-ap-southeast-1", "ap-southeast-1", F::Read, "b0", Value::None, Kind::Unknown));
        assert_eq!(check(&h).outcome, Outcome::Unknown);
        // A missing value with a timed-out resolve (read not recorded) is undecided.
        let mut h = base();
        h.push(op(6, "c4", "eu-west-1", F::Resolve, "b0", Value::Int(6), Kind::Unknown));
        h.extend(finals(&[4]));
        assert_eq!(check(&h).outcome, Outcome::Unknown, "{:?}", check(&h));
        assert_eq!(check(&[]).outcome, Outcome::Unknown);
    }
}
