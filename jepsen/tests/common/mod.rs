//! Shared by the harness's integration tests: where the geokv binaries are,
//! and run options for short scenarios in a temp folder.

#![allow(dead_code)]

use std::path::PathBuf;

use geokv_jepsen::nemesis::NemesisKind;
use geokv_jepsen::run::{default_geokv_bin, RunOptions};
use geokv_jepsen::workload::WorkloadKind;

/// How the put-back bugs binary is built (documented in docs/jepsen.md).
pub const BUGS_BUILD: &str = "cargo build -p geokv --features geokv-server/bugs && cp $CARGO_TARGET_DIR/debug/geokv $CARGO_TARGET_DIR/debug/geokv-bugs && cargo build -p geokv";

/// The normal geokv binary ($GEOKV_BIN or the target dir's).
pub fn geokv_bin() -> PathBuf {
    let bin = std::env::var_os("GEOKV_BIN").map(PathBuf::from).unwrap_or_else(default_geokv_bin);
    assert!(bin.exists(), "{} is missing: cargo build -p geokv", bin.display());
    bin
}

/// The geokv binary built with the `bugs` feature ($GEOKV_BUGS_BIN or
/// `geokv-bugs` beside the normal one). Missing is a failure, not a skip.
pub fn bugs_bin() -> PathBuf {
    let bin = std::env::var_os("GEOKV_BUGS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| default_geokv_bin().with_file_name("geokv-bugs"));
    assert!(bin.exists(), "{} is missing; build it with: {BUGS_BUILD}", bin.display());
    bin
}

pub fn options(
    workload: WorkloadKind,
    nemesis: NemesisKind,
    time_s: u64,
    ops: u64,
    seed: u64,
    out: PathBuf,
) -> RunOptions {
    RunOptions {
        workload,
        nemesis,
        time_s,
        seed,
        ops,
        clients_per_region: 2,
        latency_scale: 0.5,
        sync: true,
        bug: None,
        geokv_bin: geokv_bin(),
        out,
    }
}

/// `opts` switched to the bugs build with `bug` on.
pub fn with_bug(mut opts: RunOptions, bug: &str) -> RunOptions {
    opts.geokv_bin = bugs_bin();
    opts.bug = Some(bug.to_string());
    opts
}
