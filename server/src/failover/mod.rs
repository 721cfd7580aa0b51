//! Home leases and failover (docs/architecture.md section 8): the drivers around the
//! control plane's state machine ([`crate::consensus::control`]).
//!
//! # Layout
//! - [`Leases`]: the write path's view of the leases ([`LeaseGuard`]): which
//!   region serves a home, under which epoch, and whether a replicated
//!   entry's epoch was still valid when it was stamped.
//! - [`Failover`]: background workers of a node:
//!   - *bootstrap and failover* (on the control-plane leader): grants each
//!     home to its own region at first, moves a home whose lease lapsed to
//!     the first healthy region of its failover order inside its zone
//!     (epoch + 1), and starts failback once the home region has been
//!     healthy for `failback_after_ms`;
//!   - *renewal and handover* (on each region's first node): renews the leases
//!     the region holds, and for a home that is draining, waits until the
//!     tail of the log reached the new holder, then transfers it;
//!   - *observer* (nodes that are not control-plane voters): copies the
//!     control state from a voter.
//!
//! Safety rests on two clocks rules: a holder accepts LOCAL writes only
//! until `expires - max_offset` by its clock, and a failover grant is only
//! valid after `expires + max_offset` by the proposer's clock. With clocks
//! at most `max_offset` apart, the two never overlap.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

// The runtime's clock (the OS clock in production), so failback delays
// follow a simulation's time.
use tokio::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::causality::Hlc;
use crate::config::Config;
use crate::consensus::control::{
    home_key, split_home_key, ControlCommand, ControlReply, ControlState, GrantReason, HomeLease,
};
use crate::consensus::{lease_homes, Command, Consensus, Reply, CONTROL_GROUP};
use crate::error::KvError;
use crate::kv::{EntryFence, LeaseGuard, Node};
use crate::replication::Replicator;

/// How often the leader looks for lapsed or missing leases.
const FAILOVER_TICK: Duration = Duration::from_millis(100);
/// A planned handover gives up (and resumes the old holder) after this long.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether the test-only `fencing-off` bug is switched on (never in a
/// normal build; see `crate::bugs`).
fn fencing_off() -> bool {
    #[cfg(feature = "bugs")]
    {
        crate::bugs::active(crate::bugs::Bug::FencingOff)
    }
    #[cfg(not(feature = "bugs"))]
    {
        false
    }
}

/// The write path's view of the home leases.
pub struct Leases {
    region: String,
    state: watch::Receiver<ControlState>,
    hlc: Arc<Hlc>,
    max_offset_ms: u64,
}

impl Leases {
    pub fn new(cfg: &Config, consensus: &Consensus, hlc: Arc<Hlc>) -> Self {
        Self {
            region: cfg.region.clone(),
            state: consensus.subscribe_control(),
            hlc,
            max_offset_ms: cfg.clock.max_offset_ms,
        }
    }

    /// Whether `lease` lets its holder accept writes at `now_ms`.
    pub fn valid_for_writes(lease: &HomeLease, now_ms: u64, max_offset_ms: u64) -> bool {
        lease.draining_to.is_none() && now_ms.saturating_add(max_offset_ms) < lease.expires_ms
    }
}

impl LeaseGuard for Leases {
    fn check_local(&self, home: &str) -> Result<u64, KvError> {
        let state = self.state.borrow();
        let Some(lease) = state.leases.get(home) else {
            return Err(KvError::HomeUnavailable { home: home.into(), why: "no region holds it yet".into() });
        };
        if lease.holder != self.region {
            // A region that held the home under an older epoch is fenced,
            // not merely elsewhere: it must never accept a write for it.
            if let Some(old) = state
                .history
                .get(home)
                .and_then(|h| h.iter().rev().find(|r| r.holder == self.region && r.epoch < lease.epoch))
            {
                if fencing_off() {
                    return Ok(old.epoch);
                }
                metrics::counter!("geokv_fenced_total", "kind" => "write").increment(1);
                return Err(KvError::Fenced {
                    home: home.into(),
                    epoch: old.epoch,
                    current: lease.epoch,
                    why: format!("superseded: {} serves it under epoch {}", lease.holder, lease.epoch),
                    holder: Some(lease.holder.clone()),
                });
            }
            return Err(KvError::NotHome { home: lease.holder.clone(), here: self.region.clone() });
        }
        if lease.draining_to.is_some() {
            return Err(KvError::HomeUnavailable {
                home: home.into(),
                why: format!("handing over to {}", lease.draining_to.as_deref().unwrap_or("?")),
            });
        }
        let now = self.hlc.wall_ms();
        if Self::valid_for_writes(lease, now, self.max_offset_ms) || fencing_off() {
            return Ok(lease.epoch);
        }
        metrics::counter!("geokv_fenced_total", "kind" => "write").increment(1);
        Err(KvError::Fenced {
            home: home.into(),
            epoch: lease.epoch,
            current: lease.epoch,
            why: format!(
                "this region's lease expired {} ms ago (less the {} ms clock offset)",
                (now + self.max_offset_ms).saturating_sub(lease.expires_ms),
                self.max_offset_ms
            ),
            holder: None,
        })
    }

    fn current_epoch(&self, home: &str) -> u64 {
        self.state.borrow().leases.get(home).map_or(0, |l| l.epoch)
    }

    fn fence_entry(&self, home: &str, epoch: u64, hlc_ms: u64) -> EntryFence {
        let state = self.state.borrow();
        let current = state.leases.get(home).map_or(0, |l| l.epoch);
        if epoch >= current || fencing_off() {
            return EntryFence::Current;
        }
        match state.epoch_record(home, epoch).and_then(|r| r.ended_ms) {
            Some(ended) if hlc_ms < ended.saturating_add(self.max_offset_ms) => {
                EntryFence::LateButValid { current }
            }
            Some(_) => EntryFence::Fenced { current },
            // The record aged out of the bounded history: the write is far
            // older than any epoch kept, so it predates every later epoch's
            // start and is treated as valid when it was made.
            None => EntryFence::LateButValid { current },
        }
    }
}

/// The node's failover workers.
pub struct Failover {
    cfg: Arc<Config>,
    consensus: Arc<Consensus>,
    node: Arc<Node>,
    replicator: Arc<Replicator>,
    cancel: CancellationToken,
}

impl Failover {
    /// Starts the workers that fit this node's role.
    pub fn start(
        cfg: Arc<Config>,
        consensus: Arc<Consensus>,
        node: Arc<Node>,
        replicator: Arc<Replicator>,
    ) -> Arc<Self> {
        let me = Arc::new(Self { cfg, consensus, node, replicator, cancel: CancellationToken::new() });
        let region_voter = crate::consensus::region_voters(&me.cfg)
            .iter()
            .any(|m| m.region == me.cfg.region && m.id == me.consensus.me);
        if me.consensus.is_control_voter() {
            tokio::spawn(me.clone().leader_loop());
        } else {
            tokio::spawn(me.clone().observer_loop());
        }
        if region_voter {
            tokio::spawn(me.clone().holder_loop());
        }
        me
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }

    fn now_ms(&self) -> u64 {
        self.node.hlc().wall_ms()
    }

    async fn propose(&self, cmd: ControlCommand) -> Result<ControlReply, KvError> {
        match self.consensus.propose(CONTROL_GROUP, Command::Control(cmd), 0).await? {
            (Reply::Control(r), _) => Ok(r),
            (other, _) => Err(KvError::QuorumUnavailable {
                group: CONTROL_GROUP.into(),
                why: format!("unexpected reply {other:?}"),
            }),
        }
    }

    /// The first healthy region of `home`'s failover order, if any.
    fn failover_target(&self, home: &str) -> Option<String> {
        let (region, zone) = split_home_key(home);
        self.cfg.failover_order(region, zone).into_iter().find(|r| self.replicator.is_healthy(r))
    }

    /// Leader duties: bootstrap, failover, failback.
    async fn leader_loop(self: Arc<Self>) {
        let homes: Vec<String> = lease_homes(&self.cfg).into_iter().map(|(r, z)| home_key(&r, &z)).collect();
        let mut tick = tokio::time::interval(FAILOVER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // When each region was first seen healthy in its current streak.
        let mut healthy_since: BTreeMap<String, Instant> = BTreeMap::new();
        let mut bootstrapped_setting = false;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            for r in self.cfg.region_names() {
                if self.replicator.is_healthy(&r) {
                    healthy_since.entry(r).or_insert_with(Instant::now);
                } else {
                    healthy_since.remove(&r);
                }
            }
            if !self.consensus.is_leader(CONTROL_GROUP) {
                continue;
            }
            let state = self.consensus.control_state();
            if !bootstrapped_setting && state.leases.is_empty() && self.cfg.consensus.manual_only {
                let _ = self.propose(ControlCommand::SetManualOnly { manual_only: true }).await;
            }
            bootstrapped_setting = true;
            // Decide every home first, then propose concurrently: one slow
            // commit must not delay the failover of another home.
            let now = self.now_ms();
            let c = &self.cfg.consensus;
            let offset = self.cfg.clock.max_offset_ms;
            let mut proposals: Vec<(String, Option<HomeLease>, ControlCommand)> = Vec::new();
            for home in &homes {
                let grant = |expected, holder: String, reason| ControlCommand::Grant {
                    home: home.clone(),
                    expected_epoch: expected,
                    holder,
                    now_ms: now,
                    lease_ms: c.lease_ms,
                    max_offset_ms: offset,
                    reason,
                };
                let (region, _) = split_home_key(home);
                match state.leases.get(home) {
                    None => proposals.push((
                        home.clone(),
                        None,
                        grant(0, region.to_string(), GrantReason::Initial),
                    )),
                    Some(l) if now > l.expires_ms.saturating_add(offset) => {
                        // Manual-only never moves a home, but a holder whose
                        // lease lapsed (a restart, a partition) takes it back
                        // under a new epoch once it is reachable again;
                        // otherwise the home would refuse every write until
                        // an operator acted (docs/architecture.md section 8).
                        let target = if state.manual_only {
                            self.replicator.is_healthy(&l.holder).then(|| l.holder.clone())
                        } else {
                            self.failover_target(home)
                        };
                        if let Some(target) = target {
                            proposals.push((
                                home.clone(),
                                Some(l.clone()),
                                grant(l.epoch, target, GrantReason::Failover),
                            ));
                        }
                    }
                    Some(l) => {
                        let failback_after = Duration::from_millis(c.failback_after_ms);
                        let ready = healthy_since.get(region).is_some_and(|t| t.elapsed() >= failback_after);
                        if l.holder != region
                            && l.draining_to.is_none()
                            && l.reason == GrantReason::Failover
                            && c.failback_after_ms > 0
                            && !state.manual_only
                            && ready
                        {
                            tracing::info!(home = %home, from = %l.holder, "failback: home region healthy again");
                            let cmd = ControlCommand::Drain {
                                home: home.clone(),
                                epoch: l.epoch,
                                to: Some(region.to_string()),
                            };
                            proposals.push((home.clone(), Some(l.clone()), cmd));
                        }
                    }
                }
            }
            let mut set = tokio::task::JoinSet::new();
            for (home, old, cmd) in proposals {
                let me = self.clone();
                set.spawn(async move {
                    let started = Instant::now();
                    let is_failover =
                        matches!(cmd, ControlCommand::Grant { reason: GrantReason::Failover, .. });
                    match me.propose(cmd).await {
                        Ok(ControlReply::Lease(new)) if is_failover => {
                            let old = old.as_ref();
                            metrics::counter!("geokv_failovers_total", "home" => home.clone()).increment(1);
                            metrics::histogram!("geokv_failover_commit_seconds")
                                .record(started.elapsed().as_secs_f64());
                            if let Some(o) = old {
                                metrics::histogram!("geokv_failover_unavailable_seconds")
                                    .record(now.saturating_sub(o.expires_ms) as f64 / 1000.0);
                            }
                            tracing::warn!(home = %home, from = old.map(|o| o.holder.as_str()).unwrap_or("-"),
                                to = %new.holder, epoch = new.epoch, "failover: lease lapsed, home moved");
                        }
                        Ok(ControlReply::Rejected { why }) => {
                            tracing::debug!(home = %home, why, "proposal refused")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(home = %home, error = %e, "proposal failed"),
                    }
                });
            }
            while set.join_next().await.is_some() {}
        }
    }

    /// Holder duties on a region's voter: renew leases, run handovers.
    async fn holder_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.consensus.renew_every_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut handovers: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            handovers.retain(|_, h| !h.is_finished());
            let state = self.consensus.control_state();
            let mine: Vec<HomeLease> =
                state.leases.values().filter(|l| l.holder == self.cfg.region).cloned().collect();
            let mut renewals = tokio::task::JoinSet::new();
            for l in mine.iter().filter(|l| l.draining_to.is_none()) {
                let cmd = ControlCommand::Renew {
                    home: l.home.clone(),
                    holder: l.holder.clone(),
                    epoch: l.epoch,
                    now_ms: self.now_ms(),
                    lease_ms: self.cfg.consensus.lease_ms,
                };
                let me = self.clone();
                renewals.spawn(async move {
                    if let Ok(ControlReply::Rejected { why }) = me.propose(cmd).await {
                        tracing::debug!(why, "lease renewal refused");
                    }
                });
            }
            while renewals.join_next().await.is_some() {}
            for l in mine.into_iter().filter(|l| l.draining_to.is_some()) {
                if handovers.contains_key(&l.home) {
                    continue;
                }
                let me = self.clone();
                let home = l.home.clone();
                handovers.insert(home, tokio::spawn(async move { me.hand_over(l).await }));
            }
        }
    }

    /// Drains a home this region holds: waits for writes in flight, ships
    /// the tail of the log to the new holder, then transfers the lease.
    async fn hand_over(&self, lease: HomeLease) {
        let Some(to) = lease.draining_to.clone() else { return };
        let started = Instant::now();
        // Every write admitted before the drain became visible is committed
        // once this barrier passes (the committer re-checks leases).
        if self.node.barrier().await.is_err() {
            return;
        }
        let tail = self.node.log_seq();
        let mut shipped = false;
        for _ in 0..(HANDOVER_TIMEOUT.as_millis() / 20) {
            if self.replicator.acked_through(&to).is_some_and(|a| a >= tail) || !self.replicator.ships_to(&to)
            {
                shipped = true;
                break;
            }
            if started.elapsed() > HANDOVER_TIMEOUT || self.cancel.is_cancelled() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !shipped {
            tracing::warn!(home = %lease.home, to = %to, "handover timed out shipping the tail; resuming");
            let _ = self
                .propose(ControlCommand::Drain { home: lease.home.clone(), epoch: lease.epoch, to: None })
                .await;
            return;
        }
        let cmd = ControlCommand::Grant {
            home: lease.home.clone(),
            expected_epoch: lease.epoch,
            holder: to.clone(),
            now_ms: self.now_ms(),
            lease_ms: self.cfg.consensus.lease_ms,
            max_offset_ms: self.cfg.clock.max_offset_ms,
            reason: GrantReason::Planned,
        };
        match self.propose(cmd).await {
            Ok(ControlReply::Lease(l)) => {
                metrics::counter!("geokv_handovers_total", "home" => lease.home.clone()).increment(1);
                metrics::histogram!("geokv_handover_seconds").record(started.elapsed().as_secs_f64());
                tracing::info!(home = %lease.home, to = %l.holder, epoch = l.epoch, tail, "handover complete");
            }
            other => tracing::warn!(home = %lease.home, result = ?other, "handover grant failed"),
        }
    }

    /// Copies the control state from a voter (nodes outside the control plane).
    async fn observer_loop(self: Arc<Self>) {
        let voters = crate::consensus::control_members(&self.cfg);
        let mut order: Vec<_> = voters.iter().filter(|m| m.region == self.cfg.region).collect();
        order.extend(voters.iter().filter(|m| m.region != self.cfg.region));
        let mut tick =
            tokio::time::interval(Duration::from_millis(self.cfg.consensus.renew_every_ms.min(250)));
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            for m in &order {
                let Some(mut client) = self.consensus.peers().client(m.id) else { continue };
                let mut req = tonic::Request::new(geokv_proto::consensus::ControlStateRequest {});
                req.set_timeout(Duration::from_millis(500));
                if let Ok(r) = client.control_state(req).await {
                    if let Ok(state) = serde_json::from_slice::<ControlState>(&r.into_inner().state) {
                        self.consensus.observe_control(state);
                        break;
                    }
                }
            }
        }
    }
}
