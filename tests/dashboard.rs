//! The live dashboard in a real browser: a four-region `geokv dev` cluster,
//! rows written and one link paused so there is lag to draw, and the Node
//! script `tests/browser/dashboard.test.mjs` driving headless Chromium
//! against the first region's `/dashboard` (see that script for what it checks).
//!
//! Needs `node`, Debian's `chromium` and `tests/browser/node_modules`
//! (playwright-core, from `npm ci`); `scripts/deps` installs them. The test
//! fails, naming that script, when one is missing.
//!
//! The screenshot is kept at `$CARGO_TARGET_TMPDIR/dashboard.png` for a
//! person to look at.

mod common;

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{http_get, run_bounded, tests_path, Deadline, CLI_TIMEOUT, GEOKV_BIN};

/// The regions `geokv dev` runs by default, in port order.
const REGIONS: [&str; 4] = ["us-east-1", "eu-west-1", "eu-central-1", "ap-southeast-1"];
/// The link the test pauses, so its lag grows while the page watches.
const PAUSED_DESTINATION: &str = "ap-southeast-1";
/// Where the browser test expects Chromium (Debian's package); the
/// `GEOKV_CHROMIUM` environment variable, read by the script too, overrides it.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest wait for every node of the cluster to answer `/health`.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for every link to connect and every region to look healthy.
const LINKS_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the browser script; it also stops itself after 90 s.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(150);
/// Longest wait for `geokv dev` to stop its nodes after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Port blocks tried before giving up on finding a free one.
const PORT_BLOCK_ATTEMPTS: u32 = 40;
/// Rows the background writer adds at most while the browser watches.
const BACKGROUND_ROWS_MAX: u32 = 400;
/// A blank or broken page makes a much smaller PNG than this.
const SCREENSHOT_BYTES_MIN: u64 = 20_000;
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What `scripts/deps` provides; named in every "missing" message.
const DEPS_HINT: &str = "run `scripts/deps` (it installs chromium and runs `npm ci --prefix tests/browser`)";

/// Ports `geokv dev --base-port BASE` binds: gRPC BASE+10i and admin
/// BASE+10i+1 for region i, and the fault proxy's control API at BASE+99.
fn ports_of_block(base: u16) -> Vec<u16> {
    let mut ports: Vec<u16> = (0..REGIONS.len() as u16)
        .flat_map(|i| [base + 10 * i, base + 10 * i + 1, base + 10 * i + 50])
        .collect();
    ports.push(base + 99);
    ports
}

/// A base port whose whole block is free right now (all bound at once, then
/// released), starting from a per-process offset so parallel runs differ.
fn free_port_block() -> u16 {
    let seed = std::process::id() as u64
        ^ SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos() as u64).unwrap_or(0);
    for attempt in 0..PORT_BLOCK_ATTEMPTS as u64 {
        // Blocks of 100 between 20000 and 59999.
        let base = 20_000 + ((seed + attempt * 7919) % 400) as u16 * 100;
        let bound: Vec<_> = ports_of_block(base)
            .into_iter()
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if bound.len() == ports_of_block(base).len() {
            return base;
        }
    }
    panic!("no free block of ports found in {PORT_BLOCK_ATTEMPTS} attempts");
}

/// A `geokv dev` process and its nodes, stopped when dropped.
struct DevCluster {
    /// Owns the data directory and the logs; removed on drop.
    dir: tempfile::TempDir,
    base_port: u16,
    /// None once stopped.
    child: Option<Child>,
}

impl DevCluster {
    /// The certificates `geokv dev` made for the cluster.
    fn certs_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("cluster").join("certs")
    }

    fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("geokv-dashboard-").tempdir().expect("create a temp dir");
        let base_port = free_port_block();
        let out = File::create(dir.path().join("dev.out")).expect("create dev.out");
        let child = Command::new(GEOKV_BIN)
            .args(["dev", "--fresh", "--latency-scale", "0.1", "--base-port"])
            .arg(base_port.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("cluster"))
            .env_remove("GEOKV_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone dev.out"))
            .stderr(out)
            // Its own process group, so a `geokv dev` that will not stop can
            // be killed together with the node processes it started.
            .process_group(0)
            .spawn()
            .expect("spawn `geokv dev`");
        let mut cluster = Self { dir, base_port, child: Some(child) };
        cluster.wait_ready();
        cluster
    }

    fn grpc(&self, region: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base_port + 10 * region as u16))
    }

    fn admin(&self, region: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base_port + 10 * region as u16 + 1))
    }

    /// What `geokv dev` printed, and the tail of each node's log.
    fn logs(&self) -> String {
        let mut out = std::fs::read_to_string(self.dir.path().join("dev.out")).unwrap_or_default();
        for r in REGIONS {
            let log = std::fs::read_to_string(self.dir.path().join("cluster").join(r).join("node.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            out.push_str(&format!("\n---- {r} node.log (last lines) ----\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Waits until every node answers `/health`, failing early if `geokv dev` exits.
    fn wait_ready(&mut self) {
        let deadline = Deadline::after(CLUSTER_READY_TIMEOUT);
        for i in 0..REGIONS.len() {
            loop {
                let child = self.child.as_mut().expect("waiting for a running cluster");
                if let Some(status) = child.try_wait().expect("polling `geokv dev`") {
                    self.child = None;
                    panic!("`geokv dev` exited with {status} before it was ready:\n{}", self.logs());
                }
                if http_get(self.admin(i), "/health").is_ok_and(|b| b.contains("\"serving\"")) {
                    break;
                }
                assert!(
                    !deadline.passed(),
                    "cluster not ready within {CLUSTER_READY_TIMEOUT:?}:\n{}",
                    self.logs()
                );
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }

    /// `GET /dashboard/data` of region `i`, parsed.
    fn dashboard_data(&self, i: usize) -> serde_json::Value {
        let body =
            http_get(self.admin(i), "/dashboard/data").unwrap_or_else(|e| panic!("GET /dashboard/data: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/dashboard/data is not JSON ({e}): {body}"))
    }

    /// Runs `geokv ARGS --endpoint <region 0>` and asserts success.
    fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(GEOKV_BIN);
        cmd.args(args)
            .arg("--endpoint")
            .arg(self.grpc(0).to_string())
            .env_remove("GEOKV_ENDPOINT")
            .env("GEOKV_CERTS_DIR", self.certs_dir());
        run_bounded(cmd, CLI_TIMEOUT).ok()
    }

    /// SIGTERM to `geokv dev`, which stops its nodes; after a bounded wait,
    /// SIGKILL to its whole process group.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on a child we spawned and have not reaped, so the
        // pid cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Deadline::after(STOP_TIMEOUT);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if deadline.passed() {
                // SAFETY: the group was created for this child (process_group(0)),
                // so its id is the child's pid and holds only what it started.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                let _ = child.wait();
                eprintln!("`geokv dev` did not stop within {STOP_TIMEOUT:?}; killed its process group");
                return;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!("---- geokv dev output ----\n{}", self.logs());
        }
        self.stop();
    }
}

/// Writes a row every 250 ms until stopped or [`BACKGROUND_ROWS_MAX`] rows,
/// so the page sees replication moving while it is open.
struct BackgroundWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl BackgroundWriter {
    fn start(endpoint: SocketAddr, certs_dir: std::path::PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut written = 0;
            while written < BACKGROUND_ROWS_MAX && !flag.load(Ordering::Acquire) {
                let mut cmd = Command::new(GEOKV_BIN);
                cmd.args(["put", &format!("bg-{written}"), "watched"])
                    .arg("--endpoint")
                    .arg(endpoint.to_string())
                    .env_remove("GEOKV_ENDPOINT")
                    .env("GEOKV_CERTS_DIR", &certs_dir);
                if run_bounded(cmd, CLI_TIMEOUT).status.success() {
                    written += 1;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            written
        });
        Self { stop, thread: Some(thread) }
    }

    fn stop(&mut self) -> u32 {
        self.stop.store(true, Ordering::Release);
        self.thread.take().map(|t| t.join().expect("background writer panicked")).unwrap_or(0)
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fails with [`DEPS_HINT`] when node, Chromium or the npm packages are missing.
fn browser_tools_present(browser_dir: &Path) {
    let node = Command::new("node").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(node.is_ok_and(|s| s.success()), "`node` is needed for the dashboard browser test; {DEPS_HINT}");
    let chromium = std::env::var("GEOKV_CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_string());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing for the dashboard browser test; {DEPS_HINT}"
    );
    let playwright = browser_dir.join("node_modules/playwright-core/package.json");
    assert!(
        playwright.exists(),
        "{} is missing for the dashboard browser test; {DEPS_HINT}",
        playwright.display()
    );
}

/// Polls until every link from region 0 is connected and every region healthy.
fn wait_links_ready(cluster: &DevCluster) -> serde_json::Value {
    let deadline = Deadline::after(LINKS_READY_TIMEOUT);
    loop {
        let data = cluster.dashboard_data(0);
        let links = data["links"].as_array().map(Vec::as_slice).unwrap_or_default();
        let regions = data["regions"].as_array().map(Vec::as_slice).unwrap_or_default();
        let ready = links.len() == REGIONS.len() - 1
            && links.iter().all(|l| l["connected"] == true)
            && regions.len() == REGIONS.len()
            && regions.iter().all(|r| r["healthy"] == true);
        if ready {
            return data;
        }
        assert!(!deadline.passed(), "links or regions not ready within {LINKS_READY_TIMEOUT:?}: {data}");
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[test]
fn dashboard_draws_lag_health_and_links_in_a_real_browser() {
    let browser_dir = tests_path("browser");
    let script = browser_dir.join("dashboard.test.mjs");
    assert!(script.exists(), "missing {}", script.display());
    browser_tools_present(&browser_dir);

    let cluster = DevCluster::start();
    let data = wait_links_ready(&cluster);
    assert_eq!(data["region"], REGIONS[0], "{data}");

    // Rows that replicate everywhere, then a paused link with rows queued on it.
    for i in 0..10 {
        cluster.cli(&["put", &format!("row-{i}"), &format!("value {i}")]);
    }
    cluster.cli(&["replication", "pause", "--to", PAUSED_DESTINATION]);
    for i in 0..5 {
        cluster.cli(&["put", &format!("queued-{i}"), "waits for the link"]);
    }
    let paused = format!("{}\u{2192}{PAUSED_DESTINATION}", REGIONS[0]);
    let data = cluster.dashboard_data(0);
    let link = data["links"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["destination"] == PAUSED_DESTINATION))
        .unwrap_or_else(|| panic!("no link to {PAUSED_DESTINATION}: {data}"));
    assert_eq!(link["paused"], true, "{link}");
    assert!(link["lag_entries"].as_u64() >= Some(5), "queued rows not counted as lag: {link}");

    let mut writer = BackgroundWriter::start(cluster.grpc(0), cluster.certs_dir());
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let url = format!("http://{}/dashboard", cluster.admin(0));
    let mut cmd = Command::new("node");
    cmd.arg(&script).arg(&url).arg(&screenshot).args([
        "--regions",
        &REGIONS.len().to_string(),
        "--paused",
        &paused,
    ]);
    let out = run_bounded(cmd, BROWSER_TIMEOUT);
    let written = writer.stop();
    assert!(
        out.status.success(),
        "browser test failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert_eq!(out.stdout.lines().last(), Some("PASS"), "{}", out.stdout);
    assert!(written > 0, "the background writer wrote no row");

    let size = std::fs::metadata(&screenshot)
        .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", screenshot.display()))
        .len();
    assert!(size >= SCREENSHOT_BYTES_MIN, "screenshot {} is only {size} bytes", screenshot.display());
    let head = std::fs::read(&screenshot).expect("read the screenshot");
    assert!(head.starts_with(b"\x89PNG\r\n\x1a\n"), "screenshot is not a PNG");
    println!("{}screenshot: {} ({size} bytes)", out.stdout, screenshot.display());
}
