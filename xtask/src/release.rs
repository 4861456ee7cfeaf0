//! The previous release, for the real node's upgrade test: its chart and
//! its amd64 image, built once from the release's commit in this
//! repository's history and cached by version and commit.
//!
//! A release is a commit: the chart and the agent are released together
//! (Chart.yaml), so both come from the same tree. The test upgrades from
//! exactly what users run today, whatever its pinned maps look like, which
//! a same-version upgrade cannot show.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::test::{cache_root, status, target_dir, workspace_root};

/// The release before this one.
pub const PREVIOUS: Release = Release {
    version: "0.1.0",
    // "BENCHMARKS: the flood's cause is a guess, not a figure": the tree
    // of the 0.1.0 chart and agent (stop 16).
    commit: "a569cebe20425a82bf9d4a35c78ca5234330dce8",
};

pub struct Release {
    pub version: &'static str,
    pub commit: &'static str,
}

/// What the upgrade test installs first.
pub struct Built {
    pub version: &'static str,
    /// The release's deploy/helm/imdsguard.
    pub chart: PathBuf,
    /// Its amd64 OCI archive, as its own `cargo xtask image` wrote it.
    pub archive: PathBuf,
    /// The image's name in the archive's index.
    pub image_name: String,
}

impl Release {
    fn dir(&self) -> PathBuf {
        cache_root().join(format!("imdsguard-{}-{}", self.version, &self.commit[..12]))
    }

    fn archive_name(&self) -> String {
        format!("imdsguard-{}-amd64.oci.tar", self.version)
    }

    fn built(&self) -> Built {
        let dir = self.dir();
        Built {
            version: self.version,
            chart: dir.join("chart"),
            archive: dir.join(self.archive_name()),
            image_name: format!("{}:{}", crate::image::REPOSITORY, self.version),
        }
    }

    /// Returns the cached build, building it first if it is missing.
    pub fn ensure_built(&self) -> anyhow::Result<Built> {
        let built = self.built();
        let done = self.dir().join("done");
        if done.exists() && built.archive.is_file() && built.chart.join("Chart.yaml").is_file() {
            return Ok(built);
        }
        let root = workspace_root();
        // A shallow clone lacks the release's commit: say so instead of
        // skipping the upgrade test.
        let have = Command::new("git")
            .args(["cat-file", "-e", &format!("{}^{{commit}}", self.commit)])
            .current_dir(&root)
            .status()
            .is_ok_and(|s| s.success());
        if !have {
            bail!(
                "the upgrade test needs release {} (commit {}) from this repository's \
                 history, and this clone does not have it (a shallow clone?): run \
                 `git fetch --unshallow` or clone without --depth",
                self.version,
                self.commit
            );
        }
        let dir = self.dir();
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        let tree = dir.join("tree");
        fs::create_dir_all(&tree).with_context(|| format!("create {}", tree.display()))?;
        let started = Instant::now();
        eprintln!(
            "xtask: building release {} ({}) for the upgrade test, once per machine",
            self.version,
            &self.commit[..12]
        );
        export_tree(&root, self.commit, &tree)?;
        // Its own target dir, kept across cache misses so that a rebuild is
        // incremental; its workspace crates must not overwrite this tree's.
        let target = target_dir().join(format!("release-{}", self.version));
        status(
            Command::new("cargo")
                .args(["xtask", "image", "--arch", "amd64"])
                .current_dir(&tree)
                .env("CARGO_TARGET_DIR", &target)
                // This build's cargo and rustc settings must not leak into
                // the release's own toolchain choice.
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO")
                .env_remove("RUSTC"),
        )
        .with_context(|| format!("build release {}'s image", self.version))?;
        let archive = target.join("image").join(self.archive_name());
        fs::copy(&archive, &built.archive)
            .with_context(|| format!("copy {}", archive.display()))?;
        copy_dir(&tree.join("deploy/helm/imdsguard"), &built.chart)?;
        fs::remove_dir_all(&tree).with_context(|| format!("remove {}", tree.display()))?;
        fs::write(&done, self.commit)?;
        eprintln!(
            "xtask: release {} built in {} s",
            self.version,
            started.elapsed().as_secs()
        );
        Ok(built)
    }
}

/// `git archive <commit> | tar -x`: the release's files (its Cargo.lock and
/// toolchain pins included), with no worktree registered in this repository.
fn export_tree(root: &Path, commit: &str, to: &Path) -> anyhow::Result<()> {
    let tar = to.join("tree.tar");
    status(
        Command::new("git")
            .args(["archive", "--format=tar", "-o"])
            .arg(&tar)
            .arg(commit)
            .current_dir(root),
    )?;
    status(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(to))?;
    fs::remove_file(&tar)?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            fs::copy(entry.path(), &dest)
                .with_context(|| format!("copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}
