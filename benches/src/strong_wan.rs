//! `geokv-load strong-wan`: STRONG writes over the emulated WAN, beside a
//! 3-member etcd whose peer links get the same round trips, in one run.
//!
//! - geokv: `geokv dev` (four regions, every inter-region link behind the
//!   fault proxy) in a temp dir on free ports; once the STRONG group
//!   `strong/us-east-1` (voters us-east-1, eu-west-1, eu-central-1) is led
//!   by `us-east-1/n1`, closed-loop puts to the `registers` table (default
//!   consistency strong) go to the us-east-1 node, as clients in us-east-1.
//! - etcd: three members named for the same regions. etcd advertises one
//!   peer URL per member, so each member's peer port sits behind a proxy
//!   link that delays both directions by d_X, with d_A + d_B = RTT(A, B):
//!   a message from A to B travels on A's stream to B (etcd's rafthttp
//!   streams carry the dialled member's messages back to the dialler, i.e.
//!   the `to_client` direction of the sender's proxy) and the answer on B's,
//!   so one round trip pays d_A + d_B. The us-east-1 member is made the
//!   leader (Maintenance.MoveLeader) and the clients connect to it directly.
//!
//! The round trips are `geokv dev`'s: the table in `client/cli/src/dev.rs`
//! times `--latency-scale`, with each one-way delay rounded to a millisecond
//! as `geokv dev` rounds it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use geokv_client::{Client, ClientConfig, Consistency, Row, WriteOptions};
use geokv_proxy::{LinkFaults, ProxySet};
use tempfile::TempDir;

use crate::etcd::{self, EtcdCluster, MemberSpec};
use crate::geokv::GeokvSettings;
use crate::load::{self, Measured, Shape};
use crate::peer_tls::Transport;
use crate::process::{self, Child};
use crate::report;
use crate::target::{Running, TargetKind};

/// The STRONG group's voters, home first: the regions etcd's members are named for.
pub const REGIONS: [&str; 3] = ["us-east-1", "eu-west-1", "eu-central-1"];
/// Every region of `geokv dev`, each with one node.
const DEV_REGIONS: [&str; 4] = ["us-east-1", "eu-west-1", "eu-central-1", "ap-southeast-1"];
/// The home of the `registers` table and the clients' region.
const HOME: &str = REGIONS[0];
/// The STRONG group of the `registers` table in `geokv dev`.
const GROUP: &str = "strong/us-east-1";
/// The node that must lead it.
const LEADER: &str = "us-east-1/n1";
/// Slack a STRONG write's p50 may take over the nearest-majority round
/// trip with one client, and with many.
const ONE_CLIENT_SLACK_MS: f64 = 3.0;
const MANY_CLIENTS_SLACK_MS: f64 = 10.0;
/// Longest `geokv dev` may take until its STRONG group has the home leader.
const GEOKV_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest etcd may take to hand leadership to the us-east-1 member.
const ETCD_LEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// `geokv dev` stops its four nodes one after the other, each within 10 s.
const DEV_STOP_GRACE: Duration = Duration::from_secs(60);
/// Attempts at finding free ports for `geokv dev`.
const PORT_TRIES: usize = 50;
/// Bases of `geokv dev` port ranges: from here, over this many ports, so a
/// range (base .. base + 99) ends below the ephemeral ports (32768).
const DEV_PORT_LOW: u16 = 10_000;
const DEV_PORT_SPAN: u64 = 22_000;

#[derive(Args, Debug, Clone)]
pub struct StrongWanArgs {
    /// Concurrent clients; a comma list runs each in turn against both targets.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub clients: Vec<usize>,
    /// Measured window per run, in seconds.
    #[arg(long, default_value_t = 15)]
    pub duration_s: u64,
    /// Unrecorded load before each measured window, in seconds.
    #[arg(long, default_value_t = 3)]
    pub warmup_s: u64,
    /// Share of operations that are puts; the rest are linearizable reads
    /// (geokv STRONG gets, etcd's default linearizable range reads).
    #[arg(long, default_value_t = 1.0)]
    pub put_ratio: f64,
    /// Multiplies every emulated round trip, as `geokv dev --latency-scale`.
    #[arg(long, default_value_t = 1.0)]
    pub latency_scale: f64,
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
    /// Size of the key space; keys are drawn uniformly.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Deadline of one operation, in milliseconds; a slower one is an error.
    #[arg(long, default_value_t = 10_000)]
    pub op_timeout_ms: u64,
    /// Seed of the key choices (client i uses seed + i).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The `geokv` binary (default: next to this executable).
    #[arg(long)]
    pub geokv_bin: Option<PathBuf>,
    /// TOML appended to every geokv node's configuration (passed to
    /// `geokv dev --extra-config`), to measure a setting against the
    /// defaults.
    #[arg(long)]
    pub geokv_extra_config: Option<PathBuf>,
    #[arg(long, default_value = "/usr/bin/etcd")]
    pub etcd_bin: PathBuf,
    /// etcd's client and peer ports: plaintext, or mutual TLS as geokv's
    /// (the peer links still pass through the latency proxies).
    #[arg(long, value_enum, default_value_t = Transport::Plaintext)]
    pub peer_transport: Transport,
    /// Connections shared by the clients of each target (HTTP/2
    /// multiplexes), as a service sharing one client's channels; default:
    /// one per client.
    #[arg(long)]
    pub connections: Option<usize>,
}

impl StrongWanArgs {
    pub fn validate(&self) -> Result<()> {
        if self.clients.is_empty() || self.clients.iter().any(|&c| c == 0 || c > 1024) {
            bail!("--clients must list counts between 1 and 1024");
        }
        if self.duration_s == 0 || self.duration_s > 3600 || self.warmup_s > 3600 {
            bail!("--duration-s must be 1..=3600 and --warmup-s at most 3600");
        }
        if !(0.0..=10.0).contains(&self.latency_scale) {
            bail!("--latency-scale must be between 0 and 10");
        }
        if self.value_bytes == 0 || self.value_bytes > 1 << 20 {
            bail!("--value-bytes must be 1..=1048576");
        }
        if self.keys == 0 || self.keys > 10_000_000 {
            bail!("--keys must be 1..=10000000");
        }
        if self.op_timeout_ms == 0 || self.op_timeout_ms > 60_000 {
            bail!("--op-timeout-ms must be 1..=60000");
        }
        if let Some(path) = &self.geokv_extra_config {
            if !path.is_file() {
                bail!("--geokv-extra-config {}: no such file", path.display());
            }
        }
        if !(0.0..=1.0).contains(&self.put_ratio) {
            bail!("--put-ratio must be 0..=1");
        }
        if self.connections.is_some_and(|c| c == 0 || c > 1024) {
            bail!("--connections must be 1..=1024");
        }
        Ok(())
    }

    fn shape(&self) -> Shape {
        Shape {
            put_ratio: self.put_ratio,
            value_bytes: self.value_bytes,
            keys: self.keys,
            warmup: Duration::from_secs(self.warmup_s),
            duration: Duration::from_secs(self.duration_s),
            op_timeout: Duration::from_millis(self.op_timeout_ms),
            seed: self.seed,
            connections: self.connections,
        }
    }
}

/// Measured round trip between two regions in milliseconds: the table of
/// `geokv dev` (`client/cli/src/dev.rs`, `round_trip_ms`).
pub fn table_rtt_ms(a: &str, b: &str) -> f64 {
    let table: &[(&str, &str, f64)] = &[
        ("us-east-1", "eu-west-1", 80.0),
        ("us-east-1", "eu-central-1", 90.0),
        ("us-east-1", "ap-southeast-1", 217.0),
        ("eu-west-1", "eu-central-1", 25.0),
        ("eu-west-1", "ap-southeast-1", 238.0),
        ("eu-central-1", "ap-southeast-1", 160.0),
    ];
    table
        .iter()
        .find(|(x, y, _)| (*x == a && *y == b) || (*x == b && *y == a))
        .map(|(_, _, ms)| *ms)
        .unwrap_or(100.0)
}

/// The round trip `geokv dev` emulates: both directions of a link delay by
/// `round(rtt / 2 * scale)` whole milliseconds.
pub fn emulated_rtt_ms(a: &str, b: &str, scale: f64) -> u64 {
    2 * (table_rtt_ms(a, b) / 2.0 * scale).round() as u64
}

/// Per-member delay `d_X` with `d_A + d_B = RTT(A, B)` for the three regions,
/// from round trips `rtt`: `d_A = (RTT(A,B) + RTT(A,C) - RTT(B,C)) / 2`.
pub fn member_delays(rtt: impl Fn(&str, &str) -> f64) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (i, a) in REGIONS.iter().enumerate() {
        let b = REGIONS[(i + 1) % 3];
        let c = REGIONS[(i + 2) % 3];
        out[i] = ((rtt(a, b) + rtt(a, c) - rtt(b, c)) / 2.0).max(0.0);
    }
    out
}

/// Round trip to the nearest majority of the STRONG group from its home:
/// the home plus its nearest other voter.
pub fn nearest_majority_rtt_ms(scale: f64) -> u64 {
    REGIONS[1..].iter().map(|r| emulated_rtt_ms(HOME, r, scale)).min().unwrap_or(0)
}

/// `geokv dev` running in a temp dir; stopped (and its nodes with it) when dropped.
pub(crate) struct GeokvDev {
    /// Declared before `dir` so the cluster stops before its data goes.
    child: Child,
    pub endpoint: String,
    /// The cluster's certificates (`geokv dev` runs with TLS).
    pub certs_dir: std::path::PathBuf,
    dir: TempDir,
}

/// A base port whose twelve node ports (4 regions x gRPC, admin, peer) and
/// the proxy control port were free a moment ago. Every one lies below
/// Linux's ephemeral range (32768 up), so no socket bound to port 0 (the
/// cluster's latency proxies bind theirs that way) can take one of them
/// before its node binds it: a base inside that range once gave a region's
/// client port to a proxy in front of a peer port.
fn dev_ports(seed: u64) -> Result<(u16, u16)> {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    for i in 0..PORT_TRIES as u64 {
        let base = DEV_PORT_LOW + ((seed.wrapping_mul(7919).wrapping_add(i * 1_009)) % DEV_PORT_SPAN) as u16;
        let ports: Vec<u16> =
            (0..4u16).flat_map(|r| [base + 10 * r, base + 10 * r + 1, base + 10 * r + 50]).collect();
        let control = base + 99;
        if ports.iter().all(|&p| free(p)) && free(control) {
            return Ok((base, control));
        }
    }
    bail!("no free port range for geokv dev after {PORT_TRIES} tries")
}

impl GeokvDev {
    /// The pid of `region`'s node (its command line names its config in
    /// this cluster's folder), for CPU accounting.
    pub(crate) fn node_pid(&self, region: &str) -> Option<u32> {
        let config = self.dir.path().join("dev").join(region).join("node.toml");
        let wanted = config.to_string_lossy().into_owned();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2).any(|w| w[0] == b"--config" && w[1] == wanted.as_bytes()).then_some(pid)
        })
    }

    /// Starts `geokv dev` with `extra` arguments and waits until `ready`
    /// (given the us-east-1 endpoint and the certificates) succeeds.
    pub(crate) async fn spawn<F, Fut>(
        bin: &std::path::Path,
        scale: f64,
        extra: &[&str],
        what: &str,
        ready: F,
    ) -> Result<Self>
    where
        F: Fn(String, std::path::PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let bin = process::require_binary(
            bin,
            "build it with `cargo build -p geokv --bin geokv` or pass --geokv-bin",
        )?;
        let dir =
            tempfile::Builder::new().prefix("geokv-load-dev-").tempdir().context("creating a temp dir")?;
        let (base, control) = dev_ports(u64::from(std::process::id()))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("dev")
            .arg("--fresh")
            .arg("--data-dir")
            .arg(dir.path().join("dev"))
            .arg("--base-port")
            .arg(base.to_string())
            .arg("--proxy-control-port")
            .arg(control.to_string())
            .arg("--latency-scale")
            .arg(scale.to_string())
            .args(extra);
        let mut child =
            Child::spawn("geokv dev", cmd, &dir.path().join("dev.log"))?.with_stop_grace(DEV_STOP_GRACE);
        let endpoint = format!("127.0.0.1:{base}");
        // `geokv dev` makes the cluster's certificates under its data dir.
        let certs_dir = dir.path().join("dev").join("certs");
        let started = Instant::now();
        process::wait_ready(
            what,
            GEOKV_READY_TIMEOUT,
            || child.check_alive(),
            || ready(endpoint.clone(), certs_dir.clone()),
        )
        .await?;
        eprintln!(
            "geokv: dev pid {} (base port {base}), {what} after {:.1} s",
            child.pid().unwrap_or(0),
            started.elapsed().as_secs_f64()
        );
        Ok(Self { child, endpoint, certs_dir, dir })
    }

    /// What `geokv dev` printed so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dev.log")).unwrap_or_default()
    }

    async fn start(
        bin: &std::path::Path,
        scale: f64,
        extra_config: Option<&std::path::Path>,
    ) -> Result<Self> {
        let extra_config = extra_config.map(|p| p.display().to_string());
        let extra: Vec<&str> = match &extra_config {
            Some(path) => vec!["--extra-config", path],
            None => Vec::new(),
        };
        Self::spawn(bin, scale, &extra, "STRONG group led from us-east-1", |endpoint, certs| async move {
            let client = client(&endpoint, &certs, Duration::from_secs(2)).await?;
            let status = client.region_status().await?;
            let group =
                status.groups.iter().find(|g| g.name == GROUP).context("no group strong/us-east-1")?;
            if group.leader != LEADER {
                bail!("{GROUP} is led by {:?}, waiting for {LEADER}", group.leader);
            }
            // One STRONG write end to end: the path is open.
            client
                .put(&Row::new("registers", "strong-wan/probe"), b"ok".to_vec(), strong())
                .await
                .context("probe STRONG put")?;
            Ok(())
        })
        .await
    }

    async fn leader(&self) -> Result<String> {
        let status =
            client(&self.endpoint, &self.certs_dir, Duration::from_secs(5)).await?.region_status().await?;
        let group = status.groups.iter().find(|g| g.name == GROUP).context("no group strong/us-east-1")?;
        Ok(if group.leader.is_empty() {
            "-".to_string()
        } else {
            format!("{} (term {})", group.leader, group.term)
        })
    }
}

impl GeokvDev {
    /// The us-east-1 node's `geokv_raft_propose_seconds` for [`GROUP`]:
    /// each STRONG write's consensus round as its leader saw it, without
    /// the client's hop. `geokv dev` puts a region's admin port right after
    /// its client port.
    async fn leader_commits(&self) -> Result<ProposeHistogram> {
        let port: u16 = self
            .endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("the endpoint has no port")?;
        let body = http_get(&format!("127.0.0.1:{}", port + 1), "/metrics").await?;
        Ok(ProposeHistogram::parse(&body, GROUP))
    }
}

/// One plain HTTP/1.1 GET (the admin port of `geokv dev`'s nodes speaks
/// HTTP), bounded in time and size.
async fn http_get(addr: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LIMIT: u64 = 16 << 20;
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.take(LIMIT).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("GET {path} from {addr} timed out"))?
        .with_context(|| format!("GET {path} from {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no end of the HTTP header")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path} from {addr}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

/// A Prometheus histogram of one group's STRONG commits, as scraped.
#[derive(Debug, Default, Clone, PartialEq)]
struct ProposeHistogram {
    /// (upper bound in seconds, cumulative count), in rising order.
    buckets: Vec<(f64, u64)>,
    sum_s: f64,
    count: u64,
}

impl ProposeHistogram {
    const NAME: &'static str = "geokv_raft_propose_seconds";

    /// Reads the series of `group` out of a `/metrics` text (empty when
    /// the node has committed nothing there yet).
    fn parse(metrics: &str, group: &str) -> Self {
        let label = format!("group=\"{group}\"");
        let mut h = Self::default();
        for line in metrics.lines().filter(|l| !l.starts_with('#') && l.contains(&label)) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let name = series.split('{').next().unwrap_or_default();
            let Some(suffix) = name.strip_prefix(Self::NAME) else { continue };
            match suffix {
                "_bucket" => {
                    let le = series.split("le=\"").nth(1).and_then(|r| r.split('"').next());
                    let bound = match le {
                        Some("+Inf") => f64::INFINITY,
                        Some(v) => v.parse().unwrap_or(f64::NAN),
                        None => continue,
                    };
                    if let Ok(n) = value.parse::<f64>() {
                        h.buckets.push((bound, n as u64));
                    }
                }
                "_sum" => h.sum_s = value.parse().unwrap_or(0.0),
                "_count" => h.count = value.parse::<f64>().map(|n| n as u64).unwrap_or(0),
                _ => {}
            }
        }
        h.buckets.retain(|(b, _)| !b.is_nan());
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        h
    }

    /// What was recorded between `before` and `self`.
    fn since(&self, before: &Self) -> Self {
        let earlier = |bound: f64| before.buckets.iter().find(|(b, _)| *b == bound).map_or(0, |(_, n)| *n);
        Self {
            buckets: self.buckets.iter().map(|&(b, n)| (b, n.saturating_sub(earlier(b)))).collect(),
            sum_s: (self.sum_s - before.sum_s).max(0.0),
            count: self.count.saturating_sub(before.count),
        }
    }

    /// The upper bound (seconds) of the bucket holding quantile `q`.
    fn quantile_bound(&self, q: f64) -> Option<f64> {
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets.iter().find(|(_, n)| *n >= rank).map(|(b, _)| *b)
    }

    /// One line for the report.
    fn describe(&self, clients: usize) -> String {
        if self.count == 0 {
            return format!("leader's own commit time at {clients} clients: no commit recorded");
        }
        let last_finite = self.buckets.iter().rev().map(|(b, _)| *b).find(|b| b.is_finite()).unwrap_or(0.0);
        let at = |q: f64| match self.quantile_bound(q) {
            Some(b) if b.is_finite() => format!("<= {} ms", (b * 1e4).round() / 10.0),
            _ => format!("> {} ms", (last_finite * 1e4).round() / 10.0),
        };
        format!(
            "leader's own commit time at {clients} clients ({}, warmup included, {} writes): mean {:.3} ms, p50 {}, p90 {}, p99 {}",
            Self::NAME,
            self.count,
            self.sum_s * 1000.0 / self.count as f64,
            at(0.5),
            at(0.9),
            at(0.99),
        )
    }
}

pub(crate) async fn client(endpoint: &str, certs_dir: &std::path::Path, timeout: Duration) -> Result<Client> {
    let mut cfg = ClientConfig::new(endpoint).with_certs_dir(certs_dir);
    cfg.timeout = timeout;
    cfg.retries_max = 0;
    Ok(Client::with_config(cfg).await?)
}

fn strong() -> WriteOptions {
    WriteOptions::default().consistency(Consistency::Strong)
}

/// etcd behind per-member proxies. Dropping it stops the members; the
/// proxies are stopped by [`EtcdWan::stop`] (or with the process).
struct EtcdWan {
    cluster: EtcdCluster,
    proxies: ProxySet,
}

impl EtcdWan {
    async fn start(
        bin: &std::path::Path,
        delays_ms: &[u64; 3],
        scale: f64,
        transport: Transport,
    ) -> Result<Self> {
        let ports = process::free_ports(6)?;
        let proxies = ProxySet::new();
        let mut specs = Vec::new();
        for (i, region) in REGIONS.iter().enumerate() {
            let peer_port = ports[3 + i];
            let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], peer_port));
            let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            let link = proxies
                .add(
                    &format!("etcd-peer-{region}"),
                    listen,
                    upstream,
                    LinkFaults::symmetric_latency(delays_ms[i]),
                )
                .await
                .with_context(|| format!("starting the proxy in front of etcd member {region}"))?;
            specs.push(MemberSpec {
                name: region.to_string(),
                client_port: ports[i],
                peer_port,
                advertise_peer_addr: link.local_addr().to_string(),
            });
        }
        // Raft timing as `geokv dev` derives it for the same voters (etcd
        // wants the election timeout at least 5 heartbeats; 10 is its advice).
        let rtt_max = REGIONS
            .iter()
            .flat_map(|a| REGIONS.iter().map(move |b| (a, b)))
            .filter(|(a, b)| a != b)
            .map(|(a, b)| table_rtt_ms(a, b) * scale)
            .fold(0.0, f64::max);
        let heartbeat = ((rtt_max * 1.25) as u64 + 60).max(150);
        let timing = vec![
            format!("--heartbeat-interval={heartbeat}"),
            format!("--election-timeout={}", heartbeat * 10),
        ];
        eprintln!("etcd: heartbeat {heartbeat} ms, election timeout {} ms", heartbeat * 10);
        let start = etcd::start_members(bin, &specs, &timing, transport).await;
        let mut cluster = match start {
            Ok(c) => c,
            Err(e) => {
                proxies.shutdown().await;
                return Err(e);
            }
        };
        let started = Instant::now();
        if let Err(e) = cluster.move_leader(HOME, ETCD_LEADER_TIMEOUT).await {
            drop(cluster);
            proxies.shutdown().await;
            return Err(e);
        }
        eprintln!(
            "etcd: leader is the {HOME} member ({}) after {:.1} s",
            cluster.leader_url,
            started.elapsed().as_secs_f64()
        );
        Ok(Self { cluster, proxies })
    }
}

/// Runs every client count against geokv, then etcd, and prints the report.
pub async fn run(args: &StrongWanArgs, default_geokv_bin: PathBuf) -> Result<()> {
    let shape = args.shape();
    let scale = args.latency_scale;
    let geokv_bin = args.geokv_bin.clone().unwrap_or(default_geokv_bin);

    // The round trips, as geokv dev emulates them, and etcd's delays.
    let table_delays = member_delays(|a, b| table_rtt_ms(a, b) * scale);
    let exact = member_delays(|a, b| emulated_rtt_ms(a, b, scale) as f64);
    let delays: [u64; 3] = [exact[0].round() as u64, exact[1].round() as u64, exact[2].round() as u64];
    let mut setup = String::new();
    setup.push_str(&format!(
        "latency scale {scale}; round trips in ms (RTT table x scale | geokv dev emulates | etcd gets):\n"
    ));
    for (i, a) in REGIONS.iter().enumerate() {
        for b in &REGIONS[i + 1..] {
            let j = REGIONS.iter().position(|r| r == b).unwrap_or(0);
            setup.push_str(&format!(
                "  {a:<13} <-> {b:<13} {:>7.1} | {:>5} | {:>5}\n",
                table_rtt_ms(a, b) * scale,
                emulated_rtt_ms(a, b, scale),
                delays[i] + delays[j]
            ));
        }
    }
    setup.push_str("etcd peer-proxy delay per member, each direction (d_A + d_B = RTT(A,B)):\n");
    for (i, r) in REGIONS.iter().enumerate() {
        setup.push_str(&format!(
            "  {r:<13} d = {:>5} ms   (from the RTT table unrounded: {:.1} ms)\n",
            delays[i], table_delays[i]
        ));
    }
    eprint!("{setup}");

    let mut results: Vec<Measured> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    // geokv first, alone on the machine.
    eprintln!("geokv: starting geokv dev (latency scale {scale})");
    let dev = GeokvDev::start(&geokv_bin, scale, args.geokv_extra_config.as_deref())
        .await
        .context("starting geokv dev")?;
    let mut dev = dev;
    let running = Running::Geokv {
        node: None,
        plaintext: false,
        settings: GeokvSettings {
            endpoint: dev.endpoint.clone(),
            certs_dir: Some(dev.certs_dir.clone()),
            table: "registers".to_string(),
            consistency: Consistency::Strong,
            op_timeout: shape.op_timeout,
            // STRONG rows are registers in the group's state machine: a put
            // overwrites, no causal context involved.
            contexts: None,
        },
    };
    for &clients in &args.clients {
        eprintln!("geokv: {clients} clients, {} s warmup + {} s measured", args.warmup_s, args.duration_s);
        let leader_pid: Vec<u32> = dev.node_pid(HOME).into_iter().collect();
        let node_pids: Vec<u32> = DEV_REGIONS.iter().filter_map(|r| dev.node_pid(r)).collect();
        let cpu = || (process::cpu_seconds_of(&leader_pid), process::cpu_seconds_of(&node_pids));
        let before = (dev.leader_commits().await, cpu());
        let m = load::run(&running, &shape, clients)
            .await
            .with_context(|| format!("geokv at {clients} clients"))?;
        dev.child.check_alive().context("geokv dev after a run")?;
        let after = (dev.leader_commits().await, cpu());
        notes.push(match (before, after) {
            ((Ok(b), cpu_b), (Ok(a), cpu_a)) => {
                let run = a.since(&b);
                let per_write = |b: Option<f64>, a: Option<f64>, n: usize| match (b, a) {
                    (Some(b), Some(a)) if run.count > 0 && n > 0 => {
                        format!("{:.0} µs", (a - b) * 1e6 / run.count as f64)
                    }
                    _ => "unknown".to_string(),
                };
                format!(
                    "{}; server CPU per write: leader {}, all {} nodes {}",
                    run.describe(clients),
                    per_write(cpu_b.0, cpu_a.0, leader_pid.len()),
                    node_pids.len(),
                    per_write(cpu_b.1, cpu_a.1, node_pids.len()),
                )
            }
            ((Err(e), _), _) | (_, (Err(e), _)) => {
                format!("leader's own commit time at {clients} clients: unknown ({e:#})")
            }
        });
        eprintln!(
            "geokv: {clients} clients: {:.1} ops/s, p50 {:.3} ms, p99 {:.3} ms, {} errors",
            m.ops_per_s(),
            m.latency_ms(0.5),
            m.latency_ms(0.99),
            m.errors
        );
        results.push(m);
    }
    notes.push(format!(
        "geokv {GROUP} leader after the runs: {}",
        dev.leader().await.unwrap_or_else(|e| format!("unknown ({e:#})"))
    ));
    eprintln!("geokv: stopping geokv dev");
    drop(running);
    drop(dev);

    // Then etcd, alone on the machine.
    eprintln!("etcd: starting 3 members behind peer proxies");
    let wan =
        EtcdWan::start(&args.etcd_bin, &delays, scale, args.peer_transport).await.context("starting etcd")?;
    let EtcdWan { cluster, proxies } = wan;
    let mut running = Running::Etcd { cluster, serializable: false, op_timeout: shape.op_timeout };
    let outcome: Result<()> = async {
        for &clients in &args.clients {
            eprintln!("etcd: {clients} clients, {} s warmup + {} s measured", args.warmup_s, args.duration_s);
            let m = load::run(&running, &shape, clients)
                .await
                .with_context(|| format!("etcd at {clients} clients"))?;
            running.check_alive().context("etcd after a run")?;
            eprintln!(
                "etcd: {clients} clients: {:.1} ops/s, p50 {:.3} ms, p99 {:.3} ms, {} errors",
                m.ops_per_s(),
                m.latency_ms(0.5),
                m.latency_ms(0.99),
                m.errors
            );
            results.push(m);
        }
        if let Running::Etcd { cluster, .. } = &running {
            let leader = cluster.leader_name().await.unwrap_or_else(|e| format!("unknown ({e:#})"));
            notes.push(format!("etcd leader after the runs: {leader}"));
            notes.push(format!(
                "etcd transport: {} client and peer ports (geokv: mutual TLS on every connection)",
                cluster.transport.describe()
            ));
        }
        Ok(())
    }
    .await;
    eprintln!("etcd: stopping");
    drop(running);
    proxies.shutdown().await;
    outcome?;

    print!("{}", render(args, &setup, &results, &notes));
    Ok(())
}

/// The report: setup, table, ratios and the p50 check.
fn render(args: &StrongWanArgs, setup: &str, results: &[Measured], notes: &[String]) -> String {
    let scale = args.latency_scale;
    let mut s = String::new();
    s.push_str(&format!(
        "strong-wan: closed loop, {}, {} B values, {} keys, {} s window after {} s warmup, {}\n",
        if args.put_ratio >= 1.0 {
            "puts only".to_string()
        } else if args.put_ratio <= 0.0 {
            "linearizable reads only".to_string()
        } else {
            format!("{:.0}% puts, the rest linearizable reads", args.put_ratio * 100.0)
        },
        args.value_bytes,
        args.keys,
        args.duration_s,
        args.warmup_s,
        match args.connections {
            Some(n) => format!("{n} connections shared by the clients of each target"),
            None => "one connection per client".to_string(),
        }
    ));
    s.push_str(&format!(
        "  geokv: `geokv dev` (4 regions), table registers (STRONG), group {GROUP} (voters {}), clients at {HOME}/n1\n",
        REGIONS.join(", ")
    ));
    s.push_str(&format!(
        "  etcd:  3 members ({}), peer links behind geokv-proxy, leader {HOME}, clients at the {HOME} member\n",
        REGIONS.join(", ")
    ));
    s.push_str(setup);
    for n in notes {
        s.push_str(&format!("  {n}\n"));
    }
    s.push('\n');
    s.push_str(&format!(
        "{:<13} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
        "target", "clients", "ops/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"
    ));
    for m in results {
        let name = match m.target {
            TargetKind::Geokv | TargetKind::GeokvPlaintext => "geokv STRONG",
            other => other.name(),
        };
        s.push_str(&format!(
            "{:<13} {:>7} {:>9.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7}\n",
            name,
            m.clients,
            m.ops_per_s(),
            m.latency_ms(0.5),
            m.latency_ms(0.9),
            m.latency_ms(0.99),
            m.latency_us.max() as f64 / 1000.0,
            m.errors
        ));
    }
    for m in results.iter().filter(|m| m.errors > 0 || m.ops == 0) {
        let why = m.first_error.as_deref().unwrap_or("no operation completed in the window");
        s.push_str(&format!("  {} at {} clients: {why}\n", m.target, m.clients));
    }
    let ratios = report::ratios(results);
    if !ratios.is_empty() {
        s.push_str(&format!("\n{:<20} {:>7} {:>9} {:>9} {:>9}\n", "ratio", "clients", "ops/s", "p50", "p99"));
        for r in &ratios {
            let f = |x: f64| if x.is_finite() { format!("{x:.2}x") } else { "n/a".to_string() };
            s.push_str(&format!(
                "{:<20} {:>7} {:>9} {:>9} {:>9}\n",
                "geokv STRONG/etcd",
                r.clients,
                f(r.ops_per_s),
                f(r.p50),
                f(r.p99)
            ));
        }
        s.push_str("(ops/s above 1x: geokv does more; p50/p99 below 1x: geokv is faster)\n");
    }
    if args.put_ratio < 1.0 {
        // The round-trip bound is for writes; reads at the leader take none.
        return s;
    }
    s.push('\n');
    s.push_str(&format!(
        "checks against the STRONG write bounds (nearest-majority RTT {} ms = {}<->{} x {scale}):\n",
        nearest_majority_rtt_ms(scale),
        HOME,
        REGIONS[1],
    ));
    for (what, pass) in write_checks(results, nearest_majority_rtt_ms(scale) as f64) {
        s.push_str(&format!("  {}  {what}\n", if pass { "PASS" } else { "FAIL" }));
    }
    s
}

/// The STRONG write bounds, for every client count geokv was measured at:
/// at 1 client a p50 within [`ONE_CLIENT_SLACK_MS`] of the round trip;
/// at more, at least etcd's ops/s at the same count, a p50 within
/// [`MANY_CLIENTS_SLACK_MS`] and a p99 within twice the round trip.
/// Each is (what was checked, with the figure, and whether it holds); a
/// count with no completed write fails.
fn write_checks(results: &[Measured], rtt_ms: f64) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for m in results.iter().filter(|m| m.target == TargetKind::Geokv) {
        let c = m.clients;
        if m.ops == 0 {
            out.push((format!("{c} client(s): no STRONG write completed"), false));
            continue;
        }
        let p50 = m.latency_ms(0.5);
        if c == 1 {
            let bound = rtt_ms + ONE_CLIENT_SLACK_MS;
            out.push((format!("1 client: p50 {p50:.3} ms <= {bound:.1} ms"), p50 <= bound));
            continue;
        }
        match results.iter().find(|e| e.target == TargetKind::Etcd && e.clients == c && e.ops > 0) {
            Some(e) => {
                let ratio = m.ops_per_s() / e.ops_per_s();
                out.push((format!("{c} clients: ops/s {ratio:.4}x etcd's >= 1.0x"), ratio >= 1.0));
            }
            None => out.push((format!("{c} clients: no etcd run to compare ops/s with"), false)),
        }
        let bound = rtt_ms + MANY_CLIENTS_SLACK_MS;
        out.push((format!("{c} clients: p50 {p50:.3} ms <= {bound:.1} ms"), p50 <= bound));
        let p99 = m.latency_ms(0.99);
        let bound = 2.0 * rtt_ms;
        out.push((format!("{c} clients: p99 {p99:.3} ms <= {bound:.1} ms"), p99 <= bound));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(target: TargetKind, clients: usize, ops: u64, latencies_ms: &[f64]) -> Measured {
        let mut latency_us = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).unwrap();
        for l in latencies_ms {
            latency_us.record((l * 1000.0) as u64).unwrap();
        }
        Measured {
            target,
            clients,
            ops,
            errors: 0,
            window: Duration::from_secs(10),
            latency_us,
            first_error: None,
            server_cpu_s: None,
        }
    }

    #[test]
    fn every_write_bound_is_checked_and_each_can_fail() {
        let fast = [82.0; 100];
        let results = vec![
            measured(TargetKind::Geokv, 1, 120, &fast),
            measured(TargetKind::Geokv, 64, 7_700, &fast),
            measured(TargetKind::Etcd, 64, 7_710, &fast),
        ];
        let checks = write_checks(&results, 80.0);
        let failed: Vec<&str> = checks.iter().filter(|(_, ok)| !ok).map(|(w, _)| w.as_str()).collect();
        assert_eq!(failed, ["64 clients: ops/s 0.9987x etcd's >= 1.0x"], "{checks:?}");
        assert_eq!(checks.len(), 4, "1 client: p50; 64 clients: ratio, p50, p99");

        let mut slow = vec![84.0; 98];
        slow.extend([170.0, 170.0]);
        let results = vec![
            measured(TargetKind::Geokv, 1, 120, &[83.5; 10]),
            measured(TargetKind::Geokv, 256, 3_000, &slow),
            measured(TargetKind::Geokv, 512, 0, &[]),
        ];
        let failed: Vec<String> =
            write_checks(&results, 80.0).into_iter().filter(|(_, ok)| !ok).map(|(w, _)| w).collect();
        assert_eq!(failed.len(), 4, "{failed:?}");
        assert!(failed[0].starts_with("1 client: p50 83.5"));
        assert!(failed[1].contains("no etcd run"));
        assert!(failed[2].starts_with("256 clients: p99 170"));
        assert!(failed[3].contains("no STRONG write completed"));
    }

    #[test]
    fn the_leaders_commit_histogram_is_read_per_group_and_differenced() {
        let text = |n: [u64; 3], sum: f64| {
            format!(
                "# TYPE geokv_raft_propose_seconds histogram\n\
                 geokv_raft_propose_seconds_bucket{{group=\"strong/us-east-1\",le=\"0.08\"}} {}\n\
                 geokv_raft_propose_seconds_bucket{{group=\"strong/us-east-1\",le=\"0.1\"}} {}\n\
                 geokv_raft_propose_seconds_bucket{{group=\"strong/us-east-1\",le=\"+Inf\"}} {}\n\
                 geokv_raft_propose_seconds_sum{{group=\"strong/us-east-1\"}} {sum}\n\
                 geokv_raft_propose_seconds_count{{group=\"strong/us-east-1\"}} {}\n\
                 geokv_raft_propose_seconds_count{{group=\"control\"}} 999\n",
                n[0], n[1], n[2], n[2]
            )
        };
        let before = ProposeHistogram::parse(&text([1, 1, 1], 0.07), GROUP);
        assert_eq!(before.count, 1);
        let after = ProposeHistogram::parse(&text([11, 99, 101], 8.57), GROUP);
        let run = after.since(&before);
        assert_eq!(run.count, 100);
        assert_eq!(run.buckets, vec![(0.08, 10), (0.1, 98), (f64::INFINITY, 100)]);
        assert_eq!(run.quantile_bound(0.5), Some(0.1));
        assert_eq!(run.quantile_bound(0.05), Some(0.08));
        assert_eq!(run.quantile_bound(0.99), Some(f64::INFINITY));
        let line = run.describe(64);
        assert!(line.contains("mean 85.000 ms") && line.contains("p50 <= 100 ms"), "{line}");
        assert!(line.contains("p99 > 100 ms"), "{line}");
    }

    #[test]
    fn delays_from_the_table_are_the_documented_halves() {
        let d = member_delays(table_rtt_ms);
        assert_eq!(d, [72.5, 7.5, 17.5]);
    }

    #[test]
    fn delays_reproduce_geokv_dev_round_trips_at_scale_one() {
        // geokv dev rounds each one-way delay: eu-west-1 <-> eu-central-1 is 2 x 13 ms.
        assert_eq!(emulated_rtt_ms("eu-west-1", "eu-central-1", 1.0), 26);
        let d = member_delays(|a, b| emulated_rtt_ms(a, b, 1.0) as f64);
        assert_eq!(d, [72.0, 8.0, 18.0]);
        for (i, a) in REGIONS.iter().enumerate() {
            for (j, b) in REGIONS.iter().enumerate() {
                if i != j {
                    assert_eq!((d[i] + d[j]) as u64, emulated_rtt_ms(a, b, 1.0), "{a} <-> {b}");
                }
            }
        }
        assert_eq!(nearest_majority_rtt_ms(1.0), 80);
        assert_eq!(nearest_majority_rtt_ms(0.0), 0);
    }
}
