//! etcd as a target: a 3-member cluster on loopback, driven over its v3 gRPC
//! API with the trimmed protos in `benches/proto/`.
//!
//! Every client sends to the leader (found with Maintenance.Status), which
//! spares writes the follower-to-leader forwarding hop: etcd's best case.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};

use crate::process::{self, Child};

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::maintenance_client::MaintenanceClient;

/// Members of the cluster the tool starts.
pub const MEMBERS: usize = 3;
/// Longest the cluster may take to elect a leader that every member knows.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub const INSTALL_HINT: &str = "install etcd (Debian: `apt-get install etcd-server`) or pass --etcd-bin";

/// A running cluster; every member stopped and the data removed when dropped.
pub struct EtcdCluster {
    /// Declared before `dir` so the processes stop before their data goes.
    members: Vec<Child>,
    /// Client URL of the member that led when the cluster became ready.
    pub leader_url: String,
    _dir: TempDir,
}

/// Starts `MEMBERS` etcd processes forming one new cluster.
pub async fn start(bin: &Path) -> Result<EtcdCluster> {
    let bin = process::require_binary(bin, INSTALL_HINT)?;
    let dir = tempfile::Builder::new().prefix("geokv-load-etcd-").tempdir().context("creating a temp dir")?;
    let ports = process::free_ports(2 * MEMBERS)?;
    let client_urls: Vec<String> = (0..MEMBERS).map(|i| format!("http://127.0.0.1:{}", ports[i])).collect();
    let peer_urls: Vec<String> =
        (0..MEMBERS).map(|i| format!("http://127.0.0.1:{}", ports[MEMBERS + i])).collect();
    let initial_cluster =
        peer_urls.iter().enumerate().map(|(i, url)| format!("n{i}={url}")).collect::<Vec<_>>().join(",");
    let mut members = Vec::with_capacity(MEMBERS);
    for i in 0..MEMBERS {
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--name=n{i}"))
            .arg(format!("--data-dir={}", dir.path().join(format!("n{i}")).display()))
            .arg(format!("--listen-client-urls={}", client_urls[i]))
            .arg(format!("--advertise-client-urls={}", client_urls[i]))
            .arg(format!("--listen-peer-urls={}", peer_urls[i]))
            .arg(format!("--initial-advertise-peer-urls={}", peer_urls[i]))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=geokv-load")
            .arg("--logger=zap")
            .arg("--log-level=warn");
        let log = dir.path().join(format!("n{i}.log"));
        members.push(Child::spawn(format!("etcd member n{i}"), cmd, &log)?);
    }
    let urls = client_urls;
    let leader_url = process::wait_ready(
        "etcd cluster",
        READY_TIMEOUT,
        || members.iter_mut().try_for_each(Child::check_alive),
        || leader(urls.clone()),
    )
    .await?;
    let pids: Vec<String> = members.iter().map(|m| m.pid().unwrap_or(0).to_string()).collect();
    eprintln!("etcd: {MEMBERS} members (pids {}), leader {leader_url}", pids.join(", "));
    Ok(EtcdCluster { members, leader_url, _dir: dir })
}

impl EtcdCluster {
    pub fn check_alive(&mut self) -> Result<()> {
        self.members.iter_mut().try_for_each(Child::check_alive)
    }
}

async fn channel(url: &str, timeout: Duration) -> Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad etcd URL {url}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to etcd at {url}"))
}

/// The client URL of the leader, once every member answers and agrees on it.
async fn leader(urls: Vec<String>) -> Result<String> {
    let mut leader_id = None;
    let mut ids = Vec::with_capacity(urls.len());
    for url in &urls {
        let mut m = MaintenanceClient::new(channel(url, Duration::from_secs(1)).await?);
        let status =
            m.status(pb::StatusRequest {}).await.with_context(|| format!("status of {url}"))?.into_inner();
        let member_id = status.header.map(|h| h.member_id).unwrap_or(0);
        if status.leader == 0 {
            bail!("{url} knows no leader yet");
        }
        if leader_id.is_some_and(|l| l != status.leader) {
            bail!("members disagree on the leader");
        }
        leader_id = Some(status.leader);
        ids.push(member_id);
    }
    let leader_id = leader_id.context("no members")?;
    let at = ids.iter().position(|id| *id == leader_id).context("the leader is not one of our members")?;
    Ok(urls[at].clone())
}

/// A load client's connection to the leader. Clones share one HTTP/2
/// connection (see `--connections`).
#[derive(Clone)]
pub struct EtcdConn {
    kv: KvClient<Channel>,
    /// Reads served from the member's local state instead of linearizable.
    serializable: bool,
}

impl EtcdConn {
    pub async fn connect(url: &str, serializable: bool, op_timeout: Duration) -> Result<Self> {
        Ok(Self { kv: KvClient::new(channel(url, op_timeout).await?), serializable })
    }

    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let req = pb::PutRequest { key: key.to_vec(), value: value.to_vec(), ..Default::default() };
        self.kv.put(req).await.context("etcd put")?;
        Ok(())
    }

    pub async fn get(&mut self, key: &[u8]) -> Result<()> {
        let req =
            pb::RangeRequest { key: key.to_vec(), serializable: self.serializable, ..Default::default() };
        self.kv.range(req).await.context("etcd range")?;
        Ok(())
    }
}
