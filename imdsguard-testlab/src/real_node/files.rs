//! The node's configuration files: containerd's, the CNI network, the
//! token file and the kubeconfigs.

use std::{fs, path::Path};

use anyhow::Context as _;

use super::{NODE, NODE_IP, PAUSE_IMAGE, POD_CIDR};

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// containerd 1.6 with a private root, state, sockets and `opt`.
pub fn containerd_config(dir: &Path) -> anyhow::Result<()> {
    let q = |p: &Path| serde_json::Value::from(p.to_string_lossy()).to_string();
    write(
        &dir.join("containerd/config.toml"),
        &format!(
            r#"version = 2
root = {root}
state = {state}

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # runc's nsexec sets oom_score_adj -998 for sandboxes, which needs
  # CAP_SYS_RESOURCE; this machine's bounding set lacks it and every
  # sandbox would fail with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {cni}
"#,
            root = q(&dir.join("containerd/root")),
            state = q(&dir.join("containerd/state")),
            sock = q(&containerd_socket(dir)),
            ttrpc = q(&dir.join("containerd/containerd.sock.ttrpc")),
            opt = q(&dir.join("containerd/opt")),
            cni = q(&dir.join("cni/net.d")),
        ),
    )
}

pub fn containerd_socket(dir: &Path) -> std::path::PathBuf {
    dir.join("containerd/containerd.sock")
}

/// A bridge with host-local IPAM. Pods route everything through the node
/// namespace, which has no route out: only the node's own addresses (the
/// API server, the fake IMDS) answer.
pub fn cni_config(dir: &Path) -> anyhow::Result<()> {
    let conf = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "imdsguard-e2e",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": dir.join("cni/ipam"),
                "ranges": [[{"subnet": POD_CIDR}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        }]
    });
    write(
        &dir.join("cni/net.d/10-imdsguard-e2e.conflist"),
        &serde_json::to_string_pretty(&conf)?,
    )
}

/// Static tokens: the admin (also the controllers' and kube-proxy's
/// identity) and kubelet's node identity, authorised by the Node authorizer.
pub fn tokens(dir: &Path, admin: &str, kubelet: &str) -> anyhow::Result<()> {
    write(
        &dir.join("pki/tokens.csv"),
        &format!(
            "{admin},admin,admin,system:masters\n\
             {kubelet},system:node:{NODE},kubelet-{NODE},system:nodes\n"
        ),
    )
}

/// A kubeconfig for the API server at the node IP.
pub fn kubeconfig(path: &Path, ca: &Path, token: &str) -> anyhow::Result<()> {
    crate::kube_apiserver::write_kubeconfig(path, &format!("https://{NODE_IP}:6443"), ca, token)
}
