//! The stored row: its placement facts and its CRDT value, and the key
//! layout of the data column family.

use geokv_proto::storage as pb;

use crate::causality::{DvvSet, LwwRegister, OrSet, PnCounter};
use crate::codec;
use crate::error::KvError;

/// The value of a row. Its kind is fixed by the first write.
#[derive(Debug, Clone, PartialEq)]
pub enum RowValue {
    /// Plain bytes with siblings (multi-value register).
    Register(DvvSet),
    /// Plain bytes, last writer wins (tables with `conflict = "lww"`).
    Lww(LwwRegister),
    Counter(PnCounter),
    Set(OrSet),
}

impl RowValue {
    pub fn kind(&self) -> &'static str {
        match self {
            RowValue::Register(_) | RowValue::Lww(_) => "register",
            RowValue::Counter(_) => "counter",
            RowValue::Set(_) => "set",
        }
    }
}

/// One row as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub home_region: String,
    pub zone: String,
    pub epoch: u64,
    /// Highest HLC stamp merged into the row.
    pub hlc: u64,
    pub value: RowValue,
}

/// The size of a row by each bounded measure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowMeasure {
    /// Encoded size of the whole row (its protobuf form), in bytes.
    pub bytes: usize,
    /// Siblings of a register, tombstones included (0 for other kinds).
    pub siblings: usize,
    /// Members of a set (0 for other kinds).
    pub members: usize,
}

impl RowMeasure {
    /// Measures `row` whose protobuf form is `proto` (passed in so the
    /// caller encodes the row once).
    pub fn of(row: &Row, proto: &pb::Row) -> Self {
        use prost::Message;
        let (siblings, members) = match &row.value {
            RowValue::Register(d) => (d.sibling_count(), 0),
            RowValue::Set(s) => (0, s.len()),
            RowValue::Lww(_) | RowValue::Counter(_) => (0, 0),
        };
        Self { bytes: proto.encoded_len(), siblings, members }
    }
}

/// Bounds on a row after a write accepted by this node
/// (docs/decisions/015-bounded-rows.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLimits {
    pub bytes_max: usize,
    pub siblings_max: usize,
    pub members_max: usize,
}

impl RowLimits {
    pub fn from_config(l: &crate::config::Limits) -> Self {
        Self { bytes_max: l.row_bytes_max, siblings_max: l.siblings_max, members_max: l.set_members_max }
    }

    /// Whether a write that turns a row measured `before` into one measured
    /// `after` may be stored. A write that `adds` a value (a put, a set add)
    /// must leave the row within every bound; any other write (a delete, a
    /// remove, a counter add) only must not grow a measure that is already
    /// past its bound, so a row merged past the bounds from several regions
    /// can always be shrunk. `before` is asked for only when needed.
    pub fn check(
        &self,
        key: impl Fn() -> String,
        adds: bool,
        before: impl Fn() -> RowMeasure,
        after: RowMeasure,
    ) -> Result<(), KvError> {
        let grows = |past: bool, measure: fn(&RowMeasure) -> usize| {
            past && (adds || measure(&after) > measure(&before()))
        };
        if grows(after.siblings > self.siblings_max, |m| m.siblings) {
            return Err(KvError::TooManySiblings { key: key(), len: after.siblings, max: self.siblings_max });
        }
        if grows(after.members > self.members_max, |m| m.members) {
            return Err(KvError::RowTooLarge {
                key: key(),
                measure: "members",
                len: after.members,
                max: self.members_max,
            });
        }
        if grows(after.bytes > self.bytes_max, |m| m.bytes) {
            return Err(KvError::RowTooLarge {
                key: key(),
                measure: "bytes",
                len: after.bytes,
                max: self.bytes_max,
            });
        }
        Ok(())
    }
}

/// The data-column-family key of `(table, key)`: `table \0 key`. Table names
/// never contain NUL, so keys of one table sort together.
pub fn data_key(table: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(table.len() + 1 + key.len());
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// Splits a data key back into `(table, key)`.
pub fn split_data_key(k: &[u8]) -> Option<(&str, &[u8])> {
    let nul = k.iter().position(|b| *b == 0)?;
    let table = std::str::from_utf8(&k[..nul]).ok()?;
    Some((table, &k[nul + 1..]))
}

/// Renders a key for messages: UTF-8 when printable, hex otherwise.
pub fn display_key(table: &str, key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{table}/{s}"),
        _ => format!("{table}/0x{}", hex::encode(key)),
    }
}

impl Row {
    pub fn to_proto(&self) -> pb::Row {
        let value = match &self.value {
            RowValue::Register(d) => pb::row::Value::Register(d.into()),
            RowValue::Lww(l) => pb::row::Value::Lww(l.into()),
            RowValue::Counter(c) => pb::row::Value::Counter(c.into()),
            RowValue::Set(s) => pb::row::Value::Set(s.into()),
        };
        pb::Row {
            home_region: self.home_region.clone(),
            zone: self.zone.clone(),
            epoch: self.epoch,
            hlc: self.hlc,
            value: Some(value),
        }
    }

    pub fn from_proto(p: pb::Row) -> Result<Self, String> {
        let value = match p.value {
            Some(pb::row::Value::Register(d)) => {
                RowValue::Register(DvvSet::try_from(d).map_err(|e| e.to_string())?)
            }
            Some(pb::row::Value::Lww(l)) => {
                RowValue::Lww(LwwRegister::try_from(l).map_err(|e| e.to_string())?)
            }
            Some(pb::row::Value::Counter(c)) => {
                RowValue::Counter(PnCounter::try_from(c).map_err(|e| e.to_string())?)
            }
            Some(pb::row::Value::Set(s)) => RowValue::Set(OrSet::try_from(s).map_err(|e| e.to_string())?),
            None => return Err("row has no value".into()),
        };
        if p.home_region.is_empty() {
            return Err("row has no home region".into());
        }
        Ok(Row { home_region: p.home_region, zone: p.zone, epoch: p.epoch, hlc: p.hlc, value })
    }

    /// Encodes into the versioned, checksummed envelope.
    pub fn seal(&self) -> Vec<u8> {
        codec::seal_message(&self.to_proto())
    }

    /// Decodes a stored row, checking version and checksum; `what` names the
    /// row in the error.
    pub fn open(bytes: &[u8], what: impl Fn() -> String) -> Result<Self, KvError> {
        let corrupt = |why: String| {
            metrics::counter!("geokv_corruption_detected_total").increment(1);
            KvError::Corrupt { what: what(), why }
        };
        let p: pb::Row = codec::open_message(bytes).map_err(|e| corrupt(e.to_string()))?;
        Row::from_proto(p).map_err(corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_keys_split_back() {
        let k = data_key("users", b"a\0b");
        assert_eq!(split_data_key(&k), Some(("users", &b"a\0b"[..])));
        assert_eq!(display_key("t", b"abc"), "t/abc");
        assert_eq!(display_key("t", &[0, 1]), "t/0x0001");
    }

    #[test]
    fn row_limits_refuse_growth_past_a_bound_and_allow_shrinking() {
        let limits = RowLimits { bytes_max: 100, siblings_max: 3, members_max: 5 };
        let key = || "t/k".to_string();
        let m = |bytes, siblings, members| RowMeasure { bytes, siblings, members };
        // Within every bound: accepted, whatever the write.
        assert!(limits.check(key, true, || m(10, 1, 0), m(100, 3, 5)).is_ok());
        // An add past a bound is refused, with the measure named.
        let e = limits.check(key, true, || m(10, 3, 0), m(50, 4, 0)).unwrap_err();
        assert_eq!(e.reason(), "TOO_MANY_SIBLINGS");
        let e = limits.check(key, true, || m(10, 0, 5), m(50, 0, 6)).unwrap_err();
        assert_eq!((e.reason(), e.to_string().contains("members")), ("ROW_TOO_LARGE", true));
        let e = limits.check(key, true, || m(10, 1, 0), m(101, 1, 0)).unwrap_err();
        assert_eq!(e.reason(), "ROW_TOO_LARGE");
        assert!(e.to_string().contains("t/k") && e.to_string().contains("101"), "{e}");
        // An add is refused past a bound even when it shrinks the row: the
        // writer's own accepted state stays within the bound.
        assert!(limits.check(key, true, || m(500, 9, 0), m(400, 8, 0)).is_err());
        // Other writes on a row merged past the bounds: accepted when they do
        // not grow it, refused when they do.
        assert!(limits.check(key, false, || m(500, 9, 0), m(480, 8, 0)).is_ok());
        assert!(limits.check(key, false, || m(500, 9, 0), m(500, 9, 0)).is_ok());
        assert_eq!(
            limits.check(key, false, || m(500, 9, 0), m(520, 9, 0)).unwrap_err().reason(),
            "ROW_TOO_LARGE"
        );
        assert_eq!(
            limits.check(key, false, || m(50, 3, 0), m(60, 4, 0)).unwrap_err().reason(),
            "TOO_MANY_SIBLINGS"
        );
    }

    #[test]
    fn corrupt_row_is_an_error_naming_the_row() {
        let row = Row {
            home_region: "r".into(),
            zone: String::new(),
            epoch: 1,
            hlc: 5,
            value: RowValue::Counter(PnCounter::default()),
        };
        let mut bytes = row.seal();
        assert_eq!(Row::open(&bytes, || "t/k".into()).unwrap(), row);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        let err = Row::open(&bytes, || "t/k".into()).unwrap_err();
        assert_eq!(err.reason(), "DATA_CORRUPTION");
        assert!(err.to_string().contains("t/k"), "{err}");
    }
}
