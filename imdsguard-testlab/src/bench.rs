//! The hook-overhead benchmark's worker: per-call cost of TCP
//! connect()+close(), UDP connect(), unconnected UDP sendto() to an
//! unprotected loopback destination, and of socket()+close() of a UDP
//! socket, from a process in a lab cgroup, with imdsguard attached or not.
//! Arms are interleaved round by round so drift hits them all alike.
//!
//! Also the revocation sweep's load: a process holding idle loopback TCP
//! connections until it is killed.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    str::FromStr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockRef, Socket, Type};

/// One timed loop of the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Workload {
    /// TCP socket()+connect()+close(RST) to a loopback listener.
    TcpConnect,
    /// connect() of one UDP socket, repeated (no socket creation).
    UdpConnect,
    /// sendto() on one unconnected UDP socket (no socket creation).
    UdpSendto,
    /// socket(AF_INET, SOCK_DGRAM)+close(): the sock_create hook alone.
    SocketClose,
}

impl Workload {
    pub const ALL: [Workload; 4] = [
        Workload::TcpConnect,
        Workload::UdpConnect,
        Workload::UdpSendto,
        Workload::SocketClose,
    ];

    /// Its name on the worker's command line and key in its JSON.
    pub const fn key(self) -> &'static str {
        match self {
            Workload::TcpConnect => "tcp_connect_ns",
            Workload::UdpConnect => "udp_connect_ns",
            Workload::UdpSendto => "udp_sendto_ns",
            Workload::SocketClose => "socket_close_ns",
        }
    }

    /// Its name in reports.
    pub const fn label(self) -> &'static str {
        match self {
            Workload::TcpConnect => "TCP connect+close",
            Workload::UdpConnect => "UDP connect",
            Workload::UdpSendto => "UDP sendto",
            Workload::SocketClose => "socket()+close()",
        }
    }
}

impl FromStr for Workload {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|w| w.key() == s)
            .with_context(|| format!("unknown workload {s:?}"))
    }
}

/// One worker run: nanoseconds per call for each workload it ran, printed as
/// one flat JSON object keyed by [`Workload::key`]
/// (`{"socket_close_ns":1234.5,"tcp_connect_ns":...}`). Readers take the
/// keys they know and ignore the rest, so a new workload breaks none of them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timings(BTreeMap<String, f64>);

impl Timings {
    /// ns per call of `w`, when the run measured it.
    pub fn get(&self, w: Workload) -> Option<f64> {
        self.0.get(w.key()).copied()
    }
}

/// The first three workloads of a full run (no workload named), as
/// `imdsguard-bench scale` reads them from the same JSON.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub tcp_connect_ns: f64,
    pub udp_connect_ns: f64,
    pub udp_sendto_ns: f64,
}

/// Runs inside the lab namespace and cgroup (as a probe process): times
/// each of `workloads`, in the order of [`Workload::ALL`].
pub fn worker(iterations: u32, workloads: &[Workload]) -> anyhow::Result<Timings> {
    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        // Warm up caches, slabs and the hook's maps.
        for _ in 0..iterations / 10 {
            f()?;
        }
        let t = Instant::now();
        for _ in 0..iterations {
            f()?;
        }
        Ok(t.elapsed().as_nanos() as f64 / f64::from(iterations.max(1)))
    };
    // Our own sink, on loopback inside the lab namespace.
    let sink = UdpSocket::bind("127.0.0.1:0").context("bind bench sink")?;
    let udp_target = sink.local_addr()?;
    let mut out = BTreeMap::new();
    for w in Workload::ALL.into_iter().filter(|w| workloads.contains(w)) {
        let ns = match w {
            Workload::TcpConnect => {
                let tcp_target = accept_and_drop()?;
                time(&mut || {
                    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                    s.connect(&tcp_target.into()).context("tcp connect")?;
                    // Close with RST: no TIME_WAIT pile-up exhausting
                    // ephemeral ports.
                    s.set_linger(Some(Duration::ZERO))?;
                    Ok(())
                })?
            }
            // UDP connect() can be repeated on one socket: only the connect
            // path (and its hook) is timed, not socket creation.
            Workload::UdpConnect => {
                let sender = UdpSocket::bind("127.0.0.1:0")?;
                time(&mut || {
                    sender.connect(udp_target).context("udp connect")?;
                    Ok(())
                })?
            }
            Workload::UdpSendto => {
                let sender = UdpSocket::bind("127.0.0.1:0")?;
                let payload = [0u8; 32];
                time(&mut || {
                    sender.send_to(&payload, udp_target).context("udp sendto")?;
                    Ok(())
                })?
            }
            // socket() runs inet_create() and, below the attach root, the
            // sock_create program; close() frees the socket and any
            // socket-local storage the program allocated. Nothing else.
            Workload::SocketClose => time(&mut || {
                drop(Socket::new(Domain::IPV4, Type::DGRAM, None).context("socket")?);
                Ok(())
            })?,
        };
        out.insert(w.key().to_owned(), ns);
    }
    drop(sink);
    Ok(Timings(out))
}

/// A loopback listener whose thread accepts and drops. The backlog is as
/// deep as the kernel allows: a full accept queue would drop SYNs and add
/// 1 s retransmits.
fn accept_and_drop() -> anyhow::Result<SocketAddr> {
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    listener.set_reuse_address(true)?;
    listener.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    listener.listen(65_535)?;
    let listener: TcpListener = listener.into();
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    Ok(addr)
}

/// What [`hold_connections`] prints once its connections are up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// Established connections (each is two sockets: ours and the
    /// accepted one).
    pub connections: u32,
}

/// Opens `count` TCP connections to a listener of its own on 127.0.0.1 (in
/// whatever namespace it runs), prints a [`Holding`] line and keeps them
/// idle until killed. It dies with its parent (PR_SET_PDEATHSIG).
pub fn hold_connections(count: u32) -> anyhow::Result<std::convert::Infallible> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        bail!(
            "prctl(PR_SET_PDEATHSIG): {}",
            std::io::Error::last_os_error()
        );
    }
    raise_fd_limit(u64::from(count) * 2 + 16)?;
    let listener = TcpListener::bind("127.0.0.1:0").context("bind holder listener")?;
    let addr = listener.local_addr()?;
    let mut held = Vec::with_capacity(count as usize * 2);
    // One at a time: the accept queue never fills, whatever `count` is.
    for _ in 0..count {
        held.push(TcpStream::connect(addr).context("holder connect")?);
        held.push(listener.accept().context("holder accept")?.0);
    }
    // Killed, we close with RST: no TIME_WAIT sockets are left for the
    // next sweep to count.
    for s in &held {
        SockRef::from(s).set_linger(Some(Duration::ZERO))?;
    }
    // A listener is not a connection: the sweep's dump skips it anyway.
    drop(listener);
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{}",
        serde_json::to_string(&Holding { connections: count })?
    )?;
    stdout.flush()?;
    drop(stdout);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Raises the soft RLIMIT_NOFILE to at least `want` (up to the hard limit).
fn raise_fd_limit(want: u64) -> anyhow::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur >= want {
            return Ok(());
        }
        anyhow::ensure!(
            lim.rlim_max >= want,
            "{want} file descriptors needed, hard limit is {}",
            lim.rlim_max
        );
        lim.rlim_cur = want;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Parses the worker's arguments (after the probe kind):
/// * `ITERATIONS [WORKLOAD...]`: the overhead worker, every workload unless
///   some are named (by [`Workload::key`]); prints [`Timings`];
/// * `udp-connect ADDR ITERATIONS`: repeated UDP connect() to one
///   destination, for per-run program cost; prints the EPERM count;
/// * `hold-connections COUNT`: [`hold_connections`]; never ends by itself;
/// * `http-get ...`, `http-rps ...`: metadata GETs, see
///   [`crate::bench_http::worker_main`].
pub fn worker_main(args: &[String]) -> anyhow::Result<String> {
    match args.first().map(String::as_str) {
        Some(kind @ ("http-get" | "http-rps")) => crate::bench_http::worker_main(kind, &args[1..]),
        Some("udp-connect") => {
            let target: SocketAddr = args.get(1).context("target missing")?.parse()?;
            let iterations: u32 = args.get(2).context("iterations missing")?.parse()?;
            Ok(serde_json::to_string(&udp_connect_loop(
                target, iterations,
            )?)?)
        }
        Some("hold-connections") => {
            let count: u32 = args.get(1).context("connection count missing")?.parse()?;
            match hold_connections(count)? {}
        }
        _ => {
            let iterations: u32 = args.first().context("iterations missing")?.parse()?;
            let mut workloads = args[1..]
                .iter()
                .map(|a| a.parse())
                .collect::<anyhow::Result<Vec<Workload>>>()?;
            if workloads.is_empty() {
                workloads = Workload::ALL.to_vec();
            }
            Ok(serde_json::to_string(&worker(iterations, &workloads)?)?)
        }
    }
}

/// `iterations` UDP connect() calls to `target`; returns how many failed
/// with EPERM (any other error fails the run).
fn udp_connect_loop(target: SocketAddr, iterations: u32) -> anyhow::Result<u32> {
    let sock = UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    let mut eperm = 0u32;
    for _ in 0..iterations {
        // Connecting a UDP socket sends nothing; the hook runs each time.
        if let Err(e) = sock.connect(target) {
            anyhow::ensure!(
                e.raw_os_error() == Some(libc::EPERM),
                "udp connect {target}: {e}"
            );
            eperm += 1;
        }
    }
    Ok(eperm)
}
