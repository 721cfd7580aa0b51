//! The cluster-wide view of the dashboard (docs/architecture.md section 9):
//! `GET /dashboard/cluster`, served by any node.
//!
//! One document with
//! - the replication-lag matrix: every ordered (source, destination) pair of
//!   configured regions, its current lag and state, and its recent history;
//! - each region's health: whether this node hears from it, and whether its
//!   nodes answered this node's gathering in time;
//! - the home leases (holder, epoch, expiry) and the failover timeline,
//!   from the control-plane state this node holds;
//! - conflicts per table, per region.
//!
//! # Gathering
//!
//! A region's outgoing links are known only to its own nodes, so the
//! serving node asks every other node of the cluster, over the peer port
//! with its node certificate, for `ReplicationStatus` (that node's links
//! only) and `NodeStatus` (its conflict counts), all at once, each bounded
//! by [`GATHER_DEADLINE`]. A node that does not answer in time counts as
//! unreachable for that sample: the page never waits longer than the
//! deadline, whatever state a region is in.
//!
//! Samples are taken when the page asks, at most one per
//! [`SAMPLE_INTERVAL`] (concurrent viewers share a sample), so an idle
//! cluster sends no dashboard traffic between regions. The history of each
//! pair lives on the serving node, bounded by [`HISTORY_SAMPLES_MAX`] and
//! [`HISTORY_WINDOW`]; when nobody watched for a while a gap is recorded
//! rather than a line drawn across it. Decision 017 explains the choice.
//!
//! The document is assembled by [`ClusterData::build`], a pure function,
//! and the history by [`LagHistory`], so both are tested without a network.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use geokv_proto::v1 as pb;
use serde::Serialize;
use tokio::sync::watch;

use super::dashboard::{RegionInput, CONFLICT_TABLES_MAX};
use crate::api::Peers;
use crate::consensus::control::{split_home_key, ControlState};
use crate::kv::Node;
use crate::replication::Replicator;
use crate::topology::NodeRef;

/// Version of the `/dashboard/cluster` document.
pub const CLUSTER_DATA_VERSION: u32 = 1;

/// Longest wait for one node's answer; the whole gathering runs in parallel,
/// so a sample takes at most about this long.
pub const GATHER_DEADLINE: Duration = Duration::from_millis(1500);

/// Least time between two samples; requests in between get the last one.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// Samples kept per pair: ten minutes at one sample per [`SAMPLE_INTERVAL`].
pub const HISTORY_SAMPLES_MAX: usize = 300;

/// Samples older than this (by the serving node's clock) are dropped.
pub const HISTORY_WINDOW: Duration = Duration::from_secs(600);

/// A pause between samples longer than this many intervals is recorded as
/// a gap (a sample with no values), so the charts do not bridge it.
const GAP_INTERVALS: u64 = 3;

/// What the serving node needs, besides itself, for the cluster view.
pub struct ClusterSources {
    /// Channels to every other node's peer port (node certificate).
    pub peers: Peers,
    /// The control-plane state: leases, epochs, failovers.
    pub control: watch::Receiver<ControlState>,
}

/// One link as a region reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct PairLink {
    pub source: String,
    pub destination: String,
    pub paused: bool,
    pub connected: bool,
    pub lag_seconds: f64,
    pub lag_entries: u64,
}

impl From<pb::ReplicationLink> for PairLink {
    fn from(l: pb::ReplicationLink) -> Self {
        Self {
            source: l.source,
            destination: l.destination,
            paused: l.paused,
            connected: l.connected,
            lag_seconds: l.lag_seconds,
            lag_entries: l.lag_entries,
        }
    }
}

/// What one node answered.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeAnswer {
    pub links: Vec<PairLink>,
    /// Conflicts per table counted on that node since it started.
    pub conflicts: BTreeMap<String, u64>,
    /// Round trip of the gathering call, in ms (0 for the serving node).
    pub rtt_ms: u64,
}

/// One node's part of a sample: its answer, or why there is none.
#[derive(Debug, Clone)]
pub struct NodeReport {
    pub region: String,
    pub node: String,
    pub answer: Result<NodeAnswer, String>,
}

/// What one document is built from.
#[derive(Debug)]
pub struct ClusterInputs<'a> {
    pub node_id: &'a str,
    pub region: &'a str,
    /// Wall-clock time of the sample, ms since the Unix epoch.
    pub at_ms: u64,
    /// Configured regions in configuration order, with this node's view of
    /// their health.
    pub regions: Vec<RegionInput>,
    /// Every node of the cluster, this one included.
    pub reports: Vec<NodeReport>,
    /// None where this node has no control plane.
    pub control: Option<ControlState>,
}

/// The `/dashboard/cluster` document.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterData {
    /// [`CLUSTER_DATA_VERSION`].
    pub version: u32,
    /// The node that gathered this view.
    pub node_id: String,
    pub region: String,
    pub at_ms: u64,
    pub sample_interval_ms: u64,
    pub gather_deadline_ms: u64,
    /// Every configured region, in configuration order: the axes of the matrix.
    pub regions: Vec<ClusterRegion>,
    /// Every ordered pair of distinct regions, source-major, in configuration order.
    pub pairs: Vec<PairView>,
    /// Times of the samples in each pair's `history` (ms since the Unix epoch).
    pub history_at_ms: Vec<u64>,
    /// Home leases, sorted by home.
    pub homes: Vec<HomeView>,
    /// Failovers and handovers, newest first (bounded by the control state).
    pub failovers: Vec<FailoverView>,
    /// Epochs of every home, oldest first per home: the timeline's bars.
    pub epochs: Vec<EpochView>,
    /// Whether `homes`, `failovers` and `epochs` come from a control plane.
    pub control_known: bool,
    /// Conflicts per table, largest total first, at most [`CONFLICT_TABLES_MAX`].
    pub conflicts: Vec<TableConflicts>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterRegion {
    pub name: String,
    /// The serving node's region.
    pub local: bool,
    /// "ok" (every node answered and this node hears from the region),
    /// "degraded" (some answered, or answered but heartbeats are missing),
    /// or "unreachable" (no node answered in time).
    pub state: String,
    /// Whether the serving node hears the region's heartbeats.
    pub healthy: bool,
    pub last_contact_ms: Option<u64>,
    pub nodes_answered: u32,
    pub nodes_total: u32,
    /// Slowest answer among the region's nodes, ms; `null` when none answered.
    pub rtt_ms: Option<u64>,
    /// Why a node did not answer (the first such node), empty if all did.
    pub error: String,
    /// Homes this region holds now.
    pub holds: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PairView {
    pub source: String,
    pub destination: String,
    /// "ok", "paused", "disconnected", "none" (the source ships nothing
    /// there) or "unknown" (the source did not answer).
    pub state: String,
    /// Largest lag among the source's nodes; `null` when unknown or none.
    pub lag_seconds: Option<f64>,
    /// Entries not yet acknowledged, summed over the source's nodes.
    pub lag_entries: Option<u64>,
    /// Lag in seconds per sample, aligned with `history_at_ms`.
    pub history: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HomeView {
    /// The home key: `region` or `region@zone`.
    pub home: String,
    /// The region the home belongs to.
    pub home_region: String,
    pub zone: String,
    pub holder: String,
    pub epoch: u64,
    /// "initial", "failover" or "planned".
    pub reason: String,
    /// Positive while the lease runs, negative once it lapsed (by this node's clock).
    pub expires_in_ms: i64,
    pub draining_to: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailoverView {
    pub home: String,
    pub from: String,
    pub to: String,
    pub epoch: u64,
    pub at_ms: u64,
    pub unavailable_ms: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EpochView {
    pub home: String,
    pub epoch: u64,
    pub holder: String,
    pub granted_ms: u64,
    /// `null` while the epoch is current.
    pub ended_ms: Option<u64>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TableConflicts {
    pub table: String,
    /// Sum over the regions that answered.
    pub total: u64,
    /// Per region, aligned with `regions`; `null` where the region did not answer.
    pub per_region: Vec<Option<u64>>,
}

/// The bounded lag history of every pair, kept on the serving node.
#[derive(Debug, Default)]
pub struct LagHistory {
    at_ms: VecDeque<u64>,
    /// Keyed by (source, destination); every series has `at_ms.len()` values.
    series: BTreeMap<(String, String), VecDeque<Option<f64>>>,
}

impl LagHistory {
    /// Appends one sample (`values` holds each pair's lag, `None` if
    /// unknown). Samples that do not move time forward are ignored; a long
    /// pause since the last one adds a gap first; old samples are dropped.
    pub fn push(&mut self, at_ms: u64, values: &[((String, String), Option<f64>)]) {
        if let Some(&last) = self.at_ms.back() {
            if at_ms <= last {
                return;
            }
            let interval = SAMPLE_INTERVAL.as_millis() as u64;
            if at_ms - last > GAP_INTERVALS * interval {
                self.append(last + interval, &[]);
            }
        }
        self.append(at_ms, values);
        let oldest = at_ms.saturating_sub(HISTORY_WINDOW.as_millis() as u64);
        while self.at_ms.len() > HISTORY_SAMPLES_MAX || self.at_ms.front().is_some_and(|&t| t < oldest) {
            self.at_ms.pop_front();
            for ys in self.series.values_mut() {
                ys.pop_front();
            }
        }
        // A pair with no value left in the window (a region removed from
        // the configuration) goes, so the map stays bounded by the config.
        self.series.retain(|_, ys| ys.iter().any(Option::is_some));
    }

    fn append(&mut self, at_ms: u64, values: &[((String, String), Option<f64>)]) {
        let len = self.at_ms.len();
        self.at_ms.push_back(at_ms);
        for (pair, v) in values {
            self.series.entry(pair.clone()).or_insert_with(|| VecDeque::from(vec![None; len]));
            if let Some(ys) = self.series.get_mut(pair) {
                ys.push_back(*v);
            }
        }
        for ys in self.series.values_mut() {
            if ys.len() < len + 1 {
                ys.push_back(None);
            }
        }
    }

    pub fn times(&self) -> Vec<u64> {
        self.at_ms.iter().copied().collect()
    }

    /// The series of a pair, aligned with [`LagHistory::times`].
    pub fn series(&self, source: &str, destination: &str) -> Vec<Option<f64>> {
        match self.series.get(&(source.to_string(), destination.to_string())) {
            Some(ys) => ys.iter().copied().collect(),
            None => vec![None; self.at_ms.len()],
        }
    }

    pub fn len(&self) -> usize {
        self.at_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at_ms.is_empty()
    }
}

/// The answers of `region`'s nodes that did answer.
fn answers<'a>(reports: &'a [NodeReport], region: &'a str) -> impl Iterator<Item = &'a NodeAnswer> + 'a {
    reports.iter().filter(move |n| n.region == region).filter_map(|n| n.answer.as_ref().ok())
}

impl ClusterData {
    /// Assembles a document from one sample and appends the sample's lags
    /// to `history` (whose series the document then carries).
    pub fn build(inputs: ClusterInputs<'_>, history: &mut LagHistory) -> Self {
        let ClusterInputs { node_id, region, at_ms, regions, reports, control } = inputs;
        let names: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();

        let mut pairs = Vec::new();
        for &s in &names {
            let any_answer = answers(&reports, s).next().is_some();
            for &d in names.iter().filter(|&&d| d != s) {
                let links: Vec<&PairLink> = answers(&reports, s)
                    .flat_map(|a| a.links.iter())
                    .filter(|l| l.destination == d)
                    .collect();
                let (state, lag_seconds, lag_entries) = if !any_answer {
                    ("unknown", None, None)
                } else if links.is_empty() {
                    ("none", None, None)
                } else {
                    let lag = links
                        .iter()
                        .map(|l| if l.lag_seconds.is_finite() { l.lag_seconds.max(0.0) } else { 0.0 })
                        .fold(0.0_f64, f64::max);
                    let entries = links.iter().map(|l| l.lag_entries).sum::<u64>();
                    let state = if links.iter().any(|l| l.paused) {
                        "paused"
                    } else if links.iter().any(|l| !l.connected) {
                        "disconnected"
                    } else {
                        "ok"
                    };
                    (state, Some(lag), Some(entries))
                };
                pairs.push(PairView {
                    source: s.to_string(),
                    destination: d.to_string(),
                    state: state.to_string(),
                    lag_seconds,
                    lag_entries,
                    history: Vec::new(),
                });
            }
        }
        let values: Vec<_> =
            pairs.iter().map(|p| ((p.source.clone(), p.destination.clone()), p.lag_seconds)).collect();
        history.push(at_ms, &values);
        for p in &mut pairs {
            p.history = history.series(&p.source, &p.destination);
        }

        let now = at_ms;
        let control_known = control.is_some();
        let control = control.unwrap_or_default();
        let mut homes: Vec<HomeView> = control
            .leases
            .values()
            .map(|l| {
                let (home_region, zone) = split_home_key(&l.home);
                HomeView {
                    home: l.home.clone(),
                    home_region: home_region.to_string(),
                    zone: zone.to_string(),
                    holder: l.holder.clone(),
                    epoch: l.epoch,
                    reason: l.reason.name().to_string(),
                    expires_in_ms: l.expires_ms as i64 - now as i64,
                    draining_to: l.draining_to.clone(),
                }
            })
            .collect();
        homes.sort_by(|a, b| a.home.cmp(&b.home));
        let failovers = control
            .events
            .iter()
            .rev()
            .map(|e| FailoverView {
                home: e.home.clone(),
                from: e.from.clone(),
                to: e.to.clone(),
                epoch: e.epoch,
                at_ms: e.at_ms,
                unavailable_ms: e.unavailable_ms,
                reason: e.reason.name().to_string(),
            })
            .collect();
        let epochs = control
            .history
            .iter()
            .flat_map(|(home, records)| {
                records.iter().map(move |r| EpochView {
                    home: home.clone(),
                    epoch: r.epoch,
                    holder: r.holder.clone(),
                    granted_ms: r.granted_ms,
                    ended_ms: r.ended_ms,
                    reason: r.reason.name().to_string(),
                })
            })
            .collect();

        let cluster_regions = regions
            .iter()
            .map(|r| {
                let local = r.name == region;
                let nodes: Vec<&NodeReport> = reports.iter().filter(|n| n.region == r.name).collect();
                let ok: Vec<&NodeAnswer> = nodes.iter().filter_map(|n| n.answer.as_ref().ok()).collect();
                let error = nodes
                    .iter()
                    .find_map(|n| n.answer.as_ref().err().map(|e| format!("{}: {e}", n.node)))
                    .unwrap_or_default();
                let healthy = r.healthy || local;
                let state = if ok.is_empty() {
                    "unreachable"
                } else if ok.len() < nodes.len() || !healthy {
                    "degraded"
                } else {
                    "ok"
                };
                ClusterRegion {
                    name: r.name.clone(),
                    local,
                    state: state.to_string(),
                    healthy,
                    last_contact_ms: if local { None } else { r.last_contact.map(|d| d.as_millis() as u64) },
                    nodes_answered: ok.len() as u32,
                    nodes_total: nodes.len() as u32,
                    rtt_ms: ok.iter().map(|a| a.rtt_ms).max(),
                    error: error.chars().take(super::dashboard::LAST_ERROR_CHARS_MAX).collect(),
                    holds: homes.iter().filter(|h| h.holder == r.name).map(|h| h.home.clone()).collect(),
                }
            })
            .collect();

        // Conflicts: per table, per region (summed over its nodes).
        let mut per_table: BTreeMap<String, Vec<Option<u64>>> = BTreeMap::new();
        for (i, &r) in names.iter().enumerate() {
            for a in answers(&reports, r) {
                for (table, n) in &a.conflicts {
                    let row = per_table.entry(table.clone()).or_insert_with(|| vec![None; names.len()]);
                    row[i] = Some(row[i].unwrap_or(0) + n);
                }
            }
        }
        // A region that answered but never counted a conflict on a table has 0.
        for (i, &r) in names.iter().enumerate() {
            if answers(&reports, r).next().is_some() {
                for row in per_table.values_mut() {
                    row[i].get_or_insert(0);
                }
            }
        }
        let mut conflicts: Vec<TableConflicts> = per_table
            .into_iter()
            .map(|(table, per_region)| TableConflicts {
                total: per_region.iter().flatten().sum(),
                table,
                per_region,
            })
            .collect();
        conflicts.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.table.cmp(&b.table)));
        conflicts.truncate(CONFLICT_TABLES_MAX);

        Self {
            version: CLUSTER_DATA_VERSION,
            node_id: node_id.to_string(),
            region: region.to_string(),
            at_ms,
            sample_interval_ms: SAMPLE_INTERVAL.as_millis() as u64,
            gather_deadline_ms: GATHER_DEADLINE.as_millis() as u64,
            regions: cluster_regions,
            pairs,
            history_at_ms: history.times(),
            homes,
            failovers,
            epochs,
            control_known,
            conflicts,
        }
    }
}

/// The serving node's cluster view: its sources, the last sample and the history.
pub(super) struct ClusterView {
    sources: Option<ClusterSources>,
    sampled: tokio::sync::Mutex<Sampled>,
}

#[derive(Default)]
struct Sampled {
    last: Option<(Instant, ClusterData)>,
    history: LagHistory,
}

impl ClusterView {
    pub(super) fn new(sources: Option<ClusterSources>) -> Self {
        Self { sources, sampled: tokio::sync::Mutex::new(Sampled::default()) }
    }

    /// Publishes the home leases as gauges for Prometheus:
    /// `geokv_home_epoch{home}` and `geokv_home_holder{home, holder}` (1 for
    /// the holder, 0 for every other configured region, so a series never
    /// goes stale when the holder changes).
    pub(super) fn publish_home_metrics(&self, regions: &[String]) {
        let Some(sources) = &self.sources else { return };
        let leases: Vec<(String, String, u64)> = sources
            .control
            .borrow()
            .leases
            .values()
            .map(|l| (l.home.clone(), l.holder.clone(), l.epoch))
            .collect();
        for (home, holder, epoch) in leases {
            metrics::gauge!("geokv_home_epoch", "home" => home.clone()).set(epoch as f64);
            for r in regions {
                let held = if *r == holder { 1.0 } else { 0.0 };
                metrics::gauge!("geokv_home_holder", "home" => home.clone(), "holder" => r.clone()).set(held);
            }
        }
    }

    /// The latest document: the last sample if younger than
    /// [`SAMPLE_INTERVAL`], otherwise a new one (bounded by [`GATHER_DEADLINE`]).
    pub(super) async fn current(&self, node: &Arc<Node>, replicator: &Replicator) -> ClusterData {
        let mut sampled = self.sampled.lock().await;
        if let Some((at, data)) = &sampled.last {
            if at.elapsed() < SAMPLE_INTERVAL {
                return data.clone();
            }
        }
        let reports = self.gather(node, replicator).await;
        let cfg = node.config();
        let regions = super::dashboard::region_inputs(cfg, replicator);
        let inputs = ClusterInputs {
            node_id: &cfg.node_id,
            region: &cfg.region,
            at_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            regions,
            reports,
            control: self.sources.as_ref().map(|s| s.control.borrow().clone()),
        };
        let data = ClusterData::build(inputs, &mut sampled.history);
        sampled.last = Some((Instant::now(), data.clone()));
        data
    }

    /// This node's own report and every other node's, asked all at once.
    async fn gather(&self, node: &Arc<Node>, replicator: &Replicator) -> Vec<NodeReport> {
        let cfg = node.config();
        let own = NodeReport {
            region: cfg.region.clone(),
            node: cfg.node_id.clone(),
            answer: Ok(NodeAnswer {
                links: replicator
                    .links()
                    .iter()
                    .map(|l| {
                        let s = l.snapshot(node);
                        PairLink {
                            source: s.source,
                            destination: s.destination,
                            paused: s.paused,
                            connected: s.connected,
                            lag_seconds: s.lag_seconds,
                            lag_entries: s.lag_entries,
                        }
                    })
                    .collect(),
                conflicts: node.conflicts().into_iter().collect(),
                rtt_ms: 0,
            }),
        };
        let mut reports = vec![own];
        let others: Vec<NodeRef> = node
            .topology()
            .regions
            .iter()
            .flat_map(|r| r.nodes.iter())
            .filter(|n| !n.is_self)
            .cloned()
            .collect();
        let Some(sources) = &self.sources else {
            reports.extend(others.into_iter().map(|n| NodeReport {
                region: n.region,
                node: n.id,
                answer: Err("no peer connections on this node".into()),
            }));
            return reports;
        };
        let mut set = tokio::task::JoinSet::new();
        for n in others {
            let admin = sources.peers.admin_client(&n);
            set.spawn(async move {
                let answer = match admin {
                    Ok(admin) => match tokio::time::timeout(GATHER_DEADLINE, ask(admin)).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("no answer within {} ms", GATHER_DEADLINE.as_millis())),
                    },
                    Err(e) => Err(e.to_string()),
                };
                NodeReport { region: n.region, node: n.id, answer }
            });
        }
        while let Some(r) = set.join_next().await {
            if let Ok(r) = r {
                reports.push(r);
            }
        }
        reports
    }
}

/// One node's links and conflict counts, asked concurrently.
async fn ask(admin: pb::admin_client::AdminClient<tonic::transport::Channel>) -> Result<NodeAnswer, String> {
    let started = Instant::now();
    let mut links_req = tonic::Request::new(pb::ReplicationStatusRequest { node_only: true });
    links_req.set_timeout(GATHER_DEADLINE);
    let mut status_req = tonic::Request::new(pb::NodeStatusRequest {});
    status_req.set_timeout(GATHER_DEADLINE);
    let (mut a, mut b) = (admin.clone(), admin);
    let (links, status) = tokio::join!(a.replication_status(links_req), b.node_status(status_req));
    let links = links.map_err(|s| format!("replication status: {}", s.message()))?.into_inner().links;
    let status = status.map_err(|s| format!("node status: {}", s.message()))?.into_inner();
    Ok(NodeAnswer {
        links: links.into_iter().map(PairLink::from).collect(),
        conflicts: status.tables.into_iter().map(|t| (t.name, t.conflicts)).collect(),
        rtt_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::control::{EpochRecord, FailoverEvent, GrantReason, HomeLease};

    const US: &str = "us-east-1";
    const EU: &str = "eu-west-1";
    const AP: &str = "ap-southeast-1";

    fn link(source: &str, destination: &str, lag_seconds: f64, paused: bool) -> PairLink {
        PairLink {
            source: source.into(),
            destination: destination.into(),
            paused,
            connected: true,
            lag_seconds,
            lag_entries: 2,
        }
    }

    fn answer(links: Vec<PairLink>, conflicts: &[(&str, u64)], rtt_ms: u64) -> Result<NodeAnswer, String> {
        Ok(NodeAnswer {
            links,
            conflicts: conflicts.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
            rtt_ms,
        })
    }

    fn report(region: &str, node: &str, answer: Result<NodeAnswer, String>) -> NodeReport {
        NodeReport { region: region.into(), node: node.into(), answer }
    }

    fn control() -> ControlState {
        let lease = |home: &str, holder: &str, epoch, reason| HomeLease {
            home: home.into(),
            holder: holder.into(),
            epoch,
            expires_ms: 1_000_500,
            granted_ms: 999_000,
            renewals: 0,
            lease_ms: 3000,
            reason,
            draining_to: None,
        };
        let record = |epoch, holder: &str, ended_ms, reason| EpochRecord {
            epoch,
            holder: holder.into(),
            granted_ms: 990_000 + epoch * 1000,
            ended_ms,
            reason,
        };
        let event = |home: &str, to: &str, epoch, at_ms| FailoverEvent {
            home: home.into(),
            from: AP.into(),
            to: to.into(),
            epoch,
            at_ms,
            unavailable_ms: 1200,
            reason: GrantReason::Failover,
        };
        ControlState {
            leases: BTreeMap::from([
                (US.to_string(), lease(US, US, 1, GrantReason::Initial)),
                (AP.to_string(), lease(AP, EU, 2, GrantReason::Failover)),
            ]),
            history: BTreeMap::from([(
                AP.to_string(),
                vec![
                    record(1, AP, Some(995_000), GrantReason::Initial),
                    record(2, EU, None, GrantReason::Failover),
                ],
            )]),
            pruned: BTreeMap::new(),
            manual_only: false,
            events: vec![event(AP, EU, 2, 996_000), event("x", US, 5, 997_000)],
            epoch_floors: BTreeMap::new(),
        }
    }

    fn inputs(at_ms: u64) -> ClusterInputs<'static> {
        let region = |name: &str, healthy| RegionInput {
            name: name.into(),
            healthy,
            last_contact: healthy.then(|| Duration::from_millis(40)),
        };
        ClusterInputs {
            node_id: "n1",
            region: US,
            at_ms,
            regions: vec![region(US, false), region(EU, true), region(AP, false)],
            reports: vec![
                report(
                    US,
                    "n1",
                    answer(vec![link(US, EU, 0.02, false), link(US, AP, f64::NAN, false)], &[("t", 1)], 0),
                ),
                // Two nodes in eu-west-1: lags take the largest, entries add up.
                report(
                    EU,
                    "n1",
                    answer(vec![link(EU, US, 0.5, false), link(EU, AP, 3.0, true)], &[("t", 2)], 30),
                ),
                report(EU, "n2", answer(vec![link(EU, US, 1.5, false)], &[("t", 4), ("u", 7)], 45)),
                report(AP, "n1", Err("no answer within 1500 ms".into())),
            ],
            control: Some(control()),
        }
    }

    fn pair<'a>(d: &'a ClusterData, s: &str, t: &str) -> &'a PairView {
        d.pairs.iter().find(|p| p.source == s && p.destination == t).unwrap_or_else(|| panic!("no {s}->{t}"))
    }

    #[test]
    fn matrix_covers_every_ordered_pair_and_marks_silent_sources_unknown() {
        let mut history = LagHistory::default();
        let d = ClusterData::build(inputs(1_000_000), &mut history);
        assert_eq!(d.version, CLUSTER_DATA_VERSION);
        let names: Vec<&str> = d.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, [US, EU, AP]);
        // n regions, n (n - 1) pairs, source-major in configuration order.
        let pairs: Vec<(&str, &str)> =
            d.pairs.iter().map(|p| (p.source.as_str(), p.destination.as_str())).collect();
        assert_eq!(pairs, [(US, EU), (US, AP), (EU, US), (EU, AP), (AP, US), (AP, EU)]);

        assert_eq!((pair(&d, US, EU).state.as_str(), pair(&d, US, EU).lag_seconds), ("ok", Some(0.02)));
        // A NaN lag is reported as 0, keeping the JSON valid.
        assert_eq!(pair(&d, US, AP).lag_seconds, Some(0.0));
        let eu_us = pair(&d, EU, US);
        assert_eq!((eu_us.lag_seconds, eu_us.lag_entries), (Some(1.5), Some(4)));
        assert_eq!(pair(&d, EU, AP).state, "paused");
        for t in [US, EU] {
            let p = pair(&d, AP, t);
            assert_eq!((p.state.as_str(), p.lag_seconds, p.lag_entries), ("unknown", None, None));
        }
        assert!(d.pairs.iter().all(|p| p.history.len() == d.history_at_ms.len()));

        // Region health: the local region is healthy, a silent one unreachable.
        let r: Vec<(&str, bool, u32, u32, Option<u64>)> = d
            .regions
            .iter()
            .map(|r| (r.state.as_str(), r.healthy, r.nodes_answered, r.nodes_total, r.rtt_ms))
            .collect();
        assert_eq!(
            r,
            [("ok", true, 1, 1, Some(0)), ("ok", true, 2, 2, Some(45)), ("unreachable", false, 0, 1, None)]
        );
        assert!(d.regions[2].error.contains("n1: no answer"), "{:?}", d.regions[2]);
        assert_eq!(d.regions[1].holds, [AP]);

        // Leases, failovers newest first, epochs.
        assert!(d.control_known);
        let homes: Vec<(&str, &str, u64, i64)> =
            d.homes.iter().map(|h| (h.home.as_str(), h.holder.as_str(), h.epoch, h.expires_in_ms)).collect();
        assert_eq!(homes, [(AP, EU, 2, 500), (US, US, 1, 500)]);
        assert_eq!(d.failovers.iter().map(|f| f.at_ms).collect::<Vec<_>>(), [997_000, 996_000]);
        assert_eq!(d.failovers[1].reason, "failover");
        assert_eq!(d.epochs.len(), 2);
        assert_eq!(d.epochs[1].ended_ms, None);

        // Conflicts per table and region; a silent region is null, not 0.
        let c: Vec<(&str, u64, Vec<Option<u64>>)> =
            d.conflicts.iter().map(|c| (c.table.as_str(), c.total, c.per_region.clone())).collect();
        let t = ("t", 7, vec![Some(1), Some(6), None]);
        let u = ("u", 7, vec![Some(0), Some(7), None]);
        assert_eq!(c, [t, u]);
        let json = serde_json::to_value(&d).unwrap();
        assert!(json["pairs"][4]["lag_seconds"].is_null());
    }

    #[test]
    fn history_is_bounded_in_count_and_age_and_records_gaps() {
        let mut history = LagHistory::default();
        let interval = SAMPLE_INTERVAL.as_millis() as u64;
        let mut d = None;
        for i in 0..(HISTORY_SAMPLES_MAX as u64 * 3) {
            d = Some(ClusterData::build(inputs(1_000_000 + i * interval), &mut history));
        }
        let d = d.unwrap();
        assert_eq!(history.len(), HISTORY_SAMPLES_MAX);
        assert_eq!(d.history_at_ms.len(), HISTORY_SAMPLES_MAX);
        assert!(d.history_at_ms.windows(2).all(|w| w[0] < w[1]));
        assert!(
            d.history_at_ms[HISTORY_SAMPLES_MAX - 1] - d.history_at_ms[0]
                <= HISTORY_WINDOW.as_millis() as u64
        );
        assert_eq!(pair(&d, EU, US).history.len(), HISTORY_SAMPLES_MAX);
        assert!(pair(&d, EU, US).history.iter().all(|v| *v == Some(1.5)));

        // A sample at the same time is ignored; after a pause, one gap sample.
        let last = *d.history_at_ms.last().unwrap();
        ClusterData::build(inputs(last), &mut history);
        assert_eq!(history.times().last(), Some(&last));
        let later = last + 60_000;
        let d = ClusterData::build(inputs(later), &mut history);
        let n = d.history_at_ms.len();
        assert_eq!(&d.history_at_ms[n - 2..], &[last + interval, later]);
        assert_eq!(&pair(&d, EU, US).history[n - 2..], &[None, Some(1.5)]);

        // After a window of silence, only the gap and the new sample remain.
        let much_later = later + HISTORY_WINDOW.as_millis() as u64 * 2;
        let d = ClusterData::build(inputs(much_later), &mut history);
        assert_eq!(d.history_at_ms, [much_later]);
        assert_eq!(pair(&d, EU, US).history, [Some(1.5)]);
    }
}
