//! `geokv cert`: the cluster's certificates, issued offline into a certs
//! directory (`--certs-dir`, `GEOKV_CERTS_DIR`, default `./certs`).
//!
//! - `create-ca`: the cluster CA (`ca.crt`, `ca.key`); every node trusts
//!   `ca.crt`, and `ca.key` is needed only where certificates are issued.
//! - `create-node`: a node's certificate, valid for the hosts its peers and
//!   clients dial, naming it `geokv://<cluster>/<region>/<node>`.
//! - `create-client`: a user's client certificate.
//! - `list`: every certificate in the directory, expired ones marked.
//!
//! The work itself lives in `geokv_net::certs`, shared with `geokv dev` and
//! the tests; this module is flags and printing.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use geokv_net::certs::{self, CertSummary};
use serde_json::json;

#[derive(Args, Clone, Debug)]
pub struct CertArgs {
    #[command(subcommand)]
    pub action: CertAction,
    /// Directory holding the cluster's certificates and keys.
    #[arg(long, global = true, env = "GEOKV_CERTS_DIR", default_value = "./certs")]
    pub certs_dir: PathBuf,
}

#[derive(Subcommand, Clone, Debug)]
pub enum CertAction {
    /// Create the cluster CA: ca.crt (give it to every node and client) and
    /// ca.key (keep it where certificates are issued, off the nodes).
    CreateCa {
        /// The cluster's name, written into every certificate the CA issues.
        #[arg(long, default_value = "geokv")]
        cluster: String,
        /// Validity in days (default 3650).
        #[arg(long)]
        days: Option<u32>,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        overwrite: bool,
    },
    /// Create a node's certificate and key, signed by the CA in --certs-dir.
    CreateNode {
        /// The node's region.
        #[arg(long)]
        region: String,
        /// The node's id within its region.
        #[arg(long = "node-id")]
        node_id: String,
        /// A host name or IP address the node is reached at (repeat, or
        /// separate with commas).
        #[arg(long = "host", required = true, num_args = 1.., value_delimiter = ',')]
        hosts: Vec<String>,
        /// Validity in days (default 365).
        #[arg(long)]
        days: Option<u32>,
        /// Replace an existing certificate and key.
        #[arg(long)]
        overwrite: bool,
    },
    /// Create a client certificate and key for a user, signed by the CA in --certs-dir.
    CreateClient {
        /// The user's name (the certificate's common name).
        #[arg(long)]
        user: String,
        /// Validity in days (default 365).
        #[arg(long)]
        days: Option<u32>,
        /// Replace an existing certificate and key.
        #[arg(long)]
        overwrite: bool,
    },
    /// List the certificates in --certs-dir: subject, names, expiry.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `geokv cert` command. Synchronous: issuing is local file work
/// that takes milliseconds.
pub fn run(args: CertArgs) -> anyhow::Result<()> {
    let dir = args.certs_dir.as_path();
    match args.action {
        CertAction::CreateCa { cluster, days, overwrite } => {
            let cert = certs::create_ca(dir, &cluster, days, overwrite)?;
            println!("cluster CA for {cluster:?}");
            println!("wrote {}", cert.display());
            println!(
                "wrote {} (private: needed only to issue certificates)",
                certs::ca_key_path(dir).display()
            );
        }
        CertAction::CreateNode { region, node_id, hosts, days, overwrite } => {
            let (cert, key) = certs::create_node(dir, &region, &node_id, &hosts, days, overwrite)?;
            println!("node {region}/{node_id}, hosts {}", hosts.join(", "));
            println!("wrote {}", cert.display());
            println!("wrote {} (private: for this node only)", key.display());
        }
        CertAction::CreateClient { user, days, overwrite } => {
            let (cert, key) = certs::create_client(dir, &user, days, overwrite)?;
            println!("client {user}");
            println!("wrote {}", cert.display());
            println!("wrote {} (private: for this user only)", key.display());
        }
        CertAction::List { json } => {
            let all = certs::list(dir).with_context(|| format!("listing {}", dir.display()))?;
            let now = certs::unix_now();
            if json {
                let rows: Vec<_> = all.iter().map(|s| summary_json(s, now)).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(dir, &all, now);
            }
        }
    }
    Ok(())
}

fn summary_json(s: &CertSummary, now: i64) -> serde_json::Value {
    json!({
        "file": s.file.display().to_string(),
        "kind": s.kind(),
        "subject": s.subject,
        "cluster": s.cluster,
        "sans": s.sans,
        "is_ca": s.is_ca,
        "not_before": certs::format_utc(s.not_before),
        "not_after": certs::format_utc(s.not_after),
        "not_before_unix": s.not_before,
        "not_after_unix": s.not_after,
        "expired": s.is_expired_at(now),
    })
}

fn print_table(dir: &Path, all: &[CertSummary], now: i64) {
    if all.is_empty() {
        println!("no certificates in {}", dir.display());
        return;
    }
    let rows: Vec<[String; 5]> = all
        .iter()
        .map(|s| {
            let file = s.file.strip_prefix(dir).unwrap_or(&s.file).display().to_string();
            let sans = if s.sans.is_empty() { "-".to_string() } else { s.sans.join(", ") };
            let mut expires = certs::format_utc(s.not_after);
            if s.is_expired_at(now) {
                expires.push_str("  EXPIRED");
            } else if s.not_after - now < 30 * 86_400 {
                expires.push_str("  (expires within 30 days)");
            }
            [file, s.kind().to_string(), s.subject.clone(), sans, expires]
        })
        .collect();
    let header = ["file", "kind", "subject", "names", "expires"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 < cells.len() {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            } else {
                out.push_str(cell);
            }
        }
        out
    };
    println!("{}", line(header));
    for row in &rows {
        println!("{}", line([&row[0], &row[1], &row[2], &row[3], &row[4]].map(String::as_str)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Top,
    }

    #[derive(Subcommand)]
    enum Top {
        Cert(CertArgs),
    }

    fn parse(args: &[&str]) -> CertArgs {
        let cli = Cli::try_parse_from(std::iter::once("geokv").chain(args.iter().copied())).expect("parses");
        let Top::Cert(args) = cli.command;
        args
    }

    #[test]
    fn flags_parse() {
        let args = parse(&[
            "cert",
            "create-node",
            "--region",
            "r",
            "--node-id",
            "n",
            "--host",
            "a,b",
            "--host",
            "c",
        ]);
        assert_eq!(args.certs_dir, PathBuf::from("./certs"));
        match args.action {
            CertAction::CreateNode { hosts, days: None, overwrite: false, .. } => {
                assert_eq!(hosts, ["a", "b", "c"])
            }
            other => panic!("{other:?}"),
        }
        let args = parse(&["cert", "list", "--certs-dir", "/x", "--json"]);
        assert_eq!(args.certs_dir, PathBuf::from("/x"));
        assert!(matches!(args.action, CertAction::List { json: true }));
        let args = parse(&["cert", "--certs-dir", "/y", "create-ca", "--days", "30"]);
        assert_eq!(args.certs_dir, PathBuf::from("/y"));
        assert!(
            matches!(args.action, CertAction::CreateCa { ref cluster, days: Some(30), overwrite: false } if cluster == "geokv")
        );
        assert!(
            Cli::try_parse_from(["geokv", "cert", "create-node", "--region", "r", "--node-id", "n"]).is_err()
        );
    }

    #[test]
    fn issue_and_list() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_string_lossy().into_owned();
        run(parse(&["cert", "--certs-dir", &dir, "create-ca", "--cluster", "test"])).expect("ca");
        run(parse(&[
            "cert",
            "--certs-dir",
            &dir,
            "create-node",
            "--region",
            "r",
            "--node-id",
            "n",
            "--host",
            "localhost",
        ]))
        .expect("node");
        run(parse(&["cert", "--certs-dir", &dir, "create-client", "--user", "alice"])).expect("client");
        assert!(run(parse(&["cert", "--certs-dir", &dir, "create-client", "--user", "alice"])).is_err());
        run(parse(&["cert", "--certs-dir", &dir, "list"])).expect("list");
        run(parse(&["cert", "--certs-dir", &dir, "list", "--json"])).expect("list json");
        let all = certs::list(tmp.path()).expect("list");
        assert_eq!(all.len(), 3);
        let json = summary_json(&all[0], certs::unix_now());
        assert_eq!(json["kind"], "ca");
        assert_eq!(json["cluster"], "test");
        assert_eq!(json["expired"], false);
    }
}
