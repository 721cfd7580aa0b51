//! Who a certificate speaks for.
//!
//! A peer's certificate has already been verified against the cluster CA by
//! the TLS layer when it reaches this module; what is left is reading the
//! identity it carries, strictly:
//!
//! - A node is named ONLY by one URI subject alternative name of the form
//!   `geokv://<cluster>/<region>/<node>`. The common name of a node
//!   certificate (`node <region>/<node>`) is for people reading it and never
//!   grants a node identity, so a client certificate whose common name
//!   imitates a node cannot act as one.
//! - A URI SAN with the `geokv` scheme that is not exactly of that form, or
//!   more than one such URI, makes the whole certificate unusable: guessing
//!   which of two identities was meant is how impersonation slips through.
//! - A user is the certificate's single common name.
//! - A cluster CA carries its cluster in its common name, `geokv CA <cluster>`.
//!
//! Names follow the rule of geokv's configuration: 1-64 of `a-z`, `0-9`, `_`
//! and `-`. No name can hold `/`, `:`, `@`, `%`, `?` or `#`, which is what
//! makes the URI form unambiguous without any percent-decoding.

use std::fmt;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::x509::X509Name;

/// The scheme of the URI SAN naming a node.
pub const NODE_URI_SCHEME: &str = "geokv";

/// What a cluster CA's common name starts with; the cluster name follows.
pub const CA_COMMON_NAME_PREFIX: &str = "geokv CA ";

/// What a node certificate's common name starts with; `<region>/<node>`
/// follows. Informational only: identity comes from the URI SAN.
pub const NODE_COMMON_NAME_PREFIX: &str = "node ";

/// The longest name allowed for a cluster, region, node or user.
pub const MAX_NAME_LEN: usize = 64;

/// The naming rule in words, for error messages.
pub const NAME_RULE: &str = "use 1-64 of a-z, 0-9, '_' and '-'";

/// The ASN.1 context tag of a URI in a GeneralName (RFC 5280, 4.2.1.6).
const GENERAL_NAME_URI_TAG: u32 = 6;

/// Whether `s` is a valid cluster, region, node or user name: the same rule
/// as names in geokv's configuration, so every configured node can have a
/// certificate and every certificate name fits in a URI as is.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A node of a cluster, as named by its certificate's URI SAN.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeIdentity {
    pub cluster: String,
    pub region: String,
    pub node: String,
}

impl NodeIdentity {
    /// The name this node acts under in audit records and authorization
    /// decisions: `<region>/<node>`. The cluster is left out because every
    /// peer of a connection belongs to the cluster of the CA that verified it.
    pub fn actor(&self) -> String {
        format!("{}/{}", self.region, self.node)
    }

    /// The URI SAN that names this node: `geokv://<cluster>/<region>/<node>`.
    pub fn uri(&self) -> String {
        format!("{NODE_URI_SCHEME}://{}/{}/{}", self.cluster, self.region, self.node)
    }

    /// Parses a node URI. Anything but exactly
    /// `geokv://<cluster>/<region>/<node>` with three valid names is refused:
    /// no port, user, query, fragment, trailing slash, upper case or
    /// percent-encoding, so that one node has exactly one spelling.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = |reason: &'static str| IdentityError::MalformedNodeUri { uri: uri.to_string(), reason };
        let Some(path) = uri.strip_prefix("geokv://") else {
            return Err(bad("expected geokv://<cluster>/<region>/<node>"));
        };
        let parts: Vec<&str> = path.split('/').collect();
        let [cluster, region, node] = parts.as_slice() else {
            return Err(bad("expected exactly three names: <cluster>/<region>/<node>"));
        };
        if !is_valid_name(cluster) {
            return Err(bad("invalid cluster name (use 1-64 of a-z, 0-9, '_' and '-')"));
        }
        if !is_valid_name(region) {
            return Err(bad("invalid region name (use 1-64 of a-z, 0-9, '_' and '-')"));
        }
        if !is_valid_name(node) {
            return Err(bad("invalid node name (use 1-64 of a-z, 0-9, '_' and '-')"));
        }
        Ok(NodeIdentity { cluster: cluster.to_string(), region: region.to_string(), node: node.to_string() })
    }
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// What a verified certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertIdentity {
    /// The subject's single common name: the user of a client certificate,
    /// `node <region>/<node>` for a node, `geokv CA <cluster>` for a CA.
    pub common_name: String,
    /// Set only when the certificate carries a `geokv://` URI SAN.
    pub node: Option<NodeIdentity>,
    /// The end of the certificate's validity, in seconds since the Unix
    /// epoch, so callers can warn before a peer's certificate runs out.
    pub not_after_unix: i64,
}

impl CertIdentity {
    /// The cluster named by the node URI, if the certificate names a node.
    pub fn cluster(&self) -> Option<&str> {
        self.node.as_ref().map(|n| n.cluster.as_str())
    }
}

/// Why a certificate yields no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("not a DER X.509 certificate: {0}")]
    Malformed(String),
    #[error("the certificate's subject has no common name")]
    MissingCommonName,
    #[error("the certificate's subject has more than one common name")]
    AmbiguousCommonName,
    #[error("the certificate's common name is not a readable string")]
    UnreadableCommonName,
    #[error("the certificate's subject alternative names cannot be read: {0}")]
    BadSubjectAltNames(String),
    #[error("malformed geokv URI SAN {uri:?}: {reason}")]
    MalformedNodeUri { uri: String, reason: &'static str },
    #[error("the certificate carries {0} geokv URI SANs; a node certificate carries exactly one")]
    MultipleNodeUris(usize),
}

/// Reads the identity in a DER certificate (the end-entity certificate a TLS
/// peer presented). See the module documentation for the rules.
pub fn parse(der: &[u8]) -> Result<CertIdentity, IdentityError> {
    let cert = parse_der(der)?;
    let common_name = single_common_name(cert.subject())?;
    let node = node_of(&cert)?;
    Ok(CertIdentity { common_name, node, not_after_unix: cert.validity().not_after.timestamp() })
}

/// The cluster a geokv CA certificate was made for, read from its common
/// name `geokv CA <cluster>`. `None` when `der` is not a CA certificate
/// (basic constraints `CA:true`) or its name is not of that form.
pub fn cluster_of_ca(der: &[u8]) -> Option<String> {
    let cert = parse_der(der).ok()?;
    ca_cluster(&cert)
}

/// The cluster any geokv certificate belongs to: the node URI's cluster for a
/// node, the common name's for a CA, and otherwise the subject's single
/// organizational unit, where geokv puts the cluster of every certificate it
/// issues (client certificates carry no other trace of it). `None` when none
/// of these yields a valid name.
pub fn cluster_of(der: &[u8]) -> Option<String> {
    let cert = parse_der(der).ok()?;
    if let Ok(Some(node)) = node_of(&cert) {
        return Some(node.cluster);
    }
    if let Some(cluster) = ca_cluster(&cert) {
        return Some(cluster);
    }
    let mut units = cert.subject().iter_organizational_unit();
    let unit = units.next()?.as_str().ok()?;
    if units.next().is_some() || !is_valid_name(unit) {
        return None;
    }
    Some(unit.to_string())
}

fn parse_der(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::Malformed(format!("{} bytes after the certificate", rest.len())));
    }
    Ok(cert)
}

fn single_common_name(subject: &X509Name<'_>) -> Result<String, IdentityError> {
    let mut names = subject.iter_common_name();
    let first = names.next().ok_or(IdentityError::MissingCommonName)?;
    if names.next().is_some() {
        return Err(IdentityError::AmbiguousCommonName);
    }
    let name = first.as_str().map_err(|_| IdentityError::UnreadableCommonName)?;
    Ok(name.to_string())
}

fn ca_cluster(cert: &X509Certificate<'_>) -> Option<String> {
    if !cert.is_ca() {
        return None;
    }
    let name = single_common_name(cert.subject()).ok()?;
    let cluster = name.strip_prefix(CA_COMMON_NAME_PREFIX)?;
    is_valid_name(cluster).then(|| cluster.to_string())
}

/// The node named by the certificate's geokv URI SAN, if any. URIs of other
/// schemes are ignored; a URI SAN that cannot be decoded is refused because
/// it might have been a geokv one.
fn node_of(cert: &X509Certificate<'_>) -> Result<Option<NodeIdentity>, IdentityError> {
    let sans =
        cert.subject_alternative_name().map_err(|e| IdentityError::BadSubjectAltNames(e.to_string()))?;
    let Some(sans) = sans else {
        return Ok(None);
    };
    let mut uris = Vec::new();
    for name in &sans.value.general_names {
        match name {
            GeneralName::URI(uri) if has_node_scheme(uri) => uris.push(*uri),
            GeneralName::Invalid(tag, _) if tag.0 == GENERAL_NAME_URI_TAG => {
                return Err(IdentityError::BadSubjectAltNames("a URI SAN is not a valid IA5 string".into()));
            }
            _ => {}
        }
    }
    match uris.as_slice() {
        [] => Ok(None),
        [uri] => NodeIdentity::from_uri(uri).map(Some),
        many => Err(IdentityError::MultipleNodeUris(many.len())),
    }
}

/// URI schemes are case-insensitive (RFC 3986, 3.1), so `GEOKV:` counts as a
/// geokv URI here and is then refused as malformed by the strict parse,
/// instead of slipping past as "some other scheme".
fn has_node_scheme(uri: &str) -> bool {
    uri.split_once(':').is_some_and(|(scheme, _)| scheme.trim().eq_ignore_ascii_case(NODE_URI_SCHEME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType, PKCS_ECDSA_P256_SHA256,
    };

    /// A self-signed certificate with the given common names and URI SANs,
    /// for shapes the issuing code in `certs` never produces.
    fn cert_with(common_names: &[&str], uris: &[&str], ca: bool) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (i, cn) in common_names.iter().enumerate() {
            // rcgen keeps one value per attribute type, so a second common
            // name goes in as a custom-typed attribute with the CN OID.
            let ty = if i == 0 { DnType::CommonName } else { DnType::CustomDnType(vec![2, 5, 4, 3]) };
            params.distinguished_name.push(ty, *cn);
        }
        params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().expect("ia5"))).collect();
        if ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        params.self_signed(&key).expect("sign").der().to_vec()
    }

    #[test]
    fn names_follow_the_config_rule() {
        for ok in ["a", "us-east-1", "n_1", "0", "x".repeat(64).as_str()] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "A", "a.b", "a/b", "a b", "é", "a:b", "x".repeat(65).as_str()] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn node_uri_round_trips_and_is_strict() {
        let id = NodeIdentity::from_uri("geokv://prod/us-east-1/n1").expect("valid");
        assert_eq!(id.cluster, "prod");
        assert_eq!(id.region, "us-east-1");
        assert_eq!(id.node, "n1");
        assert_eq!(id.actor(), "us-east-1/n1");
        assert_eq!(id.uri(), "geokv://prod/us-east-1/n1");
        assert_eq!(id.to_string(), id.uri());
        for bad in [
            "geokv://prod/us-east-1",
            "geokv://prod/us-east-1/n1/",
            "geokv://prod/us-east-1/n1/x",
            "geokv://prod:7700/r/n",
            "geokv://u@prod/r/n",
            "geokv://prod/r/n?x",
            "geokv://prod/r/n#x",
            "geokv://prod/r/N1",
            "geokv://prod/r%2fx/n",
            "geokv:prod/r/n",
            "GEOKV://prod/r/n",
            "geokv:///r/n",
        ] {
            assert!(
                matches!(NodeIdentity::from_uri(bad), Err(IdentityError::MalformedNodeUri { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn node_identity_comes_only_from_the_uri_san() {
        let der = cert_with(&["node r/n"], &["geokv://c/r/n"], false);
        let id = parse(&der).expect("parse");
        assert_eq!(id.common_name, "node r/n");
        assert_eq!(id.node, Some(NodeIdentity { cluster: "c".into(), region: "r".into(), node: "n".into() }));
        assert_eq!(id.cluster(), Some("c"));
        assert!(id.not_after_unix > 0);

        // A common name imitating a node grants nothing.
        let der = cert_with(&["node r/n"], &[], false);
        let id = parse(&der).expect("parse");
        assert_eq!(id.node, None);
        assert_eq!(id.cluster(), None);

        // URIs of other schemes are ignored.
        let der = cert_with(&["alice"], &["https://example.com/x", "spiffe://c/r/n"], false);
        assert_eq!(parse(&der).expect("parse").node, None);
    }

    #[test]
    fn malformed_or_repeated_node_uris_are_refused() {
        let der = cert_with(&["x"], &["geokv://c/r"], false);
        assert!(matches!(parse(&der), Err(IdentityError::MalformedNodeUri { .. })));
        let der = cert_with(&["x"], &["Geokv://c/r/n"], false);
        assert!(matches!(parse(&der), Err(IdentityError::MalformedNodeUri { .. })));
        let der = cert_with(&["x"], &["geokv://c/r/n", "geokv://c/r/m"], false);
        assert_eq!(parse(&der), Err(IdentityError::MultipleNodeUris(2)));
        let der = cert_with(&["x"], &["geokv://c/r/n", "geokv://c/r/n"], false);
        assert_eq!(parse(&der), Err(IdentityError::MultipleNodeUris(2)));
    }

    #[test]
    fn common_name_must_be_single() {
        let der = cert_with(&[], &["geokv://c/r/n"], false);
        assert_eq!(parse(&der), Err(IdentityError::MissingCommonName));
        let der = cert_with(&["alice", "bob"], &[], false);
        assert_eq!(parse(&der), Err(IdentityError::AmbiguousCommonName));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(parse(b"not a certificate"), Err(IdentityError::Malformed(_))));
        let mut der = cert_with(&["alice"], &[], false);
        der.push(0);
        assert!(matches!(parse(&der), Err(IdentityError::Malformed(_))));
        assert_eq!(cluster_of_ca(b"junk"), None);
        assert_eq!(cluster_of(b"junk"), None);
    }

    #[test]
    fn cluster_of_ca_needs_a_ca_and_the_name_form() {
        assert_eq!(cluster_of_ca(&cert_with(&["geokv CA prod"], &[], true)), Some("prod".into()));
        assert_eq!(cluster_of_ca(&cert_with(&["geokv CA prod"], &[], false)), None);
        assert_eq!(cluster_of_ca(&cert_with(&["geokv CA Prod"], &[], true)), None);
        assert_eq!(cluster_of_ca(&cert_with(&["some CA"], &[], true)), None);
        assert_eq!(cluster_of(&cert_with(&["geokv CA prod"], &[], true)), Some("prod".into()));
        assert_eq!(cluster_of(&cert_with(&["n"], &["geokv://c/r/n"], false)), Some("c".into()));
    }
}
