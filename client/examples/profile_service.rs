//! A small service on the region-aware client: it keeps user profiles
//! homed by the user's country, counts page views, and keeps working when
//! its own region goes down.
//!
//! Run against `geokv dev` (from the directory `geokv dev` was started in,
//! so the certificates are found under `geokv-dev/certs`):
//!
//! ```text
//! cargo run -p geokv-client --example profile_service -- \
//!     --endpoints 127.0.0.1:7700,127.0.0.1:7710,127.0.0.1:7720,127.0.0.1:7730 \
//!     --local-region eu-west-1 --certs-dir geokv-dev/certs
//! ```
//!
//! Every request goes straight to a region allowed to hold its row: the
//! profile of a French user (locality `FR`, table `eu_users`) never leaves
//! the EU zone, even if both EU regions are down (the call then fails with
//! `ZONE_UNREACHABLE`).

use std::path::PathBuf;
use std::time::Duration;

use geokv_client::{Client, ClientConfig, Consistency, ReadConsistency, Row, WriteOptions};

struct Args {
    endpoints: Vec<String>,
    local_region: Option<String>,
    certs_dir: Option<PathBuf>,
}

fn args() -> Result<Args, String> {
    let mut out = Args {
        endpoints: std::env::var("GEOKV_ENDPOINTS")
            .map(|v| v.split(',').map(String::from).collect())
            .unwrap_or_default(),
        local_region: std::env::var("GEOKV_LOCAL_REGION").ok(),
        certs_dir: std::env::var("GEOKV_CERTS_DIR").ok().map(PathBuf::from),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoints" => out.endpoints = value()?.split(',').map(String::from).collect(),
            "--local-region" => out.local_region = Some(value()?),
            "--certs-dir" => out.certs_dir = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if out.endpoints.is_empty() {
        return Err("give the seed endpoints with --endpoints or GEOKV_ENDPOINTS".into());
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    let mut cfg = ClientConfig::discover(args.endpoints);
    cfg.local_region = args.local_region;
    cfg.certs_dir = args.certs_dir.or(cfg.certs_dir);
    cfg.deadline = Duration::from_secs(10);
    let client = Client::with_config(cfg).await?;
    for (region, view) in client.region_health() {
        let rtt = view.rtt.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3)).unwrap_or("-".into());
        println!(
            "region {region:<16} breaker {:<6} round trip {rtt}",
            if view.open { "open" } else { "closed" }
        );
    }

    // A French user's profile: homed in the EU, kept inside the EU zone.
    let profile = Row::new("eu_users", "user:1001").locality("FR");
    println!("user:1001 would be sent to {:?}", client.plan_for(&profile, true));
    let ack = client.put(&profile, br#"{"name":"Camille"}"#.to_vec(), WriteOptions::default()).await?;
    println!("profile written: home {} accepted by {}", ack.home_region, ack.accepted_by_region);

    // Page views: a counter any region may add to.
    let views = Row::new("users", "views:1001").locality("FR");
    let eventual = WriteOptions::default().consistency(Consistency::Eventual);
    let (total, ack) = client.counter_add(&views, 1, eventual).await?;
    println!("page views {total} (added in {})", ack.accepted_by_region);

    let got = client.get(&profile, ReadConsistency::Local).await?;
    for value in got.values() {
        println!("profile read from {}: {}", got.info.served_by_region, String::from_utf8_lossy(&value));
    }
    Ok(())
}
