//! A whole `geokv dev` cluster for multi-region tests: four regions, one or
//! more `geokv node` processes each ([`Options::nodes_per_region`]), every
//! inter-region link behind the fault proxy with emulated WAN latency.
//!
//! [`DevCluster`] runs `geokv dev` as a child process on a block of free
//! loopback ports and a temp data directory, waits (bounded) until every
//! region answers and every replication link is up, and offers what a
//! chaos test needs: endpoints per region, the proxy's control API, and
//! `kill -9` / restart of one region's node. Dropping it stops everything
//! it started, even when the test failed; on failure it prints the tail of
//! every log first.
//!
//! The nodes are children of the `geokv dev` process, so a node is found
//! through `/proc` by its exact command line (`geokv node --config
//! <data-dir>/<region>/node.toml`, a path unique to this cluster). A node
//! restarted by the harness is the harness's own child, started from the
//! same `node.toml` (same data directory, ports and peers).

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use geokv_client::Client;
use geokv_proxy::ControlClient;

use super::{http_get, run_bounded, CliOutput, Deadline, CLI_TIMEOUT, GEOKV_BIN};

/// The regions `geokv dev` runs by default, in its port order: region `i`
/// listens for gRPC on `base + 10 i` and for admin HTTP on `base + 10 i + 1`.
pub const REGIONS: [&str; 4] = ["us-east-1", "eu-west-1", "eu-central-1", "ap-southeast-1"];

/// Longest wait for `geokv dev` to report its cluster started. Four cold
/// RocksDB opens take a second or two; the margin is for a loaded host.
pub const DEV_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait, once the nodes answer, for every region to hear from every
/// other (replication links connected and heartbeating).
pub const LINKS_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a restarted node to answer `/health`.
pub const NODE_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for `geokv dev` to exit after SIGTERM (it stops its nodes
/// with SIGTERM and gives each 10 s before SIGKILL).
pub const DEV_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a killed process to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between polls of a process or a port.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Starts of a restarted node whose ports its killed predecessor still
/// held, and the pause between them.
const REBIND_ATTEMPTS: u32 = 10;
const REBIND_PAUSE: Duration = Duration::from_millis(200);
/// Start attempts on fresh port blocks, when another process took a port of
/// the block between the probe and the bind.
const START_ATTEMPTS_MAX: u32 = 3;

/// Port blocks are taken from [PORT_FIRST, PORT_LAST), below Linux's
/// ephemeral range (32768 and up) so the proxies' and clients' own port-0
/// binds never land in a block. Each block spans 100 ports: four regions use
/// base .. base+31 and the proxy control API base+99.
const PORT_FIRST: u16 = 20_000;
const PORT_LAST: u16 = 32_000;
const PORT_BLOCK: u16 = 100;
/// Blocks tried per start before giving up.
const PORT_PROBES_MAX: u32 = 120;

/// Next block to probe, shared by the tests of one binary so parallel tests
/// never pick the same block. Seeded from the process id so two test
/// binaries running at once start far apart.
static NEXT_BLOCK: AtomicU16 = AtomicU16::new(u16::MAX);

/// Ports a cluster at `base` with `nodes` nodes per region binds.
fn block_ports(base: u16, nodes: u16) -> Vec<u16> {
    let mut ports: Vec<u16> = (0..REGIONS.len() as u16)
        .flat_map(|i| {
            (0..nodes).flat_map(move |j| {
                let grpc = base + 10 * i + 2 * j;
                // Client, admin and peer port (`geokv dev`: peer = client + 50).
                [grpc, grpc + 1, grpc + 50]
            })
        })
        .collect();
    ports.push(base + 99);
    ports
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    pub latency_scale: f64,
    /// `geokv dev --nodes-per-region` (1 to 5).
    pub nodes_per_region: u16,
    /// `geokv dev --partitions`.
    pub partitions: u32,
    /// TOML sections appended to every node's config (`--extra-config`).
    pub extra_config: String,
    /// `geokv dev --client-region`: client ports also fronted by links
    /// with the latency from this region.
    pub client_region: Option<String>,
    /// A put-back bug (`GEOKV_BUG`) switched on in every node; the cluster
    /// then runs the `geokv-bugs` binary (`common::bugs_bin`).
    pub bug: Option<&'static str>,
}

impl Options {
    pub fn scale(latency_scale: f64) -> Self {
        Self {
            latency_scale,
            nodes_per_region: 1,
            partitions: 64,
            extra_config: String::new(),
            client_region: None,
            bug: None,
        }
    }
}

/// A block of ports nobody listens on right now.
fn free_block(nodes: u16) -> u16 {
    let blocks = (PORT_LAST - PORT_FIRST) / PORT_BLOCK;
    let _ = NEXT_BLOCK.compare_exchange(
        u16::MAX,
        (std::process::id() % u32::from(blocks)) as u16,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    for _ in 0..PORT_PROBES_MAX {
        let block = NEXT_BLOCK.fetch_add(1, Ordering::AcqRel) % blocks;
        let base = PORT_FIRST + block * PORT_BLOCK;
        let free = block_ports(base, nodes).into_iter().all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free block of {PORT_BLOCK} loopback ports in {PORT_FIRST}..{PORT_LAST} after {PORT_PROBES_MAX} probes");
}

/// One-way latency `geokv dev` gives the link between `a` and `b` at
/// `scale`, in ms: half the measured round trip (the table in
/// client/cli/src/dev.rs), rounded as dev rounds it.
pub fn one_way_ms(a: &str, b: &str, scale: f64) -> u64 {
    let rtt = match (a.min(b), a.max(b)) {
        ("eu-west-1", "us-east-1") => 80.0,
        ("eu-central-1", "us-east-1") => 90.0,
        ("ap-southeast-1", "us-east-1") => 217.0,
        ("eu-central-1", "eu-west-1") => 25.0,
        ("ap-southeast-1", "eu-west-1") => 238.0,
        ("ap-southeast-1", "eu-central-1") => 160.0,
        _ => 100.0,
    };
    (rtt / 2.0 * scale).round() as u64
}

/// Sends `signal` to `pid`; false when no such process exists.
fn signal(pid: u32, signal: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill(2) touches no memory. Every pid passed here is a process
    // this harness started, or one found by a command line naming this
    // cluster's own temp directory.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Whether `pid` is gone or a zombie (dead, waiting for its parent).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => {
            stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])).unwrap_or(true)
        }
        Err(_) => true,
    }
}

/// Live processes whose command line is `geokv node --config <config>`.
fn node_pids(config: &Path) -> Vec<u32> {
    let wanted = config.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_node = args.get(1) == Some(&b"node".as_slice())
            && args.windows(2).any(|w| w[0] == b"--config" && w[1] == wanted);
        if is_node && !dead(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Kills `pid` with SIGKILL and waits (bounded) until it is dead.
fn kill_pid(pid: u32) {
    signal(pid, libc::SIGKILL);
    let deadline = Deadline::after(KILL_TIMEOUT);
    while !dead(pid) {
        assert!(!deadline.passed(), "process {pid} still alive {KILL_TIMEOUT:?} after SIGKILL");
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The last `lines` lines of a file, or a note that it cannot be read.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// One Raft vote a node stored (a `VOTE` line of its log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVote {
    /// "region/node".
    pub node: String,
    pub group: String,
    pub term: u64,
    /// The Raft member id voted for.
    pub voted_for: u64,
    /// A vote the term's leader was established under.
    pub committed: bool,
}

/// A running `geokv dev` cluster.
pub struct DevCluster {
    /// Owns every file of the cluster; removed on drop.
    dir: tempfile::TempDir,
    /// `--data-dir` of `geokv dev`: one folder per region with its
    /// `node.toml`, `node.log` and store.
    data_dir: PathBuf,
    base_port: u16,
    pub latency_scale: f64,
    pub nodes_per_region: u16,
    /// Started with `--client-region` (one more proxy link per node).
    client_region: bool,
    /// The `geokv dev` process (None once stopped).
    dev: Option<Child>,
    /// The node binary (`geokv`, or `geokv-bugs` with a put-back bug) and
    /// the bug, for restarts.
    bin: PathBuf,
    bug: Option<&'static str>,
    /// Nodes this harness restarted itself, by region.
    restarted: BTreeMap<String, Child>,
    /// Restarts so far, numbering their log files.
    restarts: u32,
}

impl DevCluster {
    /// Starts `geokv dev` with `--latency-scale scale` and waits until every
    /// region answers and hears from every other region.
    pub async fn start(latency_scale: f64) -> Self {
        Self::start_with(Options::scale(latency_scale)).await
    }

    /// Starts `geokv dev` as `options` say and waits until every region
    /// answers and hears from every other region.
    pub async fn start_with(options: Options) -> Self {
        let mut last_failure = String::new();
        for attempt in 1..=START_ATTEMPTS_MAX {
            let mut cluster = Self::spawn(&options);
            match cluster.wait_started().await {
                Ok(()) => {
                    cluster.wait_links_up().await;
                    return cluster;
                }
                Err(why) => {
                    eprintln!("dev cluster start attempt {attempt} failed, retrying on other ports: {why}");
                    last_failure = why;
                    // Dropping stops whatever did start.
                }
            }
        }
        panic!("geokv dev did not start in {START_ATTEMPTS_MAX} attempts; last failure: {last_failure}");
    }

    fn spawn(options: &Options) -> Self {
        let latency_scale = options.latency_scale;
        let dir = tempfile::Builder::new().prefix("geokv-dev-it-").tempdir().expect("create a temp dir");
        let data_dir = dir.path().join("data");
        let base_port = free_block(options.nodes_per_region);
        let extra = dir.path().join("extra.toml");
        std::fs::write(&extra, &options.extra_config).expect("write extra.toml");
        let log = File::create(dir.path().join("dev.log")).expect("create dev.log");
        let err = log.try_clone().expect("clone the dev.log handle");
        let bin = match options.bug {
            Some(_) => super::bugs_bin(),
            None => PathBuf::from(GEOKV_BIN),
        };
        let dev = Command::new(&bin)
            .env("GEOKV_BUG", options.bug.unwrap_or(""))
            .arg("dev")
            .arg("--nodes-per-region")
            .arg(options.nodes_per_region.to_string())
            .arg("--partitions")
            .arg(options.partitions.to_string())
            .arg("--extra-config")
            .arg(&extra)
            .arg("--base-port")
            .arg(base_port.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--fresh")
            .arg("--latency-scale")
            .arg(latency_scale.to_string())
            .args(options.client_region.iter().flat_map(|r| ["--client-region", r.as_str()]))
            .env("RUST_LOG", "info")
            .env_remove("GEOKV_CONFIG")
            .env_remove("GEOKV_ENDPOINT")
            .env_remove("GEOKV_CERTS_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn `geokv dev`");
        Self {
            dir,
            data_dir,
            base_port,
            latency_scale,
            nodes_per_region: options.nodes_per_region,
            client_region: options.client_region.is_some(),
            dev: Some(dev),
            bin,
            bug: options.bug,
            restarted: BTreeMap::new(),
            restarts: 0,
        }
    }

    /// Waits until `geokv dev` says the cluster runs (it prints its last
    /// line once every node accepts connections) and the proxy control API
    /// answers with a link per ordered pair of regions.
    async fn wait_started(&mut self) -> Result<(), String> {
        let deadline = Deadline::after(DEV_START_TIMEOUT);
        loop {
            let dev = self.dev.as_mut().expect("dev process");
            if let Some(status) = dev.try_wait().expect("poll geokv dev") {
                self.dev = None;
                return Err(format!("geokv dev exited with {status}:\n{}", self.dev_log()));
            }
            if self.dev_log().contains("Ctrl-C stops the cluster.") {
                break;
            }
            if deadline.passed() {
                return Err(format!(
                    "geokv dev not started within {DEV_START_TIMEOUT:?}:\n{}",
                    self.dev_log()
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        // dev starts without the control API when its port is taken.
        let links = self.control().links().await.map_err(|e| format!("proxy control API: {e}"))?;
        let nodes = REGIONS.len() * usize::from(self.nodes_per_region);
        let client_links = if self.client_region { nodes } else { 0 };
        let expected = nodes * (nodes - usize::from(self.nodes_per_region)) + client_links;
        if links.len() != expected {
            return Err(format!("proxy control API lists {} links, expected {expected}", links.len()));
        }
        Ok(())
    }

    /// Waits until every region reports every other region healthy, which
    /// needs its replication links to be connected both ways.
    pub async fn wait_links_up(&self) {
        let deadline = Deadline::after(LINKS_UP_TIMEOUT);
        let mut last: String;
        'regions: for region in REGIONS {
            loop {
                match self.try_client(region).await {
                    Ok(client) => match client.cluster_status().await {
                        Ok(view) => {
                            let down: Vec<String> = view
                                .regions
                                .iter()
                                .filter(|r| r.health != "self" && r.health != "healthy")
                                .map(|r| format!("{} is {}", r.name, r.health))
                                .collect();
                            if down.is_empty() && view.regions.len() == REGIONS.len() {
                                continue 'regions;
                            }
                            last = format!("{region} sees: {}", down.join(", "));
                        }
                        Err(e) => last = format!("{region}: cluster status: {e}"),
                    },
                    Err(e) => last = format!("{region}: connect: {e}"),
                }
                if deadline.passed() {
                    panic!("replication links not all up within {LINKS_UP_TIMEOUT:?}: {last}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn region_index(region: &str) -> u16 {
        REGIONS.iter().position(|r| *r == region).unwrap_or_else(|| panic!("unknown region {region}")) as u16
    }

    pub fn grpc_addr(&self, region: &str) -> SocketAddr {
        self.node_grpc_addr(region, 0)
    }

    pub fn admin_addr(&self, region: &str) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base_port + 10 * Self::region_index(region) + 1))
    }

    /// gRPC address of node `j` (from 0; its id is `n{j+1}`) of `region`.
    pub fn node_grpc_addr(&self, region: &str, j: u16) -> SocketAddr {
        assert!(j < self.nodes_per_region, "{region} has {} nodes", self.nodes_per_region);
        SocketAddr::from(([127, 0, 0, 1], self.base_port + 10 * Self::region_index(region) + 2 * j))
    }

    /// Peer-port address of node `j` (from 0) of `region` (`geokv dev`:
    /// the client port plus 50).
    pub fn node_peer_addr(&self, region: &str, j: u16) -> SocketAddr {
        let grpc = self.node_grpc_addr(region, j);
        SocketAddr::from(([127, 0, 0, 1], grpc.port() + 50))
    }

    /// A channel to `addr` presenting the certificate of node `as_node`
    /// (region, node id): what another node of the cluster would open.
    pub async fn node_channel(&self, addr: SocketAddr, as_node: (&str, &str)) -> tonic::transport::Channel {
        let files = geokv_net::tls::TlsFiles::node(&self.certs_dir(), as_node.0, as_node.1);
        let tls = geokv_net::tls::Tls::load(files).expect("load the node certificate");
        let channels = geokv_net::channel::Channels::new(
            geokv_net::channel::ChannelSettings::PEER,
            geokv_net::channel::Dialer::tcp(),
            Some(tls),
        );
        channels.connect(&addr.to_string(), None).await.unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    /// Admin HTTP address of node `j` (from 0) of `region`.
    pub fn node_admin_addr(&self, region: &str, j: u16) -> SocketAddr {
        let grpc = self.node_grpc_addr(region, j);
        SocketAddr::from(([127, 0, 0, 1], grpc.port() + 1))
    }

    /// A client of node `j` of `region`.
    pub async fn node_client(&self, region: &str, j: u16) -> Client {
        let endpoint = format!("http://{}", self.node_grpc_addr(region, j));
        Client::with_config(self.client_config(&endpoint))
            .await
            .unwrap_or_else(|e| panic!("connect to {region} node {j}: {e}"))
    }

    /// `(region, node id)` of every node, in port order.
    pub fn nodes(&self) -> Vec<(&'static str, String)> {
        REGIONS.iter().flat_map(|r| (1..=self.nodes_per_region).map(move |j| (*r, format!("n{j}")))).collect()
    }

    /// The cluster's certificates (`geokv dev` makes them under its data dir).
    pub fn certs_dir(&self) -> PathBuf {
        self.data_dir.join("certs")
    }

    /// Client settings for `endpoint`: TLS with `root`'s certificate.
    pub fn client_config(&self, endpoint: &str) -> geokv_client::ClientConfig {
        geokv_client::ClientConfig::new(endpoint).with_certs_dir(self.certs_dir())
    }

    /// `http://127.0.0.1:PORT` of a region's gRPC API.
    pub fn endpoint(&self, region: &str) -> String {
        format!("http://{}", self.grpc_addr(region))
    }

    /// The proxied client endpoint of `region` that `geokv dev
    /// --client-region` printed (its first node), as `region=addr`.
    pub fn client_region_seeds(&self) -> Vec<String> {
        let log = self.dev_log();
        let mut seeds = Vec::new();
        for region in REGIONS {
            let line = log
                .lines()
                .skip_while(|l| !l.starts_with("client endpoints as seen from"))
                .find(|l| l.split_whitespace().next() == Some(region))
                .unwrap_or_else(|| panic!("geokv dev printed no client endpoint for {region}:\n{log}"));
            let addr = line.split_whitespace().nth(2).expect("an address column");
            seeds.push(format!("{region}={addr}"));
        }
        seeds
    }

    /// Address of the fault proxy's HTTP control API.
    pub fn control_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base_port + 99))
    }

    pub fn control(&self) -> ControlClient {
        ControlClient::new(self.control_addr())
    }

    /// Names of the proxy links to and from `region`: `A->B` with one node
    /// per region, `A.n1->B.n2` with several (as `geokv dev` names them).
    pub fn links_touching(&self, region: &str) -> Vec<String> {
        let nodes = self.nodes();
        let name = |a: &(&str, String), b: &(&str, String)| {
            if self.nodes_per_region == 1 {
                format!("{}->{}", a.0, b.0)
            } else {
                format!("{}.{}->{}.{}", a.0, a.1, b.0, b.1)
            }
        };
        let mut out = Vec::new();
        for a in nodes.iter().filter(|n| n.0 == region) {
            for b in nodes.iter().filter(|n| n.0 != region) {
                out.push(name(a, b));
                out.push(name(b, a));
            }
        }
        out
    }

    /// Black-holes every link to and from `region`, both directions.
    pub async fn isolate(&self, region: &str) {
        let control = self.control();
        for link in self.links_touching(region) {
            control.partition(&link).await.unwrap_or_else(|e| panic!("partition {link}: {e}"));
        }
    }

    /// Heals every link to and from `region` (latency is kept).
    pub async fn heal(&self, region: &str) {
        let control = self.control();
        for link in self.links_touching(region) {
            control.heal(&link).await.unwrap_or_else(|e| panic!("heal {link}: {e}"));
        }
    }

    pub async fn try_client(&self, region: &str) -> Result<Client, geokv_client::Error> {
        Client::with_config(self.client_config(&self.endpoint(region))).await
    }

    /// A client connected to `region`'s node.
    pub async fn client(&self, region: &str) -> Client {
        self.try_client(region).await.unwrap_or_else(|e| panic!("connect to {region}: {e}"))
    }

    /// A client of `region` with `config` adjusted by `adjust`.
    pub async fn client_with(
        &self,
        region: &str,
        adjust: impl FnOnce(&mut geokv_client::ClientConfig),
    ) -> Client {
        let mut cfg = self.client_config(&self.endpoint(region));
        adjust(&mut cfg);
        Client::with_config(cfg).await.unwrap_or_else(|e| panic!("connect to {region}: {e}"))
    }

    /// Runs `geokv ARGS --endpoint <us-east-1>` (bounded), off the async
    /// runtime's worker threads.
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        let mut cmd = Command::new(GEOKV_BIN);
        cmd.args(args)
            .arg("--endpoint")
            .arg(self.grpc_addr(REGIONS[0]).to_string())
            .env_remove("GEOKV_ENDPOINT")
            .env("GEOKV_CERTS_DIR", self.certs_dir());
        tokio::task::spawn_blocking(move || run_bounded(cmd, CLI_TIMEOUT)).await.expect("CLI runner thread")
    }

    /// Polls `geokv digest --json` until every (table, zone) digest matches
    /// across the regions allowed to hold it; returns the last report.
    pub async fn wait_converged(&self, limit: Duration) -> serde_json::Value {
        let deadline = Deadline::after(limit);
        let mut last: String;
        loop {
            let out = self.cli(&["digest", "--json"]).await;
            match serde_json::from_str::<serde_json::Value>(out.stdout.trim()) {
                Ok(report) if report["converged"] == true => {
                    assert!(out.status.success(), "digest says converged but exits with {}", out.status);
                    return report;
                }
                Ok(report) => last = report.to_string(),
                Err(_) => last = format!("{} / {}", out.stdout, out.stderr),
            }
            assert!(
                !deadline.passed(),
                "regions did not converge within {limit:?}; last digest report: {last}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Runs `geokv ARGS --json` and parses its output (asserting success).
    pub async fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all).await.ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("geokv {all:?} printed no JSON ({e}): {out}"))
    }

    /// Jumps the wall clock of `region`'s first node to `offset_ms` from
    /// true time, live: nodes started with `clock.offset_control = true`
    /// follow `<data_dir>/clock-offset-ms` (docs/architecture.md section 18).
    pub fn set_clock_offset(&self, region: &str, offset_ms: i64) {
        let data = self.node_dir(region, "n1").join("data");
        let tmp = data.join("clock-offset-ms.tmp");
        std::fs::write(&tmp, offset_ms.to_string()).expect("write the clock offset");
        std::fs::rename(&tmp, data.join("clock-offset-ms")).expect("move the clock offset into place");
    }

    pub fn node_config(&self, region: &str) -> PathBuf {
        self.node_dir(region, "n1").join("node.toml")
    }

    /// Folder of one node: `<data>/<region>` with one node per region,
    /// `<data>/<region>/<id>` with several.
    fn node_dir(&self, region: &str, id: &str) -> PathBuf {
        if self.nodes_per_region == 1 {
            self.data_dir.join(region)
        } else {
            self.data_dir.join(region).join(id)
        }
    }

    fn dev_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dev.log")).unwrap_or_default()
    }

    /// Kills `geokv dev` itself with SIGKILL (its nodes are left to what
    /// the kernel does with them) and reaps it.
    pub fn kill_9_dev(&mut self) {
        let mut dev = self.dev.take().expect("geokv dev runs");
        dev.kill().expect("send SIGKILL to geokv dev");
        let _ = dev.wait();
    }

    /// Pids of every node process of this cluster still alive (zombies
    /// and exiting processes excluded).
    pub fn live_node_pids(&self) -> Vec<u32> {
        REGIONS.iter().flat_map(|r| node_pids(&self.node_config(r))).filter(|p| !dead(*p)).collect()
    }

    /// Pid of `region`'s running node, if one runs.
    pub fn node_pid(&self, region: &str) -> Option<u32> {
        if let Some(child) = self.restarted.get(region) {
            return (!dead(child.id())).then(|| child.id());
        }
        let pids = node_pids(&self.node_config(region));
        assert!(pids.len() <= 1, "more than one node of {region} runs: {pids:?}");
        pids.first().copied()
    }

    /// Stops `region`'s node with SIGSTOP (a process frozen like in a long
    /// GC pause); [`DevCluster::unpause`] continues it.
    pub fn pause(&self, region: &str) {
        let pid = self.node_pid(region).unwrap_or_else(|| panic!("no running node of {region} to pause"));
        signal(pid, libc::SIGSTOP);
    }

    pub fn unpause(&self, region: &str) {
        let pid = self.node_pid(region).unwrap_or_else(|| panic!("no running node of {region} to continue"));
        signal(pid, libc::SIGCONT);
    }

    /// Kills `region`'s node with SIGKILL, as a crash would, and waits until
    /// it is dead. The other regions and the proxies keep running.
    pub fn kill_9(&mut self, region: &str) {
        if let Some(mut child) = self.restarted.remove(region) {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        let pid = self.node_pid(region).unwrap_or_else(|| panic!("no running node of {region} to kill"));
        kill_pid(pid);
    }

    /// The store of `region`'s first node (`data_dir` of its `node.toml`).
    pub fn store_dir(&self, region: &str) -> PathBuf {
        self.node_dir(region, "n1").join("data")
    }

    /// Wipes `region`'s node as a lost or replaced disk would: kills it,
    /// deletes its store, and starts it again on an empty one (same name,
    /// ports and peers).
    pub async fn wipe(&mut self, region: &str) {
        self.kill_9(region);
        let store = self.store_dir(region);
        std::fs::remove_dir_all(&store).unwrap_or_else(|e| panic!("delete {}: {e}", store.display()));
        self.restart(region).await;
    }

    /// Starts `region`'s node again from its `node.toml` (same store, ports
    /// and peers) and waits until it answers `/health`.
    ///
    /// A killed node's threads can still hold its ports for a moment after
    /// its main thread shows as dead (a multi-threaded process releases its
    /// files when its last thread exits), so a start that fails to bind a
    /// port is tried again, at most `REBIND_ATTEMPTS` times.
    pub async fn restart(&mut self, region: &str) {
        assert!(self.node_pid(region).is_none(), "restart of {region}, whose node still runs");
        let admin = self.admin_addr(region);
        let deadline = Deadline::after(NODE_READY_TIMEOUT);
        let mut attempt = 0;
        'start: loop {
            attempt += 1;
            self.restarts += 1;
            let log_path = self.dir.path().join(format!("restart-{}-{region}.log", self.restarts));
            let log = File::create(&log_path).expect("create a restart log");
            let child = Command::new(&self.bin)
                .env("GEOKV_BUG", self.bug.unwrap_or(""))
                .arg("node")
                .arg("--config")
                .arg(self.node_config(region))
                .env("RUST_LOG", "info")
                .env_remove("GEOKV_CONFIG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn `geokv node`");
            self.restarted.insert(region.to_string(), child);
            loop {
                let child = self.restarted.get_mut(region).expect("restarted node");
                if let Some(status) = child.try_wait().expect("poll the restarted node") {
                    self.restarted.remove(region);
                    let log = tail(&log_path, 40);
                    if log.contains("Address already in use")
                        && attempt < REBIND_ATTEMPTS
                        && !deadline.passed()
                    {
                        tokio::time::sleep(REBIND_PAUSE).await;
                        continue 'start;
                    }
                    panic!("restarted node of {region} exited with {status} (start {attempt}):\n{log}");
                }
                let health = tokio::task::spawn_blocking(move || http_get(admin, "/health"))
                    .await
                    .expect("health probe");
                if health.is_ok_and(|body| body.contains("\"serving\"")) {
                    return;
                }
                assert!(!deadline.passed(), "restarted node of {region} not ready in {NODE_READY_TIMEOUT:?}");
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    }

    /// Every Raft vote the nodes stored, read from their logs (which are
    /// kept beside the stores, so they outlive a wipe): one per `VOTE` line.
    pub fn stored_votes(&self) -> Vec<StoredVote> {
        let mut logs: Vec<(String, PathBuf)> = self
            .nodes()
            .into_iter()
            .map(|(region, id)| (format!("{region}/{id}"), self.node_dir(region, &id).join("node.log")))
            .collect();
        for n in 1..=self.restarts {
            for region in REGIONS {
                let path = self.dir.path().join(format!("restart-{n}-{region}.log"));
                if path.exists() {
                    logs.push((format!("{region}/n1"), path));
                }
            }
        }
        let mut votes = Vec::new();
        for (node, path) in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                let Some((_, fields)) = line.split_once("VOTE ") else { continue };
                let field = |name: &str| {
                    fields
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                        .map(str::to_string)
                };
                let (Some(group), Some(term), Some(voted_for)) =
                    (field("group"), field("term"), field("voted_for"))
                else {
                    continue;
                };
                let (Ok(term), Ok(voted_for)) = (term.parse(), voted_for.parse()) else { continue };
                let committed = field("committed").as_deref() == Some("true");
                votes.push(StoredVote { node: node.clone(), group, term, voted_for, committed });
            }
        }
        votes
    }

    fn print_logs(&self) {
        eprintln!(
            "---- geokv dev (ports {}..) ----\n{}",
            self.base_port,
            tail(&self.dir.path().join("dev.log"), 30)
        );
        for (region, id) in self.nodes() {
            eprintln!(
                "---- node log of {region}/{id} ----\n{}",
                tail(&self.node_dir(region, &id).join("node.log"), 40)
            );
        }
        for n in 1..=self.restarts {
            for region in REGIONS {
                let path = self.dir.path().join(format!("restart-{n}-{region}.log"));
                if path.exists() {
                    eprintln!("---- restart {n} of {region} ----\n{}", tail(&path, 40));
                }
            }
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        for (_, mut child) in std::mem::take(&mut self.restarted) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut dev) = self.dev.take() {
            signal(dev.id(), libc::SIGTERM);
            let started = Instant::now();
            loop {
                match dev.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if started.elapsed() > DEV_STOP_TIMEOUT => {
                        eprintln!(
                            "geokv dev did not stop within {DEV_STOP_TIMEOUT:?} of SIGTERM; killing it"
                        );
                        let _ = dev.kill();
                        let _ = dev.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(POLL_INTERVAL),
                }
            }
        }
        // A dev process that was killed leaves its nodes running: stop any
        // node of this cluster that is still alive.
        for (region, id) in self.nodes() {
            for pid in node_pids(&self.node_dir(region, &id).join("node.toml")) {
                kill_pid(pid);
            }
        }
    }
}

/// The lease of `home` as `client`'s node reports it.
pub async fn home_lease(client: &Client, home: &str) -> Option<geokv_client::proto::HomeInfo> {
    client.region_status().await.ok()?.homes.into_iter().find(|h| h.home == home)
}

/// Waits (at most `limit`) until `client`'s node reports `home` held by a
/// region other than `old_holder`, with a lease time left when
/// `live_lease`.
pub async fn wait_moved(
    client: &Client,
    home: &str,
    old_holder: &str,
    limit: Duration,
    live_lease: bool,
) -> geokv_client::proto::HomeInfo {
    let deadline = Deadline::after(limit);
    loop {
        if let Some(h) = home_lease(client, home).await {
            if h.holder != old_holder && (!live_lease || h.lease_remaining_ms > 0) {
                return h;
            }
        }
        assert!(!deadline.passed(), "home {home} still held by {old_holder} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A LOCAL put of `value` sent to `region`'s peer port as eu-west-1's node
/// forwarding it for `root`, so that node must accept or refuse it itself
/// (not through the proxy: a cut-off node still answers here).
pub async fn forwarded_put(
    cluster: &DevCluster,
    region: &str,
    key: &str,
    value: &[u8],
) -> Result<geokv_client::proto::WriteAck, tonic::Status> {
    use geokv_client::proto as pb;
    let channel = cluster.node_channel(cluster.node_peer_addr(region, 0), ("eu-west-1", "n1")).await;
    let mut kv = pb::kv_client::KvClient::new(channel);
    let mut req = tonic::Request::new(pb::PutRequest {
        row: Some(pb::RowRef { table: "default".into(), key: key.as_bytes().to_vec(), locality: None }),
        value: value.to_vec(),
        consistency: pb::WriteConsistency::WriteLocal as i32,
        context: Vec::new(),
        idempotency_key: String::new(),
        ttl_ms: 0,
    });
    req.set_timeout(Duration::from_secs(3));
    req.metadata_mut().insert("geokv-forwarded-by", "eu-west-1/n1".parse().expect("ascii"));
    req.metadata_mut().insert("geokv-principal", "root".parse().expect("ascii"));
    kv.put(req).await.map(|r| r.into_inner().ack.unwrap_or_default())
}
