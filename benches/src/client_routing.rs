//! `geokv-load client-routing`: what the region-aware client saves a
//! service far from a row's home, in one run.
//!
//! `geokv dev --client-region ap-southeast-1` fronts every region's client
//! port with the latency from ap-southeast-1 to that region. Two clients in
//! that emulated ap-southeast-1 then do the same closed-loop, one-at-a-time
//! work:
//! - *pinned*: one endpoint, us-east-1's (through its proxied port), as a
//!   service configured with a single far endpoint is;
//! - *region-aware*: every region's proxied endpoint as seeds, local region
//!   ap-southeast-1.
//!
//! Workloads: LOCAL reads of rows homed in us-east-1 (already replicated
//! everywhere), and LOCAL writes of rows homed in ap-southeast-1.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use geokv_client::{Client, ClientConfig, Consistency, ReadConsistency, Row, WriteOptions};

use crate::strong_wan::{client, GeokvDev};

const CLIENT_REGION: &str = "ap-southeast-1";
const FAR_HOME: &str = "us-east-1";

#[derive(Args, Debug, Clone)]
pub struct ClientRoutingArgs {
    /// Operations per client and workload (one at a time).
    #[arg(long, default_value_t = 200)]
    pub ops: usize,
    /// Multiplies every emulated round trip, as `geokv dev --latency-scale`.
    #[arg(long, default_value_t = 1.0)]
    pub latency_scale: f64,
    /// The `geokv` binary (default: next to geokv-load, then the target dir).
    #[arg(long)]
    pub geokv_bin: Option<PathBuf>,
}

impl ClientRoutingArgs {
    pub fn validate(&self) -> Result<()> {
        if !(10..=100_000).contains(&self.ops) {
            bail!("--ops must be 10..=100000");
        }
        if !(0.0..=10.0).contains(&self.latency_scale) {
            bail!("--latency-scale must be 0..=10");
        }
        Ok(())
    }
}

/// Milliseconds at the given quantile of sorted samples.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

struct Latencies {
    label: String,
    samples: Vec<Duration>,
    served_by: String,
}

impl Latencies {
    fn line(&self) -> String {
        format!(
            "| {} | {} | {:.2} | {:.2} | {} |",
            self.label,
            self.samples.len(),
            quantile_ms(&self.samples, 0.5),
            quantile_ms(&self.samples, 0.99),
            self.served_by
        )
    }
}

fn local() -> WriteOptions {
    WriteOptions::default().consistency(Consistency::Local)
}

async fn reads(c: &Client, label: &str, ops: usize) -> Result<Latencies> {
    let mut samples = Vec::with_capacity(ops);
    let mut served_by = String::new();
    for i in 0..ops {
        let row = Row::new("users", format!("far:{}", i % 50)).home(FAR_HOME);
        let t = Instant::now();
        let got = c.get(&row, ReadConsistency::Local).await.with_context(|| format!("{label}: read"))?;
        samples.push(t.elapsed());
        if !got.found {
            bail!("{label}: row far:{} not found", i % 50);
        }
        served_by = got.info.served_by_region;
    }
    samples.sort();
    Ok(Latencies { label: label.into(), samples, served_by })
}

async fn writes(c: &Client, label: &str, ops: usize) -> Result<Latencies> {
    let mut samples = Vec::with_capacity(ops);
    let mut served_by = String::new();
    for i in 0..ops {
        let row = Row::new("users", format!("near:{label}:{i}")).home(CLIENT_REGION);
        let t = Instant::now();
        let ack = c.put(&row, vec![b'v'; 100], local()).await.with_context(|| format!("{label}: write"))?;
        samples.push(t.elapsed());
        served_by = ack.accepted_by_region;
    }
    samples.sort();
    Ok(Latencies { label: label.into(), samples, served_by })
}

/// The proxied client endpoints `geokv dev --client-region` printed.
fn printed_seeds(log: &str) -> Vec<String> {
    log.lines()
        .skip_while(|l| !l.starts_with("client endpoints as seen from"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let region = cols.next()?;
            let _node = cols.next()?;
            Some(format!("{region}={}", cols.next()?))
        })
        .collect()
}

pub async fn run(args: &ClientRoutingArgs, bin: PathBuf) -> Result<()> {
    let extra = ["--client-region", CLIENT_REGION];
    let dev =
        GeokvDev::spawn(&bin, args.latency_scale, &extra, "every region answering", |ep, certs| async move {
            client(&ep, &certs, Duration::from_secs(2)).await?.cluster_status().await?;
            Ok(())
        })
        .await?;
    let seeds = printed_seeds(&dev.log());
    if seeds.len() != 4 {
        bail!("geokv dev printed {} client endpoints, expected 4:\n{}", seeds.len(), dev.log());
    }
    let far_seed = seeds.iter().find(|s| s.starts_with(FAR_HOME)).context("no us-east-1 endpoint")?;
    let far_addr = far_seed.split_once('=').map(|(_, a)| a.to_string()).unwrap_or_default();
    let pinned =
        Client::with_config(ClientConfig::new(far_addr.clone()).with_certs_dir(&dev.certs_dir)).await?;
    let aware = Client::with_config(
        ClientConfig::discover(seeds.clone()).local_region(CLIENT_REGION).with_certs_dir(&dev.certs_dir),
    )
    .await?;
    // The rows the reads ask for, written at their home and replicated.
    let home = client(&dev.endpoint, &dev.certs_dir, Duration::from_secs(5)).await?;
    for i in 0..50 {
        let row = Row::new("users", format!("far:{i}")).home(FAR_HOME);
        home.put(&row, vec![b'r'; 100], local()).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !aware.get(&Row::new("users", "far:49").home(FAR_HOME), ReadConsistency::Local).await?.found {
        if Instant::now() > deadline {
            bail!("rows homed in us-east-1 did not reach ap-southeast-1 within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rtt = crate::strong_wan::emulated_rtt_ms(CLIENT_REGION, FAR_HOME, args.latency_scale);
    let results = [
        reads(&pinned, "LOCAL read of a us-east-1 row, pinned to us-east-1", args.ops).await?,
        reads(&aware, "LOCAL read of a us-east-1 row, region-aware", args.ops).await?,
        writes(&pinned, "LOCAL write of an ap-southeast-1 row, pinned to us-east-1", args.ops).await?,
        writes(&aware, "LOCAL write of an ap-southeast-1 row, region-aware", args.ops).await?,
    ];
    println!("# geokv-load client-routing");
    println!();
    println!(
        "Client in {CLIENT_REGION} (geokv dev --client-region, latency scale {}; {CLIENT_REGION} to {FAR_HOME} \
         round trip {rtt} ms), one operation at a time, 100-byte values, {} cores.",
        args.latency_scale,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!();
    println!("| workload and client | ops | p50 ms | p99 ms | served by |");
    println!("|---|---|---|---|---|");
    for r in &results {
        println!("{}", r.line());
    }
    let ratio = |a: &Latencies, b: &Latencies| quantile_ms(&a.samples, 0.5) / quantile_ms(&b.samples, 0.5);
    println!();
    println!(
        "p50 pinned / region-aware: reads {:.0}x, writes {:.0}x",
        ratio(&results[0], &results[1]),
        ratio(&results[2], &results[3])
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_read_from_the_dev_banner() {
        let log = "geokv dev: 4 regions\nclient endpoints as seen from ap-southeast-1 (through the fault proxy):\n  \
                   us-east-1        n1    127.0.0.1:4001         (+217 ms round trip)\n  \
                   ap-southeast-1   n1    127.0.0.1:4002         (+0 ms round trip)\nregion-aware client: ...\n";
        assert_eq!(printed_seeds(log), ["us-east-1=127.0.0.1:4001", "ap-southeast-1=127.0.0.1:4002"]);
        assert_eq!(quantile_ms(&[Duration::from_millis(1), Duration::from_millis(3)], 0.5), 3.0);
    }
}
