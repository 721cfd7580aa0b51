//! Child processes on loopback: free ports, readiness with a deadline, and a
//! stop that always runs (on success, on error, on Ctrl-C, on panic).
//!
//! Every peer the tool starts is a [`Child`]. Dropping it sends SIGTERM,
//! waits a bounded time, then sends SIGKILL and reaps the process, so no
//! peer outlives the run. Children are also started with
//! `PR_SET_PDEATHSIG = SIGKILL`, so a load generator killed with `-9` takes
//! its peers with it.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a stopping child gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bytes of a child's log shown when it fails.
const LOG_TAIL_BYTES: u64 = 4096;
/// Longest a single readiness probe may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// A started peer process, stopped when dropped.
pub struct Child {
    /// Shown in errors ("etcd member n1").
    name: String,
    /// None once the process has been reaped.
    child: Option<std::process::Child>,
    /// Where its stdout and stderr go; its tail is quoted when it fails.
    log_path: PathBuf,
    /// Time between SIGTERM and SIGKILL when stopping.
    stop_grace: Duration,
}

impl Child {
    /// Starts `cmd` with stdout and stderr appended to `log_path`.
    ///
    /// Must be called from a thread that lives for the whole run (the main
    /// thread): the kernel delivers the parent-death signal when the thread
    /// that forked exits, not only when the process does.
    pub fn spawn(name: impl Into<String>, mut cmd: Command, log_path: &Path) -> Result<Self> {
        let name = name.into();
        let log =
            File::create(log_path).with_context(|| format!("creating log file {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        // Its own process group, so a Ctrl-C in the terminal reaches only the
        // load generator, which then stops its peers in order.
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours;
        // nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self { name, child: Some(child), log_path: log_path.to_path_buf(), stop_grace: STOP_GRACE })
    }

    /// Gives the process `grace` between SIGTERM and SIGKILL when stopped
    /// (a process that stops children of its own needs longer than a peer).
    pub fn with_stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Fails, quoting the log, when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} was already stopped", self.name);
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                bail!("{} exited with {status}; last lines of its log:\n{}", self.name, self.log_tail())
            }
            Err(e) => bail!("cannot query {}: {e}", self.name),
        }
    }

    /// The end of the process's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }

    /// SIGTERM, a bounded wait, then SIGKILL; always reaps the process.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: plain syscall on a pid we spawned and have not reaped,
            // so it cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + self.stop_grace;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last few kilobytes of a log file, or why it cannot be read.
pub fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

/// `n` distinct loopback ports that were free a moment ago.
///
/// All listeners are held until every port is chosen, so the ports differ;
/// another process may still take one before the peer binds it, which then
/// shows up as a startup failure naming the port.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port"))
        .collect::<Result<Vec<_>>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Checks that a peer's binary exists and is a file, with an install hint.
pub fn require_binary(path: &Path, hint: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        bail!("no executable at {}: {hint}", path.display())
    }
}

/// Runs `probe` until it succeeds, `alive` fails, or `timeout` passes.
pub async fn wait_ready<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<()>,
    mut probe: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        alive()?;
        let last = match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("probe took longer than {PROBE_TIMEOUT:?}"),
        };
        if Instant::now() >= deadline {
            bail!("{what} not ready after {timeout:?}: {last}");
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// CPU time (user + system) a process has used so far, in seconds, from
/// `/proc/<pid>/stat`; None when it cannot be read (not Linux, process gone).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_cpu_ticks(&stat)?;
    // SAFETY: sysconf reads a constant of the system; no memory is touched.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_s > 0).then(|| ticks as f64 / per_s as f64)
}

/// utime + stime, in clock ticks, from the text of `/proc/<pid>/stat`. The
/// command name (field 2) is in parentheses and may hold spaces, so the
/// fields are counted from the last `)`: state is field 3, utime 14, stime 15.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The summed CPU seconds of `pids`; None if any cannot be read.
pub fn cpu_seconds_of(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

#[cfg(test)]
mod cpu_tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "4242 (geokv node (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("4242 (short) S 1"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        // Busy for 100 ms of wall time: at least one clock tick of CPU.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let used = cpu_seconds(std::process::id()).expect("/proc/self/stat");
        assert!(used > 0.0, "{used}");
    }
}
