//! Finding and entering the network namespaces that processes of a cgroup
//! subtree use.
//!
//! setns(2) changes only the calling thread, and a thread in a foreign
//! namespace would open every later socket there; so the work runs on a
//! short-lived thread of its own, never on a runtime worker.

use std::{
    collections::HashSet,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use procfs::{ProcError, process::Process};

/// Runs `f` on a new thread that first joins the network namespace `ns` (an
/// open `/proc/<pid>/ns/net` or a bind-mounted netns file) with
/// setns(CLONE_NEWNET). Only that thread changes namespace and it ends with
/// `f`; the caller's threads never move. A panic in `f` reaches the caller.
pub fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let joined = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on a descriptor that `ns` keeps open for the
            // whole scope; it affects only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
    });
    match joined {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            // The namespace's inode is how the kernel names it ("net:[ino]").
            let name = match ns.metadata() {
                Ok(m) => format!("net:[{}]", m.ino()),
                Err(_) => format!("fd {}", ns.as_raw_fd()),
            };
            Err(io::Error::new(
                e.kind(),
                format!("setns(CLONE_NEWNET) into {name}: {e}"),
            ))
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The network namespaces used by processes in cgroup directory `root` and
/// every cgroup below it: one open `/proc/<pid>/ns/net` per distinct
/// namespace, keyed by the namespace file's inode.
///
/// Processes that exit, and cgroups removed, while we look are skipped
/// silently; `root` itself must exist. Other errors name their path, among
/// them EACCES for a process we may not inspect: opening another user's (or
/// a more capable process's) namespace file takes CAP_SYS_PTRACE.
///
/// Each process counts with its main thread's namespace; a thread that
/// moved itself elsewhere with setns or unshare is not seen.
#[cfg(test)]
pub fn netns_below(root: &Path) -> io::Result<Vec<(u64, File)>> {
    let dirs = crate::cgroup::subtree::walk(root)?;
    netns_of(dirs.iter().map(|c| c.path.as_path()), &mut |e| Err(e))
}

/// The namespaces of the processes in the cgroup directories `dirs` (each
/// one's `cgroup.procs`, not below it), one open file per namespace. A
/// process whose namespace we may not open (EACCES, EPERM) goes to `denied`
/// instead of failing the whole walk; `denied` decides by returning an
/// error or not. Cgroups and processes that go away meanwhile are skipped.
pub fn netns_of<'a>(
    dirs: impl IntoIterator<Item = &'a Path>,
    denied: &mut dyn FnMut(io::Error) -> io::Result<()>,
) -> io::Result<Vec<(u64, File)>> {
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    for dir in dirs {
        let procs = dir.join("cgroup.procs");
        let pids = match std::fs::read_to_string(&procs) {
            Ok(pids) => pids,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(at("read", &procs, e)),
        };
        for line in pids.lines() {
            let pid = line.trim().parse::<i32>().ok().filter(|&p| p >= 0);
            let Some(pid) = pid else {
                let e = io::Error::new(io::ErrorKind::InvalidData, format!("not a pid: {line:?}"));
                return Err(at("read", &procs, e));
            };
            // A pid outside our pid namespace reads as 0 (task_pid_vnr):
            // it has no /proc entry here.
            if pid == 0 {
                continue;
            }
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            // Open first, then stat the open file: keying by a path's stat
            // would race with the pid being reused. procfs opens ns/net
            // relative to the /proc/<pid> directory it holds open.
            let ns = match Process::new(pid).and_then(|p| p.open_relative("ns/net")) {
                Ok(ns) => ns,
                // Exited, a zombie (its namespaces already released: ENOENT)
                // or reaped during the open (ESRCH).
                Err(ProcError::NotFound(_)) => continue,
                // EACCES or EPERM.
                Err(ProcError::PermissionDenied(_)) => {
                    let e = io::Error::from(io::ErrorKind::PermissionDenied);
                    denied(at("open", &path, e))?;
                    continue;
                }
                Err(e) => return Err(at("open", &path, proc_io_error(e))),
            };
            let ino = ns.metadata().map_err(|e| at("stat", &path, e))?.ino();
            if seen.insert(ino) {
                found.push((ino, ns));
            }
        }
    }
    Ok(found)
}

/// Whether `e` means the cgroup went away meanwhile: ENOENT for a removed
/// cgroup, ENODEV for one being removed.
fn vanished(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV))
}

/// procfs's error as an `io::Error`, keeping the errno where there is one.
fn proc_io_error(e: ProcError) -> io::Error {
    match e {
        ProcError::Io(e, _) => e,
        e => io::Error::other(e),
    }
}

fn at(op: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// This process's cgroup v2 directory: the cgroup2 mount point plus our
    /// `0::` path, relative to the mount's root.
    pub(crate) fn own_cgroup_dir() -> PathBuf {
        let mount = crate::cgroup::mount::primary_cgroup2_mount().unwrap();
        let cgroups = Process::myself().unwrap().cgroups().unwrap();
        let path = cgroups
            .into_iter()
            .find(|c| c.hierarchy == 0)
            .expect("no cgroup v2 line in /proc/self/cgroup")
            .pathname;
        let rel = Path::new(&path);
        let rel = rel.strip_prefix(&mount.root).unwrap_or(rel);
        mount.mount_point.join(rel.strip_prefix("/").unwrap_or(rel))
    }

    /// The cgroup v2 id is the inode number of the cgroup's directory.
    pub(crate) fn own_cgroup_id() -> u64 {
        std::fs::metadata(own_cgroup_dir()).unwrap().ino()
    }

    fn thread_netns_ino() -> u64 {
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    /// A new, empty network namespace, made on a throwaway thread so no
    /// other thread moves; the open file keeps it alive.
    fn new_netns() -> File {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) affects only this thread, which ends here.
            assert_eq!(
                unsafe { libc::unshare(libc::CLONE_NEWNET) },
                0,
                "{}",
                io::Error::last_os_error()
            );
            File::open("/proc/thread-self/ns/net").unwrap()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn in_netns_runs_in_the_namespace_and_leaves_the_caller() {
        let before = thread_netns_ino();
        let ns = new_netns();
        let ns_ino = ns.metadata().unwrap().ino();
        assert_ne!(
            ns_ino,
            std::fs::metadata("/proc/self/ns/net").unwrap().ino()
        );
        assert_eq!(in_netns(&ns, thread_netns_ino).unwrap(), ns_ino);
        assert_eq!(thread_netns_ino(), before);
    }

    #[test]
    fn in_netns_names_the_namespace_it_could_not_join() {
        // A UTS namespace file is a namespace, but not a network one.
        let uts = File::open("/proc/self/ns/uts").unwrap();
        let ino = uts.metadata().unwrap().ino();
        let e = in_netns(&uts, || ()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains(&format!("net:[{ino}]")), "{e}");
    }

    #[test]
    #[should_panic(expected = "inside")]
    fn in_netns_passes_panics_on() {
        in_netns(&File::open("/proc/self/ns/net").unwrap(), || {
            panic!("inside")
        })
        .unwrap();
    }

    /// A cgroup below our own with a nested child, holding `sleep`
    /// processes; dropping it kills them and removes both cgroups.
    struct TestCgroup {
        dir: PathBuf,
        children: Vec<std::process::Child>,
    }

    impl TestCgroup {
        /// Starts `sleep` in cgroup `sub` (relative to ours), in a new network
        /// namespace if `new_netns`; returns the namespace's inode.
        fn sleeper(&mut self, sub: &str, new_netns: bool) -> u64 {
            use std::os::unix::process::CommandExt as _;
            let mut cmd = std::process::Command::new("sleep");
            cmd.arg("60");
            if new_netns {
                // SAFETY: the hook only calls unshare(2), which is
                // async-signal-safe, between fork and exec.
                unsafe {
                    cmd.pre_exec(|| match libc::unshare(libc::CLONE_NEWNET) {
                        0 => Ok(()),
                        _ => Err(io::Error::last_os_error()),
                    })
                };
            }
            let child = cmd.spawn().unwrap();
            let pid = child.id();
            self.children.push(child);
            std::fs::write(self.dir.join(sub).join("cgroup.procs"), pid.to_string()).unwrap();
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .unwrap()
                .ino()
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_dir(self.dir.join("nested"));
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    #[test]
    fn netns_below_finds_each_namespace_of_a_subtree_once() {
        let dir = own_cgroup_dir().join(format!("imdsguard-netns-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("nested")).unwrap();
        let mut cg = TestCgroup {
            dir,
            children: Vec::new(),
        };
        let ours = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(cg.sleeper(".", false), ours);
        assert_eq!(cg.sleeper("nested", false), ours);
        let theirs = cg.sleeper("nested", true);
        assert_ne!(theirs, ours);

        let found = netns_below(&cg.dir).unwrap();
        let mut inos: Vec<u64> = found.iter().map(|(ino, _)| *ino).collect();
        inos.sort_unstable();
        assert_eq!(inos, {
            let mut v = vec![ours, theirs];
            v.sort_unstable();
            v
        });
        for (ino, file) in &found {
            assert_eq!(file.metadata().unwrap().ino(), *ino);
        }
    }

    #[test]
    fn netns_below_names_a_missing_root() {
        let root = Path::new("/nonexistent/imdsguard-test-cgroup");
        let e = netns_below(root).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(
            e.to_string()
                .contains("stat /nonexistent/imdsguard-test-cgroup:"),
            "{e}"
        );
    }
}
