//! Availability after a heal: STRONG operations keep completing when a cut
//! region comes back.
//!
//! A Raft voter cut off from its group keeps timing out and, without
//! pre-vote, raises its term each time. When the cut heals, that higher
//! term reaches the leader, which steps down, and the group has no leader
//! until an election ends: every STRONG operation waits for seconds though
//! nothing is broken any more. With pre-vote the returning voter never
//! raised its term (no majority would have granted it a vote), and the
//! leader keeps serving.
//!
//! So for each heal of a cut (the end of a `partition`, `bridge` or
//! `halves` window) this checker looks at the window of [`HEAL_WINDOW_US`]
//! after it (cut short where the next fault starts) and measures the longest stretch with no operation completed
//! `ok` by any client, and the rate of `ok` completions beside the rate in
//! the quiet time (outside every fault window and the windows after them).
//! A stretch longer than [`STALL_MAX_US`] fails the run: operations take
//! one WAN round trip (tens to a few hundred milliseconds), so a gap of
//! seconds is a leaderless group, not slow operations.
//!
//! It cannot decide (`Unknown`) when no cut healed with enough of the run
//! left to watch, or when the quiet time saw too few operations to show
//! that operations were flowing at all.

use super::{is_final, Outcome, Verdict};
use crate::history::{Kind, NemesisStatus, Op, Record};

/// How long after a heal the checker watches.
pub const HEAL_WINDOW_US: u64 = 4_000_000;
/// The longest stretch after a heal with no operation completed before
/// the run fails.
pub const STALL_MAX_US: u64 = 1_000_000;
/// A heal window shorter than this (the run ended first) is not judged.
pub const WINDOW_MIN_US: u64 = 2_000_000;
/// Fewest `ok` operations in the quiet time for a verdict.
pub const QUIET_OPS_MIN: usize = 20;

/// The fault kinds whose end is a heal of a cut.
const CUTS: [&str; 3] = ["partition", "bridge", "halves"];

/// A fault window from the history: (kind, start, stop) in µs; stop is None
/// when the run ended before it was lifted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub kind: String,
    pub start_us: u64,
    pub stop_us: Option<u64>,
}

/// The installed fault windows of `records`, in order.
pub fn windows(records: &[Record]) -> Vec<Window> {
    let mut out: Vec<Window> = Vec::new();
    for r in records {
        let Record::Nemesis(n) = r else { continue };
        if n.status != NemesisStatus::Installed {
            continue;
        }
        if let Some(kind) = n.action.strip_prefix("start-") {
            out.push(Window { kind: kind.to_string(), start_us: n.time_us, stop_us: None });
        } else if let Some(kind) = n.action.strip_prefix("stop-") {
            if let Some(w) = out.iter_mut().rev().find(|w| w.kind == kind && w.stop_us.is_none()) {
                w.stop_us = Some(n.time_us);
            }
        }
    }
    out
}

/// One heal's figures.
#[derive(Debug, Clone, PartialEq)]
struct Judged {
    heal_us: u64,
    kind: String,
    ok: usize,
    secs: f64,
    longest_gap_us: u64,
}

pub fn check(ops: &[Op], windows: &[Window]) -> Verdict {
    let ops: Vec<&Op> = ops.iter().filter(|o| !is_final(o)).collect();
    let end_us = ops.iter().map(|o| o.invoke_us).max().unwrap_or(0);
    let mut done: Vec<u64> = ops.iter().filter(|o| o.outcome == Kind::Ok).map(|o| o.complete_us).collect();
    done.sort_unstable();

    // Quiet time: outside every fault window and the heal window after it.
    let busy: Vec<(u64, u64)> = windows
        .iter()
        .map(|w| (w.start_us, w.stop_us.unwrap_or(u64::MAX).saturating_add(HEAL_WINDOW_US)))
        .collect();
    let quiet_at = |t: u64| !busy.iter().any(|(a, b)| (*a..*b).contains(&t));
    let quiet_ok = done.iter().filter(|t| **t <= end_us && quiet_at(**t)).count();
    let quiet_us = quiet_span_us(end_us, &busy);

    let mut judged = Vec::new();
    for w in windows.iter().filter(|w| CUTS.contains(&w.kind.as_str())) {
        let Some(heal) = w.stop_us else { continue };
        // The window ends early where the next fault starts: a stall
        // inside that one is its own, not the heal's.
        let next = windows.iter().map(|n| n.start_us).filter(|t| *t >= heal).min().unwrap_or(u64::MAX);
        let until = heal.saturating_add(HEAL_WINDOW_US).min(end_us).min(next);
        if until.saturating_sub(heal) < WINDOW_MIN_US {
            continue;
        }
        let inside: Vec<u64> = done.iter().copied().filter(|t| (heal..until).contains(t)).collect();
        let mut longest = 0;
        let mut last = heal;
        for t in inside.iter().copied().chain(std::iter::once(until)) {
            longest = longest.max(t - last);
            last = t;
        }
        judged.push(Judged {
            heal_us: heal,
            kind: w.kind.clone(),
            ok: inside.len(),
            secs: (until - heal) as f64 / 1e6,
            longest_gap_us: longest,
        });
    }

    if judged.is_empty() {
        return Verdict::new(
            "availability",
            Outcome::Unknown,
            "no cut healed with at least 2 s of the run left to watch: availability after a heal was not observed",
        );
    }
    if quiet_ok < QUIET_OPS_MIN || quiet_us == 0 {
        return Verdict::new(
            "availability",
            Outcome::Unknown,
            format!(
                "{quiet_ok} operations completed in {:.1} s of quiet time (at least {QUIET_OPS_MIN} needed to \
                 show operations were flowing)",
                quiet_us as f64 / 1e6
            ),
        );
    }
    let quiet_rate = quiet_ok as f64 / (quiet_us as f64 / 1e6);
    let describe = |j: &Judged| {
        format!(
            "heal of {} at {:.3} s: {:.1} ok/s ({:.0}% of the quiet {:.1} ok/s), longest stretch with none {:.2} s",
            j.kind,
            j.heal_us as f64 / 1e6,
            j.ok as f64 / j.secs,
            100.0 * (j.ok as f64 / j.secs) / quiet_rate,
            quiet_rate,
            j.longest_gap_us as f64 / 1e6
        )
    };
    let stalls: Vec<String> =
        judged.iter().filter(|j| j.longest_gap_us > STALL_MAX_US).map(describe).collect();
    if !stalls.is_empty() {
        return Verdict::new(
            "availability",
            Outcome::Fail,
            format!(
                "{} of {} heals stalled (no operation completed for more than {:.1} s): {}",
                stalls.len(),
                judged.len(),
                STALL_MAX_US as f64 / 1e6,
                stalls.join("; ")
            ),
        );
    }
    let worst = judged.iter().max_by_key(|j| j.longest_gap_us).map(describe).unwrap_or_default();
    Verdict::new(
        "availability",
        Outcome::Pass,
        format!(
            "{} heals watched for {:.0} s each, none stalled longer than {:.1} s; worst: {worst}",
            judged.len(),
            HEAL_WINDOW_US as f64 / 1e6,
            STALL_MAX_US as f64 / 1e6
        ),
    )
}

/// The length of [0, end) outside the union of `busy`.
fn quiet_span_us(end_us: u64, busy: &[(u64, u64)]) -> u64 {
    let mut spans: Vec<(u64, u64)> =
        busy.iter().map(|(a, b)| ((*a).min(end_us), (*b).min(end_us))).filter(|(a, b)| a < b).collect();
    spans.sort_unstable();
    let mut covered = 0;
    let mut reach = 0;
    for (a, b) in spans {
        let a = a.max(reach);
        if b > a {
            covered += b - a;
        }
        reach = reach.max(b);
    }
    end_us - covered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::test_support::timed;
    use crate::history::{Value, F};

    /// `ok` writes completing every `every_us` from `from_us` to `to_us`,
    /// except inside `gap` (start, end).
    fn flow(from_us: u64, to_us: u64, every_us: u64, gap: Option<(u64, u64)>) -> Vec<Op> {
        let mut ops = Vec::new();
        let mut t = from_us;
        let mut id = 0;
        while t < to_us {
            if !gap.is_some_and(|(a, b)| (a..b).contains(&t)) {
                ops.push(timed(
                    id,
                    "us-east-1/0",
                    "us-east-1",
                    F::Write,
                    "r0",
                    Value::Int(1),
                    Kind::Ok,
                    t - 50,
                    t,
                ));
                id += 1;
            }
            t += every_us;
        }
        ops
    }

    fn cut(start_s: u64, stop_s: u64) -> Window {
        Window { kind: "partition".into(), start_us: start_s * 1_000_000, stop_us: Some(stop_s * 1_000_000) }
    }

    #[test]
    fn operations_flowing_after_the_heal_pass() {
        // Operations every 50 ms; none during the cut itself (which is not
        // judged), all of them from the heal on.
        let ops = flow(100_000, 20_000_000, 50_000, Some((5_000_000, 9_000_000)));
        let v = check(&ops, &[cut(5, 9)]);
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.detail);
        assert!(v.detail.contains("1 heals watched"), "{}", v.detail);
    }

    #[test]
    fn a_stall_after_the_heal_fails() {
        // A leaderless group for 2.5 s after the heal at 9 s.
        let ops = flow(100_000, 20_000_000, 50_000, Some((5_000_000, 11_500_000)));
        let v = check(&ops, &[cut(5, 9)]);
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.detail);
        assert!(v.detail.contains("heal of partition at 9.000 s"), "{}", v.detail);
        assert!(v.detail.contains("longest stretch with none 2.5"), "{}", v.detail);
    }

    #[test]
    fn the_next_fault_ends_the_window() {
        // A second cut 2.5 s after the first heals stops every operation;
        // that stall is the second cut's, not the first heal's.
        let ops = flow(100_000, 30_000_000, 50_000, Some((11_500_000, 16_000_000)));
        let v = check(&ops, &[cut(5, 9), cut(11, 16)]);
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.detail);
        assert!(v.detail.contains("2 heals watched"), "{}", v.detail);
        // The same stall right after the first heal, with the second cut
        // later, fails.
        let ops = flow(100_000, 30_000_000, 50_000, Some((9_000_000, 11_000_000)));
        assert_eq!(check(&ops, &[cut(5, 9), cut(13, 16)]).outcome, Outcome::Fail);
    }

    #[test]
    fn a_short_dip_after_the_heal_passes() {
        let ops = flow(100_000, 20_000_000, 50_000, Some((5_000_000, 9_800_000)));
        assert_eq!(check(&ops, &[cut(5, 9)]).outcome, Outcome::Pass);
    }

    #[test]
    fn nothing_to_watch_or_nothing_flowing_cannot_decide() {
        let ops = flow(100_000, 20_000_000, 50_000, None);
        // No fault at all.
        assert_eq!(check(&ops, &[]).outcome, Outcome::Unknown);
        // A cut healed with under 2 s of the run left.
        assert_eq!(check(&ops, &[cut(12, 19)]).outcome, Outcome::Unknown);
        // Latency windows are not cuts.
        let latency = Window { kind: "latency".into(), start_us: 5_000_000, stop_us: Some(9_000_000) };
        assert_eq!(check(&ops, &[latency]).outcome, Outcome::Unknown);
        // Too few operations in the quiet time.
        let sparse = flow(100_000, 20_000_000, 2_000_000, None);
        assert_eq!(check(&sparse, &[cut(5, 9)]).outcome, Outcome::Unknown);
    }

    #[test]
    fn windows_pair_starts_with_stops_and_skip_faults_not_installed() {
        use crate::history::NemesisRecord;
        let rec = |t: u64, action: &str, status: NemesisStatus| {
            Record::Nemesis(NemesisRecord {
                time_us: t,
                action: action.into(),
                targets: vec![],
                status,
                detail: String::new(),
            })
        };
        let records = vec![
            rec(1, "start-partition", NemesisStatus::Installed),
            rec(2, "stop-partition", NemesisStatus::Installed),
            rec(3, "start-kill", NemesisStatus::Skipped),
            rec(4, "start-halves", NemesisStatus::Installed),
        ];
        assert_eq!(
            windows(&records),
            vec![
                Window { kind: "partition".into(), start_us: 1, stop_us: Some(2) },
                Window { kind: "halves".into(), start_us: 4, stop_us: None },
            ]
        );
    }

    #[test]
    fn quiet_span_merges_overlapping_windows() {
        assert_eq!(quiet_span_us(100, &[(10, 30), (20, 40), (90, 200)]), 100 - 30 - 10);
        assert_eq!(quiet_span_us(100, &[]), 100);
    }
}
