//! `geokv dev`: a whole multi-region cluster on this machine, with every
//! inter-region link behind the fault proxy so WAN latency is real.
//!
//! Each node is a separate `geokv node` process with its own data
//! directory and config. With one node per region, node A reaches node B
//! through a proxy link named `A->B`; with several, node `n1` of A reaches
//! node `n2` of B through `A.n1->B.n2`. Each link's one-way latency comes
//! from measured round trips between the cloud regions (scaled by
//! `--latency-scale`). Nodes of one region reach each other directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use geokv_proxy::{LinkFaults, ProxySet};
use tokio::process::{Child, Command};

pub const DEFAULT_REGIONS: &str = "us-east-1,eu-west-1,eu-central-1,ap-southeast-1";

#[derive(Args, Clone)]
pub struct DevArgs {
    /// Regions to run, comma separated.
    #[arg(long, default_value = DEFAULT_REGIONS, value_delimiter = ',')]
    pub regions: Vec<String>,
    /// Nodes per region (1 to 5): keys are hash-partitioned across them.
    #[arg(long, default_value_t = 1)]
    pub nodes_per_region: u32,
    /// Hash partitions of every table, cluster-wide.
    #[arg(long, default_value_t = 64)]
    pub partitions: u32,
    /// TOML appended to every node's configuration (sections only, e.g.
    /// `[storage]` or `[replication]`), for tests and experiments.
    #[arg(long)]
    pub extra_config: Option<PathBuf>,
    /// Multiplies every emulated inter-region latency (0 = no added latency).
    #[arg(long, default_value_t = 1.0)]
    pub latency_scale: f64,
    /// First port: node j (from 0) of region i gets gRPC base+10*i+2*j,
    /// admin HTTP base+10*i+2*j+1 and its peer port base+50+10*i+2*j.
    #[arg(long, default_value_t = 7700)]
    pub base_port: u16,
    /// Where the nodes keep their data and logs.
    #[arg(long, default_value = "./geokv-dev")]
    pub data_dir: PathBuf,
    /// Start from empty stores (deletes --data-dir first).
    #[arg(long)]
    pub fresh: bool,
    /// Port of the fault proxy's control API (default base+99).
    #[arg(long)]
    pub proxy_control_port: Option<u16>,
    /// Plaintext with no authentication. By default the cluster runs with
    /// mutual TLS and authorization, with a CA and certificates made under
    /// `<data-dir>/certs` (a `root` client certificate among them).
    #[arg(long)]
    pub insecure: bool,
    /// Emulate a client running in this region: every region's client port
    /// is also fronted by a fault-proxy link with the latency from this
    /// region to that one, and those endpoints are printed (as
    /// `--endpoints region=addr,...` for a region-aware client).
    #[arg(long)]
    pub client_region: Option<String>,
}

/// Cluster name in the certificates `geokv dev` makes.
pub const DEV_CLUSTER: &str = "geokv-dev";
/// A node's peer port is its client port plus this: regions use base ..
/// base+49 for client and admin ports, base+50 .. base+98 for peer ports,
/// and base+99 is the fault proxy's control API.
pub const PEER_PORT_OFFSET: u16 = 50;
/// Most regions the port layout has room for.
pub const REGIONS_MAX: usize = 5;

/// Round-trip times between regions in milliseconds, as measured between the
/// cloud regions of the same names; unknown pairs get 100 ms.
pub fn round_trip_ms(a: &str, b: &str) -> f64 {
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

/// Country codes mapped to dev regions (only those that are running).
fn localities(regions: &[String]) -> BTreeMap<&'static str, String> {
    let wanted = [
        ("US", "us-east-1"),
        ("CA", "us-east-1"),
        ("FR", "eu-west-1"),
        ("IE", "eu-west-1"),
        ("GB", "eu-west-1"),
        ("DE", "eu-central-1"),
        ("AT", "eu-central-1"),
        ("SG", "ap-southeast-1"),
        ("AU", "ap-southeast-1"),
        ("JP", "ap-southeast-1"),
    ];
    wanted
        .into_iter()
        .filter(|(_, r)| regions.iter().any(|x| x == r))
        .map(|(c, r)| (c, r.to_string()))
        .collect()
}

/// Most nodes per region (ten ports per region, two per node).
pub const NODES_PER_REGION_MAX: u32 = 5;

/// One node as `geokv dev` runs it.
pub struct DevNode {
    pub region: String,
    pub id: String,
    pub grpc: SocketAddr,
    /// Peer port (replication, consensus, forwarding).
    pub peer: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    child: Child,
}

/// A running dev cluster: the proxy links and the node processes.
pub struct DevCluster {
    pub nodes: Vec<DevNode>,
    /// The certificates of the cluster (None with --insecure).
    pub certs_dir: Option<PathBuf>,
    pub proxies: ProxySet,
    pub control: Option<geokv_proxy::ControlServer>,
    /// With --client-region: (region, node id, proxied client endpoint).
    pub client_endpoints: Vec<(String, String, SocketAddr)>,
}

impl DevCluster {
    /// The `--endpoints` value of a region-aware client behind
    /// --client-region's links: one `region=addr` per region.
    pub fn client_seeds(&self) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        self.client_endpoints
            .iter()
            .filter(|(r, _, _)| seen.insert(r.clone()))
            .map(|(r, _, a)| format!("{r}={a}"))
            .collect()
    }
}

/// How one node reaches another, as written in its `[[regions]]` list.
struct PeerAddr {
    id: String,
    /// Through the proxy for other regions, direct inside the region.
    via: SocketAddr,
    client: SocketAddr,
}

/// Raft timing for the emulated WAN: openraft gives each AppendEntries the
/// heartbeat interval as its deadline, so the interval must exceed the
/// slowest round trip between regions (plus a margin for fsync and load).
pub fn consensus_timing(args: &DevArgs) -> (u64, u64, u64) {
    // The control plane's voters, and the registers table's STRONG group,
    // are the first three regions.
    let voters = &args.regions[..args.regions.len().min(3)];
    let mut rtt_max: f64 = 0.0;
    for a in voters {
        for b in voters {
            if a != b {
                rtt_max = rtt_max.max(round_trip_ms(a, b) * args.latency_scale);
            }
        }
    }
    let heartbeat = ((rtt_max * 1.25) as u64 + 60).max(150);
    let election_min = heartbeat * 3;
    (heartbeat, election_min, election_min * 8 / 5)
}

fn consensus_section(args: &DevArgs) -> String {
    let (heartbeat, min, max) = consensus_timing(args);
    format!(
        "\n[consensus]\nheartbeat_ms = {heartbeat}\nelection_timeout_min_ms = {min}\nelection_timeout_max_ms = {max}\n"
    )
}

/// (region, node id).
type NodeName = (String, String);

/// A node's three addresses: client gRPC, peer gRPC, admin HTTP.
#[derive(Debug, Clone, Copy)]
struct NodePorts {
    grpc: SocketAddr,
    peer: SocketAddr,
    admin: SocketAddr,
}

/// What every node's config gets alike: `--extra-config` and the subject key.
#[derive(Clone, Copy)]
struct ClusterText<'a> {
    extra: &'a str,
    subject_key: &'a str,
}

fn config_text(
    args: &DevArgs,
    node: (&str, &str),
    node_dir: &Path,
    ports: NodePorts,
    certs_dir: Option<&Path>,
    peers: &BTreeMap<String, Vec<PeerAddr>>,
    cluster: &ClusterText<'_>,
) -> String {
    let ClusterText { extra, subject_key } = *cluster;
    let (region, id) = node;
    let NodePorts { grpc, peer, admin } = ports;
    let mut out = String::new();
    out.push_str("# Written by `geokv dev`; regenerated at every start.\n");
    out.push_str(&format!("node_id = \"{id}\"\nregion = \"{region}\"\npartitions = {}\n", args.partitions));
    out.push_str(&format!("data_dir = {:?}\n", node_dir.join("data").display().to_string()));
    out.push_str(&format!("listen = \"{grpc}\"\nlisten_peer = \"{peer}\"\nadmin_listen = \"{admin}\"\n\n"));
    match certs_dir {
        Some(dir) => out.push_str(&format!("[security]\ncerts_dir = {:?}\n\n", dir.display().to_string())),
        None => out.push_str("[security]\ninsecure = true\n\n"),
    }
    for r in &args.regions {
        out.push_str(&format!("[[regions]]\nname = \"{r}\"\n"));
        if let Some(nodes) = peers.get(r).filter(|n| !n.is_empty()) {
            let list: Vec<String> = nodes
                .iter()
                .map(|p| {
                    format!("{{ id = \"{}\", addr = \"{}\", client_addr = \"{}\" }}", p.id, p.via, p.client)
                })
                .collect();
            out.push_str(&format!("nodes = [{}]\n", list.join(", ")));
        }
        out.push('\n');
    }
    let eu: Vec<&String> = args.regions.iter().filter(|r| r.starts_with("eu-")).collect();
    if eu.len() >= 2 {
        let list: Vec<String> = eu.iter().map(|r| format!("\"{r}\"")).collect();
        out.push_str(&format!("[[zones]]\nname = \"eu\"\nregions = [{}]\n\n", list.join(", ")));
    }
    out.push_str("[localities]\n");
    for (c, r) in localities(&args.regions) {
        out.push_str(&format!("{c} = \"{r}\"\n"));
    }
    out.push_str(&format!(
        "\n[[tables]]\nname = \"default\"\ndefault_home_region = \"{}\"\nsubject_separator = \":\"\n\n\
         [[tables]]\nname = \"users\"\nsubject_separator = \":\"\n",
        args.regions[0]
    ));
    if eu.len() >= 2 {
        out.push_str(
            "\n[[tables]]\nname = \"eu_users\"\nzone = \"eu\"\ndefault_consistency = \"eventual\"\n\
             subject_separator = \":\"\n",
        );
    }
    // An extra `[consensus]` section gets dev's timing added to it (one
    // table may not be defined twice).
    let extra_consensus = extra.lines().any(|l| l.trim() == "[consensus]");
    if !extra_consensus {
        out.push_str(&consensus_section(args));
    }
    // Linearizable registers, led from the first region, replicated to all.
    out.push_str(&format!(
        "\n[[tables]]\nname = \"registers\"\nlocality = \"by_table\"\nhome_region = \"{}\"\n\
         default_consistency = \"strong\"\n",
        args.regions[0]
    ));
    // The cluster's subject key: one `[lifecycle]` table, merged with an
    // extra one.
    let lifecycle = format!("[lifecycle]\nsubject_key = \"{subject_key}\"");
    let extra_lifecycle = extra.lines().any(|l| l.trim() == "[lifecycle]");
    // An extra section that names its own key (two clusters sharing one,
    // as a backup restored elsewhere needs) keeps it.
    let extra_key = extra.lines().any(|l| l.trim_start().starts_with("subject_key"));
    if !extra_lifecycle {
        out.push_str(&format!("\n{lifecycle}\n"));
    }
    if !extra.is_empty() {
        out.push_str("\n# From --extra-config.\n");
        let mut extra = extra.to_string();
        if extra_consensus {
            extra = extra.replacen("[consensus]", consensus_section(args).trim(), 1);
        }
        if extra_lifecycle && !extra_key {
            extra = extra.replacen("[lifecycle]", &lifecycle, 1);
        }
        out.push_str(&extra);
        out.push('\n');
    }
    out
}

/// The dev cluster's subject key (`lifecycle.subject_key`): made once per
/// data dir and kept in `<data-dir>/subject-key`, so a restarted cluster
/// hashes subjects as before.
fn dev_subject_key(data_dir: &Path) -> anyhow::Result<String> {
    use std::hash::{BuildHasher, Hasher};
    let path = data_dir.join("subject-key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let key = text.trim().to_string();
        if key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(key);
        }
        anyhow::bail!("{} does not hold 64 hex digits; delete it to make a new key", path.display());
    }
    // RandomState is seeded from the operating system's randomness.
    let mut key = String::with_capacity(64);
    for i in 0..4u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        key.push_str(&format!("{:016x}", h.finish()));
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    std::fs::write(&path, &key).with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// Name of the proxy link from one node to another.
pub fn link_name(nodes_per_region: u32, from: (&str, &str), to: (&str, &str)) -> String {
    if nodes_per_region == 1 {
        format!("{}->{}", from.0, to.0)
    } else {
        format!("{}.{}->{}.{}", from.0, from.1, to.0, to.1)
    }
}

impl DevCluster {
    /// Starts the proxies and the nodes and waits until every node answers.
    pub async fn start(args: &DevArgs, geokv_bin: &Path) -> anyhow::Result<Self> {
        if args.regions.is_empty() || args.regions.len() > REGIONS_MAX {
            bail!("--regions needs 1 to {REGIONS_MAX} regions");
        }
        if args.nodes_per_region == 0 || args.nodes_per_region > NODES_PER_REGION_MAX {
            bail!("--nodes-per-region must be 1..={NODES_PER_REGION_MAX}");
        }
        if args.partitions < args.nodes_per_region || args.partitions > 4096 {
            bail!("--partitions must be at least --nodes-per-region and at most 4096");
        }
        if !(0.0..=100.0).contains(&args.latency_scale) {
            bail!("--latency-scale must be between 0 and 100");
        }
        if let Some(r) = &args.client_region {
            if !args.regions.contains(r) {
                bail!("--client-region `{r}` is not one of --regions ({})", args.regions.join(", "));
            }
        }
        let extra = match &args.extra_config {
            Some(path) => {
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
            }
            None => String::new(),
        };
        if args.fresh && args.data_dir.exists() {
            std::fs::remove_dir_all(&args.data_dir)
                .with_context(|| format!("removing {}", args.data_dir.display()))?;
        }
        let subject_key = dev_subject_key(&args.data_dir)?;
        let cluster_text = ClusterText { extra: &extra, subject_key: &subject_key };
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        // (region, node id) -> ports, in start order.
        let mut addrs: Vec<((String, String), NodePorts)> = Vec::new();
        for (i, r) in args.regions.iter().enumerate() {
            for j in 0..args.nodes_per_region {
                let offset = u16::try_from(i * 10 + 2 * j as usize).context("too many regions")?;
                let base = args.base_port.checked_add(offset).context("ports beyond 65535")?;
                let peer = base.checked_add(PEER_PORT_OFFSET).context("ports beyond 65535")?;
                addrs.push((
                    (r.clone(), format!("n{}", j + 1)),
                    NodePorts { grpc: loopback(base), peer: loopback(peer), admin: loopback(base + 1) },
                ));
            }
        }
        let certs_dir = if args.insecure {
            None
        } else {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("creating {}", args.data_dir.display()))?;
            let dir = std::fs::canonicalize(&args.data_dir)
                .with_context(|| format!("resolving {}", args.data_dir.display()))?
                .join("certs");
            let names: Vec<(&str, &str)> = addrs.iter().map(|((r, n), _)| (r.as_str(), n.as_str())).collect();
            geokv_net::certs::ensure_dev_certs(
                &dir,
                DEV_CLUSTER,
                &names,
                &["127.0.0.1", "localhost"],
                &["root"],
            )
            .with_context(|| format!("making the cluster's certificates in {}", dir.display()))?;
            Some(dir)
        };
        let proxies = ProxySet::new();
        // (from node, to node) -> the proxy address `from` dials to reach `to`.
        let mut via: BTreeMap<(&NodeName, &NodeName), SocketAddr> = BTreeMap::new();
        for (a, _) in &addrs {
            for (b, b_ports) in &addrs {
                if a.0 == b.0 {
                    continue;
                }
                let one_way = (round_trip_ms(&a.0, &b.0) / 2.0 * args.latency_scale).round() as u64;
                let name = link_name(args.nodes_per_region, (&a.0, &a.1), (&b.0, &b.1));
                let handle = proxies
                    .add(&name, loopback(0), b_ports.peer, LinkFaults::symmetric_latency(one_way))
                    .await
                    .with_context(|| format!("starting proxy link {name}"))?;
                via.insert((a, b), handle.local_addr());
            }
        }
        // A client in --client-region reaches every node's client port with
        // the latency from its region (none inside it).
        let mut client_endpoints = Vec::new();
        if let Some(from) = &args.client_region {
            for ((region, id), ports) in &addrs {
                let one_way = if region == from {
                    0
                } else {
                    (round_trip_ms(from, region) / 2.0 * args.latency_scale).round() as u64
                };
                let name = format!("client:{from}->{region}.{id}");
                let handle = proxies
                    .add(&name, loopback(0), ports.grpc, LinkFaults::symmetric_latency(one_way))
                    .await
                    .with_context(|| format!("starting proxy link {name}"))?;
                client_endpoints.push((region.clone(), id.clone(), handle.local_addr()));
            }
        }
        let control_port = args.proxy_control_port.unwrap_or(args.base_port.saturating_add(99));
        let control = match proxies.serve_control(loopback(control_port)).await {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!(
                    "warning: the fault proxy's control API is not available on port {control_port}: {e}"
                );
                None
            }
        };
        let mut nodes = Vec::new();
        for (me, ports) in &addrs {
            let (r, id) = me;
            let dir = if args.nodes_per_region == 1 {
                args.data_dir.join(r)
            } else {
                args.data_dir.join(r).join(id)
            };
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut peers: BTreeMap<String, Vec<PeerAddr>> = BTreeMap::new();
            for (other, other_ports) in &addrs {
                if other == me {
                    continue;
                }
                let path = if other.0 == *r { other_ports.peer } else { via[&(me, other)] };
                peers.entry(other.0.clone()).or_default().push(PeerAddr {
                    id: other.1.clone(),
                    via: path,
                    client: other_ports.grpc,
                });
            }
            let config = dir.join("node.toml");
            let text = config_text(args, (r, id), &dir, *ports, certs_dir.as_deref(), &peers, &cluster_text);
            std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
            let log = std::fs::File::create(dir.join("node.log"))?;
            let mut command = Command::new(geokv_bin);
            command
                .arg("node")
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true);
            // The nodes die with `geokv dev`, however it ends (kill -9, a
            // crash): the kernel sends them SIGKILL when it exits, so a
            // later `geokv dev` never meets stale nodes on its ports.
            // SAFETY: prctl(2) is async-signal-safe and touches no memory of
            // the parent; it runs in the forked child before exec.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = command.spawn().with_context(|| format!("starting {}", geokv_bin.display()))?;
            nodes.push(DevNode {
                region: r.clone(),
                id: id.clone(),
                grpc: ports.grpc,
                peer: ports.peer,
                admin: ports.admin,
                dir,
                child,
            });
        }
        let cluster = DevCluster { nodes, certs_dir, proxies, control, client_endpoints };
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        for n in &self.nodes {
            loop {
                if tokio::net::TcpStream::connect(n.grpc).await.is_ok()
                    && tokio::net::TcpStream::connect(n.peer).await.is_ok()
                    && tokio::net::TcpStream::connect(n.admin).await.is_ok()
                {
                    break;
                }
                if started.elapsed() > limit {
                    bail!(
                        "node {}/{} did not start within {:?}; see {}",
                        n.region,
                        n.id,
                        limit,
                        n.dir.join("node.log").display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Stops every node with SIGTERM (SIGKILL after a bounded wait) and the proxies.
    pub async fn stop(mut self) {
        for n in &self.nodes {
            if let Some(pid) = n.child.id() {
                // SAFETY: sending a signal to a child we started; no memory is touched.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        for n in &mut self.nodes {
            if tokio::time::timeout(Duration::from_secs(10), n.child.wait()).await.is_err() {
                let _ = n.child.kill().await;
            }
        }
        if let Some(c) = self.control.take() {
            c.shutdown().await;
        }
        self.proxies.shutdown().await;
    }
}

/// Runs `geokv dev` until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let bin = std::env::current_exe().context("locating the geokv binary")?;
    let cluster = DevCluster::start(&args, &bin).await?;
    println!(
        "geokv dev: {} regions, {} node(s) each, {} partitions (latency scale {})",
        args.regions.len(),
        args.nodes_per_region,
        args.partitions,
        args.latency_scale
    );
    println!("{:<16} {:<5} {:<22} {:<30}", "region", "node", "gRPC endpoint", "admin / dashboard");
    for n in &cluster.nodes {
        println!("{:<16} {:<5} {:<22} http://{}/dashboard", n.region, n.id, n.grpc, n.admin);
    }
    if let Some(from) = &args.client_region {
        println!("client endpoints as seen from {from} (through the fault proxy):");
        for (region, id, addr) in &cluster.client_endpoints {
            let rtt = if region == from { 0.0 } else { round_trip_ms(from, region) * args.latency_scale };
            println!("  {region:<16} {id:<5} {addr:<22} (+{rtt:.0} ms round trip)");
        }
        println!(
            "region-aware client: geokv --endpoints {} --local-region {from} ...",
            cluster.client_seeds().join(",")
        );
    }
    if let Some(c) = &cluster.control {
        println!("fault proxy control: http://{}/links", c.local_addr());
    }
    println!("logs and data: {}", args.data_dir.display());
    match &cluster.certs_dir {
        Some(dir) => println!(
            "TLS on; certificates in {} (the geokv command finds them from this directory; elsewhere use --certs-dir or GEOKV_CERTS_DIR)",
            dir.display()
        ),
        None => println!("INSECURE: plaintext, no authentication (--insecure)"),
    }
    println!(
        "try: geokv put user:1 alice --region {} && geokv get user:1 --region {}",
        args.regions[0],
        args.regions[args.regions.len() - 1]
    );
    println!("Ctrl-C stops the cluster.");
    geokv_server::server::shutdown_signal().await;
    println!("stopping...");
    cluster.stop().await;
    Ok(())
}
