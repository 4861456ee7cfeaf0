//! Path mode against a local server on 127.0.0.1 that answers as
//! imdsguard's filter proxy does: the token, the region, 403 for the rest.

use std::io::{BufRead as _, BufReader};
use std::net::{TcpListener, TcpStream};
use std::thread::{self, JoinHandle};

use super::*;

const TOKEN: &str = "AQAEAtokenXYZ==";
const REGION: &str = "/latest/meta-data/placement/region";
const INSTANCE_ID: &str = "/latest/meta-data/instance-id";
const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/lab-role";

/// Reads one request head (the probe sends no body).
fn read_head(s: &TcpStream) -> Vec<String> {
    let mut r = BufReader::new(s);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("read request");
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            return lines;
        }
        lines.push(line);
    }
}

/// Serves `requests` connections, answering each head with `answer`;
/// returns the heads.
fn server(
    requests: usize,
    answer: fn(&[String]) -> (&'static str, String),
) -> (SocketAddr, JoinHandle<Vec<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local addr");
    let handle = thread::spawn(move || {
        let mut heads = Vec::new();
        for _ in 0..requests {
            let (mut s, _) = listener.accept().expect("accept");
            let head = read_head(&s);
            let (status, body) = answer(&head);
            write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .expect("write response");
            heads.push(head);
        }
        heads
    });
    (addr, handle)
}

/// The filter proxy's answers for a pod whose profile is `region`.
fn filter_proxy(head: &[String]) -> (&'static str, String) {
    let with_token = head
        .iter()
        .any(|l| *l == format!("X-aws-ec2-metadata-token: {TOKEN}"));
    match head[0].as_str() {
        "PUT /latest/api/token HTTP/1.1" => ("200 OK", TOKEN.into()),
        l if l == format!("GET {REGION} HTTP/1.1") && with_token => ("200 OK", "us-east-1".into()),
        _ => ("403 Forbidden", "imdsguard: path not allowed\n".into()),
    }
}

fn opts(target: SocketAddr, count: u64) -> Options {
    Options {
        target,
        interval: Duration::from_millis(10),
        burst: false,
        count: Some(count),
        hold: None,
        paths: [REGION, INSTANCE_ID, CREDENTIALS]
            .map(str::to_owned)
            .to_vec(),
    }
}

fn run_lines(opts: &Options) -> Vec<String> {
    let mut out = Vec::new();
    crate::run(opts, &mut out).expect("run");
    String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The value of `key=` in a probe line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn one_line_per_path_with_its_status() {
    // Two periods of a PUT and three GETs.
    let (addr, server) = server(8, filter_proxy);
    let lines = run_lines(&opts(addr, 2));
    let heads = server.join().expect("server");
    assert_eq!(lines.len(), 6, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        let seq = i / 3 + 1;
        assert!(line.starts_with("imdsguard-probe seq="), "{line}");
        assert_eq!(field(line, "seq"), seq.to_string());
        assert_eq!(field(line, "first"), if seq == 1 { "1" } else { "0" });
        assert_eq!(field(line, "step"), "get");
        assert_eq!(field(line, "token"), "1");
        assert_eq!(field(line, "errno"), "-");
        assert!(field(line, "unix_ms").parse::<u128>().expect("unix_ms") > 1_600_000_000_000);
        let (path, verdict, status) = match i % 3 {
            0 => (REGION, "ok", "200"),
            1 => (INSTANCE_ID, "http", "403"),
            _ => (CREDENTIALS, "http", "403"),
        };
        assert_eq!(
            (
                field(line, "path"),
                field(line, "verdict"),
                field(line, "status")
            ),
            (path, verdict, status),
            "{line}"
        );
    }
    assert_eq!(field(&lines[0], "body"), "us-east-1");
    assert_eq!(field(&lines[1], "body"), "imdsguard:_path_not_allowed");
    // The lines of one period share its start.
    assert_eq!(field(&lines[0], "unix_ms"), field(&lines[2], "unix_ms"));

    let requests: Vec<&str> = heads.iter().map(|h| h[0].as_str()).collect();
    assert_eq!(
        requests[..4],
        [
            "PUT /latest/api/token HTTP/1.1".to_owned(),
            format!("GET {REGION} HTTP/1.1"),
            format!("GET {INSTANCE_ID} HTTP/1.1"),
            format!("GET {CREDENTIALS} HTTP/1.1"),
        ]
    );
    for head in &heads {
        assert!(
            head.contains(&format!("User-Agent: {USER_AGENT}")),
            "{head:?}"
        );
    }
    assert!(heads[0].contains(&"X-aws-ec2-metadata-token-ttl-seconds: 21600".to_owned()));
}

#[test]
fn a_refused_token_leaves_the_gets_without_one() {
    let (addr, server) = server(4, |head| {
        if head[0].starts_with("PUT ") {
            ("403 Forbidden", String::new())
        } else {
            assert!(
                !head
                    .iter()
                    .any(|l| l.starts_with("X-aws-ec2-metadata-token:")),
                "{head:?}"
            );
            ("200 OK", "v1".into())
        }
    });
    let lines = run_lines(&opts(addr, 1));
    server.join().expect("server");
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert_eq!(
            (
                field(line, "verdict"),
                field(line, "status"),
                field(line, "token")
            ),
            ("ok", "200", "0"),
            "{line}"
        );
    }
}

#[test]
fn a_failed_put_fails_every_path() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let lines = run_lines(&opts(closed, 1));
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert_eq!(field(line, "verdict"), "error");
        assert_eq!(field(line, "step"), "put");
        assert_eq!(field(line, "status"), "-");
        assert_eq!(field(line, "errno"), libc::ECONNREFUSED.to_string());
        assert!(
            field(line, "detail").starts_with("Connection_refused"),
            "{line}"
        );
    }
}

#[test]
fn eperm_at_the_put_is_denied_on_every_line() {
    let denied = PathOutcome {
        path: REGION.into(),
        status: None,
        token: false,
        outcome: Outcome::connect_failed("put", &io::Error::from_raw_os_error(libc::EPERM)),
    };
    let mut out = Vec::new();
    write_line(&mut out, 1, &denied, SystemTime::now(), Duration::ZERO).expect("write");
    let line = String::from_utf8(out).expect("utf-8");
    assert!(
        line.contains(&format!(
            " path={REGION} verdict=denied status=- step=put token=0 errno=1 ms=0 detail="
        )),
        "{line}"
    );
}

#[test]
fn paths_must_be_origin_form() {
    assert!(is_request_path(REGION));
    assert!(is_request_path("/"));
    for bad in ["latest/meta-data", "", "/a b", "/a\tb", "/é"] {
        assert!(!is_request_path(bad), "{bad:?}");
    }
}
