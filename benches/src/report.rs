//! The results table, the geokv-to-peer ratios, and the JSON form of both.

use serde_json::{json, Value};

use crate::load::{Measured, Shape};
use crate::target::TargetKind;

/// geokv's numbers divided by a peer's, at one client count.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    pub peer: TargetKind,
    pub clients: usize,
    /// Above 1: geokv completes more operations per second.
    pub ops_per_s: f64,
    /// Below 1: geokv answers faster.
    pub p50: f64,
    pub p99: f64,
}

/// Ratios for every client count measured for both geokv and a peer.
pub fn ratios(results: &[Measured]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for peer in [TargetKind::GeokvPlaintext, TargetKind::Etcd, TargetKind::Redis] {
        for g in results.iter().filter(|m| m.target == TargetKind::Geokv) {
            let Some(p) = results.iter().find(|m| m.target == peer && m.clients == g.clients) else {
                continue;
            };
            out.push(Ratio {
                peer,
                clients: g.clients,
                ops_per_s: divide(g.ops_per_s(), p.ops_per_s()),
                p50: divide(g.latency_ms(0.5), p.latency_ms(0.5)),
                p99: divide(g.latency_ms(0.99), p.latency_ms(0.99)),
            });
        }
    }
    out
}

/// `a / b`, or NaN (printed as "n/a") when `b` is zero.
fn divide(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn fmt_ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "n/a".to_string()
    }
}

/// The human-readable report.
pub fn table(results: &[Measured], ratios: &[Ratio]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<7} {:>7} {:>11} {:>9} {:>9} {:>9} {:>9} {:>7} {:>12}\n",
        "target", "clients", "ops/s", "p50 ms", "p99 ms", "p999 ms", "max ms", "errors", "srv cpu us/op"
    ));
    for m in results {
        let cpu = m.server_cpu_us_per_op().map_or_else(|| "-".to_string(), |c| format!("{c:.1}"));
        s.push_str(&format!(
            "{:<7} {:>7} {:>11.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7} {:>12}\n",
            m.target.name(),
            m.clients,
            m.ops_per_s(),
            m.latency_ms(0.5),
            m.latency_ms(0.99),
            m.latency_ms(0.999),
            m.latency_us.max() as f64 / 1000.0,
            m.errors,
            cpu,
        ));
    }
    for m in results.iter().filter(|m| m.errors > 0 || m.ops == 0) {
        let why = m.first_error.as_deref().unwrap_or("no operation completed in the window");
        s.push_str(&format!("  {} at {} clients: {why}\n", m.target, m.clients));
    }
    if !ratios.is_empty() {
        s.push_str(&format!("\n{:<12} {:>7} {:>9} {:>9} {:>9}\n", "ratio", "clients", "ops/s", "p50", "p99"));
        for r in ratios {
            s.push_str(&format!(
                "{:<12} {:>7} {:>9} {:>9} {:>9}\n",
                format!("geokv/{}", r.peer),
                r.clients,
                fmt_ratio(r.ops_per_s),
                fmt_ratio(r.p50),
                fmt_ratio(r.p99),
            ));
        }
        s.push_str("(ops/s above 1x: geokv does more; p50/p99 below 1x: geokv is faster)\n");
    }
    s
}

fn number(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

/// The machine-readable report.
pub fn json(
    shape: &Shape,
    semantics: &[(TargetKind, String)],
    results: &[Measured],
    ratios: &[Ratio],
) -> Value {
    json!({
        "shape": {
            "put_ratio": shape.put_ratio,
            "value_bytes": shape.value_bytes,
            "keys": shape.keys,
            "warmup_s": shape.warmup.as_secs_f64(),
            "duration_s": shape.duration.as_secs_f64(),
            "op_timeout_ms": shape.op_timeout.as_millis() as u64,
            "seed": shape.seed,
            "connections": shape.connections,
        },
        "targets": semantics.iter().map(|(k, s)| json!({"target": k.name(), "semantics": s})).collect::<Vec<_>>(),
        "results": results.iter().map(|m| json!({
            "target": m.target.name(),
            "clients": m.clients,
            "ops": m.ops,
            "errors": m.errors,
            "ops_per_s": number(m.ops_per_s()),
            "p50_ms": number(m.latency_ms(0.5)),
            "p99_ms": number(m.latency_ms(0.99)),
            "p999_ms": number(m.latency_ms(0.999)),
            "max_ms": number(m.latency_us.max() as f64 / 1000.0),
            "mean_ms": number(m.latency_us.mean() / 1000.0),
            "first_error": m.first_error,
            "server_cpu_s": m.server_cpu_s.map(number),
            "server_cpu_us_per_op": m.server_cpu_us_per_op().map(number),
        })).collect::<Vec<_>>(),
        "ratios": ratios.iter().map(|r| json!({
            "pair": format!("geokv/{}", r.peer),
            "clients": r.clients,
            "ops_per_s": number(r.ops_per_s),
            "p50": number(r.p50),
            "p99": number(r.p99),
        })).collect::<Vec<_>>(),
    })
}
