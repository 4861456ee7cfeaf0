//! The runc container check of the DaemonSet's contract: what it runs and
//! what each case must show (the bundle itself is in [`super::runc`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::test::{ensure_commands, output, status, workspace_root};

use super::deploy_dir;
use super::manifests::{profile_without_bpf, rendered_capabilities};
use super::runc::{ATTACH_TIMEOUT, ContainerLab, Run};

/// The container contract of the DaemonSet, checked with runc (the runtime
/// containerd and CRI-O drive) on this kernel, without a kubelet:
///
/// - the capabilities of the rendered DaemonSet, no others, no_new_privs;
/// - deploy/seccomp/imdsguard.json as the seccomp filter;
/// - a read-only root holding only the static binary (what the image holds);
/// - the host's cgroup tree read-only at /sys/fs/cgroup (recursive, as the
///   kubelet's hostPath is) and a bpffs at /sys/fs/bpf, receiving host
///   mounts (HostToContainer is rslave);
/// - private pid, network, ipc, uts, mount and cgroup namespaces.
///
/// The agent runs in standalone mode (no API server in the container) on a
/// throwaway cgroup with one allowed and one denied child. It must attach,
/// and a connect to 169.254.169.254:80 must fail with EPERM from the denied
/// child and get past the hook from the allowed one. The probe runs in a
/// fresh network namespace with no routes, so nothing leaves the machine:
/// past the hook the connect fails with ENETUNREACH. The agent is killed
/// first: the pins alone must enforce. Then `imdsguard uninstall` runs as
/// deploy/uninstall/uninstall.yaml runs it (no capability; our profile
/// without bpf(2) stands in for RuntimeDefault), and both connects must get
/// past the hook.
///
/// Then each capability is dropped in turn, and the profile's bpf rule: the
/// agent must fail to load every time. Last, revocation: with the
/// all-features capabilities the sweep must enter a network namespace
/// bind-mounted where `--netns-dir` points, and with the shipped ones it
/// must report that it cannot. A capability that turns out not to
/// be needed fails the check, so the manifests never grant more than this
/// kernel asks for.
pub(super) fn container_check(binary: &Path) -> anyhow::Result<()> {
    ensure_commands(&[
        ("runc", "runc"),
        ("unshare", "util-linux"),
        ("bash", "bash"),
    ])?;
    let rendering = fs::read_to_string(deploy_dir().join("helm-default.yaml"))
        .context("read the default rendering")?;
    let caps = rendered_capabilities(&rendering)?;
    let profile_path = workspace_root().join("deploy/seccomp/imdsguard.json");
    let profile = fs::read_to_string(&profile_path)
        .with_context(|| format!("read {}", profile_path.display()))?;
    let without_bpf = profile_without_bpf(&profile)?;
    let lab = ContainerLab::new(binary)?;

    let cap_names = |v: &[&str]| v.iter().map(|c| format!("CAP_{c}")).collect::<Vec<_>>();
    let shipped = cap_names(&caps);
    lab.expect_attach("as shipped", &shipped, &profile)?;
    // The agent was SIGKILLed: the pins keep enforcing.
    lab.expect_verdicts(true)?;
    lab.expect_uninstall(&without_bpf)?;
    lab.expect_verdicts(false)?;
    for dropped in &caps {
        let fewer: Vec<&str> = caps.iter().copied().filter(|c| c != dropped).collect();
        lab.expect_refused(&format!("without {dropped}"), &cap_names(&fewer), &profile)
            .with_context(|| {
                format!("{dropped} is not needed on this kernel: drop it from the manifests")
            })?;
    }
    lab.expect_refused("seccomp profile without bpf(2)", &shipped, &without_bpf)?;
    // Revocation, as the chart's `revocation.enabled` runs it: with the
    // all-features capabilities the agent's sweep enters a network
    // namespace bind-mounted in --netns-dir (setns is allowed by the
    // profile for network namespaces only); without SYS_ADMIN it cannot.
    let all = fs::read_to_string(deploy_dir().join("helm-all-features.yaml"))
        .context("read the all-features rendering")?;
    let revoking = cap_names(&rendered_capabilities(&all)?);
    lab.expect_sweep("all-features capabilities", &revoking, &profile, true)?;
    lab.expect_sweep("shipped capabilities", &shipped, &profile, false)?;
    let kernel = output(Command::new("uname").arg("-r"))?;
    eprintln!(
        "xtask: container check passed on Linux {}: the agent needs exactly {} and bpf(2) in its seccomp profile",
        kernel.trim(),
        caps.join(" ")
    );
    Ok(())
}

impl ContainerLab {
    pub(super) fn pods(&self) -> PathBuf {
        self.root.join("pods")
    }

    /// Where the check's network namespace is bind-mounted, as a runtime
    /// keeps pod namespaces in /var/run/netns.
    pub(super) fn netns_dir(&self) -> PathBuf {
        self.dir.join("netns")
    }

    /// Runs the agent with revocation and reads its sweep report: with
    /// `can_enter`, the sweep must have entered the bind-mounted namespace
    /// without error; otherwise it must report that it could not.
    pub(super) fn expect_sweep(
        &self,
        case: &str,
        caps: &[String],
        seccomp: &str,
        can_enter: bool,
    ) -> anyhow::Result<()> {
        let dir = self.netns_dir();
        let ns = dir.join("check");
        if !ns.exists() {
            // A persistent namespace needs a bind mount on a private mount.
            fs::create_dir_all(&dir)?;
            status(Command::new("mount").arg("--bind").arg(&dir).arg(&dir))?;
            status(Command::new("mount").arg("--make-private").arg(&dir))?;
            fs::write(&ns, "")?;
            status(
                Command::new("unshare")
                    .arg(format!("--net={}", ns.display()))
                    .arg("true"),
            )?;
        }
        let mut child = self.start(Run::Revoking, caps, seccomp)?;
        let attached = self.wait_attached(&mut child);
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        let (done, failed) = loop {
            let log = self.log();
            let done = log
                .lines()
                .any(|l| l.contains("revocation sweep done") && l.contains("namespaces=2"));
            let failed = log.contains("revocation sweep could not do everything");
            if done || Instant::now() > deadline || child.try_wait()?.is_some() {
                break (done, failed);
            }
            thread::sleep(Duration::from_millis(100));
        };
        self.stop(&mut child);
        if !attached? {
            bail!(
                "container check, revocation with {case}: the agent did not attach:\n{}",
                self.log()
            );
        }
        match (can_enter, done, failed) {
            (true, true, false) => eprintln!(
                "xtask: container check, revocation with {case}: swept its own and the bind-mounted namespace"
            ),
            (false, true, true) => eprintln!(
                "xtask: container check, revocation with {case}: could not enter the namespace, as expected"
            ),
            _ => bail!(
                "container check, revocation with {case}: want the sweep to {}enter the namespace; log:\n{}",
                if can_enter { "" } else { "fail to " },
                self.log()
            ),
        }
        Ok(())
    }

    pub(super) fn expect_attach(
        &self,
        case: &str,
        caps: &[String],
        seccomp: &str,
    ) -> anyhow::Result<()> {
        let mut child = self.start(Run::Agent, caps, seccomp)?;
        let attached = self.wait_attached(&mut child);
        self.stop(&mut child);
        match attached {
            Ok(true) => {
                eprintln!("xtask: container check, {case}: attached");
                Ok(())
            }
            Ok(false) => bail!(
                "container check, {case}: the agent did not attach:\n{}",
                self.log()
            ),
            Err(e) => Err(e.context(format!("container check, {case}"))),
        }
    }

    pub(super) fn expect_refused(
        &self,
        case: &str,
        caps: &[String],
        seccomp: &str,
    ) -> anyhow::Result<()> {
        let mut child = self.start(Run::Agent, caps, seccomp)?;
        let attached = self.wait_attached(&mut child);
        self.stop(&mut child);
        if attached? {
            bail!("container check, {case}: the agent attached anyway");
        }
        let log = self.log();
        let why = log
            .lines()
            .find(|l| l.starts_with("Error:"))
            .unwrap_or("(no error line)");
        eprintln!("xtask: container check, {case}: refused as expected: {why}");
        Ok(())
    }

    /// Connects from each child cgroup. While enforcing, the denied one gets
    /// EPERM from the hook; otherwise both get past it.
    pub(super) fn expect_verdicts(&self, enforcing: bool) -> anyhow::Result<()> {
        let past_the_hook = "Network is unreachable";
        let denied = if enforcing {
            "Operation not permitted"
        } else {
            past_the_hook
        };
        for (cgroup, want) in [("allowed", past_the_hook), ("denied", denied)] {
            let procs = self.pods().join(cgroup).join("cgroup.procs");
            let script = format!(
                "echo $$ > {} && exec unshare --net bash -c 'exec 3<>/dev/tcp/169.254.169.254/80'",
                procs.display()
            );
            let out = Command::new("bash")
                .args(["-c", &script])
                .output()
                .context("run the connect probe")?;
            let said = String::from_utf8_lossy(&out.stderr);
            if !said.contains(want) {
                bail!(
                    "container check: a connect from the {cgroup} cgroup said {:?}, want {want:?}",
                    said.trim()
                );
            }
            eprintln!(
                "xtask: container check, {}: connect from the {cgroup} cgroup: {want}",
                if enforcing {
                    "enforcing"
                } else {
                    "after uninstall"
                }
            );
        }
        Ok(())
    }

    /// Runs `imdsguard uninstall` as deploy/uninstall/uninstall.yaml does:
    /// no capability, no bpf(2) in the seccomp profile, bpffs only.
    pub(super) fn expect_uninstall(&self, seccomp_without_bpf: &str) -> anyhow::Result<()> {
        let mut child = self.start(Run::Uninstall, &[], seccomp_without_bpf)?;
        let st = child.wait().context("wait for the uninstall container")?;
        self.stop(&mut child);
        if !st.success() {
            bail!("container check: uninstall failed: {st}\n{}", self.log());
        }
        if self.bpffs.join("imdsguard").exists() {
            bail!(
                "container check: uninstall left {}",
                self.bpffs.join("imdsguard").display()
            );
        }
        eprintln!(
            "xtask: container check, uninstall with no capability: {}",
            self.log().trim()
        );
        Ok(())
    }
}
