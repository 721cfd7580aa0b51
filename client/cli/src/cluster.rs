//! Commands that speak to every region: region status, replication status
//! and control, residency audit, digests.

use std::collections::BTreeMap;

use geokv_client::proto as pb;
use geokv_client::{Client, ClientConfig};
use serde_json::json;

/// A connection per region, found through the cluster view of one node.
pub struct Regions {
    pub view: pb::ClusterStatusResponse,
    pub clients: BTreeMap<String, Result<Client, geokv_client::Error>>,
}

pub async fn connect_all(entry: &Client, template: &ClientConfig) -> Result<Regions, geokv_client::Error> {
    let view = entry.cluster_status().await?;
    let mut clients = BTreeMap::new();
    for r in &view.regions {
        let client = match r.client_addrs.first() {
            Some(addr) => {
                let mut cfg = template.clone();
                cfg.endpoint = addr.clone();
                cfg.retries_max = 0;
                Client::with_config(cfg).await
            }
            None => Err(geokv_client::Error::from(tonic::Status::unavailable("no client address"))),
        };
        clients.insert(r.name.clone(), client);
    }
    Ok(Regions { view, clients })
}

fn ms(v: u64) -> String {
    if v == u64::MAX {
        "never".into()
    } else {
        format!("{v} ms")
    }
}

pub fn print_regions(view: &pb::ClusterStatusResponse, as_json: bool) {
    if as_json {
        let regions: Vec<_> = view
            .regions
            .iter()
            .map(|r| {
                json!({"name": r.name, "zone": r.zone, "client_addrs": r.client_addrs, "health": r.health,
                "last_contact_ms": (r.last_contact_ms != u64::MAX).then_some(r.last_contact_ms)})
            })
            .collect();
        println!("{}", json!({"answered_by_region": view.answered_by_region, "regions": regions}));
        return;
    }
    println!("{:<16} {:<6} {:<12} {:<14} endpoint", "region", "zone", "health", "last contact");
    for r in &view.regions {
        println!(
            "{:<16} {:<6} {:<12} {:<14} {}",
            r.name,
            if r.zone.is_empty() { "-" } else { &r.zone },
            r.health,
            if r.health == "self" { "-".into() } else { ms(r.last_contact_ms) },
            r.client_addrs.join(",")
        );
    }
    println!("(as seen from {})", view.answered_by_region);
}

pub async fn replication_links(regions: &Regions) -> (Vec<pb::ReplicationLink>, Vec<String>) {
    let mut links = Vec::new();
    let mut errors = Vec::new();
    for (name, client) in &regions.clients {
        match client {
            Ok(c) => match c.replication_status().await {
                Ok(s) => links.extend(s.links),
                Err(e) => errors.push(format!("{name}: {e}")),
            },
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    (links, errors)
}

pub fn print_links(links: &[pb::ReplicationLink], errors: &[String], as_json: bool) {
    if as_json {
        let rows: Vec<_> = links
            .iter()
            .map(|l| json!({"source": l.source, "destination": l.destination, "paused": l.paused, "connected": l.connected,
                "acked_seq": l.acked_seq, "head_seq": l.head_seq, "lag_seconds": l.lag_seconds, "lag_entries": l.lag_entries,
                "lag_bytes": l.lag_bytes, "skipped_by_residency": l.skipped_by_residency, "shipped_bytes": l.shipped_bytes,
                "last_error": l.last_error}))
            .collect();
        println!("{}", json!({"links": rows, "unreachable": errors}));
        return;
    }
    println!(
        "{:<16} {:<16} {:<10} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "source", "destination", "state", "lag s", "lag ent", "lag B", "shipped B", "skipped"
    );
    for l in links {
        let state = if l.paused {
            "paused"
        } else if l.connected {
            "streaming"
        } else {
            "down"
        };
        println!(
            "{:<16} {:<16} {:<10} {:>9.3} {:>9} {:>9} {:>10} {:>9}",
            l.source,
            l.destination,
            state,
            l.lag_seconds,
            l.lag_entries,
            l.lag_bytes,
            l.shipped_bytes,
            l.skipped_by_residency
        );
        if !l.last_error.is_empty() && !l.connected {
            println!("    last error: {}", l.last_error);
        }
    }
    for e in errors {
        println!("unreachable: {e}");
    }
}
