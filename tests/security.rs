//! Security against real processes (docs/security.md): what is refused on
//! each port, and why; grants as data, also across a forwarding region;
//! the access audit log, kept in the region that served each request; and
//! certificates rotated under load without a restart.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{DevCluster, Options};
use common::{http_get, metric, NodeProcess};
use geokv_client::proto as pb;
use geokv_client::{Client, ClientConfig, Consistency, ReadConsistency, Row, WriteOptions};
use geokv_net::channel::{ChannelSettings, Channels, Dialer};
use geokv_net::tls::{Tls, TlsFiles};
use sha2::Digest;

const US: &str = "us-east-1";
const EU_WEST: &str = "eu-west-1";
const EU_CENTRAL: &str = "eu-central-1";

fn local() -> WriteOptions {
    WriteOptions { consistency: Some(Consistency::Local), ..WriteOptions::default() }
}

fn refused(admin: std::net::SocketAddr, port: &str, reason: &str) -> f64 {
    metric(admin, "geokv_security_refused_total", &[("port", port), ("reason", reason)])
}

/// A KV client over TLS made from `files` (no bearer token).
async fn kv_with(
    files: TlsFiles,
    endpoint: &str,
) -> Result<pb::kv_client::KvClient<tonic::transport::Channel>, String> {
    let tls = Tls::load(files).map_err(|e| e.to_string())?;
    let channels = Channels::new(ChannelSettings::CLIENT, Dialer::tcp(), Some(tls));
    let channel = channels.connect(endpoint, None).await.map_err(|e| e.to_string())?;
    Ok(pb::kv_client::KvClient::new(channel))
}

fn get_request(table: &str, key: &str) -> pb::GetRequest {
    pb::GetRequest {
        row: Some(pb::RowRef { table: table.into(), key: key.as_bytes().to_vec(), locality: None }),
        ..Default::default()
    }
}

fn reason(status: &tonic::Status) -> Option<String> {
    geokv_client::Error::from(status.clone()).reason
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_secs()
}

fn jwt(key: &jsonwebtoken::EncodingKey, sub: &str, exp: u64) -> String {
    let claims = serde_json::json!({ "sub": sub, "exp": exp });
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256), &claims, key)
        .expect("sign a token")
}

/// Everything a client can get wrong at the door, on one node: each
/// refusal has its status and reason, and is counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_port_refusals_each_have_a_reason_and_a_count() {
    let keys = tempfile::tempdir().expect("temp dir");
    let signer = rcgen::KeyPair::generate().expect("an ES256 key pair");
    let public_pem = keys.path().join("jwt.pub.pem");
    std::fs::write(&public_pem, signer.public_key_pem()).expect("write the public key");
    let encoding =
        jsonwebtoken::EncodingKey::from_ec_pem(signer.serialize_pem().as_bytes()).expect("signing key");
    let static_token = "s3cret-static-token";
    let config = format!(
        r#"
[security]
[[security.tokens]]
principal = "svc"
sha256 = "{}"
[security.jwt]
public_key = {:?}
algorithm = "ES256"
[[security.grants]]
principal = "svc"
tables = ["default"]
privileges = ["read", "write"]
"#,
        hex::encode(sha2::Sha256::digest(static_token.as_bytes())),
        public_pem.display().to_string()
    );
    let node = NodeProcess::start_with_config(&config);
    let endpoint = node.endpoint();

    // root, with its certificate: the door is open.
    let root = node.client().await;
    root.put(&Row::new("default", "k"), b"v".to_vec(), local()).await.expect("root writes");

    // A plaintext client never gets a gRPC answer; the node counts it.
    let before = refused(node.admin_addr, "client", "plaintext");
    let plain = pb::kv_client::KvClient::connect(endpoint.clone()).await;
    if let Ok(mut plain) = plain {
        let got = plain.get(get_request("default", "k")).await;
        assert!(got.is_err(), "a plaintext client was answered: {got:?}");
    }
    assert!(refused(node.admin_addr, "client", "plaintext") > before, "plaintext connection not counted");

    // A client certificate of another CA: UNAUTHENTICATED, counted.
    let other = tempfile::tempdir().expect("temp dir");
    geokv_net::certs::ensure_dev_certs(other.path(), "impostor", &[], &["127.0.0.1"], &["root"])
        .expect("another CA and a root certificate signed by it");
    let mixed = tempfile::tempdir().expect("temp dir");
    std::fs::copy(node.certs_dir().join("ca.crt"), mixed.path().join("ca.crt")).expect("copy ca.crt");
    for f in ["client.root.crt", "client.root.key"] {
        std::fs::copy(other.path().join(f), mixed.path().join(f)).expect("copy the other CA's certificate");
    }
    let before = refused(node.admin_addr, "client", "bad_certificate");
    let mut kv = kv_with(TlsFiles::client(mixed.path(), "root"), &endpoint).await.expect("TLS connects");
    let status = kv.get(get_request("default", "k")).await.expect_err("another CA's certificate is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status).as_deref(), Some("UNAUTHENTICATED"), "{status:?}");
    assert!(refused(node.admin_addr, "client", "bad_certificate") > before);

    // TLS but no certificate and no token.
    let before = refused(node.admin_addr, "client", "no_credentials");
    let mut kv = kv_with(TlsFiles::ca_only(node.certs_dir()), &endpoint).await.expect("TLS connects");
    let status = kv.get(get_request("default", "k")).await.expect_err("anonymous is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status).as_deref(), Some("UNAUTHENTICATED"));
    assert!(refused(node.admin_addr, "client", "no_credentials") > before);

    let token_client = |token: String| {
        let mut cfg: ClientConfig = node.client_config();
        cfg.token = Some(token);
        cfg.retries_max = 0;
        cfg
    };

    // An expired signed token.
    let before = refused(node.admin_addr, "client", "expired_token");
    let expired =
        Client::with_config(token_client(jwt(&encoding, "svc", now_s() - 3600))).await.expect("connect");
    let err =
        expired.get(&Row::new("default", "k"), ReadConsistency::Local).await.expect_err("expired token");
    assert_eq!(err.code, tonic::Code::Unauthenticated, "{err}");
    assert_eq!(err.reason.as_deref(), Some("UNAUTHENTICATED"), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(refused(node.admin_addr, "client", "expired_token") > before);

    // A token nobody issued.
    let forged = Client::with_config(token_client("not-a-token".into())).await.expect("connect");
    let err = forged.get(&Row::new("default", "k"), ReadConsistency::Local).await.expect_err("unknown token");
    assert_eq!(err.reason.as_deref(), Some("UNAUTHENTICATED"), "{err}");

    // Valid tokens act as their principal, with its grants only.
    for token in [jwt(&encoding, "svc", now_s() + 3600), static_token.to_string()] {
        let svc = Client::with_config(token_client(token)).await.expect("connect");
        let got =
            svc.get(&Row::new("default", "k"), ReadConsistency::Local).await.expect("svc reads default");
        assert!(got.found);
        svc.put(&Row::new("default", "svc"), b"x".to_vec(), local()).await.expect("svc writes default");
        let err = svc.residency_audit().await.expect_err("svc is no admin");
        assert_eq!(err.code, tonic::Code::PermissionDenied, "{err}");
        assert_eq!(err.reason.as_deref(), Some("PERMISSION_DENIED"), "{err}");
        assert_eq!(err.metadata.get("missing_grant").map(String::as_str), Some("admin"), "{err}");
    }
    let stranger =
        Client::with_config(token_client(jwt(&encoding, "stranger", now_s() + 3600))).await.expect("connect");
    let err = stranger.get(&Row::new("default", "k"), ReadConsistency::Local).await.expect_err("no grant");
    assert_eq!(err.reason.as_deref(), Some("PERMISSION_DENIED"), "{err}");
    assert_eq!(err.metadata.get("principal").map(String::as_str), Some("stranger"), "{err}");

    // The refused attempts are in the audit log too, with their operation
    // (not the plaintext one: it never became a request).
    tokio::time::sleep(Duration::from_millis(300)).await; // flushed every 50 ms
    let log = root.audit_log(0, Some("(unauthenticated)"), None, 1000).await.expect("the audit log");
    let refused_gets = log
        .records
        .iter()
        .filter(|r| {
            r.operation == "kv.get" && r.table == "default" && !r.allowed && r.reason == "UNAUTHENTICATED"
        })
        .count();
    assert_eq!(refused_gets, 4, "other CA, no credentials, expired and unknown token: {:?}", log.records);

    // Tokens never widen the peer port: it wants a node certificate.
    let mut peer = kv_with(TlsFiles::client(node.certs_dir(), "root"), &node.peer_addr.to_string())
        .await
        .expect("TLS connects to the peer port");
    let status =
        peer.get(get_request("default", "k")).await.expect_err("a client certificate on the peer port");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(refused(node.admin_addr, "peer", "not_a_node_certificate") >= 1.0);
}

/// Reads every audit record of a stopped node's store.
fn stored_audit(data_dir: &Path) -> Vec<(Vec<u8>, geokv_server::security::audit::AuditRecord)> {
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), data_dir).expect("list column families");
    assert!(cfs.iter().any(|c| c == "audit"), "no audit column family in {}: {cfs:?}", data_dir.display());
    let db = rocksdb::DB::open_cf_for_read_only(&rocksdb::Options::default(), data_dir, &cfs, false)
        .expect("open the store read-only");
    let cf = db.cf_handle("audit").expect("audit column family");
    db.iterator_cf(&cf, rocksdb::IteratorMode::Start)
        .map(|item| {
            let (k, v) = item.expect("read the audit column family");
            let record =
                geokv_server::security::audit::decode_record(&k, &v).expect("an audit record decodes");
            // The record's text, without the envelope: the envelope's
            // checksum is four arbitrary bytes that can spell `v1`.
            let payload = geokv_server::codec::open(&v).expect("an audit record's envelope opens");
            (payload.to_vec(), record)
        })
        .collect()
}

/// Grants across regions, the peer port's identity checks, and where the
/// audit log keeps each access.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_identity_and_audit_across_regions() {
    let mut options = Options::scale(0.1);
    options.extra_config = r#"
[[security.grants]]
principal = "reader"
tables = ["default"]
privileges = ["read"]

[[security.grants]]
principal = "forwarder"
tables = ["default"]
privileges = ["read", "write"]
"#
    .into();
    let mut cluster = DevCluster::start_with(options).await;
    let certs = cluster.certs_dir();
    for user in ["reader", "forwarder"] {
        geokv_net::certs::create_client(&certs, user, None, false).expect("a client certificate");
    }
    let as_user = |user: &str, region: &str| {
        let mut cfg = cluster.client_config(&cluster.endpoint(region));
        cfg.user = user.into();
        cfg.retries_max = 0;
        cfg
    };

    // root writes the row (home us-east-1) and may do everything.
    let root = cluster.client(US).await;
    root.put(&Row::new("default", "shared"), b"v1".to_vec(), local()).await.expect("root writes");

    // reader: read on `default` only.
    let reader = Client::with_config(as_user("reader", US)).await.expect("connect");
    let got = reader.get(&Row::new("default", "shared"), ReadConsistency::Local).await.expect("reader reads");
    assert_eq!(got.siblings.first().map(|s| s.value.clone()), Some(b"v1".to_vec()));
    let err =
        reader.put(&Row::new("default", "shared"), b"no".to_vec(), local()).await.expect_err("no write");
    assert_eq!(err.reason.as_deref(), Some("PERMISSION_DENIED"), "{err}");
    assert_eq!(
        err.metadata.get("missing_grant").map(String::as_str),
        Some("write on table `default`"),
        "{err}"
    );
    let err =
        reader.get(&Row::new("users", "u1"), ReadConsistency::Local).await.expect_err("no read of users");
    assert_eq!(err.reason.as_deref(), Some("PERMISSION_DENIED"), "{err}");
    let err = reader.failover(US, EU_WEST).await.expect_err("no failover");
    assert_eq!(err.reason.as_deref(), Some("PERMISSION_DENIED"), "{err}");
    assert_eq!(err.metadata.get("missing_grant").map(String::as_str), Some("admin"), "{err}");

    // The same entering at eu-west-1, which forwards a write of a
    // us-east-1 row to its home: denied at the door there.
    let reader_eu = Client::with_config(as_user("reader", EU_WEST)).await.expect("connect");
    let err =
        reader_eu.put(&Row::new("default", "shared"), b"no".to_vec(), local()).await.expect_err("no write");
    assert_eq!(err.reason.as_deref(), Some("PERMISSION_DENIED"), "{err}");
    // And at the serving node, even when a node forwards it: us-east-1
    // authorizes the original principal, not the forwarding node.
    let channel = cluster.node_channel(cluster.node_peer_addr(US, 0), (EU_WEST, "n1")).await;
    let mut forwarded = pb::kv_client::KvClient::new(channel);
    let mut req = tonic::Request::new(pb::PutRequest {
        row: Some(pb::RowRef { table: "default".into(), key: b"shared".to_vec(), locality: None }),
        value: b"no".to_vec(),
        consistency: pb::WriteConsistency::WriteLocal as i32,
        ..Default::default()
    });
    req.metadata_mut().insert("geokv-forwarded-by", "eu-west-1/n1".parse().expect("ascii"));
    req.metadata_mut().insert("geokv-principal", "reader".parse().expect("ascii"));
    let status = forwarded.put(req).await.expect_err("reader's forwarded write");
    assert_eq!(reason(&status).as_deref(), Some("PERMISSION_DENIED"), "{status:?}");

    // forwarder writes through eu-west-1: forwarded to us-east-1, served there.
    let forwarder = Client::with_config(as_user("forwarder", EU_WEST)).await.expect("connect");
    let ack = forwarder
        .put(&Row::new("default", "fwd-row"), b"f".to_vec(), local())
        .await
        .expect("forwarded write");
    assert_eq!(ack.accepted_by_region, US, "{ack:?}");

    // root: a planned failover and back (admin).
    root.failover(US, EU_WEST).await.expect("root fails over");
    root.failback(US).await.expect("root fails back");

    // The peer port checks what each message claims against the certificate.
    let us_admin = cluster.admin_addr(US);
    let central_admin = cluster.admin_addr(EU_CENTRAL);
    let channel = cluster.node_channel(cluster.node_peer_addr(EU_CENTRAL, 0), (EU_WEST, "n1")).await;
    let mut replication = pb::replication_client::ReplicationClient::new(channel);
    let frame = pb::ShipFrame {
        source_region: US.into(),
        source_node: "n1".into(),
        first_seq: 1,
        through_seq: u64::MAX,
        source_head_seq: u64::MAX,
        ..Default::default()
    };
    let before = refused(central_admin, "peer", "claim_mismatch");
    let outcome = match replication.ship(tokio_stream::iter(vec![frame])).await {
        Err(status) => status,
        Ok(acks) => {
            let mut acks = acks.into_inner();
            match tokio::time::timeout(Duration::from_secs(10), acks.message()).await.expect("an answer") {
                Err(status) => status,
                Ok(other) => panic!("a frame claiming another region was accepted: {other:?}"),
            }
        }
    };
    assert_eq!(outcome.code(), tonic::Code::PermissionDenied, "{outcome:?}");
    assert!(refused(central_admin, "peer", "claim_mismatch") > before);

    let channel = cluster.node_channel(cluster.node_peer_addr(US, 0), (EU_WEST, "n1")).await;
    let mut consensus = geokv_proto::consensus::consensus_client::ConsensusClient::new(channel);
    let claimed = geokv_server::consensus::raft_id("us-east-1/n1");
    let vote = serde_json::json!({
        "vote": { "leader_id": { "term": 1_000_000, "node_id": claimed }, "committed": false },
        "last_log_id": null,
    });
    let before = refused(us_admin, "peer", "claim_mismatch");
    let status = consensus
        .raft(geokv_proto::consensus::RaftRequest {
            group: "control".into(),
            kind: geokv_proto::consensus::RaftKind::Vote as i32,
            payload: serde_json::to_vec(&vote).expect("json"),
        })
        .await
        .expect_err("a Raft vote claiming another member");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(refused(us_admin, "peer", "claim_mismatch") > before);

    // Internal services are not on the client port at all.
    let tls = Tls::load(TlsFiles::client(&certs, "root")).expect("root's certificate");
    let channel = Channels::new(ChannelSettings::CLIENT, Dialer::tcp(), Some(tls))
        .connect(&cluster.endpoint(US), None)
        .await
        .expect("connect");
    let mut internal = pb::replication_client::ReplicationClient::new(channel.clone());
    let status = match internal.ship(tokio_stream::iter(Vec::<pb::ShipFrame>::new())).await {
        Err(s) => s,
        Ok(_) => panic!("the client port serves Replication"),
    };
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    // A forwarding header on the client port is refused, not trusted.
    let mut kv = pb::kv_client::KvClient::new(channel);
    let mut req = tonic::Request::new(get_request("default", "shared"));
    req.metadata_mut().insert("geokv-forwarded-by", "us-east-1/n1".parse().expect("ascii"));
    let status = kv.get(req).await.expect_err("a forged forwarding header");
    assert_eq!(reason(&status).as_deref(), Some("PERMISSION_DENIED"), "{status:?}");

    // The audit log, as an admin reads it: one region at a time.
    let us_log = root.audit_log(0, Some("forwarder"), None, 1000).await.expect("us-east-1's audit log");
    assert!(
        us_log.records.iter().any(|r| r.operation == "kv.put"
            && r.entry_region == EU_WEST
            && r.serving_region == US
            && r.allowed),
        "the forwarded write is not in us-east-1's log: {:?}",
        us_log.records
    );
    let reader_log = root.audit_log(0, Some("reader"), None, 1000).await.expect("audit log");
    assert!(
        reader_log.records.iter().any(|r| r.operation == "kv.get" && r.allowed),
        "{:?}",
        reader_log.records
    );
    assert!(
        reader_log.records.iter().any(|r| r.operation == "control.failover" && !r.allowed),
        "{:?}",
        reader_log.records
    );
    let log_cli = cluster.cli(&["audit", "log", "--principal", "reader", "--json"]).await;
    assert!(log_cli.status.success(), "{}", log_cli.stderr);
    assert!(log_cli.stdout.contains("\"kv.put\""), "{}", log_cli.stdout);

    // What every store holds: stop the nodes and read the column families.
    tokio::time::sleep(Duration::from_millis(500)).await; // the audit log flushes every 50 ms
    for region in common::cluster::REGIONS {
        cluster.kill_9(region);
    }
    let mut by_region = std::collections::BTreeMap::new();
    for region in common::cluster::REGIONS {
        let data = cluster.node_config(region).parent().expect("node dir").join("data");
        by_region.insert(region, stored_audit(&data));
    }
    for (region, records) in &by_region {
        for (raw, r) in records {
            assert_eq!(r.serving_region, *region, "{region} stores a record another region served: {r:?}");
            for secret in ["shared", "fwd-row", "v1"] {
                assert!(
                    !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{region}'s audit log holds the raw key or value `{secret}`: {r:?}"
                );
            }
        }
    }
    let has = |region: &str, f: &dyn Fn(&geokv_server::security::audit::AuditRecord) -> bool| {
        by_region[region].iter().any(|(_, r)| f(r))
    };
    assert!(has(US, &|r| r.principal == "forwarder" && r.operation == "kv.put" && r.entry_region == EU_WEST));
    assert!(
        !has(EU_WEST, &|r| r.principal == "forwarder" && r.operation == "kv.put"),
        "eu-west-1 recorded a write it forwarded"
    );
    assert!(has(US, &|r| r.principal == "reader" && r.operation == "kv.put" && !r.allowed));
    assert!(has(EU_WEST, &|r| r.principal == "reader"
        && r.operation == "kv.put"
        && !r.allowed
        && r.entry_region == EU_WEST));
    assert!(has(US, &|r| r.principal == "root" && r.operation == "control.failover" && r.allowed));
    for region in [EU_CENTRAL, "ap-southeast-1"] {
        assert!(
            !has(region, &|r| r.principal == "reader" || r.principal == "forwarder"),
            "{region} recorded others' accesses"
        );
    }
}

/// New node certificates and a two-CA bundle are swapped in while four
/// clients write; no client goes 2 s without a successful write; after the
/// old CA leaves the bundle, a certificate it signed is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load() {
    let node = NodeProcess::start_with_config("[security]\nreload_check_ms = 200\n");
    let live = node.certs_dir().to_path_buf();
    let old_ca = std::fs::read(live.join("ca.crt")).expect("the first CA");
    // The second CA and its certificates, made aside.
    let next = tempfile::tempdir().expect("temp dir");
    geokv_net::certs::ensure_dev_certs(
        next.path(),
        "geokv-test",
        &[("local-1", "n1")],
        &["127.0.0.1", "localhost"],
        &["root"],
    )
    .expect("the second CA");
    let new_ca = std::fs::read(next.path().join("ca.crt")).expect("the second CA");
    let bundle = [old_ca.clone(), new_ca.clone()].concat();
    // Clients trust both CAs from the start (operators ship the bundle
    // first); they present the old CA's certificate until told to switch.
    let clients_old = tempfile::tempdir().expect("temp dir");
    let clients_new = tempfile::tempdir().expect("temp dir");
    for (dir, from) in [(clients_old.path(), live.as_path()), (clients_new.path(), next.path())] {
        std::fs::write(dir.join("ca.crt"), &bundle).expect("write the bundle");
        for f in ["client.root.crt", "client.root.key"] {
            std::fs::copy(from.join(f), dir.join(f)).expect("copy a client certificate");
        }
    }
    let replace = |name: &str, bytes: &[u8]| {
        let tmp = live.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).expect("write");
        std::fs::rename(&tmp, live.join(name)).expect("rename into place");
    };

    let switch = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let endpoint = node.endpoint();
        let (old_dir, new_dir) = (clients_old.path().to_path_buf(), clients_new.path().to_path_buf());
        let (switch, stop) = (switch.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let connect = |dir: std::path::PathBuf| {
                let mut cfg = ClientConfig::new(endpoint.clone()).with_certs_dir(dir);
                cfg.timeout = Duration::from_secs(1);
                cfg.retries_max = 0;
                Client::with_config(cfg)
            };
            let mut using_new = false;
            let mut client = connect(old_dir.clone()).await.ok();
            let mut last_ok = Instant::now();
            let mut gap_max = Duration::ZERO;
            let (mut ok, mut failed) = (0u64, 0u64);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Acquire) && Instant::now() < deadline {
                if switch.load(std::sync::atomic::Ordering::Acquire) && !using_new {
                    using_new = true;
                    client = None;
                }
                if client.is_none() {
                    client = connect(if using_new { new_dir.clone() } else { old_dir.clone() }).await.ok();
                }
                let result = match &client {
                    Some(c) => c
                        .put(&Row::new("default", format!("w{w}-{ok}").as_str()), b"x".to_vec(), local())
                        .await
                        .map(|_| ()),
                    None => Err(geokv_client::Error::from(tonic::Status::unavailable("not connected"))),
                };
                match result {
                    Ok(()) => {
                        gap_max = gap_max.max(last_ok.elapsed());
                        last_ok = Instant::now();
                        ok += 1;
                    }
                    Err(_) => {
                        failed += 1;
                        client = None;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            gap_max = gap_max.max(last_ok.elapsed());
            (ok, failed, gap_max)
        }));
    }
    let wait_reload = || async { tokio::time::sleep(Duration::from_millis(1500)).await };
    wait_reload().await;
    // 1. The bundle: both CAs trusted.
    replace("ca.crt", &bundle);
    wait_reload().await;
    // 2. The node's new certificate, signed by the second CA (key first:
    //    a reload that sees a mismatched pair keeps what is in force).
    let key = std::fs::read(next.path().join("node.local-1.n1.key")).expect("new key");
    let cert = std::fs::read(next.path().join("node.local-1.n1.crt")).expect("new certificate");
    replace("node.local-1.n1.key", &key);
    replace("node.local-1.n1.crt", &cert);
    wait_reload().await;
    // 3. Clients move to certificates of the second CA.
    switch.store(true, std::sync::atomic::Ordering::Release);
    wait_reload().await;
    // 4. The old CA leaves the bundle.
    replace("ca.crt", &new_ca);
    wait_reload().await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut total_ok = 0;
    for (i, w) in writers.into_iter().enumerate() {
        let (ok, failed, gap) = w.await.expect("writer task");
        eprintln!("writer {i}: {ok} ok, {failed} failed, longest gap {gap:?}");
        assert!(gap <= Duration::from_secs(2), "writer {i} went {gap:?} without a successful write");
        total_ok += ok;
    }
    assert!(total_ok > 100, "too few writes to say anything: {total_ok}");
    assert!(node.log().contains("TLS certificates reloaded"), "no reload logged:\n{}", node.log());

    // A certificate of the removed CA is refused, with a reason.
    let mut cfg = ClientConfig::new(node.endpoint()).with_certs_dir(clients_old.path());
    cfg.retries_max = 0;
    let old = Client::with_config(cfg).await.expect("TLS still verifies the node against the bundle");
    let err =
        old.get(&Row::new("default", "w0-0"), ReadConsistency::Local).await.expect_err("the old CA is gone");
    assert_eq!(err.reason.as_deref(), Some("UNAUTHENTICATED"), "{err}");
    // The new CA's certificate works.
    let mut cfg = ClientConfig::new(node.endpoint()).with_certs_dir(clients_new.path());
    cfg.retries_max = 0;
    let new = Client::with_config(cfg).await.expect("connect");
    new.get(&Row::new("default", "w0-0"), ReadConsistency::Local)
        .await
        .expect("the new CA's certificate reads");
}

/// A node without certificates refuses a non-loopback address (before it
/// binds anything); a node certificate for another region than the config
/// claims stops the start, naming both: a node's region comes from its
/// certificate.
#[test]
fn a_node_refuses_plaintext_off_loopback_and_a_region_its_certificate_denies() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = || common::free_port().to_string();
    let node = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(common::GEOKV_BIN);
        cmd.arg("node")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-peer")
            .arg(format!("127.0.0.1:{}", port()))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", port()))
            .args(extra)
            .env_remove("GEOKV_CONFIG")
            .env_remove("GEOKV_CERTS_DIR");
        common::run_bounded(cmd, Duration::from_secs(30))
    };
    // 0.0.0.0 is only named, never bound: the check comes first.
    let out = node(&["--listen", &format!("0.0.0.0:{}", port())]);
    assert!(!out.status.success(), "a node without certificates served 0.0.0.0:\n{}", out.stderr);
    assert!(out.stderr.contains("refusing to listen on 0.0.0.0"), "{}", out.stderr);
    assert!(out.stderr.contains("--insecure"), "the refusal should name the way out:\n{}", out.stderr);

    // A certificate of eu-west-1 under the name a us-east-1 node looks for.
    let certs = dir.path().join("certs");
    geokv_net::certs::ensure_dev_certs(&certs, "geokv-test", &[(EU_WEST, "n1")], &["127.0.0.1"], &[])
        .expect("certificates");
    for ext in ["crt", "key"] {
        std::fs::copy(
            certs.join(format!("node.{EU_WEST}.n1.{ext}")),
            certs.join(format!("node.{US}.n1.{ext}")),
        )
        .expect("copy");
    }
    let listen = format!("127.0.0.1:{}", port());
    let certs_arg = certs.display().to_string();
    let out = node(&["--listen", &listen, "--region", US, "--certs-dir", &certs_arg]);
    assert!(!out.status.success(), "a node ran as a region its certificate does not name:\n{}", out.stderr);
    assert!(
        out.stderr.contains("certificate is for `eu-west-1/n1`") && out.stderr.contains("region `us-east-1`"),
        "{}",
        out.stderr
    );
}

/// `security.admin_tls` serves /metrics over TLS with the node's
/// certificate, and refuses plaintext there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_can_serve_tls() {
    let node = NodeProcess::start_with_config("[security]\nadmin_tls = true\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        match common::https_get(node.admin_addr, node.certs_dir(), "/health").await {
            Ok(body) if body.contains("serving") => break body,
            _ if Instant::now() > deadline => panic!("no /health over TLS within 30 s:\n{}", node.log()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert!(body.contains("serving"), "{body}");
    assert!(http_get(node.admin_addr, "/health").is_err(), "the TLS admin port answered plaintext");
}

/// A put on the peer port that says a node other than the caller forwarded
/// it, for `principal`.
async fn forged_forward(node: &NodeProcess, principal: &str) -> Result<(), tonic::Status> {
    let tls = Tls::load(TlsFiles::node(node.certs_dir(), "local-1", "n1")).expect("the node's certificate");
    let channel = Channels::new(ChannelSettings::PEER, Dialer::tcp(), Some(tls))
        .connect(&node.peer_addr.to_string(), None)
        .await
        .expect("connect to the peer port");
    let mut kv = pb::kv_client::KvClient::new(channel);
    let mut req = tonic::Request::new(pb::PutRequest {
        row: Some(pb::RowRef { table: "default".into(), key: b"forged".to_vec(), locality: None }),
        value: b"x".to_vec(),
        ..Default::default()
    });
    req.metadata_mut().insert("geokv-forwarded-by", "elsewhere-1/n9".parse().expect("ascii"));
    req.metadata_mut().insert("geokv-principal", principal.parse().expect("ascii"));
    kv.put(req).await.map(|_| ())
}

/// The checks above can fail: with a put-back bug switched on, what they
/// refuse gets through. Fault first: each assertion here is the negation
/// of one the normal build must pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_back_bugs_get_past_the_security_checks() {
    // The normal build: a forwarded request whose last hop is not the
    // caller is refused, and a principal without grants is denied.
    let normal = NodeProcess::start();
    let status = forged_forward(&normal, "root").await.expect_err("a forged last hop");
    assert_eq!(reason(&status).as_deref(), Some("PERMISSION_DENIED"), "{status:?}");
    geokv_net::certs::create_client(normal.certs_dir(), "stranger", None, false).expect("a certificate");
    let mut cfg = normal.client_config();
    cfg.user = "stranger".into();
    let stranger = Client::with_config(cfg).await.expect("connect");
    let err = stranger.put(&Row::new("default", "s"), b"x".to_vec(), local()).await.expect_err("no grant");
    assert_eq!(err.reason.as_deref(), Some("PERMISSION_DENIED"), "{err}");

    let bin = common::bugs_bin();
    let claims_off = NodeProcess::start_binary(&bin, "", &[("GEOKV_BUG", "peer-claims-off")]);
    forged_forward(&claims_off, "root").await.expect("with peer-claims-off the forged hop gets through");

    let grants_off = NodeProcess::start_binary(&bin, "", &[("GEOKV_BUG", "grants-off")]);
    geokv_net::certs::create_client(grants_off.certs_dir(), "stranger", None, false).expect("a certificate");
    let mut cfg = grants_off.client_config();
    cfg.user = "stranger".into();
    let stranger = Client::with_config(cfg).await.expect("connect");
    stranger
        .put(&Row::new("default", "s"), b"x".to_vec(), local())
        .await
        .expect("with grants-off anyone writes");
}
