//! One vote per member per term: no Raft member stores votes for two
//! different candidates in one term of one group, across its restarts and
//! a wiped store included (docs/architecture.md section 16). Nodes log
//! every vote they store (`VOTE group=.. term=.. voted_for=.. committed=..`)
//! to logs kept beside their stores, which a wipe leaves in place (the run
//! reads them: `run::stored_votes`). A
//! committed vote only acknowledges the term's leader and is not counted.

use std::collections::{BTreeMap, BTreeSet};

use super::{Outcome, Verdict};

/// One stored vote read from a node's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVote {
    pub group: String,
    pub term: u64,
    pub voted_for: u64,
    pub committed: bool,
}

/// The votes logged in `text` (one node's log).
pub fn parse(text: &str) -> Vec<StoredVote> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((_, fields)) = line.split_once("VOTE ") else { continue };
        let field = |name: &str| {
            fields.split_whitespace().find_map(|f| f.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        };
        let (Some(group), Some(term), Some(voted_for), Some(committed)) =
            (field("group"), field("term"), field("voted_for"), field("committed"))
        else {
            continue;
        };
        let (Ok(term), Ok(voted_for)) = (term.parse(), voted_for.parse()) else { continue };
        out.push(StoredVote { group: group.to_string(), term, voted_for, committed: committed == "true" });
    }
    out
}

pub fn check(votes: &BTreeMap<String, Vec<StoredVote>>) -> Verdict {
    let mut by_term: BTreeMap<(&str, &str, u64), BTreeSet<u64>> = BTreeMap::new();
    let mut counted = 0usize;
    for (node, vs) in votes {
        for v in vs.iter().filter(|v| !v.committed) {
            counted += 1;
            by_term.entry((node, &v.group, v.term)).or_default().insert(v.voted_for);
        }
    }
    let twice: Vec<String> = by_term
        .iter()
        .filter(|(_, c)| c.len() > 1)
        .map(|((node, group, term), c)| format!("{node} voted for {c:?} in term {term} of {group}"))
        .collect();
    if counted == 0 {
        return Verdict::new("one-vote-per-term", Outcome::Unknown, "no stored vote found in the node logs");
    }
    if twice.is_empty() {
        Verdict::new(
            "one-vote-per-term",
            Outcome::Pass,
            format!("{counted} stored votes in {} (member, group, term)s, one candidate each", by_term.len()),
        )
    } else {
        Verdict::new("one-vote-per-term", Outcome::Fail, twice.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_candidates_in_one_term_fail_and_a_leader_acknowledgement_does_not_count() {
        let log = "x INFO geokv_server::consensus::store: VOTE group=control term=3 voted_for=7 committed=false\n\
                   x INFO geokv_server::consensus::store: VOTE group=control term=3 voted_for=9 committed=true\n";
        let mut votes = BTreeMap::new();
        votes.insert("a".to_string(), parse(log));
        assert_eq!(votes["a"].len(), 2);
        assert_eq!(check(&votes).outcome, Outcome::Pass);
        let wiped = "y VOTE group=control term=3 voted_for=9 committed=false\n";
        votes.get_mut("a").unwrap().extend(parse(wiped));
        let v = check(&votes);
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.detail.contains("a voted for {7, 9} in term 3 of control"), "{}", v.detail);
    }
}
