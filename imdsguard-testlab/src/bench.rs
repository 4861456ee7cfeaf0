//! The hook-overhead benchmark: per-call cost of TCP connect()+close(),
//! UDP connect() and unconnected UDP sendto() to an unprotected loopback
//! destination, from a process in a lab cgroup, with imdsguard attached or
//! not. Arms are interleaved round by round so drift hits them all alike.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    time::Instant,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

/// One worker run: nanoseconds per operation for each operation.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub tcp_connect_ns: f64,
    pub udp_connect_ns: f64,
    pub udp_sendto_ns: f64,
}

/// Runs inside the lab namespace and cgroup (as a probe process).
pub fn worker(iterations: u32) -> anyhow::Result<WorkerReport> {
    // Our own listener and sink, on loopback inside the lab namespace. The
    // backlog is as deep as the kernel allows and a thread accepts and drops:
    // a full accept queue would drop SYNs and add 1 s retransmits.
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    listener.set_reuse_address(true)?;
    listener.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    listener.listen(65_535)?;
    let listener: TcpListener = listener.into();
    let tcp_target = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let sink = UdpSocket::bind("127.0.0.1:0").context("bind bench sink")?;
    let udp_target = sink.local_addr()?;

    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        // Warm up caches, slabs and the hook's maps.
        for _ in 0..iterations / 10 {
            f()?;
        }
        let t = Instant::now();
        for _ in 0..iterations {
            f()?;
        }
        Ok(t.elapsed().as_nanos() as f64 / f64::from(iterations))
    };
    let tcp_connect_ns = time(&mut || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.connect(&tcp_target.into()).context("tcp connect")?;
        // Close with RST: no TIME_WAIT pile-up exhausting ephemeral ports.
        s.set_linger(Some(std::time::Duration::ZERO))?;
        Ok(())
    })?;
    // UDP connect() can be repeated on one socket: only the connect path
    // (and its hook) is timed, not socket creation.
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    let udp_connect_ns = time(&mut || {
        sender.connect(udp_target).context("udp connect")?;
        Ok(())
    })?;
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    let payload = [0u8; 32];
    let udp_sendto_ns = time(&mut || {
        sender.send_to(&payload, udp_target).context("udp sendto")?;
        Ok(())
    })?;
    drop(sink);
    Ok(WorkerReport {
        tcp_connect_ns,
        udp_connect_ns,
        udp_sendto_ns,
    })
}

/// Parses the worker's arguments (after the probe kind): either
/// `ITERATIONS` (the overhead worker) or `udp-connect ADDR ITERATIONS`
/// (repeated UDP connect() to one destination, for per-run program cost).
pub fn worker_main(args: &[String]) -> anyhow::Result<String> {
    if args.first().map(String::as_str) == Some("udp-connect") {
        let target: std::net::SocketAddr = args.get(1).context("target missing")?.parse()?;
        let iterations: u32 = args.get(2).context("iterations missing")?.parse()?;
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
        return Ok(serde_json::to_string(&eperm)?);
    }
    let iterations: u32 = args.first().context("iterations missing")?.parse()?;
    Ok(serde_json::to_string(&worker(iterations)?)?)
}
