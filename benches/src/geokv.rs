//! geokv as a target: a node started by the tool (or one already running)
//! and one `geokv_client::Client` per load client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use geokv_client::{CausalContext, Client, ClientConfig, Consistency, ReadConsistency, Row, WriteOptions};
use tempfile::TempDir;

use crate::process::{self, Child};

/// Longest a started node may take to answer its first status call
/// (RocksDB opens and replays its WAL first).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A node started for the run; stopped and its data removed when dropped.
pub struct GeokvNode {
    /// Declared before `dir` so the process stops before its data is removed.
    child: Child,
    pub endpoint: String,
    /// The node's certificates (a CA, the node's, `root`'s); None in plaintext.
    pub certs_dir: Option<PathBuf>,
    _dir: TempDir,
}

impl GeokvNode {
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }
}

/// Where `geokv` is when `--geokv-bin` is not given: next to this executable,
/// which is where cargo puts both (`target/<profile>/`).
pub fn default_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the path of geokv-load")?;
    Ok(exe.with_file_name("geokv"))
}

/// Starts `geokv node` on free loopback ports in a fresh temp data dir,
/// with mutual TLS (certificates made for the run) or in plaintext.
pub async fn start(bin: &Path, extra_args: &[String], tls: bool) -> Result<GeokvNode> {
    let bin = process::require_binary(bin, "build it with `cargo build -p geokv` or pass --geokv-bin")?;
    let dir =
        tempfile::Builder::new().prefix("geokv-load-geokv-").tempdir().context("creating a temp dir")?;
    let ports = process::free_ports(3)?;
    let endpoint = format!("127.0.0.1:{}", ports[0]);
    let certs_dir = if tls {
        let certs = dir.path().join("certs");
        geokv_net::certs::ensure_dev_certs(
            &certs,
            "geokv-load",
            &[("local-1", "n1")],
            &["127.0.0.1"],
            &["root"],
        )
        .context("making the node's certificates")?;
        Some(certs)
    } else {
        None
    };
    let mut cmd = Command::new(&bin);
    cmd.arg("node")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg(&endpoint)
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{}", ports[1]))
        .arg("--listen-peer")
        .arg(format!("127.0.0.1:{}", ports[2]))
        .env_remove("GEOKV_CERTS_DIR")
        .args(extra_args);
    if let Some(c) = &certs_dir {
        cmd.arg("--certs-dir").arg(c);
    }
    let mut child = Child::spawn("geokv node", cmd, &dir.path().join("geokv.log"))?;
    let probe_endpoint = endpoint.clone();
    let probe_certs = certs_dir.clone();
    process::wait_ready(
        "geokv node",
        READY_TIMEOUT,
        || child.check_alive(),
        || {
            let endpoint = probe_endpoint.clone();
            let certs = probe_certs.clone();
            async move {
                let client = Client::with_config(config(&endpoint, certs, Duration::from_secs(1))).await?;
                client.node_status().await?;
                Ok(())
            }
        },
    )
    .await?;
    eprintln!("geokv: node pid {} on {endpoint}", child.pid().unwrap_or(0));
    Ok(GeokvNode { child, endpoint, certs_dir, _dir: dir })
}

impl GeokvNode {
    pub fn check_alive(&mut self) -> Result<()> {
        self.child.check_alive()
    }
}

/// Client settings for the load: no retries, so every failure is counted
/// and every latency is one attempt's.
pub fn config(endpoint: &str, certs_dir: Option<PathBuf>, timeout: Duration) -> ClientConfig {
    let mut cfg = ClientConfig::new(endpoint);
    cfg.certs_dir = certs_dir;
    cfg.timeout = timeout;
    cfg.retries_max = 0;
    cfg
}

/// The last causal context seen per key, shared by all clients of a run.
///
/// The table's default conflict policy keeps concurrent values as siblings;
/// a put without a context is concurrent with everything stored, so blind
/// puts would pile up siblings on every key and each write would read and
/// rewrite an ever larger row. A real overwrite carries the context of what
/// the writer knows, which is what this table gives each put.
pub struct ContextTable {
    slots: Vec<Mutex<CausalContext>>,
}

impl ContextTable {
    pub fn new(keys: u64) -> Self {
        Self { slots: (0..keys).map(|_| Mutex::new(CausalContext::default())).collect() }
    }

    fn get(&self, key_index: u64) -> Option<CausalContext> {
        let slot = self.slots.get(usize::try_from(key_index).ok()?)?;
        let ctx = slot.lock().unwrap_or_else(|p| p.into_inner());
        (!ctx.is_empty()).then(|| ctx.clone())
    }

    fn set(&self, key_index: u64, ctx: CausalContext) {
        if ctx.is_empty() {
            return;
        }
        if let Some(slot) = usize::try_from(key_index).ok().and_then(|i| self.slots.get(i)) {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = ctx;
        }
    }
}

/// Per-run settings every geokv connection shares.
#[derive(Clone)]
pub struct GeokvSettings {
    pub endpoint: String,
    /// Certificates to connect with (None: plaintext).
    pub certs_dir: Option<PathBuf>,
    pub table: String,
    pub consistency: Consistency,
    pub op_timeout: Duration,
    /// None sends blind puts (no context).
    pub contexts: Option<Arc<ContextTable>>,
}

/// A load client's connection. Clones share one HTTP/2 connection (see
/// `--connections`).
#[derive(Clone)]
pub struct GeokvConn {
    client: Client,
    settings: GeokvSettings,
    read: ReadConsistency,
}

impl GeokvConn {
    pub async fn connect(settings: &GeokvSettings) -> Result<Self> {
        let client =
            Client::with_config(config(&settings.endpoint, settings.certs_dir.clone(), settings.op_timeout))
                .await
                .with_context(|| format!("connecting to geokv at {}", settings.endpoint))?;
        let read = match settings.consistency {
            Consistency::Local | Consistency::Eventual => ReadConsistency::Local,
            Consistency::Quorum => ReadConsistency::Quorum,
            Consistency::Strong => ReadConsistency::Strong,
        };
        Ok(Self { client, settings: settings.clone(), read })
    }

    pub async fn put(&mut self, key_index: u64, key: &[u8], value: &[u8]) -> Result<()> {
        let row = Row::new(self.settings.table.as_str(), key);
        let mut opts = WriteOptions::default().consistency(self.settings.consistency);
        let contexts = self.settings.contexts.as_deref();
        if let Some(ctx) = contexts.and_then(|t| t.get(key_index)) {
            opts = opts.context(ctx);
        }
        let ack = self.client.put(&row, value.to_vec(), opts).await?;
        if let Some(t) = contexts {
            t.set(key_index, ack.context);
        }
        Ok(())
    }

    /// Writes `value` under every key of `keys` (index, key) in one atomic
    /// batch (one durable sync on the node).
    pub async fn put_many(&mut self, keys: &[(u64, Vec<u8>)], value: &[u8]) -> Result<()> {
        use geokv_proto::v1 as pb;
        let contexts = self.settings.contexts.as_deref();
        let ops = keys
            .iter()
            .map(|(i, key)| pb::BatchOp {
                op: Some(pb::batch_op::Op::Put(pb::PutRequest {
                    row: Some(Row::new(self.settings.table.as_str(), key.as_slice()).to_proto()),
                    value: value.to_vec(),
                    context: contexts.and_then(|t| t.get(*i)).map(|c| c.0).unwrap_or_default(),
                    ..Default::default()
                })),
            })
            .collect();
        let acks = self.client.batch(ops, Some(self.settings.consistency), None).await?;
        if acks.len() != keys.len() {
            anyhow::bail!("a batch of {} puts was answered with {} acknowledgements", keys.len(), acks.len());
        }
        if let Some(t) = contexts {
            for ((i, _), ack) in keys.iter().zip(acks) {
                t.set(*i, ack.context);
            }
        }
        Ok(())
    }

    pub async fn get(&mut self, key_index: u64, key: &[u8]) -> Result<()> {
        let row = Row::new(self.settings.table.as_str(), key);
        let got = self.client.get(&row, self.read).await?;
        if let Some(t) = self.settings.contexts.as_deref() {
            t.set(key_index, got.context);
        }
        Ok(())
    }
}
