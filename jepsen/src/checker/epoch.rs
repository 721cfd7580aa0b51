//! At most one home holder per epoch: for each group of rows that fails
//! over together, no two regions may ever claim to be its home in the same
//! epoch.
//!
//! The observations come from the failover state the cluster exposes
//! (issue 4). Until that state exists no observation can be made, the
//! verdict is `Unknown`, and no scenario of the suite runs this checker.

use std::collections::{BTreeMap, BTreeSet};

use super::{Outcome, Verdict};

/// One claim, seen at some time: `holder` is home of `group` in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochClaim {
    pub group: String,
    pub epoch: u64,
    pub holder: String,
    /// Which region or client reported the claim.
    pub observed_by: String,
}

pub fn check(claims: &[EpochClaim]) -> Verdict {
    if claims.is_empty() {
        return Verdict::new(
            "one-home-per-epoch",
            Outcome::Unknown,
            "no failover state observed: the cluster does not expose epochs and holders yet (issue 4)",
        );
    }
    let mut holders: BTreeMap<(&str, u64), BTreeSet<&str>> = BTreeMap::new();
    for c in claims {
        holders.entry((&c.group, c.epoch)).or_default().insert(&c.holder);
    }
    let problems: Vec<String> = holders
        .iter()
        .filter(|(_, h)| h.len() > 1)
        .map(|((g, e), h)| format!("{g} epoch {e} held by {h:?}"))
        .collect();
    if !problems.is_empty() {
        return Verdict::new("one-home-per-epoch", Outcome::Fail, problems.join("; "));
    }
    Verdict::new(
        "one-home-per-epoch",
        Outcome::Pass,
        format!("{} claims, {} (group, epoch) pairs, one holder each", claims.len(), holders.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(epoch: u64, holder: &str) -> EpochClaim {
        EpochClaim { group: "g".into(), epoch, holder: holder.into(), observed_by: "x".into() }
    }

    #[test]
    fn one_holder_per_epoch_passes_two_fail_none_is_unknown() {
        assert_eq!(check(&[claim(1, "a"), claim(1, "a"), claim(2, "b")]).outcome, Outcome::Pass);
        assert_eq!(check(&[claim(1, "a"), claim(2, "b"), claim(2, "c")]).outcome, Outcome::Fail);
        assert_eq!(check(&[]).outcome, Outcome::Unknown);
    }
}
