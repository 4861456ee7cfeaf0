//! Against a local IMDSv2 on 127.0.0.1 only.

use std::io::{BufRead as _, BufReader};
use std::net::{TcpListener, TcpStream};
use std::thread::{self, JoinHandle};

use super::*;

const TOKEN: &str = "AQAEAtokenXYZ==";
const INSTANCE_ID: &str = "i-0podprobetest";

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

fn has_header(head: &[String], header: &str) -> bool {
    head.iter().any(|l| l.eq_ignore_ascii_case(header))
}

fn respond(mut s: TcpStream, status: &str, body: &str) {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write response");
}

/// A fake IMDSv2 that answers `probes` token PUT + GET pairs the way AWS
/// does, with `put_status` for the token, and returns the request heads.
fn fake_imds(
    probes: usize,
    put_status: &'static str,
) -> (SocketAddr, JoinHandle<Vec<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local addr");
    let server = thread::spawn(move || {
        let mut heads = Vec::new();
        for _ in 0..probes {
            let (s, _) = listener.accept().expect("accept PUT");
            let head = read_head(&s);
            assert!(
                has_header(&head, "X-aws-ec2-metadata-token-ttl-seconds: 21600"),
                "{head:?}"
            );
            heads.push(head);
            if put_status != "200 OK" {
                respond(s, put_status, "");
                continue;
            }
            respond(s, "200 OK", TOKEN);
            let (s, _) = listener.accept().expect("accept GET");
            let head = read_head(&s);
            if has_header(&head, &format!("X-aws-ec2-metadata-token: {TOKEN}")) {
                respond(s, "200 OK", &format!("{INSTANCE_ID}\n"));
            } else {
                respond(s, "401 Unauthorized", "");
            }
            heads.push(head);
        }
        heads
    });
    (addr, server)
}

fn run_lines(opts: &Options) -> Vec<String> {
    let mut out = Vec::new();
    run(opts, &mut out).expect("run");
    String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn opts(target: SocketAddr, burst: bool, count: u64) -> Options {
    Options {
        target,
        interval: Duration::from_millis(10),
        burst,
        count: Some(count),
        hold: None,
        paths: Vec::new(),
    }
}

#[test]
fn hold_reports_open_then_closed() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        // The "revocation": the peer goes away with a reset.
        std::thread::sleep(Duration::from_millis(50));
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: the fd is open while `conn` lives; a linger and its size.
        let rc = unsafe {
            libc::setsockopt(
                conn.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        drop(conn);
    });
    let mut out = Vec::new();
    hold(addr, &mut out).unwrap();
    server.join().unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("imdsguard-probe hold=open"), "{text}");
    assert_eq!(field(lines[1], "hold"), "closed", "{text}");
    assert_eq!(
        field(lines[1], "errno"),
        libc::ECONNRESET.to_string(),
        "{text}"
    );
}

#[test]
fn hold_reports_a_refused_connect() {
    let mut out = Vec::new();
    hold(closed_port(), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(field(text.trim(), "hold"), "refused", "{text}");
}

/// The value of `key=` in a probe line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn imdsv2_ok_lines() {
    let (addr, server) = fake_imds(2, "200 OK");
    let lines = run_lines(&opts(addr, false, 2));
    let heads = server.join().expect("server");
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        assert!(line.starts_with("imdsguard-probe seq="), "{line}");
        assert_eq!(field(line, "seq"), (i + 1).to_string());
        assert_eq!(field(line, "first"), if i == 0 { "1" } else { "0" });
        assert_eq!(field(line, "verdict"), "ok");
        assert_eq!(field(line, "step"), "get");
        assert_eq!(field(line, "errno"), "-");
        assert_eq!(field(line, "detail"), INSTANCE_ID);
        assert!(field(line, "unix_ms").parse::<u128>().expect("unix_ms") > 1_600_000_000_000);
    }
    assert_eq!(heads[0][0], "PUT /latest/api/token HTTP/1.1");
    assert_eq!(heads[1][0], "GET /latest/meta-data/instance-id HTTP/1.1");
    assert!(has_header(&heads[1], "Connection: close"));
}

#[test]
fn token_refused_is_an_error_at_put() {
    let (addr, server) = fake_imds(1, "403 Forbidden");
    let lines = run_lines(&opts(addr, false, 1));
    server.join().expect("server");
    assert_eq!(field(&lines[0], "verdict"), "error");
    assert_eq!(field(&lines[0], "step"), "put");
    assert_eq!(field(&lines[0], "detail"), "http_status_403");
}

/// A port that was just free: nothing listens there.
fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

#[test]
fn nothing_listening_is_an_error() {
    let lines = run_lines(&opts(closed_port(), false, 1));
    assert_eq!(lines.len(), 1);
    assert_eq!(field(&lines[0], "verdict"), "error");
    assert_eq!(field(&lines[0], "step"), "put");
    assert_eq!(field(&lines[0], "errno"), libc::ECONNREFUSED.to_string());
}

#[test]
fn eperm_and_eacces_at_connect_are_denied() {
    for errno in [libc::EPERM, libc::EACCES] {
        let o = Outcome::connect_failed("put", &io::Error::from_raw_os_error(errno));
        assert_eq!((o.verdict, o.errno), (Verdict::Denied, Some(errno)));
    }
    let o = Outcome::connect_failed("put", &io::Error::from_raw_os_error(libc::ETIMEDOUT));
    assert_eq!(o.verdict, Verdict::Error);
    let mut out = Vec::new();
    let denied = Outcome::connect_failed("put", &io::Error::from_raw_os_error(libc::EPERM));
    write_probe(&mut out, 1, &denied, SystemTime::now(), Duration::ZERO).expect("write");
    let line = String::from_utf8(out).expect("utf-8");
    assert!(line.contains(" verdict=denied step=put errno=1 "), "{line}");
}

#[test]
fn burst_counts_connects_and_prints_a_summary() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The backlog takes the connects; nobody needs to accept them.
    let lines = run_lines(&opts(addr, true, 20));
    drop(listener);
    assert!(
        lines[0].starts_with("imdsguard-probe seq=1 first=1 verdict=ok step=connect "),
        "{lines:?}"
    );
    let summary = lines.last().expect("a summary");
    assert!(
        summary.starts_with("imdsguard-probe summary attempts=20 ok=20 denied=0 error=0 unix_ms="),
        "{summary}"
    );
    // Only the first probe and the summaries: no verdict changed.
    assert!(
        lines[1..].iter().all(|l| l.contains(" summary ")),
        "{lines:?}"
    );

    let lines = run_lines(&opts(closed_port(), true, 5));
    assert_eq!(field(&lines[0], "verdict"), "error");
    assert!(
        lines[1].contains(" attempts=5 ok=0 denied=0 error=5 "),
        "{lines:?}"
    );
}

#[test]
fn parses_arguments() {
    let parse = |args: &[&str]| parse_args(args.iter().map(|a| a.to_string()));
    let default = parse(&[]).expect("defaults");
    assert_eq!(default.target, "169.254.169.254:80".parse().unwrap());
    assert_eq!(
        (default.interval, default.burst, default.count),
        (Duration::from_secs(1), false, None)
    );
    let o = parse(&[
        "--target",
        "[fd00:ec2::254]:80",
        "--interval-ms=250",
        "--burst",
        "--count",
        "3",
    ])
    .expect("all flags");
    assert_eq!(o.target, "[fd00:ec2::254]:80".parse().unwrap());
    assert_eq!(
        (o.interval, o.burst, o.count),
        (Duration::from_millis(250), true, Some(3))
    );
    assert_eq!(
        parse(&["--count", "0"]),
        Err(ArgError::BadValue {
            flag: "--count",
            value: "0".into()
        })
    );
    assert_eq!(
        parse(&["--target"]),
        Err(ArgError::MissingValue("--target"))
    );
    assert_eq!(
        parse(&["--target", "169.254.169.254"])
            .unwrap_err()
            .to_string(),
        "bad value \"169.254.169.254\" for --target"
    );
    assert_eq!(
        parse(&["--serve"]),
        Err(ArgError::Unknown("--serve".into()))
    );
    assert_eq!(parse(&["-h"]), Err(ArgError::Help));
    let o = parse(&["--path", "/latest/meta-data/placement/region", "--path=/x"]).expect("paths");
    assert_eq!(o.paths, ["/latest/meta-data/placement/region", "/x"]);
    assert_eq!(
        parse(&["--path", "latest/meta-data"]),
        Err(ArgError::BadValue {
            flag: "--path",
            value: "latest/meta-data".into()
        })
    );
    assert_eq!(
        parse(&["--burst", "--path", "/x"]),
        Err(ArgError::BurstWithPaths)
    );
}

#[test]
fn response_is_complete_by_length_or_at_eof() {
    let full = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef";
    assert_eq!(parse_response(full, false), Some((200, &b"abc"[..])));
    assert_eq!(
        parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab", false),
        None
    );
    assert_eq!(
        parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope", true),
        Some((404, &b"nope"[..]))
    );
    assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nmore", false), None);
    assert_eq!(parse_response(b"SSH-2.0\r\n\r\n", true), None);
}

#[test]
fn details_are_one_token() {
    assert_eq!(token("  i-0abc\n", 64), "i-0abc");
    assert_eq!(
        token("Connection refused (os error 111)", 64),
        "Connection_refused_(os_error_111)"
    );
    assert_eq!(token("", 64), "-");
    assert_eq!(token("ééé", 2), "éé");
}
