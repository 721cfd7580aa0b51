//! `geokv-load lifecycle`: what the data lifecycle costs, through a
//! `geokv dev` cluster with its emulated WAN, in one run
//! (docs/architecture.md section 13):
//! - erasure of a subject with `--subject-rows` rows: the time until every
//!   region sent its receipts (as `geokv subject erase` asks them);
//! - watch delivery lag: a watcher in eu-west-1 while three other regions
//!   write `--watch-rate` writes/s in total; the lag of a change is when
//!   the watcher got it less when its write was acknowledged;
//! - LOCAL put throughput with a TTL beside the same without, each
//!   `--duration-s` with `--clients` writers, and the us-east-1 node's CPU
//!   per put (the peer measured in the same run is the same cluster
//!   without TTL).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use geokv_client::proto as pb;
use geokv_client::{Client, ClientConfig, Consistency, Row, WriteOptions};

use crate::strong_wan::GeokvDev;

const REGIONS: [&str; 4] = ["us-east-1", "eu-west-1", "eu-central-1", "ap-southeast-1"];
const WATCHER: &str = "eu-west-1";

#[derive(Args, Debug, Clone)]
pub struct LifecycleArgs {
    /// Rows of the erased subject.
    #[arg(long, default_value_t = 10_000)]
    pub subject_rows: usize,
    /// Writes per second, in total, while the watch lag is measured.
    #[arg(long, default_value_t = 2_000)]
    pub watch_rate: u64,
    /// Seconds of each measured window (watch lag, TTL on, TTL off).
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Concurrent writers of the TTL comparison.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Multiplies every emulated round trip, as `geokv dev --latency-scale`.
    #[arg(long, default_value_t = 1.0)]
    pub latency_scale: f64,
    /// The `geokv` binary (default: next to geokv-load, then the target dir).
    #[arg(long)]
    pub geokv_bin: Option<PathBuf>,
}

impl LifecycleArgs {
    pub fn validate(&self) -> Result<()> {
        if !(1..=1_000_000).contains(&self.subject_rows) {
            bail!("--subject-rows must be 1..=1000000");
        }
        if !(1..=100_000).contains(&self.watch_rate) {
            bail!("--watch-rate must be 1..=100000");
        }
        if !(1..=600).contains(&self.duration_s) {
            bail!("--duration-s must be 1..=600");
        }
        if !(1..=1024).contains(&self.clients) {
            bail!("--clients must be 1..=1024");
        }
        if !(0.0..=10.0).contains(&self.latency_scale) {
            bail!("--latency-scale must be 0..=10");
        }
        Ok(())
    }
}

fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3
}

/// One client pinned to each region's node (gRPC ports base + 10 i).
async fn region_clients(dev: &GeokvDev) -> Result<HashMap<&'static str, Client>> {
    let (host, port) = dev.endpoint.rsplit_once(':').context("endpoint without a port")?;
    let base: u16 = port.parse().context("endpoint port")?;
    let mut out = HashMap::new();
    for (i, r) in REGIONS.iter().enumerate() {
        let ep = format!("{host}:{}", base + 10 * i as u16);
        let mut cfg = ClientConfig::new(ep).with_certs_dir(&dev.certs_dir);
        cfg.timeout = Duration::from_secs(120);
        out.insert(*r, Client::with_config(cfg).await.with_context(|| format!("connecting to {r}"))?);
    }
    Ok(out)
}

async fn erasure(clients: &HashMap<&'static str, Client>, rows: usize) -> Result<()> {
    let subject = "bench-subject";
    let us = &clients["us-east-1"];
    let started = Instant::now();
    for chunk in (0..rows).collect::<Vec<_>>().chunks(128) {
        let ops = chunk
            .iter()
            .map(|i| pb::BatchOp {
                op: Some(pb::batch_op::Op::Put(pb::PutRequest {
                    row: Some(Row::new("users", format!("{subject}:{i}")).home("us-east-1").to_proto()),
                    value: vec![b'p'; 100],
                    ..Default::default()
                })),
            })
            .collect();
        us.batch(ops, Some(Consistency::Local), None).await.context("writing the subject's rows")?;
    }
    let wrote = started.elapsed();
    // Every region holds every row before the erasure.
    let last = Row::new("users", format!("{subject}:{}", rows - 1)).home("us-east-1");
    let deadline = Instant::now() + Duration::from_secs(120);
    for r in REGIONS {
        while !clients[r].get(&last, geokv_client::ReadConsistency::Local).await?.found {
            if Instant::now() > deadline {
                bail!("the subject's rows did not reach {r} within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let started = Instant::now();
    let mut fence = 0;
    let mut lines = Vec::new();
    for r in REGIONS {
        let t = Instant::now();
        let resp = clients[r]
            .erase_subject(subject.as_bytes(), fence)
            .await
            .with_context(|| format!("erasing in {r}"))?;
        fence = resp.fence_hlc;
        for rc in &resp.receipts {
            lines.push(format!(
                "| {} | {} | {} | {} | {} | {:.0} |",
                rc.region,
                rc.rows,
                rc.values,
                rc.bytes,
                rc.took_ms,
                t.elapsed().as_secs_f64() * 1e3
            ));
        }
    }
    let total = started.elapsed();
    println!("## Erasure of a subject with {rows} rows");
    println!();
    println!(
        "Rows written in {:.1} s (batches of 128, LOCAL at us-east-1) and replicated to every region first.",
        wrote.as_secs_f64()
    );
    println!();
    println!("| region | rows | values | bytes | node's erasure ms | call ms |");
    println!("|---|---|---|---|---|---|");
    for l in lines {
        println!("{l}");
    }
    println!();
    println!(
        "Every region's receipt in {:.0} ms (regions asked one after another).",
        total.as_secs_f64() * 1e3
    );
    println!();
    Ok(())
}

async fn watch_lag(clients: &HashMap<&'static str, Client>, rate: u64, duration: Duration) -> Result<()> {
    let acked: Arc<Mutex<HashMap<Vec<u8>, Instant>>> = Arc::default();
    let received: Arc<Mutex<HashMap<Vec<u8>, Instant>>> = Arc::default();
    let mut stream = clients[WATCHER].watch("default", b"lag:", b"").await.context("opening the watch")?;
    let rec = received.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(event)) = stream.message().await {
            if let Some(pb::watch_event::Event::Change(c)) = event.event {
                let now = Instant::now();
                let mut r = rec.lock().unwrap();
                for s in c.siblings {
                    r.entry(s.value).or_insert(now);
                }
            }
        }
    });
    let writers_regions = ["us-east-1", "eu-central-1", "ap-southeast-1"];
    // Each region: 16 writers, each on its own schedule.
    let per_writer = (rate as f64 / (writers_regions.len() * 16) as f64).max(0.001);
    let mut tasks = Vec::new();
    for r in writers_regions {
        for w in 0..16 {
            let client = clients[r].clone();
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_writer));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let end = Instant::now() + duration;
                let mut i = 0u64;
                let mut failed = 0u64;
                while Instant::now() < end {
                    tick.tick().await;
                    let value = format!("lag-{r}-{w}-{i}").into_bytes();
                    let row = Row::new("default", format!("lag:{r}:{w}:{i}")).home(r);
                    i += 1;
                    let opts = WriteOptions::default().consistency(Consistency::Local);
                    match client.put(&row, value.clone(), opts).await {
                        Ok(_) => {
                            acked.lock().unwrap().insert(value, Instant::now());
                        }
                        Err(_) => failed += 1,
                    }
                }
                failed
            }));
        }
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap_or(0);
    }
    // Let the last changes arrive.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing = {
            let a = acked.lock().unwrap();
            let r = received.lock().unwrap();
            a.keys().filter(|k| !r.contains_key(*k)).count()
        };
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    watcher.abort();
    let a = acked.lock().unwrap();
    let r = received.lock().unwrap();
    let mut lags: Vec<Duration> =
        a.iter().filter_map(|(k, at)| r.get(k).map(|got| got.saturating_duration_since(*at))).collect();
    lags.sort();
    let rate_done = a.len() as f64 / duration.as_secs_f64();
    println!("## Watch delivery lag");
    println!();
    println!(
        "A watcher in {WATCHER} on `lag:`; 48 writers in us-east-1, eu-central-1 and ap-southeast-1 asked for {rate} LOCAL writes/s in total for {} s and made {rate_done:.0}/s ({failed} failed).",
        duration.as_secs()
    );
    println!();
    println!("| acknowledged | delivered | lag p50 ms | lag p99 ms | lag max ms |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {} | {:.1} | {:.1} | {:.1} |",
        a.len(),
        lags.len(),
        quantile_ms(&lags, 0.5),
        quantile_ms(&lags, 0.99),
        quantile_ms(&lags, 1.0)
    );
    println!();
    Ok(())
}

/// Closed-loop LOCAL puts at us-east-1 for `duration` by `clients` writers;
/// returns (puts, seconds).
async fn puts(
    client: &Client,
    clients: usize,
    duration: Duration,
    ttl: Option<Duration>,
    tag: &str,
) -> Result<(u64, f64)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..clients {
        let client = client.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let end = Instant::now() + duration;
            while Instant::now() < end {
                let mut opts = WriteOptions::default().consistency(Consistency::Local);
                if let Some(t) = ttl {
                    opts = opts.ttl(t);
                }
                let row = Row::new("default", format!("{tag}:{w}:{}", n % 1000)).home("us-east-1");
                if client.put(&row, vec![b'x'; 100], opts).await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    Ok((total, started.elapsed().as_secs_f64()))
}

async fn ttl_throughput(dev: &GeokvDev, client: &Client, clients: usize, duration: Duration) -> Result<()> {
    let pid = dev.node_pid("us-east-1");
    let cpu = || pid.and_then(crate::process::cpu_seconds);
    // Off, on, on, off: each setting gets an early and a late window, so a
    // store that grows over the run weighs on both alike.
    let ttl_on = Some(Duration::from_secs(3600));
    let order = [("TTL off", None), ("TTL 1 h", ttl_on), ("TTL 1 h", ttl_on), ("TTL off", None)];
    let mut sums: Vec<(&str, u64, f64, f64)> = vec![("TTL off", 0, 0.0, 0.0), ("TTL 1 h", 0, 0.0, 0.0)];
    // An unmeasured second first.
    puts(client, clients, Duration::from_secs(1), None, "warm").await?;
    for (i, (label, ttl)) in order.iter().enumerate() {
        let c0 = cpu();
        let (n, secs) = puts(client, clients, duration, *ttl, &format!("w{i}")).await?;
        let c1 = cpu();
        let slot = sums.iter_mut().find(|s| s.0 == *label).context("a label of the order")?;
        slot.1 += n;
        slot.2 += secs;
        if let (Some(a), Some(b)) = (c0, c1) {
            slot.3 += b - a;
        }
    }
    let rows: Vec<(&str, f64, String)> = sums
        .iter()
        .map(|(label, n, secs, cpu_s)| {
            let per_put =
                if *n > 0 && *cpu_s > 0.0 { format!("{:.0}", cpu_s / *n as f64 * 1e6) } else { "n/a".into() };
            (*label, *n as f64 / secs, per_put)
        })
        .collect();
    println!("## LOCAL puts with and without a TTL");
    println!();
    println!(
        "{clients} closed-loop writers at us-east-1, 100-byte values; windows of {} s in the order off, on, on, off.",
        duration.as_secs()
    );
    println!();
    println!("| | puts/s | server CPU us per put |");
    println!("|---|---|---|");
    for (label, rate, cpu) in &rows {
        println!("| {label} | {rate:.0} | {cpu} |");
    }
    println!();
    println!("TTL on / off: {:.2}x", rows[1].1 / rows[0].1);
    Ok(())
}

pub async fn run(args: &LifecycleArgs, bin: PathBuf) -> Result<()> {
    let dev =
        GeokvDev::spawn(&bin, args.latency_scale, &[], "every region answering", |ep, certs| async move {
            crate::strong_wan::client(&ep, &certs, Duration::from_secs(2)).await?.cluster_status().await?;
            Ok(())
        })
        .await?;
    let clients = region_clients(&dev).await?;
    println!("# geokv-load lifecycle");
    println!();
    println!(
        "geokv dev, 4 regions, latency scale {}, {} cores.",
        args.latency_scale,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!();
    erasure(&clients, args.subject_rows).await?;
    watch_lag(&clients, args.watch_rate, Duration::from_secs(args.duration_s)).await?;
    ttl_throughput(&dev, &clients["us-east-1"], args.clients, Duration::from_secs(args.duration_s)).await?;
    Ok(())
}
