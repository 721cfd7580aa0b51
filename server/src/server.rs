//! Running a node: open the store, start the committer, serve gRPC and the
//! admin HTTP port until the shutdown future completes, then drain.

use std::future::{Future, IntoFuture};
use std::sync::Arc;

use anyhow::Context;
use geokv_proto::v1::{admin_server::AdminServer, kv_server::KvServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::Connected;

use crate::api::control::ControlService;
use crate::api::{AdminService, KvService, Peers};
use crate::causality::{Hlc, PhysicalClock, SystemClock};
use crate::config::{Config, EngineKind};
use crate::consensus::service::ConsensusService;
use crate::consensus::Consensus;
use crate::failover::{Failover, Leases};
use crate::kv::{Node, NodeOptions};
use crate::replication::{receive::ReplicationService, Replicator};
use crate::storage::memory::MemoryEngine;
use crate::storage::rocks::{RocksEngine, RocksOptions};
use crate::storage::Engine;
use geokv_proto::consensus::consensus_server::ConsensusServer;
use geokv_proto::v1::control_server::ControlServer;
use geokv_proto::v1::replication_server::ReplicationServer;

/// Largest gRPC message accepted, in bytes: a batch at the value limit plus framing.
fn message_bytes_max(cfg: &Config) -> usize {
    cfg.limits.value_bytes_max.saturating_mul(2).max(4 << 20)
}

/// Opens the configured engine.
pub fn open_engine(cfg: &Config) -> anyhow::Result<Arc<dyn Engine>> {
    Ok(match cfg.storage.engine {
        EngineKind::Rocksdb => {
            let tuning =
                RocksOptions { write_buffer_bytes: cfg.storage.write_buffer_mib << 20, background_jobs: 2 };
            Arc::new(
                RocksEngine::open(&cfg.data_dir, &tuning)
                    .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?,
            )
        }
        EngineKind::Memory => Arc::new(MemoryEngine::new()),
    })
}

/// Runs a node on already-bound listeners until `shutdown` completes.
/// Listeners are injected so tests can bind port 0.
pub async fn serve(
    cfg: Config,
    grpc: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let engine = open_engine(&cfg)?;
    let wiring = Wiring {
        grpc_addr: grpc.local_addr()?.to_string(),
        engine,
        clock: Arc::new(SystemClock),
        node: NodeOptions::default(),
        admin: Some(admin),
        on_start: None,
    };
    // The builder's tcp_nodelay covers only listeners it binds itself; the
    // accepted sockets of this listener get it here, or small replies (Raft
    // acknowledgements, forwarded writes) wait behind Nagle's algorithm.
    let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(grpc), |conn| {
        conn.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY on an accepted connection");
            }
        })
    });
    serve_with(cfg, wiring, incoming, shutdown).await
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
}

/// See [`Wiring::on_start`].
pub type OnStart = Box<dyn FnOnce(&Arc<Node>) + Send>;

/// Runs a node on `incoming` gRPC connections until `shutdown` completes.
pub async fn serve_with<I, IO, IE>(
    cfg: Config,
    wiring: Wiring,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let cfg = Arc::new(cfg);
    let engine = wiring.engine;
    let hlc = Arc::new(Hlc::new(wiring.clock, cfg.clock.max_offset_ms));
    let dialer = wiring.node.dialer.clone();
    let node = Node::start_with(cfg.clone(), engine.clone(), hlc.clone(), wiring.node)
        .context("starting the committer")?;
    if wiring.admin.is_some() {
        crate::admin::prometheus();
    }
    let consensus = Consensus::start_with(cfg.clone(), engine, dialer.clone())
        .await
        .context("starting the consensus groups")?;
    node.set_leases(Arc::new(Leases::new(&cfg, &consensus, hlc)));
    if let Some(on_start) = wiring.on_start {
        on_start(&node);
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<KvServer<KvService>>().await;
    health_reporter.set_serving::<AdminServer<AdminService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(geokv_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(geokv_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;

    let limit = message_bytes_max(&cfg);
    let replicator = Replicator::start(&cfg, node.clone());
    let peers = Peers::from_topology_with(node.topology(), &dialer);
    let kv = KvServer::new(KvService::new(node.clone(), peers.clone(), Some(consensus.clone())))
        .max_decoding_message_size(limit);
    let admin_svc = AdminServer::new(AdminService::new(node.clone(), replicator.clone(), peers));
    let replication_svc = ReplicationServer::new(ReplicationService::new(node.clone(), replicator.clone()))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let consensus_svc = ConsensusServer::new(ConsensusService::new(consensus.clone(), node.clone()))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let control_svc =
        ControlServer::new(ControlService::new(consensus.clone(), node.clone(), replicator.clone()));
    let failover = Failover::start(cfg.clone(), consensus.clone(), node.clone(), replicator.clone());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut grpc_stop = stop_rx.clone();
    let mut http_stop = stop_rx;
    let admin_addr = match &wiring.admin {
        Some(l) => l.local_addr()?.to_string(),
        None => "-".to_string(),
    };
    tracing::info!(node = %cfg.actor(), grpc = %wiring.grpc_addr, admin = %admin_addr, data_dir = %cfg.data_dir.display(),
        engine = node.engine().kind(), "node serving");

    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(kv)
            .add_service(admin_svc)
            .add_service(replication_svc)
            .add_service(consensus_svc)
            .add_service(control_svc)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            }),
    );
    let http_task = wiring.admin.map(|admin| {
        tokio::spawn(
            axum::serve(admin, crate::admin::router(node.clone(), replicator.clone()))
                .with_graceful_shutdown(async move {
                    let _ = http_stop.wait_for(|s| *s).await;
                })
                .into_future(),
        )
    });

    shutdown.await;
    tracing::info!("shutting down: draining requests and the commit queue");
    health_reporter.set_not_serving::<KvServer<KvService>>().await;
    failover.stop();
    replicator.shutdown().await;
    let _ = stop_tx.send(true);
    let grpc_result = grpc_task.await;
    if let Some(t) = http_task {
        let _ = t.await;
    }
    consensus.shutdown().await;
    node.shutdown();
    tracing::info!("node stopped");
    grpc_result.context("gRPC server task")?.context("gRPC server")?;
    Ok(())
}

/// Binds the configured addresses and runs until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let grpc = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding gRPC address {}", cfg.listen))?;
    let admin = TcpListener::bind(cfg.admin_listen)
        .await
        .with_context(|| format!("binding admin HTTP address {}", cfg.admin_listen))?;
    serve(cfg, grpc, admin, shutdown).await
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
