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
//! Safety rests on monotonic clocks ([`lease_clock`], docs/architecture.md
//! section 18): a holder accepts LOCAL writes only until `lease -
//! max_offset` after it sent the renewal that committed, and the leader
//! grants a home elsewhere only `lease + max_offset` after it observed the
//! last renewal, naming that renewal so a later one voids the grant. Wall
//! clocks are compared between peers, never trusted: a node further off
//! than `max_offset` from a majority of its peers serves no lease.

pub mod lease_clock;

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
use lease_clock::{LeaseClock, OffsetSample};

/// How often the leader looks for lapsed or missing leases.
const FAILOVER_TICK: Duration = Duration::from_millis(100);
/// A planned handover gives up (and resumes the old holder) after this long.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(15);
/// How often each node measures its clock against every other region's.
const CLOCK_PROBE_EVERY: Duration = Duration::from_millis(500);
/// A clock probe gives up after this long (its round trip bounds its error).
const CLOCK_PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How often the clock offset test control reads its file.
const OFFSET_FILE_EVERY: Duration = Duration::from_millis(20);

/// Whether the test-only `proposer-clock-leases` bug is switched on: leases
/// judged by wall clocks again (see `crate::bugs`).
fn proposer_clock_leases() -> bool {
    #[cfg(feature = "bugs")]
    {
        crate::bugs::active(crate::bugs::Bug::ProposerClockLeases)
    }
    #[cfg(not(feature = "bugs"))]
    {
        false
    }
}

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
    /// Monotonic lease timing and the measured clock offsets.
    clock: Arc<LeaseClock>,
}

impl Leases {
    pub fn new(cfg: &Config, consensus: &Consensus, hlc: Arc<Hlc>) -> Self {
        Self {
            region: cfg.region.clone(),
            state: consensus.subscribe_control(),
            hlc,
            max_offset_ms: cfg.clock.max_offset_ms,
            clock: consensus.lease_clock.clone(),
        }
    }

    /// Whether `lease` lets its holder accept writes at wall-clock `now_ms`:
    /// the rule of the `proposer-clock-leases` put-back bug only.
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
        if proposer_clock_leases() {
            let now = self.hlc.wall_ms();
            if Self::valid_for_writes(lease, now, self.max_offset_ms) {
                return Ok(lease.epoch);
            }
            return Err(KvError::Fenced {
                home: home.into(),
                epoch: lease.epoch,
                current: lease.epoch,
                why: "this region's lease expired by its wall clock".into(),
                holder: None,
            });
        }
        if fencing_off() {
            return Ok(lease.epoch);
        }
        let offset = self.clock.offset_status();
        if offset.exceeded {
            metrics::counter!("geokv_fenced_total", "kind" => "clock_offset").increment(1);
            return Err(KvError::ClockOffsetExceeded {
                home: home.into(),
                offset_ms: offset.max_abs_offset_ms,
                max_ms: self.max_offset_ms,
            });
        }
        match self.clock.remaining_ms(home, lease.epoch) {
            Some(ms) if ms > 0 => Ok(lease.epoch),
            Some(ms) => {
                metrics::counter!("geokv_fenced_total", "kind" => "write").increment(1);
                Err(KvError::Fenced {
                    home: home.into(),
                    epoch: lease.epoch,
                    current: lease.epoch,
                    why: format!(
                        "this region's lease lapsed {} ms ago on this node's monotonic clock (less the {} ms clock offset)",
                        -ms, self.max_offset_ms
                    ),
                    holder: None,
                })
            }
            None => Err(KvError::HomeUnavailable {
                home: home.into(),
                why: format!("{}'s lease is not confirmed on this node yet (no renewal seen)", self.region),
            }),
        }
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
        let ended = match state.epoch_record(home, epoch) {
            Some(r) => r.ended_ms,
            // The record left the bounded history: the latest end of the
            // pruned epochs still bounds it. An epoch older than the
            // current one and known nowhere is fenced, never trusted.
            None => state.pruned.get(home).filter(|p| epoch <= p.through_epoch).map(|p| p.ended_ms_max),
        };
        match ended {
            Some(ended) if hlc_ms < ended.saturating_add(self.max_offset_ms) => {
                EntryFence::LateButValid { current }
            }
            _ => EntryFence::Fenced { current },
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
        if me.cfg.clock.offset_control {
            let path = me.cfg.data_dir.join(crate::causality::hlc::CLOCK_OFFSET_FILE);
            tracing::warn!(path = %path.display(), "clock.offset_control is on: the wall clock follows a test file");
            tokio::spawn(crate::causality::hlc::follow_clock_offset_file(
                path,
                OFFSET_FILE_EVERY,
                me.cancel.clone(),
            ));
        }
        tokio::spawn(me.clone().observe_loop());
        tokio::spawn(me.clone().clock_probe_loop());
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

    fn clock(&self) -> &LeaseClock {
        &self.consensus.lease_clock
    }

    /// Times every change of the control state on this node's monotonic clock.
    async fn observe_loop(self: Arc<Self>) {
        let mut rx = self.consensus.subscribe_control();
        loop {
            let state = rx.borrow_and_update().clone();
            self.clock().observe(&state);
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Measures this node's wall clock against one node of every other
    /// region (NTP-style, from a round trip), and says so when a majority
    /// of them is further off than the maximum.
    async fn clock_probe_loop(self: Arc<Self>) {
        let peers: Vec<_> = crate::consensus::region_voters(&self.cfg)
            .into_iter()
            .filter(|m| m.region != self.cfg.region)
            .collect();
        let mut tick = tokio::time::interval(CLOCK_PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut was_exceeded = false;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut probes = tokio::task::JoinSet::new();
            for m in &peers {
                let Some(mut client) = self.consensus.peers().client(m.id) else { continue };
                let node = self.node.clone();
                let region = m.region.clone();
                probes.spawn(async move {
                    let mut req = tonic::Request::new(geokv_proto::consensus::ControlStateRequest {});
                    req.set_timeout(CLOCK_PROBE_TIMEOUT);
                    let started = Instant::now();
                    let sent_ms = node.hlc().wall_ms();
                    let reply = client.control_state(req).await.ok()?.into_inner();
                    let received_ms = node.hlc().wall_ms();
                    let rtt = started.elapsed();
                    if reply.wall_ms == 0 {
                        return None;
                    }
                    let midpoint = (i128::from(sent_ms) + i128::from(received_ms)) / 2;
                    let offset_ms = i64::try_from(i128::from(reply.wall_ms) - midpoint).unwrap_or(i64::MAX);
                    let uncertainty_ms = (rtt.as_millis() / 2) as u64;
                    Some((region, OffsetSample { offset_ms, uncertainty_ms, at: started + rtt / 2 }))
                });
            }
            while let Some(done) = probes.join_next().await {
                if let Ok(Some((region, sample))) = done {
                    self.clock().record_offset(&region, sample);
                }
            }
            let status = self.clock().offset_status();
            if status.exceeded != was_exceeded {
                if status.exceeded {
                    tracing::error!(
                        offset_ms = status.max_abs_offset_ms,
                        max_ms = self.cfg.clock.max_offset_ms,
                        peers_beyond = status.peers_beyond,
                        peers_measured = status.peers_measured,
                        "clock offset to a majority of peers exceeds the maximum: serving no lease"
                    );
                } else {
                    tracing::warn!("clock offset back within the maximum: serving leases again");
                }
                was_exceeded = status.exceeded;
            }
            metrics::gauge!("geokv_clock_offset_max_ms").set(status.max_abs_offset_ms as f64);
            metrics::gauge!("geokv_clock_offset_exceeded").set(if status.exceeded { 1.0 } else { 0.0 });
        }
    }

    /// Whether the leader may grant `l`'s home elsewhere now.
    fn lapsed(&self, l: &HomeLease, now_ms: u64) -> bool {
        if proposer_clock_leases() {
            return now_ms > l.expires_ms.saturating_add(self.cfg.clock.max_offset_ms);
        }
        self.clock().lapsed(&l.home, l.epoch, l.renewals, l.lease_ms)
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

    /// The first healthy region of `home`'s failover order other than
    /// `lapsed_holder` (healthy yet not renewing, it may be a node whose
    /// clock is off, which serves no lease), if any.
    fn failover_target(&self, home: &str, lapsed_holder: &str) -> Option<String> {
        let (region, zone) = split_home_key(home);
        self.cfg
            .failover_order(region, zone)
            .into_iter()
            .find(|r| r != lapsed_holder && self.replicator.is_healthy(r))
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
            self.clock().observe(&state);
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
                let grant = |expected, holder: String, reason, renewals| ControlCommand::Grant {
                    home: home.clone(),
                    expected_epoch: expected,
                    holder,
                    now_ms: now,
                    lease_ms: c.lease_ms,
                    max_offset_ms: offset,
                    reason,
                    expected_renewals: renewals,
                };
                let (region, _) = split_home_key(home);
                match state.leases.get(home) {
                    None => proposals.push((
                        home.clone(),
                        None,
                        grant(0, region.to_string(), GrantReason::Initial, None),
                    )),
                    Some(l) if self.lapsed(l, now) => {
                        // Manual-only never moves a home, but a holder whose
                        // lease lapsed (a restart, a partition) takes it back
                        // under a new epoch once it is reachable again;
                        // otherwise the home would refuse every write until
                        // an operator acted (docs/architecture.md section 8).
                        let target = if state.manual_only {
                            self.replicator.is_healthy(&l.holder).then(|| l.holder.clone())
                        } else {
                            self.failover_target(home, &l.holder)
                        };
                        if let Some(target) = target {
                            proposals.push((
                                home.clone(),
                                Some(l.clone()),
                                grant(
                                    l.epoch,
                                    target,
                                    GrantReason::Failover,
                                    (!proposer_clock_leases()).then_some(l.renewals),
                                ),
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
        let mut changes = self.consensus.subscribe_control();
        // Homes this region held at the last round, to renew a new grant
        // at once (it is not served before its first renewal commits).
        let mut held_before: Vec<(String, u64)> = Vec::new();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let state = changes.borrow_and_update().clone();
                    let now_held: Vec<(String, u64)> = state.leases.values()
                        .filter(|l| l.holder == self.cfg.region && l.draining_to.is_none())
                        .map(|l| (l.home.clone(), l.epoch)).collect();
                    let granted = now_held.iter().any(|h| !held_before.contains(h));
                    held_before = now_held;
                    if !granted {
                        continue;
                    }
                }
            }
            handovers.retain(|_, h| !h.is_finished());
            let state = self.consensus.control_state();
            let mine: Vec<HomeLease> =
                state.leases.values().filter(|l| l.holder == self.cfg.region).cloned().collect();
            held_before =
                mine.iter().filter(|l| l.draining_to.is_none()).map(|l| (l.home.clone(), l.epoch)).collect();
            for l in mine.iter().filter(|l| l.draining_to.is_some()) {
                self.clock().release(&l.home);
            }
            // A node whose clock is too far from its peers' serves no lease:
            // it stops renewing, so the leases lapse and (with automatic
            // failover) another region takes its homes.
            let offset = self.clock().offset_status();
            let serving = !offset.exceeded || proposer_clock_leases();
            if !serving {
                tracing::warn!(
                    offset_ms = offset.max_abs_offset_ms,
                    "clock offset exceeded: not renewing leases"
                );
            }
            let mut renewals = tokio::task::JoinSet::new();
            for l in mine.iter().filter(|l| serving && l.draining_to.is_none()) {
                let lease_ms = self.cfg.consensus.lease_ms;
                let cmd = ControlCommand::Renew {
                    home: l.home.clone(),
                    holder: l.holder.clone(),
                    epoch: l.epoch,
                    // The HLC, not the wall clock: never behind a stamp
                    // this node issued, so the epoch's recorded end covers
                    // every write accepted under it.
                    now_ms: self.node.hlc().now().physical_ms(),
                    lease_ms,
                };
                let me = self.clone();
                renewals.spawn(async move {
                    let sent = Instant::now();
                    match me.propose(cmd).await {
                        Ok(ControlReply::Lease(l)) => me.clock().renewed(&l.home, l.epoch, sent, lease_ms),
                        Ok(ControlReply::Rejected { why }) => tracing::debug!(why, "lease renewal refused"),
                        _ => {}
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
            expected_renewals: None,
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
    ///
    /// A node of a region that is not the region's renewer asks the renewer
    /// first: with the state comes how long it may still serve each home,
    /// counted here from when this node asked (the renewer's remainder can
    /// only have shrunk since).
    async fn observer_loop(self: Arc<Self>) {
        let voters = crate::consensus::control_members(&self.cfg);
        let renewer = crate::consensus::region_voters(&self.cfg)
            .into_iter()
            .find(|m| m.region == self.cfg.region && m.id != self.consensus.me);
        let mut order: Vec<_> = renewer.iter().collect();
        order.extend(voters.iter().filter(|m| m.region == self.cfg.region));
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
                let asked = Instant::now();
                if let Ok(r) = client.control_state(req).await {
                    let r = r.into_inner();
                    if let Ok(state) = serde_json::from_slice::<ControlState>(&r.state) {
                        self.consensus.observe_control(state);
                        if renewer.as_ref().is_some_and(|x| x.id == m.id) {
                            for h in r.held {
                                self.clock().hold(
                                    &h.home,
                                    h.epoch,
                                    asked + Duration::from_millis(h.remaining_ms),
                                );
                            }
                        }
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causality::ManualClock;

    const LEASE_MS: u64 = 3000;
    const OFFSET_MS: u64 = 500;

    /// The write path's view for region `region`, over `state`, with a
    /// wall clock the test moves.
    fn leases(
        region: &str,
        state: ControlState,
        wall: &ManualClock,
    ) -> (Leases, watch::Sender<ControlState>) {
        let (tx, rx) = watch::channel(state);
        let leases = Leases {
            region: region.into(),
            state: rx,
            hlc: Arc::new(Hlc::new(Arc::new(wall.clone()), OFFSET_MS)),
            max_offset_ms: OFFSET_MS,
            clock: Arc::new(LeaseClock::new(OFFSET_MS, LEASE_MS)),
        };
        (leases, tx)
    }

    fn granted(holder: &str, now_ms: u64) -> ControlState {
        let mut s = ControlState::default();
        s.apply(&ControlCommand::Grant {
            home: "us".into(),
            expected_epoch: 0,
            holder: holder.into(),
            now_ms,
            lease_ms: LEASE_MS,
            max_offset_ms: OFFSET_MS,
            reason: GrantReason::Initial,
            expected_renewals: None,
        });
        s
    }

    /// The fault this module exists for: a holder whose wall clock runs
    /// far behind. By the wall-clock rule (`valid_for_writes`, what leases
    /// used before section 18) it would serve for another 20 s after its
    /// lease ended; timed on the monotonic clock it stops when it ends.
    #[test]
    fn a_holder_whose_clock_runs_behind_stops_when_its_monotonic_lease_ends() {
        let wall = ManualClock::new(100_000);
        let state = granted("us", 100_000);
        let (l, _tx) = leases("us", state.clone(), &wall);
        l.clock.observe(&state);
        assert!(
            matches!(l.check_local("us"), Err(KvError::HomeUnavailable { .. })),
            "not served before a renewal"
        );
        let sent = Instant::now();
        l.clock.renewed("us", 1, sent, LEASE_MS);
        assert_eq!(l.check_local("us").unwrap(), 1);
        // The renewal was sent long ago by the monotonic clock: lapsed.
        let long_ago = Instant::now().checked_sub(Duration::from_secs(60)).expect("uptime over a minute");
        let (l, _tx) = leases("us", state.clone(), &wall);
        l.clock.observe(&state);
        l.clock.renewed("us", 1, long_ago, LEASE_MS);
        // The wall clock jumped back 20 s: by wall time the lease looks valid.
        wall.set(80_000);
        let lease = &state.leases["us"];
        assert!(Leases::valid_for_writes(lease, l.hlc.wall_ms(), OFFSET_MS), "the old rule serves on");
        match l.check_local("us") {
            Err(KvError::Fenced { epoch: 1, why, .. }) => assert!(why.contains("monotonic"), "{why}"),
            other => panic!("a lapsed lease served: {other:?}"),
        }
    }

    #[test]
    fn a_node_beyond_the_max_offset_serves_no_lease() {
        let wall = ManualClock::new(100_000);
        let state = granted("us", 100_000);
        let (l, _tx) = leases("us", state.clone(), &wall);
        l.clock.observe(&state);
        l.clock.renewed("us", 1, Instant::now(), LEASE_MS);
        let at = Instant::now();
        for peer in ["eu", "ap"] {
            l.clock.record_offset(peer, OffsetSample { offset_ms: 5_000, uncertainty_ms: 20, at });
        }
        match l.check_local("us") {
            Err(e @ KvError::ClockOffsetExceeded { offset_ms: 4_980, max_ms: OFFSET_MS, .. }) => {
                assert_eq!(e.reason(), "CLOCK_OFFSET_EXCEEDED")
            }
            other => panic!("served with its clock 5 s off: {other:?}"),
        }
    }

    /// After a restore (docs/decisions/029-zone-strict-backups.md) the
    /// backup's epochs fence as they did before it: a write stamped after
    /// its epoch ended is refused, one stamped before is merged, and the
    /// epoch current at the backup ends at the backup's cut.
    #[test]
    fn a_restored_cluster_fences_the_backups_epochs_as_before() {
        use crate::consensus::control::{PrunedEpochs, RestoredHome};
        let wall = ManualClock::new(0);
        // The fresh cluster's own first grant, at epoch 1.
        let mut s = granted("us", 100_000);
        s.apply(&ControlCommand::RestoreEpochs {
            homes: vec![RestoredHome {
                home: "us".into(),
                floor: 3,
                // Epoch 2 ended at 50,000; epoch 3 was current at the cut, 80,000.
                ended: vec![(1, "us".into(), 20_000), (2, "eu".into(), 50_000), (3, "us".into(), 80_000)],
                pruned: PrunedEpochs::default(),
            }],
            now_ms: 120_000,
        });
        assert_eq!(s.leases["us"].epoch, 4);
        let (l, _tx) = leases("eu", s, &wall);
        // A write fenced before the backup (epoch 2, stamped after it ended).
        assert_eq!(l.fence_entry("us", 2, 70_000), EntryFence::Fenced { current: 4 });
        assert_eq!(l.fence_entry("us", 2, 49_000), EntryFence::LateButValid { current: 4 });
        // The backup's current epoch: valid up to the cut, fenced after.
        assert_eq!(l.fence_entry("us", 3, 79_000), EntryFence::LateButValid { current: 4 });
        assert_eq!(l.fence_entry("us", 3, 90_000), EntryFence::Fenced { current: 4 });
        assert_eq!(l.fence_entry("us", 4, 130_000), EntryFence::Current);
    }

    #[test]
    fn an_epoch_pruned_from_the_history_is_still_fenced() {
        let wall = ManualClock::new(0);
        let mut s = granted("us", 0);
        for e in 1..=(crate::consensus::control::EPOCH_HISTORY_MAX as u64 + 5) {
            s.apply(&ControlCommand::Grant {
                home: "us".into(),
                expected_epoch: e,
                holder: if e % 2 == 0 { "us".into() } else { "eu".into() },
                now_ms: e * 10_000,
                lease_ms: LEASE_MS,
                max_offset_ms: OFFSET_MS,
                reason: GrantReason::Failover,
                expected_renewals: Some(0),
            });
        }
        assert!(s.epoch_record("us", 2).is_none(), "epoch 2 left the history");
        let (l, _tx) = leases("eu", s, &wall);
        // Epoch 2 was granted at 10,000 and ended with its lease at 13,000;
        // the pruned epochs end at 53,000 at the latest.
        assert_eq!(l.fence_entry("us", 2, 12_000), EntryFence::LateButValid { current: 70 });
        assert_eq!(l.fence_entry("us", 2, 900_000), EntryFence::Fenced { current: 70 });
        // A kept epoch uses its own record (epoch 60 ended at 593,000).
        assert_eq!(l.fence_entry("us", 60, 593_400), EntryFence::LateButValid { current: 70 });
        assert_eq!(l.fence_entry("us", 60, 593_600), EntryFence::Fenced { current: 70 });
    }
}
