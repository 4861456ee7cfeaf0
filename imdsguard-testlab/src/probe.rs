//! Probes: what a "pod" does, run as a separate process placed in a test
//! cgroup and network namespace.
//!
//! A binary that spawns probes re-executes itself: it calls
//! [`run_if_probe`] first thing in `main`, and [`spawn`] starts
//! `current_exe() __imdsguard_probe KIND TARGET ...`. Placement happens
//! between fork and exec: the child writes `0` to the target cgroup's
//! `cgroup.procs` (moving itself) and joins the namespace, so the probe's
//! very first instruction already runs where the test wants it.

use std::{
    fs::OpenOptions,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::netns::NetNs;

pub const PROBE_ARG: &str = "__imdsguard_probe";
const EPERM: i32 = libc::EPERM;

/// What happened to one attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Outcome {
    /// The destination answered.
    Reached { detail: String },
    /// connect()/sendmsg() failed with EPERM: denied by a cgroup program.
    Eperm,
    /// Anything else (refused, timeout, ...).
    Failed { errno: Option<i32>, detail: String },
}

impl Outcome {
    pub fn reached(&self) -> bool {
        matches!(self, Outcome::Reached { .. })
    }
    pub fn eperm(&self) -> bool {
        matches!(self, Outcome::Eperm)
    }
    fn from_io(e: &std::io::Error, what: &str) -> Self {
        match e.raw_os_error() {
            Some(EPERM) => Outcome::Eperm,
            errno => Outcome::Failed {
                errno,
                detail: format!("{what}: {e}"),
            },
        }
    }
}

/// Counts from a probe loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopReport {
    pub reached: u64,
    pub eperm: u64,
    pub other: u64,
}

/// If this process was started as a probe, run it, print the JSON result
/// on stdout and exit. Otherwise return.
pub fn run_if_probe() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some(PROBE_ARG) {
        return;
    }
    let json = match probe_main(&args[2..]) {
        Ok(json) => json,
        Err(e) => serde_json::to_string(&Outcome::Failed {
            errno: None,
            detail: format!("probe: {e:#}"),
        })
        .expect("serialise"),
    };
    println!("{json}");
    std::process::exit(0);
}

fn probe_main(args: &[String]) -> anyhow::Result<String> {
    let kind = args.first().context("probe kind missing")?;
    if kind == "bench" {
        return crate::bench::worker_main(&args[1..]);
    }
    let target: SocketAddr = args
        .get(1)
        .context("probe target missing")?
        .parse()
        .context("probe target")?;
    let out = match kind.as_str() {
        "http" => serde_json::to_string(&imds_http(target))?,
        "tcp" => serde_json::to_string(&tcp_connect(target))?,
        "udp-sendto" => serde_json::to_string(&udp(target, false))?,
        "udp-connect" => serde_json::to_string(&udp(target, true))?,
        "tcp-loop" => {
            let millis: u64 = args.get(2).context("loop duration missing")?.parse()?;
            serde_json::to_string(&tcp_loop(target, Duration::from_millis(millis)))?
        }
        other => bail!("unknown probe kind {other:?}"),
    };
    Ok(out)
}

fn tcp_connect(target: SocketAddr) -> Outcome {
    match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
        Ok(_) => Outcome::Reached {
            detail: format!("connected to {target}"),
        },
        Err(e) => Outcome::from_io(&e, "connect"),
    }
}

fn tcp_loop(target: SocketAddr, duration: Duration) -> LoopReport {
    let mut r = LoopReport::default();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        match tcp_connect(target) {
            Outcome::Reached { .. } => r.reached += 1,
            Outcome::Eperm => r.eperm += 1,
            Outcome::Failed { .. } => r.other += 1,
        }
    }
    r
}

fn http_exchange(target: SocketAddr, request: &str) -> Result<String, Outcome> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .map_err(|e| Outcome::from_io(&e, "connect"))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    s.write_all(request.as_bytes())
        .map_err(|e| Outcome::from_io(&e, "write"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| Outcome::from_io(&e, "read"))?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(Outcome::Failed {
            errno: None,
            detail: head.lines().next().unwrap_or("").into(),
        });
    }
    Ok(body.to_string())
}

/// IMDSv2: PUT a token, then GET the instance id with it.
fn imds_http(target: SocketAddr) -> Outcome {
    let host = target.ip();
    let token = match http_exchange(
        target,
        &format!(
            "PUT /latest/api/token HTTP/1.1\r\nHost: {host}\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n"
        ),
    ) {
        Ok(t) => t,
        Err(o) => return o,
    };
    match http_exchange(
        target,
        &format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: {host}\r\nX-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n"
        ),
    ) {
        Ok(id) => Outcome::Reached { detail: id },
        Err(o) => o,
    }
}

/// UDP to `target`: with `connect`, connect() first (the connect hook
/// judges it); without, an unconnected sendto (the sendmsg hook judges it).
fn udp(target: SocketAddr, connect: bool) -> Outcome {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let sock = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => return Outcome::from_io(&e, "bind"),
    };
    sock.set_read_timeout(Some(Duration::from_secs(1))).ok();
    let sent = if connect {
        sock.connect(target)
            .and_then(|()| sock.send(b"imdsguard-probe"))
    } else {
        sock.send_to(b"imdsguard-probe", target)
    };
    if let Err(e) = sent {
        return Outcome::from_io(&e, if connect { "connect/send" } else { "sendto" });
    }
    let mut buf = [0u8; 64];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => Outcome::Reached {
            detail: format!("{n} bytes echoed by {from}"),
        },
        Err(e) => Outcome::from_io(&e, "recv"),
    }
}

/// Starts `exe PROBE_ARG args...` inside `ns` and, when given, `cgroup`.
/// `exe` must call [`run_if_probe`] at the start of its main.
pub fn spawn(
    exe: &Path,
    cgroup: Option<&Path>,
    ns: &NetNs,
    args: &[&str],
) -> anyhow::Result<Child> {
    let procs = cgroup
        .map(|c| {
            let p = c.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&p)
                .with_context(|| format!("open {}", p.display()))
        })
        .transpose()?;
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    let ns_fd = ns.raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg(PROBE_ARG)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: between fork and exec we only call write(2) and setns(2) on
    // fds opened before the fork; both are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("spawn probe {}", exe.display()))?;
    drop(procs);
    Ok(child)
}

/// Waits for a probe started by [`spawn`] and parses its JSON line.
pub fn wait<T: for<'de> Deserialize<'de>>(
    mut child: Child,
    timeout: Duration,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("probe did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("probe stdout")?
        .read_to_string(&mut out)?;
    serde_json::from_str(out.trim()).with_context(|| format!("probe printed {out:?}"))
}

/// Spawns a one-shot probe and waits for its outcome.
pub fn run(
    exe: &Path,
    cgroup: Option<&Path>,
    ns: &NetNs,
    kind: &str,
    target: &str,
) -> anyhow::Result<Outcome> {
    wait(
        spawn(exe, cgroup, ns, &[kind, target])?,
        Duration::from_secs(15),
    )
}
