//! Where `imdsguard report` gets its reports: an agent's endpoint over
//! plain HTTP (what `kubectl port-forward` or the node itself reaches), or
//! every agent pod through the API server's pod proxy, which needs nothing
//! but `kubectl` access (`get pods/proxy`).

use std::time::Duration;

use futures::future::join_all;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, Uri, body::Bytes, client::conn::http1};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ListParams, ResourceExt as _},
};
use tokio::net::TcpStream;

use super::{args::AGENT_SELECTOR, report::Answer};
use crate::{Error, Result, cli::args::ReportArgs, usage::Report};

/// How long one agent may take to answer. The report is built from
/// memory; a slow answer is a stuck agent or a network problem.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The port when an agent pod names none `metrics` (the chart's default).
const DEFAULT_PORT: i32 = 9090;

/// The `/report` URL below an agent's base URL (`http://host:port[/prefix]`).
fn report_uri(agent: &str, minutes: u32) -> Result<Uri> {
    let bad = |problem| Error::AgentUrl {
        url: agent.to_owned(),
        problem,
    };
    let base: Uri = agent.parse().map_err(|_| bad("not a URL"))?;
    if base.scheme_str() != Some("http") {
        return Err(bad("only http:// is served by the agent"));
    }
    let authority = base.authority().ok_or(bad("no host"))?;
    if base.query().is_some() {
        return Err(bad("give the base URL, without a query"));
    }
    let prefix = base.path().trim_end_matches('/');
    format!("http://{authority}{prefix}/report?minutes={minutes}")
        .parse()
        .map_err(|_| bad("not a URL"))
}

/// `GET /report` from an agent's endpoint, over one HTTP/1.1 connection.
pub async fn from_agent(agent: &str, minutes: u32) -> Result<Report> {
    let uri = report_uri(agent, minutes)?;
    let url = uri.to_string();
    let (status, body) = tokio::time::timeout(TIMEOUT, get(&uri))
        .await
        .map_err(|_| Error::AgentTimeout {
            url: url.clone(),
            secs: TIMEOUT.as_secs(),
        })??;
    if status != 200 {
        return Err(Error::AgentStatus {
            url,
            status,
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        });
    }
    serde_json::from_slice(&body).map_err(|source| Error::ReportDecode { from: url, source })
}

async fn get(uri: &Uri) -> Result<(u16, Bytes)> {
    let url = uri.to_string();
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let port = uri.port_u16().unwrap_or(80);
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|source| Error::AgentConnect {
            url: url.clone(),
            source,
        })?;
    let http = |source| Error::AgentHttp {
        url: url.clone(),
        source,
    };
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    // The connection task ends with the response (Connection: close).
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|_| Error::AgentUrl {
            url: url.clone(),
            problem: "not a valid request target",
        })?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
    Ok((status, body))
}

/// The agents' metrics port: the container port named `metrics`.
fn metrics_port(pod: &Pod) -> i32 {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("metrics"))
        .map_or(DEFAULT_PORT, |p| p.container_port)
}

/// Every agent pod's report, through the API server's pod proxy, asked
/// at once. A pod that cannot be asked (not running, timed out) is an
/// answer with its error, not a failure of the whole report.
pub async fn from_cluster(args: &ReportArgs) -> Result<Vec<Answer>> {
    let client = Client::try_default().await.map_err(Error::Kube)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &args.namespace);
    let mut lp = ListParams::default().labels(AGENT_SELECTOR);
    if let Some(node) = &args.node {
        lp = lp.fields(&format!("spec.nodeName={node}"));
    }
    let list = pods.list(&lp).await.map_err(Error::Kube)?;
    if list.items.is_empty() {
        return Err(Error::NoAgents {
            namespace: args.namespace.clone(),
            selector: AGENT_SELECTOR,
            on_node: args
                .node
                .as_ref()
                .map(|n| format!(" on node {n}"))
                .unwrap_or_default(),
        });
    }
    let asks = list.items.iter().map(|pod| {
        let client = client.clone();
        let name = pod.name_any();
        let source = format!("{}/{name}", args.namespace);
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let path = format!(
            "/api/v1/namespaces/{}/pods/{name}:{}/proxy/report?minutes={}",
            args.namespace,
            metrics_port(pod),
            args.minutes
        );
        async move {
            let answer = ask(&client, &path).await;
            (source, node, answer)
        }
    });
    Ok(join_all(asks).await)
}

async fn ask(client: &Client, path: &str) -> Result<Report, String> {
    let req = Request::get(path)
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    let text = tokio::time::timeout(TIMEOUT, client.request_text(req))
        .await
        .map_err(|_| format!("no answer within {}s", TIMEOUT.as_secs()))?
        .map_err(|e| chain(&e))?;
    serde_json::from_str(&text).map_err(|e| format!("the report does not parse: {e}"))
}

/// An error with its causes, for one line of the report.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls_become_report_urls() {
        let u = |a| report_uri(a, 5).map(|u| u.to_string());
        assert_eq!(
            u("http://127.0.0.1:9090").unwrap(),
            "http://127.0.0.1:9090/report?minutes=5"
        );
        assert_eq!(
            u("http://[::1]:9090/").unwrap(),
            "http://[::1]:9090/report?minutes=5"
        );
        assert_eq!(
            u("http://node:9090/prefix/").unwrap(),
            "http://node:9090/prefix/report?minutes=5"
        );
        for bad in [
            "https://x:1",
            "127.0.0.1:9090",
            "http://x:1/?a=b",
            "not a url",
        ] {
            assert!(u(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_metrics_port_comes_from_the_pod_spec() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "agent", "ports": [
                {"name": "proxy", "containerPort": 8169},
                {"name": "metrics", "containerPort": 9191}
            ]}]}
        }))
        .unwrap();
        assert_eq!(metrics_port(&pod), 9191);
        assert_eq!(metrics_port(&Pod::default()), DEFAULT_PORT);
    }
}
