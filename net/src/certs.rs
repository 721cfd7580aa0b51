//! Issuing the cluster's certificates: what `geokv cert` and `geokv dev` write.
//!
//! One directory holds a cluster's files:
//!
//! | file                          | what                                              |
//! |-------------------------------|---------------------------------------------------|
//! | `ca.crt`, `ca.key`            | the cluster CA, CN `geokv CA <cluster>`           |
//! | `node.<region>.<node>.crt/.key` | a node, URI SAN `geokv://<cluster>/<region>/<node>` |
//! | `client.<user>.crt/.key`      | a client, CN `<user>`                             |
//!
//! Names never contain `.`, so these file names parse back unambiguously.
//! Every certificate also carries `O=geokv, OU=<cluster>` in its subject, so
//! a listing can tell which cluster a client certificate belongs to.
//!
//! Keys are ECDSA P-256: small certificates and the cheapest handshakes
//! rustls offers with ring, which matters for the many short cross-region
//! connections. A key file is created with mode 0600 from the start, never
//! widened and then narrowed, so the secret is at no moment readable by
//! others. Nothing is overwritten unless asked: replacing a CA key silently
//! would orphan every certificate it signed.
//!
//! Validity starts one hour in the past, because nodes in other regions may
//! run slightly behind this machine's clock and would otherwise refuse a
//! fresh certificate as "not yet valid".

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::pem::Pem;
use x509_parser::time::ASN1Time;

use crate::identity::{self, NodeIdentity, CA_COMMON_NAME_PREFIX, NAME_RULE, NODE_COMMON_NAME_PREFIX};

/// Default validity of a cluster CA: rotating a CA means reissuing every
/// certificate, so it is made to outlast many node certificates.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of node and client certificates: short enough that a
/// leaked key stops working within a year, long enough to renew calmly.
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// The longest validity accepted, about a century; longer requests are
/// almost certainly typos.
pub const MAX_DAYS: u32 = 36_500;

/// The organization every geokv certificate carries in its subject.
pub const ORGANIZATION: &str = "geokv";

/// The file name of the cluster CA certificate.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The file name of the cluster CA private key.
pub const CA_KEY_FILE: &str = "ca.key";

/// How far back validity starts, against clock skew between regions.
const BACKDATE_SECS: i64 = 3600;
const SECS_PER_DAY: i64 = 86_400;

/// Why a certificate could not be issued, read or listed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("invalid {kind} name {name:?}: {NAME_RULE}")]
    InvalidName { kind: &'static str, name: String },
    #[error("invalid host {host:?}: neither an IP address nor a DNS name")]
    InvalidHost { host: String },
    #[error("a node certificate needs at least one host (an IP address or DNS name its peers dial)")]
    NoHosts,
    #[error("invalid validity of {days} days: use 1 to {MAX_DAYS}")]
    InvalidDays { days: u32 },
    #[error("{} already exists; not overwriting it (pass --overwrite to replace it)", path.display())]
    Exists { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cluster CA in {}: create it first (ca.crt and ca.key)", dir.display())]
    NoCa { dir: PathBuf },
    #[error("{}: not a geokv cluster CA (a CA certificate with common name \"geokv CA <cluster>\")", path.display())]
    NotGeokvCa { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: not a usable private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("{} is not the key of {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the CA in {} is for cluster {found:?}, not {expected:?}", path.display())]
    ClusterMismatch { path: PathBuf, expected: String, found: String },
    #[error("cannot generate the certificate: {0}")]
    Generate(String),
}

/// One certificate found by [`list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSummary {
    /// The file it was read from (a file holding several certificates yields
    /// one summary per certificate).
    pub file: PathBuf,
    /// The subject as `CN=..., O=..., OU=...`.
    pub subject: String,
    /// The cluster it belongs to (see [`identity::cluster_of`]).
    pub cluster: Option<String>,
    /// Subject alternative names as `DNS:...`, `IP:...`, `URI:...`.
    pub sans: Vec<String>,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// Whether the certificate may sign others (basic constraints `CA:true`).
    pub is_ca: bool,
}

impl CertSummary {
    /// Whether the certificate is past its end of validity at `now_unix`.
    pub fn is_expired_at(&self, now_unix: i64) -> bool {
        self.not_after < now_unix
    }

    /// `ca`, `node` (it names a node in a `geokv://` URI SAN) or `client`.
    pub fn kind(&self) -> &'static str {
        if self.is_ca {
            "ca"
        } else if self.sans.iter().any(|s| s.starts_with("URI:geokv://")) {
            "node"
        } else {
            "client"
        }
    }
}

/// Where the cluster CA certificate lives in `dir`.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join(CA_CERT_FILE)
}

/// Where the cluster CA key lives in `dir`.
pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join(CA_KEY_FILE)
}

/// Where the certificate of node `node` of `region` lives in `dir`.
pub fn node_cert_path(dir: &Path, region: &str, node: &str) -> PathBuf {
    dir.join(format!("node.{region}.{node}.crt"))
}

/// Where the key of node `node` of `region` lives in `dir`.
pub fn node_key_path(dir: &Path, region: &str, node: &str) -> PathBuf {
    dir.join(format!("node.{region}.{node}.key"))
}

/// Where the certificate of client `user` lives in `dir`.
pub fn client_cert_path(dir: &Path, user: &str) -> PathBuf {
    dir.join(format!("client.{user}.crt"))
}

/// Where the key of client `user` lives in `dir`.
pub fn client_key_path(dir: &Path, user: &str) -> PathBuf {
    dir.join(format!("client.{user}.key"))
}

/// The current time in seconds since the Unix epoch (0 if the clock is set
/// before 1970).
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `unix` as `YYYY-MM-DD HH:MM:SS UTC`, for listings.
pub fn format_utc(unix: i64) -> String {
    match ASN1Time::from_timestamp(unix) {
        Ok(t) => {
            let d = t.to_datetime();
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                d.year(),
                d.month() as u8,
                d.day(),
                d.hour(),
                d.minute(),
                d.second()
            )
        }
        Err(_) => format!("@{unix}"),
    }
}

/// Creates the cluster CA (`ca.crt`, `ca.key`) in `dir`, creating `dir`
/// (mode 0700) if needed. `days` defaults to [`DEFAULT_CA_DAYS`]. Returns the
/// certificate's path; the key is at [`ca_key_path`].
pub fn create_ca(
    dir: &Path,
    cluster: &str,
    days: Option<u32>,
    overwrite: bool,
) -> Result<PathBuf, CertError> {
    check_name("cluster", cluster)?;
    let days = check_days(days, DEFAULT_CA_DAYS)?;
    let (cert_path, key_path) = (ca_cert_path(dir), ca_key_path(dir));
    if !overwrite {
        refuse_existing(&[&cert_path, &key_path])?;
    }
    create_dir(dir)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = subject(&format!("{CA_COMMON_NAME_PREFIX}{cluster}"), cluster);
    // Path length 0: the CA signs nodes and clients directly, never an
    // intermediate, so a leaked node key cannot mint certificates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, days)?;

    let key = new_key()?;
    let cert = params.self_signed(&key).map_err(generate)?;
    write_pair(&cert_path, cert.pem().as_bytes(), &key_path, key.serialize_pem().as_bytes(), overwrite)?;
    Ok(cert_path)
}

/// Issues the certificate of node `node` of `region`, signed by the CA in
/// `dir`, valid for every host in `hosts` (IP addresses become IP SANs,
/// anything else a DNS SAN) and naming the node in the URI SAN
/// `geokv://<cluster>/<region>/<node>`, with the cluster read from the CA.
/// Usable both as a server and as a client certificate, since nodes dial
/// each other. `days` defaults to [`DEFAULT_LEAF_DAYS`]. Returns the
/// certificate's and key's paths.
pub fn create_node(
    dir: &Path,
    region: &str,
    node: &str,
    hosts: &[impl AsRef<str>],
    days: Option<u32>,
    overwrite: bool,
) -> Result<(PathBuf, PathBuf), CertError> {
    check_name("region", region)?;
    check_name("node", node)?;
    let days = check_days(days, DEFAULT_LEAF_DAYS)?;
    let mut sans = Vec::new();
    for host in hosts {
        let san = host_san(host.as_ref())?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    if sans.is_empty() {
        return Err(CertError::NoHosts);
    }
    let (cert_path, key_path) = (node_cert_path(dir, region, node), node_key_path(dir, region, node));
    if !overwrite {
        refuse_existing(&[&cert_path, &key_path])?;
    }
    let ca = load_ca(dir)?;

    let id = NodeIdentity { cluster: ca.cluster.clone(), region: region.to_string(), node: node.to_string() };
    sans.push(SanType::URI(id.uri().try_into().map_err(generate)?));
    let mut params = leaf_params(&format!("{NODE_COMMON_NAME_PREFIX}{region}/{node}"), &ca.cluster, days)?;
    params.subject_alt_names = sans;
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    issue(&ca, &params, &cert_path, &key_path, overwrite)?;
    Ok((cert_path, key_path))
}

/// Issues the client certificate of `user` (common name `<user>`, client
/// authentication only, no URI SAN so it can never pass for a node), signed
/// by the CA in `dir`. `days` defaults to [`DEFAULT_LEAF_DAYS`]. Returns the
/// certificate's and key's paths.
pub fn create_client(
    dir: &Path,
    user: &str,
    days: Option<u32>,
    overwrite: bool,
) -> Result<(PathBuf, PathBuf), CertError> {
    check_name("user", user)?;
    let days = check_days(days, DEFAULT_LEAF_DAYS)?;
    let (cert_path, key_path) = (client_cert_path(dir, user), client_key_path(dir, user));
    if !overwrite {
        refuse_existing(&[&cert_path, &key_path])?;
    }
    let ca = load_ca(dir)?;
    let mut params = leaf_params(user, &ca.cluster, days)?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(&ca, &params, &cert_path, &key_path, overwrite)?;
    Ok((cert_path, key_path))
}

/// Summarizes every certificate in the `*.crt` files directly in `dir`,
/// ordered by file name.
pub fn list(dir: &Path) -> Result<Vec<CertSummary>, CertError> {
    let entries = fs::read_dir(dir).map_err(io_at(dir))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_at(dir))?.path();
        if path.extension().is_some_and(|e| e == "crt") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut out = Vec::new();
    for file in files {
        for der in read_certs(&file)? {
            out.push(summarize(&file, &der)?);
        }
    }
    Ok(out)
}

/// Makes sure `dir` holds a CA for `cluster`, a certificate for every
/// `(region, node)` in `nodes` (valid for `hosts`) and for every user in
/// `users`, creating only what is missing and never overwriting: tests and
/// `geokv dev` call it on every start. An existing CA of another cluster is
/// an error. Returns the files it wrote.
pub fn ensure_dev_certs(
    dir: &Path,
    cluster: &str,
    nodes: &[(&str, &str)],
    hosts: &[&str],
    users: &[&str],
) -> Result<Vec<PathBuf>, CertError> {
    check_name("cluster", cluster)?;
    let mut written = Vec::new();
    if ca_cert_path(dir).exists() || ca_key_path(dir).exists() {
        let ca = load_ca(dir)?;
        if ca.cluster != cluster {
            return Err(CertError::ClusterMismatch {
                path: ca_cert_path(dir),
                expected: cluster.to_string(),
                found: ca.cluster,
            });
        }
    } else {
        written.push(create_ca(dir, cluster, None, false)?);
        written.push(ca_key_path(dir));
    }
    for (region, node) in nodes {
        if !(node_cert_path(dir, region, node).exists() && node_key_path(dir, region, node).exists()) {
            let (cert, key) = create_node(dir, region, node, hosts, None, false)?;
            written.extend([cert, key]);
        }
    }
    for user in users {
        if !(client_cert_path(dir, user).exists() && client_key_path(dir, user).exists()) {
            let (cert, key) = create_client(dir, user, None, false)?;
            written.extend([cert, key]);
        }
    }
    Ok(written)
}

/// A loaded cluster CA, ready to sign.
struct LoadedCa {
    cluster: String,
    cert_path: PathBuf,
    /// The raw DER of the CA's subject, which every issued certificate's
    /// issuer field must repeat byte for byte for chain building to find it.
    subject_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn load_ca(dir: &Path) -> Result<LoadedCa, CertError> {
    let (cert_path, key_path) = (ca_cert_path(dir), ca_key_path(dir));
    if !cert_path.exists() && !key_path.exists() {
        return Err(CertError::NoCa { dir: dir.to_path_buf() });
    }
    let der = read_certs(&cert_path)?
        .into_iter()
        .next()
        .ok_or_else(|| bad_cert(&cert_path, "no certificate in the file"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad_cert(&cert_path, e))?;
    let cluster =
        identity::cluster_of_ca(&der).ok_or_else(|| CertError::NotGeokvCa { path: cert_path.clone() })?;

    let key_pem = fs::read_to_string(&key_path).map_err(io_at(&key_path))?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| CertError::BadKey { path: key_path.clone(), reason: e.to_string() })?;
    if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
        return Err(CertError::KeyMismatch { cert: cert_path, key: key_path });
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = issuer_name(&cert).map_err(|reason| bad_cert(&cert_path, reason))?;
    params.key_identifier_method = key_id_method(&cert);
    params.key_usages = ca_key_usages(&cert).map_err(|reason| bad_cert(&cert_path, reason))?;
    Ok(LoadedCa {
        cluster,
        subject_der: cert.subject().as_raw().to_vec(),
        cert_path,
        issuer: Issuer::new(params, key),
    })
}

/// The CA's subject rebuilt for rcgen, attribute by attribute with the same
/// string types, so the issuer name written into new certificates encodes
/// exactly as the CA's subject (checked again after signing).
fn issuer_name(cert: &X509Certificate<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for rdn in cert.subject().iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("subject has a multi-valued or empty name component".into());
        };
        let oid: Vec<u64> = attr.attr_type().iter().ok_or("subject attribute type out of range")?.collect();
        let text = attr.as_str().map_err(|e| format!("subject attribute is not a string: {e}"))?;
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_string()),
            Tag::PrintableString => DnValue::PrintableString(text.try_into().map_err(|e| format!("{e}"))?),
            Tag::Ia5String => DnValue::Ia5String(text.try_into().map_err(|e| format!("{e}"))?),
            other => return Err(format!("subject attribute of unsupported string type {other:?}")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

/// The CA's own subject key identifier, so the authority key identifier of
/// issued certificates matches it whatever method computed it.
fn key_id_method(cert: &X509Certificate<'_>) -> KeyIdMethod {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(KeyIdMethod::PreSpecified(id.0.to_vec())),
            _ => None,
        })
        .unwrap_or(KeyIdMethod::Sha256)
}

fn ca_key_usages(cert: &X509Certificate<'_>) -> Result<Vec<KeyUsagePurpose>, String> {
    let usage = cert.key_usage().map_err(|e| format!("key usage: {e}"))?;
    let Some(usage) = usage else {
        return Ok(Vec::new());
    };
    if !usage.value.key_cert_sign() {
        return Err("the CA's key usage does not allow signing certificates".into());
    }
    let mut out = vec![KeyUsagePurpose::KeyCertSign];
    if usage.value.crl_sign() {
        out.push(KeyUsagePurpose::CrlSign);
    }
    Ok(out)
}

fn leaf_params(common_name: &str, cluster: &str, days: u32) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(common_name, cluster);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, days)?;
    Ok(params)
}

/// Signs `params` with the CA and writes the certificate and a new key.
fn issue(
    ca: &LoadedCa,
    params: &CertificateParams,
    cert_path: &Path,
    key_path: &Path,
    overwrite: bool,
) -> Result<(), CertError> {
    let key = new_key()?;
    let cert = params.signed_by(&key, &ca.issuer).map_err(generate)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).map_err(|e| generate(e.to_string()))?;
    if parsed.issuer().as_raw() != ca.subject_der.as_slice() {
        return Err(bad_cert(&ca.cert_path, "its subject cannot be repeated exactly as an issuer name"));
    }
    write_pair(cert_path, cert.pem().as_bytes(), key_path, key.serialize_pem().as_bytes(), overwrite)
}

fn subject(common_name: &str, cluster: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::OrganizationalUnitName, cluster);
    dn
}

fn new_key() -> Result<KeyPair, CertError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)
}

fn set_validity(params: &mut CertificateParams, days: u32) -> Result<(), CertError> {
    let now = unix_now();
    let at = |unix: i64| ASN1Time::from_timestamp(unix).map(|t| t.to_datetime()).map_err(generate);
    params.not_before = at(now - BACKDATE_SECS)?;
    params.not_after = at(now + i64::from(days) * SECS_PER_DAY)?;
    Ok(())
}

fn check_name(kind: &'static str, name: &str) -> Result<(), CertError> {
    if identity::is_valid_name(name) {
        Ok(())
    } else {
        Err(CertError::InvalidName { kind, name: name.to_string() })
    }
}

fn check_days(days: Option<u32>, default: u32) -> Result<u32, CertError> {
    match days.unwrap_or(default) {
        d @ 1..=MAX_DAYS => Ok(d),
        d => Err(CertError::InvalidDays { days: d }),
    }
}

/// An IP SAN for an address (bracketed IPv6 accepted, as in URLs), else a
/// DNS SAN for a syntactically valid DNS name, lower-cased.
fn host_san(host: &str) -> Result<SanType, CertError> {
    let invalid = || CertError::InvalidHost { host: host.to_string() };
    let trimmed = host.trim();
    let bare = trimmed.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(trimmed);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let name = trimmed.to_ascii_lowercase();
    rustls_pki_types::DnsName::try_from(name.as_str()).map_err(|_| invalid())?;
    Ok(SanType::DnsName(name.try_into().map_err(|_| invalid())?))
}

fn refuse_existing(paths: &[&Path]) -> Result<(), CertError> {
    for path in paths {
        // symlink_metadata: a dangling link is still something not to clobber.
        if fs::symlink_metadata(path).is_ok() {
            return Err(CertError::Exists { path: path.to_path_buf() });
        }
    }
    Ok(())
}

/// Creates `dir` and its parents; the directory holds private keys, so on
/// Unix a new one is readable by its owner only.
fn create_dir(dir: &Path) -> Result<(), CertError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_at(dir))
}

/// Writes a key and its certificate: the key first, so a certificate on disk
/// always has its key; if the certificate cannot be written, a key created
/// here is removed again.
fn write_pair(
    cert_path: &Path,
    cert: &[u8],
    key_path: &Path,
    key: &[u8],
    overwrite: bool,
) -> Result<(), CertError> {
    write_file(key_path, key, true, overwrite)?;
    if let Err(e) = write_file(cert_path, cert, false, overwrite) {
        if !overwrite {
            let _ = fs::remove_file(key_path);
        }
        return Err(e);
    }
    Ok(())
}

/// Writes `contents` to `path`, a secret (mode 0600) or not (0644).
///
/// Without `overwrite` the file is created exclusively, so an existing file
/// is never touched even if it appeared after the earlier check. With
/// `overwrite` the contents go to a fresh temporary file beside `path`,
/// created with the final mode, which then replaces `path` in one rename:
/// an old key file's looser mode is never inherited, and a reader never
/// sees a half-written file.
fn write_file(path: &Path, contents: &[u8], secret: bool, overwrite: bool) -> Result<(), CertError> {
    let target = if overwrite {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
    } else {
        path.to_path_buf()
    };
    if overwrite {
        let _ = fs::remove_file(&target);
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = match options.open(&target) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !overwrite => {
            return Err(CertError::Exists { path: path.to_path_buf() });
        }
        Err(e) => return Err(CertError::Io { path: target, source: e }),
    };
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&target);
        return Err(CertError::Io { path: target, source: e });
    }
    if overwrite {
        if let Err(e) = fs::rename(&target, path) {
            let _ = fs::remove_file(&target);
            return Err(CertError::Io { path: path.to_path_buf(), source: e });
        }
    }
    Ok(())
}

/// The DER of every `CERTIFICATE` block in a PEM file.
fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, CertError> {
    let bytes = fs::read(path).map_err(io_at(path))?;
    let mut out = Vec::new();
    for pem in Pem::iter_from_buffer(&bytes) {
        let pem: Pem = pem.map_err(|e| bad_cert(path, format!("bad PEM: {e}")))?;
        if pem.label == "CERTIFICATE" {
            out.push(pem.contents);
        }
    }
    if out.is_empty() {
        return Err(bad_cert(path, "no PEM CERTIFICATE block"));
    }
    Ok(out)
}

fn summarize(file: &Path, der: &[u8]) -> Result<CertSummary, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad_cert(file, e))?;
    let mut sans = Vec::new();
    if let Some(ext) = cert.subject_alternative_name().map_err(|e| bad_cert(file, e))? {
        for name in &ext.value.general_names {
            sans.push(match name {
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                GeneralName::URI(u) => format!("URI:{u}"),
                GeneralName::IPAddress(bytes) => format!("IP:{}", ip_text(bytes)),
                GeneralName::RFC822Name(m) => format!("email:{m}"),
                other => format!("{other}"),
            });
        }
    }
    Ok(CertSummary {
        file: file.to_path_buf(),
        subject: cert.subject().to_string(),
        cluster: identity::cluster_of(der),
        sans,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca: cert.is_ca(),
    })
}

fn ip_text(bytes: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        IpAddr::from(v4).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        IpAddr::from(v6).to_string()
    } else {
        format!("{bytes:02x?}")
    }
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io { path: path.to_path_buf(), source }
}

fn bad_cert(path: &Path, reason: impl ToString) -> CertError {
    CertError::BadCertificate { path: path.to_path_buf(), reason: reason.to_string() }
}

fn generate(e: impl ToString) -> CertError {
    CertError::Generate(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    fn der_of(path: &Path) -> Vec<u8> {
        read_certs(path).expect("read").remove(0)
    }

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        create_ca(&dir, "prod", None, false).expect("ca");
        (tmp, dir)
    }

    #[test]
    fn ca_node_and_client_round_trip() {
        let (_tmp, dir) = setup();
        let ca = der_of(&ca_cert_path(&dir));
        assert_eq!(identity::cluster_of_ca(&ca), Some("prod".into()));
        let ca_id = identity::parse(&ca).expect("ca identity");
        assert_eq!(ca_id.common_name, "geokv CA prod");
        assert_eq!(ca_id.node, None);

        let (crt, key) =
            create_node(&dir, "us-east-1", "n1", &["127.0.0.1", "localhost"], None, false).expect("node");
        assert_eq!(crt, dir.join("node.us-east-1.n1.crt"));
        assert_eq!(key, dir.join("node.us-east-1.n1.key"));
        let node = identity::parse(&der_of(&crt)).expect("node identity");
        assert_eq!(node.common_name, "node us-east-1/n1");
        let id = node.node.expect("node id");
        assert_eq!((id.cluster.as_str(), id.region.as_str(), id.node.as_str()), ("prod", "us-east-1", "n1"));
        assert_eq!(id.actor(), "us-east-1/n1");
        let year = unix_now() + 365 * SECS_PER_DAY;
        assert!((node.not_after_unix - year).abs() < 120, "one year by default");

        let (crt, key) = create_client(&dir, "alice", Some(30), false).expect("client");
        assert_eq!(crt, dir.join("client.alice.crt"));
        assert_eq!(key, dir.join("client.alice.key"));
        let client = identity::parse(&der_of(&crt)).expect("client identity");
        assert_eq!(client.common_name, "alice");
        assert_eq!(client.node, None);
        assert!((client.not_after_unix - (unix_now() + 30 * SECS_PER_DAY)).abs() < 120);
        assert_eq!(identity::cluster_of(&der_of(&crt)), Some("prod".into()));
    }

    #[test]
    fn list_shows_every_certificate() {
        let (_tmp, dir) = setup();
        create_node(&dir, "eu-west-1", "n2", &["127.0.0.1", "localhost", "::1"], None, false).expect("node");
        create_client(&dir, "bob", None, false).expect("client");
        let all = list(&dir).expect("list");
        let files: Vec<_> = all
            .iter()
            .map(|s| s.file.file_name().unwrap_or_default().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, ["ca.crt", "client.bob.crt", "node.eu-west-1.n2.crt"]);

        let ca = &all[0];
        assert!(ca.is_ca);
        assert_eq!(ca.kind(), "ca");
        assert_eq!(ca.cluster.as_deref(), Some("prod"));
        assert!(ca.subject.contains("CN=geokv CA prod"), "{}", ca.subject);
        assert!((ca.not_after - (unix_now() + 3650 * SECS_PER_DAY)).abs() < 120, "ten years by default");
        assert!(ca.not_before <= unix_now() - BACKDATE_SECS + 60);

        let client = &all[1];
        assert!(!client.is_ca);
        assert_eq!(client.kind(), "client");
        assert!(client.sans.is_empty());
        assert_eq!(client.cluster.as_deref(), Some("prod"));

        let node = &all[2];
        assert_eq!(node.kind(), "node");
        assert_eq!(node.cluster.as_deref(), Some("prod"));
        assert_eq!(
            node.sans,
            ["IP:127.0.0.1", "DNS:localhost", "IP:::1", "URI:geokv://prod/eu-west-1/n2"].map(String::from)
        );
        assert!(!node.is_expired_at(unix_now()));
        assert!(node.is_expired_at(node.not_after + 1));
    }

    /// The certificates must be accepted by the verifiers the transport
    /// uses: a node as a server (by IP and by DNS name) and as a client, a
    /// client only as a client.
    #[test]
    fn rustls_accepts_the_chain() {
        let (_tmp, dir) = setup();
        let (node, _) = create_node(&dir, "r", "n", &["127.0.0.1", "localhost"], None, false).expect("node");
        let (client, _) = create_client(&dir, "alice", None, false).expect("client");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(der_of(&ca_cert_path(&dir)))).expect("root");
        let roots = Arc::new(roots);
        let servers =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .expect("server verifier");
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .expect("client verifier");
        let node = CertificateDer::from(der_of(&node));
        let client = CertificateDer::from(der_of(&client));
        let now = UnixTime::now();
        for name in ["localhost", "127.0.0.1"] {
            let name = ServerName::try_from(name).expect("name");
            servers.verify_server_cert(&node, &[], &name, &[], now).expect("node as server");
        }
        let other = ServerName::try_from("example.com").expect("name");
        assert!(servers.verify_server_cert(&node, &[], &other, &[], now).is_err());
        clients.verify_client_cert(&node, &[], now).expect("node as client");
        clients.verify_client_cert(&client, &[], now).expect("client as client");
        let localhost = ServerName::try_from("localhost").expect("name");
        assert!(servers.verify_server_cert(&client, &[], &localhost, &[], now).is_err(), "client as server");
    }

    #[test]
    fn nothing_is_overwritten_unless_asked() {
        let (_tmp, dir) = setup();
        let ca_before = fs::read(ca_cert_path(&dir)).expect("read");
        match create_ca(&dir, "prod", None, false) {
            Err(CertError::Exists { path }) => assert_eq!(path, ca_cert_path(&dir)),
            other => panic!("expected Exists, got {other:?}"),
        }
        assert_eq!(fs::read(ca_cert_path(&dir)).expect("read"), ca_before);

        let (crt, key) = create_client(&dir, "alice", None, false).expect("client");
        let before = fs::read(&crt).expect("read");
        assert!(matches!(create_client(&dir, "alice", None, false), Err(CertError::Exists { .. })));
        // A lone key file is enough to refuse, naming that file.
        fs::remove_file(&crt).expect("rm");
        match create_client(&dir, "alice", None, false) {
            Err(CertError::Exists { path }) => assert_eq!(path, key),
            other => panic!("expected Exists, got {other:?}"),
        }
        create_client(&dir, "alice", None, true).expect("overwrite");
        assert_ne!(fs::read(&crt).expect("read"), before);

        create_node(&dir, "r", "n", &["localhost"], None, false).expect("node");
        assert!(matches!(
            create_node(&dir, "r", "n", &["localhost"], None, false),
            Err(CertError::Exists { .. })
        ));
        create_node(&dir, "r", "n", &["localhost"], None, true).expect("overwrite node");

        create_ca(&dir, "prod", None, true).expect("overwrite ca");
        assert_ne!(fs::read(ca_cert_path(&dir)).expect("read"), ca_before);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, dir) = setup();
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&ca_key_path(&dir)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let (crt, key) = create_node(&dir, "r", "n", &["localhost"], None, false).expect("node");
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&crt) & 0o600, 0o600);
        // Overwriting never inherits a looser mode from the old file.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        create_node(&dir, "r", "n", &["localhost"], None, true).expect("overwrite");
        assert_eq!(mode(&key), 0o600);
        let (_, key) = create_client(&dir, "alice", None, false).expect("client");
        assert_eq!(mode(&key), 0o600);
    }

    #[test]
    fn bad_input_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        for bad in ["", "Prod", "a.b", "a/b", "a b", "x".repeat(65).as_str()] {
            assert!(
                matches!(
                    create_ca(dir, bad, None, false),
                    Err(CertError::InvalidName { kind: "cluster", .. })
                ),
                "{bad:?}"
            );
        }
        assert!(!ca_cert_path(dir).exists());
        assert!(matches!(create_ca(dir, "c", Some(0), false), Err(CertError::InvalidDays { days: 0 })));
        assert!(matches!(create_client(dir, "alice", None, false), Err(CertError::NoCa { .. })));

        create_ca(dir, "c", None, false).expect("ca");
        let hosts = ["localhost"];
        assert!(matches!(
            create_node(dir, "us.east", "n", &hosts, None, false),
            Err(CertError::InvalidName { kind: "region", .. })
        ));
        assert!(matches!(
            create_node(dir, "r", "N1", &hosts, None, false),
            Err(CertError::InvalidName { kind: "node", .. })
        ));
        assert!(matches!(
            create_client(dir, "../etc", None, false),
            Err(CertError::InvalidName { kind: "user", .. })
        ));
        assert!(matches!(create_node(dir, "r", "n", &[] as &[&str], None, false), Err(CertError::NoHosts)));
        assert!(matches!(
            create_node(dir, "r", "n", &["not a host"], None, false),
            Err(CertError::InvalidHost { .. })
        ));
        assert!(matches!(
            create_node(dir, "r", "n", &["localhost"], Some(MAX_DAYS + 1), false),
            Err(CertError::InvalidDays { .. })
        ));
        // Bracketed IPv6 as in URLs, duplicates collapsed.
        let (crt, _) = create_node(dir, "r", "n", &["[::1]", "::1", "LocalHost"], None, false).expect("node");
        let summary = list(dir).expect("list").into_iter().find(|s| s.file == crt).expect("listed");
        assert_eq!(summary.sans, ["IP:::1", "DNS:localhost", "URI:geokv://c/r/n"].map(String::from));
    }

    #[test]
    fn a_mismatched_or_foreign_ca_is_refused() {
        let (_tmp, dir) = setup();
        let other = tempfile::tempdir().expect("tempdir");
        create_ca(other.path(), "prod", None, false).expect("other ca");
        fs::copy(ca_key_path(other.path()), ca_key_path(&dir)).expect("copy key");
        assert!(matches!(create_client(&dir, "alice", None, false), Err(CertError::KeyMismatch { .. })));

        // A client certificate in place of the CA is not a geokv CA.
        let (_tmp2, dir2) = setup();
        let (crt, key) = create_client(&dir2, "alice", None, false).expect("client");
        fs::copy(&crt, ca_cert_path(&dir2)).expect("copy");
        fs::copy(&key, ca_key_path(&dir2)).expect("copy");
        assert!(matches!(create_client(&dir2, "bob", None, false), Err(CertError::NotGeokvCa { .. })));

        fs::write(ca_cert_path(&dir2), "junk").expect("write");
        assert!(matches!(create_client(&dir2, "bob", None, false), Err(CertError::BadCertificate { .. })));
    }

    #[test]
    fn dev_certs_are_idempotent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("dev");
        let nodes = [("us-east-1", "n1"), ("eu-west-1", "n1")];
        let hosts = ["127.0.0.1", "localhost"];
        let written = ensure_dev_certs(&dir, "dev", &nodes, &hosts, &["root"]).expect("first");
        assert_eq!(written.len(), 8);
        for path in &written {
            assert!(path.exists(), "{}", path.display());
        }
        let snapshot = |d: &Path| {
            let mut v: Vec<_> = fs::read_dir(d)
                .expect("dir")
                .filter_map(|e| e.ok())
                .map(|e| (e.file_name(), fs::read(e.path()).expect("read")))
                .collect();
            v.sort();
            v
        };
        let before = snapshot(&dir);
        assert!(ensure_dev_certs(&dir, "dev", &nodes, &hosts, &["root"]).expect("second").is_empty());
        assert_eq!(snapshot(&dir), before);

        // Only what is missing is added.
        fs::remove_file(node_cert_path(&dir, "eu-west-1", "n1")).expect("rm");
        fs::remove_file(node_key_path(&dir, "eu-west-1", "n1")).expect("rm");
        let written = ensure_dev_certs(&dir, "dev", &nodes, &hosts, &["root", "alice"]).expect("third");
        assert_eq!(
            written,
            [
                node_cert_path(&dir, "eu-west-1", "n1"),
                node_key_path(&dir, "eu-west-1", "n1"),
                client_cert_path(&dir, "alice"),
                client_key_path(&dir, "alice"),
            ]
        );
        assert_eq!(fs::read(ca_cert_path(&dir)).expect("read"), before[0].1);

        assert!(matches!(
            ensure_dev_certs(&dir, "other", &nodes, &hosts, &[]),
            Err(CertError::ClusterMismatch { .. })
        ));
    }

    #[test]
    fn dates_format_readably() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
