//! What the hardening probes share: the bytes they send and socket set-up.
//!
//! The hardening probes try the less travelled ways to a destination: odd
//! sockaddrs, TCP Fast Open, MPTCP and io_uring. Each reports the outcome
//! of the one syscall a cgroup hook judges through `Outcome::from_io`;
//! set-up failures (socket(), setsockopt(), io_uring_setup()) are reported
//! as `Failed` even when their errno is EPERM, so they can never pass for a
//! denial.

use std::{
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::{FromRawFd as _, OwnedFd},
    time::Duration,
};

use super::Outcome;

/// What the HTTP probes send; the fake server answers `200 fake-metadata`.
pub(super) const HTTP_GET: &str =
    "GET /latest/meta-data/ HTTP/1.1\r\nHost: imds\r\nConnection: close\r\n\r\n";
pub(super) const UDP_PAYLOAD: &[u8] = b"imdsguard-probe";

pub(super) fn setup_failed(e: &std::io::Error, what: &str) -> Outcome {
    Outcome::Failed {
        errno: e.raw_os_error(),
        detail: format!("{what} (set-up, not the judged call): {e}"),
    }
}

pub(super) fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

pub(super) fn raw_socket(family: i32, ty: i32, protocol: i32) -> Result<OwnedFd, Outcome> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(setup_failed(&last_error(), "socket"));
    }
    // SAFETY: socket(2) returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn ipv4_only(target: SocketAddr) -> Result<SocketAddrV4, Outcome> {
    match target {
        SocketAddr::V4(t) => Ok(t),
        SocketAddr::V6(_) => Err(Outcome::Failed {
            errno: None,
            detail: format!("this probe takes an IPv4 target, not {target}"),
        }),
    }
}

pub(super) fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

pub(super) fn recv_echo(sock: &UdpSocket) -> Outcome {
    sock.set_read_timeout(Some(Duration::from_secs(1))).ok();
    let mut buf = [0u8; 64];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => Outcome::Reached {
            detail: format!("{n} bytes echoed by {from}"),
        },
        Err(e) => Outcome::from_io(&e, "recv"),
    }
}

pub(super) fn bind_udp(v4: bool) -> Result<UdpSocket, Outcome> {
    UdpSocket::bind(if v4 { "0.0.0.0:0" } else { "[::]:0" }).map_err(|e| setup_failed(&e, "bind"))
}
