//! etcd as a target: a 3-member cluster on loopback, driven over its v3 gRPC
//! API with the trimmed protos in `benches/proto/`.
//!
//! Every client sends to the leader (found with Maintenance.Status), which
//! spares writes the follower-to-leader forwarding hop: etcd's best case.
//!
//! With [`Transport::Tls`] the members speak mutual TLS on their client and
//! peer ports, as geokv always does ([`crate::peer_tls`]); the load clients
//! connect through the same channel builder as geokv's clients.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use geokv_net::channel::{ChannelSettings, Channels, Dialer};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};

use crate::peer_tls::{PeerCerts, Transport};
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

/// How this tool reaches the members: plaintext, or a channel builder
/// holding the load generator's client certificate.
#[derive(Clone)]
struct Dial {
    tls: Option<Channels>,
}

/// A running cluster; every member stopped and the data removed when dropped.
pub struct EtcdCluster {
    /// Declared before `dir` so the processes stop before their data goes.
    members: Vec<Child>,
    /// Each member's name and client URL, in start order.
    pub names: Vec<String>,
    pub client_urls: Vec<String>,
    /// Client URL of the member that led when the cluster became ready
    /// (or that [`EtcdCluster::move_leader`] made the leader).
    pub leader_url: String,
    pub transport: Transport,
    dial: Dial,
    _dir: TempDir,
}

/// One member of a cluster to start.
pub struct MemberSpec {
    pub name: String,
    pub client_port: u16,
    /// The port the member listens on for its peers.
    pub peer_port: u16,
    /// The peer address ("host:port") the other members are told to use:
    /// its own port, or a proxy in front of it.
    pub advertise_peer_addr: String,
}

/// Starts `MEMBERS` etcd processes forming one new cluster.
pub async fn start(bin: &Path, transport: Transport) -> Result<EtcdCluster> {
    let ports = process::free_ports(2 * MEMBERS)?;
    let specs: Vec<MemberSpec> = (0..MEMBERS)
        .map(|i| MemberSpec {
            name: format!("n{i}"),
            client_port: ports[i],
            peer_port: ports[MEMBERS + i],
            advertise_peer_addr: format!("127.0.0.1:{}", ports[MEMBERS + i]),
        })
        .collect();
    start_members(bin, &specs, &[], transport).await
}

/// Starts one etcd process per spec, forming one new cluster, with
/// `extra_args` for every member (e.g. Raft timing).
pub async fn start_members(
    bin: &Path,
    specs: &[MemberSpec],
    extra_args: &[String],
    transport: Transport,
) -> Result<EtcdCluster> {
    let bin = process::require_binary(bin, INSTALL_HINT)?;
    let dir = tempfile::Builder::new().prefix("geokv-load-etcd-").tempdir().context("creating a temp dir")?;
    let certs = match transport {
        Transport::Plaintext => None,
        Transport::Tls => Some(PeerCerts::create(
            &dir.path().join("certs"),
            &specs.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        )?),
    };
    let dial = Dial {
        tls: certs
            .as_ref()
            .map(|c| Channels::new(ChannelSettings::CLIENT, Dialer::tcp(), Some(c.client.clone()))),
    };
    let scheme = match transport {
        Transport::Plaintext => "http",
        Transport::Tls => "https",
    };
    let client_urls: Vec<String> =
        specs.iter().map(|m| format!("{scheme}://127.0.0.1:{}", m.client_port)).collect();
    let initial_cluster = specs
        .iter()
        .map(|m| format!("{}={scheme}://{}", m.name, m.advertise_peer_addr))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::with_capacity(specs.len());
    for (m, client_url) in specs.iter().zip(&client_urls) {
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", dir.path().join(&m.name).display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={scheme}://127.0.0.1:{}", m.peer_port))
            .arg(format!("--initial-advertise-peer-urls={scheme}://{}", m.advertise_peer_addr))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=geokv-load")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .args(extra_args);
        if let Some(certs) = &certs {
            let files = certs.server(&m.name);
            for side in ["", "peer-"] {
                cmd.arg(format!("--{side}cert-file={}", files.cert.display()))
                    .arg(format!("--{side}key-file={}", files.key.display()))
                    .arg(format!("--{side}trusted-ca-file={}", files.ca.display()))
                    .arg(format!("--{side}client-cert-auth"));
            }
        }
        let log = dir.path().join(format!("{}.log", m.name));
        members.push(Child::spawn(format!("etcd member {}", m.name), cmd, &log)?);
    }
    let urls = client_urls.clone();
    let leader_url = process::wait_ready(
        "etcd cluster",
        READY_TIMEOUT,
        || members.iter_mut().try_for_each(Child::check_alive),
        || leader(&dial, urls.clone()),
    )
    .await?;
    let pids: Vec<String> = members.iter().map(|m| m.pid().unwrap_or(0).to_string()).collect();
    eprintln!("etcd: {} members (pids {}, {transport:?}), leader {leader_url}", specs.len(), pids.join(", "));
    let names = specs.iter().map(|m| m.name.clone()).collect();
    Ok(EtcdCluster { members, names, client_urls, leader_url, transport, dial, _dir: dir })
}

impl EtcdCluster {
    /// Every member's pid.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().filter_map(Child::pid).collect()
    }
    pub fn check_alive(&mut self) -> Result<()> {
        self.members.iter_mut().try_for_each(Child::check_alive)
    }

    /// The name of the member every member currently agrees leads.
    pub async fn leader_name(&self) -> Result<String> {
        let url = leader(&self.dial, self.client_urls.clone()).await?;
        let at = self.client_urls.iter().position(|u| *u == url).context("leader URL not in the cluster")?;
        Ok(self.names[at].clone())
    }

    /// Makes member `name` the leader (Maintenance.MoveLeader, sent to the
    /// current leader) and waits until every member agrees, within `timeout`.
    /// Clients connect to `leader_url` afterwards.
    pub async fn move_leader(&mut self, name: &str, timeout: Duration) -> Result<()> {
        let at = self.names.iter().position(|n| n == name).with_context(|| format!("no member {name}"))?;
        let target_url = self.client_urls[at].clone();
        let deadline = std::time::Instant::now() + timeout;
        // Bounded by the deadline: each pass sleeps or returns.
        loop {
            let attempt = async {
                let current = leader(&self.dial, self.client_urls.clone()).await?;
                if current == target_url {
                    return Ok(true);
                }
                let target_id = member_id(&self.dial, &target_url).await?;
                let mut m =
                    MaintenanceClient::new(channel(&self.dial, &current, Duration::from_secs(5)).await?);
                m.move_leader(pb::MoveLeaderRequest { target_id })
                    .await
                    .with_context(|| format!("MoveLeader to {name} sent to {current}"))?;
                anyhow::Ok(false)
            };
            let last = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(true)) => {
                    self.leader_url = target_url;
                    return Ok(());
                }
                Ok(Ok(false)) => "leadership moved; waiting until every member agrees".to_string(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => "a MoveLeader attempt took longer than 10 s".to_string(),
            };
            self.check_alive()?;
            if std::time::Instant::now() >= deadline {
                bail!("etcd member {name} is not the leader after {timeout:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The member id of the member serving `url`.
async fn member_id(dial: &Dial, url: &str) -> Result<u64> {
    let mut m = MaintenanceClient::new(channel(dial, url, Duration::from_secs(1)).await?);
    let status =
        m.status(pb::StatusRequest {}).await.with_context(|| format!("status of {url}"))?.into_inner();
    status.header.map(|h| h.member_id).context("status without a header")
}

/// A channel to `url`; with TLS, through the client's certificate (the
/// load loop bounds each request; `timeout` bounds the connection).
async fn channel(dial: &Dial, url: &str, timeout: Duration) -> Result<Channel> {
    if let Some(channels) = &dial.tls {
        let connect = channels.connect(url, None);
        return match tokio::time::timeout(timeout, connect).await {
            Ok(c) => c.with_context(|| format!("connecting to etcd at {url}")),
            Err(_) => bail!("connecting to etcd at {url}: no connection within {timeout:?}"),
        };
    }
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
async fn leader(dial: &Dial, urls: Vec<String>) -> Result<String> {
    let mut leader_id = None;
    let mut ids = Vec::with_capacity(urls.len());
    for url in &urls {
        let mut m = MaintenanceClient::new(channel(dial, url, Duration::from_secs(1)).await?);
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
    pub async fn connect(cluster: &EtcdCluster, serializable: bool, op_timeout: Duration) -> Result<Self> {
        let channel = channel(&cluster.dial, &cluster.leader_url, op_timeout).await?;
        Ok(Self { kv: KvClient::new(channel), serializable })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs etcd (`scripts/deps` installs it); fails without it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tls_cluster_serves_the_load_client_and_refuses_plaintext() {
        let bin = std::path::Path::new("/usr/bin/etcd");
        let mut cluster = start(bin, Transport::Tls).await.expect("a 3-member cluster with mutual TLS");
        assert!(cluster.leader_url.starts_with("https://"), "{}", cluster.leader_url);
        let mut conn = EtcdConn::connect(&cluster, false, Duration::from_secs(5)).await.expect("TLS client");
        conn.put(b"k", b"v").await.expect("a put through TLS");
        conn.get(b"k").await.expect("a linearizable read through TLS");

        // The same port in plaintext gets no answer from etcd.
        let plain = Dial { tls: None };
        let url = cluster.leader_url.replacen("https://", "http://", 1);
        let refused = async {
            let mut m = MaintenanceClient::new(channel(&plain, &url, Duration::from_secs(2)).await?);
            m.status(pb::StatusRequest {}).await.context("status")?;
            anyhow::Ok(())
        };
        let outcome = tokio::time::timeout(Duration::from_secs(10), refused).await;
        assert!(!matches!(outcome, Ok(Ok(()))), "a plaintext client was answered on a TLS port");
        cluster.check_alive().expect("every member still runs");
    }
}
