//! Merkle-tree anti-entropy for a destination node that fell behind log
//! retention (docs/architecture.md sections 6 and 7).
//!
//! Both sides build a tree ([`super::merkle`]) over the same set of rows:
//! those of the compared partitions (owned by the source node in its region
//! and by the destination node in its) whose residency zone allows *both*
//! regions. The source only ever holds rows its region may hold, and only
//! sends rows the destination may hold, so no row leaves its zone; the
//! receiver checks every row again ([`super::frame::open`]).
//!
//! The source ([`run`]) captures its log head before building its tree,
//! compares roots, descends into differing nodes only, fetches the key
//! hashes of differing leaves, sends the rows it has in another state as
//! full CRDT states (merged idempotently, like shipped entries), and
//! finally tells the destination that it now has everything through the
//! captured head. The receiver side is [`Session`].

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use geokv_proto::storage as spb;
use geokv_proto::v1 as pb;
use pb::repair_request::Step;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::merkle::{self, Hash, KeyHash, MerkleTree};
use super::ship::LinkState;
use crate::error::KvError;
use crate::kv::commit::{ApplyMode, RemoteApply};
use crate::kv::row::{data_key, display_key, Row};
use crate::kv::{canonical_row_bytes, Node};
use crate::storage::Cf;

/// Leaves asked for per `RepairKeys` request, bounding one answer.
const LEAVES_PER_REQUEST: usize = 256;

/// One side's rows: the tree and every row's `(leaf, table, key, hash)`.
pub struct Side {
    pub tree: MerkleTree,
    pub rows: Vec<(u32, KeyHash)>,
}

impl Side {
    /// Key hashes of the rows in `leaves`.
    pub fn keys_in(&self, leaves: &BTreeSet<u32>) -> Vec<KeyHash> {
        self.rows.iter().filter(|(l, _)| leaves.contains(l)).map(|(_, k)| k.clone()).collect()
    }
}

/// Builds this node's side over the rows of `partitions` whose zone allows
/// `other_region` (and, as every stored row does, this node's region).
pub fn build_side(
    node: &Node,
    partitions: &BTreeSet<u32>,
    other_region: &str,
    depth: u32,
) -> Result<Side, KvError> {
    let cfg = node.config();
    let topology = node.topology().clone();
    let mut rows = Vec::new();
    node.for_each_row(|table, key, row| {
        if !partitions.contains(&topology.partition_of(table, key))
            || !super::frame::zone_allows(cfg, &row.zone, other_region)
            || !super::frame::zone_allows(cfg, &row.zone, &cfg.region)
        {
            return;
        }
        let hash = merkle::row_hash(table, key, &canonical_row_bytes(&row));
        rows.push((merkle::leaf_of(depth, table, key), (table.to_string(), key.to_vec(), hash)));
    })?;
    let tree = MerkleTree::build(depth, rows.iter().map(|(l, (_, _, h))| (*l, *h)));
    Ok(Side { tree, rows })
}

fn to_hashes(pairs: Vec<(u32, Hash)>) -> Vec<pb::MerkleHash> {
    pairs.into_iter().map(|(index, hash)| pb::MerkleHash { index, hash: hash.to_vec() }).collect()
}

fn from_hashes(hashes: Vec<pb::MerkleHash>) -> Vec<(u32, Hash)> {
    hashes.into_iter().filter_map(|h| Hash::try_from(h.hash.as_slice()).ok().map(|x| (h.index, x))).collect()
}

/// The receiving side of one repair session.
pub struct Session {
    node: Arc<Node>,
    /// Actor id of the source node, set by `Begin`.
    source: Option<String>,
    /// The source's store incarnation, set by `Begin`.
    source_store: String,
    side: Option<Side>,
}

impl Session {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node, source: None, source_store: String::new(), side: None }
    }

    fn not_begun() -> KvError {
        KvError::InvalidField { field: "step", why: "a repair session starts with `begin`".into() }
    }

    /// Answers one step of the session.
    pub async fn step(&mut self, step: Step) -> Result<pb::RepairResponse, KvError> {
        let cfg = self.node.config().clone();
        match step {
            Step::Begin(b) => {
                if b.source_region == cfg.region || cfg.regions.iter().all(|r| r.name != b.source_region) {
                    return Err(KvError::UnknownRegion {
                        region: b.source_region,
                        known: cfg.region_names(),
                    });
                }
                if b.destination_node != cfg.node_id {
                    return Err(KvError::InvalidField {
                        field: "begin.destination_node",
                        why: format!("this is node `{}`, not `{}`", cfg.node_id, b.destination_node),
                    });
                }
                if b.depth > merkle::DEPTH_MAX {
                    return Err(KvError::InvalidField {
                        field: "begin.depth",
                        why: format!("at most {}", merkle::DEPTH_MAX),
                    });
                }
                if b.partitions.iter().any(|p| *p >= cfg.partitions) {
                    return Err(KvError::InvalidField {
                        field: "begin.partitions",
                        why: format!("partitions are below {}", cfg.partitions),
                    });
                }
                let partitions: BTreeSet<u32> = b.partitions.into_iter().collect();
                let node = self.node.clone();
                let region = b.source_region.clone();
                let depth = b.depth;
                let side =
                    tokio::task::spawn_blocking(move || build_side(&node, &partitions, &region, depth))
                        .await
                        .map_err(|e| KvError::Storage(e.to_string()))??;
                let root = side.tree.hashes(0, &[0]);
                self.side = Some(side);
                self.source = Some(crate::topology::actor(&b.source_region, &b.source_node));
                self.source_store =
                    if crate::storage::identity::identity_off() { String::new() } else { b.source_store };
                Ok(pb::RepairResponse { hashes: to_hashes(root), ..Default::default() })
            }
            Step::Descend(d) => {
                let side = self.side.as_ref().ok_or_else(Self::not_begun)?;
                if d.indices.len() > merkle::width(merkle::DEPTH_MAX) as usize {
                    return Err(KvError::InvalidField { field: "descend.indices", why: "too many".into() });
                }
                Ok(pb::RepairResponse {
                    hashes: to_hashes(side.tree.hashes(d.level, &d.indices)),
                    ..Default::default()
                })
            }
            Step::Keys(k) => {
                let side = self.side.as_ref().ok_or_else(Self::not_begun)?;
                if k.leaves.len() > LEAVES_PER_REQUEST {
                    return Err(KvError::InvalidField {
                        field: "keys.leaves",
                        why: format!("at most {LEAVES_PER_REQUEST} per request"),
                    });
                }
                let leaves: BTreeSet<u32> = k.leaves.into_iter().collect();
                let keys = side
                    .keys_in(&leaves)
                    .into_iter()
                    .map(|(table, key, hash)| pb::KeyHash { table, key, hash: hash.to_vec() })
                    .collect();
                Ok(pb::RepairResponse { keys, ..Default::default() })
            }
            Step::Rows(frame) => {
                let source = self.source.clone().ok_or_else(Self::not_begun)?;
                // Residency is checked again here, row by row.
                let opened = super::frame::open(&cfg, &frame, super::frame::frame_bytes_max(&cfg))?;
                let rows = opened.entries.len() as u64;
                metrics::counter!("geokv_antientropy_rows_received_total", "source" => frame.source_region.clone())
                    .increment(rows);
                // Fenced rows are handled (refused), so they count as applied.
                let (entries, _refused) = self.node.fence_repaired_rows(&frame.source_region, opened.entries);
                self.node
                    .apply_remote(RemoteApply {
                        source,
                        source_store: self.source_store.clone(),
                        first_seq: 0,
                        through_seq: 0,
                        entries,
                        mode: ApplyMode::RepairRows,
                        idempotency: Vec::new(),
                        seqs: Vec::new(),
                    })
                    .await?;
                Ok(pb::RepairResponse { rows_applied: rows, ..Default::default() })
            }
            Step::Finish(f) => {
                let source = self.source.clone().ok_or_else(Self::not_begun)?;
                self.node
                    .apply_remote(RemoteApply {
                        source,
                        source_store: self.source_store.clone(),
                        first_seq: 0,
                        through_seq: f.through_seq,
                        entries: Vec::new(),
                        mode: ApplyMode::RepairDone,
                        idempotency: Vec::new(),
                        seqs: Vec::new(),
                    })
                    .await?;
                Ok(pb::RepairResponse::default())
            }
        }
    }
}

/// What one repair did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairOutcome {
    /// The source's log head captured before its tree was built.
    pub through_seq: u64,
    pub leaves_differing: usize,
    pub rows_sent: u64,
    pub bytes_sent: u64,
}

/// The source's end of a repair stream: one answer per step, in order.
struct Peer {
    tx: mpsc::Sender<pb::RepairRequest>,
    answers: tonic::Streaming<pb::RepairResponse>,
    destination: String,
}

impl Peer {
    async fn ask(&mut self, step: Step) -> Result<pb::RepairResponse, KvError> {
        let unreachable = |why: String| KvError::RegionUnreachable { region: self.destination.clone(), why };
        self.tx
            .send(pb::RepairRequest { step: Some(step) })
            .await
            .map_err(|_| unreachable("repair stream closed".into()))?;
        self.answers
            .message()
            .await
            .map_err(|s| unreachable(format!("{}: {}", s.code(), s.message())))?
            .ok_or_else(|| unreachable("destination closed the repair stream".into()))
    }
}

/// Repairs the destination of `link` from this node, over `channel`.
pub async fn run(
    node: &Arc<Node>,
    link: &LinkState,
    channel: Channel,
    batch_rows_max: usize,
) -> Result<RepairOutcome, KvError> {
    let cfg = node.config().clone();
    let topology = node.topology().clone();
    let unreachable = |why: String| KvError::RegionUnreachable { region: link.destination.clone(), why };
    // Captured first: every row the scan reads is at least this new.
    let head = node.log_seq();
    let mine: BTreeSet<u32> = topology.owned_by(&cfg.region, &cfg.node_id).into_iter().collect();
    let theirs: BTreeSet<u32> =
        topology.owned_by(&link.destination, &link.destination_node).into_iter().collect();
    let partitions: BTreeSet<u32> = mine.intersection(&theirs).copied().collect();
    let depth = merkle::DEPTH;
    let side = {
        let node = node.clone();
        let parts = partitions.clone();
        let dest = link.destination.clone();
        tokio::task::spawn_blocking(move || build_side(&node, &parts, &dest, depth))
            .await
            .map_err(|e| KvError::Storage(e.to_string()))??
    };

    let wire_max = super::frame::wire_bytes_max(&cfg);
    let mut client = pb::replication_client::ReplicationClient::new(channel)
        .max_decoding_message_size(wire_max)
        .max_encoding_message_size(wire_max);
    let (tx, rx) = mpsc::channel::<pb::RepairRequest>(4);
    let answers = client
        .repair(ReceiverStream::new(rx))
        .await
        .map_err(|s| unreachable(format!("{}: {}", s.code(), s.message())))?
        .into_inner();
    let mut peer = Peer { tx, answers, destination: link.destination.clone() };
    let begin = pb::RepairBegin {
        source_region: cfg.region.clone(),
        source_node: cfg.node_id.clone(),
        destination_node: link.destination_node.clone(),
        partitions: partitions.iter().copied().collect(),
        depth,
        source_store: node.store_tag(),
    };
    let mut asked = vec![0u32];
    let mut answer = from_hashes(peer.ask(Step::Begin(begin)).await?.hashes);
    let mut leaves = Vec::new();
    // Bounded by the depth: one round trip per level.
    for level in 0..=depth {
        let diff = side.tree.differing(level, &asked, &answer);
        if diff.is_empty() {
            break;
        }
        if level == depth {
            leaves = diff;
            break;
        }
        asked = merkle::children(&diff);
        answer = from_hashes(
            peer.ask(Step::Descend(pb::RepairDescend { level: level + 1, indices: asked.clone() }))
                .await?
                .hashes,
        );
    }

    let mut outcome =
        RepairOutcome { through_seq: head, leaves_differing: leaves.len(), ..Default::default() };
    let mut to_send = Vec::new();
    for chunk in leaves.chunks(LEAVES_PER_REQUEST) {
        let set: BTreeSet<u32> = chunk.iter().copied().collect();
        let theirs: Vec<KeyHash> = peer
            .ask(Step::Keys(pb::RepairKeys { leaves: chunk.to_vec() }))
            .await?
            .keys
            .into_iter()
            .filter_map(|k| Hash::try_from(k.hash.as_slice()).ok().map(|h| (k.table, k.key, h)))
            .collect();
        to_send.extend(merkle::rows_to_send(&side.keys_in(&set), &theirs));
    }

    // Frames are bounded by rows and by bytes as shipped frames are: at
    // most `batch_bytes_max` before their last row (frame::frame_bytes_max).
    let entry_max = super::frame::entry_bytes_max(&cfg);
    let mut pending = to_send.iter().peekable();
    while pending.peek().is_some() {
        let mut entries = Vec::new();
        let mut frame_bytes = 0usize;
        while entries.len() < batch_rows_max.max(1) && frame_bytes < cfg.replication.batch_bytes_max {
            let Some((table, key)) = pending.next() else { break };
            let Some(bytes) = node
                .engine()
                .get(Cf::Data, &data_key(table, key))
                .map_err(|e| KvError::Storage(e.to_string()))?
            else {
                continue;
            };
            let row = Row::open(&bytes, || display_key(table, key))?;
            // Checked again at the source: the row may have changed zone
            // owner since the tree was built only if its config changed.
            if !super::frame::zone_allows(&cfg, &row.zone, &link.destination) {
                link.skipped_by_residency.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if bytes.len() > entry_max {
                link.unshippable(
                    0,
                    &display_key(table, key),
                    &format!(
                        "{} bytes, over the entry bound of {entry_max} (limits.row_bytes_max)",
                        bytes.len()
                    ),
                );
                continue;
            }
            frame_bytes += bytes.len();
            entries.push(spb::LogEntry {
                seq: 0,
                table: table.clone(),
                key: key.clone(),
                hlc: row.hlc,
                row: Some(row.to_proto()),
                origin: cfg.actor(),
                // Repairs carry merged row states, not writes accepted
                // under a lease, so no epoch fences them.
                accepted_epoch: 0,
                idempotency: None,
            });
        }
        if entries.is_empty() {
            continue;
        }
        let count = entries.len() as u64;
        let frame = super::frame::build(&cfg.region, &cfg.node_id, 0, 0, entries, head, node.hlc().now().0)?;
        let bytes = frame.entries.len() as u64;
        let applied = peer.ask(Step::Rows(frame)).await?.rows_applied;
        if applied != count {
            return Err(unreachable(format!("destination applied {applied} of {count} repaired rows")));
        }
        outcome.rows_sent += count;
        outcome.bytes_sent += bytes;
        link.rows_repaired.fetch_add(count, Ordering::Relaxed);
        link.repair_bytes.fetch_add(bytes, Ordering::Relaxed);
        let labels = [("destination", link.destination.clone())];
        metrics::counter!("geokv_antientropy_rows_total", &labels).increment(count);
        metrics::counter!("geokv_antientropy_bytes_total", &labels).increment(bytes);
    }
    peer.ask(Step::Finish(pb::RepairFinish { through_seq: head })).await?;
    Ok(outcome)
}
