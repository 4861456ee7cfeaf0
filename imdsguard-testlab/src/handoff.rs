//! Probes about sockets that outlive a decision: sockets handed to another
//! process over SCM_RIGHTS, and connections held open while the policy
//! changes under them.
//!
//! * `pass-socket TARGET PATH tcp|udp`: creates an unconnected socket of
//!   TARGET's family, sends it to the unix socket at PATH, and waits until
//!   the receiver is done with it. Reports `reached` once passed.
//! * `receive-socket TARGET PATH tcp|udp`: listens on PATH, takes one socket
//!   and connects it to TARGET (UDP: then sends and waits for the echo).
//!   Reports what happened to the connect.
//! * `hold TARGET MILLIS tcp|udp`: connects, prints `holding` on its own
//!   line, then sends a byte every 20 ms and reads the echo until the
//!   connection fails or MILLIS pass. Reports a [`HoldReport`].

use std::{
    io::{BufRead as _, BufReader, IoSlice, IoSliceMut, Read as _, Write as _},
    mem::MaybeUninit,
    net::SocketAddr,
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

use crate::probe::Outcome;

/// Creates a socket in `creator` (None: the lab process's own cgroup),
/// passes it over SCM_RIGHTS to a process in `receiver`, which connects it
/// to `target`. Returns what the receiver got; fails if the creator could
/// not pass the socket.
pub fn hand_off(
    lab: &crate::lab::Lab,
    creator: Option<&crate::cgroups::TestCgroup>,
    receiver: &crate::cgroups::TestCgroup,
    target: &str,
    transport: &str,
) -> anyhow::Result<Outcome> {
    let dir = crate::scratch::ScratchDir::new("imdsguard-handoff")?;
    let path = dir.join("handoff.sock").display().to_string();
    let rx = lab.spawn_probe(
        Some(receiver),
        &["receive-socket", target, &path, transport],
    )?;
    let tx = lab.spawn_probe(creator, &["pass-socket", target, &path, transport])?;
    let got: Outcome = crate::probe::wait(rx, Duration::from_secs(15))?;
    let passed: Outcome = crate::probe::wait(tx, Duration::from_secs(15))?;
    anyhow::ensure!(
        passed.reached(),
        "the creator could not pass its socket: {passed:?}"
    );
    Ok(got)
}

/// How a held connection ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReport {
    /// `still-open`, `closed-by-peer`, or `error`.
    pub ended: String,
    pub errno: Option<i32>,
    pub detail: String,
    /// Round trips that worked before the end.
    pub round_trips: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

impl std::str::FromStr for Transport {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            other => bail!("transport must be tcp or udp, not {other:?}"),
        }
    }
}

fn new_socket(target: SocketAddr, transport: Transport) -> std::io::Result<Socket> {
    let ty = match transport {
        Transport::Tcp => Type::STREAM,
        Transport::Udp => Type::DGRAM,
    };
    Socket::new(Domain::for_address(target), ty, None)
}

/// The creator's side of a hand-off.
pub fn pass_socket(target: SocketAddr, path: &Path, transport: Transport) -> Outcome {
    let sock = match new_socket(target, transport) {
        Ok(s) => s,
        Err(e) => return Outcome::from_io(&e, "socket"),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut unix = loop {
        match UnixStream::connect(path) {
            Ok(u) => break u,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Outcome::from_io(&e, "connect to the receiver"),
        }
    };
    if let Err(e) = send_fd(&unix, sock.as_fd()) {
        return Outcome::from_io(&e, "sendmsg(SCM_RIGHTS)");
    }
    // Keep our copy open until the receiver has used its own: the point of
    // a hand-off is that both ends hold the socket.
    unix.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut done = [0u8; 1];
    match unix.read_exact(&mut done) {
        // The receiver is done (or gone): the socket was passed either way.
        Ok(()) => Outcome::Reached {
            detail: "passed".into(),
        },
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Outcome::Reached {
            detail: "passed".into(),
        },
        Err(e) => Outcome::from_io(&e, "wait for the receiver"),
    }
}

/// The receiver's side: connect the socket we were given.
pub fn receive_socket(target: SocketAddr, path: &Path, transport: Transport) -> Outcome {
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => return Outcome::from_io(&e, "bind the unix socket"),
    };
    let (mut unix, _) = match listener.accept() {
        Ok(c) => c,
        Err(e) => return Outcome::from_io(&e, "accept"),
    };
    let fd = match recv_fd(&unix) {
        Ok(fd) => fd,
        Err(e) => return Outcome::from_io(&e, "recvmsg(SCM_RIGHTS)"),
    };
    let sock = Socket::from(fd);
    let outcome = match sock.connect_timeout(&target.into(), Duration::from_secs(2)) {
        Err(e) => Outcome::from_io(&e, "connect"),
        Ok(()) if transport == Transport::Tcp => Outcome::Reached {
            detail: format!("connected to {target}"),
        },
        Ok(()) => udp_round_trip(&sock),
    };
    let _ = unix.write_all(b"k");
    outcome
}

fn udp_round_trip(sock: &Socket) -> Outcome {
    sock.set_read_timeout(Some(Duration::from_secs(1))).ok();
    if let Err(e) = sock.send(b"imdsguard-handoff") {
        return Outcome::from_io(&e, "send");
    }
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    match sock.recv(&mut buf) {
        Ok(n) => Outcome::Reached {
            detail: format!("{n} bytes echoed"),
        },
        Err(e) => Outcome::from_io(&e, "recv"),
    }
}

/// Connects and keeps the connection busy until it breaks or `duration`
/// passes. Prints `holding` once connected, so the test knows when to act.
pub fn hold(
    target: SocketAddr,
    duration: Duration,
    transport: Transport,
) -> anyhow::Result<String> {
    let sock = new_socket(target, transport)?;
    if let Err(e) = sock.connect_timeout(&target.into(), Duration::from_secs(2)) {
        return Ok(serde_json::to_string(&Outcome::from_io(&e, "connect"))?);
    }
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut report = HoldReport {
        ended: "still-open".into(),
        errno: None,
        detail: String::new(),
        round_trips: 0,
    };
    let mut said = false;
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        let step = sock.send(b"x").and_then(|_| sock.recv(&mut buf));
        match step {
            Ok(0) if transport == Transport::Tcp => {
                report.ended = "closed-by-peer".into();
                break;
            }
            Ok(_) => report.round_trips += 1,
            Err(e) => {
                report.ended = "error".into();
                report.errno = e.raw_os_error();
                report.detail = e.to_string();
                break;
            }
        }
        if !said {
            // One round trip proves the path works before the test acts.
            println!("holding");
            std::io::stdout().flush()?;
            said = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(serde_json::to_string(&report)?)
}

/// A running `hold` probe.
pub struct Held {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Held {
    /// Waits for the probe to say `holding`; fails with what it printed
    /// instead (a connect that did not work).
    pub fn wait_holding(mut child: Child) -> anyhow::Result<Self> {
        let stdout = child.stdout.take().context("probe stdout")?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "holding" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("hold probe did not connect: {}", line.trim());
        }
        Ok(Self { child, stdout })
    }

    /// Starts `hold TARGET MILLIS TRANSPORT` from `cgroup` in the lab and
    /// waits until it holds.
    pub fn start(
        lab: &crate::lab::Lab,
        cgroup: &crate::cgroups::TestCgroup,
        target: &str,
        millis: u64,
        transport: &str,
    ) -> anyhow::Result<Self> {
        let millis = millis.to_string();
        let child = lab.spawn_probe(Some(cgroup), &["hold", target, &millis, transport])?;
        Self::wait_holding(child)
    }

    /// Whether the connection is still up (the probe ends when it breaks).
    pub fn still_holding(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the end of the probe and its report.
    pub fn report(mut self, timeout: Duration) -> anyhow::Result<HoldReport> {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("hold probe still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut out = String::new();
        self.stdout.read_to_string(&mut out)?;
        serde_json::from_str(out.trim()).with_context(|| format!("hold probe printed {out:?}"))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One fd over a unix stream, in an SCM_RIGHTS control message beside one
/// byte (a stream socket carries no control message without data).
fn send_fd(unix: &UnixStream, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("SCM_RIGHTS message does not fit"));
    }
    sendmsg(
        unix,
        &[IoSlice::new(&[0])],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(())
}

fn recv_fd(unix: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let iov = &mut [IoSliceMut::new(&mut byte)];
    let msg = recvmsg(unix, iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(std::io::Error::other("control message truncated"));
    }
    // Fds left in the buffer are closed when it drops.
    control
        .drain()
        .find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .ok_or_else(|| std::io::Error::other("no SCM_RIGHTS message"))
}
