//! Dotted version vector set: a multi-value register that keeps concurrent
//! writes as siblings instead of silently dropping one (the approach of Riak
//! and Garage's K2V).
//!
//! A read returns the live siblings and the set's clock as an opaque causal
//! context. A write that carries that context replaces exactly the siblings
//! the reader saw; a sibling written concurrently, which the context does not
//! cover, survives next to the new value. A delete is a write of a
//! tombstone, so it also replaces only what was seen and a concurrent write
//! is not lost.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use super::hlc::HlcTimestamp;
use super::vv::{Dot, VersionVector};

/// One value of a [`DvvSet`], named by the dot of the write that made it.
///
/// Fields are ordered so the derived ordering sorts by dot first; it breaks
/// ties between two siblings with the same dot deterministically, which
/// keeps merge commutative even on corrupt input.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sibling {
    /// The write that produced this value.
    pub dot: Dot,
    /// HLC stamp of that write, for display and for collecting tombstones.
    pub hlc: HlcTimestamp,
    /// The value, or `None` for a delete (tombstone).
    pub value: Option<Vec<u8>>,
    /// Wall-clock millisecond after which the value is invisible (its
    /// write's HLC time plus its TTL); 0 = never (docs/architecture.md
    /// section 13).
    pub expires_ms: u64,
}

impl Sibling {
    /// Whether this sibling records a delete.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Whether the value has expired at wall-clock millisecond `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && self.expires_ms <= now_ms
    }

    /// A value a reader at `now_ms` sees: neither deleted nor expired.
    pub fn is_visible(&self, now_ms: u64) -> bool {
        !self.is_tombstone() && !self.is_expired(now_ms)
    }

    /// Of two copies of the same write, the one both replicas keep: a
    /// tombstone (an expired value stripped by compaction) over its value,
    /// else the larger, so merge stays commutative even on corrupt input.
    fn preferred_over(&self, other: &Self) -> bool {
        match (self.is_tombstone(), other.is_tombstone()) {
            (true, false) => true,
            (false, true) => false,
            _ => self > other,
        }
    }
}

/// A multi-value register: concurrent values with the history they share.
///
/// Invariants: every sibling's dot is covered by `clock`, no two siblings
/// share a dot, and siblings are sorted by dot. The last keeps equal states
/// equal under `==`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DvvSet {
    /// Every write this replica has seen, superseded or not.
    pub(super) clock: VersionVector,
    /// Writes not yet superseded by a later write that saw them.
    pub(super) siblings: Vec<Sibling>,
}

impl DvvSet {
    /// A register nobody has written.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `value` (`None` deletes) as `actor`, replacing the siblings
    /// that `context` covers, and returns the new write's dot.
    ///
    /// `context` is what the client read, so the write supersedes what the
    /// client saw and nothing else. An empty context (a blind write) adds a
    /// sibling next to every existing one.
    pub fn write(
        &mut self,
        actor: &str,
        context: &VersionVector,
        value: Option<Vec<u8>>,
        hlc: HlcTimestamp,
    ) -> Dot {
        self.write_expiring(actor, context, value, hlc, 0)
    }

    /// [`DvvSet::write`] of a value that expires at `expires_ms` (0 = never).
    pub fn write_expiring(
        &mut self,
        actor: &str,
        context: &VersionVector,
        value: Option<Vec<u8>>,
        hlc: HlcTimestamp,
        expires_ms: u64,
    ) -> Dot {
        self.siblings.retain(|sibling| !context.covers(&sibling.dot));
        self.clock.merge(context);
        let dot = self.clock.increment(actor);
        let sibling = Sibling { dot: dot.clone(), hlc, value, expires_ms };
        let at = self.siblings.partition_point(|s| s.dot < sibling.dot);
        self.siblings.insert(at, sibling);
        dot
    }

    /// Folds in another replica's state.
    ///
    /// A sibling survives unless the other side has seen its write (its
    /// clock covers the dot) and no longer holds it, which means a later
    /// write there superseded it.
    pub fn merge(&mut self, other: &Self) {
        let mut merged: BTreeMap<Dot, Sibling> = BTreeMap::new();
        for sibling in &self.siblings {
            if !other.clock.covers(&sibling.dot) || other.holds(&sibling.dot) {
                merged.insert(sibling.dot.clone(), sibling.clone());
            }
        }
        for sibling in &other.siblings {
            if self.clock.covers(&sibling.dot) && !self.holds(&sibling.dot) {
                continue;
            }
            match merged.entry(sibling.dot.clone()) {
                Entry::Vacant(slot) => {
                    slot.insert(sibling.clone());
                }
                // The same write on both sides; they agree unless one was
                // stripped after expiring (the tombstone wins) or a record
                // was corrupted (the larger wins on either side).
                Entry::Occupied(mut slot) => {
                    if sibling.preferred_over(slot.get()) {
                        slot.insert(sibling.clone());
                    }
                }
            }
        }
        self.siblings = merged.into_values().collect();
        self.clock.merge(&other.clock);
    }

    /// The values of non-tombstone siblings, ordered by dot so every replica
    /// lists the same state the same way.
    pub fn live_values(&self) -> Vec<&[u8]> {
        self.live_siblings().filter_map(|sibling| sibling.value.as_deref()).collect()
    }

    /// Non-tombstone siblings, ordered by dot.
    pub fn live_siblings(&self) -> impl Iterator<Item = &Sibling> + '_ {
        self.siblings.iter().filter(|sibling| !sibling.is_tombstone())
    }

    /// Siblings a reader at wall-clock millisecond `now_ms` sees: neither
    /// tombstones nor expired, ordered by dot.
    pub fn visible_siblings(&self, now_ms: u64) -> impl Iterator<Item = &Sibling> + '_ {
        self.siblings.iter().filter(move |sibling| sibling.is_visible(now_ms))
    }

    /// Turns every value expired at `now_ms` into a tombstone of the same
    /// dot, keeping the clock, so the value's bytes leave the row while an
    /// older copy arriving later is still superseded. Returns how many.
    pub fn strip_expired(&mut self, now_ms: u64) -> usize {
        self.strip_where(|s| s.is_expired(now_ms)).0
    }

    /// Turns every value `which` picks into a tombstone of the same dot,
    /// keeping the clock (as [`DvvSet::strip_expired`]); returns how many
    /// values and how many value bytes left the row.
    pub fn strip_where(&mut self, which: impl Fn(&Sibling) -> bool) -> (usize, usize) {
        let (mut values, mut bytes) = (0, 0);
        for sibling in &mut self.siblings {
            if sibling.value.is_some() && which(sibling) {
                bytes += sibling.value.take().map_or(0, |v| v.len());
                values += 1;
            }
        }
        (values, bytes)
    }

    /// Every sibling, tombstones included, ordered by dot.
    pub fn siblings(&self) -> &[Sibling] {
        &self.siblings
    }

    /// The causal context to hand to a reader: every write this replica has
    /// seen.
    pub fn context(&self) -> &VersionVector {
        &self.clock
    }

    /// Whether no live value remains (never written, or deleted).
    pub fn is_deleted(&self) -> bool {
        self.live_siblings().next().is_none()
    }

    /// Number of siblings, tombstones included; more than one live sibling
    /// is a conflict the reader must resolve.
    pub fn sibling_count(&self) -> usize {
        self.siblings.len()
    }

    /// Whether this replica holds the sibling written as `dot`.
    fn holds(&self, dot: &Dot) -> bool {
        self.siblings.binary_search_by(|sibling| sibling.dot.cmp(dot)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EU: &str = "eu-west/n1";
    const US: &str = "us-east/n1";

    fn ts(ms: u64) -> HlcTimestamp {
        HlcTimestamp::from_parts(ms, 0)
    }

    fn val(text: &str) -> Option<Vec<u8>> {
        Some(text.as_bytes().to_vec())
    }

    fn merged(a: &DvvSet, b: &DvvSet) -> DvvSet {
        let mut out = a.clone();
        out.merge(b);
        out
    }

    #[test]
    fn blind_writes_become_siblings() {
        let mut eu = DvvSet::new();
        let mut us = DvvSet::new();
        eu.write(EU, &VersionVector::new(), val("x"), ts(1));
        us.write(US, &VersionVector::new(), val("y"), ts(2));
        let both = merged(&eu, &us);
        assert_eq!(both.live_values(), vec![&b"x"[..], &b"y"[..]]);
        assert_eq!(both.sibling_count(), 2);
        assert_eq!(both, merged(&us, &eu));

        // Two blind writes on one replica are concurrent as well.
        let mut one = DvvSet::new();
        one.write(EU, &VersionVector::new(), val("a"), ts(1));
        one.write(EU, &VersionVector::new(), val("b"), ts(2));
        assert_eq!(one.live_values(), vec![&b"a"[..], &b"b"[..]]);
    }

    #[test]
    fn write_with_context_supersedes_exactly_what_was_read() {
        let mut eu = DvvSet::new();
        eu.write(EU, &VersionVector::new(), val("v1"), ts(1));
        let mut us = eu.clone();

        // A client reads v1 from us-east...
        let context = us.context().clone();
        // ...while another client writes blind in eu-west, concurrently.
        eu.write(EU, &VersionVector::new(), val("v2"), ts(2));
        // The first client's write replaces v1 but cannot have seen v2.
        us.write(US, &context, val("v3"), ts(3));

        let converged = merged(&eu, &us);
        assert_eq!(converged, merged(&us, &eu));
        assert_eq!(converged.live_values(), vec![&b"v2"[..], &b"v3"[..]]);

        // A write with the converged context resolves the conflict.
        let mut resolved = converged.clone();
        resolved.write(EU, converged.context(), val("final"), ts(4));
        assert_eq!(resolved.live_values(), vec![&b"final"[..]]);
        assert_eq!(merged(&resolved, &eu), resolved);
        assert_eq!(merged(&us, &resolved), resolved);
    }

    #[test]
    fn delete_with_context_leaves_a_tombstone() {
        let mut eu = DvvSet::new();
        eu.write(EU, &VersionVector::new(), val("v1"), ts(1));
        let before_delete = eu.clone();
        let context = eu.context().clone();
        eu.write(EU, &context, None, ts(2));

        assert!(eu.is_deleted());
        assert!(eu.live_values().is_empty());
        assert_eq!(eu.sibling_count(), 1);
        assert!(eu.siblings()[0].is_tombstone());
        // The old value does not come back from a stale replica.
        assert!(merged(&before_delete, &eu).is_deleted());
        assert!(merged(&eu, &before_delete).is_deleted());
    }

    #[test]
    fn a_write_concurrent_with_a_delete_survives() {
        let mut eu = DvvSet::new();
        eu.write(EU, &VersionVector::new(), val("v1"), ts(1));
        let mut us = eu.clone();
        let context = eu.context().clone();
        eu.write(EU, &context, None, ts(2));
        us.write(US, &VersionVector::new(), val("v2"), ts(3));

        let converged = merged(&eu, &us);
        assert!(!converged.is_deleted());
        assert_eq!(converged.live_values(), vec![&b"v2"[..]]);
        assert_eq!(converged.sibling_count(), 2, "the tombstone stays until collected");
    }

    #[test]
    fn the_empty_register_is_deleted() {
        let empty = DvvSet::new();
        assert!(empty.is_deleted());
        assert_eq!(empty.sibling_count(), 0);
        assert!(empty.context().is_empty());
    }

    #[test]
    fn write_returns_the_new_dot_and_keeps_siblings_sorted() {
        let mut set = DvvSet::new();
        assert_eq!(set.write(US, &VersionVector::new(), val("u"), ts(1)), Dot::new(US, 1));
        assert_eq!(set.write(EU, &VersionVector::new(), val("e"), ts(2)), Dot::new(EU, 1));
        let dots: Vec<_> = set.siblings().iter().map(|s| s.dot.clone()).collect();
        assert_eq!(dots, vec![Dot::new(EU, 1), Dot::new(US, 1)]);
    }
}
