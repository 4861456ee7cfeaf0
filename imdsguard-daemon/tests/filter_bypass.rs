//! The filter proxy against the holes peers' path filters had: every
//! request here is sent as raw bytes to a proxy on 127.0.0.1, whose
//! kernel identity is faked (by the client's port), in front of a fake
//! IMDS on 127.0.0.1 that records what reached it. Each bypass attempt must
//! be denied and must never reach the fake; the allowed paths, the IMDSv2
//! token flow and the GCP/Azure header rules must work end to end.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use imdsguard::{
    decisions::Attribution,
    filter::{
        events::DeniedPath,
        identity::{ConnIdentity, Origin},
        proxy::{Proxy, ProxyConfig},
        rules::{FilterRules, RulesTable},
    },
    metrics::FilterLabels,
};
use imdsguard_testlab::fake_imds::{Behaviour, FakeImds, INSTANCE_ID, SECRET};
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, oneshot},
};

/// Entry cgroups of the test's rules.
const INFO: u64 = 1; // instance-info + node-lifecycle
const REGION: u64 = 2; // paths: [placement/region]
const GCP_LISTING: u64 = 3; // paths: [/computeMetadata/v1/instance/]

#[derive(Default)]
struct PortIdentity {
    by_port: Mutex<HashMap<u16, Origin>>,
}

impl ConnIdentity for PortIdentity {
    fn lookup(&self, peer: SocketAddr, _local: SocketAddr) -> imdsguard::Result<Option<Origin>> {
        Ok(self.by_port.lock().unwrap().get(&peer.port()).copied())
    }
}

struct Lab {
    proxy: SocketAddr,
    imds: FakeImds,
    upstream: SocketAddr,
    identity: Arc<PortIdentity>,
    events: mpsc::Receiver<DeniedPath>,
    requests: Family<FilterLabels, Counter>,
    _stop: oneshot::Sender<()>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn test_config() -> ProxyConfig {
    ProxyConfig {
        header_read_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    }
}

impl Lab {
    async fn start() -> Self {
        Self::start_with(test_config()).await
    }

    async fn start_with(config: ProxyConfig) -> Self {
        let (imds, upstream) = FakeImds::start_local(
            "127.0.0.1:0".parse().unwrap(),
            Behaviour {
                tokens_required: false,
            },
        )
        .unwrap();
        let rules = RulesTable::new();
        rules.replace(HashMap::from([
            (
                INFO,
                Arc::new(
                    FilterRules::compile(&strings(&["instance-info", "node-lifecycle"]), &[])
                        .unwrap(),
                ),
            ),
            (
                REGION,
                Arc::new(
                    FilterRules::compile(&[], &strings(&["/latest/meta-data/placement/region"]))
                        .unwrap(),
                ),
            ),
            (
                GCP_LISTING,
                Arc::new(
                    FilterRules::compile(&[], &strings(&["/computeMetadata/v1/instance/"]))
                        .unwrap(),
                ),
            ),
        ]));
        let identity = Arc::new(PortIdentity::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let (events_tx, events) = mpsc::channel(16);
        let requests = Family::<FilterLabels, Counter>::default();
        let server = Proxy::new(identity.clone(), rules)
            .with_config(config)
            .with_attribution(|cgroup| Attribution {
                cgroup: cgroup.to_string(),
                pod: Some(format!("imds/pod-{cgroup}")),
                ..Attribution::default()
            })
            .with_metrics(requests.clone())
            .with_denied_events(events_tx);
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(server.serve(vec![listener], async {
            let _ = stopped.await;
        }));
        Self {
            proxy,
            imds,
            upstream,
            identity,
            events,
            requests,
            _stop: stop,
        }
    }

    /// A connection to the proxy that the fake kernel attributes to
    /// `entry` (None: no record at all).
    async fn connect(&self, entry: Option<u64>) -> TcpStream {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = sock.local_addr().unwrap().port();
        if let Some(entry) = entry {
            self.identity.by_port.lock().unwrap().insert(
                port,
                Origin {
                    caller_cgroup: 100 + entry,
                    entry_cgroup: entry,
                    upstream: self.upstream,
                },
            );
        }
        sock.connect(self.proxy).await.unwrap()
    }

    /// Sends `raw` as `entry` and returns (status, body) of the answer,
    /// status 0 when the proxy closed without one.
    async fn send_as(&self, entry: Option<u64>, raw: &[u8]) -> (u16, String) {
        let mut s = self.connect(entry).await;
        s.write_all(raw).await.unwrap();
        read_response(&mut s).await
    }

    async fn send(&self, raw: &str) -> (u16, String) {
        self.send_as(Some(INFO), raw.as_bytes()).await
    }

    /// Nothing secret reached the fake IMDS.
    fn assert_no_credential_request(&self) {
        for line in self.imds.seen() {
            let l = line.to_ascii_lowercase();
            for bad in [
                "security-credentials",
                "user-data",
                "userdata",
                "kube-env",
                "identity/oauth2",
                "service-accounts",
                "..",
                "%",
            ] {
                assert!(!l.contains(bad), "the fake IMDS saw {line:?}");
            }
        }
    }
}

/// Reads until the peer closes (every request here says `Connection:
/// close`, and every denial closes) or 3 s pass.
async fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    assert!(!body.contains(SECRET), "leaked: {text}");
    (status, body)
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}Connection: close\r\n\r\n")
}

async fn assert_denied(lab: &Lab, raw: &str) {
    let (status, body) = lab.send(raw).await;
    assert!(
        status != 200 && (status == 0 || status >= 400),
        "{raw:?} got {status} {body:?}"
    );
}

#[tokio::test]
async fn path_tricks_are_denied() {
    let lab = Lab::start().await;
    for path in [
        "/latest/meta-data/placement/../iam/security-credentials/",
        "/latest/meta-data/placement/../../user-data",
        "/latest/meta-data/./iam/security-credentials/",
        "/latest/meta-data//iam/security-credentials/",
        "/latest/meta-data/iam%2Fsecurity-credentials/",
        "/latest/meta-data/iam%2fsecurity-credentials/",
        "/latest/meta-data/placement/%2e%2e/%2e%2e/user-data",
        "/latest/meta-data/placement/%2E%2E/iam/security-credentials/",
        "/latest/meta-data/iam%252Fsecurity-credentials/",
        "/latest/meta-data/placement/region%00",
        "/latest/meta-data/placement/region;/../../user-data",
        "/latest/meta-data/iam;x=1/security-credentials/",
        "/latest/meta-data/placement/region;",
        "/LATEST/meta-data/iam/security-credentials/",
        "/latest/meta-data/IAM/security-credentials/lab-role",
        "/Latest/User-Data",
        "/latest/meta-data/iam/security-credentials/",
        "/latest/meta-data/iam/security-credentials/lab-role",
        "/latest/user-data",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/meta-data/placement/region-x",
        "/latest/meta-data/placement/region/",
        "/latest/meta-data/placement/region?x=1",
        "/latest/meta-data/",
        "/metadata-attacker",
        "/v2/credentials/abc",
        "/v1/credentials",
        "/latest/meta-data\\iam\\security-credentials",
    ] {
        assert_denied(&lab, &get(path, "")).await;
    }
    lab.assert_no_credential_request();
    assert!(lab.imds.seen().is_empty(), "{:?}", lab.imds.seen());
}

#[tokio::test]
async fn cloud_credentials_and_recursion_are_denied() {
    let lab = Lab::start().await;
    let g = "Metadata-Flavor: Google\r\n";
    let a = "Metadata: true\r\n";
    for (path, h) in [
        (
            "/computeMetadata/v1/instance/service-accounts/default/token",
            g,
        ),
        (
            "/computeMetadata/v1/instance/service-accounts/default/identity?audience=x",
            g,
        ),
        ("/computeMetadata/v1/instance/attributes/kube-env", g),
        ("/computeMetadata/v1/instance/?recursive=true", g),
        ("/computeMetadata/v1/?recursive=true&alt=json", g),
        (
            "/computeMetadata/v1beta1/instance/service-accounts/default/token",
            "",
        ),
        ("/0.1/meta-data/service-accounts/default/acquire", ""),
        (
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x",
            a,
        ),
        ("/Metadata/Identity/OAuth2/Token?api-version=2018-02-01", a),
        ("/metadata/instance?api-version=2021-02-01", a),
        (
            "/metadata/instance/compute/userData?api-version=2021-01-01&format=text",
            a,
        ),
        (
            "/opc/v2/identity/key.pem",
            "Authorization: Bearer Oracle\r\n",
        ),
    ] {
        assert_denied(&lab, &get(path, h)).await;
    }
    // A listing the rules allow, but not recursively: that would hold the
    // service accounts' tokens and kube-env.
    let raw = get("/computeMetadata/v1/instance/?recursive=true", g);
    let (status, body) = lab.send_as(Some(GCP_LISTING), raw.as_bytes()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("recursive"), "{body}");
    lab.assert_no_credential_request();
    assert!(lab.imds.seen().is_empty(), "{:?}", lab.imds.seen());
}

#[tokio::test]
async fn protocol_tricks_are_denied() {
    let lab = Lab::start().await;
    let region = "/latest/meta-data/placement/region";
    let raws: Vec<String> = vec![
        // absolute-form and CONNECT
        "GET http://169.254.169.254/latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(),
        "GET http://169.254.169.254/latest/meta-data/placement/region HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(),
        "CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\n\r\n".into(),
        "OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(),
        // methods
        format!("POST {region} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        format!("DELETE {region} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        format!("PUT {region} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        "PUT /latest/api/token?x=1 HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n".into(),
        // HTTP/0.9, HTTP/2 preface, unknown version
        "GET /latest/meta-data/iam/security-credentials/\r\n\r\n".into(),
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(),
        format!("GET {region} HTTP/1.2\r\nHost: x\r\n\r\n"),
        // forwarding headers
        "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n".into(),
        get(region, "X-Forwarded-For: 10.0.0.1\r\n"),
        get(region, "Forwarded: for=10.0.0.1\r\n"),
        // bodies and smuggling
        format!("GET {region} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /latest/user-data HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("GET {region} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /latest/user-data HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("GET {region} HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\n\r\nGET /latest/user-data HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("GET {region} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
        get(region, "Upgrade: h2c\r\nConnection: Upgrade\r\n"),
        // obsolete line folding, odd request lines, fragments
        get(region, "X-A: a\r\n b\r\n"),
        format!("get {region} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        format!("GET  {region} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        "GET /latest/user-data HTTP/1.1\nHost: x\nConnection: close\n\n".into(),
        get(region, "Expect: 100-continue\r\n"),
        // oversized and too many headers
        get(region, &format!("X-Big: {}\r\n", "a".repeat(10_000))),
        get(region, &(0..40).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()),
    ];
    for raw in &raws {
        assert_denied(&lab, raw).await;
    }
    // Raw bytes hyper's parser might pass on: non-ASCII and control bytes.
    for raw in [
        &b"GET /latest/meta-data/placement/region\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        b"GET /latest/meta-data/placement/region\x01 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /latest/meta-data/placement/region HTTP/1.1\r\nHost: x\r\nX-A: \xff\xfe\r\nConnection: close\r\n\r\n",
        b"GET\t/latest/meta-data/placement/region HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        let (status, body) = lab.send_as(Some(INFO), raw).await;
        assert!(status != 200, "{raw:?} got {status} {body}");
    }
    lab.assert_no_credential_request();
    assert!(lab.imds.seen().is_empty(), "{:?}", lab.imds.seen());
}

/// Pipelined requests are each checked: the second, for user-data, is
/// refused though it shares a write with an allowed one.
#[tokio::test]
async fn pipelined_requests_are_each_checked() {
    let lab = Lab::start().await;
    let raw = "GET /latest/meta-data/placement/region HTTP/1.1\r\nHost: x\r\n\r\nGET /latest/user-data HTTP/1.1\r\nHost: x\r\n\r\nGET /latest/meta-data/placement/region HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut s = lab.connect(Some(REGION)).await;
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/1.1 403"), "{text}");
    assert!(!text.contains(SECRET));
    // The refusal closed the connection: the third request was not read.
    assert_eq!(
        lab.imds.seen(),
        ["GET /latest/meta-data/placement/region HTTP/1.1"]
    );
}

/// hyper's URI parser drops a fragment before our checks see the target;
/// harmless, since what is forwarded is exactly what was checked.
#[tokio::test]
async fn fragments_are_dropped_before_the_checks() {
    let lab = Lab::start().await;
    let raw = "GET /latest/meta-data/placement/region#/../../user-data HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let (status, body) = lab.send_as(Some(REGION), raw.as_bytes()).await;
    assert_eq!((status, body.as_str()), (200, "us-east-1"));
    assert_eq!(
        lab.imds.seen(),
        ["GET /latest/meta-data/placement/region HTTP/1.1"]
    );
    let raw = "GET /latest/meta-data/placement/region-x#x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(lab.send_as(Some(REGION), raw.as_bytes()).await.0, 403);
    lab.assert_no_credential_request();
}

#[tokio::test]
async fn slow_clients_time_out() {
    let lab = Lab::start().await;
    let mut s = lab.connect(Some(INFO)).await;
    s.write_all(b"GET /latest/meta-data/placement/region HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the proxy kept a slow client's connection open"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    // A client that sends nothing at all.
    let mut silent = lab.connect(Some(INFO)).await;
    let read = tokio::time::timeout(Duration::from_secs(3), silent.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the proxy kept a silent client's connection open"
    );
    assert!(lab.imds.seen().is_empty());
}

#[tokio::test]
async fn connections_over_the_limit_are_closed() {
    let lab = Lab::start_with(ProxyConfig {
        max_connections: 1,
        ..test_config()
    })
    .await;
    let mut held = lab.connect(Some(INFO)).await;
    // Let the proxy accept the first one before the second arrives.
    held.write_all(b"GET").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let raw = get("/latest/meta-data/placement/region", "");
    assert_eq!(lab.send(&raw).await.0, 0);
    drop(held);
    // The header timeout frees the slot at the latest.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lab.send(&raw).await.0, 200);
}

#[tokio::test]
async fn unknown_callers_are_denied() {
    let lab = Lab::start().await;
    let raw = get("/latest/meta-data/placement/region", "");
    let (status, body) = lab.send_as(None, raw.as_bytes()).await;
    assert_eq!((status, body.trim()), (403, "caller has no filter entry"));
    // An entry the rules table does not know.
    let (status, _) = lab.send_as(Some(99), raw.as_bytes()).await;
    assert_eq!(status, 403);
    assert!(lab.imds.seen().is_empty());
}

#[tokio::test]
async fn allowed_paths_are_proxied() {
    let mut lab = Lab::start().await;
    let (status, body) = lab
        .send_as(
            Some(REGION),
            get("/latest/meta-data/placement/region", "").as_bytes(),
        )
        .await;
    assert_eq!((status, body.as_str()), (200, "us-east-1"));
    let (status, _) = lab
        .send_as(
            Some(REGION),
            get("/latest/meta-data/instance-id", "").as_bytes(),
        )
        .await;
    assert_eq!(status, 403);
    let head =
        "HEAD /latest/meta-data/placement/region HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(lab.send(head).await.0, 200);

    // HTTP/1.0 without a Host header.
    let (status, body) = lab
        .send("GET /latest/meta-data/instance-id HTTP/1.0\r\n\r\n")
        .await;
    assert_eq!((status, body.as_str()), (200, INSTANCE_ID));

    // GCP and Azure: the header rules hold on the proxied requests.
    let zone = "/computeMetadata/v1/instance/zone";
    let (status, body) = lab.send(&get(zone, "Metadata-Flavor: Google\r\n")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "projects/1/zones/us-central1-a")
    );
    assert_eq!(lab.send(&get(zone, "")).await.0, 403);
    assert_eq!(
        lab.send(&get(zone, "Metadata-Flavor: google\r\n")).await.0,
        403
    );
    let loc = "/metadata/instance/compute/location?api-version=2021-02-01&format=text";
    let (status, body) = lab.send(&get(loc, "Metadata: true\r\n")).await;
    assert_eq!((status, body.as_str()), (200, "westeurope"));
    let loc_case = "/Metadata/Instance/Compute/Location?api-version=2021-02-01&format=text";
    assert_eq!(lab.send(&get(loc_case, "Metadata: true\r\n")).await.0, 200);
    assert_eq!(lab.send(&get(loc, "")).await.0, 403);

    let seen = lab.imds.seen();
    assert!(
        seen.iter()
            .any(|l| l.starts_with("GET /computeMetadata/v1/instance/zone "))
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("HEAD /latest/meta-data/placement/region "))
    );
    assert_eq!(seen.len(), 6, "{seen:?}");
    lab.assert_no_credential_request();

    // Counted per pod and verdict; one denied-path notice for the pod.
    let count = |pod: &str, verdict: &str| {
        lab.requests
            .get_or_create(&FilterLabels {
                pod: pod.into(),
                verdict: verdict.into(),
            })
            .get()
    };
    assert_eq!(count("imds/pod-102", "allowed"), 1);
    assert_eq!(count("imds/pod-102", "denied"), 1);
    assert_eq!(count("imds/pod-101", "denied"), 3);
    let first = lab.events.try_recv().unwrap();
    assert_eq!(first.pod.as_deref(), Some("imds/pod-102"));
    assert_eq!(first.path, "/latest/meta-data/instance-id");
    let second = lab.events.try_recv().unwrap();
    assert_eq!(second.pod.as_deref(), Some("imds/pod-101"));
    assert!(
        lab.events.try_recv().is_err(),
        "more than one event a minute per pod"
    );
}

#[tokio::test]
async fn imdsv2_token_flow_end_to_end() {
    let lab = Lab::start().await;
    let put = "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (status, token) = lab.send_as(Some(REGION), put.as_bytes()).await;
    assert_eq!(status, 200);
    let with = |t: &str| {
        get(
            "/latest/meta-data/placement/region",
            &format!("X-aws-ec2-metadata-token: {t}\r\n"),
        )
    };
    let (status, body) = lab.send_as(Some(REGION), with(&token).as_bytes()).await;
    assert_eq!((status, body.as_str()), (200, "us-east-1"));
    // A wrong token: the instance's own 401, passed through.
    let (status, _) = lab.send_as(Some(REGION), with("wrong").as_bytes()).await;
    assert_eq!(status, 401);
    // The PUT without its TTL header: the instance's own 400.
    let bare = "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(lab.send_as(Some(REGION), bare.as_bytes()).await.0, 400);
    // An entry with no AWS path gets no token.
    assert_eq!(lab.send_as(Some(GCP_LISTING), put.as_bytes()).await.0, 403);
    let seen: HashSet<String> = lab.imds.seen().into_iter().collect();
    assert!(seen.contains("PUT /latest/api/token HTTP/1.1"), "{seen:?}");
}

#[tokio::test]
async fn only_accepted_upstreams_are_used() {
    let (imds, upstream) =
        FakeImds::start_local("127.0.0.1:0".parse().unwrap(), Behaviour::default()).unwrap();
    let rules = RulesTable::new();
    rules.replace(HashMap::from([(
        REGION,
        Arc::new(
            FilterRules::compile(&[], &strings(&["/latest/meta-data/placement/region"])).unwrap(),
        ),
    )]));
    let identity = Arc::new(PortIdentity::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let server = Proxy::new(identity.clone(), rules).with_upstreams(move |a| a != upstream);
    tokio::spawn(server.serve(vec![listener], std::future::pending()));
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    identity.by_port.lock().unwrap().insert(
        sock.local_addr().unwrap().port(),
        Origin {
            caller_cgroup: 7,
            entry_cgroup: REGION,
            upstream,
        },
    );
    let mut s = sock.connect(proxy).await.unwrap();
    s.write_all(get("/latest/meta-data/placement/region", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 502);
    assert!(imds.seen().is_empty());
}

#[tokio::test]
async fn an_unreachable_upstream_is_502() {
    let lab = Lab::start().await;
    // A port nothing listens on: bind, note it, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    lab.identity.by_port.lock().unwrap().insert(
        sock.local_addr().unwrap().port(),
        Origin {
            caller_cgroup: 7,
            entry_cgroup: REGION,
            upstream: dead,
        },
    );
    let mut s = sock.connect(lab.proxy).await.unwrap();
    s.write_all(get("/latest/meta-data/placement/region", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 502);
}
