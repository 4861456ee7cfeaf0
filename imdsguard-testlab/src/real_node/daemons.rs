//! The node's daemons: etcd, the control plane, containerd, kubelet and
//! kube-proxy, their flags, and starting each as a logged child process.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    process::{Child, Command},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    kube_apiserver::{binary_path, curl_ok},
    process::spawn_logged,
};

use super::*;

impl RealNode {
    pub(super) fn start_all(&mut self, sync_frequency: Duration) -> anyhow::Result<()> {
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

    pub(super) fn kubelet_args(&self, sync_frequency: Duration) -> Vec<OsString> {
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

    pub(super) fn start_containerd(&mut self) -> anyhow::Result<()> {
        let config = self.dir.join("containerd/config.toml").into_os_string();
        self.add_daemon(
            "containerd",
            "containerd".into(),
            vec!["--config".into(), config],
        )?;
        self.wait_containerd()
    }

    /// Waits until containerd answers on its socket.
    pub(super) fn wait_containerd(&self) -> anyhow::Result<()> {
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
    pub(super) fn add_daemon(
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

    pub(super) fn spawn(&self, daemon: &Daemon) -> anyhow::Result<Child> {
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

    pub(super) fn daemon_mut(&mut self, name: &str) -> anyhow::Result<&mut Daemon> {
        self.daemons
            .iter_mut()
            .find(|d| d.name == name)
            .with_context(|| format!("no daemon {name}"))
    }
}
