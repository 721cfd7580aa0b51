//! Consensus: the control plane and the STRONG groups, on openraft.
//!
//! # Layout
//! - [`store`]: a group's Raft log and state machine on the node's engine
//!   (column family `raft`), shared by every group.
//! - [`network`]: Raft messages over gRPC, addressed by the local config.
//! - [`service`]: the `geokv.consensus.v1.Consensus` gRPC service.
//! - [`fence`]: a member whose store was made empty votes in no old term.
//! - [`control`]: the control plane's state machine: home leases, epochs,
//!   failover state (pure, unit-tested).
//! - [`strong`]: the STRONG groups' state machine: linearizable registers.
//! - [`quorum`]: QUORUM writes and reads over the replica regions (merges,
//!   not consensus; it shares this module's transport).
//! - this file: [`Consensus`], which starts the groups this node belongs to
//!   and proposes commands, forwarding them to a group's leader.
//!
//! openraft 0.10 (docs/decisions/026-openraft-0-10.md): appends to each
//! follower are pipelined over one ordered gRPC stream, elections start
//! with a pre-vote, and a STRONG group's leadership is handed to its
//! preferred region's voter by an explicit leader transfer
//! ([`keep_preferred_leader`]).
//!
//! Membership is static and derived from the config: the control plane has
//! one voter in each of the first `consensus.voters_max` regions (the
//! region's first node); the STRONG group of a home has one voter in the
//! home region and the next regions of its failover order inside the zone,
//! so residency holds in consensus membership too. Nodes that are not
//! voters of a group forward to one that is.

pub mod control;
pub mod fence;
pub mod json_bytes;
pub mod network;
pub mod quorum;
pub mod reads;
pub mod service;
pub mod store;
pub mod strong;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

// The runtime's clock (the OS clock in production), so proposal
// deadlines follow a simulation's time.
use tokio::time::Instant;

use geokv_proto::consensus as pb;
use openraft::async_runtime::WatchReceiver as _;
use openraft::BasicNode;
use openraft::Instant as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::{Config, Level, LocalityMode};
use crate::error::KvError;
use crate::storage::Engine;
use control::{ControlCommand, ControlReply, ControlState};
use network::{NetworkFactory, Peers};
use store::{LogStore, Machine, MachineView, StateMachine};
use strong::{StrongCommand, StrongMachine, StrongReply, StrongValue};

/// Raft node id: derived from the node's actor id (`region/node`).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft's types for every geokv group (advanced leader ids: a
    /// term may see several candidates, ordered by node id; decision 020).
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig, StateMachine>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot: its metadata and the state machine's pairs (a view of this
/// member's store, or data received from a leader: decision 035).
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, store::SnapshotData>;

/// A copy of a group's current openraft metrics.
pub fn metrics_of(raft: &Raft) -> openraft::RaftMetrics<TypeConfig> {
    raft.metrics().borrow_watched().clone()
}

/// A command of any group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Control(ControlCommand),
    /// A STRONG write; `request_id` (the client's idempotency key) makes a
    /// retried command return the first outcome instead of applying twice.
    Strong {
        request_id: Option<String>,
        op: StrongCommand,
        /// The proposer's wall clock when it proposed, in milliseconds:
        /// what the group's idempotency records are aged by. It is in the
        /// log, so every replica ages them alike; 0 in entries of older
        /// builds (their records are the oldest).
        #[serde(default)]
        at_ms: u64,
    },
}

/// A short description for openraft's logs (values are left out).
impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Control(c) => write!(f, "control {c:?}"),
            Command::Strong { request_id, op, .. } => {
                let (what, table, key) = match op {
                    StrongCommand::Put { table, key, .. } => ("put", table, key),
                    StrongCommand::Delete { table, key } => ("delete", table, key),
                    StrongCommand::Cas { table, key, .. } => ("cas", table, key),
                };
                write!(f, "strong {what} {table}/{}", String::from_utf8_lossy(key))?;
                match request_id {
                    Some(id) => write!(f, " request {id}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The reply to a committed command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    #[default]
    None,
    Control(ControlReply),
    Strong(StrongReply),
    Rejected {
        why: String,
    },
}

/// Name of the control plane's group.
pub const CONTROL_GROUP: &str = "control";
/// State-machine key of the control state.
const CONTROL_KEY: &[u8] = b"state";
/// A proposal gives up after this long.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Forwarding hops allowed for one proposal.
const HOPS_MAX: u32 = 3;

/// The STRONG group of a home (see [`control::home_key`]).
pub fn strong_group(home: &str) -> String {
    format!("strong/{home}")
}

/// The Raft node id of an actor.
pub fn raft_id(actor: &str) -> NodeId {
    let digest = Sha256::digest(actor.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    // Zero is avoided so an id is never mistaken for "none" in status output.
    u64::from_be_bytes(b).max(1)
}

/// A voter of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub actor: String,
    pub region: String,
}

/// The voter of each region: the node with the smallest id (the same
/// order that maps partitions to nodes). A node's config lists the other
/// nodes of its own region, so this node is added to its own region's list.
pub fn region_voters(cfg: &Config) -> Vec<Member> {
    let mut out = Vec::new();
    for r in &cfg.regions {
        let mut ids: Vec<&str> = r.nodes.iter().map(|n| n.id.as_str()).collect();
        if r.name == cfg.region {
            ids.push(cfg.node_id.as_str());
        }
        let Some(id) = ids.into_iter().min() else { continue };
        let actor = format!("{}/{}", r.name, id);
        out.push(Member { id: raft_id(&actor), actor, region: r.name.clone() });
    }
    out
}

/// The zone a row homed in `home` gets in table `t` (as residency resolves it).
fn zone_for(cfg: &Config, t: &crate::config::TableConfig, home: &str) -> String {
    match &t.zone {
        Some(z) => z.clone(),
        None => cfg.zone_of(home).map(|z| z.name.clone()).unwrap_or_default(),
    }
}

/// Every (home region, zone) that rows of STRONG tables can have.
pub fn strong_homes(cfg: &Config) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for t in cfg.tables.iter().filter(|t| t.default_consistency == Level::Strong) {
        let mut homes: Vec<String> = Vec::new();
        match t.locality {
            LocalityMode::ByTable => homes.extend(t.home_region.clone()),
            LocalityMode::Global | LocalityMode::ByRow => homes.extend(cfg.region_names()),
        }
        for h in homes {
            let zone = zone_for(cfg, t, &h);
            if cfg.zone_regions(&zone).contains(&h) {
                out.insert((h, zone));
            }
        }
    }
    out
}

/// Every home (region, zone) that needs a lease: each region with its own
/// zone, and with every table zone that contains it.
pub fn lease_homes(cfg: &Config) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for r in cfg.region_names() {
        out.insert((r.clone(), cfg.zone_of(&r).map(|z| z.name.clone()).unwrap_or_default()));
        for t in &cfg.tables {
            let zone = zone_for(cfg, t, &r);
            if cfg.zone_regions(&zone).contains(&r) {
                out.insert((r.clone(), zone));
            }
        }
    }
    out
}

/// Voters of the control plane: the first `consensus.voters_max` regions
/// in config order (list nearby regions first: every commit waits for the
/// slowest member of a majority). Other regions observe the state.
pub fn control_members(cfg: &Config) -> Vec<Member> {
    region_voters(cfg).into_iter().take(cfg.consensus.voters_max).collect()
}

/// Voters of the STRONG group of (home, zone): the home region and the next
/// regions of its failover order, all inside the zone, at most
/// `consensus.voters_max`. Residency holds in membership: no voter is
/// outside the zone.
pub fn strong_members(cfg: &Config, home: &str, zone: &str) -> Vec<Member> {
    let voters = region_voters(cfg);
    cfg.failover_order(home, zone)
        .into_iter()
        .filter_map(|r| voters.iter().find(|m| m.region == r).cloned())
        .take(cfg.consensus.voters_max)
        .collect()
}

/// One Raft group this node is a voter of.
pub struct Group {
    pub name: String,
    pub raft: Raft,
    pub sm: StateMachine,
    pub members: Vec<Member>,
    /// The region whose member should lead (STRONG groups).
    pub preferred_region: Option<String>,
    /// Leadership checks shared by concurrent linearizable reads.
    pub reads: Arc<reads::ReadGate>,
}

/// Publishes the control state after every apply.
struct ControlMachine {
    tx: watch::Sender<ControlState>,
}

impl ControlMachine {
    fn load(view: &MachineView<'_>) -> Result<ControlState, String> {
        match view.get(CONTROL_KEY)? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| format!("control state does not decode: {e}")),
            None => Ok(ControlState::default()),
        }
    }
}

impl Machine for ControlMachine {
    fn apply(&self, _index: u64, command: &Command, view: &mut MachineView<'_>) -> Reply {
        let Command::Control(cmd) = command else {
            return Reply::Rejected { why: format!("the control plane cannot apply {command:?}") };
        };
        let mut state = match Self::load(view) {
            Ok(s) => s,
            Err(why) => return Reply::Rejected { why },
        };
        let reply = state.apply(cmd);
        match serde_json::to_vec(&state) {
            Ok(b) => view.put(CONTROL_KEY, b),
            Err(e) => return Reply::Rejected { why: e.to_string() },
        }
        Reply::Control(reply)
    }

    fn applied(&self, get: &dyn Fn(&[u8]) -> Option<Vec<u8>>) {
        if let Some(b) = get(CONTROL_KEY) {
            match serde_json::from_slice::<ControlState>(&b) {
                Ok(state) => {
                    self.tx.send_if_modified(|cur| {
                        if *cur != state {
                            *cur = state;
                            true
                        } else {
                            false
                        }
                    });
                }
                Err(e) => tracing::error!(error = %e, "stored control state does not decode"),
            }
        }
    }
}

/// The node's consensus groups.
pub struct Consensus {
    pub me: NodeId,
    cfg: Arc<Config>,
    peers: Arc<Peers>,
    groups: BTreeMap<String, Arc<Group>>,
    /// Voters of every group this node knows of (also those it is not in).
    members: BTreeMap<String, Vec<Member>>,
    control: watch::Sender<ControlState>,
    /// Lease timing on this node's monotonic clock and its measured clock
    /// offsets (docs/architecture.md section 18).
    pub lease_clock: Arc<crate::failover::lease_clock::LeaseClock>,
    /// The vote fence of each group this node is a voter of.
    fences: BTreeMap<String, Arc<fence::Fence>>,
    /// Each group's log syncer thread, joined by [`Consensus::shutdown`].
    syncers: std::sync::Mutex<Vec<(String, std::thread::JoinHandle<()>)>>,
}

/// Longest [`Consensus::shutdown`] waits for the groups' log syncer
/// threads to end once their groups stopped.
pub const SYNCER_EXIT_MAX: Duration = Duration::from_secs(5);

/// Bootstraps a new group: every voter bootstraps with the same membership;
/// openraft accepts that, and only one initial log can win. Initializing
/// starts an election at once, so a group with a preferred region lets that
/// region go first (`first`): otherwise a voter nearer the others wins the
/// first term, and the home only gets the leadership back after a leader
/// change. The others still bootstrap, after `wait`, if the home never does.
async fn bootstrap(
    raft: Raft,
    name: String,
    nodes: BTreeMap<NodeId, BasicNode>,
    first: bool,
    wait: Duration,
) {
    if first {
        if let Err(e) = raft.initialize(nodes).await {
            tracing::debug!(group = %name, error = %e, "initialize");
        }
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if matches!(raft.is_initialized().await, Ok(false)) {
                if let Err(e) = raft.initialize(nodes).await {
                    tracing::debug!(group = %name, error = %e, "initialize");
                }
            }
        });
    }
}

/// Whether the test-only `leader-restore` bug is switched on: a member
/// that led before a restart leads again at once, in the same term (see
/// `crate::bugs`).
fn leader_restore() -> bool {
    #[cfg(feature = "bugs")]
    {
        crate::bugs::active(crate::bugs::Bug::LeaderRestore)
    }
    #[cfg(not(feature = "bugs"))]
    {
        false
    }
}

/// Election timeouts a non-preferred voter of a new group waits for the
/// preferred one to bootstrap it before bootstrapping it itself.
const BOOTSTRAP_WAIT_TIMEOUTS: u64 = 4;

/// Whether the test-only `pre-vote-off` bug is switched on: groups run
/// without pre-vote (see `crate::bugs`).
fn pre_vote_off() -> bool {
    #[cfg(feature = "bugs")]
    {
        crate::bugs::active(crate::bugs::Bug::PreVoteOff)
    }
    #[cfg(not(feature = "bugs"))]
    {
        false
    }
}

fn raft_config(cfg: &Config, name: &str) -> anyhow::Result<openraft::Config> {
    let c = &cfg.consensus;
    // Every voter has the same timeouts: the preferred region gets the
    // leadership by an explicit transfer (`keep_preferred_leader`), not by
    // timing out first.
    let min = c.election_timeout_min_ms.max(c.heartbeat_ms * 3);
    let rc = openraft::Config {
        cluster_name: name.to_string(),
        heartbeat_interval: c.heartbeat_ms,
        // The periodic heartbeat to a follower is skipped while an append
        // it acknowledged went out less than one interval ago (that append
        // did the heartbeat's work); followers still hear from the leader
        // at least every two intervals plus one tick, under the election
        // timeout of three intervals or more (decision 011).
        heartbeat_min_interval: Some(c.heartbeat_ms),
        election_timeout_min: min,
        election_timeout_max: c.election_timeout_max_ms.max(min + 1),
        // A member that cannot win (partitioned, restarted, behind) asks
        // first, so it does not raise the term and depose a healthy leader.
        // The leader lease (a member that heard from a leader within the
        // election timeout refuses to vote) stays on: openraft always has it.
        enable_pre_vote: Some(!pre_vote_off()),
        // A member that led before it restarted does not lead again in the
        // same term: the leader sends entries before its own sync (counting
        // itself once flushed), so a power cut can take from it the tail of
        // its log that the followers hold and committed, and its state
        // machine is not synced either. Restored as leader, it would answer
        // reads from that stale state and propose new entries under log ids
        // the followers already hold with other commands. It waits for an
        // election instead, which a member missing committed entries cannot
        // win (decision 036; openraft's default restores it).
        enable_leader_restore: Some(leader_restore()),
        // A member whose store was wiped comes back with an empty log; the
        // leader then replicates it from the start instead of panicking
        // (docs/decisions/020-store-identity-and-config-agreement.md).
        allow_log_reversion: Some(true),
        install_snapshot_timeout: 5000,
        // A snapshot copies nothing (decision 035): the log is purged
        // behind one every `snapshot_every` entries.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(c.snapshot_every),
        max_in_snapshot_log_to_keep: c.log_keep,
        // A peer that cannot be reached is retried every 200 ms.
        backoff: "200ms 200ms 200ms".to_string(),
        ..Default::default()
    };
    Ok(rc.validate()?)
}

/// How often a STRONG group's leader checks whether its preferred region's
/// voter should lead instead.
const PREFERRED_CHECK: Duration = Duration::from_millis(250);

/// The region that should lead a STRONG group: the home's current lease
/// holder when it has a voter in the group (after a failover or a planned
/// handover, STRONG writes then commit from the region serving the home),
/// otherwise the home region itself.
fn preferred_leader(
    home_key: &str,
    home_region: &str,
    members: &[Member],
    state: &ControlState,
) -> Option<NodeId> {
    let holder = state.leases.get(home_key).map(|l| l.holder.as_str());
    let by_region = |r: &str| members.iter().find(|m| m.region == r).map(|m| m.id);
    holder.and_then(by_region).or_else(|| by_region(home_region))
}

/// Whether the leader should hand leadership to `target` now: the target
/// is another member, it has every entry the leader has, and it
/// acknowledged the leader within `fresh` (it is up, so the transfer
/// completes instead of leaving the group without a leader for an
/// election timeout).
fn should_transfer(
    metrics: &openraft::RaftMetrics<TypeConfig>,
    me: NodeId,
    target: NodeId,
    fresh: Duration,
) -> bool {
    if target == me || metrics.current_leader != Some(me) {
        return false;
    }
    let Some(last) = metrics.last_log_index else { return false };
    let caught_up = metrics
        .replication
        .as_ref()
        .and_then(|r| r.get(&target))
        .and_then(|m| m.as_ref())
        .is_some_and(|m| m.index >= last);
    let acked = metrics
        .heartbeat
        .as_ref()
        .and_then(|h| h.get(&target))
        .and_then(|t| t.as_ref())
        .is_some_and(|t| t.elapsed() <= fresh);
    caught_up && acked
}

/// Hands a STRONG group's leadership to its preferred region's voter
/// ([`preferred_leader`]) whenever this node leads it and that voter is up
/// to date: after the home region recovers from a failover, after a planned
/// handover, and after a first election won elsewhere. openraft's transfer
/// makes the target elect itself at once (its vote request carries the
/// transfer, so the other members' leader leases do not hold it back).
#[allow(clippy::too_many_arguments)]
async fn keep_preferred_leader(
    raft: Raft,
    group: String,
    home_key: String,
    home_region: String,
    members: Vec<Member>,
    me: NodeId,
    control: watch::Receiver<ControlState>,
    fresh: Duration,
    retry_after: Duration,
) {
    let mut tick = tokio::time::interval(PREFERRED_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_try: Option<Instant> = None;
    loop {
        tick.tick().await;
        let target = {
            let state = control.borrow();
            preferred_leader(&home_key, &home_region, &members, &state)
        };
        let Some(target) = target else { continue };
        let transfer = should_transfer(&metrics_of(&raft), me, target, fresh);
        if !transfer || last_try.is_some_and(|t| t.elapsed() < retry_after) {
            continue;
        }
        last_try = Some(Instant::now());
        tracing::info!(group = %group, to = target, "handing leadership to the preferred region's voter");
        metrics::counter!("geokv_raft_leader_transfers_total", "group" => group.clone()).increment(1);
        if let Err(e) = raft.trigger().transfer_leader(target).await {
            // Fatal: the group stopped (shutdown).
            tracing::debug!(group = %group, error = %e, "leader transfer");
            return;
        }
    }
}

impl Consensus {
    /// Starts every group this node is a voter of and bootstraps them.
    pub async fn start(cfg: Arc<Config>, engine: Arc<dyn Engine>) -> anyhow::Result<Arc<Self>> {
        let channels = crate::transport::Channels::plaintext(crate::transport::ChannelSettings::PEER);
        Self::start_with(cfg, engine, channels, false).await
    }

    /// [`Consensus::start`] with peers reached through `channels`.
    /// `store_created_empty`: the node's store was made empty at this start
    /// (a first start, or a wiped disk), so each group first learns whether
    /// this member lost its state ([`fence`]).
    pub async fn start_with(
        cfg: Arc<Config>,
        engine: Arc<dyn Engine>,
        channels: crate::transport::Channels,
        store_created_empty: bool,
    ) -> anyhow::Result<Arc<Self>> {
        if let Some(ratio) = cfg.consensus.snapshot_log_ratio {
            tracing::warn!(
                ratio,
                "consensus.snapshot_log_ratio has no effect since snapshots copy nothing (decision 035); \
                 a snapshot is taken every consensus.snapshot_every entries"
            );
        }
        let me = raft_id(&cfg.actor());
        let mut addrs = BTreeMap::new();
        for r in &cfg.regions {
            for n in &r.nodes {
                addrs.insert(raft_id(&format!("{}/{}", r.name, n.id)), n.addr.clone());
            }
        }
        addrs.insert(me, cfg.listen_peer.to_string());
        let peers = Arc::new(Peers::with_channels(addrs, channels));
        let (control_tx, _) = watch::channel(ControlState::default());

        // (group, voters, preferred leader region, state machine)
        type Wanted = (String, Vec<Member>, Option<String>, Arc<dyn Machine>);
        let mut wanted: Vec<Wanted> = vec![(
            CONTROL_GROUP.to_string(),
            control_members(&cfg),
            None,
            Arc::new(ControlMachine { tx: control_tx.clone() }),
        )];
        for (home, zone) in strong_homes(&cfg) {
            let key = control::home_key(&home, &zone);
            wanted.push((
                strong_group(&key),
                strong_members(&cfg, &home, &zone),
                Some(home),
                Arc::new(StrongMachine::new(
                    cfg.storage.idempotency_ttl_s.saturating_mul(1000),
                    cfg.consensus.strong_idempotency_records_max,
                )),
            ));
        }
        let mut groups = BTreeMap::new();
        let mut members = BTreeMap::new();
        let mut fences = BTreeMap::new();
        let mut syncers = Vec::new();
        for (name, voters, preferred_region, machine) in wanted {
            members.insert(name.clone(), voters.clone());
            if !voters.iter().any(|m| m.id == me) {
                continue;
            }
            let preferred = preferred_region.as_deref() == Some(cfg.region.as_str());
            let rc = Arc::new(raft_config(&cfg, &name)?);
            let log = LogStore::open(engine.clone(), &name).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            let sm = StateMachine::new(engine.clone(), &name, machine);
            let net = NetworkFactory {
                peers: peers.clone(),
                group: name.clone(),
                me,
                chunk_bytes: cfg.consensus.snapshot_chunk_bytes,
            };
            let bootstrap_wait = Duration::from_millis(rc.election_timeout_max * BOOTSTRAP_WAIT_TIMEOUTS);
            if let Some(thread) = log.take_syncer_thread() {
                syncers.push((name.clone(), thread));
            }
            let raft = Raft::new(me, rc.clone(), net, log, sm.clone()).await?;
            let initialized = raft.is_initialized().await?;
            let record =
                store::read_fence(engine.as_ref(), &name).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            let nodes: BTreeMap<NodeId, BasicNode> =
                voters.iter().map(|m| (m.id, BasicNode { addr: m.actor.clone() })).collect();
            let boot = bootstrap(
                raft.clone(),
                name.clone(),
                nodes,
                preferred_region.is_none() || preferred,
                bootstrap_wait,
            );
            let learn = match record {
                Some(r) => r.pending,
                None => store_created_empty && !initialized,
            };
            // A member whose store was made empty learns its fence before
            // it votes or bootstraps (fence.rs); the fence is stored first.
            let start = if learn {
                store::FenceRecord { pending: true, ..Default::default() }
            } else {
                record.unwrap_or_default()
            };
            let fence = Arc::new(fence::Fence::from_record(start));
            if learn {
                store::write_fence(engine.as_ref(), &name, start)
                    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
                raft.runtime_config().elect(false);
                let others: Vec<NodeId> = voters.iter().map(|m| m.id).filter(|id| *id != me).collect();
                tokio::spawn(fence::learn(
                    raft.clone(),
                    name.clone(),
                    others,
                    peers.clone(),
                    engine.clone(),
                    fence.clone(),
                    boot,
                ));
                fences.insert(name.clone(), fence);
            } else {
                if fence.term() > 0 {
                    // Lost its state once: still no election in an old term.
                    tokio::spawn(fence::elect_after(raft.clone(), fence.term()));
                } else if !initialized {
                    boot.await;
                }
                fences.insert(name.clone(), fence);
            }
            if let Some(home_region) = &preferred_region {
                let home_key = name.strip_prefix("strong/").unwrap_or(&name).to_string();
                tokio::spawn(keep_preferred_leader(
                    raft.clone(),
                    name.clone(),
                    home_key,
                    home_region.clone(),
                    voters.clone(),
                    me,
                    control_tx.subscribe(),
                    Duration::from_millis(rc.heartbeat_interval * 3),
                    Duration::from_millis(rc.election_timeout_max * 2),
                ));
            }
            groups.insert(
                name.clone(),
                Arc::new(Group {
                    name,
                    raft,
                    sm,
                    members: voters,
                    preferred_region,
                    reads: Arc::new(reads::ReadGate::new()),
                }),
            );
        }
        let lease_clock = Arc::new(crate::failover::lease_clock::LeaseClock::new(
            cfg.clock.max_offset_ms,
            cfg.consensus.lease_ms,
        ));
        Ok(Arc::new(Self {
            me,
            cfg,
            peers,
            groups,
            members,
            control: control_tx,
            lease_clock,
            fences,
            syncers: std::sync::Mutex::new(syncers),
        }))
    }

    /// The vote fence of `group` at this node, when it is a voter of it.
    pub fn fence(&self, group: &str) -> Option<&Arc<fence::Fence>> {
        self.fences.get(group)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The control state as last applied (or fetched) here.
    pub fn control_state(&self) -> ControlState {
        self.control.borrow().clone()
    }

    pub fn subscribe_control(&self) -> watch::Receiver<ControlState> {
        self.control.subscribe()
    }

    /// Replaces the control state with one fetched from a voter (nodes that
    /// are not control-plane voters).
    pub fn observe_control(&self, state: ControlState) {
        self.control.send_if_modified(|cur| {
            if *cur != state {
                *cur = state;
                true
            } else {
                false
            }
        });
    }

    pub fn group(&self, name: &str) -> Option<&Arc<Group>> {
        self.groups.get(name)
    }

    pub fn groups(&self) -> impl Iterator<Item = &Arc<Group>> {
        self.groups.values()
    }

    pub fn members(&self, group: &str) -> Option<&Vec<Member>> {
        self.members.get(group)
    }

    /// Whether this node votes in the control plane.
    pub fn is_control_voter(&self) -> bool {
        self.groups.contains_key(CONTROL_GROUP)
    }

    /// Whether this node currently leads `group`.
    pub fn is_leader(&self, group: &str) -> bool {
        self.groups.get(group).is_some_and(|g| metrics_of(&g.raft).current_leader == Some(self.me))
    }

    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    fn unavailable(group: &str, why: impl ToString) -> KvError {
        KvError::QuorumUnavailable { group: group.to_string(), why: why.to_string() }
    }

    /// Commits `cmd` in `group` and returns its reply and log index,
    /// forwarding to the leader when this node is not it.
    pub async fn propose(&self, group: &str, cmd: Command, hops: u32) -> Result<(Reply, u64), KvError> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        let Some(g) = self.groups.get(group) else {
            return self.forward_to_members(group, &cmd, hops, deadline).await;
        };
        // Bounded: one attempt per 50 ms until the deadline.
        for _ in 0..(PROPOSE_TIMEOUT.as_millis() / 50) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let started = Instant::now();
            match tokio::time::timeout(left, g.raft.client_write(cmd.clone())).await {
                Err(_) => break,
                Ok(Ok(resp)) => {
                    // Committed and applied here, as the leader: the consensus
                    // round without the client's hop or a forward.
                    metrics::histogram!("geokv_raft_propose_seconds", "group" => group.to_string())
                        .record(started.elapsed().as_secs_f64());
                    return Ok((resp.data, resp.log_id.index));
                }
                Ok(Err(e)) => match e.forward_to_leader() {
                    Some(f) => match f.leader_id {
                        Some(leader) if leader != self.me => {
                            return self.forward(leader, group, &cmd, hops, deadline).await;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    },
                    None => return Err(Self::unavailable(group, e)),
                },
            }
        }
        Err(Self::unavailable(group, "no leader elected before the deadline"))
    }

    async fn forward_to_members(
        &self,
        group: &str,
        cmd: &Command,
        hops: u32,
        deadline: Instant,
    ) -> Result<(Reply, u64), KvError> {
        let Some(members) = self.members.get(group) else {
            return Err(Self::unavailable(group, "unknown group"));
        };
        // Same region first, then the others in config order.
        let mut order: Vec<&Member> = members.iter().filter(|m| m.region == self.cfg.region).collect();
        order.extend(members.iter().filter(|m| m.region != self.cfg.region));
        let mut last = Self::unavailable(group, "no member reachable");
        for m in order {
            match self.forward(m.id, group, cmd, hops, deadline).await {
                Ok(r) => return Ok(r),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn forward(
        &self,
        target: NodeId,
        group: &str,
        cmd: &Command,
        hops: u32,
        deadline: Instant,
    ) -> Result<(Reply, u64), KvError> {
        if hops >= HOPS_MAX {
            return Err(Self::unavailable(group, "too many forwarding hops"));
        }
        let Some(mut client) = self.peers.client(target) else {
            return Err(Self::unavailable(group, format!("leader {target} has no address")));
        };
        let command = serde_json::to_vec(cmd).map_err(|e| Self::unavailable(group, e))?;
        let mut req =
            tonic::Request::new(pb::ProposeRequest { group: group.to_string(), command, hops: hops + 1 });
        req.set_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10)));
        let reply = client.propose(req).await.map_err(|s| Self::status_error(group, s))?.into_inner();
        let parsed: Reply = serde_json::from_slice(&reply.reply).map_err(|e| Self::unavailable(group, e))?;
        Ok((parsed, reply.index))
    }

    fn status_error(group: &str, s: tonic::Status) -> KvError {
        Self::unavailable(group, format!("{}: {}", s.code(), s.message()))
    }

    /// A linearizable read of a STRONG row, served by the group's leader
    /// (the home region's voter, which leadership is transferred back to).
    /// While a quorum acknowledged one of its messages sent less than the
    /// leader lease ago, less the maximum clock offset as a margin for the
    /// monotonic clocks' rates, no voter can have granted another leader a
    /// vote since (openraft's leader lease), so the leader answers at once
    /// (a lease read: no round trip). Otherwise it sends a heartbeat round
    /// and answers once a quorum acknowledged it (read index). Either way
    /// it waits until it applied that far.
    pub async fn read(
        &self,
        group: &str,
        table: &str,
        key: &[u8],
        hops: u32,
    ) -> Result<Option<StrongValue>, KvError> {
        let k = strong::row_key(table, key);
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        if let Some(g) = self.groups.get(group) {
            for _ in 0..(PROPOSE_TIMEOUT.as_millis() / 50) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let (raft, option) = (g.raft.clone(), self.read_option(&g.raft));
                let check = move || {
                    let (raft, option) = (raft.clone(), option.clone());
                    async move { reads::confirm_leader(&raft, option).await }
                };
                match tokio::time::timeout(left, g.reads.confirm(PROPOSE_TIMEOUT, check)).await {
                    Err(_elapsed) => break,
                    Ok(reads::Confirmed::Leader) => {
                        let v = g.sm.get(&k).map_err(KvError::Storage)?;
                        return v.map(|b| strong::decode_value(&b)).transpose().map_err(|why| {
                            KvError::Corrupt {
                                what: format!("STRONG row {table}/{}", String::from_utf8_lossy(key)),
                                why,
                            }
                        });
                    }
                    Ok(reads::Confirmed::NotLeader(Some(leader))) if leader != self.me => {
                        return self.forward_read(leader, group, &k, hops, deadline).await;
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            return Err(Self::unavailable(group, "no leader confirmed before the deadline"));
        }
        let members = self.members.get(group).cloned().unwrap_or_default();
        let mut last = Self::unavailable(group, "no member reachable");
        let mut order: Vec<&Member> = members.iter().filter(|m| m.region == self.cfg.region).collect();
        order.extend(members.iter().filter(|m| m.region != self.cfg.region));
        for m in order {
            match self.forward_read(m.id, group, &k, hops, deadline).await {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// How old a quorum acknowledgement a STRONG read accepts: the leader
    /// lease (openraft's is the maximum election timeout) less the maximum
    /// clock offset; zero (read index on every read) when the offset eats
    /// the whole lease.
    fn read_option(&self, raft: &Raft) -> openraft::LinearizerOption {
        let lease = Duration::from_millis(raft.config().election_timeout_max);
        let age = lease.saturating_sub(Duration::from_millis(self.cfg.clock.max_offset_ms));
        openraft::LinearizerOption::new(Some(age), true)
    }

    async fn forward_read(
        &self,
        target: NodeId,
        group: &str,
        k: &[u8],
        hops: u32,
        deadline: Instant,
    ) -> Result<Option<StrongValue>, KvError> {
        if hops >= HOPS_MAX {
            return Err(Self::unavailable(group, "too many forwarding hops"));
        }
        let Some(mut client) = self.peers.client(target) else {
            return Err(Self::unavailable(group, format!("leader {target} has no address")));
        };
        let mut req = tonic::Request::new(pb::ReadRequest {
            group: group.to_string(),
            key: k.to_vec(),
            hops: hops + 1,
        });
        req.set_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10)));
        let reply = client.read(req).await.map_err(|s| Self::status_error(group, s))?.into_inner();
        if !reply.found {
            return Ok(None);
        }
        strong::decode_value(&reply.value)
            .map(Some)
            .map_err(|why| KvError::Corrupt { what: "STRONG row".into(), why })
    }

    /// A local, possibly stale read of a STRONG row (LOCAL/BOUNDED reads).
    pub fn read_local(&self, group: &str, table: &str, key: &[u8]) -> Result<Option<StrongValue>, KvError> {
        let Some(g) = self.groups.get(group) else {
            return Err(KvError::ReplicaStale {
                region: self
                    .members
                    .get(group)
                    .and_then(|m| m.first())
                    .map(|m| m.region.clone())
                    .unwrap_or_default(),
                why: "this node holds no replica of the STRONG group".into(),
            });
        };
        let v = g.sm.get(&strong::row_key(table, key)).map_err(KvError::Storage)?;
        v.map(|b| strong::decode_value(&b))
            .transpose()
            .map_err(|why| KvError::Corrupt { what: "STRONG row".into(), why })
    }

    /// Stops every group, then joins their log syncer threads (each ends
    /// once its group let go of its log; bounded by [`SYNCER_EXIT_MAX`],
    /// past which a thread is left to end by itself, logged).
    pub async fn shutdown(&self) {
        for g in self.groups.values() {
            let _ = g.raft.shutdown().await;
        }
        let syncers = std::mem::take(&mut *self.syncers.lock().unwrap_or_else(|p| p.into_inner()));
        let by = tokio::time::Instant::now() + SYNCER_EXIT_MAX;
        for (group, thread) in syncers {
            if !crate::server::wait_until(by, || thread.is_finished()).await {
                tracing::warn!(
                    group,
                    "the group's log syncer still runs {SYNCER_EXIT_MAX:?} after it stopped"
                );
                continue;
            }
            if tokio::task::spawn_blocking(move || thread.join()).await.map_or(true, |r| r.is_err()) {
                tracing::error!(group, "the group's log syncer panicked");
            }
        }
    }
}
