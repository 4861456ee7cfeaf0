//! The node's cgroup root: a cgroup of its own in every hierarchy, swept
//! when a crashed run left one, and killed and removed at teardown.

use super::*;

/// A cgroup named after kubelet's `--cgroup-root`, in every hierarchy: each
/// cgroup v1 controller and the unified one. The node's daemons run in its
/// `system` child of the unified hierarchy, so one `cgroup.kill` ends them,
/// their shims and every container at once.
pub struct CgroupRoot {
    name: String,
    /// `<mount>/<name>` for every hierarchy, the unified one last.
    dirs: Vec<PathBuf>,
    unified: PathBuf,
}

impl CgroupRoot {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let info = fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
        let mut v1 = Vec::new();
        let mut unified = None;
        for line in info.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(dash) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(point), Some(fstype)) = (fields.get(4), fields.get(dash + 1)) else {
                continue;
            };
            match *fstype {
                "cgroup" => v1.push(PathBuf::from(unescape_mountinfo(point))),
                "cgroup2" => unified = Some(PathBuf::from(unescape_mountinfo(point))),
                _ => {}
            }
        }
        let unified = unified.context("no cgroup v2 mount in /proc/self/mountinfo")?;
        v1.sort();
        v1.dedup();
        sweep_stale(&v1, &unified, name)?;
        let mut me = Self {
            name: name.to_owned(),
            dirs: Vec::new(),
            unified: unified.join(name),
        };
        for mount in v1.iter().chain(std::iter::once(&unified)) {
            let dir = mount.join(name);
            fs::create_dir(&dir).with_context(|| format!("create cgroup {}", dir.display()))?;
            me.dirs.push(dir.clone());
            // A new cpuset cgroup has no CPUs and no memory nodes until
            // someone copies its parent's.
            if mount.join("cpuset.cpus").exists() {
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let value = fs::read_to_string(mount.join(file))?;
                    fs::write(dir.join(file), value.trim())
                        .with_context(|| format!("write {}", dir.join(file).display()))?;
                }
            }
        }
        fs::create_dir(me.system()).context("create the system cgroup")?;
        Ok(me)
    }

    /// kubelet's `--cgroup-root`.
    pub fn kubelet_root(&self) -> String {
        format!("/{}", self.name)
    }

    /// The unified-hierarchy directory of the root.
    pub fn unified(&self) -> &Path {
        &self.unified
    }

    /// Where the node's daemons run.
    pub fn system(&self) -> PathBuf {
        self.unified.join("system")
    }

    /// Kills every process below the root (daemons, shims, containers) and
    /// waits until none is left.
    pub fn kill_all(&self) -> anyhow::Result<()> {
        fs::write(self.unified.join("cgroup.kill"), "1").context("write cgroup.kill")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let events = fs::read_to_string(self.unified.join("cgroup.events"))?;
            if events.lines().any(|l| l == "populated 0") {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "processes left in {} after cgroup.kill",
                self.unified.display()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes the root and everything kubelet and runc made below it, in
    /// every hierarchy. Needs [`CgroupRoot::kill_all`] first.
    pub fn remove(&mut self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        for dir in self.dirs.drain(..) {
            if let Err(e) = remove_cgroup_tree(&dir) {
                errors.push(format!("{}: {e:#}", dir.display()));
            }
        }
        ensure!(errors.is_empty(), "{}", errors.join("; "));
        Ok(())
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        if self.dirs.is_empty() {
            return;
        }
        if let Err(e) = self.kill_all() {
            eprintln!("real node: {e:#}");
        }
        if let Err(e) = self.remove() {
            eprintln!("real node: remove cgroups: {e:#}");
        }
    }
}

/// Removes what an earlier run that was killed outright (no Drop ran) left:
/// cgroup roots named like ours whose creating process is gone. Their
/// processes (shims, containers) are killed first.
fn sweep_stale(v1: &[PathBuf], unified: &Path, name: &str) -> anyhow::Result<()> {
    // Our names are `<prefix>-<pid>-<n>-<nanos>` (crate::unique).
    let prefix = name.split('-').take(2).collect::<Vec<_>>().join("-") + "-";
    for entry in fs::read_dir(unified)?.flatten() {
        let stale = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("real node: removing the stale cgroup root {stale} of a killed run");
        let _ = fs::write(unified.join(&stale).join("cgroup.kill"), "1");
        thread::sleep(Duration::from_millis(200));
        for mount in v1
            .iter()
            .map(PathBuf::as_path)
            .chain(std::iter::once(unified))
        {
            remove_cgroup_tree(&mount.join(&stale))?;
        }
    }
    Ok(())
}

/// Removes a cgroup and its children, deepest first. A v1 cgroup can stay
/// busy for a moment after its last task died, so each rmdir is retried.
fn remove_cgroup_tree(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
        }
    }
}

/// Writes "0" to `procs` (a `cgroup.procs` file opened before the fork),
/// moving the calling process: for a `pre_exec` hook.
pub(crate) fn join_cgroup_hook(procs: &fs::File) -> impl FnMut() -> io::Result<()> + use<> {
    use std::os::fd::AsRawFd as _;
    let fd = procs.as_raw_fd();
    move || {
        // SAFETY: write(2) on an fd that the parent keeps open until the
        // child has exec'd; async-signal-safe, no allocation.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Opens `cgroup.procs` of `dir` for [`join_cgroup_hook`].
pub(crate) fn open_procs(dir: &Path) -> anyhow::Result<fs::File> {
    let path = dir.join("cgroup.procs");
    fs::File::options()
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))
}
