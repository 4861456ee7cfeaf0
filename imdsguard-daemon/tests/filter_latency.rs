//! The latency the filter proxy adds to one metadata GET, against the same
//! GET sent straight to the fake IMDS, both on 127.0.0.1 with a new
//! connection per request (as SDKs that do not keep connections alive).
//! Ignored by default (timing, not correctness):
//! `cargo test -p imdsguard-daemon --test filter_latency -- --ignored --nocapture`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use imdsguard::filter::{
    identity::{ConnIdentity, Origin},
    proxy::Proxy,
    rules::{FilterRules, RulesTable},
};
use imdsguard_testlab::fake_imds::{Behaviour, FakeImds};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

struct Everyone(SocketAddr);

impl ConnIdentity for Everyone {
    fn lookup(&self, _: SocketAddr, _: SocketAddr) -> imdsguard::Result<Option<Origin>> {
        Ok(Some(Origin {
            caller_cgroup: 1,
            entry_cgroup: 1,
            upstream: self.0,
        }))
    }
}

const REQUEST: &[u8] =
    b"GET /latest/meta-data/placement/region HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n";

async fn one(to: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(REQUEST).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing, not correctness"]
async fn added_latency() {
    let (_imds, upstream) = FakeImds::start_local(
        "127.0.0.1:0".parse().unwrap(),
        Behaviour {
            tokens_required: false,
        },
    )
    .unwrap();
    let rules = RulesTable::new();
    rules.replace(HashMap::from([(
        1,
        Arc::new(FilterRules::compile(&["region".to_owned()], &[]).unwrap()),
    )]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(
        Proxy::new(Arc::new(Everyone(upstream)), rules)
            .serve(vec![listener], std::future::pending()),
    );
    const N: usize = 2000;
    let (mut direct, mut proxied) = (Vec::with_capacity(N), Vec::with_capacity(N));
    for _ in 0..100 {
        one(upstream).await;
        one(proxy).await;
    }
    // Interleaved, so both see the same machine load.
    for _ in 0..N {
        direct.push(one(upstream).await);
        proxied.push(one(proxy).await);
    }
    direct.sort_unstable();
    proxied.sort_unstable();
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (d, x) = (percentile(&direct, p), percentile(&proxied, p));
        println!(
            "{name}: direct {:>7.1} µs, through the proxy {:>7.1} µs, added {:>7.1} µs",
            d.as_secs_f64() * 1e6,
            x.as_secs_f64() * 1e6,
            (x.as_secs_f64() - d.as_secs_f64()) * 1e6
        );
    }
}
