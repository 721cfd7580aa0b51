//! Property tests: the merge laws of every CRDT, and encoding round trips.
//!
//! States are reached the way production reaches them: three replicas, one
//! actor each, apply random local operations and merge each other's states
//! at random. Writes take their causal context from nothing (blind), from
//! their own replica, or from a peer (a client that read elsewhere). The
//! laws are then checked on every pair and triple of the final states.

use std::fmt::Debug;

use geokv_proto::storage as pb;
use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::codec;

/// One actor per replica: a dot is only ever minted by its own replica.
const ACTORS: [&str; 3] = ["eu-west/n1", "us-east/n1", "ap-south/n1"];
const REPLICAS: usize = ACTORS.len();
/// Long enough for several rounds of conflicts and syncs.
const STEPS_MAX: usize = 40;

/// Where a write's or remove's causal context comes from.
#[derive(Clone, Debug)]
enum Context {
    /// No context: a blind write.
    Blind,
    /// Read from the replica that takes the write.
    Own,
    /// Read from another replica.
    Peer(usize),
}

impl Context {
    fn resolve<'a>(&self, at: usize, contexts: impl Fn(usize) -> &'a VersionVector) -> VersionVector {
        match self {
            Context::Blind => VersionVector::new(),
            Context::Own => contexts(at).clone(),
            Context::Peer(peer) => contexts(*peer).clone(),
        }
    }
}

fn context() -> impl Strategy<Value = Context> {
    prop_oneof![Just(Context::Blind), Just(Context::Own), (0..REPLICAS).prop_map(Context::Peer),]
}

#[derive(Clone, Debug)]
enum Step<Op> {
    /// A client operation on one replica.
    Local { at: usize, op: Op },
    /// Replication: `into` merges the current state of `from`.
    Sync { into: usize, from: usize },
}

/// A CRDT with the operations a client can apply to one replica.
trait Model: Crdt + Clone + Default + Debug + PartialEq {
    type Op: Clone + Debug;
    fn op() -> BoxedStrategy<Self::Op>;
    /// Applies `op` at replica `at`; `step` is a unique, growing stamp.
    fn apply(replicas: &mut [Self], at: usize, op: &Self::Op, step: u64);
}

impl Model for DvvSet {
    /// Context to write with, and the value (`None` deletes).
    type Op = (Context, Option<u8>);

    fn op() -> BoxedStrategy<Self::Op> {
        (context(), proptest::option::of(any::<u8>())).boxed()
    }

    fn apply(replicas: &mut [Self], at: usize, (ctx, value): &Self::Op, step: u64) {
        let ctx = ctx.resolve(at, |i| replicas[i].context());
        replicas[at].write(ACTORS[at], &ctx, value.map(|v| vec![v]), HlcTimestamp(step));
    }
}

impl Model for LwwRegister {
    /// The value (`None` deletes) and a stamp from a small range, so equal
    /// stamps from different actors happen often.
    type Op = (Option<u8>, u64);

    fn op() -> BoxedStrategy<Self::Op> {
        (proptest::option::of(any::<u8>()), 0..8u64).boxed()
    }

    fn apply(replicas: &mut [Self], at: usize, (value, hlc): &Self::Op, _step: u64) {
        replicas[at].set(ACTORS[at], value.map(|v| vec![v]), HlcTimestamp(*hlc));
    }
}

impl Model for PnCounter {
    /// A delta; extreme ones exercise saturation.
    type Op = i64;

    fn op() -> BoxedStrategy<Self::Op> {
        prop_oneof![4 => -50i64..50, 1 => any::<i64>()].boxed()
    }

    fn apply(replicas: &mut [Self], at: usize, delta: &Self::Op, _step: u64) {
        replicas[at].add(ACTORS[at], *delta);
    }
}

#[derive(Clone, Debug)]
enum SetOp {
    Add(u8),
    /// Remove with no context (`None`) or with a context read somewhere.
    Remove(u8, Option<Context>),
}

impl Model for OrSet {
    type Op = SetOp;

    fn op() -> BoxedStrategy<Self::Op> {
        // Few members, so adds and removes of the same member collide.
        prop_oneof![
            (0..4u8).prop_map(SetOp::Add),
            (0..4u8, proptest::option::of(context())).prop_map(|(m, c)| SetOp::Remove(m, c)),
        ]
        .boxed()
    }

    fn apply(replicas: &mut [Self], at: usize, op: &Self::Op, _step: u64) {
        match op {
            SetOp::Add(member) => {
                replicas[at].add(ACTORS[at], vec![*member]);
            }
            SetOp::Remove(member, None) => {
                replicas[at].remove(&[*member], None);
            }
            SetOp::Remove(member, Some(ctx)) => {
                let ctx = ctx.resolve(at, |i| replicas[i].context());
                replicas[at].remove(&[*member], Some(&ctx));
            }
        }
    }
}

fn steps<T: Model>() -> impl Strategy<Value = Vec<Step<T::Op>>> {
    let step = prop_oneof![
        3 => (0..REPLICAS, T::op()).prop_map(|(at, op)| Step::Local { at, op }),
        2 => (0..REPLICAS, 0..REPLICAS).prop_map(|(into, from)| Step::Sync { into, from }),
    ];
    proptest::collection::vec(step, 0..STEPS_MAX)
}

/// The replicas' states after `steps`.
fn run<T: Model>(steps: &[Step<T::Op>]) -> Vec<T> {
    let mut replicas = vec![T::default(); REPLICAS];
    for (index, step) in (1u64..).zip(steps) {
        match step {
            Step::Local { at, op } => T::apply(&mut replicas, *at, op, index),
            Step::Sync { into, from } => {
                let from = replicas[*from].clone();
                replicas[*into].merge(&from);
            }
        }
    }
    replicas
}

fn merged<T: Crdt + Clone>(a: &T, b: &T) -> T {
    let mut out = a.clone();
    out.merge(b);
    out
}

fn check_laws<T: Model>(states: &[T]) -> Result<(), TestCaseError> {
    for a in states {
        prop_assert_eq!(&merged(a, a), a, "idempotence");
        for b in states {
            prop_assert_eq!(merged(a, b), merged(b, a), "commutativity");
            for c in states {
                prop_assert_eq!(merged(&merged(a, b), c), merged(a, &merged(b, c)), "associativity");
            }
        }
    }
    Ok(())
}

/// Domain -> proto -> bytes -> proto -> domain gives the same state.
fn check_round_trip<T, P>(states: &[T]) -> Result<(), TestCaseError>
where
    T: Model + TryFrom<P, Error = DecodeError>,
    P: Message + Default,
    for<'a> P: From<&'a T>,
{
    for state in states {
        let bytes = P::from(state).encode_to_vec();
        let proto = P::decode(bytes.as_slice()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let decoded = T::try_from(proto).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&decoded, state);
    }
    Ok(())
}

proptest! {
    #[test]
    fn dvv_merge_laws_and_round_trip(steps in steps::<DvvSet>()) {
        let states = run::<DvvSet>(&steps);
        check_laws(&states)?;
        check_round_trip::<DvvSet, pb::DvvSet>(&states)?;
        for state in &states {
            prop_assert_eq!(&decode_context(&encode_context(state.context())), &Ok(state.context().clone()));
        }
    }

    #[test]
    fn lww_merge_laws_and_round_trip(steps in steps::<LwwRegister>()) {
        let states = run::<LwwRegister>(&steps);
        check_laws(&states)?;
        check_round_trip::<LwwRegister, pb::LwwRegister>(&states)?;
    }

    #[test]
    fn counter_merge_laws_and_round_trip(steps in steps::<PnCounter>()) {
        let states = run::<PnCounter>(&steps);
        check_laws(&states)?;
        check_round_trip::<PnCounter, pb::PnCounter>(&states)?;
    }

    #[test]
    fn or_set_merge_laws_and_round_trip(steps in steps::<OrSet>()) {
        let states = run::<OrSet>(&steps);
        check_laws(&states)?;
        check_round_trip::<OrSet, pb::OrSet>(&states)?;
    }

    /// After full replication every replica holds the same value, and a
    /// counter with small deltas holds their exact sum.
    #[test]
    fn counter_converges_to_the_sum(deltas in proptest::collection::vec((0..REPLICAS, -1000i64..1000), 0..STEPS_MAX)) {
        let mut replicas = vec![PnCounter::new(); REPLICAS];
        for (at, delta) in &deltas {
            replicas[*at].add(ACTORS[*at], *delta);
        }
        let mut all = PnCounter::new();
        for replica in &replicas {
            all.merge(replica);
        }
        prop_assert_eq!(all.value(), deltas.iter().map(|(_, d)| d).sum::<i64>());
    }

    /// A write that carries the context of a full read leaves exactly one
    /// sibling, whatever conflicts came before.
    #[test]
    fn dvv_write_with_full_context_resolves_everything(steps in steps::<DvvSet>(), at in 0..REPLICAS, value in proptest::option::of(any::<u8>())) {
        let mut states = run::<DvvSet>(&steps);
        let context = states[at].context().clone();
        states[at].write(ACTORS[at], &context, value.map(|v| vec![v]), HlcTimestamp(u64::MAX));
        prop_assert_eq!(states[at].sibling_count(), 1);
        prop_assert_eq!(states[at].is_deleted(), value.is_none());
    }

    #[test]
    fn random_context_bytes_are_an_error(bytes in proptest::collection::vec(any::<u8>(), 1..256)) {
        prop_assert!(decode_context(&bytes).is_err());
    }

    /// A checksum-valid envelope around arbitrary bytes must not panic; if
    /// it decodes at all, it is a valid context.
    #[test]
    fn sealed_garbage_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(context) = decode_context(&codec::seal(&payload)) {
            prop_assert_eq!(decode_context(&encode_context(&context)), Ok(context));
        }
    }

    #[test]
    fn truncated_or_flipped_context_is_an_error(
        steps in steps::<DvvSet>(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        bit in 0..8u8,
    ) {
        let states = run::<DvvSet>(&steps);
        let bytes = encode_context(states[0].context());
        let truncated = &bytes[..1 + cut.index(bytes.len() - 1)];
        prop_assert!(decode_context(truncated).is_err());
        let mut flipped = bytes.clone();
        flipped[flip.index(bytes.len())] ^= 1 << bit;
        prop_assert!(decode_context(&flipped).is_err());
    }

    /// Arbitrary protos, valid or not, never panic; those that decode are
    /// well-formed states that re-encode to themselves.
    #[test]
    fn arbitrary_dvv_protos_decode_or_fail_cleanly(proto in arbitrary_dvv_proto()) {
        if let Ok(set) = DvvSet::try_from(proto) {
            prop_assert_eq!(&merged(&set, &set), &set);
            prop_assert_eq!(DvvSet::try_from(pb::DvvSet::from(&set)), Ok(set));
        }
    }

    #[test]
    fn arbitrary_or_set_protos_decode_or_fail_cleanly(proto in arbitrary_or_set_proto()) {
        if let Ok(set) = OrSet::try_from(proto) {
            prop_assert_eq!(&merged(&set, &set), &set);
            prop_assert_eq!(OrSet::try_from(pb::OrSet::from(&set)), Ok(set));
        }
    }
}

/// Actors and counters from small ranges with the edge cases mixed in, so
/// valid and invalid protos both come up often.
fn arbitrary_actor() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0..REPLICAS).prop_map(|i| ACTORS[i].to_owned()),
        1 => Just(String::new()),
    ]
}

fn arbitrary_counter() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 1..4u64, 1 => Just(0u64), 1 => Just(u64::MAX)]
}

fn arbitrary_clock() -> impl Strategy<Value = Option<pb::VersionVector>> {
    let entry =
        (arbitrary_actor(), arbitrary_counter()).prop_map(|(actor, counter)| pb::VvEntry { actor, counter });
    proptest::option::weighted(
        0.9,
        proptest::collection::vec(entry, 0..4).prop_map(|entries| pb::VersionVector { entries }),
    )
}

fn arbitrary_dot() -> impl Strategy<Value = pb::Dot> {
    (arbitrary_actor(), arbitrary_counter()).prop_map(|(actor, counter)| pb::Dot { actor, counter })
}

fn arbitrary_dvv_proto() -> impl Strategy<Value = pb::DvvSet> {
    let sibling = (
        proptest::option::weighted(0.9, arbitrary_dot()),
        proptest::collection::vec(any::<u8>(), 0..2),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(dot, value, tombstone, hlc)| pb::DvvSibling {
            dot,
            value,
            tombstone,
            hlc,
            expires_ms: 0,
        });
    (arbitrary_clock(), proptest::collection::vec(sibling, 0..4))
        .prop_map(|(clock, siblings)| pb::DvvSet { clock, siblings })
}

fn arbitrary_or_set_proto() -> impl Strategy<Value = pb::OrSet> {
    let member = (0..3u8, proptest::collection::vec(arbitrary_dot(), 0..3))
        .prop_map(|(member, dots)| pb::OrSetMember { member: vec![member], dots });
    (arbitrary_clock(), proptest::collection::vec(member, 0..4))
        .prop_map(|(clock, members)| pb::OrSet { clock, members })
}
