//! Who is calling: the principal of every request on the client port, and
//! the node identity (and forwarded principal) of every request on the
//! peer port. docs/security.md describes the rules; this module applies them.
//!
//! Each port's gRPC server runs an interceptor ([`Security::client_port`],
//! [`Security::peer_port`]) that judges the connection's certificate (once
//! per connection and roots generation, see `geokv_net::incoming`) or the
//! bearer token, and puts a [`Caller`] into the request's extensions.
//! Handlers then authorize the caller's principal ([`Security::authorize`])
//! and record the access in this region's audit log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use geokv_net::identity::{CertIdentity, NodeIdentity};
use geokv_net::incoming::{count_refused, PeerConn};
use geokv_net::tls::Tls;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use super::audit::{AuditLog, AuditRecord};
use super::grants::{Grants, Privilege};
use crate::config::{Config, JwtConfig};
use crate::error::KvError;

/// Metadata naming the principal a forwarded request acts for; accepted
/// only on the peer port, from the node named last in the forwarding hops.
pub const PRINCIPAL_HEADER: &str = "geokv-principal";
/// The header every node adds to a request it forwards (its actor id).
pub const FORWARDED_HEADER: &str = "geokv-forwarded-by";
/// The superuser (holds every grant).
pub const ROOT: &str = "root";
/// How the audit log names a caller refused before it was identified.
pub const UNAUTHENTICATED_PRINCIPAL: &str = "(unauthenticated)";

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// Plaintext, `--insecure`: everyone is `root`.
    Insecure,
    /// A client certificate of the cluster CA.
    Certificate,
    /// A bearer token (static or signed).
    Token,
    /// A node certificate on the peer port.
    Node(NodeIdentity),
    /// Forwarded by a node (authenticated by its certificate) for this principal.
    Forwarded { by: NodeIdentity },
    /// Refused at the door of the client port; the handler returns this
    /// error after recording the attempt in the audit log with its
    /// operation (`Security::client_port_audited`).
    Refused(KvError),
}

/// The authenticated caller of one request (in its extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: String,
    pub proof: Proof,
    /// Region the request entered the cluster at.
    pub entry_region: String,
}

impl Caller {
    /// The caller of a request as its port's interceptor found it. Where
    /// no interceptor ran (a service wired without one) the caller is
    /// nobody, and [`Security::authorize`] refuses it: fail closed.
    pub fn of<T>(request: &Request<T>) -> Caller {
        request.extensions().get::<Caller>().cloned().unwrap_or(Caller {
            principal: String::new(),
            proof: Proof::Insecure,
            entry_region: String::new(),
        })
    }

    /// The node a peer-port request came from, if any.
    pub fn node(&self) -> Option<&NodeIdentity> {
        match &self.proof {
            Proof::Node(n) | Proof::Forwarded { by: n } => Some(n),
            _ => None,
        }
    }
}

/// Signed-token checking.
struct Jwt {
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

/// A node's security: TLS material, tokens, grants and the audit log.
pub struct Security {
    /// None: plaintext and no authentication (`--insecure`, loopback
    /// without certificates, the simulation).
    pub tls: Option<Arc<Tls>>,
    /// The cluster name every node certificate must carry.
    pub cluster: String,
    pub region: String,
    grants: Grants,
    /// (principal, SHA-256 of the token).
    tokens: Vec<(String, [u8; 32])>,
    jwt: Option<Jwt>,
    audit: Option<Arc<AuditLog>>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security").field("tls", &self.tls.is_some()).field("cluster", &self.cluster).finish()
    }
}

/// Whether the put-back bug `bug` is on (never in a normal build).
fn bug(bug: &'static str) -> bool {
    #[cfg(feature = "bugs")]
    {
        let b = match bug {
            "peer-claims-off" => crate::bugs::Bug::PeerClaimsOff,
            _ => crate::bugs::Bug::GrantsOff,
        };
        crate::bugs::active(b)
    }
    #[cfg(not(feature = "bugs"))]
    {
        let _ = bug;
        false
    }
}

/// Whether what a peer-port message claims is checked against its caller's
/// certificate (always, but for the `peer-claims-off` put-back bug).
pub fn claims_checked() -> bool {
    !bug("peer-claims-off")
}

fn refuse(port: &'static str, reason: &'static str, err: KvError) -> Status {
    count_refused(port, reason);
    tracing::debug!(port, reason, error = %err, "request refused");
    err.into()
}

fn unauthenticated(why: impl Into<String>) -> KvError {
    KvError::Unauthenticated { why: why.into() }
}

fn denied(principal: &str, missing: impl Into<String>, why: impl Into<String>) -> KvError {
    KvError::PermissionDenied { principal: principal.into(), missing_grant: missing.into(), why: why.into() }
}

impl Security {
    /// Builds a node's security from its config and (when secure) its TLS
    /// material, whose certificate must name this node's region and id.
    pub fn new(cfg: &Config, tls: Option<Arc<Tls>>, audit: Option<Arc<AuditLog>>) -> anyhow::Result<Self> {
        let mut cluster = String::new();
        if let Some(tls) = &tls {
            let own = tls.own_identity().ok_or_else(|| anyhow::anyhow!("the node has no certificate"))?;
            let node = own.node.ok_or_else(|| {
                anyhow::anyhow!(
                    "certificate {:?} is not a node certificate (it has no geokv:// URI SAN); make one with `geokv cert create-node`",
                    tls.files().cert
                )
            })?;
            if node.region != cfg.region || node.node != cfg.node_id {
                anyhow::bail!(
                    "the node certificate is for `{}` but the config claims region `{}` node `{}`: a node's region comes from its certificate",
                    node.actor(),
                    cfg.region,
                    cfg.node_id
                );
            }
            cluster = node.cluster;
        }
        let mut tokens = Vec::new();
        for t in &cfg.security.tokens {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&t.sha256, &mut hash)
                .map_err(|e| anyhow::anyhow!("security.tokens: sha256 of `{}`: {e}", t.principal))?;
            tokens.push((t.principal.clone(), hash));
        }
        let jwt = cfg.security.jwt.as_ref().map(load_jwt).transpose()?;
        Ok(Self {
            tls,
            cluster,
            region: cfg.region.clone(),
            grants: Grants::new(&cfg.security.grants),
            tokens,
            jwt,
            audit,
        })
    }

    /// Plaintext, everyone `root` (the simulation and `--insecure`).
    pub fn insecure(cfg: &Config) -> Self {
        Self {
            tls: None,
            cluster: String::new(),
            region: cfg.region.clone(),
            grants: Grants::new(&[]),
            tokens: Vec::new(),
            jwt: None,
            audit: None,
        }
    }

    pub fn set_audit(&mut self, audit: Arc<AuditLog>) {
        self.audit = Some(audit);
    }

    pub fn audit(&self) -> Option<&Arc<AuditLog>> {
        self.audit.as_ref()
    }

    pub fn is_secure(&self) -> bool {
        self.tls.is_some()
    }

    fn conn_identity<T>(&self, request: &Request<T>) -> Option<Result<CertIdentity, String>> {
        let tls = self.tls.as_ref()?;
        request.extensions().get::<PeerConn>()?.identity(tls)
    }

    /// Who calls on the client port: a client certificate or a bearer
    /// token, never a forwarding header. A refusal is counted here.
    fn judge_client<T>(&self, request: &Request<T>) -> Result<Caller, KvError> {
        const PORT: &str = "client";
        let refused = |reason: &'static str, err: KvError| {
            count_refused(PORT, reason);
            tracing::debug!(port = PORT, reason, error = %err, "request refused");
            err
        };
        if self.tls.is_none() {
            return Ok(Caller {
                principal: ROOT.into(),
                proof: Proof::Insecure,
                entry_region: self.region.clone(),
            });
        }
        let md = request.metadata();
        if md.get(FORWARDED_HEADER).is_some() || md.get(PRINCIPAL_HEADER).is_some() {
            return Err(refused(
                "forwarding_header_on_client_port",
                denied("-", "node", "forwarding headers are accepted only from nodes on the peer port"),
            ));
        }
        match self.conn_identity(request) {
            Some(Ok(id)) => {
                let principal = match &id.node {
                    Some(n) => format!("node:{}", n.actor()),
                    None => id.common_name.clone(),
                };
                Ok(Caller { principal, proof: Proof::Certificate, entry_region: self.region.clone() })
            }
            Some(Err(why)) => Err(refused("bad_certificate", unauthenticated(why))),
            None => match bearer(request) {
                Some(token) => {
                    let principal = self.check_token(token).map_err(|(reason, e)| refused(reason, e))?;
                    Ok(Caller { principal, proof: Proof::Token, entry_region: self.region.clone() })
                }
                None => Err(refused(
                    "no_credentials",
                    unauthenticated("no client certificate and no bearer token"),
                )),
            },
        }
    }

    /// The client port's interceptor for services that record no audit
    /// entries of their own (reflection): a refusal ends the call here.
    pub fn client_port(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.judge_client(&request)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }

    /// The client port's interceptor for KV, Admin and Control: a refusal
    /// is passed on to the handler, which records the attempt (with its
    /// operation and table) in the audit log before answering with it.
    pub fn client_port_audited(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.judge_client(&request).unwrap_or_else(|err| Caller {
            principal: UNAUTHENTICATED_PRINCIPAL.into(),
            proof: Proof::Refused(err),
            entry_region: self.region.clone(),
        });
        request.extensions_mut().insert(caller);
        Ok(request)
    }

    /// The peer port's interceptor: a node certificate of this cluster;
    /// a forwarded request's principal is taken only from the node that
    /// forwarded it (the last hop must be the certificate's node).
    pub fn peer_port(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        const PORT: &str = "peer";
        if self.tls.is_none() {
            let principal = request
                .metadata()
                .get(PRINCIPAL_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(ROOT)
                .to_string();
            let entry_region = first_hop_region(&request).unwrap_or_else(|| self.region.clone());
            request.extensions_mut().insert(Caller { principal, proof: Proof::Insecure, entry_region });
            return Ok(request);
        }
        let id = match self.conn_identity(&request) {
            Some(Ok(id)) => id,
            Some(Err(why)) => return Err(refuse(PORT, "bad_certificate", unauthenticated(why))),
            None => {
                return Err(refuse(
                    PORT,
                    "no_certificate",
                    unauthenticated("the peer port needs a node certificate of the cluster CA"),
                ))
            }
        };
        let Some(node) = id.node else {
            return Err(refuse(
                PORT,
                "not_a_node_certificate",
                denied(
                    &id.common_name,
                    "node",
                    "the peer port serves only nodes; this is a client certificate",
                ),
            ));
        };
        if node.cluster != self.cluster {
            return Err(refuse(
                PORT,
                "other_cluster",
                denied(
                    &node.actor(),
                    "node",
                    format!("node certificate of cluster `{}`, not `{}`", node.cluster, self.cluster),
                ),
            ));
        }
        let hops: Vec<String> = request
            .metadata()
            .get_all(FORWARDED_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        let caller = match hops.last() {
            None => Caller {
                principal: format!("node:{}", node.actor()),
                proof: Proof::Node(node.clone()),
                entry_region: node.region.clone(),
            },
            Some(last) if *last != node.actor() && claims_checked() => {
                return Err(refuse(
                    PORT,
                    "forwarder_mismatch",
                    denied(
                        &node.actor(),
                        "node",
                        format!(
                            "request claims it was forwarded by `{last}` but comes from `{}`",
                            node.actor()
                        ),
                    ),
                ))
            }
            Some(_) => {
                let Some(principal) = request
                    .metadata()
                    .get(PRINCIPAL_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                else {
                    return Err(refuse(
                        PORT,
                        "forwarded_without_principal",
                        unauthenticated("a forwarded request must name its principal"),
                    ));
                };
                let entry_region = first_hop_region(&request).unwrap_or_else(|| node.region.clone());
                Caller { principal, proof: Proof::Forwarded { by: node.clone() }, entry_region }
            }
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }

    /// Checks that a message's claimed source is the node on the other end
    /// of the connection (a replication frame's source, a Raft sender).
    pub fn check_claim(
        &self,
        caller: &Caller,
        region: &str,
        node: Option<&str>,
        what: &str,
    ) -> Result<(), Status> {
        if self.tls.is_none() || !claims_checked() {
            return Ok(());
        }
        let Some(id) = caller.node() else {
            return Err(refuse(
                "peer",
                "not_a_node",
                denied(&caller.principal, "node", format!("{what} may only come from a node")),
            ));
        };
        if id.region != region || node.is_some_and(|n| n != id.node) {
            let claimed = match node {
                Some(n) => format!("{region}/{n}"),
                None => region.to_string(),
            };
            return Err(refuse(
                "peer",
                "claim_mismatch",
                denied(
                    &id.actor(),
                    "node",
                    format!("{what} claims to come from `{claimed}` but the certificate is `{}`", id.actor()),
                ),
            ));
        }
        Ok(())
    }

    fn check_token(&self, token: &str) -> Result<String, (&'static str, KvError)> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare every stored hash without an early exit on the bytes.
        let mut found = None;
        for (principal, stored) in &self.tokens {
            let diff = stored.iter().zip(hash.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(principal.clone());
            }
        }
        if let Some(p) = found {
            return Ok(p);
        }
        let Some(jwt) = &self.jwt else {
            return Err(("bad_token", unauthenticated("the bearer token is not known")));
        };
        match jsonwebtoken::decode::<Claims>(token, &jwt.key, &jwt.validation) {
            Ok(data) if !data.claims.sub.is_empty() && data.claims.sub.len() <= 64 => Ok(data.claims.sub),
            Ok(_) => Err(("bad_token", unauthenticated("the token's `sub` must be 1-64 bytes"))),
            Err(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    Err(("expired_token", unauthenticated("the bearer token has expired")))
                }
                _ => Err(("bad_token", unauthenticated(format!("the bearer token is invalid: {e}")))),
            },
        }
    }

    /// Authorizes `caller` for `privilege` (on `table`, for table-level
    /// privileges); a denial is audited here and counted.
    pub fn authorize(
        &self,
        caller: &Caller,
        operation: &'static str,
        privilege: Option<Privilege>,
        table: Option<&str>,
        key: Option<&[u8]>,
    ) -> Result<Access, KvError> {
        let access = Access {
            audit: self.audit.clone(),
            record: AuditRecord {
                time_ms: 0,
                principal: caller.principal.clone(),
                operation: operation.to_string(),
                table: table.unwrap_or_default().to_string(),
                key_hash: match (&self.audit, key) {
                    (Some(a), Some(k)) => a.key_hash(table.unwrap_or_default(), k),
                    _ => String::new(),
                },
                entry_region: caller.entry_region.clone(),
                serving_region: self.region.clone(),
                allowed: true,
                reason: String::new(),
            },
            done: AtomicBool::new(false),
        };
        if caller.principal.is_empty() {
            count_refused("any", "no_caller");
            return Err(unauthenticated("the request has no authenticated caller"));
        }
        if let Proof::Refused(err) = &caller.proof {
            // Counted by the interceptor; recorded here, with the operation.
            let mut access = access;
            access.record.allowed = false;
            access.record.reason = err.reason().to_string();
            access.finish();
            return Err(err.clone());
        }
        let Some(privilege) = privilege else {
            // Any authenticated caller (status and metadata calls).
            return Ok(access);
        };
        if caller.proof == Proof::Insecure && self.tls.is_none() && caller.principal == ROOT {
            return Ok(access);
        }
        if bug("grants-off") {
            return Ok(access);
        }
        match self.grants.check(&caller.principal, privilege, table) {
            Ok(()) => Ok(access),
            Err(d) => {
                let mut access = access;
                access.record.allowed = false;
                access.record.reason = "PERMISSION_DENIED".into();
                access.finish();
                count_refused("any", "permission_denied");
                Err(denied(
                    &d.principal,
                    d.missing_grant.clone(),
                    format!("`{}` lacks {}", d.principal, d.missing_grant),
                ))
            }
        }
    }
}

/// One authorized access: recorded in the audit log when dropped, unless
/// the request was forwarded (the serving region records it).
pub struct Access {
    audit: Option<Arc<AuditLog>>,
    record: AuditRecord,
    done: AtomicBool,
}

impl Access {
    /// The request leaves for another node, which records it.
    pub fn forwarded(&self) {
        self.done.store(true, Ordering::Relaxed);
    }

    fn finish(&mut self) {
        if self.done.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(audit) = &self.audit {
            let mut record = std::mem::take(&mut self.record);
            record.time_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            audit.append(record);
        }
    }
}

impl Drop for Access {
    fn drop(&mut self) {
        self.finish();
    }
}

fn bearer<T>(request: &Request<T>) -> Option<&str> {
    let v = request.metadata().get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim)
}

fn first_hop_region<T>(request: &Request<T>) -> Option<String> {
    let first = request.metadata().get(FORWARDED_HEADER)?.to_str().ok()?;
    Some(crate::topology::actor_region(first).to_string())
}

fn load_jwt(cfg: &JwtConfig) -> anyhow::Result<Jwt> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let pem = std::fs::read(&cfg.public_key)
        .map_err(|e| anyhow::anyhow!("security.jwt.public_key {}: {e}", cfg.public_key.display()))?;
    let (key, alg) = match cfg.algorithm.as_str() {
        "RS256" => (DecodingKey::from_rsa_pem(&pem), Algorithm::RS256),
        "ES256" => (DecodingKey::from_ec_pem(&pem), Algorithm::ES256),
        "EdDSA" => (DecodingKey::from_ed_pem(&pem), Algorithm::EdDSA),
        other => anyhow::bail!("security.jwt.algorithm `{other}` is not RS256, ES256 or EdDSA"),
    };
    let key =
        key.map_err(|e| anyhow::anyhow!("security.jwt.public_key {}: {e}", cfg.public_key.display()))?;
    let mut validation = Validation::new(alg);
    validation.leeway = cfg.leeway_s;
    validation.set_required_spec_claims(&["exp", "sub"]);
    if let Some(iss) = &cfg.issuer {
        validation.set_issuer(&[iss]);
    }
    match &cfg.audience {
        Some(aud) => validation.set_audience(&[aud]),
        None => validation.validate_aud = false,
    }
    Ok(Jwt { key, validation })
}
