//! `geokv-proxy`: run fault-injecting links, or drive running ones.
//!
//! ```text
//! geokv-proxy --link 'us->eu=127.0.0.1:7101=127.0.0.1:7001,latency_ms=80,jitter_ms=5' \
//!             --link 'eu->us=127.0.0.1:7102=127.0.0.1:7002,latency_ms=80' --control 127.0.0.1:7199
//! geokv-proxy ctl --control 127.0.0.1:7199 partition 'us->eu'
//! ```
//!
//! When every link and the control API listen, one JSON line goes to stdout
//! (`{"control": ADDR, "links": [{"name", "listen", "upstream"}]}`), so a
//! harness that asked for port 0 learns the ports. Logs go to stderr
//! (`RUST_LOG` filters them).

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use geokv_proxy::{ControlClient, FaultsPatch, LinkSpec, LinkStatus, ProxySet};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "geokv-proxy",
    version,
    about = "Fault-injecting TCP proxy for geokv links: latency, jitter, bandwidth, partition, stall, reset",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// A link: NAME=LISTEN=UPSTREAM[,key=value...]. Keys: latency_ms, jitter_ms,
    /// bandwidth_bytes_per_s (both directions, or one with a to_upstream. or
    /// to_client. prefix), partition, stall, refuse. Repeat for more links.
    #[arg(long = "link", value_name = "SPEC", required = true)]
    links: Vec<LinkSpec>,
    /// Where to serve the control API (HTTP JSON); none if left out.
    #[arg(long, value_name = "ADDR")]
    control: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Talk to a running geokv-proxy's control API.
    Ctl {
        /// The control API's address.
        #[arg(long, value_name = "ADDR", env = "GEOKV_PROXY_CONTROL")]
        control: SocketAddr,
        #[command(subcommand)]
        action: Action,
    },
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Show one link, or all.
    Show {
        name: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Black-hole the link: bytes are dropped, nothing flows.
    Partition { name: String },
    /// Clear partition, stall, refuse and bandwidth caps; keep latency and jitter.
    Heal { name: String },
    /// Set the one-way latency of both directions, in milliseconds.
    Latency { name: String, latency_ms: u64 },
    /// Hold bytes (without dropping them) until healed.
    Stall { name: String },
    /// Close every connection of the link with an RST.
    Reset {
        name: String,
        /// Also reset new connections until `heal` (or `set NAME refuse=false`).
        #[arg(long)]
        refuse: bool,
    },
    /// Set any faults: `set NAME latency_ms=80 to_client.jitter_ms=5 stall=false`.
    Set {
        name: String,
        #[arg(required = true, value_name = "KEY=VALUE")]
        options: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Ctl { control, action }) => ctl(ControlClient::new(control), action).await,
            None => run(cli.run).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let set = ProxySet::new();
    for spec in &args.links {
        set.add(&spec.name, spec.listen, spec.upstream, spec.faults.clone())
            .await
            .with_context(|| format!("starting link {:?}", spec.name))?;
    }
    let control = match args.control {
        Some(addr) => Some(set.serve_control(addr).await.context("starting the control API")?),
        None => None,
    };
    let links: Vec<_> = set
        .statuses()
        .into_iter()
        .map(|s| json!({"name": s.name, "listen": s.listen, "upstream": s.upstream}))
        .collect();
    println!("{}", json!({"control": control.as_ref().map(|c| c.local_addr()), "links": links}));

    wait_for_signal().await?;
    tracing::info!("shutting down");
    if let Some(control) = control {
        control.shutdown().await;
    }
    set.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("listening for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

async fn ctl(client: ControlClient, action: Action) -> Result<()> {
    let status = match action {
        Action::Show { name, json } => {
            let links = match name {
                Some(name) => vec![client.link(&name).await?],
                None => client.links().await?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&links)?);
            } else {
                print_table(&links);
            }
            return Ok(());
        }
        Action::Partition { name } => client.partition(&name).await?,
        Action::Heal { name } => client.heal(&name).await?,
        Action::Latency { name, latency_ms } => client.latency(&name, latency_ms).await?,
        Action::Stall { name } => client.stall(&name).await?,
        Action::Reset { name, refuse } => {
            let reply = client.reset(&name, refuse.then_some(true)).await?;
            println!("reset {} connection(s)", reply.connections_reset);
            reply.link
        }
        Action::Set { name, options } => {
            let mut patch = FaultsPatch::default();
            for option in &options {
                patch.set_option(option)?;
            }
            client.set(&name, &patch).await?
        }
    };
    print_table(std::slice::from_ref(&status));
    Ok(())
}

fn print_table(links: &[LinkStatus]) {
    println!(
        "{:<28} {:<21} {:<21} {:<44} {:>5} {:>12} {:>12} {:>10}",
        "LINK", "LISTEN", "UPSTREAM", "FAULTS", "CONNS", "BYTES_UP", "BYTES_DOWN", "DROPPED"
    );
    for s in links {
        let st = &s.stats;
        println!(
            "{:<28} {:<21} {:<21} {:<44} {:>5} {:>12} {:>12} {:>10}",
            s.name,
            s.listen.to_string(),
            s.upstream.to_string(),
            describe(s),
            st.connections_active,
            st.to_upstream.bytes_written,
            st.to_client.bytes_written,
            st.to_upstream.bytes_dropped + st.to_client.bytes_dropped,
        );
    }
}

/// The faults in a few words, e.g. `80ms+-5 / 80ms, PARTITION`.
fn describe(s: &LinkStatus) -> String {
    let dir = |d: &geokv_proxy::DirectionFaults| {
        let mut out = format!("{}ms", d.latency_ms);
        if d.jitter_ms > 0 {
            out.push_str(&format!("+-{}", d.jitter_ms));
        }
        if d.bandwidth_bytes_per_s > 0 {
            out.push_str(&format!("@{}B/s", d.bandwidth_bytes_per_s));
        }
        out
    };
    let f = &s.faults;
    let mut out = format!("{} / {}", dir(&f.to_upstream), dir(&f.to_client));
    for (on, word) in [(f.partition, "PARTITION"), (f.stall, "STALL"), (f.refuse, "REFUSE")] {
        if on {
            out.push_str(", ");
            out.push_str(word);
        }
    }
    out
}
