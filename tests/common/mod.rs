//! Shared harness for the integration tests: real `geokv node` processes.
//!
//! # Layout
//! - [`NodeProcess`]: one node in its own temp directory on free loopback
//!   ports, started and waited for (bounded), stopped with `kill -9` or
//!   SIGTERM, restarted on the same data and ports, and always killed when
//!   dropped, so a failing test never leaves a node behind.
//! - [`CliOutput`] and [`run_bounded`]: the `geokv` command line run with a
//!   deadline, its status and both outputs captured.
//! - [`Deadline`]: the time bound every polling loop here carries.
//! - [`cluster`]: a whole `geokv dev` multi-region cluster behind the fault
//!   proxy, with `kill -9` and restart of one region's node.
//! - [`tour`]: the README's tour as data, for the tests that run it.
//!
//! Every test binary compiles this module but uses a part of it.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub mod cluster;
pub mod tour;

/// The `geokv` binary cargo built for this test run.
pub const GEOKV_BIN: &str = env!("CARGO_BIN_EXE_geokv");

/// Longest wait for a node to answer `/health` after it was spawned. A cold
/// RocksDB open takes well under a second; the margin is for loaded CI hosts.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a node to exit after SIGTERM.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a single command-line invocation may run.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between readiness or exit polls.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Attempts at a first start on fresh ports, when another process took a
/// port between our probe and the node's bind.
const START_ATTEMPTS_MAX: u32 = 3;

/// A point in time a loop must not run past.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    limit: Duration,
}

impl Deadline {
    pub fn after(limit: Duration) -> Self {
        Self { at: Instant::now() + limit, limit }
    }

    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }
}

/// A loopback port nobody listens on right now (bound to port 0, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener.local_addr().expect("local address of a bound listener").port()
}

/// What one command-line invocation did.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Asserts exit status 0 and returns stdout with the trailing newline removed.
    pub fn ok(&self) -> String {
        assert!(
            self.status.success(),
            "command failed with {}:\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self.stdout.trim_end().to_string()
    }

    /// Asserts a failure whose message names `reason` the way the CLI prints it
    /// (`error: REASON: message`) with exit status 1.
    pub fn assert_reason(&self, reason: &str) {
        assert_eq!(
            self.status.code(),
            Some(1),
            "expected exit status 1 for {reason}:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        let wanted = format!("error: {reason}: ");
        assert!(self.stderr.contains(&wanted), "stderr does not contain `{wanted}`:\n{}", self.stderr);
    }
}

/// Runs `cmd` to completion, killing it if it runs past `limit`.
pub fn run_bounded(cmd: Command, limit: Duration) -> CliOutput {
    let (status, stdout, stderr) = run_bounded_bytes(cmd, None, limit);
    CliOutput {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// [`run_bounded`] with `stdin` fed to the command (None: no input) and
/// its output as bytes.
pub fn run_bounded_bytes(
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    limit: Duration,
) -> (ExitStatus, Vec<u8>, Vec<u8>) {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
    // Writer and readers on their own threads, so a large value never
    // blocks the child on a full pipe.
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut input)) => Some(std::thread::spawn(move || {
            let _ = input.write_all(&data);
        })),
        _ => None,
    };
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Deadline::after(limit);
    let status = loop {
        if let Some(status) = child.try_wait().expect("polling a child process") {
            break status;
        }
        if deadline.passed() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {limit:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    (status, stdout, stderr)
}

/// One `geokv node` process with its own data directory and ports.
///
/// The temp directory holds `data/` (the store), `config.toml` (when extra
/// configuration was given) and `node-N.log`, the stderr of the N-th start,
/// which is printed when a test fails while the node is alive.
pub struct NodeProcess {
    /// Owns the temp directory; removed when the harness is dropped.
    dir: tempfile::TempDir,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The peer port (replication, consensus, forwarding).
    pub peer_addr: SocketAddr,
    config_path: Option<PathBuf>,
    /// The node's certificates (CA, its node certificate, `root`'s client
    /// certificate): tests run with TLS and authorization on, as users do.
    certs_dir: PathBuf,
    /// The admin port speaks TLS (`security.admin_tls`).
    admin_tls: bool,
    /// The `geokv` binary and extra environment the node runs with.
    bin: PathBuf,
    env: Vec<(String, String)>,
    /// None while the node is stopped.
    child: Option<Child>,
    /// Starts so far, numbering the log files.
    starts: u32,
    /// The node listens where its configuration file says (no address
    /// flags on the command line).
    addresses_from_file: bool,
    /// The data directory when it is not `data/` in the temp directory
    /// (e.g. a mount of the fault filesystem).
    data_dir: Option<PathBuf>,
}

impl NodeProcess {
    /// Starts a node with the built-in defaults (one region, table `default`).
    pub fn start() -> Self {
        Self::start_inner(None)
    }

    /// Starts a node with `toml` as its configuration file. Data directory
    /// and addresses come from the command line, which overrides the file.
    pub fn start_with_config(toml: &str) -> Self {
        Self::start_inner(Some(toml))
    }

    /// Starts `bin` (a `geokv` build, e.g. one with put-back bugs) with
    /// `toml` and extra environment.
    pub fn start_binary(bin: &Path, toml: &str, env: &[(&str, &str)]) -> Self {
        Self::start_full(
            Some(toml),
            bin.to_path_buf(),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            None,
        )
    }

    /// Starts `bin` with the built-in defaults, extra environment and its
    /// store in `data_dir` (which the caller owns, e.g. a fault filesystem).
    pub fn start_on(bin: &Path, env: &[(&str, &str)], data_dir: &Path) -> Self {
        Self::start_full(
            None,
            bin.to_path_buf(),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            Some(data_dir.to_path_buf()),
        )
    }

    fn start_inner(toml: Option<&str>) -> Self {
        Self::start_full(toml, PathBuf::from(GEOKV_BIN), Vec::new(), None)
    }

    fn start_full(
        toml: Option<&str>,
        bin: PathBuf,
        env: Vec<(String, String)>,
        data_dir: Option<PathBuf>,
    ) -> Self {
        let dir = tempfile::Builder::new().prefix("geokv-it-").tempdir().expect("create a temp dir");
        let config_path = toml.map(|text| {
            let path = dir.path().join("config.toml");
            std::fs::write(&path, text).expect("write config.toml");
            path
        });
        // The certificate names the node's region and id, which the config
        // may set.
        let cfg = match toml {
            Some(text) => geokv_server::config::Config::from_toml(text).expect("the test's config parses"),
            None => geokv_server::config::Config::default(),
        };
        let certs_dir = dir.path().join("certs");
        geokv_net::certs::ensure_dev_certs(
            &certs_dir,
            "geokv-test",
            &[(cfg.region.as_str(), cfg.node_id.as_str())],
            &["127.0.0.1", "localhost"],
            &["root"],
        )
        .expect("make the test node's certificates");
        let mut node = Self {
            dir,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            peer_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            config_path,
            admin_tls: cfg.security.admin_tls,
            bin,
            env,
            certs_dir,
            child: None,
            starts: 0,
            addresses_from_file: false,
            data_dir,
        };
        for attempt in 1..=START_ATTEMPTS_MAX {
            node.grpc_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            node.admin_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            node.peer_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            node.spawn();
            match node.wait_ready() {
                Ok(()) => return node,
                Err(why) if attempt < START_ATTEMPTS_MAX && why.contains("binding") => {
                    eprintln!("start attempt {attempt} lost a port race, retrying on new ports: {why}");
                }
                Err(why) => panic!("{why}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts `geokv node --config <config>` with the file as it is: the
    /// node listens on the addresses it names (resolved here as the node
    /// resolves them, to wait for it); the command line gives only the data
    /// directory (in a temp directory) and `certs_dir`.
    pub fn start_from_file(config: &Path, certs_dir: &Path) -> Self {
        use std::net::ToSocketAddrs;
        let text = std::fs::read_to_string(config).expect("read the node's config");
        let cfg = geokv_server::config::Config::from_toml(&text).expect("the node's config parses");
        let ip = |hp: &geokv_server::config::HostPort| {
            (hp.host(), hp.port())
                .to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.next())
                .unwrap_or_else(|| panic!("{}: {hp} does not resolve", config.display()))
        };
        let mut node = Self {
            dir: tempfile::Builder::new().prefix("geokv-it-").tempdir().expect("create a temp dir"),
            grpc_addr: ip(&cfg.listen),
            admin_addr: ip(&cfg.admin_listen),
            peer_addr: ip(&cfg.listen_peer),
            config_path: Some(config.to_path_buf()),
            certs_dir: certs_dir.to_path_buf(),
            admin_tls: cfg.security.admin_tls,
            bin: PathBuf::from(GEOKV_BIN),
            env: Vec::new(),
            child: None,
            starts: 0,
            addresses_from_file: true,
            data_dir: None,
        };
        node.spawn();
        if let Err(why) = node.wait_ready() {
            panic!("node of {} did not start: {why}", config.display());
        }
        node
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// The CA, node and `root` client certificates of this node.
    pub fn certs_dir(&self) -> &Path {
        &self.certs_dir
    }

    /// Client settings for this node (TLS with `root`'s certificate).
    pub fn client_config(&self) -> geokv_client::ClientConfig {
        geokv_client::ClientConfig::new(self.endpoint()).with_certs_dir(self.certs_dir.clone())
    }

    /// `http://127.0.0.1:PORT` of the gRPC API.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// Stderr of the current (or last) run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("node-{start}.log"))
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "spawn while a node process is running");
        self.starts += 1;
        let log = File::create(self.log_path(self.starts)).expect("create the node log");
        let mut cmd = Command::new(&self.bin);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.arg("node");
        if let Some(path) = &self.config_path {
            cmd.arg("--config").arg(path);
        }
        if !self.addresses_from_file {
            cmd.arg("--listen")
                .arg(self.grpc_addr.to_string())
                .arg("--admin-listen")
                .arg(self.admin_addr.to_string())
                .arg("--listen-peer")
                .arg(self.peer_addr.to_string());
        }
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .arg("--certs-dir")
            .arg(&self.certs_dir)
            .env("RUST_LOG", "info")
            .env_remove("GEOKV_CERTS_DIR")
            .env_remove("GEOKV_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        self.child = Some(cmd.spawn().expect("spawn `geokv node`"));
    }

    /// Polls `/health` until the node answers, it exits, or the deadline passes.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Deadline::after(READY_TIMEOUT);
        loop {
            let child = self.child.as_mut().expect("waiting for a spawned node");
            if let Some(status) = child.try_wait().expect("polling the node process") {
                self.child = None;
                return Err(format!("node exited with {status} before it was ready:\n{}", self.log()));
            }
            if self.admin_tls {
                // /health is behind TLS: the gRPC port accepting will do.
                if TcpStream::connect(self.grpc_addr).is_ok() && TcpStream::connect(self.admin_addr).is_ok() {
                    return Ok(());
                }
            } else if let Ok(body) = http_get(self.admin_addr, "/health") {
                if body.contains("\"serving\"") {
                    return Ok(());
                }
            }
            if deadline.passed() {
                let log = self.log();
                self.kill_9();
                return Err(format!("node not ready within {READY_TIMEOUT:?}:\n{log}"));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The body of `GET /health` on the admin port.
    pub fn health(&self) -> String {
        http_get(self.admin_addr, "/health").unwrap_or_else(|e| panic!("GET /health: {e}"))
    }

    /// Kills the node with SIGKILL: no shutdown code runs, as in a crash.
    pub fn kill_9(&mut self) {
        let mut child = self.child.take().expect("kill -9 of a running node");
        child.kill().expect("send SIGKILL");
        let status = child.wait().expect("reap the killed node");
        assert!(!status.success(), "a node killed with SIGKILL reported success");
    }

    /// Sends SIGTERM and waits (bounded) for the node to exit; returns its status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("terminate a running node");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet, so it
        // cannot name another process.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "kill(SIGTERM) failed: {}", std::io::Error::last_os_error());
        let deadline = Deadline::after(TERMINATE_TIMEOUT);
        loop {
            if let Some(status) = child.try_wait().expect("polling the node process") {
                return status;
            }
            if deadline.passed() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("node did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Starts the stopped node again on the same data directory and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a node that is still running");
        self.spawn();
        if let Err(why) = self.wait_ready() {
            panic!("restart failed: {why}");
        }
    }

    /// Runs `geokv ARGS --endpoint 127.0.0.1:PORT`.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let mut cmd = Command::new(GEOKV_BIN);
        cmd.args(args)
            .arg("--endpoint")
            .arg(self.grpc_addr.to_string())
            .env_remove("GEOKV_ENDPOINT")
            .env("GEOKV_CERTS_DIR", &self.certs_dir);
        run_bounded(cmd, CLI_TIMEOUT)
    }

    /// A Rust client connected to this node.
    pub async fn client(&self) -> geokv_client::Client {
        geokv_client::Client::with_config(self.client_config())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.endpoint()))
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("---- log of node {} (start {}) ----\n{}", self.grpc_addr, self.starts, self.log());
            }
        }
    }
}

/// A one-shot HTTP/1.1 GET; returns the body of a 200 response.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let timeout = Duration::from_secs(2);
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("read {addr}{path}: {e}"))?;
    ok_body(&response, path)
}

/// The body of a complete HTTP/1.1 response, if its status is 200.
fn ok_body(response: &str, path: &str) -> Result<String, String> {
    let (head, body) =
        response.split_once("\r\n\r\n").ok_or_else(|| format!("no HTTP header end in {response:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {head}"));
    }
    Ok(body.to_string())
}

/// [`http_get`] over TLS, for an admin port with `security.admin_tls`: the
/// server's certificate must be valid for `addr`'s IP address and signed by
/// the CA in `certs_dir`.
pub async fn https_get(addr: SocketAddr, certs_dir: &Path, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = geokv_net::tls::Tls::load(geokv_net::tls::TlsFiles::ca_only(certs_dir))
        .map_err(|e| format!("the CA in {}: {e}", certs_dir.display()))?;
    let name = rustls_pki_types::ServerName::from(addr.ip());
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let mut stream = tokio_rustls::TlsConnector::from(tls.client_config()).connect(name, stream).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| format!("GET https://{addr}{path}: no answer within 2 s"))?
        .map_err(|e| format!("GET https://{addr}{path}: {e}"))?;
    ok_body(&response, path)
}

/// The home entry of `home` in a `region status`, `region failover` or
/// `region failback` JSON answer, when `holder` holds it.
pub fn home_held_by<'a>(
    answer: &'a serde_json::Value,
    home: &str,
    holder: &str,
) -> Option<&'a serde_json::Value> {
    answer["homes"].as_array()?.iter().find(|h| h["home"] == home && h["holder"] == holder)
}

/// The sum of a Prometheus series over all its label sets in `metrics`
/// (the text of `/metrics`); 0 if absent.
pub fn metric_sum(metrics: &str, name: &str) -> f64 {
    metric_in(metrics, name, &[])
}

/// The sum of the series of `name` on a node's `/metrics` whose labels
/// include every pair of `labels` (0 when there is none).
pub fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let body = http_get(admin, "/metrics").unwrap_or_else(|e| panic!("GET /metrics from {admin}: {e}"));
    metric_in(&body, name, labels)
}

/// [`metric`] over the text of a `/metrics` answer.
pub fn metric_in(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Path of a file under the workspace's `tests/` folder.
pub fn tests_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests").join(relative)
}

/// The `geokv` build with put-back bugs (`geokv-bugs` beside `geokv`, as
/// scripts/check builds it); `GEOKV_BUGS_BIN` overrides.
pub fn bugs_bin() -> PathBuf {
    let bin = std::env::var_os("GEOKV_BUGS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(GEOKV_BIN).with_file_name("geokv-bugs"));
    assert!(
        bin.exists(),
        "{} is missing; build it with: cargo build -p geokv --features geokv-server/bugs && \
         cp $CARGO_TARGET_DIR/debug/geokv $CARGO_TARGET_DIR/debug/geokv-bugs && cargo build -p geokv",
        bin.display()
    );
    bin
}

/// 24 bytes no other data holds, from the clock, the process id and
/// `tag`: no 4-byte run of them is likely to occur elsewhere in a block, so
/// LZ4 (the `data` column family's compression) stores them verbatim
/// instead of as a back-reference (a readable tag sharing a word with a
/// key would not be). Their edges are the exception: a value's last byte
/// and the three bytes of row encoding after it recur wherever another
/// value ends in the same byte (about one row in 256), and LZ4 then stores
/// those four bytes as a back-reference. [`found_in`] looks for the
/// middle 16 bytes only.
pub fn marker(tag: &[u8; 8]) -> Vec<u8> {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
        ^ (u64::from(std::process::id()) << 32)
        ^ u64::from_le_bytes(*tag);
    let mut out = Vec::with_capacity(24);
    for _ in 0..24 {
        // xorshift64*
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.push((seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8);
    }
    out
}

/// Whether any file under `dir` contains `needle`.
pub fn store_holds(dir: &Path, needle: &[u8]) -> bool {
    !found_in(dir, &[needle.to_vec()]).is_empty()
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Bytes of a [`marker`] left out at each end when the stores are
/// searched for it.
const MARKER_EDGE: usize = 4;

/// The part of `needle` a byte scan looks for: a marker's middle (see
/// [`marker`]), anything shorter than a marker whole.
fn scanned_part(needle: &[u8]) -> &[u8] {
    if needle.len() >= 16 + 2 * MARKER_EDGE {
        &needle[MARKER_EDGE..needle.len() - MARKER_EDGE]
    } else {
        needle
    }
}

/// The indexes of the needles (markers) found in any file under `dir`
/// (each file read once), each by its middle bytes ([`scanned_part`]).
pub fn found_in(dir: &Path, needles: &[Vec<u8>]) -> Vec<usize> {
    let mut hits = vec![false; needles.len()];
    for path in files_under(dir) {
        let Ok(bytes) = std::fs::read(&path) else { continue };
        for (i, n) in needles.iter().enumerate() {
            let n = scanned_part(n);
            if !hits[i] && bytes.windows(n.len()).any(|w| w == n) {
                hits[i] = true;
            }
        }
    }
    hits.iter().enumerate().filter(|(_, h)| **h).map(|(i, _)| i).collect()
}

/// Awaits `run`, a check run with a put-back bug switched on, and returns
/// its panic message; panics unless it failed, and with a message that
/// contains `needle` (the check the bug is for, not another one).
pub async fn expect_caught<T: std::fmt::Debug>(run: tokio::task::JoinHandle<T>, needle: &str) -> String {
    let failure = match run.await {
        Ok(done) => panic!("every check held with the bug on: {done:?}"),
        Err(e) => e.into_panic(),
    };
    let message = failure
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| failure.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        message.contains(needle),
        "the bug was not caught by the check for `{needle}` but failed otherwise: {message}"
    );
    eprintln!("caught: {message}");
    message
}
