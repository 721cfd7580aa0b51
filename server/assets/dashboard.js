// geokv live dashboard.
//
// The cluster view: polls /dashboard/cluster (server/src/admin/cluster.rs)
// every two seconds and draws the replication-lag matrix of every region
// pair (value now and a uPlot sparkline of the history the serving node
// keeps), region health, home leases, the failover timeline and conflicts
// per table per region.
//
// The node view: polls /dashboard/data (see server/src/admin/dashboard.rs for its fields)
// once a second, keeps a bounded history in memory, and draws it with uPlot:
// replication lag per (source, destination) pair in seconds and in entries,
// and the conflict rate per table. Tables show region health, the outgoing
// links' state and inbound freshness as of the latest snapshot.
//
// History: one array of x values (seconds since the epoch, by the node's
// clock) and, per series, an array of y values aligned with it. A series that
// appears later is padded with nulls on the left; a series missing from a
// snapshot gets a null there. At most HISTORY_POINTS_MAX points are kept and a
// series with no value left in the window is dropped, so memory stays bounded
// however long the page is open.
//
// window.geokvDashboard exposes the state and the charts, read-only, for the
// browser test (tests/browser/dashboard.test.mjs).
"use strict";

(function () {
  /** Time between the start of one poll and the start of the next. */
  const POLL_INTERVAL_MS = 1000;
  /** A poll that takes longer than this is abandoned and counted as failed. */
  const FETCH_TIMEOUT_MS = 2500;
  /** Points kept per series: five minutes at one poll a second. */
  const HISTORY_POINTS_MAX = 300;
  /** Tables drawn in the conflict chart (the largest totals), besides the sum. */
  const CONFLICT_SERIES_MAX = 8;
  /** The data document version this page understands. */
  const DATA_VERSION = 1;
  /** The cluster document version this page understands. */
  const CLUSTER_VERSION = 1;
  /** Time between cluster polls; the node samples at most this often anyway. */
  const CLUSTER_POLL_INTERVAL_MS = 2000;
  /** The node waits at most its gather deadline (1.5 s) for other regions. */
  const CLUSTER_FETCH_TIMEOUT_MS = 5000;
  /** Lag (seconds) above which a matrix cell turns amber, and red. */
  const LAG_WARN_S = 1;
  const LAG_BAD_S = 5;
  const SPARK_WIDTH_PX = 140;
  const SPARK_HEIGHT_PX = 36;
  /** Narrowest time axis drawn, in seconds. */
  const X_WINDOW_MIN_S = 60;
  const CHART_HEIGHT_PX = 240;
  const SMALL_CHART_HEIGHT_PX = 160;
  const PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
  ];
  const ARROW = "\u2192";
  const ALL_TABLES = "all tables";

  // ---- formatting ----------------------------------------------------------

  function fmtSeconds(s) {
    if (s == null) return "\u2013";
    if (s === 0) return "0";
    if (s < 0.001) return "<1 ms";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    return s.toFixed(s < 10 ? 2 : 1) + " s";
  }

  function fmtCount(n) {
    if (n == null) return "\u2013";
    return Number.isInteger(n) ? n.toLocaleString("en-US") : n.toFixed(2);
  }

  function fmtBytes(n) {
    if (n == null) return "\u2013";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }

  function fmtRate(r) {
    if (r == null) return "\u2013";
    return r === 0 ? "0" : r.toFixed(2);
  }

  function fmtAgo(ms) {
    if (ms == null) return "never";
    if (ms < 1000) return ms + " ms ago";
    return (ms / 1000).toFixed(1) + " s ago";
  }

  /** Seconds since the epoch as local HH:MM:SS. */
  function fmtClock(s) {
    return new Date(s * 1000).toLocaleTimeString("en-GB", { hour12: false });
  }

  function fmtDuration(ms) {
    const s = Math.floor(ms / 1000);
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
    return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  }

  // ---- small DOM helper: elements from data, never from HTML strings ------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "style") Object.assign(node.style, v);
      else node.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c == null) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function fillBody(table, rows, emptyText, columns) {
    const body = table.tBodies[0];
    if (rows.length === 0) {
      body.replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: columns }, emptyText)));
    } else {
      body.replaceChildren(...rows);
    }
  }

  // ---- colours: stable per series key --------------------------------------

  const colours = new Map();
  function colourOf(key) {
    if (key === ALL_TABLES) return "#1d2330";
    if (!colours.has(key)) colours.set(key, PALETTE[colours.size % PALETTE.length]);
    return colours.get(key);
  }

  // ---- bounded history -----------------------------------------------------

  class History {
    constructor(limit) {
      this.limit = limit;
      this.x = [];
      this.series = new Map();
    }

    /** Appends one point; `values` maps series key to a number. */
    push(x, values) {
      const last = this.x[this.x.length - 1];
      if (last !== undefined && x <= last) return; // uPlot needs x ascending
      this.x.push(x);
      for (const [key, ys] of this.series) ys.push(values.has(key) ? values.get(key) : null);
      for (const [key, v] of values) {
        if (!this.series.has(key)) {
          const ys = new Array(this.x.length - 1).fill(null);
          ys.push(v);
          this.series.set(key, ys);
        }
      }
      const excess = this.x.length - this.limit;
      if (excess > 0) {
        this.x.splice(0, excess);
        for (const ys of this.series.values()) ys.splice(0, excess);
      }
      for (const [key, ys] of this.series) {
        if (ys.every((v) => v === null)) this.series.delete(key);
      }
    }

    keys() {
      return [...this.series.keys()].sort((a, b) => {
        if (a === ALL_TABLES) return -1;
        if (b === ALL_TABLES) return 1;
        return a < b ? -1 : a > b ? 1 : 0;
      });
    }

    data(keys) {
      return [this.x, ...keys.map((k) => this.series.get(k))];
    }
  }

  // ---- a uPlot line chart whose series follow the history's keys ----------

  class LineChart {
    constructor(container, { height, format }) {
      this.container = container;
      this.height = height;
      this.format = format;
      this.keys = null;
      this.plot = null;
    }

    update(history) {
      const keys = history.keys();
      const data = history.data(keys);
      const same = this.keys && keys.length === this.keys.length && keys.every((k, i) => k === this.keys[i]);
      if (this.plot && same) {
        this.plot.setData(data);
        return;
      }
      // The set of series changed (a link or table appeared or aged out):
      // build the chart again, which is cheap at these sizes.
      if (this.plot) this.plot.destroy();
      this.keys = keys;
      const format = this.format;
      this.plot = new uPlot(
        {
          width: this.width(),
          height: this.height,
          scales: {
            // At least X_WINDOW_MIN_S wide, so the first seconds after the
            // page opens do not stretch across the whole chart.
            x: {
              time: true,
              range: (u, min, max) => {
                const hi = max == null ? Date.now() / 1000 : max;
                return [min == null ? hi - X_WINDOW_MIN_S : Math.min(min, hi - X_WINDOW_MIN_S), hi];
              },
            },
            // From zero, so a small lag does not look like a large one.
            y: { range: (u, min, max) => [0, max != null && max > 0 ? max * 1.15 : 1] },
          },
          series: [
            {},
            ...keys.map((k) => ({
              label: k,
              stroke: colourOf(k),
              width: 2,
              points: { show: false },
              value: (u, v) => (v == null ? "\u2013" : format(v)),
            })),
          ],
          axes: [
            // One line of local wall-clock time per tick, spaced so labels
            // never overlap, even in the narrow conflict chart.
            { space: 80, values: (u, ticks) => ticks.map(fmtClock) },
            { size: 70, values: (u, ticks) => ticks.map((t) => format(t)) },
          ],
          cursor: { drag: { x: false, y: false } },
        },
        data,
        this.container,
      );
    }

    width() {
      return Math.max(200, this.container.clientWidth);
    }

    resize() {
      if (this.plot) this.plot.setSize({ width: this.width(), height: this.height });
    }
  }

  // ---- state ---------------------------------------------------------------

  const state = {
    /** Completed polls, successful or not. */
    polls: 0,
    /** Successful polls. */
    updates: 0,
    /** Failed polls in a row. */
    failures: 0,
    lastError: "",
    /** The latest /dashboard/data document. */
    data: null,
    lagSeconds: new History(HISTORY_POINTS_MAX),
    lagEntries: new History(HISTORY_POINTS_MAX),
    conflictRate: new History(HISTORY_POINTS_MAX),
    /** Conflict totals per table at the previous snapshot, for the rate. */
    previousConflicts: null,
    previousAtMs: null,
    /** Latest conflicts per second per table. */
    conflictRates: new Map(),
  };

  const charts = {};

  function pairName(link) {
    // Several nodes per region: one link per destination node.
    const node = link.destination_node ? "/" + link.destination_node : "";
    return link.source + ARROW + link.destination + node;
  }

  function record(data) {
    const x = data.at_ms / 1000;
    const seconds = new Map();
    const entries = new Map();
    for (const link of data.links) {
      seconds.set(pairName(link), link.lag_seconds);
      entries.set(pairName(link), link.lag_entries);
    }
    state.lagSeconds.push(x, seconds);
    state.lagEntries.push(x, entries);

    // Conflicts arrive as totals since the node started; the rate is the
    // difference between snapshots. A total that went down means the node
    // restarted, so that interval counts from zero.
    const totals = new Map(data.conflicts.map((c) => [c.table, c.total]));
    const rates = new Map();
    if (state.previousConflicts && data.at_ms > state.previousAtMs) {
      const dt = (data.at_ms - state.previousAtMs) / 1000;
      let sum = 0;
      for (const [table, total] of totals) {
        const before = state.previousConflicts.get(table) || 0;
        const delta = total >= before ? total - before : total;
        rates.set(table, delta / dt);
        sum += delta / dt;
      }
      const drawn = new Map([[ALL_TABLES, sum]]);
      for (const c of data.conflicts.slice(0, CONFLICT_SERIES_MAX)) drawn.set(c.table, rates.get(c.table));
      state.conflictRate.push(x, drawn);
    }
    state.previousConflicts = totals;
    state.previousAtMs = data.at_ms;
    state.conflictRates = rates;
  }

  // ---- rendering -----------------------------------------------------------

  function renderHeader(data) {
    document.getElementById("region").textContent = data.region;
    document.getElementById("node-region-note").textContent = `(${data.region}/${data.node_id}: its outgoing links and its view)`;
    document.title = "geokv " + data.region;
    const status = document.getElementById("status");
    const at = new Date(data.at_ms).toLocaleTimeString("en-GB");
    let text = `node ${data.node_id} \u00b7 up ${fmtDuration(data.uptime_ms)} \u00b7 log ${fmtCount(data.log_seq)} \u00b7 updated ${at}`;
    if (data.version !== DATA_VERSION) {
      text += ` \u00b7 data version ${data.version}, page expects ${DATA_VERSION}: reload`;
    }
    status.textContent = text;
    status.classList.remove("failing");
  }

  function renderRegions(data) {
    const rows = data.regions.map((r) =>
      el(
        "tr",
        { "data-region": r.name, "data-healthy": r.healthy },
        el("td", {}, r.name, r.local ? el("span", { class: "local" }, " (this node)") : null),
        el("td", {}, el("span", { class: "badge " + (r.healthy ? "ok" : "bad") }, r.healthy ? "healthy" : "unhealthy")),
        el("td", {}, r.local ? "\u2013" : fmtAgo(r.last_contact_ms)),
      ),
    );
    fillBody(document.getElementById("regions"), rows, "no regions configured", 3);
  }

  function linkState(link) {
    if (link.paused) return ["paused", "warn"];
    if (link.connected) return ["connected", "ok"];
    return ["disconnected", "bad"];
  }

  function renderLinks(data) {
    const rows = data.links.map((l) => {
      const [label, cls] = linkState(l);
      return el(
        "tr",
        { "data-link": pairName(l), "data-state": label },
        el("td", {}, el("span", { class: "swatch", style: { background: colourOf(pairName(l)) } }), pairName(l)),
        el("td", {}, el("span", { class: "badge " + cls }, label)),
        el("td", { class: "num" }, fmtSeconds(l.lag_seconds)),
        el("td", { class: "num" }, fmtCount(l.lag_entries)),
        el("td", { class: "num" }, fmtBytes(l.lag_bytes)),
        el("td", { class: "num" }, fmtBytes(l.shipped_bytes)),
        el("td", { class: "num" }, fmtCount(l.acked_seq) + " / " + fmtCount(l.head_seq)),
        el("td", { class: "num" }, fmtCount(l.skipped_by_residency)),
      );
    });
    fillBody(document.getElementById("links"), rows, "no outgoing links (replication off or a single region)", 8);
    const errors = data.links.filter((l) => l.last_error).map((l) => pairName(l) + ": " + l.last_error);
    document.getElementById("link-errors").textContent = errors.join("\n");
  }

  function renderInbound(data) {
    const rows = data.inbound.map((i) =>
      el(
        "tr",
        { "data-source": i.source },
        el("td", {}, i.source),
        el("td", { class: "num" }, fmtCount(i.applied_through)),
        el("td", { class: "num" }, i.staleness_ms == null ? "not yet fresh" : fmtSeconds(i.staleness_ms / 1000)),
      ),
    );
    fillBody(document.getElementById("inbound"), rows, "nothing received yet", 3);
  }

  function renderConflicts(data) {
    const rows = data.conflicts.map((c) =>
      el(
        "tr",
        { "data-table": c.table },
        el("td", {}, c.table),
        el("td", { class: "num" }, fmtCount(c.total)),
        el("td", { class: "num" }, fmtRate(state.conflictRates.get(c.table))),
      ),
    );
    fillBody(document.getElementById("conflicts"), rows, "no conflicts since the node started", 3);
  }

  function render(data) {
    renderHeader(data);
    renderRegions(data);
    renderLinks(data);
    renderInbound(data);
    renderConflicts(data);
    charts.lagSeconds.update(state.lagSeconds);
    charts.lagEntries.update(state.lagEntries);
    charts.conflicts.update(state.conflictRate);
  }

  function renderFailure() {
    const status = document.getElementById("status");
    const since = state.data ? new Date(state.data.at_ms).toLocaleTimeString("en-GB") : "the page loaded";
    status.textContent = `no answer from the node since ${since} (${state.failures} failed polls): ${state.lastError}`;
    status.classList.add("failing");
  }

  // ---- the cluster view ----------------------------------------------------

  const cluster = {
    /** Completed cluster polls, successful or not. */
    polls: 0,
    /** Successful cluster polls. */
    updates: 0,
    failures: 0,
    lastError: "",
    /** The latest /dashboard/cluster document. */
    data: null,
    /** uPlot sparkline per "source→destination". */
    sparks: new Map(),
    /** The failover timeline chart. */
    epochs: null,
    epochKeys: null,
  };

  function lagClass(p) {
    if (p.lag_seconds == null) return "";
    if (p.lag_seconds >= LAG_BAD_S) return "lag-bad";
    if (p.lag_seconds >= LAG_WARN_S) return "lag-warn";
    return "lag-ok";
  }

  function sparkOptions(key) {
    return {
      width: SPARK_WIDTH_PX,
      height: SPARK_HEIGHT_PX,
      pxAlign: false,
      cursor: { show: false },
      legend: { show: false },
      select: { show: false },
      axes: [{ show: false }, { show: false }],
      scales: {
        x: { time: false },
        y: { range: (u, min, max) => [0, max != null && max > 0 ? max * 1.1 : 1] },
      },
      series: [{}, { label: key, stroke: colourOf(key), width: 1.5, points: { show: false } }],
    };
  }

  /** The matrix header and one row per source; cells are rebuilt each poll, sparklines kept. */
  function renderMatrix(data) {
    const table = document.getElementById("lag-matrix");
    const names = data.regions.map((r) => r.name);
    const head = el("tr", {}, el("th", { class: "corner" }, "source \u2193 destination \u2192"));
    for (const n of names) head.append(el("th", { class: "destination", "data-destination": n }, n));
    table.tHead.replaceChildren(head);
    const xs = data.history_at_ms.map((t) => t / 1000);
    const byPair = new Map(data.pairs.map((p) => [p.source + ARROW + p.destination, p]));
    const rows = names.map((s) => {
      const row = el("tr", { "data-source": s }, el("th", { class: "source", scope: "row" }, s));
      for (const d of names) {
        if (s === d) {
          row.append(el("td", { class: "self" }, "\u2013"));
          continue;
        }
        const key = s + ARROW + d;
        const p = byPair.get(key);
        const state = p ? p.state : "unknown";
        const lag = p && p.lag_seconds != null ? fmtSeconds(p.lag_seconds) : state === "none" ? "none" : "?";
        const spark = el("div", { class: "spark" });
        const cell = el(
          "td",
          {
            class: `cell state-${state} ${p ? lagClass(p) : ""}`,
            "data-source": s,
            "data-destination": d,
            "data-state": state,
            "data-lag-seconds": p && p.lag_seconds != null ? p.lag_seconds : "",
            title: p && p.lag_entries != null ? `${key}: ${fmtCount(p.lag_entries)} entries waiting` : key,
          },
          el("span", { class: "lag" }, lag),
          state === "ok" ? null : el("span", { class: "cell-state" }, state),
          spark,
        );
        row.append(cell);
        const ys = p ? p.history : xs.map(() => null);
        let plot = cluster.sparks.get(key);
        if (plot) {
          // Move the existing chart into the new cell; its canvas is kept.
          spark.append(plot.root);
          plot.setData([xs, ys]);
        } else {
          plot = new uPlot(sparkOptions(key), [xs, ys], spark);
          cluster.sparks.set(key, plot);
        }
      }
      return row;
    });
    table.tBodies[0].replaceChildren(...rows);
    // Pairs no longer configured lose their chart.
    for (const [key, plot] of cluster.sparks) {
      if (!byPair.has(key)) {
        plot.destroy();
        cluster.sparks.delete(key);
      }
    }
  }

  function regionBadge(state) {
    const cls = state === "ok" ? "ok" : state === "degraded" ? "warn" : "bad";
    return el("span", { class: "badge " + cls }, state);
  }

  function renderClusterRegions(data) {
    const rows = data.regions.map((r) =>
      el(
        "tr",
        { "data-region": r.name, "data-state": r.state },
        el("td", {}, r.name, r.local ? el("span", { class: "local" }, " (serving)") : null),
        el("td", {}, regionBadge(r.state)),
        el("td", {}, r.local ? "\u2013" : r.healthy ? "heard " + fmtAgo(r.last_contact_ms) : "missing, " + fmtAgo(r.last_contact_ms)),
        el("td", { class: "num" }, `${r.nodes_answered} / ${r.nodes_total}`),
        el("td", { class: "num" }, r.rtt_ms == null ? "none" : r.rtt_ms + " ms"),
        el("td", { "data-holds": r.holds.join(" ") }, r.holds.length ? r.holds.join(", ") : "\u2013"),
      ),
    );
    fillBody(document.getElementById("cluster-regions"), rows, "no regions configured", 6);
    const errors = data.regions.filter((r) => r.error).map((r) => r.name + ": " + r.error);
    document.getElementById("cluster-errors").textContent = errors.join("\n");
  }

  function renderHomes(data) {
    const rows = data.homes.map((h) => {
      const moved = h.holder !== h.home_region;
      const lease = h.draining_to
        ? "handing over to " + h.draining_to
        : h.expires_in_ms >= 0
          ? "runs " + fmtSeconds(h.expires_in_ms / 1000)
          : "lapsed " + fmtSeconds(-h.expires_in_ms / 1000) + " ago";
      return el(
        "tr",
        { "data-home": h.home, "data-home-region": h.home_region, "data-holder": h.holder, "data-epoch": h.epoch },
        el("td", {}, h.home),
        el("td", {}, el("span", { class: moved ? "badge warn" : "" }, h.holder)),
        el("td", { class: "num" }, h.epoch),
        el("td", {}, h.reason),
        el("td", { class: "num" }, lease),
      );
    });
    const empty = data.control_known ? "no lease granted yet" : "this node has no control plane";
    fillBody(document.getElementById("homes"), rows, empty, 5);
  }

  /** Epoch of every home over time, as stepped lines, from the epoch records. */
  function renderEpochs(data) {
    const homes = [...new Set(data.epochs.map((e) => e.home))].sort();
    const times = new Set(data.epochs.map((e) => e.granted_ms));
    times.add(data.at_ms);
    const xsMs = [...times].sort((a, b) => a - b);
    const series = homes.map((home) => {
      const records = data.epochs.filter((e) => e.home === home).sort((a, b) => a.granted_ms - b.granted_ms);
      return xsMs.map((t) => {
        let epoch = null;
        for (const r of records) if (r.granted_ms <= t) epoch = r.epoch;
        return epoch;
      });
    });
    const chartData = [xsMs.map((t) => t / 1000), ...series];
    const container = document.getElementById("epochs-chart");
    const same = cluster.epochKeys && cluster.epochKeys.join("\n") === homes.join("\n");
    if (cluster.epochs && same) {
      cluster.epochs.setData(chartData);
    } else {
      if (cluster.epochs) cluster.epochs.destroy();
      cluster.epochKeys = homes;
      cluster.epochs = new uPlot(
        {
          width: Math.max(200, container.clientWidth),
          height: SMALL_CHART_HEIGHT_PX,
          scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(2, (max || 1) + 1)] } },
          series: [
            {},
            ...homes.map((h) => ({
              label: "home " + h,
              stroke: colourOf("home " + h),
              width: 2,
              paths: uPlot.paths.stepped({ align: 1 }),
              points: { show: true, size: 6 },
              value: (u, v) => (v == null ? "\u2013" : "epoch " + v),
            })),
          ],
          axes: [
            { space: 80, values: (u, ticks) => ticks.map(fmtClock) },
            { size: 50, values: (u, ticks) => ticks.map((t) => (Number.isInteger(t) ? String(t) : "")) },
          ],
          cursor: { drag: { x: false, y: false } },
        },
        chartData,
        container,
      );
    }
    const rows = data.failovers.map((f) =>
      el(
        "tr",
        { "data-home": f.home, "data-epoch": f.epoch },
        el("td", {}, new Date(f.at_ms).toLocaleTimeString("en-GB")),
        el("td", {}, f.home),
        el("td", {}, f.from + " " + ARROW + " " + f.to),
        el("td", { class: "num" }, f.epoch),
        el("td", {}, f.reason),
        el("td", { class: "num" }, fmtSeconds(f.unavailable_ms / 1000)),
      ),
    );
    fillBody(document.getElementById("failovers"), rows, "no failover or handover yet", 6);
  }

  function renderClusterConflicts(data) {
    const table = document.getElementById("cluster-conflicts");
    const head = el("tr", {}, el("th", {}, "table"));
    for (const r of data.regions) head.append(el("th", { class: "num" }, r.name));
    head.append(el("th", { class: "num" }, "total"));
    table.tHead.replaceChildren(head);
    const rows = data.conflicts.map((c) =>
      el(
        "tr",
        { "data-table": c.table, "data-total": c.total },
        el("td", {}, c.table),
        ...c.per_region.map((n) => el("td", { class: "num" }, n == null ? "?" : fmtCount(n))),
        el("td", { class: "num" }, fmtCount(c.total)),
      ),
    );
    fillBody(table, rows, "no conflicts counted", data.regions.length + 2);
  }

  function renderCluster(data) {
    const status = document.getElementById("cluster-status");
    const silent = data.regions.filter((r) => r.state === "unreachable").map((r) => r.name);
    let text =
      `gathered by ${data.region}/${data.node_id} at ${new Date(data.at_ms).toLocaleTimeString("en-GB")}` +
      ` \u00b7 a sample every ${data.sample_interval_ms / 1000} s, ${data.history_at_ms.length} kept` +
      ` \u00b7 regions wait at most ${data.gather_deadline_ms} ms`;
    if (silent.length) text += ` \u00b7 no answer from ${silent.join(", ")}`;
    if (data.version !== CLUSTER_VERSION) text += ` \u00b7 data version ${data.version}, page expects ${CLUSTER_VERSION}: reload`;
    status.textContent = text;
    status.classList.toggle("failing", silent.length > 0);
    renderMatrix(data);
    renderClusterRegions(data);
    renderHomes(data);
    renderEpochs(data);
    renderClusterConflicts(data);
  }

  async function pollClusterOnce() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), CLUSTER_FETCH_TIMEOUT_MS);
    try {
      const res = await fetch("/dashboard/cluster", { cache: "no-store", signal: abort.signal });
      if (!res.ok) throw new Error("HTTP " + res.status);
      const data = await res.json();
      cluster.data = data;
      cluster.updates += 1;
      cluster.failures = 0;
      renderCluster(data);
    } catch (e) {
      cluster.failures += 1;
      cluster.lastError = e && e.name === "AbortError" ? `timed out after ${CLUSTER_FETCH_TIMEOUT_MS} ms` : String(e);
      const status = document.getElementById("cluster-status");
      status.textContent = `no cluster view (${cluster.failures} failed polls): ${cluster.lastError}`;
      status.classList.add("failing");
    } finally {
      clearTimeout(timer);
      cluster.polls += 1;
    }
  }

  async function pollClusterForever() {
    for (;;) {
      const started = performance.now();
      await pollClusterOnce();
      const wait = Math.max(0, CLUSTER_POLL_INTERVAL_MS - (performance.now() - started));
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  // ---- polling -------------------------------------------------------------

  async function pollOnce() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
    try {
      const res = await fetch("/dashboard/data", { cache: "no-store", signal: abort.signal });
      if (!res.ok) throw new Error("HTTP " + res.status);
      const data = await res.json();
      record(data);
      state.data = data;
      state.updates += 1;
      state.failures = 0;
      render(data);
    } catch (e) {
      state.failures += 1;
      state.lastError = e && e.name === "AbortError" ? `timed out after ${FETCH_TIMEOUT_MS} ms` : String(e);
      renderFailure();
    } finally {
      clearTimeout(timer);
      state.polls += 1;
    }
  }

  async function pollForever() {
    for (;;) {
      const started = performance.now();
      await pollOnce();
      const wait = Math.max(0, POLL_INTERVAL_MS - (performance.now() - started));
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  function start() {
    charts.lagSeconds = new LineChart(document.getElementById("lag-seconds-chart"), {
      height: CHART_HEIGHT_PX,
      format: fmtSeconds,
    });
    charts.lagEntries = new LineChart(document.getElementById("lag-entries-chart"), {
      height: CHART_HEIGHT_PX,
      format: fmtCount,
    });
    charts.conflicts = new LineChart(document.getElementById("conflicts-chart"), {
      height: SMALL_CHART_HEIGHT_PX,
      format: fmtRate,
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        Object.values(charts).forEach((c) => c.resize());
        const box = document.getElementById("epochs-chart");
        if (cluster.epochs) cluster.epochs.setSize({ width: Math.max(200, box.clientWidth), height: SMALL_CHART_HEIGHT_PX });
      }, 150);
    });
    window.geokvDashboard = Object.freeze({ state, charts, cluster });
    pollForever();
    pollClusterForever();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
