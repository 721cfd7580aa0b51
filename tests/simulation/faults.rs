//! The fault schedule of a run, drawn from its seed: partitions of region
//! pairs, isolation of a region, repairs, and crashes of a region's node
//! followed by a restart over the same (durable) store. Everything heals at
//! [`HEAL_MS`].

use rand::rngs::StdRng;
use rand::Rng;

use crate::cluster::REGIONS;

/// Faults start after the clients did, and stop before the heal.
const FROM_MS: u64 = 3_500;
const UNTIL_MS: u64 = 12_000;
/// Every partition is repaired and every crashed node restarted here.
pub const HEAL_MS: u64 = 13_000;
/// Gap between two faults, in ms.
const GAP_MS: std::ops::Range<u64> = 400..1_800;
/// How long a crashed node stays down, in ms.
const DOWN_MS: std::ops::Range<u64> = 800..4_000;

/// One change to the simulated world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Cut the link between two regions (both ways).
    Partition(&'static str, &'static str),
    /// Cut one region from every other.
    Isolate(&'static str),
    /// Repair every cut link.
    RepairAll,
    /// Kill a region's node (its tasks and connections vanish).
    Crash(&'static str),
    /// Start a crashed node again over its store.
    Restart(&'static str),
    /// Repair every link and restart every crashed node.
    Heal,
}

/// A fault and when it happens, in ms of simulated time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub at_ms: u64,
    pub fault: Fault,
}

/// The schedule of a run, in time order.
pub fn schedule(rng: &mut StdRng) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut at = FROM_MS + rng.random_range(0..500);
    // Up to one node down at a time: with three control-plane voters, a
    // second one down would leave no majority, which the checks do not need.
    let mut down_until = 0u64;
    while at < UNTIL_MS {
        let region = REGIONS[rng.random_range(0..REGIONS.len())];
        let fault = match rng.random_range(0..10) {
            0..3 => {
                let other = REGIONS[rng.random_range(0..REGIONS.len())];
                if other == region {
                    Fault::RepairAll
                } else {
                    Fault::Partition(region, other)
                }
            }
            3..5 => Fault::Isolate(region),
            5..7 => Fault::RepairAll,
            _ if at >= down_until => {
                let back = at + rng.random_range(DOWN_MS);
                down_until = back;
                if back < HEAL_MS {
                    steps.push(Step { at_ms: back, fault: Fault::Restart(region) });
                }
                Fault::Crash(region)
            }
            _ => Fault::RepairAll,
        };
        steps.push(Step { at_ms: at, fault });
        at += rng.random_range(GAP_MS);
    }
    steps.push(Step { at_ms: HEAL_MS, fault: Fault::Heal });
    steps.sort_by_key(|s| s.at_ms);
    steps
}
