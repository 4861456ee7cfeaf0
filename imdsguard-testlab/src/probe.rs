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
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
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
            serde_json::to_string(&io_uring_udp_sendmsg(target, uring::Issue::Inline))?
        }
        "io-uring-udp-sendmsg-sqpoll" => {
            serde_json::to_string(&io_uring_udp_sendmsg(target, uring::Issue::SqPoll))?
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

// Probes for the less travelled ways to a destination (hardening tests):
// odd sockaddrs, TCP Fast Open, MPTCP and io_uring. Each reports the outcome
// of the one syscall a cgroup hook judges through `Outcome::from_io`; set-up
// failures (socket(), setsockopt(), io_uring_setup()) are reported as
// `Failed` even when their errno is EPERM, so they can never pass for a
// denial.

/// What the HTTP probes send; the fake server answers `200 fake-metadata`.
const HTTP_GET: &str = "GET /latest/meta-data/ HTTP/1.1\r\nHost: imds\r\nConnection: close\r\n\r\n";
const UDP_PAYLOAD: &[u8] = b"imdsguard-probe";

fn setup_failed(e: &std::io::Error, what: &str) -> Outcome {
    Outcome::Failed {
        errno: e.raw_os_error(),
        detail: format!("{what} (set-up, not the judged call): {e}"),
    }
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn raw_socket(family: i32, ty: i32, protocol: i32) -> Result<OwnedFd, Outcome> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(setup_failed(&last_error(), "socket"));
    }
    // SAFETY: socket(2) returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ipv4_only(target: SocketAddr) -> Result<SocketAddrV4, Outcome> {
    match target {
        SocketAddr::V4(t) => Ok(t),
        SocketAddr::V6(_) => Err(Outcome::Failed {
            errno: None,
            detail: format!("this probe takes an IPv4 target, not {target}"),
        }),
    }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A `sockaddr_in` in a buffer as long as a `sockaddr_in6`, to get past the
/// IPv6 code's length checks.
#[repr(C)]
struct PaddedSockaddrIn {
    sin: libc::sockaddr_in,
    _pad: [u8; 12],
}
const _: () = assert!(size_of::<PaddedSockaddrIn>() == size_of::<libc::sockaddr_in6>());

fn recv_echo(sock: &UdpSocket) -> Outcome {
    sock.set_read_timeout(Some(Duration::from_secs(1))).ok();
    let mut buf = [0u8; 64];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => Outcome::Reached {
            detail: format!("{n} bytes echoed by {from}"),
        },
        Err(e) => Outcome::from_io(&e, "recv"),
    }
}

fn bind_udp(v4: bool) -> Result<UdpSocket, Outcome> {
    UdpSocket::bind(if v4 { "0.0.0.0:0" } else { "[::]:0" }).map_err(|e| setup_failed(&e, "bind"))
}

/// An AF_INET UDP socket's sendto() with `sin_family = AF_UNSPEC`:
/// udp_sendmsg() accepts AF_UNSPEC as an IPv4 destination.
fn udp4_sendto_unspec(target: SocketAddr) -> Outcome {
    let result = (|| {
        let t = ipv4_only(target)?;
        let sock = bind_udp(true)?;
        let mut sin = sockaddr_in(t);
        sin.sin_family = libc::AF_UNSPEC as libc::sa_family_t;
        // SAFETY: valid buffer and sockaddr with their lengths.
        let rc = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                UDP_PAYLOAD.as_ptr().cast(),
                UDP_PAYLOAD.len(),
                0,
                (&raw const sin).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(Outcome::from_io(&last_error(), "sendto(AF_UNSPEC)"));
        }
        Ok(recv_echo(&sock))
    })();
    result.unwrap_or_else(|o| o)
}

/// A dual-stack AF_INET6 UDP socket given a `sockaddr_in` (AF_INET), by
/// connect() then send(), or by sendto().
fn udp6_with_sin(target: SocketAddr, connect: bool) -> Outcome {
    let result = (|| {
        let sin = sockaddr_in(ipv4_only(target)?);
        let sock = bind_udp(false)?;
        let (addr, len) = (
            (&raw const sin).cast::<libc::sockaddr>(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if connect {
            // SAFETY: valid sockaddr and length.
            if unsafe { libc::connect(sock.as_raw_fd(), addr, len) } != 0 {
                return Err(Outcome::from_io(&last_error(), "connect(sockaddr_in)"));
            }
            sock.send(UDP_PAYLOAD)
                .map_err(|e| Outcome::from_io(&e, "send"))?;
        } else {
            // SAFETY: valid buffer and sockaddr with their lengths.
            let rc = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    UDP_PAYLOAD.as_ptr().cast(),
                    UDP_PAYLOAD.len(),
                    0,
                    addr,
                    len,
                )
            };
            if rc < 0 {
                return Err(Outcome::from_io(&last_error(), "sendto(sockaddr_in)"));
            }
        }
        Ok(recv_echo(&sock))
    })();
    result.unwrap_or_else(|o| o)
}

/// An AF_INET6 TCP socket given a `sockaddr_in`, with its own length or
/// padded to the length of a `sockaddr_in6`.
fn tcp6_with_sin(target: SocketAddr, padded: bool) -> Outcome {
    let result = (|| {
        let buf = PaddedSockaddrIn {
            sin: sockaddr_in(ipv4_only(target)?),
            _pad: [0; 12],
        };
        let fd = raw_socket(libc::AF_INET6, libc::SOCK_STREAM, 0)?;
        let len = if padded {
            size_of::<PaddedSockaddrIn>()
        } else {
            size_of::<libc::sockaddr_in>()
        };
        // SAFETY: `buf` holds at least `len` bytes.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const buf).cast(),
                len as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Outcome::from_io(&last_error(), "connect(sockaddr_in)"));
        }
        Ok(Outcome::Reached {
            detail: format!("connected to {:?}", TcpStream::from(fd).peer_addr()),
        })
    })();
    result.unwrap_or_else(|o| o)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    Tcp,
    /// `IPPROTO_MPTCP`: the connect runs on an in-kernel subflow socket.
    Mptcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Connect,
    /// sendto(MSG_FASTOPEN) on an unconnected socket: connect and data in one.
    FastOpenSendto,
    /// setsockopt(TCP_FASTOPEN_CONNECT), then a connect() that returns
    /// before any SYN is sent.
    FastOpenConnect,
    /// IORING_OP_CONNECT through a ring of our own.
    IoUring(uring::Issue),
}

/// A stream connection made some other way than a plain connect(), then an
/// HTTP GET on it. The detail names the path (and for MPTCP whether the
/// connection really is MPTCP or fell back to TCP).
fn stream(target: SocketAddr, kind: Stream, via: Via) -> Outcome {
    let result = (|| {
        let family = if target.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let protocol = match kind {
            Stream::Tcp => 0,
            Stream::Mptcp => libc::IPPROTO_MPTCP,
        };
        let fd = raw_socket(family, libc::SOCK_STREAM, protocol)?;
        let addr = socket2::SockAddr::from(target);
        let (ptr, len) = (addr.as_ptr().cast::<libc::sockaddr>(), addr.len());
        let raw = fd.as_raw_fd();
        let request_sent = match via {
            Via::Connect | Via::FastOpenConnect => {
                if via == Via::FastOpenConnect {
                    let on: libc::c_int = 1;
                    // SAFETY: an int option with its size.
                    let rc = unsafe {
                        libc::setsockopt(
                            raw,
                            libc::IPPROTO_TCP,
                            libc::TCP_FASTOPEN_CONNECT,
                            (&raw const on).cast(),
                            size_of::<libc::c_int>() as libc::socklen_t,
                        )
                    };
                    if rc != 0 {
                        return Err(setup_failed(
                            &last_error(),
                            "setsockopt(TCP_FASTOPEN_CONNECT)",
                        ));
                    }
                }
                // SAFETY: valid sockaddr and length.
                if unsafe { libc::connect(raw, ptr, len) } != 0 {
                    return Err(Outcome::from_io(&last_error(), "connect"));
                }
                false
            }
            Via::FastOpenSendto => {
                // SAFETY: valid buffer and sockaddr with their lengths.
                let rc = unsafe {
                    libc::sendto(
                        raw,
                        HTTP_GET.as_ptr().cast(),
                        HTTP_GET.len(),
                        libc::MSG_FASTOPEN,
                        ptr,
                        len,
                    )
                };
                if rc < 0 {
                    return Err(Outcome::from_io(&last_error(), "sendto(MSG_FASTOPEN)"));
                }
                if rc as usize != HTTP_GET.len() {
                    return Err(Outcome::Failed {
                        errno: None,
                        detail: format!("sendto(MSG_FASTOPEN) sent {rc} bytes"),
                    });
                }
                true
            }
            Via::IoUring(issue) => {
                let sqe = uring::Sqe {
                    opcode: uring::OP_CONNECT,
                    fd: raw,
                    addr: ptr as u64,
                    // `addr2`, the sockaddr length for IORING_OP_CONNECT.
                    off: u64::from(len),
                    ..Default::default()
                };
                let res = uring::run_one(&sqe, issue).map_err(|e| setup_failed(&e, "io_uring"))?;
                if res < 0 {
                    let e = std::io::Error::from_raw_os_error(-res);
                    return Err(Outcome::from_io(&e, "IORING_OP_CONNECT"));
                }
                false
            }
        };
        let mptcp = match kind {
            Stream::Tcp => String::new(),
            Stream::Mptcp => format!(", {}", mptcp_state(raw)),
        };
        let mut s = TcpStream::from(fd);
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        if !request_sent {
            s.write_all(HTTP_GET.as_bytes())
                .map_err(|e| Outcome::from_io(&e, "write"))?;
        }
        // The handshake is over once the request is out (blocking socket).
        let syn_data = if kind == Stream::Tcp && syn_data_acked(raw) {
            ", syn-data"
        } else {
            ""
        };
        let mut resp = String::new();
        s.read_to_string(&mut resp)
            .map_err(|e| Outcome::from_io(&e, "read"))?;
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        if !head.starts_with("HTTP/1.1 200") {
            return Err(Outcome::Failed {
                errno: None,
                detail: format!("answer: {head:?}"),
            });
        }
        Ok(Outcome::Reached {
            detail: format!("{body} via {via:?}{mptcp}{syn_data}"),
        })
    })();
    result.unwrap_or_else(|o| o)
}

/// Whether the SYN carried data that the server acknowledged: a real TCP
/// Fast Open, not the cookie-less fallback to a normal handshake.
fn syn_data_acked(fd: i32) -> bool {
    const TCPI_OPT_SYN_DATA: u8 = 32;
    // struct tcp_info: `tcpi_options` is its sixth byte.
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    rc == 0 && len > 5 && info[5] & TCPI_OPT_SYN_DATA != 0
}

/// "mptcp" for a connection that speaks MPTCP, "mptcp-fallback" for one
/// that fell back to plain TCP (SOL_MPTCP options then fail, or
/// MPTCP_INFO_FLAG_FALLBACK is set).
fn mptcp_state(fd: i32) -> &'static str {
    const SOL_MPTCP: i32 = 284;
    const MPTCP_INFO: i32 = 1;
    const MPTCP_INFO_FLAG_FALLBACK: u32 = 1;
    // struct mptcp_info: six u8 counters, then `mptcpi_flags` at offset 8.
    let mut info = [0u32; 64];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            SOL_MPTCP,
            MPTCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 || len < 12 || info[2] & MPTCP_INFO_FLAG_FALLBACK != 0 {
        "mptcp-fallback"
    } else {
        "mptcp"
    }
}

/// An unconnected UDP send through IORING_OP_SENDMSG.
fn io_uring_udp_sendmsg(target: SocketAddr, issue: uring::Issue) -> Outcome {
    let result = (|| {
        let sock = bind_udp(target.is_ipv4())?;
        let addr = socket2::SockAddr::from(target);
        let mut iov = libc::iovec {
            iov_base: UDP_PAYLOAD.as_ptr().cast_mut().cast(),
            iov_len: UDP_PAYLOAD.len(),
        };
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = addr.as_ptr().cast_mut().cast();
        msg.msg_namelen = addr.len();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        let sqe = uring::Sqe {
            opcode: uring::OP_SENDMSG,
            fd: sock.as_raw_fd(),
            addr: (&raw const msg) as u64,
            len: 1,
            ..Default::default()
        };
        let res = uring::run_one(&sqe, issue).map_err(|e| setup_failed(&e, "io_uring"))?;
        if res < 0 {
            let e = std::io::Error::from_raw_os_error(-res);
            return Err(Outcome::from_io(&e, "IORING_OP_SENDMSG"));
        }
        Ok(recv_echo(&sock))
    })();
    result.unwrap_or_else(|o| o)
}

// Probes for raw sockets (`--deny-raw-sockets`). Here socket() is the call
// the sock_create hook judges, so its EPERM is reported as `Eperm`; every
// later failure is `Failed`. Nothing leaves the lab namespace: the targets
// are addresses on its `lo`.

/// How an ICMP echo probe opens its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Icmp {
    /// SOCK_RAW (needs CAP_NET_RAW): the probe writes the whole ICMP message.
    Raw,
    /// SOCK_DGRAM "ping socket" (needs the gid in `net.ipv4.ping_group_range`):
    /// the kernel sets the echo id and checksum.
    Ping,
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// RFC 1071 Internet checksum.
fn inet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP echo request to `target` (its port is ignored) and its reply.
/// Reached means the reply came back.
fn icmp_echo(target: SocketAddr, via: Icmp) -> Outcome {
    use socket2::{Domain, Protocol, Socket, Type};
    let v4 = target.is_ipv4();
    let (domain, protocol, request, reply) = if v4 {
        (
            Domain::IPV4,
            Protocol::ICMPV4,
            ICMP_ECHO_REQUEST,
            ICMP_ECHO_REPLY,
        )
    } else {
        (
            Domain::IPV6,
            Protocol::ICMPV6,
            ICMPV6_ECHO_REQUEST,
            ICMPV6_ECHO_REPLY,
        )
    };
    let ty = match via {
        Icmp::Raw => Type::RAW,
        Icmp::Ping => Type::DGRAM,
    };
    let sock = match Socket::new(domain, ty, Some(protocol)) {
        Ok(s) => s,
        Err(e) => return Outcome::from_io(&e, "socket"),
    };
    let result = (|| {
        sock.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| setup_failed(&e, "SO_RCVTIMEO"))?;
        // A ping socket replaces the id with its own; a raw one keeps ours.
        let id = (std::process::id() as u16).to_be_bytes();
        let mut msg = vec![request, 0, 0, 0, id[0], id[1], 0, 1];
        msg.extend_from_slice(UDP_PAYLOAD);
        if v4 {
            // ICMPv6 checksums cover a pseudo-header: the kernel fills them in.
            let sum = inet_checksum(&msg).to_be_bytes();
            msg[2..4].copy_from_slice(&sum);
        }
        sock.send_to(&msg, &socket2::SockAddr::from(target))
            .map_err(|e| Outcome::from_io(&e, "sendto"))?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        while Instant::now() < deadline {
            let (n, from) = sock
                .recv_from(&mut buf)
                .map_err(|e| Outcome::from_io(&e, "recv"))?;
            // SAFETY: recv_from initialised the first `n` bytes.
            let got: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), n) };
            // Raw IPv4 sockets receive the IP header too.
            let icmp = if v4 && via == Icmp::Raw {
                got.get(usize::from(got.first().copied().unwrap_or(0) & 0x0f) * 4..)
                    .unwrap_or(&[])
            } else {
                got
            };
            // A raw socket on `lo` also sees its own request: skip it, and
            // anyone else's reply.
            let ours = via == Icmp::Ping || icmp.get(4..6) == Some(&id[..]);
            if icmp.first() == Some(&reply) && ours {
                return Ok(Outcome::Reached {
                    detail: format!(
                        "echo reply from {:?} via a {via:?} socket",
                        from.as_socket().map(|a| a.ip())
                    ),
                });
            }
        }
        Err(Outcome::Failed {
            errno: None,
            detail: "no echo reply".into(),
        })
    })();
    result.unwrap_or_else(|o| o)
}

/// socket(AF_PACKET, SOCK_RAW, ETH_P_ALL), and nothing else: Reached means
/// it was created (nothing is sent).
fn packet_socket() -> Outcome {
    const ETH_P_ALL: u16 = 0x0003;
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if fd < 0 {
        return Outcome::from_io(&last_error(), "socket(AF_PACKET)");
    }
    // SAFETY: socket(2) returned a new fd that nobody else owns.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Outcome::Reached {
        detail: "created an AF_PACKET socket".into(),
    }
}

/// Time per socket()+close() of a datagram socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SocketLoopReport {
    pub iterations: u32,
    pub ns_per_socket: f64,
    /// socket() calls that failed (none should).
    pub failed: u64,
}

/// `iterations` × socket(SOCK_DGRAM)+close() in `target`'s family, after a
/// tenth as many to warm up.
fn socket_loop(target: SocketAddr, iterations: u32) -> SocketLoopReport {
    let family = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let mut failed = 0;
    let mut once = || {
        // SAFETY: plain socket(2) and close(2) of the fd it returned.
        unsafe {
            let fd = libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                failed += 1;
            } else {
                libc::close(fd);
            }
        }
    };
    for _ in 0..iterations / 10 {
        once();
    }
    let start = Instant::now();
    for _ in 0..iterations {
        once();
    }
    let elapsed = start.elapsed();
    SocketLoopReport {
        iterations,
        ns_per_socket: elapsed.as_nanos() as f64 / f64::from(iterations.max(1)),
        failed,
    }
}

/// Just enough io_uring to run one operation: a one-entry ring set up with
/// raw syscalls, one SQE in, one CQE out.
mod uring {
    use std::{
        io,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        ptr,
        sync::atomic::{AtomicU32, Ordering},
    };

    pub const OP_SENDMSG: u8 = 9;
    pub const OP_CONNECT: u8 = 16;
    const OFF_SQ_RING: libc::off_t = 0;
    const OFF_CQ_RING: libc::off_t = 0x800_0000;
    const OFF_SQES: libc::off_t = 0x1000_0000;
    const FEAT_SINGLE_MMAP: u32 = 1;
    const ENTER_GETEVENTS: u32 = 1;
    const ENTER_SQ_WAKEUP: u32 = 2;
    const SETUP_SQPOLL: u32 = 2;
    const SQE_ASYNC: u8 = 1 << 4;

    /// Which task issues the operation.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Issue {
        /// The submitting task itself, inside io_uring_enter(2).
        Inline,
        /// An io-wq worker thread (IOSQE_ASYNC).
        Worker,
        /// The ring's SQPOLL kernel thread (IORING_SETUP_SQPOLL); we only
        /// wait for the completion.
        SqPoll,
    }

    /// `struct io_sqring_offsets`.
    #[repr(C)]
    #[derive(Default)]
    struct SqOffsets {
        head: u32,
        tail: u32,
        ring_mask: u32,
        ring_entries: u32,
        flags: u32,
        dropped: u32,
        array: u32,
        resv1: u32,
        user_addr: u64,
    }

    /// `struct io_cqring_offsets`.
    #[repr(C)]
    #[derive(Default)]
    struct CqOffsets {
        head: u32,
        tail: u32,
        ring_mask: u32,
        ring_entries: u32,
        overflow: u32,
        cqes: u32,
        flags: u32,
        resv1: u32,
        user_addr: u64,
    }

    /// `struct io_uring_params`.
    #[repr(C)]
    #[derive(Default)]
    struct Params {
        sq_entries: u32,
        cq_entries: u32,
        flags: u32,
        sq_thread_cpu: u32,
        sq_thread_idle: u32,
        features: u32,
        wq_fd: u32,
        resv: [u32; 3],
        sq_off: SqOffsets,
        cq_off: CqOffsets,
    }

    /// `struct io_uring_sqe`, union members named as we use them.
    #[repr(C)]
    #[derive(Default)]
    pub struct Sqe {
        pub opcode: u8,
        pub flags: u8,
        pub ioprio: u16,
        pub fd: i32,
        pub off: u64,
        pub addr: u64,
        pub len: u32,
        pub op_flags: u32,
        pub user_data: u64,
        pub buf_index: u16,
        pub personality: u16,
        pub splice_fd_in: i32,
        pub addr3: u64,
        pub pad: u64,
    }
    const _: () = assert!(size_of::<Sqe>() == 64);

    /// `struct io_uring_cqe`.
    #[repr(C)]
    struct Cqe {
        user_data: u64,
        res: i32,
        flags: u32,
    }

    struct Mapping {
        ptr: *mut u8,
        len: usize,
    }

    impl Mapping {
        fn new(ring: &OwnedFd, len: usize, offset: libc::off_t) -> io::Result<Self> {
            // SAFETY: a fresh shared mapping of the ring fd; unmapped on drop.
            let ptr = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    ring.as_raw_fd(),
                    offset,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(Self {
                ptr: ptr.cast(),
                len,
            })
        }

        /// # Safety
        /// `offset` plus the size of `T` must lie within the mapping, at
        /// an offset the kernel gave for a `T`.
        unsafe fn at<T>(&self, offset: u32) -> *mut T {
            debug_assert!(offset as usize + size_of::<T>() <= self.len);
            // SAFETY: in bounds per the caller's contract.
            unsafe { self.ptr.add(offset as usize).cast() }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly what `new` mapped.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    /// Submits `sqe` on a new ring and waits for its completion. Ok holds
    /// the CQE's `res` (negative errno on failure); Err means the ring
    /// itself could not be set up or entered.
    pub fn run_one(sqe: &Sqe, issue: Issue) -> io::Result<i32> {
        let mut p = Params::default();
        if issue == Issue::SqPoll {
            p.flags = SETUP_SQPOLL;
            p.sq_thread_idle = 1000;
        }
        // SAFETY: io_uring_setup(2) with a valid params struct.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, &raw mut p) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: io_uring_setup(2) returned a new fd that we own.
        let ring = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let sq_len = p.sq_off.array as usize + p.sq_entries as usize * size_of::<u32>();
        let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * size_of::<Cqe>();
        let single = p.features & FEAT_SINGLE_MMAP != 0;
        let sq = Mapping::new(
            &ring,
            if single { sq_len.max(cq_len) } else { sq_len },
            OFF_SQ_RING,
        )?;
        let cq_own = if single {
            None
        } else {
            Some(Mapping::new(&ring, cq_len, OFF_CQ_RING)?)
        };
        let cq = cq_own.as_ref().unwrap_or(&sq);
        let sqes = Mapping::new(&ring, p.sq_entries as usize * size_of::<Sqe>(), OFF_SQES)?;
        // SAFETY: every offset below comes from the kernel's params for
        // these mappings; the ring is ours alone, and the head/tail words
        // are accessed atomically as the kernel does.
        unsafe {
            let tail = &*sq.at::<AtomicU32>(p.sq_off.tail);
            let mask = *sq.at::<u32>(p.sq_off.ring_mask);
            let t = tail.load(Ordering::Acquire);
            let slot = t & mask;
            let dst = sqes.at::<Sqe>(slot * size_of::<Sqe>() as u32);
            ptr::copy_nonoverlapping(sqe, dst, 1);
            if issue == Issue::Worker {
                (*dst).flags |= SQE_ASYNC;
            }
            *sq.at::<u32>(p.sq_off.array + slot * 4) = slot;
            tail.store(t.wrapping_add(1), Ordering::Release);
        }
        // With SQPOLL the kernel thread submits: we only wake it and wait.
        let (to_submit, flags) = match issue {
            Issue::SqPoll => (0u32, ENTER_GETEVENTS | ENTER_SQ_WAKEUP),
            Issue::Inline | Issue::Worker => (1u32, ENTER_GETEVENTS),
        };
        // SAFETY: io_uring_enter(2) on our ring, no signal mask.
        let n = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                ring.as_raw_fd(),
                to_submit,
                1u32,
                flags,
                ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above, for the completion ring.
        unsafe {
            let head = &*cq.at::<AtomicU32>(p.cq_off.head);
            let tail = &*cq.at::<AtomicU32>(p.cq_off.tail);
            let mask = *cq.at::<u32>(p.cq_off.ring_mask);
            let h = head.load(Ordering::Acquire);
            if tail.load(Ordering::Acquire) == h {
                return Err(io::Error::other(
                    "io_uring_enter returned without a completion",
                ));
            }
            let cqe = &*cq.at::<Cqe>(p.cq_off.cqes + (h & mask) * size_of::<Cqe>() as u32);
            let res = cqe.res;
            head.store(h.wrapping_add(1), Ordering::Release);
            Ok(res)
        }
    }
}
