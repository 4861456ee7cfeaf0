//! Standalone `run` on the runtime it shares with the node agent: the
//! `/metrics`, `/healthz` and `/readyz` endpoints, and a link removed by
//! hand put back without the daemon exiting.

use std::time::{Duration, Instant};

use imdsguard_testlab::daemon;
use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "standalone_serves_metrics_and_survives_a_detached_link",
            standalone_serves_metrics_and_survives_a_detached_link,
        ),
        trial(
            "standalone_serves_no_endpoints_unless_asked",
            standalone_serves_no_endpoints_unless_asked,
        ),
    ]
}

const IMDS: &str = "169.254.169.254:80";

/// GETs `path` until the answer starts with `status` (the first link check
/// sets the attached count a moment after `ready`).
#[track_caller]
fn wait_http(addr: &str, path: &str, status: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http_get(addr, path);
        if r.starts_with(status) {
            return r;
        }
        assert!(Instant::now() < deadline, "GET {path}: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn standalone_serves_metrics_and_survives_a_detached_link() {
    let lab = lab("endpoints");
    let (prod, test) = pods(&lab);
    let mut d = start(
        &lab,
        &args([
            &flag("allow-cgroup", &prod),
            &[
                s("--metrics-addr"),
                s("127.0.0.1:0"),
                s("--check-interval-secs"),
                s("1"),
            ],
        ]),
    );
    let ready = d
        .wait_for(Duration::from_secs(5), |v| {
            daemon::message(v) == Some("ready")
        })
        .unwrap();
    let addr = ready["metrics_addr"]
        .as_str()
        .unwrap_or_else(|| panic!("metrics_addr in the ready line: {ready}"))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    wait_http(&addr, "/readyz", "HTTP/1.1 200");
    assert!(http_get(&addr, "/healthz").starts_with("HTTP/1.1 200"));

    assert_eperm(&lab, Some(&test), "tcp", IMDS);
    assert_reached(&lab, Some(&prod), "tcp", IMDS);
    wait_decision(&mut d, test.id(), IMDS, "denied");
    let m = http_get(&addr, "/metrics");
    for needle in [
        "imdsguard_programs_attached 2",
        "imdsguard_allow_map_entries 1",
        "imdsguard_protected_prefixes ",
        r#"imdsguard_kernel_verdicts_total{verdict="denied"}"#,
        r#"imdsguard_decisions_total{verdict="denied""#,
    ] {
        assert!(m.contains(needle), "{needle:?} not in /metrics:\n{m}");
    }

    // Unpinning a link detaches it (the pin is its only reference): the
    // owner task notices, re-attaches, and the daemon goes on serving.
    std::fs::remove_file(lab.pin_dir().join("links").join("connect4")).unwrap();
    let warn = d
        .wait_for(Duration::from_secs(10), |v| {
            daemon::message(v) == Some("programs were detached behind our back; re-attaching")
        })
        .unwrap_or_else(|e| panic!("the daemon did not notice: {e:#}"));
    assert!(warn["missing"].to_string().contains("connect4"), "{warn}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hooks(&status(&lab)).contains(&s("connect4")) {
        assert!(Instant::now() < deadline, "connect4 not re-attached");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eperm(&lab, Some(&test), "tcp", IMDS);
    assert_reached(&lab, Some(&prod), "tcp", IMDS);
    wait_http(&addr, "/readyz", "HTTP/1.1 200");
    assert!(http_get(&addr, "/metrics").contains("imdsguard_programs_attached 2"));

    // SIGTERM: a clean exit, the endpoints close, enforcement stays.
    let exit = d.terminate().unwrap();
    assert!(exit.success(), "{exit}");
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the endpoints are closed"
    );
    assert_eq!(hooks(&status(&lab)), ["connect4", "connect6"]);
    assert_eperm(&lab, Some(&test), "tcp", IMDS);
}

/// Without `--metrics-addr`, `run` binds nothing: its ready line has no
/// address.
fn standalone_serves_no_endpoints_unless_asked() {
    let lab = lab("noendpoints");
    let (prod, _) = pods(&lab);
    let mut d = start(&lab, &flag("allow-cgroup", &prod));
    let ready = d
        .wait_for(Duration::from_secs(5), |v| {
            daemon::message(v) == Some("ready")
        })
        .unwrap();
    assert!(ready.get("metrics_addr").is_none(), "{ready}");
    assert!(
        !d.logs()
            .iter()
            .any(|v| daemon::message(v) == Some("serving /metrics, /healthz and /readyz")),
        "{}",
        d.render_logs()
    );
}
