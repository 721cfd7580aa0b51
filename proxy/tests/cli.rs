//! The `geokv-proxy` binary: run links from specs, drive them with `ctl`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use geokv_proxy::ControlClient;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_geokv-proxy");

async fn ctl(control: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(BIN).args(["ctl", "--control", control]).args(args).output();
    tokio::time::timeout(Duration::from_secs(20), out).await.expect("ctl hung").expect("ctl ran")
}

#[tokio::test]
async fn runs_links_from_specs_and_obeys_ctl() {
    bounded(async {
        let echo = Echo::start().await;
        let spec = format!("us-east-1->eu-west-1=127.0.0.1:0={},latency_ms=20,jitter_ms=2", echo.addr);
        let mut child = Command::new(BIN)
            .args(["--link", &spec, "--control", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("geokv-proxy starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), stdout.next_line())
            .await
            .expect("no ready line in time")
            .unwrap()
            .expect("stdout closed before the ready line");
        let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
        let control = ready["control"].as_str().unwrap().to_string();
        let listen: std::net::SocketAddr = ready["links"][0]["listen"].as_str().unwrap().parse().unwrap();
        assert_eq!(ready["links"][0]["name"], "us-east-1->eu-west-1");

        let mut c = connect(listen).await;
        c.write_all(b"hi").await.unwrap();
        assert_eq!(read_n(&mut c, 2, Duration::from_secs(5)).await, b"hi");

        let out = ctl(&control, &["partition", "us-east-1->eu-west-1"]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("PARTITION"));
        let api = ControlClient::new(control.parse().unwrap());
        assert!(api.link("us-east-1->eu-west-1").await.unwrap().faults.partition);

        let out = ctl(&control, &["latency", "us-east-1->eu-west-1", "70"]).await;
        assert!(out.status.success());
        let out = ctl(&control, &["heal", "us-east-1->eu-west-1"]).await;
        assert!(out.status.success());
        let link = api.link("us-east-1->eu-west-1").await.unwrap();
        assert!(!link.faults.partition);
        assert_eq!((link.faults.to_client.latency_ms, link.faults.to_client.jitter_ms), (70, 2));

        let out =
            ctl(&control, &["set", "us-east-1->eu-west-1", "to_upstream.latency_ms=5", "stall=true"]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let link = api.link("us-east-1->eu-west-1").await.unwrap();
        assert!(link.faults.stall);
        assert_eq!(link.faults.to_upstream.latency_ms, 5);

        let out = ctl(&control, &["show", "--json"]).await;
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(shown[0]["faults"]["stall"], true);

        let out = ctl(&control, &["heal", "no-such-link"]).await;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("LINK_NOT_FOUND"));
        let out = ctl(&control, &["set", "us-east-1->eu-west-1", "latency=5"]).await;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option"));

        child.start_kill().unwrap();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("proxy did not exit");
    })
    .await;
}

#[tokio::test]
async fn bad_specs_fail_with_a_clear_message() {
    bounded(async {
        for (spec, expect) in [
            ("just-a-name", "NAME=LISTEN=UPSTREAM"),
            ("a=127.0.0.1:0=127.0.0.1:1,latency_ms=soon", "whole number"),
            ("a=127.0.0.1:0=127.0.0.1:1,partition=perhaps", "true or false"),
            ("a b=127.0.0.1:0=127.0.0.1:1", "invalid link name"),
        ] {
            let out = Command::new(BIN).args(["--link", spec]).output();
            let out = tokio::time::timeout(Duration::from_secs(20), out).await.unwrap().unwrap();
            assert!(!out.status.success(), "{spec} was accepted");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains(expect), "{spec}: {stderr}");
        }
    })
    .await;
}
