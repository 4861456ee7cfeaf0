//! `cargo xtask kubernetes`: builds the Kubernetes binaries that the
//! control-plane tests and the real node run, once per machine.
//!
//! No registry we can reach ships Kubernetes binaries, but Debian bookworm's
//! `kubernetes` source package holds upstream 1.20.2 with its `vendor/`
//! tree, so it builds offline with Debian's Go. One `make` builds every
//! binary, so they share the Go build cache (about 9 minutes on 2 cores);
//! the static `pause` binary comes from the same tree. The steps and their
//! reasons are in shared/kube-apiserver.md and shared/real-node.md.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::Args;

const VERSION: &str = "1.20.2";
const DEB_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
const ORIG_TARBALL: &str = "kubernetes_1.20.5+really1.20.2.orig.tar.gz";
const ORIG_SHA256: &str = "b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc";
const DSC: &str = "kubernetes_1.20.5+really1.20.2-1.1+deb12u1.dsc";
/// What one `make` builds, in `_output/bin`.
pub const BINARIES: &[&str] = &[
    "kube-apiserver",
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
];
/// The build's tools, plus etcd, etcdctl and openssl that the tests run.
const PACKAGES: &[&str] = &[
    "golang-go",
    "golang-github-modern-go-reflect2-dev",
    "etcd-server",
    "etcd-client",
    "dpkg-dev",
    "openssl",
    "make",
    "rsync",
    "gcc",
    "libc6-dev",
];
/// Debian's reflect2 1.0.2: the vendored 1.0.1 panics when built with Go >= 1.18.
const DEBIAN_REFLECT2: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";
const DEBIAN_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";

#[derive(Args)]
pub struct Options {
    /// Print where the binaries are (or would be) cached, without building them.
    #[arg(long)]
    print_path: bool,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let path = if o.print_path {
        version_dir()
    } else {
        ensure_built()?
    };
    println!("{}", path.display());
    Ok(())
}

/// A cached binary: `$IMDSGUARD_CACHE_DIR` (default `/var/cache/imdsguard`)
/// `/kubernetes-<version>/<name>`. imdsguard-testlab's `kube_apiserver` and
/// `real_node` modules look in the same place.
pub fn binary_path(name: &str) -> PathBuf {
    version_dir().join(name)
}

fn version_dir() -> PathBuf {
    crate::test::cache_root().join(format!("kubernetes-{VERSION}"))
}

/// Every cached binary reports the version (pause has no flag: it must be a
/// non-empty file).
fn cached() -> bool {
    BINARIES.iter().all(|b| reports_version(&binary_path(b)))
        && fs::metadata(binary_path("pause")).is_ok_and(|m| m.len() > 0)
}

/// Installs the packages the tests need and builds the Kubernetes binaries
/// unless working ones are cached. Returns the cache directory.
pub fn ensure_built() -> anyhow::Result<PathBuf> {
    ensure_packages()?;
    if cached() {
        return Ok(version_dir());
    }
    let dir = version_dir();
    // A fixed work dir, so that a build cut short is cleaned by the next one
    // instead of leaving 1.8 GB behind.
    let work = dir.join("build");
    if work.exists() {
        fs::remove_dir_all(&work)
            .with_context(|| format!("remove the stale build tree {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let started = Instant::now();
    eprintln!(
        "xtask: building Kubernetes {VERSION} ({}, pause) in {} (about 9 minutes)",
        BINARIES.join(", "),
        work.display()
    );
    let built = build(&work);
    let cleaned = fs::remove_dir_all(&work)
        .with_context(|| format!("remove the build tree {}", work.display()));
    built?;
    cleaned?;
    for b in BINARIES {
        if !reports_version(&binary_path(b)) {
            bail!(
                "the built {} does not report version v{VERSION} with --version",
                binary_path(b).display()
            );
        }
    }
    eprintln!(
        "xtask: built Kubernetes in {} s",
        started.elapsed().as_secs()
    );
    Ok(version_dir())
}

fn reports_version(binary: &Path) -> bool {
    Command::new(binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(&format!("v{VERSION}"))
        })
}

fn ensure_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    // Without a fresh index a package may not be found at all.
    run_cmd(Command::new("apt-get").arg("update"))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).ends_with(" installed")
        })
}

/// Fetches, patches and builds the source in `work`, then moves the binaries
/// next to it.
fn build(work: &Path) -> anyhow::Result<()> {
    fetch_source(work)?;
    let orig = work.join(ORIG_TARBALL);
    let sum = crate::test::output(Command::new("sha256sum").arg(&orig))?;
    if sum.split_whitespace().next() != Some(ORIG_SHA256) {
        bail!(
            "{} has sha256 {}, want {ORIG_SHA256}",
            orig.display(),
            sum.trim()
        );
    }
    let src = work.join("src");
    run_cmd(
        Command::new("dpkg-source")
            .arg("-x")
            .arg(work.join(DSC))
            .arg(&src),
    )?;

    let reflect2 = src.join("vendor/github.com/modern-go/reflect2");
    fs::remove_dir_all(&reflect2).with_context(|| format!("remove {}", reflect2.display()))?;
    run_cmd(
        Command::new("cp")
            .arg("-rL")
            .arg(DEBIAN_REFLECT2)
            .arg(&reflect2),
    )?;
    // A go.mod would make the vendored copy a module of its own.
    let go_mod = reflect2.join("go.mod");
    if go_mod.exists() {
        fs::remove_file(&go_mod).with_context(|| format!("remove {}", go_mod.display()))?;
    }

    // Without a version file the build asks git, and an enclosing repository
    // (the cache dir may be anywhere) would lend its own version.
    let version_file = work.join("version.env");
    let mut numbers = VERSION.split('.');
    let (major, minor) = (
        numbers.next().unwrap_or_default(),
        numbers.next().unwrap_or_default(),
    );
    fs::write(
        &version_file,
        format!(
            "KUBE_GIT_VERSION='v{VERSION}'\nKUBE_GIT_MAJOR='{major}'\nKUBE_GIT_MINOR='{minor}'\n"
        ),
    )
    .with_context(|| format!("write {}", version_file.display()))?;
    let what: Vec<String> = BINARIES.iter().map(|b| format!("cmd/{b}")).collect();
    run_cmd(
        Command::new("make")
            .arg(format!("WHAT={}", what.join(" ")))
            .current_dir(&src)
            .env("GOPROXY", "off")
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", work.join("gocache"))
            .env("KUBE_GIT_VERSION_FILE", &version_file),
    )?;

    // The pod sandbox's pause process, static so that the image needs no libc.
    let pause = src.join("_output/bin/pause");
    run_cmd(
        Command::new("gcc")
            .args(["-Os", "-static", "-o"])
            .arg(&pause)
            .arg(src.join("build/pause/linux/pause.c")),
    )?;

    for name in BINARIES.iter().copied().chain(["pause"]) {
        let built = src.join("_output/bin").join(name);
        let tmp = version_dir().join(format!("{name}.tmp"));
        let binary = binary_path(name);
        fs::copy(&built, &tmp)
            .with_context(|| format!("copy {} to {}", built.display(), tmp.display()))?;
        fs::rename(&tmp, &binary)
            .with_context(|| format!("rename {} to {}", tmp.display(), binary.display()))?;
    }
    Ok(())
}

/// Downloads the source package into `work` with a private apt setup, so the
/// system's sources and package lists stay untouched.
fn fetch_source(work: &Path) -> anyhow::Result<()> {
    let apt = work.join("apt");
    let parts = apt.join("sources.list.d");
    for dir in [
        parts.clone(),
        apt.join("lists/partial"),
        apt.join("cache/archives/partial"),
    ] {
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let sources =
        fs::read_to_string(DEBIAN_SOURCES).with_context(|| format!("read {DEBIAN_SOURCES}"))?;
    let deb_src = sources.replace("Types: deb\n", "Types: deb-src\n");
    let src_file = parts.join("debian-src.sources");
    fs::write(&src_file, deb_src).with_context(|| format!("write {}", src_file.display()))?;
    let conf = apt.join("apt.conf");
    // The sandbox user `_apt` cannot write into the root-owned work dir.
    fs::write(
        &conf,
        format!(
            "Dir::Etc::SourceList \"/dev/null\";\n\
             Dir::Etc::SourceParts \"{}\";\n\
             Dir::State::Lists \"{}\";\n\
             Dir::Cache \"{}\";\n\
             APT::Sandbox::User \"root\";\n",
            parts.display(),
            apt.join("lists").display(),
            apt.join("cache").display(),
        ),
    )
    .with_context(|| format!("write {}", conf.display()))?;
    run_cmd(
        Command::new("apt-get")
            .arg("update")
            .env("APT_CONFIG", &conf),
    )?;
    run_cmd(
        Command::new("apt-get")
            .args([
                "source",
                "--download-only",
                &format!("kubernetes={DEB_VERSION}"),
            ])
            .current_dir(work)
            .env("APT_CONFIG", &conf),
    )
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
