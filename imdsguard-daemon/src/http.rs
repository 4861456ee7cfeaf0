//! `/metrics`, `/healthz`, `/readyz` and `/report` (the usage report, JSON)
//! over HTTP/1.1, served with hyper.
//!
//! GET and HEAD only (405 with `Allow` otherwise), 404 for other paths. The
//! port is often reachable from the whole cluster network, so a client gets
//! [`HEADER_READ_TIMEOUT`] to send its request head, also between requests on
//! a kept-alive connection, and a small head size limit.

use std::{
    convert::Infallible,
    sync::{Arc, OnceLock},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Response, StatusCode, Uri,
    body::Bytes,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::net::TcpListener;
use tracing::debug;

use crate::{
    bpf::owner::EnforcerHandle,
    metrics::{Health, Metrics},
    usage,
};

/// How long a client may take to send a request head, and how long an idle
/// kept-alive connection stays open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long shutdown waits for responses in flight before dropping them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The request head limit (hyper's minimum). A scrape or a probe sends a
/// few hundred bytes; hyper's default would let each connection buffer
/// ~400 KiB.
const MAX_REQUEST_HEAD: usize = 8192;

/// A failing `accept` (EMFILE, say) fails again at once: pause instead of
/// spinning.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

#[derive(Clone)]
pub struct Endpoints {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Set once the programs are attached. The endpoints serve before that
    /// (an agent waiting for its cgroup answers /readyz with 503), and the
    /// kernel counters are left out of /metrics until then.
    pub enforcer: Arc<OnceLock<EnforcerHandle>>,
}

/// Serves until `shutdown` completes, then stops accepting, lets responses
/// in flight finish (up to [`DRAIN_TIMEOUT`]) and closes idle connections.
pub async fn serve(
    listener: TcpListener,
    endpoints: Endpoints,
    shutdown: impl Future<Output = ()> + Send,
) {
    serve_with(listener, endpoints, shutdown, HEADER_READ_TIMEOUT).await;
}

async fn serve_with(
    listener: TcpListener,
    endpoints: Endpoints,
    shutdown: impl Future<Output = ()> + Send,
    header_read_timeout: Duration,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    debug!(%error, "accept on the metrics listener failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let e = endpoints.clone();
        let service = service_fn(move |req| {
            let e = e.clone();
            async move { Ok::<_, Infallible>(respond(&e, req.method(), req.uri()).await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // Header timeouts, resets and malformed requests end up here.
            if let Err(error) = conn.await {
                debug!(%error, "metrics connection closed with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("metrics connections still open at shutdown; dropping them");
    }
}

async fn respond(e: &Endpoints, method: &Method, uri: &Uri) -> Response<Full<Bytes>> {
    let read_only = matches!(*method, Method::GET | Method::HEAD);
    match uri.path() {
        "/metrics" | "/healthz" | "/readyz" | "/report" if !read_only => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        "/metrics" => {
            // A failed read keeps the last totals: the enforcer task only
            // stops when the daemon does. Before the programs are attached
            // there are no kernel counters to show.
            if let Some(enforcer) = e.enforcer.get()
                && let Ok(c) = enforcer.counters().await
            {
                e.metrics.set_kernel_counters(&c);
            }
            response(StatusCode::OK, OPENMETRICS, e.metrics.render())
        }
        "/report" => {
            let Some(minutes) = report_minutes(uri.query()) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "minutes must be a whole number from 1 to 60\n",
                );
            };
            let counters = match e.enforcer.get() {
                Some(enforcer) => enforcer.counters().await.ok(),
                None => None,
            };
            match serde_json::to_vec(&e.metrics.usage.report(minutes, counters)) {
                Ok(json) => response(StatusCode::OK, JSON, json),
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "report not encodable\n"),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if e.health.ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `minutes=N` from the query (default the whole window); None when it is
/// not a number in the window.
fn report_minutes(query: Option<&str>) -> Option<u32> {
    let value = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("minutes="));
    match value {
        None => Some(usage::window::MINUTES),
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|m| (1..=usage::window::MINUTES).contains(m)),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    response(status, TEXT, body)
}

/// hyper adds `Content-Length` from the body, and leaves the body out for
/// HEAD.
fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
        sync::oneshot,
        task::JoinHandle,
    };

    use super::*;
    use crate::bpf::enforcer::Counters;

    struct Server {
        addr: std::net::SocketAddr,
        health: Arc<Health>,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<()>,
    }

    impl Server {
        async fn start(header_read_timeout: Duration) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let health = Health::new(1);
            let endpoints = Endpoints {
                metrics: Arc::new(Metrics::new()),
                health: health.clone(),
                enforcer: Arc::new(OnceLock::from(EnforcerHandle::answering_counters(
                    Counters {
                        allowed: 5,
                        denied: 3,
                        audited: 0,
                        events_dropped: 2,
                    },
                ))),
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(serve_with(
                listener,
                endpoints,
                async {
                    let _ = stopped.await;
                },
                header_read_timeout,
            ));
            Self {
                addr,
                health,
                stop: Some(stop),
                task,
            }
        }

        /// One request on its own connection; the whole response as text.
        async fn request(&self, method: &str, path: &str) -> String {
            let mut s = TcpStream::connect(self.addr).await.unwrap();
            s.write_all(
                format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            read_all(&mut s).await
        }
    }

    async fn read_all(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the server closes the connection")
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    fn status(response: &str) -> &str {
        response.lines().next().unwrap_or("")
    }

    fn header<'r>(response: &'r str, name: &str) -> Option<&'r str> {
        let head = response.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn body(response: &str) -> &str {
        response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }

    #[tokio::test]
    async fn routes_and_content_types() {
        let srv = Server::start(HEADER_READ_TIMEOUT).await;
        let r = srv.request("GET", "/healthz").await;
        assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
        assert_eq!(body(&r), "ok\n");
        assert_eq!(header(&r, "content-type"), Some(TEXT));

        let r = srv.request("GET", "/metrics").await;
        assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
        assert_eq!(header(&r, "content-type"), Some(OPENMETRICS));
        let m = body(&r);
        assert!(
            m.contains("imdsguard_kernel_verdicts_total{verdict=\"denied\"} 3\n"),
            "{m}"
        );
        assert!(m.ends_with("# EOF\n"), "{m}");
        assert_eq!(header(&r, "content-length"), Some(&*m.len().to_string()));
        // Query strings do not change the route.
        assert_eq!(
            status(&srv.request("GET", "/metrics?x=1").await),
            "HTTP/1.1 200 OK"
        );

        for path in ["/", "/metric", "/metrics/", "/healthz/x", "/../metrics"] {
            let r = srv.request("GET", path).await;
            assert_eq!(status(&r), "HTTP/1.1 404 Not Found", "{path}: {r}");
        }
    }

    #[tokio::test]
    async fn report_serves_the_usage_window_as_json() {
        let srv = Server::start(HEADER_READ_TIMEOUT).await;
        let r = srv.request("GET", "/report?minutes=5").await;
        assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
        assert_eq!(header(&r, "content-type"), Some(JSON));
        let report: usage::Report = serde_json::from_str(body(&r)).unwrap();
        assert_eq!(report.minutes, 5);
        assert!(report.rows.is_empty());
        assert_eq!(report.kernel_counters.map(|c| c.denied), Some(3));
        let whole: usage::Report =
            serde_json::from_str(body(&srv.request("GET", "/report").await)).unwrap();
        assert_eq!(whole.minutes, usage::window::MINUTES);
        for bad in [
            "/report?minutes=0",
            "/report?minutes=61",
            "/report?minutes=x",
        ] {
            let r = srv.request("GET", bad).await;
            assert_eq!(status(&r), "HTTP/1.1 400 Bad Request", "{bad}: {r}");
        }
        let r = srv.request("POST", "/report").await;
        assert_eq!(status(&r), "HTTP/1.1 405 Method Not Allowed", "{r}");
    }

    #[tokio::test]
    async fn only_get_and_head() {
        let srv = Server::start(HEADER_READ_TIMEOUT).await;
        for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
            for path in ["/metrics", "/healthz", "/readyz"] {
                let r = srv.request(method, path).await;
                assert_eq!(
                    status(&r),
                    "HTTP/1.1 405 Method Not Allowed",
                    "{method} {path}: {r}"
                );
                assert_eq!(header(&r, "allow"), Some("GET, HEAD"), "{r}");
            }
        }
        // An unknown path is unknown whatever the method.
        let r = srv.request("POST", "/nope").await;
        assert_eq!(status(&r), "HTTP/1.1 404 Not Found", "{r}");

        // HEAD: the headers of a GET, no body.
        let get = srv.request("GET", "/healthz").await;
        let head = srv.request("HEAD", "/healthz").await;
        assert_eq!(status(&head), "HTTP/1.1 200 OK", "{head}");
        assert_eq!(header(&head, "content-length"), Some("3"), "{head}");
        assert_eq!(header(&head, "content-type"), header(&get, "content-type"));
        assert_eq!(body(&head), "");
    }

    #[tokio::test]
    async fn readiness_flips() {
        let srv = Server::start(HEADER_READ_TIMEOUT).await;
        let r = srv.request("GET", "/readyz").await;
        assert_eq!(status(&r), "HTTP/1.1 503 Service Unavailable", "{r}");
        assert_eq!(body(&r), "not ready\n");
        srv.health.set_synced();
        assert!(status(&srv.request("GET", "/readyz").await).contains("503"));
        srv.health.set_attached(1);
        let r = srv.request("GET", "/readyz").await;
        assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
        assert_eq!(body(&r), "ready\n");
        // A hook removed behind our back makes it unready again.
        srv.health.set_attached(0);
        assert!(status(&srv.request("GET", "/readyz").await).contains("503"));
        // Liveness does not depend on readiness.
        assert!(status(&srv.request("GET", "/healthz").await).contains("200"));
    }

    #[tokio::test]
    async fn keep_alive_serves_several_requests() {
        let srv = Server::start(HEADER_READ_TIMEOUT).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(
            b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let r = read_all(&mut s).await;
        assert_eq!(r.matches("HTTP/1.1 ").count(), 2, "{r}");
        assert!(r.contains("ok\n") && r.contains("not ready\n"), "{r}");
    }

    #[tokio::test]
    async fn slow_clients_are_cut_off() {
        let timeout = Duration::from_millis(300);
        let srv = Server::start(timeout).await;

        // Half a request head, then nothing.
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let r = read_all(&mut s).await;
        assert_eq!(r, "", "no response to an unfinished head");
        assert!(started.elapsed() >= timeout - Duration::from_millis(50));

        // An idle kept-alive connection is closed too.
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let r = read_all(&mut s).await;
        assert_eq!(r.matches("HTTP/1.1 200 OK").count(), 1, "{r}");

        // Meanwhile others are served.
        assert!(status(&srv.request("GET", "/healthz").await).contains("200"));
    }

    #[tokio::test]
    async fn oversized_heads_are_refused() {
        let srv = Server::start(HEADER_READ_TIMEOUT).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let big = "x".repeat(MAX_REQUEST_HEAD * 2);
        // The server may close before it has read everything.
        let _ = s
            .write_all(
                format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n").as_bytes(),
            )
            .await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let r = String::from_utf8_lossy(&out);
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 431"), "{r}");
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_closes_idle_connections() {
        let mut srv = Server::start(HEADER_READ_TIMEOUT).await;
        // An idle kept-alive connection must not hold shutdown up.
        let mut idle = TcpStream::connect(srv.addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");

        srv.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(1), &mut srv.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
        let rest = read_all(&mut idle).await;
        assert!(rest.ends_with("ok\n"), "{rest}");
        assert!(
            TcpStream::connect(srv.addr).await.is_err(),
            "still listening"
        );
    }
}
