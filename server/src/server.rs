//! Running a node: open the store, start the committer, serve gRPC and the
//! admin HTTP port until the shutdown future completes, then drain.

use std::future::{Future, IntoFuture};
use std::sync::Arc;

use anyhow::Context;
use geokv_net::tls::{Tls, TlsFiles};
use geokv_proto::v1::{admin_server::AdminServer, kv_server::KvServer};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Connected;
use tonic::Request;

use crate::api::control::ControlService;
use crate::api::{AdminService, KvService, Peers};
use crate::causality::{Hlc, PhysicalClock, SystemClock};
use crate::config::{Config, EngineKind};
use crate::consensus::service::ConsensusService;
use crate::consensus::Consensus;
use crate::failover::{Failover, Leases};
use crate::kv::expiry::{DataExpiry, FeedExpiry, LogExpiry};
use crate::kv::{Node, NodeOptions};
use crate::lifecycle::Lifecycle;
use crate::replication::{receive::ReplicationService, Replicator};
use crate::security::authn::Security;
use crate::storage::memory::MemoryEngine;
use crate::storage::rocks::{RocksEngine, RocksOptions};
use crate::storage::{Cf, Engine};
use geokv_proto::consensus::consensus_server::ConsensusServer;
use geokv_proto::v1::control_server::ControlServer;
use geokv_proto::v1::replication_server::ReplicationServer;

/// The services of the client port, the only ones reflection advertises.
pub const PUBLIC_SERVICES: [&str; 4] =
    ["geokv.v1.KV", "geokv.v1.Admin", "geokv.v1.Control", "grpc.health.v1.Health"];

/// Largest gRPC message accepted, in bytes: a batch at the value limit plus framing.
/// At least 16 MiB, so a value several times over its limit still reaches
/// the handler and gets `VALUE_TOO_LARGE` rather than a transport error.
fn message_bytes_max(cfg: &Config) -> usize {
    cfg.limits.value_bytes_max.saturating_mul(2).max(16 << 20)
}

/// Opens the configured engine.
pub fn open_engine(cfg: &Config, lifecycle: &Arc<Lifecycle>) -> anyhow::Result<Arc<dyn Engine>> {
    Ok(match cfg.storage.engine {
        EngineKind::Rocksdb => {
            let tuning = RocksOptions {
                write_buffer_bytes: cfg.storage.write_buffer_mib << 20,
                block_cache_bytes: cfg.storage.block_cache_mib << 20,
                background_jobs: 2,
                rules: vec![
                    (Cf::Data, Arc::new(DataExpiry::new(Arc::new(SystemClock), lifecycle.clone())) as _),
                    (Cf::ReplLog, Arc::new(LogExpiry::new(Arc::new(SystemClock), lifecycle.clone())) as _),
                    (Cf::Feed, Arc::new(FeedExpiry::new(Arc::new(SystemClock), lifecycle.clone())) as _),
                    (Cf::Raft, Arc::new(crate::kv::expiry::StrongExpiry::new(Arc::new(SystemClock))) as _),
                    (Cf::Meta, Arc::new(crate::kv::expiry::ReplyErasure::new(lifecycle.clone())) as _),
                ],
            };
            Arc::new(
                RocksEngine::open(&cfg.data_dir, &tuning)
                    .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?,
            )
        }
        EngineKind::Memory => Arc::new(MemoryEngine::new()),
    })
}

/// The node's TLS material, or None for plaintext: only with
/// `security.insecure`, or without certificates on loopback addresses.
pub fn node_tls(cfg: &Config, addrs: &[std::net::SocketAddr]) -> anyhow::Result<Option<Arc<Tls>>> {
    if cfg.security.insecure {
        tracing::warn!("running INSECURE (--insecure): plaintext, no authentication, every caller is root");
        return Ok(None);
    }
    if let Some(dir) = &cfg.security.certs_dir {
        let files = TlsFiles::node(dir, &cfg.region, &cfg.node_id);
        let tls = Tls::load(files).with_context(|| {
            format!(
                "loading the node certificate from {} (make it with `geokv cert create-node --region {} --node-id {}`)",
                dir.display(),
                cfg.region,
                cfg.node_id
            )
        })?;
        return Ok(Some(tls));
    }
    if let Some(open) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        anyhow::bail!(
            "refusing to listen on {open} without certificates: set security.certs_dir (see `geokv cert`) \
             or pass --insecure to serve plaintext with no authentication"
        );
    }
    tracing::warn!(
        "no certificates (security.certs_dir): serving plaintext with no authentication, on loopback addresses only"
    );
    Ok(None)
}

/// Runs a node on already-bound listeners (client port, peer port, admin
/// HTTP) until `shutdown` completes. Listeners are injected so tests can
/// bind port 0.
pub async fn serve(
    cfg: Config,
    grpc: TcpListener,
    peer: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = node_tls(&cfg, &[grpc.local_addr()?, peer.local_addr()?, admin.local_addr()?])?;
    serve_secured(cfg, tls, grpc, peer, admin, shutdown).await
}

/// [`serve`] with the TLS material already decided (see [`node_tls`]).
async fn serve_secured(
    cfg: Config,
    tls: Option<Arc<Tls>>,
    grpc: TcpListener,
    peer: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // The compaction rules and the node share the erasure fences.
    let lifecycle = Arc::new(Lifecycle::new(&cfg));
    let engine = open_engine(&cfg, &lifecycle)?;
    let store = engine.clone();
    let wiring = Wiring {
        grpc_addr: format!("{} (peer {})", grpc.local_addr()?, peer.local_addr()?),
        engine,
        clock: Arc::new(SystemClock),
        node: NodeOptions { tls: tls.clone(), lifecycle: Some(lifecycle), ..NodeOptions::default() },
        admin: Some(admin),
        on_start: None,
        audit: true,
    };
    let client = geokv_net::incoming::incoming(grpc, tls.clone(), "client");
    let peer = geokv_net::incoming::incoming(peer, tls, "peer");
    let served = serve_with(cfg, wiring, client, Some(peer), shutdown).await;
    close_store(store).await;
    served
}

/// Longest a stopped node waits for its other parts to let go of the store.
pub const STORE_RELEASE_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Closes the store once nothing else holds it, so that it closes here and
/// not on whichever thread lets go last. A Raft log syncer thread (which
/// ends after its group's last log handle is dropped) or a task that
/// outlives the node could otherwise close RocksDB while the process exits
/// and tears down RocksDB's own static state: the node then aborts after
/// "node stopped" ("pthread lock: Invalid argument"). Bounded by
/// [`STORE_RELEASE_MAX`]; past it the holders are logged and the store is
/// left to the last of them.
async fn close_store(store: Arc<dyn Engine>) {
    let began = tokio::time::Instant::now();
    if !wait_until(began + STORE_RELEASE_MAX, || Arc::strong_count(&store) == 1).await {
        tracing::warn!(
            holders = Arc::strong_count(&store) - 1,
            "the store is still held {STORE_RELEASE_MAX:?} after the node stopped: it closes when they \
             let go"
        );
        return;
    }
    let waited_ms = began.elapsed().as_millis() as u64;
    // Closing RocksDB waits for its background work: off the async workers.
    match tokio::task::spawn_blocking(move || drop(store)).await {
        Ok(()) => tracing::info!(waited_ms, "store closed"),
        Err(e) => tracing::warn!(error = %e, "closing the store failed"),
    }
}

/// Checks `done` every 5 ms until it holds (true) or `by` passes (false):
/// the bounded waits of a stopping node.
pub(crate) async fn wait_until(by: tokio::time::Instant, done: impl Fn() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= by {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// What a node runs on besides its config: injected so a deterministic
/// simulation (`tests/simulation`) runs the real node over a simulated
/// network, clock and store. [`serve`] wires the production ones.
pub struct Wiring {
    /// The gRPC listener's address, as logged.
    pub grpc_addr: String,
    /// The store (see [`open_engine`]).
    pub engine: Arc<dyn Engine>,
    /// Wall clock under the node's HLC.
    pub clock: Arc<dyn PhysicalClock>,
    /// Committer mode and the dialer of every outgoing gRPC channel.
    pub node: NodeOptions,
    /// The admin HTTP listener; None runs no admin HTTP (simulation).
    pub admin: Option<TcpListener>,
    /// Called with the node once it is started, before it serves, so a
    /// simulation can read its store and state directly.
    pub on_start: Option<OnStart>,
    /// Keep the access audit log (real nodes; the simulation has none).
    pub audit: bool,
}

/// See [`Wiring::on_start`].
pub type OnStart = Box<dyn FnOnce(&Arc<Node>) + Send>;

/// Runs a node on `incoming` client-port connections and `peer_incoming`
/// peer-port connections until `shutdown` completes. Without a peer port
/// (the simulation, which runs plaintext) one port serves every service.
pub async fn serve_with<I, IO, IE>(
    cfg: Config,
    wiring: Wiring,
    incoming: I,
    peer_incoming: Option<I>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let cfg = Arc::new(cfg);
    let engine = wiring.engine;
    let hlc = Arc::new(Hlc::new(wiring.clock.clone(), cfg.clock.max_offset_ms));
    let tls = wiring.node.tls.clone();
    if peer_incoming.is_none() && tls.is_some() {
        anyhow::bail!("a node with TLS serves its peer services on a peer port of their own");
    }
    let node = Node::start_with(cfg.clone(), engine.clone(), hlc.clone(), wiring.node)
        .context("starting the committer")?;
    if wiring.admin.is_some() {
        crate::admin::prometheus();
    }
    let mut security = match &tls {
        Some(t) => Security::new(&cfg, Some(t.clone()), None)?,
        None => Security::insecure(&cfg),
    };
    let mut audit_worker = None;
    if wiring.audit {
        let secret = crate::security::audit::load_or_create_secret(engine.as_ref())
            .context("reading the audit log's key")?;
        let retention = cfg.security.audit;
        let audit = Arc::new(
            crate::security::audit::AuditLog::new(engine.clone(), secret, retention)
                .context("opening the audit log")?,
        );
        let cancel = tokio_util::sync::CancellationToken::new();
        audit_worker = Some((audit.start_background(wiring.clock.clone(), cancel.clone()), cancel));
        security.set_audit(audit);
    }
    let security = Arc::new(security);
    node.set_security(security.clone());
    let tls_watcher =
        tls.as_ref().map(|t| t.spawn_watcher(std::time::Duration::from_millis(cfg.security.reload_check_ms)));
    let consensus =
        Consensus::start_with(cfg.clone(), engine, node.channels().clone(), node.store().created_empty)
            .await
            .context("starting the consensus groups")?;
    node.set_leases(Arc::new(Leases::new(&cfg, &consensus, hlc)));
    if let Some(on_start) = wiring.on_start {
        on_start(&node);
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<KvServer<KvService>>().await;
    health_reporter.set_serving::<AdminServer<AdminService>>().await;
    // Reflection on the client port advertises the public services only.
    let public = |b: tonic_reflection::server::Builder<'static>| {
        PUBLIC_SERVICES.iter().fold(
            b.register_encoded_file_descriptor_set(geokv_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(*name),
        )
    };
    let reflection = public(tonic_reflection::server::Builder::configure())
        .build_v1()
        .context("building the reflection service")?;
    let reflection_alpha = public(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .context("building the reflection service")?;

    let limit = message_bytes_max(&cfg);
    let replicator = Replicator::start(&cfg, node.clone());
    let gc_cancel = tokio_util::sync::CancellationToken::new();
    let gc_task = (cfg.storage.tombstone_gc_interval_ms > 0).then(|| {
        let floor = replicator.clone();
        tokio::spawn(crate::kv::gc::run(
            node.clone(),
            move || floor.acked_by_all(),
            std::time::Duration::from_millis(cfg.storage.tombstone_gc_interval_ms),
            gc_cancel.clone(),
        ))
    });
    let feed_task = tokio::spawn(crate::kv::feed::run_trim(node.clone(), gc_cancel.clone()));
    let peers = Peers::from_topology_with(node.topology(), node.channels());
    let kv = KvServer::new(KvService::new(node.clone(), peers.clone(), Some(consensus.clone())))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(64 << 20);
    let admin_svc = AdminServer::new(
        AdminService::new(node.clone(), replicator.clone(), peers.clone()).with_consensus(consensus.clone()),
    )
    .max_encoding_message_size(64 << 20);
    // Sized from the row limit, so the largest legal row always ships.
    let replication_wire_max = crate::replication::frame::wire_bytes_max(&cfg);
    let replication_svc = ReplicationServer::new(ReplicationService::new(node.clone(), replicator.clone()))
        .max_decoding_message_size(replication_wire_max)
        .max_encoding_message_size(replication_wire_max);
    let consensus_svc = ConsensusServer::new(ConsensusService::new(consensus.clone(), node.clone()))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let control_svc =
        ControlServer::new(ControlService::new(consensus.clone(), node.clone(), replicator.clone()));
    let client_auth = {
        let security = security.clone();
        move |req: Request<()>| security.client_port(req)
    };
    let client_audited = {
        let security = security.clone();
        move |req: Request<()>| security.client_port_audited(req)
    };
    let peer_auth = {
        let security = security.clone();
        move |req: Request<()>| security.peer_port(req)
    };
    let failover = Failover::start(cfg.clone(), consensus.clone(), node.clone(), replicator.clone());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut grpc_stop = stop_rx.clone();
    let peer_stop_rx = stop_rx.clone();
    let mut http_stop = stop_rx;
    let admin_addr = match &wiring.admin {
        Some(l) => l.local_addr()?.to_string(),
        None => "-".to_string(),
    };
    tracing::info!(node = %cfg.actor(), grpc = %wiring.grpc_addr, admin = %admin_addr, data_dir = %cfg.data_dir.display(),
        engine = node.engine().kind(), "node serving");

    let grpc_stop = async move {
        let _ = grpc_stop.wait_for(|s| *s).await;
    };
    let mut peer_stop = peer_stop_rx;
    let peer_stop = async move {
        let _ = peer_stop.wait_for(|s| *s).await;
    };
    let client_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection, client_auth.clone()))
        .add_service(InterceptedService::new(reflection_alpha, client_auth))
        .add_service(InterceptedService::new(kv.clone(), client_audited.clone()))
        .add_service(InterceptedService::new(admin_svc.clone(), client_audited.clone()))
        .add_service(InterceptedService::new(control_svc, client_audited));
    let (grpc_task, peer_task) = match peer_incoming {
        Some(peer_incoming) => {
            let peer_server = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
                .add_service(InterceptedService::new(kv, peer_auth.clone()))
                .add_service(InterceptedService::new(admin_svc, peer_auth.clone()))
                .add_service(InterceptedService::new(replication_svc, peer_auth.clone()))
                .add_service(InterceptedService::new(consensus_svc, peer_auth));
            (
                tokio::spawn(client_server.serve_with_incoming_shutdown(incoming, grpc_stop)),
                Some(tokio::spawn(peer_server.serve_with_incoming_shutdown(peer_incoming, peer_stop))),
            )
        }
        None => (
            tokio::spawn(
                client_server
                    .add_service(InterceptedService::new(replication_svc, peer_auth.clone()))
                    .add_service(InterceptedService::new(consensus_svc, peer_auth))
                    .serve_with_incoming_shutdown(incoming, grpc_stop),
            ),
            None,
        ),
    };
    let http_task = wiring.admin.map(|admin| {
        let cluster = crate::admin::cluster::ClusterSources { peers, control: consensus.subscribe_control() };
        let router = crate::admin::router(node.clone(), replicator.clone(), Some(cluster));
        let stop = async move {
            let _ = http_stop.wait_for(|s| *s).await;
        };
        match tls.as_ref().filter(|_| cfg.security.admin_tls) {
            Some(tls) => {
                let listener = AdminTls::new(admin, tls.clone());
                tokio::spawn(axum::serve(listener, router).with_graceful_shutdown(stop).into_future())
            }
            None => tokio::spawn(axum::serve(admin, router).with_graceful_shutdown(stop).into_future()),
        }
    });

    shutdown.await;
    tracing::info!("shutting down: draining requests and the commit queue");
    health_reporter.set_not_serving::<KvServer<KvService>>().await;
    failover.stop();
    gc_cancel.cancel();
    if let Some(t) = gc_task {
        let _ = t.await;
    }
    let _ = feed_task.await;
    replicator.shutdown().await;
    tracing::info!("shutting down: replication stopped");
    let _ = stop_tx.send(true);
    let drained_by = tokio::time::Instant::now() + DRAIN_MAX;
    let grpc_result = drain(grpc_task, "client", drained_by).await;
    let peer_result = match peer_task {
        Some(t) => drain(t, "peer", drained_by).await,
        None => None,
    };
    if let Some(t) = http_task {
        drain(t, "admin", drained_by).await;
    }
    if let Some(w) = tls_watcher {
        w.abort();
    }
    if let Some((worker, cancel)) = audit_worker {
        cancel.cancel();
        let _ = worker.await;
    }
    consensus.shutdown().await;
    node.shutdown();
    tracing::info!("node stopped");
    if let Some(r) = grpc_result {
        r.context("gRPC server task")?.context("gRPC server (client port)")?;
    }
    if let Some(r) = peer_result {
        r.context("gRPC server task")?.context("gRPC server (peer port)")?;
    }
    Ok(())
}

/// Longest a port waits, after the shutdown signal, for its open calls to
/// finish; then its connections are closed. Other nodes' replication and
/// Raft streams never finish by themselves, so without a bound a node of a
/// running cluster would not stop on SIGTERM.
pub const DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits for a server task to finish draining until `by`; then aborts it
/// (None).
async fn drain<T>(
    mut task: tokio::task::JoinHandle<T>,
    port: &str,
    by: tokio::time::Instant,
) -> Option<Result<T, tokio::task::JoinError>> {
    match tokio::time::timeout_at(by, &mut task).await {
        Ok(result) => Some(result),
        Err(_) => {
            tracing::warn!(
                port,
                "calls still open {DRAIN_MAX:?} after the shutdown signal: closing their connections"
            );
            task.abort();
            let _ = task.await;
            None
        }
    }
}

/// Binds the configured addresses and runs until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let listed =
        cfg.regions.iter().any(|r| r.name == cfg.region && r.nodes.iter().any(|n| n.id == cfg.node_id));
    let unspecified =
        [&cfg.listen, &cfg.listen_peer].iter().any(|a| a.ip_addr().is_some_and(|s| s.ip().is_unspecified()));
    if unspecified && !listed {
        tracing::warn!(
            "listening on an unspecified address ({}, {}) without being listed in its own region's \
             regions[].nodes: other nodes and clients are told to dial that address; list this node \
             with the address they reach it by",
            cfg.listen,
            cfg.listen_peer
        );
    }
    // Host names are resolved once, here; each port is bound on the first
    // of its addresses that binds.
    let mut resolved = Vec::new();
    for (what, addr) in
        [("gRPC", &cfg.listen), ("peer gRPC", &cfg.listen_peer), ("admin HTTP", &cfg.admin_listen)]
    {
        let addrs = addr.resolve().await.with_context(|| format!("resolving the {what} address {addr}"))?;
        resolved.push((what, addr, addrs));
    }
    // Decided before binding: a node that may not serve plaintext on an
    // address never opens it.
    let all: Vec<std::net::SocketAddr> = resolved.iter().flat_map(|(_, _, a)| a.iter().copied()).collect();
    let tls = node_tls(&cfg, &all)?;
    let mut listeners = Vec::new();
    for (what, addr, addrs) in &resolved {
        let listener = TcpListener::bind(addrs.as_slice())
            .await
            .with_context(|| format!("binding {what} address {addr} ({addrs:?})"))?;
        listeners.push(listener);
    }
    let [grpc, peer, admin]: [TcpListener; 3] =
        listeners.try_into().map_err(|_| anyhow::anyhow!("three listeners were bound"))?;
    serve_secured(cfg, tls, grpc, peer, admin, shutdown).await
}

/// The admin HTTP listener over TLS (`security.admin_tls`): the same
/// handshake task per connection as the gRPC ports; a client certificate
/// is not required (the admin port is read-only).
struct AdminTls {
    conns: tokio_stream::wrappers::ReceiverStream<std::io::Result<geokv_net::incoming::PortConn>>,
    addr: std::net::SocketAddr,
}

impl AdminTls {
    fn new(listener: TcpListener, tls: Arc<Tls>) -> Self {
        let addr = listener.local_addr().unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        Self { conns: geokv_net::incoming::incoming(listener, Some(tls), "admin"), addr }
    }
}

impl axum::serve::Listener for AdminTls {
    type Io = geokv_net::incoming::PortConn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match tokio_stream::StreamExt::next(&mut self.conns).await {
                Some(Ok(conn)) => {
                    let remote = conn.connect_info().remote.unwrap_or(self.addr);
                    return (conn, remote);
                }
                Some(Err(e)) => tracing::debug!(error = %e, "admin connection failed"),
                // The accept loop ended (only at shutdown): wait for it.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stopped node has closed its store when `serve` returns: nothing
    /// the node started (a Raft log syncer thread, a task) still holds it,
    /// so the process does not exit while RocksDB is open on another
    /// thread, and the same store opens again at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_node_has_closed_its_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        for round in 0..3 {
            let cfg =
                Config { data_dir: dir.path().to_path_buf(), ..Config::default() }.finish().expect("config");
            let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("bind") };
            let (grpc, peer, admin) = (bind().await, bind().await, bind().await);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let node = tokio::spawn(serve(cfg, grpc, peer, admin, async move {
                let _ = stop_rx.await;
            }));
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            let _ = stop_tx.send(());
            tokio::time::timeout(std::time::Duration::from_secs(30), node)
                .await
                .expect("the node stops within 30 s")
                .expect("the node task")
                .expect("the node stops cleanly");
            let left: Vec<String> = std::fs::read_dir("/proc/self/task")
                .expect("this process's threads")
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|name| name.trim().to_string())
                .filter(|name| name.starts_with("raft-sync"))
                .collect();
            assert!(left.is_empty(), "round {round}: threads of the stopped node still run: {left:?}");
            let tuning = RocksOptions {
                write_buffer_bytes: 1 << 20,
                block_cache_bytes: 1 << 20,
                background_jobs: 1,
                rules: Vec::new(),
            };
            if let Err(e) = RocksEngine::open(dir.path(), &tuning) {
                panic!("round {round}: the store is still open after the node stopped: {e}");
            }
        }
    }
}
