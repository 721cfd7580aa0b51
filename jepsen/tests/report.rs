//! A run's report opens in a real browser and shows its plots: a short
//! counter run under partitions, then `jepsen/tests/browser/report.test.mjs`
//! drives headless Chromium against the run folder's `index.html` (see that
//! script for what it checks). Also checks the run folder holds what
//! `--reproduce` and a reader need.
//!
//! Needs `node`, Debian's `chromium` and `jepsen/tests/browser/node_modules`
//! (playwright-core, `npm ci --prefix jepsen/tests/browser`, done by
//! `scripts/deps`); the test fails naming what is missing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use geokv_jepsen::checker::Outcome;
use geokv_jepsen::nemesis::NemesisKind;
use geokv_jepsen::workload::WorkloadKind;

const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_opens_in_a_browser_and_shows_the_plots() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: run scripts/deps (npm ci --prefix jepsen/tests/browser)"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists() || std::env::var_os("GEOKV_CHROMIUM").is_some(),
        "chromium is missing: run scripts/deps"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let opts = common::options(WorkloadKind::Counter, NemesisKind::Partition, 12, 400, 21, out.clone());
    let summary = geokv_jepsen::run::run(&opts).await.expect("run");
    assert_eq!(summary.outcome, Outcome::Pass, "{:?}", summary.verdicts);
    for f in [
        "history.jsonl",
        "verdicts.json",
        "final.json",
        "options.json",
        "seed",
        "command",
        "schedule.json",
        "index.html",
        "data.js",
        "uPlot.iife.min.js",
        "uPlot.min.css",
    ] {
        assert!(out.join(f).exists(), "{f} missing from the run folder");
    }
    assert_eq!(std::fs::read_to_string(out.join("seed")).unwrap().trim(), "21");

    let shot = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("jepsen-report.png");
    let mut child = Command::new("node")
        .arg(browser_dir.join("report.test.mjs"))
        .arg(&out)
        .arg(&shot)
        .spawn()
        .expect("run node (is Node.js installed?)");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            panic!("the browser test did not finish within {BROWSER_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "report.test.mjs failed ({status}); see its output above");
    assert!(
        std::fs::metadata(&shot).map(|m| m.len() > 20_000).unwrap_or(false),
        "screenshot too small or missing"
    );
}
