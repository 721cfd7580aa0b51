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

/// Missing sync: the committer acknowledges groups it wrote without
/// syncing the write-ahead log. `lose-unsynced` power-cuts nodes on the
/// fault filesystem, which drops what was never synced, and the counter
/// checker finds acknowledged increments gone (final value below the
/// acknowledged sum). The same scenario and seed without the bug passes:
/// with the sync, acknowledged writes survive power cuts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_sync_is_caught_by_the_counter_checker_under_power_cuts() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = common::with_bug(
        common::options(
            WorkloadKind::Counter,
            NemesisKind::LoseUnsynced,
            20,
            3_000,
            12,
            dir.path().join("bug"),
        ),
        "missing-sync",
    );
    opts.clients_per_region = 3;
    let with_bug = run(&opts).await.expect("run with the bug");
    assert!(
        with_bug.nemesis_steps.get("installed").copied().unwrap_or(0) >= 2,
        "the power cuts ran: {:?}",
        with_bug.nemesis_steps
    );
    assert_eq!(verdict(&with_bug, "counter"), Outcome::Fail, "{:?}", with_bug.verdicts);
    let detail = detail(&with_bug, "counter");
    assert!(detail.contains("but acknowledged increments sum to"), "{detail}");
    assert_eq!(with_bug.outcome, Outcome::Fail);

    opts.bug = None;
    opts.out = dir.path().join("control");
    let control = run(&opts).await.expect("control run");
    assert_eq!(verdict(&control, "counter"), Outcome::Pass, "{:?}", control.verdicts);
    assert_eq!(control.outcome, Outcome::Pass, "{:?}", control.verdicts);
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

/// Seeds from 1, in order, whose partition schedule (aimed at the
/// counters' home, as a counter-retry run aims it) cuts us-east-1 off from
/// every other region for at least 5 s, long enough for its lease to lapse
/// (3.5 s) and another region to take the home over while retries wait.
fn seeds_isolating_the_home(time: std::time::Duration) -> impl Iterator<Item = u64> {
    use geokv_jepsen::nemesis::{schedule, Fault};
    let regions: Vec<String> = geokv_jepsen::cluster::REGIONS.iter().map(|r| r.to_string()).collect();
    let depends = vec![regions[0].clone()];
    (1..2_000u64).filter(move |seed| {
        schedule(NemesisKind::Partition, *seed, &regions, time, &depends).iter().any(|s| {
            matches!(&s.fault, Fault::Cut { a, .. } if a == &depends) && s.stop_ms - s.start_ms >= 5_000
        })
    })
}

/// Whether the run's history saw the home of us-east-1 held under a later
/// epoch than its first: the home was moved.
fn home_moved(s: &RunSummary) -> bool {
    let history = std::fs::read_to_string(s.dir.join("history.jsonl")).expect("history.jsonl");
    history.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).any(|r| {
        r["record"] == "epoch" && r["home"] == "us-east-1" && r["epoch"].as_u64().is_some_and(|e| e >= 2)
    })
}

/// Seeds tried at most before a test that needs the home moved gives up.
const HOME_MOVE_TRIES: usize = 3;

/// Idempotency records kept on the committing node: increments that
/// reached the home just before it was cut off, whose replies were lost,
/// are retried with their key at the region that takes the home over and
/// applied there again; once the old home's log arrives the counter counts
/// them twice. Without the bug the origin of the later application undoes
/// it, and the same scenario and seed pass.
///
/// The bug shows only when the home is moved during a cut. How long that
/// takes depends on the machine's load (a control-plane election first
/// when us-east-1 led it, then the lease and the offset margin): on a
/// loaded CI machine a 5-6 s cut sometimes ends before it. A run where the
/// home was never moved cannot decide, so the test takes the next seed
/// (at most [`HOME_MOVE_TRIES`]); a run where it moved must fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_local_is_caught_by_the_counter_checker() {
    let dir = tempfile::tempdir().unwrap();
    let mut undecided = Vec::new();
    for seed in seeds_isolating_the_home(std::time::Duration::from_secs(30)).take(HOME_MOVE_TRIES) {
        let mut opts = common::with_bug(
            common::options(
                WorkloadKind::CounterRetry,
                NemesisKind::Partition,
                30,
                4_000,
                seed,
                dir.path().join(format!("bug-{seed}")),
            ),
            "idempotency-local",
        );
        // More requests in flight when the cut starts: more of them commit
        // at the home with their replies lost.
        opts.clients_per_region = 4;
        let with_bug = run(&opts).await.expect("run with the bug");
        if !home_moved(&with_bug) {
            eprintln!("seed {seed}: the home of us-east-1 was never moved; the run cannot decide, next seed");
            undecided.push(seed);
            continue;
        }
        assert_eq!(verdict(&with_bug, "counter"), Outcome::Fail, "seed {seed}: {:?}", with_bug.verdicts);
        assert!(
            detail(&with_bug, "counter").contains("but acknowledged increments sum to"),
            "{}",
            detail(&with_bug, "counter")
        );

        opts.bug = None;
        opts.out = dir.path().join(format!("control-{seed}"));
        let control = run(&opts).await.expect("control run");
        assert_eq!(verdict(&control, "counter"), Outcome::Pass, "seed {seed}: {:?}", control.verdicts);
        return;
    }
    panic!("the home of us-east-1 was never moved under seeds {undecided:?}: the bug went unexercised");
}

/// Seeds from 14 (the seed this test was written with), in order, whose
/// clock-jump-isolated schedule (aimed at the register's home) jumps
/// us-east-1's clock back while its region is cut off.
fn seeds_jumping_the_home(time: std::time::Duration) -> impl Iterator<Item = u64> {
    use geokv_jepsen::nemesis::{schedule, Fault};
    let regions: Vec<String> = geokv_jepsen::cluster::REGIONS.iter().map(|r| r.to_string()).collect();
    let depends = vec![regions[0].clone()];
    (14..2_000u64).filter(move |seed| {
        schedule(NemesisKind::ClockJumpIsolated, *seed, &regions, time, &depends).iter().any(
            |s| matches!(&s.fault, Fault::ClockJump { region, isolate: true, .. } if region == &depends[0]),
        )
    })
}

/// Proposer-clock leases: with leases judged by wall clocks again, the
/// clock-jump-isolated nemesis (us-east-1's clock jumped back, its region
/// cut off, automatic failover on) leaves us-east-1 accepting the
/// register's writes under epoch 1 after another region holds epoch 2; the
/// epoch checker finds them. The same scenario and seed without the bug
/// passes it: timed on the monotonic clock, the lease ends before the
/// failover.
///
/// The bug shows only when the home is moved while us-east-1 is cut off. A
/// run where it was never moved cannot decide (it happened when the control
/// group could not elect a leader during the cut: see
/// `consensus::fence::may_elect`), so the test takes the next seed, at most
/// [`HOME_MOVE_TRIES`]; a run where it moved must fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposer_clock_leases_are_caught_by_the_epoch_checker() {
    let dir = tempfile::tempdir().unwrap();
    let mut undecided = Vec::new();
    for seed in seeds_jumping_the_home(std::time::Duration::from_secs(20)).take(HOME_MOVE_TRIES) {
        let mut opts = common::with_bug(
            common::options(
                WorkloadKind::Register,
                NemesisKind::ClockJumpIsolated,
                20,
                1_500,
                seed,
                dir.path().join(format!("bug-{seed}")),
            ),
            "proposer-clock-leases",
        );
        let with_bug = run(&opts).await.expect("run with the bug");
        assert!(
            with_bug.nemesis_steps.get("installed").copied().unwrap_or(0) >= 2,
            "a clock jump with its region cut off ran: {:?}",
            with_bug.nemesis_steps
        );
        if !home_moved(&with_bug) {
            eprintln!("seed {seed}: the home of us-east-1 was never moved; the run cannot decide, next seed");
            undecided.push(seed);
            continue;
        }
        assert_eq!(
            verdict(&with_bug, "one-home-per-epoch"),
            Outcome::Fail,
            "seed {seed}: {:?}",
            with_bug.verdicts
        );
        let detail = detail(&with_bug, "one-home-per-epoch");
        assert!(detail.contains("accepted by us-east-1 under epoch 1"), "{detail}");

        opts.bug = None;
        opts.out = dir.path().join(format!("control-{seed}"));
        let control = run(&opts).await.expect("control run");
        assert_eq!(
            verdict(&control, "one-home-per-epoch"),
            Outcome::Pass,
            "seed {seed}: {:?}",
            control.verdicts
        );
        assert_eq!(control.outcome, Outcome::Pass, "seed {seed}: {:?}", control.verdicts);
        return;
    }
    panic!("the home of us-east-1 was never moved under seeds {undecided:?}: the bug went unexercised");
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

/// Pre-vote off: a voter cut off from its STRONG group raises its term at
/// each election timeout, and when the cut heals that term unseats the
/// leader; the group has no leader until an election ends and no STRONG
/// operation completes. The availability checker finds the stall after the
/// heal; the same scenario and seed with pre-vote pass it.
///
/// The stall lasts about one election timeout, near the checker's 1 s
/// bound, so a run does not always show it: the bug gets up to
/// `BUG_SEEDS` seeds, and the test fails if none is caught. The control,
/// with pre-vote, at the seed that caught it, also stalls in about one run
/// in three (a leader transfer home that a cut interrupts, then two
/// elections after the heal: docs/status.md), so it gets `CONTROL_TRIES`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_vote_off_is_caught_by_the_availability_checker() {
    let dir = tempfile::tempdir().unwrap();
    let mut missed = Vec::new();
    let mut caught = None;
    for seed in BUG_SEEDS {
        let mut opts = common::with_bug(
            common::options(
                WorkloadKind::StrongRegister,
                NemesisKind::Partition,
                30,
                4_000,
                seed,
                dir.path().join(format!("bug-{seed}")),
            ),
            "pre-vote-off",
        );
        opts.clients_per_region = 4;
        let with_bug = run(&opts).await.expect("run with the bug");
        assert!(
            with_bug.nemesis_steps.get("installed").copied().unwrap_or(0) >= 4,
            "at least two cuts and their heals ran: {:?}",
            with_bug.nemesis_steps
        );
        if verdict(&with_bug, "availability") == Outcome::Fail {
            assert!(
                detail(&with_bug, "availability").contains("stalled"),
                "{}",
                detail(&with_bug, "availability")
            );
            caught = Some(opts);
            break;
        }
        eprintln!("pre-vote-off not caught at seed {seed}: {}", detail(&with_bug, "availability"));
        missed.push((seed, detail(&with_bug, "availability").to_string()));
    }
    let Some(mut opts) = caught else {
        panic!("pre-vote-off went unnoticed at every seed of {BUG_SEEDS:?}: {missed:?}");
    };

    opts.bug = None;
    let mut verdicts = Vec::new();
    for attempt in 1..=CONTROL_TRIES {
        opts.out = dir.path().join(format!("control-{attempt}"));
        let control = run(&opts).await.expect("control run");
        if verdict(&control, "availability") == Outcome::Pass && control.outcome == Outcome::Pass {
            return;
        }
        eprintln!("control attempt {attempt} did not pass: {:?}", control.verdicts);
        verdicts.push(control.verdicts);
    }
    panic!("the control run with pre-vote failed {CONTROL_TRIES} times: {verdicts:?}");
}

/// Seeds tried with `pre-vote-off` before the test fails, those whose
/// schedules cut the group's voters most first. Measured 2026-12-06 (one
/// run each with the bug): seeds 5, 6 and 8 stalled after 2 of 3, 1 of 2
/// and 2 of 4 heals; 7 did not; seed 2 stalled in about half its runs and
/// 3 and 4 in none of three (their cuts rarely isolate a voter long
/// enough), so three misses in a row at [2, 3, 4] became common.
const BUG_SEEDS: [u64; 4] = [5, 8, 6, 2];
/// Runs of the pre-vote control before the test fails.
const CONTROL_TRIES: usize = 2;

/// Feed local only: a node's change feed records its own writes and not
/// the ones it applies from other regions. The watcher in eu-west-1 then
/// misses every change made elsewhere, and the watch checker names the
/// acknowledged writes it never received. The same scenario and seed
/// without the bug passes: every acknowledged write under the prefix is
/// delivered, through the cuts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_local_only_is_caught_by_the_watch_checker() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = common::with_bug(
        common::options(WorkloadKind::Watch, NemesisKind::Partition, 20, 800, 3, dir.path().join("bug")),
        "feed-local-only",
    );
    let with_bug = run(&opts).await.expect("run with the bug");
    assert_eq!(verdict(&with_bug, "watch"), Outcome::Fail, "{:?}", with_bug.verdicts);
    let detail = detail(&with_bug, "watch");
    assert!(detail.contains("acknowledged writes never delivered"), "{detail}");
    assert!(
        ["user:us-east-1/", "user:eu-central-1/", "user:ap-southeast-1/"].iter().any(|r| detail.contains(r)),
        "changes made in other regions are missing: {detail}"
    );
    assert!(!detail.contains("user:eu-west-1/"), "the node's own changes are there: {detail}");

    opts.bug = None;
    opts.out = dir.path().join("control");
    let control = run(&opts).await.expect("control run");
    assert_eq!(verdict(&control, "watch"), Outcome::Pass, "{:?}", control.verdicts);
    assert_eq!(control.outcome, Outcome::Pass, "{:?}", control.verdicts);
}
