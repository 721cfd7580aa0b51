//! The README's five-minute tour, run as written against a secure `geokv
//! dev` cluster: every `./scripts/geokv` line of the tour's first two blocks
//! is taken from README.md itself and run with the `geokv` binary, from
//! inside the cluster's data directory, with no certificate flags (the
//! command line finds the certificates `geokv dev` made, as it does for a
//! user). Lines whose comment promises an error must fail with that reason;
//! every other line must succeed.

mod common;

use std::process::Command;

use common::cluster::DevCluster;
use common::{run_bounded, tests_path, CLI_TIMEOUT, GEOKV_BIN};

/// The tour's commands (arguments after `./scripts/geokv`) and the comment
/// beside each, from the README's "Five-minute tour" up to its multi-node
/// block.
fn tour_commands() -> Vec<(Vec<String>, String)> {
    let readme = std::fs::read_to_string(tests_path("../README.md")).expect("read README.md");
    let start = readme.find("## Five-minute tour").expect("the README has a five-minute tour");
    let rest = &readme[start..];
    let end = rest.find("Several nodes per region").expect("the tour's multi-node block");
    rest[..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("./scripts/geokv "))
        .map(|l| {
            let (cmd, comment) = l.split_once('#').unwrap_or((l, ""));
            (cmd.split_whitespace().map(str::to_string).collect(), comment.trim().to_string())
        })
        .collect()
}

/// The reason a line's comment says it fails with, if it says so.
fn expected_failure(comment: &str) -> Option<&'static str> {
    if comment.contains("RESIDENCY_VIOLATION") {
        Some("RESIDENCY_VIOLATION")
    } else if comment.contains("NOT SET") {
        Some("NOT SET")
    } else {
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour_works_as_written_on_a_secure_cluster() {
    let commands = tour_commands();
    assert!(commands.len() >= 15, "the tour lost its commands: {commands:?}");
    let cluster = DevCluster::start(0.2).await;
    assert!(cluster.certs_dir().join("ca.crt").is_file(), "geokv dev made no certificates");
    let cwd = cluster.certs_dir().parent().expect("the data dir").to_path_buf();
    let endpoint = cluster.grpc_addr("us-east-1").to_string();
    for (args, comment) in commands {
        let mut cmd = Command::new(GEOKV_BIN);
        cmd.args(&args)
            .arg("--endpoint")
            .arg(&endpoint)
            .current_dir(&cwd)
            .env_remove("GEOKV_ENDPOINT")
            .env_remove("GEOKV_CERTS_DIR");
        let out = tokio::task::spawn_blocking(move || run_bounded(cmd, CLI_TIMEOUT)).await.expect("runner");
        let line = args.join(" ");
        match expected_failure(&comment) {
            Some(reason) => {
                assert!(!out.status.success(), "`geokv {line}` should fail ({comment}):\n{}", out.stdout);
                let text = format!("{}{}", out.stdout, out.stderr);
                assert!(text.contains(reason), "`geokv {line}` failed without {reason}:\n{text}");
            }
            None => assert!(
                out.status.success(),
                "`geokv {line}` failed with {}:\nstdout:\n{}\nstderr:\n{}",
                out.status,
                out.stdout,
                out.stderr
            ),
        }
    }
    // Without the certificates, the same cluster refuses the command line.
    let mut cmd = Command::new(GEOKV_BIN);
    cmd.args(["get", "greeting", "--insecure", "--endpoint", &endpoint]).env_remove("GEOKV_CERTS_DIR");
    let out = tokio::task::spawn_blocking(move || run_bounded(cmd, CLI_TIMEOUT)).await.expect("runner");
    assert!(!out.status.success(), "a plaintext command line was answered:\n{}", out.stdout);
}
