//! Plain connects, HTTP exchanges and UDP round trips: what a pod does.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use super::{LoopReport, Outcome, TimedLoopReport};

pub(super) fn tcp_connect(target: SocketAddr) -> Outcome {
    match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
        Ok(_) => Outcome::Reached {
            detail: format!("connected to {target}"),
        },
        Err(e) => Outcome::from_io(&e, "connect"),
    }
}

pub(super) fn tcp_loop(target: SocketAddr, duration: Duration) -> LoopReport {
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

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process on the
/// machine (no time namespace in the lab), so a probe's timestamps line up
/// with the bench's. `Instant` is the same clock but cannot be printed.
pub fn monotonic_ns() -> u64 {
    // SAFETY: all-zero is a valid timespec; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// [`tcp_loop`], also noting when the attempts that were not denied
/// started: what got through while our links were detached.
pub(super) fn tcp_loop_timed(target: SocketAddr, duration: Duration) -> TimedLoopReport {
    let mut r = TimedLoopReport::default();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let started = monotonic_ns();
        match tcp_connect(target) {
            Outcome::Eperm => r.eperm += 1,
            o => {
                if o.reached() {
                    r.reached += 1;
                } else {
                    r.other += 1;
                }
                r.first_through_ns.get_or_insert(started);
                r.last_through_ns = Some(started);
            }
        }
    }
    r
}

pub(super) fn http_exchange(target: SocketAddr, request: &str) -> Result<String, Outcome> {
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
pub(super) fn imds_http(target: SocketAddr) -> Outcome {
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

/// One status line and body of a raw HTTP exchange: `"<code> <body>"`, for
/// any status (filter mode answers 403 with a reason).
fn http_status(target: SocketAddr, request: &str) -> Result<String, Outcome> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .map_err(|e| Outcome::from_io(&e, "connect"))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    s.write_all(request.as_bytes())
        .map_err(|e| Outcome::from_io(&e, "write"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .map_err(|e| Outcome::from_io(&e, "read"))?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head.split(' ').nth(1).unwrap_or("none");
    Ok(format!("{code} {}", body.trim()))
}

/// IMDSv2 with any path: PUT a token (a refused PUT leaves none, as a v1
/// client would have), then GET `path` with it. The detail is the GET's
/// `"<code> <body>"`.
pub(super) fn imds_get(target: SocketAddr, path: &str) -> Outcome {
    let host = target.ip();
    let put = format!(
        "PUT /latest/api/token HTTP/1.1\r\nHost: {host}\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n"
    );
    let token = match http_status(target, &put) {
        Ok(r) => r.strip_prefix("200 ").map(str::to_string),
        Err(o) => return o,
    };
    let token = token
        .map(|t| format!("X-aws-ec2-metadata-token: {t}\r\n"))
        .unwrap_or_default();
    match http_status(
        target,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{token}Connection: close\r\n\r\n"),
    ) {
        Ok(detail) => Outcome::Reached { detail },
        Err(o) => o,
    }
}

/// UDP to `target`: with `connect`, connect() first (the connect hook
/// judges it); without, an unconnected sendto (the sendmsg hook judges it).
pub(super) fn udp(target: SocketAddr, connect: bool) -> Outcome {
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
