//! One vote per member per term (docs/architecture.md section 16). openraft
//! votes for a leader id, (term, candidate), and a member's stored vote
//! only ever goes up in that order (then uncommitted before committed): a
//! member may move from (3, a) to (3, b) when b > a, but one whose vote
//! goes back, to a lower term or a lower candidate of the same term, can
//! help elect a second leader where it already helped one. So: every
//! member's stored votes, in order, across its restarts and a wiped store
//! included, never go back. Nodes log every vote they store
//! (`VOTE group=.. term=.. voted_for=.. committed=..`)
//! to logs kept beside their stores, which a wipe leaves in place (the run
//! reads them: `run::stored_votes`).

use std::collections::BTreeMap;

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
    let mut problems = Vec::new();
    let mut counted = 0usize;
    for (node, vs) in votes {
        // openraft's order of votes: (term, candidate), then committed.
        let mut last: BTreeMap<&str, (u64, u64, bool)> = BTreeMap::new();
        for v in vs {
            counted += 1;
            let now = (v.term, v.voted_for, v.committed);
            if let Some(prev) = last.get(v.group.as_str()) {
                if now < *prev && problems.len() < PROBLEMS_MAX {
                    let what = if now.0 == prev.0 { "twice in" } else { "back to" };
                    problems.push(format!(
                        "{node} voted {what} term {} of {} (for {}, after a vote for {} in term {})",
                        v.term, v.group, v.voted_for, prev.1, prev.0
                    ));
                }
            }
            let e = last.entry(v.group.as_str()).or_insert(now);
            *e = (*e).max(now);
        }
    }
    if counted == 0 {
        return Verdict::new("one-vote-per-term", Outcome::Unknown, "no stored vote found in the node logs");
    }
    if problems.is_empty() {
        Verdict::new(
            "one-vote-per-term",
            Outcome::Pass,
            format!("{counted} stored votes; every member's votes only went up"),
        )
    } else {
        Verdict::new("one-vote-per-term", Outcome::Fail, problems.join("; "))
    }
}

/// Problems listed at most.
const PROBLEMS_MAX: usize = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn votes_may_go_up_in_a_term_but_never_back() {
        let log = "x INFO geokv_server::consensus::store: VOTE group=control term=1 voted_for=7 committed=false\n\
                   x INFO geokv_server::consensus::store: VOTE group=control term=1 voted_for=9 committed=false\n\
                   x INFO geokv_server::consensus::store: VOTE group=control term=1 voted_for=9 committed=true\n";
        let mut votes = BTreeMap::new();
        votes.insert("a".to_string(), parse(log));
        assert_eq!(votes["a"].len(), 3);
        assert_eq!(check(&votes).outcome, Outcome::Pass);
        let wiped = "y VOTE group=control term=1 voted_for=7 committed=false\n";
        votes.get_mut("a").unwrap().extend(parse(wiped));
        let v = check(&votes);
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.detail.contains("a voted twice in term 1 of control"), "{}", v.detail);
        votes.insert("a".to_string(), parse("VOTE group=g term=5 voted_for=1 committed=true\nVOTE group=g term=2 voted_for=3 committed=false\n"));
        assert!(check(&votes).detail.contains("voted back to term 2"));
        assert_eq!(check(&BTreeMap::new()).outcome, Outcome::Unknown);
    }
}
