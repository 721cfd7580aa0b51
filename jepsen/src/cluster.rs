//! A real geokv cluster for one run: one `geokv node` process per region
//! on loopback, and every inter-region link behind an in-process fault
//! proxy (a [`ProxySet`] link `A->B` is how node A reaches node B).
//!
//! Each node runs in its own process group, so `kill -9`, SIGSTOP and
//! SIGCONT reach the node and nothing else, and is started with
//! `PR_SET_PDEATHSIG = SIGKILL`, so the nodes die with the harness even if
//! the harness itself is killed with SIGKILL. Dropping a [`Cluster`] (end of
//! run, panic, Ctrl-C dropping the run future) SIGKILLs every node's process
//! group and reaps it.
//!
//! With [`ClusterSpec::fault_fs`], each node's data directory is a mount of
//! the fault filesystem (`geokv-faultfs`, docs/architecture.md section 15)
//! over `<node dir>/backing`: [`Cluster::power_cut`] kills the node and
//! drops every write it had not synced, as a power cut would.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use geokv_client::{Client, ClientConfig};
use geokv_proxy::{LinkFaults, ProxyHandle, ProxySet};

/// The regions of a run, as `geokv dev` names them.
pub const REGIONS: [&str; 4] = ["us-east-1", "eu-west-1", "eu-central-1", "ap-southeast-1"];
/// The residency zone of the EU regions.
pub const EU_ZONE: &str = "eu";
/// Locality values of the residency workload: country -> EU region.
pub const EU_LOCALITIES: [(&str, &str); 2] = [("FR", "eu-west-1"), ("DE", "eu-central-1")];

/// Tables every run's nodes are configured with.
pub const TABLE_REGISTERS: &str = "registers";
/// Rows in a consensus group (STRONG writes and reads, CAS).
pub const TABLE_STRONG_REGISTERS: &str = "strong_registers";
pub const TABLE_COUNTERS: &str = "counters";
pub const TABLE_SETS: &str = "sets";
pub const TABLE_EU_USERS: &str = "eu_users";
/// Last-writer-wins rows written at EVENTUAL in every region and watched
/// through a change feed (the watch workload).
pub const TABLE_WATCHED: &str = "watched";

/// Longest wait for a started node to answer.
pub const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for every region to see every other healthy.
pub const LINKS_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a node to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a SIGKILLed node to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// Environment variable the node reads for its clock offset (the server's
/// `causality::hlc` test hook).
pub const CLOCK_SKEW_ENV: &str = "GEOKV_CLOCK_SKEW_MS";

/// Round-trip times between regions in milliseconds (the table `geokv dev`
/// uses); unknown pairs get 100 ms.
pub fn round_trip_ms(a: &str, b: &str) -> f64 {
    let (x, y) = if a < b { (a, b) } else { (b, a) };
    match (x, y) {
        ("eu-west-1", "us-east-1") => 80.0,
        ("eu-central-1", "us-east-1") => 90.0,
        ("ap-southeast-1", "us-east-1") => 217.0,
        ("eu-central-1", "eu-west-1") => 25.0,
        ("ap-southeast-1", "eu-west-1") => 238.0,
        ("ap-southeast-1", "eu-central-1") => 160.0,
        _ => 100.0,
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub geokv_bin: PathBuf,
    /// Folder for configs, stores and logs.
    pub dir: PathBuf,
    pub regions: Vec<String>,
    /// Multiplies the emulated WAN latencies.
    pub latency_scale: f64,
    /// `storage.sync` of every node.
    pub sync: bool,
    /// Extra environment for every node (e.g. `GEOKV_BUG` on a bugs build).
    pub env: Vec<(String, String)>,
    /// TOML appended to every node's config (a workload's limits).
    pub extra_config: String,
    /// Lines added to every node's `[consensus]` section (a workload's
    /// snapshot cadence).
    pub consensus_config: String,
    /// Lapsed homes move automatically; off, only a nemesis moves them.
    pub automatic_failover: bool,
    /// Each node's data directory on the fault filesystem (power cuts).
    pub fault_fs: bool,
}

/// Longest wait, after a node was reaped, for the kernel to release its
/// last file on the fault filesystem before the power cut.
const POWER_CUT_QUIET: Duration = Duration::from_secs(10);

/// One region's node.
pub struct Node {
    pub region: String,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    config: PathBuf,
    /// The running process, None while killed.
    child: Option<Child>,
    /// Stopped with SIGSTOP and not yet continued.
    pub paused: bool,
    /// Clock offset the running process was started with.
    pub skew_ms: i64,
    /// Starts so far, numbering the log files.
    starts: u32,
    /// The fault filesystem the data directory is mounted on, if any.
    fault_fs: Option<std::sync::Arc<geokv_faultfs::FaultFs>>,
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub nodes: BTreeMap<String, Node>,
    pub proxies: ProxySet,
    /// Each link's one-way latency when healthy, in ms.
    pub base_latency_ms: BTreeMap<String, u64>,
}

/// Cluster name in the certificates of the harness's clusters.
pub const CERT_CLUSTER: &str = "geokv-jepsen";

/// The certificates every cluster of this process runs with (one CA, a
/// node certificate per region, `root`'s client certificate): clusters run
/// secure, as users run them. One directory per process, made on first
/// use and extended for new regions; node names are the same in every
/// cluster, so clusters started side by side share it.
pub fn certs_dir(regions: &[String]) -> anyhow::Result<PathBuf> {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let dir =
        DIR.get_or_init(|| std::env::temp_dir().join(format!("geokv-jepsen-certs-{}", std::process::id())));
    let _held = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let nodes: Vec<(&str, &str)> = regions.iter().map(|r| (r.as_str(), "n1")).collect();
    geokv_net::certs::ensure_dev_certs(dir, CERT_CLUSTER, &nodes, &["127.0.0.1", "localhost"], &["root"])
        .with_context(|| format!("making the cluster's certificates in {}", dir.display()))?;
    Ok(dir.clone())
}

/// Client settings for `endpoint` of a harness cluster: TLS with `root`.
pub fn client_config(endpoint: &str) -> ClientConfig {
    let cfg = ClientConfig::new(endpoint);
    match certs_dir(&[]) {
        Ok(dir) => cfg.with_certs_dir(dir),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no certificates; connecting in plaintext");
            cfg
        }
    }
}

/// A loopback port, held by the returned listener until the caller lets it
/// go (just before the node that will bind it starts), so the proxies'
/// own port-0 binds cannot take it meanwhile.
fn reserve_port() -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    let addr = l.local_addr()?;
    Ok((l, addr))
}

/// Start attempts, each on fresh ports, when a port was taken between its
/// reservation and the node's bind.
const START_ATTEMPTS_MAX: u32 = 3;

/// Sends `sig` to the process group led by `pid`.
fn signal_group(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill(2) touches no memory; the group is a node this harness
    // started with its own process group.
    unsafe { libc::kill(-pid, sig) == 0 }
}

impl Cluster {
    /// Writes the configs, starts the proxy links and the nodes, and waits
    /// until every region sees every other.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Self> {
        if spec.regions.len() < 2 {
            bail!("a cluster needs at least two regions");
        }
        let mut last = None;
        for attempt in 1..=START_ATTEMPTS_MAX {
            if spec.dir.exists() {
                std::fs::remove_dir_all(&spec.dir)
                    .with_context(|| format!("clearing {}", spec.dir.display()))?;
            }
            match Self::start_once(spec.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(attempt, error = %format!("{e:#}"), "cluster start failed; retrying on fresh ports");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no start attempt")))
    }

    async fn start_once(spec: ClusterSpec) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&spec.dir).with_context(|| format!("creating {}", spec.dir.display()))?;
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let mut addrs = BTreeMap::new();
        let mut reserved = Vec::new();
        for r in &spec.regions {
            let (grpc_l, grpc) = reserve_port()?;
            let (admin_l, admin) = reserve_port()?;
            let (peer_l, peer) = reserve_port()?;
            reserved.extend([grpc_l, admin_l, peer_l]);
            addrs.insert(r.clone(), (grpc, admin, peer));
        }
        let certs = certs_dir(&spec.regions)?;
        let proxies = ProxySet::new();
        let mut via = BTreeMap::new();
        let mut base_latency_ms = BTreeMap::new();
        for a in &spec.regions {
            for b in spec.regions.iter().filter(|b| *b != a) {
                let one_way = (round_trip_ms(a, b) / 2.0 * spec.latency_scale).round() as u64;
                let name = link_name(a, b);
                let handle = proxies
                    .add(&name, loopback(0), addrs[b].2, LinkFaults::symmetric_latency(one_way))
                    .await
                    .with_context(|| format!("starting proxy link {name}"))?;
                via.insert((a.clone(), b.clone()), handle.local_addr());
                base_latency_ms.insert(name, one_way);
            }
        }
        let mut nodes = BTreeMap::new();
        for r in &spec.regions {
            let dir = spec.dir.join(r);
            std::fs::create_dir_all(&dir)?;
            let config = dir.join("node.toml");
            let (grpc, admin, peer) = addrs[r];
            let peers: BTreeMap<String, (SocketAddr, SocketAddr)> = spec
                .regions
                .iter()
                .filter(|p| *p != r)
                .map(|p| (p.clone(), (via[&(r.clone(), p.clone())], addrs[p].0)))
                .collect();
            let ports = Ports { grpc, admin, peer };
            std::fs::write(&config, config_text(&spec, r, &dir, ports, &certs, &peers))?;
            let fault_fs = if spec.fault_fs {
                let fs = geokv_faultfs::FaultFs::mount(&dir.join("backing"), &dir.join("data"))
                    .with_context(|| format!("mounting the fault filesystem for {r}"))?;
                Some(std::sync::Arc::new(fs))
            } else {
                None
            };
            nodes.insert(
                r.clone(),
                Node {
                    region: r.clone(),
                    grpc,
                    admin,
                    config,
                    child: None,
                    paused: false,
                    skew_ms: 0,
                    starts: 0,
                    fault_fs,
                },
            );
        }
        let mut cluster = Cluster { spec, nodes, proxies, base_latency_ms };
        drop(reserved);
        let regions = cluster.spec.regions.clone();
        for r in &regions {
            cluster.spawn(r, 0)?;
        }
        for r in &regions {
            cluster.wait_ready(r, NODE_READY_TIMEOUT).await?;
        }
        cluster.wait_links_up(LINKS_UP_TIMEOUT).await?;
        Ok(cluster)
    }

    fn node(&self, region: &str) -> anyhow::Result<&Node> {
        self.nodes.get(region).with_context(|| format!("no region {region}"))
    }

    fn node_mut(&mut self, region: &str) -> anyhow::Result<&mut Node> {
        self.nodes.get_mut(region).with_context(|| format!("no region {region}"))
    }

    /// Starts `region`'s node process (its store, ports and peers are kept
    /// across restarts) with a clock offset of `skew_ms`.
    fn spawn(&mut self, region: &str, skew_ms: i64) -> anyhow::Result<()> {
        let bin = self.spec.geokv_bin.clone();
        let env = self.spec.env.clone();
        let dir = self.spec.dir.clone();
        let node = self.node_mut(region)?;
        if node.child.is_some() {
            bail!("node of {region} already runs");
        }
        node.starts += 1;
        let log_path = dir.join(region).join(format!("node-{}.log", node.starts));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("node")
            .arg("--config")
            .arg(&node.config)
            .env("RUST_LOG", "info")
            .env(CLOCK_SKEW_ENV, skew_ms.to_string())
            .env_remove("GEOKV_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of the
        // parent; it runs in the forked child before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {} node for {region}", bin.display()))?;
        node.child = Some(child);
        node.paused = false;
        node.skew_ms = skew_ms;
        Ok(())
    }

    /// Waits until `region`'s node answers a ClusterStatus call.
    pub async fn wait_ready(&mut self, region: &str, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let endpoint = format!("http://{}", self.node(region)?.grpc);
        loop {
            if let Some(child) = self.node_mut(region)?.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.node_mut(region)?.child = None;
                    bail!(
                        "node of {region} exited with {status}; see {}",
                        self.spec.dir.join(region).display()
                    );
                }
            }
            if let Ok(c) = quick_client(&endpoint).await {
                if c.cluster_status().await.is_ok() {
                    return Ok(());
                }
            }
            if started.elapsed() > limit {
                bail!("node of {region} not ready within {limit:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until every region reports every other region healthy.
    pub async fn wait_links_up(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        for region in self.nodes.keys() {
            let endpoint = self.endpoint(region);
            loop {
                let mut last = String::new();
                match quick_client(&endpoint).await {
                    Ok(c) => match c.cluster_status().await {
                        Ok(view) => {
                            let down: Vec<String> = view
                                .regions
                                .iter()
                                .filter(|r| r.health != "self" && r.health != "healthy")
                                .map(|r| format!("{} is {}", r.name, r.health))
                                .collect();
                            if down.is_empty() && view.regions.len() == self.nodes.len() {
                                break;
                            }
                            last = down.join(", ");
                        }
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last.push_str(&e.to_string()),
                }
                if started.elapsed() > limit {
                    bail!("links not up within {limit:?}: {region} sees {last}");
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    pub fn endpoint(&self, region: &str) -> String {
        self.nodes.get(region).map(|n| format!("http://{}", n.grpc)).unwrap_or_default()
    }

    pub fn link(&self, from: &str, to: &str) -> anyhow::Result<ProxyHandle> {
        Ok(self.proxies.get(&link_name(from, to))?)
    }

    pub fn link_names(&self) -> Vec<String> {
        self.proxies.names()
    }

    pub fn is_running(&self, region: &str) -> bool {
        self.nodes.get(region).is_some_and(|n| n.child.is_some())
    }

    pub fn pid(&self, region: &str) -> Option<u32> {
        self.nodes.get(region).and_then(|n| n.child.as_ref()).map(Child::id)
    }

    /// `kill -9` of `region`'s node; waits until it is reaped.
    pub async fn kill9(&mut self, region: &str) -> anyhow::Result<()> {
        let node = self.node_mut(region)?;
        let Some(mut child) = node.child.take() else { bail!("node of {region} is not running") };
        node.paused = false;
        signal_group(child.id(), libc::SIGKILL);
        let started = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if started.elapsed() > REAP_TIMEOUT {
                bail!("node of {region} not reaped {REAP_TIMEOUT:?} after SIGKILL");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A power cut of `region`'s node: `kill -9`, then every write it had
    /// not synced dropped from its data directory (the fault filesystem).
    /// Returns what was dropped, in words.
    pub async fn power_cut(&mut self, region: &str) -> anyhow::Result<String> {
        let Some(fs) = self.node(region)?.fault_fs.clone() else {
            bail!("node of {region} does not run on the fault filesystem");
        };
        self.kill9(region).await?;
        let report = tokio::task::spawn_blocking(move || fs.power_cut(POWER_CUT_QUIET))
            .await
            .context("power cut task")?
            .with_context(|| format!("power cut of {region}"))?;
        Ok(format!(
            "{} files rolled back to their last sync, {} unsynced files removed, {} unsynced bytes dropped",
            report.files_rolled_back, report.files_removed, report.bytes_dropped
        ))
    }

    /// Starts `region`'s node again (same store) and waits until it answers.
    pub async fn restart(&mut self, region: &str, skew_ms: i64) -> anyhow::Result<()> {
        self.spawn(region, skew_ms)?;
        self.wait_ready(region, NODE_READY_TIMEOUT).await
    }

    /// Deletes `region`'s store (its data directory), as a lost or replaced
    /// disk would; its logs stay. The node must be stopped first.
    pub fn wipe_store(&mut self, region: &str) -> anyhow::Result<String> {
        let store = self.node_dir(region).join("data");
        if self.node_mut(region)?.child.is_some() {
            bail!("node of {region} runs: stop it before deleting its store");
        }
        match std::fs::remove_dir_all(&store) {
            Ok(()) => Ok(format!("deleted {}", store.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(format!("{} was already gone", store.display()))
            }
            Err(e) => Err(anyhow::anyhow!("deleting {}: {e}", store.display())),
        }
    }

    /// SIGSTOP (`pause = true`) or SIGCONT of `region`'s node.
    pub fn pause(&mut self, region: &str, pause: bool) -> anyhow::Result<()> {
        let node = self.node_mut(region)?;
        let Some(child) = node.child.as_ref() else { bail!("node of {region} is not running") };
        if !signal_group(child.id(), if pause { libc::SIGSTOP } else { libc::SIGCONT }) {
            bail!("signal to node of {region}: {}", std::io::Error::last_os_error());
        }
        node.paused = pause;
        Ok(())
    }

    /// Puts every link back to its healthy latency (no partition, stall,
    /// refusal or cap), continues paused nodes, restarts killed or skewed
    /// ones, and waits for the links to come up. Returns what it did.
    pub async fn heal_all(&mut self) -> anyhow::Result<Vec<String>> {
        let mut did = Vec::new();
        for (name, latency) in &self.base_latency_ms {
            let link = self.proxies.get(name)?;
            if link.faults() != LinkFaults::symmetric_latency(*latency) {
                link.set_faults(LinkFaults::symmetric_latency(*latency))?;
                did.push(format!("link {name} restored"));
            }
        }
        let regions: Vec<String> = self.nodes.keys().cloned().collect();
        for r in &regions {
            if self.nodes[r].paused {
                self.pause(r, false)?;
                did.push(format!("{r} continued"));
            }
            if self.nodes[r].skew_ms != 0 && self.nodes[r].child.is_some() {
                self.kill9(r).await?;
                did.push(format!("{r} killed to clear its clock skew"));
            }
            if self.nodes[r].child.is_none() {
                self.restart(r, 0).await?;
                did.push(format!("{r} restarted"));
            }
        }
        self.wait_links_up(LINKS_UP_TIMEOUT).await?;
        Ok(did)
    }

    /// Stops every node with SIGTERM (SIGKILL after a bounded wait).
    pub async fn stop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(child) = node.child.as_ref() {
                if node.paused {
                    signal_group(child.id(), libc::SIGCONT);
                }
                signal_group(child.id(), libc::SIGTERM);
            }
        }
        let started = Instant::now();
        for node in self.nodes.values_mut() {
            let Some(mut child) = node.child.take() else { continue };
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if started.elapsed() > STOP_TIMEOUT => {
                        signal_group(child.id(), libc::SIGKILL);
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => tokio::time::sleep(POLL).await,
                }
            }
        }
        self.proxies.shutdown().await;
    }

    /// Where a node's logs are.
    pub fn node_dir(&self, region: &str) -> PathBuf {
        self.spec.dir.join(region)
    }

    /// Jumps `region`'s wall clock to `offset_ms` from true time, live (the
    /// node follows `<data_dir>/clock-offset-ms` every 20 ms; its monotonic
    /// clock does not move).
    pub fn set_clock_offset(&self, region: &str, offset_ms: i64) -> anyhow::Result<()> {
        let data = self.node_dir(region).join("data");
        std::fs::create_dir_all(&data)?;
        let tmp = data.join("clock-offset-ms.tmp");
        std::fs::write(&tmp, offset_ms.to_string())?;
        std::fs::rename(&tmp, data.join("clock-offset-ms"))
            .with_context(|| format!("setting the clock offset of {region}"))?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                signal_group(child.id(), libc::SIGKILL);
                let _ = child.wait();
            }
        }
    }
}

/// Name of the proxy link node `from` uses to reach node `to`.
pub fn link_name(from: &str, to: &str) -> String {
    format!("{from}->{to}")
}

/// The two regions of a link named by [`link_name`]: (from, to).
pub fn link_ends(link: &str) -> Option<(&str, &str)> {
    link.split_once("->")
}

/// A client with short deadlines and no retries, for probes.
pub async fn quick_client(endpoint: &str) -> Result<Client, geokv_client::Error> {
    let mut cfg = client_config(endpoint);
    cfg.timeout = Duration::from_secs(2);
    cfg.connect_timeout = Duration::from_secs(1);
    cfg.retries_max = 0;
    Client::with_config(cfg).await
}

/// A node's client, admin and peer addresses.
struct Ports {
    grpc: SocketAddr,
    admin: SocketAddr,
    peer: SocketAddr,
}

fn config_text(
    spec: &ClusterSpec,
    region: &str,
    node_dir: &Path,
    ports: Ports,
    certs: &Path,
    peers: &BTreeMap<String, (SocketAddr, SocketAddr)>,
) -> String {
    let first = &spec.regions[0];
    let Ports { grpc, admin, peer } = ports;
    let mut out = String::new();
    out.push_str("# Written by geokv-jepsen for one run.\n");
    out.push_str(&format!("node_id = \"n1\"\nregion = \"{region}\"\n"));
    out.push_str(&format!("data_dir = {:?}\n", node_dir.join("data").display().to_string()));
    out.push_str(&format!("listen = \"{grpc}\"\nlisten_peer = \"{peer}\"\nadmin_listen = \"{admin}\"\n\n"));
    out.push_str(&format!("[security]\ncerts_dir = {:?}\n\n", certs.display().to_string()));
    out.push_str(&format!("[storage]\nsync = {}\n\n", spec.sync));
    // No automatic failover: a killed or paused home keeps its homes, so a
    // LOCAL register at the home stays linearizable; moving homes is the
    // job of a nemesis (planned failover), not a side effect of kill -9.
    out.push_str(&format!(
        "[consensus]\nmanual_only = {}\n{}\n",
        !spec.automatic_failover, spec.consensus_config
    ));
    // The clock-jump nemeses move a node's wall clock through a file
    // (Cluster::set_clock_offset); absent, the clock is the system's.
    out.push_str("[clock]\noffset_control = true\n\n");
    for r in &spec.regions {
        out.push_str(&format!("[[regions]]\nname = \"{r}\"\n"));
        if let Some((via, client)) = peers.get(r) {
            out.push_str(&format!(
                "nodes = [{{ id = \"n1\", addr = \"{via}\", client_addr = \"{client}\" }}]\n"
            ));
        }
        out.push('\n');
    }
    let eu: Vec<&String> = spec.regions.iter().filter(|r| r.starts_with("eu-")).collect();
    if eu.len() >= 2 {
        let list: Vec<String> = eu.iter().map(|r| format!("\"{r}\"")).collect();
        out.push_str(&format!("[[zones]]\nname = \"{EU_ZONE}\"\nregions = [{}]\n\n", list.join(", ")));
        out.push_str("[localities]\n");
        for (c, r) in EU_LOCALITIES {
            if spec.regions.iter().any(|x| x == r) {
                out.push_str(&format!("{c} = \"{r}\"\n"));
            }
        }
        out.push('\n');
    }
    out.push_str(&format!("[[tables]]\nname = \"default\"\ndefault_home_region = \"{first}\"\n\n"));
    out.push_str(&format!(
        "[[tables]]\nname = \"{TABLE_REGISTERS}\"\nlocality = \"by_table\"\nhome_region = \"{first}\"\nconflict = \"lww\"\n\n"
    ));
    out.push_str(&format!(
        "[[tables]]\nname = \"{TABLE_STRONG_REGISTERS}\"\ndefault_home_region = \"{first}\"\ndefault_consistency = \"strong\"\n\n"
    ));
    out.push_str(&format!(
        "[[tables]]\nname = \"{TABLE_COUNTERS}\"\ndefault_home_region = \"{first}\"\ndefault_consistency = \"eventual\"\n\n"
    ));
    out.push_str(&format!(
        "[[tables]]\nname = \"{TABLE_SETS}\"\ndefault_home_region = \"{first}\"\ndefault_consistency = \"eventual\"\n\n"
    ));
    out.push_str(&format!(
        "[[tables]]\nname = \"{TABLE_WATCHED}\"\ndefault_home_region = \"{first}\"\ndefault_consistency = \"eventual\"\nconflict = \"lww\"\n\n"
    ));
    if eu.len() >= 2 {
        out.push_str(&format!(
            "[[tables]]\nname = \"{TABLE_EU_USERS}\"\nzone = \"{EU_ZONE}\"\ndefault_consistency = \"eventual\"\n"
        ));
    }
    if !spec.extra_config.is_empty() {
        out.push('\n');
        out.push_str(&spec.extra_config);
    }
    out
}

/// The zones a cluster of `regions` is configured with.
pub fn zones(regions: &[String]) -> BTreeMap<String, Vec<String>> {
    let eu: Vec<String> = regions.iter().filter(|r| r.starts_with("eu-")).cloned().collect();
    let mut z = BTreeMap::new();
    if eu.len() >= 2 {
        z.insert(EU_ZONE.to_string(), eu);
    }
    z
}
