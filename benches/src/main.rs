//! `geokv-load`: a closed-loop load generator for geokv and, with the same
//! load shape in the same run, for etcd and Redis. See docs/benchmarks.md.
//!
//! # Layout
//! - `main.rs`: flags, their validation, the run plan (targets in turn, each
//!   client count in turn), and stopping everything on Ctrl-C or SIGTERM.
//! - [`load`]: the closed loop: one task and one connection per client,
//!   warmup then a measured window, an hdrhistogram per task.
//! - [`target`]: a running target and the per-client connection enum.
//! - [`geokv`], [`etcd`], [`redis`]: starting each target on loopback and
//!   speaking to it.
//! - [`peer_tls`]: certificates for etcd and Redis with `--peer-transport tls`.
//! - [`process`]: child processes: free ports, readiness with a deadline,
//!   stop on drop (SIGTERM, then SIGKILL), temp dirs removed after.
//! - [`report`]: the table, the geokv/peer ratios, JSON.
//! - [`strong_wan`]: the `strong-wan` subcommand: STRONG writes through
//!   `geokv dev`'s emulated WAN beside etcd with the same peer latencies.
//! - [`client_routing`]: the `client-routing` subcommand: a pinned and a
//!   region-aware client in an emulated far region, same run.

mod client_routing;
mod etcd;
mod geokv;
mod lifecycle;
mod load;
mod peer_tls;
mod process;
mod redis;
mod report;
mod strong_wan;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use geokv_client::Consistency;

use load::Shape;
use target::{Running, TargetKind, TargetPlan};

/// Largest key space: the geokv context table holds one slot per key.
const KEYS_MAX: u64 = 10_000_000;
/// Largest value: geokv's default `limits.value_bytes_max`.
const VALUE_BYTES_MAX: usize = 1 << 20;
/// Most concurrent clients in one run (each has its own connection).
const CLIENTS_MAX: usize = 4096;
/// Most keys per preload request (geokv's largest `limits.batch_ops_max`).
const PRELOAD_BATCH_MAX: usize = 10_000;
/// Longest measured window or warmup, in seconds.
const DURATION_S_MAX: u64 = 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetArg {
    Geokv,
    Etcd,
    Redis,
    /// geokv, then etcd, then Redis, then the ratios.
    All,
    /// geokv with mutual TLS, then the same in plaintext: the price of TLS.
    Tls,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// STRONG writes through `geokv dev`'s emulated WAN, beside a 3-member
    /// etcd whose peer links get the same round trips, in one run.
    StrongWan(strong_wan::StrongWanArgs),
    /// Read and write latency of a client far from a row's home: pinned to
    /// one far endpoint against region-aware, through `geokv dev
    /// --client-region`'s emulated latencies, in one run.
    ClientRouting(client_routing::ClientRoutingArgs),
    /// Data lifecycle costs: erasure of a large subject, watch delivery
    /// lag under cross-region writes, puts with a TTL beside puts without.
    Lifecycle(lifecycle::LifecycleArgs),
}

#[derive(Parser, Debug)]
#[command(
    name = "geokv-load",
    version,
    about = "Closed-loop load against geokv, etcd and Redis",
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// A mode other than the default comparison.
    #[command(subcommand)]
    mode: Option<Mode>,
    /// What to measure.
    #[arg(long, value_enum, default_value = "geokv")]
    target: TargetArg,
    /// A running geokv node to load (`host:port`).
    #[arg(long, conflicts_with = "start")]
    endpoint: Option<String>,
    /// Certificates for --endpoint (ca.crt, client.root.crt/.key); without
    /// it the node is reached in plaintext.
    #[arg(long, env = "GEOKV_CERTS_DIR")]
    certs_dir: Option<std::path::PathBuf>,
    /// Start a geokv node in a temp dir for the run, and stop it after.
    #[arg(long)]
    start: bool,
    /// The `geokv` binary for --start (default: next to this executable).
    #[arg(long)]
    geokv_bin: Option<PathBuf>,
    /// Extra argument for `geokv node` with --start (repeatable), e.g. `--geokv-arg=--no-sync`.
    #[arg(long = "geokv-arg", allow_hyphen_values = true)]
    geokv_args: Vec<String>,
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// How etcd (client and peer ports) and Redis are reached: plaintext,
    /// or mutual TLS as geokv always is.
    #[arg(long, value_enum, default_value_t = peer_tls::Transport::Plaintext)]
    peer_transport: peer_tls::Transport,
    #[arg(long, default_value = "/usr/bin/redis-server")]
    redis_bin: PathBuf,
    /// Concurrent clients; a comma list runs each in turn (e.g. `1,64`).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Measured window per run, in seconds.
    #[arg(long, default_value_t = 20)]
    duration_s: u64,
    /// Unrecorded load before each measured window, in seconds.
    #[arg(long, default_value_t = 3)]
    warmup_s: u64,
    /// Share of puts, 0..=1 (the rest are gets).
    #[arg(long, default_value_t = 1.0)]
    put_ratio: f64,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Size of the key space; keys are drawn uniformly.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// geokv write level (local, eventual, quorum, strong); reads use the
    /// matching read level. etcd reads are serializable for local and eventual.
    #[arg(long, default_value = "local")]
    consistency: Consistency,
    /// geokv table to write.
    #[arg(long, default_value = "default")]
    table: String,
    /// Deadline of one operation, in milliseconds; a slower one is an error.
    #[arg(long, default_value_t = 10_000)]
    op_timeout_ms: u64,
    /// Connections shared by the clients of geokv and etcd (HTTP/2
    /// multiplexes); default: one per client. Redis always gets one per client.
    #[arg(long)]
    connections: Option<usize>,
    /// Seed of the key and operation choices (client i uses seed + i).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Send geokv puts without a causal context, so they pile up as
    /// siblings (default: each put carries the last context seen for its key).
    #[arg(long)]
    blind_puts: bool,
    /// With gets in the mix, skip writing every key once before the runs.
    #[arg(long, conflicts_with = "preload")]
    no_preload: bool,
    /// Write keys 0..N once before the runs, batched (default: every key
    /// when gets are in the mix, none for puts only).
    #[arg(long)]
    preload: Option<u64>,
    /// Keys per preload request (a geokv batch, at most the node's
    /// `limits.batch_ops_max`; a Redis MSET; etcd writes them one by one).
    #[arg(long, default_value_t = 128)]
    preload_batch: usize,
    /// Print the results as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

impl Args {
    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.put_ratio) {
            bail!("--put-ratio must be between 0 and 1, got {}", self.put_ratio);
        }
        if self.clients.is_empty() || self.clients.iter().any(|&c| c == 0 || c > CLIENTS_MAX) {
            bail!("--clients must list counts between 1 and {CLIENTS_MAX}");
        }
        if self.duration_s == 0 || self.duration_s > DURATION_S_MAX || self.warmup_s > DURATION_S_MAX {
            bail!("--duration-s must be 1..={DURATION_S_MAX} and --warmup-s at most that");
        }
        if self.value_bytes == 0 || self.value_bytes > VALUE_BYTES_MAX {
            bail!("--value-bytes must be 1..={VALUE_BYTES_MAX}");
        }
        if self.keys == 0 || self.keys > KEYS_MAX {
            bail!("--keys must be 1..={KEYS_MAX}");
        }
        if self.connections.is_some_and(|c| c == 0 || c > CLIENTS_MAX) {
            bail!("--connections must be 1..={CLIENTS_MAX}");
        }
        if self.preload.is_some_and(|n| n > self.keys) {
            bail!("--preload must be at most --keys ({})", self.keys);
        }
        if self.preload_batch == 0 || self.preload_batch > PRELOAD_BATCH_MAX {
            bail!("--preload-batch must be 1..={PRELOAD_BATCH_MAX}");
        }
        if self.op_timeout_ms == 0 || self.op_timeout_ms > 60_000 {
            bail!("--op-timeout-ms must be 1..=60000");
        }
        let geokv = matches!(self.target, TargetArg::Geokv | TargetArg::All | TargetArg::Tls);
        if geokv && self.endpoint.is_none() && !self.start {
            bail!("geokv needs --endpoint HOST:PORT (a running node) or --start (one started for the run)");
        }
        Ok(())
    }

    fn targets(&self) -> Vec<TargetKind> {
        match self.target {
            TargetArg::Geokv => vec![TargetKind::Geokv],
            TargetArg::Etcd => vec![TargetKind::Etcd],
            TargetArg::Redis => vec![TargetKind::Redis],
            TargetArg::All => vec![TargetKind::Geokv, TargetKind::Etcd, TargetKind::Redis],
            TargetArg::Tls => vec![TargetKind::Geokv, TargetKind::GeokvPlaintext],
        }
    }

    fn shape(&self) -> Shape {
        Shape {
            put_ratio: self.put_ratio,
            value_bytes: self.value_bytes,
            keys: self.keys,
            warmup: Duration::from_secs(self.warmup_s),
            duration: Duration::from_secs(self.duration_s),
            op_timeout: Duration::from_millis(self.op_timeout_ms),
            seed: self.seed,
            connections: self.connections,
        }
    }

    fn plan(&self) -> Result<TargetPlan> {
        let geokv_bin = match &self.geokv_bin {
            Some(p) => p.clone(),
            None => geokv::default_binary()?,
        };
        Ok(TargetPlan {
            geokv_endpoint: self.endpoint.clone(),
            geokv_certs_dir: self.certs_dir.clone(),
            geokv_bin,
            geokv_args: self.geokv_args.clone(),
            etcd_bin: self.etcd_bin.clone(),
            peer_transport: self.peer_transport,
            redis_bin: self.redis_bin.clone(),
            table: self.table.clone(),
            consistency: self.consistency,
            op_timeout: Duration::from_millis(self.op_timeout_ms),
            keys: self.keys,
            blind_puts: self.blind_puts,
        })
    }
}

/// mimalloc instead of glibc's malloc: the request path allocates and frees
/// many small buffers on several threads, and glibc's malloc, free and
/// consolidation were about a tenth of a node's CPU per put
/// (docs/decisions/031-allocator-and-fewer-inserts.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let checked = match &args.mode {
        Some(Mode::StrongWan(a)) => a.validate(),
        Some(Mode::ClientRouting(a)) => a.validate(),
        Some(Mode::Lifecycle(a)) => a.validate(),
        None => args.validate(),
    };
    if let Err(e) = checked {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The run future is polled on this (main) thread, which is where peers
    // are spawned: their parent-death signal is tied to this thread.
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run_mode(&args) => r,
            s = shutdown_signal() => match s {
                Ok(name) => Err(anyhow::anyhow!("interrupted by {name}; peers stopped")),
                Err(e) => Err(e),
            },
        }
    });
    // Leaving the select dropped the run future, and with it every peer
    // process (stopped) and temp dir (removed).
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() -> Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        _ = int.recv() => Ok("SIGINT"),
    }
}

async fn run_mode(args: &Args) -> Result<()> {
    match &args.mode {
        Some(Mode::StrongWan(a)) => {
            let default_bin = match &a.geokv_bin {
                Some(p) => p.clone(),
                None => geokv::default_binary()?,
            };
            strong_wan::run(a, default_bin).await
        }
        Some(Mode::ClientRouting(a)) => {
            let bin = match &a.geokv_bin {
                Some(p) => p.clone(),
                None => geokv::default_binary()?,
            };
            client_routing::run(a, bin).await
        }
        Some(Mode::Lifecycle(a)) => {
            let bin = match &a.geokv_bin {
                Some(p) => p.clone(),
                None => geokv::default_binary()?,
            };
            lifecycle::run(a, bin).await
        }
        None => run(args).await,
    }
}

async fn run(args: &Args) -> Result<()> {
    let shape = args.shape();
    let plan = args.plan()?;
    let mut results = Vec::new();
    let mut semantics = Vec::new();
    for kind in args.targets() {
        eprintln!("{kind}: starting");
        let mut running = Running::start(kind, &plan).await.with_context(|| format!("starting {kind}"))?;
        semantics.push((kind, kind.semantics(args.consistency, args.peer_transport)));
        let preload = match args.preload {
            Some(n) => n,
            None if shape.put_ratio < 1.0 && !args.no_preload => shape.keys,
            None => 0,
        };
        if preload > 0 {
            load::preload(&running, &shape, preload, args.preload_batch)
                .await
                .with_context(|| format!("preloading {kind}"))?;
        }
        for &clients in &args.clients {
            eprintln!(
                "{kind}: {clients} clients, {} s warmup + {} s measured",
                shape.warmup.as_secs(),
                shape.duration.as_secs()
            );
            let measured = load::run(&running, &shape, clients)
                .await
                .with_context(|| format!("{kind} at {clients} clients"))?;
            running.check_alive().with_context(|| format!("{kind} after the run at {clients} clients"))?;
            eprintln!(
                "{kind}: {clients} clients: {:.1} ops/s, p50 {:.3} ms, p99 {:.3} ms, {} errors",
                measured.ops_per_s(),
                measured.latency_ms(0.5),
                measured.latency_ms(0.99),
                measured.errors
            );
            results.push(measured);
        }
        eprintln!("{kind}: stopping");
        drop(running);
    }
    let ratios = report::ratios(&results);
    if args.json {
        let value = report::json(&shape, &semantics, &results, &ratios);
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let connections = match shape.connections {
            Some(n) => format!("{n} shared connections (Redis: one per client)"),
            None => "one connection per client".to_string(),
        };
        println!(
            "load: put ratio {}, {} B values, {} keys, {} s window after {} s warmup, closed loop, {connections}",
            shape.put_ratio,
            shape.value_bytes,
            shape.keys,
            shape.duration.as_secs(),
            shape.warmup.as_secs()
        );
        for (kind, s) in &semantics {
            println!("  {kind}: {s}");
        }
        println!();
        print!("{}", report::table(&results, &ratios));
    }
    Ok(())
}
