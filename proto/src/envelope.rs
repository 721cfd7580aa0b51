//! The envelope around every stored value, log entry and opaque token:
//! `[format version: u8][crc32 of payload: u32 little-endian][payload]`.
//!
//! Reading checks the version and the checksum before the payload is
//! decoded, so a flipped bit on disk or on the wire becomes a typed error,
//! never data.

use prost::Message;

/// The format version written today. Readers accept every version in
/// [`READABLE_VERSIONS`].
pub const FORMAT_VERSION: u8 = 1;
/// Versions this build can decode.
pub const READABLE_VERSIONS: &[u8] = &[1];
/// Bytes of the envelope before the payload.
pub const HEADER_BYTES: usize = 5;

/// Why an envelope could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("record is {len} bytes, shorter than the {HEADER_BYTES}-byte header")]
    Truncated { len: usize },
    #[error("record has format version {found}, this build reads {READABLE_VERSIONS:?}")]
    UnknownVersion { found: u8 },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("payload does not decode: {0}")]
    Decode(String),
}

/// Wraps an encoded payload in the versioned, checksummed envelope.
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the envelope and returns the payload it holds.
pub fn open(record: &[u8]) -> Result<&[u8], CodecError> {
    if record.len() < HEADER_BYTES {
        return Err(CodecError::Truncated { len: record.len() });
    }
    let version = record[0];
    if !READABLE_VERSIONS.contains(&version) {
        return Err(CodecError::UnknownVersion { found: version });
    }
    let stored = u32::from_le_bytes([record[1], record[2], record[3], record[4]]);
    let payload = &record[HEADER_BYTES..];
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(CodecError::ChecksumMismatch { stored, computed });
    }
    Ok(payload)
}

/// Encodes a protobuf message inside an envelope.
pub fn seal_message<M: Message>(message: &M) -> Vec<u8> {
    seal(&message.encode_to_vec())
}

/// Opens an envelope and decodes the protobuf message inside.
pub fn open_message<M: Message + Default>(record: &[u8]) -> Result<M, CodecError> {
    let payload = open(record)?;
    M::decode(payload).map_err(|e| CodecError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let sealed = seal(b"hello");
        assert_eq!(sealed.len(), HEADER_BYTES + 5);
        assert_eq!(open(&sealed).unwrap(), b"hello");
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let sealed = seal(b"some row payload");
        for byte in 0..sealed.len() {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[byte] ^= 1 << bit;
                assert!(open(&bad).is_err(), "flip of bit {bit} in byte {byte} went unnoticed");
            }
        }
    }

    #[test]
    fn short_and_unknown_version_are_typed() {
        assert_eq!(open(&[1, 2]), Err(CodecError::Truncated { len: 2 }));
        let mut sealed = seal(b"x");
        sealed[0] = 9;
        assert_eq!(open(&sealed), Err(CodecError::UnknownVersion { found: 9 }));
    }
}
