//! Stream connections made another way than a plain connect(): TCP Fast
//! Open, MPTCP and io_uring.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use super::{
    Outcome,
    socket::{HTTP_GET, last_error, raw_socket, setup_failed},
    uring,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stream {
    Tcp,
    /// `IPPROTO_MPTCP`: the connect runs on an in-kernel subflow socket.
    Mptcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Via {
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
pub(super) fn stream(target: SocketAddr, kind: Stream, via: Via) -> Outcome {
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
                let res =
                    uring::connect(raw, &addr, issue).map_err(|e| setup_failed(&e, "io_uring"))?;
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
pub(super) fn syn_data_acked(fd: i32) -> bool {
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
pub(super) fn mptcp_state(fd: i32) -> &'static str {
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
