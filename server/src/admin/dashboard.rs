//! The live dashboard on the admin port (docs/architecture.md section 9).
//!
//! - `GET /dashboard`: a page that polls `/dashboard/data` once a second and
//!   charts replication lag per (source, destination) pair, region health and
//!   the conflict rate per table, keeping about five minutes of history in
//!   the browser.
//! - `GET /dashboard/data`: one JSON snapshot of this node's view: its
//!   region, every region's health and last contact, each outgoing link's
//!   lag and state, inbound freshness per source, and conflicts per table.
//! - `GET /dashboard/assets/{file}`: the page's script and style, and the
//!   vendored charting library (uPlot, MIT, `server/assets/vendor/uplot/`).
//!
//! Everything the page loads is compiled into the binary: nodes often run
//! where there is no internet, so the page never refers to a CDN.
//!
//! The snapshot is assembled by [`DashboardData::build`], a pure function
//! over values read from the node and the replicator, so its shape and bounds
//! are tested without a network.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::AdminState;
use crate::config::Config;
use crate::kv::commit::Inbound;
use crate::replication::ship::LinkSnapshot;
use crate::replication::Replicator;

/// Version of the `/dashboard/data` document; bumped when a field changes
/// meaning, so a page from another build can tell.
pub const DATA_VERSION: u32 = 1;

/// Most tables listed under conflicts; the largest counts are kept. Tables
/// come from the configuration, so this only bounds a pathological config.
pub const CONFLICT_TABLES_MAX: usize = 64;

/// Longest `last_error` text sent per link, in characters.
pub const LAST_ERROR_CHARS_MAX: usize = 240;

/// The HTML page. Its script and style are separate files so the page can
/// be served with a Content-Security-Policy that forbids inline script.
const PAGE_HTML: &str = include_str!("../../assets/dashboard.html");

/// Only same-origin script; uPlot sets element styles from script, which
/// needs `'unsafe-inline'` for styles (not for scripts). `data:` images
/// allow the empty favicon that keeps browsers from requesting one.
const PAGE_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Files under `/dashboard/assets/`, looked up by name.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    /// The page's own files change with the binary, so browsers revalidate
    /// them; vendored files carry their version in their name and never change.
    cache_control: &'static str,
    body: &'static [u8],
}

/// Browsers revalidate the page's own files on every load.
const CACHE_OWN: &str = "no-cache";
/// Versioned vendored files are cached for a year.
const CACHE_VENDOR: &str = "public, max-age=31536000, immutable";

const ASSETS: &[Asset] = &[
    Asset {
        name: "dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        cache_control: CACHE_OWN,
        body: include_bytes!("../../assets/dashboard.js"),
    },
    Asset {
        name: "dashboard.css",
        content_type: "text/css; charset=utf-8",
        cache_control: CACHE_OWN,
        body: include_bytes!("../../assets/dashboard.css"),
    },
    Asset {
        name: "uplot-1.6.32.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        cache_control: CACHE_VENDOR,
        body: include_bytes!("../../assets/vendor/uplot/uPlot.iife.min.js"),
    },
    Asset {
        name: "uplot-1.6.32.min.css",
        content_type: "text/css; charset=utf-8",
        cache_control: CACHE_VENDOR,
        body: include_bytes!("../../assets/vendor/uplot/uPlot.min.css"),
    },
    Asset {
        name: "uplot-LICENSE.txt",
        content_type: "text/plain; charset=utf-8",
        cache_control: CACHE_VENDOR,
        body: include_bytes!("../../assets/vendor/uplot/LICENSE"),
    },
];

/// The dashboard routes, merged into the admin router.
pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/data", get(data))
        .route("/dashboard/cluster", get(cluster))
        .route("/dashboard/assets/{name}", get(asset))
}

async fn page() -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, CACHE_OWN),
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE_HTML,
    )
        .into_response()
}

async fn asset(Path(name): Path<String>) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "no such dashboard asset\n").into_response();
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(a.content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static(a.cache_control)),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        a.body,
    )
        .into_response()
}

/// Every configured region, in configuration order, with this node's view of its health.
pub(super) fn region_inputs(cfg: &Config, replicator: &Replicator) -> Vec<RegionInput> {
    cfg.regions
        .iter()
        .map(|r| RegionInput {
            name: r.name.clone(),
            healthy: replicator.is_healthy(&r.name),
            last_contact: replicator.last_contact(&r.name),
        })
        .collect()
}

async fn data(State(s): State<AdminState>) -> Response {
    let cfg = s.node.config();
    let regions = region_inputs(cfg, &s.replicator);
    let links: Vec<LinkSnapshot> = s.replicator.links().iter().map(|l| l.snapshot(&s.node)).collect();
    let inbound = s.node.inbound();
    let staleness: HashMap<String, u64> =
        inbound.keys().map(|src| (src.clone(), s.node.source_staleness_ms(src))).collect();
    let snapshot = DashboardData::build(Inputs {
        node_id: &cfg.node_id,
        region: &cfg.region,
        uptime: s.node.uptime(),
        log_seq: s.node.log_seq(),
        at_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        regions,
        links,
        inbound,
        staleness_ms: staleness,
        conflicts: s.node.conflicts(),
    });
    ([(header::CACHE_CONTROL, "no-store")], Json(snapshot)).into_response()
}

async fn cluster(State(s): State<AdminState>) -> Response {
    let data = s.cluster.current(&s.node, &s.replicator).await;
    ([(header::CACHE_CONTROL, "no-store")], Json(data)).into_response()
}

/// One region's health as the replicator sees it.
#[derive(Debug, Clone)]
pub struct RegionInput {
    pub name: String,
    pub healthy: bool,
    /// Time since this node last heard from the region; `None` if never.
    pub last_contact: Option<Duration>,
}

/// What one snapshot is built from, read from the node and the replicator.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub node_id: &'a str,
    pub region: &'a str,
    pub uptime: Duration,
    pub log_seq: u64,
    /// Wall-clock time of the snapshot, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub regions: Vec<RegionInput>,
    pub links: Vec<LinkSnapshot>,
    pub inbound: HashMap<String, Inbound>,
    /// `Node::source_staleness_ms` per inbound source (`u64::MAX` = never fresh).
    pub staleness_ms: HashMap<String, u64>,
    pub conflicts: HashMap<String, u64>,
}

/// The `/dashboard/data` document.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DashboardData {
    /// [`DATA_VERSION`].
    pub version: u32,
    pub node_id: String,
    /// The region this node serves; every link below leaves it.
    pub region: String,
    pub uptime_ms: u64,
    /// Highest durable position of this node's replication log.
    pub log_seq: u64,
    /// When the snapshot was taken (ms since the Unix epoch): the page's x axis.
    pub at_ms: u64,
    /// Every configured region, in configuration order, this node's included.
    pub regions: Vec<RegionView>,
    /// Outgoing replication links, sorted by destination.
    pub links: Vec<LinkView>,
    /// Replication received from each source region, sorted by source.
    pub inbound: Vec<InboundView>,
    /// Conflicts counted since the node started, largest first, at most
    /// [`CONFLICT_TABLES_MAX`] tables.
    pub conflicts: Vec<ConflictCount>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RegionView {
    pub name: String,
    /// Whether this is the node's own region (always healthy from here).
    pub local: bool,
    pub healthy: bool,
    /// Milliseconds since the region was last heard from; `null` if never
    /// (and for the node's own region).
    pub last_contact_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LinkView {
    pub source: String,
    pub destination: String,
    /// The node of `destination` the link ships to.
    pub destination_node: String,
    pub paused: bool,
    pub connected: bool,
    /// Age of the oldest entry the destination has not acknowledged.
    pub lag_seconds: f64,
    pub lag_entries: u64,
    /// Estimated from the entry count and the average entry size.
    pub lag_bytes: u64,
    /// Compressed bytes sent since start.
    pub shipped_bytes: u64,
    pub acked_seq: u64,
    pub head_seq: u64,
    /// Entries never sent because residency excludes the destination.
    pub skipped_by_residency: u64,
    /// Last shipping error, cut to [`LAST_ERROR_CHARS_MAX`] characters; empty if none.
    pub last_error: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InboundView {
    pub source: String,
    /// Every entry of the source's log through this position is applied here.
    pub applied_through: u64,
    /// How stale this region's copy of rows homed in `source` may be;
    /// `null` until the source first reported this region caught up.
    pub staleness_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConflictCount {
    pub table: String,
    pub total: u64,
}

impl DashboardData {
    /// Assembles a snapshot: sorts every list so successive snapshots line
    /// up, and applies the bounds named in this module.
    pub fn build(inputs: Inputs<'_>) -> Self {
        let Inputs {
            node_id,
            region,
            uptime,
            log_seq,
            at_ms,
            regions,
            links,
            inbound,
            staleness_ms,
            conflicts,
        } = inputs;
        let regions = regions
            .into_iter()
            .map(|r| {
                let local = r.name == region;
                RegionView {
                    local,
                    healthy: r.healthy || local,
                    last_contact_ms: if local { None } else { r.last_contact.map(|d| d.as_millis() as u64) },
                    name: r.name,
                }
            })
            .collect();
        let mut links: Vec<LinkView> = links
            .into_iter()
            .map(|l| LinkView {
                source: l.source,
                destination: l.destination,
                destination_node: l.destination_node,
                paused: l.paused,
                connected: l.connected,
                lag_seconds: if l.lag_seconds.is_finite() { l.lag_seconds.max(0.0) } else { 0.0 },
                lag_entries: l.lag_entries,
                lag_bytes: l.lag_bytes,
                shipped_bytes: l.shipped_bytes,
                acked_seq: l.acked_seq,
                head_seq: l.head_seq,
                skipped_by_residency: l.skipped_by_residency,
                last_error: l.last_error.chars().take(LAST_ERROR_CHARS_MAX).collect(),
            })
            .collect();
        links.sort_by(|a, b| {
            (&a.source, &a.destination, &a.destination_node).cmp(&(
                &b.source,
                &b.destination,
                &b.destination_node,
            ))
        });
        let mut inbound: Vec<InboundView> = inbound
            .into_iter()
            .map(|(source, i)| {
                let staleness = staleness_ms.get(&source).copied().filter(|ms| *ms != u64::MAX);
                InboundView { applied_through: i.applied_through, staleness_ms: staleness, source }
            })
            .collect();
        inbound.sort_by(|a, b| a.source.cmp(&b.source));
        let mut conflicts: Vec<ConflictCount> =
            conflicts.into_iter().map(|(table, total)| ConflictCount { table, total }).collect();
        conflicts.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.table.cmp(&b.table)));
        conflicts.truncate(CONFLICT_TABLES_MAX);
        Self {
            version: DATA_VERSION,
            node_id: node_id.to_string(),
            region: region.to_string(),
            uptime_ms: uptime.as_millis() as u64,
            log_seq,
            at_ms,
            regions,
            links,
            inbound,
            conflicts,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::causality::{Hlc, SystemClock};
    use crate::config::Config;
    use crate::kv::Node;
    use crate::replication::Replicator;
    use crate::storage::memory::MemoryEngine;

    fn link(destination: &str, lag_seconds: f64, last_error: &str) -> LinkSnapshot {
        LinkSnapshot {
            source: "us-east-1".into(),
            source_node: "n1".into(),
            destination: destination.into(),
            destination_node: "n1".into(),
            paused: destination == "ap-southeast-1",
            connected: true,
            acked_seq: 7,
            head_seq: 10,
            lag_seconds,
            lag_entries: 3,
            lag_bytes: 768,
            skipped_by_residency: 0,
            shipped_bytes: 4096,
            last_error: last_error.into(),
            repair_state: "idle".into(),
            repairs_started: 0,
            repairs_finished: 0,
            rows_repaired: 0,
            repair_bytes: 0,
        }
    }

    fn inputs() -> Inputs<'static> {
        let region = |name: &str, healthy: bool, ms: Option<u64>| RegionInput {
            name: name.into(),
            healthy,
            last_contact: ms.map(Duration::from_millis),
        };
        Inputs {
            node_id: "n1",
            region: "us-east-1",
            uptime: Duration::from_millis(1500),
            log_seq: 10,
            at_ms: 1_700_000_000_000,
            regions: vec![
                region("us-east-1", false, None),
                region("eu-west-1", true, Some(120)),
                region("ap-southeast-1", false, None),
            ],
            links: vec![link("eu-west-1", f64::NAN, ""), link("ap-southeast-1", 2.5, &"x".repeat(1000))],
            inbound: HashMap::from([
                (
                    "eu-west-1".to_string(),
                    Inbound { applied_through: 4, fresh_as_of_hlc: 1, ..Default::default() },
                ),
                (
                    "ap-southeast-1".to_string(),
                    Inbound { applied_through: 0, fresh_as_of_hlc: 0, ..Default::default() },
                ),
            ]),
            staleness_ms: HashMap::from([
                ("eu-west-1".to_string(), 35),
                ("ap-southeast-1".to_string(), u64::MAX),
            ]),
            conflicts: (0..CONFLICT_TABLES_MAX as u64 + 5).map(|i| (format!("t{i:03}"), i)).collect(),
        }
    }

    #[test]
    fn snapshot_is_sorted_bounded_and_marks_the_local_region() {
        let d = DashboardData::build(inputs());
        assert_eq!(d.version, DATA_VERSION);
        assert_eq!((d.region.as_str(), d.uptime_ms, d.log_seq), ("us-east-1", 1500, 10));

        // Configuration order is kept; the node's own region is healthy
        // whatever the replicator says and has no contact time.
        let names: Vec<&str> = d.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["us-east-1", "eu-west-1", "ap-southeast-1"]);
        assert!(d.regions[0].local && d.regions[0].healthy && d.regions[0].last_contact_ms.is_none());
        assert_eq!((d.regions[1].healthy, d.regions[1].last_contact_ms), (true, Some(120)));
        assert_eq!((d.regions[2].healthy, d.regions[2].last_contact_ms), (false, None));

        // Links sorted by destination; a NaN lag becomes 0 so JSON stays valid.
        let dests: Vec<&str> = d.links.iter().map(|l| l.destination.as_str()).collect();
        assert_eq!(dests, ["ap-southeast-1", "eu-west-1"]);
        assert_eq!(d.links[1].lag_seconds, 0.0);
        assert_eq!(d.links[0].lag_seconds, 2.5);
        assert!(d.links[0].paused);
        assert_eq!(d.links[0].last_error.chars().count(), LAST_ERROR_CHARS_MAX);

        // Never-fresh sources have no staleness rather than u64::MAX.
        assert_eq!(d.inbound[0].source, "ap-southeast-1");
        assert_eq!(d.inbound[0].staleness_ms, None);
        assert_eq!(d.inbound[1].staleness_ms, Some(35));

        // The largest conflict counts survive the bound.
        assert_eq!(d.conflicts.len(), CONFLICT_TABLES_MAX);
        assert_eq!(d.conflicts[0].total, CONFLICT_TABLES_MAX as u64 + 4);
        assert!(d.conflicts.windows(2).all(|w| w[0].total >= w[1].total));
    }

    #[test]
    fn snapshot_serializes_to_json_the_page_reads() {
        let json = serde_json::to_value(DashboardData::build(inputs())).unwrap();
        for field in ["version", "node_id", "region", "at_ms", "regions", "links", "inbound", "conflicts"] {
            assert!(json.get(field).is_some(), "missing {field} in {json}");
        }
        let l = &json["links"][0];
        for field in
            ["source", "destination", "paused", "connected", "lag_seconds", "lag_entries", "lag_bytes"]
        {
            assert!(l.get(field).is_some(), "missing links[].{field} in {l}");
        }
        assert!(json["regions"][0]["last_contact_ms"].is_null());
    }

    /// A one-shot HTTP/1.1 GET against `addr`; returns the head and the body.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (String, Vec<u8>) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.unwrap().unwrap();
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("header end");
        (String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase(), buf[end + 4..].to_vec())
    }

    #[tokio::test]
    async fn routes_serve_page_assets_and_data() {
        let cfg = Arc::new(
            Config::from_toml(
                r#"
                region = "eu-west-1"
                regions = [{ name = "eu-west-1" }, { name = "us-east-1" }]
                [[tables]]
                name = "default"
                default_home_region = "eu-west-1"
                "#,
            )
            .unwrap()
            .finish()
            .unwrap(),
        );
        let hlc = Arc::new(Hlc::new(Arc::new(SystemClock), 500));
        let node = Node::start(cfg.clone(), Arc::new(MemoryEngine::new()), hlc).unwrap();
        let replicator = Replicator::start(&cfg, node.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, super::super::router(node, replicator, None)).await.unwrap();
        });

        let (head, body) = get(addr, "/dashboard").await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-type: text/html; charset=utf-8"), "{head}");
        assert!(head.contains("content-security-policy: default-src 'self'"), "{head}");
        let html = String::from_utf8(body).unwrap();
        // Every asset the page names is served, and nothing comes from elsewhere.
        for a in ASSETS.iter().filter(|a| !a.name.ends_with(".txt")) {
            assert!(html.contains(&format!("/dashboard/assets/{}", a.name)), "page does not load {}", a.name);
        }
        assert!(!html.contains("http://") && !html.contains("https://"), "page refers to another origin");

        let (head, body) = get(addr, "/dashboard/assets/uplot-1.6.32.iife.min.js").await;
        assert!(head.contains("content-type: text/javascript; charset=utf-8"), "{head}");
        assert!(head.contains("cache-control: public, max-age=31536000, immutable"), "{head}");
        assert!(body.starts_with(b"/*! https://github.com/leeoniya/uPlot (v1.6.32) */"));
        let (head, _) = get(addr, "/dashboard/assets/dashboard.css").await;
        assert!(head.contains("content-type: text/css; charset=utf-8"), "{head}");
        assert!(head.contains("cache-control: no-cache"), "{head}");
        let (head, _) = get(addr, "/dashboard/assets/..%2Fmod.rs").await;
        assert!(head.starts_with("http/1.1 404"), "{head}");

        let (head, body) = get(addr, "/dashboard/data").await;
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("cache-control: no-store"), "{head}");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["region"], "eu-west-1");
        assert_eq!(json["regions"].as_array().map(Vec::len), Some(2));
        assert_eq!(json["regions"][0]["local"], true);
        assert_eq!(json["regions"][1]["healthy"], false);
        // No peer has an address in this config, so no shipper and no link.
        assert_eq!(json["links"].as_array().map(Vec::len), Some(0));

        // The cluster view: both axes, the other region unknown (no node to
        // ask), this one's outgoing pair without a link.
        let (head, body) = get(addr, "/dashboard/cluster").await;
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("cache-control: no-store"), "{head}");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["region"], "eu-west-1");
        assert_eq!(json["regions"][1]["name"], "us-east-1");
        assert_eq!(json["regions"][1]["state"], "unreachable");
        let states: Vec<(&str, &str, &str)> = json["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["source"].as_str().unwrap(),
                    p["destination"].as_str().unwrap(),
                    p["state"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(states, [("eu-west-1", "us-east-1", "none"), ("us-east-1", "eu-west-1", "unknown")]);
        assert_eq!(json["control_known"], false);
        server.abort();
    }
}
