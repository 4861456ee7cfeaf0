//! A probe that runs as a pod's container and asks the metadata service for
//! the instance id the way an AWS SDK does (IMDSv2: a token `PUT`, then a
//! `GET` with the token), printing one machine-parsable line per probe.
//! Std only (plus libc), so it links statically for musl and runs in an
//! image that holds nothing else.
//!
//! With `--path P` (repeatable) it asks for those paths instead, after the
//! same token PUT, and prints one line per path with its HTTP status: what
//! a pod under imdsguard's filter mode sees (see [`paths`]).
//!
//! The HTTP is written by hand: a few fixed requests over a plain
//! `TcpStream` do not justify an HTTP client in a static test binary.

use std::fmt;
use std::io::{self, Read as _, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod paths;

pub const USAGE: &str = "usage: imdsguard-podprobe [--target ADDR:PORT] [--interval-ms N] [--burst | --path PATH...] [--count N] [--hold ADDR:PORT]";
pub const DEFAULT_TARGET: &str = "169.254.169.254:80";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RESPONSE: usize = 64 * 1024;
const MAX_BODY_CHARS: usize = 64;
const MAX_ERROR_CHARS: usize = 160;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub target: SocketAddr,
    pub interval: Duration,
    /// Connect-only probes as fast as possible, with a summary every second.
    pub burst: bool,
    /// Stop after this many probes; `None` runs until a signal.
    pub count: Option<u64>,
    /// Also keep one TCP connection to this address open, and say when it
    /// is closed under us (revocation).
    pub hold: Option<SocketAddr>,
    /// Path mode: GET these paths (after the token PUT) instead of the
    /// instance id, one line each per period.
    pub paths: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ArgError {
    Help,
    Unknown(String),
    MissingValue(&'static str),
    BadValue {
        flag: &'static str,
        value: String,
    },
    /// `--burst` only connects, so it has no paths to ask for.
    BurstWithPaths,
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Help => f.write_str("help requested"),
            Self::Unknown(arg) => write!(f, "unknown argument {arg:?}"),
            Self::MissingValue(flag) => write!(f, "{flag} needs a value"),
            Self::BadValue { flag, value } => write!(f, "bad value {value:?} for {flag}"),
            Self::BurstWithPaths => f.write_str("--burst and --path cannot be combined"),
        }
    }
}

/// Parses the arguments after the program name. Flags take `--flag VALUE`
/// or `--flag=VALUE`.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Options, ArgError> {
    let mut opts = Options {
        target: DEFAULT_TARGET.parse().expect("the default target parses"),
        interval: Duration::from_secs(1),
        burst: false,
        count: None,
        hold: None,
        paths: Vec::new(),
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |flag: &'static str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(ArgError::MissingValue(flag))
        };
        let bad = |flag: &'static str, value: String| ArgError::BadValue { flag, value };
        match name.as_str() {
            "-h" | "--help" => return Err(ArgError::Help),
            "--burst" if inline.is_none() => opts.burst = true,
            "--target" => {
                let v = value("--target")?;
                opts.target = v.parse().map_err(|_| bad("--target", v))?;
            }
            "--hold" => {
                let v = value("--hold")?;
                opts.hold = Some(v.parse().map_err(|_| bad("--hold", v))?);
            }
            "--interval-ms" => {
                let v = value("--interval-ms")?;
                opts.interval =
                    Duration::from_millis(v.parse().map_err(|_| bad("--interval-ms", v))?);
            }
            "--path" => {
                let v = value("--path")?;
                if !paths::is_request_path(&v) {
                    return Err(bad("--path", v));
                }
                opts.paths.push(v);
            }
            "--count" => {
                let v = value("--count")?;
                match v.parse() {
                    Ok(n) if n > 0 => opts.count = Some(n),
                    _ => return Err(bad("--count", v)),
                }
            }
            _ => return Err(ArgError::Unknown(arg)),
        }
    }
    if opts.burst && !opts.paths.is_empty() {
        return Err(ArgError::BurstWithPaths);
    }
    Ok(opts)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// IMDSv2 answered 200 (burst mode: the TCP connect succeeded).
    Ok,
    /// Path mode: the service answered with another status (`status=`
    /// says which). The IMDSv2 mode counts that as an error.
    Http,
    /// connect() failed with EPERM (or EACCES, which some hooks return).
    Denied,
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Http => "http",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Which request it came from: `put` or `get` (IMDSv2), `connect` (burst).
    pub step: &'static str,
    pub errno: Option<i32>,
    pub detail: String,
}

impl Outcome {
    fn error(step: &'static str, errno: Option<i32>, detail: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Error,
            step,
            errno,
            detail: detail.into(),
        }
    }

    fn ok(step: &'static str, detail: String) -> Self {
        Self {
            verdict: Verdict::Ok,
            step,
            errno: None,
            detail,
        }
    }

    fn io(step: &'static str, e: &io::Error) -> Self {
        Self::error(step, e.raw_os_error(), e.to_string())
    }

    /// A failed connect: EPERM is what imdsguard's connect hooks return.
    fn connect_failed(step: &'static str, e: &io::Error) -> Self {
        let verdict = match e.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => Verdict::Denied,
            _ => Verdict::Error,
        };
        Self {
            verdict,
            ..Self::io(step, e)
        }
    }
}

fn connect(target: SocketAddr, step: &'static str) -> Result<TcpStream, Outcome> {
    TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
        .map_err(|e| Outcome::connect_failed(step, &e))
}

/// One request on a fresh connection; returns the status and the body.
fn exchange(
    target: SocketAddr,
    step: &'static str,
    request: &str,
) -> Result<(u16, String), Outcome> {
    let mut s = connect(target, step)?;
    let io = |e: io::Error| Outcome::io(step, &e);
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    s.write_all(request.as_bytes()).map_err(io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).map_err(io)?;
        buf.extend_from_slice(&chunk[..n]);
        if let Some((status, body)) = parse_response(&buf, n == 0) {
            return Ok((status, String::from_utf8_lossy(body).into_owned()));
        }
        if n == 0 || buf.len() > MAX_RESPONSE {
            return Err(Outcome::error(step, None, "malformed HTTP response"));
        }
    }
}

/// The status and body once the response is complete: its Content-Length
/// is read, or the server closed the connection.
fn parse_response(buf: &[u8], eof: bool) -> Option<(u16, &[u8])> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let body = &buf[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()?
        .strip_prefix("HTTP/1.")?
        .get(2..5)?
        .parse()
        .ok()?;
    let length = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    match length {
        Some(len) if body.len() >= len => Some((status, &body[..len])),
        None if eof => Some((status, body)),
        _ => None,
    }
}

/// A request's line and common headers, up to the blank line (not
/// included): `head` is `METHOD PATH`.
fn request(target: SocketAddr, user_agent: &str, head: &str) -> String {
    format!(
        "{head} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: {user_agent}\r\nAccept: */*\r\nConnection: close\r\n"
    )
}

/// The IMDSv2 token PUT, as AWS SDKs send it (no body).
fn token_put(target: SocketAddr, user_agent: &str) -> String {
    request(target, user_agent, "PUT /latest/api/token")
        + "X-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: 0\r\n\r\n"
}

/// IMDSv2, as an AWS SDK asks: a token, then the instance id with it.
pub fn probe_imds(target: SocketAddr) -> Outcome {
    let request = |head: &str| request(target, "imdsguard-podprobe", head);
    let put = token_put(target, "imdsguard-podprobe");
    let token = match exchange(target, "put", &put) {
        Ok((200, token)) => token.trim().to_owned(),
        Ok((status, _)) => return Outcome::error("put", None, format!("http status {status}")),
        Err(o) => return o,
    };
    let get = request("GET /latest/meta-data/instance-id")
        + &format!("X-aws-ec2-metadata-token: {token}\r\n\r\n");
    match exchange(target, "get", &get) {
        Ok((200, body)) => Outcome::ok("get", body),
        Ok((status, _)) => Outcome::error("get", None, format!("http status {status}")),
        Err(o) => o,
    }
}

/// A TCP connect and nothing else; the socket is reset on close, so a
/// burst leaves no TIME_WAIT behind to exhaust the ephemeral ports.
pub fn probe_connect(target: SocketAddr) -> Outcome {
    match connect(target, "connect") {
        Ok(s) => {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: the fd is open while `s` lives; we pass a linger and its size.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            Outcome::ok("connect", "connected".into())
        }
        Err(o) => o,
    }
}

/// Opens one connection to `addr` and waits on it: prints `hold=open`, then
/// `hold=closed` with the error once something (imdsguard's revocation)
/// closes it. A refused connect prints `hold=refused`.
pub fn hold(addr: SocketAddr, out: &mut impl Write) -> io::Result<()> {
    let mut s = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(0);
            writeln!(
                out,
                "imdsguard-probe hold=refused errno={errno} detail={}",
                token(&e.to_string(), MAX_ERROR_CHARS)
            )?;
            return out.flush();
        }
    };
    writeln!(out, "imdsguard-probe hold=open target={addr}")?;
    out.flush()?;
    let mut buf = [0u8; 512];
    // The peer echoes; nothing is sent, so a read returns only when the
    // connection ends.
    let (errno, detail) = loop {
        match s.read(&mut buf) {
            Ok(0) => break (0, "eof".to_owned()),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break (e.raw_os_error().unwrap_or(0), e.to_string()),
        }
    };
    writeln!(
        out,
        "imdsguard-probe hold=closed errno={errno} detail={}",
        token(&detail, MAX_ERROR_CHARS)
    )?;
    out.flush()
}

/// Whitespace and control characters become `_`, so every field is one
/// token; an empty value is `-`.
fn token(s: &str, max_chars: usize) -> String {
    let t: String = s
        .trim()
        .chars()
        .take(max_chars)
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if t.is_empty() { "-".into() } else { t }
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

fn write_probe(
    out: &mut impl Write,
    seq: u64,
    o: &Outcome,
    started: SystemTime,
    took: Duration,
) -> io::Result<()> {
    let max = if o.verdict == Verdict::Ok {
        MAX_BODY_CHARS
    } else {
        MAX_ERROR_CHARS
    };
    let errno = o.errno.map_or_else(|| "-".into(), |e| e.to_string());
    writeln!(
        out,
        "imdsguard-probe seq={seq} first={} verdict={} step={} errno={errno} ms={} detail={} unix_ms={}",
        u8::from(seq == 1),
        o.verdict.as_str(),
        o.step,
        took.as_millis(),
        token(&o.detail, max),
        unix_ms(started),
    )?;
    out.flush()
}

/// Probes until `count` is reached (forever without it), writing each line
/// to `out` and flushing it at once. The first probe runs immediately.
pub fn run(opts: &Options, out: &mut impl Write) -> io::Result<()> {
    if !opts.paths.is_empty() {
        return paths::run(opts, out);
    }
    let mut counts = [0u64; 3];
    let mut last_verdict = None;
    let mut last_summary = Instant::now();
    let mut seq = 0;
    loop {
        seq += 1;
        let (started, clock) = (SystemTime::now(), Instant::now());
        let o = if opts.burst {
            probe_connect(opts.target)
        } else {
            probe_imds(opts.target)
        };
        let done = opts.count == Some(seq);
        if !opts.burst {
            write_probe(out, seq, &o, started, clock.elapsed())?;
            if done {
                return Ok(());
            }
            std::thread::sleep(opts.interval);
            continue;
        }
        // Bursts print the first probe and every change of verdict.
        if last_verdict != Some(o.verdict) {
            write_probe(out, seq, &o, started, clock.elapsed())?;
            last_verdict = Some(o.verdict);
        }
        counts[match o.verdict {
            Verdict::Ok => 0,
            Verdict::Denied => 1,
            // A connect has no status: bursts never see `Http`.
            Verdict::Error | Verdict::Http => 2,
        }] += 1;
        if done || last_summary.elapsed() >= Duration::from_secs(1) {
            let [ok, denied, error] = counts;
            writeln!(
                out,
                "imdsguard-probe summary attempts={seq} ok={ok} denied={denied} error={error} unix_ms={}",
                unix_ms(SystemTime::now())
            )?;
            out.flush()?;
            last_summary = Instant::now();
        }
        if done {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests;
