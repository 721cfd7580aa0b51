//! Counters are exact: after the heal every region reads the same value,
//! and that value is the sum of the acknowledged increments plus some
//! subset of the increments whose outcome is unknown (each applies at most
//! once: retries carry the same idempotency key).

use std::collections::BTreeMap;

use super::{is_final, Outcome, Verdict};
use crate::history::{Kind, Op, Value, F};

/// Checks every counter key of the history.
pub fn check(ops: &[Op]) -> Verdict {
    #[derive(Default)]
    struct Key {
        ok_sum: i64,
        ok_count: u64,
        unknown_pos: i64,
        unknown_neg: i64,
        unknown_count: u64,
        finals: Vec<(String, Option<i64>)>,
    }
    let mut keys: BTreeMap<&str, Key> = BTreeMap::new();
    for o in ops {
        match (o.f, o.outcome) {
            (F::Incr, Kind::Ok) | (F::Incr, Kind::Unknown) => {
                let Some(delta) = o.value.as_int() else { continue };
                let k = keys.entry(&o.key).or_default();
                if o.outcome == Kind::Ok {
                    k.ok_sum += delta;
                    k.ok_count += 1;
                } else if delta >= 0 {
                    k.unknown_pos += delta;
                    k.unknown_count += 1;
                } else {
                    k.unknown_neg += delta;
                    k.unknown_count += 1;
                }
            }
            (F::CounterRead, Kind::Ok) if is_final(o) => {
                let v = match o.value {
                    Value::Int(v) => Some(v),
                    _ => None,
                };
                keys.entry(&o.key).or_default().finals.push((o.region.clone(), v));
            }
            _ => {}
        }
    }
    if keys.is_empty() {
        return Verdict::new("counter", Outcome::Unknown, "no counter operations");
    }
    let mut problems = Vec::new();
    let mut undecided = Vec::new();
    let mut summary = Vec::new();
    for (key, k) in &keys {
        let (lo, hi) = (k.ok_sum + k.unknown_neg, k.ok_sum + k.unknown_pos);
        if k.finals.is_empty() {
            undecided.push(format!("{key}: no final read succeeded"));
            continue;
        }
        for (region, v) in &k.finals {
            let v = v.unwrap_or(0);
            if v < lo || v > hi {
                problems.push(format!(
                    "{key}: {region} reads {v}, but acknowledged increments sum to {} ({} ok), with {} unknown allowing [{lo}, {hi}]",
                    k.ok_sum, k.ok_count, k.unknown_count
                ));
            }
        }
        let first = k.finals[0].1;
        if k.finals.iter().any(|(_, v)| *v != first) {
            problems.push(format!("{key}: regions disagree after the heal: {:?}", k.finals));
        }
        summary.push(format!(
            "{key}: {} ok increments summing to {}, {} unknown, final {:?} in [{lo}, {hi}]",
            k.ok_count, k.ok_sum, k.unknown_count, first
        ));
    }
    if !problems.is_empty() {
        return Verdict::new("counter", Outcome::Fail, problems.join("; "));
    }
    if !undecided.is_empty() {
        return Verdict::new("counter", Outcome::Unknown, undecided.join("; "));
    }
    Verdict::new("counter", Outcome::Pass, summary.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::test_support::op;

    #[test]
    fn exact_sum_passes_and_unknowns_allow_a_range() {
        let h = vec![
            op(1, "c1", "us-east-1", F::Incr, "c", Value::Int(2), Kind::Ok),
            op(2, "c2", "eu-west-1", F::Incr, "c", Value::Int(3), Kind::Ok),
            op(3, "c2", "eu-west-1", F::Incr, "c", Value::Int(5), Kind::Unknown),
            op(4, "c2", "eu-west-1", F::Incr, "c", Value::Int(100), Kind::Fail),
            op(5, "final-us-east-1", "us-east-1", F::CounterRead, "c", Value::Int(10), Kind::Ok),
            op(6, "final-eu-west-1", "eu-west-1", F::CounterRead, "c", Value::Int(10), Kind::Ok),
        ];
        assert_eq!(check(&h).outcome, Outcome::Pass, "{:?}", check(&h));
        let mut low = h.clone();
        low[4].value = Value::Int(5);
        low[5].value = Value::Int(5);
        assert_eq!(check(&low).outcome, Outcome::Pass, "the unknown increment did not apply");
    }

    #[test]
    fn lost_increment_fails() {
        let h = vec![
            op(1, "c1", "us-east-1", F::Incr, "c", Value::Int(2), Kind::Ok),
            op(2, "c2", "eu-west-1", F::Incr, "c", Value::Int(3), Kind::Ok),
            op(3, "final-us-east-1", "us-east-1", F::CounterRead, "c", Value::Int(2), Kind::Ok),
        ];
        assert_eq!(check(&h).outcome, Outcome::Fail);
    }

    #[test]
    fn double_counted_increment_fails() {
        let h = vec![
            op(1, "c1", "us-east-1", F::Incr, "c", Value::Int(2), Kind::Ok),
            op(2, "final-us-east-1", "us-east-1", F::CounterRead, "c", Value::Int(4), Kind::Ok),
        ];
        assert_eq!(check(&h).outcome, Outcome::Fail);
    }

    #[test]
    fn diverged_regions_fail_and_missing_final_read_is_unknown() {
        let h = vec![
            op(1, "c1", "us-east-1", F::Incr, "c", Value::Int(2), Kind::Unknown),
            op(2, "final-us-east-1", "us-east-1", F::CounterRead, "c", Value::Int(2), Kind::Ok),
            op(3, "final-eu-west-1", "eu-west-1", F::CounterRead, "c", Value::Int(0), Kind::Ok),
        ];
        assert_eq!(check(&h).outcome, Outcome::Fail);
        let h = vec![op(1, "c1", "us-east-1", F::Incr, "c", Value::Int(2), Kind::Ok)];
        assert_eq!(check(&h).outcome, Outcome::Unknown);
    }
}
