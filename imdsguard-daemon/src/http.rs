//! A minimal HTTP/1.1 endpoint for `/metrics`, `/healthz` and `/readyz`.
//! Three GET routes do not need a web framework; requests are tiny and
//! every connection is closed after one response.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

use crate::{
    actor::EnforcerHandle,
    metrics::{Health, Metrics},
};

#[derive(Clone)]
pub struct Endpoints {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Set once the programs are attached. The endpoints serve before that
    /// (an agent waiting for its cgroup answers /readyz with 503), and the
    /// kernel counters are left out of /metrics until then.
    pub enforcer: Arc<OnceLock<EnforcerHandle>>,
}

pub async fn serve(listener: TcpListener, endpoints: Endpoints) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let e = endpoints.clone();
        tokio::spawn(async move {
            if let Err(err) = tokio::time::timeout(Duration::from_secs(5), handle(stream, e)).await
            {
                debug!(error = %err, "metrics request timed out");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, e: Endpoints) {
    let mut buf = vec![0u8; 2048];
    let mut len = 0;
    while len < buf.len() {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = match path {
        "/metrics" => {
            if let Some(enforcer) = e.enforcer.get()
                && let Ok(c) = enforcer.counters().await
            {
                e.metrics.set_kernel_counters(&c);
            }
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                e.metrics.render(),
            )
        }
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
        "/readyz" if e.health.ready() => ("200 OK", "text/plain", "ready\n".to_string()),
        "/readyz" => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".to_string(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
}
