//! Nemeses: the faults a run injects, on a schedule derived from the seed.
//!
//! A schedule is a list of windows: quiet, fault, quiet, fault, ... Each
//! fault is installed at its window's start and lifted at its end, and both
//! steps are recorded in the history as `start-<kind>` / `stop-<kind>` with
//! status installed, skipped (with the reason) or indeterminate (attempted,
//! outcome unknown: e.g. the proxy or a signal call failed).
//!
//! The schedule is pure ([`schedule`]): the same seed, nemesis, regions and
//! duration give the same faults at the same offsets, which is what
//! `--reproduce` relies on.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use geokv_proxy::LinkFaults;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::cluster::{link_name, Cluster};
use crate::history::{NemesisStatus, Recorder};

/// Which faults a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NemesisKind {
    None,
    /// Isolate one region: every link to and from it black-holed.
    Partition,
    /// Two sides that cannot talk, and one region that talks to both.
    Bridge,
    /// Random halves: the regions shuffled and cut in two.
    Halves,
    /// A latency spike (with jitter) on one region pair.
    Latency,
    /// A stall (bytes held, then delivered) on a region pair or a region.
    Stall,
    /// kill -9 of one region's node (sometimes two regions), then restart.
    Kill,
    /// SIGSTOP of a node, SIGCONT after the window (a long GC pause).
    Pause,
    /// A node restarted with its clock offset, restarted without later.
    Skew,
    /// Planned failover of the first region's homes to another region, failback after the window.
    Failover,
}

impl NemesisKind {
    pub fn name(self) -> &'static str {
        match self {
            NemesisKind::None => "none",
            NemesisKind::Partition => "partition",
            NemesisKind::Bridge => "bridge",
            NemesisKind::Halves => "halves",
            NemesisKind::Latency => "latency",
            NemesisKind::Stall => "stall",
            NemesisKind::Kill => "kill",
            NemesisKind::Pause => "pause",
            NemesisKind::Skew => "skew",
            NemesisKind::Failover => "failover",
        }
    }
}

/// One fault, with its targets chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
pub enum Fault {
    /// Cut every link between a region of `a` and a region of `b`.
    Cut {
        a: Vec<String>,
        b: Vec<String>,
        why: String,
    },
    Latency {
        between: [String; 2],
        latency_ms: u64,
        jitter_ms: u64,
    },
    Stall {
        links: Vec<String>,
    },
    Kill {
        regions: Vec<String>,
    },
    Pause {
        region: String,
    },
    Skew {
        region: String,
        skew_ms: i64,
    },
    /// Planned handover of `from`'s homes to `to`; failback when lifted.
    Failover {
        from: String,
        to: String,
    },
}

/// A fault and its window, in ms from the start of the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub start_ms: u64,
    pub stop_ms: u64,
    pub fault: Fault,
}

/// Quiet time before the first fault and between faults, in ms.
const QUIET_MS: (u64, u64) = (1_500, 3_500);
/// A fault's window, in ms.
const FAULT_MS: (u64, u64) = (2_000, 6_000);
/// Time left fault-free at the end of the workload, in ms.
const TAIL_MS: u64 = 1_500;
/// Faults per run at most.
pub const STEPS_MAX: usize = 1_000;
/// Clock offsets of the skew nemesis stay inside the nodes' tolerance
/// (`clock.max_offset_ms`, 500 by default), in ms.
const SKEW_MS_MAX: i64 = 400;

/// The faults of a run of `duration` with `kind` on `regions`, from `seed`.
pub fn schedule(kind: NemesisKind, seed: u64, regions: &[String], duration: Duration) -> Vec<Step> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x006e_656d_6573_6973);
    let total_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let mut steps = Vec::new();
    if kind == NemesisKind::None || regions.len() < 2 {
        return steps;
    }
    let mut t = rng.random_range(QUIET_MS.0..=QUIET_MS.1);
    while steps.len() < STEPS_MAX {
        let len = rng.random_range(FAULT_MS.0..=FAULT_MS.1);
        if t + len + TAIL_MS > total_ms {
            break;
        }
        let fault = pick(kind, &mut rng, regions);
        steps.push(Step { start_ms: t, stop_ms: t + len, fault });
        t += len + rng.random_range(QUIET_MS.0..=QUIET_MS.1);
    }
    steps
}

fn pick(kind: NemesisKind, rng: &mut impl Rng, regions: &[String]) -> Fault {
    let one = |rng: &mut dyn rand::RngCore| regions[rng.random_range(0..regions.len())].clone();
    let mut shuffled = regions.to_vec();
    shuffled.shuffle(rng);
    match kind {
        NemesisKind::Partition => {
            let r = one(rng);
            let rest = regions.iter().filter(|x| **x != r).cloned().collect();
            Fault::Cut { a: vec![r], b: rest, why: "partition".into() }
        }
        NemesisKind::Bridge => {
            // shuffled[0] bridges; the others split into two sides.
            let rest = &shuffled[1..];
            let mid = rest.len().div_ceil(2);
            Fault::Cut {
                a: rest[..mid].to_vec(),
                b: rest[mid..].to_vec(),
                why: format!("bridge through {}", shuffled[0]),
            }
        }
        NemesisKind::Halves => {
            let mid = rng.random_range(1..shuffled.len());
            Fault::Cut { a: shuffled[..mid].to_vec(), b: shuffled[mid..].to_vec(), why: "halves".into() }
        }
        NemesisKind::Latency => Fault::Latency {
            between: [shuffled[0].clone(), shuffled[1].clone()],
            latency_ms: rng.random_range(300..=1_200),
            jitter_ms: rng.random_range(20..=200),
        },
        NemesisKind::Stall => {
            let links = if rng.random_bool(0.5) {
                let r = &shuffled[0];
                regions.iter().filter(|x| *x != r).flat_map(|x| [link_name(r, x), link_name(x, r)]).collect()
            } else {
                vec![link_name(&shuffled[0], &shuffled[1]), link_name(&shuffled[1], &shuffled[0])]
            };
            Fault::Stall { links }
        }
        NemesisKind::Kill => {
            let n = if regions.len() > 2 && rng.random_bool(0.25) { 2 } else { 1 };
            Fault::Kill { regions: shuffled[..n].to_vec() }
        }
        NemesisKind::Pause => Fault::Pause { region: one(rng) },
        NemesisKind::Skew => {
            let mag = rng.random_range(100..=SKEW_MS_MAX);
            Fault::Skew { region: one(rng), skew_ms: if rng.random_bool(0.5) { mag } else { -mag } }
        }
        // The first region is home of the register tables: hand it over.
        NemesisKind::Failover => {
            let others: Vec<&String> = regions.iter().skip(1).collect();
            Fault::Failover {
                from: regions[0].clone(),
                to: others[rng.random_range(0..others.len())].clone(),
            }
        }
        NemesisKind::None => unreachable!("no faults are picked for nemesis none"),
    }
}

fn fault_kind(f: &Fault) -> &'static str {
    match f {
        Fault::Cut { why, .. } if why.starts_with("bridge") => "bridge",
        Fault::Cut { why, .. } if why == "halves" => "halves",
        Fault::Cut { .. } => "partition",
        Fault::Latency { .. } => "latency",
        Fault::Stall { .. } => "stall",
        Fault::Kill { .. } => "kill",
        Fault::Pause { .. } => "pause",
        Fault::Skew { .. } => "skew",
        Fault::Failover { .. } => "failover",
    }
}

fn targets(f: &Fault) -> Vec<String> {
    match f {
        Fault::Cut { a, b, .. } => vec![a.join("+"), b.join("+")],
        Fault::Latency { between, .. } => between.to_vec(),
        Fault::Stall { links } => links.clone(),
        Fault::Kill { regions } => regions.clone(),
        Fault::Failover { from, to } => vec![from.clone(), to.clone()],
        Fault::Pause { region } | Fault::Skew { region, .. } => {
            vec![region.clone()]
        }
    }
}

fn cut_links(a: &[String], b: &[String]) -> Vec<String> {
    let mut links = BTreeSet::new();
    for x in a {
        for y in b {
            links.insert(link_name(x, y));
            links.insert(link_name(y, x));
        }
    }
    links.into_iter().collect()
}

/// Outcome of one step: status and what happened.
type StepResult = (NemesisStatus, String);

/// What a step's attempt means: done, or attempted with an unknown effect.
fn step_result(result: anyhow::Result<String>) -> StepResult {
    match result {
        Ok(detail) => (NemesisStatus::Installed, detail),
        Err(e) => (NemesisStatus::Indeterminate, format!("{e:#}")),
    }
}

/// A planned handover drains and ships the tail before the transfer, so
/// its call may take seconds.
const FAILOVER_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Calls the failover (or, with `back`, the failback) RPC through `via`'s
/// node and records the homes it returns as epoch observations.
async fn hand_over(
    cluster: &Cluster,
    recorder: &Recorder,
    via: &str,
    from: &str,
    to: &str,
    back: bool,
) -> anyhow::Result<String> {
    let mut cfg = crate::cluster::client_config(&cluster.endpoint(via));
    cfg.timeout = FAILOVER_CALL_TIMEOUT;
    cfg.connect_timeout = Duration::from_secs(1);
    cfg.retries_max = 0;
    let client = geokv_client::Client::with_config(cfg).await?;
    let reply = if back { client.failback(from).await? } else { client.failover(from, to).await? };
    let mut moved = Vec::new();
    for h in &reply.homes {
        recorder.epoch(&h.home, &h.home_region, &h.holder, h.epoch, "failover");
        moved.push(format!("{} -> {} (epoch {})", h.home, h.holder, h.epoch));
    }
    Ok(format!("{}: {}", if back { "failback" } else { "failover" }, moved.join(", ")))
}

async fn install(cluster: &mut Cluster, recorder: &Recorder, f: &Fault) -> StepResult {
    let result: anyhow::Result<String> = async {
        match f {
            Fault::Cut { a, b, why } => {
                let links = cut_links(a, b);
                for l in &links {
                    let link = cluster.proxies.get(l)?;
                    link.set_faults(LinkFaults { partition: true, ..link.faults() })?;
                }
                Ok(format!("{why}: {} links black-holed", links.len()))
            }
            Fault::Latency { between: [x, y], latency_ms, jitter_ms } => {
                for l in [link_name(x, y), link_name(y, x)] {
                    let link = cluster.proxies.get(&l)?;
                    let mut faults = link.faults();
                    for d in [&mut faults.to_upstream, &mut faults.to_client] {
                        d.latency_ms = *latency_ms;
                        d.jitter_ms = *jitter_ms;
                    }
                    link.set_faults(faults)?;
                }
                Ok(format!("one-way latency {latency_ms} ms +/- {jitter_ms} ms"))
            }
            Fault::Stall { links } => {
                for l in links {
                    let link = cluster.proxies.get(l)?;
                    link.set_faults(LinkFaults { stall: true, ..link.faults() })?;
                }
                Ok(format!("{} links stalled", links.len()))
            }
            Fault::Kill { regions } => {
                for r in regions {
                    cluster.kill9(r).await?;
                }
                Ok("SIGKILL to the node's process group".into())
            }
            Fault::Pause { region } => {
                cluster.pause(region, true)?;
                Ok("SIGSTOP".into())
            }
            Fault::Skew { region, skew_ms } => {
                cluster.kill9(region).await?;
                cluster.restart(region, *skew_ms).await?;
                Ok(format!("killed and restarted with its clock {skew_ms:+} ms off"))
            }
            Fault::Failover { from, to } => hand_over(cluster, recorder, to, from, to, false).await,
        }
    }
    .await;
    step_result(result)
}

async fn lift(cluster: &mut Cluster, recorder: &Recorder, f: &Fault) -> StepResult {
    let result: anyhow::Result<String> = async {
        let restore = |cluster: &Cluster, links: &[String]| -> anyhow::Result<()> {
            for l in links {
                let base = cluster.base_latency_ms.get(l).copied().unwrap_or(0);
                cluster.proxies.get(l)?.set_faults(LinkFaults::symmetric_latency(base))?;
            }
            Ok(())
        };
        match f {
            Fault::Cut { a, b, .. } => {
                restore(cluster, &cut_links(a, b))?;
                Ok("links healed".into())
            }
            Fault::Latency { between: [x, y], .. } => {
                restore(cluster, &[link_name(x, y), link_name(y, x)])?;
                Ok("latency restored".into())
            }
            Fault::Stall { links } => {
                restore(cluster, links)?;
                Ok("stall lifted".into())
            }
            Fault::Kill { regions } => {
                for r in regions {
                    cluster.restart(r, 0).await?;
                }
                Ok("restarted".into())
            }
            Fault::Pause { region } => {
                cluster.pause(region, false)?;
                Ok("SIGCONT".into())
            }
            Fault::Skew { region, .. } => {
                cluster.kill9(region).await?;
                cluster.restart(region, 0).await?;
                Ok("killed and restarted with its clock right".into())
            }
            Fault::Failover { from, to } => hand_over(cluster, recorder, to, from, to, true).await,
        }
    }
    .await;
    step_result(result)
}

/// Runs `steps` against `cluster`, from `start`, recording every step.
/// Returns when the last step was lifted or `deadline` passed (a fault
/// still installed then is left for the final heal).
pub async fn run(
    cluster: &mut Cluster,
    steps: &[Step],
    recorder: &Recorder,
    start: Instant,
    deadline: Instant,
) {
    for step in steps {
        for (at_ms, installing) in [(step.start_ms, true), (step.stop_ms, false)] {
            let at = start + Duration::from_millis(at_ms);
            if at > deadline {
                return;
            }
            tokio::time::sleep_until(at.into()).await;
            let kind = fault_kind(&step.fault);
            let (status, detail) = if installing {
                install(cluster, recorder, &step.fault).await
            } else {
                lift(cluster, recorder, &step.fault).await
            };
            let action = format!("{}-{kind}", if installing { "start" } else { "stop" });
            recorder.nemesis(&action, targets(&step.fault), status, detail);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Vec<String> {
        crate::cluster::REGIONS.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn schedules_repeat_from_the_seed_and_fit_the_run() {
        for kind in [NemesisKind::Partition, NemesisKind::Bridge, NemesisKind::Halves, NemesisKind::Kill] {
            let a = schedule(kind, 42, &regions(), Duration::from_secs(60));
            let b = schedule(kind, 42, &regions(), Duration::from_secs(60));
            assert_eq!(a, b);
            assert!(a.len() >= 5, "{kind:?}: {} faults in 60 s", a.len());
            assert!(a.windows(2).all(|w| w[0].stop_ms < w[1].start_ms), "windows do not overlap");
            assert!(a.last().unwrap().stop_ms + TAIL_MS <= 60_000);
            assert_ne!(a, schedule(kind, 43, &regions(), Duration::from_secs(60)));
        }
        assert!(schedule(NemesisKind::None, 1, &regions(), Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn cuts_separate_their_sides() {
        for seed in 0..50 {
            for step in schedule(NemesisKind::Bridge, seed, &regions(), Duration::from_secs(30)) {
                let Fault::Cut { a, b, why } = step.fault else { panic!("bridge is a cut") };
                assert!(!a.is_empty() && !b.is_empty());
                let bridge = why.trim_start_matches("bridge through ");
                assert!(!a.iter().chain(&b).any(|r| r == bridge), "the bridge talks to both sides");
                assert_eq!(cut_links(&a, &b).len(), 2 * a.len() * b.len());
            }
        }
    }
}
