// Headless-browser test of a geokv-jepsen run report.
//
//   node jepsen/tests/browser/report.test.mjs RUN_DIR SCREENSHOT
//
// Opens RUN_DIR/index.html (file://) in Debian's Chromium through
// playwright-core and checks what a person looking at the page would see:
// - no console error, page error or failed request (the page needs nothing
//   but its folder: uPlot and data.js sit beside it);
// - the title names the workload, the nemesis and the outcome;
// - one verdict row per checker of verdicts.json;
// - two uPlot charts (latency, throughput), each canvas with drawn pixels
//   in its series' colours and, when the run had faults, the fault shade;
// then saves a full-page screenshot to SCREENSHOT.
//
// Prints one "ok: ..." line per check and "PASS" last; exits 1 on a failed
// check and 2 when the whole run exceeds RUN_TIMEOUT_MS.

import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { chromium } from "playwright-core";

const RUN_TIMEOUT_MS = 90_000;
const WAIT_TIMEOUT_MS = 30_000;
const CHROMIUM = process.env.GEOKV_CHROMIUM || "/usr/bin/chromium";

class CheckFailed extends Error {}

function check(cond, what, detail) {
  if (!cond) throw new CheckFailed(`${what}${detail === undefined ? "" : `: ${detail}`}`);
  console.log(`ok: ${what}`);
}

async function main() {
  const [dir, screenshot] = process.argv.slice(2);
  if (!dir || !screenshot) {
    console.error("usage: node report.test.mjs RUN_DIR SCREENSHOT");
    process.exit(1);
  }
  const summary = JSON.parse(await readFile(join(dir, "verdicts.json"), "utf8"));
  const profile = await mkdtemp(join(tmpdir(), "geokv-jepsen-chromium-"));
  let context = null;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"],
      viewport: { width: 1400, height: 1000 },
      timeout: WAIT_TIMEOUT_MS,
    });
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(WAIT_TIMEOUT_MS);
    const problems = [];
    page.on("console", (m) => { if (m.type() === "error") problems.push(`console error: ${m.text()}`); });
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    page.on("requestfailed", (r) => problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));

    await page.goto(pathToFileURL(resolve(dir, "index.html")).href);
    await page.waitForFunction(() => Number(document.body.dataset.charts || 0) >= 2);
    check(problems.length === 0, "page loads with no error", problems.join("; "));

    const title = await page.textContent("#title");
    check(title.includes(summary.workload) && title.includes(summary.nemesis)
      && title.toUpperCase().includes(summary.outcome.toUpperCase()), "title names workload, nemesis and outcome", title);

    const rows = await page.$$eval("#verdicts tr", (trs) => trs.length - 1);
    check(rows === summary.verdicts.length, `one verdict row per checker (${rows})`);

    const faults = summary.nemesis_steps.installed > 0;
    const charts = await page.evaluate(() => [...document.querySelectorAll(".uplot canvas")].map((canvas) => {
      const ctx = canvas.getContext("2d");
      const { data: px } = ctx.getImageData(0, 0, canvas.width, canvas.height);
      let drawn = 0, green = 0, shade = 0;
      for (let i = 0; i < px.length; i += 4) {
        const [r, g, b, a] = [px[i], px[i + 1], px[i + 2], px[i + 3]];
        if (a === 0) continue;
        drawn += 1;
        // ok series #2e7d32
        if (Math.abs(r - 0x2e) < 30 && Math.abs(g - 0x7d) < 30 && Math.abs(b - 0x32) < 30) green += 1;
        // fault shade: tomato (255, 99, 71) at 18% alpha on the transparent canvas
        if (r > 240 && Math.abs(g - 99) < 25 && Math.abs(b - 71) < 25 && a < 80) shade += 1;
      }
      return { width: canvas.width, height: canvas.height, drawn, green, shade };
    }));
    check(charts.length === 2, "two uPlot charts (latency, throughput)", JSON.stringify(charts));
    for (const [i, c] of charts.entries()) {
      check(c.width > 300 && c.height > 100, `chart ${i} has a real size`, JSON.stringify(c));
      check(c.green > 50, `chart ${i} draws the ok series`, JSON.stringify(c));
      if (faults) check(c.shade > 500, `chart ${i} shades the fault windows`, JSON.stringify(c));
    }
    const nemesisRows = await page.$$eval("#nemesis tr", (trs) => trs.length - 1);
    check(nemesisRows >= 1, `nemesis table lists the steps (${nemesisRows})`);
    await page.screenshot({ path: screenshot, fullPage: true });
    check(problems.length === 0, "no error while checking", problems.join("; "));
    console.log("PASS");
  } finally {
    if (context) await context.close();
    await rm(profile, { recursive: true, force: true });
  }
}

const timer = setTimeout(() => { console.error(`timed out after ${RUN_TIMEOUT_MS} ms`); process.exit(2); }, RUN_TIMEOUT_MS);
main().then(() => { clearTimeout(timer); }, (e) => {
  clearTimeout(timer);
  console.error(e instanceof CheckFailed ? `FAIL: ${e.message}` : e.stack || String(e));
  process.exit(1);
});
