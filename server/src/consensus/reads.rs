//! Coalesced leadership checks for linearizable STRONG reads
//! (docs/architecture.md section 8, decision 032).
//!
//! A linearizable read needs one confirmation of leadership (a lease
//! check, or a heartbeat round when the lease is stale) that began after
//! the read did, and then the state machine applied through the commit
//! index that confirmation saw. Every read asking openraft on its own
//! cost a message to the group's core task, its answer and a wake-up per
//! read: under 64 closed-loop readers, about a tenth of the leader's CPU.
//!
//! [`ReadGate`] shares one confirmation among the reads that wait for it.
//! At most one confirmation runs per group; reads that arrive while it
//! runs queue for the next one, which starts when it finishes and answers
//! all of them. A read therefore never takes an answer to a check that
//! began before it arrived, which is the rule that keeps it linearizable:
//! the answer it gets is one a read of its own, sent at the start of the
//! check, would have got.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::NodeId;

/// What a leadership check answers, shared by every read that waited for
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmed {
    /// This node led, and its state machine applied through the commit
    /// index the check saw: read it.
    Leader,
    /// Another node leads (when known): forward the read there.
    NotLeader(Option<NodeId>),
    /// No answer (no quorum, shutting down, timed out): retry or give up.
    Failed(String),
}

/// The reads waiting for the next check.
#[derive(Default)]
struct Waiting {
    /// A check is running (its task answers the next batch when done).
    running: bool,
    next: Vec<oneshot::Sender<Confirmed>>,
}

/// One per group: shares leadership checks among concurrent reads.
#[derive(Default)]
pub struct ReadGate {
    waiting: Mutex<Waiting>,
}

/// Reads answered by one check, at most; the rest wait for the next one
/// (bounds the memory a burst holds, not correctness).
pub const BATCH_MAX: usize = 4096;

impl ReadGate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for a check that starts after this call, running `check` in a
    /// task of its own when none is running. `check` must confirm
    /// leadership and wait for the state machine, as
    /// `Raft::ensure_linearizable` does; it is bounded by `timeout`.
    pub async fn confirm<F, Fut>(self: &Arc<Self>, timeout: Duration, check: F) -> Confirmed
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Confirmed> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut w = self.lock();
            w.next.push(tx);
            !std::mem::replace(&mut w.running, true)
        };
        if start {
            let gate = self.clone();
            tokio::spawn(async move { gate.run(timeout, check).await });
        }
        rx.await.unwrap_or_else(|_| Confirmed::Failed("the read check was dropped".into()))
    }

    /// Runs checks while reads wait for one; each check answers the reads
    /// that queued before it started.
    async fn run<F, Fut>(&self, timeout: Duration, check: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Confirmed>,
    {
        loop {
            let batch = {
                let mut w = self.lock();
                if w.next.is_empty() {
                    w.running = false;
                    return;
                }
                let take = w.next.len().min(BATCH_MAX);
                w.next.drain(..take).collect::<Vec<_>>()
            };
            // Reads whose callers gave up need no check.
            if batch.iter().all(|tx| tx.is_closed()) {
                continue;
            }
            let answer = match tokio::time::timeout(timeout, check()).await {
                Ok(a) => a,
                Err(_) => Confirmed::Failed(format!("no leadership check answered in {timeout:?}")),
            };
            for tx in batch {
                let _ = tx.send(answer.clone());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One leadership check through openraft: answered from the leader lease
/// when a quorum acknowledged a message recently enough (`option`), else
/// after a heartbeat round; then waits until the state machine applied
/// through the commit index it saw.
pub async fn confirm_leader(raft: &super::Raft, option: openraft::LinearizerOption) -> Confirmed {
    match raft.ensure_linearizable(option).await {
        Ok(_) => Confirmed::Leader,
        Err(e) => match e.forward_to_leader() {
            Some(f) => Confirmed::NotLeader(f.leader_id),
            None => Confirmed::Failed(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A check that records when it started (a counter) and answers after a
    /// pause, so reads pile up behind it.
    fn counted(
        started: Arc<AtomicU64>,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Confirmed> + Send>> {
        move || {
            let started = started.clone();
            Box::pin(async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Confirmed::Leader
            })
        }
    }

    #[tokio::test]
    async fn concurrent_reads_share_checks() {
        let gate = Arc::new(ReadGate::new());
        let started = Arc::new(AtomicU64::new(0));
        let reads: Vec<_> = (0..200)
            .map(|_| {
                let gate = gate.clone();
                let check = counted(started.clone());
                tokio::spawn(async move { gate.confirm(Duration::from_secs(5), check).await })
            })
            .collect();
        for r in reads {
            assert_eq!(r.await.unwrap(), Confirmed::Leader);
        }
        let checks = started.load(Ordering::SeqCst);
        assert!((1..=3).contains(&checks), "200 concurrent reads took {checks} checks");
    }

    /// The rule that keeps reads linearizable: a read that arrives while a
    /// check runs is answered by a later check, never by the running one.
    #[tokio::test]
    async fn a_read_is_never_answered_by_a_check_that_began_before_it() {
        let gate = Arc::new(ReadGate::new());
        let started = Arc::new(AtomicU64::new(0));
        let early = {
            let (gate, check) = (gate.clone(), counted(started.clone()));
            tokio::spawn(async move { gate.confirm(Duration::from_secs(5), check).await })
        };
        // Let the first check start, then read while it runs.
        for _ in 0..100 {
            if started.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(started.load(Ordering::SeqCst), 1, "the first check started");
        let late = gate.confirm(Duration::from_secs(5), counted(started.clone())).await;
        assert_eq!(late, Confirmed::Leader);
        assert_eq!(started.load(Ordering::SeqCst), 2, "the late read waited for a check of its own");
        assert_eq!(early.await.unwrap(), Confirmed::Leader);
    }

    #[tokio::test]
    async fn a_check_that_hangs_fails_its_reads_and_the_next_check_runs() {
        let gate = Arc::new(ReadGate::new());
        let hang = || async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Confirmed::Leader
        };
        let got = gate.confirm(Duration::from_millis(30), hang).await;
        assert!(matches!(got, Confirmed::Failed(_)), "{got:?}");
        let got = gate.confirm(Duration::from_millis(30), || async { Confirmed::NotLeader(Some(7)) }).await;
        assert_eq!(got, Confirmed::NotLeader(Some(7)));
    }
}
