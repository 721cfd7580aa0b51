//! Node and cluster configuration, read from TOML.
//!
//! Every section has defaults, so an empty file (or none) starts a working
//! single-region node. Unknown fields are rejected, and [`Config::validate`]
//! names the offending field, so a typo fails at start-up rather than being
//! silently ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration problem, naming the field as written in the TOML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {why}")]
pub struct ConfigError {
    pub field: String,
    pub why: String,
}

fn bad(field: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), why: why.into() }
}

/// Everything a node needs to start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's name inside its region; with the region it forms the
    /// actor id ("region/node") stamped on every write it accepts.
    pub node_id: String,
    /// The region this node runs in.
    pub region: String,
    /// Directory of the node's RocksDB store.
    pub data_dir: PathBuf,
    /// Client gRPC address: KV, Admin, the user-facing Control calls,
    /// health and reflection (public services only). `host:port`, the host
    /// an IP address or a DNS name (resolved once, when the node binds).
    pub listen: HostPort,
    /// Peer gRPC address: replication, consensus, forwarded requests and
    /// every other node-to-node call, and only those; other nodes reach it
    /// through `regions[].nodes[].addr`.
    pub listen_peer: HostPort,
    /// Admin HTTP address (`/metrics`, `/health`).
    pub admin_listen: HostPort,
    /// Every region of the cluster. Empty means just this node's region.
    pub regions: Vec<RegionConfig>,
    /// Residency zones: named sets of regions a row may be stored in.
    pub zones: Vec<ZoneConfig>,
    /// Cluster-wide map of locality values (country codes) to home regions.
    pub localities: BTreeMap<String, String>,
    /// Tables. Empty means one table named `default`, homed by row with this
    /// node's region as the default home.
    pub tables: Vec<TableConfig>,
    pub limits: Limits,
    pub storage: StorageConfig,
    pub clock: ClockConfig,
    pub replication: ReplicationConfig,
    /// Hash partitions of every table's keys, cluster-wide: a key's
    /// partition is the same in every region, and each region maps
    /// partitions onto its own nodes (see `topology`). Changing it moves
    /// keys between nodes, so every node of a cluster must agree.
    pub partitions: u32,
    pub consensus: ConsensusConfig,
    pub security: SecurityConfig,
    pub lifecycle: LifecycleConfig,
    pub watch: WatchConfig,
    /// Where this node writes backups, per residency zone
    /// (docs/decisions/029-zone-strict-backups.md).
    pub backup: BackupConfig,
}

/// Change feeds (docs/architecture.md section 13).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    /// Changes each node keeps for watchers to resume from; a cursor older
    /// than that gets `CURSOR_COMPACTED`. 0 turns the change feed off
    /// (`Watch` is then refused).
    pub retention_entries: u64,
    /// Longest gap between a watcher's events: a heartbeat with the
    /// resolved time and the cursor.
    pub heartbeat_ms: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self { retention_entries: 100_000, heartbeat_ms: 1000 }
    }
}

/// Data subjects: erasure and export (docs/architecture.md section 13).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleConfig {
    /// The cluster-wide key of the subject hash (64 hex digits, the same
    /// on every node): subjects are indexed and recorded in the erasure
    /// ledger only as HMAC-SHA256 of their id under it, never raw.
    /// Required when a table declares subjects.
    pub subject_key: Option<String>,
    /// Most rows one export may return from one node.
    pub export_rows_max: usize,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self { subject_key: None, export_rows_max: 100_000 }
    }
}

/// Backup destinations: one folder per residency zone. A row of zone Z is
/// written only to Z's folder; a zone with no folder here fails the backup
/// of a node that holds it (`BACKUP_DESTINATION_MISSING`), never falls
/// back to another zone's folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// `{ zone = "eu", dir = "/backups/eu" }`; zone "" is the destination
    /// of unrestricted rows (rows of no zone).
    pub destinations: Vec<BackupDestination>,
    /// Largest backup file; a zone's rows are split into numbered pieces
    /// of at most this many bytes (a single row larger than it gets a
    /// piece of its own).
    pub piece_bytes_max: u64,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self { destinations: Vec::new(), piece_bytes_max: 64 << 20 }
    }
}

/// The backup folder of one residency zone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackupDestination {
    /// A configured zone, or "" for rows of no zone.
    pub zone: String,
    /// An absolute folder path, used by no other zone.
    pub dir: PathBuf,
}

impl BackupConfig {
    /// The folder of `zone`'s backups, if one is configured.
    pub fn dir_of(&self, zone: &str) -> Option<&Path> {
        self.destinations.iter().find(|d| d.zone == zone).map(|d| d.dir.as_path())
    }
}

/// TLS, authentication, authorization and the access audit log
/// (docs/security.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Serve both ports in plaintext with no authentication: every caller
    /// acts as `root`. Refused for non-loopback addresses unless set.
    pub insecure: bool,
    /// Directory holding `ca.crt` and this node's `node.<region>.<node>.crt`
    /// and `.key` (`geokv cert`). Unset: plaintext, allowed on loopback
    /// addresses only.
    pub certs_dir: Option<PathBuf>,
    /// How often the certificate files are checked for changes, in
    /// milliseconds (SIGHUP reloads at once).
    pub reload_check_ms: u64,
    /// Serve the admin HTTP port (`/metrics`, `/health`, the dashboard)
    /// over TLS with the node's certificate; it stays read-only and needs
    /// no client certificate.
    pub admin_tls: bool,
    /// Static bearer tokens, each stored as the SHA-256 (hex) of the token.
    pub tokens: Vec<TokenConfig>,
    /// Signed bearer tokens (JWT) checked against a public key.
    pub jwt: Option<JwtConfig>,
    /// Who may do what; deny by default (`root` holds every grant).
    pub grants: Vec<crate::security::grants::GrantConfig>,
    /// Retention of the access audit log (kept in this region only).
    pub audit: crate::security::audit::AuditRetention,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            insecure: false,
            certs_dir: None,
            reload_check_ms: 1000,
            admin_tls: false,
            tokens: Vec::new(),
            jwt: None,
            grants: Vec::new(),
            audit: crate::security::audit::AuditRetention::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The principal a request with this token acts as.
    pub principal: String,
    /// SHA-256 of the token, 64 hex digits; the token itself is never stored.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// PEM public key that signs the tokens.
    pub public_key: PathBuf,
    /// `RS256`, `ES256` or `EdDSA`.
    pub algorithm: String,
    /// Required `iss`, when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock tolerance on `exp` and `nbf`, in seconds.
    #[serde(default)]
    pub leeway_s: u64,
}

/// Most partitions a cluster may configure.
pub const PARTITIONS_MAX: u32 = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    /// The region's nodes, as this node reaches them (through the WAN or a
    /// fault proxy). This node's own region lists its other nodes; this node
    /// may appear in it or not (it is always a member). Empty for this
    /// node's own region when it runs alone.
    #[serde(default)]
    pub nodes: Vec<PeerConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: String,
    /// gRPC address this node uses to reach the peer (its peer port), as
    /// `host:port`; a DNS name is resolved at every connection attempt, so
    /// a peer that moves to a new IP address is followed.
    pub addr: String,
    /// gRPC address clients use to reach the peer (defaults to `addr`).
    #[serde(default)]
    pub client_addr: Option<String>,
}

/// A `host:port` address: the host an IP address (IPv6 in brackets) or a
/// DNS name. A name is kept as written and resolved where it is used: when
/// a node binds its listening addresses, and at every dial of a peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    host: String,
    port: u16,
}

/// Longest DNS name (RFC 1035), in bytes.
const DNS_NAME_MAX: usize = 253;
/// Longest DNS label, in bytes.
const DNS_LABEL_MAX: usize = 63;

fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= DNS_NAME_MAX
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= DNS_LABEL_MAX
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl HostPort {
    /// The host as written: an IP address (IPv6 without brackets) or a name.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address itself when the host is an IP address (no lookup).
    pub fn ip_addr(&self) -> Option<SocketAddr> {
        self.host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, self.port))
    }

    /// Every address the host stands for now (an IP address stands for
    /// itself); an error when a name resolves to none.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        if let Some(addr) = self.ip_addr() {
            return Ok(vec![addr]);
        }
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((self.host.as_str(), self.port)).await?.collect();
        if addrs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("host name `{}` resolves to no address", self.host),
            ));
        }
        Ok(addrs)
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;

    /// `host:port`, `[ipv6]:port`; an `http://` or `https://` prefix (as
    /// in a gRPC URI) is accepted and dropped.
    fn from_str(text: &str) -> Result<Self, String> {
        let bare = text.strip_prefix("http://").or_else(|| text.strip_prefix("https://")).unwrap_or(text);
        let why = |what: &str| {
            format!("`{text}`: {what}; write host:port (a DNS name or an IP address, IPv6 in brackets)")
        };
        let (host, port) = bare.rsplit_once(':').ok_or_else(|| why("no port"))?;
        let port: u16 = port.parse().map_err(|_| why("the port is not a number 0-65535"))?;
        let host = match host.strip_prefix('[') {
            Some(v6) => {
                let v6 = v6.strip_suffix(']').ok_or_else(|| why("unclosed `[`"))?;
                v6.parse::<std::net::Ipv6Addr>().map_err(|_| why("not an IPv6 address inside `[...]`"))?;
                v6.to_string()
            }
            None if host.contains(':') => return Err(why("an IPv6 address needs brackets")),
            None if host.parse::<IpAddr>().is_ok() => host.to_string(),
            None if valid_dns_name(host) => host.to_ascii_lowercase(),
            None => return Err(why("the host is neither an IP address nor a DNS name")),
        };
        Ok(Self { host, port })
    }
}

impl TryFrom<String> for HostPort {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<HostPort> for String {
    fn from(hp: HostPort) -> String {
        hp.to_string()
    }
}

impl From<SocketAddr> for HostPort {
    fn from(addr: SocketAddr) -> Self {
        Self { host: addr.ip().to_string(), port: addr.port() }
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Cross-region replication.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Ship this node's writes to the other regions.
    pub enabled: bool,
    /// Entries per frame.
    pub batch_entries_max: usize,
    /// Uncompressed bytes per frame.
    pub batch_bytes_max: usize,
    /// Frames sent but not yet acknowledged, per destination.
    pub in_flight_frames_max: usize,
    /// An idle link sends an empty frame this often, so destinations know
    /// how fresh they are, in milliseconds.
    pub heartbeat_ms: u64,
    /// Delay before reconnecting a failed link, in milliseconds (doubles up to 2 s).
    pub reconnect_ms: u64,
    /// A region is unhealthy after this many heartbeats without contact.
    pub unhealthy_after_misses: u32,
    /// Unshipped log entries towards a healthy, unpaused destination node
    /// beyond which writers are slowed down.
    pub backpressure_soft_entries: u64,
    /// Unshipped entries beyond which writes fail fast with
    /// `REPLICATION_BACKPRESSURE`; at most `storage.log_retention_entries`.
    pub backpressure_hard_entries: u64,
    /// Longest delay given to one write between the soft and the hard bound,
    /// in milliseconds (it grows linearly from 0 at the soft bound).
    pub backpressure_delay_ms_max: u64,
    /// Rows sent per frame by Merkle-tree anti-entropy.
    pub repair_batch_rows_max: usize,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_entries_max: 512,
            batch_bytes_max: 1 << 20,
            in_flight_frames_max: 32,
            heartbeat_ms: 100,
            reconnect_ms: 100,
            unhealthy_after_misses: 3,
            backpressure_soft_entries: 100_000,
            backpressure_hard_entries: 400_000,
            backpressure_delay_ms_max: 100,
            repair_batch_rows_max: 256,
        }
    }
}

/// Largest `consensus.snapshot_log_ratio`.
pub const SNAPSHOT_LOG_RATIO_MAX: f64 = 100.0;

/// Largest `consensus.snapshot_chunk_bytes`: a chunk and its header fit
/// in one message of the consensus port (64 MiB).
pub const SNAPSHOT_CHUNK_BYTES_MAX: u64 = 32 << 20;

/// The control plane (home leases, epochs, failover) and the STRONG groups.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsensusConfig {
    /// Raft heartbeat interval, in milliseconds. It is also the deadline of
    /// each AppendEntries, so it must exceed the slowest round trip between
    /// voters (plus fsync time); keep it under a third of the election timeout.
    pub heartbeat_ms: u64,
    /// A follower starts an election after this long without a leader, in
    /// milliseconds (randomised up to `election_timeout_max_ms`).
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// How long a home lease lasts after a renewal, in milliseconds. A home
    /// region stops accepting LOCAL writes `clock.max_offset_ms` before it
    /// ends; another region may take over `clock.max_offset_ms` after it.
    pub lease_ms: u64,
    /// How often the holder renews its leases, in milliseconds.
    pub renew_every_ms: u64,
    /// Cluster setting applied at bootstrap: never move a lapsed home
    /// automatically (manual-only failover). `geokv region auto-failover`
    /// changes it at run time.
    pub manual_only: bool,
    /// After an automatic failover, hand the home back to its own region
    /// once that region has been healthy this long, in milliseconds
    /// (0 = never fail back automatically).
    pub failback_after_ms: u64,
    /// Failover order per home region: the regions that take over its
    /// homes, first healthy one wins (always filtered by the row's zone).
    /// Regions not listed fall back to the cluster's region order.
    pub failover_order: BTreeMap<String, Vec<String>>,
    /// How long a LOCAL write waits for its home to get a lease (at
    /// startup, or during a failover) before failing, in milliseconds.
    pub lease_wait_ms: u64,
    /// Voters per consensus group (odd): the control plane takes the first
    /// regions in config order, a STRONG group its home and the next
    /// regions of the failover order. 3 survives the loss of one region.
    pub voters_max: usize,
    /// A group builds a snapshot of its state machine after at least this
    /// many entries since the last one, then drops its log behind it.
    pub snapshot_every: u64,
    /// No effect: a snapshot copies nothing since decision 035, so it is
    /// taken every `snapshot_every` entries whatever the state's size.
    /// Still read (and checked) so a configuration written for decision
    /// 034's rule starts; the node warns that it is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_log_ratio: Option<f64>,
    /// Entries kept behind the last snapshot, so a follower a little
    /// behind catches up from the log instead of a snapshot.
    pub log_keep: u64,
    /// A snapshot goes to a follower in messages of at most this many
    /// bytes of data (each well under the consensus port's 64 MiB limit).
    pub snapshot_chunk_bytes: u64,
    /// Largest snapshot a member accepts, in bytes (it assembles one in
    /// memory before installing it).
    pub snapshot_bytes_max: u64,
    /// Most STRONG idempotency records a group keeps (the oldest go first;
    /// records also expire after `storage.idempotency_ttl_s`).
    pub strong_idempotency_records_max: u64,
}

impl Default for ConsensusConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 300,
            election_timeout_min_ms: 900,
            election_timeout_max_ms: 1400,
            lease_ms: 3000,
            renew_every_ms: 300,
            manual_only: false,
            failback_after_ms: 10_000,
            failover_order: BTreeMap::new(),
            lease_wait_ms: 4000,
            voters_max: 3,
            snapshot_every: 5000,
            snapshot_log_ratio: None,
            log_keep: 1000,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_bytes_max: 1 << 30,
            strong_idempotency_records_max: 100_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    pub name: String,
    /// Regions rows of this zone may be stored in.
    pub regions: Vec<String>,
}

/// How a table finds the home region of a row.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LocalityMode {
    /// Each row names its home (explicitly, or by a locality value).
    #[default]
    ByRow,
    /// Every row lives in the table's `home_region`.
    ByTable,
    /// Rows are written anywhere and replicated everywhere.
    Global,
}

impl LocalityMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalityMode::ByRow => "by_row",
            LocalityMode::ByTable => "by_table",
            LocalityMode::Global => "global",
        }
    }
}

/// Write levels, as named in configuration and on the command line.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    #[default]
    Local,
    Eventual,
    Quorum,
    Strong,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Local => "local",
            Level::Eventual => "eventual",
            Level::Quorum => "quorum",
            Level::Strong => "strong",
        }
    }
}

/// What happens to concurrent writes of a plain value.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// Keep concurrent values as siblings until a writer resolves them.
    #[default]
    Siblings,
    /// Keep the value with the highest HLC stamp; counted as a conflict.
    Lww,
}

impl ConflictPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::Siblings => "siblings",
            ConflictPolicy::Lww => "lww",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TableConfig {
    /// Lowercase letters, digits, `_` and `-`, 1 to 64 characters.
    pub name: String,
    pub locality: LocalityMode,
    /// For `by_table`: the region every row lives in.
    pub home_region: Option<String>,
    /// For `by_row`: the home of a row written without a locality.
    /// Unset means such a write is refused with `MISSING_LOCALITY`.
    pub default_home_region: Option<String>,
    /// Residency zone every row of the table must stay in. Unset means the
    /// zone that contains the row's home region, if any.
    pub zone: Option<String>,
    /// Table-specific locality values, consulted before the cluster's.
    pub localities: BTreeMap<String, String>,
    /// Level used when a write does not name one.
    pub default_consistency: Level,
    pub conflict: ConflictPolicy,
    /// Default time to live of a put's value, in seconds, from the write's
    /// HLC time; 0 = values never expire unless a put sets its own TTL.
    /// Applies to register values (counters and sets do not expire).
    #[serde(skip_serializing_if = "is_zero")]
    pub ttl_s: u64,
    /// How a row's data subject is found: the key up to the first
    /// occurrence of this separator (`user-42:email` with `:` belongs to
    /// `user-42`); a key without it has no subject. Unset: the table's
    /// rows have no subject (`geokv subject erase` and `export` skip it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_separator: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            locality: LocalityMode::ByRow,
            home_region: None,
            default_home_region: None,
            zone: None,
            localities: BTreeMap::new(),
            default_consistency: Level::Local,
            conflict: ConflictPolicy::Siblings,
            ttl_s: 0,
            subject_separator: None,
        }
    }
}

/// Bounds on what one request may carry, and on what one row may grow to
/// (docs/decisions/015-bounded-rows.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    /// Operations in one Batch request; also members in one set add/remove.
    pub batch_ops_max: usize,
    /// Rows returned by one Scan.
    pub scan_rows_max: usize,
    /// Encoded size of a whole row after a write accepted here (every
    /// sibling, member and version vector), in bytes; a write past it is
    /// refused with `ROW_TOO_LARGE` before anything is stored. At least
    /// `value_bytes_max` + `key_bytes_max` + 4 KiB, so one value always
    /// fits. Replication
    /// frames are sized from it, so every node of a cluster must agree.
    pub row_bytes_max: usize,
    /// Siblings (concurrent values, tombstones included) a register row may
    /// hold after a write accepted here; past it `TOO_MANY_SIBLINGS`.
    pub siblings_max: usize,
    /// Members a set row may hold after an add accepted here; past it
    /// `ROW_TOO_LARGE` (measure `members`).
    pub set_members_max: usize,
    /// Longest TTL a put may ask for (or a table default), in seconds.
    pub ttl_s_max: u64,
}

/// Room a row of one value needs beyond the value and its key (placement,
/// the value's dot and stamp, a version vector), in bytes.
pub const ROW_OVERHEAD_BYTES_MAX: usize = 4 << 10;

/// Largest row bound across a cluster (`limits.row_bytes_max` times the
/// nodes), in bytes: replication frames must hold a merged row of that size.
pub const MERGED_ROW_BYTES_MAX: usize = 1 << 30;

impl Default for Limits {
    fn default() -> Self {
        Self {
            key_bytes_max: 1024,
            value_bytes_max: 1 << 20,
            batch_ops_max: 128,
            scan_rows_max: 1000,
            row_bytes_max: 4 << 20,
            siblings_max: 32,
            set_members_max: 100_000,
            ttl_s_max: 10 * 365 * 86_400,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    #[default]
    Rocksdb,
    /// In-memory, for simulation tests only: loses everything on exit.
    Memory,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub engine: EngineKind,
    /// Acknowledge writes only after the write-ahead log is synced to disk.
    pub sync: bool,
    /// Most writes that share one commit (one WAL sync).
    pub group_commit_writes_max: usize,
    /// Most bytes of values that share one commit.
    pub group_commit_bytes_max: usize,
    /// Writes waiting for the committer before callers are held back.
    pub commit_queue_max: usize,
    /// Prepare the next commit group while the current one syncs (a
    /// preparing and a syncing thread); false prepares and syncs each group
    /// on one thread (docs/decisions/025-commit-cpu.md).
    pub commit_pipeline: bool,
    /// Replication-log entries kept on this node.
    pub log_retention_entries: u64,
    /// How long a reply is remembered for its idempotency key, in seconds.
    pub idempotency_ttl_s: u64,
    /// Memtable size per column family, in MiB.
    pub write_buffer_mib: usize,
    /// RocksDB block cache shared by every column family, in MiB (blocks of
    /// rows, idempotency records and their bloom filters read from disk).
    pub block_cache_mib: usize,
    /// Decoded rows the committer keeps of those it last wrote, in
    /// MiB, so a write to a hot row skips the store's lookup and the decode
    /// (docs/decisions/043-row-cache-and-shared-connections.md); 0, the
    /// default, turns it off: on two cores it saved the committer's CPU
    /// but not the node's, and lengthened the slowest writes.
    pub row_cache_mib: usize,
    /// How often tombstone collection and log trimming run, in ms; 0 turns
    /// both off (docs/architecture.md section 17).
    pub tombstone_gc_interval_ms: u64,
    /// Rows one collection pass reads at most.
    pub tombstone_gc_scan_rows_max: usize,
    /// Deleted rows one collection round considers at most.
    pub tombstone_gc_rows_max: usize,
    /// How long a round waits for every replica before it is started
    /// again, in ms.
    pub tombstone_gc_round_ms_max: u64,
    /// Replication-log entries one pass trims at most.
    pub log_trim_entries_max: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            engine: EngineKind::Rocksdb,
            sync: true,
            group_commit_writes_max: 512,
            group_commit_bytes_max: 16 << 20,
            commit_queue_max: 8192,
            commit_pipeline: true,
            log_retention_entries: 1_000_000,
            idempotency_ttl_s: 3600,
            write_buffer_mib: 64,
            block_cache_mib: 256,
            row_cache_mib: 0,
            tombstone_gc_interval_ms: 1000,
            tombstone_gc_scan_rows_max: 20_000,
            tombstone_gc_rows_max: 10_000,
            tombstone_gc_round_ms_max: 10_000,
            log_trim_entries_max: 20_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClockConfig {
    /// Largest clock difference tolerated between nodes, in milliseconds; a
    /// stamp further ahead is refused.
    pub max_offset_ms: u64,
    /// Test control: the node's wall clock follows the offset (ms) written
    /// in `<data_dir>/clock-offset-ms`, changed at run time, so the chaos
    /// harness can jump clocks live. Never on in production.
    pub offset_control: bool,
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self { max_offset_ms: 500, offset_control: false }
    }
}

pub const DEFAULT_REGION: &str = "local-1";
pub const DEFAULT_TABLE: &str = "default";

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: "n1".into(),
            region: DEFAULT_REGION.into(),
            data_dir: PathBuf::from("./geokv-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)).into(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7701)).into(),
            listen_peer: SocketAddr::from(([127, 0, 0, 1], 7702)).into(),
            regions: Vec::new(),
            zones: Vec::new(),
            localities: BTreeMap::new(),
            tables: Vec::new(),
            limits: Limits::default(),
            storage: StorageConfig::default(),
            clock: ClockConfig::default(),
            replication: ReplicationConfig::default(),
            partitions: 64,
            consensus: ConsensusConfig::default(),
            security: SecurityConfig::default(),
            lifecycle: LifecycleConfig::default(),
            watch: WatchConfig::default(),
            backup: BackupConfig::default(),
        }
    }
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Config {
    /// Parses TOML text. The result still needs [`Config::finish`].
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let span = e.span().map(|s| format!(" (at byte {})", s.start)).unwrap_or_default();
            bad("<file>", format!("{}{}", e.message(), span))
        })
    }

    /// Fills in the implied defaults (the region list, the `default` table)
    /// and validates. Call after applying command-line overrides.
    /// Backup destinations: known zones, each once, absolute folders of
    /// which none holds another (zones must never share files).
    fn validate_backup(&self) -> Result<(), ConfigError> {
        let b = &self.backup;
        if b.piece_bytes_max < 4096 || b.piece_bytes_max > 1 << 40 {
            return Err(bad("backup.piece_bytes_max", "must be 4096..=1099511627776"));
        }
        let mut seen = BTreeSet::new();
        for (i, d) in b.destinations.iter().enumerate() {
            let field = format!("backup.destinations[{i}]");
            if !d.zone.is_empty() && self.zone(&d.zone).is_none() {
                return Err(bad(format!("{field}.zone"), format!("unknown zone `{}`", d.zone)));
            }
            if !seen.insert(d.zone.as_str()) {
                return Err(bad(format!("{field}.zone"), format!("zone `{}` has two destinations", d.zone)));
            }
            if !d.dir.is_absolute() || d.dir.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(bad(format!("{field}.dir"), "must be an absolute path without `..`"));
            }
            for (j, other) in b.destinations.iter().enumerate().take(i) {
                if d.dir.starts_with(&other.dir) || other.dir.starts_with(&d.dir) {
                    return Err(bad(
                        format!("{field}.dir"),
                        format!(
                            "overlaps backup.destinations[{j}].dir ({}): zones `{}` and `{}` would share files",
                            other.dir.display(),
                            d.zone,
                            other.zone
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<Self, ConfigError> {
        if self.regions.is_empty() {
            self.regions.push(RegionConfig { name: self.region.clone(), nodes: Vec::new() });
        }
        if self.tables.is_empty() {
            self.tables.push(TableConfig {
                name: DEFAULT_TABLE.into(),
                default_home_region: Some(self.region.clone()),
                ..TableConfig::default()
            });
        }
        self.validate()?;
        crate::topology::Topology::from_config(&self).check().map_err(|e| bad(e.field, e.why))?;
        Ok(self)
    }

    /// Checks every rule that would otherwise fail later at write time.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !valid_name(&self.node_id, 64) {
            return Err(bad("node_id", "use 1-64 of a-z, 0-9, '_' and '-'"));
        }
        let mut regions = BTreeSet::new();
        for (i, r) in self.regions.iter().enumerate() {
            if !valid_name(&r.name, 64) {
                return Err(bad(format!("regions[{i}].name"), "use 1-64 of a-z, 0-9, '_' and '-'"));
            }
            if !regions.insert(r.name.as_str()) {
                return Err(bad(format!("regions[{i}].name"), format!("region `{}` listed twice", r.name)));
            }
        }
        if !regions.contains(self.region.as_str()) {
            return Err(bad("region", format!("`{}` is not in `regions` {:?}", self.region, regions)));
        }
        let mut zoned = BTreeMap::new();
        let mut zones = BTreeSet::new();
        for (i, z) in self.zones.iter().enumerate() {
            if !valid_name(&z.name, 64) {
                return Err(bad(format!("zones[{i}].name"), "use 1-64 of a-z, 0-9, '_' and '-'"));
            }
            if !zones.insert(z.name.as_str()) {
                return Err(bad(format!("zones[{i}].name"), format!("zone `{}` listed twice", z.name)));
            }
            if z.regions.is_empty() {
                return Err(bad(format!("zones[{i}].regions"), "a zone needs at least one region"));
            }
            for r in &z.regions {
                if !regions.contains(r.as_str()) {
                    return Err(bad(format!("zones[{i}].regions"), format!("unknown region `{r}`")));
                }
                if let Some(other) = zoned.insert(r.as_str(), z.name.as_str()) {
                    return Err(bad(
                        format!("zones[{i}].regions"),
                        format!("region `{r}` is already in zone `{other}`; a region belongs to one zone"),
                    ));
                }
            }
        }
        let check_localities = |field: &str, map: &BTreeMap<String, String>| -> Result<(), ConfigError> {
            for (value, region) in map {
                if value.is_empty() || value.len() > 64 {
                    return Err(bad(field, format!("locality value `{value}` must be 1-64 bytes")));
                }
                if !regions.contains(region.as_str()) {
                    return Err(bad(format!("{field}.{value}"), format!("unknown region `{region}`")));
                }
            }
            Ok(())
        };
        check_localities("localities", &self.localities)?;
        let mut tables = BTreeSet::new();
        for (i, t) in self.tables.iter().enumerate() {
            let f = |name: &str| format!("tables[{i}].{name}");
            if !valid_name(&t.name, 64) {
                return Err(bad(f("name"), "use 1-64 of a-z, 0-9, '_' and '-'"));
            }
            if !tables.insert(t.name.as_str()) {
                return Err(bad(f("name"), format!("table `{}` listed twice", t.name)));
            }
            check_localities(&f("localities"), &t.localities)?;
            for (field, region) in
                [("home_region", &t.home_region), ("default_home_region", &t.default_home_region)]
            {
                if let Some(r) = region {
                    if !regions.contains(r.as_str()) {
                        return Err(bad(f(field), format!("unknown region `{r}`")));
                    }
                }
            }
            if let Some(z) = &t.zone {
                let Some(zone) = self.zones.iter().find(|zone| &zone.name == z) else {
                    return Err(bad(f("zone"), format!("unknown zone `{z}`")));
                };
                let homes = t.home_region.iter().chain(t.default_home_region.iter());
                for home in homes.chain(t.localities.values()) {
                    if !zone.regions.contains(home) {
                        return Err(bad(f("zone"), format!("home region `{home}` is outside zone `{z}`")));
                    }
                }
            }
            match t.locality {
                LocalityMode::ByTable if t.home_region.is_none() => {
                    return Err(bad(f("home_region"), "a table homed `by_table` needs a home region"));
                }
                LocalityMode::ByRow | LocalityMode::Global if t.home_region.is_some() => {
                    return Err(bad(f("home_region"), "only tables homed `by_table` take a home region"));
                }
                _ => {}
            }
        }
        let l = &self.limits;
        for (field, v, lo, hi) in [
            ("limits.key_bytes_max", l.key_bytes_max, 1, 64 << 10),
            ("limits.value_bytes_max", l.value_bytes_max, 1, 64 << 20),
            ("limits.batch_ops_max", l.batch_ops_max, 1, 10_000),
            ("limits.scan_rows_max", l.scan_rows_max, 1, 100_000),
            ("limits.siblings_max", l.siblings_max, 1, 10_000),
            ("limits.set_members_max", l.set_members_max, 1, 10_000_000),
        ] {
            if v < lo || v > hi {
                return Err(bad(field, format!("{v} is outside {lo}..={hi}")));
            }
        }
        if l.ttl_s_max == 0 || l.ttl_s_max > 100 * 365 * 86_400 {
            return Err(bad(
                "limits.ttl_s_max",
                format!("{} is outside 1..=100 years in seconds", l.ttl_s_max),
            ));
        }
        let subjects = self.tables.iter().any(|t| t.subject_separator.is_some());
        match &self.lifecycle.subject_key {
            Some(k) if k.len() != 64 || hex::decode(k).is_err() => {
                return Err(bad("lifecycle.subject_key", "must be 64 hex digits (32 bytes)"));
            }
            None if subjects => {
                return Err(bad(
                    "lifecycle.subject_key",
                    "a table declares subjects (subject_separator): the cluster needs a subject key, \
                     64 hex digits, the same on every node",
                ));
            }
            _ => {}
        }
        if self.watch.retention_entries > 100_000_000 {
            return Err(bad("watch.retention_entries", "must be within 0..=100000000"));
        }
        if !(50..=60_000).contains(&self.watch.heartbeat_ms) {
            return Err(bad("watch.heartbeat_ms", "must be within 50..=60000"));
        }
        if self.lifecycle.export_rows_max == 0 || self.lifecycle.export_rows_max > 10_000_000 {
            return Err(bad("lifecycle.export_rows_max", "must be within 1..=10000000"));
        }
        for (i, t) in self.tables.iter().enumerate() {
            if let Some(sep) = &t.subject_separator {
                if sep.is_empty() || sep.len() > 8 {
                    return Err(bad(format!("tables[{i}].subject_separator"), "must be 1 to 8 bytes"));
                }
                if t.default_consistency == Level::Strong {
                    return Err(bad(
                        format!("tables[{i}].subject_separator"),
                        "STRONG tables do not take subjects yet (their values live in Raft logs and \
                         snapshots, which erasure does not purge)",
                    ));
                }
            }
            if t.ttl_s > l.ttl_s_max {
                return Err(bad(
                    format!("tables[{i}].ttl_s"),
                    format!("{} is above limits.ttl_s_max ({})", t.ttl_s, l.ttl_s_max),
                ));
            }
        }
        let row_min =
            l.value_bytes_max.saturating_add(l.key_bytes_max).saturating_add(ROW_OVERHEAD_BYTES_MAX);
        if l.row_bytes_max < row_min {
            return Err(bad(
                "limits.row_bytes_max",
                format!(
                    "{} is below limits.value_bytes_max + limits.key_bytes_max + {ROW_OVERHEAD_BYTES_MAX} = {row_min}: \
                     a single value would not fit a row",
                    l.row_bytes_max
                ),
            ));
        }
        let merged = l.row_bytes_max.saturating_mul(self.node_count());
        if merged > MERGED_ROW_BYTES_MAX {
            return Err(bad(
                "limits.row_bytes_max",
                format!(
                    "{} bytes times {} nodes is {merged}, over {MERGED_ROW_BYTES_MAX}: a row merged from \
                     every node could not be shipped",
                    l.row_bytes_max,
                    self.node_count()
                ),
            ));
        }
        let s = &self.storage;
        if s.group_commit_writes_max == 0 || s.group_commit_writes_max > 100_000 {
            return Err(bad("storage.group_commit_writes_max", "must be 1..=100000"));
        }
        if s.group_commit_bytes_max < l.value_bytes_max {
            return Err(bad("storage.group_commit_bytes_max", "must be at least limits.value_bytes_max"));
        }
        if s.commit_queue_max == 0 || s.commit_queue_max > 1_000_000 {
            return Err(bad("storage.commit_queue_max", "must be 1..=1000000"));
        }
        if s.log_retention_entries == 0 {
            return Err(bad("storage.log_retention_entries", "must be at least 1"));
        }
        if s.tombstone_gc_scan_rows_max == 0 || s.tombstone_gc_rows_max == 0 || s.log_trim_entries_max == 0 {
            return Err(bad(
                "storage.tombstone_gc_scan_rows_max",
                "tombstone_gc_scan_rows_max, tombstone_gc_rows_max and log_trim_entries_max must be at least 1",
            ));
        }
        if s.write_buffer_mib == 0 || s.write_buffer_mib > 4096 {
            return Err(bad("storage.write_buffer_mib", "must be 1..=4096"));
        }
        if s.block_cache_mib == 0 || s.block_cache_mib > 1 << 20 {
            return Err(bad("storage.block_cache_mib", "must be 1..=1048576"));
        }
        if s.row_cache_mib > 1 << 20 {
            return Err(bad("storage.row_cache_mib", "must be 0..=1048576"));
        }
        let r = &self.replication;
        if r.batch_entries_max == 0 || r.batch_entries_max > 100_000 {
            return Err(bad("replication.batch_entries_max", "must be 1..=100000"));
        }
        if r.batch_bytes_max < 1024 || r.batch_bytes_max > 64 << 20 {
            return Err(bad("replication.batch_bytes_max", "must be 1 KiB..=64 MiB"));
        }
        if r.in_flight_frames_max == 0 || r.in_flight_frames_max > 1024 {
            return Err(bad("replication.in_flight_frames_max", "must be 1..=1024"));
        }
        if r.heartbeat_ms == 0 || r.reconnect_ms == 0 {
            return Err(bad("replication.heartbeat_ms", "heartbeat_ms and reconnect_ms must be at least 1"));
        }
        if r.unhealthy_after_misses == 0 {
            return Err(bad("replication.unhealthy_after_misses", "must be at least 1"));
        }
        if r.backpressure_soft_entries == 0 || r.backpressure_soft_entries >= r.backpressure_hard_entries {
            return Err(bad(
                "replication.backpressure_soft_entries",
                "must be at least 1 and below replication.backpressure_hard_entries",
            ));
        }
        if r.backpressure_hard_entries > s.log_retention_entries {
            return Err(bad(
                "replication.backpressure_hard_entries",
                format!(
                    "{} is above storage.log_retention_entries ({}): entries would be trimmed first",
                    r.backpressure_hard_entries, s.log_retention_entries
                ),
            ));
        }
        if r.backpressure_delay_ms_max > 10_000 {
            return Err(bad("replication.backpressure_delay_ms_max", "must be at most 10000"));
        }
        if r.repair_batch_rows_max == 0 || r.repair_batch_rows_max > 100_000 {
            return Err(bad("replication.repair_batch_rows_max", "must be 1..=100000"));
        }
        let sec = &self.security;
        if sec.reload_check_ms == 0 || sec.reload_check_ms > 3_600_000 {
            return Err(bad("security.reload_check_ms", "must be 1..=3600000"));
        }
        for (i, t) in sec.tokens.iter().enumerate() {
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(
                    format!("security.tokens[{i}].sha256"),
                    "must be 64 hex digits (the token's SHA-256)",
                ));
            }
            if t.principal.is_empty() || t.principal.len() > 64 {
                return Err(bad(format!("security.tokens[{i}].principal"), "must be 1-64 bytes"));
            }
        }
        if let Some(j) = &sec.jwt {
            if !matches!(j.algorithm.as_str(), "RS256" | "ES256" | "EdDSA") {
                return Err(bad("security.jwt.algorithm", "must be RS256, ES256 or EdDSA"));
            }
        }
        let table_names: Vec<&str> = self.tables.iter().map(|t| t.name.as_str()).collect();
        crate::security::grants::validate(&sec.grants, &table_names)
            .map_err(|(field, why)| bad(format!("security.{field}"), why))?;
        // Both bounds stay on: a log without one would grow without limit.
        if sec.audit.age_s == 0 || sec.audit.bytes_max < 1 << 20 {
            return Err(bad(
                "security.audit",
                "age_s must be at least 1 and bytes_max at least 1 MiB (1048576)",
            ));
        }
        if self.partitions == 0 || self.partitions > PARTITIONS_MAX {
            return Err(bad("partitions", format!("must be 1..={PARTITIONS_MAX}")));
        }
        let c = &self.consensus;
        if c.heartbeat_ms == 0 || c.heartbeat_ms * 3 > c.election_timeout_min_ms {
            return Err(bad(
                "consensus.heartbeat_ms",
                "must be at least 1 and at most a third of election_timeout_min_ms",
            ));
        }
        if c.election_timeout_max_ms <= c.election_timeout_min_ms {
            return Err(bad(
                "consensus.election_timeout_max_ms",
                "must be greater than election_timeout_min_ms",
            ));
        }
        if c.lease_ms <= 2 * self.clock.max_offset_ms
            || c.renew_every_ms == 0
            || c.renew_every_ms * 2 > c.lease_ms
        {
            return Err(bad(
                "consensus.lease_ms",
                "must exceed twice clock.max_offset_ms and twice renew_every_ms (renew_every_ms at least 1)",
            ));
        }
        self.validate_backup()?;
        if c.voters_max == 0 || c.voters_max.is_multiple_of(2) || c.voters_max > 7 {
            return Err(bad("consensus.voters_max", "must be odd, 1 to 7"));
        }
        if c.strong_idempotency_records_max == 0 {
            return Err(bad("consensus.strong_idempotency_records_max", "must be at least 1"));
        }
        if c.snapshot_every == 0 {
            return Err(bad("consensus.snapshot_every", "must be at least 1"));
        }
        if c.snapshot_log_ratio.is_some_and(|r| !(0.0..=SNAPSHOT_LOG_RATIO_MAX).contains(&r)) {
            return Err(bad(
                "consensus.snapshot_log_ratio",
                format!("must be 0 to {SNAPSHOT_LOG_RATIO_MAX}"),
            ));
        }
        if c.snapshot_chunk_bytes == 0 || c.snapshot_chunk_bytes > SNAPSHOT_CHUNK_BYTES_MAX {
            return Err(bad(
                "consensus.snapshot_chunk_bytes",
                format!("must be 1 to {SNAPSHOT_CHUNK_BYTES_MAX} (the consensus port takes messages up to 64 MiB)"),
            ));
        }
        if c.snapshot_bytes_max < c.snapshot_chunk_bytes {
            return Err(bad("consensus.snapshot_bytes_max", "must be at least snapshot_chunk_bytes"));
        }
        for (home, order) in &c.failover_order {
            for r in std::iter::once(home).chain(order) {
                if !self.regions.iter().any(|x| &x.name == r) {
                    return Err(bad(
                        format!("consensus.failover_order.{home}"),
                        format!("unknown region `{r}`"),
                    ));
                }
            }
        }
        for (i, region) in self.regions.iter().enumerate() {
            let mut ids = BTreeSet::new();
            for (j, node) in region.nodes.iter().enumerate() {
                if !ids.insert(node.id.as_str()) {
                    return Err(bad(
                        format!("regions[{i}].nodes[{j}].id"),
                        format!("node `{}` listed twice in region `{}`", node.id, region.name),
                    ));
                }
                if !valid_name(&node.id, 64) {
                    return Err(bad(
                        format!("regions[{i}].nodes[{j}].id"),
                        "use 1-64 of a-z, 0-9, '_' and '-'",
                    ));
                }
                if node.addr.is_empty() {
                    return Err(bad(format!("regions[{i}].nodes[{j}].addr"), "a peer needs an address"));
                }
                for (field, addr) in [("addr", Some(&node.addr)), ("client_addr", node.client_addr.as_ref())]
                {
                    if let Some(Err(why)) = addr.map(|a| a.parse::<HostPort>()) {
                        return Err(bad(format!("regions[{i}].nodes[{j}].{field}"), why));
                    }
                }
            }
        }
        if self.clock.max_offset_ms == 0 {
            return Err(bad("clock.max_offset_ms", "must be at least 1"));
        }
        Ok(())
    }

    /// The table named `name`.
    pub fn table(&self, name: &str) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.name == name)
    }

    pub fn region_names(&self) -> Vec<String> {
        self.regions.iter().map(|r| r.name.clone()).collect()
    }

    pub fn zone(&self, name: &str) -> Option<&ZoneConfig> {
        self.zones.iter().find(|z| z.name == name)
    }

    /// The zone containing `region`, if any.
    pub fn zone_of(&self, region: &str) -> Option<&ZoneConfig> {
        self.zones.iter().find(|z| z.regions.iter().any(|r| r == region))
    }

    /// Nodes of the cluster: each region's listed nodes, this node counted
    /// in its own region even when not listed, and at least one per region.
    /// Every node is a writer with its own actor id, so a row merged from
    /// all of them holds at most this many writers' accepted states.
    pub fn node_count(&self) -> usize {
        self.regions
            .iter()
            .map(|r| {
                let listed = r.nodes.len();
                let me_unlisted = r.name == self.region && !r.nodes.iter().any(|n| n.id == self.node_id);
                (listed + usize::from(me_unlisted)).max(1)
            })
            .sum::<usize>()
            .max(1)
    }

    /// Regions other than this node's that have a reachable node configured.
    /// Their nodes are listed in `nodes`; see `topology` for who owns what.
    pub fn peer_regions(&self) -> Vec<&RegionConfig> {
        self.regions.iter().filter(|r| r.name != self.region && !r.nodes.is_empty()).collect()
    }

    /// The regions a row of `zone` may be stored in ("" = every region).
    pub fn zone_regions(&self, zone: &str) -> Vec<String> {
        match self.zone(zone) {
            Some(z) => z.regions.clone(),
            None => self.region_names(),
        }
    }

    /// The regions that take over `home`'s rows of `zone`, in order: the
    /// configured failover order, then the cluster's region order, each
    /// filtered to the zone; `home` itself comes first.
    pub fn failover_order(&self, home: &str, zone: &str) -> Vec<String> {
        let allowed = self.zone_regions(zone);
        let mut out = vec![home.to_string()];
        let configured = self.consensus.failover_order.get(home).cloned().unwrap_or_default();
        let start = self.regions.iter().position(|r| r.name == home).unwrap_or(0);
        let mut rotated: Vec<String> = self.region_names();
        let len = rotated.len();
        rotated.rotate_left(start.min(len));
        for r in configured.into_iter().chain(rotated) {
            if allowed.contains(&r) && !out.contains(&r) {
                out.push(r);
            }
        }
        out
    }

    /// The node's actor id, stamped on the writes it accepts.
    pub fn actor(&self) -> String {
        format!("{}/{}", self.region, self.node_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_a_working_single_region_node() {
        let c = Config::from_toml("").unwrap().finish().unwrap();
        assert_eq!(c.regions.len(), 1);
        let t = c.table("default").unwrap();
        assert_eq!(t.default_home_region.as_deref(), Some(DEFAULT_REGION));
        assert!(c.storage.sync, "durability is on by default");
    }

    #[test]
    fn unknown_field_is_refused() {
        let e = Config::from_toml("regoin = \"x\"").unwrap_err();
        assert!(e.why.contains("regoin"), "{e}");
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            ("region = \"nowhere\"\n[[regions]]\nname = \"a\"", "region"),
            (
                "region = \"a\"\n[[regions]]\nname = \"a\"\n[[zones]]\nname = \"eu\"\nregions = [\"b\"]",
                "zones[0].regions",
            ),
            ("[[tables]]\nname = \"T!\"", "tables[0].name"),
            ("[[tables]]\nname = \"t\"\nlocality = \"by_table\"", "tables[0].home_region"),
            ("[[tables]]\nname = \"t\"\nzone = \"eu\"", "tables[0].zone"),
            ("[limits]\nvalue_bytes_max = 0", "limits.value_bytes_max"),
            ("[limits]\nrow_bytes_max = 1048576", "limits.row_bytes_max"),
            ("[limits]\nrow_bytes_max = 2147483648", "limits.row_bytes_max"),
            ("[limits]\nsiblings_max = 0", "limits.siblings_max"),
            ("[limits]\nttl_s_max = 0", "limits.ttl_s_max"),
            ("[[tables]]\nname = \"t\"\nttl_s = 99999999999", "tables[0].ttl_s"),
            ("[limits]\nset_members_max = 0", "limits.set_members_max"),
            ("[localities]\nDE = \"mars-1\"", "localities.DE"),
            ("[backup]\ndestinations = [{ zone = \"mars\", dir = \"/b\" }]", "backup.destinations[0].zone"),
            ("[backup]\ndestinations = [{ zone = \"\", dir = \"rel\" }]", "backup.destinations[0].dir"),
            (
                "[backup]\ndestinations = [{ zone = \"\", dir = \"/b\" }, { zone = \"\", dir = \"/c\" }]",
                "backup.destinations[1].zone",
            ),
            (
                "[[zones]]\nname = \"eu\"\nregions = [\"local-1\"]\n[backup]\ndestinations = [{ zone = \"\", dir = \"/b\" }, { zone = \"eu\", dir = \"/b/eu\" }]",
                "backup.destinations[1].dir",
            ),
            ("[backup]\npiece_bytes_max = 10", "backup.piece_bytes_max"),
        ];
        for (text, field) in cases {
            let err = Config::from_toml(text).and_then(Config::finish).unwrap_err();
            assert_eq!(err.field, field, "{text}: {err}");
        }
    }

    #[test]
    fn the_example_config_is_valid() {
        let c = Config::from_toml(include_str!("../../deploy/node.example.toml")).unwrap().finish().unwrap();
        assert_eq!(c.partitions, 64);
    }

    #[test]
    fn the_three_region_example_is_valid_and_its_files_agree() {
        let files = [
            include_str!("../../deploy/three-regions/us-east-1.toml"),
            include_str!("../../deploy/three-regions/eu-west-1.toml"),
            include_str!("../../deploy/three-regions/ap-southeast-1.toml"),
        ];
        let configs: Vec<Config> =
            files.iter().map(|t| Config::from_toml(t).unwrap().finish().unwrap()).collect();
        // What differs between nodes: who they are and where they listen.
        let cluster_part = |c: &Config| Config {
            node_id: String::new(),
            region: String::new(),
            listen: Config::default().listen,
            listen_peer: Config::default().listen_peer,
            admin_listen: Config::default().admin_listen,
            ..c.clone()
        };
        let mut regions = BTreeSet::new();
        for c in &configs {
            assert_eq!(
                cluster_part(c),
                cluster_part(&configs[0]),
                "{} differs from the first file",
                c.region
            );
            assert!(regions.insert(c.region.clone()), "two files for {}", c.region);
            // Each node is listed under the names it listens on, so peers
            // and clients are told the address it serves.
            let me = c.regions.iter().find(|r| r.name == c.region).unwrap();
            let me = me.nodes.iter().find(|n| n.id == c.node_id).expect("the node lists itself");
            assert_eq!(me.addr, c.listen_peer.to_string());
            assert_eq!(me.client_addr.as_deref(), Some(c.listen.to_string().as_str()));
            assert_eq!(c.listen.host(), c.admin_listen.host());
        }
        assert_eq!(regions.len(), configs[0].regions.len(), "one file per region");
    }

    #[test]
    fn backpressure_bounds_are_checked_against_retention() {
        let text = "[storage]\nlog_retention_entries = 10\n[replication]\nbackpressure_soft_entries = 5\nbackpressure_hard_entries = 20";
        let err = Config::from_toml(text).unwrap().finish().unwrap_err();
        assert_eq!(err.field, "replication.backpressure_hard_entries");
        let err = Config::from_toml("partitions = 0").unwrap().finish().unwrap_err();
        assert_eq!(err.field, "partitions");
    }

    #[test]
    fn addresses_take_dns_host_names() {
        let text = r#"
            region = "eu-west-1"
            listen = "geokv-euw1.example.internal:7700"
            listen_peer = "geokv-euw1.example.internal:7702"
            admin_listen = "0.0.0.0:7701"
            [[regions]]
            name = "eu-west-1"
            nodes = [{ id = "n1", addr = "geokv-euw1.example.internal:7702", client_addr = "geokv-euw1.example.internal:7700" }]
            [[regions]]
            name = "us-east-1"
            nodes = [{ id = "n1", addr = "geokv-use1.example.internal:7702", client_addr = "[2001:db8::1]:7700" }]
        "#;
        let c = Config::from_toml(text).unwrap().finish().unwrap();
        assert_eq!(c.listen.to_string(), "geokv-euw1.example.internal:7700");
        assert_eq!(c.listen.host(), "geokv-euw1.example.internal");
        assert_eq!(c.listen_peer.port(), 7702);
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:7701");
    }

    #[test]
    fn bad_addresses_are_refused_with_their_field() {
        for (text, field) in [
            ("listen = \"geokv-euw1.example.internal\"", "<file>"),
            ("listen_peer = \"under_score.example:7702\"", "<file>"),
            ("admin_listen = \"::1:7701\"", "<file>"),
            ("[[regions]]\nname = \"local-1\"\nnodes = [{ id = \"n2\", addr = \"host:99999\" }]", "regions[0].nodes[0].addr"),
            (
                "[[regions]]\nname = \"local-1\"\nnodes = [{ id = \"n2\", addr = \"h:1\", client_addr = \"-bad-:1\" }]",
                "regions[0].nodes[0].client_addr",
            ),
        ] {
            let err = Config::from_toml(text).and_then(Config::finish).unwrap_err();
            assert_eq!(err.field, field, "{text}: {err}");
            assert!(err.why.contains("host:port"), "{text}: {err}");
        }
    }

    #[test]
    fn host_port_forms() {
        let cases = [
            ("127.0.1.1:7700", "127.0.1.1:7700", Some("127.0.1.1:7700")),
            ("[::1]:7700", "[::1]:7700", Some("[::1]:7700")),
            ("http://Geokv-Use1.Example.Internal:7702", "geokv-use1.example.internal:7702", None),
            ("localhost:0", "localhost:0", None),
        ];
        for (text, shown, ip) in cases {
            let hp: HostPort = text.parse().unwrap();
            assert_eq!(hp.to_string(), shown);
            assert_eq!(hp.ip_addr().map(|a| a.to_string()).as_deref(), ip);
        }
        for text in ["", ":7700", "host:", "[::1:7700", "a..b:1", &format!("{}:1", "a".repeat(64))] {
            assert!(text.parse::<HostPort>().is_err(), "{text} was accepted");
        }
    }

    #[tokio::test]
    async fn names_are_resolved_when_used() {
        let name: HostPort = "localhost:7700".parse().unwrap();
        let addrs = name.resolve().await.expect("localhost resolves");
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 7700), "{addrs:?}");
        let ip: HostPort = "127.0.1.1:1".parse().unwrap();
        assert_eq!(ip.resolve().await.unwrap(), vec![SocketAddr::from(([127, 0, 1, 1], 1))]);
        // `.invalid` never resolves (RFC 6761); a lookup may also time out
        // where there is no resolver at all.
        let nowhere: HostPort = "geokv.invalid:1".parse().unwrap();
        let looked_up = tokio::time::timeout(std::time::Duration::from_secs(10), nowhere.resolve()).await;
        assert!(!matches!(looked_up, Ok(Ok(_))), "{looked_up:?}");
    }

    #[test]
    fn region_in_two_zones_is_refused() {
        let text = r#"
            region = "a"
            regions = [{ name = "a" }, { name = "b" }]
            zones = [{ name = "z1", regions = ["a"] }, { name = "z2", regions = ["a", "b"] }]
        "#;
        let err = Config::from_toml(text).unwrap().finish().unwrap_err();
        assert_eq!(err.field, "zones[1].regions");
    }
}
