//! Probes: what a "pod" does, run as a separate process placed in a test
//! cgroup and network namespace.
//!
//! A binary that spawns probes re-executes itself: it calls
//! [`run_if_probe`] first thing in `main`, and [`spawn`] starts
//! `current_exe() __imdsguard_probe KIND TARGET ...`. Placement happens
//! between fork and exec: the child writes `0` to the target cgroup's
//! `cgroup.procs` (moving itself) and joins the namespace, so the probe's
//! very first instruction already runs where the test wants it.
//!
//! The probes themselves: `plain` connects, HTTP and UDP; the hardening
//! probes of `sockaddr` (odd sockaddrs), `stream` (TCP Fast Open, MPTCP)
//! and `uring` (io_uring), with what they share in `socket`; `raw`
//! sockets; and the `socket_loop` of the sock_create benchmark.

use std::{
    fs::OpenOptions,
    io::Read as _,
    net::SocketAddr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::netns::NetNs;

mod plain;
mod raw;
mod sockaddr;
mod socket;
mod socket_loop;
mod stream;
mod uring;

pub use socket_loop::SocketLoopReport;

pub use plain::monotonic_ns;
use plain::{imds_http, tcp_connect, tcp_loop, tcp_loop_timed, udp};
use raw::{Icmp, icmp_echo, packet_socket};
use sockaddr::{tcp6_with_sin, udp4_sendto_unspec, udp6_with_sin};
use socket_loop::socket_loop;
use stream::{Stream, Via, stream};

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
    pub(crate) fn from_io(e: &std::io::Error, what: &str) -> Self {
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

/// Counts from a timed probe loop: attempts not denied are "through", and
/// the start of the first and the last of them is noted (CLOCK_MONOTONIC,
/// [`monotonic_ns`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimedLoopReport {
    pub reached: u64,
    pub eperm: u64,
    /// Not denied, not reached either (refused, timed out).
    pub other: u64,
    pub first_through_ns: Option<u64>,
    pub last_through_ns: Option<u64>,
}

impl TimedLoopReport {
    /// Attempts the hooks did not deny.
    pub fn through(&self) -> u64 {
        self.reached + self.other
    }
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
        "imds-get" => {
            let path = args.get(2).context("path missing")?;
            serde_json::to_string(&plain::imds_get(target, path))?
        }
        "tcp" => serde_json::to_string(&tcp_connect(target))?,
        "udp-sendto" => serde_json::to_string(&udp(target, false))?,
        "udp-connect" => serde_json::to_string(&udp(target, true))?,
        "tcp-loop" => {
            let millis: u64 = args.get(2).context("loop duration missing")?.parse()?;
            serde_json::to_string(&tcp_loop(target, Duration::from_millis(millis)))?
        }
        "tcp-loop-timed" => {
            let millis: u64 = args.get(2).context("loop duration missing")?.parse()?;
            serde_json::to_string(&tcp_loop_timed(target, Duration::from_millis(millis)))?
        }
        "udp-sendto-unspec" => serde_json::to_string(&udp4_sendto_unspec(target))?,
        "udp6-sin-connect" => serde_json::to_string(&udp6_with_sin(target, true))?,
        "udp6-sin-sendto" => serde_json::to_string(&udp6_with_sin(target, false))?,
        "tcp6-sin" => serde_json::to_string(&tcp6_with_sin(target, false))?,
        "tcp6-sin-padded" => serde_json::to_string(&tcp6_with_sin(target, true))?,
        "tcp-fastopen-sendto" => {
            serde_json::to_string(&stream(target, Stream::Tcp, Via::FastOpenSendto))?
        }
        "tcp-fastopen-connect" => {
            serde_json::to_string(&stream(target, Stream::Tcp, Via::FastOpenConnect))?
        }
        "mptcp" => serde_json::to_string(&stream(target, Stream::Mptcp, Via::Connect))?,
        "mptcp-fastopen-sendto" => {
            serde_json::to_string(&stream(target, Stream::Mptcp, Via::FastOpenSendto))?
        }
        "io-uring-connect" => serde_json::to_string(&stream(
            target,
            Stream::Tcp,
            Via::IoUring(uring::Issue::Inline),
        ))?,
        "io-uring-connect-async" => serde_json::to_string(&stream(
            target,
            Stream::Tcp,
            Via::IoUring(uring::Issue::Worker),
        ))?,
        "io-uring-connect-sqpoll" => serde_json::to_string(&stream(
            target,
            Stream::Tcp,
            Via::IoUring(uring::Issue::SqPoll),
        ))?,
        "io-uring-udp-sendmsg" => {
            serde_json::to_string(&uring::udp_sendmsg(target, uring::Issue::Inline))?
        }
        "io-uring-udp-sendmsg-sqpoll" => {
            serde_json::to_string(&uring::udp_sendmsg(target, uring::Issue::SqPoll))?
        }
        "raw-icmp" => serde_json::to_string(&icmp_echo(target, Icmp::Raw))?,
        "ping" => serde_json::to_string(&icmp_echo(target, Icmp::Ping))?,
        // The target is not used.
        "packet-socket" => serde_json::to_string(&packet_socket())?,
        "pass-socket" | "receive-socket" | "hold" => {
            return handoff_probe(kind, target, &args[2..]);
        }
        "socket-loop" => {
            let iterations: u32 = args.get(2).context("iterations missing")?.parse()?;
            serde_json::to_string(&socket_loop(target, iterations))?
        }
        other => bail!("unknown probe kind {other:?}"),
    };
    Ok(out)
}

/// The probes of [`crate::handoff`]: `KIND TARGET ARG TRANSPORT`.
fn handoff_probe(kind: &str, target: SocketAddr, rest: &[String]) -> anyhow::Result<String> {
    use crate::handoff::{self, Transport};
    let arg = rest.first().context("probe argument missing")?;
    let transport: Transport = rest.get(1).context("transport missing")?.parse()?;
    let path = Path::new(arg);
    Ok(match kind {
        "pass-socket" => serde_json::to_string(&handoff::pass_socket(target, path, transport))?,
        "receive-socket" => {
            serde_json::to_string(&handoff::receive_socket(target, path, transport))?
        }
        _ => handoff::hold(target, Duration::from_millis(arg.parse()?), transport)?,
    })
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
