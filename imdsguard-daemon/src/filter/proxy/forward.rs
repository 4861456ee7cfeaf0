//! Forwarding one allowed request to the metadata service, over a fresh
//! TCP connection to the destination the kernel recorded.
//!
//! Only the headers a metadata client needs are passed on (a list, not a
//! deny list: whatever a future header does, it does not reach the
//! service), and none is added: no X-Forwarded-For, which IMDS refuses on
//! token requests. The token PUT keeps its TTL header and GETs their token
//! header, so IMDSv1/v2 behaviour is the instance's own.

use std::net::SocketAddr;

use http_body_util::{BodyExt as _, Empty, Limited, combinators::BoxBody};
use hyper::{
    Request, Response, Uri,
    body::Bytes,
    header::{self, HeaderMap},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use super::ProxyConfig;
use crate::filter::request::Checked;

/// A response body on its way back to the client.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Request headers passed to the metadata service. Everything else is
/// dropped, including hop-by-hop headers.
const PASSED: &[&str] = &[
    "host",
    "user-agent",
    "accept",
    "accept-encoding",
    "x-aws-ec2-metadata-token",
    "x-aws-ec2-metadata-token-ttl-seconds",
    "x-aliyun-ecs-metadata-token",
    "x-aliyun-ecs-metadata-token-ttl-seconds",
    "metadata-flavor",
    "metadata",
    "authorization",
    "if-none-match",
];

/// Response headers never passed back: hop-by-hop ones (hyper frames the
/// body itself).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-connection",
];

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("connect to {upstream}")]
    Connect {
        upstream: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out waiting for {upstream}")]
    Timeout { upstream: SocketAddr },
    #[error("HTTP exchange with {upstream}")]
    Http {
        upstream: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// The recorded destination is one of our own listeners: forwarding
    /// would loop.
    #[error("upstream {upstream} is the proxy itself")]
    Loop { upstream: SocketAddr },
    /// The recorded destination is not a protected metadata destination.
    #[error("upstream {upstream} is not a protected destination")]
    NotProtected { upstream: SocketAddr },
    #[error("request target {target:?} is not a valid URI")]
    Target {
        target: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
}

/// Sends `checked` (method and headers from `method`/`headers`) to `upstream`.
pub async fn forward(
    upstream: SocketAddr,
    method: &hyper::Method,
    headers: &HeaderMap,
    checked: &Checked,
    config: &ProxyConfig,
) -> Result<Response<Body>, ForwardError> {
    let uri: Uri = checked
        .target
        .parse()
        .map_err(|source| ForwardError::Target {
            target: checked.target.clone(),
            source,
        })?;
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    for name in PASSED {
        for v in headers.get_all(*name) {
            req.headers_mut().append(*name, v.clone());
        }
    }
    if !req.headers().contains_key(header::HOST) {
        // HTTP/1.0 clients may send none; HTTP/1.1 needs one upstream.
        let host = match upstream {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        if let Ok(v) = host.parse() {
            req.headers_mut().insert(header::HOST, v);
        }
    }

    let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(upstream))
        .await
        .map_err(|_| ForwardError::Timeout { upstream })?
        .map_err(|source| ForwardError::Connect { upstream, source })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ForwardError::Http { upstream, source })?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            debug!(%error, "upstream metadata connection ended with an error");
        }
    });
    let wait = if checked.waits {
        config.wait_timeout
    } else {
        config.response_timeout
    };
    let resp = tokio::time::timeout(wait, sender.send_request(req))
        .await
        .map_err(|_| ForwardError::Timeout { upstream })?
        .map_err(|source| ForwardError::Http { upstream, source })?;
    let (mut parts, body) = resp.into_parts();
    for h in HOP_BY_HOP {
        parts.headers.remove(*h);
    }
    let body = Limited::new(body, config.max_response_bytes).boxed();
    Ok(Response::from_parts(parts, body))
}

/// Whether `upstream` is the socket the client reached (the proxy itself).
pub fn is_loop(upstream: SocketAddr, local: SocketAddr) -> bool {
    upstream == local
}
