//! Conversions between the causality types and their storage protos
//! (`geokv.storage.v1`), and the opaque causal context handed to clients.
//!
//! Protos stop here: encoding is infallible, and decoding checks every
//! invariant the domain types rely on (no empty actor, no zero counter,
//! every dot covered by its clock, no duplicates), so a corrupt record or a
//! forged context becomes a [`DecodeError`] naming the field, never a state
//! that merges wrongly.

use std::collections::{BTreeMap, BTreeSet};

use geokv_proto::storage as pb;

use super::crdt::{LwwRegister, OrSet, PnCounter};
use super::dvv::{DvvSet, Sibling};
use super::hlc::HlcTimestamp;
use super::vv::{Actor, Dot, VersionVector};
use crate::codec::{self, CodecError};

/// Largest causal context a client may send back. A context holds one entry
/// per node that ever wrote the row, so a few hundred bytes is typical;
/// anything near this bound is garbage or abuse.
pub const CONTEXT_BYTES_MAX: usize = 64 * 1024;

/// Why a stored or received causality proto is invalid. Each variant names
/// the field, for an `InvalidArgument` at the API edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{field} is missing")]
    MissingField { field: &'static str },
    #[error("{field} has an empty actor")]
    EmptyActor { field: &'static str },
    #[error("{field} has counter 0 for actor {actor:?}; counters start at 1")]
    ZeroCounter { field: &'static str, actor: Actor },
    #[error("{field} has counter u64::MAX for actor {actor:?}, leaving no room for another event")]
    CounterExhausted { field: &'static str, actor: Actor },
    #[error("{field} lists actor {actor:?} more than once")]
    DuplicateActor { field: &'static str, actor: Actor },
    #[error("{field} holds dot {dot} more than once")]
    DuplicateDot { field: &'static str, dot: Dot },
    #[error("{field} holds dot {dot}, which the clock does not cover")]
    DotNotCovered { field: &'static str, dot: Dot },
    #[error("{field} is a tombstone but carries a {len}-byte value")]
    TombstoneWithValue { field: &'static str, len: usize },
    // Member bytes are user data, so the error does not repeat them.
    #[error("{field} lists the same member more than once")]
    DuplicateMember { field: &'static str },
    #[error("{field} is empty: a member without add dots is not in the set")]
    MemberWithoutDots { field: &'static str },
}

impl DecodeError {
    /// The proto field at fault, e.g. `"DvvSet.siblings.dot"`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::MissingField { field }
            | Self::EmptyActor { field }
            | Self::ZeroCounter { field, .. }
            | Self::CounterExhausted { field, .. }
            | Self::DuplicateActor { field, .. }
            | Self::DuplicateDot { field, .. }
            | Self::DotNotCovered { field, .. }
            | Self::TombstoneWithValue { field, .. }
            | Self::DuplicateMember { field }
            | Self::MemberWithoutDots { field } => field,
        }
    }
}

/// Why a causal context from a client cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("causal context is {len} bytes, more than the {max} allowed")]
    TooLarge { len: usize, max: usize },
    #[error("causal context is damaged: {0}")]
    Envelope(#[from] CodecError),
    #[error("causal context is invalid: {0}")]
    Invalid(#[from] DecodeError),
}

/// Encodes a causal context for a client, who hands it back unchanged on
/// the next write.
pub fn encode_context(context: &VersionVector) -> Vec<u8> {
    encode_context_at(context, 0)
}

/// [`encode_context`] stamped with the HLC time `hlc` it is handed out at.
pub fn encode_context_at(context: &VersionVector, hlc: u64) -> Vec<u8> {
    codec::seal_message(&pb::CausalContext { clock: Some(context.into()), hlc })
}

/// The HLC stamp a context was handed out at (0: unknown, or empty).
pub fn context_stamp(bytes: &[u8]) -> Result<(VersionVector, u64), ContextError> {
    if bytes.is_empty() {
        return Ok((VersionVector::new(), 0));
    }
    let clock = decode_context(bytes)?;
    let message: pb::CausalContext = codec::open_message(bytes)?;
    Ok((clock, message.hlc))
}

/// Decodes a context a client sent back. Empty input is the empty context
/// of a client that never read (a blind write).
pub fn decode_context(bytes: &[u8]) -> Result<VersionVector, ContextError> {
    if bytes.is_empty() {
        return Ok(VersionVector::new());
    }
    if bytes.len() > CONTEXT_BYTES_MAX {
        return Err(ContextError::TooLarge { len: bytes.len(), max: CONTEXT_BYTES_MAX });
    }
    let message: pb::CausalContext = codec::open_message(bytes)?;
    let clock = message.clock.ok_or(DecodeError::MissingField { field: "CausalContext.clock" })?;
    Ok(decode_clock(clock, "CausalContext.clock")?)
}

// ---- version vectors and dots ----

impl From<&VersionVector> for pb::VersionVector {
    fn from(vv: &VersionVector) -> Self {
        encode_totals(&vv.entries)
    }
}

impl TryFrom<pb::VersionVector> for VersionVector {
    type Error = DecodeError;

    fn try_from(proto: pb::VersionVector) -> Result<Self, DecodeError> {
        decode_clock(proto, "VersionVector.entries")
    }
}

impl From<&Dot> for pb::Dot {
    fn from(dot: &Dot) -> Self {
        Self { actor: dot.actor.clone(), counter: dot.counter }
    }
}

impl TryFrom<pb::Dot> for Dot {
    type Error = DecodeError;

    fn try_from(proto: pb::Dot) -> Result<Self, DecodeError> {
        decode_dot(proto, "Dot")
    }
}

/// Whether a counter may be `u64::MAX`: a clock may not, since its next
/// event would need a larger counter; a counter's running total may, as
/// totals saturate.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MaxCounter {
    Refused,
    Allowed,
}

fn decode_clock(proto: pb::VersionVector, field: &'static str) -> Result<VersionVector, DecodeError> {
    Ok(VersionVector { entries: decode_totals(proto, field, MaxCounter::Refused)? })
}

fn encode_totals(totals: &BTreeMap<Actor, u64>) -> pb::VersionVector {
    pb::VersionVector {
        entries: totals
            .iter()
            .map(|(actor, &counter)| pb::VvEntry { actor: actor.clone(), counter })
            .collect(),
    }
}

fn decode_totals(
    proto: pb::VersionVector,
    field: &'static str,
    max_counter: MaxCounter,
) -> Result<BTreeMap<Actor, u64>, DecodeError> {
    let mut totals = BTreeMap::new();
    for entry in proto.entries {
        if entry.actor.is_empty() {
            return Err(DecodeError::EmptyActor { field });
        }
        if entry.counter == 0 {
            return Err(DecodeError::ZeroCounter { field, actor: entry.actor });
        }
        if entry.counter == u64::MAX && max_counter == MaxCounter::Refused {
            return Err(DecodeError::CounterExhausted { field, actor: entry.actor });
        }
        if totals.contains_key(&entry.actor) {
            return Err(DecodeError::DuplicateActor { field, actor: entry.actor });
        }
        totals.insert(entry.actor, entry.counter);
    }
    Ok(totals)
}

fn decode_dot(proto: pb::Dot, field: &'static str) -> Result<Dot, DecodeError> {
    if proto.actor.is_empty() {
        return Err(DecodeError::EmptyActor { field });
    }
    if proto.counter == 0 {
        return Err(DecodeError::ZeroCounter { field, actor: proto.actor });
    }
    Ok(Dot::new(proto.actor, proto.counter))
}

/// Proto3 has no optional bytes, so `None` travels as a tombstone flag with
/// an empty value.
fn encode_value(value: &Option<Vec<u8>>) -> (Vec<u8>, bool) {
    match value {
        Some(bytes) => (bytes.clone(), false),
        None => (Vec::new(), true),
    }
}

fn decode_value(
    value: Vec<u8>,
    tombstone: bool,
    field: &'static str,
) -> Result<Option<Vec<u8>>, DecodeError> {
    match (tombstone, value.is_empty()) {
        (false, _) => Ok(Some(value)),
        (true, true) => Ok(None),
        (true, false) => Err(DecodeError::TombstoneWithValue { field, len: value.len() }),
    }
}

// ---- multi-value register ----

impl From<&DvvSet> for pb::DvvSet {
    fn from(set: &DvvSet) -> Self {
        Self {
            clock: Some((&set.clock).into()),
            siblings: set
                .siblings
                .iter()
                .map(|sibling| {
                    let (value, tombstone) = encode_value(&sibling.value);
                    pb::DvvSibling {
                        dot: Some((&sibling.dot).into()),
                        value,
                        tombstone,
                        hlc: sibling.hlc.0,
                        expires_ms: sibling.expires_ms,
                    }
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::DvvSet> for DvvSet {
    type Error = DecodeError;

    fn try_from(proto: pb::DvvSet) -> Result<Self, DecodeError> {
        let clock = proto.clock.ok_or(DecodeError::MissingField { field: "DvvSet.clock" })?;
        let clock = decode_clock(clock, "DvvSet.clock")?;
        let mut siblings = Vec::with_capacity(proto.siblings.len());
        for sibling in proto.siblings {
            let dot = sibling.dot.ok_or(DecodeError::MissingField { field: "DvvSibling.dot" })?;
            let dot = decode_dot(dot, "DvvSibling.dot")?;
            if !clock.covers(&dot) {
                return Err(DecodeError::DotNotCovered { field: "DvvSibling.dot", dot });
            }
            siblings.push(Sibling {
                dot,
                hlc: HlcTimestamp(sibling.hlc),
                value: decode_value(sibling.value, sibling.tombstone, "DvvSibling.value")?,
                expires_ms: sibling.expires_ms,
            });
        }
        siblings.sort();
        if let Some(pair) = siblings.windows(2).find(|pair| pair[0].dot == pair[1].dot) {
            return Err(DecodeError::DuplicateDot { field: "DvvSet.siblings", dot: pair[0].dot.clone() });
        }
        Ok(DvvSet { clock, siblings })
    }
}

// ---- last-writer-wins register ----

impl From<&LwwRegister> for pb::LwwRegister {
    fn from(reg: &LwwRegister) -> Self {
        let (value, tombstone) = encode_value(&reg.value);
        Self { hlc: reg.hlc.0, actor: reg.actor.clone(), value, tombstone, expires_ms: reg.expires_ms }
    }
}

impl TryFrom<pb::LwwRegister> for LwwRegister {
    type Error = DecodeError;

    fn try_from(proto: pb::LwwRegister) -> Result<Self, DecodeError> {
        let value = decode_value(proto.value, proto.tombstone, "LwwRegister.value")?;
        let reg = LwwRegister {
            hlc: HlcTimestamp(proto.hlc),
            actor: proto.actor,
            value,
            expires_ms: proto.expires_ms,
        };
        // Only the never-written register has no actor.
        if reg.actor.is_empty() && !reg.is_unset() {
            return Err(DecodeError::EmptyActor { field: "LwwRegister.actor" });
        }
        Ok(reg)
    }
}

// ---- counter ----

impl From<&PnCounter> for pb::PnCounter {
    fn from(counter: &PnCounter) -> Self {
        Self {
            increments: Some(encode_totals(&counter.increments)),
            decrements: Some(encode_totals(&counter.decrements)),
        }
    }
}

impl TryFrom<pb::PnCounter> for PnCounter {
    type Error = DecodeError;

    fn try_from(proto: pb::PnCounter) -> Result<Self, DecodeError> {
        let increments =
            proto.increments.ok_or(DecodeError::MissingField { field: "PnCounter.increments" })?;
        let decrements =
            proto.decrements.ok_or(DecodeError::MissingField { field: "PnCounter.decrements" })?;
        Ok(PnCounter {
            increments: decode_totals(increments, "PnCounter.increments", MaxCounter::Allowed)?,
            decrements: decode_totals(decrements, "PnCounter.decrements", MaxCounter::Allowed)?,
        })
    }
}

// ---- observed-remove set ----

impl From<&OrSet> for pb::OrSet {
    fn from(set: &OrSet) -> Self {
        Self {
            clock: Some((&set.clock).into()),
            members: set
                .entries
                .iter()
                .map(|(member, dots)| pb::OrSetMember {
                    member: member.clone(),
                    dots: dots.iter().map(pb::Dot::from).collect(),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::OrSet> for OrSet {
    type Error = DecodeError;

    fn try_from(proto: pb::OrSet) -> Result<Self, DecodeError> {
        let clock = proto.clock.ok_or(DecodeError::MissingField { field: "OrSet.clock" })?;
        let clock = decode_clock(clock, "OrSet.clock")?;
        let mut entries = BTreeMap::new();
        // A dot names one add of one member, so it may appear only once in
        // the whole set.
        let mut all_dots = BTreeSet::new();
        for member in proto.members {
            if member.dots.is_empty() {
                return Err(DecodeError::MemberWithoutDots { field: "OrSetMember.dots" });
            }
            let mut dots = BTreeSet::new();
            for dot in member.dots {
                let dot = decode_dot(dot, "OrSetMember.dots")?;
                if !clock.covers(&dot) {
                    return Err(DecodeError::DotNotCovered { field: "OrSetMember.dots", dot });
                }
                if !all_dots.insert(dot.clone()) {
                    return Err(DecodeError::DuplicateDot { field: "OrSetMember.dots", dot });
                }
                dots.insert(dot);
            }
            if entries.insert(member.member, dots).is_some() {
                return Err(DecodeError::DuplicateMember { field: "OrSetMember.member" });
            }
        }
        Ok(OrSet { clock, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causality::crdt::Crdt;

    const EU: &str = "eu-west/n1";
    const US: &str = "us-east/n1";

    fn entry(actor: &str, counter: u64) -> pb::VvEntry {
        pb::VvEntry { actor: actor.to_owned(), counter }
    }

    fn pb_dot(actor: &str, counter: u64) -> pb::Dot {
        pb::Dot { actor: actor.to_owned(), counter }
    }

    fn sample_dvv() -> DvvSet {
        let mut set = DvvSet::new();
        set.write(EU, &VersionVector::new(), Some(b"x".to_vec()), HlcTimestamp(7));
        set.write(US, &VersionVector::new(), None, HlcTimestamp(9));
        set.write(EU, &VersionVector::new(), Some(Vec::new()), HlcTimestamp(11));
        set
    }

    #[test]
    fn every_type_round_trips() {
        let dvv = sample_dvv();
        assert_eq!(DvvSet::try_from(pb::DvvSet::from(&dvv)), Ok(dvv.clone()));
        assert_eq!(
            VersionVector::try_from(pb::VersionVector::from(dvv.context())),
            Ok(dvv.context().clone())
        );
        let dot = Dot::new(EU, 3);
        assert_eq!(Dot::try_from(pb::Dot::from(&dot)), Ok(dot));

        for reg in [
            LwwRegister::default(),
            LwwRegister::new(EU, Some(b"v".to_vec()), HlcTimestamp(5)),
            LwwRegister::new(EU, Some(Vec::new()), HlcTimestamp(5)),
            LwwRegister::new(US, None, HlcTimestamp(6)),
        ] {
            assert_eq!(LwwRegister::try_from(pb::LwwRegister::from(&reg)), Ok(reg));
        }

        let mut counter = PnCounter::new();
        counter.add(EU, 4);
        counter.add(US, -3);
        counter.add(US, i64::MIN);
        counter.add(US, i64::MIN);
        assert_eq!(PnCounter::try_from(pb::PnCounter::from(&counter)), Ok(counter));

        let mut set = OrSet::new();
        set.add(EU, b"a".to_vec());
        let mut other = set.clone();
        other.add(US, b"a".to_vec());
        set.add(EU, b"b".to_vec());
        set.merge(&other);
        assert_eq!(set.len(), 2);
        assert_eq!(OrSet::try_from(pb::OrSet::from(&set)), Ok(set));
    }

    #[test]
    fn a_sibling_without_a_dot_is_refused() {
        let mut proto = pb::DvvSet::from(&sample_dvv());
        proto.siblings[0].dot = None;
        let err = DvvSet::try_from(proto).expect_err("dot is required");
        assert_eq!(err, DecodeError::MissingField { field: "DvvSibling.dot" });
        assert_eq!(err.field(), "DvvSibling.dot");
    }

    #[test]
    fn invalid_dots_and_clocks_are_refused() {
        let base = pb::DvvSet::from(&sample_dvv());

        let mut zero = base.clone();
        zero.siblings[0].dot = Some(pb_dot(EU, 0));
        assert!(matches!(
            DvvSet::try_from(zero),
            Err(DecodeError::ZeroCounter { field: "DvvSibling.dot", .. })
        ));

        let mut empty_actor = base.clone();
        empty_actor.siblings[0].dot = Some(pb_dot("", 1));
        assert_eq!(DvvSet::try_from(empty_actor), Err(DecodeError::EmptyActor { field: "DvvSibling.dot" }));

        let mut uncovered = base.clone();
        uncovered.siblings[0].dot = Some(pb_dot("ap/n1", 1));
        assert_eq!(
            DvvSet::try_from(uncovered),
            Err(DecodeError::DotNotCovered { field: "DvvSibling.dot", dot: Dot::new("ap/n1", 1) })
        );

        let mut duplicate = base.clone();
        let first = duplicate.siblings[0].clone();
        duplicate.siblings.push(first);
        assert!(matches!(DvvSet::try_from(duplicate), Err(DecodeError::DuplicateDot { .. })));

        let mut tombstone = base.clone();
        tombstone.siblings[0].tombstone = true;
        assert_eq!(
            DvvSet::try_from(tombstone),
            Err(DecodeError::TombstoneWithValue { field: "DvvSibling.value", len: 1 })
        );

        let mut no_clock = base.clone();
        no_clock.clock = None;
        assert_eq!(DvvSet::try_from(no_clock), Err(DecodeError::MissingField { field: "DvvSet.clock" }));

        let clock = |entries| pb::VersionVector { entries };
        assert!(matches!(
            VersionVector::try_from(clock(vec![entry(EU, 1), entry(EU, 2)])),
            Err(DecodeError::DuplicateActor { .. })
        ));
        assert!(matches!(
            VersionVector::try_from(clock(vec![entry(EU, 0)])),
            Err(DecodeError::ZeroCounter { .. })
        ));
        assert!(matches!(
            VersionVector::try_from(clock(vec![entry(EU, u64::MAX)])),
            Err(DecodeError::CounterExhausted { .. })
        ));
        assert!(matches!(
            VersionVector::try_from(clock(vec![entry("", 1)])),
            Err(DecodeError::EmptyActor { .. })
        ));
    }

    #[test]
    fn invalid_registers_counters_and_sets_are_refused() {
        // All defaults: an empty actor on a live value.
        assert_eq!(
            LwwRegister::try_from(pb::LwwRegister::default()),
            Err(DecodeError::EmptyActor { field: "LwwRegister.actor" })
        );
        assert!(matches!(
            PnCounter::try_from(pb::PnCounter::default()),
            Err(DecodeError::MissingField { .. })
        ));

        let mut set = OrSet::new();
        set.add(EU, b"a".to_vec());
        let base = pb::OrSet::from(&set);

        let mut no_dots = base.clone();
        no_dots.members[0].dots.clear();
        assert_eq!(
            OrSet::try_from(no_dots),
            Err(DecodeError::MemberWithoutDots { field: "OrSetMember.dots" })
        );
        let mut twice = base.clone();
        let mut copy = twice.members[0].clone();
        copy.member = b"b".to_vec();
        twice.members.push(copy.clone());
        assert!(matches!(OrSet::try_from(twice), Err(DecodeError::DuplicateDot { .. })));
        let mut same_member = base.clone();
        copy.member = b"a".to_vec();
        copy.dots = vec![pb_dot(US, 1)];
        same_member.clock = Some(pb::VersionVector { entries: vec![entry(EU, 1), entry(US, 1)] });
        same_member.members.push(copy);
        assert_eq!(
            OrSet::try_from(same_member),
            Err(DecodeError::DuplicateMember { field: "OrSetMember.member" })
        );
    }

    #[test]
    fn context_round_trips_and_empty_input_is_the_empty_context() {
        let context = sample_dvv().context().clone();
        assert_eq!(decode_context(&encode_context(&context)), Ok(context));
        assert_eq!(decode_context(&[]), Ok(VersionVector::new()));
        assert_eq!(decode_context(&encode_context(&VersionVector::new())), Ok(VersionVector::new()));
    }

    #[test]
    fn every_truncation_and_bit_flip_of_a_context_is_an_error() {
        let bytes = encode_context(sample_dvv().context());
        for len in 1..bytes.len() {
            assert!(decode_context(&bytes[..len]).is_err(), "prefix of {len} bytes");
        }
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[byte] ^= 1 << bit;
                assert!(decode_context(&bad).is_err(), "bit {bit} of byte {byte}");
            }
        }
    }

    #[test]
    fn a_well_sealed_but_invalid_context_is_refused() {
        let forged = codec::seal_message(&pb::CausalContext {
            clock: Some(pb::VersionVector { entries: vec![entry(EU, 0)] }),
            hlc: 0,
        });
        assert!(matches!(
            decode_context(&forged),
            Err(ContextError::Invalid(DecodeError::ZeroCounter { .. }))
        ));
        let no_clock = codec::seal_message(&pb::CausalContext { clock: None, hlc: 0 });
        assert_eq!(
            decode_context(&no_clock),
            Err(ContextError::Invalid(DecodeError::MissingField { field: "CausalContext.clock" }))
        );
        let garbage = codec::seal(&[0xff; 16]);
        assert!(matches!(decode_context(&garbage), Err(ContextError::Envelope(CodecError::Decode(_)))));
        let huge = vec![0u8; CONTEXT_BYTES_MAX + 1];
        assert_eq!(
            decode_context(&huge),
            Err(ContextError::TooLarge { len: CONTEXT_BYTES_MAX + 1, max: CONTEXT_BYTES_MAX })
        );
    }
}
