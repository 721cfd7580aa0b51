//! The chaos harness of geokv: real `geokv node` processes on loopback,
//! every inter-region link behind the fault proxy, a workload of clients in
//! several regions, faults on a seeded schedule, a recorded history, pure
//! checkers, and a report.
//!
//! # Layout
//! - [`history`]: operation and nemesis records, JSON lines.
//! - [`checker`]: linearizability, counters, sets, residency, lost writes,
//!   convergence, one home per epoch, coverage (the faults reached the
//!   regions the workload depends on). Pure; unknown fails the run.
//! - [`cluster`]: writes node configs, starts the proxies and the nodes,
//!   kills (-9), pauses, restarts with clock skew; stops everything on drop.
//! - [`nemesis`]: fault kinds, what each touches, the seeded schedule aimed
//!   at the workload's regions, and their execution.
//! - [`workload`]: register, counter, set, residency, big-rows and watch
//!   clients, and the regions each depends on.
//! - [`watcher`]: the watch workload's change-feed follower, resuming from
//!   its cursor.
//! - [`run`]: one scenario end to end; [`suite`] many.
//! - [`report`]: the run folder: history, verdicts, `index.html` with plots.

pub mod checker;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod report;
pub mod run;
pub mod suite;
pub mod watcher;
pub mod workload;
