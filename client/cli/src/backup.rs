//! `geokv backup create|verify|restore` (docs/decisions/029-zone-strict-backups.md).
//!
//! `--to DEST` / `--from DEST` name a folder on the machine running the
//! command that holds the backup's manifest (`manifest.json`: identities,
//! positions, epochs, file list and checksums, never row data). The
//! folder's last name is the backup id: every node writes its rows under
//! `<id>/<region>/<node>/` inside the destination its `[backup]` section
//! names for each row's zone, and nowhere else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use geokv_server::backup::{self, Manifest, NodePart, MANIFEST_FILE};
use geokv_server::error::KvError;
use serde_json::json;

use super::{client_config, cluster, connect, ConnArgs, Failure};

#[derive(Subcommand)]
pub enum BackupAction {
    /// Back up every node of every region, each zone's rows only into
    /// that zone's destination; fails (BACKUP_DESTINATION_MISSING) rather
    /// than write them anywhere else.
    Create {
        /// Folder for the manifest; its last name (a-z, 0-9, '_', '-') is
        /// the backup id.
        #[arg(long)]
        to: PathBuf,
        /// Deadline of each region's part, in seconds.
        #[arg(long, default_value_t = 1800)]
        deadline_s: u64,
    },
    /// Re-read every file of a backup: checksums, sizes, row counts, and
    /// that every row is of its file's zone.
    Verify {
        /// The folder `backup create --to` wrote.
        #[arg(long)]
        from: PathBuf,
        /// Read ZONE's files under DIR instead of the folder recorded at
        /// backup time (`=DIR` for unrestricted rows); repeatable.
        #[arg(long = "zone-dir", value_name = "ZONE=DIR")]
        zone_dirs: Vec<String>,
    },
    /// Restore a backup into a fresh cluster with the same policy: every
    /// node is checked first, then loaded; every home's epoch moves above
    /// the backup's.
    Restore {
        /// The folder `backup create --to` wrote.
        #[arg(long)]
        from: PathBuf,
        /// Deadline of each region's part of each phase, in seconds.
        #[arg(long, default_value_t = 1800)]
        deadline_s: u64,
    },
}

/// A failure of the backup library, printed with its reason.
fn kv(e: KvError) -> Failure {
    Failure::Other(anyhow::anyhow!("{}: {e}", e.reason()))
}

fn read_manifest(dir: &Path) -> Result<(String, Manifest), Failure> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    let manifest = Manifest::parse(&text).map_err(kv)?;
    Ok((text, manifest))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn run(action: BackupAction, conn: &ConnArgs) -> Result<(), Failure> {
    match action {
        BackupAction::Create { to, deadline_s } => create(&to, Duration::from_secs(deadline_s), conn).await,
        BackupAction::Verify { from, zone_dirs } => verify(&from, &zone_dirs, conn.json),
        BackupAction::Restore { from, deadline_s } => {
            restore(&from, Duration::from_secs(deadline_s), conn).await
        }
    }
}

async fn create(to: &Path, deadline: Duration, conn: &ConnArgs) -> Result<(), Failure> {
    let id = to.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    if !backup::valid_backup_id(&id) {
        return Err(Failure::Usage(format!(
            "the last name of --to is the backup id (`{id}`): use 1-64 of a-z, 0-9, '_' and '-'"
        )));
    }
    let manifest_path = to.join(MANIFEST_FILE);
    if manifest_path.exists() {
        return Err(Failure::Usage(format!(
            "{} already exists: a backup id is used once",
            manifest_path.display()
        )));
    }
    std::fs::create_dir_all(to)
        .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", to.display())))?;
    let entry = connect(conn).await?;
    let regions = cluster::connect_all(&entry, &client_config(conn)).await?;
    let expected_nodes: usize = regions.view.regions.iter().map(|r| r.client_addrs.len().max(1)).sum();
    // Every region at once, so the nodes' cuts lie close together.
    let mut calls = Vec::new();
    let mut failed: Vec<(String, geokv_client::Error)> = Vec::new();
    for (name, client) in regions.clients {
        match client {
            Ok(c) => {
                let id = id.clone();
                calls.push((name, tokio::spawn(async move { c.backup_create(&id, deadline).await })));
            }
            Err(e) => failed.push((name, e)),
        }
    }
    let mut parts: Vec<NodePart> = Vec::new();
    for (name, call) in calls {
        match call.await {
            Ok(Ok(resp)) => {
                for text in resp.node_parts {
                    let part: NodePart = serde_json::from_str(&text).map_err(|e| {
                        Failure::Other(anyhow::anyhow!(
                            "region {name} answered a part that does not decode: {e}"
                        ))
                    })?;
                    parts.push(part);
                }
            }
            Ok(Err(e)) => failed.push((name, e)),
            Err(e) => return Err(Failure::Other(anyhow::anyhow!("region {name}: {e}"))),
        }
    }
    if let Some((_, first)) = failed.first() {
        for (name, e) in &failed {
            eprintln!("FAILED {name}: {e}");
        }
        eprintln!("no manifest was written: backup `{id}` is incomplete and cannot be restored");
        return Err(Failure::Server(first.clone()));
    }
    if parts.len() != expected_nodes {
        return Err(Failure::Other(anyhow::anyhow!(
            "{} of the cluster's {expected_nodes} nodes answered; no manifest was written",
            parts.len()
        )));
    }
    let manifest = Manifest::assemble(&id, now_ms(), parts).map_err(kv)?;
    let tmp = to.join(format!("{MANIFEST_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(manifest.to_json().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &manifest_path)?;
        std::fs::File::open(to)?.sync_all()
    };
    write().map_err(|e| Failure::Other(anyhow::anyhow!("writing {}: {e}", manifest_path.display())))?;
    print_parts(&manifest, conn.json);
    Ok(())
}

fn print_parts(m: &Manifest, as_json: bool) {
    let nodes: Vec<_> = m
        .nodes
        .iter()
        .map(|n| {
            let mut zones: BTreeMap<&str, (u64, u64, usize)> = BTreeMap::new();
            for f in &n.files {
                let z = zones.entry(f.zone.as_str()).or_default();
                z.0 += f.rows;
                z.1 += f.bytes;
                z.2 += 1;
            }
            (n, zones)
        })
        .collect();
    if as_json {
        let list: Vec<_> = nodes
            .iter()
            .map(|(n, zones)| {
                let zones: Vec<_> = zones
                    .iter()
                    .map(|(z, (rows, bytes, files))| json!({"zone": z, "rows": rows, "bytes": bytes, "files": files}))
                    .collect();
                json!({"region": n.region, "node_id": n.node_id, "store": n.store_uuid, "log_head": n.log_head,
                       "cut_hlc": n.cut_hlc, "zones": zones})
            })
            .collect();
        println!(
            "{}",
            json!({"backup_id": m.backup_id, "policy_fingerprint": m.policy_fingerprint, "nodes": list,
                   "rows_by_zone": m.rows_by_zone(), "checksum": m.checksum})
        );
        return;
    }
    println!("backup {} (policy {}, manifest checksum {})", m.backup_id, m.policy_fingerprint, m.checksum);
    for (n, zones) in nodes {
        for (z, (rows, bytes, files)) in zones {
            let zone = if z.is_empty() { "(unrestricted)" } else { z };
            println!("  {}/{} zone {zone}: {rows} rows, {bytes} bytes in {files} files", n.region, n.node_id);
        }
    }
}

fn verify(from: &Path, overrides: &[String], as_json: bool) -> Result<(), Failure> {
    let mut dirs: BTreeMap<String, PathBuf> = BTreeMap::new();
    for o in overrides {
        let Some((zone, dir)) = o.split_once('=') else {
            return Err(Failure::Usage(format!("--zone-dir `{o}`: use ZONE=DIR")));
        };
        dirs.insert(zone.to_string(), PathBuf::from(dir));
    }
    let (_, manifest) = read_manifest(from)?;
    let report = backup::verify(&manifest, |part, zone| {
        dirs.get(zone).cloned().or_else(|| part.zone_dirs.get(zone).map(PathBuf::from))
    })
    .map_err(kv)?;
    if as_json {
        let by: Vec<_> = report
            .rows_by_region_zone
            .iter()
            .map(|((region, zone), rows)| json!({"region": region, "zone": zone, "rows": rows}))
            .collect();
        println!(
            "{}",
            json!({"backup_id": manifest.backup_id, "ok": true, "files": report.files, "rows": report.rows,
                   "bytes": report.bytes, "rows_by_region_zone": by})
        );
    } else {
        println!(
            "backup {}: OK, {} files, {} rows, {} bytes; every checksum, count and zone matches",
            manifest.backup_id, report.files, report.rows, report.bytes
        );
    }
    Ok(())
}

async fn restore(from: &Path, deadline: Duration, conn: &ConnArgs) -> Result<(), Failure> {
    let (text, manifest) = read_manifest(from)?;
    let entry = connect(conn).await?;
    let regions = cluster::connect_all(&entry, &client_config(conn)).await?;
    let mut clients = Vec::new();
    for (name, client) in regions.clients {
        clients.push((name, client?));
    }
    // Every node checks its part and its store first; nothing is loaded
    // anywhere unless all of them can take it.
    let mut prepared = 0;
    for (_, c) in &clients {
        prepared += c.backup_restore(&text, true, deadline).await?.nodes.len();
    }
    if prepared != manifest.nodes.len() {
        return Err(Failure::Other(anyhow::anyhow!(
            "{prepared} nodes prepared, the backup has {}; nothing was loaded",
            manifest.nodes.len()
        )));
    }
    let mut rows: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut homes_raised = 0;
    for (_, c) in &clients {
        let resp = c.backup_restore(&text, false, deadline).await?;
        homes_raised = homes_raised.max(resp.homes_raised);
        for n in resp.nodes {
            for z in n.zones {
                *rows.entry((n.region.clone(), z.zone)).or_default() += z.rows;
            }
        }
    }
    if conn.json {
        let by: Vec<_> = rows
            .iter()
            .map(|((region, zone), rows)| json!({"region": region, "zone": zone, "rows": rows}))
            .collect();
        println!(
            "{}",
            json!({"backup_id": manifest.backup_id, "restored": by, "homes_raised": homes_raised,
                   "rows": rows.values().sum::<u64>()})
        );
    } else {
        println!("backup {} restored; {homes_raised} homes moved above its epochs", manifest.backup_id);
        for ((region, zone), n) in &rows {
            let zone = if zone.is_empty() { "(unrestricted)" } else { zone };
            println!("  {region} zone {zone}: {n} rows");
        }
    }
    Ok(())
}
