//! `geokv region status|failover|failback|auto-failover|conflicts`: home
//! leases, epochs, consensus groups and failover.

use geokv_client::proto as pb;
use serde_json::json;

fn homes_json(homes: &[pb::HomeInfo]) -> Vec<serde_json::Value> {
    homes
        .iter()
        .map(|h| {
            json!({"home": h.home, "home_region": h.home_region, "zone": h.zone, "holder": h.holder,
                "epoch": h.epoch, "lease_remaining_ms": h.lease_remaining_ms,
                "draining_to": (!h.draining_to.is_empty()).then_some(&h.draining_to), "reason": h.reason})
        })
        .collect()
}

/// Prints homes as a table.
pub fn print_homes(homes: &[pb::HomeInfo]) {
    println!("{:<24} {:<16} {:>6} {:>10} {:<10} handover", "home", "holder", "epoch", "lease", "since");
    for h in homes {
        let lease = if h.lease_remaining_ms >= 0 {
            format!("{} ms", h.lease_remaining_ms)
        } else {
            "lapsed".to_string()
        };
        println!(
            "{:<24} {:<16} {:>6} {:>10} {:<10} {}",
            h.home,
            h.holder,
            h.epoch,
            lease,
            h.reason,
            if h.draining_to.is_empty() { "-".to_string() } else { format!("-> {}", h.draining_to) }
        );
    }
}

/// Prints the control part of `geokv region status`.
pub fn print_status(s: &pb::RegionStatusResponse, as_json: bool) {
    if as_json {
        let groups: Vec<_> = s
            .groups
            .iter()
            .map(|g| {
                json!({"name": g.name, "members": g.members, "leader": (!g.leader.is_empty()).then_some(&g.leader),
                    "term": g.term, "preferred_region": g.preferred_region, "last_applied": g.last_applied})
            })
            .collect();
        let failovers: Vec<_> = s
            .recent_failovers
            .iter()
            .map(|e| {
                json!({"home": e.home, "from": e.from, "to": e.to, "epoch": e.epoch, "at_ms": e.at_ms,
                    "unavailable_ms": e.unavailable_ms, "reason": e.reason})
            })
            .collect();
        let clock = s.clock.as_ref().map(|c| {
            let peers: Vec<_> = c
                .peers
                .iter()
                .map(|p| json!({"region": p.region, "offset_ms": p.offset_ms, "uncertainty_ms": p.uncertainty_ms}))
                .collect();
            json!({"offset_exceeded": c.offset_exceeded, "max_offset_ms": c.max_offset_ms,
                "max_measured_offset_ms": c.max_measured_offset_ms, "peers": peers})
        });
        println!(
            "{}",
            json!({"homes": homes_json(&s.homes), "groups": groups, "manual_only": s.manual_only,
                "recent_failovers": failovers, "healthy_regions": s.healthy_regions, "clock": clock})
        );
        return;
    }
    if let Some(c) = &s.clock {
        let peers: Vec<String> = c
            .peers
            .iter()
            .map(|p| format!("{} {:+} ms (+/- {})", p.region, p.offset_ms, p.uncertainty_ms))
            .collect();
        if c.offset_exceeded {
            println!(
                "clock: OFFSET EXCEEDED, {} ms from its peers (maximum {} ms): this node serves no lease",
                c.max_measured_offset_ms, c.max_offset_ms
            );
        } else {
            println!(
                "clock: within the {} ms maximum offset (largest measured {} ms)",
                c.max_offset_ms, c.max_measured_offset_ms
            );
        }
        if !peers.is_empty() {
            println!("  peers: {}", peers.join(", "));
        }
        println!();
    }
    println!("homes (automatic failover {}):", if s.manual_only { "OFF, manual only" } else { "on" });
    print_homes(&s.homes);
    println!();
    println!("{:<28} {:<24} {:>6} {:<16} members", "consensus group", "leader", "term", "preferred");
    for g in &s.groups {
        println!(
            "{:<28} {:<24} {:>6} {:<16} {}",
            g.name,
            if g.leader.is_empty() { "-" } else { &g.leader },
            g.term,
            if g.preferred_region.is_empty() { "-" } else { &g.preferred_region },
            g.members.join(",")
        );
    }
    if !s.recent_failovers.is_empty() {
        println!();
        println!("recent failovers:");
        for e in &s.recent_failovers {
            println!(
                "  {} {} -> {} (epoch {}, {}, unavailable {} ms)",
                e.home, e.from, e.to, e.epoch, e.reason, e.unavailable_ms
            );
        }
    }
}

/// Prints the homes after a failover or failback.
pub fn print_handover(r: &pb::FailoverResponse, as_json: bool) {
    if as_json {
        println!("{}", json!({"homes": homes_json(&r.homes)}));
    } else {
        print_homes(&r.homes);
    }
}

/// Prints failover conflicts.
pub fn print_conflicts(r: &pb::FailoverConflictsResponse, as_json: bool) {
    if as_json {
        let rows: Vec<_> = r
            .conflicts
            .iter()
            .map(|c| {
                json!({"table": c.table, "key": String::from_utf8_lossy(&c.key), "home": c.home, "epoch": c.epoch,
                    "current_epoch": c.current_epoch, "hlc": c.hlc, "source": c.source})
            })
            .collect();
        println!("{}", json!({"conflicts": rows}));
        return;
    }
    if r.conflicts.is_empty() {
        println!("no failover conflicts");
        return;
    }
    for c in &r.conflicts {
        println!(
            "{}/{} home {} epoch {} (current {}) from {}",
            c.table,
            String::from_utf8_lossy(&c.key),
            c.home,
            c.epoch,
            c.current_epoch,
            c.source
        );
    }
}
