// Headless-browser test of the geokv admin dashboard.
//
//   node tests/browser/dashboard.test.mjs URL SCREENSHOT [--regions N] [--paused PAIR]
//
// Opens URL (a node's http://ADMIN/dashboard) in Debian's Chromium through
// playwright-core and checks what a person looking at the page would notice:
// - the page loads with no console error, page error, failed request or
//   HTTP error response (the page and its assets come from the node alone);
// - the lag chart is a uPlot chart with one series per outgoing link, named
//   "source→destination" in the legend, each holding several polled points,
//   and its canvas has pixels in the series' colours;
// - the region health table lists N regions (default 4), all healthy;
// - with --paused PAIR, that link's row says "paused" and its lag in entries
//   is above zero;
// then saves a full-page screenshot to SCREENSHOT.
//
// Prints one "ok: ..." line per check and "PASS" last; exits 1 on a failed
// check and 2 when the whole run exceeds RUN_TIMEOUT_MS. tests/dashboard.rs
// runs it against a `geokv dev` cluster.

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

/** Bound on the whole run, browser start to screenshot. */
const RUN_TIMEOUT_MS = 90_000;
/** Bound on any one wait for the page. */
const WAIT_TIMEOUT_MS = 30_000;
/** Polls the page must have completed before its charts are checked. */
const POLLS_MIN = 5;
const CHROMIUM = process.env.GEOKV_CHROMIUM || "/usr/bin/chromium";
const ARROW = "\u2192";

function usage(why) {
  console.error(`${why}\nusage: node dashboard.test.mjs URL SCREENSHOT [--regions N] [--paused SOURCE${ARROW}DEST]`);
  process.exit(1);
}

function parseArgs(argv) {
  const positional = [];
  const opts = { regions: 4, paused: null };
  for (let i = 0; i < argv.length; i += 1) {
    const a = argv[i];
    if (a === "--regions") opts.regions = Number(argv[++i]);
    else if (a === "--paused") opts.paused = argv[++i];
    else if (a.startsWith("--")) usage(`unknown option ${a}`);
    else positional.push(a);
  }
  if (positional.length !== 2) usage("expected URL and SCREENSHOT");
  if (!Number.isInteger(opts.regions) || opts.regions < 1) usage("--regions needs a positive integer");
  [opts.url, opts.screenshot] = positional;
  return opts;
}

class CheckFailed extends Error {}

function check(cond, what, detail) {
  if (!cond) throw new CheckFailed(`${what}${detail === undefined ? "" : `: ${detail}`}`);
  console.log(`ok: ${what}`);
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const watchdog = setTimeout(() => {
    console.error(`FAIL: the browser test did not finish within ${RUN_TIMEOUT_MS} ms`);
    process.exit(2);
  }, RUN_TIMEOUT_MS);

  // A fresh profile per run: no cache, cookies or extensions from elsewhere.
  const profile = await mkdtemp(join(tmpdir(), "geokv-chromium-"));
  let context = null;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
      viewport: { width: 1400, height: 1000 },
      timeout: WAIT_TIMEOUT_MS,
    });
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(WAIT_TIMEOUT_MS);

    const problems = [];
    page.on("console", (m) => {
      if (m.type() === "error") problems.push(`console error: ${m.text()}`);
    });
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    page.on("requestfailed", (r) => {
      // A poll cut short by navigation or close is not the page's fault.
      if (!page.isClosed()) problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
    });
    page.on("response", (r) => {
      if (r.status() >= 400) problems.push(`HTTP ${r.status()} for ${r.url()}`);
    });

    const response = await page.goto(opts.url, { waitUntil: "load" });
    check(response && response.status() === 200, "page loads", response && response.status());
    const origin = new URL(opts.url).origin;
    const foreign = [];
    page.on("request", (r) => {
      if (!r.url().startsWith(origin) && !r.url().startsWith("data:")) foreign.push(r.url());
    });

    await page.waitForFunction(
      (min) => window.geokvDashboard && window.geokvDashboard.state.updates >= min,
      POLLS_MIN,
      { timeout: WAIT_TIMEOUT_MS },
    );
    check(true, `page polled /dashboard/data at least ${POLLS_MIN} times`);

    const data = await page.evaluate(() => window.geokvDashboard.state.data);
    // One link per destination node: the legend names the node too.
    const pairs = data.links.map(
      (l) => l.source + ARROW + l.destination + (l.destination_node ? "/" + l.destination_node : ""),
    );
    check(pairs.length === opts.regions - 1, `node reports ${opts.regions - 1} outgoing links`, pairs.join(", "));

    // The lag chart: a uPlot instance whose series are the link pairs.
    const chart = await page.evaluate(() => {
      const plot = window.geokvDashboard.charts.lagSeconds.plot;
      if (!plot) return null;
      const legend = [...document.querySelectorAll("#lag-seconds-chart .u-legend .u-series .u-label")].map(
        (e) => e.textContent,
      );
      const series = plot.series.slice(1).map((s, i) => ({
        label: s.label,
        stroke: typeof s.stroke === "function" ? s.stroke(plot, i + 1) : s.stroke,
        points: plot.data[i + 1].filter((v) => typeof v === "number").length,
      }));
      // Count canvas pixels of each series colour (exact RGB; lines are
      // antialiased, so the centre pixels match).
      const canvas = document.querySelector("#lag-seconds-chart canvas");
      const ctx = canvas.getContext("2d");
      const { data: px } = ctx.getImageData(0, 0, canvas.width, canvas.height);
      const hex = (r, g, b) => "#" + [r, g, b].map((v) => v.toString(16).padStart(2, "0")).join("");
      const counts = {};
      for (let i = 0; i < px.length; i += 4) {
        if (px[i + 3] < 250) continue;
        const h = hex(px[i], px[i + 1], px[i + 2]);
        counts[h] = (counts[h] || 0) + 1;
      }
      return { legend, series, colourPixels: counts, canvas: { w: canvas.width, h: canvas.height } };
    });
    check(chart !== null, "lag chart exists");
    check(chart.canvas.w > 100 && chart.canvas.h > 100, "lag chart canvas has a size", JSON.stringify(chart.canvas));
    for (const pair of pairs) {
      check(chart.legend.includes(pair), `legend names ${pair}`, `legend: ${chart.legend.join(", ")}`);
      const s = chart.series.find((x) => x.label === pair);
      check(s && s.points >= POLLS_MIN - 1, `series ${pair} holds polled points`, s && s.points);
    }
    const drawn = chart.series.filter((s) => (chart.colourPixels[s.stroke.toLowerCase()] || 0) >= 20);
    check(drawn.length >= 1, "lag chart canvas shows series lines", JSON.stringify(chart.series));

    // Region health, as the table shows it.
    const regions = await page.$$eval("#regions tbody tr[data-region]", (rows) =>
      rows.map((r) => ({
        name: r.dataset.region,
        healthy: r.dataset.healthy === "true",
        text: r.textContent,
      })),
    );
    check(regions.length === opts.regions, `${opts.regions} region rows`, JSON.stringify(regions));
    const unhealthy = regions.filter((r) => !r.healthy || !r.text.includes("healthy") || r.text.includes("unhealthy"));
    check(unhealthy.length === 0, `all ${opts.regions} regions healthy`, JSON.stringify(unhealthy));

    if (opts.paused) {
      await page.waitForFunction(
        (pair) => {
          // The row names the destination node too ("region/node").
          const row = document.querySelector(`#links tr[data-link^="${pair}"]`);
          const link = window.geokvDashboard.state.data.links.find((l) => l.source + "\u2192" + l.destination === pair);
          return row && row.dataset.state === "paused" && link && link.lag_entries > 0;
        },
        opts.paused,
        { timeout: WAIT_TIMEOUT_MS },
      );
      check(true, `link ${opts.paused} shows paused with entries waiting`);
    }

    const status = await page.textContent("#status");
    check(!status.includes("no answer"), "status line shows a live node", status);
    check(foreign.length === 0, "no request leaves the node's origin", foreign.join(", "));
    check(problems.length === 0, "no console errors or failed requests", "\n  " + problems.join("\n  "));

    await page.screenshot({ path: opts.screenshot, fullPage: true });
    check(true, `screenshot saved to ${opts.screenshot}`);
    console.log("PASS");
  } finally {
    if (context) await context.close().catch(() => {});
    await rm(profile, { recursive: true, force: true }).catch(() => {});
    clearTimeout(watchdog);
  }
}

main().catch((e) => {
  console.error(e instanceof CheckFailed ? `FAIL: ${e.message}` : `FAIL: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
