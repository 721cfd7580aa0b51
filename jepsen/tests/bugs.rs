//! The harness proves it can fail: with a known bug put back into geokv
//! (a `geokv` built with the test-only `geokv-server/bugs` feature, switched
//! on by `GEOKV_BUG`), the checker made for that bug fails the run; the
//! same scenario on the same seed passes with the bug off.
//!
//! Needs `geokv-bugs` beside the normal binary; see `common::BUGS_BUILD`.

mod common;

use geokv_jepsen::checker::Outcome;
use geokv_jepsen::nemesis::NemesisKind;
use geokv_jepsen::run::{run, RunSummary};
use geokv_jepsen::workload::WorkloadKind;

fn verdict(s: &RunSummary, checker: &str) -> Outcome {
    find(s, checker).outcome
}

fn detail<'a>(s: &'a RunSummary, checker: &str) -> &'a str {
    &find(s, checker).detail
}

fn find<'a>(s: &'a RunSummary, checker: &str) -> &'a geokv_jepsen::checker::Verdict {
    s.verdicts
        .iter()
        .find(|v| v.checker == checker)
        .unwrap_or_else(|| panic!("no {checker} verdict in {:?}", s.verdicts))
}

/// Residency filter off: EU rows are shipped to (and accepted by) every
/// region, and the residency audit finds them there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn residency_filter_off_is_caught_by_the_residency_audit() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = common::with_bug(
        common::options(WorkloadKind::Residency, NemesisKind::None, 8, 200, 11, dir.path().join("bug")),
        "residency-filter-off",
    );
    let with_bug = run(&opts).await.expect("run with the bug");
    assert_eq!(verdict(&with_bug, "residency"), Outcome::Fail, "{:?}", with_bug.verdicts);
    let detail = detail(&with_bug, "residency");
    assert!(detail.contains("audit of us-east-1") || detail.contains("audit of ap-southeast-1"), "{detail}");
    assert_eq!(with_bug.outcome, Outcome::Fail);

    // The same scenario and seed without the bug (same bugs build) passes.
    opts.bug = None;
    opts.out = dir.path().join("control");
    let control = run(&opts).await.expect("control run");
    assert_eq!(control.outcome, Outcome::Pass, "{:?}", control.verdicts);
}

/// Acknowledge before fsync: the committer replies, then writes later; a
/// kill -9 in between loses increments that were acknowledged, and the
/// counter checker finds the final value below the acknowledged sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_before_fsync_is_caught_by_the_counter_checker() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = common::with_bug(
        common::options(WorkloadKind::Counter, NemesisKind::Kill, 20, 3_000, 12, dir.path().join("bug")),
        "ack-before-fsync",
    );
    opts.clients_per_region = 3;
    let with_bug = run(&opts).await.expect("run with the bug");
    assert!(
        with_bug.nemesis_steps.get("installed").copied().unwrap_or(0) >= 2,
        "the kill nemesis ran: {:?}",
        with_bug.nemesis_steps
    );
    assert_eq!(verdict(&with_bug, "counter"), Outcome::Fail, "{:?}", with_bug.verdicts);
    assert_eq!(with_bug.outcome, Outcome::Fail);
}

/// Fencing off: after a planned failover moves the register's home away
/// from us-east-1, us-east-1 keeps accepting LOCAL writes under its old
/// epoch; the epoch checker finds writes accepted under a superseded epoch.
/// The same scenario and seed without the bug passes that checker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_off_is_caught_by_the_epoch_checker() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = common::with_bug(
        common::options(WorkloadKind::Register, NemesisKind::Failover, 20, 1_500, 13, dir.path().join("bug")),
        "fencing-off",
    );
    let with_bug = run(&opts).await.expect("run with the bug");
    assert!(
        with_bug.nemesis_steps.get("installed").copied().unwrap_or(0) >= 2,
        "a failover and its failback ran: {:?}",
        with_bug.nemesis_steps
    );
    assert_eq!(verdict(&with_bug, "one-home-per-epoch"), Outcome::Fail, "{:?}", with_bug.verdicts);
    let detail = detail(&with_bug, "one-home-per-epoch");
    assert!(detail.contains("accepted by us-east-1 under epoch"), "{detail}");

    opts.bug = None;
    opts.out = dir.path().join("control");
    let control = run(&opts).await.expect("control run");
    assert_eq!(verdict(&control, "one-home-per-epoch"), Outcome::Pass, "{:?}", control.verdicts);
    assert_eq!(control.outcome, Outcome::Pass, "{:?}", control.verdicts);
}

/// Identity off: replication positions keyed by node name and sequence
/// only, as before store identities. After a node's store is wiped, its new
/// set adds are dropped by the other regions as duplicates of its old
/// incarnation's entries, and it is never re-seeded with what it lost: the
/// set checker finds regions reading different members. The same scenario
/// and seed without the bug passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_off_is_caught_by_the_set_checker() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = common::with_bug(
        common::options(WorkloadKind::Set, NemesisKind::Wipe, 25, 1_500, 14, dir.path().join("bug")),
        "identity-off",
    );
    let with_bug = run(&opts).await.expect("run with the bug");
    assert!(
        with_bug.nemesis_steps.get("installed").copied().unwrap_or(0) >= 2,
        "a wipe and its restart ran: {:?}",
        with_bug.nemesis_steps
    );
    assert_eq!(verdict(&with_bug, "set"), Outcome::Fail, "{:?}", with_bug.verdicts);
    assert_eq!(with_bug.outcome, Outcome::Fail);

    opts.bug = None;
    opts.out = dir.path().join("control");
    let control = run(&opts).await.expect("control run");
    assert_eq!(verdict(&control, "set"), Outcome::Pass, "{:?}", control.verdicts);
    assert_eq!(verdict(&control, "one-vote-per-term"), Outcome::Pass, "{:?}", control.verdicts);
    assert_eq!(control.outcome, Outcome::Pass, "{:?}", control.verdicts);
}
