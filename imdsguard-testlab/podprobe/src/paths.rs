//! Path mode (`--path P`, repeatable): what a pod under imdsguard's filter
//! mode sees. Each period: one IMDSv2 token PUT, then a GET of each path
//! with that token, each on its own connection, and one line per path:
//!
//! ```text
//! imdsguard-probe seq=3 first=0 path=/latest/meta-data/placement/region verdict=ok status=200 step=get token=1 errno=- ms=2 body=us-east-1 unix_ms=...
//! imdsguard-probe seq=3 first=0 path=/latest/meta-data/instance-id verdict=http status=403 step=get token=1 errno=- ms=1 body=... unix_ms=...
//! imdsguard-probe seq=4 first=0 path=/latest/meta-data/instance-id verdict=denied status=- step=put token=0 errno=1 ms=0 detail=... unix_ms=...
//! ```
//!
//! - A PUT that fails (EPERM at connect: `denied`; anything else: `error`)
//!   gives every path of the period the PUT's outcome, with `step=put`:
//!   an SDK without a connection asks nothing more.
//! - A PUT answered with a status other than 200 leaves the GETs without a
//!   token (`token=0`), as the AWS SDKs fall back to IMDSv1.
//! - `body=` holds the start of the answer when there is one (any status),
//!   `detail=` the error otherwise. `unix_ms` is the period's start, the
//!   same on each of its lines; `ms` is that request's own time.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use crate::{
    MAX_BODY_CHARS, MAX_ERROR_CHARS, Options, Outcome, Verdict, exchange, request, token,
    token_put, unix_ms,
};

/// The User-Agent of path mode's requests, so that a fake metadata service
/// can tell them from the IMDSv2 mode's (the real-node e2e checks which of
/// them reached it).
pub const USER_AGENT: &str = "imdsguard-podprobe-paths";

/// One path's result in one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathOutcome {
    pub path: String,
    /// The HTTP status, when the service (or a proxy in front of it)
    /// answered.
    pub status: Option<u16>,
    /// Whether the GET carried an IMDSv2 token.
    pub token: bool,
    /// Verdict, step and errno; `detail` is the body when `status` is set,
    /// the error otherwise.
    pub outcome: Outcome,
}

/// An origin-form path that fits in a request line and a log field: a
/// leading `/`, visible ASCII only.
pub fn is_request_path(p: &str) -> bool {
    p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic())
}

/// The token, `None` when the service answered the PUT without one, or
/// the PUT's failure.
fn get_token(target: SocketAddr) -> Result<Option<String>, Outcome> {
    match exchange(target, "put", &token_put(target, USER_AGENT)) {
        Ok((200, t)) => Ok(Some(t.trim().to_owned())),
        Ok(_) => Ok(None),
        Err(o) => Err(o),
    }
}

fn get(target: SocketAddr, path: &str, token: Option<&str>) -> PathOutcome {
    let mut req = request(target, USER_AGENT, &format!("GET {path}"));
    if let Some(t) = token {
        req += &format!("X-aws-ec2-metadata-token: {t}\r\n");
    }
    req += "\r\n";
    let (status, outcome) = match exchange(target, "get", &req) {
        Ok((200, body)) => (Some(200), Outcome::ok("get", body)),
        Ok((status, body)) => (
            Some(status),
            Outcome {
                verdict: Verdict::Http,
                step: "get",
                errno: None,
                detail: body,
            },
        ),
        Err(o) => (None, o),
    };
    PathOutcome {
        path: path.to_owned(),
        status,
        token: token.is_some(),
        outcome,
    }
}

/// One period: the token PUT, then every path. `each` gets each result as
/// soon as it is known, with the time its request took.
pub fn probe_paths(
    target: SocketAddr,
    paths: &[String],
    mut each: impl FnMut(&PathOutcome, Duration) -> io::Result<()>,
) -> io::Result<()> {
    let clock = Instant::now();
    let token = get_token(target);
    let put_took = clock.elapsed();
    for path in paths {
        match &token {
            Ok(t) => {
                let clock = Instant::now();
                let o = get(target, path, t.as_deref());
                each(&o, clock.elapsed())?;
            }
            Err(o) => {
                let o = PathOutcome {
                    path: path.clone(),
                    status: None,
                    token: false,
                    outcome: o.clone(),
                };
                each(&o, put_took)?;
            }
        }
    }
    Ok(())
}

pub(crate) fn write_line(
    out: &mut impl Write,
    seq: u64,
    p: &PathOutcome,
    started: SystemTime,
    took: Duration,
) -> io::Result<()> {
    let o = &p.outcome;
    let (key, max) = if p.status.is_some() {
        ("body", MAX_BODY_CHARS)
    } else {
        ("detail", MAX_ERROR_CHARS)
    };
    let status = p.status.map_or_else(|| "-".into(), |s| s.to_string());
    let errno = o.errno.map_or_else(|| "-".into(), |e| e.to_string());
    writeln!(
        out,
        "imdsguard-probe seq={seq} first={} path={} verdict={} status={status} step={} token={} errno={errno} ms={} {key}={} unix_ms={}",
        u8::from(seq == 1),
        token(&p.path, MAX_ERROR_CHARS),
        o.verdict.as_str(),
        o.step,
        u8::from(p.token),
        took.as_millis(),
        token(&o.detail, max),
        unix_ms(started),
    )?;
    out.flush()
}

/// [`crate::run`] in path mode: a period every `interval`, the first at
/// once, until `count`.
pub(crate) fn run(opts: &Options, out: &mut impl Write) -> io::Result<()> {
    let mut seq = 0;
    loop {
        seq += 1;
        let started = SystemTime::now();
        probe_paths(opts.target, &opts.paths, |o, took| {
            write_line(out, seq, o, started, took)
        })?;
        if opts.count == Some(seq) {
            return Ok(());
        }
        std::thread::sleep(opts.interval);
    }
}

#[cfg(test)]
mod tests;
