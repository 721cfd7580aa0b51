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
use common::{home_held_by, run_bounded, Deadline, CLI_TIMEOUT, GEOKV_BIN};

use std::time::Duration;

/// How long a home moved away by automatic failover may take to come back.
const HOME_BACK_LIMIT: Duration = Duration::from_secs(60);

/// Waits until `region` holds its own home. The tour's planned failover
/// starts from the home region; on a loaded machine a lease can lapse
/// before it (automatic failover moves the home, failback returns it), and
/// the handover would then be refused with "holds no home". The wait is
/// reported, so a lapse stays visible; a home that never returns fails.
async fn home_back_at(cluster: &DevCluster, region: &str) {
    let deadline = Deadline::after(HOME_BACK_LIMIT);
    let mut waited = false;
    loop {
        // `region status --json` prints one document per part; the homes
        // are in the last.
        let out = cluster.cli(&["region", "status", "--json"]).await;
        let last = out.stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
        let status: serde_json::Value = serde_json::from_str(last).unwrap_or_default();
        if home_held_by(&status, region, region).is_some() {
            if waited {
                eprintln!("tour: {region}'s home had moved (a lease lapsed); it is back: {status}");
            }
            return;
        }
        assert!(
            !deadline.passed(),
            "{region} did not hold its home within {HOME_BACK_LIMIT:?}: {}{}",
            out.stdout,
            out.stderr
        );
        waited = true;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

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
        if line.args.starts_with(&["region".to_string(), "failover".to_string()]) {
            home_back_at(&cluster, REGIONS[0]).await;
        }
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
