//! The accept loop, the per-request decision, and what is logged, counted
//! and notified about each request.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    http::request::Parts,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use super::{
    Proxy,
    forward::{self, Body, ForwardError},
};
use crate::{
    decisions::{Attribution, UNATTRIBUTED},
    filter::{
        events::{DeniedPath, RateLimit},
        identity::Origin,
        request::{self, Dialect, Reject},
        rules::Denial,
    },
    metrics::FilterLabels,
    usage::FilterVerdict,
};

/// The request head limit (hyper's minimum buffer). Metadata requests are
/// a few hundred bytes; a longer head gets 431.
const MAX_REQUEST_HEAD: usize = 8192;

/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A failing `accept` (EMFILE, say) fails again at once: pause instead.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// What became of one request.
enum Outcome {
    Forwarded(Response<Body>),
    Denied(String),
    Upstream(ForwardError),
}

/// A proxy being served: the parts shared by every connection.
struct Running {
    proxy: Proxy,
    limit: Mutex<RateLimit>,
}

impl Proxy {
    /// Serves `listeners` until `shutdown` completes, then stops accepting
    /// and lets requests in flight finish (up to two seconds).
    pub async fn serve(
        self,
        listeners: Vec<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_read_timeout)
            .max_buf_size(MAX_REQUEST_HEAD)
            .max_headers(request::MAX_HEADERS)
            .ignore_invalid_headers(false)
            .half_close(false);
        let running = Arc::new(Running {
            limit: Mutex::new(RateLimit::new(self.config.event_interval)),
            proxy: self,
        });
        let (tx, mut rx) = mpsc::channel(64);
        let mut accepts = JoinSet::new();
        for listener in listeners {
            let tx = tx.clone();
            accepts.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok(accepted) => {
                            if tx.send(accepted).await.is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            debug!(%error, "accept on the filter proxy failed");
                            tokio::time::sleep(ACCEPT_RETRY).await;
                        }
                    }
                }
            });
        }
        drop(tx);
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(running.proxy.config.max_connections));
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                Some(accepted) = rx.recv() => accepted,
                () = &mut shutdown => break,
                else => break,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(%peer, "filter proxy at its connection limit; closing");
                continue;
            };
            let Ok(local) = stream.local_addr() else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            // The kernel's record is read once, at accept: it names the
            // connection, and a later request on it cannot change it.
            let origin = match running.proxy.identity.lookup(peer, local) {
                Ok(origin) => origin,
                Err(error) => {
                    warn!(error = &error as &dyn std::error::Error, %peer, "filter proxy identity lookup failed; denying");
                    None
                }
            };
            let r = running.clone();
            let service = service_fn(move |req| {
                let r = r.clone();
                async move { Ok::<_, Infallible>(r.handle(req, origin, local).await) }
            });
            let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                // Header timeouts, oversized heads and malformed requests.
                if let Err(error) = conn.await {
                    debug!(%error, %peer, "filter proxy connection closed with an error");
                }
                drop(slot);
            });
        }
        accepts.abort_all();
        if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
            .await
            .is_err()
        {
            debug!("filter proxy connections still open at shutdown; dropping them");
        }
    }
}

impl Running {
    async fn handle(
        &self,
        req: Request<Incoming>,
        origin: Option<Origin>,
        local: SocketAddr,
    ) -> Response<Body> {
        // The body is never read: no request we accept has one, and an
        // unread body makes hyper close the connection after our answer.
        let (parts, _body) = req.into_parts();
        let checked = request::check(&parts.method, &parts.uri, parts.version, &parts.headers);
        let outcome = self.decide(&parts, &checked, origin, local).await;

        let who = self.attribute(origin);
        let path = match &checked {
            Ok(c) => c.path.clone(),
            Err(_) => parts.uri.to_string(),
        };
        let imds = imds_version(&parts, &checked);
        let (verdict, response) = match outcome {
            Outcome::Forwarded(resp) => ("allowed", resp),
            Outcome::Denied(reason) => {
                self.notify(&who, origin, &parts, &path, &reason);
                info!(
                    verdict = "denied",
                    %reason,
                    caller_cgroup = origin.map(|o| o.caller_cgroup),
                    entry_cgroup = origin.map(|o| o.entry_cgroup),
                    pod = who.pod.as_deref(),
                    container = who.container_field(),
                    method = %parts.method,
                    path = ?path,
                    imds,
                    "filter proxy request"
                );
                self.count(&who, "denied", origin, &parts, &path, imds);
                return text(StatusCode::FORBIDDEN, &reason);
            }
            Outcome::Upstream(error) => {
                warn!(
                    verdict = "upstream_error",
                    error = &error as &dyn std::error::Error,
                    caller_cgroup = origin.map(|o| o.caller_cgroup),
                    pod = who.pod.as_deref(),
                    container = who.container_field(),
                    method = %parts.method,
                    path = ?path,
                    imds,
                    "filter proxy request"
                );
                self.count(&who, "upstream_error", origin, &parts, &path, imds);
                return text(StatusCode::BAD_GATEWAY, "metadata service unreachable");
            }
        };
        info!(
            verdict,
            caller_cgroup = origin.map(|o| o.caller_cgroup),
            entry_cgroup = origin.map(|o| o.entry_cgroup),
            pod = who.pod.as_deref(),
            container = who.container_field(),
            method = %parts.method,
            path = ?path,
            imds,
            status = response.status().as_u16(),
            "filter proxy request"
        );
        self.count(&who, verdict, origin, &parts, &path, imds);
        response
    }

    async fn decide(
        &self,
        parts: &Parts,
        checked: &Result<request::Checked, Reject>,
        origin: Option<Origin>,
        local: SocketAddr,
    ) -> Outcome {
        let Some(origin) = origin else {
            return Outcome::Denied(Reject::NoIdentity.to_string());
        };
        let checked = match checked {
            Ok(c) => c,
            Err(reject) => return Outcome::Denied(reject.to_string()),
        };
        let Some(rules) = self.proxy.rules.get(origin.entry_cgroup) else {
            return Outcome::Denied(Reject::NoIdentity.to_string());
        };
        if let Err(denial) = rules.decide(checked) {
            return Outcome::Denied(match denial {
                Denial::Never(_) => "path is never allowed".to_owned(),
                Denial::Recursive(_) => "recursive request covers a never-allowed path".to_owned(),
                Denial::NotListed => Reject::NotAllowed.to_string(),
            });
        }
        if forward::is_loop(origin.upstream, local) {
            return Outcome::Upstream(ForwardError::Loop {
                upstream: origin.upstream,
            });
        }
        if let Some(allowed) = &self.proxy.upstreams
            && !allowed(origin.upstream)
        {
            return Outcome::Upstream(ForwardError::NotProtected {
                upstream: origin.upstream,
            });
        }
        match forward::forward(
            origin.upstream,
            &parts.method,
            &parts.headers,
            checked,
            &self.proxy.config,
        )
        .await
        {
            Ok(resp) => Outcome::Forwarded(resp),
            Err(error) => Outcome::Upstream(error),
        }
    }

    fn attribute(&self, origin: Option<Origin>) -> Attribution {
        match (origin, &self.proxy.attribute) {
            (Some(o), Some(f)) => f(o.caller_cgroup),
            (Some(o), None) => Attribution {
                cgroup: o.caller_cgroup.to_string(),
                ..Attribution::default()
            },
            (None, _) => Attribution::default(),
        }
    }

    /// Counts the request for the metrics and records it for the usage
    /// report.
    fn count(
        &self,
        who: &Attribution,
        verdict: &str,
        origin: Option<Origin>,
        parts: &Parts,
        path: &str,
        imds: &'static str,
    ) {
        if let Some(usage) = &self.proxy.usage {
            let v = match verdict {
                "allowed" => FilterVerdict::Allowed,
                "denied" => FilterVerdict::Denied,
                _ => FilterVerdict::UpstreamError,
            };
            let upstream = origin.map(|o| o.upstream);
            usage.request(who, upstream, v, parts.method.as_str(), path, imds);
        }
        if let Some(requests) = &self.proxy.requests {
            requests
                .get_or_create(&FilterLabels {
                    pod: who.pod.clone().unwrap_or_else(|| UNATTRIBUTED.to_owned()),
                    verdict: verdict.to_owned(),
                })
                .inc();
        }
    }

    fn notify(
        &self,
        who: &Attribution,
        origin: Option<Origin>,
        parts: &Parts,
        path: &str,
        reason: &str,
    ) {
        let (Some(events), Some(origin)) = (&self.proxy.denied, origin) else {
            return;
        };
        let key = who
            .pod
            .clone()
            .unwrap_or_else(|| origin.caller_cgroup.to_string());
        let admitted = self
            .limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(&key, Instant::now());
        if admitted {
            // A full channel drops the notice: Events are best effort.
            let _ = events.try_send(DeniedPath {
                caller_cgroup: origin.caller_cgroup,
                pod: who.pod.clone(),
                method: parts.method.to_string(),
                path: path.to_owned(),
                reason: reason.to_owned(),
            });
        }
    }
}

/// `v2` when the request carries an IMDSv2 token (or asks for one), `v1`
/// for other AWS-style requests, `-` for other clouds.
fn imds_version(parts: &Parts, checked: &Result<request::Checked, Reject>) -> &'static str {
    match checked {
        Ok(c) if c.dialect != Dialect::Aws => "-",
        Ok(c) if c.token_put || c.imds_v2 => "v2",
        Err(_) if parts.headers.contains_key("x-aws-ec2-metadata-token") => "v2",
        _ => "v1",
    }
}

fn text(status: StatusCode, reason: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("{reason}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // A refused request may have left bytes (a body, a smuggled request)
    // on the connection: never read another request from it.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}
