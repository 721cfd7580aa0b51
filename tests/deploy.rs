//! The example three-region deployment (deploy/three-regions, docs/deploy.md)
//! run the way an operator runs it on real hosts: each node a separate
//! `geokv node --config <file>` process started from the example's own TOML
//! files, on its own address, with certificates made by the example's
//! `make-certs.sh` (`geokv cert`). Not `geokv dev`, and no fault proxy.
//!
//! The example names its hosts `geokv-*.example.internal`, which do not
//! resolve here; the test gives each name a loopback address of its own
//! (127.0.1.1, 127.0.2.1, ...; Linux routes all of 127/8 to `lo`) by
//! replacing the name with the address in every file of the example, the
//! certificate script included, so the node certificates carry those
//! addresses. Nothing else in the files changes; the command line gives
//! each node only its data directory and the certificates' directory.
//!
//! Then the README's tour runs against it (its lines that name only the
//! deployment's regions), followed by what a user notices: writes in one
//! region read in the others, residency refusals, a planned failover and
//! failback through `geokv`, metrics on the admin port, and the loss of a
//! region (kill -9), its homes taken over, and its return.

use crate::common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::tour::{tour_lines, TOUR_LINES_MIN};
use common::{
    home_held_by, run_bounded, tests_path, CliOutput, Deadline, NodeProcess, CLI_TIMEOUT, GEOKV_BIN,
};

/// The example's nodes: region, host name, and the loopback address the
/// host name stands for in this test.
const HOSTS: [(&str, &str, &str); 3] = [
    ("us-east-1", "geokv-use1.example.internal", "127.0.1.1"),
    ("eu-west-1", "geokv-euw1.example.internal", "127.0.2.1"),
    ("ap-southeast-1", "geokv-apse1.example.internal", "127.0.3.1"),
];
const US: &str = "us-east-1";
const EU: &str = "eu-west-1";
const AP: &str = "ap-southeast-1";
/// Every region seen healthy from every region, every home leased.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// A write seen in another region.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(20);
/// A lost region's homes taken over (lease, offset and election included).
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(45);
/// A write refused with `FENCED` just after a handover succeeds again.
const HANDOVER_SETTLE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(250);

/// The example's folder.
fn example_dir() -> PathBuf {
    tests_path("../deploy/three-regions")
}

/// `text` with every host name replaced by its loopback address; no
/// `.example.internal` name may be left unmapped.
fn on_loopback(file: &str, text: &str) -> String {
    let mut out = text.to_string();
    for (_, host, addr) in HOSTS {
        out = out.replace(host, addr);
    }
    assert!(!out.contains(".example.internal"), "{file} names a host this test has no address for:\n{out}");
    out
}

/// The running deployment: one process per node, and the files they run from.
struct Deployment {
    /// Holds the rewritten files and the certificates; removed on drop.
    dir: tempfile::TempDir,
    nodes: BTreeMap<&'static str, NodeProcess>,
}

impl Deployment {
    /// Makes the certificates with the example's script, then starts every
    /// node from its file.
    fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("geokv-deploy-").tempdir().expect("temp dir");
        let script = dir.path().join("make-certs.sh");
        let text = std::fs::read_to_string(example_dir().join("make-certs.sh")).expect("read make-certs.sh");
        std::fs::write(&script, on_loopback("make-certs.sh", &text)).expect("write make-certs.sh");
        let mut cmd = Command::new("sh");
        cmd.arg(&script).arg(dir.path().join("certs")).env("GEOKV", GEOKV_BIN).env_remove("GEOKV_CERTS_DIR");
        let out = run_bounded(cmd, CLI_TIMEOUT).ok();
        for (region, _, addr) in HOSTS {
            assert!(out.contains(&format!("IP:{addr}")), "{region}'s certificate is not for {addr}:\n{out}");
        }
        let mut deployment = Self { dir, nodes: BTreeMap::new() };
        for (region, _, _) in HOSTS {
            let name = format!("{region}.toml");
            let text = std::fs::read_to_string(example_dir().join(&name)).expect("read a node's file");
            let config = deployment.dir.path().join(&name);
            std::fs::write(&config, on_loopback(&name, &text)).expect("write a node's file");
            let node = NodeProcess::start_from_file(&config, &deployment.certs_dir());
            deployment.nodes.insert(region, node);
        }
        deployment
    }

    fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    fn node(&self, region: &str) -> &NodeProcess {
        &self.nodes[region]
    }

    /// The command as a user runs it against the deployment: entering at
    /// us-east-1 (`GEOKV_ENDPOINT`), with the certificates of `root`
    /// (`GEOKV_CERTS_DIR`), from a directory holding no other certificates.
    fn command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(GEOKV_BIN);
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("GEOKV_ENDPOINT", self.node(US).grpc_addr.to_string())
            .env("GEOKV_CERTS_DIR", self.certs_dir())
            .env_remove("GEOKV_USER")
            .env_remove("GEOKV_TOKEN");
        cmd
    }

    fn cli(&self, args: &[&str]) -> CliOutput {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        run_bounded(self.command(&args), CLI_TIMEOUT)
    }

    fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all).ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("geokv {all:?} printed no JSON ({e}): {out}"))
    }

    /// Polls `check` (bounded) until it returns Ok; panics with its last Err.
    fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&Self) -> Result<T, String>,
    ) -> T {
        let deadline = Deadline::after(limit);
        loop {
            match check(self) {
                Ok(v) => return v,
                Err(last) => assert!(!deadline.passed(), "{what}: not within {limit:?}; last: {last}"),
            }
            std::thread::sleep(POLL);
        }
    }

    /// The raw value of `key` read in `region` (with `extra` arguments).
    fn read(&self, key: &str, region: &str, extra: &[&str]) -> Result<String, String> {
        let mut args = vec!["get", key, "--raw", "--region", region];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    }

    /// `geokv ARGS --json` for a write just after a handover, retried while
    /// it fails with `FENCED`: for up to a control-plane heartbeat after
    /// `region failover`/`failback` returns, the node a write is forwarded
    /// to may not have applied the new epoch yet.
    fn write_after_handover(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let mut fenced = 0;
        let out = self.wait_for(&format!("geokv {}", all.join(" ")), HANDOVER_SETTLE, |d| {
            let out = d.cli(&all);
            match out.status.success() {
                true => Ok(out.stdout),
                false if out.stderr.contains("FENCED") => {
                    fenced += 1;
                    Err(out.stderr)
                }
                false => panic!("geokv {all:?} failed:\n{}{}", out.stdout, out.stderr),
            }
        });
        if fenced > 0 {
            eprintln!("geokv {all:?} was refused with FENCED {fenced} time(s) just after a handover");
        }
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("geokv {all:?} printed no JSON ({e}): {out}"))
    }

    /// Waits until `region` reads `value` under `key`.
    fn wait_read(&self, key: &str, region: &str, extra: &[&str], value: &str) {
        self.wait_for(&format!("{key} = {value} in {region}"), REPLICATION_TIMEOUT, |d| {
            match d.read(key, region, extra)? {
                v if v == value => Ok(()),
                other => Err(format!("read {other:?}")),
            }
        })
    }

    /// The holder of the home of region `home` (`home` or `home@zone`) in
    /// `geokv region status`, with a live lease.
    fn holder(&self, home: &str) -> Result<String, String> {
        // `region status --json` prints the regions, the links and the
        // control state, one JSON document a line; the homes are in the last.
        let out = self.cli(&["region", "status", "--json"]).ok();
        let status = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["homes"].is_array())
            .ok_or_else(|| format!("no homes in {out}"))?;
        let homes = status["homes"].as_array().ok_or("no homes")?;
        let h = homes
            .iter()
            .find(|h| h["home_region"] == home)
            .ok_or_else(|| format!("no home of {home}: {status}"))?;
        if h["lease_remaining_ms"].as_i64().unwrap_or(0) <= 0 {
            return Err(format!("{home} has no live lease: {h}"));
        }
        Ok(h["holder"].as_str().unwrap_or_default().to_string())
    }

    /// Every running region sees every other running region healthy, and
    /// every home of the running regions is leased.
    fn wait_cluster_ready(&self) {
        let running: Vec<&str> =
            HOSTS.iter().map(|h| h.0).filter(|r| self.nodes[r].pid().is_some()).collect();
        self.wait_for("the cluster formed", CLUSTER_READY_TIMEOUT, |d| {
            for region in &running {
                let out = d.cli(&["region", "list", "--json", "--region", region]);
                let view: serde_json::Value = serde_json::from_str(out.stdout.trim())
                    .map_err(|_| format!("{region}: {}", out.stderr))?;
                for other in &running {
                    let r = view["regions"].as_array().and_then(|rs| rs.iter().find(|r| r["name"] == *other));
                    let health = r.map(|r| r["health"].as_str().unwrap_or_default()).unwrap_or("missing");
                    if health != "self" && health != "healthy" {
                        return Err(format!("{region} sees {other} {health}"));
                    }
                }
            }
            for region in &running {
                d.holder(region)?;
            }
            Ok(())
        });
    }

    /// `/metrics` of `region`'s node, over the admin port's TLS.
    fn metrics(&self, region: &str) -> String {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let addr = self.node(region).admin_addr;
        runtime
            .block_on(common::https_get(addr, &self.certs_dir(), "/metrics"))
            .unwrap_or_else(|e| panic!("/metrics of {region}: {e}"))
    }
}

/// Whether a tour line names a region outside the deployment (the README
/// tours four regions; the example runs three).
fn names_other_region(args: &[String], regions: &[&str]) -> bool {
    let looks_like_region = |a: &str| {
        let parts: Vec<&str> = a.split('-').collect();
        parts.len() == 3
            && parts[2].parse::<u32>().is_ok()
            && parts[..2].iter().all(|p| p.chars().all(|c| c.is_ascii_lowercase()))
    };
    args.iter().any(|a| looks_like_region(a) && !regions.contains(&a.as_str()))
}

#[test]
fn the_three_region_example_runs_from_its_files_and_the_tour_works_on_it() {
    let lines = tour_lines();
    assert!(lines.len() >= TOUR_LINES_MIN, "the tour lost its commands: {lines:?}");
    let mut d = Deployment::start();
    d.wait_cluster_ready();

    // Clients are told the addresses the files give (the host names, here
    // their addresses), and each node answers on its own.
    let view = d.cli_json(&["region", "list"]);
    for (region, _, addr) in HOSTS {
        let r = view["regions"].as_array().and_then(|rs| rs.iter().find(|r| r["name"] == region));
        let r = r.unwrap_or_else(|| panic!("{region} missing from {view}"));
        assert_eq!(r["client_addrs"], serde_json::json!([format!("{addr}:7700")]), "{view}");
        assert_eq!(r["peer_addrs"], serde_json::json!([format!("{addr}:7702")]), "{view}");
    }

    // The README's tour, as written, for the deployment's regions.
    let regions: Vec<&str> = HOSTS.iter().map(|h| h.0).collect();
    let (run, skipped): (Vec<_>, Vec<_>) =
        lines.into_iter().partition(|l| !names_other_region(&l.args, &regions));
    assert!(skipped.len() <= 2, "most of the tour should run on three regions; skipped {skipped:?}");
    for line in &skipped {
        eprintln!("skipped (names a region this deployment does not run): {}", line.shown());
    }
    let every_region: Vec<String> = regions.iter().map(|r| d.node(r).grpc_addr.to_string()).collect();
    let every_region = every_region.join(",");
    for line in &run {
        line.check(&run_bounded(d.command(&line.args_with_endpoints(&every_region)), CLI_TIMEOUT));
    }

    // A write in one region is read in the others.
    d.cli(&["put", "deploy:1", "written-in-us", "--consistency", "eventual"]).ok();
    for region in [EU, AP] {
        d.wait_read("deploy:1", region, &[], "written-in-us");
    }
    d.cli(&["put", "deploy:2", "from-sg", "--table", "users", "--locality", "SG", "--region", AP]).ok();
    d.wait_read("deploy:2", US, &["--table", "users", "--locality", "SG"], "from-sg");

    // Residency: an eu row is stored in eu-west-1 only, and refused elsewhere.
    d.cli(&["put", "eu:1", "bonjour", "--table", "eu_users", "--locality", "FR", "--region", EU]).ok();
    assert_eq!(d.read("eu:1", EU, &["--table", "eu_users", "--locality", "FR"]).as_deref(), Ok("bonjour"));
    for region in [US, AP] {
        d.cli(&["get", "eu:1", "--table", "eu_users", "--locality", "FR", "--region", region])
            .assert_reason("RESIDENCY_VIOLATION");
    }
    let audit = d.cli(&["residency", "audit"]).ok();
    assert!(!audit.is_empty(), "the residency audit printed nothing");

    // Planned failover and failback through geokv: us-east-1's homes move
    // to eu-west-1, which then accepts their writes, and come back.
    let moved = d.cli_json(&["region", "failover", "--from", US, "--to", EU]);
    assert!(home_held_by(&moved, US, EU).is_some(), "{moved}");
    let ack = d.write_after_handover(&["put", "deploy:3", "during-failover", "--home", US]);
    assert_eq!(ack["accepted_by_region"], EU, "{ack}");
    d.wait_read("deploy:3", AP, &["--home", US], "during-failover");
    let back = d.cli_json(&["region", "failback", "--region", US]);
    assert!(home_held_by(&back, US, US).is_some(), "{back}");
    let ack = d.write_after_handover(&["put", "deploy:4", "after-failback", "--home", US]);
    assert_eq!(ack["accepted_by_region"], US, "{ack}");

    // Metrics on every admin port (TLS, the node's certificate).
    for region in regions {
        let metrics = d.metrics(region);
        assert!(metrics.contains("geokv_region_healthy"), "{region}'s /metrics lacks region health");
    }

    // Region loss: ap-southeast-1's node is killed. With automatic failover
    // on (the tour switched it off), its homes move to us-east-1, the next
    // region of its failover order; the other regions keep serving.
    d.cli(&["region", "auto-failover", "on"]).ok();
    d.nodes.get_mut(AP).expect("the ap node").kill_9();
    d.wait_for("ap-southeast-1's homes taken over", TAKEOVER_TIMEOUT, |d| match d.holder(AP)? {
        h if h == US => Ok(()),
        h => Err(format!("held by {h}")),
    });
    let ack = d.cli_json(&["put", "deploy:5", "while-ap-is-down", "--table", "users", "--locality", "SG"]);
    assert_eq!(ack["accepted_by_region"], US, "{ack}");
    d.cli(&["put", "deploy:6", "quorum-of-two", "--consistency", "quorum"]).ok();
    d.wait_read("deploy:6", EU, &[], "quorum-of-two");

    // The region returns (same data, same file), catches up, and takes its
    // homes back.
    d.nodes.get_mut(AP).expect("the ap node").restart();
    d.wait_cluster_ready();
    d.wait_read("deploy:5", AP, &["--table", "users", "--locality", "SG"], "while-ap-is-down");
    d.wait_read("deploy:6", AP, &[], "quorum-of-two");
    let back = d.cli_json(&["region", "failback", "--region", AP]);
    assert!(home_held_by(&back, AP, AP).is_some(), "{back}");

    for (region, node) in d.nodes.iter_mut() {
        let status = node.terminate();
        assert!(status.success(), "{region}'s node exited with {status} on SIGTERM:\n{}", node.log());
    }
}

/// A node configured by host name: it binds the address the name resolves
/// to, and the command line dials it by name, TLS checking the name
/// against the certificate's DNS SAN.
#[test]
fn a_node_listens_and_is_dialled_by_host_name() {
    let dir = tempfile::Builder::new().prefix("geokv-names-").tempdir().expect("temp dir");
    let certs = dir.path().join("certs");
    geokv_net::certs::ensure_dev_certs(&certs, "geokv-test", &[("local-1", "n1")], &["localhost"], &["root"])
        .expect("certificates for localhost");
    let (grpc, peer, admin) = (common::free_port(), common::free_port(), common::free_port());
    let config = dir.path().join("node.toml");
    let text = format!(
        "listen = \"localhost:{grpc}\"\nlisten_peer = \"localhost:{peer}\"\nadmin_listen = \"localhost:{admin}\"\n"
    );
    std::fs::write(&config, text).expect("write the config");
    let mut node = NodeProcess::start_from_file(&config, &certs);
    let mut cmd = Command::new(GEOKV_BIN);
    cmd.args(["put", "named", "yes", "--endpoint", &format!("localhost:{grpc}")])
        .env("GEOKV_CERTS_DIR", &certs)
        .env_remove("GEOKV_ENDPOINT");
    run_bounded(cmd, CLI_TIMEOUT).ok();
    // The certificate is for `localhost` only: dialled by IP, TLS refuses it.
    let mut cmd = Command::new(GEOKV_BIN);
    cmd.args(["get", "named", "--endpoint", &format!("127.0.0.1:{grpc}")])
        .env("GEOKV_CERTS_DIR", &certs)
        .env_remove("GEOKV_ENDPOINT");
    let out = run_bounded(cmd, CLI_TIMEOUT);
    assert!(!out.status.success(), "a certificate without the dialled IP was accepted:\n{}", out.stdout);
    assert!(node.terminate().success(), "{}", node.log());
}

#[test]
fn every_file_of_the_example_maps_onto_loopback() {
    // Every file the deployment test rewrites names only hosts it maps.
    for entry in std::fs::read_dir(example_dir()).expect("the example's folder") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let text = std::fs::read_to_string(&path).expect("read a file of the example");
        let mapped = on_loopback(&name, &text);
        for (_, _, addr) in HOSTS {
            if name.ends_with(".toml") {
                assert!(mapped.contains(addr), "{name} does not name every node");
            }
        }
    }
}
