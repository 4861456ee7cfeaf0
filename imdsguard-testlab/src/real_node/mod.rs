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

mod files;
mod pki;

use std::{
    ffi::OsString,
    fs::{self, DirBuilder},
    os::unix::{fs::DirBuilderExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    kube_apiserver::{binary_path, curl_ok, random_hex},
    process::{log_tail, spawn_logged, stop},
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

    fn start_all(&mut self, sync_frequency: Duration) -> anyhow::Result<()> {
        let d = self.dir.clone();
        let p = |name: &str| d.join("pki").join(name).into_os_string();
        let os = |s: &str| OsString::from(s);

        self.add_daemon(
            "etcd",
            "etcd".into(),
            vec![
                os("--name=default"),
                os("--data-dir"),
                d.join("etcd").into_os_string(),
                os("--listen-client-urls=http://127.0.0.1:2379"),
                os("--advertise-client-urls=http://127.0.0.1:2379"),
                os("--listen-peer-urls=http://127.0.0.1:2380"),
                os("--initial-advertise-peer-urls=http://127.0.0.1:2380"),
                os("--initial-cluster=default=http://127.0.0.1:2380"),
            ],
        )?;
        self.wait("etcd", || curl_ok("http://127.0.0.1:2379/health", |c| c))?;

        self.add_daemon(
            "kube-apiserver",
            binary_path("kube-apiserver"),
            vec![
                os("--etcd-servers=http://127.0.0.1:2379"),
                // Pods reach it through the Service at the node IP.
                os("--bind-address=0.0.0.0"),
                os(&format!("--advertise-address={NODE_IP}")),
                os("--secure-port=6443"),
                os("--insecure-port=0"),
                os("--tls-cert-file"),
                p("apiserver.crt"),
                os("--tls-private-key-file"),
                p("apiserver.key"),
                os("--client-ca-file"),
                p("ca.crt"),
                os("--kubelet-client-certificate"),
                p("apiserver-kubelet.crt"),
                os("--kubelet-client-key"),
                p("apiserver-kubelet.key"),
                // The node's name resolves nowhere here: reach kubelet (logs,
                // exec) at its InternalIP.
                os("--kubelet-preferred-address-types=InternalIP"),
                os("--token-auth-file"),
                p("tokens.csv"),
                os("--authorization-mode=Node,RBAC"),
                os("--allow-privileged=true"),
                os("--service-account-issuer=https://kubernetes.default.svc"),
                os("--service-account-key-file"),
                p("sa.pub"),
                os("--service-account-signing-key-file"),
                p("sa.key"),
                os(&format!("--service-cluster-ip-range={SERVICE_CIDR}")),
                os("--cert-dir"),
                d.join("pki/apiserver-dir").into_os_string(),
            ],
        )?;
        let ca = self.ca();
        let bearer = format!("Authorization: Bearer {}", self.admin_token);
        self.wait("kube-apiserver", || {
            ["/readyz", "/api/v1/namespaces/default"]
                .iter()
                .all(|path| {
                    curl_ok(&format!("https://{NODE_IP}:6443{path}"), |c| {
                        c.arg("--cacert").arg(&ca).args(["-H", &bearer])
                    })
                })
        })?;

        let admin = self.admin_kubeconfig().into_os_string();
        self.add_daemon(
            "kube-controller-manager",
            binary_path("kube-controller-manager"),
            vec![
                os("--kubeconfig"),
                admin.clone(),
                os("--leader-elect=false"),
                os("--port=0"),
                os("--bind-address=127.0.0.1"),
                // The token controller mints the ServiceAccount tokens that
                // the agent uses in-cluster.
                os("--service-account-private-key-file"),
                p("sa.key"),
                os("--root-ca-file"),
                p("ca.crt"),
                os("--cert-dir"),
                d.join("pki/controller-manager").into_os_string(),
                os("--flex-volume-plugin-dir"),
                d.join("kubelet/volume-plugins").into_os_string(),
            ],
        )?;
        self.add_daemon(
            "kube-scheduler",
            binary_path("kube-scheduler"),
            vec![
                os("--kubeconfig"),
                admin.clone(),
                os("--leader-elect=false"),
                os("--port=0"),
                os("--bind-address=127.0.0.1"),
                os("--cert-dir"),
                d.join("pki/scheduler").into_os_string(),
            ],
        )?;
        self.start_containerd()?;
        let pause = crate::image::ImageBuilder::new(PAUSE_IMAGE)
            .file("/pause", binary_path("pause").as_path(), 0o755)
            .entrypoint(["/pause"]);
        let archive = self.dir.join("pause.tar");
        pause.write(&archive)?;
        self.import_image(&archive)?;

        self.add_daemon(
            "kube-proxy",
            binary_path("kube-proxy"),
            vec![
                os("--kubeconfig"),
                admin,
                os("--proxy-mode=iptables"),
                os(&format!("--cluster-cidr={POD_CIDR}")),
                os(&format!("--hostname-override={NODE}")),
                // Leave the global conntrack table and its timeouts alone.
                os("--conntrack-max-per-core=0"),
                os("--conntrack-tcp-timeout-established=0"),
                os("--conntrack-tcp-timeout-close-wait=0"),
                // Lowering it needs CAP_SYS_RESOURCE, which this VM lacks.
                os("--oom-score-adj=0"),
                os("--metrics-bind-address=127.0.0.1:10249"),
                os("--healthz-bind-address=127.0.0.1:10256"),
            ],
        )?;
        self.add_daemon(
            "kubelet",
            binary_path("kubelet"),
            self.kubelet_args(sync_frequency),
        )?;

        self.wait_node_ready()?;
        // In-cluster config reaches the API server through the Service:
        // kube-proxy must have programmed it, and the token controller must
        // have minted the default account's token.
        self.wait("kube-proxy", || {
            crate::process::run(Command::new("iptables").args(["-t", "nat", "-S", "KUBE-SERVICES"]))
                .is_ok_and(|rules| rules.contains("default/kubernetes:https"))
        })?;
        self.wait("kube-controller-manager", || {
            self.kubectl_out(&[
                "-n",
                "default",
                "get",
                "serviceaccount",
                "default",
                "-o",
                "jsonpath={.secrets[0].name}",
            ])
            .is_ok_and(|s| !s.trim().is_empty())
        })?;
        Ok(())
    }

    fn kubelet_args(&self, sync_frequency: Duration) -> Vec<OsString> {
        let d = &self.dir;
        let os = |s: &str| OsString::from(s);
        let cgroup_root = self
            .cgroups
            .as_ref()
            .map(CgroupRoot::kubelet_root)
            .unwrap_or_default();
        vec![
            os("--kubeconfig"),
            d.join("kubelet.kubeconfig").into_os_string(),
            os("--container-runtime=remote"),
            os(&format!(
                "--container-runtime-endpoint=unix://{}",
                files::containerd_socket(d).display()
            )),
            os("--cgroup-driver=cgroupfs"),
            os(&format!("--cgroup-root={cgroup_root}")),
            os("--fail-swap-on=false"),
            os("--root-dir"),
            d.join("kubelet/root").into_os_string(),
            os("--cert-dir"),
            d.join("kubelet/pki").into_os_string(),
            os("--volume-plugin-dir"),
            d.join("kubelet/volume-plugins").into_os_string(),
            os("--seccomp-profile-root"),
            self.seccomp_root().into_os_string(),
            os(&format!("--pod-infra-container-image={PAUSE_IMAGE}")),
            // Imported images can never be pulled again: never collect them.
            os("--image-gc-high-threshold=100"),
            os("--image-gc-low-threshold=99"),
            os(
                "--eviction-hard=memory.available<1Mi,nodefs.available<1%,imagefs.available<1%,nodefs.inodesFree<1%",
            ),
            os("--anonymous-auth=false"),
            os("--client-ca-file"),
            d.join("pki/ca.crt").into_os_string(),
            os(&format!("--node-ip={NODE_IP}")),
            os(&format!("--hostname-override={NODE}")),
            os("--resolv-conf"),
            d.join("resolv.conf").into_os_string(),
            os("--cluster-domain=cluster.local"),
            os("--read-only-port=0"),
            os(&format!(
                "--sync-frequency={}s",
                sync_frequency.as_secs().max(1)
            )),
            os("--serialize-image-pulls=false"),
        ]
    }

    fn start_containerd(&mut self) -> anyhow::Result<()> {
        let config = self.dir.join("containerd/config.toml").into_os_string();
        self.add_daemon(
            "containerd",
            "containerd".into(),
            vec!["--config".into(), config],
        )?;
        self.wait_containerd()
    }

    /// Waits until containerd answers on its socket.
    fn wait_containerd(&self) -> anyhow::Result<()> {
        let sock = files::containerd_socket(&self.dir);
        self.wait("containerd", || {
            Command::new("ctr")
                .arg("-a")
                .arg(&sock)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    /// Spawns a daemon into the node's `system` cgroup, logging to
    /// `logs/<name>.log`.
    fn add_daemon(
        &mut self,
        name: &'static str,
        program: PathBuf,
        args: Vec<OsString>,
    ) -> anyhow::Result<()> {
        let mut daemon = Daemon {
            name,
            program,
            args,
            child: None,
        };
        daemon.child = Some(self.spawn(&daemon)?);
        self.daemons.push(daemon);
        Ok(())
    }

    fn spawn(&self, daemon: &Daemon) -> anyhow::Result<Child> {
        let cgroups = self.cgroups.as_ref().context("no cgroup root")?;
        let procs = isolation::open_procs(&cgroups.system())?;
        let mut cmd = Command::new(&daemon.program);
        cmd.args(&daemon.args);
        // SAFETY: the hook only calls write(2) on an fd that `procs` keeps
        // open until spawn returns.
        unsafe {
            cmd.pre_exec(isolation::join_cgroup_hook(&procs));
        }
        let child = spawn_logged(cmd, &self.log(daemon.name))
            .with_context(|| format!("start {}", daemon.name))?;
        drop(procs);
        Ok(child)
    }

    fn daemon_mut(&mut self, name: &str) -> anyhow::Result<&mut Daemon> {
        self.daemons
            .iter_mut()
            .find(|d| d.name == name)
            .with_context(|| format!("no daemon {name}"))
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
