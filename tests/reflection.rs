//! A client we did not write: a Python gRPC program that learns the API by
//! server reflection alone (no geokv protos), then writes and reads a row.
//!
//! Needs `python3` with `pip install grpcio grpcio-reflection protobuf`; the
//! test fails, naming that command, when they are missing.

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{run_bounded, tests_path, NodeProcess};

const PIP_INSTALL: &str = "pip install grpcio grpcio-reflection protobuf";
/// Bound on the Python client's whole run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

fn python_packages_present() {
    if let Err(e) =
        Command::new("python3").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status()
    {
        panic!("python3 is needed for the reflection test ({e}); then `{PIP_INSTALL}`");
    }
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import grpc, grpc_reflection.v1alpha.proto_reflection_descriptor_database, google.protobuf",
    ]);
    let out = run_bounded(cmd, SCRIPT_TIMEOUT);
    assert!(
        out.status.success(),
        "the Python packages for the reflection test are missing; install them with `{PIP_INSTALL}`\n{}",
        out.stderr
    );
}

#[test]
fn python_client_uses_the_api_by_reflection_alone() {
    python_packages_present();
    let node = NodeProcess::start();
    let script = tests_path("python/reflection_client.py");
    assert!(script.exists(), "missing {}", script.display());

    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(node.grpc_addr.to_string()).arg(node.certs_dir());
    let out = run_bounded(cmd, SCRIPT_TIMEOUT);
    assert!(
        out.status.success(),
        "reflection client failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    let services = lines.iter().find(|l| l.starts_with("ok: services ")).expect("services line");
    for service in ["geokv.v1.KV", "geokv.v1.Admin", "grpc.health.v1.Health"] {
        assert!(services.split_whitespace().any(|s| s == service), "{service} not listed: {services}");
    }
    for internal in ["geokv.v1.Replication", "geokv.consensus.v1.Consensus"] {
        assert!(
            !services.split_whitespace().any(|s| s == internal),
            "{internal} listed on the client port: {services}"
        );
    }
    assert!(lines.contains(&"ok: no internal service listed"), "{}", out.stdout);
    assert!(lines.contains(&"ok: health SERVING"), "{}", out.stdout);
    assert!(lines.contains(&"ok: get grüße from python"), "{}", out.stdout);
    assert!(lines.contains(&"ok: unknown table NOT_FOUND UNKNOWN_TABLE"), "{}", out.stdout);
    assert_eq!(lines.last(), Some(&"PASS"), "{}", out.stdout);

    // What the Python client wrote is there for the Rust side too.
    let scan = node.cli(&["scan", "py-"]).ok();
    assert!(scan.contains("grüße from python"), "scan: {scan}");
}
