//! Zone-strict backup and restore (docs/decisions/029-zone-strict-backups.md,
//! docs/architecture.md sections 7 and 20).
//!
//! # Layout
//! - [`file`]: the backup file format (numbered pieces of one zone's rows,
//!   framed, with a trailer), its writer and its checking reader.
//! - this file: the manifest and a node's part of it, writing a node's
//!   backup from one storage snapshot, checking a backup, restoring a
//!   node's part, and the home epochs a restore must move above.
//!
//! A row of zone Z is written only into the folder `[backup]` names for
//! Z (zone "" for unrestricted rows). A node whose region may hold rows of
//! a zone with no folder, or whose folder cannot be written, fails its
//! backup with `BACKUP_DESTINATION_MISSING` before it writes anything, and
//! a row of a zone with no folder found during the scan fails it too (what
//! the node wrote for the backup is removed): nothing ever falls back to
//! another zone's folder. STRONG registers live in the consensus groups'
//! state machines (the `raft` column family) and are not in backups.

pub mod file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::consensus::control::{ControlState, PrunedEpochs, RestoredHome};
use crate::error::KvError;
use crate::kv::row::{display_key, split_data_key, Row};
use crate::kv::Node;
use crate::storage::Cf;
use file::{PieceWriter, ZoneFile};

/// Version of the manifest and file format.
pub const FORMAT: u32 = 1;

/// The manifest's file name inside the folder `geokv backup create --to` names.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Rows per merge of a restore (one committer job each).
const RESTORE_CHUNK_ROWS: usize = 256;
/// Bytes of rows per merge of a restore, whichever bound comes first.
const RESTORE_CHUNK_BYTES: usize = 4 << 20;

/// Whether `id` may name a backup (it becomes a folder name).
pub fn valid_backup_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// What a node had applied from one source store when its cut was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    /// The source node (`region/node`).
    pub source: String,
    /// The source's store incarnation tag ("" for positions from before identities).
    pub store: String,
    pub applied_through: u64,
}

/// One ended epoch of a home, as the node knew it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochEnd {
    pub epoch: u64,
    pub holder: String,
    /// No write accepted under the epoch carries a later wall-clock time.
    pub ended_ms: u64,
}

/// A home's lease and epochs as one node knew them at its cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeEpochs {
    /// `region` or `region@zone` (`consensus::control::home_key`).
    pub home: String,
    pub holder: String,
    /// The current epoch.
    pub epoch: u64,
    /// Every ended epoch still kept in the history.
    pub ended: Vec<EpochEnd>,
    /// Epochs folded out of the history: every epoch up to this one ...
    pub pruned_through_epoch: u64,
    /// ... ended by this time at the latest.
    pub pruned_ended_ms_max: u64,
}

/// One node's part of a backup: who it is, where its cut lies, and its
/// files. Never row data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePart {
    pub region: String,
    pub node_id: String,
    /// The store's UUID and incarnation (docs/architecture.md section 16).
    pub store_uuid: String,
    pub store_incarnation: u64,
    /// The cluster policy fingerprint of the node (`topology::policy`).
    pub policy_fingerprint: String,
    /// The node's HLC just after its snapshot was taken: every row in the
    /// cut was written at an earlier stamp.
    pub cut_hlc: u64,
    /// Its physical part, in wall-clock milliseconds.
    pub cut_ms: u64,
    /// The node's replication log head at the cut.
    pub log_head: u64,
    /// What it had applied from every source at the cut.
    pub applied_from: Vec<SourcePosition>,
    /// Home leases and epochs the node knew at the cut.
    pub homes: Vec<HomeEpochs>,
    /// The destination folder of every zone at backup time, for `verify`.
    pub zone_dirs: BTreeMap<String, String>,
    /// The node's files, every zone's pieces in order.
    pub files: Vec<ZoneFile>,
}

impl NodePart {
    pub fn rows(&self) -> u64 {
        self.files.iter().map(|f| f.rows).sum()
    }
}

/// A whole backup: every node's part and a checksum over all of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub backup_id: String,
    /// When `geokv backup create` finished (wall-clock ms).
    pub created_ms: u64,
    pub policy_fingerprint: String,
    pub nodes: Vec<NodePart>,
    /// Hex SHA-256 of the manifest's JSON with this field empty.
    #[serde(default)]
    pub checksum: String,
}

impl Manifest {
    /// Builds the manifest from every node's part; refuses parts of
    /// different policies or another backup's files.
    pub fn assemble(backup_id: &str, created_ms: u64, mut nodes: Vec<NodePart>) -> Result<Self, KvError> {
        let Some(first) = nodes.first() else {
            return Err(KvError::BackupMismatch { why: "no node answered".into() });
        };
        let policy = first.policy_fingerprint.clone();
        if let Some(other) = nodes.iter().find(|n| n.policy_fingerprint != policy) {
            return Err(KvError::BackupMismatch {
                why: format!(
                    "nodes disagree on the cluster policy ({}/{} has {}, {}/{} has {})",
                    first.region,
                    first.node_id,
                    policy,
                    other.region,
                    other.node_id,
                    other.policy_fingerprint
                ),
            });
        }
        nodes.sort_by(|a, b| (&a.region, &a.node_id).cmp(&(&b.region, &b.node_id)));
        if nodes.windows(2).any(|w| (&w[0].region, &w[0].node_id) == (&w[1].region, &w[1].node_id)) {
            return Err(KvError::BackupMismatch { why: "a node answered twice".into() });
        }
        let mut m = Manifest {
            format: FORMAT,
            backup_id: backup_id.to_string(),
            created_ms,
            policy_fingerprint: policy,
            nodes,
            checksum: String::new(),
        };
        m.checksum = m.compute_checksum();
        Ok(m)
    }

    fn compute_checksum(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.checksum = String::new();
        let json = serde_json::to_vec(&unsealed).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses a manifest and checks its format and checksum.
    pub fn parse(text: &str) -> Result<Self, KvError> {
        let m: Manifest = serde_json::from_str(text)
            .map_err(|e| KvError::BackupMismatch { why: format!("the manifest does not decode: {e}") })?;
        if m.format != FORMAT {
            return Err(KvError::BackupMismatch {
                why: format!("manifest format {} (this build reads {FORMAT})", m.format),
            });
        }
        let want = m.compute_checksum();
        if m.checksum != want {
            return Err(KvError::BackupMismatch {
                why: format!("the manifest's checksum is {}, its content hashes to {want}", m.checksum),
            });
        }
        if !valid_backup_id(&m.backup_id) {
            return Err(KvError::BackupMismatch { why: format!("backup id `{}` is not valid", m.backup_id) });
        }
        for n in &m.nodes {
            for f in &n.files {
                file::check_relative(&f.path).map_err(|why| KvError::BackupMismatch {
                    why: format!("file path `{}`: {why}", f.path),
                })?;
            }
        }
        Ok(m)
    }

    /// Rows per zone over every node (a zone's rows counted once per
    /// region that holds them).
    pub fn rows_by_zone(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for n in &self.nodes {
            for f in &n.files {
                *out.entry(f.zone.clone()).or_default() += f.rows;
            }
        }
        out
    }
}

/// The zones whose rows a node of `region` may hold: "" and every zone
/// the region belongs to.
fn zones_of_region(cfg: &crate::config::Config) -> Vec<String> {
    let mut zones = vec![String::new()];
    zones.extend(cfg.zones.iter().filter(|z| z.regions.contains(&cfg.region)).map(|z| z.name.clone()));
    zones
}

/// The node's folder inside a zone's destination: `<id>/<region>/<node>`.
fn node_folder(backup_id: &str, region: &str, node_id: &str) -> PathBuf {
    Path::new(backup_id).join(region).join(node_id)
}

/// The home leases and epochs of `state`, for the manifest.
pub fn homes_of(state: &ControlState) -> Vec<HomeEpochs> {
    state
        .leases
        .values()
        .map(|l| {
            let history = state.history.get(&l.home).map(Vec::as_slice).unwrap_or_default();
            let pruned = state.pruned.get(&l.home).copied().unwrap_or_default();
            HomeEpochs {
                home: l.home.clone(),
                holder: l.holder.clone(),
                epoch: l.epoch,
                ended: history
                    .iter()
                    .filter_map(|r| {
                        r.ended_ms.map(|ended_ms| EpochEnd {
                            epoch: r.epoch,
                            holder: r.holder.clone(),
                            ended_ms,
                        })
                    })
                    .collect(),
                pruned_through_epoch: pruned.through_epoch,
                pruned_ended_ms_max: pruned.ended_ms_max,
            }
        })
        .collect()
}

/// Writes this node's backup `backup_id` from one snapshot of its store
/// and returns its part of the manifest (blocking: run it off the async
/// workers). `control` is the control-plane state the node knows.
pub fn create_node_part(
    node: &Node,
    control: Option<ControlState>,
    backup_id: &str,
) -> Result<NodePart, KvError> {
    if !valid_backup_id(backup_id) {
        return Err(KvError::InvalidField {
            field: "backup_id",
            why: "use 1-64 of a-z, 0-9, '_' and '-'".into(),
        });
    }
    let cfg = node.config();
    // The node's erasure ledger goes to every destination with the backup
    // (erasures made before the destinations were configured included).
    for entry in crate::lifecycle::ledger(node.engine().as_ref())? {
        crate::lifecycle::publish(cfg, &entry)?;
    }
    let actor = node.actor();
    let folder = node_folder(backup_id, &cfg.region, &cfg.node_id);
    // Every zone this region may hold needs its own destination before
    // anything is written: a missing one fails the backup here, with
    // nothing written anywhere.
    let mut dirs: BTreeMap<String, PathBuf> = BTreeMap::new();
    for zone in zones_of_region(cfg) {
        let Some(dir) = cfg.backup.dir_of(&zone) else {
            return Err(KvError::BackupDestinationMissing {
                zone,
                node: actor,
                why: "`[backup] destinations` names no folder for it".into(),
            });
        };
        dirs.insert(zone, dir.to_path_buf());
    }
    let mut created: Vec<PathBuf> = Vec::new();
    let result = write_part(node, control, &folder, &dirs, &mut created);
    if result.is_err() {
        // A failed backup leaves nothing of this node behind.
        for dir in &created {
            let _ = std::fs::remove_dir_all(dir);
            // Then the backup's region and id folders, if nothing else
            // (another node's part) is in them.
            let mut up = dir.parent();
            for _ in 0..2 {
                let Some(p) = up else { break };
                if std::fs::remove_dir(p).is_err() {
                    break;
                }
                up = p.parent();
            }
        }
    }
    result
}

fn write_part(
    node: &Node,
    control: Option<ControlState>,
    folder: &Path,
    dirs: &BTreeMap<String, PathBuf>,
    created: &mut Vec<PathBuf>,
) -> Result<NodePart, KvError> {
    let cfg = node.config();
    let actor = node.actor();
    let unwritable = |zone: &str, dir: &Path, e: &dyn std::fmt::Display| KvError::BackupDestinationMissing {
        zone: zone.to_string(),
        node: actor.clone(),
        why: format!("its destination {} cannot be written: {e}", dir.display()),
    };
    for (zone, dir) in dirs {
        if !dir.is_dir() {
            return Err(unwritable(zone, dir, &"the folder does not exist"));
        }
        let target = dir.join(folder);
        if target.exists() {
            return Err(KvError::InvalidField {
                field: "backup_id",
                why: format!("{} already exists: a backup id is used once", target.display()),
            });
        }
        std::fs::create_dir_all(&target).map_err(|e| unwritable(zone, dir, &e))?;
        created.push(target);
    }
    let mut writers: BTreeMap<String, PieceWriter> = BTreeMap::new();
    for (zone, dir) in dirs {
        writers.insert(zone.clone(), PieceWriter::new(zone, dir, folder, cfg.backup.piece_bytes_max));
    }
    let engine = node.engine().clone();
    let storage = |e: crate::storage::StorageError| KvError::Storage(e.to_string());
    let snapshot = engine.snapshot();
    // Taken after the snapshot: every row in it carries an earlier stamp.
    let cut = node.hlc().now();
    let log_head = match snapshot.last(Cf::ReplLog).map_err(storage)? {
        Some((k, _)) => <[u8; 8]>::try_from(k.as_slice()).map(u64::from_be_bytes).unwrap_or(0),
        None => 0,
    };
    let mut applied_from = Vec::new();
    snapshot
        .for_each(Cf::Meta, b"recv/", Some(b"recv0"), &mut |k, v| {
            if let Some((source, store)) = crate::kv::commit::parse_inbound_key(k) {
                let applied_through = <[u8; 8]>::try_from(v).map(u64::from_be_bytes).unwrap_or(0);
                applied_from.push(SourcePosition { source, store, applied_through });
            }
            Ok(true)
        })
        .map_err(storage)?;
    let mut failure: Option<KvError> = None;
    snapshot
        .for_each(Cf::Data, b"", None, &mut |k, v| {
            let step = (|| {
                let Some((table, key)) = split_data_key(k) else {
                    return Err(KvError::Corrupt {
                        what: format!("data key 0x{}", hex::encode(k)),
                        why: "no table".into(),
                    });
                };
                let row = Row::open(v, || display_key(table, key))?;
                let Some(writer) = writers.get_mut(&row.zone) else {
                    // A row of a zone this region does not serve (or no
                    // longer configured): still only its own zone's folder.
                    return Err(match cfg.backup.dir_of(&row.zone) {
                        None => KvError::BackupDestinationMissing {
                            zone: row.zone.clone(),
                            node: actor.clone(),
                            why: format!(
                                "`[backup] destinations` names no folder for it (row {})",
                                display_key(table, key)
                            ),
                        },
                        Some(_) => KvError::ResidencyViolation {
                            zone: row.zone.clone(),
                            allowed: cfg.zone_regions(&row.zone),
                            region: cfg.region.clone(),
                        },
                    });
                };
                writer.append(table, key, v).map_err(|e| unwritable(&row.zone, writer.dir(), &e))
            })();
            match step {
                Ok(()) => Ok(true),
                Err(e) => {
                    failure = Some(e);
                    Ok(false)
                }
            }
        })
        .map_err(storage)?;
    if let Some(e) = failure {
        return Err(e);
    }
    drop(snapshot);
    let mut files = Vec::new();
    for (zone, writer) in writers {
        let dir = writer.dir().to_path_buf();
        files.extend(writer.finish().map_err(|e| unwritable(&zone, &dir, &e))?);
    }
    let store = &node.store().identity;
    Ok(NodePart {
        region: cfg.region.clone(),
        node_id: cfg.node_id.clone(),
        store_uuid: store.uuid.clone(),
        store_incarnation: store.incarnation,
        policy_fingerprint: policy_fingerprint(cfg),
        cut_hlc: cut.0,
        cut_ms: cut.physical_ms(),
        log_head,
        applied_from,
        homes: control.as_ref().map(homes_of).unwrap_or_default(),
        zone_dirs: dirs.iter().map(|(z, d)| (z.clone(), d.display().to_string())).collect(),
        files,
    })
}

/// The cluster policy fingerprint of `cfg`.
pub fn policy_fingerprint(cfg: &crate::config::Config) -> String {
    crate::topology::policy::fingerprint(&crate::topology::policy::items(cfg))
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub files: u64,
    pub rows: u64,
    pub bytes: u64,
    /// (region, zone) -> rows.
    pub rows_by_region_zone: BTreeMap<(String, String), u64>,
}

/// Re-reads every file of `manifest`: SHA-256, size, framing, every row's
/// checksum and zone, and the row counts. `dir_of(part, zone)` says where
/// a zone's destination is. Fails at the first mismatch.
pub fn verify(
    manifest: &Manifest,
    dir_of: impl Fn(&NodePart, &str) -> Option<PathBuf>,
) -> Result<VerifyReport, KvError> {
    let mut report = VerifyReport::default();
    for part in &manifest.nodes {
        for f in &part.files {
            let Some(dir) = dir_of(part, &f.zone) else {
                return Err(KvError::BackupDestinationMissing {
                    zone: f.zone.clone(),
                    node: format!("{}/{}", part.region, part.node_id),
                    why: "no folder is known to read it from".into(),
                });
            };
            file::check(&dir.join(&f.path), f, &mut |_, _, _| Ok(()))?;
            report.files += 1;
            report.rows += f.rows;
            report.bytes += f.bytes;
            *report.rows_by_region_zone.entry((part.region.clone(), f.zone.clone())).or_default() += f.rows;
        }
    }
    Ok(report)
}

/// Rows restored on one node, per zone.
pub type RestoredZones = BTreeMap<String, u64>;

/// Meta key naming the backup a node was prepared for (`<id>`) or has
/// restored (`done:<id>`).
const RESTORE_MARK: &[u8] = b"backup/restore";

/// This node's part of `manifest`, after checking the policy fingerprint.
fn my_part<'m>(node: &Node, manifest: &'m Manifest) -> Result<&'m NodePart, KvError> {
    let cfg = node.config();
    let mine = policy_fingerprint(cfg);
    if manifest.policy_fingerprint != mine {
        return Err(KvError::BackupMismatch {
            why: format!(
                "the backup was taken under cluster policy {}, this cluster's is {mine} \
                 (regions, nodes, zones, tables, partitions and localities must be the same)",
                manifest.policy_fingerprint
            ),
        });
    }
    manifest.nodes.iter().find(|n| n.region == cfg.region && n.node_id == cfg.node_id).ok_or_else(|| {
        KvError::BackupMismatch { why: format!("the backup has no part for node {}", node.actor()) }
    })
}

/// Where this node reads each of its files: its own `[backup]` folder of
/// the file's zone (the restoring cluster's configuration, not the
/// manifest's, says where a zone's backups live).
fn my_paths(node: &Node, part: &NodePart) -> Result<Vec<(PathBuf, ZoneFile)>, KvError> {
    let mut paths = Vec::new();
    for f in &part.files {
        let Some(dir) = node.config().backup.dir_of(&f.zone) else {
            return Err(KvError::BackupDestinationMissing {
                zone: f.zone.clone(),
                node: node.actor(),
                why: "`[backup] destinations` names no folder to read it from".into(),
            });
        };
        paths.push((dir.join(&f.path), f.clone()));
    }
    Ok(paths)
}

fn storage_err(e: impl std::fmt::Display) -> KvError {
    KvError::Storage(e.to_string())
}

/// First phase of a restore, run on every node of the cluster before any
/// node loads a row: checks the policy, this node's part, every one of its
/// files whole (SHA-256, counts, zones), and that the store holds no row;
/// then marks the node as prepared for this backup. A restore loads
/// nothing anywhere unless every node prepared.
pub async fn prepare_restore(node: &Arc<Node>, manifest: &Manifest) -> Result<(), KvError> {
    let part = my_part(node, manifest)?;
    let paths = my_paths(node, part)?;
    let id = manifest.backup_id.as_bytes();
    let mark = node.engine().get(Cf::Meta, RESTORE_MARK).map_err(storage_err)?;
    if mark.as_deref().and_then(|m| m.strip_prefix(b"done:")) == Some(id) {
        return Err(KvError::RestoreNotEmpty {
            node: node.actor(),
            why: format!("backup `{}` was already restored here", manifest.backup_id),
        });
    }
    // A node prepared for this very backup may hold some of its rows (a
    // load that was cut off, or rows another region shipped): loading
    // them again merges idempotently, so the restore may be run again.
    let resuming = mark.as_deref() == Some(id);
    let engine = node.engine().clone();
    let first = tokio::task::spawn_blocking(move || engine.scan(Cf::Data, b"", None, 1))
        .await
        .map_err(storage_err)?
        .map_err(storage_err)?;
    if let Some((k, _)) = first.first().filter(|_| !resuming) {
        let what = split_data_key(k).map(|(t, key)| display_key(t, key)).unwrap_or_default();
        return Err(KvError::RestoreNotEmpty { node: node.actor(), why: format!("it stores row {what}") });
    }
    tokio::task::spawn_blocking(move || {
        for (path, f) in &paths {
            file::check(path, f, &mut |_, _, _| Ok(()))?;
        }
        Ok::<_, KvError>(())
    })
    .await
    .map_err(storage_err)??;
    // The erasure ledger of the destinations (erasures made before and
    // after the backup) fences before any row is loaded: the load merges
    // through the fences, so an erased subject's values stay out.
    let ledger = crate::lifecycle::published(node.config())?;
    let adopted = node.lifecycle().adopt(node.engine().as_ref(), &ledger)?;
    let fence = node.lifecycle().highest_fence();
    if fence > 0 {
        // Writes after the restore are stamped past every fence.
        let _ = node.hlc().observe(crate::causality::HlcTimestamp(fence));
    }
    if adopted > 0 {
        tracing::info!(subjects = adopted, "restore: erasure ledger re-applied");
    }
    let mut batch = crate::storage::WriteBatch::new();
    batch.put(Cf::Meta, RESTORE_MARK.to_vec(), manifest.backup_id.as_bytes().to_vec());
    node.engine().write(batch, true).map_err(storage_err)
}

/// Second phase: loads this node's part of `manifest`, prepared by
/// [`prepare_restore`]. Rows go through the committer's merge and into the
/// replication log, so they replicate like any write (a region whose cut
/// missed a write its home had gets it from the home's restored copy; rows
/// another region shipped here first merge idempotently).
pub async fn restore_node(node: &Arc<Node>, manifest: &Manifest) -> Result<RestoredZones, KvError> {
    let part = my_part(node, manifest)?;
    let paths = my_paths(node, part)?;
    let mark = node.engine().get(Cf::Meta, RESTORE_MARK).map_err(storage_err)?;
    let id = manifest.backup_id.as_bytes();
    match mark.as_deref() {
        Some(m) if m == id => {}
        Some(m) if m.strip_prefix(b"done:") == Some(id) => {
            return Err(KvError::RestoreNotEmpty {
                node: node.actor(),
                why: format!("backup `{}` was already restored here", manifest.backup_id),
            });
        }
        _ => {
            return Err(KvError::RestoreNotEmpty {
                node: node.actor(),
                why: format!(
                    "it was not prepared for backup `{}` (the restore checks every node first)",
                    manifest.backup_id
                ),
            });
        }
    }
    let mut restored = RestoredZones::new();
    for (path, f) in paths {
        let rows = load_file(node, path, f.clone()).await?;
        *restored.entry(f.zone.clone()).or_default() += rows;
    }
    after_load(node, manifest, part).await?;
    let mut batch = crate::storage::WriteBatch::new();
    batch.put(Cf::Meta, RESTORE_MARK.to_vec(), [&b"done:"[..], id].concat());
    node.engine().write(batch, true).map_err(storage_err)?;
    Ok(restored)
}

/// Steps run on every restored node once its rows are loaded, before the
/// restore reports success: the place for more restore-time steps (such as
/// re-applying an erasure ledger) that must see the loaded rows.
async fn after_load(node: &Arc<Node>, _manifest: &Manifest, _part: &NodePart) -> Result<(), KvError> {
    // Every merge queued above is committed (and so durable) before the
    // node reports its part restored.
    node.barrier().await
}

/// Streams one file into the node in bounded chunks (a reader thread and
/// a two-chunk channel: memory holds at most a few chunks).
async fn load_file(node: &Arc<Node>, path: PathBuf, f: ZoneFile) -> Result<u64, KvError> {
    type Chunk = Vec<(String, Vec<u8>, Row)>;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(2);
    let reader = tokio::task::spawn_blocking(move || {
        let mut chunk: Chunk = Vec::new();
        let mut bytes = 0usize;
        let mut stopped = false;
        file::check(&path, &f, &mut |table, key, sealed| {
            if stopped {
                return Ok(());
            }
            let row = Row::open(sealed, || display_key(table, key))?;
            bytes += key.len() + sealed.len();
            chunk.push((table.to_string(), key.to_vec(), row));
            if chunk.len() >= RESTORE_CHUNK_ROWS || bytes >= RESTORE_CHUNK_BYTES {
                bytes = 0;
                if tx.blocking_send(std::mem::take(&mut chunk)).is_err() {
                    stopped = true;
                }
            }
            Ok(())
        })?;
        if !chunk.is_empty() {
            let _ = tx.blocking_send(chunk);
        }
        Ok::<u64, KvError>(f.rows)
    });
    let mut loaded = 0u64;
    while let Some(chunk) = rx.recv().await {
        loaded += chunk.len() as u64;
        if let Err(e) = node.restore_rows(chunk).await {
            drop(rx);
            let _ = reader.await;
            return Err(e);
        }
    }
    let expected = reader.await.map_err(|e| KvError::Storage(e.to_string()))??;
    if loaded != expected {
        return Err(KvError::Storage(format!("loaded {loaded} rows of a file of {expected}")));
    }
    Ok(loaded)
}

/// Per home, the highest epoch of the manifest and every epoch's end; the
/// epoch current at the backup ends at the latest cut (a write stamped
/// later is not in the backup and must not be merged after a restore).
pub fn restored_homes(manifest: &Manifest) -> Vec<RestoredHome> {
    let cut_ms_max = manifest.nodes.iter().map(|n| n.cut_ms).max().unwrap_or(0);
    // home -> (floor, epoch -> (holder, end), pruned)
    type Acc = (u64, BTreeMap<u64, (String, u64)>, PrunedEpochs);
    let mut homes: BTreeMap<String, Acc> = BTreeMap::new();
    for part in &manifest.nodes {
        for h in &part.homes {
            let (floor, ends, pruned) = homes.entry(h.home.clone()).or_default();
            let current = EpochEnd { epoch: h.epoch, holder: h.holder.clone(), ended_ms: cut_ms_max };
            for end in h.ended.iter().chain(std::iter::once(&current)) {
                let e = ends.entry(end.epoch).or_insert_with(|| (end.holder.clone(), end.ended_ms));
                // A node that saw the epoch end knows its true end, which
                // is never later than the cut.
                e.1 = e.1.min(end.ended_ms);
            }
            *floor = (*floor).max(h.epoch);
            pruned.through_epoch = pruned.through_epoch.max(h.pruned_through_epoch);
            pruned.ended_ms_max = pruned.ended_ms_max.max(h.pruned_ended_ms_max);
        }
    }
    homes
        .into_iter()
        .map(|(home, (floor, ends, pruned))| RestoredHome {
            home,
            floor,
            ended: ends.into_iter().map(|(epoch, (holder, ended_ms))| (epoch, holder, ended_ms)).collect(),
            pruned,
        })
        .collect()
}

#[cfg(test)]
mod tests;
