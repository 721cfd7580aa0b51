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
//! - all answer, none initialized (a member fenced after its own wipe and
//!   not yet caught up counts as initialized): the cluster's first start,
//!   or every member lost its state at once (nothing of the group survives
//!   to protect); the group bootstraps as before;
//! - all answer, some initialized: this member's state is gone. openraft
//!   votes for a leader id, (term, candidate), and a member's vote only
//!   ever grows; every vote this member can have stored is at most the
//!   highest vote the others report (a candidate stores its own vote
//!   before asking for others', and votes never go back). That vote becomes
//!   its fence: it grants no vote for a leader id at or below it, takes no
//!   append or snapshot from a leader below it (answering with the fence,
//!   so that leader steps down), starts no election until its own term
//!   reaches the fence's (its election then asks for a term above every
//!   vote it can have cast), and never bootstraps; it rejoins through the catch-up path,
//!   the leader's appends or snapshot. Its stored votes therefore never go
//!   back, which is what makes a vote in a term unique.
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
    /// The member's vote (its leader id: term and candidate), or its own
    /// fence when higher.
    pub term: u64,
    pub voted_for: NodeId,
}

/// One group's vote fence at this member.
#[derive(Debug, Default)]
pub struct Fence {
    pending: AtomicBool,
    term: AtomicU64,
    voted_for: AtomicU64,
}

/// Why a vote request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Still learning the group's terms.
    Pending,
    /// At or below the fence (term, candidate).
    Old(u64, NodeId),
}

impl Fence {
    pub fn from_record(record: FenceRecord) -> Self {
        Self {
            pending: AtomicBool::new(record.pending),
            term: AtomicU64::new(record.term),
            voted_for: AtomicU64::new(record.voted_for),
        }
    }

    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    /// The fence as a leader id (term, candidate); (0, 0) when none.
    pub fn leader_id(&self) -> (u64, NodeId) {
        (self.term(), self.voted_for.load(Ordering::Acquire))
    }

    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Whether a vote request for the leader id `(term, candidate)` is
    /// refused, and why: while pending, and at or below the fence.
    pub fn refuses_vote(&self, term: u64, candidate: NodeId) -> Option<Refusal> {
        if self.pending() {
            return Some(Refusal::Pending);
        }
        let (t, n) = self.leader_id();
        (t > 0 && (term, candidate) <= (t, n)).then_some(Refusal::Old(t, n))
    }

    /// Whether an append or snapshot from the leader `(term, leader)` is
    /// refused: only below the fence (the fence's own leader is taken).
    pub fn refuses_leader(&self, term: u64, leader: NodeId) -> Option<Refusal> {
        let (t, n) = self.leader_id();
        (t > 0 && !self.pending() && (term, leader) < (t, n)).then_some(Refusal::Old(t, n))
    }

    fn settle(&self, (term, voted_for): (u64, NodeId)) {
        self.term.store(term, Ordering::Release);
        self.voted_for.store(voted_for, Ordering::Release);
        self.pending.store(false, Ordering::Release);
    }
}

/// The fence from every other member's answer: the highest vote, as
/// (term, candidate); None when none is initialized (a first start: no
/// fence needed).
pub fn fence_of(answers: &[MemberState]) -> Option<(u64, NodeId)> {
    answers
        .iter()
        .any(|a| a.initialized)
        .then(|| answers.iter().map(|a| (a.term, a.voted_for)).max().unwrap_or((0, 0)).max((1, 0)))
}

/// Asks every other member of `group` until all answered, settles the
/// fence, then either bootstraps the group (`bootstrap`, a first start) or
/// lets the member elect once its term reaches the fence ([`may_elect`]).
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
        if rounds.is_multiple_of(20) {
            tracing::warn!(group = %group, missing = ?missing,
                "this store was made empty: waiting for every other member of the group before voting");
        }
        tokio::time::sleep(ASK_EVERY).await;
    };
    match fence_of(&answers) {
        None => {
            if let Err(e) = write_fence(engine.as_ref(), &group, FenceRecord::default()) {
                tracing::error!(group = %group, error = %e, "cannot store the vote fence");
                return;
            }
            fence.settle((0, 0));
            raft.runtime_config().elect(true);
            bootstrap.await;
        }
        Some((term, voted_for)) => {
            let record = FenceRecord { pending: false, term, voted_for };
            if let Err(e) = write_fence(engine.as_ref(), &group, record) {
                tracing::error!(group = %group, error = %e, "cannot store the vote fence");
                return;
            }
            fence.settle((term, voted_for));
            tracing::warn!(group = %group, fence_term = term, fence_candidate = voted_for,
                "this member's Raft state is gone (its store was made empty): it votes in no term up to the fence \
                 and rejoins through the leader's catch-up");
            metrics::counter!("geokv_raft_fenced_rejoins_total", "group" => group.clone()).increment(1);
            elect_after(raft, term).await;
        }
    }
}

/// Whether a member fenced at term `fence` may start an election while its
/// current term is `current`. An election asks for `current + 1`, and every
/// vote the member can have cast before it lost its state is at or below
/// the fence, so the election is safe once `current` has reached the fence.
/// Waiting for `current` to pass the fence instead left a fenced member
/// holding the longest log unable to campaign and unable to grant its vote
/// to a shorter log: the group had no leader until another member's term
/// moved past the fence.
pub fn may_elect(current: u64, fence: u64) -> bool {
    current >= fence
}

/// Lets `raft` start elections once [`may_elect`] holds.
pub async fn elect_after(raft: Raft, fence: u64) {
    use openraft::async_runtime::WatchReceiver;
    raft.runtime_config().elect(false);
    let mut metrics = raft.metrics();
    loop {
        if may_elect(metrics.borrow_watched().current_term, fence) {
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
    fn a_first_start_has_no_fence_and_a_lost_state_fences_at_the_highest_vote() {
        let fresh = MemberState { initialized: false, term: 0, voted_for: 0 };
        assert_eq!(fence_of(&[fresh, fresh]), None);
        let a = MemberState { initialized: true, term: 7, voted_for: 3 };
        let candidate = MemberState { initialized: true, term: 9, voted_for: 2 };
        let other = MemberState { initialized: true, term: 9, voted_for: 5 };
        assert_eq!(fence_of(&[a, candidate, other]), Some((9, 5)));
        assert_eq!(
            fence_of(&[fresh, MemberState { initialized: true, term: 0, voted_for: 0 }]),
            Some((1, 0))
        );
    }

    #[test]
    fn a_fenced_member_campaigns_once_its_term_reaches_the_fence() {
        // The stall this rule ends: a member fenced at term 1 that voted for
        // term 1's leader holds the longest log when that leader is cut
        // off. Its election asks for term 2, above every vote it can have
        // cast, so it must be free to run it.
        assert!(may_elect(1, 1));
        assert!(may_elect(5, 1));
        // Below the fence an election would ask for a term at or below it,
        // where this member may already have voted before its state was lost.
        assert!(!may_elect(0, 1));
        assert!(!may_elect(8, 9));
    }

    #[test]
    fn a_fence_refuses_old_leader_ids_and_every_vote_while_pending() {
        let f = Fence::from_record(FenceRecord { pending: true, term: 0, voted_for: 0 });
        assert_eq!(f.refuses_vote(100, 1), Some(Refusal::Pending));
        f.settle((9, 5));
        assert_eq!(f.refuses_vote(9, 5), Some(Refusal::Old(9, 5)));
        assert_eq!(f.refuses_vote(9, 4), Some(Refusal::Old(9, 5)));
        assert_eq!(f.refuses_vote(3, 7), Some(Refusal::Old(9, 5)));
        assert_eq!(f.refuses_vote(9, 6), None, "a higher candidate of the same term");
        assert_eq!(f.refuses_vote(10, 1), None);
        assert_eq!(f.refuses_leader(9, 5), None, "the fence's own leader is taken");
        assert_eq!(f.refuses_leader(9, 4), Some(Refusal::Old(9, 5)));
        assert_eq!(f.refuses_leader(8, 9), Some(Refusal::Old(9, 5)));
        let none = Fence::default();
        assert_eq!(none.refuses_vote(1, 1), None);
        assert_eq!(none.refuses_leader(1, 1), None);
    }
}
