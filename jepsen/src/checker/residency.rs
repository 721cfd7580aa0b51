//! Residency: rows never leave their zone. Every read and write of a
//! zone's table from a region outside the zone is refused with
//! `RESIDENCY_VIOLATION`; the audit of every region after the run finds no
//! row stored outside its zone; and no acknowledged write of a resident row
//! is lost (every zone region reads it after the heal).

use std::collections::BTreeMap;

use super::{is_final, FinalState, Outcome, Verdict};
use crate::history::{Kind, Op, Value, F};

/// The refusal a read or write from outside the zone must get.
pub const RESIDENCY_VIOLATION: &str = "RESIDENCY_VIOLATION";

/// Checks the refusals outside `zone` and the audits of every region.
pub fn check(ops: &[Op], fin: &FinalState, zone: &str) -> Verdict {
    let Some(inside) = fin.zones.get(zone) else {
        return Verdict::new("residency", Outcome::Unknown, format!("zone {zone} is not configured"));
    };
    let mut problems = Vec::new();
    let mut refused: BTreeMap<&str, u64> = BTreeMap::new();
    let mut outside_regions: BTreeMap<&str, ()> = BTreeMap::new();
    for o in ops.iter().filter(|o| !inside.contains(&o.region)) {
        outside_regions.insert(&o.region, ());
        match o.outcome {
            Kind::Ok => problems.push(format!(
                "op {} ({:?} of {} from {}) succeeded outside zone {zone}",
                o.id, o.f, o.key, o.region
            )),
            Kind::Fail if o.error.as_deref() == Some(RESIDENCY_VIOLATION) => {
                *refused.entry(&o.region).or_default() += 1
            }
            _ => {}
        }
    }
    for region in outside_regions.keys() {
        if !refused.contains_key(region) {
            problems.push(format!("no operation from {region} was refused with {RESIDENCY_VIOLATION}"));
        }
    }
    let mut undecided = Vec::new();
    let mut rows_checked = 0;
    for (region, r) in &fin.regions {
        match &r.audit {
            None => undecided.push(format!("no audit of {region}: {}", r.error.as_deref().unwrap_or("?"))),
            Some(a) => {
                rows_checked += a.rows_checked;
                for v in a.violations.iter().take(5) {
                    problems.push(format!("audit of {region}: {v}"));
                }
            }
        }
    }
    if fin.regions.is_empty() {
        undecided.push("no region audited".to_string());
    }
    if !problems.is_empty() {
        problems.truncate(20);
        return Verdict::new("residency", Outcome::Fail, problems.join("; "));
    }
    if !undecided.is_empty() {
        return Verdict::new("residency", Outcome::Unknown, undecided.join("; "));
    }
    Verdict::new(
        "residency",
        Outcome::Pass,
        format!(
            "{} refusals outside zone {zone} ({}), audits of {} regions clean ({rows_checked} rows)",
            refused.values().sum::<u64>(),
            refused.keys().copied().collect::<Vec<_>>().join(", "),
            fin.regions.len()
        ),
    )
}

/// No acknowledged write lost: every write of a unique key acknowledged
/// inside the zone is read back, with its value, by every zone region's
/// final read. A final read of a value nobody wrote fails too.
pub fn check_lost_writes(ops: &[Op], fin: &FinalState, zone: &str) -> Verdict {
    let Some(inside) = fin.zones.get(zone) else {
        return Verdict::new("no-lost-writes", Outcome::Unknown, format!("zone {zone} is not configured"));
    };
    let mut written: BTreeMap<&str, (Vec<i64>, Vec<i64>)> = BTreeMap::new();
    let mut finals: BTreeMap<(&str, &str), Vec<i64>> = BTreeMap::new();
    for o in ops {
        match (o.f, o.outcome) {
            (F::Write, Kind::Ok | Kind::Unknown) if inside.contains(&o.region) => {
                let Some(v) = o.value.as_int() else { continue };
                let w = written.entry(&o.key).or_default();
                if o.outcome == Kind::Ok {
                    w.0.push(v)
                } else {
                    w.1.push(v)
                }
            }
            (F::Read, Kind::Ok) if is_final(o) => {
                let values = match &o.value {
                    Value::Int(v) => vec![*v],
                    Value::List(v) => v.clone(),
                    _ => Vec::new(),
                };
                finals.insert((&o.key, &o.region), values);
            }
            _ => {}
        }
    }
    let acked: usize = written.values().map(|w| w.0.len()).sum();
    if acked == 0 {
        return Verdict::new("no-lost-writes", Outcome::Unknown, "no acknowledged write to check");
    }
    let mut problems = Vec::new();
    let mut undecided = Vec::new();
    for (key, (ok, unknown)) in &written {
        for region in inside {
            let Some(read) = finals.get(&(*key, region.as_str())) else {
                if !ok.is_empty() {
                    undecided.push(format!("{key}: no final read in {region}"));
                }
                continue;
            };
            for v in ok {
                if !read.contains(v) {
                    problems
                        .push(format!("{key}: acknowledged value {v} missing in {region} (read {read:?})"));
                }
            }
            for v in read {
                if !ok.contains(v) && !unknown.contains(v) {
                    problems.push(format!("{key}: {region} reads {v}, which no write wrote"));
                }
            }
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(10);
        return Verdict::new(
            "no-lost-writes",
            Outcome::Fail,
            format!("{n} problems: {}", problems.join("; ")),
        );
    }
    if !undecided.is_empty() {
        undecided.truncate(10);
        return Verdict::new("no-lost-writes", Outcome::Unknown, undecided.join("; "));
    }
    Verdict::new(
        "no-lost-writes",
        Outcome::Pass,
        format!(
            "{acked} acknowledged writes of {} keys read back in every region of zone {zone}",
            written.len()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::test_support::op;
    use crate::checker::{Audit, RegionFinal};

    fn fin(violations: Vec<String>) -> FinalState {
        let mut f = FinalState::default();
        f.zones.insert("eu".into(), vec!["eu-west-1".into(), "eu-central-1".into()]);
        for r in ["us-east-1", "eu-west-1", "eu-central-1"] {
            let audit = Audit {
                rows_checked: 3,
                violations: if r == "us-east-1" { violations.clone() } else { vec![] },
            };
            f.regions.insert(r.into(), RegionFinal { audit: Some(audit), ..Default::default() });
        }
        f
    }

    fn refused(id: u64) -> Op {
        let mut o = op(id, "c9", "us-east-1", F::Read, "p1", Value::None, Kind::Fail);
        o.error = Some(RESIDENCY_VIOLATION.into());
        o
    }

    #[test]
    fn refusals_and_clean_audits_pass() {
        let h = vec![op(1, "c1", "eu-west-1", F::Write, "p1", Value::Int(1), Kind::Ok), refused(2)];
        assert_eq!(check(&h, &fin(vec![]), "eu").outcome, Outcome::Pass);
    }

    #[test]
    fn a_dirty_audit_or_an_accepted_outside_op_fails() {
        let h = vec![refused(2)];
        assert_eq!(check(&h, &fin(vec!["eu_users p1 in us-east-1".into()]), "eu").outcome, Outcome::Fail);
        let h = vec![op(1, "c9", "us-east-1", F::Read, "p1", Value::Int(1), Kind::Ok), refused(2)];
        assert_eq!(check(&h, &fin(vec![]), "eu").outcome, Outcome::Fail);
        // Outside ops that were never refused: the zone was not exercised.
        let h = vec![op(1, "c9", "us-east-1", F::Read, "p1", Value::None, Kind::Unknown)];
        assert_eq!(check(&h, &fin(vec![]), "eu").outcome, Outcome::Fail);
    }

    #[test]
    fn a_missing_audit_is_unknown() {
        let mut f = fin(vec![]);
        f.regions.get_mut("eu-west-1").unwrap().audit = None;
        assert_eq!(check(&[refused(1)], &f, "eu").outcome, Outcome::Unknown);
    }

    #[test]
    fn lost_writes_are_found() {
        let read = |id, region: &str, v: Value| {
            op(id, &format!("final-{region}"), region, F::Read, "p1", v, Kind::Ok)
        };
        let h = vec![
            op(1, "c1", "eu-west-1", F::Write, "p1", Value::Int(7), Kind::Ok),
            read(2, "eu-west-1", Value::Int(7)),
            read(3, "eu-central-1", Value::Int(7)),
        ];
        assert_eq!(check_lost_writes(&h, &fin(vec![]), "eu").outcome, Outcome::Pass);
        let mut lost = h.clone();
        lost[2].value = Value::None;
        assert_eq!(check_lost_writes(&lost, &fin(vec![]), "eu").outcome, Outcome::Fail);
        let unread = vec![h[0].clone(), h[1].clone()];
        assert_eq!(check_lost_writes(&unread, &fin(vec![]), "eu").outcome, Outcome::Unknown);
    }
}
