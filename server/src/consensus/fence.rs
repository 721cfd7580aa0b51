//! A Raft member whose state is gone never votes in an old term
//! (docs/architecture.md section 16).
//!
//! A voter that lost its store (a wiped or replaced disk) comes back with
//! no vote: left alone, it would grant a vote in a term it already voted in
//! before the loss, and two leaders could win that term. So a member whose
//! store was made empty at this start does not bootstrap its groups at
//! once. For each group it first asks every other member for its state
//! (initialized or not, current term):
//!
//! - all answer, none initialized: the cluster's first start; the group
//!   bootstraps as before;
//! - all answer, some initialized: this member's state is gone. Every term
//!   it can have voted in is at most the highest term the others report (a
//!   candidate stores its own term before asking for votes, and terms never
//!   go back), so that term becomes its fence: it grants no vote in a term
//!   at or below it, starts no election until its own term passes it, and
//!   never bootstraps; it rejoins through the catch-up path, the leader's
//!   appends or snapshot.
//!
//! Until every other member answered, it grants no vote and starts no
//! election. The fence is stored (synced) beside the group's vote, so a
//! crash while learning it or after does not lift it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::network::Peers;
use super::store::{write_fence, FenceRecord};
use super::{NodeId, Raft};
use crate::storage::Engine;

/// Time between two rounds of asking the other members.
const ASK_EVERY: Duration = Duration::from_millis(500);

/// A member's answer about one group (the `STATE` Raft message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    pub initialized: bool,
    /// The member's current term, or its own fence when higher.
    pub term: u64,
}

/// One group's vote fence at this member.
#[derive(Debug, Default)]
pub struct Fence {
    pending: AtomicBool,
    term: AtomicU64,
}

/// Why a vote request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Still learning the group's terms.
    Pending,
    /// At or below the fence term.
    OldTerm(u64),
}

impl Fence {
    pub fn from_record(record: FenceRecord) -> Self {
        Self { pending: AtomicBool::new(record.pending), term: AtomicU64::new(record.term) }
    }

    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Whether a vote request of `term` is refused, and why.
    pub fn refuses(&self, term: u64) -> Option<Refusal> {
        if self.pending() {
            return Some(Refusal::Pending);
        }
        let fence = self.term();
        (fence > 0 && term <= fence).then_some(Refusal::OldTerm(fence))
    }

    fn settle(&self, term: u64) {
        self.term.store(term, Ordering::Release);
        self.pending.store(false, Ordering::Release);
    }
}

/// The fence term from every other member's answer: None when none is
/// initialized (a first start: no fence needed).
pub fn fence_term(answers: &[MemberState]) -> Option<u64> {
    answers.iter().any(|a| a.initialized).then(|| answers.iter().map(|a| a.term).max().unwrap_or(0).max(1))
}

/// Asks every other member of `group` until all answered, settles the
/// fence, then either bootstraps the group (`bootstrap`, a first start) or
/// lets the member elect once its term passes the fence.
#[allow(clippy::too_many_arguments)]
pub async fn learn(
    raft: Raft,
    group: String,
    others: Vec<NodeId>,
    peers: Arc<Peers>,
    engine: Arc<dyn Engine>,
    fence: Arc<Fence>,
    bootstrap: impl std::future::Future<Output = ()> + Send,
) {
    let mut rounds = 0u64;
    let answers = loop {
        let mut answers = Vec::with_capacity(others.len());
        let mut missing = Vec::new();
        for id in &others {
            match peers.member_state(*id, &group).await {
                Ok(a) => answers.push(a),
                Err(e) => missing.push(format!("{id}: {e}")),
            }
        }
        if missing.is_empty() {
            break answers;
        }
        rounds += 1;
        if rounds % 20 == 1 {
            tracing::warn!(group = %group, missing = ?missing,
                "this store was made empty: waiting for every other member of the group before voting");
        }
        tokio::time::sleep(ASK_EVERY).await;
    };
    match fence_term(&answers) {
        None => {
            if let Err(e) = write_fence(engine.as_ref(), &group, FenceRecord { pending: false, term: 0 }) {
                tracing::error!(group = %group, error = %e, "cannot store the vote fence");
                return;
            }
            fence.settle(0);
            raft.runtime_config().elect(true);
            bootstrap.await;
        }
        Some(term) => {
            if let Err(e) = write_fence(engine.as_ref(), &group, FenceRecord { pending: false, term }) {
                tracing::error!(group = %group, error = %e, "cannot store the vote fence");
                return;
            }
            fence.settle(term);
            tracing::warn!(group = %group, fence = term,
                "this member's Raft state is gone (its store was made empty): it votes in no term up to the fence \
                 and rejoins through the leader's catch-up");
            metrics::counter!("geokv_raft_fenced_rejoins_total", "group" => group.clone()).increment(1);
            elect_after(raft, term).await;
        }
    }
}

/// Lets `raft` start elections once its current term is above `fence`.
pub async fn elect_after(raft: Raft, fence: u64) {
    raft.runtime_config().elect(false);
    let mut metrics = raft.metrics();
    loop {
        if metrics.borrow().current_term > fence {
            raft.runtime_config().elect(true);
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_start_has_no_fence_and_a_lost_state_fences_at_the_highest_term() {
        let fresh = MemberState { initialized: false, term: 0 };
        assert_eq!(fence_term(&[fresh, fresh]), None);
        let a = MemberState { initialized: true, term: 7 };
        let candidate = MemberState { initialized: true, term: 9 };
        assert_eq!(fence_term(&[a, candidate]), Some(9));
        assert_eq!(fence_term(&[fresh, MemberState { initialized: true, term: 0 }]), Some(1));
    }

    #[test]
    fn a_fence_refuses_old_terms_and_everything_while_pending() {
        let f = Fence::from_record(FenceRecord { pending: true, term: 0 });
        assert_eq!(f.refuses(100), Some(Refusal::Pending));
        f.settle(9);
        assert_eq!(f.refuses(9), Some(Refusal::OldTerm(9)));
        assert_eq!(f.refuses(3), Some(Refusal::OldTerm(9)));
        assert_eq!(f.refuses(10), None);
        let none = Fence::default();
        assert_eq!(none.refuses(1), None);
    }
}
