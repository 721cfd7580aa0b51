//! The change feed against the history of writes (the watch workload).
//!
//! Every key is written by one client, one write at a time, with values
//! that only grow; so on a key, the order of the acknowledged writes is
//! known. A change is named by (origin, sequence): a change delivered
//! again (the feed is at least once; a watcher resuming from its cursor
//! may see some twice) counts once, and must name the same key with the
//! same values each time.
//!
//! Fails when:
//! - an acknowledged write under the watched prefix, invoked after the
//!   watch was in place, never shows up in a change of its key (a gap);
//! - a change's values go back on a key: an acknowledged value delivered
//!   after a later acknowledged value of the same key (per-key order);
//! - a change carries a value no write could have stored (never written,
//!   or written to another key, or refused), or a key outside the prefix;
//! - one (origin, sequence) is delivered with different contents;
//! - the node refused the watcher's cursor (`CURSOR_COMPACTED`): its
//!   retention is far above a run's writes, so a resume lost its place;
//! - a change is delivered for the first time after a heartbeat whose
//!   resolved time is at or past the change's HLC stamp: the heartbeat
//!   said every change up to that time had been delivered.
//!
//! Undecided (unknown) when the watcher never received an event or no
//! write under the prefix was acknowledged.

use std::collections::{BTreeMap, BTreeSet};

use super::{Outcome, Verdict};
use crate::history::{Kind, Op, WatchEventKind, WatchRecord, F};

/// Problems listed in a failing verdict at most.
const SHOWN: usize = 8;

pub fn check(ops: &[Op], events: &[WatchRecord], prefix: &str) -> Verdict {
    let name = "watch";
    let Some(ready_us) = events
        .iter()
        .find(|e| matches!(e.event, WatchEventKind::Change | WatchEventKind::Heartbeat))
        .map(|e| e.time_us)
    else {
        return Verdict::new(name, Outcome::Unknown, "the watcher never received an event");
    };
    let mut problems: Vec<String> = Vec::new();
    if let Some(e) =
        events.iter().find(|e| e.event == WatchEventKind::Error && e.detail == "CURSOR_COMPACTED")
    {
        problems.push(format!(
            "at {:.1} s the node refused the watcher's cursor (CURSOR_COMPACTED): it could not resume",
            e.time_us as f64 / 1e6
        ));
    }

    // What each key may hold: acknowledged values, and values of writes
    // whose outcome is unknown. Refused writes hold nothing.
    let mut acked: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
    let mut possible: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.f == F::Write) {
        let Some(v) = o.value.as_int() else { continue };
        match o.outcome {
            Kind::Ok => {
                acked.entry(&o.key).or_default().insert(v);
                possible.entry(&o.key).or_default().insert(v);
            }
            Kind::Unknown => {
                possible.entry(&o.key).or_default().insert(v);
            }
            _ => {}
        }
    }

    // First deliveries, in the order received; the values seen per key.
    let mut first: BTreeMap<(&str, u64), &WatchRecord> = BTreeMap::new();
    let mut duplicates = 0u64;
    let mut seen: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
    // Per key: the latest acknowledged value delivered so far.
    let mut latest: BTreeMap<&str, i64> = BTreeMap::new();
    let mut changes = 0u64;
    let mut heartbeats = 0u64;
    let mut opens = 0u64;
    // The latest resolved time a heartbeat claimed, and when.
    let mut resolved: Option<(u64, u64)> = None;
    for e in events {
        match e.event {
            WatchEventKind::Heartbeat => {
                heartbeats += 1;
                if resolved.is_none_or(|(r, _)| e.hlc > r) {
                    resolved = Some((e.hlc, e.time_us));
                }
            }
            WatchEventKind::Open => opens += 1,
            WatchEventKind::Error => {}
            WatchEventKind::Change => {
                changes += 1;
                if let Some(before) = first.get(&(e.origin.as_str(), e.seq)) {
                    duplicates += 1;
                    if before.key != e.key || before.values != e.values {
                        problems.push(format!(
                            "change {}#{} delivered as {} = {:?}, then as {} = {:?}",
                            e.origin, e.seq, before.key, before.values, e.key, e.values
                        ));
                    }
                    continue;
                }
                first.insert((e.origin.as_str(), e.seq), e);
                if let Some((r, at)) = resolved.filter(|(r, _)| *r >= e.hlc) {
                    problems.push(format!(
                        "change {}#{} of {} (HLC {}) delivered at {:.1} s, after the heartbeat at {:.1} s resolved through HLC {r}",
                        e.origin,
                        e.seq,
                        e.key,
                        e.hlc,
                        e.time_us as f64 / 1e6,
                        at as f64 / 1e6
                    ));
                }
                if !e.key.starts_with(prefix) {
                    problems.push(format!("change of {} delivered to a watch of {prefix}", e.key));
                    continue;
                }
                for v in &e.values {
                    if !possible.get(e.key.as_str()).is_some_and(|p| p.contains(v)) {
                        problems.push(format!(
                            "change {}#{} shows {} = {v}, which no write could have stored",
                            e.origin, e.seq, e.key
                        ));
                    }
                    seen.entry(&e.key).or_default().insert(*v);
                }
                let acked_here = acked.get(e.key.as_str());
                let newest = e.values.iter().filter(|v| acked_here.is_some_and(|a| a.contains(v))).max();
                if let Some(&v) = newest {
                    let last = latest.entry(&e.key).or_insert(v);
                    if v < *last {
                        problems.push(format!(
                            "{} went back: {} delivered at {:.1} s after {}",
                            e.key,
                            v,
                            e.time_us as f64 / 1e6,
                            *last
                        ));
                    }
                    *last = (*last).max(v);
                }
            }
        }
    }

    // Every acknowledged write under the prefix, made once the watch was
    // in place, delivered.
    let mut missing = Vec::new();
    let mut expected = 0u64;
    let mut before_ready = 0u64;
    for o in ops.iter().filter(|o| o.f == F::Write && o.outcome == Kind::Ok && o.key.starts_with(prefix)) {
        if o.invoke_us < ready_us {
            before_ready += 1;
            continue;
        }
        expected += 1;
        let Some(v) = o.value.as_int() else { continue };
        if !seen.get(o.key.as_str()).is_some_and(|s| s.contains(&v)) {
            missing.push(format!(
                "{} = {v} (acknowledged by {} at {:.1} s)",
                o.key,
                o.region,
                o.complete_us as f64 / 1e6
            ));
        }
    }
    if !missing.is_empty() {
        problems.insert(
            0,
            format!(
                "{} of {expected} acknowledged writes never delivered, e.g. {}",
                missing.len(),
                missing.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ")
            ),
        );
    }
    let summary = format!(
        "{expected} acknowledged writes under {prefix} checked ({before_ready} made before the watch was in place not counted); {changes} changes received ({duplicates} delivered again), {heartbeats} heartbeats, {opens} streams opened"
    );
    if !problems.is_empty() {
        let shown: Vec<String> = problems.iter().take(SHOWN).cloned().collect();
        return Verdict::new(name, Outcome::Fail, format!("{}; {summary}", shown.join("; ")));
    }
    if expected == 0 {
        return Verdict::new(name, Outcome::Unknown, format!("nothing to check: {summary}"));
    }
    Verdict::new(name, Outcome::Pass, summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Value;

    fn write(id: u64, key: &str, v: i64, outcome: Kind, at_s: u64) -> Op {
        Op {
            id,
            client: "c".into(),
            region: "us-east-1".into(),
            level: "EVENTUAL".into(),
            f: F::Write,
            key: key.into(),
            value: Value::Int(v),
            invoke_us: at_s * 1_000_000,
            complete_us: at_s * 1_000_000 + 1_000,
            outcome,
            error: None,
            ack: None,
        }
    }

    fn event(kind: WatchEventKind, at_s: u64) -> WatchRecord {
        WatchRecord { time_us: at_s * 1_000_000, ..WatchRecord::new("eu-west-1", kind) }
    }

    /// A change stamped at its delivery time (HLC in µs).
    fn change(key: &str, values: &[i64], origin: &str, seq: u64, at_s: u64) -> WatchRecord {
        WatchRecord {
            key: key.into(),
            values: values.to_vec(),
            origin: origin.into(),
            seq,
            hlc: at_s * 1_000_000,
            ..event(WatchEventKind::Change, at_s)
        }
    }

    fn heartbeat(resolved_s: u64, at_s: u64) -> WatchRecord {
        WatchRecord { hlc: resolved_s * 1_000_000, ..event(WatchEventKind::Heartbeat, at_s) }
    }

    fn history() -> Vec<Op> {
        vec![
            write(1, "user:a:0", 1, Kind::Ok, 1),
            write(2, "user:a:0", 2, Kind::Ok, 2),
            write(3, "user:b:0", 3, Kind::Ok, 2),
            write(4, "user:b:0", 4, Kind::Unknown, 3),
            write(5, "user:b:0", 5, Kind::Fail, 4),
            write(6, "item:a:0", 6, Kind::Ok, 4),
        ]
    }

    fn good() -> Vec<WatchRecord> {
        vec![
            event(WatchEventKind::Open, 0),
            heartbeat(0, 0),
            change("user:a:0", &[1], "us/n1", 1, 1),
            change("user:a:0", &[2], "us/n1", 2, 2),
            heartbeat(2, 2),
            event(WatchEventKind::Error, 3),
            event(WatchEventKind::Open, 3),
            // Delivered again after the resume: counted once (and it is
            // not new, so it is no contradiction of the heartbeat).
            change("user:a:0", &[2], "us/n1", 2, 2),
            change("user:b:0", &[3], "ap/n1", 7, 3),
        ]
    }

    #[test]
    fn every_acknowledged_write_delivered_in_order_passes() {
        let v = check(&history(), &good(), "user:");
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.detail);
        assert!(v.detail.contains("3 acknowledged writes"), "{}", v.detail);
        assert!(v.detail.contains("1 delivered again"), "{}", v.detail);
    }

    #[test]
    fn a_write_never_delivered_fails() {
        let mut events = good();
        events.retain(|e| e.key != "user:b:0");
        let v = check(&history(), &events, "user:");
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.detail);
        assert!(v.detail.contains("1 of 3 acknowledged writes never delivered"), "{}", v.detail);
        assert!(v.detail.contains("user:b:0 = 3"), "{}", v.detail);
    }

    #[test]
    fn a_key_going_back_fails() {
        let mut events = good();
        events.push(change("user:a:0", &[1], "us/n1", 9, 5));
        let v = check(&history(), &events, "user:");
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.detail);
        assert!(v.detail.contains("user:a:0 went back: 1"), "{}", v.detail);
    }

    #[test]
    fn an_unknown_write_may_show_up_but_a_refused_or_foreign_one_may_not() {
        let mut events = good();
        events.push(change("user:b:0", &[4], "ap/n1", 8, 5));
        assert_eq!(check(&history(), &events, "user:").outcome, Outcome::Pass);
        events.push(change("user:b:0", &[5], "ap/n1", 9, 6));
        let v = check(&history(), &events, "user:");
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.detail.contains("user:b:0 = 5, which no write could have stored"), "{}", v.detail);
        let mut events = good();
        events.push(change("user:b:0", &[1], "ap/n1", 9, 6));
        assert_eq!(check(&history(), &events, "user:").outcome, Outcome::Fail, "a value of another key");
    }

    #[test]
    fn keys_outside_the_prefix_and_changed_redeliveries_fail() {
        let mut events = good();
        events.push(change("item:a:0", &[6], "us/n1", 10, 5));
        let v = check(&history(), &events, "user:");
        assert!(v.detail.contains("change of item:a:0 delivered to a watch of user:"), "{}", v.detail);
        let mut events = good();
        events.push(change("user:a:0", &[1], "us/n1", 2, 5));
        let v = check(&history(), &events, "user:");
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.detail.contains("delivered as user:a:0 = [2], then as user:a:0 = [1]"), "{}", v.detail);
    }

    #[test]
    fn a_change_older_than_a_resolved_heartbeat_fails() {
        let mut events = good();
        // A heartbeat resolved through 4 s, then a change stamped at 3 s.
        events.insert(6, heartbeat(4, 3));
        let v = check(&history(), &events, "user:");
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.detail);
        assert!(v.detail.contains("change ap/n1#7 of user:b:0 (HLC 3000000)"), "{}", v.detail);
        assert!(v.detail.contains("resolved through HLC 4000000"), "{}", v.detail);
    }

    #[test]
    fn a_refused_cursor_fails_and_a_silent_watcher_is_undecided() {
        let mut events = good();
        events.push(WatchRecord { detail: "CURSOR_COMPACTED".into(), ..event(WatchEventKind::Error, 6) });
        assert_eq!(check(&history(), &events, "user:").outcome, Outcome::Fail);
        let v = check(&history(), &[event(WatchEventKind::Open, 0)], "user:");
        assert_eq!(v.outcome, Outcome::Unknown, "{}", v.detail);
        let v = check(&[write(6, "item:a:0", 6, Kind::Ok, 4)], &good()[..2], "user:");
        assert_eq!(v.outcome, Outcome::Unknown, "nothing acknowledged under the prefix: {}", v.detail);
    }

    #[test]
    fn writes_made_before_the_watch_was_in_place_are_not_expected() {
        let mut ops = history();
        ops.insert(0, write(0, "user:c:0", 100, Kind::Ok, 0));
        let mut events = good();
        for e in &mut events {
            e.time_us += 500_000;
        }
        let v = check(&ops, &events, "user:");
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.detail);
        assert!(v.detail.contains("1 made before the watch was in place"), "{}", v.detail);
    }
}
