//! Runs the `imdsguard` binary as a child process, the way a node would.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::netns::NetNs;

/// A running `imdsguard run`. Drop SIGKILLs it (enforcement stays pinned;
/// the lab's private bpffs takes the pins away).
pub struct Daemon {
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
}

impl Daemon {
    /// Starts `bin run ARGS --log-format json` and waits for its `ready` line.
    pub fn start(bin: &Path, args: &[String]) -> anyhow::Result<Self> {
        Self::start_subcommand(bin, "run", args, &[])
    }

    /// Starts `bin SUBCOMMAND ARGS` with extra environment variables and
    /// waits for its `ready` line.
    pub fn start_subcommand(
        bin: &Path,
        subcommand: &str,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut d = Self::spawn_subcommand(bin, subcommand, args, envs)?;
        d.wait_for(Duration::from_secs(30), |v| message(v) == Some("ready"))
            .context("daemon did not become ready")?;
        Ok(d)
    }

    /// Starts `bin SUBCOMMAND ARGS` like [`Daemon::start_subcommand`], but
    /// returns at once: for tests of what it does before it is ready.
    pub fn spawn_subcommand(
        bin: &Path,
        subcommand: &str,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::spawn_command(Command::new(bin), bin, subcommand, args, envs)
    }

    /// Starts `bin run ARGS` inside `netns` (filter mode: its proxy must
    /// listen where the probes are) and waits for its `ready` line.
    pub fn start_in(netns: &NetNs, bin: &Path, args: &[String]) -> anyhow::Result<Self> {
        let program = bin.to_str().context("daemon path is not UTF-8")?;
        let mut d = Self::spawn_command(netns.command(program), bin, "run", args, &[])?;
        d.wait_for(Duration::from_secs(30), |v| message(v) == Some("ready"))
            .context("daemon did not become ready")?;
        Ok(d)
    }

    fn spawn_command(
        mut command: Command,
        bin: &Path,
        subcommand: &str,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut child = command
            .arg("--log-format")
            .arg("json")
            .arg(subcommand)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let stderr = child.stderr.take().context("daemon stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().expect("log lock").push(v);
            }
        });
        Ok(Self { child, logs })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().expect("log lock").clone()
    }

    /// Waits for a log line matching `pred`; errors (with the log) if the
    /// daemon exits or the timeout passes first.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.logs().into_iter().find(&pred) {
                return Ok(v);
            }
            if let Some(status) = self.child.try_wait()? {
                std::thread::sleep(Duration::from_millis(50));
                bail!("daemon exited ({status}); log:\n{}", self.render_logs());
            }
            if Instant::now() > deadline {
                bail!("timed out; log:\n{}", self.render_logs());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn render_logs(&self) -> String {
        self.logs()
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILL: no cleanup code of the daemon runs.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        Ok(self.child.wait()?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `message` field of a JSON log line.
pub fn message(v: &Value) -> Option<&str> {
    v.get("message").and_then(Value::as_str)
}

/// Runs a one-shot `imdsguard` subcommand (status, uninstall, ...).
pub fn command(bin: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("run {} {}", bin.display(), args.join(" ")))
}

/// `imdsguard status -o json --pin-dir DIR`, parsed.
pub fn status(bin: &Path, pin_dir: &Path) -> anyhow::Result<Value> {
    let out = command(
        bin,
        &[
            "status",
            "-o",
            "json",
            "--pin-dir",
            &pin_dir.display().to_string(),
        ],
    )?;
    if !out.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub fn pin_dir_in(bpffs: &Path) -> PathBuf {
    bpffs.join("imdsguard")
}
