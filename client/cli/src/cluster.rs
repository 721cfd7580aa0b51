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
                // Pinned to the region's node, whatever kind `template` is;
                // a `region=addr` seed overrides the listed address.
                let mut cfg = template.clone();
                cfg.endpoint = template
                    .seeds
                    .iter()
                    .find_map(|s| s.strip_prefix(&format!("{}=", r.name)))
                    .map_or_else(|| addr.clone(), String::from);
                cfg.seeds.clear();
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
                json!({"name": r.name, "zone": r.zone, "client_addrs": r.client_addrs, "peer_addrs": r.peer_addrs, "health": r.health,
                "last_contact_ms": (r.last_contact_ms != u64::MAX).then_some(r.last_contact_ms)})
            })
            .collect();
        println!("{}", json!({"answered_by_region": view.answered_by_region, "regions": regions}));
        return;
    }
    println!(
        "{:<16} {:<6} {:<12} {:<14} {:<22} peer",
        "region", "zone", "health", "last contact", "endpoint"
    );
    for r in &view.regions {
        println!(
            "{:<16} {:<6} {:<12} {:<14} {:<22} {}",
            r.name,
            if r.zone.is_empty() { "-" } else { &r.zone },
            r.health,
            if r.health == "self" { "-".into() } else { ms(r.last_contact_ms) },
            r.client_addrs.join(","),
            r.peer_addrs.join(",")
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
            .map(|l| json!({"source": l.source, "source_node": l.source_node, "destination": l.destination,
                "destination_node": l.destination_node, "paused": l.paused, "connected": l.connected,
                "acked_seq": l.acked_seq, "head_seq": l.head_seq, "lag_seconds": l.lag_seconds, "lag_entries": l.lag_entries,
                "lag_bytes": l.lag_bytes, "skipped_by_residency": l.skipped_by_residency, "shipped_bytes": l.shipped_bytes,
                "last_error": l.last_error, "backlog_entries": l.backlog_entries,
                "repair": {"state": l.repair_state, "started": l.repairs_started, "finished": l.repairs_finished,
                    "rows": l.rows_repaired, "bytes": l.repair_bytes}}))
            .collect();
        println!("{}", json!({"links": rows, "unreachable": errors}));
        return;
    }
    let node =
        |region: &str, id: &str| if id.is_empty() { region.to_string() } else { format!("{region}/{id}") };
    println!(
        "{:<20} {:<20} {:<10} {:>9} {:>9} {:>9} {:>10} {:>9}  repair",
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
            "{:<20} {:<20} {:<10} {:>9.3} {:>9} {:>9} {:>10} {:>9}  {} ({} done, {} rows)",
            node(&l.source, &l.source_node),
            node(&l.destination, &l.destination_node),
            state,
            l.lag_seconds,
            l.lag_entries,
            l.lag_bytes,
            l.shipped_bytes,
            l.skipped_by_residency,
            if l.repair_state.is_empty() { "-" } else { &l.repair_state },
            l.repairs_finished,
            l.rows_repaired
        );
        if !l.last_error.is_empty() && !l.connected {
            println!("    last error: {}", l.last_error);
        }
    }
    for e in errors {
        println!("unreachable: {e}");
    }
}

/// Compresses a sorted list of partitions into ranges ("0-3,8,10-11").
fn ranges(parts: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        let start = parts[i];
        let mut end = start;
        while i + 1 < parts.len() && parts[i + 1] == end + 1 {
            i += 1;
            end = parts[i];
        }
        out.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    out.join(",")
}

pub fn print_partitions(map: &pb::PartitionMapResponse, only: Option<&str>, as_json: bool) {
    let regions: Vec<&pb::RegionPartitions> =
        map.regions.iter().filter(|r| only.is_none_or(|o| o == r.region)).collect();
    if as_json {
        let rows: Vec<_> = regions
            .iter()
            .map(|r| {
                let owners: Vec<_> = r
                    .owners
                    .iter()
                    .map(|o| json!({"partition": o.partition, "node_id": o.node_id}))
                    .collect();
                json!({"region": r.region, "node_ids": r.node_ids, "owners": owners})
            })
            .collect();
        println!(
            "{}",
            json!({"partitions": map.partitions, "regions": rows, "answered_by_node": map.answered_by_node})
        );
        return;
    }
    println!("{} partitions; partition p belongs to nodes[p % n] (nodes sorted by id)", map.partitions);
    for r in regions {
        println!("{}:", r.region);
        if r.node_ids.is_empty() {
            println!("  (no node configured)");
        }
        for id in &r.node_ids {
            let mine: Vec<u32> = r.owners.iter().filter(|o| &o.node_id == id).map(|o| o.partition).collect();
            println!("  {id:<8} {:>4} partitions: {}", mine.len(), ranges(&mine));
        }
    }
}

pub fn print_location(at: &pb::LocateResponse, as_json: bool) {
    if as_json {
        let replicas: Vec<_> = at
            .replicas
            .iter()
            .map(|r| json!({"region": r.region, "node_id": r.node_id, "client_addr": r.client_addr}))
            .collect();
        println!(
            "{}",
            json!({"table": at.table, "partition": at.partition, "home_region": at.home_region,
                "home_node_id": at.home_node_id, "zone": at.zone, "replicas": replicas})
        );
        return;
    }
    println!("table      {}", at.table);
    println!("partition  {}", at.partition);
    println!(
        "home       {} (node {})",
        at.home_region,
        if at.home_node_id.is_empty() { "-" } else { &at.home_node_id }
    );
    println!("zone       {}", if at.zone.is_empty() { "-" } else { &at.zone });
    for r in &at.replicas {
        println!(
            "replica    {:<16} node {:<6} {}",
            r.region,
            if r.node_id.is_empty() { "-" } else { &r.node_id },
            r.client_addr
        );
    }
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn partitions_print_as_ranges() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[3]), "3");
    }
}
