//! One sweep: find the connections to protected destinations whose owner
//! cgroup is now denied, in every network namespace used below the judged
//! root, and destroy them.
//!
//! A socket's owner is the cgroup that created it (INET_DIAG_CGROUP_ID),
//! the same cgroup whose programs judged its connect(). Sockets owned
//! outside the judged subtree (host processes) are never touched.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    netns::{in_netns, netns_of},
    sock_diag::{Destroyed, DiagSocket, SockDiag},
};
use crate::{
    bpf::{
        allow_walk::deepest_entry,
        enforcer::{AllowTarget, MapState, Mode},
    },
    cgroup::mount::CgroupDir,
    cgroup::subtree,
    destinations::Compiled,
    vocabulary::{Action, Protocol},
};

/// What the maps enforce, as the sweep judges sockets by it: the allow
/// entries, the default, and the protected set.
#[derive(Clone, Debug)]
pub struct EnforcedState {
    pub allowed: BTreeMap<u64, AllowTarget>,
    pub mode: Mode,
    pub destinations: Compiled,
}

impl EnforcedState {
    /// The policy the maps hold, once the allow set is known: None before
    /// the first full sync, when nothing may be revoked.
    pub fn of(desired: &MapState) -> Option<Self> {
        Some(Self {
            allowed: desired.allowed.clone()?,
            mode: desired.mode,
            destinations: desired.destinations.clone(),
        })
    }
}

/// The judged subtree as the kernel names it: cgroup id to parent id, and
/// the directories (whose processes' namespaces the sweep enters).
pub struct JudgedSubtree {
    root: u64,
    /// The root's absolute level: the allow entries' levels are absolute.
    root_level: u32,
    parent: HashMap<u64, u64>,
    dirs: Vec<PathBuf>,
}

impl JudgedSubtree {
    /// One walk of `root` on cgroupfs.
    pub fn read(root: &CgroupDir) -> io::Result<Self> {
        let cgroups = subtree::walk(&root.path)?;
        Ok(Self {
            root: root.id,
            root_level: root.level,
            parent: cgroups.iter().skip(1).map(|c| (c.id, c.parent)).collect(),
            dirs: cgroups.into_iter().map(|c| c.path).collect(),
        })
    }

    /// The action the programs apply to a socket owned by `cgroup_id`: the
    /// deepest allow entry on its path, or the default, found by the
    /// kernel's walk over the level window the sync writes for these
    /// entries. None when the cgroup is not in the judged subtree.
    pub fn action_of(&self, cgroup_id: u64, enforced: &EnforcedState) -> Option<Action> {
        // The path from the root down to the cgroup: path[i] is at
        // absolute level root_level + i.
        let mut path = vec![cgroup_id];
        let mut id = cgroup_id;
        while id != self.root {
            id = *self.parent.get(&id)?;
            path.push(id);
        }
        path.reverse();
        let levels = enforced.allowed.values().map(|t| t.level);
        let (min_level, max_level) = (levels.clone().min(), levels.max());
        let found = deepest_entry(
            min_level.unwrap_or(1),
            max_level.unwrap_or(0),
            |level| {
                let depth = level.checked_sub(self.root_level)?;
                path.get(depth as usize).copied()
            },
            |id| enforced.allowed.get(&id).map(|t| t.action),
        );
        Some(found.map_or(enforced.mode.action(), |f| f.entry))
    }
}

/// One destroyed connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Revoked {
    pub cgroup_id: u64,
    pub transport: String,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Network namespaces looked into.
    pub namespaces: usize,
    /// Sockets examined across them.
    pub examined: usize,
    pub revoked: Vec<Revoked>,
    /// What could not be done; the rest of the sweep went on.
    pub errors: Vec<String>,
}

/// Whether `s` is a connection the enforced state now denies.
pub fn must_go(s: &DiagSocket, tree: &JudgedSubtree, enforced: &EnforcedState) -> bool {
    let proto = s.transport.mask();
    // An unconnected UDP socket has no destination to judge.
    if s.dst.port() == 0 && s.dst.ip().is_unspecified() {
        return false;
    }
    // A policy that audits by default is a rollout being watched: nothing
    // open is taken away, not even from pods a rule denies in enforce mode
    // (their new connections are refused all the same). Closing live
    // connections waits until the default is enforce.
    if enforced.mode == Mode::Audit {
        return false;
    }
    let Some(owner) = s.cgroup_id else {
        return false;
    };
    if !enforced
        .destinations
        .protects(s.dst.ip(), s.dst.port(), proto)
    {
        return false;
    }
    // Audit never takes anything away; only an enforced verdict revokes.
    tree.action_of(owner, enforced)
        .is_some_and(|a| !a.reaches())
}

/// Sweeps the namespaces of processes below `root`, plus every netns file
/// in `netns_dirs` (bind mounts such as /var/run/netns, where container
/// runtimes keep pod namespaces), plus our own.
pub fn sweep(root: &CgroupDir, enforced: &EnforcedState, netns_dirs: &[PathBuf]) -> Report {
    let mut report = Report::default();
    let tree = match JudgedSubtree::read(root) {
        Ok(t) => t,
        Err(e) => {
            report.errors.push(e.to_string());
            return report;
        }
    };
    let mut namespaces: BTreeMap<u64, Option<File>> = BTreeMap::new();
    // A stat, not procfs: its namespaces() is per process, and this must be
    // the namespace of the thread that runs the sweep.
    let own = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
    if let Ok(own) = own {
        // Ours needs no setns (and so no CAP_SYS_ADMIN): hostNetwork pods.
        namespaces.insert(own, None);
    }
    let mut denied = 0usize;
    let mut first_denied = None;
    let below = netns_of(tree.dirs.iter().map(PathBuf::as_path), &mut |e| {
        denied += 1;
        first_denied.get_or_insert(e.to_string());
        Ok(())
    });
    match below {
        Ok(found) => {
            for (ino, f) in found {
                namespaces.entry(ino).or_insert(Some(f));
            }
        }
        Err(e) => report.errors.push(e.to_string()),
    }
    if let Some(e) = first_denied {
        report.errors.push(format!(
            "{denied} process namespace(s) could not be opened (needs CAP_SYS_PTRACE), e.g. {e}"
        ));
    }
    for dir in netns_dirs {
        add_netns_dir(dir, &mut namespaces, &mut report.errors);
    }
    for (ino, file) in namespaces {
        let work = || sweep_here(&tree, enforced);
        let result = match &file {
            None => Ok(work()),
            Some(f) => in_netns(f, work),
        };
        report.namespaces += 1;
        match result {
            Ok(Ok((examined, revoked, errors))) => {
                report.examined += examined;
                report.revoked.extend(revoked);
                report.errors.extend(errors);
            }
            Ok(Err(e)) | Err(e) => report.errors.push(format!("net:[{ino}]: {e}")),
        }
    }
    report
}

fn add_netns_dir(
    dir: &Path,
    namespaces: &mut BTreeMap<u64, Option<File>>,
    errors: &mut Vec<String>,
) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // No runtime keeps namespaces there on this node.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            errors.push(format!("list {}: {e}", dir.display()));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // A bind-mounted nsfs file: its inode is the namespace's.
        match File::open(&path).and_then(|f| Ok((f.metadata()?.ino(), f))) {
            Ok((ino, f)) => {
                namespaces.entry(ino).or_insert(Some(f));
            }
            Err(e) => errors.push(format!("open {}: {e}", path.display())),
        }
    }
}

type Swept = (usize, Vec<Revoked>, Vec<String>);

/// Dumps and destroys in the calling thread's namespace.
fn sweep_here(tree: &JudgedSubtree, enforced: &EnforcedState) -> io::Result<Swept> {
    let mut examined = 0;
    let mut revoked = Vec::new();
    let mut errors = Vec::new();
    for transport in [Protocol::Tcp, Protocol::Udp] {
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            // A fresh socket per dump: after a failed one the kernel refuses
            // the next dump on the same socket (EBUSY).
            let diag = SockDiag::open()?;
            let sockets = match diag.dump(transport, family) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            examined += sockets.len();
            for s in sockets.iter().filter(|s| must_go(s, tree, enforced)) {
                match diag.destroy(s) {
                    Ok(Destroyed::Closed) => revoked.push(Revoked {
                        cgroup_id: s.cgroup_id.unwrap_or_default(),
                        transport: s.transport.to_string(),
                        source: s.src,
                        destination: s.dst,
                    }),
                    Ok(Destroyed::Gone) => {}
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
    }
    Ok((examined, revoked, errors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations;

    /// root(1) -> pod(2) -> ctr(3); root -> other(4); the root at level 3.
    fn tree() -> JudgedSubtree {
        JudgedSubtree {
            root: 1,
            root_level: 3,
            parent: HashMap::from([(2, 1), (3, 2), (4, 1)]),
            dirs: Vec::new(),
        }
    }

    fn policy(allowed: &[(u64, Action)], mode: Mode) -> EnforcedState {
        let level = |id| match id {
            1 => 3,
            2 | 4 => 4,
            _ => 5,
        };
        EnforcedState {
            allowed: allowed
                .iter()
                .map(|&(id, action)| {
                    let level = level(id);
                    (id, AllowTarget { level, action })
                })
                .collect(),
            mode,
            destinations: destinations::compile(&destinations::defaults()).unwrap(),
        }
    }

    fn socket(transport: Protocol, dst: &str, cgroup_id: Option<u64>) -> DiagSocket {
        DiagSocket::for_tests(
            transport,
            "10.0.0.1:40000".parse().unwrap(),
            dst.parse().unwrap(),
            cgroup_id,
        )
    }

    #[test]
    fn the_deepest_entry_on_the_owners_path_decides() {
        let t = tree();
        let p = policy(&[(2, Action::Allow), (3, Action::Enforce)], Mode::Enforce);
        assert_eq!(t.action_of(2, &p), Some(Action::Allow));
        assert_eq!(t.action_of(3, &p), Some(Action::Enforce));
        assert_eq!(t.action_of(4, &p), Some(Action::Enforce));
        assert_eq!(t.action_of(1, &p), Some(Action::Enforce));
        // Not below the judged root: a host process's socket.
        assert_eq!(t.action_of(99, &p), None);
        let audit = policy(&[], Mode::Audit);
        assert_eq!(t.action_of(4, &audit), Some(Action::Audit));
    }

    #[test]
    fn entries_on_the_root_and_deeper_levels_are_walked_like_the_kernel() {
        let t = tree();
        let p = policy(&[(1, Action::Audit), (3, Action::Allow)], Mode::Enforce);
        assert_eq!(t.action_of(1, &p), Some(Action::Audit));
        assert_eq!(t.action_of(2, &p), Some(Action::Audit));
        assert_eq!(t.action_of(3, &p), Some(Action::Allow));
        assert_eq!(t.action_of(4, &p), Some(Action::Audit));
    }

    #[test]
    fn only_enforced_owners_of_protected_connections_lose_them() {
        let t = tree();
        let p = policy(&[(2, Action::Allow)], Mode::Enforce);
        let imds = "169.254.169.254:80";
        assert!(must_go(&socket(Protocol::Tcp, imds, Some(4)), &t, &p));
        assert!(must_go(&socket(Protocol::Udp, imds, Some(4)), &t, &p));
        assert!(must_go(
            &socket(Protocol::Tcp, "[::ffff:169.254.169.254]:80", Some(4)),
            &t,
            &p
        ));
        assert!(must_go(
            &socket(Protocol::Tcp, "[fd00:ec2::254]:443", Some(4)),
            &t,
            &p
        ));
        // Allowed owners (and their children), unknown and outside owners.
        assert!(!must_go(&socket(Protocol::Tcp, imds, Some(2)), &t, &p));
        assert!(!must_go(&socket(Protocol::Tcp, imds, Some(3)), &t, &p));
        assert!(!must_go(&socket(Protocol::Tcp, imds, Some(99)), &t, &p));
        assert!(!must_go(&socket(Protocol::Tcp, imds, None), &t, &p));
        // Unprotected destinations and ports; unconnected UDP.
        assert!(!must_go(
            &socket(Protocol::Tcp, "169.254.169.254:53", Some(4)),
            &t,
            &p
        ));
        assert!(!must_go(
            &socket(Protocol::Tcp, "10.1.1.1:80", Some(4)),
            &t,
            &p
        ));
        assert!(!must_go(
            &socket(Protocol::Udp, "0.0.0.0:0", Some(4)),
            &t,
            &p
        ));
        // Audit never revokes.
        let audit = policy(&[], Mode::Audit);
        assert!(!must_go(&socket(Protocol::Tcp, imds, Some(4)), &t, &audit));
    }

    /// An audit default revokes nothing, even where an entry enforces or
    /// filters (a deny rule with `mode: enforce`, a filter rule): the
    /// kernel still refuses their new connections.
    #[test]
    fn an_audit_default_never_revokes() {
        let t = tree();
        let imds = "169.254.169.254:80";
        let p = policy(&[(2, Action::Enforce), (4, Action::Filter)], Mode::Audit);
        assert_eq!(t.action_of(3, &p), Some(Action::Enforce));
        for owner in [1, 2, 3, 4] {
            assert!(!must_go(&socket(Protocol::Tcp, imds, Some(owner)), &t, &p));
        }
        // The same entries under an enforce default do revoke.
        let p = policy(&[(2, Action::Enforce), (4, Action::Filter)], Mode::Enforce);
        assert!(must_go(&socket(Protocol::Tcp, imds, Some(3)), &t, &p));
        assert!(must_go(&socket(Protocol::Tcp, imds, Some(4)), &t, &p));
    }
}
