//! The README's five-minute tour, run as written against a secure `geokv
//! dev` cluster: every `./scripts/geokv` line of the tour's first two blocks
//! is taken from README.md itself and run with the `geokv` binary, from
//! inside the cluster's data directory, with no certificate flags (the
//! command line finds the certificates `geokv dev` made, as it does for a
//! user). Lines whose comment promises an error must fail with that reason;
//! every other line must succeed.

use crate::common;

use std::process::Command;

use common::cluster::{DevCluster, REGIONS};
use common::tour::{tour_lines, TOUR_LINES_MIN};
use common::{run_bounded, CLI_TIMEOUT, GEOKV_BIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour_works_as_written_on_a_secure_cluster() {
    let lines = tour_lines();
    assert!(lines.len() >= TOUR_LINES_MIN, "the tour lost its commands: {lines:?}");
    let cluster = DevCluster::start(0.2).await;
    assert!(cluster.certs_dir().join("ca.crt").is_file(), "geokv dev made no certificates");
    let cwd = cluster.certs_dir().parent().expect("the data dir").to_path_buf();
    let endpoint = cluster.grpc_addr("us-east-1").to_string();
    let every_region: Vec<String> = REGIONS.iter().map(|r| cluster.grpc_addr(r).to_string()).collect();
    let every_region = every_region.join(",");
    for line in lines {
        let mut cmd = Command::new(GEOKV_BIN);
        cmd.args(line.args_with_endpoints(&every_region))
            .arg("--endpoint")
            .arg(&endpoint)
            .current_dir(&cwd)
            .env_remove("GEOKV_ENDPOINT")
            .env_remove("GEOKV_CERTS_DIR");
        let out = tokio::task::spawn_blocking(move || run_bounded(cmd, CLI_TIMEOUT)).await.expect("runner");
        line.check(&out);
    }
    // Without the certificates, the same cluster refuses the command line.
    let mut cmd = Command::new(GEOKV_BIN);
    cmd.args(["get", "greeting", "--insecure", "--endpoint", &endpoint]).env_remove("GEOKV_CERTS_DIR");
    let out = tokio::task::spawn_blocking(move || run_bounded(cmd, CLI_TIMEOUT)).await.expect("runner");
    assert!(!out.status.success(), "a plaintext command line was answered:\n{}", out.stdout);
}
