//! The store's identity (docs/architecture.md section 16): a UUID and an
//! incarnation, made at the first open of an empty store and kept in the
//! `meta` column family. A wiped or replaced disk opens empty and so gets a
//! new identity: whatever other nodes remember about this node's store
//! (replication positions, votes) is keyed by it, and a new incarnation is
//! never taken for a continuation of the old one.

use serde::{Deserialize, Serialize};

use super::{Cf, Engine, StorageError, WriteBatch};

/// Whether the put-back bug `identity-off` is on (never in a normal
/// build): replication positions keyed by node name and sequence only, the
/// node's bare name stamped on its writes, and no re-seeding of a new
/// destination incarnation.
pub fn identity_off() -> bool {
    #[cfg(feature = "bugs")]
    {
        crate::bugs::active(crate::bugs::Bug::IdentityOff)
    }
    #[cfg(not(feature = "bugs"))]
    {
        false
    }
}

/// Meta key of the identity.
const IDENTITY_KEY: &[u8] = b"store/identity";

/// Who this store is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreIdentity {
    /// 32 lowercase hex digits, random at creation.
    pub uuid: String,
    /// Wall-clock milliseconds of the first open: later incarnations of a
    /// node's store have larger ones (the UUID tells incarnations apart
    /// even if a clock went back).
    pub incarnation: u64,
}

impl StoreIdentity {
    /// The incarnation as positions are keyed by it:
    /// `<incarnation, 16 hex digits>-<uuid>`, ordered as incarnations are.
    pub fn tag(&self) -> String {
        format!("{:016x}-{}", self.incarnation, self.uuid)
    }

    /// The actor id this store stamps on the writes it accepts
    /// (`region/node~<first 8 hex digits of the uuid>`): a new incarnation
    /// counts its dots from 1 again, so it must not reuse the old one's
    /// name, or its writes would look already seen everywhere.
    pub fn write_actor(&self, actor: &str) -> String {
        format!("{actor}~{}", &self.uuid[..8.min(self.uuid.len())])
    }
}

/// The identity read back, or made now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub identity: StoreIdentity,
    /// Made at this open on an empty store (a first start, or a wiped disk).
    pub created_empty: bool,
}

/// Reads the store's identity, making one when there is none: `uuid` gives
/// the 16 random bytes, `now_ms` the incarnation. A store that has data but
/// no identity (written before identities) gets one and is not empty.
pub fn load_or_create(
    engine: &dyn Engine,
    uuid: impl FnOnce() -> [u8; 16],
    now_ms: u64,
) -> Result<Opened, StorageError> {
    if let Some(bytes) = engine.get(Cf::Meta, IDENTITY_KEY)? {
        let identity = crate::codec::open(&bytes)
            .ok()
            .and_then(|p| serde_json::from_slice::<StoreIdentity>(p).ok())
            .filter(|i| i.uuid.len() == 32 && i.uuid.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| StorageError::Read {
                cf: Cf::Meta,
                reason: "the store identity (meta key store/identity) is corrupt: refusing to guess one, \
                         since a new identity would make this store a new incarnation"
                    .into(),
            })?;
        return Ok(Opened { identity, created_empty: false });
    }
    let mut empty = true;
    for cf in [Cf::Data, Cf::ReplLog, Cf::Meta, Cf::Raft] {
        if engine.last(cf)?.is_some() {
            empty = false;
        }
    }
    let identity = StoreIdentity { uuid: hex::encode(uuid()), incarnation: now_ms };
    let json = serde_json::to_vec(&identity)
        .map_err(|e| StorageError::Write { ops: 1, reason: format!("store identity: {e}") })?;
    let mut batch = WriteBatch::new();
    batch.put(Cf::Meta, IDENTITY_KEY.to_vec(), crate::codec::seal(&json));
    engine.write(batch, true)?;
    Ok(Opened { identity, created_empty: empty })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryEngine;

    #[test]
    fn made_once_then_read_back() {
        let engine = MemoryEngine::new();
        let first = load_or_create(&engine, || [7; 16], 1_000).unwrap();
        assert!(first.created_empty);
        assert_eq!(first.identity.uuid, "07".repeat(16));
        assert_eq!(first.identity.tag(), format!("{:016x}-{}", 1_000, "07".repeat(16)));
        let again = load_or_create(&engine, || [9; 16], 2_000).unwrap();
        assert_eq!(again, Opened { identity: first.identity.clone(), created_empty: false });
        assert_eq!(first.identity.write_actor("eu/n1"), "eu/n1~07070707");
    }

    #[test]
    fn a_store_with_data_but_no_identity_is_not_empty() {
        let engine = MemoryEngine::new();
        let mut b = WriteBatch::new();
        b.put(Cf::Data, b"k".to_vec(), b"v".to_vec());
        engine.write(b, true).unwrap();
        assert!(!load_or_create(&engine, || [1; 16], 5).unwrap().created_empty);
    }

    #[test]
    fn later_incarnations_sort_after() {
        let a = StoreIdentity { uuid: "f".repeat(32), incarnation: 9 };
        let b = StoreIdentity { uuid: "0".repeat(32), incarnation: 10 };
        assert!(a.tag() < b.tag());
    }

    #[test]
    fn a_corrupt_identity_is_an_error() {
        let engine = MemoryEngine::new();
        let mut b = WriteBatch::new();
        b.put(Cf::Meta, IDENTITY_KEY.to_vec(), b"junk".to_vec());
        engine.write(b, true).unwrap();
        assert!(load_or_create(&engine, || [1; 16], 5).is_err());
    }
}
