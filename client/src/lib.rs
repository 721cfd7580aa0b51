//! The Rust client of geokv.
//!
//! It speaks the `geokv.v1` gRPC API and never depends on the server crate,
//! so a service adding it does not compile RocksDB.
//!
//! # Layout
//! - [`Client`]: typed operations (registers with siblings and causal
//!   contexts, counters, sets, scans, batches, node status), per-attempt
//!   deadlines, and bounded retries of transient failures. Every write carries
//!   an idempotency key (one is generated when the caller gives none), so a
//!   retried counter add counts once.
//! - [`Row`]: which row, and how it is homed.
//! - [`Error`]: a failed call with its gRPC code and geokv's stable reason.
//!
//! ```no_run
//! # async fn demo() -> Result<(), geokv_client::Error> {
//! use geokv_client::{Client, Row, WriteOptions};
//! let client = Client::connect("http://127.0.0.1:7700").await?;
//! let row = Row::new("default", "user:1");
//! client.put(&row, b"hello".to_vec(), WriteOptions::default()).await?;
//! let got = client.get(&row, Default::default()).await?;
//! assert_eq!(got.values(), vec![b"hello".to_vec()]);
//! # Ok(()) }
//! ```

mod error;
mod router;
pub mod routing;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use geokv_net::channel::{ChannelSettings, Channels, Dialer};
use geokv_net::tls::{Tls, TlsFiles};
use geokv_proto::v1 as pb;
use pb::admin_client::AdminClient;
use pb::control_client::ControlClient;
use router::{Route, Router, Stubs};
use routing::RowOp;
use std::path::PathBuf;
use tonic::transport::Channel;

pub use error::Error;
pub use geokv_proto::v1 as proto;

/// Write levels; see the README for what each guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    Local,
    Eventual,
    Quorum,
    Strong,
}

impl Consistency {
    fn to_proto(self) -> i32 {
        (match self {
            Consistency::Local => pb::WriteConsistency::WriteLocal,
            Consistency::Eventual => pb::WriteConsistency::WriteEventual,
            Consistency::Quorum => pb::WriteConsistency::WriteQuorum,
            Consistency::Strong => pb::WriteConsistency::WriteStrong,
        }) as i32
    }
}

impl std::str::FromStr for Consistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "local" => Ok(Consistency::Local),
            "eventual" => Ok(Consistency::Eventual),
            "quorum" => Ok(Consistency::Quorum),
            "strong" => Ok(Consistency::Strong),
            other => {
                Err(format!("unknown write consistency `{other}`: use local, eventual, quorum or strong"))
            }
        }
    }
}

/// Read levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    #[default]
    Local,
    /// Served locally when at most this stale, else from the home region.
    Bounded(Duration),
    /// Read-your-writes and monotonic reads for this client.
    Session,
    Quorum,
    Strong,
}

impl ReadConsistency {
    fn to_proto(self) -> (i32, u64) {
        match self {
            ReadConsistency::Local => (pb::ReadConsistency::ReadLocal as i32, 0),
            ReadConsistency::Bounded(d) => (pb::ReadConsistency::ReadBounded as i32, d.as_millis() as u64),
            ReadConsistency::Session => (pb::ReadConsistency::ReadSession as i32, 0),
            ReadConsistency::Quorum => (pb::ReadConsistency::ReadQuorum as i32, 0),
            ReadConsistency::Strong => (pb::ReadConsistency::ReadStrong as i32, 0),
        }
    }
}

impl std::str::FromStr for ReadConsistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        if let Some(ms) = lower.strip_prefix("bounded:") {
            let ms: u64 =
                ms.trim_end_matches("ms").parse().map_err(|_| format!("bad staleness bound in `{s}`"))?;
            return Ok(ReadConsistency::Bounded(Duration::from_millis(ms)));
        }
        match lower.as_str() {
            "local" => Ok(ReadConsistency::Local),
            "session" => Ok(ReadConsistency::Session),
            "quorum" => Ok(ReadConsistency::Quorum),
            "strong" => Ok(ReadConsistency::Strong),
            other => Err(format!(
                "unknown read consistency `{other}`: use local, bounded:<ms>, session, quorum or strong"
            )),
        }
    }
}

/// How a row finds its home region.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Locality {
    #[default]
    TableDefault,
    HomeRegion(String),
    /// A value such as a country code that the table maps to a region.
    Value(String),
}

/// Identifies one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub table: String,
    pub key: Vec<u8>,
    pub locality: Locality,
}

impl Row {
    pub fn new(table: impl Into<String>, key: impl Into<Vec<u8>>) -> Self {
        Self { table: table.into(), key: key.into(), locality: Locality::TableDefault }
    }

    /// Homes the row in an explicit region.
    pub fn home(mut self, region: impl Into<String>) -> Self {
        self.locality = Locality::HomeRegion(region.into());
        self
    }

    /// Homes the row by a locality value (e.g. a country code).
    pub fn locality(mut self, value: impl Into<String>) -> Self {
        self.locality = Locality::Value(value.into());
        self
    }

    /// The row a request names.
    pub fn from_proto(r: &pb::RowRef) -> Self {
        let locality = match &r.locality {
            None => Locality::TableDefault,
            Some(pb::row_ref::Locality::HomeRegion(h)) => Locality::HomeRegion(h.clone()),
            Some(pb::row_ref::Locality::LocalityValue(v)) => Locality::Value(v.clone()),
        };
        Self { table: r.table.clone(), key: r.key.clone(), locality }
    }

    /// The row as a request names it (for building [`Client::batch`] operations).
    pub fn to_proto(&self) -> pb::RowRef {
        let locality = match &self.locality {
            Locality::TableDefault => None,
            Locality::HomeRegion(r) => Some(pb::row_ref::Locality::HomeRegion(r.clone())),
            Locality::Value(v) => Some(pb::row_ref::Locality::LocalityValue(v.clone())),
        };
        pb::RowRef { table: self.table.clone(), key: self.key.clone(), locality }
    }
}

/// Opaque causal context: what a read saw. Pass it to the next write so the
/// write supersedes exactly those values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CausalContext(pub Vec<u8>);

impl CausalContext {
    /// The context as URL-safe base64, for command lines and logs.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.0)
    }

    pub fn from_base64(s: &str) -> Result<Self, Error> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim())
            .map(CausalContext)
            .map_err(|e| Error::local(format!("context is not base64: {e}")))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Options of a write.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// None uses the table's default level.
    pub consistency: Option<Consistency>,
    /// The context of an earlier read; None means "saw nothing".
    pub context: Option<CausalContext>,
    /// Makes a retried write apply once. Generated when None.
    pub idempotency_key: Option<String>,
    /// Puts only: how long the value lives, from the write's time; None
    /// uses the table's default (`ttl_s`). Whole milliseconds, at least 1.
    pub ttl: Option<std::time::Duration>,
}

impl WriteOptions {
    pub fn consistency(mut self, c: Consistency) -> Self {
        self.consistency = Some(c);
        self
    }

    pub fn context(mut self, c: CausalContext) -> Self {
        self.context = Some(c);
        self
    }

    pub fn idempotency_key(mut self, k: impl Into<String>) -> Self {
        self.idempotency_key = Some(k.into());
        self
    }

    pub fn ttl(mut self, ttl: std::time::Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// One concurrent value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling {
    pub value: Vec<u8>,
    pub hlc: u64,
    pub origin: String,
}

/// How a read was served.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadInfo {
    pub served_by_region: String,
    pub staleness_ms_max: u64,
}

/// The result of a register read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetResult {
    pub found: bool,
    pub siblings: Vec<Sibling>,
    pub context: CausalContext,
    pub info: ReadInfo,
}

impl GetResult {
    /// The values, one per sibling.
    pub fn values(&self) -> Vec<Vec<u8>> {
        self.siblings.iter().map(|s| s.value.clone()).collect()
    }
}

/// A durable-write acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteAck {
    pub context: CausalContext,
    pub hlc: u64,
    pub home_region: String,
    pub epoch: u64,
    pub accepted_by_region: String,
    /// True when the server replayed the reply of an earlier attempt.
    pub replayed: bool,
    /// STRONG writes: the version the write produced (0 otherwise).
    pub version: u64,
}

/// The outcome of a compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasResult {
    /// True when the expectation held and the write happened.
    pub succeeded: bool,
    /// When it did not: the current value and version (None = absent).
    pub current: Option<(Vec<u8>, u64)>,
    pub ack: WriteAck,
}

/// A set's members and the context to remove exactly what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetResult {
    pub found: bool,
    pub members: Vec<Vec<u8>>,
    pub context: CausalContext,
}

/// A page of scanned rows.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanPage {
    pub rows: Vec<pb::ScanRow>,
    /// Pass as `start_after` to continue; None when the scan is complete.
    pub next_start_after: Option<Vec<u8>>,
}

/// Client settings.
///
/// Two kinds of client share them. A *pinned* client ([`ClientConfig::new`])
/// sends every call to one endpoint, whose node routes it onwards. A
/// *region-aware* client ([`ClientConfig::discover`]) learns every region,
/// table policy and home holder from any of its seeds, and sends each call
/// straight to the region that should serve it: reads to the nearest region
/// allowed to hold the row, LOCAL writes to the home's holder, failing over
/// to the next region when one is down, and never to a region outside the
/// row's residency zone (docs/architecture.md section 14).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` or `host:port`: the pinned endpoint, or the first seed.
    pub endpoint: String,
    /// Seed endpoints of a region-aware client (any regions; empty: pinned).
    /// A seed written `region=host:port` also fixes the address used for
    /// that region (a proxy or NAT in front of it) instead of the one the
    /// cluster lists.
    pub seeds: Vec<String>,
    /// The region this client runs in: preferred for reads and for writes
    /// any region may take, while it is healthy.
    pub local_region: Option<String>,
    /// Deadline of one attempt.
    pub timeout: Duration,
    /// Deadline of a whole call, across attempts and regions.
    pub deadline: Duration,
    /// How often a region-aware client pings every region (round trips,
    /// and probing regions whose breaker is open).
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// How often a region-aware client refreshes the topology (also done
    /// on a routing error).
    pub refresh_interval: Duration,
    /// How long a failed region is avoided at first; doubled per further
    /// failure up to `breaker_open_max`. A successful probe closes it.
    pub breaker_open: Duration,
    pub breaker_open_max: Duration,
    pub connect_timeout: Duration,
    /// Extra attempts after a transient failure (Unavailable, deadline, transport).
    pub retries_max: u32,
    /// Delay before the first retry; doubled per retry.
    pub retry_backoff: Duration,
    /// Directory with the cluster's `ca.crt` and this user's
    /// `client.<user>.crt`/`.key` (`geokv cert create-client`). None:
    /// plaintext, for nodes run with `--insecure` or on loopback without
    /// certificates.
    pub certs_dir: Option<PathBuf>,
    /// The user whose client certificate is presented (default `root`).
    pub user: String,
    /// A bearer token sent instead of a client certificate (TLS still
    /// verifies the node against `ca.crt`).
    pub token: Option<String>,
}

impl ClientConfig {
    /// Defaults, with TLS settings from the environment: `GEOKV_CERTS_DIR`,
    /// `GEOKV_USER` and `GEOKV_TOKEN`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            endpoint: endpoint.into(),
            seeds: Vec::new(),
            local_region: None,
            timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(15),
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_millis(1500),
            refresh_interval: Duration::from_secs(10),
            breaker_open: Duration::from_millis(500),
            breaker_open_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            retries_max: 3,
            retry_backoff: Duration::from_millis(50),
            certs_dir: env("GEOKV_CERTS_DIR").map(PathBuf::from),
            user: env("GEOKV_USER").unwrap_or_else(|| "root".into()),
            token: env("GEOKV_TOKEN"),
        }
    }

    /// A region-aware client that learns the cluster from `seeds` (any
    /// regions' client endpoints; `region=host:port` also fixes that
    /// region's address). Other settings as [`ClientConfig::new`].
    pub fn discover<S: Into<String>>(seeds: impl IntoIterator<Item = S>) -> Self {
        let seeds: Vec<String> = seeds.into_iter().map(Into::into).collect();
        let first = seeds.first().map(|s| router::parse_seed(s).1).unwrap_or_default();
        Self { seeds, ..Self::new(first) }
    }

    /// Prefers `region` while it is healthy.
    pub fn local_region(mut self, region: impl Into<String>) -> Self {
        self.local_region = Some(region.into());
        self
    }

    /// The same, over TLS with the certificates in `dir`.
    pub fn with_certs_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.certs_dir = Some(dir.into());
        self
    }

    /// The channel maker these settings describe.
    fn channels(&self) -> Result<Channels, Error> {
        let settings = ChannelSettings { connect_timeout: self.connect_timeout, ..ChannelSettings::CLIENT };
        let Some(dir) = &self.certs_dir else {
            return Ok(Channels::plaintext(settings));
        };
        let files =
            if self.token.is_some() { TlsFiles::ca_only(dir) } else { TlsFiles::client(dir, &self.user) };
        let tls = Tls::load(files).map_err(|e| Error::local(format!("TLS: {e}")))?;
        Ok(Channels::new(settings, Dialer::tcp(), Some(tls)))
    }
}

/// A geokv client: pinned to one node (which routes to the others), or
/// region-aware (see [`ClientConfig`]). Cloning is cheap and shares the
/// connections, the topology and the session.
#[derive(Clone)]
pub struct Client {
    router: Arc<Router>,
    cfg: ClientConfig,
    /// Session token from the last acknowledged write or read, sent with
    /// SESSION reads.
    session: Arc<Mutex<Vec<u8>>>,
}

/// Merges two session tokens (per region, the higher log position). A token
/// that does not decode is replaced by the other, so a bad token cannot wedge
/// a session; the server rejects malformed tokens it is sent.
pub fn merge_session_tokens(a: &[u8], b: &[u8]) -> Vec<u8> {
    use geokv_proto::envelope::{open_message, seal_message};
    use geokv_proto::storage::SessionToken;
    let Ok(mut left) = open_message::<SessionToken>(a) else { return b.to_vec() };
    let Ok(right) = open_message::<SessionToken>(b) else { return a.to_vec() };
    for e in right.seen {
        match left.seen.iter_mut().find(|x| x.actor == e.actor) {
            Some(x) => x.counter = x.counter.max(e.counter),
            None => left.seen.push(e),
        }
    }
    left.seen.sort_by(|x, y| x.actor.cmp(&y.actor));
    seal_message(&left)
}

/// A TLS node closes a plaintext connection without a word: say what to do.
fn with_tls_hint(cfg: &ClientConfig, mut err: Error) -> Error {
    if cfg.certs_dir.is_none() {
        err.message.push_str(
            " (geokv nodes speak TLS unless run with --insecure: give the certificates with --certs-dir \
             or GEOKV_CERTS_DIR)",
        );
    }
    err
}

fn normalize(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

impl Client {
    /// Connects with default settings.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, Error> {
        Self::with_config(ClientConfig::new(endpoint)).await
    }

    /// Connects with `cfg`: a pinned client connects to its endpoint now; a
    /// region-aware one asks its seeds for the topology, pings every region
    /// once, and keeps both fresh in the background while it lives.
    pub async fn with_config(cfg: ClientConfig) -> Result<Self, Error> {
        let bearer = match &cfg.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
                    .map_err(|_| Error::local("the token must be printable ASCII".to_string()))?,
            ),
            None => None,
        };
        if let Some(region) = &cfg.local_region {
            if region.trim().is_empty() {
                return Err(Error::local("the local region is empty".into()));
            }
        }
        let router = Router::new(cfg.clone(), cfg.channels()?, bearer);
        if router.region_aware() {
            router.refresh().await.map_err(|e| with_tls_hint(&cfg, e))?;
            if let (Some(local), Some(t)) = (&cfg.local_region, router.current_topology()) {
                if !t.region_order.contains(local) {
                    return Err(Error::local(format!(
                        "local region `{local}` is not a region of this cluster (regions: {})",
                        t.region_order.join(", ")
                    )));
                }
            }
            router.ping_all().await;
            router::spawn_background(&router);
        } else {
            router.connect_pinned().await.map_err(|e| with_tls_hint(&cfg, e))?;
        }
        Ok(Self { router, cfg, session: Arc::new(Mutex::new(Vec::new())) })
    }

    /// A region-aware client from `seeds`, preferring `local_region`.
    pub async fn discover<S: Into<String>>(
        seeds: impl IntoIterator<Item = S>,
        local_region: Option<&str>,
    ) -> Result<Self, Error> {
        let mut cfg = ClientConfig::discover(seeds);
        cfg.local_region = local_region.map(String::from);
        Self::with_config(cfg).await
    }

    /// The topology a region-aware client routes by (None for a pinned one).
    pub fn topology(&self) -> Option<Arc<routing::Topology>> {
        self.router.current_topology()
    }

    /// Where a region-aware client would send a call on `row`, in order of
    /// preference (empty for a pinned client or a row it cannot place).
    pub fn plan_for(&self, row: &Row, write: bool) -> Vec<String> {
        let Some(t) = self.topology() else { return Vec::new() };
        let Some(p) = t.placement(row, self.cfg.local_region.as_deref()) else { return Vec::new() };
        let views: std::collections::HashMap<String, routing::RegionView> =
            self.router.region_views().into_iter().collect();
        let op = if write { RowOp::Write(None) } else { RowOp::Read(ReadConsistency::Local) };
        routing::plan(&p, op, self.cfg.local_region.as_deref(), &|r| {
            views.get(r).copied().unwrap_or_default()
        })
    }

    /// Every known region with this client's view of it: whether its
    /// breaker is open and the measured round trip.
    pub fn region_health(&self) -> Vec<(String, routing::RegionView)> {
        self.router.region_views()
    }

    /// The session token this client holds (for handing to another client).
    pub fn session_token(&self) -> Vec<u8> {
        self.session.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Replaces the session token (e.g. with one handed over from another client).
    pub fn set_session_token(&self, token: Vec<u8>) {
        if let Ok(mut s) = self.session.lock() {
            *s = token;
        }
    }

    /// Folds a token from a response into the one this client holds, taking
    /// the highest position per region, so a write in one region does not
    /// forget what the session saw in another.
    fn remember(&self, token: &[u8]) {
        if token.is_empty() {
            return;
        }
        if let Ok(mut held) = self.session.lock() {
            *held = merge_session_tokens(&held, token);
        }
    }

    /// Runs `call` through the router: a per-attempt deadline, bounded
    /// retries of transient failures, and (region-aware) the next region
    /// when one is down.
    async fn attempt<T, F, Fut>(&self, route: Route<'_>, call: F) -> Result<T, Error>
    where
        F: FnMut(Stubs, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.router.run(route, call).await
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> tonic::Request<T> {
        self.router.request(msg, timeout)
    }

    fn idempotency(opts: &WriteOptions) -> String {
        opts.idempotency_key.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
    }

    fn ack(&self, a: Option<pb::WriteAck>) -> WriteAck {
        let a = a.unwrap_or_default();
        self.remember(&a.session_token);
        WriteAck {
            context: CausalContext(a.context),
            hlc: a.hlc,
            home_region: a.home_region,
            epoch: a.epoch,
            accepted_by_region: a.accepted_by_region,
            replayed: a.replayed,
            version: a.version,
        }
    }

    fn info(&self, i: Option<pb::ReadInfo>) -> ReadInfo {
        let i = i.unwrap_or_default();
        self.remember(&i.session_token);
        ReadInfo { served_by_region: i.served_by_region, staleness_ms_max: i.staleness_ms_max }
    }

    fn read_fields(&self, level: ReadConsistency) -> (i32, u64, Vec<u8>) {
        let (c, ms) = level.to_proto();
        let token = if level == ReadConsistency::Session { self.session_token() } else { Vec::new() };
        (c, ms, token)
    }

    /// Reads a register row: its siblings and causal context.
    pub async fn get(&self, row: &Row, level: ReadConsistency) -> Result<GetResult, Error> {
        let (consistency, max_staleness_ms, session_token) = self.read_fields(level);
        let msg = pb::GetRequest { row: Some(row.to_proto()), consistency, max_staleness_ms, session_token };
        let resp = self
            .attempt(Route::Row(row, RowOp::Read(level)), |stubs, t| {
                let mut kv = stubs.kv;
                let msg = msg.clone();
                async move { kv.get(self.request(msg, t)).await }
            })
            .await?
            .into_inner();
        Ok(GetResult {
            found: resp.found,
            siblings: resp
                .siblings
                .into_iter()
                .map(|s| Sibling { value: s.value, hlc: s.hlc, origin: s.origin })
                .collect(),
            context: CausalContext(resp.context),
            info: self.info(resp.info),
        })
    }

    /// Writes a value. Without a context it becomes a sibling of whatever
    /// concurrent values exist.
    pub async fn put(&self, row: &Row, value: Vec<u8>, opts: WriteOptions) -> Result<WriteAck, Error> {
        let msg = pb::PutRequest {
            row: Some(row.to_proto()),
            value,
            consistency: opts.consistency.map(Consistency::to_proto).unwrap_or(0),
            context: opts.context.clone().unwrap_or_default().0,
            idempotency_key: Self::idempotency(&opts),
            // Below a millisecond rounds up: 0 would mean the table default.
            ttl_ms: opts.ttl.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)),
        };
        let resp = self
            .attempt(Route::Row(row, RowOp::Write(opts.consistency)), |stubs, t| {
                let mut kv = stubs.kv;
                let msg = msg.clone();
                async move { kv.put(self.request(msg, t)).await }
            })
            .await?
            .into_inner();
        Ok(self.ack(resp.ack))
    }

    /// Deletes the values the context saw (all stored values without one).
    pub async fn delete(&self, row: &Row, opts: WriteOptions) -> Result<WriteAck, Error> {
        let msg = pb::DeleteRequest {
            row: Some(row.to_proto()),
            consistency: opts.consistency.map(Consistency::to_proto).unwrap_or(0),
            context: opts.context.clone().unwrap_or_default().0,
            idempotency_key: Self::idempotency(&opts),
        };
        let resp = self
            .attempt(Route::Row(row, RowOp::Write(opts.consistency)), |stubs, t| {
                let mut kv = stubs.kv;
                let msg = msg.clone();
                async move { kv.delete(self.request(msg, t)).await }
            })
            .await?
            .into_inner();
        Ok(self.ack(resp.ack))
    }

    /// Puts and deletes applied atomically.
    pub async fn batch(
        &self,
        ops: Vec<pb::BatchOp>,
        consistency: Option<Consistency>,
        idempotency_key: Option<String>,
    ) -> Result<Vec<WriteAck>, Error> {
        // Routed by its first row: a batch's rows share a placement or the
        // node refuses it.
        let batch_row = ops
            .first()
            .and_then(|op| match &op.op {
                Some(pb::batch_op::Op::Put(p)) => p.row.as_ref(),
                Some(pb::batch_op::Op::Delete(d)) => d.row.as_ref(),
                None => None,
            })
            .map(Row::from_proto);
        let msg = pb::BatchRequest {
            ops,
            consistency: consistency.map(Consistency::to_proto).unwrap_or(0),
            idempotency_key: idempotency_key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        };
        let resp = self
            .attempt(
                batch_row.as_ref().map_or(Route::Any, |r| Route::Row(r, RowOp::Write(consistency))),
                |stubs, t| {
                    let mut kv = stubs.kv;
                    let msg = msg.clone();
                    async move { kv.batch(self.request(msg, t)).await }
                },
            )
            .await?
            .into_inner();
        Ok(resp.acks.into_iter().map(|a| self.ack(Some(a))).collect())
    }

    /// Opens a change feed of `table`'s rows under `prefix`, served by the
    /// region the client reaches (needs `watch`): every change from any
    /// region, per key in the order applied there, at least once, with a
    /// heartbeat every second. Pass the cursor of the last event handled
    /// to resume after a disconnect (empty: from now on); a cursor older
    /// than the region keeps fails with `CURSOR_COMPACTED`. The stream is
    /// not retried: reopen it with the last cursor.
    pub async fn watch(
        &self,
        table: &str,
        prefix: &[u8],
        cursor: &[u8],
    ) -> Result<tonic::Streaming<pb::WatchEvent>, Error> {
        let msg =
            pb::WatchRequest { table: table.to_string(), prefix: prefix.to_vec(), cursor: cursor.to_vec() };
        let resp = self
            .attempt(Route::Table(table), |stubs, _t| {
                let mut kv = stubs.kv;
                // No deadline: a watch lasts until the caller drops it.
                let msg = msg.clone();
                async move { kv.watch(tonic::Request::new(msg)).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// One page of a table's rows whose keys start with `prefix`.
    pub async fn scan(
        &self,
        table: &str,
        prefix: &[u8],
        start_after: &[u8],
        limit: u32,
    ) -> Result<ScanPage, Error> {
        self.scan_rows(table, prefix, start_after, limit, false).await
    }

    /// [`Client::scan`], listing deleted rows (tombstones, with no values)
    /// too when `include_deleted`.
    pub async fn scan_rows(
        &self,
        table: &str,
        prefix: &[u8],
        start_after: &[u8],
        limit: u32,
        include_deleted: bool,
    ) -> Result<ScanPage, Error> {
        let msg = pb::ScanRequest {
            table: table.to_string(),
            prefix: prefix.to_vec(),
            start_after: start_after.to_vec(),
            limit,
            include_deleted,
        };
        let resp = self
            .attempt(Route::Table(table), |stubs, t| {
                let mut kv = stubs.kv;
                let msg = msg.clone();
                async move { kv.scan(self.request(msg, t)).await }
            })
            .await?
            .into_inner();
        Ok(ScanPage { rows: resp.rows, next_start_after: resp.more.then_some(resp.next_start_after) })
    }

    /// Adds `delta` to a counter; returns its value after the add.
    pub async fn counter_add(
        &self,
        row: &Row,
        delta: i64,
        opts: WriteOptions,
    ) -> Result<(i64, WriteAck), Error> {
        let msg = pb::CounterAddRequest {
            row: Some(row.to_proto()),
            delta,
            consistency: opts.consistency.map(Consistency::to_proto).unwrap_or(0),
            idempotency_key: Self::idempotency(&opts),
        };
        let resp = self
            .attempt(Route::Row(row, RowOp::Write(opts.consistency)), |stubs, t| {
                let mut kv = stubs.kv;
                let msg = msg.clone();
                async move { kv.counter_add(self.request(msg, t)).await }
            })
            .await?
            .into_inner();
        Ok((resp.value, self.ack(resp.ack)))
    }

    /// Reads a counter; None when it was never written.
    pub async fn counter_get(&self, row: &Row, level: ReadConsistency) -> Result<Option<i64>, Error> {
        let (consistency, max_staleness_ms, session_token) = self.read_fields(level);
        let msg =
            pb::CounterGetRequest { row: Some(row.to_proto()), consistency, max_staleness_ms, session_token };
        let resp = self
            .attempt(Route::Row(row, RowOp::Read(level)), |stubs, t| {
                let mut kv = stubs.kv;
                let msg = msg.clone();
                async move { kv.counter_get(self.request(msg, t)).await }
            })
            .await?
            .into_inner();
        self.info(resp.info);
        Ok(resp.found.then_some(resp.value))
    }

    /// Adds members to an add-wins set; returns the members after the add.
    pub async fn set_add(
        &self,
        row: &Row,
        members: Vec<Vec<u8>>,
        opts: WriteOptions,
    ) -> Result<(Vec<Vec<u8>>, WriteAck), Error> {
        let msg = pb::SetAddRequest {
            row: Some(row.to_proto()),
            members,
            consistency: opts.consistency.map(Consistency::to_proto).unwrap_or(0),
            idempotency_key: Self::idempotency(&opts),
        };
        let resp = self
            .attempt(Route::Row(row, RowOp::Write(opts.consistency)), |stubs, t| {
                let mut kv = stubs.kv;
                let msg = msg.clone();
                async move { kv.set_add(self.request(msg, t)).await }
            })
            .await?
            .into_inner();
        Ok((resp.members, self.ack(resp.ack)))
    }

    /// Removes members: with a context only the adds it saw (a concurrent
    /// add wins), without one the adds stored where the request lands.
    pub async fn set_remove(
        &self,
        row: &Row,
        members: Vec<Vec<u8>>,
        opts: WriteOptions,
    ) -> Result<(Vec<Vec<u8>>, WriteAck), Error> {
        let msg = pb::SetRemoveRequest {
            row: Some(row.to_proto()),
            members,
            consistency: opts.consistency.map(Consistency::to_proto).unwrap_or(0),
            idempotency_key: Self::idempotency(&opts),
            context: opts.context.clone().unwrap_or_default().0,
        };
        let resp = self
            .attempt(Route::Row(row, RowOp::Write(opts.consistency)), |stubs, t| {
                let mut kv = stubs.kv;
                let msg = msg.clone();
                async move { kv.set_remove(self.request(msg, t)).await }
            })
            .await?
            .into_inner();
        Ok((resp.members, self.ack(resp.ack)))
    }

    pub async fn set_members(&self, row: &Row, level: ReadConsistency) -> Result<SetResult, Error> {
        let (consistency, max_staleness_ms, session_token) = self.read_fields(level);
        let msg =
            pb::SetMembersRequest { row: Some(row.to_proto()), consistency, max_staleness_ms, session_token };
        let resp = self
            .attempt(Route::Row(row, RowOp::Read(level)), |stubs, t| {
                let mut kv = stubs.kv;
                let msg = msg.clone();
                async move { kv.set_members(self.request(msg, t)).await }
            })
            .await?
            .into_inner();
        self.info(resp.info);
        Ok(SetResult { found: resp.found, members: resp.members, context: CausalContext(resp.context) })
    }

    /// The cluster as the connected node sees it: regions, health, endpoints.
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, Error> {
        self.admin_call(pb::ClusterStatusRequest {}, |mut a, r| async move { a.cluster_status(r).await })
            .await
    }

    /// Replication links leaving the connected node's region (every node of it).
    pub async fn replication_status(&self) -> Result<pb::ReplicationStatusResponse, Error> {
        self.admin_call(pb::ReplicationStatusRequest { node_only: false }, |mut a, r| async move {
            a.replication_status(r).await
        })
        .await
    }

    /// Pauses (`paused = true`) or resumes shipping to `destination`.
    pub async fn control_replication(
        &self,
        destination: &str,
        paused: bool,
    ) -> Result<pb::ReplicationControlResponse, Error> {
        let msg = pb::ReplicationControlRequest { destination: destination.to_string(), node_only: false };
        if paused {
            self.admin_call(msg, |mut a, r| async move { a.pause_replication(r).await }).await
        } else {
            self.admin_call(msg, |mut a, r| async move { a.resume_replication(r).await }).await
        }
    }

    /// Rows the connected node's region (every node of it) stores outside
    /// their residency zone.
    pub async fn residency_audit(&self) -> Result<pb::ResidencyAuditResponse, Error> {
        self.admin_call(pb::ResidencyAuditRequest { node_only: false }, |mut a, r| async move {
            a.residency_audit(r).await
        })
        .await
    }

    /// Flushes and fully compacts the store of every node of the connected
    /// node's region, so expired values leave the disk now; needs `admin`.
    pub async fn compact(&self) -> Result<pb::CompactResponse, Error> {
        self.admin_call(pb::CompactRequest { node_only: false }, |mut a, r| async move { a.compact(r).await })
            .await
    }

    /// Erases a data subject's values on every node of the connected node's
    /// region at `fence_hlc` (0: that node picks the fence, as the first
    /// region of an erasure does); needs the `erase` grant. Idempotent: an
    /// erasure repeated with its fence changes nothing more.
    pub async fn erase_subject(
        &self,
        subject: &[u8],
        fence_hlc: u64,
    ) -> Result<pb::EraseSubjectResponse, Error> {
        let msg = pb::EraseSubjectRequest { subject: subject.to_vec(), fence_hlc, node_only: false };
        self.admin_call(msg, |mut a, r| async move { a.erase_subject(r).await }).await
    }

    /// The rows of a data subject stored in the connected node's region;
    /// needs the `export` grant (the call is in the region's audit log).
    pub async fn export_subject(&self, subject: &[u8]) -> Result<pb::ExportSubjectResponse, Error> {
        let msg = pb::ExportSubjectRequest { subject: subject.to_vec(), node_only: false };
        self.admin_call(msg, |mut a, r| async move { a.export_subject(r).await }).await
    }

    /// Writes backup `backup_id` of every node of the connected node's
    /// region into the zone destinations of their `[backup]` sections;
    /// returns each node's part of the manifest. Needs `admin`. `deadline`
    /// bounds the whole call (a backup reads every store in full), and it
    /// is never retried: a backup id is used once.
    pub async fn backup_create(
        &self,
        backup_id: &str,
        deadline: Duration,
    ) -> Result<pb::BackupCreateResponse, Error> {
        let msg = pb::BackupCreateRequest { backup_id: backup_id.to_string(), node_only: false };
        let resp = self
            .attempt(Route::Any, |stubs, _| {
                let mut admin = stubs.admin;
                let req = self.request(msg.clone(), deadline);
                async move { admin.backup_create(req).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// Restores the connected node's region from `manifest` (its JSON
    /// text): `prepare` checks every node and marks it, otherwise the rows
    /// are loaded and the homes' epochs raised. Needs `admin`.
    pub async fn backup_restore(
        &self,
        manifest: &str,
        prepare: bool,
        deadline: Duration,
    ) -> Result<pb::BackupRestoreResponse, Error> {
        let msg = pb::BackupRestoreRequest { manifest: manifest.to_string(), node_only: false, prepare };
        let resp = self
            .attempt(Route::Any, |stubs, _| {
                let mut admin = stubs.admin;
                let req = self.request(msg.clone(), deadline);
                async move { admin.backup_restore(req).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// The access audit log of the connected node's region (every node of
    /// it), oldest first; needs the `admin` grant.
    pub async fn audit_log(
        &self,
        since_ms: u64,
        principal: Option<&str>,
        table: Option<&str>,
        limit: u32,
    ) -> Result<pb::AuditLogResponse, Error> {
        let msg = pb::AuditLogRequest {
            since_ms,
            principal: principal.unwrap_or_default().to_string(),
            table: table.unwrap_or_default().to_string(),
            limit,
            node_only: false,
        };
        self.admin_call(msg, |mut a, r| async move { a.audit_log(r).await }).await
    }

    /// Digests of the connected node's region (every node of it) per (table, zone).
    pub async fn digest(&self) -> Result<pb::DigestResponse, Error> {
        self.admin_call(pb::DigestRequest { node_only: false }, |mut a, r| async move { a.digest(r).await })
            .await
    }

    /// Digests of the connected node alone, per (table, zone, partition).
    pub async fn node_digest(&self) -> Result<pb::DigestResponse, Error> {
        self.admin_call(pb::DigestRequest { node_only: true }, |mut a, r| async move { a.digest(r).await })
            .await
    }

    /// Partitions and their owning node in every region.
    pub async fn partition_map(&self) -> Result<pb::PartitionMapResponse, Error> {
        self.admin_call(pb::PartitionMapRequest {}, |mut a, r| async move { a.partition_map(r).await }).await
    }

    /// Where a row lives: home region, partition, and the owning node in
    /// every region it may be stored in.
    pub async fn locate(&self, row: &Row) -> Result<pb::LocateResponse, Error> {
        let msg = pb::LocateRequest { row: Some(row.to_proto()) };
        self.admin_call(msg, |mut a, r| async move { a.locate(r).await }).await
    }

    /// Linearizable compare-and-set on a row of a STRONG table: writes
    /// `value` (None deletes) only if the row holds `expected` (None =
    /// absent). A retry with the same idempotency key returns the first
    /// outcome instead of applying twice.
    pub async fn compare_and_set(
        &self,
        row: &Row,
        expected: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
        idempotency_key: Option<String>,
    ) -> Result<CasResult, Error> {
        let msg = pb::CompareAndSetRequest { row: Some(row.to_proto()), expected, value };
        let key = idempotency_key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let resp = self
            .attempt(Route::Row(row, RowOp::Write(Some(Consistency::Strong))), |stubs, t| {
                let mut kv = stubs.kv;
                let mut req = self.request(msg.clone(), t);
                if let Ok(v) = key.parse() {
                    req.metadata_mut().insert("geokv-idempotency-key", v);
                }
                async move { kv.compare_and_set(req).await }
            })
            .await?
            .into_inner();
        Ok(CasResult {
            succeeded: resp.succeeded,
            current: resp.found.then_some((resp.current, resp.current_version)),
            ack: self.ack(resp.ack),
        })
    }

    /// Home leases, epochs, consensus groups and recent failovers.
    pub async fn region_status(&self) -> Result<pb::RegionStatusResponse, Error> {
        self.control_call(pb::RegionStatusRequest {}, |mut c, r| async move { c.region_status(r).await })
            .await
    }

    /// Planned handover of every home `from` holds to `to`, with no loss.
    pub async fn failover(&self, from: &str, to: &str) -> Result<pb::FailoverResponse, Error> {
        let msg = pb::FailoverRequest { from: from.into(), to: to.into() };
        self.control_call(msg, |mut c, r| async move { c.failover(r).await }).await
    }

    /// Returns every home of `region` that another region holds.
    pub async fn failback(&self, region: &str) -> Result<pb::FailoverResponse, Error> {
        let msg = pb::FailbackRequest { region: region.into() };
        self.control_call(msg, |mut c, r| async move { c.failback(r).await }).await
    }

    /// Switches automatic failover on or off (manual-only operation).
    pub async fn set_auto_failover(&self, enabled: bool) -> Result<pb::SetAutoFailoverResponse, Error> {
        let msg = pb::SetAutoFailoverRequest { enabled };
        self.control_call(msg, |mut c, r| async move { c.set_auto_failover(r).await }).await
    }

    /// Writes old homes accepted before a failover and shipped after it.
    pub async fn failover_conflicts(&self) -> Result<pb::FailoverConflictsResponse, Error> {
        self.control_call(
            pb::FailoverConflictsRequest {},
            |mut c, r| async move { c.failover_conflicts(r).await },
        )
        .await
    }

    async fn control_call<Req, Resp, F, Fut>(&self, msg: Req, call: F) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(ControlClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let resp =
            self.attempt(Route::Any, |stubs, t| call(stubs.control, self.request(msg.clone(), t))).await?;
        Ok(resp.into_inner())
    }

    async fn admin_call<Req, Resp, F, Fut>(&self, msg: Req, call: F) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(AdminClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let resp =
            self.attempt(Route::Any, |stubs, t| call(stubs.admin, self.request(msg.clone(), t))).await?;
        Ok(resp.into_inner())
    }

    pub async fn node_status(&self) -> Result<pb::NodeStatusResponse, Error> {
        let resp = self
            .attempt(Route::Any, |stubs, t| {
                let mut admin = stubs.admin;
                async move { admin.node_status(self.request(pb::NodeStatusRequest {}, t)).await }
            })
            .await?;
        Ok(resp.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geokv_proto::envelope::{open_message, seal_message};
    use geokv_proto::storage::{SessionToken, VvEntry};

    fn token(entries: &[(&str, u64)]) -> Vec<u8> {
        seal_message(&SessionToken {
            seen: entries.iter().map(|(r, c)| VvEntry { actor: r.to_string(), counter: *c }).collect(),
        })
    }

    #[test]
    fn session_tokens_merge_per_region_maximum() {
        let merged =
            merge_session_tokens(&token(&[("us-east-1", 7), ("eu-west-1", 2)]), &token(&[("eu-west-1", 5)]));
        let t: SessionToken = open_message(&merged).unwrap();
        let got: Vec<_> = t.seen.iter().map(|e| (e.actor.as_str(), e.counter)).collect();
        assert_eq!(got, [("eu-west-1", 5), ("us-east-1", 7)]);
        assert_eq!(merge_session_tokens(b"junk", &token(&[("a", 1)])), token(&[("a", 1)]));
        assert_eq!(merge_session_tokens(&[], &token(&[("a", 1)])), token(&[("a", 1)]));
    }
}
