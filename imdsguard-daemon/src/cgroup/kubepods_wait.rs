//! Waiting for the kubepods cgroup when the agent starts before it exists.
//!
//! On a hybrid cgroup host, kubelet 1.20 (through its vendored runc)
//! creates the QoS and pod cgroups only in the v1 hierarchies. runc 1.1
//! puts each container into the unified (v2) hierarchy too, at the same
//! path, and creates the missing parents on the way. So the unified
//! kubepods directory appears only with the node's first container. An
//! agent that runs as a host process (`imdsguard node` from a unit file)
//! can start before that. One that runs as a pod cannot: its own pod's
//! containers create the directory before it runs.
//!
//! Such an agent waits instead of exiting. It watches with inotify the
//! directories the kubepods cgroup can appear in, looks again after every
//! event, and attaches as soon as the directory is there. While it waits,
//! nothing is attached, `/readyz` answers 503 and a startup taint stays on
//! the node.
//!
//! Why the window is harmless: on a hybrid host every container process
//! runs below the unified kubepods directory, so while it does not exist no
//! pod process exists to judge. The first container runc creates on a node
//! is a pod sandbox's pause process, and pause makes no connections. The
//! agent attaches within milliseconds of the inotify event, while kubelet
//! is still setting up that sandbox's network, before it creates any app
//! container. The programs judge every `connect()` from the moment they
//! are attached, including those of processes that were already running.
//!
//! Given or discovered:
//! - `--kubepods-root PATH`: exactly that path is awaited. Its name must
//!   already tell the cgroup driver, so a misspelt name fails at once, and
//!   its nearest existing ancestor must be on cgroup v2 (the agent checks
//!   that before waiting), so a path on a v1 or tmpfs mount fails at once
//!   too. Only that ancestor is watched; as missing parents appear the
//!   watch moves down to them. A path that kubelet never creates is waited
//!   for forever: the log line says which path, and the agent never
//!   becomes ready.
//! - Discovered: the directories that discovery searches (the cgroup v2
//!   mount and everything down to
//!   [`DISCOVER_MAX_DEPTH`](crate::cgroup::discover::DISCOVER_MAX_DEPTH) levels, except
//!   pod cgroups) are watched. The first kubepods directory to appear is
//!   used. If two appear at once, the agent exits, as at start, because it
//!   cannot tell which one belongs to this node's kubelet.
//!
//! A host without any cgroup v2 mount is still an error at start: there is
//! nothing to wait for.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt as _;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use crate::cgroup::{
    discover::scan,
    pod::{KubepodsLayout, PodCgroupError},
};
use crate::{cgroup::mount::CGROUP2_SUPER_MAGIC, cgroup::mount::primary_cgroup2_mount};

/// Where the kubepods cgroup is expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kubepods {
    /// `--kubepods-root`: this directory.
    Given(PathBuf),
    /// Discovered below this cgroup v2 mount point.
    Discover(PathBuf),
}

impl Kubepods {
    /// Where to look, for `--kubepods-root` (None: discover). A root that
    /// does not exist yet is only worth waiting for if it can appear in the
    /// unified hierarchy, so its nearest existing ancestor must be on
    /// cgroup v2; and a host without any cgroup v2 mount is refused either
    /// way.
    pub fn of(kubepods_root: Option<&Path>) -> crate::Result<Self> {
        let mount = primary_cgroup2_mount()?;
        let Some(root) = kubepods_root else {
            return Ok(Kubepods::Discover(mount.mount_point));
        };
        if root.symlink_metadata().is_err() {
            let ancestor = nearest_existing(root);
            let magic = crate::bpf::sys::statfs_magic(&ancestor)?;
            if magic != CGROUP2_SUPER_MAGIC {
                return Err(crate::Error::KubepodsNotOnCgroup2 {
                    root: root.into(),
                    ancestor,
                    magic,
                });
            }
        }
        Ok(Kubepods::Given(root.into()))
    }

    /// What the log calls it.
    pub fn describe(&self) -> String {
        match self {
            Kubepods::Given(p) => p.display().to_string(),
            Kubepods::Discover(m) => format!("(discovered below {})", m.display()),
        }
    }
}

/// What one look found.
enum Look {
    Found(KubepodsLayout),
    /// Not there yet; it would appear in one of these directories.
    Absent(Vec<PathBuf>),
}

/// The nearest ancestor of `path` (or `path` itself) that exists.
pub fn nearest_existing(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.symlink_metadata().is_ok())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

fn look(k: &Kubepods) -> Result<Look, PodCgroupError> {
    match k {
        Kubepods::Given(root) => {
            if root.symlink_metadata().is_ok() {
                return KubepodsLayout::at(root).map(Look::Found);
            }
            // Refuse a name that tells no driver now, not once it appears.
            KubepodsLayout::named(root)?;
            Ok(Look::Absent(vec![nearest_existing(root)]))
        }
        Kubepods::Discover(mount) => {
            let scan = scan(mount)?;
            if scan.found.is_empty() {
                Ok(Look::Absent(scan.listed))
            } else {
                scan.verdict(mount).map(Look::Found)
            }
        }
    }
}

/// How often to look again without an event: a backstop for events the
/// watch cannot see (an overflowed queue, a directory replaced between a
/// look and its watch).
const RELOOK: Duration = Duration::from_secs(10);

/// Finds the kubepods cgroup, waiting for it to appear if it is not there
/// yet. `waiting` is called once, with the watched directories, just
/// before the first wait; it is not called when the cgroup is there.
pub async fn find(
    k: &Kubepods,
    mut waiting: impl FnMut(&[PathBuf]),
) -> Result<KubepodsLayout, PodCgroupError> {
    let dirs = match look(k)? {
        Look::Found(layout) => return Ok(layout),
        Look::Absent(dirs) => dirs,
    };
    let io_err = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| PodCgroupError::Io { op, path, source }
    };
    let inotify = Inotify::init().map_err(io_err("inotify_init", &dirs[0]))?;
    let mut events = inotify
        .into_event_stream(vec![0u8; 4096])
        .map_err(io_err("inotify_init", &dirs[0]))?;
    let mask = WatchMask::CREATE
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR;
    let mut watched: HashMap<PathBuf, WatchDescriptor> = HashMap::new();
    let mut announced = false;
    let mut next = Some(dirs);
    loop {
        let dirs = match next.take() {
            Some(d) => d,
            None => match look(k)? {
                Look::Found(layout) => return Ok(layout),
                Look::Absent(dirs) => dirs,
            },
        };
        // Watches first, then look again: what appears between our look
        // and a watch is seen by that second look, what appears after it
        // raises an event.
        let mut added = false;
        for d in &dirs {
            if watched.contains_key(d) {
                continue;
            }
            match events.watches().add(d, mask) {
                Ok(wd) => {
                    watched.insert(d.clone(), wd);
                    added = true;
                }
                // Gone since the look: look again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => added = true,
                Err(e) => return Err(io_err("watch (inotify)", d)(e)),
            }
        }
        // A given root's watch moves down as its parents appear.
        let stale: Vec<PathBuf> = watched
            .keys()
            .filter(|p| !dirs.contains(p))
            .cloned()
            .collect();
        for p in stale {
            if let Some(wd) = watched.remove(&p) {
                // Fails only when the kernel already dropped it.
                let _ = events.watches().remove(wd);
            }
        }
        if added {
            continue;
        }
        if !announced {
            waiting(&dirs);
            announced = true;
        }
        match tokio::time::timeout(RELOOK, events.next()).await {
            Ok(Some(Ok(event))) => {
                if event.mask.contains(EventMask::IGNORED) {
                    watched.retain(|_, wd| *wd != event.wd);
                }
            }
            Ok(Some(Err(e))) => return Err(io_err("read inotify events", &dirs[0])(e)),
            Ok(None) => {
                return Err(io_err("read inotify events", &dirs[0])(io::Error::from(
                    io::ErrorKind::UnexpectedEof,
                )));
            }
            Err(_elapsed) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;
    use crate::cgroup::pod::CgroupDriver;

    const UID: &str = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b";

    struct Tree(PathBuf);

    impl Tree {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let root = std::env::temp_dir().join(format!(
                "imdsguard-kubepods-wait-{}-{n}",
                std::process::id()
            ));
            fs::create_dir_all(&root).unwrap();
            Tree(root)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Runs `find` until it has announced its wait, then `act`, then
    /// returns what `find` found (within 5 s) and the watched directories.
    fn wait_then(k: Kubepods, act: impl FnOnce()) -> (KubepodsLayout, Vec<PathBuf>) {
        rt().block_on(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut tx = Some(tx);
            let task = tokio::spawn(async move {
                find(&k, |dirs| {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(dirs.to_vec());
                    }
                })
                .await
            });
            let watched = rx.await.expect("find announced a wait");
            act();
            let layout = tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("found within 5 s (not by the 10 s backstop)")
                .unwrap()
                .unwrap();
            (layout, watched)
        })
    }

    #[test]
    fn a_given_root_is_awaited_below_its_nearest_ancestor() {
        let t = Tree::new();
        let root = t.0.join("kubelet/kubepods");
        let (layout, watched) = wait_then(Kubepods::Given(root.clone()), || {
            // runc creates the parents and the pod's path in one go.
            fs::create_dir_all(root.join(format!("besteffort/pod{UID}"))).unwrap();
        });
        assert_eq!(watched, vec![t.0.clone()]);
        assert_eq!(
            (layout.root(), layout.driver()),
            (root.as_path(), CgroupDriver::Cgroupfs)
        );
    }

    #[test]
    fn a_given_root_is_followed_down_parent_by_parent() {
        let t = Tree::new();
        let root = t.0.join("a/b/kubepods.slice");
        let (layout, _) = wait_then(Kubepods::Given(root.clone()), || {
            for p in ["a", "a/b"] {
                fs::create_dir(t.0.join(p)).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
            fs::create_dir(&root).unwrap();
        });
        assert_eq!(layout.root(), root);
    }

    #[test]
    fn a_discovered_root_is_awaited_in_every_searched_directory() {
        let t = Tree::new();
        fs::create_dir_all(t.0.join("system.slice/containerd.service")).unwrap();
        let (layout, watched) = wait_then(Kubepods::Discover(t.0.clone()), || {
            fs::create_dir_all(t.0.join(format!("rn1/kubepods/besteffort/pod{UID}"))).unwrap();
        });
        assert!(watched.contains(&t.0.join("system.slice")), "{watched:?}");
        assert_eq!(layout.root(), t.0.join("rn1/kubepods"));
    }

    #[test]
    fn present_roots_are_not_awaited_and_bad_names_not_at_all() {
        let t = Tree::new();
        fs::create_dir(t.0.join("kubepods")).unwrap();
        let found = rt()
            .block_on(find(&Kubepods::Given(t.0.join("kubepods")), |_| {
                panic!("no wait for a root that exists")
            }))
            .unwrap();
        assert_eq!(found.root(), t.0.join("kubepods"));
        let e = rt()
            .block_on(find(&Kubepods::Given(t.0.join("missing/pods")), |_| {
                panic!("a name without a driver is refused, not awaited")
            }))
            .unwrap_err();
        assert!(matches!(e, PodCgroupError::UnknownDriver { .. }), "{e:?}");
        let e = rt()
            .block_on(find(&Kubepods::Discover(t.0.join("no-mount")), |_| {
                panic!("a missing mount is an error, not awaited")
            }))
            .unwrap_err();
        assert!(matches!(e, PodCgroupError::Io { op: "read", .. }), "{e:?}");
        assert_eq!(nearest_existing(&t.0.join("x/y/z")), t.0);
    }
}
