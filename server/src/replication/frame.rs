//! Replication frames: what the source may send, and what the receiver
//! accepts. Pure functions, tested without IO.

use geokv_proto::storage as spb;
use geokv_proto::v1 as pb;
use prost::Message;

use crate::config::Config;
use crate::error::KvError;
use crate::kv::row::Row;

/// Whether `destination` may hold a row of `zone`.
pub fn zone_allows(cfg: &Config, zone: &str, destination: &str) -> bool {
    #[cfg(feature = "bugs")]
    if crate::bugs::active(crate::bugs::Bug::ResidencyFilterOff) {
        return true;
    }
    cfg.zone_regions(zone).iter().any(|r| r == destination)
}

/// Bytes a log entry adds around its row and key: sequence number, table,
/// stamps, origin actor, and the batch's framing of it.
const ENTRY_OVERHEAD_BYTES: usize = 4 << 10;
/// Bytes the batch framing adds per entry, at most (tag and length prefix).
const ENTRY_FRAMING_BYTES: usize = 16;
/// Bytes a frame's own fields add around its compressed entries, at most.
const FRAME_FIELDS_BYTES: usize = 64 << 10;

/// The largest row any node of the cluster can hold: a client write leaves
/// at most `limits.row_bytes_max`, and a merge joins at most one accepted
/// state per writing node (docs/decisions/015-bounded-rows.md).
pub fn merged_row_bytes_max(cfg: &Config) -> usize {
    cfg.limits.row_bytes_max.saturating_mul(cfg.node_count())
}

/// The largest sealed log entry (or repaired row) that ships: the merged
/// row bound plus its key and fields. A larger one can never ship.
pub fn entry_bytes_max(cfg: &Config) -> usize {
    merged_row_bytes_max(cfg).saturating_add(cfg.limits.key_bytes_max).saturating_add(ENTRY_OVERHEAD_BYTES)
}

/// The largest decompressed frame a source builds and a receiver accepts:
/// entries up to `replication.batch_bytes_max`, then one more entry (a frame
/// always carries at least one, so the largest legal row ships alone), and
/// the batch's framing of every entry.
pub fn frame_bytes_max(cfg: &Config) -> usize {
    let entries = cfg.replication.batch_entries_max.max(cfg.replication.repair_batch_rows_max);
    cfg.replication
        .batch_bytes_max
        .saturating_add(entry_bytes_max(cfg))
        .saturating_add(entries.saturating_mul(ENTRY_FRAMING_BYTES))
}

/// The largest gRPC message of the replication service: the largest frame
/// after lz4 (which may grow incompressible data by 1/255 plus 16 bytes)
/// and the frame's fields; never below the transport's usual 64 MiB.
pub fn wire_bytes_max(cfg: &Config) -> usize {
    let frame = frame_bytes_max(cfg);
    frame.saturating_add(frame / 255).saturating_add(16 + FRAME_FIELDS_BYTES).max(64 << 20)
}

/// Compresses and checksums entries into a frame.
pub fn build(
    source_region: &str,
    source_node: &str,
    first_seq: u64,
    through_seq: u64,
    entries: Vec<spb::LogEntry>,
    head: u64,
    hlc: u64,
) -> Result<pb::ShipFrame, KvError> {
    let count = entries.len() as u32;
    let raw = spb::LogBatch { entries }.encode_to_vec();
    // lz4 favours speed over ratio: frames are small and latency-bound.
    let compressed = lz4_flex::block::compress_prepend_size(&raw);
    Ok(pb::ShipFrame {
        source_region: source_region.to_string(),
        source_node: source_node.to_string(),
        first_seq,
        through_seq,
        crc32: crc32fast::hash(&compressed),
        entries: compressed,
        entry_count: count,
        source_head_seq: head,
        sent_hlc: hlc,
        epoch: crate::kv::commit::INITIAL_EPOCH,
        // Set by the shipper (`Node::store_tag`); repair frames leave it
        // empty, since they move no position.
        source_store: String::new(),
    })
}

/// A frame checked and decoded by the receiver.
#[derive(Debug)]
pub struct OpenedFrame {
    pub entries: Vec<(String, Vec<u8>, Row)>,
    /// Per entry: the epoch it was accepted under (0 = no lease) and its HLC stamp.
    pub accepted: Vec<(u64, u64)>,
    /// Per entry: the idempotency record that travelled with it, if any.
    pub idempotency: Vec<Option<(String, spb::IdempotencyRecord)>>,
    /// Per entry: its position in the source's log.
    pub seqs: Vec<u64>,
    pub max_hlc: u64,
}

/// Checks a frame as a receiver must: checksum, size bound, decoding, known
/// tables, and residency of every row in it. `max_bytes` bounds the
/// decompressed size.
pub fn open(cfg: &Config, frame: &pb::ShipFrame, max_bytes: usize) -> Result<OpenedFrame, KvError> {
    let corrupt = |why: String| KvError::Corrupt {
        what: format!("replication frame from {}", frame.source_region),
        why,
    };
    if frame.through_seq < frame.first_seq.saturating_sub(1) {
        return Err(KvError::InvalidField { field: "through_seq", why: "below first_seq".into() });
    }
    if frame.entries.is_empty() {
        if frame.entry_count != 0 {
            return Err(corrupt("entry count without entries".into()));
        }
        return Ok(OpenedFrame {
            entries: Vec::new(),
            accepted: Vec::new(),
            idempotency: Vec::new(),
            seqs: Vec::new(),
            max_hlc: 0,
        });
    }
    let crc = crc32fast::hash(&frame.entries);
    if crc != frame.crc32 {
        return Err(corrupt(format!(
            "checksum mismatch: frame says {:#010x}, bytes give {crc:#010x}",
            frame.crc32
        )));
    }
    if frame.entries.len() < 4 {
        return Err(corrupt("compressed entries shorter than their size prefix".into()));
    }
    let declared =
        u32::from_le_bytes([frame.entries[0], frame.entries[1], frame.entries[2], frame.entries[3]]) as usize;
    if declared > max_bytes {
        // Not damage: the source sized the frame from a larger row limit
        // than this node's (configs must agree on `limits.row_bytes_max`).
        metrics::counter!("geokv_replication_frames_too_large_total", "source" => frame.source_region.clone())
            .increment(1);
        return Err(KvError::RowTooLarge {
            key: format!("replication frame from {}", frame.source_region),
            measure: "bytes",
            len: declared,
            max: max_bytes,
        });
    }
    let raw =
        lz4_flex::block::decompress_size_prepended(&frame.entries).map_err(|e| corrupt(e.to_string()))?;
    let batch = spb::LogBatch::decode(raw.as_slice()).map_err(|e| corrupt(e.to_string()))?;
    if batch.entries.len() != frame.entry_count as usize {
        return Err(corrupt(format!("{} entries, frame says {}", batch.entries.len(), frame.entry_count)));
    }
    let mut entries = Vec::with_capacity(batch.entries.len());
    let mut accepted = Vec::with_capacity(batch.entries.len());
    let mut idempotency = Vec::with_capacity(batch.entries.len());
    let mut seqs = Vec::with_capacity(batch.entries.len());
    let mut max_hlc = 0;
    for e in batch.entries {
        if e.seq < frame.first_seq || e.seq > frame.through_seq {
            return Err(corrupt(format!("entry {} outside the frame's range", e.seq)));
        }
        if cfg.table(&e.table).is_none() {
            return Err(KvError::UnknownTable { table: e.table });
        }
        let row = e.row.ok_or_else(|| corrupt(format!("entry {} has no row", e.seq)))?;
        let row = Row::from_proto(row).map_err(corrupt)?;
        if !zone_allows(cfg, &row.zone, &cfg.region) {
            metrics::counter!("geokv_residency_refused_total", "source" => frame.source_region.clone())
                .increment(1);
            return Err(KvError::ResidencyViolation {
                zone: row.zone.clone(),
                allowed: cfg.zone_regions(&row.zone),
                region: cfg.region.clone(),
            });
        }
        max_hlc = max_hlc.max(row.hlc);
        let idem = match e.idempotency {
            None => None,
            Some(t) => {
                let record = t
                    .record
                    .ok_or_else(|| corrupt(format!("entry {}: idempotency without a record", e.seq)))?;
                if t.key.is_empty() || t.key.len() > crate::api::convert::IDEMPOTENCY_KEY_BYTES_MAX {
                    return Err(corrupt(format!(
                        "entry {}: idempotency key of {} bytes",
                        e.seq,
                        t.key.len()
                    )));
                }
                Some((t.key, record))
            }
        };
        accepted.push((e.accepted_epoch, e.hlc));
        idempotency.push(idem);
        seqs.push(e.seq);
        entries.push((e.table, e.key, row));
    }
    Ok(OpenedFrame { entries, accepted, idempotency, seqs, max_hlc })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causality::PnCounter;
    use crate::kv::row::RowValue;

    fn cfg(region: &str) -> Config {
        Config::from_toml(&format!(
            r#"
            region = "{region}"
            regions = [{{ name = "us-east-1" }}, {{ name = "eu-west-1" }}, {{ name = "eu-central-1" }}]
            zones = [{{ name = "eu", regions = ["eu-west-1", "eu-central-1"] }}]
            "#
        ))
        .unwrap()
        .finish()
        .unwrap()
    }

    fn entry(seq: u64, zone: &str) -> spb::LogEntry {
        let mut c = PnCounter::default();
        c.add("eu-west-1/n1", 3);
        let row = Row {
            home_region: "eu-west-1".into(),
            zone: zone.into(),
            epoch: 1,
            hlc: 10,
            value: RowValue::Counter(c),
        };
        spb::LogEntry {
            seq,
            table: "default".into(),
            key: b"k".to_vec(),
            row: Some(row.to_proto()),
            hlc: 10,
            origin: "eu-west-1/n1".into(),
            accepted_epoch: 0,
            idempotency: None,
        }
    }

    #[test]
    fn source_filter_follows_zones() {
        let c = cfg("eu-west-1");
        assert!(zone_allows(&c, "eu", "eu-central-1"));
        assert!(!zone_allows(&c, "eu", "us-east-1"));
        assert!(zone_allows(&c, "", "us-east-1"), "rows of no zone may go anywhere");
    }

    #[test]
    fn receiver_refuses_rows_outside_its_zone_even_if_sent() {
        let frame = build("eu-west-1", "n1", 1, 1, vec![entry(1, "eu")], 1, 10).unwrap();
        let err = open(&cfg("us-east-1"), &frame, 1 << 20).unwrap_err();
        assert_eq!(err.reason(), "RESIDENCY_VIOLATION");
        let ok = open(&cfg("eu-central-1"), &frame, 1 << 20).unwrap();
        assert_eq!(ok.entries.len(), 1);
    }

    /// A register row of `siblings` values of `value_bytes` bytes each, one
    /// writer node per sibling, as a merge at a replica can hold it.
    fn merged_register(siblings: usize, value_bytes: usize) -> Row {
        use crate::causality::{DvvSet, HlcTimestamp, VersionVector};
        let mut dvv = DvvSet::default();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..siblings {
            // Incompressible bytes, so lz4 cannot hide the size.
            let value: Vec<u8> = (0..value_bytes)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            dvv.write(&format!("r{i}/n1"), &VersionVector::default(), Some(value), HlcTimestamp(10));
        }
        Row {
            home_region: "us-east-1".into(),
            zone: String::new(),
            epoch: 1,
            hlc: 10,
            value: RowValue::Register(dvv),
        }
    }

    #[test]
    fn the_largest_legal_row_ships_in_one_frame() {
        // Three nodes, each holding a row at the row limit: a merge holds all three.
        let c = Config::from_toml(
            r#"
            region = "us-east-1"
            regions = [{ name = "us-east-1" }, { name = "eu-west-1" }, { name = "eu-central-1" }]
            [limits]
            value_bytes_max = 65536
            row_bytes_max = 200000
            [replication]
            batch_bytes_max = 4096
            "#,
        )
        .unwrap()
        .finish()
        .unwrap();
        assert_eq!(c.node_count(), 3);
        assert_eq!(merged_row_bytes_max(&c), 600_000);
        let row = merged_register(9, 65_000);
        let proto_len = prost::Message::encoded_len(&row.to_proto());
        assert!(proto_len > 585_000 && proto_len < merged_row_bytes_max(&c), "{proto_len}");
        let mut big = entry(1, "");
        big.row = Some(row.to_proto());
        let sealed = crate::codec::seal_message(&big).len();
        assert!(sealed <= entry_bytes_max(&c), "{sealed} > {}", entry_bytes_max(&c));
        // Behind a batch filled up to its bound, as the shipper builds it.
        let mut small = vec![entry(1, "")];
        small[0].seq = 1;
        big.seq = 2;
        small.push(big);
        let frame = build("us-east-1", "n1", 1, 2, small, 2, 10).unwrap();
        assert!(frame.entries.len() < wire_bytes_max(&c));
        let opened = open(&cfg("eu-west-1"), &frame, frame_bytes_max(&c)).unwrap();
        assert_eq!(opened.entries.len(), 2);
        // The receive cap used before (8 MiB at least) was no bound on rows
        // at all; the derived one stays proportional to them.
        assert!(frame_bytes_max(&c) < 2 * merged_row_bytes_max(&c));
    }

    #[test]
    fn damaged_or_oversized_frames_are_refused() {
        let mut frame = build("eu-west-1", "n1", 1, 2, vec![entry(1, ""), entry(2, "")], 2, 10).unwrap();
        assert_eq!(open(&cfg("us-east-1"), &frame, 16).unwrap_err().reason(), "ROW_TOO_LARGE");
        let last = frame.entries.len() - 1;
        frame.entries[last] ^= 0x10;
        assert_eq!(open(&cfg("us-east-1"), &frame, 1 << 20).unwrap_err().reason(), "DATA_CORRUPTION");
        let outside = build("eu-west-1", "n1", 5, 6, vec![entry(1, "")], 6, 10).unwrap();
        assert_eq!(open(&cfg("us-east-1"), &outside, 1 << 20).unwrap_err().reason(), "DATA_CORRUPTION");
    }
}
