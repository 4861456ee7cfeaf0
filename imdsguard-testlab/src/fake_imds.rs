//! A fake metadata service inside a test network namespace.
//!
//! One thread enters the namespace, binds every listener, and serves them
//! with poll(2): TCP listeners speak just enough of AWS IMDSv2, GCP and
//! Azure (see [`respond`]); UDP sockets echo. Requests are tiny and
//! sequential, which is all the probes need. [`FakeImds::start_local`]
//! serves the same on one loopback listener in the caller's own namespace,
//! and records every request line, for the filter proxy's tests.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use crate::netns::NetNs;

pub const INSTANCE_ID: &str = "i-0imdsguardlab0";
const TOKEN: &str = "lab-token-AQAEA";
/// In every credential, user-data and kube-env answer: a test that finds
/// it in a response found a leak.
pub const SECRET: &str = "LAB-SECRET-DO-NOT-LEAK";

/// What to listen on.
#[derive(Clone, Debug, Default)]
pub struct Listeners {
    pub tcp: Vec<SocketAddr>,
    pub udp: Vec<SocketAddr>,
    /// Served like `tcp`, but MPTCP listeners (IPPROTO_MPTCP): a client's
    /// MPTCP connection to them stays MPTCP instead of falling back to TCP.
    /// Skipped, with a note on stderr, when the kernel refuses MPTCP sockets.
    pub mptcp: Vec<SocketAddr>,
    /// Served like `tcp`, with TCP_FASTOPEN set on the listener: they take
    /// data in the SYN once the namespace's `net.ipv4.tcp_fastopen` has the
    /// server bit (2), which a new namespace does not.
    pub tcp_fastopen: Vec<SocketAddr>,
    /// TCP listeners that keep every connection open and echo what they
    /// get, for probes that hold a connection (revocation tests).
    pub hold: Vec<SocketAddr>,
}

pub struct FakeImds {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    seen: Arc<Mutex<Vec<String>>>,
}

/// How the fake behaves where real instances differ.
#[derive(Clone, Copy, Debug, Default)]
pub struct Behaviour {
    /// IMDSv2 required (`HttpTokens: required`): an AWS GET without a token
    /// gets 401. Otherwise (the default, `optional`) only a wrong token does.
    pub tokens_required: bool,
}

impl FakeImds {
    pub fn start(ns: &NetNs, listeners: Listeners) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let ns_fd = ns.raw_fd();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let stop2 = stop.clone();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let thread = std::thread::spawn(move || {
            type Bound = (Vec<TcpListener>, Vec<UdpSocket>, Vec<TcpListener>);
            let bound = (|| -> anyhow::Result<Bound> {
                // SAFETY: moves only this thread into the namespace; the fd
                // outlives the thread because FakeImds joins it on drop and
                // is dropped before the NetNs (Lab field order).
                if unsafe { libc::setns(ns_fd, libc::CLONE_NEWNET) } != 0 {
                    anyhow::bail!("setns: {}", std::io::Error::last_os_error());
                }
                let mut tcp = listeners
                    .tcp
                    .iter()
                    .map(|a| TcpListener::bind(a).with_context(|| format!("bind tcp {a}")))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                for a in &listeners.tcp_fastopen {
                    tcp.push(bind_fastopen(*a)?);
                }
                for a in &listeners.mptcp {
                    if let Some(l) = bind_mptcp(*a)? {
                        tcp.push(l);
                    }
                }
                let hold = listeners
                    .hold
                    .iter()
                    .map(|a| TcpListener::bind(a).with_context(|| format!("bind hold {a}")))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let udp = listeners
                    .udp
                    .iter()
                    .map(|a| UdpSocket::bind(a).with_context(|| format!("bind udp {a}")))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                for l in tcp.iter().chain(&hold) {
                    l.set_nonblocking(true)?;
                }
                for u in &udp {
                    u.set_nonblocking(true)?;
                }
                Ok((tcp, udp, hold))
            })();
            match bound {
                Ok((tcp, udp, hold)) => {
                    let _ = ready_tx.send(Ok(()));
                    serve(&tcp, &udp, &hold, &stop2, &seen2, Behaviour::default());
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        ready_rx.recv().context("fake IMDS thread died")??;
        Ok(Self {
            stop,
            thread: Some(thread),
            seen,
        })
    }

    /// One HTTP listener on `addr` (e.g. `127.0.0.1:0`) in this process's
    /// own network namespace; returns the address it got.
    pub fn start_local(
        addr: SocketAddr,
        behaviour: Behaviour,
    ) -> anyhow::Result<(Self, SocketAddr)> {
        let listener = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            serve(&[listener], &[], &[], &stop2, &seen2, behaviour);
        });
        Ok((
            Self {
                stop,
                thread: Some(thread),
                seen,
            },
            bound,
        ))
    }

    /// The request line of every HTTP request served so far.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    tcp: &[TcpListener],
    udp: &[UdpSocket],
    hold: &[TcpListener],
    stop: &AtomicBool,
    seen: &Mutex<Vec<String>>,
    behaviour: Behaviour,
) {
    // Connections accepted on `hold` listeners, kept until the peer goes.
    let mut held: Vec<TcpStream> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = tcp
            .iter()
            .map(|l| l.as_raw_fd())
            .chain(udp.iter().map(|u| u.as_raw_fd()))
            .chain(hold.iter().map(|l| l.as_raw_fd()))
            .chain(held.iter().map(|c| c.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        let (n_tcp, n_udp, n_hold) = (tcp.len(), udp.len(), hold.len());
        let mut gone = Vec::new();
        for (i, p) in fds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            if i < n_tcp {
                while let Ok((stream, _)) = tcp[i].accept() {
                    handle_http(stream, seen, behaviour);
                }
            } else if i < n_tcp + n_udp {
                let sock = &udp[i - n_tcp];
                let mut buf = [0u8; 2048];
                while let Ok((len, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..len], from);
                }
            } else if i < n_tcp + n_udp + n_hold {
                while let Ok((stream, _)) = hold[i - n_tcp - n_udp].accept() {
                    if stream.set_nonblocking(true).is_ok() {
                        held.push(stream);
                    }
                }
            } else {
                let j = i - n_tcp - n_udp - n_hold;
                let mut buf = [0u8; 512];
                match (&held[j]).read(&mut buf) {
                    Ok(0) => gone.push(j),
                    Ok(len) => {
                        if (&held[j]).write_all(&buf[..len]).is_err() {
                            gone.push(j);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => gone.push(j),
                }
            }
        }
        // Highest index first, so the earlier ones stay valid.
        for j in gone.into_iter().rev() {
            held.swap_remove(j);
        }
    }
}

/// A TCP listener that accepts data in the SYN (TCP_FASTOPEN, queue 16).
fn bind_fastopen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let l = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
    let qlen: libc::c_int = 16;
    // SAFETY: an int option with its size, on a listener we own.
    let rc = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&raw const qlen).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "TCP_FASTOPEN on {addr}: {}",
        std::io::Error::last_os_error()
    );
    Ok(l)
}

/// An MPTCP listener, or None when this kernel (or the namespace's
/// `net.mptcp.enabled`) does not offer MPTCP sockets.
fn bind_mptcp(addr: SocketAddr) -> anyhow::Result<Option<TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = match Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(Protocol::MPTCP),
    ) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EPROTONOSUPPORT | libc::ENOPROTOOPT | libc::EINVAL)
            ) =>
        {
            eprintln!("fake IMDS: no MPTCP listener on {addr}: {e}");
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("mptcp socket for {addr}")),
    };
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("bind mptcp {addr}"))?;
    sock.listen(128)?;
    Ok(Some(sock.into()))
}

/// Reads one request head and answers it (see [`respond`]).
fn handle_http(mut stream: TcpStream, seen: &Mutex<Vec<String>>, behaviour: Behaviour) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 16 * 1024 {
            break;
        }
    }
    let req = String::from_utf8_lossy(&buf);
    if let Ok(mut s) = seen.lock() {
        s.push(req.lines().next().unwrap_or("").to_owned());
    }
    let (status, body) = respond(&req, behaviour);
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes());
}

/// The answer to one request head, as the cloud whose path it is would
/// give it:
/// - AWS (`/latest/`): `PUT api/token` needs the TTL header and is refused
///   (403) with X-Forwarded-For; a GET with a wrong token gets 401, one
///   without a token too when [`Behaviour::tokens_required`];
/// - GCP (`/computeMetadata/v1/`): 403 without `Metadata-Flavor: Google`
///   or with X-Forwarded-For;
/// - Azure (`/metadata/`): 400 without `Metadata: true`.
///
/// Each serves a few paths, credentials among them (with [`SECRET`]); any
/// other path answers `200 fake-metadata`, as the probes expect.
pub fn respond(head: &str, behaviour: Behaviour) -> (&'static str, String) {
    let mut lines = head.lines();
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let h = |k: &str| headers.get(k).map(String::as_str);
    let path = target.split('?').next().unwrap_or("");
    let ok = |body: &str| ("200 OK", body.to_owned());
    let secret = || ("200 OK", format!("{{\"Token\":\"{SECRET}\"}}"));
    let not_found = ("404 Not Found", String::new());
    if let Some(rest) = path.strip_prefix("/latest/") {
        if method == "PUT" && rest == "api/token" {
            return if h("x-forwarded-for").is_some() {
                ("403 Forbidden", String::new())
            } else if h("x-aws-ec2-metadata-token-ttl-seconds").is_none() {
                ("400 Bad Request", String::new())
            } else {
                ok(TOKEN)
            };
        }
        match h("x-aws-ec2-metadata-token") {
            Some(t) if t != TOKEN => return ("401 Unauthorized", String::new()),
            None if behaviour.tokens_required => return ("401 Unauthorized", String::new()),
            _ => {}
        }
        return match rest {
            "meta-data/instance-id" => ok(INSTANCE_ID),
            "meta-data/placement/region" => ok("us-east-1"),
            "meta-data/placement/availability-zone" => ok("us-east-1a"),
            "meta-data/iam/security-credentials/" => ok("lab-role"),
            "meta-data/iam/security-credentials/lab-role" | "user-data" => secret(),
            _ => ok("fake-metadata"),
        };
    }
    if let Some(rest) = path.strip_prefix("/computeMetadata/v1/") {
        if h("metadata-flavor") != Some("Google") || h("x-forwarded-for").is_some() {
            return ("403 Forbidden", String::new());
        }
        return match rest {
            "instance/zone" => ok("projects/1/zones/us-central1-a"),
            "instance/id" => ok("1234567890"),
            "instance/service-accounts/default/token" | "instance/attributes/kube-env" => secret(),
            _ => not_found,
        };
    }
    if path
        .get(..10)
        .is_some_and(|p| p.eq_ignore_ascii_case("/metadata/"))
    {
        if h("metadata") != Some("true") {
            return ("400 Bad Request", String::new());
        }
        return match path.to_ascii_lowercase().as_str() {
            "/metadata/instance/compute/location" => ok("westeurope"),
            "/metadata/identity/oauth2/token" | "/metadata/instance/compute/userdata" => secret(),
            _ => not_found,
        };
    }
    ok("fake-metadata")
}

/// The addresses the lab puts on the namespace's `lo`.
pub fn lab_addresses() -> Vec<IpAddr> {
    [
        "169.254.169.254",
        "169.254.169.253",
        "169.254.169.123",
        "169.254.170.2",
        "169.254.170.23",
        "169.254.169.252",
        "100.100.100.200",
        "168.63.129.16",
        "169.254.20.10",
        "fd00:ec2::254",
        "fd00:ec2::23",
        "fd00:ec2::123",
        "fd00:ec2::253",
        "fd00:c1::a9fe:a9fe",
        "64:ff9b::a9fe:a9fe",
        // Deprecated IPv4-compatible form of 169.254.169.254: the kernel
        // still routes it (locally here) like any other IPv6 address.
        "::a9fe:a9fe",
    ]
    .iter()
    .map(|s| s.parse().expect("valid literal"))
    .collect()
}

/// Listeners for every lab scenario: metadata ports, DNS and NTP
/// neighbours, and unprotected loopback controls.
pub fn lab_listeners() -> Listeners {
    let s = |x: &str| -> SocketAddr { x.parse().expect("valid literal") };
    Listeners {
        tcp: [
            "169.254.169.254:80",
            "169.254.169.254:53",
            "169.254.169.253:53",
            "169.254.170.2:80",
            "169.254.170.23:80",
            "169.254.169.252:988",
            "100.100.100.200:80",
            "168.63.129.16:80",
            "168.63.129.16:32526",
            "168.63.129.16:53",
            "168.63.129.16:443",
            "169.254.20.10:53",
            "127.0.0.1:8080",
            "[fd00:ec2::254]:80",
            "[fd00:ec2::254]:53",
            "[fd00:ec2::23]:80",
            "[fd00:c1::a9fe:a9fe]:80",
            "[64:ff9b::a9fe:a9fe]:80",
            "[::a9fe:a9fe]:80",
            "[::1]:8080",
        ]
        .iter()
        .map(|x| s(x))
        .collect(),
        udp: [
            "169.254.169.254:53",
            "169.254.169.254:80",
            "169.254.169.253:53",
            "169.254.169.123:123",
            "168.63.129.16:53",
            "169.254.20.10:53",
            "127.0.0.1:8080",
            "[fd00:ec2::254]:53",
            "[fd00:ec2::254]:80",
            "[fd00:ec2::123]:123",
            "[fd00:ec2::253]:53",
            "[64:ff9b::a9fe:a9fe]:80",
            "[::a9fe:a9fe]:80",
            "[::1]:8080",
        ]
        .iter()
        .map(|x| s(x))
        .collect(),
        mptcp: ["169.254.169.254:8262", "[fd00:ec2::254]:8262"]
            .iter()
            .map(|x| s(x))
            .collect(),
        tcp_fastopen: ["169.254.169.254:8263", "[fd00:ec2::254]:8263"]
            .iter()
            .map(|x| s(x))
            .collect(),
        hold: [
            "169.254.169.254:8264",
            "[fd00:ec2::254]:8264",
            "127.0.0.1:8264",
        ]
        .iter()
        .map(|x| s(x))
        .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(head: &str, tokens_required: bool) -> (&'static str, String) {
        respond(head, Behaviour { tokens_required })
    }

    #[test]
    fn aws_token_rules() {
        let put =
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n";
        assert_eq!(ask(put, true), ("200 OK", TOKEN.to_owned()));
        let xff = "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
        assert_eq!(ask(xff, false).0, "403 Forbidden");
        assert_eq!(
            ask("PUT /latest/api/token HTTP/1.1\r\n\r\n", false).0,
            "400 Bad Request"
        );
        let id = "GET /latest/meta-data/instance-id HTTP/1.1\r\n";
        assert_eq!(ask(&format!("{id}\r\n"), true).0, "401 Unauthorized");
        assert_eq!(
            ask(&format!("{id}\r\n"), false),
            ("200 OK", INSTANCE_ID.to_owned())
        );
        let with = format!("{id}X-aws-ec2-metadata-token: {TOKEN}\r\n\r\n");
        assert_eq!(ask(&with, true), ("200 OK", INSTANCE_ID.to_owned()));
        let bad = format!("{id}X-aws-ec2-metadata-token: nope\r\n\r\n");
        assert_eq!(ask(&bad, false).0, "401 Unauthorized");
        let creds = "GET /latest/meta-data/iam/security-credentials/lab-role HTTP/1.1\r\n\r\n";
        assert!(ask(creds, false).1.contains(SECRET));
        // What the lab's probes expect.
        assert_eq!(
            ask("GET /latest/meta-data/ HTTP/1.1\r\n\r\n", false).1,
            "fake-metadata"
        );
    }

    #[test]
    fn gcp_and_azure_header_rules() {
        let zone = "GET /computeMetadata/v1/instance/zone HTTP/1.1\r\n";
        assert_eq!(ask(&format!("{zone}\r\n"), false).0, "403 Forbidden");
        assert_eq!(
            ask(&format!("{zone}Metadata-Flavor: Google\r\n\r\n"), false).0,
            "200 OK"
        );
        let loc = "GET /metadata/instance/compute/location?api-version=2021-02-01 HTTP/1.1\r\n";
        assert_eq!(ask(&format!("{loc}\r\n"), false).0, "400 Bad Request");
        assert_eq!(
            ask(&format!("{loc}Metadata: true\r\n\r\n"), false).1,
            "westeurope"
        );
    }
}
