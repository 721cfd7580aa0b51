//! One scenario end to end: start the cluster, run the workload and the
//! nemesis, heal, wait for convergence, read the final state, stop the
//! cluster, check, and write the run folder.
//!
//! A harness failure (the cluster does not start, the run folder cannot be
//! written) is an `Err`; an outcome of the system under test is a verdict.
//! The two are never confused: a run whose checks could not decide is
//! `Unknown`, which fails, and is not reported as a harness error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::checker::coverage::Coverage;
use crate::checker::{
    self, digest_key, Audit, FinalState, Outcome, RegionFinal, Verdict, FINAL_CLIENT_PREFIX,
};
use crate::cluster::{quick_client, zones, Cluster, ClusterSpec, EU_ZONE, REGIONS, TABLE_WATCHED};
use crate::history::{self, Kind, NemesisStatus, Recorder, Value, F};
use crate::nemesis::{self, NemesisKind, Step};
use crate::report;
use crate::watcher::Watcher;
use crate::workload::{self, ClientSpec, Shared, WorkloadKind};

/// Everything a run depends on; stored as `options.json` in the run folder
/// so `--reproduce` can run it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOptions {
    pub workload: WorkloadKind,
    pub nemesis: NemesisKind,
    /// Length of the workload, in seconds.
    pub time_s: u64,
    pub seed: u64,
    /// Operations at most (all clients together).
    pub ops: u64,
    pub clients_per_region: usize,
    /// Multiplies the emulated WAN latencies.
    pub latency_scale: f64,
    /// `storage.sync` of the nodes.
    pub sync: bool,
    /// A put-back bug to switch on in the nodes (`GEOKV_BUG`, bugs builds only).
    pub bug: Option<String>,
    pub geokv_bin: PathBuf,
    /// The run folder.
    pub out: PathBuf,
}

/// Longest wait, after the heal, for every region's digests to agree.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Slack after the workload's deadline for clients to finish their last
/// operation (each is bounded by `workload::OP_TIMEOUT`).
const CLIENT_DRAIN: Duration = Duration::from_secs(30);

/// What a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub name: String,
    pub dir: PathBuf,
    pub seed: u64,
    pub workload: WorkloadKind,
    pub nemesis: NemesisKind,
    pub outcome: Outcome,
    pub verdicts: Vec<Verdict>,
    /// Operations by outcome: ok, fail, unknown.
    pub ops: BTreeMap<String, u64>,
    /// Nemesis steps by status.
    pub nemesis_steps: BTreeMap<String, u64>,
    /// Which installed faults touched which regions the workload depends on.
    #[serde(default)]
    pub coverage: Coverage,
    /// What the workload could not exercise yet, and why.
    pub notes: Vec<String>,
    pub elapsed_s: f64,
}

/// Notes on what each workload cannot exercise before issue 4.
pub fn notes(kind: WorkloadKind, regions: &[String]) -> Vec<String> {
    match kind {
        WorkloadKind::Register => vec![format!(
            "register: at LOCAL every client sends to the home region's node ({}), which is linearizable without failover (under the failover nemesis its LOCAL reads may trail, and the run checks epochs and convergence instead); the strong-register workload runs reads, writes and CAS at STRONG from every region",
            regions[0]
        )],
        WorkloadKind::Counter => {
            vec!["counter: increments at EVENTUAL; the quorum-counter workload runs them at QUORUM".into()]
        }
        WorkloadKind::CounterRetry | WorkloadKind::QuorumCounter => Vec::new(),
        WorkloadKind::Watch => vec![format!(
            "watch: one watcher, on {} in {} (a region of one node: feeds of regions with several nodes are refused); the nodes keep their whole replication log through a run, so no change reaches the watcher through anti-entropy repair (docs/architecture.md section 13)",
            workload::WATCH_PREFIX,
            workload::WATCH_REGION
        )],
        WorkloadKind::StrongRegister | WorkloadKind::Set | WorkloadKind::Residency | WorkloadKind::BigRows => {
            Vec::new()
        }
    }
}

/// Runs one scenario and writes its folder.
pub async fn run(opts: &RunOptions) -> anyhow::Result<RunSummary> {
    let started = Instant::now();
    if opts.workload == WorkloadKind::Watch && opts.nemesis == NemesisKind::Wipe {
        anyhow::bail!(
            "the watch workload does not run under wipe: a wiped store refuses the cursors it issued (CURSOR_COMPACTED, docs/architecture.md section 13), so its watcher cannot resume"
        );
    }
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    std::fs::write(opts.out.join("seed"), format!("{}\n", opts.seed))?;
    std::fs::write(opts.out.join("command"), format!("{}\n", command_line()))?;
    std::fs::write(opts.out.join("options.json"), serde_json::to_string_pretty(opts)?)?;
    let regions: Vec<String> = REGIONS.iter().map(|r| r.to_string()).collect();
    let spec = ClusterSpec {
        geokv_bin: opts.geokv_bin.clone(),
        dir: opts.out.join("cluster"),
        regions: regions.clone(),
        latency_scale: opts.latency_scale,
        sync: opts.sync,
        env: opts.bug.iter().map(|b| ("GEOKV_BUG".to_string(), b.clone())).collect(),
        extra_config: workload::node_config(opts.workload),
        consensus_config: workload::consensus_config(opts.workload),
        automatic_failover: opts.nemesis.automatic_failover() || workload::auto_failover(opts.workload),
        fault_fs: opts.nemesis == NemesisKind::LoseUnsynced,
    };
    tracing::info!(dir = %opts.out.display(), "starting the cluster");
    let mut cluster = Cluster::start(spec).await.context("starting the cluster")?;
    let t0 = Instant::now();
    let recorder = Recorder::new(t0);
    let duration = Duration::from_secs(opts.time_s);
    let depends: Vec<String> = workload::dependencies(opts.workload, &regions).into_keys().collect();
    let steps = nemesis::schedule(opts.nemesis, opts.seed, &regions, duration, &depends);
    std::fs::write(opts.out.join("schedule.json"), serde_json::to_string_pretty(&steps)?)?;

    // Clients: `clients_per_region` standing in every region.
    let mut clients = Vec::new();
    for (ri, region) in regions.iter().enumerate() {
        for i in 0..opts.clients_per_region {
            let target = workload::entry_region(opts.workload, &regions, region);
            clients.push(ClientSpec {
                name: format!("{region}/{i}"),
                home: region.clone(),
                region: target.to_string(),
                endpoint: cluster.endpoint(target),
                seed: opts.seed.wrapping_mul(1_000_003).wrapping_add((ri * 100 + i) as u64),
            });
        }
    }
    let total_ms = duration.as_millis() as u64;
    let think = Duration::from_millis((clients.len() as u64 * total_ms / opts.ops.max(1)).max(1));
    let deadline = t0 + duration;
    let shared = Shared {
        kind: opts.workload,
        recorder: recorder.clone(),
        invoked: Arc::new(AtomicU64::new(0)),
        ops_max: opts.ops,
        deadline,
        think,
        next_value: Arc::new(AtomicU64::new(0)),
        eu: zones(&regions).get(EU_ZONE).cloned().unwrap_or_default(),
    };
    // The watch workload's watcher starts first: its first event fixes
    // the feed position the writes come after.
    let mut watcher = None;
    if opts.workload == WorkloadKind::Watch {
        let mut w = Watcher::start(
            cluster.endpoint(workload::WATCH_REGION),
            workload::WATCH_REGION.to_string(),
            TABLE_WATCHED.to_string(),
            workload::WATCH_PREFIX.to_string(),
            recorder.clone(),
        );
        if !w.ready().await {
            tracing::warn!("the watcher received no event before the workload started");
        }
        watcher = Some(w);
    }
    let handles: Vec<_> =
        clients.into_iter().map(|c| tokio::spawn(workload::client_loop(c, shared.clone()))).collect();
    let observers: Vec<_> = regions
        .iter()
        .map(|r| tokio::spawn(observe_epochs(r.clone(), cluster.endpoint(r), recorder.clone(), deadline)))
        .collect();
    nemesis::run(&mut cluster, &steps, &recorder, t0, deadline).await;
    let drain =
        tokio::time::timeout(deadline.saturating_duration_since(Instant::now()) + CLIENT_DRAIN, async {
            for h in handles {
                let _ = h.await;
            }
        })
        .await;
    if drain.is_err() {
        tracing::warn!("clients did not finish within the drain time");
    }
    for o in observers {
        o.abort();
    }
    let abandoned = recorder.close_open("HARNESS_ABANDONED");
    if abandoned > 0 {
        tracing::warn!(abandoned, "operations still open at the end: recorded as unknown");
    }

    // Heal everything and let the regions converge.
    let healed_at = Instant::now();
    match cluster.heal_all().await {
        Ok(did) => recorder.nemesis("heal-all", vec![], NemesisStatus::Installed, did.join("; ")),
        Err(e) => recorder.nemesis("heal-all", vec![], NemesisStatus::Indeterminate, format!("{e:#}")),
    }
    let mut fin = wait_converged(&cluster, &regions, healed_at).await;
    if let Some(w) = watcher {
        wait_delivered(&recorder).await;
        w.stop().await;
    }
    final_reads(&cluster, opts.workload, &recorder, &regions).await;
    let audits = read_audits(&cluster, &regions).await;
    for (r, a) in audits {
        if let Some(rf) = fin.regions.get_mut(&r) {
            match a {
                Ok(a) => rf.audit = Some(a),
                Err(e) => rf.error = Some(e),
            }
        }
    }
    cluster.stop().await;
    drop(cluster);

    let records = recorder.records();
    history::write_jsonl(&opts.out.join("history.jsonl"), &records)?;
    std::fs::write(opts.out.join("final.json"), serde_json::to_string_pretty(&fin)?)?;
    let (verdicts, coverage) = check(opts, &steps, &records, &fin);
    let outcome = checker::overall(&verdicts);
    let mut ops = BTreeMap::new();
    let mut nemesis_steps = BTreeMap::new();
    for r in &records {
        match r {
            history::Record::Op(o)
                if o.kind != Kind::Invoke && !o.client.starts_with(FINAL_CLIENT_PREFIX) =>
            {
                *ops.entry(format!("{:?}", o.kind).to_lowercase()).or_insert(0) += 1
            }
            history::Record::Nemesis(n) => {
                *nemesis_steps.entry(format!("{:?}", n.status).to_lowercase()).or_insert(0) += 1
            }
            _ => {}
        }
    }
    let summary = RunSummary {
        name: opts.out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        dir: opts.out.clone(),
        seed: opts.seed,
        workload: opts.workload,
        nemesis: opts.nemesis,
        outcome,
        verdicts,
        ops,
        nemesis_steps,
        coverage,
        notes: notes(opts.workload, &regions),
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    std::fs::write(opts.out.join("verdicts.json"), serde_json::to_string_pretty(&summary)?)?;
    report::write(&opts.out, &summary, &records).context("writing the report")?;
    Ok(summary)
}

/// The checkers of a workload, on its fault schedule (`steps`), recorded
/// history and final state; with the coverage of the schedule's faults.
pub fn check(
    opts: &RunOptions,
    steps: &[Step],
    records: &[history::Record],
    fin: &FinalState,
) -> (Vec<Verdict>, Coverage) {
    let regions: Vec<String> = REGIONS.iter().map(|r| r.to_string()).collect();
    let depends = workload::dependencies(opts.workload, &regions);
    let (coverage, covered) = checker::coverage::check(opts.nemesis, &depends, steps, records);
    let ops = match history::operations(records) {
        Ok(ops) => ops,
        Err(e) => {
            let unusable = Verdict::new("history", Outcome::Unknown, format!("history unusable: {e}"));
            return (vec![unusable, covered], coverage);
        }
    };
    let ops = if opts.nemesis == NemesisKind::Wipe { lost_with_disk(ops, records) } else { ops };
    let mut v = match opts.workload {
        // LOCAL reads are served by the nearest replica: once a failover
        // moved the home away from the node the register clients use, its
        // reads may trail the writes it forwards, so linearizability is
        // only claimed while the home stays put.
        WorkloadKind::Register
            if matches!(opts.nemesis, NemesisKind::Failover | NemesisKind::ClockJumpIsolated) =>
        {
            Vec::new()
        }
        WorkloadKind::Register | WorkloadKind::StrongRegister => {
            vec![checker::linearizable::check(&ops, checker::linearizable::SearchBounds::default())]
        }
        WorkloadKind::Counter | WorkloadKind::CounterRetry | WorkloadKind::QuorumCounter => {
            vec![checker::counter::check(&ops)]
        }
        WorkloadKind::Set => vec![checker::set::check(&ops)],
        WorkloadKind::BigRows => vec![checker::big_rows::check(&ops)],
        WorkloadKind::Watch => {
            let events: Vec<history::WatchRecord> = records
                .iter()
                .filter_map(|r| match r {
                    history::Record::Watch(w) => Some(w.clone()),
                    _ => None,
                })
                .collect();
            vec![checker::watch::check(&ops, &events, workload::WATCH_PREFIX)]
        }
        WorkloadKind::Residency => vec![
            checker::residency::check(&ops, fin, EU_ZONE),
            checker::residency::check_lost_writes(&ops, fin, EU_ZONE),
        ],
    };
    v.push(checker::convergence::check(fin));
    // A voter coming back from a cut must not unseat the leader of its
    // STRONG group (pre-vote): operations keep completing after the heal.
    if opts.workload == WorkloadKind::StrongRegister
        && matches!(opts.nemesis, NemesisKind::Partition | NemesisKind::Bridge | NemesisKind::Halves)
    {
        v.push(checker::availability::check(&ops, &checker::availability::windows(records)));
    }
    // Home leases move under failover, pauses, kills and power cuts, and
    // must hold under live clock jumps (timed on monotonic clocks); restart
    // skew inside the max offset has nothing to add.
    if matches!(
        opts.nemesis,
        NemesisKind::Failover
            | NemesisKind::Pause
            | NemesisKind::Kill
            | NemesisKind::LoseUnsynced
            | NemesisKind::ClockJump
            | NemesisKind::ClockJumpIsolated
            | NemesisKind::Wipe
    ) {
        let epochs: Vec<history::EpochRecord> = records
            .iter()
            .filter_map(|r| match r {
                history::Record::Epoch(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        v.push(checker::epoch::check(&ops, &epochs));
    }
    // A wiped member must not vote again in a term it voted in before.
    if opts.nemesis == NemesisKind::Wipe {
        v.push(checker::votes::check(&stored_votes(&opts.out.join("cluster"), &regions)));
    }
    v.push(covered);
    (v, coverage)
}

/// How long before a wipe an EVENTUAL or LOCAL write acknowledged by the
/// wiped region may still be unshipped, in µs.
const UNSHIPPED_BEFORE_WIPE_US: u64 = 2_000_000;

/// An EVENTUAL or LOCAL write is durable in the region that acknowledged
/// it, and shipped from there; a write acknowledged there shortly before
/// its disk was wiped may exist nowhere else, as those levels say. Such
/// writes become `unknown` (may have taken effect, or not); QUORUM and
/// STRONG writes are never touched: none of those may be lost.
fn lost_with_disk(mut ops: Vec<history::Op>, records: &[history::Record]) -> Vec<history::Op> {
    let wipes: Vec<(u64, &str)> = records
        .iter()
        .filter_map(|r| match r {
            history::Record::Nemesis(n) if n.action == "start-wipe" && n.status != NemesisStatus::Skipped => {
                Some(n.targets.iter().map(move |t| (n.time_us, t.as_str())))
            }
            _ => None,
        })
        .flatten()
        .collect();
    let mut turned = 0usize;
    for o in &mut ops {
        let write = matches!(o.f, F::Write | F::Cas | F::Incr | F::SetAdd | F::SetRemove | F::Resolve);
        if o.outcome != Kind::Ok || !write || !matches!(o.level.as_str(), "EVENTUAL" | "LOCAL") {
            continue;
        }
        let lost = wipes.iter().any(|(at, region)| {
            o.region == *region && o.complete_us <= *at && o.complete_us + UNSHIPPED_BEFORE_WIPE_US > *at
        });
        if lost {
            o.outcome = Kind::Unknown;
            o.error = Some("ACKNOWLEDGED_BY_A_WIPED_REGION".into());
            turned += 1;
        }
    }
    if turned > 0 {
        tracing::info!(
            turned,
            "writes acknowledged at EVENTUAL or LOCAL shortly before their region was wiped are unknown"
        );
    }
    ops
}

async fn read_digests(cluster: &Cluster, regions: &[String]) -> BTreeMap<String, RegionFinal> {
    let mut out = BTreeMap::new();
    for r in regions {
        let rf = match quick_client(&cluster.endpoint(r)).await {
            Ok(c) => match c.digest().await {
                Ok(d) => RegionFinal {
                    digests: Some(
                        d.digests
                            .into_iter()
                            .map(|z| (digest_key(&z.table, &z.zone), (z.rows, z.digest)))
                            .collect(),
                    ),
                    ..Default::default()
                },
                Err(e) => RegionFinal { error: Some(format!("digest: {e}")), ..Default::default() },
            },
            Err(e) => RegionFinal { error: Some(format!("connect: {e}")), ..Default::default() },
        };
        out.insert(r.clone(), rf);
    }
    out
}

/// Polls every region's digests until they agree or the bound passes.
async fn wait_converged(cluster: &Cluster, regions: &[String], healed_at: Instant) -> FinalState {
    let mut fin = FinalState { zones: zones(regions), ..Default::default() };
    loop {
        fin.regions = read_digests(cluster, regions).await;
        if checker::convergence::check(&fin).outcome == Outcome::Pass {
            fin.converged_after_ms = Some(healed_at.elapsed().as_millis() as u64);
            return fin;
        }
        if healed_at.elapsed() > CONVERGE_TIMEOUT {
            return fin;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn read_audits(cluster: &Cluster, regions: &[String]) -> Vec<(String, Result<Audit, String>)> {
    let mut out = Vec::new();
    for r in regions {
        let audit = match quick_client(&cluster.endpoint(r)).await {
            Ok(c) => c.residency_audit().await.map_err(|e| format!("audit: {e}")).map(|a| Audit {
                rows_checked: a.rows_checked,
                violations: a
                    .violations
                    .iter()
                    .map(|v| {
                        format!(
                            "{}/{} (zone {}) stored in {}",
                            v.table,
                            String::from_utf8_lossy(&v.key),
                            v.zone,
                            v.stored_in_region
                        )
                    })
                    .collect(),
            }),
            Err(e) => Err(format!("connect: {e}")),
        };
        out.push((r.clone(), audit));
    }
    out
}

/// Reads, after the heal, what every checker needs, recorded in the
/// history as clients `final-<region>`.
async fn final_reads(cluster: &Cluster, kind: WorkloadKind, recorder: &Recorder, regions: &[String]) {
    let records = recorder.records();
    let ops = history::operations(&records).unwrap_or_default();
    let mut plans: Vec<(String, workload::Planned)> = Vec::new();
    let read =
        |f: F, key: &str| workload::Planned { f, key: key.to_string(), value: Value::None, level: "LOCAL" };
    match kind {
        WorkloadKind::Register | WorkloadKind::StrongRegister => {
            let level = if kind == WorkloadKind::StrongRegister { "STRONG" } else { "LOCAL" };
            for k in 0..workload::REGISTER_KEYS {
                let p = workload::Planned { level, ..read(F::Read, &format!("r{k}")) };
                plans.push((regions[0].clone(), p));
            }
        }
        WorkloadKind::Counter | WorkloadKind::CounterRetry | WorkloadKind::QuorumCounter => {
            for r in regions {
                for k in 0..workload::COUNTER_KEYS {
                    plans.push((r.clone(), read(F::CounterRead, &format!("c{k}"))));
                }
            }
        }
        WorkloadKind::Set => {
            for r in regions {
                for k in 0..workload::SET_KEYS {
                    plans.push((r.clone(), read(F::SetRead, &format!("s{k}"))));
                }
            }
        }
        WorkloadKind::BigRows => {
            for r in regions {
                for k in 0..workload::BIG_ROW_KEYS {
                    plans.push((r.clone(), read(F::Read, &format!("b{k}"))));
                }
            }
        }
        // The watcher's events are checked against the writes themselves.
        WorkloadKind::Watch => {}
        WorkloadKind::Residency => {
            let keys: std::collections::BTreeSet<&str> = ops
                .iter()
                .filter(|o| o.f == F::Write && matches!(o.outcome, Kind::Ok | Kind::Unknown))
                .map(|o| o.key.as_str())
                .collect();
            let eu = zones(regions).get(EU_ZONE).cloned().unwrap_or_default();
            for r in &eu {
                for k in &keys {
                    plans.push((r.clone(), read(F::Read, k)));
                }
            }
        }
    }
    let mut clients = BTreeMap::new();
    for (region, p) in plans {
        let name = format!("{FINAL_CLIENT_PREFIX}{region}");
        let Some(inv) = recorder.invoke(&name, &region, p.level, p.f, &p.key, Value::None) else { return };
        if !clients.contains_key(&region) {
            if let Ok(c) =
                geokv_client::Client::with_config(workload::client_config(&cluster.endpoint(&region))).await
            {
                clients.insert(region.clone(), c);
            }
        }
        let (k, v, e, ack) = match clients.get(&region) {
            Some(c) => workload::perform(kind, c, &p).await,
            None => (Kind::Fail, Value::None, Some("UNREACHABLE".into()), None),
        };
        recorder.complete_acked(inv, k, v, e, ack);
    }
}

/// Longest wait, once the regions converged, for the watcher to receive
/// every acknowledged write under its prefix.
const WATCH_DRAIN: Duration = Duration::from_secs(30);

/// Waits until the watcher received every acknowledged write under the
/// watched prefix, or [`WATCH_DRAIN`] passes (the checker then names what
/// is missing).
async fn wait_delivered(recorder: &Recorder) {
    let started = Instant::now();
    while started.elapsed() < WATCH_DRAIN {
        let records = recorder.records();
        let mut seen: std::collections::BTreeSet<(&str, i64)> = Default::default();
        for r in &records {
            if let history::Record::Watch(w) = r {
                seen.extend(w.values.iter().map(|v| (w.key.as_str(), *v)));
            }
        }
        let all = records.iter().all(|r| match r {
            history::Record::Op(o) if o.kind == Kind::Ok && o.f == F::Write => {
                !o.key.starts_with(workload::WATCH_PREFIX)
                    || o.value.as_int().is_none_or(|v| seen.contains(&(o.key.as_str(), v)))
            }
            _ => true,
        });
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tracing::warn!("the watcher did not receive every acknowledged write in time");
}

/// How often each region's node is asked for its view of the home leases.
const EPOCH_POLL: Duration = Duration::from_millis(250);

/// Records every change in the home leases `region`'s node reports, until
/// `deadline`. A node that is down or paused is skipped until it answers.
async fn observe_epochs(region: String, endpoint: String, recorder: Recorder, deadline: Instant) {
    let mut seen: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let mut client: Option<geokv_client::Client> = None;
    let mut tick = tokio::time::interval(EPOCH_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < deadline {
        tick.tick().await;
        if client.is_none() {
            let mut cfg = crate::cluster::client_config(&endpoint);
            cfg.timeout = EPOCH_POLL * 2;
            cfg.connect_timeout = EPOCH_POLL * 2;
            cfg.retries_max = 0;
            client = geokv_client::Client::with_config(cfg).await.ok();
        }
        let Some(c) = &client else { continue };
        let Ok(status) = c.region_status().await else {
            client = None;
            continue;
        };
        for h in status.homes {
            let now = (h.holder.clone(), h.epoch);
            if seen.get(&h.home) != Some(&now) {
                recorder.epoch(&h.home, &h.home_region, &h.holder, h.epoch, &region);
                seen.insert(h.home, now);
            }
        }
    }
}

/// The command line of this process, for the run folder.
pub fn command_line() -> String {
    std::env::args().map(|a| if a.contains(' ') { format!("'{a}'") } else { a }).collect::<Vec<_>>().join(" ")
}

/// The `geokv` binary when `--geokv-bin` is not given: the one beside this
/// executable (both are built into the same target directory), else
/// `$CARGO_TARGET_DIR/debug/geokv`, else `target/debug/geokv` in the workspace.
pub fn default_geokv_bin() -> PathBuf {
    if let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        let beside = dir.join("geokv");
        if beside.is_file() {
            return beside;
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"));
    target.join("debug").join("geokv")
}

/// Reads every `node-*.log` under `cluster_dir/<region>/`.
pub fn stored_votes(
    cluster_dir: &Path,
    regions: &[String],
) -> BTreeMap<String, Vec<checker::votes::StoredVote>> {
    let mut out = BTreeMap::new();
    for r in regions {
        let mut votes = Vec::new();
        let Ok(entries) = std::fs::read_dir(cluster_dir.join(r)) else { continue };
        let mut logs: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("node-") && n.ends_with(".log"))
            })
            .collect();
        logs.sort();
        for log in logs {
            votes.extend(checker::votes::parse(&std::fs::read_to_string(&log).unwrap_or_default()));
        }
        out.insert(r.clone(), votes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes acknowledged at EVENTUAL by the wiped region just before the
    /// wipe become unknown; earlier ones, other regions' and STRONG ones stay.
    #[test]
    fn only_recent_eventual_writes_of_the_wiped_region_become_unknown() {
        let rec = Recorder::new(std::time::Instant::now() - Duration::from_secs(60));
        let early = rec.invoke("c1", "eu-west-1", "EVENTUAL", F::Incr, "c0", Value::Int(1)).unwrap();
        rec.complete(early, Kind::Ok, Value::None, None);
        std::thread::sleep(Duration::from_millis(2_100));
        let late = rec.invoke("c1", "eu-west-1", "EVENTUAL", F::SetAdd, "s0", Value::Int(2)).unwrap();
        let other = rec.invoke("c2", "us-east-1", "EVENTUAL", F::SetAdd, "s0", Value::Int(3)).unwrap();
        let strong = rec.invoke("c3", "eu-west-1", "STRONG", F::Write, "r0", Value::Int(4)).unwrap();
        let read = rec.invoke("c4", "eu-west-1", "LOCAL", F::SetRead, "s0", Value::None).unwrap();
        for op in [late, other, strong] {
            rec.complete(op, Kind::Ok, Value::None, None);
        }
        rec.complete(read, Kind::Ok, Value::List(vec![2]), None);
        rec.nemesis("start-wipe", vec!["eu-west-1".into()], NemesisStatus::Installed, "");
        let records = rec.records();
        let ops = lost_with_disk(history::operations(&records).unwrap(), &records);
        let outcome = |v: i64| ops.iter().find(|o| o.value == Value::Int(v)).unwrap().outcome;
        assert_eq!(outcome(1), Kind::Ok, "acknowledged 2 s before the wipe: shipped since");
        assert_eq!(outcome(2), Kind::Unknown);
        assert_eq!(outcome(3), Kind::Ok, "another region");
        assert_eq!(outcome(4), Kind::Ok, "STRONG is never relaxed");
        assert!(ops.iter().any(|o| o.f == F::SetRead && o.outcome == Kind::Ok), "reads stay");
    }
}
