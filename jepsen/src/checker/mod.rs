//! Checkers: pure functions from a history (and the state collected after
//! the heal) to a verdict. None does IO, so each is tested on synthetic
//! histories, including ones that must fail.
//!
//! A checker that cannot decide says `Unknown`, and an unknown verdict
//! fails the run, as a failure does: a run passes only when every checker
//! positively passed.
//!
//! # Layout
//! - [`linearizable`]: registers, Wing-Gong/Lowe search per key.
//! - [`counter`]: final value = acknowledged increments (+ a subset of the
//!   unknown ones); every region agrees.
//! - [`set`]: add-wins set semantics on the final members.
//! - [`residency`]: reads and writes outside the zone refused; the audit of
//!   every region clean; no acknowledged EU write lost.
//! - [`convergence`]: every region holding a (table, zone) has the same
//!   digest after the heal.
//! - [`epoch`]: at most one home holder per epoch.
//! - [`coverage`]: the installed faults touched a region the workload
//!   depends on (else the run is vacuous).
//! - [`big_rows`]: hot big rows read alike everywhere; no acknowledged value
//!   lost, no refused one stored.
//! - [`availability`]: STRONG operations keep completing after a cut heals
//!   (no leaderless stretch: pre-vote).
//! - [`watch`]: a change feed delivers every acknowledged write under its
//!   prefix, per key in order, nothing else, and resumes without a gap.

pub mod availability;
pub mod big_rows;
pub mod convergence;
pub mod counter;
pub mod coverage;
pub mod epoch;
pub mod linearizable;
pub mod residency;
pub mod set;
pub mod votes;
pub mod watch;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A checker's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Pass,
    Fail,
    /// The checker could not decide; counts as a failure of the run.
    Unknown,
}

/// One checker's verdict, as written to `verdicts.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub checker: String,
    pub outcome: Outcome,
    /// What was checked and, on failure, the first problems found.
    pub detail: String,
}

impl Verdict {
    pub fn new(checker: &str, outcome: Outcome, detail: impl Into<String>) -> Self {
        Self { checker: checker.to_string(), outcome, detail: detail.into() }
    }
}

/// The worst of several outcomes: any failure fails, else any unknown is
/// unknown, else pass. No verdicts at all is unknown.
pub fn overall(verdicts: &[Verdict]) -> Outcome {
    if verdicts.is_empty() {
        return Outcome::Unknown;
    }
    if verdicts.iter().any(|v| v.outcome == Outcome::Fail) {
        Outcome::Fail
    } else if verdicts.iter().any(|v| v.outcome == Outcome::Unknown) {
        Outcome::Unknown
    } else {
        Outcome::Pass
    }
}

/// What the harness collects after healing every fault and waiting for the
/// regions to converge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    /// Per region: its digests and residency audit, or why they could not
    /// be read.
    pub regions: BTreeMap<String, RegionFinal>,
    /// Residency zones: zone name -> regions. Rows of zone "" may live in
    /// every region.
    pub zones: BTreeMap<String, Vec<String>>,
    /// How long after the heal the digests agreed; None if they never did
    /// within the bound.
    pub converged_after_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionFinal {
    /// (table, zone) -> (rows, digest); None when the Digest RPC failed.
    pub digests: Option<BTreeMap<String, (u64, String)>>,
    /// None when the ResidencyAudit RPC failed.
    pub audit: Option<Audit>,
    /// Why the region's state could not be read, if it could not.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    pub rows_checked: u64,
    /// One line per row stored outside its zone.
    pub violations: Vec<String>,
}

/// The key a digest is stored under in [`RegionFinal::digests`].
pub fn digest_key(table: &str, zone: &str) -> String {
    format!("{table}/{zone}")
}

/// Clients named `final-<region>` do the reads after the heal.
pub const FINAL_CLIENT_PREFIX: &str = "final-";

pub fn is_final(op: &crate::history::Op) -> bool {
    op.client.starts_with(FINAL_CLIENT_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_empty_never_pass() {
        let pass = Verdict::new("a", Outcome::Pass, "");
        let unknown = Verdict::new("b", Outcome::Unknown, "");
        let fail = Verdict::new("c", Outcome::Fail, "");
        assert_eq!(overall(&[]), Outcome::Unknown);
        assert_eq!(overall(std::slice::from_ref(&pass)), Outcome::Pass);
        assert_eq!(overall(&[pass.clone(), unknown.clone()]), Outcome::Unknown);
        assert_eq!(overall(&[unknown, fail, pass]), Outcome::Fail);
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::history::{Kind, Op, Value, F};

    /// An operation invoked at `10 id` us and completed 5 us later.
    pub fn op(id: u64, client: &str, region: &str, f: F, key: &str, value: Value, outcome: Kind) -> Op {
        timed(id, client, region, f, key, value, outcome, id * 10, id * 10 + 5)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn timed(
        id: u64,
        client: &str,
        region: &str,
        f: F,
        key: &str,
        value: Value,
        outcome: Kind,
        invoke_us: u64,
        complete_us: u64,
    ) -> Op {
        Op {
            id,
            client: client.to_string(),
            region: region.to_string(),
            level: "EVENTUAL".to_string(),
            f,
            key: key.to_string(),
            value,
            invoke_us,
            complete_us,
            outcome,
            error: None,
            ack: None,
        }
    }
}
