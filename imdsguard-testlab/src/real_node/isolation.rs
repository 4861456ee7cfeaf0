//! What keeps a real node off the host: a private mount and network
//! namespace for the whole test process, tmpfs over every host path that
//! kubelet and containerd write to, the global sysctls kubelet changes, and
//! a cgroup root of the node's own in every hierarchy.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use std::sync::OnceLock;

use anyhow::{Context as _, bail, ensure};
use imdsguard::cgroup::mount::unescape_mountinfo;

mod cgroup_root;

pub use cgroup_root::CgroupRoot;
pub(crate) use cgroup_root::{join_cgroup_hook, open_procs};

/// Moves this process into a new mount namespace and a new network
/// namespace, before any thread exists: `unshare` works per thread, and
/// every thread and child started later inherits both.
///
/// The network namespace has only `lo`; nothing routes out of it. Every
/// mount below `/` becomes private first, so no mount made here (kubelet's
/// volumes, containerd's rootfs, our tmpfs and bpffs) propagates to the
/// host, and all of them vanish with the namespace, whatever happens to
/// this process.
pub fn isolate() -> anyhow::Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .map(str::trim);
    ensure!(
        threads == Some("1"),
        "isolate() must run before any thread starts (threads: {threads:?})"
    );
    // SAFETY: unshare has no memory preconditions; the process is single
    // threaded, so it moves the whole process.
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWNET) } != 0 {
        bail!(
            "unshare(CLONE_NEWNS | CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
    }
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .context("make every mount private in the node's mount namespace")?;
    // Then the root mount alone becomes shared again, in a peer group of
    // this namespace's own, as systemd leaves `/` on a real node. Without
    // it, a hostPath below a symlink (the chart's /var/run/netns, where
    // /var/run -> /run) resolves to the mount `/`, and its
    // `mountPropagation: HostToContainer` is refused ("is mounted on / but
    // it is not a shared or slave mount").
    mount(None, Path::new("/"), None, libc::MS_SHARED, None)
        .context("make / shared in the node's mount namespace")?;
    crate::process::run(std::process::Command::new("ip").args(["link", "set", "lo", "up"]))?;
    stop_node_on_signals()
}

/// The unified-hierarchy root of the running node, for the signal thread.
static SIGNAL_TARGET: OnceLock<PathBuf> = OnceLock::new();

/// SIGINT, SIGTERM and SIGHUP end the node rather than this process: a
/// thread waits for them and kills every process of the node with
/// `cgroup.kill`. The test then fails at its next step, and the usual Drop
/// teardown undoes the rest (mounts, cgroups, host paths, sysctls), which
/// an ordinary death by signal would leave behind. Before the node has a
/// cgroup there is nothing to undo, and the signal ends the process.
///
/// The signals are blocked in every thread (it runs before any exists), so
/// only the waiting thread sees them; [`crate::process::spawn_logged`]
/// unblocks them in the node's daemons.
fn stop_node_on_signals() -> anyhow::Result<()> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises; the
    // calls have no other preconditions.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("pthread_sigmask: {}", io::Error::from_raw_os_error(rc));
        }
        set
    };
    thread::Builder::new()
        .name("node-signals".into())
        .spawn(move || {
            loop {
                let mut sig = 0;
                // SAFETY: `set` is initialised and `sig` is a valid out
                // pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                match SIGNAL_TARGET.get() {
                    Some(root) => {
                        eprintln!(
                            "real node: signal {sig}: killing the node; the teardown follows"
                        );
                        let _ = fs::write(root.join("cgroup.kill"), "1");
                    }
                    None => std::process::exit(128 + sig),
                }
            }
        })
        .context("start the signal thread")?;
    Ok(())
}

/// Where the signal thread sends `cgroup.kill`: the node's cgroup root.
pub(crate) fn set_signal_target(unified_root: &Path) {
    let _ = SIGNAL_TARGET.set(unified_root.to_owned());
}

/// Fails unless this process runs in a network namespace with no route
/// out: no default route, IPv4 or IPv6.
pub fn assert_no_route_out() -> anyhow::Result<()> {
    for family in ["-4", "-6"] {
        let routes = crate::process::run(
            std::process::Command::new("ip").args([family, "route", "show", "default"]),
        )?;
        ensure!(
            routes.trim().is_empty(),
            "the node's network namespace has a default route ({family}): {routes}"
        );
    }
    Ok(())
}

pub(crate) fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> anyhow::Result<()> {
    let c = |s: &str| CString::new(s).context("a NUL in a mount argument");
    let source = source.map(c).transpose()?;
    let fstype = fstype.map(c).transpose()?;
    let data = data.map(c).transpose()?;
    let target_c = CString::new(target.as_os_str().as_bytes()).context("a NUL in a path")?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a valid NUL-terminated string or null, and
    // lives across the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc != 0 {
        bail!("mount {}: {}", target.display(), io::Error::last_os_error());
    }
    Ok(())
}

fn umount(target: &Path) -> io::Result<()> {
    let c = CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path. MNT_DETACH: a busy mount goes
    // as soon as its last user does.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Every mount point at or below `dir` in this mount namespace, deepest
/// first.
pub fn mounts_below(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let info = procfs_mountinfo()?;
    let mut found: Vec<PathBuf> = info.into_iter().filter(|p| p.starts_with(dir)).collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

fn procfs_mountinfo() -> anyhow::Result<Vec<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect())
}

/// Unmounts everything at or below `dir`, deepest first, and checks that
/// nothing is left: removing a directory with a mount below it could
/// delete what the mount shows.
pub fn unmount_all_below(dir: &Path) -> anyhow::Result<()> {
    for _ in 0..5 {
        let left = mounts_below(dir)?;
        if left.is_empty() {
            return Ok(());
        }
        for m in left {
            if let Err(e) = umount(&m)
                && e.raw_os_error() != Some(libc::EINVAL)
                && e.raw_os_error() != Some(libc::ENOENT)
            {
                eprintln!("real node: umount {}: {e}", m.display());
            }
        }
    }
    let left = mounts_below(dir)?;
    ensure!(
        left.is_empty(),
        "mounts still below {}: {left:?}",
        dir.display()
    );
    Ok(())
}

/// Host paths that kubelet and containerd 1.20/1.6 write to whatever their
/// flags say (shared/real-node.md lists them). Each gets a tmpfs in the
/// node's mount namespace, so nothing is written to the host; a directory
/// that did not exist is created as the mount point and removed at the end.
pub const HOST_PATHS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/usr/libexec/kubernetes",
    "/var/lib/cni",
    // /var/run is a symlink to /run: mountinfo names the real path, so
    // these are written as such.
    "/run/kubernetes",
    "/run/containerd",
    // Shared, so that the pods' network namespaces that containerd mounts
    // here reach the agent's HostToContainer hostPath (revocation).
    "/run/netns",
];

/// The tmpfs mounts over [`HOST_PATHS`] and the private bpffs, and the
/// host directories made for them.
pub struct HostPaths {
    created: Vec<PathBuf>,
    mounted: Vec<PathBuf>,
}

impl HostPaths {
    /// Must run after [`isolate`]: the mounts are then private to the node.
    pub fn cover() -> anyhow::Result<Self> {
        let mut me = Self {
            created: Vec::new(),
            mounted: Vec::new(),
        };
        for path in HOST_PATHS.iter().map(Path::new) {
            me.create_dir(path)?;
            let path =
                &fs::canonicalize(path).with_context(|| format!("resolve {}", path.display()))?;
            mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some("mode=755"),
            )?;
            me.mounted.push(path.to_owned());
        }
        mount(None, Path::new("/run/netns"), None, libc::MS_SHARED, None)
            .context("make /run/netns shared")?;
        // A bpffs of the node's own: every mount of bpffs is a new instance,
        // so the agent's pins live and die with this namespace. Shared, as
        // the chart's `mountPropagation: HostToContainer` requires.
        let bpffs = Path::new("/sys/fs/bpf");
        mount(Some("bpffs"), bpffs, Some("bpf"), 0, Some("mode=700"))
            .context("mount a private bpffs on /sys/fs/bpf")?;
        me.mounted.push(bpffs.to_owned());
        mount(None, bpffs, None, libc::MS_SHARED, None).context("make /sys/fs/bpf shared")?;
        Ok(me)
    }

    /// Creates `path` and its missing parents, remembering the topmost.
    fn create_dir(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut top = None;
        let mut p = path;
        while !p.exists() {
            top = Some(p.to_owned());
            p = p
                .parent()
                .context("a host path without an existing parent")?;
        }
        if let Some(top) = top {
            fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
            self.created.push(top);
        }
        Ok(())
    }

    /// Unmounts and removes the directories made for the mounts; they are
    /// empty, since everything was written to the tmpfs.
    pub fn release(&mut self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        for m in self.mounted.drain(..).rev() {
            if let Err(e) = unmount_all_below(&m) {
                errors.push(format!("{e:#}"));
            }
        }
        for dir in self.created.drain(..).rev() {
            // Only empty directories: a mount point we made and its empty
            // parents. remove_dir refuses anything with content.
            if let Err(e) = remove_empty_tree(&dir) {
                errors.push(format!("remove {}: {e}", dir.display()));
            }
        }
        ensure!(errors.is_empty(), "{}", errors.join("; "));
        Ok(())
    }
}

impl Drop for HostPaths {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("real node: host paths: {e:#}");
        }
    }
}

/// Removes a tree of empty directories (never a file).
fn remove_empty_tree(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_empty_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

/// The global sysctls kubelet sets at start (kernel.panic 1→10,
/// kernel.panic_on_oops 0→1, vm.overcommit_memory 0→1, and the rest of its
/// `setupKernelTunables` list). Network sysctls live in the node's
/// namespace and go with it.
pub const KUBELET_SYSCTLS: &[&str] = &[
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// The values of [`KUBELET_SYSCTLS`] before the node started, written back
/// on drop.
pub struct Sysctls(Vec<(PathBuf, String)>);

impl Sysctls {
    pub fn save() -> anyhow::Result<Self> {
        let saved = KUBELET_SYSCTLS
            .iter()
            .map(|name| {
                let path = Path::new("/proc/sys").join(name);
                fs::read_to_string(&path)
                    .with_context(|| format!("read {}", path.display()))
                    .map(|v| (path, v.trim().to_owned()))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self(saved))
    }

    pub fn restore(&self) -> anyhow::Result<()> {
        for (path, value) in &self.0 {
            let now = fs::read_to_string(path).unwrap_or_default();
            if now.trim() != value {
                fs::write(path, value).with_context(|| format!("restore {}", path.display()))?;
            }
        }
        Ok(())
    }
}

impl Drop for Sysctls {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("real node: {e:#}");
        }
    }
}
