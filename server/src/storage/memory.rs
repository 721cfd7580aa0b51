//! An in-memory engine for deterministic simulation tests. It has the same
//! semantics as RocksDB for everything the node uses, but forgets all on drop.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use super::{BatchOp, Cf, Engine, KvPair, KvPairs, Snapshot, StorageError, Visit, WriteBatch};

/// Every column family's ordered map.
type Families = BTreeMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>;

/// Column families as ordered maps behind one lock, so a batch is atomic.
#[derive(Default)]
pub struct MemoryEngine {
    cfs: Mutex<Families>,
}

impl MemoryEngine {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Families> {
        // A poisoned lock means a panic mid-batch elsewhere; the maps are
        // still consistent because batches are applied after validation.
        self.cfs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Engine for MemoryEngine {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock().get(&cf).and_then(|m| m.get(key).cloned()))
    }

    fn sync(&self) -> Result<(), StorageError> {
        // Nothing to put on disk: the memory engine is for simulation only.
        Ok(())
    }

    fn write(&self, batch: WriteBatch, _sync: bool) -> Result<(), StorageError> {
        let mut cfs = self.lock();
        for op in batch.ops {
            match op {
                BatchOp::Put { cf, key, value } => {
                    cfs.entry(cf).or_default().insert(key, value);
                }
                BatchOp::Delete { cf, key } => {
                    cfs.entry(cf).or_default().remove(&key);
                }
                BatchOp::DeleteRange { cf, start, end } => {
                    let map = cfs.entry(cf).or_default();
                    if start < end {
                        let doomed: Vec<Vec<u8>> = map.range(start..end).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            map.remove(&k);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, StorageError> {
        let cfs = self.lock();
        let Some(map) = cfs.get(&cf) else { return Ok(Vec::new()) };
        let upper = match end {
            Some(e) => Bound::Excluded(e.to_vec()),
            None => Bound::Unbounded,
        };
        Ok(map
            .range((Bound::Included(start.to_vec()), upper))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last(&self, cf: Cf) -> Result<Option<KvPair>, StorageError> {
        Ok(self.lock().get(&cf).and_then(|m| m.iter().next_back().map(|(k, v)| (k.clone(), v.clone()))))
    }

    fn snapshot(&self) -> Box<dyn Snapshot + '_> {
        self.snapshot_copy()
    }

    fn snapshot_owned(self: Arc<Self>) -> Box<dyn Snapshot + Send + Sync> {
        self.snapshot_copy()
    }
}

impl MemoryEngine {
    /// A point-in-time view, as a copy: the memory engine holds
    /// simulation-sized stores only.
    pub fn snapshot_copy(&self) -> Box<dyn Snapshot + Send + Sync> {
        Box::new(MemorySnapshot(self.lock().clone()))
    }
}

/// A copy of every column family at one point in time.
struct MemorySnapshot(Families);

impl Snapshot for MemorySnapshot {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.0.get(&cf).and_then(|m| m.get(key).cloned()))
    }

    fn for_each(
        &self,
        cf: Cf,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut Visit<'_>,
    ) -> Result<(), StorageError> {
        let Some(map) = self.0.get(&cf) else { return Ok(()) };
        let upper = match end {
            Some(e) => Bound::Excluded(e.to_vec()),
            None => Bound::Unbounded,
        };
        for (k, v) in map.range((Bound::Included(start.to_vec()), upper)) {
            if !visit(k, v)? {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, cf: Cf) -> Result<Option<KvPair>, StorageError> {
        Ok(self.0.get(&cf).and_then(|m| m.iter().next_back().map(|(k, v)| (k.clone(), v.clone()))))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conforms() {
        super::super::conformance::check(&super::MemoryEngine::new());
    }
}
