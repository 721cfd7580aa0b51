//! The live dashboard in a real browser, on a four-region `geokv dev`
//! cluster (tests/common/cluster.rs): rows written and the link from
//! us-east-1 to ap-southeast-1 paused, so there is lag to draw, then the
//! Node script `tests/browser/dashboard.test.mjs` drives headless Chromium
//! against eu-west-1's `/dashboard`: a node that is neither end of the
//! paused link, so what the page shows of it was gathered from another
//! region (see that script for what it checks).
//!
//! Then one region's node is frozen (SIGSTOP) just before a new sample,
//! while the connections to it still look alive: the cluster view still
//! answers within its gathering deadline and shows that region unreachable
//! and its outgoing pairs unknown. (Without the deadline the first answer
//! waits on the frozen node and the request times out.)
//!
//! Needs `node`, Debian's `chromium` and `tests/browser/node_modules`
//! (playwright-core, from `npm ci`); `scripts/deps` installs them. The test
//! fails, naming that script, when one is missing.
//!
//! The screenshot is kept at `$CARGO_TARGET_TMPDIR/dashboard.png` for a
//! person to look at; the test prints its path.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{DevCluster, REGIONS};
use common::{http_get, run_bounded, tests_path, Deadline, CLI_TIMEOUT, GEOKV_BIN};

/// The region whose node serves the page.
const SERVING: &str = "eu-west-1";
/// The link the test pauses (from the first region), so its lag grows.
const PAUSED_SOURCE: &str = "us-east-1";
const PAUSED_DESTINATION: &str = "ap-southeast-1";
/// The region frozen at the end.
const FROZEN: &str = "ap-southeast-1";
/// Where the browser test expects Chromium (Debian's package); the
/// `GEOKV_CHROMIUM` environment variable, read by the script too, overrides it.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest wait for the cluster view to show every pair with a lag.
const MATRIX_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the browser script; it also stops itself after 90 s.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(150);
/// The server's gathering deadline (`GATHER_DEADLINE`, 1.5 s) plus room for
/// a loaded host: a cluster view with a frozen region must come within this.
const FROZEN_ANSWER_MAX: Duration = Duration::from_millis(4000);
/// Longest wait for the view to notice the frozen region.
const FROZEN_SEEN_TIMEOUT: Duration = Duration::from_secs(20);
/// The server samples at most this often (`SAMPLE_INTERVAL`).
const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);
/// Rows the background writer adds at most while the browser watches.
const BACKGROUND_ROWS_MAX: u32 = 400;
/// A blank or broken page makes a much smaller PNG than this.
const SCREENSHOT_BYTES_MIN: u64 = 20_000;
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What `scripts/deps` provides; named in every "missing" message.
const DEPS_HINT: &str = "run `scripts/deps` (it installs chromium and runs `npm ci --prefix tests/browser`)";

/// Writes a row every 250 ms until stopped or [`BACKGROUND_ROWS_MAX`] rows,
/// so the page sees replication moving while it is open.
struct BackgroundWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl BackgroundWriter {
    fn start(endpoint: SocketAddr, certs_dir: PathBuf) -> Self {
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

/// `GET path` on `addr`, parsed as JSON, off the async runtime.
async fn get_json(addr: SocketAddr, path: &'static str) -> serde_json::Value {
    let body = tokio::task::spawn_blocking(move || http_get(addr, path))
        .await
        .expect("HTTP thread")
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"))
}

fn pair<'a>(view: &'a serde_json::Value, source: &str, destination: &str) -> &'a serde_json::Value {
    view["pairs"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["source"] == source && p["destination"] == destination))
        .unwrap_or_else(|| panic!("no pair {source}->{destination} in {view}"))
}

/// Polls the cluster view until it has every ordered pair with a lag, every
/// region answering, and a holder for every home; returns it.
async fn wait_matrix_ready(addr: SocketAddr) -> serde_json::Value {
    let deadline = Deadline::after(MATRIX_READY_TIMEOUT);
    loop {
        let view = get_json(addr, "/dashboard/cluster").await;
        let pairs = view["pairs"].as_array().map(Vec::as_slice).unwrap_or_default();
        let regions = view["regions"].as_array().map(Vec::as_slice).unwrap_or_default();
        let homes = view["homes"].as_array().map(Vec::as_slice).unwrap_or_default();
        let ready = pairs.len() == REGIONS.len() * (REGIONS.len() - 1)
            && pairs.iter().all(|p| p["lag_seconds"].is_number() && p["state"] != "unknown")
            && regions.len() == REGIONS.len()
            && regions.iter().all(|r| r["state"] == "ok")
            && homes.len() >= REGIONS.len();
        if ready {
            return view;
        }
        assert!(!deadline.passed(), "cluster view not complete within {MATRIX_READY_TIMEOUT:?}: {view}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_dashboard_draws_every_region_pair_in_a_real_browser() {
    let browser_dir = tests_path("browser");
    let script = browser_dir.join("dashboard.test.mjs");
    assert!(script.exists(), "missing {}", script.display());
    browser_tools_present(&browser_dir);

    let cluster = DevCluster::start(0.1).await;
    let admin = cluster.admin_addr(SERVING);
    let view = wait_matrix_ready(admin).await;
    assert_eq!(view["region"], SERVING, "{view}");
    let names: Vec<&str> =
        view["regions"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, REGIONS, "matrix axes in configuration order");
    // Each region holds its own homes at first, under epoch 1 or later.
    for r in REGIONS {
        let homes: Vec<&serde_json::Value> =
            view["homes"].as_array().unwrap().iter().filter(|h| h["home_region"] == r).collect();
        assert!(!homes.is_empty(), "no lease for a home of {r}: {view}");
        for home in homes {
            assert_eq!(home["holder"], r, "{home}");
            assert!(home["epoch"].as_u64() >= Some(1), "{home}");
        }
    }

    // Rows that replicate everywhere, then a paused link with rows queued on it.
    for i in 0..10 {
        cluster.cli(&["put", &format!("row-{i}"), &format!("value {i}")]).await.ok();
    }
    cluster.cli(&["replication", "pause", "--to", PAUSED_DESTINATION]).await.ok();
    for i in 0..5 {
        cluster.cli(&["put", &format!("queued-{i}"), "waits for the link"]).await.ok();
    }
    // The serving node sees the pause on another region's link.
    let deadline = Deadline::after(MATRIX_READY_TIMEOUT);
    loop {
        let view = get_json(admin, "/dashboard/cluster").await;
        let p = pair(&view, PAUSED_SOURCE, PAUSED_DESTINATION);
        if p["state"] == "paused" && p["lag_entries"].as_u64() >= Some(5) {
            break;
        }
        assert!(!deadline.passed(), "pause of {PAUSED_SOURCE}->{PAUSED_DESTINATION} not seen: {p}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }

    let mut writer = BackgroundWriter::start(cluster.grpc_addr(REGIONS[0]), cluster.certs_dir());
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let url = format!("http://{admin}/dashboard");
    let paused = format!("{PAUSED_SOURCE}\u{2192}{PAUSED_DESTINATION}");
    let mut cmd = Command::new("node");
    cmd.arg(&script).arg(&url).arg(&screenshot).args(["--regions", &REGIONS.join(","), "--paused", &paused]);
    let out =
        tokio::task::spawn_blocking(move || run_bounded(cmd, BROWSER_TIMEOUT)).await.expect("browser thread");
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

    // A frozen region: the view still answers within the deadline, with the
    // region unreachable and its outgoing pairs unknown.
    // Frozen right before a new sample: the connections to it still look
    // alive, so only the gathering deadline bounds the first answer.
    tokio::time::sleep(SAMPLE_INTERVAL + Duration::from_millis(100)).await;
    cluster.pause(FROZEN);
    let deadline = Deadline::after(FROZEN_SEEN_TIMEOUT);
    let mut slowest = Duration::ZERO;
    let mut first = true;
    let view = loop {
        if !first {
            // Past the sampling interval, so each request gathers anew.
            tokio::time::sleep(SAMPLE_INTERVAL + Duration::from_millis(100)).await;
        }
        first = false;
        let started = Instant::now();
        let view = get_json(admin, "/dashboard/cluster").await;
        slowest = slowest.max(started.elapsed());
        let frozen = view["regions"].as_array().unwrap().iter().find(|r| r["name"] == FROZEN).cloned();
        if frozen.is_some_and(|r| r["state"] == "unreachable") {
            break view;
        }
        assert!(!deadline.passed(), "{FROZEN} not shown unreachable within {FROZEN_SEEN_TIMEOUT:?}: {view}");
    };
    cluster.unpause(FROZEN);
    assert!(slowest <= FROZEN_ANSWER_MAX, "a cluster view took {slowest:?} with {FROZEN} frozen");
    for d in REGIONS.iter().filter(|r| **r != FROZEN) {
        let p = pair(&view, FROZEN, d);
        assert_eq!(p["state"], "unknown", "{p}");
        assert!(p["lag_seconds"].is_null(), "{p}");
        // The other regions still answered.
        assert_ne!(pair(&view, d, FROZEN)["state"], "unknown", "{view}");
    }
    let why =
        view["regions"].as_array().unwrap().iter().find(|r| r["name"] == FROZEN).map(|r| r["error"].clone());
    println!(
        "cluster view with {FROZEN} frozen: slowest answer {slowest:?}; {FROZEN}: {}",
        why.unwrap_or_default()
    );
}
