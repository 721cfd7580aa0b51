//! `geokv`: runs nodes and speaks to them.
//!
//! # Layout
//! - `node`: start a node (defaults give a working single-region node).
//! - data commands: `put`, `get`, `del`, `scan`, `incr`, `sadd`, `srem`,
//!   `smembers`; readable output, `--json` for scripts; errors print the
//!   stable reason and exit with status 1.
//! - `status`: what a node says about itself.

mod backup;
mod cert;
mod cluster;
mod control;
mod dev;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use geokv_client::proto as pb;
use geokv_client::{CausalContext, Client, ClientConfig, Consistency, ReadConsistency, Row, WriteOptions};
use serde_json::json;

#[derive(Parser)]
#[command(name = "geokv", version, about = "geokv: a geo-partitioned multi-region key-value store")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node. With no flags: data in ./geokv-data, gRPC on 127.0.0.1:7700,
    /// admin HTTP on 127.0.0.1:7701, and a table `default` homed in this node's region.
    Node(NodeArgs),
    /// Write a value (a sibling of concurrent values unless --context is given).
    /// The value is the argument, `-` for standard input, or --value-file.
    Put {
        #[command(flatten)]
        row: RowArgs,
        /// The value; `-` reads it from standard input (any bytes).
        #[arg(required_unless_present = "value_file", conflicts_with = "value_file")]
        value: Option<String>,
        /// Read the value from this file (any bytes).
        #[arg(long)]
        value_file: Option<PathBuf>,
        /// Time to live, from the write's time: 500ms, 30s, 5m, 2h or 7d
        /// (default: the table's `ttl_s`, none unless set). Once it passed,
        /// no region returns the value; compaction removes it from disk.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Read a value: its siblings and causal context.
    Get {
        #[command(flatten)]
        row: RowArgs,
        #[command(flatten)]
        read: ReadArgs,
        /// Write the value to standard output byte for byte, nothing else
        /// (fails when the row holds several siblings).
        #[arg(long, conflicts_with = "json")]
        raw: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Delete a value (what --context saw, or everything stored).
    Del {
        #[command(flatten)]
        row: RowArgs,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List rows of a table by key prefix.
    Scan {
        /// Key prefix (empty: every row).
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long, default_value = "default")]
        table: String,
        /// Rows per page.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue after this key.
        #[arg(long, default_value = "")]
        start_after: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Add to a counter (default +1); prints the new value.
    Incr {
        #[command(flatten)]
        row: RowArgs,
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        delta: i64,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Read a counter.
    Count {
        #[command(flatten)]
        row: RowArgs,
        #[command(flatten)]
        read: ReadArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Add members to an add-wins set.
    Sadd {
        #[command(flatten)]
        row: RowArgs,
        #[arg(required = true)]
        members: Vec<String>,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Remove members from a set.
    Srem {
        #[command(flatten)]
        row: RowArgs,
        #[arg(required = true)]
        members: Vec<String>,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List a set's members.
    Smembers {
        #[command(flatten)]
        row: RowArgs,
        #[command(flatten)]
        read: ReadArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Compare-and-set on a row of a STRONG table: write VALUE only if the
    /// row holds --expect (or is absent with --expect-absent).
    Cas {
        #[command(flatten)]
        row: RowArgs,
        /// The new value (omit with --delete).
        value: Option<String>,
        /// The value the row must hold.
        #[arg(long, conflicts_with = "expect_absent")]
        expect: Option<String>,
        /// The row must not exist.
        #[arg(long)]
        expect_absent: bool,
        /// Delete the row instead of writing a value.
        #[arg(long, conflicts_with = "value")]
        delete: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show what a node says about itself.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Run a whole local multi-region cluster with emulated WAN latency.
    Dev(dev::DevArgs),
    /// Regions: list them, or show health and replication per region.
    Region {
        #[command(subcommand)]
        action: RegionAction,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Cross-region replication: status, pause, resume.
    Replication {
        #[command(subcommand)]
        action: ReplicationAction,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Residency: audit every region's storage for rows outside their zone.
    Residency {
        #[command(subcommand)]
        action: ResidencyAction,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Follow the changes of the rows under a key prefix, from any region,
    /// as the connected region applies them (needs `watch`). One line per
    /// change; with --json, heartbeats too, each with the cursor to pass to
    /// --from to resume after it.
    Watch {
        /// Key prefix ("" for the whole table).
        prefix: String,
        #[arg(long, default_value = "default")]
        table: String,
        /// Resume after this cursor (from an earlier --json line).
        #[arg(long)]
        from: Option<String>,
        /// Stop after this many changes (default: run until interrupted).
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Data subjects (tables with `subject_separator`): erase or export
    /// everything a subject's id names, in every region.
    Subject {
        #[command(subcommand)]
        action: SubjectAction,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Zone-strict backups: create, verify, restore (needs `admin`;
    /// docs/decisions/029-zone-strict-backups.md).
    Backup {
        #[command(subcommand)]
        action: backup::BackupAction,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Flush and fully compact the store of every node of every region,
    /// so expired values leave the disk now (needs `admin`).
    Compact {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Digests of every region's rows per (table, zone), compared.
    Digest {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Where a row lives: home region, partition, and the node owning it in
    /// every region it may be stored in.
    Locate {
        #[command(flatten)]
        row: RowArgs,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Certificates: the cluster CA, node and client certificates.
    Cert(cert::CertArgs),
    /// The access audit log of one region (needs the `admin` grant).
    Audit {
        #[command(subcommand)]
        action: AuditAction,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Accesses recorded by the region of --endpoint (or --region), oldest
    /// first: who, what, which table, the row key's keyed hash, where the
    /// request entered, and whether it was allowed. No values, no raw keys.
    Log {
        /// Only records newer than this: a duration ago (`10m`, `2h`, `30s`)
        /// or Unix milliseconds.
        #[arg(long)]
        since: Option<String>,
        /// Only this principal's records.
        #[arg(long)]
        principal: Option<String>,
        /// Only this table's records.
        #[arg(long)]
        table: Option<String>,
        /// Most records to print (at most 10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum RegionAction {
    /// Regions, zones, health and endpoints.
    List,
    /// Health, replication lag, home leases (holder, epoch, lease) and
    /// consensus groups (leader, term).
    Status,
    /// Planned handover of every home FROM holds to TO: drain, ship the
    /// tail, transfer (no loss).
    Failover {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
    /// Return every home of REGION that another region holds.
    Failback {
        /// The home region to return homes to.
        #[arg(long)]
        region: String,
    },
    /// Switch automatic failover on or off (off = manual-only operation).
    AutoFailover {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Writes an old home accepted before an unplanned failover and shipped
    /// after it (merged, listed here), as the entry node received them.
    Conflicts,
    /// Partitions and the node owning each, per region (only the region
    /// given by --region, if any).
    Partitions,
}

#[derive(Subcommand)]
enum ReplicationAction {
    /// Lag per (source, destination) pair across the cluster.
    Status,
    /// Stop shipping from one region to another (entries queue in the log).
    Pause {
        /// Destination region.
        #[arg(long)]
        to: String,
        /// Source region (default: the entry node's region).
        #[arg(long)]
        from: Option<String>,
    },
    /// Resume shipping.
    Resume {
        #[arg(long)]
        to: String,
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(Subcommand)]
enum ResidencyAction {
    /// Lists every row stored outside its residency zone, in every region.
    Audit,
}

#[derive(Subcommand)]
enum SubjectAction {
    /// Erase the subject in every region (needs `erase`): every value of
    /// its rows written up to the erasure's fence is removed from every
    /// node's data, replication log and files, and stays removed when a
    /// late copy arrives. Prints one receipt per node; fails, naming the
    /// regions without one, if some region cannot be reached within
    /// --wait-s (run it again to finish: it is idempotent).
    Erase {
        /// The subject's id (the key prefix before the table's separator).
        id: String,
        /// How long to keep retrying regions that cannot be reached.
        #[arg(long, default_value_t = 60)]
        wait_s: u64,
    },
    /// Every row of the subject as JSON lines (needs `export`), read from
    /// each region's own nodes, so a row is only read inside its zone.
    Export { id: String },
}

#[derive(Args)]
struct NodeArgs {
    /// TOML configuration file (see deploy/node.example.toml).
    #[arg(long, env = "GEOKV_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client gRPC address (KV, Admin, Control, health, reflection):
    /// host:port, the host an IP address or a DNS name.
    #[arg(long)]
    listen: Option<geokv_server::config::HostPort>,
    /// Peer gRPC address (replication, consensus, forwarding; nodes only).
    #[arg(long)]
    listen_peer: Option<geokv_server::config::HostPort>,
    /// Directory with ca.crt and node.<region>.<node>.crt/.key (`geokv cert`).
    #[arg(long, env = "GEOKV_CERTS_DIR")]
    certs_dir: Option<PathBuf>,
    /// Serve plaintext with no authentication (every caller is root).
    #[arg(long)]
    insecure: bool,
    /// Admin HTTP address (/metrics, /health).
    #[arg(long)]
    admin_listen: Option<geokv_server::config::HostPort>,
    /// The node's region.
    #[arg(long)]
    region: Option<String>,
    /// The node's name inside its region.
    #[arg(long)]
    node_id: Option<String>,
    /// Acknowledge writes before they are synced to disk (faster, not durable).
    #[arg(long)]
    no_sync: bool,
}

#[derive(Args, Clone)]
struct ConnArgs {
    /// Node to talk to; it routes each request onwards (a pinned client).
    #[arg(long, global = true, env = "GEOKV_ENDPOINT", default_value = "127.0.0.1:7700")]
    endpoint: String,
    /// Seed endpoints, comma-separated, of any regions: the client learns
    /// the cluster from them and sends each request straight to the region
    /// that should serve it, failing over when one is down, never outside a
    /// row's residency zone. `region=host:port` also fixes that region's
    /// address (e.g. the proxied endpoints `geokv dev --client-region` prints).
    #[arg(long, global = true, env = "GEOKV_ENDPOINTS", value_delimiter = ',', conflicts_with = "region")]
    endpoints: Vec<String>,
    /// With --endpoints: the region this client runs in, preferred while healthy.
    #[arg(long, global = true, env = "GEOKV_LOCAL_REGION", requires = "endpoints")]
    local_region: Option<String>,
    /// Enter the cluster in this region (found through --endpoint's cluster view).
    #[arg(long, global = true)]
    region: Option<String>,
    /// Print JSON instead of readable text.
    #[arg(long, global = true)]
    json: bool,
    /// Deadline per attempt, in milliseconds.
    #[arg(long, global = true, default_value_t = 5000)]
    timeout_ms: u64,
    /// Certificates directory (ca.crt, client.<user>.crt/.key). Default:
    /// `./geokv-dev/certs` or `./certs` when present (a `geokv dev` data dir).
    #[arg(long, global = true, env = "GEOKV_CERTS_DIR")]
    certs_dir: Option<PathBuf>,
    /// The user whose client certificate is presented.
    #[arg(long, global = true, env = "GEOKV_USER", default_value = "root")]
    user: String,
    /// Authenticate with this bearer token instead of a client certificate.
    #[arg(long, global = true, env = "GEOKV_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Plaintext, no certificates (nodes run with --insecure).
    #[arg(long, global = true)]
    insecure: bool,
}

#[derive(Args, Clone)]
struct RowArgs {
    key: String,
    #[arg(long, default_value = "default")]
    table: String,
    /// Home region of the row.
    #[arg(long, conflicts_with = "locality")]
    home: Option<String>,
    /// Locality value (e.g. a country code) mapped to the home by the table.
    #[arg(long)]
    locality: Option<String>,
}

#[derive(Args, Clone)]
struct WriteArgs {
    /// local, eventual, quorum or strong (default: the table's).
    #[arg(long)]
    consistency: Option<String>,
    /// Causal context from an earlier read (base64).
    #[arg(long)]
    context: Option<String>,
    /// Makes a retried command apply once.
    #[arg(long)]
    idempotency_key: Option<String>,
}

#[derive(Args, Clone)]
struct ReadArgs {
    /// local, bounded:<ms>, session, quorum or strong.
    #[arg(long, default_value = "local")]
    consistency: String,
}

impl RowArgs {
    fn row(&self) -> Row {
        let row = Row::new(self.table.clone(), self.key.as_bytes().to_vec());
        match (&self.home, &self.locality) {
            (Some(h), _) => row.home(h.clone()),
            (None, Some(l)) => row.locality(l.clone()),
            (None, None) => row,
        }
    }
}

/// Failures worth a distinct message: a server's reason, or a usage problem.
enum Failure {
    Server(geokv_client::Error),
    Usage(String),
    Other(anyhow::Error),
    /// Already reported on stdout (a compare-and-set whose expectation failed): exit 1.
    Silent,
}

impl From<geokv_client::Error> for Failure {
    fn from(e: geokv_client::Error) -> Self {
        Failure::Server(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

impl WriteArgs {
    fn options(&self) -> Result<WriteOptions, Failure> {
        let mut o = WriteOptions::default();
        if let Some(c) = &self.consistency {
            o.consistency = Some(c.parse::<Consistency>().map_err(Failure::Usage)?);
        }
        if let Some(c) = &self.context {
            o.context = Some(CausalContext::from_base64(c)?);
        }
        o.idempotency_key = self.idempotency_key.clone();
        Ok(o)
    }
}

/// A client config for long admin work (an erasure compacts every store):
/// the per-attempt deadline is at least two minutes.
fn long_config(conn: &ConnArgs) -> ClientConfig {
    let mut cfg = client_config(conn);
    cfg.timeout = cfg.timeout.max(Duration::from_secs(120));
    cfg
}

/// `geokv watch`: prints changes (and, with --json, heartbeats) as they come.
async fn watch(
    conn: &ConnArgs,
    table: &str,
    prefix: &[u8],
    from: Option<&str>,
    count: Option<u64>,
) -> Result<(), Failure> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let cursor = match from {
        Some(c) => b64.decode(c).map_err(|e| Failure::Usage(format!("--from is not a cursor: {e}")))?,
        None => Vec::new(),
    };
    let client = connect(conn).await?;
    let mut stream = client.watch(table, prefix, &cursor).await?;
    let mut seen = 0u64;
    while count.is_none_or(|n| seen < n) {
        let event = match stream.message().await {
            Ok(Some(e)) => e,
            Ok(None) => return Err(Failure::Other(anyhow::anyhow!("the serving node ended the watch"))),
            Err(status) => return Err(geokv_client::Error::from(status).into()),
        };
        let cursor = b64.encode(&event.cursor);
        match event.event {
            Some(pb::watch_event::Event::Change(c)) => {
                seen += 1;
                let values: Vec<String> = c.siblings.iter().map(|s| text(&s.value)).collect();
                if conn.json {
                    let values_b64: Vec<String> = c.siblings.iter().map(|s| b64.encode(&s.value)).collect();
                    println!(
                        "{}",
                        json!({"key": text(&c.key), "values": values, "values_base64": values_b64, "kind": c.kind,
                            "counter": c.counter_value, "origin": c.origin, "origin_seq": c.origin_seq,
                            "hlc": c.hlc, "cursor": cursor})
                    );
                } else if values.is_empty() {
                    println!("{} (deleted)", text(&c.key));
                } else {
                    println!("{} = {}", text(&c.key), values.join(" | "));
                }
            }
            Some(pb::watch_event::Event::ResolvedHlc(hlc)) if conn.json => {
                println!("{}", json!({"resolved_hlc": hlc, "cursor": cursor}));
            }
            Some(pb::watch_event::Event::ResolvedHlc(_)) | None => {}
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    Ok(())
}

/// `geokv subject erase`: every region, the first picking the fence.
async fn subject_erase(conn: &ConnArgs, subject: &[u8], wait: Duration) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let entry = connect(conn).await?;
    let mut fence = 0u64;
    let mut receipts: Vec<pb::ErasureReceipt> = Vec::new();
    let mut done: std::collections::BTreeSet<String> = Default::default();
    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let regions = cluster::connect_all(&entry, &long_config(conn)).await?;
        for (name, client) in &regions.clients {
            if done.contains(name) {
                continue;
            }
            let result = match client {
                Ok(c) => c.erase_subject(subject, fence).await,
                Err(e) => Err(e.clone()),
            };
            match result {
                Ok(r) => {
                    fence = r.fence_hlc;
                    receipts.extend(r.receipts);
                    done.insert(name.clone());
                    errors.remove(name);
                }
                Err(e) => {
                    errors.insert(name.clone(), e.to_string());
                }
            }
        }
        if errors.is_empty() || started.elapsed() >= wait {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let hash = receipts.first().map(|r| r.subject_hash.clone()).unwrap_or_default();
    if conn.json {
        let rows: Vec<_> = receipts
            .iter()
            .map(|r| {
                json!({"region": r.region, "node": r.node, "rows": r.rows, "values": r.values, "bytes": r.bytes,
                    "counters_kept": r.counters_kept, "fence_hlc": r.fence_hlc, "erased_at_ms": r.erased_at_ms,
                    "took_ms": r.took_ms})
            })
            .collect();
        println!(
            "{}",
            json!({"subject_hash": hash, "fence_hlc": fence, "receipts": rows, "pending": errors,
                "took_ms": started.elapsed().as_millis() as u64})
        );
    } else {
        println!("subject {hash}: fence {fence}");
        for r in &receipts {
            println!(
                "  {}/{}: {} rows, {} values ({} bytes) erased in {} ms{}",
                r.region,
                r.node,
                r.rows,
                r.values,
                r.bytes,
                r.took_ms,
                if r.counters_kept > 0 {
                    format!(", {} counters kept", r.counters_kept)
                } else {
                    String::new()
                }
            );
        }
        for (region, why) in &errors {
            println!("  {region}: NO RECEIPT: {why}");
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Failure::Other(anyhow::anyhow!(
            "{} regions have not erased the subject yet ({}); run the erasure again",
            errors.len(),
            errors.keys().cloned().collect::<Vec<_>>().join(", ")
        )))
    }
}

/// `geokv subject export`: each region's rows, one JSON line per row with
/// the regions that hold it (the values of the home's copy when it has one).
async fn subject_export(conn: &ConnArgs, subject: &[u8]) -> Result<(), Failure> {
    let entry = connect(conn).await?;
    let regions = cluster::connect_all(&entry, &long_config(conn)).await?;
    let mut rows: BTreeMap<(String, Vec<u8>), (pb::ExportedRow, std::collections::BTreeSet<String>)> =
        BTreeMap::new();
    let mut failed = Vec::new();
    for (name, client) in &regions.clients {
        let result = match client {
            Ok(c) => c.export_subject(subject).await,
            Err(e) => Err(e.clone()),
        };
        match result {
            Ok(r) => {
                for row in r.rows {
                    let slot = rows
                        .entry((row.table.clone(), row.key.clone()))
                        .or_insert_with(|| (row.clone(), Default::default()));
                    slot.1.insert(row.region.clone());
                    if row.region == row.home_region {
                        slot.0 = row;
                    }
                }
            }
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    if !failed.is_empty() {
        return Err(Failure::Other(anyhow::anyhow!(
            "the export is incomplete, nothing is printed: {}",
            failed.join("; ")
        )));
    }
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    for ((table, key), (row, holders)) in rows {
        let siblings: Vec<_> = row
            .siblings
            .iter()
            .map(|s| json!({"value": text(&s.value), "value_base64": b64(&s.value), "hlc": s.hlc, "origin": s.origin}))
            .collect();
        let mut line = json!({"table": table, "key": text(&key), "key_base64": b64(&key), "kind": row.kind,
            "home_region": row.home_region, "zone": row.zone, "regions": holders});
        match row.kind.as_str() {
            "counter" => line["counter"] = json!(row.counter_value),
            "set" => line["members"] = json!(row.set_members.iter().map(|m| text(m)).collect::<Vec<_>>()),
            _ => line["siblings"] = json!(siblings),
        }
        println!("{line}");
    }
    Ok(())
}

/// Parses a TTL such as `500ms`, `30s`, `5m`, `2h` or `7d` (a whole
/// number and a unit, above zero).
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("`{text}` is not a number and a unit such as 30s"))?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{text}`: the unit must be ms, s, m, h or d")),
    };
    match n.checked_mul(ms_per) {
        Some(0) => Err("a TTL must be above zero".into()),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Err(format!("`{text}` is too long")),
    }
}

impl ReadArgs {
    fn level(&self) -> Result<ReadConsistency, Failure> {
        self.consistency.parse().map_err(Failure::Usage)
    }
}

fn client_config(conn: &ConnArgs) -> ClientConfig {
    let seeds: Vec<String> =
        conn.endpoints.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
    let mut cfg = if seeds.is_empty() {
        ClientConfig::new(conn.endpoint.clone())
    } else {
        ClientConfig::discover(seeds)
    };
    cfg.local_region = conn.local_region.clone();
    cfg.timeout = Duration::from_millis(conn.timeout_ms);
    cfg.user = conn.user.clone();
    cfg.token = conn.token.clone();
    cfg.certs_dir = if conn.insecure { None } else { conn.certs_dir.clone().or_else(find_certs_dir) };
    cfg
}

/// The certificates of a `geokv dev` cluster or of `geokv cert`'s default
/// directory, looked for in the working directory and its parents.
fn find_certs_dir() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors().take(16).find_map(|dir| {
        [dir.join("geokv-dev").join("certs"), dir.join("certs")]
            .into_iter()
            .find(|c| c.join("ca.crt").is_file())
    })
}

async fn connect(conn: &ConnArgs) -> Result<Client, Failure> {
    let cfg = client_config(conn);
    let entry = Client::with_config(cfg.clone()).await?;
    let Some(region) = &conn.region else { return Ok(entry) };
    let view = entry.cluster_status().await?;
    let Some(info) = view.regions.iter().find(|r| &r.name == region) else {
        let known: Vec<_> = view.regions.iter().map(|r| r.name.clone()).collect();
        return Err(Failure::Usage(format!(
            "unknown region `{region}`; the cluster has {}",
            known.join(", ")
        )));
    };
    let Some(addr) = info.client_addrs.first() else {
        return Err(Failure::Usage(format!("region `{region}` has no client endpoint")));
    };
    let mut cfg = cfg;
    cfg.endpoint = addr.clone();
    Ok(Client::with_config(cfg).await?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ack_json(a: &geokv_client::WriteAck) -> serde_json::Value {
    json!({
        "context": a.context.to_base64(),
        "hlc": a.hlc,
        "home_region": a.home_region,
        "epoch": a.epoch,
        "accepted_by_region": a.accepted_by_region,
        "replayed": a.replayed,
    })
}

/// mimalloc instead of glibc's malloc: the request path allocates and frees
/// many small buffers on several threads, and glibc's malloc, free and
/// consolidation were about a tenth of a node's CPU per put
/// (docs/decisions/031-allocator-and-fewer-inserts.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    quiet_on_closed_pipe();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Server(e)) => {
            eprintln!("error: {e}");
            for (k, v) in &e.metadata {
                eprintln!("  {k}: {v}");
            }
            ExitCode::FAILURE
        }
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Err(Failure::Silent) => ExitCode::FAILURE,
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Node(args) => run_node(args).await.map_err(Failure::Other),
        Command::Cert(args) => cert::run(args).map_err(Failure::Other),
        Command::Audit { action: AuditAction::Log { since, principal, table, limit }, conn } => {
            let since_ms = match since.as_deref() {
                None => 0,
                Some(s) => parse_since(s).map_err(Failure::Usage)?,
            };
            let client = connect(&conn).await?;
            let log = client.audit_log(since_ms, principal.as_deref(), table.as_deref(), limit).await?;
            if conn.json {
                for r in &log.records {
                    println!(
                        "{}",
                        json!({"time_ms": r.time_ms, "principal": r.principal, "operation": r.operation,
                            "table": r.table, "key_hash": r.key_hash, "entry_region": r.entry_region,
                            "serving_region": r.serving_region, "allowed": r.allowed, "reason": r.reason,
                            "node": r.node})
                    );
                }
            } else {
                println!("audit log of region {} ({} records)", log.region, log.records.len());
                println!(
                    "{:<13}  {:<12}  {:<22}  {:<10}  {:<32}  {:<14}  {:<7}",
                    "time_ms", "principal", "operation", "table", "key_hash", "entry", "allowed"
                );
                for r in &log.records {
                    println!(
                        "{:<13}  {:<12}  {:<22}  {:<10}  {:<32}  {:<14}  {}",
                        r.time_ms,
                        r.principal,
                        r.operation,
                        r.table,
                        r.key_hash,
                        r.entry_region,
                        if r.allowed { "yes".to_string() } else { format!("NO ({})", r.reason) }
                    );
                }
            }
            Ok(())
        }
        Command::Put { row, value, value_file, ttl, write, conn } => {
            let value = read_value(value, value_file.as_deref())?;
            let client = connect(&conn).await?;
            let mut opts = write.options()?;
            opts.ttl = ttl;
            let ack = client.put(&row.row(), value, opts).await?;
            if conn.json {
                println!("{}", ack_json(&ack));
            } else {
                println!("OK (home {}, hlc {})", ack.home_region, ack.hlc);
            }
            Ok(())
        }
        Command::Get { row, read, raw, conn } => {
            let client = connect(&conn).await?;
            let got = client.get(&row.row(), read.level()?).await?;
            if raw {
                use std::io::Write;
                match got.siblings.as_slice() {
                    [] => return Err(Failure::Usage("(not found)".into())),
                    [one] => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&one.value)
                            .and_then(|()| out.flush())
                            .map_err(|e| Failure::Other(anyhow::anyhow!("writing the value: {e}")))?;
                    }
                    many => {
                        return Err(Failure::Usage(format!(
                            "{} siblings (concurrent writes): --raw writes one value; read them with --json",
                            many.len()
                        )))
                    }
                }
            } else if conn.json {
                let siblings: Vec<_> = got
                    .siblings
                    .iter()
                    .map(|s| json!({"value": text(&s.value), "hlc": s.hlc, "origin": s.origin}))
                    .collect();
                println!(
                    "{}",
                    json!({
                        "found": got.found,
                        "siblings": siblings,
                        "context": got.context.to_base64(),
                        "served_by_region": got.info.served_by_region,
                        "staleness_ms_max": got.info.staleness_ms_max,
                    })
                );
            } else if !got.found {
                println!("(not found)");
            } else if got.siblings.len() == 1 {
                println!("{}", text(&got.siblings[0].value));
            } else {
                println!(
                    "{} siblings (concurrent writes; write with --context to resolve):",
                    got.siblings.len()
                );
                for s in &got.siblings {
                    println!("  {}    (from {}, hlc {})", text(&s.value), s.origin, s.hlc);
                }
                println!("context: {}", got.context.to_base64());
            }
            Ok(())
        }
        Command::Del { row, write, conn } => {
            let client = connect(&conn).await?;
            let ack = client.delete(&row.row(), write.options()?).await?;
            if conn.json {
                println!("{}", ack_json(&ack));
            } else {
                println!("OK");
            }
            Ok(())
        }
        Command::Scan { prefix, table, limit, start_after, conn } => {
            let client = connect(&conn).await?;
            let page = client.scan(&table, prefix.as_bytes(), start_after.as_bytes(), limit).await?;
            if conn.json {
                let rows: Vec<_> = page
                    .rows
                    .iter()
                    .map(|r| {
                        json!({
                            "key": text(&r.key),
                            "kind": r.kind,
                            "home_region": r.home_region,
                            "values": r.siblings.iter().map(|s| text(&s.value)).collect::<Vec<_>>(),
                            "counter": r.counter_value,
                            "members": r.set_members.iter().map(|m| text(m)).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                let next = page.next_start_after.as_deref().map(text);
                println!("{}", json!({"rows": rows, "next_start_after": next}));
            } else {
                for r in &page.rows {
                    let shown = match r.kind.as_str() {
                        "counter" => r.counter_value.to_string(),
                        "set" => format!(
                            "{{{}}}",
                            r.set_members.iter().map(|m| text(m)).collect::<Vec<_>>().join(", ")
                        ),
                        _ => r.siblings.iter().map(|s| text(&s.value)).collect::<Vec<_>>().join(" | "),
                    };
                    println!("{}\t{}", text(&r.key), shown);
                }
                if let Some(next) = page.next_start_after {
                    eprintln!("(more: --start-after {})", text(&next));
                }
            }
            Ok(())
        }
        Command::Incr { row, delta, write, conn } => {
            let client = connect(&conn).await?;
            let (value, ack) = client.counter_add(&row.row(), delta, write.options()?).await?;
            if conn.json {
                println!("{}", json!({"value": value, "ack": ack_json(&ack)}));
            } else {
                println!("{value}");
            }
            Ok(())
        }
        Command::Count { row, read, conn } => {
            let client = connect(&conn).await?;
            let value = client.counter_get(&row.row(), read.level()?).await?;
            if conn.json {
                println!("{}", json!({"found": value.is_some(), "value": value.unwrap_or(0)}));
            } else {
                println!("{}", value.map(|v| v.to_string()).unwrap_or_else(|| "(not found)".into()));
            }
            Ok(())
        }
        Command::Sadd { row, members, write, conn } => {
            let client = connect(&conn).await?;
            let members = members.into_iter().map(String::into_bytes).collect();
            let (now, ack) = client.set_add(&row.row(), members, write.options()?).await?;
            print_members(&now, conn.json, Some(&ack));
            Ok(())
        }
        Command::Srem { row, members, write, conn } => {
            let client = connect(&conn).await?;
            let members = members.into_iter().map(String::into_bytes).collect();
            let (now, ack) = client.set_remove(&row.row(), members, write.options()?).await?;
            print_members(&now, conn.json, Some(&ack));
            Ok(())
        }
        Command::Smembers { row, read, conn } => {
            let client = connect(&conn).await?;
            let set = client.set_members(&row.row(), read.level()?).await?;
            if conn.json {
                let members: Vec<_> = set.members.iter().map(|m| text(m)).collect();
                println!(
                    "{}",
                    json!({"found": set.found, "members": members, "context": set.context.to_base64()})
                );
            } else {
                print_members(&set.members, false, None);
            }
            Ok(())
        }
        Command::Cas { row, value, expect, expect_absent, delete, conn } => {
            if expect.is_none() && !expect_absent {
                return Err(Failure::Usage("give --expect VALUE or --expect-absent".into()));
            }
            if value.is_none() && !delete {
                return Err(Failure::Usage("give a VALUE or --delete".into()));
            }
            let client = connect(&conn).await?;
            let r = client
                .compare_and_set(
                    &row.row(),
                    expect.map(String::into_bytes),
                    value.map(String::into_bytes),
                    None,
                )
                .await?;
            if conn.json {
                println!(
                    "{}",
                    json!({"succeeded": r.succeeded, "version": r.ack.version,
                        "current": r.current.as_ref().map(|(v, ver)| json!({"value": text(v), "version": ver}))})
                );
            } else if r.succeeded {
                println!("OK (version {})", r.ack.version);
            } else {
                match &r.current {
                    Some((v, ver)) => println!("NOT SET: current value {} (version {ver})", text(v)),
                    None => println!("NOT SET: the row does not exist"),
                }
            }
            if !r.succeeded {
                return Err(Failure::Silent);
            }
            Ok(())
        }
        Command::Dev(args) => dev::run(args).await.map_err(Failure::Other),
        Command::Region { action: RegionAction::Partitions, conn } => {
            let entry = connect(&conn).await?;
            let map = entry.partition_map().await?;
            cluster::print_partitions(&map, conn.region.as_deref(), conn.json);
            Ok(())
        }
        Command::Locate { row, conn } => {
            let entry = connect(&conn).await?;
            let at = entry.locate(&row.row()).await?;
            cluster::print_location(&at, conn.json);
            Ok(())
        }
        Command::Region { action, conn } => {
            let entry = connect(&conn).await?;
            match action {
                RegionAction::Failover { from, to } => {
                    control::print_handover(&entry.failover(&from, &to).await?, conn.json);
                    return Ok(());
                }
                RegionAction::Failback { region } => {
                    control::print_handover(&entry.failback(&region).await?, conn.json);
                    return Ok(());
                }
                RegionAction::AutoFailover { state } => {
                    let r = entry.set_auto_failover(state == "on").await?;
                    if conn.json {
                        println!("{}", json!({"manual_only": r.manual_only}));
                    } else {
                        println!(
                            "automatic failover {}",
                            if r.manual_only { "off (manual only)" } else { "on" }
                        );
                    }
                    return Ok(());
                }
                RegionAction::Conflicts => {
                    control::print_conflicts(&entry.failover_conflicts().await?, conn.json);
                    return Ok(());
                }
                RegionAction::List | RegionAction::Status | RegionAction::Partitions => {}
            }
            let regions = cluster::connect_all(&entry, &client_config(&conn)).await?;
            cluster::print_regions(&regions.view, conn.json);
            if matches!(action, RegionAction::Status) {
                let (links, errors) = cluster::replication_links(&regions).await;
                if !conn.json {
                    println!();
                }
                cluster::print_links(&links, &errors, conn.json);
                if !conn.json {
                    println!();
                }
                control::print_status(&entry.region_status().await?, conn.json);
            }
            Ok(())
        }
        Command::Replication { action, conn } => {
            let entry = connect(&conn).await?;
            match action {
                ReplicationAction::Status => {
                    let regions = cluster::connect_all(&entry, &client_config(&conn)).await?;
                    let (links, errors) = cluster::replication_links(&regions).await;
                    cluster::print_links(&links, &errors, conn.json);
                }
                ReplicationAction::Pause { ref to, ref from }
                | ReplicationAction::Resume { ref to, ref from } => {
                    let paused = matches!(action, ReplicationAction::Pause { .. });
                    let source = match from {
                        Some(region) => {
                            let regions = cluster::connect_all(&entry, &client_config(&conn)).await?;
                            match regions.clients.into_iter().find(|(n, _)| n == region) {
                                Some((_, c)) => c?,
                                None => return Err(Failure::Usage(format!("unknown region `{region}`"))),
                            }
                        }
                        None => entry,
                    };
                    let out = source.control_replication(to, paused).await?;
                    let link = out.link.unwrap_or_default();
                    if conn.json {
                        println!(
                            "{}",
                            json!({"source": link.source, "destination": link.destination, "paused": link.paused})
                        );
                    } else {
                        println!(
                            "{} -> {}: {}",
                            link.source,
                            link.destination,
                            if link.paused { "paused" } else { "resumed" }
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Watch { prefix, table, from, count, conn } => {
            watch(&conn, &table, prefix.as_bytes(), from.as_deref(), count).await
        }
        Command::Subject { action: SubjectAction::Erase { id, wait_s }, conn } => {
            subject_erase(&conn, id.as_bytes(), Duration::from_secs(wait_s)).await
        }
        Command::Subject { action: SubjectAction::Export { id }, conn } => {
            subject_export(&conn, id.as_bytes()).await
        }
        Command::Compact { conn } => {
            let entry = connect(&conn).await?;
            let regions = cluster::connect_all(&entry, &client_config(&conn)).await?;
            let mut done = Vec::new();
            let mut failed = Vec::new();
            for (name, client) in &regions.clients {
                match client {
                    Ok(c) => match c.compact().await {
                        Ok(r) => done.push(r),
                        Err(e) => failed.push(format!("{name}: {e}")),
                    },
                    Err(e) => failed.push(format!("{name}: {e}")),
                }
            }
            if conn.json {
                let rows: Vec<_> = done
                    .iter()
                    .map(|r| json!({"region": r.region, "nodes": r.nodes, "expired_stripped": r.expired_stripped}))
                    .collect();
                println!("{}", json!({"compacted": rows, "failed": failed}));
            } else {
                for r in &done {
                    println!(
                        "{}: {} nodes compacted, {} expired values removed",
                        r.region, r.nodes, r.expired_stripped
                    );
                }
                for f in &failed {
                    println!("FAILED {f}");
                }
            }
            if failed.is_empty() {
                Ok(())
            } else {
                Err(Failure::Other(anyhow::anyhow!("{} regions were not compacted", failed.len())))
            }
        }
        Command::Backup { action, conn } => backup::run(action, &conn).await,
        Command::Residency { action: ResidencyAction::Audit, conn } => {
            let entry = connect(&conn).await?;
            let regions = cluster::connect_all(&entry, &client_config(&conn)).await?;
            let mut total_rows = 0u64;
            let mut violations = Vec::new();
            let mut unreachable = Vec::new();
            for (name, client) in &regions.clients {
                match client {
                    Ok(c) => match c.residency_audit().await {
                        Ok(a) => {
                            total_rows += a.rows_checked;
                            violations.extend(a.violations);
                        }
                        Err(e) => unreachable.push(format!("{name}: {e}")),
                    },
                    Err(e) => unreachable.push(format!("{name}: {e}")),
                }
            }
            if conn.json {
                let rows: Vec<_> = violations
                    .iter()
                    .map(|v| {
                        json!({"table": v.table, "key": text(&v.key), "zone": v.zone,
                        "allowed_regions": v.allowed_regions, "stored_in_region": v.stored_in_region})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"rows_checked": total_rows, "violations": rows, "unreachable": unreachable})
                );
            } else {
                println!(
                    "checked {} rows in {} regions",
                    total_rows,
                    regions.clients.len() - unreachable.len()
                );
                for v in &violations {
                    println!(
                        "VIOLATION {}/{} (zone {}, allowed {}) stored in {}",
                        v.table,
                        text(&v.key),
                        v.zone,
                        v.allowed_regions.join(","),
                        v.stored_in_region
                    );
                }
                for u in &unreachable {
                    println!("unreachable: {u}");
                }
                if violations.is_empty() && unreachable.is_empty() {
                    println!("no row is stored outside its residency zone");
                }
            }
            if !violations.is_empty() || !unreachable.is_empty() {
                return Err(Failure::Other(anyhow::anyhow!(
                    "residency audit: {} violations, {} regions unreachable",
                    violations.len(),
                    unreachable.len()
                )));
            }
            Ok(())
        }
        Command::Digest { conn } => {
            let entry = connect(&conn).await?;
            let regions = cluster::connect_all(&entry, &client_config(&conn)).await?;
            let mut by_zone: DigestsByZone = Default::default();
            let mut unreachable = Vec::new();
            for (name, client) in &regions.clients {
                match client {
                    Ok(c) => match c.digest().await {
                        Ok(d) => {
                            for z in d.digests {
                                by_zone.entry((z.table, z.zone)).or_default().push((
                                    name.clone(),
                                    z.rows,
                                    z.digest,
                                ));
                            }
                        }
                        Err(e) => unreachable.push(format!("{name}: {e}")),
                    },
                    Err(e) => unreachable.push(format!("{name}: {e}")),
                }
            }
            // Every region allowed to hold a zone's rows must report the same digest.
            let zone_regions = |zone: &str| -> Vec<String> {
                if zone.is_empty() {
                    regions.view.regions.iter().map(|r| r.name.clone()).collect()
                } else {
                    regions.view.regions.iter().filter(|r| r.zone == zone).map(|r| r.name.clone()).collect()
                }
            };
            let mut mismatches = 0;
            let mut report = Vec::new();
            for ((table, zone), seen) in &by_zone {
                let expected = zone_regions(zone);
                let digests: std::collections::BTreeSet<&String> = seen.iter().map(|(_, _, d)| d).collect();
                let missing: Vec<&String> =
                    expected.iter().filter(|r| !seen.iter().any(|(n, _, _)| n == *r)).collect();
                let converged = digests.len() == 1 && missing.is_empty();
                if !converged {
                    mismatches += 1;
                }
                report.push(json!({"table": table, "zone": zone, "converged": converged,
                    "regions": seen.iter().map(|(n, rows, d)| json!({"region": n, "rows": rows, "digest": d})).collect::<Vec<_>>(),
                    "missing_regions": missing}));
                if !conn.json {
                    let zone_name = if zone.is_empty() { "-" } else { zone.as_str() };
                    println!(
                        "{table} (zone {zone_name}): {}",
                        if converged { "converged" } else { "DIFFERS" }
                    );
                    for (n, rows, d) in seen {
                        println!("  {n:<16} {rows:>8} rows  {}", &d[..16.min(d.len())]);
                    }
                    for m in &missing {
                        println!("  {m:<16}  (no rows)");
                    }
                }
            }
            if conn.json {
                println!(
                    "{}",
                    json!({"zones": report, "converged": mismatches == 0 && unreachable.is_empty(), "unreachable": unreachable})
                );
            } else {
                for u in &unreachable {
                    println!("unreachable: {u}");
                }
            }
            if mismatches > 0 || !unreachable.is_empty() {
                return Err(Failure::Other(anyhow::anyhow!("{mismatches} (table, zone) digests differ")));
            }
            Ok(())
        }
        Command::Status { conn } => {
            let client = connect(&conn).await?;
            let s = client.node_status().await?;
            if conn.json {
                let tables: Vec<_> = s
                    .tables
                    .iter()
                    .map(|t| json!({"name": t.name, "locality": t.locality, "default_consistency": t.default_consistency,
                        "conflict_policy": t.conflict_policy, "home_region": t.home_region, "zone": t.zone, "conflicts": t.conflicts}))
                    .collect();
                println!(
                    "{}",
                    json!({"node_id": s.node_id, "region": s.region, "version": s.version, "uptime_ms": s.uptime_ms,
                        "data_dir": s.data_dir, "regions": s.regions, "tables": tables, "log_seq": s.log_seq,
                        "durable_writes": s.durable_writes, "storage_engine": s.storage_engine,
                        "tombstones": s.tombstones, "tombstone_sweeps": s.tombstone_sweeps,
                        "tombstones_collected": s.tombstones_collected, "log_entries_trimmed": s.log_entries_trimmed})
                );
            } else {
                println!("node      {}/{} (geokv {})", s.region, s.node_id, s.version);
                println!("uptime    {:.1}s", s.uptime_ms as f64 / 1000.0);
                println!(
                    "storage   {} in {} (durable writes: {})",
                    s.storage_engine, s.data_dir, s.durable_writes
                );
                println!("regions   {}", s.regions.join(", "));
                println!(
                    "log seq   {} ({} entries trimmed: every destination had them)",
                    s.log_seq, s.log_entries_trimmed
                );
                println!(
                    "deleted   {} tombstones (last sweep, {} sweeps), {} collected",
                    s.tombstones, s.tombstone_sweeps, s.tombstones_collected
                );
                for t in &s.tables {
                    println!(
                        "table     {}: {}, default level {}, conflict policy {}, conflicts {}{}",
                        t.name,
                        t.locality,
                        t.default_consistency,
                        t.conflict_policy,
                        t.conflicts,
                        if t.zone.is_empty() { String::new() } else { format!(", zone {}", t.zone) }
                    );
                }
            }
            Ok(())
        }
    }
}

/// Per (table, zone), each region's (name, rows, digest).
type DigestsByZone = std::collections::BTreeMap<(String, String), Vec<(String, u64, String)>>;

fn print_members(members: &[Vec<u8>], as_json: bool, ack: Option<&geokv_client::WriteAck>) {
    let shown: Vec<String> = members.iter().map(|m| text(m)).collect();
    if as_json {
        println!("{}", json!({"members": shown, "ack": ack.map(ack_json)}));
    } else if shown.is_empty() {
        println!("(empty)");
    } else {
        for m in shown {
            println!("{m}");
        }
    }
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    // openraft logs every failed message to an unreachable peer; those
    // are errors only when RUST_LOG asks for openraft by name.
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let spec = if spec.contains("openraft") { spec } else { format!("{spec},openraft=off") };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&spec)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=off")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut cfg = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            geokv_server::config::Config::from_toml(&text)
                .with_context(|| format!("in {}", path.display()))?
        }
        None => geokv_server::config::Config::default(),
    };
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(l) = args.admin_listen {
        cfg.admin_listen = l;
    }
    if let Some(l) = args.listen_peer {
        cfg.listen_peer = l;
    }
    if let Some(d) = args.certs_dir {
        cfg.security.certs_dir = Some(d);
    }
    if args.insecure {
        cfg.security.insecure = true;
    }
    if let Some(r) = args.region {
        cfg.region = r;
    }
    if let Some(n) = args.node_id {
        cfg.node_id = n;
    }
    if args.no_sync {
        cfg.storage.sync = false;
    }
    let cfg = cfg.finish().context("invalid configuration")?;
    eprintln!(
        "geokv node {}/{}: gRPC {} | peer {} | admin http://{}/metrics | data {} | {}",
        cfg.region,
        cfg.node_id,
        cfg.listen,
        cfg.listen_peer,
        cfg.admin_listen,
        cfg.data_dir.display(),
        match (&cfg.security.certs_dir, cfg.security.insecure) {
            (_, true) => "INSECURE".to_string(),
            (Some(d), false) => format!("TLS, certs {}", d.display()),
            (None, false) => "plaintext (loopback only, no certificates)".to_string(),
        }
    );
    geokv_server::server::run(cfg, geokv_server::server::shutdown_signal()).await
}

/// `--since`: a duration ago (`90s`, `10m`, `2h`, `1d`) or Unix milliseconds.
fn parse_since(s: &str) -> Result<u64, String> {
    let bad = || format!("--since `{s}`: give a duration ago (30s, 10m, 2h, 1d) or Unix milliseconds");
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(bad()),
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Ok(now_ms.saturating_sub(secs.saturating_mul(1000)))
}

/// Most bytes a value read from standard input or a file may have; the
/// node's own limit (`limits.value_bytes_max`, 1 MiB by default, at most
/// 64 MiB) refuses what is above it with `VALUE_TOO_LARGE`.
const VALUE_READ_BYTES_MAX: u64 = 64 << 20;

/// The value of `geokv put`: the argument, standard input for `-`, or a file.
fn read_value(arg: Option<String>, file: Option<&std::path::Path>) -> Result<Vec<u8>, Failure> {
    use std::io::Read;
    let read_bounded = |r: &mut dyn Read, what: &str| -> Result<Vec<u8>, Failure> {
        let mut buf = Vec::new();
        r.take(VALUE_READ_BYTES_MAX + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Failure::Other(anyhow::anyhow!("reading the value from {what}: {e}")))?;
        if buf.len() as u64 > VALUE_READ_BYTES_MAX {
            return Err(Failure::Usage(format!(
                "VALUE_TOO_LARGE: the value from {what} is over {VALUE_READ_BYTES_MAX} bytes"
            )));
        }
        Ok(buf)
    };
    match (arg, file) {
        (_, Some(path)) => {
            let mut f = std::fs::File::open(path)
                .map_err(|e| Failure::Usage(format!("--value-file {}: {e}", path.display())))?;
            read_bounded(&mut f, &path.display().to_string())
        }
        (Some(v), None) if v == "-" => read_bounded(&mut std::io::stdin().lock(), "standard input"),
        (Some(v), None) => Ok(v.into_bytes()),
        (None, None) => Err(Failure::Usage("give a value, `-` for standard input, or --value-file".into())),
    }
}

/// A closed standard output (`geokv region status | head -1`) ends the
/// command quietly with status 0, as the reader wanted no more, instead of
/// a panic from `println!`.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}
