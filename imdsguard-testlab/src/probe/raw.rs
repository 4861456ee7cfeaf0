//! Raw sockets: ICMP echo and AF_PACKET.

use std::{
    net::SocketAddr,
    os::fd::{FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use super::{
    Outcome,
    socket::{UDP_PAYLOAD, last_error, setup_failed},
};

// Probes for raw sockets (`--deny-raw-sockets`). Here socket() is the call
// the sock_create hook judges, so its EPERM is reported as `Eperm`; every
// later failure is `Failed`. Nothing leaves the lab namespace: the targets
// are addresses on its `lo`.

/// How an ICMP echo probe opens its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Icmp {
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
pub(super) fn inet_checksum(bytes: &[u8]) -> u16 {
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
pub(super) fn icmp_echo(target: SocketAddr, via: Icmp) -> Outcome {
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
pub(super) fn packet_socket() -> Outcome {
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
