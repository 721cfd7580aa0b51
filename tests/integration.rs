//! Every integration test against real `geokv` processes, gathered in one
//! binary (one link of the test dependencies instead of one per file; the
//! binary links RocksDB only once). Each file is a module; run one with
//! `cargo test -p geokv --test integration <module>::`.

mod common;

mod backup;
mod big_rows;
mod cli;
mod client_routing;
mod clock_leases;
mod dashboard;
mod deploy;
mod errors;
mod failover;
mod idempotency_failover;
mod merges;
mod multi_region;
mod node_process;
mod partitions;
mod power_cut;
mod reflection;
mod replication_bounds;
mod security;
mod store_identity;
mod strong_bounds;
mod subjects;
mod tombstones;
mod tour;
mod truthful_reads;
mod ttl;
mod watch;
