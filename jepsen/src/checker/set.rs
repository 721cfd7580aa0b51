//! Add-wins sets. After the heal every region must read the same members,
//! and for each element:
//!
//! - it **must be present** if some acknowledged add of it cannot have been
//!   seen by any remove: no remove of it (acknowledged or unknown) completed
//!   after that add was invoked. A remove only cancels the adds stored where
//!   it lands when it runs, so a remove that ended before the add began
//!   cannot have seen it, and a concurrent add wins over a remove;
//! - it **must be absent** if every add of it was acknowledged and each was
//!   followed, in the same region, by an acknowledged remove invoked after
//!   the add completed (that remove saw the add, and no add is left over);
//! - it **may be present** only if some add of it was acknowledged or
//!   unknown.
//!
//! These rules are sound for an add-wins OR-set whatever the replication
//! delay; they leave undecided the cases where replication timing decides.

use std::collections::{BTreeMap, BTreeSet};

use super::{is_final, Outcome, Verdict};
use crate::history::{Kind, Op, Value, F};

pub fn check(ops: &[Op]) -> Verdict {
    #[derive(Default)]
    struct Key<'a> {
        adds: BTreeMap<i64, Vec<&'a Op>>,
        removes: BTreeMap<i64, Vec<&'a Op>>,
        finals: Vec<(String, BTreeSet<i64>)>,
    }
    let mut keys: BTreeMap<&str, Key> = BTreeMap::new();
    for o in ops {
        if !matches!(o.outcome, Kind::Ok | Kind::Unknown) {
            continue;
        }
        match o.f {
            F::SetAdd | F::SetRemove => {
                let Some(e) = o.value.as_int() else { continue };
                let k = keys.entry(&o.key).or_default();
                let by = if o.f == F::SetAdd { &mut k.adds } else { &mut k.removes };
                by.entry(e).or_default().push(o);
            }
            F::SetRead if is_final(o) && o.outcome == Kind::Ok => {
                let members = match &o.value {
                    Value::List(v) => v.iter().copied().collect(),
                    _ => BTreeSet::new(),
                };
                keys.entry(&o.key).or_default().finals.push((o.region.clone(), members));
            }
            _ => {}
        }
    }
    if keys.is_empty() {
        return Verdict::new("set", Outcome::Unknown, "no set operations");
    }
    let mut problems = Vec::new();
    let mut undecided = Vec::new();
    let mut summary = Vec::new();
    for (key, k) in &keys {
        let Some((_, members)) = k.finals.first() else {
            undecided.push(format!("{key}: no final read succeeded"));
            continue;
        };
        for (region, m) in &k.finals {
            if m != members {
                problems.push(format!("{key}: {region} reads {m:?}, another region {members:?}"));
            }
        }
        let mut must = 0;
        let mut must_not = 0;
        let elements: BTreeSet<i64> =
            k.adds.keys().chain(k.removes.keys()).chain(members.iter()).copied().collect();
        for e in elements {
            let adds = k.adds.get(&e).map(Vec::as_slice).unwrap_or(&[]);
            let removes = k.removes.get(&e).map(Vec::as_slice).unwrap_or(&[]);
            // A remove of unknown outcome may have run at any time after
            // its invocation.
            let remove_end = |r: &Op| if r.outcome == Kind::Ok { r.complete_us } else { u64::MAX };
            let unseen_add = adds
                .iter()
                .filter(|a| a.outcome == Kind::Ok)
                .find(|a| !removes.iter().any(|r| remove_end(r) > a.invoke_us));
            let all_cancelled = !adds.is_empty()
                && adds.iter().all(|a| {
                    a.outcome == Kind::Ok
                        && removes.iter().any(|r| {
                            r.outcome == Kind::Ok && r.region == a.region && r.invoke_us > a.complete_us
                        })
                });
            let present = members.contains(&e);
            if let Some(a) = unseen_add {
                must += 1;
                if !present {
                    problems.push(format!(
                        "{key}: element {e} missing, though add op {} (acknowledged) was never followed by a remove",
                        a.id
                    ));
                }
            }
            if all_cancelled {
                must_not += 1;
                if present {
                    problems.push(format!(
                        "{key}: element {e} present, though every add was removed afterwards in its region"
                    ));
                }
            }
            if present && adds.is_empty() {
                problems.push(format!("{key}: element {e} present but never added"));
            }
        }
        summary.push(format!(
            "{key}: {} members agreed by {} regions; {must} required present, {must_not} required absent",
            members.len(),
            k.finals.len()
        ));
    }
    if !problems.is_empty() {
        problems.truncate(20);
        return Verdict::new("set", Outcome::Fail, problems.join("; "));
    }
    if !undecided.is_empty() {
        return Verdict::new("set", Outcome::Unknown, undecided.join("; "));
    }
    Verdict::new("set", Outcome::Pass, summary.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::test_support::{op, timed};

    fn final_read(id: u64, region: &str, members: &[i64]) -> Op {
        op(id, &format!("final-{region}"), region, F::SetRead, "s", Value::List(members.to_vec()), Kind::Ok)
    }

    #[test]
    fn adds_survive_and_removed_elements_go() {
        let h = vec![
            op(1, "c1", "us-east-1", F::SetAdd, "s", Value::Int(1), Kind::Ok),
            op(2, "c1", "us-east-1", F::SetAdd, "s", Value::Int(2), Kind::Ok),
            op(3, "c1", "us-east-1", F::SetRemove, "s", Value::Int(2), Kind::Ok),
            op(4, "c2", "eu-west-1", F::SetAdd, "s", Value::Int(3), Kind::Unknown),
            final_read(10, "us-east-1", &[1]),
            final_read(11, "eu-west-1", &[1]),
        ];
        assert_eq!(check(&h).outcome, Outcome::Pass, "{:?}", check(&h));
        let mut with_unknown = h.clone();
        with_unknown[4].value = Value::List(vec![1, 3]);
        with_unknown[5].value = Value::List(vec![1, 3]);
        assert_eq!(check(&with_unknown).outcome, Outcome::Pass, "an unknown add may have applied");
    }

    #[test]
    fn a_lost_add_fails() {
        let h = vec![
            op(1, "c1", "us-east-1", F::SetAdd, "s", Value::Int(1), Kind::Ok),
            final_read(10, "us-east-1", &[]),
        ];
        assert_eq!(check(&h).outcome, Outcome::Fail);
    }

    #[test]
    fn concurrent_add_wins_over_remove() {
        // The remove overlaps the add: the add must survive (add wins) only
        // if the remove cannot have seen it; here it could have, so both
        // outcomes are allowed.
        let h = vec![
            timed(1, "c1", "us-east-1", F::SetAdd, "s", Value::Int(1), Kind::Ok, 10, 30),
            timed(2, "c2", "eu-west-1", F::SetRemove, "s", Value::Int(1), Kind::Ok, 20, 40),
            final_read(10, "us-east-1", &[]),
        ];
        assert_eq!(check(&h).outcome, Outcome::Pass);
        // A remove that finished before the add began cannot cancel it.
        let h = vec![
            timed(1, "c2", "eu-west-1", F::SetRemove, "s", Value::Int(1), Kind::Ok, 1, 5),
            timed(2, "c1", "us-east-1", F::SetAdd, "s", Value::Int(1), Kind::Ok, 10, 30),
            final_read(10, "us-east-1", &[]),
        ];
        assert_eq!(check(&h).outcome, Outcome::Fail);
    }

    #[test]
    fn a_resurrected_element_fails() {
        let h = vec![
            op(1, "c1", "us-east-1", F::SetAdd, "s", Value::Int(1), Kind::Ok),
            op(2, "c1", "us-east-1", F::SetRemove, "s", Value::Int(1), Kind::Ok),
            final_read(10, "us-east-1", &[1]),
        ];
        assert_eq!(check(&h).outcome, Outcome::Fail);
        let h = vec![
            final_read(10, "us-east-1", &[9]),
            op(1, "c1", "us-east-1", F::SetAdd, "s", Value::Int(1), Kind::Fail),
        ];
        assert_eq!(check(&h).outcome, Outcome::Fail, "never added");
    }

    #[test]
    fn divergence_fails_and_no_final_read_is_unknown() {
        let h = vec![
            op(1, "c1", "us-east-1", F::SetAdd, "s", Value::Int(1), Kind::Ok),
            final_read(10, "us-east-1", &[1]),
            final_read(11, "eu-west-1", &[]),
        ];
        assert_eq!(check(&h).outcome, Outcome::Fail);
        let h = vec![op(1, "c1", "us-east-1", F::SetAdd, "s", Value::Int(1), Kind::Ok)];
        assert_eq!(check(&h).outcome, Outcome::Unknown);
    }
}
