//! Filter mode's kernel half: a filtered cgroup's connect to a protected
//! destination's HTTP port is sent to the proxy, with its origin (caller,
//! policy entry, original destination) recorded for the proxy to read;
//! everything else a filtered cgroup tries stays denied. A stand-in proxy
//! in the lab's namespace answers each connection with what the kernel
//! recorded for it, so the probe reports exactly what the real proxy would
//! learn.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, TcpListener},
    sync::Arc,
    thread,
};

use imdsguard::{
    bpf::{
        enforcer::{AllowTarget, Attachment, Enforcer, MapState, Mode},
        filter_conns::{FilterConns, ProxyTarget},
        pins::PinLayout,
    },
    cgroup::mount::CgroupDir,
    destinations,
    vocabulary::Action,
};
use imdsguard_testlab::{cgroups::TestCgroup, fake_imds::INSTANCE_ID, lab::Lab, probe::Outcome};
use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "filtered_connects_reach_the_proxy_with_their_origin",
            filtered_connects_reach_the_proxy_with_their_origin,
        ),
        trial(
            "filtered_cgroups_stay_denied_elsewhere",
            filtered_cgroups_stay_denied_elsewhere,
        ),
        trial(
            "filter_run_proxies_the_profile_and_nothing_else",
            filter_run_proxies_the_profile_and_nothing_else,
        ),
        trial(
            "filter_without_a_proxy_is_denied",
            filter_without_a_proxy_is_denied,
        ),
        trial(
            "filter_proxy_down_fails_the_connect_at_once",
            filter_proxy_down_fails_the_connect_at_once,
        ),
    ]
}

/// The stand-in proxy: listeners on 127.0.0.1 and ::1 (one port) inside
/// the lab's namespace. Each connection gets one HTTP response whose body
/// is the origin the kernel recorded, or `no-origin`.
struct StandIn {
    port: u16,
}

impl StandIn {
    fn start(lab: &Lab, conns: Arc<FilterConns>) -> Self {
        let netns = lab.netns().raw_fd();
        let (tx, rx) = std::sync::mpsc::channel();
        // Sockets belong to the namespace they were made in: bind on a
        // thread that entered the lab's namespace, then serve from it.
        thread::spawn(move || {
            // SAFETY: setns on the lab's namespace fd, this thread only.
            assert_eq!(unsafe { libc::setns(netns, libc::CLONE_NEWNET) }, 0);
            let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1");
            let port = v4.local_addr().unwrap().port();
            let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, port)).expect("bind ::1");
            tx.send(port).unwrap();
            let for_v6 = conns.clone();
            thread::spawn(move || serve(v6, &for_v6));
            serve(v4, &conns);
        });
        Self {
            port: rx.recv().expect("stand-in proxy port"),
        }
    }

    fn target(&self) -> ProxyTarget {
        ProxyTarget {
            v4: Some(Ipv4Addr::LOCALHOST),
            v6: Some(Ipv6Addr::LOCALHOST),
            port: self.port,
        }
    }
}

fn serve(listener: TcpListener, conns: &FilterConns) {
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        let (peer, local) = (s.peer_addr().unwrap(), s.local_addr().unwrap());
        let body = match conns.take(peer, local).expect("read the connection map") {
            Some(o) => {
                // Taken once: a second lookup finds nothing.
                assert_eq!(conns.take(peer, local).unwrap(), None);
                format!(
                    "caller={} entry={} upstream={}",
                    o.caller_cgroup, o.entry_cgroup, o.upstream
                )
            }
            None => "no-origin".to_string(),
        };
        let mut head = [0u8; 1024];
        let _ = s.read(&mut head);
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn enforce(
    lab: &Lab,
    filter: Option<ProxyTarget>,
    udp: bool,
    entries: &[(&TestCgroup, Action)],
) -> Enforcer {
    let attachment = Attachment {
        cgroup_root: CgroupDir::open(lab.root().path()).unwrap(),
        attach_at: None,
        pins: PinLayout::new(lab.pin_dir()),
        udp,
        deny_raw_sockets: false,
        judge_socket_creators: false,
        filter,
    };
    let allowed: BTreeMap<u64, AllowTarget> = entries
        .iter()
        .map(|(cg, act)| {
            let dir = CgroupDir::open(cg.path()).unwrap();
            (
                dir.id,
                AllowTarget {
                    level: dir.level,
                    action: *act,
                },
            )
        })
        .collect();
    let desired = MapState {
        mode: Mode::Enforce,
        allowed: Some(allowed),
        destinations: destinations::compile(&destinations::defaults()).unwrap(),
    };
    Enforcer::start(attachment, &desired)
        .expect("start the enforcer")
        .0
}

fn filtered_connects_reach_the_proxy_with_their_origin() {
    let lab = lab("filter-origin");
    let report = lab.cgroup("imds/report").unwrap();
    // The caller sits below the cgroup whose entry says filter: the origin
    // names both.
    let container = lab.cgroup("imds/report/app").unwrap();
    let prod = lab.cgroup("imds/prod").unwrap();
    let test = lab.cgroup("imds/test").unwrap();
    // The enforcer creates the pins the stand-in reads: start it first.
    let pins = PinLayout::new(lab.pin_dir());
    let _pre = enforce(&lab, None, false, &[]);
    let standin = StandIn::start(&lab, Arc::new(FilterConns::open(&pins).unwrap()));
    let _enforcer = enforce(
        &lab,
        Some(standin.target()),
        false,
        &[(&report, Action::Filter), (&prod, Action::Allow)],
    );
    let st = status(&lab);
    assert_eq!(hooks(&st), ["connect4", "connect6", "sock_ops"]);

    let want = |upstream: &str| Outcome::Reached {
        detail: format!(
            "caller={} entry={} upstream={upstream}",
            container.id(),
            report.id()
        ),
    };
    for (target, upstream) in [
        ("169.254.169.254:80", "169.254.169.254:80"),
        ("[fd00:ec2::254]:80", "[fd00:ec2::254]:80"),
        // A dual-stack socket's v4-mapped form goes to the proxy's IPv4
        // address, and the origin is the IPv4 destination.
        ("[::ffff:169.254.169.254]:80", "169.254.169.254:80"),
        ("100.100.100.200:80", "100.100.100.200:80"),
    ] {
        assert_eq!(
            probe(&lab, Some(&container), "http", target),
            want(upstream),
            "{target}"
        );
    }
    // The allowed pod still reaches the real service, the denied one nothing.
    assert_eq!(
        probe(&lab, Some(&prod), "http", "169.254.169.254:80"),
        Outcome::Reached {
            detail: INSTANCE_ID.into()
        }
    );
    assert_eperm(&lab, Some(&test), "http", "169.254.169.254:80");
    // A connection to the proxy that the kernel did not send there has no
    // origin: the proxy learns nothing from its source address.
    let direct = format!("127.0.0.1:{}", standin.port);
    assert_eq!(
        probe(&lab, Some(&test), "http", &direct),
        Outcome::Reached {
            detail: "no-origin".into()
        }
    );
}

fn filtered_cgroups_stay_denied_elsewhere() {
    let lab = lab("filter-rest");
    let report = lab.cgroup("imds/report").unwrap();
    let pins = PinLayout::new(lab.pin_dir());
    let _pre = enforce(&lab, None, true, &[]);
    let standin = StandIn::start(&lab, Arc::new(FilterConns::open(&pins).unwrap()));
    let _enforcer = enforce(
        &lab,
        Some(standin.target()),
        true,
        &[(&report, Action::Filter)],
    );
    // Other protected ports, UDP, IPv4-compatible and NAT64 forms: denied.
    for (kind, target) in [
        ("tcp", "169.254.169.254:8080"),
        ("tcp", "169.254.170.2:81"),
        ("udp-sendto", "169.254.169.254:80"),
        ("udp-connect", "169.254.169.254:80"),
        ("tcp", "[::169.254.169.254]:80"),
        ("tcp", "[64:ff9b::169.254.169.254]:80"),
    ] {
        assert_eperm(&lab, Some(&report), kind, target);
    }
    // Unprotected destinations are untouched.
    assert_reached(&lab, Some(&report), "tcp", "127.0.0.1:8080");
    assert!(counter(&status(&lab), "denied") >= 6);
}

fn filter_without_a_proxy_is_denied() {
    let lab = lab("filter-noproxy");
    let report = lab.cgroup("imds/report").unwrap();
    let _enforcer = enforce(&lab, None, false, &[(&report, Action::Filter)]);
    assert_eq!(hooks(&status(&lab)), ["connect4", "connect6"]);
    assert_eperm(&lab, Some(&report), "http", "169.254.169.254:80");
    assert_eperm(&lab, Some(&report), "http", "[fd00:ec2::254]:80");
}

fn filter_proxy_down_fails_the_connect_at_once() {
    let lab = lab("filter-down");
    let report = lab.cgroup("imds/report").unwrap();
    // A port nothing listens on in the lab's namespace (its fake services
    // listen on the metadata addresses and on 127.0.0.1:8080 only).
    let port = 9;
    let target = ProxyTarget {
        v4: Some(Ipv4Addr::LOCALHOST),
        v6: None,
        port,
    };
    let _enforcer = enforce(&lab, Some(target), false, &[(&report, Action::Filter)]);
    // Refused by the proxy's address, never passed on to the real service.
    match probe(&lab, Some(&report), "http", "169.254.169.254:80") {
        Outcome::Failed { errno, detail } => {
            assert_eq!(errno, Some(libc::ECONNREFUSED), "{detail}")
        }
        other => panic!("a filtered connect with the proxy down: {other:?}"),
    }
    // Without an IPv6 proxy address, native IPv6 is denied.
    assert_eperm(&lab, Some(&report), "http", "[fd00:ec2::254]:80");
}

/// The whole path with the real binary: `run --filter-cgroup` in the lab's
/// namespace (its proxy on the lab's loopback), the kernel's redirect, the
/// proxy's rules, the fake AWS service behind it.
fn filter_run_proxies_the_profile_and_nothing_else() {
    let lab = lab("filter-run");
    let report = lab.cgroup("imds/report").unwrap();
    let prod = lab.cgroup("imds/prod").unwrap();
    let test = lab.cgroup("imds/test").unwrap();
    let args = args([
        &flag("filter-cgroup", &report),
        &[s("--filter-profile"), s("region")],
        &flag("allow-cgroup", &prod),
        &[
            s("--proxy-listen"),
            s("127.0.0.1:8169"),
            s("--proxy-listen"),
            s("[::1]:8169"),
            s("--cgroup-root"),
            lab.root().path().display().to_string(),
            s("--pin-dir"),
            lab.pin_dir().display().to_string(),
        ],
    ]);
    let mut d = imdsguard_testlab::daemon::Daemon::start_in(lab.netns(), bin(), &args)
        .expect("start imdsguard in the lab's namespace");
    let st = status(&lab);
    assert_eq!(hooks(&st), ["connect4", "connect6", "sock_ops"]);
    assert_eq!(
        st["proxy"],
        serde_json::json!(["127.0.0.1:8169", "[::1]:8169"])
    );
    let explained = imdsguard_testlab::daemon::command(
        bin(),
        &[
            "explain",
            "--cgroup",
            report.path().to_str().unwrap(),
            "--pin-dir",
            lab.pin_dir().to_str().unwrap(),
        ],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(
        text.contains("action:     filter") && text.contains("filtered (tcp/80 through the proxy)"),
        "{text}"
    );
    let get = |cg: &TestCgroup, target: &str, path: &str| {
        lab.imds_get(Some(cg), target, path)
            .unwrap_or_else(|e| panic!("imds-get {target}{path}: {e:#}"))
    };
    let reached = |detail: &str| Outcome::Reached {
        detail: detail.into(),
    };
    let region = "/latest/meta-data/placement/region";
    // The profile's path, over IPv4 and IPv6, with the IMDSv2 token the
    // proxy let through.
    for target in ["169.254.169.254:80", "[fd00:ec2::254]:80"] {
        assert_eq!(
            get(&report, target, region),
            reached("200 us-east-1"),
            "{target}"
        );
    }
    // Not in the profile, or never allowed: refused by the proxy, never
    // asked of the service.
    let creds = "/latest/meta-data/iam/security-credentials/node-role";
    for path in [
        "/latest/meta-data/instance-id",
        creds,
        "/latest/user-data",
        "/latest/meta-data/placement/region/../../iam/security-credentials/node-role",
        "/latest/meta-data/placement/%72egion",
    ] {
        match get(&report, "169.254.169.254:80", path) {
            Outcome::Reached { detail } => assert!(detail.starts_with("403 "), "{path}: {detail}"),
            other => panic!("{path}: {other:?}"),
        }
    }
    assert!(
        !lab.imds_seen()
            .iter()
            .any(|l| l.contains("security-credentials")
                || l.contains("user-data")
                || l.contains("instance-id")),
        "the service saw a refused request: {:?}",
        lab.imds_seen()
    );
    // The allowed pod reads anything, the denied one nothing, the filtered
    // one no other port.
    assert_eq!(
        get(&prod, "169.254.169.254:80", "/latest/meta-data/instance-id"),
        reached(&format!("200 {INSTANCE_ID}"))
    );
    assert_eperm(&lab, Some(&test), "http", "169.254.169.254:80");
    assert_eperm(&lab, Some(&report), "tcp", "169.254.169.254:8080");
    let line = wait_decision(&mut d, report.id(), "169.254.169.254:8080", "denied");
    assert_eq!(line["decided_by"], "not-filterable", "{line}");
    // Straight to the proxy, without the kernel's record: refused, whoever
    // asks.
    match get(&test, "127.0.0.1:8169", region) {
        Outcome::Reached { detail } => assert!(detail.starts_with("403 "), "{detail}"),
        other => panic!("direct: {other:?}"),
    }
    // Each request is logged with its caller, path and verdict.
    let line = d
        .wait_for(std::time::Duration::from_secs(5), |v| {
            imdsguard_testlab::daemon::message(v) == Some("filter proxy request")
        })
        .expect("a proxied request is logged");
    assert!(line.to_string().contains("caller_cgroup"), "{line}");
    // The proxy goes with the daemon; the kernel keeps sending filtered
    // connects to it, where they are refused at once, and never to the
    // service.
    d.kill();
    match get(&report, "169.254.169.254:80", region) {
        Outcome::Failed { errno, detail } => {
            assert_eq!(errno, Some(libc::ECONNREFUSED), "{detail}")
        }
        other => panic!("proxy down: {other:?}"),
    }
}
