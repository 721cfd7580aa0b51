//! Convergence after the heal: every region that may hold a (table, zone)
//! has the same digest of it (rows and their merged states, via the Admin
//! `Digest` RPC). Rows of zone "" may live in every region.

use std::collections::{BTreeMap, BTreeSet};

use super::{FinalState, Outcome, Verdict};

pub fn check(fin: &FinalState) -> Verdict {
    let mut undecided = Vec::new();
    let mut digests: BTreeMap<&str, &BTreeMap<String, (u64, String)>> = BTreeMap::new();
    for (region, r) in &fin.regions {
        match &r.digests {
            Some(d) => {
                digests.insert(region, d);
            }
            None => undecided.push(format!("no digest of {region}: {}", r.error.as_deref().unwrap_or("?"))),
        }
    }
    if fin.regions.is_empty() {
        undecided.push("no region reported".into());
    }
    if !undecided.is_empty() {
        return Verdict::new("convergence", Outcome::Unknown, undecided.join("; "));
    }
    let all_keys: BTreeSet<&String> = digests.values().flat_map(|d| d.keys()).collect();
    let mut problems = Vec::new();
    let mut rows_total = 0;
    for key in &all_keys {
        let zone = key.split_once('/').map(|(_, z)| z).unwrap_or("");
        let holders: Vec<&str> = if zone.is_empty() {
            fin.regions.keys().map(String::as_str).collect()
        } else {
            match fin.zones.get(zone) {
                Some(z) => z.iter().map(String::as_str).filter(|r| fin.regions.contains_key(*r)).collect(),
                None => {
                    problems.push(format!("{key}: zone {zone} is not configured"));
                    continue;
                }
            }
        };
        let seen: Vec<(&str, (u64, &str))> = holders
            .iter()
            .map(|r| {
                let d = digests[r].get(*key).map(|(n, d)| (*n, d.as_str())).unwrap_or((0, ""));
                // An empty (table, zone) may be listed or not.
                (*r, if d.0 == 0 { (0, "") } else { d })
            })
            .collect();
        let first = seen[0].1;
        if seen.iter().any(|(_, d)| *d != first) {
            let shown: Vec<String> =
                seen.iter().map(|(r, (n, d))| format!("{r}: {n} rows {}", &d[..d.len().min(12)])).collect();
            problems.push(format!("{key} differs: {}", shown.join(", ")));
        }
        rows_total += first.0;
    }
    if !problems.is_empty() {
        return Verdict::new("convergence", Outcome::Fail, problems.join("; "));
    }
    let after = fin.converged_after_ms.map(|ms| format!(", {ms} ms after the heal")).unwrap_or_default();
    Verdict::new(
        "convergence",
        Outcome::Pass,
        format!(
            "{} (table, zone) digests equal in every holding region ({rows_total} rows){after}",
            all_keys.len()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::RegionFinal;

    /// (table/zone, rows, digest) of one region.
    type Digests<'a> = &'a [(&'a str, u64, &'a str)];

    fn fin(entries: &[(&str, Digests)]) -> FinalState {
        let mut f = FinalState::default();
        f.zones.insert("eu".into(), vec!["eu-west-1".into(), "eu-central-1".into()]);
        for (region, ds) in entries {
            let d = ds.iter().map(|(k, n, h)| (k.to_string(), (*n, h.to_string()))).collect();
            f.regions.insert(region.to_string(), RegionFinal { digests: Some(d), ..Default::default() });
        }
        f
    }

    #[test]
    fn equal_digests_pass_and_zones_compare_only_their_regions() {
        let f = fin(&[
            ("us-east-1", &[("default/", 3, "aa")]),
            ("eu-west-1", &[("default/", 3, "aa"), ("eu_users/eu", 2, "bb")]),
            ("eu-central-1", &[("default/", 3, "aa"), ("eu_users/eu", 2, "bb")]),
        ]);
        assert_eq!(check(&f).outcome, Outcome::Pass, "{:?}", check(&f));
    }

    #[test]
    fn a_differing_or_missing_digest_fails() {
        let f = fin(&[("us-east-1", &[("default/", 3, "aa")]), ("eu-west-1", &[("default/", 3, "ab")])]);
        assert_eq!(check(&f).outcome, Outcome::Fail);
        let f = fin(&[("us-east-1", &[("default/", 3, "aa")]), ("eu-west-1", &[])]);
        assert_eq!(check(&f).outcome, Outcome::Fail);
        let f =
            fin(&[("eu-west-1", &[("eu_users/eu", 2, "bb")]), ("eu-central-1", &[("eu_users/eu", 1, "cc")])]);
        assert_eq!(check(&f).outcome, Outcome::Fail);
    }

    #[test]
    fn an_unreachable_region_is_unknown() {
        let mut f = fin(&[("us-east-1", &[("default/", 3, "aa")])]);
        f.regions.insert(
            "eu-west-1".into(),
            RegionFinal { error: Some("unreachable".into()), ..Default::default() },
        );
        assert_eq!(check(&f).outcome, Outcome::Unknown);
    }
}
