//! The checks that decide a run, each a pure function of the history and
//! of the state observed in every region's store after the heal, so each is
//! unit-tested on made-up inputs (see the tests at the end).

use std::collections::{BTreeMap, BTreeSet};

use geokv_server::kv::row::RowValue;
use geokv_server::kv::{combine_digests, Node};

use crate::cluster::{zone_regions, Nodes, REGIONS, TABLE_COUNTERS, TABLE_KV};
use crate::workload::{OpKind, OpRecord, Outcome};
use geokv_server::config::Level;

/// What one region's store holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegionState {
    /// (table, zone) -> (rows, digest), over the canonical row encoding.
    pub digests: BTreeMap<(String, String), (u64, String)>,
    /// Rows the residency audit found outside their zone: "table/key (zone)".
    pub misplaced: Vec<String>,
    /// Register rows: key -> live values.
    pub registers: BTreeMap<String, BTreeSet<String>>,
    /// Counter rows: key -> value.
    pub counters: BTreeMap<String, i64>,
}

/// Every region's state.
pub type Observed = BTreeMap<String, RegionState>;

/// Reads every region's store through its node.
pub fn observe(nodes: &Nodes) -> Result<Observed, String> {
    let mut out = Observed::new();
    for region in REGIONS {
        let node = nodes.get(region).ok_or_else(|| format!("region {region} never started"))?;
        out.insert(region.to_string(), region_state(&node)?);
    }
    Ok(out)
}

fn region_state(node: &Node) -> Result<RegionState, String> {
    let mut state = RegionState::default();
    let parts = node.digest().map_err(|e| format!("digest: {e}"))?;
    for d in combine_digests(parts) {
        state.digests.insert((d.table, d.zone), (d.rows, d.digest));
    }
    let (_, findings) = node.residency_audit().map_err(|e| format!("residency audit: {e}"))?;
    state.misplaced = findings
        .into_iter()
        .map(|f| format!("{}/{} (zone `{}`)", f.table, String::from_utf8_lossy(&f.key), f.zone))
        .collect();
    node.for_each_row(|table, key, row| {
        let key = String::from_utf8_lossy(key).into_owned();
        match (table, &row.value) {
            (TABLE_KV, RowValue::Register(d)) => {
                let live =
                    d.live_values().into_iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect();
                state.registers.insert(key, live);
            }
            (TABLE_COUNTERS, RowValue::Counter(c)) => {
                state.counters.insert(key, c.value());
            }
            _ => {}
        }
    })
    .map_err(|e| format!("reading rows: {e}"))?;
    Ok(state)
}

/// Convergence: every region of a zone holds the same rows of it (equal
/// digests), and no region outside a zone holds any of its rows.
pub fn convergence(observed: &Observed) -> Vec<String> {
    let mut out = Vec::new();
    let groups: BTreeSet<&(String, String)> = observed.values().flat_map(|s| s.digests.keys()).collect();
    for group in groups {
        let (table, zone) = group;
        let allowed = crate::cluster::regions_of_zone(zone);
        let mut seen: BTreeMap<Option<&(u64, String)>, Vec<&str>> = BTreeMap::new();
        for region in &allowed {
            let d = observed.get(*region).and_then(|s| s.digests.get(group));
            seen.entry(d).or_default().push(region);
        }
        if seen.len() > 1 {
            let parts: Vec<String> = seen
                .iter()
                .map(|(d, regions)| match d {
                    Some((rows, digest)) => format!("{regions:?}: {rows} rows, {}", &digest[..12]),
                    None => format!("{regions:?}: none"),
                })
                .collect();
            out.push(format!("convergence: table `{table}` zone `{zone}` differs: {}", parts.join("; ")));
        }
    }
    out
}

/// Residency: the audit of every region finds no row outside its zone.
pub fn residency(observed: &Observed) -> Vec<String> {
    observed
        .iter()
        .flat_map(|(region, s)| s.misplaced.iter().map(move |m| format!("residency: {region} stores {m}")))
        .collect()
}

/// No acknowledged put is lost: every acknowledged value is a live sibling
/// of its row in every region of the row's zone (puts are blind, so no
/// later write supersedes one).
pub fn acknowledged_puts(history: &[OpRecord], observed: &Observed) -> Vec<String> {
    let mut out = Vec::new();
    for r in history {
        let (OpKind::Put { value }, Outcome::Acked { .. }) = (&r.op.kind, &r.outcome) else { continue };
        for region in zone_regions(r.op.home) {
            let live = observed.get(region).and_then(|s| s.registers.get(&r.op.key));
            if !live.is_some_and(|l| l.contains(value)) {
                out.push(format!(
                    "lost write: op {} put {}={} at {:?} (acked at {} ms) is not in {region}: {:?}",
                    r.op.id, r.op.key, value, r.op.level, r.done_ms, live
                ));
            }
        }
    }
    out
}

/// Counters are exact: each region of a counter's zone holds at least the
/// sum of the acknowledged increments and at most that plus the increments
/// whose outcome is unknown (an error does not say it was not applied).
pub fn counters(history: &[OpRecord], observed: &Observed) -> Vec<String> {
    let mut bounds: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
    for r in history {
        let OpKind::Add { delta } = r.op.kind else { continue };
        let b = bounds.entry((r.op.key.as_str(), r.op.home)).or_default();
        match r.outcome {
            Outcome::Acked { .. } => b.0 += delta,
            Outcome::Failed { .. } => b.1 += delta,
        }
    }
    let mut out = Vec::new();
    for ((key, home), (acked, unknown)) in bounds {
        for region in zone_regions(home) {
            let value = observed.get(region).and_then(|s| s.counters.get(key)).copied().unwrap_or(0);
            if value < acked || value > acked + unknown {
                out.push(format!(
                    "counter: {key} is {value} in {region}; acknowledged increments sum to {acked}, \
                     unknown ones to {unknown}"
                ));
            }
        }
    }
    out
}

/// Fencing: no two regions acknowledged LOCAL writes for the same home
/// under the same epoch, and every acknowledged write was accepted inside
/// its row's zone.
pub fn fencing(history: &[OpRecord]) -> Vec<String> {
    let mut holders: BTreeMap<(&str, u64), BTreeSet<&str>> = BTreeMap::new();
    let mut out = Vec::new();
    for r in history {
        let Outcome::Acked { home_region, epoch, accepted_by } = &r.outcome else { continue };
        if !zone_regions(r.op.home).contains(&accepted_by.as_str()) {
            out.push(format!(
                "residency: op {} on {} homed in {} was accepted by {accepted_by}, outside its zone",
                r.op.id, r.op.key, r.op.home
            ));
        }
        if r.op.level == Level::Local {
            holders.entry((home_region.as_str(), *epoch)).or_default().insert(accepted_by.as_str());
        }
    }
    for ((home, epoch), regions) in holders {
        if regions.len() > 1 {
            out.push(format!("fencing: home {home} epoch {epoch} had LOCAL writes accepted by {regions:?}"));
        }
    }
    out
}

/// Every check over the final state; empty when the run passes.
pub fn all(history: &[OpRecord], observed: &Observed) -> Vec<String> {
    let mut out = convergence(observed);
    out.extend(residency(observed));
    out.extend(acknowledged_puts(history, observed));
    out.extend(counters(history, observed));
    out.extend(fencing(history));
    out
}

#[cfg(test)]
mod tests {
    //! Each check fails on a state that breaks its property, and passes on
    //! one that keeps it: no check that cannot fail.
    use super::*;
    use crate::workload::PlannedOp;

    fn op(id: u64, level: Level, key: &str, home: &'static str, kind: OpKind, outcome: Outcome) -> OpRecord {
        OpRecord {
            op: PlannedOp { id, at_ms: 0, entry: home, level, table: TABLE_KV, key: key.into(), home, kind },
            outcome,
            done_ms: 0,
        }
    }

    fn acked(home: &str, epoch: u64, by: &str) -> Outcome {
        Outcome::Acked { home_region: home.into(), epoch, accepted_by: by.into() }
    }

    fn everywhere(f: impl Fn(&mut RegionState)) -> Observed {
        REGIONS
            .iter()
            .map(|r| {
                let mut s = RegionState::default();
                f(&mut s);
                (r.to_string(), s)
            })
            .collect()
    }

    #[test]
    fn fencing_flags_two_holders_of_one_epoch() {
        let h = vec![
            op(
                1,
                Level::Local,
                "k0",
                "us-east",
                OpKind::Put { value: "a".into() },
                acked("us-east", 1, "us-east"),
            ),
            op(
                2,
                Level::Local,
                "k0",
                "us-east",
                OpKind::Put { value: "b".into() },
                acked("us-east", 2, "eu-west"),
            ),
        ];
        assert!(fencing(&h).is_empty());
        let mut bad = h.clone();
        bad.push(op(
            3,
            Level::Local,
            "k4",
            "us-east",
            OpKind::Put { value: "c".into() },
            acked("us-east", 2, "ap-south"),
        ));
        assert_eq!(fencing(&bad).len(), 1, "{:?}", fencing(&bad));
        // EVENTUAL writes are accepted anywhere in the zone under the
        // current epoch: not a claim to hold the home.
        let mut eventual = h;
        eventual.push(op(
            4,
            Level::Eventual,
            "k0",
            "us-east",
            OpKind::Put { value: "d".into() },
            acked("us-east", 2, "ap-south"),
        ));
        assert!(fencing(&eventual).is_empty());
    }

    #[test]
    fn fencing_flags_a_write_accepted_outside_its_zone() {
        let h = vec![op(
            1,
            Level::Eventual,
            "k1",
            "eu-west",
            OpKind::Put { value: "a".into() },
            acked("eu-west", 1, "us-east"),
        )];
        assert_eq!(fencing(&h).len(), 1);
    }

    #[test]
    fn a_missing_acknowledged_value_is_a_lost_write() {
        let h = vec![op(
            1,
            Level::Quorum,
            "k1",
            "eu-west",
            OpKind::Put { value: "a".into() },
            acked("eu-west", 1, "eu-west"),
        )];
        let kept = everywhere(|s| {
            s.registers.insert("k1".into(), ["a".to_string(), "b".to_string()].into());
        });
        assert!(acknowledged_puts(&h, &kept).is_empty());
        let mut lost = kept.clone();
        lost.get_mut("eu-central").unwrap().registers.insert("k1".into(), ["b".to_string()].into());
        assert_eq!(acknowledged_puts(&h, &lost).len(), 1);
        // An unacknowledged value may be missing.
        let failed = vec![op(
            1,
            Level::Quorum,
            "k1",
            "eu-west",
            OpKind::Put { value: "z".into() },
            Outcome::Failed { code: "Unavailable".into(), message: String::new() },
        )];
        assert!(acknowledged_puts(&failed, &kept).is_empty());
    }

    #[test]
    fn counters_are_bounded_by_acked_and_unknown_increments() {
        let add =
            |id, delta, outcome| op(id, Level::Eventual, "c0", "us-east", OpKind::Add { delta }, outcome);
        let h = vec![
            add(1, 2, acked("us-east", 1, "us-east")),
            add(2, 3, Outcome::Failed { code: "DeadlineExceeded".into(), message: String::new() }),
        ];
        let at = |v: i64| {
            everywhere(|s| {
                s.counters.insert("c0".into(), v);
            })
        };
        assert!(counters(&h, &at(2)).is_empty());
        assert!(counters(&h, &at(5)).is_empty());
        assert_eq!(counters(&h, &at(1)).len(), REGIONS.len(), "an acknowledged increment is lost");
        assert_eq!(counters(&h, &at(6)).len(), REGIONS.len(), "an increment applied twice");
    }

    #[test]
    fn differing_digests_and_misplaced_rows_fail() {
        let same = everywhere(|s| {
            s.digests.insert((TABLE_KV.into(), String::new()), (1, "ab".repeat(16)));
        });
        assert!(convergence(&same).is_empty());
        let mut differs = same.clone();
        differs
            .get_mut("ap-south")
            .unwrap()
            .digests
            .insert((TABLE_KV.into(), String::new()), (1, "cd".repeat(16)));
        assert_eq!(convergence(&differs).len(), 1);
        // Rows of zone eu in eu-west only: eu-central lacks them.
        let mut partial = same.clone();
        partial
            .get_mut("eu-west")
            .unwrap()
            .digests
            .insert((TABLE_KV.into(), "eu".into()), (1, "ef".repeat(16)));
        assert_eq!(convergence(&partial).len(), 1);
        let mut misplaced = same;
        misplaced.get_mut("us-east").unwrap().misplaced.push("kv/k1 (zone `eu`)".into());
        assert_eq!(residency(&misplaced).len(), 1);
    }
}
