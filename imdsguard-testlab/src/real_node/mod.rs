//! A real single-node Kubernetes 1.20 on this machine: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, containerd, kubelet and
//! kube-proxy, with the CNI bridge, real pods and in-cluster
//! ServiceAccount tokens. `cargo xtask kubernetes` builds the binaries.
//!
//! Isolation (shared/real-node.md has the facts behind each choice):
//! - [`isolation::isolate`] moves the whole test process into a new network
//!   namespace (only `lo`, then the CNI bridge; no route out) and a new
//!   mount namespace, before any thread starts. Every daemon is a child and
//!   inherits both, so nothing needs `nsenter`, and every mount the node
//!   makes is private to it.
//! - Host paths that kubelet and containerd write whatever their flags say
//!   get a tmpfs in that mount namespace; `/sys/fs/bpf` gets a bpffs of the
//!   node's own, so the agent's pins never touch the host's.
//! - kubelet runs with its own `--cgroup-root`, created in every hierarchy.
//!   The daemons run in its `system` child, so teardown is one
//!   `cgroup.kill` for daemons, shims and containers alike.
//! - The sysctls kubelet changes are saved and restored.
//!
//! Dropping the node (or [`RealNode::teardown`]) undoes all of it, in that
//! order, also when a test fails.

pub mod isolation;

mod daemons;
mod files;
mod pki;

use std::{
    ffi::OsString,
    fs::{self, DirBuilder},
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    kube_apiserver::{binary_path, random_hex},
    process::{log_tail, stop},
};
use isolation::{CgroupRoot, HostPaths, Sysctls};

/// The node's name in the API.
pub const NODE: &str = "imdsguard-real-node";
/// The node's address, on `lo` of the node's network namespace (this kernel
/// has no dummy driver; kubelet refuses a loopback address as node IP).
pub const NODE_IP: &str = "10.250.0.1";
/// The `kubernetes` Service's cluster IP: the first of the service range.
pub const SERVICE_IP: &str = "10.96.0.1";
pub const SERVICE_CIDR: &str = "10.96.0.0/24";
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The sandbox image, written by [`crate::image`] from the cached static
/// pause binary and imported before kubelet starts.
pub const PAUSE_IMAGE: &str = "imdsguard.local/pause:1.20.2";
/// How long the node may take to become Ready, and a pod to start.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(90);

/// One daemon of the node: how to start it again, and the running child.
struct Daemon {
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    child: Option<Child>,
}

/// A running real node. See the module docs.
pub struct RealNode {
    dir: PathBuf,
    kubectl: PathBuf,
    admin_token: String,
    daemons: Vec<Daemon>,
    cgroups: Option<CgroupRoot>,
    host_paths: Option<HostPaths>,
    sysctls: Option<Sysctls>,
    torn_down: bool,
}

/// What the node needs from outside: the kubectl to drive it with.
pub struct Options {
    pub kubectl: PathBuf,
    /// kubelet's `--sync-frequency`: how soon a ConfigMap edit reaches a
    /// pod's volume (kubelet's default, 1 min, makes tests wait).
    pub sync_frequency: Duration,
}

impl RealNode {
    /// Starts every part of the node and waits until it is Ready, with the
    /// `kubernetes` Service reachable and the `default` service account's
    /// token minted. The caller must have called [`isolation::isolate`].
    pub fn start(o: Options) -> anyhow::Result<Self> {
        for b in [
            "kube-apiserver",
            "kubelet",
            "kube-controller-manager",
            "kube-scheduler",
            "kube-proxy",
            "pause",
        ] {
            ensure!(
                binary_path(b).is_file(),
                "{} is missing: run `cargo xtask kubernetes` to build it",
                binary_path(b).display()
            );
        }
        isolation::assert_no_route_out()?;
        let name = crate::unique("imdsguard-rn");
        let dir = std::env::temp_dir().join(&name);
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("create {}", dir.display()))?;
        // Built before anything starts, so that Drop cleans up after any
        // step that fails.
        let mut node = Self {
            dir,
            kubectl: o.kubectl,
            admin_token: random_hex(16)?,
            daemons: Vec::new(),
            cgroups: None,
            host_paths: None,
            sysctls: None,
            torn_down: false,
        };
        node.sysctls = Some(Sysctls::save()?);
        node.host_paths = Some(HostPaths::cover()?);
        let cgroups = CgroupRoot::create(&name)?;
        isolation::set_signal_target(cgroups.unified());
        node.cgroups = Some(cgroups);
        node.prepare_files()?;
        node.set_up_network()?;
        node.start_all(o.sync_frequency)?;
        Ok(node)
    }

    fn prepare_files(&self) -> anyhow::Result<()> {
        for sub in [
            "pki",
            "etcd",
            "containerd",
            "cni/net.d",
            "cni/ipam",
            "kubelet/root",
            "kubelet/pki",
            "kubelet/volume-plugins",
            "kubelet/seccomp",
            "logs",
        ] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        pki::write(&self.dir.join("pki"))?;
        let kubelet_token = random_hex(16)?;
        files::tokens(&self.dir, &self.admin_token, &kubelet_token)?;
        let ca = self.ca();
        files::kubeconfig(&self.admin_kubeconfig(), &ca, &self.admin_token)?;
        files::kubeconfig(&self.dir.join("kubelet.kubeconfig"), &ca, &kubelet_token)?;
        files::containerd_config(&self.dir)?;
        files::cni_config(&self.dir)?;
        // Pods get no nameserver: there is nothing to resolve out here.
        fs::write(self.dir.join("resolv.conf"), "")?;
        Ok(())
    }

    /// The node IP on `lo`, and a route for the service range; everything
    /// else comes from CNI and kube-proxy.
    ///
    /// A host process (a hostNetwork pod, such as the agent in filter mode)
    /// needs a route to a Service IP before kube-proxy's OUTPUT DNAT can
    /// rewrite it: without one, connect() fails with ENETUNREACH. A real
    /// node has its default route for that; this one has none, so the
    /// service range goes to `lo`, where nothing but the DNAT to the node's
    /// own address answers and nothing leaves the namespace.
    fn set_up_network(&self) -> anyhow::Result<()> {
        crate::process::run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{NODE_IP}/32"),
            "dev",
            "lo",
        ]))?;
        crate::process::run(Command::new("ip").args([
            "route",
            "add",
            SERVICE_CIDR,
            "dev",
            "lo",
            "src",
            NODE_IP,
        ]))?;
        Ok(())
    }

    /// Stops a daemon (SIGTERM, then SIGKILL) and starts it again with the
    /// same flags. Containers keep running across both kubelet and
    /// containerd restarts (their shims hold them).
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let daemon = self.daemon_mut(name)?;
        if let Some(mut child) = daemon.child.take() {
            stop(&mut child).with_context(|| format!("stop {name}"))?;
        }
        let daemon = self
            .daemons
            .iter()
            .position(|d| d.name == name)
            .context("daemon vanished")?;
        let child = self.spawn(&self.daemons[daemon])?;
        self.daemons[daemon].child = Some(child);
        match name {
            "containerd" => self.wait_containerd(),
            "kubelet" => self.wait_node_ready(),
            _ => Ok(()),
        }
    }

    /// Waits until `ready` holds, failing early with the log if any daemon
    /// exited.
    fn wait(&self, what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        loop {
            if ready() {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{what} not ready after {NODE_READY_TIMEOUT:?}; log:\n{}",
                    log_tail(&self.log(what))
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Fails with the log of the first daemon that has exited.
    pub fn check_alive(&self) -> anyhow::Result<()> {
        for d in &self.daemons {
            if d.child.is_none() {
                continue;
            }
            let pid = d.child.as_ref().map(Child::id).unwrap_or_default();
            // Not reaped yet, so the pid is still ours: a zombie shows up as
            // state Z in /proc.
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            if state.is_none() || state == Some("Z") {
                bail!(
                    "{} (pid {pid}) exited; log {}:\n{}",
                    d.name,
                    self.log(d.name).display(),
                    log_tail(&self.log(d.name))
                );
            }
        }
        Ok(())
    }

    fn wait_node_ready(&self) -> anyhow::Result<()> {
        self.wait("kubelet", || {
            self.kubectl_out(&[
                "get",
                "node",
                NODE,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .is_ok_and(|s| s.trim() == "True")
        })
    }

    /// Imports a docker-archive into containerd's `k8s.io` namespace.
    pub fn import_image(&self, archive: &Path) -> anyhow::Result<()> {
        crate::image::import(archive, files::containerd_socket(&self.dir))
    }

    /// Imports an OCI archive's image for `platform` (`linux/amd64`) and
    /// gives it the further names `tags`.
    pub fn import_oci_image(
        &self,
        archive: &Path,
        platform: &str,
        name: &str,
        tags: &[&str],
    ) -> anyhow::Result<()> {
        let socket = files::containerd_socket(&self.dir);
        crate::image::import_platform(archive, platform, &socket)?;
        crate::image::tag(name, tags, &socket)
    }

    /// The node's private work directory (0700: it holds keys and tokens).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log(&self, daemon: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{daemon}.log"))
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// Where kubelet looks for Localhost seccomp profiles.
    pub fn seccomp_root(&self) -> PathBuf {
        self.dir.join("kubelet/seccomp")
    }

    /// The unified-hierarchy directory of kubelet's `--cgroup-root`; the
    /// pods' cgroups are below its `kubepods`.
    pub fn cgroup_root(&self) -> anyhow::Result<&Path> {
        Ok(self.cgroups.as_ref().context("no cgroup root")?.unified())
    }

    /// kubectl with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(self.admin_kubeconfig());
        cmd
    }

    /// Runs kubectl ARGS; its stdout.
    pub fn kubectl_out(&self, args: &[&str]) -> anyhow::Result<String> {
        crate::process::run(self.kubectl().args(args))
    }

    /// Stops everything and undoes every change to the host. Errors are
    /// collected, so one failure does not stop the rest of the cleanup.
    pub fn teardown(&mut self) -> anyhow::Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut errors: Vec<String> = Vec::new();
        let mut note = |r: anyhow::Result<()>| {
            if let Err(e) = r {
                errors.push(format!("{e:#}"));
            }
        };
        if let Some(cgroups) = &self.cgroups {
            note(cgroups.kill_all());
        }
        for d in &mut self.daemons {
            if let Some(mut child) = d.child.take() {
                note(stop(&mut child).with_context(|| format!("reap {}", d.name)));
            }
        }
        note(shims_gone(&files::containerd_socket(&self.dir)));
        note(isolation::unmount_all_below(&self.dir));
        if let Some(mut h) = self.host_paths.take() {
            note(h.release());
        }
        if let Some(mut c) = self.cgroups.take() {
            note(c.remove());
        }
        if let Some(s) = self.sysctls.take() {
            note(s.restore());
        }
        if isolation::mounts_below(&self.dir).is_ok_and(|m| m.is_empty()) {
            note(
                fs::remove_dir_all(&self.dir)
                    .with_context(|| format!("remove {}", self.dir.display())),
            );
        } else {
            errors.push(format!(
                "mounts left below {}: not removing it",
                self.dir.display()
            ));
        }
        ensure!(
            errors.is_empty(),
            "real node teardown: {}",
            errors.join("; ")
        );
        Ok(())
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("{e:#}");
        }
    }
}

/// containerd-shim-runc-v2 outlives containerd: fails if any shim whose
/// command line names our socket is still running.
fn shims_gone(socket: &Path) -> anyhow::Result<()> {
    let needle = socket.to_string_lossy().into_owned();
    let mut left = Vec::new();
    for entry in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
            left.push(pid);
        }
    }
    ensure!(left.is_empty(), "containerd shims still running: {left:?}");
    Ok(())
}
