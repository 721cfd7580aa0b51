//! Coverage: did the run's faults reach the regions its workload depends
//! on? A run whose installed faults never touched one of them proved
//! nothing about the nodes that served it, however clean its history:
//! its verdict is `vacuous`, a failure. A run under nemesis `none` is a
//! baseline without faults and needs none.
//!
//! What a fault touches is defined once, in [`crate::nemesis::touched`].
//! A step counts when its start was recorded `installed`; a skipped or
//! indeterminate step, or one the run ended before, does not.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Outcome, Verdict};
use crate::history::{NemesisStatus, Record};
use crate::nemesis::{fault_kind, touched, NemesisKind, Step};
use crate::workload::Role;

/// The checker's name in the verdicts.
pub const CHECKER: &str = "coverage";

/// Which faults touched which depended-on regions, as the report shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    /// The regions the workload depends on, and why.
    pub depends: BTreeMap<String, Vec<Role>>,
    /// Faults in the schedule.
    pub scheduled: usize,
    /// Faults whose start was recorded `installed`.
    pub installed: usize,
    /// Per depended-on region (every one listed, untouched ones with
    /// none): the installed faults that touched it.
    pub hits: BTreeMap<String, Vec<String>>,
    /// Scheduled faults that would have touched a depended-on region but
    /// did not count, and why (skipped, indeterminate, not reached).
    pub missed: Vec<String>,
}

impl Coverage {
    /// Installed faults per depended-on region.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        self.hits.iter().map(|(r, h)| (r.clone(), h.len())).collect()
    }

    /// Whether no installed fault touched any depended-on region.
    pub fn vacuous(&self) -> bool {
        self.hits.values().all(Vec::is_empty)
    }

    /// One line: each depended-on region, why, and the faults that hit it.
    pub fn describe(&self) -> String {
        self.hits
            .iter()
            .map(|(r, h)| {
                let roles: Vec<&str> =
                    self.depends.get(r).into_iter().flatten().map(|role| role.name()).collect();
                let faults = if h.is_empty() { String::new() } else { format!(": {}", h.join(", ")) };
                format!("{r} ({}): {} fault(s){faults}", roles.join(", "), h.len())
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// What happened to a scheduled step's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    Installed,
    /// Skipped or indeterminate, with its detail.
    NotInstalled(String),
    /// The run ended before the step's start.
    NotReached,
}

/// The coverage of a run: `steps` its schedule, `records` its history.
/// The n-th `start-<kind>` record is the n-th step's start (the nemesis
/// records them in schedule order); a history that disagrees with the
/// schedule is `unknown`.
pub fn check(
    nemesis: NemesisKind,
    depends: &BTreeMap<String, Vec<Role>>,
    steps: &[Step],
    records: &[Record],
) -> (Coverage, Verdict) {
    let starts: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            Record::Nemesis(n) if n.action.starts_with("start-") => Some(n),
            _ => None,
        })
        .collect();
    if starts.len() > steps.len() {
        let v = Verdict::new(
            CHECKER,
            Outcome::Unknown,
            format!("the history has {} fault starts, the schedule {} faults", starts.len(), steps.len()),
        );
        return (Coverage { depends: depends.clone(), ..Default::default() }, v);
    }
    let mut started = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let Some(n) = starts.get(i) else {
            started.push(Started::NotReached);
            continue;
        };
        let expected = format!("start-{}", fault_kind(&step.fault));
        if n.action != expected {
            let v = Verdict::new(
                CHECKER,
                Outcome::Unknown,
                format!("fault #{} is `{expected}` in the schedule but `{}` in the history", i + 1, n.action),
            );
            return (Coverage { depends: depends.clone(), ..Default::default() }, v);
        }
        started.push(match n.status {
            NemesisStatus::Installed => Started::Installed,
            s => Started::NotInstalled(format!("{} ({})", format!("{s:?}").to_lowercase(), n.detail)),
        });
    }
    judge(nemesis, depends, steps, &started)
}

/// The coverage a schedule promises if every step is installed: what the
/// schedule generator is tested against.
pub fn check_schedule(
    nemesis: NemesisKind,
    depends: &BTreeMap<String, Vec<Role>>,
    steps: &[Step],
) -> (Coverage, Verdict) {
    judge(nemesis, depends, steps, &vec![Started::Installed; steps.len()])
}

/// The verdict from each step's fate (`started`, one per step).
pub fn judge(
    nemesis: NemesisKind,
    depends: &BTreeMap<String, Vec<Role>>,
    steps: &[Step],
    started: &[Started],
) -> (Coverage, Verdict) {
    let mut cov = Coverage {
        depends: depends.clone(),
        scheduled: steps.len(),
        installed: started.iter().filter(|s| **s == Started::Installed).count(),
        hits: depends.keys().map(|r| (r.clone(), Vec::new())).collect(),
        missed: Vec::new(),
    };
    for (i, (step, fate)) in steps.iter().zip(started).enumerate() {
        let label = format!(
            "#{} {} {:.1}-{:.1} s",
            i + 1,
            fault_kind(&step.fault),
            step.start_ms as f64 / 1e3,
            step.stop_ms as f64 / 1e3
        );
        let hit: Vec<String> = touched(&step.fault).into_iter().filter(|r| depends.contains_key(r)).collect();
        if hit.is_empty() {
            continue;
        }
        match fate {
            Started::Installed => {
                for r in hit {
                    cov.hits.entry(r).or_default().push(label.clone());
                }
            }
            Started::NotInstalled(why) => cov.missed.push(format!("{label}: {why}")),
            Started::NotReached => cov.missed.push(format!("{label}: not reached")),
        }
    }
    let verdict = if nemesis == NemesisKind::None {
        Verdict::new(CHECKER, Outcome::Pass, "nemesis none: a baseline without faults, none required")
    } else if depends.is_empty() {
        Verdict::new(CHECKER, Outcome::Unknown, "the workload declares no region it depends on")
    } else if cov.vacuous() {
        let missed = if cov.missed.is_empty() {
            String::new()
        } else {
            format!("; not counted: {}", cov.missed.join(", "))
        };
        Verdict::new(
            CHECKER,
            Outcome::Fail,
            format!(
                "vacuous: none of {} scheduled faults ({} installed) touched a region the workload depends on: {}{missed}",
                cov.scheduled,
                cov.installed,
                cov.describe()
            ),
        )
    } else {
        Verdict::new(
            CHECKER,
            Outcome::Pass,
            format!("{} of {} scheduled faults installed; {}", cov.installed, cov.scheduled, cov.describe()),
        )
    };
    (cov, verdict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::NemesisRecord;
    use crate::nemesis::Fault;

    fn deps() -> BTreeMap<String, Vec<Role>> {
        BTreeMap::from([("us-east-1".to_string(), vec![Role::Home, Role::Entry])])
    }

    fn kill(start_s: u64, region: &str) -> Step {
        Step {
            start_ms: start_s * 1_000,
            stop_ms: start_s * 1_000 + 2_000,
            fault: Fault::Kill { regions: vec![region.to_string()] },
        }
    }

    fn start(action: &str, status: NemesisStatus) -> Record {
        Record::Nemesis(NemesisRecord {
            time_us: 0,
            action: action.into(),
            targets: vec![],
            status,
            detail: "why".into(),
        })
    }

    /// A hand-made schedule that kills every region but the home.
    #[test]
    fn a_schedule_that_never_touches_the_dependency_is_vacuous() {
        let steps = [kill(2, "eu-central-1"), kill(8, "ap-southeast-1"), kill(14, "eu-west-1")];
        let (cov, v) = check_schedule(NemesisKind::Kill, &deps(), &steps);
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.detail.starts_with("vacuous"), "{}", v.detail);
        assert!(v.detail.contains("us-east-1 (home, entry): 0 fault(s)"), "{}", v.detail);
        assert_eq!(cov.counts(), BTreeMap::from([("us-east-1".to_string(), 0)]));
        assert_eq!((cov.scheduled, cov.installed), (3, 3));
        // No schedule at all (a run too short for a fault) is vacuous too.
        assert_eq!(check_schedule(NemesisKind::Kill, &deps(), &[]).1.outcome, Outcome::Fail);
    }

    #[test]
    fn faults_on_the_dependency_are_counted_per_region() {
        let steps = [kill(2, "us-east-1"), kill(8, "eu-west-1"), kill(14, "us-east-1")];
        let (cov, v) = check_schedule(NemesisKind::Kill, &deps(), &steps);
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.detail);
        assert_eq!(cov.hits["us-east-1"], vec!["#1 kill 2.0-4.0 s", "#3 kill 14.0-16.0 s"]);
        assert!(v.detail.contains("us-east-1 (home, entry): 2 fault(s)"), "{}", v.detail);
    }

    /// Only installed steps count: a skipped or indeterminate start, or a
    /// step the run ended before, leaves the run vacuous.
    #[test]
    fn only_installed_steps_count() {
        let steps = [kill(2, "us-east-1"), kill(8, "eu-west-1"), kill(14, "us-east-1")];
        let records = [
            start("start-kill", NemesisStatus::Skipped),
            start("stop-kill", NemesisStatus::Skipped),
            start("start-kill", NemesisStatus::Installed),
            start("stop-kill", NemesisStatus::Installed),
        ];
        let (cov, v) = check(NemesisKind::Kill, &deps(), &steps, &records);
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.detail);
        assert!(v.detail.starts_with("vacuous"), "{}", v.detail);
        assert_eq!((cov.scheduled, cov.installed), (3, 1));
        assert_eq!(cov.missed.len(), 2, "{:?}", cov.missed);
        assert!(cov.missed[0].contains("skipped"), "{:?}", cov.missed);
        assert!(cov.missed[1].ends_with("not reached"), "{:?}", cov.missed);

        let records = [start("start-kill", NemesisStatus::Installed)];
        assert_eq!(check(NemesisKind::Kill, &deps(), &steps, &records).1.outcome, Outcome::Pass);
        let records = [start("start-kill", NemesisStatus::Indeterminate)];
        assert_eq!(check(NemesisKind::Kill, &deps(), &steps, &records).1.outcome, Outcome::Fail);
    }

    #[test]
    fn a_history_that_disagrees_with_the_schedule_is_unknown() {
        let steps = [kill(2, "us-east-1")];
        let records = [start("start-pause", NemesisStatus::Installed)];
        assert_eq!(check(NemesisKind::Kill, &deps(), &steps, &records).1.outcome, Outcome::Unknown);
        let records =
            [start("start-kill", NemesisStatus::Installed), start("start-kill", NemesisStatus::Installed)];
        assert_eq!(check(NemesisKind::Kill, &deps(), &steps, &records).1.outcome, Outcome::Unknown);
    }

    #[test]
    fn nemesis_none_needs_no_faults_and_a_workload_without_dependencies_cannot_pass() {
        assert_eq!(check_schedule(NemesisKind::None, &deps(), &[]).1.outcome, Outcome::Pass);
        let steps = [kill(2, "us-east-1")];
        assert_eq!(check_schedule(NemesisKind::Kill, &BTreeMap::new(), &steps).1.outcome, Outcome::Unknown);
    }
}
