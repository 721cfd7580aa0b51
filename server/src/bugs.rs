//! Put-back bugs, compiled only with the test-only `bugs` feature, so the
//! chaos harness (`jepsen/`) can show that each of its checkers catches the
//! bug it exists for. A normal build has none of this.
//!
//! `GEOKV_BUG=<name>` in the node's environment switches one on:
//! - `residency-filter-off`: replication ships rows outside their zone and
//!   the receiver accepts them (`replication::frame::zone_allows` says yes).
//! - `missing-sync`: the committer writes a group without syncing the
//!   write-ahead log and acknowledges it at once ([`wal_sync`]), so the
//!   acknowledged writes sit in the page cache: a `kill -9` keeps them, a
//!   power cut (the harness's fault filesystem, nemesis `lose-unsynced`)
//!   loses them.
//! - `fencing-off`: a region that held a home keeps accepting LOCAL writes
//!   for it under its old epoch after another region took it over (or its
//!   lease ran out), and receivers take entries of superseded epochs as
//!   current (`failover::Leases`).
//! - `merge-off`: a replicated row replaces the stored one instead of
//!   merging into it (`kv::commit::merge_row`), so concurrent writes and
//!   other regions' counter increments are lost.
//! - `peer-claims-off`: the peer port believes what a message claims (a
//!   frame's source, a Raft sender, a forwarded request's last hop) instead
//!   of checking it against the caller's certificate (`security::authn`).
//! - `grants-off`: every authenticated principal may do everything.
//! - `idempotency-local`: idempotency records stay on the node that
//!   committed the request (none travels with its log entry), so a retry
//!   that lands in another region after a failover applies again.
//! - `proposer-clock-leases`: leases are judged by wall clocks again: the
//!   holder serves until the lease's wall-clock expiry by its own clock,
//!   and the control-plane leader grants a lapsed home elsewhere by its
//!   clock (`failover`, `consensus::control`), so a holder whose clock runs
//!   behind keeps serving after another region took its home.
//! - `identity-off`: replication positions are keyed by node name and
//!   sequence number only, as before store identities: a wiped node's new
//!   writes are dropped as duplicates, its writes reuse the old dots, and
//!   a wiped destination is not re-seeded (`storage::identity`).
//! - `staleness-home-only`: a read's staleness bound is measured from the
//!   configured home's stream alone, as before truthful reads, ignoring the
//!   region a failover moved the home's lease to and regions that accept
//!   EVENTUAL writes (`kv::Node::stalest_writer`).
//! - `pre-vote-off`: Raft groups run without pre-vote, as on openraft 0.9:
//!   a voter cut off from its group raises its term at each election
//!   timeout, and when the cut heals that term unseats the leader, so the
//!   group stalls for an election (`consensus::raft_config`).
//! - `leader-restore`: a Raft member that led its group before a restart
//!   takes the leadership back at startup in the same term, without an
//!   election (openraft's default). After a power cut it may have lost the
//!   tail of its log that followers committed (the leader sends entries
//!   before its own sync), so it serves reads from a stale state machine
//!   and proposes new entries under log ids the followers already hold
//!   (`consensus::raft_config`).
//! - `snapshot-late-copy`: a Raft snapshot reads the state machine when
//!   it is built, on its own task, instead of copying it between applies,
//!   so it can hold a later state than the position it records
//!   (`consensus::store::SnapshotBuilder`).
//! - `log-tail-stale`: truncating a Raft log leaves the removed entries in
//!   the group's decoded tail (`consensus::store::LogTail`), so a member
//!   whose conflicting suffix was cut still reads, replicates and applies
//!   the entries of a deposed leader.
//! - `erasure-unfenced`: rows that arrive after a subject's erasure (late
//!   replicated entries, repairs) are merged without its fence, so values
//!   a region wrote before the erasure and shipped late come back
//!   (`kv::commit`, `lifecycle`).
//! - `feed-local-only`: the change feed records only the node's own
//!   writes, not the entries it applies from other regions, so a watcher
//!   misses every change made elsewhere (`kv::commit`, `kv::feed`).
//! - `ttl-ignored`: values never expire: reads show them after their TTL
//!   and compaction keeps them (`kv::expiry`).
//!
//! The deterministic simulation (`tests/simulation`) runs many clusters in
//! one process, each on its own thread, so it switches a bug on for one
//! thread only with [`with_bug`]; that override wins over `GEOKV_BUG`.

use std::cell::Cell;
use std::sync::OnceLock;

/// The bugs that can be put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    ResidencyFilterOff,
    MissingSync,
    MergeOff,
    FencingOff,
    PeerClaimsOff,
    GrantsOff,
    IdempotencyLocal,
    ProposerClockLeases,
    IdentityOff,
    StalenessHomeOnly,
    PreVoteOff,
    LeaderRestore,
    SnapshotLateCopy,
    LogTailStale,
    TtlIgnored,
    ErasureUnfenced,
    FeedLocalOnly,
}

impl Bug {
    /// The bug's name in `GEOKV_BUG`.
    pub fn name(self) -> &'static str {
        match self {
            Bug::ResidencyFilterOff => "residency-filter-off",
            Bug::MissingSync => "missing-sync",
            Bug::MergeOff => "merge-off",
            Bug::FencingOff => "fencing-off",
            Bug::PeerClaimsOff => "peer-claims-off",
            Bug::GrantsOff => "grants-off",
            Bug::IdempotencyLocal => "idempotency-local",
            Bug::ProposerClockLeases => "proposer-clock-leases",
            Bug::IdentityOff => "identity-off",
            Bug::StalenessHomeOnly => "staleness-home-only",
            Bug::PreVoteOff => "pre-vote-off",
            Bug::LeaderRestore => "leader-restore",
            Bug::SnapshotLateCopy => "snapshot-late-copy",
            Bug::LogTailStale => "log-tail-stale",
            Bug::TtlIgnored => "ttl-ignored",
            Bug::ErasureUnfenced => "erasure-unfenced",
            Bug::FeedLocalOnly => "feed-local-only",
        }
    }

    /// The bug named `name`, if any.
    pub fn from_name(name: &str) -> Option<Bug> {
        [
            Bug::ResidencyFilterOff,
            Bug::MissingSync,
            Bug::MergeOff,
            Bug::FencingOff,
            Bug::PeerClaimsOff,
            Bug::GrantsOff,
            Bug::IdempotencyLocal,
            Bug::ProposerClockLeases,
            Bug::IdentityOff,
            Bug::StalenessHomeOnly,
            Bug::PreVoteOff,
            Bug::LeaderRestore,
            Bug::SnapshotLateCopy,
            Bug::LogTailStale,
            Bug::TtlIgnored,
            Bug::ErasureUnfenced,
            Bug::FeedLocalOnly,
        ]
        .into_iter()
        .find(|b| b.name() == name)
    }
}

thread_local! {
    /// A bug switched on for this thread only (simulation), over `GEOKV_BUG`.
    static THREAD_BUG: Cell<Option<Bug>> = const { Cell::new(None) };
}

/// Runs `f` with `bug` switched on for the calling thread only.
pub fn with_bug<R>(bug: Bug, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Bug>);
    impl Drop for Reset {
        fn drop(&mut self) {
            THREAD_BUG.with(|b| b.set(self.0));
        }
    }
    let _reset = Reset(THREAD_BUG.with(|b| b.replace(Some(bug))));
    f()
}

/// The bug switched on by `GEOKV_BUG`, read once.
fn switched_on() -> Option<Bug> {
    static ON: OnceLock<Option<Bug>> = OnceLock::new();
    *ON.get_or_init(|| {
        let name = std::env::var("GEOKV_BUG").ok()?;
        if name.is_empty() {
            return None;
        }
        let Some(bug) = Bug::from_name(&name) else {
            tracing::error!(bug = %name, "unknown GEOKV_BUG; no bug switched on");
            return None;
        };
        tracing::warn!(?bug, "put-back bug switched on: this node is deliberately broken");
        Some(bug)
    })
}

pub fn active(bug: Bug) -> bool {
    if let Some(b) = THREAD_BUG.with(Cell::get) {
        return b == bug;
    }
    switched_on() == Some(bug)
}

/// Whether the committer syncs the write-ahead log of a group it was
/// configured (`storage.sync`) to sync: not with `missing-sync`.
pub fn wal_sync(configured: bool) -> bool {
    configured && !active(Bug::MissingSync)
}
