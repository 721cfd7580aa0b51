//! The client's IO side of routing: one lazily connected channel per node,
//! the topology learnt from any seed and refreshed, a round-trip estimate
//! and a circuit breaker per region, and the loop that carries a call
//! through the regions [`crate::routing::plan`] orders (docs/architecture.md
//! section 14).
//!
//! A pinned client (one endpoint, no discovery) uses the same loop with a
//! single target, so both kinds retry, back off and report errors alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use geokv_net::channel::{Channels, Expect};
use geokv_proto::reasons;
use geokv_proto::v1 as pb;
use pb::admin_client::AdminClient;
use pb::control_client::ControlClient;
use pb::kv_client::KvClient;
use tonic::transport::Channel;

use crate::routing::{self, Placement, RegionView, RowOp, Topology};
use crate::{ClientConfig, Error, Row};

/// The gRPC stubs of one node.
#[derive(Clone)]
pub(crate) struct Stubs {
    pub kv: KvClient<Channel>,
    pub admin: AdminClient<Channel>,
    pub control: ControlClient<Channel>,
    health: tonic_health::pb::health_client::HealthClient<Channel>,
}

impl Stubs {
    fn new(channel: Channel) -> Self {
        Self {
            kv: KvClient::new(channel.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            admin: AdminClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            control: ControlClient::new(channel.clone()),
            health: tonic_health::pb::health_client::HealthClient::new(channel),
        }
    }
}

/// What a call is about, for choosing where it goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Route<'a> {
    Row(&'a Row, RowOp),
    /// A table-wide call (a scan): a region of the table's zone.
    Table(&'a str),
    /// Cluster administration: the nearest region.
    Any,
}

/// One place a call may be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// "" for a pinned client's endpoint.
    region: String,
    addr: String,
    node: Option<String>,
}

/// Per-region health as this client measured it.
#[derive(Debug, Clone, Default)]
struct Health {
    rtt: Option<Duration>,
    failures: u32,
    open_until: Option<Instant>,
}

impl Health {
    fn view(&self, now: Instant) -> RegionView {
        RegionView { open: self.open_until.is_some_and(|t| t > now) || self.failures > 0, rtt: self.rtt }
    }
}

#[derive(Default)]
struct State {
    topology: Option<Arc<Topology>>,
    health: HashMap<String, Health>,
    /// Region to client address, given by the caller as `region=addr`
    /// seeds: used instead of the addresses the topology lists (a proxy, a
    /// NAT, an emulated WAN in `geokv dev --client-region`).
    overrides: HashMap<String, String>,
    refreshed_at: Option<Instant>,
}

pub(crate) struct Router {
    cfg: ClientConfig,
    channels: Channels,
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    state: RwLock<State>,
    stubs: Mutex<HashMap<String, Stubs>>,
    /// One topology refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
}

/// A seed as given: `host:port`, `http://host:port` or `region=host:port`.
pub(crate) fn parse_seed(seed: &str) -> (Option<String>, String) {
    match seed.split_once('=') {
        Some((region, addr)) if !region.is_empty() && !region.contains(':') => {
            (Some(region.trim().to_string()), addr.trim().to_string())
        }
        _ => (None, seed.trim().to_string()),
    }
}

/// Weight of a new round-trip sample in the moving average.
const RTT_WEIGHT: f64 = 0.3;

impl Router {
    pub(crate) fn new(
        cfg: ClientConfig,
        channels: Channels,
        bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    ) -> Arc<Self> {
        let overrides = cfg
            .seeds
            .iter()
            .filter_map(|s| match parse_seed(s) {
                (Some(region), addr) => Some((region, addr)),
                _ => None,
            })
            .collect();
        Arc::new(Self {
            cfg,
            channels,
            bearer,
            state: RwLock::new(State { overrides, ..State::default() }),
            stubs: Mutex::new(HashMap::new()),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    pub(crate) fn region_aware(&self) -> bool {
        !self.cfg.seeds.is_empty()
    }

    pub(crate) fn request<T>(&self, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        if let Some(b) = &self.bearer {
            r.metadata_mut().insert("authorization", b.clone());
        }
        r
    }

    /// The stubs for `target`, made on first use. With TLS, the node must
    /// prove it is the region's node the client meant to reach.
    fn stubs(&self, target: &Target) -> Result<Stubs, Error> {
        let mut map = self.stubs.lock().map_err(|_| Error::local("client state poisoned".into()))?;
        if let Some(s) = map.get(&target.addr) {
            return Ok(s.clone());
        }
        let expect = (!target.region.is_empty() && self.channels.tls().is_some())
            .then(|| Expect { region: target.region.clone(), node: target.node.clone() });
        let channel = self.channels.lazy(&target.addr, expect).map_err(|e| Error::local(e.to_string()))?;
        let stubs = Stubs::new(channel);
        map.insert(target.addr.clone(), stubs.clone());
        Ok(stubs)
    }

    /// The pinned endpoint's stubs, connected now so a wrong address fails
    /// at connect time.
    pub(crate) async fn connect_pinned(&self) -> Result<(), Error> {
        let target = Target { region: String::new(), addr: self.cfg.endpoint.clone(), node: None };
        let channel = self.channels.connect(&target.addr, None).await.map_err(|e| match e {
            geokv_net::channel::ChannelError::Connect { source, .. } => {
                Error::transport(&crate::normalize(&target.addr), source)
            }
            other => Error::local(other.to_string()),
        })?;
        if let Ok(mut map) = self.stubs.lock() {
            map.insert(target.addr.clone(), Stubs::new(channel));
        }
        Ok(())
    }

    fn topology(&self) -> Option<Arc<Topology>> {
        self.state.read().ok().and_then(|s| s.topology.clone())
    }

    /// The current topology, if discovery has succeeded.
    pub(crate) fn current_topology(&self) -> Option<Arc<Topology>> {
        self.topology()
    }

    fn view(&self) -> impl Fn(&str) -> RegionView + '_ {
        let now = Instant::now();
        let health: HashMap<String, RegionView> = self
            .state
            .read()
            .map(|s| s.health.iter().map(|(r, h)| (r.clone(), h.view(now))).collect())
            .unwrap_or_default();
        move |r: &str| health.get(r).copied().unwrap_or_default()
    }

    /// The client's view of every region it knows (for status output and
    /// tests): open breaker and round trip.
    pub(crate) fn region_views(&self) -> Vec<(String, RegionView)> {
        let Some(t) = self.topology() else { return Vec::new() };
        let view = self.view();
        t.region_order.iter().map(|r| (r.clone(), view(r))).collect()
    }

    fn target(&self, t: &Topology, region: &str, partition: Option<u32>) -> Option<Target> {
        let overridden = self.state.read().ok().and_then(|s| s.overrides.get(region).cloned());
        let nodes = &t.regions.get(region)?.nodes;
        if let Some(addr) = overridden {
            return Some(Target { region: region.into(), addr, node: None });
        }
        let addr = t.node_for(region, partition)?.to_string();
        let node = nodes.iter().find(|(_, a)| *a == addr).map(|(id, _)| id.clone());
        Some(Target { region: region.into(), addr, node })
    }

    /// Where a call goes, in order, and the placement of its row (None for
    /// calls without a row or rows the client cannot place).
    fn plan(&self, route: Route<'_>) -> (Vec<Target>, Option<Placement>) {
        let Some(t) = self.topology().filter(|_| self.region_aware()) else {
            return (
                vec![Target { region: String::new(), addr: self.cfg.endpoint.clone(), node: None }],
                None,
            );
        };
        let local = self.cfg.local_region.as_deref();
        let view = self.view();
        let (regions, partition, placement) = match route {
            Route::Row(row, op) => match t.placement(row, local) {
                Some(p) => (routing::plan(&p, op, local, &view), Some(p.partition), Some(p)),
                None => (routing::by_nearness(&t.region_order, local, &view), None, None),
            },
            Route::Table(table) => (routing::by_nearness(&t.scan_regions(table), local, &view), None, None),
            Route::Any => (routing::by_nearness(&t.region_order, local, &view), None, None),
        };
        let targets = regions.iter().filter_map(|r| self.target(&t, r, partition)).collect();
        (targets, placement)
    }

    fn record(&self, region: &str, ok: bool) {
        if region.is_empty() {
            return;
        }
        if let Ok(mut s) = self.state.write() {
            let h = s.health.entry(region.to_string()).or_default();
            if ok {
                h.failures = 0;
                h.open_until = None;
            } else {
                h.failures = h.failures.saturating_add(1);
                let exp = h.failures.saturating_sub(1).min(8);
                let wait = self.cfg.breaker_open.saturating_mul(1 << exp).min(self.cfg.breaker_open_max);
                h.open_until = Some(Instant::now() + wait);
            }
        }
    }

    fn record_rtt(&self, region: &str, rtt: Duration) {
        if let Ok(mut s) = self.state.write() {
            let h = s.health.entry(region.to_string()).or_default();
            h.rtt = Some(match h.rtt {
                None => rtt,
                Some(old) => old.mul_f64(1.0 - RTT_WEIGHT) + rtt.mul_f64(RTT_WEIGHT),
            });
        }
    }

    /// Carries a call: each target in plan order, a bounded number of
    /// rounds, within the configured total deadline. A failure that says
    /// the region (not the request) is at fault opens that region's breaker
    /// and moves on; any other failure ends the call. The message, and so
    /// its idempotency key, is the same in every attempt.
    pub(crate) async fn run<T, F, Fut>(&self, route: Route<'_>, mut call: F) -> Result<T, Error>
    where
        F: FnMut(Stubs, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        let mut backoff = self.cfg.retry_backoff;
        let mut last: Option<Error> = None;
        let mut placement = None;
        let mut tried: Vec<String> = Vec::new();
        for round in 0..=self.cfg.retries_max {
            let (targets, p) = self.plan(route);
            placement = p;
            // Whether every attempt of this round found its region down.
            let mut all_down = !targets.is_empty();
            for target in targets {
                let left = self.cfg.deadline.saturating_sub(started.elapsed());
                if left.is_zero() {
                    break;
                }
                let stubs = self.stubs(&target)?;
                let sent = Instant::now();
                let result = call(stubs, self.cfg.timeout.min(left)).await;
                match result {
                    Ok(v) => {
                        self.record(&target.region, true);
                        if !target.region.is_empty() && route_is_cheap(route) {
                            self.record_rtt(&target.region, sent.elapsed());
                        }
                        return Ok(v);
                    }
                    Err(status) => {
                        let transport =
                            status.code() == tonic::Code::Unknown && status.message().contains("transport");
                        let mut err = Error::from(status);
                        if transport || err.code == tonic::Code::Unavailable && err.reason.is_none() {
                            err = crate::with_tls_hint(&self.cfg, err);
                        }
                        if !target.region.is_empty() && !tried.contains(&target.region) {
                            tried.push(target.region.clone());
                        }
                        let region_fault = region_at_fault(&err);
                        if region_fault {
                            self.record(&target.region, false);
                        }
                        all_down &= region_fault;
                        if err.metadata.contains_key("holder") || err.reason.as_deref() == Some("NOT_HOME") {
                            // The node knows a newer holder: learn it before the next round.
                            self.refresh_soon().await;
                        }
                        // A region at fault sends a region-aware call to the
                        // next region (the same message and idempotency key,
                        // so a write the dead region did apply counts once).
                        let next_region = region_fault && self.region_aware();
                        if !err.is_transient() && !next_region {
                            return Err(err);
                        }
                        tracing::debug!(region = %target.region, error = %err, "trying the next region");
                        last = Some(err);
                    }
                }
            }
            // A region-aware client that found every region it may use down
            // says so now: its breakers stay open until a probe succeeds.
            let give_up = all_down && self.region_aware();
            if give_up || round == self.cfg.retries_max || started.elapsed() >= self.cfg.deadline {
                break;
            }
            tokio::time::sleep(backoff.min(self.cfg.deadline.saturating_sub(started.elapsed()))).await;
            backoff = backoff.saturating_mul(2);
            if self.region_aware() {
                self.refresh_soon().await;
            }
        }
        Err(self.exhausted(last, placement.as_ref(), &tried))
    }

    /// The error of a call that no target took.
    fn exhausted(&self, last: Option<Error>, placement: Option<&Placement>, tried: &[String]) -> Error {
        let last = last.unwrap_or_else(|| {
            Error::client_side(
                &reasons::UNREACHABLE,
                format!("no attempt fit in the call's deadline of {:?}", self.cfg.deadline),
            )
        });
        match placement {
            Some(p) if !p.zone.is_empty() && region_at_fault(&last) => {
                let mut e = Error::client_side(
                    &reasons::ZONE_UNREACHABLE,
                    format!(
                        "no region of zone `{}` that may hold this row is reachable (allowed: {}; tried: \
                         {}); the client never sends the row elsewhere. Last failure: {last}",
                        p.zone,
                        p.replicas.join(", "),
                        tried.join(", ")
                    ),
                );
                e.metadata.insert("zone".into(), p.zone.clone());
                e.metadata.insert("allowed_regions".into(), p.replicas.join(","));
                e
            }
            _ => last,
        }
    }

    /// Refreshes the topology unless another call did so very recently.
    async fn refresh_soon(&self) {
        let fresh = self
            .state
            .read()
            .ok()
            .and_then(|s| s.refreshed_at)
            .is_some_and(|t| t.elapsed() < Duration::from_millis(200));
        if !fresh {
            let _ = self.refresh().await;
        }
    }

    /// Asks the nearest reachable region (then the seeds) for the topology.
    pub(crate) async fn refresh(&self) -> Result<(), Error> {
        let _one = self.refreshing.lock().await;
        let mut candidates: Vec<Target> = Vec::new();
        if let Some(t) = self.topology() {
            let view = self.view();
            for r in routing::by_nearness(&t.region_order, self.cfg.local_region.as_deref(), &view) {
                candidates.extend(self.target(&t, &r, None));
            }
        }
        for seed in &self.cfg.seeds {
            let (region, addr) = parse_seed(seed);
            candidates.push(Target { region: region.unwrap_or_default(), addr, node: None });
        }
        let mut last = None;
        for target in candidates {
            let stubs = self.stubs(&target)?;
            let mut control = stubs.control.clone();
            let req = self.request(pb::TopologyRequest {}, self.cfg.timeout.min(Duration::from_secs(3)));
            match control.topology(req).await {
                Ok(resp) => {
                    let t = Topology::from_proto(resp.into_inner());
                    if let Ok(mut s) = self.state.write() {
                        s.topology = Some(Arc::new(t));
                        s.refreshed_at = Some(Instant::now());
                    }
                    return Ok(());
                }
                Err(status) => {
                    let err = Error::from(status);
                    if !region_at_fault(&err) {
                        // Not a reachability problem (credentials, an old
                        // server): asking elsewhere will not help.
                        return Err(err);
                    }
                    self.record(&target.region, false);
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::local("no seed endpoints given".into())))
    }

    /// Pings every region at once (health check), updating round trips
    /// and breakers; a region whose breaker is open is probed the same way.
    pub(crate) async fn ping_all(self: &Arc<Self>) {
        let Some(t) = self.topology() else { return };
        let mut pings = tokio::task::JoinSet::new();
        for target in t.region_order.iter().filter_map(|r| self.target(&t, r, None)) {
            let router = self.clone();
            pings.spawn(async move {
                let Ok(stubs) = router.stubs(&target) else { return };
                let mut health = stubs.health.clone();
                let timeout = router.cfg.ping_timeout;
                let req =
                    router.request(tonic_health::pb::HealthCheckRequest { service: String::new() }, timeout);
                let sent = Instant::now();
                match tokio::time::timeout(timeout, health.check(req)).await {
                    Ok(Ok(_)) => {
                        router.record_rtt(&target.region, sent.elapsed());
                        router.record(&target.region, true);
                    }
                    _ => router.record(&target.region, false),
                }
            });
        }
        while pings.join_next().await.is_some() {}
    }
}

/// Calls whose round trip says something about the network, not the work
/// done: a write at STRONG or QUORUM measures consensus, not the region.
fn route_is_cheap(route: Route<'_>) -> bool {
    matches!(route, Route::Row(_, RowOp::Read(crate::ReadConsistency::Local)) | Route::Any)
}

/// Whether a failure says the region (its node, or the way to it) is at
/// fault, rather than the request or the row's home: a failed connection,
/// a deadline, a node going away, or an UNAVAILABLE with no geokv reason
/// (a proxy, a dead HTTP/2 connection).
pub(crate) fn region_at_fault(err: &Error) -> bool {
    match err.reason.as_deref() {
        Some(r) if r == reasons::UNREACHABLE.name || r == reasons::SHUTTING_DOWN.name => true,
        Some(_) => false,
        None => matches!(
            err.code,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
    }
}

/// Keeps the router's view fresh while any client holding it lives: pings
/// every region each `ping_interval`, refreshes the topology each
/// `refresh_interval`. Ends when the last client is dropped.
pub(crate) fn spawn_background(router: &Arc<Router>) {
    let weak: Weak<Router> = Arc::downgrade(router);
    let (ping_every, refresh_every) = (router.cfg.ping_interval, router.cfg.refresh_interval);
    tokio::spawn(async move {
        let mut last_refresh = Instant::now();
        loop {
            tokio::time::sleep(ping_every).await;
            let Some(router) = weak.upgrade() else { return };
            router.ping_all().await;
            if last_refresh.elapsed() >= refresh_every {
                let _ = router.refresh().await;
                last_refresh = Instant::now();
            }
        }
    });
}
