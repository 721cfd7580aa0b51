//! Every refusal a client can see carries the right gRPC code and a stable
//! `google.rpc.ErrorInfo` reason, the command line prints that reason and
//! exits non-zero, and a node refuses a bad configuration naming the field.
//!
//! Corruption of stored values is checked at the engine level by the
//! server's unit tests: RocksDB compresses its files, so flipping bytes on
//! disk from here would test RocksDB's checksums rather than geokv's.

use crate::common;

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use common::{free_port, run_bounded, NodeProcess};
use geokv_client::{CausalContext, Consistency, ReadConsistency, Row, WriteOptions};
use geokv_proto::v1 as pb;
use pb::kv_client::KvClient;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::{ErrorInfo, StatusExt};

const KEY_BYTES_MAX: usize = 64;
const VALUE_BYTES_MAX: usize = 1024;

/// A node in `us-east-1` of a three-region cluster with an EU zone, small
/// limits, and one table per homing rule under test.
fn cluster_config() -> String {
    format!(
        r#"
region = "us-east-1"
regions = [{{ name = "us-east-1" }}, {{ name = "eu-west-1" }}, {{ name = "eu-central-1" }}]
zones = [{{ name = "eu", regions = ["eu-west-1", "eu-central-1"] }}]
localities = {{ DE = "eu-central-1", FR = "eu-west-1", US = "us-east-1" }}

[limits]
key_bytes_max = {KEY_BYTES_MAX}
value_bytes_max = {VALUE_BYTES_MAX}

# Rows homed here by default; not in a zone, so replicated to all three regions.
[[tables]]
name = "default"
default_home_region = "us-east-1"

# Homed by row with no default: every write must say where its row lives.
[[tables]]
name = "users"

# EU-resident rows: never stored outside eu-west-1 and eu-central-1.
[[tables]]
name = "eu_users"
zone = "eu"
default_consistency = "eventual"
"#
    )
}

async fn kv(node: &NodeProcess) -> KvClient<Channel> {
    let tls = geokv_net::tls::Tls::load(geokv_net::tls::TlsFiles::client(node.certs_dir(), "root")).unwrap();
    let channels = geokv_net::channel::Channels::new(
        geokv_net::channel::ChannelSettings::CLIENT,
        geokv_net::channel::Dialer::tcp(),
        Some(tls),
    );
    KvClient::new(channels.connect(&node.endpoint(), None).await.unwrap())
}

fn row(table: &str, key: &[u8]) -> Option<pb::RowRef> {
    Some(pb::RowRef { table: table.into(), key: key.to_vec(), locality: None })
}

fn row_at(table: &str, key: &[u8], locality: &str) -> Option<pb::RowRef> {
    Some(pb::RowRef {
        table: table.into(),
        key: key.to_vec(),
        locality: Some(pb::row_ref::Locality::LocalityValue(locality.into())),
    })
}

fn put(row: Option<pb::RowRef>, value: &[u8]) -> pb::PutRequest {
    pb::PutRequest { row, value: value.to_vec(), ..Default::default() }
}

/// Asserts the status's code, its `ErrorInfo` reason and domain, and that
/// the message starts with the reason; returns the `ErrorInfo`.
fn expect_error<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, reason: &str) -> ErrorInfo {
    let status = match result {
        Ok(v) => panic!("expected {reason}, got success: {v:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "code of {reason}: {status:?}");
    let info = status.get_details_error_info().unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, geokv_proto::ERROR_DOMAIN);
    assert!(status.message().starts_with(&format!("{reason}: ")), "message: {}", status.message());
    info
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_tables_and_contexts_are_typed() {
    let node = NodeProcess::start_with_config(&cluster_config());
    let mut kv = kv(&node).await;

    // Keys: at the limit is fine, one byte over is KEY_TOO_LARGE.
    let at_limit = vec![b'k'; KEY_BYTES_MAX];
    kv.put(put(row("default", &at_limit), b"v")).await.expect("a key at the limit");
    let over = vec![b'k'; KEY_BYTES_MAX + 1];
    let info =
        expect_error(kv.put(put(row("default", &over), b"v")).await, Code::InvalidArgument, "KEY_TOO_LARGE");
    assert_eq!(info.metadata["len"], (KEY_BYTES_MAX + 1).to_string());
    assert_eq!(info.metadata["max"], KEY_BYTES_MAX.to_string());
    let read = pb::GetRequest { row: row("default", &over), ..Default::default() };
    expect_error(kv.get(read).await, Code::InvalidArgument, "KEY_TOO_LARGE");

    // Values: the same at the value limit.
    kv.put(put(row("default", b"big"), &vec![0u8; VALUE_BYTES_MAX])).await.expect("a value at the limit");
    let info = expect_error(
        kv.put(put(row("default", b"big"), &vec![0u8; VALUE_BYTES_MAX + 1])).await,
        Code::InvalidArgument,
        "VALUE_TOO_LARGE",
    );
    assert_eq!(info.metadata["max"], VALUE_BYTES_MAX.to_string());
    let got = kv
        .get(pb::GetRequest { row: row("default", b"big"), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.siblings.len(), 1);
    assert_eq!(got.siblings[0].value.len(), VALUE_BYTES_MAX, "the refused write changed nothing");

    // Unknown table, on writes and reads alike.
    let info = expect_error(kv.put(put(row("nope", b"k"), b"v")).await, Code::NotFound, "UNKNOWN_TABLE");
    assert_eq!(info.metadata["table"], "nope");
    let read = pb::GetRequest { row: row("nope", b"k"), ..Default::default() };
    expect_error(kv.get(read).await, Code::NotFound, "UNKNOWN_TABLE");

    // A context that is not one geokv produced.
    for garbage in [&b"\x01garbage"[..], &b"\xff\xff\xff\xff\xff\xff\xff\xff"[..], &[0u8; 3][..]] {
        let mut req = put(row("default", b"ctx"), b"v");
        req.context = garbage.to_vec();
        expect_error(kv.put(req).await, Code::InvalidArgument, "MALFORMED_CONTEXT");
        let del = pb::DeleteRequest {
            row: row("default", b"ctx"),
            context: garbage.to_vec(),
            ..Default::default()
        };
        expect_error(kv.delete(del).await, Code::InvalidArgument, "MALFORMED_CONTEXT");
    }
    // A real context whose bytes were damaged in transit is refused too.
    let ack = kv.put(put(row("default", b"ctx"), b"v")).await.unwrap().into_inner().ack.unwrap();
    assert!(!ack.context.is_empty());
    let mut damaged = ack.context.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x5a;
    let mut req = put(row("default", b"ctx"), b"v2");
    req.context = damaged;
    expect_error(kv.put(req).await, Code::InvalidArgument, "MALFORMED_CONTEXT");

    // Consistency levels the protocol does not define.
    let mut req = put(row("default", b"lvl"), b"v");
    req.consistency = 42;
    let info = expect_error(kv.put(req).await, Code::InvalidArgument, "UNKNOWN_CONSISTENCY");
    assert_eq!(info.metadata["value"], "42");
    let read = pb::GetRequest { row: row("default", b"lvl"), consistency: 42, ..Default::default() };
    expect_error(kv.get(read).await, Code::InvalidArgument, "UNKNOWN_CONSISTENCY");
    let add = pb::CounterAddRequest {
        row: row("default", b"lvl-c"),
        delta: 1,
        consistency: -3,
        ..Default::default()
    };
    expect_error(kv.counter_add(add).await, Code::InvalidArgument, "UNKNOWN_CONSISTENCY");
    // None of the refused writes created the row.
    let got = kv
        .get(pb::GetRequest { row: row("default", b"lvl"), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(!got.found);

    // The Rust client reports the same reason.
    let client = node.client().await;
    let err = client
        .put(
            &Row::new("default", "ctx"),
            b"v".to_vec(),
            WriteOptions::default().context(CausalContext(b"\x01xx".to_vec())),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
    assert_eq!(err.reason.as_deref(), Some("MALFORMED_CONTEXT"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_errors_are_typed() {
    let node = NodeProcess::start_with_config(&cluster_config());
    let mut kv = kv(&node).await;

    // Homed by row with no default home: the write must say where the row lives.
    let info =
        expect_error(kv.put(put(row("users", b"u1"), b"v")).await, Code::InvalidArgument, "MISSING_LOCALITY");
    assert_eq!(info.metadata["table"], "users");
    kv.put(put(row_at("users", b"u1", "US"), b"v")).await.expect("a US row is homed here");
    expect_error(
        kv.put(put(row_at("users", b"u2", "XX"), b"v")).await,
        Code::InvalidArgument,
        "UNKNOWN_LOCALITY",
    );

    // QUORUM on a row replicated to three regions needs a majority of them,
    // which a single node cannot reach: the write is durable here (it will
    // replicate) but not acknowledged, and the reason is retryable.
    let mut req = put(row("default", b"q"), b"v");
    req.consistency = pb::WriteConsistency::WriteQuorum as i32;
    let info = expect_error(kv.put(req).await, Code::Unavailable, "QUORUM_UNAVAILABLE");
    assert_eq!(info.metadata["group"], "quorum");
    // STRONG needs a STRONG table: on any other table the level is invalid.
    let mut req = put(row("default", b"s"), b"v");
    req.consistency = pb::WriteConsistency::WriteStrong as i32;
    let info = expect_error(kv.put(req).await, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(info.metadata["field"], "consistency");
    let got = kv
        .get(pb::GetRequest { row: row("default", b"s"), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(!got.found, "a write refused for its level must not be stored");
    let mut cfg = node.client_config();
    cfg.retries_max = 1;
    let client = geokv_client::Client::with_config(cfg).await.expect("connect");
    let err = client
        .put(
            &Row::new("default", "q"),
            b"v".to_vec(),
            WriteOptions::default().consistency(Consistency::Quorum),
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason.as_deref(), Some("QUORUM_UNAVAILABLE"), "{err}");
    assert!(err.is_transient(), "a majority may be reachable again later");

    // EU-resident rows are refused by a node in us-east-1 at every level,
    // naming the regions that may hold them.
    for level in [
        pb::WriteConsistency::Unspecified,
        pb::WriteConsistency::WriteLocal,
        pb::WriteConsistency::WriteEventual,
        pb::WriteConsistency::WriteQuorum,
        pb::WriteConsistency::WriteStrong,
    ] {
        let mut req = put(row_at("eu_users", b"hans", "DE"), b"v");
        req.consistency = level as i32;
        let info = expect_error(kv.put(req).await, Code::FailedPrecondition, "RESIDENCY_VIOLATION");
        assert_eq!(info.metadata["allowed_regions"], "eu-west-1,eu-central-1", "{level:?}");
        assert_eq!(info.metadata["zone"], "eu");
        assert_eq!(info.metadata["region"], "us-east-1");
    }
    // The same for an explicit EU home in a table without a zone of its own:
    // the home region's zone applies.
    let explicit = Some(pb::RowRef {
        table: "users".into(),
        key: b"marie".to_vec(),
        locality: Some(pb::row_ref::Locality::HomeRegion("eu-west-1".into())),
    });
    let mut req = put(explicit.clone(), b"v");
    req.consistency = pb::WriteConsistency::WriteEventual as i32;
    let info = expect_error(kv.put(req).await, Code::FailedPrecondition, "RESIDENCY_VIOLATION");
    assert_eq!(info.metadata["allowed_regions"], "eu-west-1,eu-central-1");
    // Reads of such rows are refused too: this region holds no copy.
    let read = pb::GetRequest { row: row_at("eu_users", b"hans", "DE"), ..Default::default() };
    expect_error(kv.get(read).await, Code::FailedPrecondition, "RESIDENCY_VIOLATION");
    let set = pb::SetAddRequest { row: explicit, members: vec![b"m".to_vec()], ..Default::default() };
    expect_error(kv.set_add(set).await, Code::FailedPrecondition, "RESIDENCY_VIOLATION");

    // And the client surfaces the metadata.
    let err = client
        .put(&Row::new("eu_users", "hans").locality("DE"), b"v".to_vec(), WriteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.reason.as_deref(), Some("RESIDENCY_VIOLATION"));
    assert_eq!(err.metadata.get("allowed_regions").map(String::as_str), Some("eu-west-1,eu-central-1"));
    let page = client.scan("eu_users", b"", b"", 100).await.unwrap();
    assert!(page.rows.is_empty(), "no EU row may be stored in us-east-1: {:?}", page.rows);
    // Rows this region may hold are unaffected.
    let us = client.get(&Row::new("users", "u1").locality("US"), ReadConsistency::Local).await.unwrap();
    assert_eq!(us.values(), vec![b"v".to_vec()]);
}

#[test]
fn cli_prints_the_reason_and_exits_non_zero() {
    let node = NodeProcess::start_with_config(&cluster_config());
    let long_key = "k".repeat(KEY_BYTES_MAX + 1);
    let long_value = "v".repeat(VALUE_BYTES_MAX + 1);
    let garbage_context = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"\x01garbage");

    node.cli(&["put", "--table", "nope", "k", "v"]).assert_reason("UNKNOWN_TABLE");
    node.cli(&["get", "--table", "nope", "k"]).assert_reason("UNKNOWN_TABLE");
    node.cli(&["put", &long_key, "v"]).assert_reason("KEY_TOO_LARGE");
    node.cli(&["put", "k", &long_value]).assert_reason("VALUE_TOO_LARGE");
    node.cli(&["put", "k", "v", "--context", &garbage_context]).assert_reason("MALFORMED_CONTEXT");
    node.cli(&["put", "--table", "users", "k", "v"]).assert_reason("MISSING_LOCALITY");
    node.cli(&["put", "k", "v", "--consistency", "quorum"]).assert_reason("QUORUM_UNAVAILABLE");
    node.cli(&["incr", "c", "--consistency", "strong"]).assert_reason("INVALID_ARGUMENT");

    let out = node.cli(&["put", "--table", "eu_users", "--locality", "DE", "hans", "v"]);
    out.assert_reason("RESIDENCY_VIOLATION");
    assert!(out.stderr.contains("allowed_regions: eu-west-1,eu-central-1"), "stderr: {}", out.stderr);
    assert!(out.stdout.is_empty(), "nothing on stdout for a refused write: {}", out.stdout);

    // A level the command line does not know is a usage error, before any request.
    let out = node.cli(&["put", "k", "v", "--consistency", "bogus"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("unknown write consistency"), "stderr: {}", out.stderr);

    // An unreachable node is an error too, with its own reason.
    let mut cmd = Command::new(common::GEOKV_BIN);
    cmd.args(["get", "k", "--endpoint", &format!("127.0.0.1:{}", free_port()), "--timeout-ms", "500"]);
    run_bounded(cmd, common::CLI_TIMEOUT).assert_reason("UNREACHABLE");

    // After all that, the node still works.
    // (`k` itself holds the QUORUM write above: durable here, not acknowledged.)
    node.cli(&["put", "k2", "v"]).ok();
    assert_eq!(node.cli(&["get", "k2"]).ok(), "v");
}

/// Runs `geokv node` on `config` and expects it to refuse to start.
fn node_refuses(config: &str) -> common::CliOutput {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(common::GEOKV_BIN);
    cmd.arg("node")
        .arg("--config")
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .env_remove("GEOKV_CONFIG");
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert!(!out.status.success(), "node started on a bad config:\n{config}\nstderr: {}", out.stderr);
    assert!(!out.stderr.contains("node serving"), "node served on a bad config: {}", out.stderr);
    assert!(!dir.path().join("data").exists(), "a refused config must not create the store");
    out
}

#[test]
fn node_refuses_a_bad_config_naming_the_field() {
    // A misspelt field is refused, not ignored.
    let out = node_refuses("regon = \"us-east-1\"\n");
    assert!(out.stderr.contains("regon"), "stderr does not name `regon`: {}", out.stderr);
    assert!(out.stderr.contains("config.toml"), "stderr does not name the file: {}", out.stderr);

    let out = node_refuses("[[tables]]\nname = \"t\"\nlocalty = \"by_row\"\n");
    assert!(out.stderr.contains("localty"), "stderr does not name `localty`: {}", out.stderr);

    // A value out of range names its field.
    let out = node_refuses("[limits]\nkey_bytes_max = 0\n");
    assert!(out.stderr.contains("limits.key_bytes_max"), "stderr: {}", out.stderr);

    // An enum value that does not exist.
    let out = node_refuses("[[tables]]\nname = \"t\"\ndefault_consistency = \"sometimes\"\n");
    assert!(out.stderr.contains("sometimes"), "stderr: {}", out.stderr);

    // Cross-field rules: a zone of unknown regions, a table's home outside its zone.
    let out = node_refuses(
        "region = \"a\"\nregions = [{ name = \"a\" }]\nzones = [{ name = \"eu\", regions = [\"eu-west-1\"] }]\n",
    );
    assert!(out.stderr.contains("zones[0].regions"), "stderr: {}", out.stderr);
    let out = node_refuses(
        "region = \"a\"\nregions = [{ name = \"a\" }, { name = \"b\" }]\nzones = [{ name = \"z\", regions = [\"b\"] }]\n\
         [[tables]]\nname = \"t\"\nzone = \"z\"\ndefault_home_region = \"a\"\n",
    );
    assert!(out.stderr.contains("tables[0].zone"), "stderr: {}", out.stderr);

    // Not TOML at all.
    let out = node_refuses("this is ] not toml [\n");
    assert!(out.stderr.contains("config.toml"), "stderr: {}", out.stderr);

    // A missing file names the path.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(common::GEOKV_BIN);
    cmd.args([
        "node",
        "--config",
        "/nonexistent/geokv.toml",
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    cmd.args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(dir.path().join("data"));
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert!(!out.status.success());
    assert!(out.stderr.contains("/nonexistent/geokv.toml"), "stderr: {}", out.stderr);
}
