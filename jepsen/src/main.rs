//! `geokv-jepsen`: run a chaos scenario, reproduce one, or run the suite.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use geokv_jepsen::checker::Outcome;
use geokv_jepsen::nemesis::NemesisKind;
use geokv_jepsen::run::{default_geokv_bin, RunOptions, RunSummary};
use geokv_jepsen::suite;
use geokv_jepsen::workload::WorkloadKind;

#[derive(Parser)]
#[command(
    name = "geokv-jepsen",
    about = "Chaos harness for geokv: real clusters, faults, histories, checkers, reports"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// The geokv binary (default: the one beside geokv-jepsen, else $CARGO_TARGET_DIR/debug/geokv).
    #[arg(long, env = "GEOKV_BIN")]
    geokv_bin: Option<PathBuf>,
    /// Clients standing in each region.
    #[arg(long, default_value_t = 2)]
    clients_per_region: usize,
    /// Multiplies the emulated WAN latencies between regions.
    #[arg(long, default_value_t = 0.5)]
    latency_scale: f64,
    /// Run the nodes with `storage.sync = false`.
    #[arg(long)]
    no_sync: bool,
    /// Switch on a put-back bug in the nodes (a `geokv` built with the
    /// `geokv-server/bugs` feature): residency-filter-off, missing-sync, fencing-off, merge-off,
    /// proposer-clock-leases, idempotency-local, identity-off, pre-vote-off, leader-restore.
    #[arg(long)]
    bug: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario.
    Run {
        #[arg(long, value_enum, required_unless_present = "reproduce")]
        workload: Option<WorkloadKind>,
        #[arg(long, value_enum, default_value = "none")]
        nemesis: NemesisKind,
        /// Length of the workload, in seconds.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Seed of the fault schedule and the clients (random if not given).
        #[arg(long)]
        seed: Option<u64>,
        /// Operations at most (all clients together).
        #[arg(long, default_value_t = 2_000)]
        ops: u64,
        /// Run folder (default ./jepsen-runs/<time>-<workload>-<nemesis>-<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run again with the options stored in this run folder.
        #[arg(long, conflicts_with_all = ["workload", "seed"])]
        reproduce: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Run every scenario (at least ten of at least 1,000 operations), or
    /// with --smoke a few short ones.
    Suite {
        #[arg(long)]
        smoke: bool,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Check a stored run folder's history again (no cluster).
    Check { dir: PathBuf },
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

fn stamp() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    t.as_secs().to_string()
}

fn base_options(common: &Common, out: PathBuf) -> RunOptions {
    RunOptions {
        workload: WorkloadKind::Register,
        nemesis: NemesisKind::None,
        time_s: 60,
        seed: 0,
        ops: 2_000,
        clients_per_region: common.clients_per_region,
        latency_scale: common.latency_scale,
        sync: !common.no_sync,
        bug: common.bug.clone(),
        geokv_bin: common.geokv_bin.clone().unwrap_or_else(default_geokv_bin),
        out,
    }
}

fn print_summary(s: &RunSummary) {
    println!("{}: {} under {} (seed {})", s.outcome_name(), s.workload.name(), s.nemesis.name(), s.seed);
    println!("  operations: {:?}; nemesis steps: {:?}", s.ops, s.nemesis_steps);
    println!("  faults on depended-on regions: {}", s.coverage.describe());
    for v in &s.verdicts {
        println!("  {:<20} {:<8} {}", v.checker, format!("{:?}", v.outcome).to_lowercase(), v.detail);
    }
    for n in &s.notes {
        println!("  note: {n}");
    }
    println!("  report: {}", s.dir.join("index.html").display());
}

async fn main_inner(cli: Cli) -> anyhow::Result<bool> {
    match cli.cmd {
        Cmd::Run { workload, nemesis, time, seed, ops, out, reproduce, common } => {
            let opts = if let Some(dir) = reproduce {
                let text = std::fs::read_to_string(dir.join("options.json"))
                    .with_context(|| format!("reading {}/options.json", dir.display()))?;
                let mut o: RunOptions = serde_json::from_str(&text)?;
                o.out = out.unwrap_or_else(|| {
                    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                    dir.with_file_name(format!("{name}-reproduced-{}", stamp()))
                });
                if let Some(bin) = common.geokv_bin {
                    o.geokv_bin = bin;
                }
                o
            } else {
                let seed = seed.unwrap_or_else(random_seed);
                let workload = workload.context("--workload is required")?;
                let out = out.unwrap_or_else(|| {
                    PathBuf::from("jepsen-runs").join(format!(
                        "{}-{}-{}-{seed}",
                        stamp(),
                        workload.name(),
                        nemesis.name()
                    ))
                });
                RunOptions { workload, nemesis, time_s: time, seed, ops, ..base_options(&common, out) }
            };
            println!("seed {} -> {}", opts.seed, opts.out.display());
            let summary = geokv_jepsen::run::run(&opts).await?;
            print_summary(&summary);
            Ok(summary.outcome == Outcome::Pass)
        }
        Cmd::Suite { smoke, seed, out, common } => {
            let seed = seed.unwrap_or_else(random_seed);
            let out =
                out.unwrap_or_else(|| PathBuf::from("jepsen-runs").join(format!("suite-{}-{seed}", stamp())));
            let (scenarios, sizing) =
                if smoke { (suite::SMOKE, suite::SMOKE_SIZING) } else { (suite::FULL, suite::FULL_SIZING) };
            println!("suite of {} scenarios, seed {seed} -> {}", scenarios.len(), out.display());
            let summary =
                suite::run(scenarios, sizing, seed, &out, &base_options(&common, out.clone())).await?;
            for r in &summary.runs {
                print_summary(r);
            }
            for p in &summary.problems {
                println!("problem: {p}");
            }
            println!(
                "suite {}: {}",
                if summary.passed { "PASSED" } else { "FAILED" },
                out.join("suite.json").display()
            );
            Ok(summary.passed)
        }
        Cmd::Check { dir } => {
            let text = std::fs::read_to_string(dir.join("options.json"))?;
            let opts: RunOptions = serde_json::from_str(&text)?;
            let records = geokv_jepsen::history::read_jsonl(&dir.join("history.jsonl"))?;
            let fin = serde_json::from_str(&std::fs::read_to_string(dir.join("final.json"))?)?;
            let steps: Vec<geokv_jepsen::nemesis::Step> = serde_json::from_str(
                &std::fs::read_to_string(dir.join("schedule.json"))
                    .with_context(|| format!("reading {}/schedule.json", dir.display()))?,
            )?;
            let (verdicts, coverage) = geokv_jepsen::run::check(&opts, &steps, &records, &fin);
            println!("coverage: {}", coverage.describe());
            for v in &verdicts {
                println!("{:<20} {:<8} {}", v.checker, format!("{:?}", v.outcome).to_lowercase(), v.detail);
            }
            Ok(geokv_jepsen::checker::overall(&verdicts) == Outcome::Pass)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,geokv_jepsen=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: installing the SIGTERM handler: {e}");
            return ExitCode::from(2);
        }
    };
    // On Ctrl-C or SIGTERM the run future is dropped, and with it the
    // cluster, whose drop SIGKILLs every node's process group.
    tokio::select! {
        r = main_inner(cli) => match r {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("harness error: {e:#}");
                ExitCode::from(2)
            }
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: stopping the cluster");
            ExitCode::from(130)
        }
        _ = term.recv() => {
            eprintln!("terminated: stopping the cluster");
            ExitCode::from(143)
        }
    }
}
