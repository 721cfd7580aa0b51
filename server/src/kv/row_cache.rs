//! The committer's cache of rows it wrote (docs/architecture.md section 5,
//! docs/decisions/043-row-cache-and-shared-connections.md).
//!
//! Every write reads its row before merging into it. Under load that read
//! was the preparing thread's largest cost: a RocksDB point lookup that
//! walks a memtable holding every recent version of every hot row, then a
//! decode. The committer is the only writer of the `data` column family,
//! so the rows it wrote last are the rows the store holds, and it can keep
//! them decoded.
//!
//! What keeps that true:
//! - Rows enter only from groups the syncer has settled as written (the
//!   overlays of groups still on their way are read before the cache), in
//!   the order the groups were written.
//! - Every `data` key a group writes or deletes is dropped from the cache
//!   when the group is prepared, so a cached row is never older than one
//!   staged after it, whatever staged it.
//! - A failed group clears the whole cache with the overlays.
//! - Compaction rewrites rows only to strip what reads already hide
//!   (expired and erased values), and erasure goes through the committer;
//!   a cached row is a row the store held before such a rewrite, which is
//!   what a read before the compaction would have returned.
//!
//! A row is taken out of the cache when a group reads it to write it, and
//! comes back, as written, when that group settles: no row is copied.
//!
//! Bounded by bytes (the rows' encoded sizes plus their keys): two
//! generations, the newer taking every insert; when it fills, the older is
//! dropped and the newer becomes the older. That approximates
//! least-recently-used with O(1) work per operation and no per-entry links.

use std::collections::HashMap;

use super::row::Row;

/// Bytes charged per entry beyond its key and encoded row: the map's slot
/// and the decoded row's own allocations, roughly.
const ENTRY_OVERHEAD: usize = 96;

struct Entry {
    row: Row,
    bytes: usize,
}

#[derive(Default)]
struct Generation {
    rows: HashMap<Vec<u8>, Entry>,
    bytes: usize,
}

impl Generation {
    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let e = self.rows.remove(key)?;
        self.bytes -= e.bytes;
        Some(e)
    }
}

/// Decoded rows by data key, at most `bytes_max` bytes in all (0: off).
pub struct RowCache {
    newer: Generation,
    older: Generation,
    bytes_max: usize,
    hits: u64,
    misses: u64,
    /// Frees dropped generations on a thread of its own: freeing a
    /// generation of a 64 MiB cache is a hundred thousand rows, tens of
    /// milliseconds the committer would otherwise stall for.
    dropper: Option<std::sync::mpsc::SyncSender<Generation>>,
}

/// Generations waiting for the dropper; past that they are freed inline,
/// so a cache churning faster than it can be freed slows its writer
/// instead of holding more memory.
const DROPS_QUEUED_MAX: usize = 2;

impl RowCache {
    pub fn new(bytes_max: usize) -> Self {
        Self {
            newer: Generation::default(),
            older: Generation::default(),
            bytes_max,
            hits: 0,
            misses: 0,
            dropper: None,
        }
    }

    /// Whether the cache keeps anything (`storage.row_cache_mib` > 0).
    pub fn enabled(&self) -> bool {
        self.bytes_max > 0
    }

    /// Takes the cached row of `key` out of the cache: the caller is about
    /// to write the row, and the written row comes back when its group
    /// settles (so no copy is made).
    pub fn take(&mut self, key: &[u8]) -> Option<Row> {
        if self.bytes_max == 0 {
            return None;
        }
        match self.newer.remove(key).or_else(|| self.older.remove(key)) {
            Some(e) => {
                self.hits += 1;
                Some(e.row)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Caches `row` as the stored row of `key`, its encoded form
    /// `encoded_bytes` long. A row larger than a generation is not kept.
    pub fn put(&mut self, key: Vec<u8>, row: Row, encoded_bytes: usize) {
        if self.bytes_max == 0 {
            return;
        }
        self.older.remove(&key);
        let bytes = key.len() + encoded_bytes + ENTRY_OVERHEAD;
        if bytes > self.generation_max() {
            self.newer.remove(&key);
            return;
        }
        self.admit(key, Entry { row, bytes });
    }

    /// Forgets `key` (written or deleted by a group not yet settled).
    pub fn forget(&mut self, key: &[u8]) {
        self.newer.remove(key);
        self.older.remove(key);
    }

    /// Forgets every row.
    pub fn clear(&mut self) {
        let newer = std::mem::take(&mut self.newer);
        let older = std::mem::take(&mut self.older);
        self.discard(newer);
        self.discard(older);
    }

    /// Bytes held, both generations.
    pub fn bytes(&self) -> usize {
        self.newer.bytes + self.older.bytes
    }

    pub fn len(&self) -> usize {
        self.newer.rows.len() + self.older.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hits and misses since the last call.
    pub fn take_counts(&mut self) -> (u64, u64) {
        (std::mem::take(&mut self.hits), std::mem::take(&mut self.misses))
    }

    /// Frees `g` on the dropper thread (started on first use), or here
    /// when it is busy or cannot be started.
    fn discard(&mut self, g: Generation) {
        if g.rows.is_empty() {
            return;
        }
        if self.dropper.is_none() {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Generation>(DROPS_QUEUED_MAX);
            let started = std::thread::Builder::new()
                .name("geokv-row-drop".into())
                // Ends when the cache, and with it the sender, is dropped.
                .spawn(move || rx.into_iter().for_each(drop));
            if started.is_ok() {
                self.dropper = Some(tx);
            }
        }
        if let Some(tx) = &self.dropper {
            if let Err(
                std::sync::mpsc::TrySendError::Full(g) | std::sync::mpsc::TrySendError::Disconnected(g),
            ) = tx.try_send(g)
            {
                drop(g);
            }
        }
    }

    fn generation_max(&self) -> usize {
        self.bytes_max / 2
    }

    fn admit(&mut self, key: Vec<u8>, entry: Entry) {
        if self.newer.bytes + entry.bytes > self.generation_max() {
            let dropped = std::mem::replace(&mut self.older, std::mem::take(&mut self.newer));
            self.discard(dropped);
        }
        self.newer.bytes += entry.bytes;
        if let Some(old) = self.newer.rows.insert(key, entry) {
            self.newer.bytes -= old.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causality::PnCounter;
    use crate::kv::row::RowValue;

    fn row(n: i64) -> Row {
        let mut c = PnCounter::default();
        c.add("a", n);
        Row {
            home_region: "r".into(),
            zone: String::new(),
            epoch: 1,
            hlc: n as u64,
            value: RowValue::Counter(c),
        }
    }

    fn key(i: usize) -> Vec<u8> {
        format!("t\0k{i:05}").into_bytes()
    }

    #[test]
    fn a_cached_row_is_taken_once_and_forgotten_when_told() {
        let mut c = RowCache::new(1 << 20);
        c.put(key(1), row(1), 10);
        c.put(key(1), row(2), 10);
        assert_eq!(c.take(&key(1)), Some(row(2)), "the later row replaces the earlier");
        assert_eq!(c.take(&key(1)), None, "taken out");
        c.put(key(2), row(2), 10);
        c.forget(&key(2));
        assert_eq!(c.take(&key(2)), None);
        assert_eq!(c.take_counts(), (1, 2));
        assert_eq!(c.bytes(), 0, "nothing held, nothing charged");
    }

    #[test]
    fn the_bytes_held_stay_under_the_bound_and_recent_rows_stay() {
        let max = 64 * 1024;
        let mut c = RowCache::new(max);
        for i in 0..10_000 {
            c.put(key(i), row(i as i64), 100);
            assert!(c.bytes() <= max, "{} bytes held after {i} rows, bound {max}", c.bytes());
            // A row written often stays however many others pass through.
            let hot = c.take(&key(0)).unwrap_or_else(|| panic!("the hot row was evicted after {i} rows"));
            c.put(key(0), hot, 100);
        }
        assert!(c.take(&key(9_999)).is_some(), "the newest row is cached");
        assert!(c.take(&key(1)).is_none(), "an old cold row was evicted");
        let per_entry = key(0).len() + 100 + ENTRY_OVERHEAD;
        assert!(c.len() * per_entry <= max && c.len() * per_entry * 4 >= max, "{} rows held", c.len());
    }

    #[test]
    fn a_row_larger_than_a_generation_is_not_kept_and_drops_its_older_copy() {
        let mut c = RowCache::new(1000);
        c.put(key(1), row(1), 10);
        c.put(key(1), row(2), 2_000);
        assert_eq!(c.take(&key(1)), None, "neither the large row nor the stale small one");
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn off_keeps_nothing() {
        let mut c = RowCache::new(0);
        c.put(key(1), row(1), 10);
        assert_eq!(c.take(&key(1)), None);
        assert!(c.is_empty());
    }
}
