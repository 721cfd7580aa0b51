//! Issue 4's linearizability acceptance: concurrent STRONG put, CAS and
//! get on a few keys from clients in every region, while the STRONG
//! group's home (and leader) region is killed with `kill -9` and restarted,
//! so leadership fails over and back in the middle of the history.

mod common;

use std::time::Duration;

use geokv_jepsen::checker::Outcome;
use geokv_jepsen::cluster::REGIONS;
use geokv_jepsen::nemesis::{schedule, Fault, NemesisKind};
use geokv_jepsen::run::run;
use geokv_jepsen::workload::{dependencies, WorkloadKind};

const TIME_S: u64 = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_register_stays_linearizable_across_a_failover_of_its_leader() {
    let regions: Vec<String> = REGIONS.iter().map(|r| r.to_string()).collect();
    // The first seed whose kill schedule takes down us-east-1, the home of
    // the STRONG table and the leader its group prefers.
    // (Every kill schedule aimed at this workload's dependencies does.)
    let depends: Vec<String> = dependencies(WorkloadKind::StrongRegister, &regions).into_keys().collect();
    let seed = (1..200u64)
        .find(|s| {
            schedule(NemesisKind::Kill, *s, &regions, Duration::from_secs(TIME_S), &depends).iter().any(
                |st| matches!(&st.fault, Fault::Kill { regions } if regions.iter().any(|r| r == "us-east-1")),
            )
        })
        .expect("a seed that kills us-east-1");
    let dir = tempfile::tempdir().unwrap();
    let mut opts = common::options(
        WorkloadKind::StrongRegister,
        NemesisKind::Kill,
        TIME_S,
        1_200,
        seed,
        dir.path().join("run"),
    );
    opts.clients_per_region = 3;
    let summary = run(&opts).await.expect("run");
    let lin = summary.verdicts.iter().find(|v| v.checker == "linearizable").expect("a linearizable verdict");
    assert_eq!(lin.outcome, Outcome::Pass, "seed {seed}: {}", lin.detail);
    assert_eq!(summary.outcome, Outcome::Pass, "seed {seed}: {:?}", summary.verdicts);
    let ok = summary.ops.get("ok").copied().unwrap_or(0);
    assert!(ok >= 300, "seed {seed}: only {ok} operations succeeded: {:?}", summary.ops);
    assert!(summary.nemesis_steps.get("installed").copied().unwrap_or(0) >= 2, "{:?}", summary.nemesis_steps);
}
