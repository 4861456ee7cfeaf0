//! Odd sockaddrs: an address family or length the hook code must not be
//! fooled by.

use std::{
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
};

use super::{
    Outcome,
    socket::{UDP_PAYLOAD, bind_udp, ipv4_only, last_error, raw_socket, recv_echo, sockaddr_in},
};

/// A `sockaddr_in` in a buffer as long as a `sockaddr_in6`, to get past the
/// IPv6 code's length checks.
#[repr(C)]
struct PaddedSockaddrIn {
    sin: libc::sockaddr_in,
    _pad: [u8; 12],
}
const _: () = assert!(size_of::<PaddedSockaddrIn>() == size_of::<libc::sockaddr_in6>());

/// An AF_INET UDP socket's sendto() with `sin_family = AF_UNSPEC`:
/// udp_sendmsg() accepts AF_UNSPEC as an IPv4 destination.
pub(super) fn udp4_sendto_unspec(target: SocketAddr) -> Outcome {
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
pub(super) fn udp6_with_sin(target: SocketAddr, connect: bool) -> Outcome {
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
pub(super) fn tcp6_with_sin(target: SocketAddr, padded: bool) -> Outcome {
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
