//! A fake metadata service inside a test network namespace.
//!
//! One thread enters the namespace, binds every listener, and serves them
//! with poll(2): TCP listeners speak just enough of AWS IMDSv2, GCP and
//! Azure (see [`respond`]); UDP sockets echo. Requests are tiny and
//! sequential, which is all the probes need. [`FakeImds::start_local`]
//! serves the same on one loopback listener in the caller's own namespace,
//! and records every request line, for the filter proxy's tests.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::Context as _;

use crate::netns::NetNs;

mod http;

use http::handle_http;
pub use http::respond;

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
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// One HTTP request the fake served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The request line, e.g. `GET /latest/meta-data/instance-id HTTP/1.1`.
    pub line: String,
    /// Its `User-Agent`, which tells apart clients that share an address
    /// (the pods behind the filter proxy, and the proxy's own requests).
    pub user_agent: Option<String>,
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
        self.requests().into_iter().map(|s| s.line).collect()
    }

    /// Every HTTP request served so far, with its User-Agent.
    pub fn requests(&self) -> Vec<Seen> {
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
    seen: &Mutex<Vec<Seen>>,
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
        "192.0.0.192",
        "100.96.0.96",
        "169.254.0.23",
        "169.254.42.42",
        "fd00:ec2::254",
        "fd00:ec2::23",
        "fd00:ec2::123",
        "fd00:ec2::253",
        "fd00:c1::a9fe:a9fe",
        "fd20:ce::254",
        "fd00:42::42",
        "fd00:a9fe:a9fe::1",
        // Link-local: reachable only with a scope id, so no listener binds
        // it; the connect hooks judge it before the kernel asks for one.
        "fe80::a9fe:a9fe",
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
            "192.0.0.192:80",
            "100.96.0.96:80",
            "169.254.0.23:80",
            "169.254.42.42:80",
            "127.0.0.1:8080",
            "[fd00:ec2::254]:80",
            "[fd00:ec2::254]:53",
            "[fd00:ec2::23]:80",
            "[fd00:c1::a9fe:a9fe]:80",
            "[fd20:ce::254]:80",
            "[fd20:ce::254]:53",
            "[fd00:42::42]:80",
            "[fd00:a9fe:a9fe::1]:80",
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
            "169.254.169.254:123",
            "168.63.129.16:53",
            "169.254.20.10:53",
            "127.0.0.1:8080",
            "[fd00:ec2::254]:53",
            "[fd00:ec2::254]:80",
            "[fd00:ec2::123]:123",
            "[fd00:ec2::253]:53",
            "[fd20:ce::254]:53",
            "[fd20:ce::254]:123",
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
