//! What a run measures: a running target (started by the tool or already
//! there) and the per-client connection that drives it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use geokv_client::Consistency;

use crate::etcd::{self, EtcdCluster, EtcdConn};
use crate::geokv::{self, ContextTable, GeokvConn, GeokvNode, GeokvSettings};
use crate::peer_tls;
use crate::redis::{self, RedisConn, RedisServer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TargetKind {
    /// geokv as users run it: mutual TLS and authorization on.
    Geokv,
    /// The same node in plaintext with no authentication, to price TLS.
    GeokvPlaintext,
    Etcd,
    Redis,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Geokv => "geokv",
            TargetKind::GeokvPlaintext => "geokv-plaintext",
            TargetKind::Etcd => "etcd",
            TargetKind::Redis => "redis",
        }
    }

    /// What durability and consistency a write of this target has, for the
    /// report.
    pub fn semantics(self, consistency: Consistency, peer_transport: peer_tls::Transport) -> String {
        match self {
            TargetKind::Geokv => {
                format!("1 node, writes at {consistency:?}, WAL fsync (group commit), mutual TLS")
            }
            TargetKind::GeokvPlaintext => {
                format!("1 node, writes at {consistency:?}, WAL fsync (group commit), plaintext")
            }
            TargetKind::Etcd => {
                format!(
                    "{} members, raft quorum writes, WAL fsync on each member, {}",
                    etcd::MEMBERS,
                    peer_transport.describe()
                )
            }
            TargetKind::Redis => {
                format!("1 node, appendonly + appendfsync always, {}", peer_transport.describe())
            }
        }
    }
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to start or reach each target, from the command line.
pub struct TargetPlan {
    /// An already-running geokv node; None starts one.
    pub geokv_endpoint: Option<String>,
    /// Certificates for `geokv_endpoint` (None: plaintext).
    pub geokv_certs_dir: Option<std::path::PathBuf>,
    pub geokv_bin: std::path::PathBuf,
    pub geokv_args: Vec<String>,
    pub etcd_bin: std::path::PathBuf,
    /// How etcd and Redis are reached.
    pub peer_transport: peer_tls::Transport,
    pub redis_bin: std::path::PathBuf,
    pub table: String,
    pub consistency: Consistency,
    pub op_timeout: Duration,
    pub keys: u64,
    pub blind_puts: bool,
}

/// A target ready for load. Dropping it stops what the tool started.
pub enum Running {
    Geokv {
        /// None when the node was already running (`--endpoint`).
        node: Option<GeokvNode>,
        settings: GeokvSettings,
        /// Started without TLS (`geokv-plaintext`).
        plaintext: bool,
    },
    Etcd {
        cluster: EtcdCluster,
        serializable: bool,
        op_timeout: Duration,
    },
    Redis(RedisServer),
}

impl Running {
    /// Starts (or reaches) `kind` as `plan` says.
    pub async fn start(kind: TargetKind, plan: &TargetPlan) -> Result<Self> {
        Ok(match kind {
            TargetKind::Geokv | TargetKind::GeokvPlaintext => {
                let tls = kind == TargetKind::Geokv;
                let (node, endpoint, certs_dir) = match &plan.geokv_endpoint {
                    Some(endpoint) => (None, endpoint.clone(), plan.geokv_certs_dir.clone()),
                    None => {
                        let node = geokv::start(&plan.geokv_bin, &plan.geokv_args, tls).await?;
                        let endpoint = node.endpoint.clone();
                        let certs = node.certs_dir.clone();
                        (Some(node), endpoint, certs)
                    }
                };
                let contexts = (!plan.blind_puts).then(|| Arc::new(ContextTable::new(plan.keys)));
                let settings = GeokvSettings {
                    endpoint,
                    certs_dir,
                    table: plan.table.clone(),
                    consistency: plan.consistency,
                    op_timeout: plan.op_timeout,
                    contexts,
                };
                Running::Geokv { node, settings, plaintext: !tls }
            }
            TargetKind::Etcd => Running::Etcd {
                cluster: etcd::start(&plan.etcd_bin, plan.peer_transport).await?,
                // geokv's LOCAL and EVENTUAL reads are served by the replica
                // that receives them; etcd's serializable reads are the match.
                serializable: matches!(plan.consistency, Consistency::Local | Consistency::Eventual),
                op_timeout: plan.op_timeout,
            },
            TargetKind::Redis => Running::Redis(redis::start(&plan.redis_bin, plan.peer_transport).await?),
        })
    }

    /// The server processes this tool started for the target (empty when
    /// it reached one already running), whose CPU time it reports.
    pub fn server_pids(&self) -> Vec<u32> {
        match self {
            Running::Geokv { node: Some(node), .. } => node.pid().into_iter().collect(),
            Running::Geokv { node: None, .. } => Vec::new(),
            Running::Etcd { cluster, .. } => cluster.pids(),
            Running::Redis(r) => r.pid().into_iter().collect(),
        }
    }

    pub fn kind(&self) -> TargetKind {
        match self {
            Running::Geokv { plaintext: false, .. } => TargetKind::Geokv,
            Running::Geokv { plaintext: true, .. } => TargetKind::GeokvPlaintext,
            Running::Etcd { .. } => TargetKind::Etcd,
            Running::Redis(_) => TargetKind::Redis,
        }
    }

    /// Fails, quoting the log, when a process the tool started has died.
    pub fn check_alive(&mut self) -> Result<()> {
        match self {
            Running::Geokv { node: Some(node), .. } => node.check_alive(),
            Running::Geokv { node: None, .. } => Ok(()),
            Running::Etcd { cluster, .. } => cluster.check_alive(),
            Running::Redis(server) => server.check_alive(),
        }
    }

    /// Opens one load client's own connection.
    pub async fn connect(&self) -> Result<Conn> {
        Ok(match self {
            Running::Geokv { settings, .. } => Conn::Geokv(Box::new(GeokvConn::connect(settings).await?)),
            Running::Etcd { cluster, serializable, op_timeout } => {
                Conn::Etcd(EtcdConn::connect(cluster, *serializable, *op_timeout).await?)
            }
            Running::Redis(server) => Conn::Redis(RedisConn::connect(server).await?),
        })
    }
}

/// One load client's connection to a target.
pub enum Conn {
    /// Boxed: a geokv client is much larger than the other connections.
    Geokv(Box<GeokvConn>),
    Etcd(EtcdConn),
    Redis(RedisConn),
}

impl Conn {
    /// Writes `value` under `key` (the `key_index`-th key of the key space).
    pub async fn put(&mut self, key_index: u64, key: &[u8], value: &[u8]) -> Result<()> {
        match self {
            Conn::Geokv(c) => c.put(key_index, key, value).await,
            Conn::Etcd(c) => c.put(key, value).await,
            Conn::Redis(c) => c.set(key, value).await,
        }
    }

    /// Writes `value` under every key of `keys` (index, key): one geokv
    /// batch, one Redis MSET; etcd gets one put per key.
    pub async fn put_many(&mut self, keys: &[(u64, Vec<u8>)], value: &[u8]) -> Result<()> {
        match self {
            Conn::Geokv(c) => c.put_many(keys, value).await,
            Conn::Etcd(c) => {
                for (_, k) in keys {
                    c.put(k, value).await?;
                }
                Ok(())
            }
            Conn::Redis(c) => c.mset(keys, value).await,
        }
    }

    /// Another client's handle on the same connection, where the protocol
    /// multiplexes (HTTP/2: geokv, etcd); None for Redis, whose connection
    /// carries one request at a time.
    pub fn share(&self) -> Option<Conn> {
        match self {
            Conn::Geokv(c) => Some(Conn::Geokv(c.clone())),
            Conn::Etcd(c) => Some(Conn::Etcd(c.clone())),
            Conn::Redis(_) => None,
        }
    }

    /// Reads `key`; a key never written is a successful read.
    pub async fn get(&mut self, key_index: u64, key: &[u8]) -> Result<()> {
        match self {
            Conn::Geokv(c) => c.get(key_index, key).await,
            Conn::Etcd(c) => c.get(key).await,
            Conn::Redis(c) => c.get(key).await,
        }
    }
}
