//! Conflict-free replicated data types: values whose replicas converge by
//! merging states in any order, without coordination.
//!
//! - [`DvvSet`] (also [`MvRegister`]): keeps concurrent writes as siblings.
//! - [`LwwRegister`]: the write with the highest HLC stamp wins.
//! - [`PnCounter`]: increments and decrements from any region.
//! - [`OrSet`]: an add-wins observed-remove set without tombstones (ORSWOT).

use std::collections::{BTreeMap, BTreeSet};

use super::dvv::DvvSet;
use super::hlc::HlcTimestamp;
use super::vv::{Actor, Dot, VersionVector};

/// A state that converges by merging.
///
/// `merge` must make the states a join-semilattice; for every reachable
/// state `a`, `b`, `c`:
///
/// - commutative: `a ⊔ b == b ⊔ a`, so the order replicas exchange states in
///   does not matter;
/// - associative: `(a ⊔ b) ⊔ c == a ⊔ (b ⊔ c)`, so states may be relayed
///   through any region;
/// - idempotent: `a ⊔ a == a`, so a replication entry applied twice changes
///   nothing.
///
/// Together they make every replica that has received the same states equal,
/// whatever was lost, duplicated or reordered on the way. The property tests
/// in `causality/tests.rs` check all three for every implementation.
pub trait Crdt {
    /// Folds `other` into `self`, so `self` becomes `self ⊔ other`.
    fn merge(&mut self, other: &Self);
}

/// The multi-value register of the design is the dotted version vector set.
pub type MvRegister = DvvSet;

impl Crdt for DvvSet {
    fn merge(&mut self, other: &Self) {
        DvvSet::merge(self, other);
    }
}

/// A last-writer-wins register: the write with the highest
/// `(hlc, actor, value)` wins.
///
/// The actor breaks ties between nodes that stamp the same HLC; the value
/// breaks the tie that cannot happen between correct nodes, so merge stays
/// commutative even then. The never-written register (stamp 0, no actor)
/// loses to every write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LwwRegister {
    /// Stamp of the winning write.
    pub(super) hlc: HlcTimestamp,
    /// Node that accepted the winning write; empty only when never written.
    pub(super) actor: Actor,
    /// The winning value, `None` when deleted or never written.
    pub(super) value: Option<Vec<u8>>,
    /// Wall-clock millisecond after which the value is invisible; 0 = never.
    pub(super) expires_ms: u64,
}

impl LwwRegister {
    /// A register holding one write.
    pub fn new(actor: impl Into<Actor>, value: Option<Vec<u8>>, hlc: HlcTimestamp) -> Self {
        let actor = actor.into();
        debug_assert!(!actor.is_empty(), "a write needs an actor");
        Self { hlc, actor, value, expires_ms: 0 }
    }

    /// This register's value expiring at `expires_ms` (0 = never).
    pub fn expiring(mut self, expires_ms: u64) -> Self {
        self.expires_ms = expires_ms;
        self
    }

    /// The value a reader at wall-clock millisecond `now_ms` sees: `None`
    /// when deleted, never written or expired.
    pub fn visible_value(&self, now_ms: u64) -> Option<&[u8]> {
        if self.expires_ms != 0 && self.expires_ms <= now_ms {
            return None;
        }
        self.value.as_deref()
    }

    /// When the value expires (0 = never).
    pub fn expires_ms(&self) -> u64 {
        self.expires_ms
    }

    /// Drops the value if it was written at or before HLC stamp `fence`,
    /// keeping the stamp; returns the bytes dropped.
    pub fn strip_through(&mut self, fence: HlcTimestamp) -> usize {
        if self.hlc <= fence {
            self.value.take().map_or(0, |v| v.len())
        } else {
            0
        }
    }

    /// Drops the value if it expired at `now_ms`, keeping the stamp so an
    /// older write arriving later still loses. Returns whether it did.
    pub fn strip_expired(&mut self, now_ms: u64) -> bool {
        let expired = self.value.is_some() && self.visible_value(now_ms).is_none();
        if expired {
            self.value = None;
        }
        expired
    }

    /// Writes `value` (`None` deletes) stamped `hlc`; returns whether it won,
    /// which it does unless the register already holds a later stamp.
    pub fn set(&mut self, actor: &str, value: Option<Vec<u8>>, hlc: HlcTimestamp) -> bool {
        let write = Self::new(actor, value, hlc);
        let wins = write.order_key() > self.order_key();
        if wins {
            *self = write;
        }
        wins
    }

    /// Merges like [`Crdt::merge`] and returns true when a different value
    /// (or a delete) was discarded, to count overwrite conflicts.
    ///
    /// The register carries no causal history, so it cannot tell a
    /// concurrent write from an older one: the count is an upper bound on
    /// the concurrent overwrites.
    pub fn merge_reporting(&mut self, other: &Self) -> bool {
        let other_wins = other.order_key() > self.order_key();
        let loser = if other_wins { &*self } else { other };
        let winner = if other_wins { other } else { &*self };
        let discarded = !loser.is_unset() && loser.value != winner.value;
        if other_wins {
            *self = other.clone();
        }
        discarded
    }

    /// The current value, `None` when deleted or never written.
    pub fn value(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }

    /// Stamp of the winning write.
    pub fn hlc(&self) -> HlcTimestamp {
        self.hlc
    }

    /// Node that accepted the winning write.
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// Whether nobody has written the register yet.
    pub fn is_unset(&self) -> bool {
        self.actor.is_empty() && self.hlc == HlcTimestamp::default() && self.value.is_none()
    }

    /// Later stamp wins; for the same write, its stripped (expired) copy
    /// wins over its value, so replicas converge after compaction.
    fn order_key(&self) -> (HlcTimestamp, &str, bool, Option<&[u8]>) {
        (self.hlc, &self.actor, self.value.is_none() && !self.is_unset(), self.value.as_deref())
    }
}

impl Crdt for LwwRegister {
    fn merge(&mut self, other: &Self) {
        self.merge_reporting(other);
    }
}

/// A counter that any region may increment or decrement.
///
/// Each actor keeps its own running totals of increments and decrements,
/// which only grow, so merge is a pointwise maximum. Totals saturate at
/// `u64::MAX` and the value saturates at the `i64` range: a counter driven
/// past its range sticks at the end instead of wrapping or panicking.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PnCounter {
    /// Per actor, the sum of positive deltas it accepted; never 0.
    pub(super) increments: BTreeMap<Actor, u64>,
    /// Per actor, the sum of the magnitudes of negative deltas; never 0.
    pub(super) decrements: BTreeMap<Actor, u64>,
}

impl PnCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `delta` (negative to decrement) as accepted by `actor`.
    pub fn add(&mut self, actor: &str, delta: i64) {
        debug_assert!(!actor.is_empty(), "a delta needs an actor");
        let totals = match delta.cmp(&0) {
            std::cmp::Ordering::Greater => &mut self.increments,
            std::cmp::Ordering::Less => &mut self.decrements,
            // Recording a zero would break the "never 0" invariant.
            std::cmp::Ordering::Equal => return,
        };
        let total = totals.entry(actor.to_owned()).or_insert(0);
        *total = total.saturating_add(delta.unsigned_abs());
    }

    /// The counter's value, clamped to the `i64` range.
    pub fn value(&self) -> i64 {
        // Each total fits in an i128 and there are far fewer than 2^63
        // actors, so these sums cannot overflow; saturating anyway.
        let sum = |totals: &BTreeMap<Actor, u64>| {
            totals.values().fold(0i128, |acc, &total| acc.saturating_add(i128::from(total)))
        };
        let value = sum(&self.increments).saturating_sub(sum(&self.decrements));
        i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
    }
}

impl Crdt for PnCounter {
    fn merge(&mut self, other: &Self) {
        merge_max(&mut self.increments, &other.increments);
        merge_max(&mut self.decrements, &other.decrements);
    }
}

fn merge_max(mine: &mut BTreeMap<Actor, u64>, theirs: &BTreeMap<Actor, u64>) {
    for (actor, &total) in theirs {
        let entry = mine.entry(actor.clone()).or_insert(0);
        *entry = (*entry).max(total);
    }
}

/// An add-wins observed-remove set without tombstones (ORSWOT, as in Riak).
///
/// Each add is an event with a dot; a member is present while one of its
/// add dots is. A remove drops the dots it observed, and the clock still
/// covers them, so a merge does not bring them back; an add the remove did
/// not observe keeps a dot the clock does not cover, so a concurrent add
/// wins over a remove.
///
/// A remove carrying a context drops only the dots both it and this replica
/// hold: an add the context saw but that has not reached this replica yet
/// survives the remove (add wins), instead of being deferred as Riak does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrSet {
    /// Every add this replica has seen, removed or not.
    pub(super) clock: VersionVector,
    /// Present members and the dots of the adds that keep them present;
    /// every dot is covered by `clock` and no set is empty.
    pub(super) entries: BTreeMap<Vec<u8>, BTreeSet<Dot>>,
}

impl OrSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `member` as `actor` and returns the add's dot.
    ///
    /// The new dot replaces the member's earlier dots: this replica has
    /// seen them, so they add nothing, and dropping them keeps the state
    /// to one dot per member per concurrent add.
    pub fn add(&mut self, actor: &str, member: Vec<u8>) -> Dot {
        let dot = self.clock.increment(actor);
        self.entries.insert(member, BTreeSet::from([dot.clone()]));
        dot
    }

    /// Removes `member`; returns whether anything was removed.
    ///
    /// With `observed` = `None`, every add this replica holds is removed.
    /// With a context, only the adds that context covers are, so an add the
    /// client did not see keeps the member.
    pub fn remove(&mut self, member: &[u8], observed: Option<&VersionVector>) -> bool {
        let Some(dots) = self.entries.get_mut(member) else {
            return false;
        };
        let before = dots.len();
        match observed {
            None => dots.clear(),
            Some(context) => dots.retain(|dot| !context.covers(dot)),
        }
        let removed = dots.len() < before;
        if dots.is_empty() {
            self.entries.remove(member);
        }
        removed
    }

    /// Present members in byte order.
    pub fn members(&self) -> Vec<&[u8]> {
        self.entries.keys().map(Vec::as_slice).collect()
    }

    /// Whether `member` is present.
    pub fn contains(&self, member: &[u8]) -> bool {
        self.entries.contains_key(member)
    }

    /// Number of present members.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no member is present.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The causal context to hand to a reader, for a later remove.
    pub fn context(&self) -> &VersionVector {
        &self.clock
    }
}

impl Crdt for OrSet {
    fn merge(&mut self, other: &Self) {
        let members: BTreeSet<&Vec<u8>> = self.entries.keys().chain(other.entries.keys()).collect();
        let none = BTreeSet::new();
        let mut merged = BTreeMap::new();
        for member in members {
            let ours = self.entries.get(member).unwrap_or(&none);
            let theirs = other.entries.get(member).unwrap_or(&none);
            // A dot held by one side only survives if the other side has
            // not seen it; if it has, it was removed there.
            let kept: BTreeSet<Dot> = ours
                .iter()
                .filter(|dot| theirs.contains(*dot) || !other.clock.covers(dot))
                .chain(theirs.iter().filter(|dot| !ours.contains(*dot) && !self.clock.covers(dot)))
                .cloned()
                .collect();
            if !kept.is_empty() {
                merged.insert(member.clone(), kept);
            }
        }
        self.entries = merged;
        self.clock.merge(&other.clock);
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

    fn merged<T: Crdt + Clone>(a: &T, b: &T) -> T {
        let mut out = a.clone();
        out.merge(b);
        out
    }

    #[test]
    fn lww_highest_stamp_wins_then_actor_breaks_ties() {
        let older = LwwRegister::new(EU, Some(b"old".to_vec()), ts(1));
        let newer = LwwRegister::new(US, Some(b"new".to_vec()), ts(2));
        assert_eq!(merged(&older, &newer).value(), Some(&b"new"[..]));
        assert_eq!(merged(&newer, &older).value(), Some(&b"new"[..]));

        let eu = LwwRegister::new(EU, Some(b"eu".to_vec()), ts(5));
        let us = LwwRegister::new(US, Some(b"us".to_vec()), ts(5));
        assert_eq!(merged(&eu, &us).value(), Some(&b"us"[..]));
        assert_eq!(merged(&us, &eu).value(), Some(&b"us"[..]));
    }

    #[test]
    fn lww_set_reports_whether_the_write_won() {
        let mut reg = LwwRegister::default();
        assert!(reg.is_unset());
        assert!(reg.set(EU, Some(b"a".to_vec()), ts(10)));
        assert!(!reg.set(US, Some(b"stale".to_vec()), ts(9)));
        assert_eq!(reg.value(), Some(&b"a"[..]));
        assert!(reg.set(US, None, ts(11)));
        assert_eq!(reg.value(), None);
        assert_eq!(reg.actor(), US);
        assert_eq!(reg.hlc(), ts(11));
    }

    #[test]
    fn lww_merge_reporting_counts_discarded_values_only() {
        let a = LwwRegister::new(EU, Some(b"a".to_vec()), ts(1));
        let b = LwwRegister::new(US, Some(b"b".to_vec()), ts(2));
        let b_again = LwwRegister::new(EU, Some(b"b".to_vec()), ts(3));

        let mut reg = a.clone();
        assert!(reg.merge_reporting(&b), "a was discarded");
        let mut reg2 = b.clone();
        assert!(reg2.merge_reporting(&a), "incoming a was discarded");
        assert_eq!(reg, reg2);

        let mut same = b.clone();
        assert!(!same.merge_reporting(&b_again), "the value did not change");
        let mut fresh = LwwRegister::default();
        assert!(!fresh.merge_reporting(&a), "nothing was written before");
        let mut idem = a.clone();
        assert!(!idem.merge_reporting(&a));

        let delete = LwwRegister::new(US, None, ts(9));
        let mut deleted = a.clone();
        assert!(deleted.merge_reporting(&delete), "the delete discarded a value");
    }

    #[test]
    fn counter_concurrent_adds_merge_to_the_sum() {
        let mut eu = PnCounter::new();
        let mut us = PnCounter::new();
        eu.add(EU, 5);
        eu.add(EU, -2);
        us.add(US, 10);
        us.add(US, -1);
        us.add(US, 0);
        let total = merged(&eu, &us);
        assert_eq!(total.value(), 12);
        assert_eq!(total, merged(&us, &eu));
        // Replaying a state changes nothing.
        assert_eq!(merged(&total, &eu).value(), 12);
    }

    #[test]
    fn counter_saturates_instead_of_panicking() {
        let mut up = PnCounter::new();
        up.add(EU, i64::MAX);
        up.add(EU, i64::MAX);
        up.add(EU, i64::MAX);
        up.add(US, i64::MAX);
        assert_eq!(up.value(), i64::MAX);

        let mut down = PnCounter::new();
        down.add(EU, i64::MIN);
        down.add(US, i64::MIN);
        down.add(US, i64::MIN);
        assert_eq!(down.value(), i64::MIN);

        let mut exact = PnCounter::new();
        exact.add(EU, i64::MIN);
        assert_eq!(exact.value(), i64::MIN);
        exact.add(US, i64::MAX);
        assert_eq!(exact.value(), -1);
    }

    #[test]
    fn or_set_add_wins_over_a_concurrent_remove() {
        let mut eu = OrSet::new();
        eu.add(EU, b"apple".to_vec());
        let mut us = eu.clone();

        assert!(eu.remove(b"apple", None));
        assert!(!eu.contains(b"apple"));
        us.add(US, b"apple".to_vec());

        let converged = merged(&eu, &us);
        assert_eq!(converged, merged(&us, &eu));
        assert!(converged.contains(b"apple"));
    }

    #[test]
    fn or_set_remove_of_an_observed_add_sticks() {
        let mut eu = OrSet::new();
        eu.add(EU, b"apple".to_vec());
        eu.add(EU, b"pear".to_vec());
        let stale = eu.clone();
        assert!(eu.remove(b"apple", None));
        assert!(!eu.remove(b"apple", None), "nothing left to remove");
        let converged = merged(&stale, &eu);
        assert_eq!(converged.members(), vec![&b"pear"[..]]);
        assert_eq!(converged.len(), 1);
    }

    #[test]
    fn or_set_remove_with_context_spares_unseen_adds() {
        let mut eu = OrSet::new();
        eu.add(EU, b"apple".to_vec());
        let seen = eu.context().clone();
        let mut us = eu.clone();
        us.add(US, b"apple".to_vec());
        eu.merge(&us);

        // The client only saw eu-west's add, so us-east's add keeps apple.
        assert!(!eu.remove(b"apple", Some(&seen)), "the seen add was already superseded");
        assert!(eu.contains(b"apple"));
        let now = eu.context().clone();
        assert!(eu.remove(b"apple", Some(&now)));
        assert!(eu.is_empty());
    }

    #[test]
    fn or_set_members_are_sorted_and_re_add_works() {
        let mut set = OrSet::new();
        for member in [b"c".to_vec(), b"a".to_vec(), b"b".to_vec()] {
            set.add(EU, member);
        }
        assert_eq!(set.members(), vec![&b"a"[..], &b"b"[..], &b"c"[..]]);
        set.remove(b"b", None);
        set.add(US, b"b".to_vec());
        assert!(set.contains(b"b"));
        assert_eq!(set.len(), 3);
    }
}
