//! The run folder's `index.html`: verdicts, notes, nemesis steps, and two
//! uPlot charts over time (latency of every operation; throughput per
//! second by outcome) with the fault windows shaded.
//!
//! The page needs nothing but the folder: uPlot is the copy the repository
//! vendors in `server/assets/vendor/uplot`, compiled in and written beside
//! the page, and the data is `data.js` (a script, not a fetch, so the page
//! also works from `file://`).

use std::path::Path;

use serde::Serialize;

use crate::checker::FINAL_CLIENT_PREFIX;
use crate::history::{Kind, Record};
use crate::run::RunSummary;

const UPLOT_JS: &str = include_str!("../../server/assets/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../server/assets/vendor/uplot/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../../server/assets/vendor/uplot/LICENSE");

/// A fault window for the charts, in seconds since the run started.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Window {
    pub start_s: f64,
    pub stop_s: f64,
    pub label: String,
}

#[derive(Serialize)]
struct Data<'a> {
    summary: &'a RunSummary,
    /// Per completed operation: completion time (s), latency (ms), outcome.
    latency: Vec<(f64, f64, &'static str)>,
    /// Per second: (second, ok, fail, unknown).
    throughput: Vec<(u64, u64, u64, u64)>,
    windows: Vec<Window>,
    nemesis: Vec<&'a crate::history::NemesisRecord>,
}

/// Fault windows: each `start-X` up to the next `stop-X` (or the end).
pub fn windows(records: &[Record]) -> Vec<Window> {
    let mut open: Vec<(String, f64, String)> = Vec::new();
    let mut out = Vec::new();
    let mut end = 0.0f64;
    for r in records {
        let (t, rec) = match r {
            Record::Nemesis(n) => (n.time_us as f64 / 1e6, n),
            Record::Op(o) => {
                end = end.max(o.time_us as f64 / 1e6);
                continue;
            }
            Record::Epoch(_) | Record::Watch(_) => continue,
        };
        end = end.max(t);
        if let Some(kind) = rec.action.strip_prefix("start-") {
            if rec.status != crate::history::NemesisStatus::Skipped {
                open.push((kind.to_string(), t, rec.targets.join(" | ")));
            }
        } else if let Some(kind) = rec.action.strip_prefix("stop-") {
            if let Some(i) = open.iter().position(|(k, _, _)| k == kind) {
                let (k, start, targets) = open.remove(i);
                out.push(Window { start_s: start, stop_s: t, label: format!("{k} {targets}") });
            }
        }
    }
    for (k, start, targets) in open {
        out.push(Window { start_s: start, stop_s: end, label: format!("{k} {targets}") });
    }
    out
}

/// Writes `index.html`, `data.js` and the uPlot files into `dir`.
pub fn write(dir: &Path, summary: &RunSummary, records: &[Record]) -> anyhow::Result<()> {
    let mut invoked = std::collections::HashMap::new();
    let mut latency = Vec::new();
    let mut per_s: std::collections::BTreeMap<u64, (u64, u64, u64)> = Default::default();
    let mut nemesis = Vec::new();
    for r in records {
        match r {
            Record::Op(o) if o.client.starts_with(FINAL_CLIENT_PREFIX) => {}
            Record::Op(o) if o.kind == Kind::Invoke => {
                invoked.insert(o.op, o.time_us);
            }
            Record::Op(o) => {
                let Some(t0) = invoked.get(&o.op) else { continue };
                let outcome = match o.kind {
                    Kind::Ok => "ok",
                    Kind::Fail => "fail",
                    _ => "unknown",
                };
                latency.push((o.time_us as f64 / 1e6, o.time_us.saturating_sub(*t0) as f64 / 1e3, outcome));
                let b = per_s.entry(o.time_us / 1_000_000).or_default();
                match o.kind {
                    Kind::Ok => b.0 += 1,
                    Kind::Fail => b.1 += 1,
                    _ => b.2 += 1,
                }
            }
            Record::Nemesis(n) => nemesis.push(n),
            Record::Epoch(_) | Record::Watch(_) => {}
        }
    }
    latency.sort_by(|a, b| a.0.total_cmp(&b.0));
    let last = per_s.keys().last().copied().unwrap_or(0);
    let throughput = (0..=last)
        .map(|s| {
            let (ok, fail, unknown) = per_s.get(&s).copied().unwrap_or_default();
            (s, ok, fail, unknown)
        })
        .collect();
    let data = Data { summary, latency, throughput, windows: windows(records), nemesis };
    let json = serde_json::to_string(&data)?;
    // `</` cannot end the script early: JSON escapes it harmlessly.
    std::fs::write(dir.join("data.js"), format!("window.REPORT = {};\n", json.replace("</", "<\\/")))?;
    std::fs::write(dir.join("uPlot.iife.min.js"), UPLOT_JS)?;
    std::fs::write(dir.join("uPlot.min.css"), UPLOT_CSS)?;
    std::fs::write(dir.join("uPlot.LICENSE"), UPLOT_LICENSE)?;
    std::fs::write(dir.join("index.html"), PAGE)?;
    Ok(())
}

/// The page; its script reads `data.js`.
const PAGE: &str = include_str!("../assets/report.html");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{NemesisRecord, NemesisStatus};

    fn n(t: u64, action: &str, status: NemesisStatus) -> Record {
        Record::Nemesis(NemesisRecord {
            time_us: t * 1_000_000,
            action: action.into(),
            targets: vec!["eu-west-1".into()],
            status,
            detail: String::new(),
        })
    }

    #[test]
    fn windows_pair_starts_with_stops_and_skip_skipped_steps() {
        let w = windows(&[
            n(1, "start-partition", NemesisStatus::Installed),
            n(3, "stop-partition", NemesisStatus::Installed),
            n(4, "start-failover", NemesisStatus::Skipped),
            n(5, "start-kill", NemesisStatus::Indeterminate),
            n(9, "heal-all", NemesisStatus::Installed),
        ]);
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].start_s, w[0].stop_s), (1.0, 3.0));
        assert_eq!((w[1].start_s, w[1].stop_s), (5.0, 9.0), "an unlifted fault lasts to the end");
    }
}
