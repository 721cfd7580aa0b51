//! Transport security for the peers (etcd, Redis), so that they can be
//! measured as geokv always runs: mutual TLS on every connection.
//!
//! The certificates are made with `geokv cert`'s own code in the peer's
//! temp dir: a CA, one certificate per server process (valid for
//! 127.0.0.1, usable as server and as client, since etcd members dial each
//! other) and the load generator's client certificate. The load clients
//! present that certificate and check the server's against the CA, with
//! the same TLS stack as geokv's clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use geokv_net::certs;
use geokv_net::tls::{Tls, TlsFiles};

/// How a peer's servers and clients talk.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Plaintext (the peers' default).
    #[default]
    Plaintext,
    /// Mutual TLS, as geokv.
    Tls,
}

impl Transport {
    /// For the report's description of a target.
    pub fn describe(self) -> &'static str {
        match self {
            Transport::Plaintext => "plaintext",
            Transport::Tls => "mutual TLS",
        }
    }
}

/// The CA's cluster name and the region part of every server certificate.
const CLUSTER: &str = "peer-bench";
const REGION: &str = "peer";
/// The load generator's user name in its client certificate.
const USER: &str = "load";

/// The certificates of one peer deployment, and the load client's identity.
pub struct PeerCerts {
    dir: PathBuf,
    /// The load generator's client identity and the CA it trusts.
    pub client: Arc<Tls>,
}

/// One server's files.
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl PeerCerts {
    /// Makes the CA, a certificate for each of `servers` and the client's
    /// in `dir` (created; it must not hold certificates already).
    pub fn create(dir: &Path, servers: &[&str]) -> Result<Self> {
        certs::create_ca(dir, CLUSTER, None, false).context("creating the peers' CA")?;
        for name in servers {
            certs::create_node(dir, REGION, name, &["127.0.0.1"], None, false)
                .with_context(|| format!("creating {name}'s certificate"))?;
        }
        certs::create_client(dir, USER, None, false).context("creating the load client's certificate")?;
        let client =
            Tls::load(TlsFiles::client(dir, USER)).context("loading the load client's certificate")?;
        Ok(Self { dir: dir.to_path_buf(), client })
    }

    /// The files of server `name` (one of those given to [`PeerCerts::create`]).
    pub fn server(&self, name: &str) -> ServerFiles {
        let files = TlsFiles::node(&self.dir, REGION, name);
        ServerFiles { cert: files.cert.unwrap_or_default(), key: files.key.unwrap_or_default(), ca: files.ca }
    }
}
