// Headless-browser test of the geokv admin dashboard.
//
//   node tests/browser/dashboard.test.mjs URL SCREENSHOT [--regions N|R1,R2,...] [--paused PAIR]
//
// Opens URL (a node's http://ADMIN/dashboard) in Debian's Chromium through
// playwright-core and checks what a person looking at the page would notice:
// - the page loads with no console error, page error, failed request or
//   HTTP error response (the page and its assets come from the node alone);
// - the cluster view: the lag matrix has the regions on both axes (in the
//   order given, when names are), a cell with a numeric lag for each of the
//   N (N - 1) ordered pairs, each with a uPlot sparkline holding points, and
//   a dash on the diagonal; the cluster region table lists N regions, all
//   "ok"; the home lease table names a holder and an epoch for each region's
//   home; the failover timeline chart exists; the conflicts table has a
//   column per region;
// - the node view: the lag chart is a uPlot chart with one series per
//   outgoing link of the serving node, named "source→destination" in the
//   legend, each holding several polled points, and its canvas has pixels
//   in the series' colours; the node's region table lists N regions, all
//   healthy;
// - with --paused PAIR ("source→destination"), that matrix cell says
//   "paused" with a lag;
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
/** Cluster polls (one per two seconds) before the sparklines are checked. */
const CLUSTER_POLLS_MIN = 3;
const CHROMIUM = process.env.GEOKV_CHROMIUM || "/usr/bin/chromium";
const ARROW = "\u2192";

function usage(why) {
  console.error(`${why}\nusage: node dashboard.test.mjs URL SCREENSHOT [--regions N|R1,R2,...] [--paused SOURCE${ARROW}DEST]`);
  process.exit(1);
}

function parseArgs(argv) {
  const positional = [];
  const opts = { regions: 4, names: null, paused: null };
  for (let i = 0; i < argv.length; i += 1) {
    const a = argv[i];
    if (a === "--regions") {
      const v = argv[++i] || "";
      if (/^\d+$/.test(v)) opts.regions = Number(v);
      else {
        opts.names = v.split(",").filter((n) => n);
        opts.regions = opts.names.length;
      }
    }
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

    // ---- the cluster view ----
    await page.waitForFunction(
      (min) => window.geokvDashboard.cluster.updates >= min,
      CLUSTER_POLLS_MIN,
      { timeout: WAIT_TIMEOUT_MS },
    );
    check(true, `page polled /dashboard/cluster at least ${CLUSTER_POLLS_MIN} times`);
    const matrix = await page.evaluate(() => {
      const cols = [...document.querySelectorAll("#lag-matrix thead th.destination")].map((e) => e.textContent);
      const rows = [...document.querySelectorAll("#lag-matrix tbody tr")].map((r) => r.querySelector("th").textContent);
      const cells = [...document.querySelectorAll("#lag-matrix td.cell")].map((c) => {
        const key = c.dataset.source + "\u2192" + c.dataset.destination;
        const plot = window.geokvDashboard.cluster.sparks.get(key);
        const canvas = c.querySelector(".spark canvas");
        return {
          key,
          state: c.dataset.state,
          lag: c.dataset.lagSeconds,
          text: c.querySelector(".lag").textContent,
          points: plot ? plot.data[1].filter((v) => typeof v === "number").length : -1,
          canvas: canvas ? canvas.width * canvas.height : 0,
        };
      });
      const diagonal = document.querySelectorAll("#lag-matrix td.self").length;
      return { cols, rows, cells, diagonal };
    });
    const n = opts.regions;
    check(matrix.cols.length === n, `matrix has ${n} destination columns`, matrix.cols.join(", "));
    check(matrix.rows.length === n, `matrix has ${n} source rows`, matrix.rows.join(", "));
    if (opts.names) {
      check(matrix.cols.join(",") === opts.names.join(","), "destination axis names the regions in order", matrix.cols.join(","));
      check(matrix.rows.join(",") === opts.names.join(","), "source axis names the regions in order", matrix.rows.join(","));
    }
    check(matrix.diagonal === n, `matrix diagonal has ${n} empty cells`, matrix.diagonal);
    check(matrix.cells.length === n * (n - 1), `matrix has ${n * (n - 1)} pair cells`, matrix.cells.length);
    for (const c of matrix.cells) {
      const lag = Number(c.lag);
      check(c.lag !== "" && Number.isFinite(lag) && lag >= 0, `cell ${c.key} has a numeric lag`, JSON.stringify(c));
      check(/\d/.test(c.text), `cell ${c.key} shows its lag`, c.text);
      check(c.points >= 2 && c.canvas > 0, `cell ${c.key} has a sparkline with points`, JSON.stringify(c));
    }

    const clusterRegions = await page.$$eval("#cluster-regions tbody tr[data-region]", (rows) =>
      rows.map((r) => ({ name: r.dataset.region, state: r.dataset.state, text: r.textContent })),
    );
    check(clusterRegions.length === n, `cluster health lists ${n} regions`, JSON.stringify(clusterRegions));
    const notOk = clusterRegions.filter((r) => r.state !== "ok" || !r.text.includes("ok"));
    check(notOk.length === 0, `all ${n} regions answer and are heard`, JSON.stringify(notOk));

    const homes = await page.$$eval("#homes tbody tr[data-home]", (rows) =>
      rows.map((r) => ({
        home: r.dataset.home,
        homeRegion: r.dataset.homeRegion,
        holder: r.dataset.holder,
        epoch: Number(r.dataset.epoch),
        text: r.textContent,
      })),
    );
    const regionNames = opts.names || clusterRegions.map((r) => r.name);
    for (const name of regionNames) {
      const h = homes.find((x) => x.homeRegion === name);
      check(
        h && regionNames.includes(h.holder) && h.epoch >= 1 && h.text.includes(h.holder),
        `home ${name} shows its holder and epoch`,
        JSON.stringify(homes),
      );
    }
    const timeline = await page.evaluate(() => {
      const plot = window.geokvDashboard.cluster.epochs;
      return plot ? { series: plot.series.length - 1, canvas: !!document.querySelector("#epochs-chart canvas") } : null;
    });
    check(timeline && timeline.canvas && timeline.series >= 1, "failover timeline chart drawn", JSON.stringify(timeline));
    const conflictCols = await page.$$eval("#cluster-conflicts thead th", (ths) => ths.map((t) => t.textContent));
    check(
      regionNames.every((r) => conflictCols.includes(r)),
      "conflicts table has a column per region",
      conflictCols.join(", "),
    );

    if (opts.paused) {
      const [src, dst] = opts.paused.split(ARROW);
      await page.waitForFunction(
        ([s, d]) => {
          const cell = document.querySelector(`#lag-matrix td.cell[data-source="${s}"][data-destination="${d}"]`);
          return cell && cell.dataset.state === "paused" && cell.dataset.lagSeconds !== "";
        },
        [src, dst],
        { timeout: WAIT_TIMEOUT_MS },
      );
      check(true, `matrix cell ${opts.paused} shows paused with a lag`);
    }

    const clusterStatus = await page.textContent("#cluster-status");
    check(clusterStatus.includes("gathered by"), "cluster status line shows a live view", clusterStatus);

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
