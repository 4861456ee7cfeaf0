//! The filter-proxy benchmark's worker: metadata GETs as an SDK makes them
//! (a fresh TCP connection, one IMDSv2 request, close), timed one by one
//! for latency or counted from a few concurrent clients for throughput.
//! The same worker runs from an allowed cgroup (straight to the service)
//! and from a filtered one (through the proxy), so the two differ only by
//! the proxy.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};
use socket2::SockRef;

/// What one latency run measured: each GET's time, in request order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latencies {
    pub ns: Vec<u64>,
}

/// What one throughput run counted.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Throughput {
    pub requests: u64,
    pub secs: f64,
}

/// An IMDSv2 client of `target`: the token is fetched once, as SDKs cache it.
struct Client {
    target: SocketAddr,
    request: Vec<u8>,
}

impl Client {
    fn new(target: SocketAddr, path: &str) -> anyhow::Result<Self> {
        let host = target.ip();
        let put = format!(
            "PUT /latest/api/token HTTP/1.1\r\nHost: {host}\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n"
        );
        let token = exchange(target, put.as_bytes()).context("token PUT")?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: imdsguard-bench\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n"
        );
        Ok(Self {
            target,
            request: request.into_bytes(),
        })
    }

    fn get(&self) -> anyhow::Result<()> {
        exchange(self.target, &self.request).map(drop)
    }
}

/// One request on a fresh connection; the body of a 200, an error
/// otherwise. Closed with RST: thousands of GETs leave no TIME_WAIT sockets
/// to exhaust the ephemeral ports.
fn exchange(target: SocketAddr, request: &[u8]) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .with_context(|| format!("connect {target}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request)?;
    let resp = read_response(&mut s)?;
    SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no response head")?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "{}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_owned())
}

/// Reads one response framed by Content-Length (both the fake service and
/// the proxy send one), without waiting for the peer to close.
fn read_response(s: &mut TcpStream) -> anyhow::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .context("no content-length")?
                .trim()
                .parse()?;
            if buf.len() >= end + 4 + len {
                return Ok(String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned());
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `iterations` GETs of `path`, one after another, each timed (after a
/// tenth as many untimed ones to warm up).
pub fn latencies(target: SocketAddr, path: &str, iterations: u32) -> anyhow::Result<Latencies> {
    let client = Client::new(target, path)?;
    for _ in 0..iterations / 10 {
        client.get()?;
    }
    let mut ns = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        let t = Instant::now();
        client.get()?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    Ok(Latencies { ns })
}

/// GETs of `path` from `clients` threads, each back to back, for `millis`.
pub fn throughput(
    target: SocketAddr,
    path: &str,
    clients: u32,
    millis: u64,
) -> anyhow::Result<Throughput> {
    let client = Arc::new(Client::new(target, path)?);
    let start = Instant::now();
    let end = start + Duration::from_millis(millis);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let client = client.clone();
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut n = 0;
                while Instant::now() < end {
                    client.get()?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut requests = 0;
    for t in threads {
        requests += t.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    Ok(Throughput {
        requests,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// Parses the worker's arguments (after `http-get`/`http-rps`):
/// * `http-get TARGET PATH ITERATIONS`: prints [`Latencies`];
/// * `http-rps TARGET PATH CLIENTS MILLIS`: prints [`Throughput`].
pub fn worker_main(kind: &str, args: &[String]) -> anyhow::Result<String> {
    let target: SocketAddr = args.first().context("target missing")?.parse()?;
    let path = args.get(1).context("path missing")?;
    let n = |i: usize| -> anyhow::Result<u64> {
        Ok(args
            .get(i)
            .with_context(|| format!("argument {i} missing"))?
            .parse()?)
    };
    match kind {
        "http-get" => Ok(serde_json::to_string(&latencies(
            target,
            path,
            u32::try_from(n(2)?)?,
        )?)?),
        "http-rps" => Ok(serde_json::to_string(&throughput(
            target,
            path,
            u32::try_from(n(2)?)?,
            n(3)?,
        )?)?),
        other => bail!("unknown http worker {other:?}"),
    }
}
