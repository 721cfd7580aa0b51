//! The command line as a shell user meets it: values from standard input
//! or a file, byte for byte back out with `--raw`, the size limit on what
//! stdin may carry, a closed pipe, and `geokv dev` taking its nodes with it
//! when it is killed.

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::cluster::DevCluster;
use common::{run_bounded, run_bounded_bytes, Deadline, NodeProcess, CLI_TIMEOUT, GEOKV_BIN};

/// `geokv ARGS` against `node`, with `stdin` on standard input.
fn cli_with_stdin(
    node: &NodeProcess,
    args: &[&str],
    stdin: &[u8],
) -> (std::process::ExitStatus, Vec<u8>, String) {
    let mut cmd = Command::new(GEOKV_BIN);
    cmd.args(args)
        .arg("--endpoint")
        .arg(node.grpc_addr.to_string())
        .env("GEOKV_CERTS_DIR", node.certs_dir())
        .env_remove("GEOKV_ENDPOINT");
    let (status, stdout, stderr) = run_bounded_bytes(cmd, Some(stdin.to_vec()), CLI_TIMEOUT);
    (status, stdout, String::from_utf8_lossy(&stderr).into_owned())
}

/// Bytes no text encoding would keep intact (every byte value, zeros, CRs).
fn binary(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect()
}

#[test]
fn values_travel_through_stdin_and_files_byte_for_byte() {
    let node = NodeProcess::start();
    let value = binary(500 * 1024);
    let (status, _, stderr) = cli_with_stdin(&node, &["put", "blob", "-"], &value);
    assert!(status.success(), "put from stdin failed: {stderr}");
    let (status, stdout, stderr) = cli_with_stdin(&node, &["get", "blob", "--raw"], b"");
    assert!(status.success(), "get --raw failed: {stderr}");
    assert_eq!(stdout.len(), value.len(), "get --raw returned another length");
    assert!(stdout == value, "get --raw changed the bytes");

    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), &value[..1000]).expect("write the value file");
    let path = file.path().display().to_string();
    let out = node.cli(&["put", "small", "--value-file", &path]);
    assert!(out.status.success(), "put --value-file failed: {}", out.stderr);
    let (_, stdout, _) = cli_with_stdin(&node, &["get", "small", "--raw"], b"");
    assert!(stdout == value[..1000], "--value-file did not round-trip");

    // Over the node's value limit (1 MiB by default): refused with the reason.
    let (status, _, stderr) = cli_with_stdin(&node, &["put", "huge", "-"], &binary(5 * 1024 * 1024));
    assert!(!status.success(), "a 5 MB value was accepted");
    assert!(stderr.contains("VALUE_TOO_LARGE"), "{stderr}");
    let (_, stdout, _) = cli_with_stdin(&node, &["get", "huge", "--json"], b"");
    assert!(String::from_utf8_lossy(&stdout).contains("\"found\":false"), "the refused value was stored");
}

#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    let node = NodeProcess::start();
    for args in [&["region", "status"][..], &["status"][..]] {
        let mut child = Command::new(GEOKV_BIN)
            .args(args)
            .arg("--endpoint")
            .arg(node.grpc_addr.to_string())
            .env("GEOKV_CERTS_DIR", node.certs_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn geokv");
        // The reader goes away before the command writes anything.
        drop(child.stdout.take());
        let deadline = Deadline::after(CLI_TIMEOUT);
        while child.try_wait().expect("poll geokv").is_none() {
            assert!(!deadline.passed(), "geokv {args:?} hung on a closed pipe");
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().expect("output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "geokv {args:?} exited with {} on a closed pipe:\n{stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // And through a shell, as the issue tried it (pipefail: geokv's own status).
    let line = format!(
        "set -o pipefail; GEOKV_CERTS_DIR={} {GEOKV_BIN} region status --endpoint {} | head -1",
        node.certs_dir().display(),
        node.grpc_addr
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &line]);
    let out = run_bounded(cmd, CLI_TIMEOUT);
    assert!(out.status.success(), "`geokv region status | head -1` exited {}: {}", out.status, out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_a_killed_geokv_dev_do_not_outlive_it() {
    let mut cluster = DevCluster::start(0.0).await;
    assert_eq!(cluster.live_node_pids().len(), 4, "four nodes run");
    cluster.kill_9_dev();
    let deadline = Deadline::after(Duration::from_secs(10));
    loop {
        let left = cluster.live_node_pids();
        if left.is_empty() {
            break;
        }
        assert!(!deadline.passed(), "nodes still run after kill -9 of geokv dev: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
