//! The test kube-apiserver serves, authorizes with RBAC, survives restarts
//! and compacts. Needs `cargo xtask kubernetes` first: without the binary
//! these tests fail.

use std::process::Command;

use imdsguard_testlab::kube_apiserver::KubeApiserver;

/// Sends one request with `token` and returns the HTTP status and body.
fn request(
    server: &KubeApiserver,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
    ])
    .arg("--cacert")
    .arg(server.ca_cert_path())
    .args([
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-X",
        method,
    ]);
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data", body]);
    }
    let out = cmd
        .arg(format!("{}{path}", server.url()))
        .output()
        .expect("run curl");
    let out = String::from_utf8(out.stdout).expect("curl output is UTF-8");
    let (body, code) = out.rsplit_once('\n').expect("curl printed the status");
    (code.parse().expect("HTTP status"), body.to_owned())
}

fn create_namespace(server: &KubeApiserver, name: &str) {
    let ns = format!(r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{name}"}}}}"#);
    let (code, body) = request(
        server,
        server.admin_token(),
        "POST",
        "/api/v1/namespaces",
        Some(&ns),
    );
    assert_eq!(code, 201, "create namespace {name}: {body}");
}

fn namespace_names(server: &KubeApiserver) -> Vec<String> {
    let (code, body) = request(
        server,
        server.admin_token(),
        "GET",
        "/api/v1/namespaces",
        None,
    );
    assert_eq!(code, 200, "list namespaces: {body}");
    let list: serde_json::Value = serde_json::from_str(&body).expect("namespace list is JSON");
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|ns| ns["metadata"]["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn admin_writes_and_daemon_is_forbidden_secrets() {
    let server = KubeApiserver::start().expect("start the test kube-apiserver");
    create_namespace(&server, "smoke");
    let names = namespace_names(&server);
    assert!(names.contains(&"smoke".to_owned()), "{names:?}");
    assert!(names.contains(&"default".to_owned()), "{names:?}");

    let (code, body) = request(
        &server,
        server.daemon_token(),
        "GET",
        "/api/v1/secrets",
        None,
    );
    assert_eq!(code, 403, "the daemon lists secrets: {body}");
    assert!(
        body.contains("system:serviceaccount:imdsguard-system:imdsguard"),
        "{body}"
    );
}

#[test]
fn restart_keeps_data_and_compaction_expires_old_versions() {
    let mut server = KubeApiserver::start().expect("start the test kube-apiserver");
    create_namespace(&server, "before-restart");
    server.restart_apiserver().expect("restart kube-apiserver");
    assert!(namespace_names(&server).contains(&"before-restart".to_owned()));

    server.stop_apiserver().expect("stop kube-apiserver");
    let (code, _) = request(&server, server.admin_token(), "GET", "/readyz", None);
    assert_eq!(code, 0, "curl reaches a stopped apiserver");
    server
        .start_apiserver()
        .expect("start kube-apiserver again");

    let (_, body) = request(
        &server,
        server.admin_token(),
        "GET",
        "/api/v1/namespaces",
        None,
    );
    let list: serde_json::Value = serde_json::from_str(&body).expect("namespace list is JSON");
    let old = list["metadata"]["resourceVersion"]
        .as_str()
        .expect("resourceVersion")
        .to_owned();
    // An exact list reads etcd at that revision, bypassing the watch cache.
    let exact = format!("/api/v1/namespaces?resourceVersion={old}&resourceVersionMatch=Exact");
    let (code, body) = request(&server, server.admin_token(), "GET", &exact, None);
    assert_eq!(code, 200, "exact list before compaction: {body}");

    create_namespace(&server, "after-list");
    let revision = server.compact_etcd().expect("compact etcd");
    assert!(revision > old.parse().expect("numeric resourceVersion"));
    let (code, body) = request(&server, server.admin_token(), "GET", &exact, None);
    assert_eq!(code, 410, "exact list after compaction: {body}");
}
