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
