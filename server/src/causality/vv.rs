//! Version vectors and dots: which events each replica has seen.
//!
//! Every write is one event, named by a [`Dot`]: the node that accepted it
//! and that node's event counter. A [`VersionVector`] summarises a set of
//! events as, per node, the highest counter seen; it stands for every dot
//! `(actor, 1..=counter)`. Comparing vectors tells whether one history
//! includes another or the two are concurrent.

use std::collections::BTreeMap;
use std::fmt;

/// The node that accepted an event, as its node id `"region/node"`.
pub type Actor = String;

/// One event: the `counter`-th event accepted by `actor`. Counters start
/// at 1, so a dot is never covered by the empty vector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    /// The node that accepted the event.
    pub actor: Actor,
    /// Position of the event among that node's events, from 1.
    pub counter: u64,
}

impl Dot {
    /// The `counter`-th event of `actor`.
    pub fn new(actor: impl Into<Actor>, counter: u64) -> Self {
        Self { actor: actor.into(), counter }
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.actor, self.counter)
    }
}

/// Per actor, the highest event counter seen.
///
/// Entries are never 0 (an absent actor reads as 0), so two vectors that
/// cover the same events compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct VersionVector {
    /// Ordered so iteration, encoding and debug output are deterministic.
    pub(super) entries: BTreeMap<Actor, u64>,
}

impl VersionVector {
    /// The vector that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest counter seen from `actor`, 0 if none.
    pub fn get(&self, actor: &str) -> u64 {
        self.entries.get(actor).copied().unwrap_or(0)
    }

    /// Whether the event `dot` is part of the history this vector describes.
    pub fn covers(&self, dot: &Dot) -> bool {
        dot.counter <= self.get(&dot.actor)
    }

    /// Includes every event of `other` (pointwise maximum).
    pub fn merge(&mut self, other: &Self) {
        for (actor, &counter) in &other.entries {
            match self.entries.get_mut(actor) {
                Some(mine) => *mine = (*mine).max(counter),
                None => {
                    self.entries.insert(actor.clone(), counter);
                }
            }
        }
    }

    /// Whether this history includes all of `other` (equal vectors descend
    /// from each other).
    pub fn descends(&self, other: &Self) -> bool {
        other.entries.iter().all(|(actor, &counter)| self.get(actor) >= counter)
    }

    /// Whether each history has an event the other lacks.
    pub fn concurrent_with(&self, other: &Self) -> bool {
        !self.descends(other) && !other.descends(self)
    }

    /// Records a new event of `actor` and returns its dot.
    ///
    /// The counter saturates rather than wraps: reaching `u64::MAX` takes
    /// 2^64 writes, and decoding refuses a stored vector already there.
    pub fn increment(&mut self, actor: &str) -> Dot {
        debug_assert!(!actor.is_empty(), "an event needs an actor");
        let counter = match self.entries.get_mut(actor) {
            Some(counter) => {
                *counter = counter.saturating_add(1);
                *counter
            }
            None => {
                self.entries.insert(actor.to_owned(), 1);
                1
            }
        };
        Dot::new(actor, counter)
    }

    /// `(actor, highest counter)` pairs, ordered by actor.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.entries.iter().map(|(actor, &counter)| (actor.as_str(), counter))
    }

    /// Number of actors seen.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no event has been seen.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Builds a vector from `(actor, counter)` pairs; a repeated actor keeps its
/// highest counter and zero counters are dropped, as they mean "none seen".
impl FromIterator<(Actor, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (Actor, u64)>>(iter: I) -> Self {
        let mut vv = Self::new();
        for (actor, counter) in iter {
            if counter > 0 {
                let entry = vv.entries.entry(actor).or_insert(0);
                *entry = (*entry).max(counter);
            }
        }
        vv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        pairs.iter().map(|&(a, c)| (a.to_owned(), c)).collect()
    }

    #[test]
    fn increment_names_the_next_event() {
        let mut v = VersionVector::new();
        assert_eq!(v.increment("eu/n1"), Dot::new("eu/n1", 1));
        assert_eq!(v.increment("eu/n1"), Dot::new("eu/n1", 2));
        assert_eq!(v.increment("us/n1"), Dot::new("us/n1", 1));
        assert_eq!(v.get("eu/n1"), 2);
        assert_eq!(v.get("ap/n1"), 0);
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn covers_every_dot_up_to_the_counter() {
        let v = vv(&[("eu/n1", 3)]);
        assert!(v.covers(&Dot::new("eu/n1", 1)));
        assert!(v.covers(&Dot::new("eu/n1", 3)));
        assert!(!v.covers(&Dot::new("eu/n1", 4)));
        assert!(!v.covers(&Dot::new("us/n1", 1)));
    }

    #[test]
    fn merge_takes_the_pointwise_maximum() {
        let mut a = vv(&[("eu/n1", 3), ("us/n1", 1)]);
        a.merge(&vv(&[("eu/n1", 2), ("us/n1", 4), ("ap/n1", 1)]));
        assert_eq!(a, vv(&[("eu/n1", 3), ("us/n1", 4), ("ap/n1", 1)]));
    }

    #[test]
    fn descends_and_concurrent() {
        let old = vv(&[("eu/n1", 1)]);
        let new = vv(&[("eu/n1", 2)]);
        let other = vv(&[("us/n1", 1)]);
        assert!(new.descends(&old));
        assert!(!old.descends(&new));
        assert!(new.descends(&new));
        assert!(!new.concurrent_with(&new));
        assert!(new.concurrent_with(&other));
        assert!(!new.concurrent_with(&old));
        assert!(old.descends(&VersionVector::new()));
    }

    #[test]
    fn from_iter_is_canonical() {
        assert_eq!(vv(&[("a/1", 0)]), VersionVector::new());
        assert_eq!(vv(&[("a/1", 2), ("a/1", 5)]), vv(&[("a/1", 5)]));
    }
}
