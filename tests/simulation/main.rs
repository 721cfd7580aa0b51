//! Deterministic simulation of geokv's replication and failover.
//!
//! Each seed builds a four-region cluster inside one turmoil simulation:
//! every region is a turmoil host running the real node
//! (`geokv_server::server::serve_with`: the tonic services, the replication
//! shippers and receivers and their merges, the control plane on openraft,
//! leases and failover) over the in-memory engine, with the committer inline
//! on the host's runtime (docs/decisions/010-simulation.md). A client host
//! writes at LOCAL, EVENTUAL and QUORUM; the driver partitions regions,
//! isolates them, crashes nodes and restarts them over their store, all
//! drawn from the seed; then everything heals and the run waits until the
//! regions converge. The checks (see `check.rs`) then decide: convergence,
//! residency, no acknowledged write lost, counters exact, fencing.
//!
//! ```text
//! cargo test -p geokv-server --test simulation                  # 100 seeds
//! GEOKV_SIM_SEEDS=500 cargo test -p geokv-server --test simulation
//! GEOKV_SIM_SEED=42 cargo test -p geokv-server --test simulation -- --exact seeds --nocapture
//! ```
//!
//! A failing seed prints the command that replays it alone.
//! `GEOKV_SIM_LOG=debug` (with one seed) prints the nodes' logs.
//! With `--features bugs`, tests put back known bugs and show a check fails.
//!
//! # Layout
//! - [`net`]: turmoil TCP as the node's dialer and incoming connections.
//! - [`cluster`]: the regions, their config, and a host's software.
//! - [`workload`]: the planned writes and the history of their outcomes.
//! - [`faults`]: the seeded fault schedule.
//! - [`check`]: the checks, pure functions of the history and final state.

mod check;
mod cluster;
mod faults;
mod net;
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use geokv_server::storage::memory::MemoryEngine;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use cluster::{Nodes, REGIONS, SKEW_MS_MAX};
use faults::{Fault, HEAL_MS};
use workload::{Outcome, Plan};

/// Seeds run by default (the CI run).
const SEEDS_DEFAULT: u64 = 100;
/// Longest wait for convergence after the heal, in simulated ms.
const CONVERGE_MS_MAX: u64 = 40_000;
/// Simulated time per turmoil step.
const TICK: Duration = Duration::from_millis(5);
/// Start of simulated time: fixed, so HLC stamps depend on the seed only.
const EPOCH_S: u64 = 1_780_000_000;

/// What a passing run did.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Summary {
    ops: usize,
    acked: usize,
    /// Acknowledged LOCAL writes by epoch > 1 (accepted after a failover).
    acked_after_failover: usize,
    /// Writes an old home accepted before a failover and shipped after it
    /// (merged and reported, never dropped), as the receivers counted them.
    failover_conflicts: usize,
    faults: usize,
    crashes: usize,
    converged_after_ms: u64,
    /// A digest of the history and final state: equal for equal runs.
    fingerprint: String,
}

/// Runs one seed; the error lists every violated check.
fn run_seed(seed: u64) -> Result<Summary, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let plan = Plan::generate(&mut rng);
    let schedule = faults::schedule(&mut rng);
    let skews: BTreeMap<&str, i64> =
        REGIONS.iter().map(|r| (*r, rng.random_range(-SKEW_MS_MAX..=SKEW_MS_MAX))).collect();

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S))
        .simulation_duration(Duration::from_millis(HEAL_MS + CONVERGE_MS_MAX + 10_000))
        .tick_duration(TICK)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(40))
        .build();
    let nodes = Arc::new(Nodes::default());
    for region in REGIONS {
        let engine = Arc::new(MemoryEngine::new());
        sim.host(region, cluster::host(region, engine, skews[region], nodes.clone()));
    }
    let history: workload::History = Default::default();
    let converged_at = Arc::new(Mutex::new(None));
    sim.client(
        "clients",
        workload::client(
            plan,
            history.clone(),
            nodes.clone(),
            HEAL_MS,
            CONVERGE_MS_MAX,
            converged_at.clone(),
        ),
    );

    let mut next = 0;
    let mut cut: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut down: BTreeSet<&str> = BTreeSet::new();
    let mut crashes = 0;
    loop {
        let now = sim.elapsed().as_millis() as u64;
        while next < schedule.len() && schedule[next].at_ms <= now {
            match schedule[next].fault {
                Fault::Partition(a, b) => {
                    sim.partition(a, b);
                    cut.insert((a.min(b), a.max(b)));
                }
                Fault::Isolate(r) => {
                    for other in REGIONS.iter().filter(|o| **o != r) {
                        sim.partition(r, *other);
                        cut.insert((r.min(other), r.max(other)));
                    }
                }
                Fault::RepairAll => {
                    for (a, b) in std::mem::take(&mut cut) {
                        sim.repair(a, b);
                    }
                }
                Fault::Crash(r) => {
                    sim.crash(r);
                    down.insert(r);
                    crashes += 1;
                }
                Fault::Restart(r) => {
                    if down.remove(r) {
                        sim.bounce(r);
                    }
                }
                Fault::Heal => {
                    for (a, b) in std::mem::take(&mut cut) {
                        sim.repair(a, b);
                    }
                    for r in std::mem::take(&mut down) {
                        sim.bounce(r);
                    }
                }
            }
            next += 1;
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("the simulation stopped: {e}")),
        }
    }

    let history = history.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let observed = check::observe(&nodes)?;
    let converged_at = *converged_at.lock().unwrap_or_else(|p| p.into_inner());
    let mut violations = check::all(&history, &observed);
    if converged_at.is_none() {
        violations
            .insert(0, format!("convergence: regions still differ {CONVERGE_MS_MAX} ms after the heal"));
    }
    if !violations.is_empty() {
        return Err(violations.join("\n"));
    }
    let acked = history.iter().filter(|r| matches!(r.outcome, Outcome::Acked { .. })).count();
    let acked_after_failover = history
        .iter()
        .filter(|r| matches!(&r.outcome, Outcome::Acked { epoch, .. } if *epoch > 1))
        .filter(|r| r.op.level == geokv_server::config::Level::Local)
        .count();
    Ok(Summary {
        ops: history.len(),
        acked,
        acked_after_failover,
        failover_conflicts: REGIONS
            .iter()
            .filter_map(|r| nodes.get(r))
            .map(|n| n.failover_conflicts().len())
            .sum(),
        faults: schedule.len(),
        crashes,
        converged_after_ms: converged_at.unwrap_or(0).saturating_sub(HEAL_MS),
        fingerprint: fingerprint(&history, &observed),
    })
}

/// A digest of every outcome (in op order) and of the final digests.
fn fingerprint(history: &[workload::OpRecord], observed: &check::Observed) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut ops: Vec<_> = history.iter().collect();
    ops.sort_by_key(|r| r.op.id);
    for r in ops {
        h.update(format!("{} {:?} {}\n", r.op.id, r.outcome, r.done_ms));
    }
    for (region, s) in observed {
        h.update(format!("{region} {:?}\n", s.digests));
    }
    hex::encode(&h.finalize()[..8])
}

/// The command that replays `seed` alone.
fn replay_command(seed: u64) -> String {
    let features = if cfg!(feature = "bugs") { " --features bugs" } else { "" };
    // A bug switched on for the whole process (`GEOKV_BUG`) is part of the run.
    let bug = match std::env::var("GEOKV_BUG") {
        Ok(b) if cfg!(feature = "bugs") && !b.is_empty() => format!("GEOKV_BUG={b} "),
        _ => String::new(),
    };
    format!("{bug}GEOKV_SIM_SEED={seed} GEOKV_SIM_REPEAT=10 cargo test -p geokv-server{features} --test simulation -- --exact seeds --nocapture")
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

/// The seeds of this run: `GEOKV_SIM_SEED` alone (`GEOKV_SIM_REPEAT`
/// times, default once), or `GEOKV_SIM_SEEDS` (default 100) seeds from
/// `GEOKV_SIM_FIRST_SEED` (default 0).
fn seeds_to_run() -> Vec<u64> {
    if let Some(seed) = env_u64("GEOKV_SIM_SEED") {
        return vec![seed; env_u64("GEOKV_SIM_REPEAT").unwrap_or(1).max(1) as usize];
    }
    let first = env_u64("GEOKV_SIM_FIRST_SEED").unwrap_or(0);
    (first..first + env_u64("GEOKV_SIM_SEEDS").unwrap_or(SEEDS_DEFAULT)).collect()
}

/// Wall-clock time one seed may take (a seed runs in about 0.2 s). A task
/// that loops without yielding to virtual time (a retry with no sleep)
/// stops the simulated clock: the seed then fails with this bound instead
/// of hanging the test.
const SEED_WALL_MAX: Duration = Duration::from_secs(60);

/// Runs `seeds` on a few threads (each seed is single-threaded), in order
/// of seed in the result.
fn run_many(
    seeds: &[u64],
    run: impl Fn(u64) -> Result<Summary, String> + Send + Sync + 'static,
) -> Vec<(u64, Result<Summary, String>)> {
    let run = Arc::new(run);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
    let queue = Mutex::new(seeds.iter().copied());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.min(seeds.len().max(1)) {
            s.spawn(|| loop {
                let Some(seed) = queue.lock().unwrap_or_else(|p| p.into_inner()).next() else { return };
                let result = run_bounded(seed, run.clone());
                results.lock().unwrap_or_else(|p| p.into_inner()).push((seed, result));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(seed, _)| *seed);
    results
}

/// Runs one seed on its own thread, failing it after `SEED_WALL_MAX`. A
/// seed past the bound is left spinning on its detached thread; the test
/// process ends it when it exits.
fn run_bounded(
    seed: u64,
    run: Arc<impl Fn(u64) -> Result<Summary, String> + Send + Sync + 'static>,
) -> Result<Summary, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("seed-{seed}"))
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed)))
                .unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(&p))));
            let _ = tx.send(result);
        })
        .map_err(|e| format!("cannot start the seed's thread: {e}"))?;
    rx.recv_timeout(SEED_WALL_MAX).unwrap_or_else(|_| {
        Err(format!(
            "stalled: the seed did not finish in {} s of wall time; a task loops without yielding to \
             virtual time (a retry with no sleep?)",
            SEED_WALL_MAX.as_secs()
        ))
    })
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn init_logs() {
    if let Ok(filter) = std::env::var("GEOKV_SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

#[test]
fn seeds() {
    init_logs();
    let seeds = seeds_to_run();
    let started = Instant::now();
    let results = run_many(&seeds, run_seed);
    let mut failed = Vec::new();
    let (mut ops, mut acked, mut after_failover, mut conflicts, mut crashes) = (0, 0, 0, 0, 0);
    for (seed, result) in &results {
        match result {
            Ok(s) => {
                ops += s.ops;
                acked += s.acked;
                after_failover += s.acked_after_failover;
                conflicts += s.failover_conflicts;
                crashes += s.crashes;
                if env_u64("GEOKV_SIM_SEED").is_some() {
                    println!("seed {seed}: {s:?}");
                }
            }
            Err(why) => {
                eprintln!("seed {seed} FAILED:\n{why}\n  replay: {}\n", replay_command(*seed));
                failed.push(*seed);
            }
        }
    }
    println!(
        "simulation: {} seeds in {:.1} s: {ops} writes ({acked} acknowledged, {after_failover} LOCAL under a \
         later epoch, {conflicts} failover conflicts merged), {crashes} crashes; {} failed",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} seeds failed: {failed:?}; replay one with: {}",
        failed.len(),
        seeds.len(),
        replay_command(failed[0])
    );
}

/// The seed alone fixes the writes, the faults and the clock skews, which is
/// what makes a printed seed worth replaying.
#[test]
fn a_seed_fixes_the_plan_and_the_faults() {
    let draw = |seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        let plan = Plan::generate(&mut rng);
        let schedule = faults::schedule(&mut rng);
        (format!("{:?}", plan.lanes), schedule)
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
    let (_, schedule) = draw(7);
    assert_eq!(schedule.last().map(|s| s.fault), Some(Fault::Heal), "every run heals at the end");
}

/// Put-back bugs (`--features bugs`, server/src/bugs.rs): the simulation
/// must fail with the check that exists for each.
#[cfg(feature = "bugs")]
mod put_back_bugs {
    use geokv_server::bugs::{with_bug, Bug};

    /// Seeds tried per bug.
    const SEEDS: u64 = 6;

    /// Runs `SEEDS` seeds with `bug` on, and asserts every one fails with a
    /// violation that starts with one of `expected`.
    fn caught(bug: Bug, expected: &[&str]) {
        let seeds: Vec<u64> = (0..SEEDS).collect();
        let results = super::run_many(&seeds, move |seed| with_bug(bug, || super::run_seed(seed)));
        for (seed, result) in results {
            match result {
                Ok(s) => panic!("{} went unnoticed at seed {seed}: {s:?}", bug.name()),
                Err(why) => {
                    assert!(
                        why.lines().any(|l| expected.iter().any(|e| l.starts_with(e))),
                        "{} at seed {seed} failed, but not with {expected:?}:\n{why}",
                        bug.name()
                    );
                    let first = why.lines().find(|l| expected.iter().any(|e| l.starts_with(e)));
                    println!("{} caught at seed {seed}: {}", bug.name(), first.unwrap_or_default());
                }
            }
        }
    }

    /// Shipper and receiver both let rows of zone `eu` out of it.
    #[test]
    fn residency_filter_off_is_caught() {
        caught(Bug::ResidencyFilterOff, &["residency:"]);
    }

    /// A received row replaces the stored one instead of merging.
    #[test]
    fn merge_off_is_caught() {
        caught(Bug::MergeOff, &["lost write:", "counter:"]);
    }
}
