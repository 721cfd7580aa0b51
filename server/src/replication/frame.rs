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
    })
}

/// A frame checked and decoded by the receiver.
#[derive(Debug)]
pub struct OpenedFrame {
    pub entries: Vec<(String, Vec<u8>, Row)>,
    /// Per entry: the epoch it was accepted under (0 = no lease) and its HLC stamp.
    pub accepted: Vec<(u64, u64)>,
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
        return Ok(OpenedFrame { entries: Vec::new(), accepted: Vec::new(), max_hlc: 0 });
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
        return Err(corrupt(format!("frame declares {declared} bytes; the limit is {max_bytes}")));
    }
    let raw =
        lz4_flex::block::decompress_size_prepended(&frame.entries).map_err(|e| corrupt(e.to_string()))?;
    let batch = spb::LogBatch::decode(raw.as_slice()).map_err(|e| corrupt(e.to_string()))?;
    if batch.entries.len() != frame.entry_count as usize {
        return Err(corrupt(format!("{} entries, frame says {}", batch.entries.len(), frame.entry_count)));
    }
    let mut entries = Vec::with_capacity(batch.entries.len());
    let mut accepted = Vec::with_capacity(batch.entries.len());
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
        accepted.push((e.accepted_epoch, e.hlc));
        entries.push((e.table, e.key, row));
    }
    Ok(OpenedFrame { entries, accepted, max_hlc })
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

    #[test]
    fn damaged_or_oversized_frames_are_refused() {
        let mut frame = build("eu-west-1", "n1", 1, 2, vec![entry(1, ""), entry(2, "")], 2, 10).unwrap();
        assert_eq!(open(&cfg("us-east-1"), &frame, 16).unwrap_err().reason(), "DATA_CORRUPTION");
        let last = frame.entries.len() - 1;
        frame.entries[last] ^= 0x10;
        assert_eq!(open(&cfg("us-east-1"), &frame, 1 << 20).unwrap_err().reason(), "DATA_CORRUPTION");
        let outside = build("eu-west-1", "n1", 5, 6, vec![entry(1, "")], 6, 10).unwrap();
        assert_eq!(open(&cfg("us-east-1"), &outside, 1 << 20).unwrap_err().reason(), "DATA_CORRUPTION");
    }
}
