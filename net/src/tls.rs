//! TLS identities and trust roots, loaded from PEM files and swapped in
//! place when the files change (rotation without restart).
//!
//! One [`Tls`] holds what a process presents (its certificate chain and key)
//! and what it trusts (the CA bundle, which may hold two CAs during a
//! rotation). Every rustls config built from it resolves the certificate and
//! the roots at handshake time, so a reload reaches new connections at once.
//!
//! Client certificates are checked in two steps on purpose. The TLS layer
//! only makes the peer prove that it holds the key of the certificate it
//! sent; the chain is judged afterwards by [`Tls::verify_peer`], against the
//! roots in force at that moment, once per connection and roots generation
//! (see [`crate::incoming::PeerConn`]). So a certificate from another CA
//! gets a gRPC `UNAUTHENTICATED` status with a reason instead of a bare TLS
//! alert, and a connection opened under a CA that was since removed is
//! refused at its next request instead of living on.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::identity::{self, CertIdentity};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// The three files of one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA bundle: every CA whose certificates are trusted (two during a rotation).
    pub ca: PathBuf,
    /// This process's certificate; None for a client that authenticates by token.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// A node's files in a certs directory (`geokv cert create-node`).
    pub fn node(dir: &Path, region: &str, node: &str) -> Self {
        Self {
            ca: dir.join("ca.crt"),
            cert: Some(dir.join(format!("node.{region}.{node}.crt"))),
            key: Some(dir.join(format!("node.{region}.{node}.key"))),
        }
    }

    /// A user's files in a certs directory (`geokv cert create-client`).
    pub fn client(dir: &Path, user: &str) -> Self {
        Self {
            ca: dir.join("ca.crt"),
            cert: Some(dir.join(format!("client.{user}.crt"))),
            key: Some(dir.join(format!("client.{user}.key"))),
        }
    }

    /// Only the CA bundle: a client that authenticates with a token.
    pub fn ca_only(dir: &Path) -> Self {
        Self { ca: dir.join("ca.crt"), cert: None, key: None }
    }

    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.ca).chain(self.cert.iter()).chain(self.key.iter())
    }

    /// Modification time and length of each file: a change means reload.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths()
            .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
            .collect()
    }
}

/// What one load of the files produced.
struct Loaded {
    generation: u64,
    roots: Arc<RootCertStore>,
    root_subjects: Vec<DistinguishedName>,
    certified: Option<Arc<CertifiedKey>>,
    own: Option<CertIdentity>,
    /// Strict verifier for client chains (used by `verify_peer`).
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<WebPkiServerVerifier>,
    stamp: Vec<Option<(SystemTime, u64)>>,
}

/// A reloadable TLS identity and trust bundle.
pub struct Tls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    state: RwLock<Arc<Loaded>>,
    generations: AtomicU64,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).field("generation", &self.generation()).finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read { path: path.into(), why: e.to_string() })
}

fn certs_of(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    let certs = certs.map_err(|e| TlsError::Invalid { path: path.into(), why: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

/// The crypto provider every geokv TLS config uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Loads the files; fails with the file and the reason.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        let loaded = Self::read_files(&files, &provider, 1)?;
        Ok(Arc::new(Self {
            files,
            provider,
            state: RwLock::new(Arc::new(loaded)),
            generations: AtomicU64::new(1),
        }))
    }

    fn read_files(
        files: &TlsFiles,
        provider: &Arc<CryptoProvider>,
        generation: u64,
    ) -> Result<Loaded, TlsError> {
        let stamp = files.stamp();
        let mut roots = RootCertStore::empty();
        for ca in certs_of(&files.ca)? {
            roots.add(ca).map_err(|e| TlsError::Invalid { path: files.ca.clone(), why: e.to_string() })?;
        }
        let roots = Arc::new(roots);
        let root_subjects = roots.subjects();
        let (certified, own) = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => {
                let chain = certs_of(cert)?;
                let own = identity::parse(&chain[0])
                    .map_err(|e| TlsError::Invalid { path: cert.clone(), why: e.to_string() })?;
                let key_pem = read(key)?;
                let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|e| TlsError::Invalid { path: key.clone(), why: e.to_string() })?;
                let certified = CertifiedKey::from_der(chain, key_der, provider)
                    .map_err(|e| TlsError::Invalid { path: key.clone(), why: e.to_string() })?;
                (Some(Arc::new(certified)), Some(own))
            }
            _ => (None, None),
        };
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Invalid { path: files.ca.clone(), why: e.to_string() })?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Invalid { path: files.ca.clone(), why: e.to_string() })?;
        Ok(Loaded {
            generation,
            roots,
            root_subjects,
            certified,
            own,
            client_verifier,
            server_verifier,
            stamp,
        })
    }

    fn current(&self) -> Arc<Loaded> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the files. On error the material in force stays.
    pub fn reload(&self) -> Result<u64, TlsError> {
        let generation = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
        let loaded = Self::read_files(&self.files, &self.provider, generation)?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        tracing::info!(generation, ca = %self.files.ca.display(), "TLS certificates reloaded");
        Ok(generation)
    }

    /// Reloads when a file's modification time or length changed.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        if self.files.stamp() == self.current().stamp {
            return Ok(false);
        }
        self.reload().map(|_| true)
    }

    /// Bumped by every successful reload; identities verified under an
    /// older generation are verified again.
    pub fn generation(&self) -> u64 {
        self.current().generation
    }

    /// The identity in this process's own certificate.
    pub fn own_identity(&self) -> Option<CertIdentity> {
        self.current().own.clone()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Judges a peer's certificate chain against the roots in force now:
    /// signed by a trusted CA, not expired, usable for client auth.
    pub fn verify_peer(&self, chain: &[CertificateDer<'_>]) -> Result<CertIdentity, String> {
        let Some((end, intermediates)) = chain.split_first() else {
            return Err("no certificate".into());
        };
        let loaded = self.current();
        loaded
            .client_verifier
            .verify_client_cert(end, intermediates, UnixTime::now())
            .map_err(|e| format!("certificate refused: {e}"))?;
        identity::parse(end).map_err(|e| format!("certificate refused: {e}"))
    }

    /// The server side of both ports: presents the current certificate and
    /// asks for a client certificate without requiring one at the TLS
    /// layer (see the module doc).
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_client_cert_verifier(Arc::new(Deferred(self.clone())))
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// The client side of every outgoing connection: the server must
    /// present a certificate of a trusted CA for the name dialled; this
    /// process presents its own certificate if it has one.
    pub fn client_config(self: &Arc<Self>) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Deferred(self.clone())))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// Polls the files every `every` and reloads on change, and on SIGHUP,
    /// until `stop` resolves.
    pub fn spawn_watcher(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let forced = match hup.as_mut() {
                    Some(h) => tokio::select! {
                        _ = tick.tick() => false,
                        _ = h.recv() => true,
                    },
                    None => {
                        tick.tick().await;
                        false
                    }
                };
                #[cfg(not(unix))]
                let forced = {
                    tick.tick().await;
                    false
                };
                let result = if forced { tls.reload().map(|_| true) } else { tls.reload_if_changed() };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "TLS reload failed; the certificates in force stay");
                }
            }
        })
    }
}

/// Resolves this process's certificate at each handshake.
#[derive(Debug)]
struct Resolver(Arc<Tls>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().certified.clone()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.current().certified.clone()
    }

    fn has_certs(&self) -> bool {
        self.0.current().certified.is_some()
    }
}

/// The verifier of both sides, reading the roots in force at each handshake.
#[derive(Debug)]
struct Deferred(Arc<Tls>);

impl ClientCertVerifier for Deferred {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would have to outlive the reloadable state; an empty
        // list tells a client to send whatever certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Judged per request by `Tls::verify_peer` (module doc); the
        // signature checks below still prove the peer holds the key.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for Deferred {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ClientCertVerifier::supported_verify_schemes(self)
    }
}

impl Tls {
    /// Subjects of the trusted CAs (for `geokv cert list` and logs).
    pub fn trusted_subjects(&self) -> usize {
        let loaded = self.current();
        debug_assert_eq!(loaded.root_subjects.len(), loaded.roots.len());
        loaded.roots.len()
    }
}
