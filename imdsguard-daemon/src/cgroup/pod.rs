//! Where kubelet puts a pod's cgroup, and the way back from a cgroup
//! directory name to the pod or container it belongs to.
//!
//! Pod cgroups sit below the "kubepods" cgroup, one level deeper for
//! Burstable and BestEffort pods than for Guaranteed ones:
//!
//! ```text
//! cgroupfs driver                 systemd driver
//! kubepods/pod<UID>               kubepods.slice/kubepods-pod<U_I_D>.slice
//! kubepods/burstable/pod<UID>     kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<U_I_D>.slice
//! kubepods/besteffort/pod<UID>    kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<U_I_D>.slice
//! ```
//!
//! With `--cgroup-root=/kubelet` (kind does this) the root moves to
//! `kubelet/kubepods` or `kubelet.slice/kubelet-kubepods.slice`; systemd
//! slice names spell out their ancestors, so every name below it starts
//! with `kubelet-kubepods` instead of `kubepods`.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    str::FromStr,
};

#[derive(Debug, thiserror::Error)]
pub enum PodCgroupError {
    #[error("pod uid {uid:?} is neither a uuid nor a 32-digit static pod hash")]
    InvalidPodUid { uid: String },

    #[error("unknown qos class {found:?} (expected Guaranteed, Burstable, BestEffort)")]
    UnknownQosClass { found: String },

    #[error(
        "no kubepods cgroup (kubepods.slice, <parent>-kubepods.slice or kubepods) within {max_depth} levels below {mount}; name the kubelet's kubepods directory explicitly"
    )]
    NoKubepods { mount: PathBuf, max_depth: usize },

    #[error("several kubepods cgroups below {mount}: {}; name the one this node's kubelet uses explicitly", display_paths(.found))]
    AmbiguousKubepods { mount: PathBuf, found: Vec<PathBuf> },

    #[error(
        "cannot tell the cgroup driver from {path}: expected a directory named kubepods (cgroupfs), kubepods.slice or <parent>-kubepods.slice (systemd)"
    )]
    UnknownDriver { path: PathBuf },

    #[error("kubepods cgroup {path} is not a directory")]
    NotADirectory { path: PathBuf },

    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [
        QosClass::Guaranteed,
        QosClass::Burstable,
        QosClass::BestEffort,
    ];

    /// The name of the intermediate cgroup, which Guaranteed pods skip.
    const fn tier(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

/// The spelling of `PodStatus.qosClass`.
impl FromStr for QosClass {
    type Err = PodCgroupError;
    fn from_str(s: &str) -> Result<Self, PodCgroupError> {
        match s {
            "Guaranteed" => Ok(QosClass::Guaranteed),
            "Burstable" => Ok(QosClass::Burstable),
            "BestEffort" => Ok(QosClass::BestEffort),
            other => Err(PodCgroupError::UnknownQosClass {
                found: other.into(),
            }),
        }
    }
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        })
    }
}

/// A pod UID as kubelet names cgroups after it: a UUID, or for static pods
/// the 32 hex digits of the manifest hash. Only hex digits and '-', so it
/// is always one plain path component.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// systemd reserves '-' for slice nesting, so kubelet writes '_'.
    fn systemd_escaped(&self) -> String {
        self.0.replace('-', "_")
    }
}

impl FromStr for PodUid {
    type Err = PodCgroupError;
    fn from_str(s: &str) -> Result<Self, PodCgroupError> {
        let hex = |part: &str, len: usize| {
            part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit())
        };
        let groups: Vec<&str> = s.split('-').collect();
        let uuid = groups.len() == 5
            && groups
                .iter()
                .zip([8, 4, 4, 4, 12])
                .all(|(g, len)| hex(g, len));
        if uuid || hex(s, 32) {
            Ok(PodUid(s.into()))
        } else {
            Err(PodCgroupError::InvalidPodUid { uid: s.into() })
        }
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The kubepods cgroup of one kubelet and how it names what is below.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubepodsLayout {
    root: PathBuf,
    driver: CgroupDriver,
    slice_prefix: String,
}

impl KubepodsLayout {
    /// An operator-given kubepods directory; the driver comes from its name.
    pub fn at(root: impl Into<PathBuf>) -> Result<Self, PodCgroupError> {
        let root = root.into();
        let meta = fs::metadata(&root).map_err(|source| PodCgroupError::Io {
            op: "stat",
            path: root.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(PodCgroupError::NotADirectory { path: root });
        }
        Self::from_root(&root).ok_or(PodCgroupError::UnknownDriver { path: root })
    }

    /// The layout a kubepods directory at `root` will have, without looking
    /// at the filesystem: for a root that does not exist yet. The driver
    /// still comes from the name, so a misspelt root is refused at once
    /// instead of being waited for.
    pub fn named(root: impl Into<PathBuf>) -> Result<Self, PodCgroupError> {
        let root = root.into();
        Self::from_root(&root).ok_or(PodCgroupError::UnknownDriver { path: root })
    }

    pub(crate) fn from_root(root: &Path) -> Option<Self> {
        let (driver, slice_prefix) = kubepods_kind(root.file_name()?.to_str()?)?;
        Some(Self {
            root: root.into(),
            driver,
            slice_prefix,
        })
    }

    /// The kubepods directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn driver(&self) -> CgroupDriver {
        self.driver
    }

    /// What systemd slice names below the root start with, e.g. `kubepods`
    /// or `kubelet-kubepods`; for cgroupfs, the root's name.
    pub fn slice_prefix(&self) -> &str {
        &self.slice_prefix
    }

    pub fn pod_dir(&self, uid: &PodUid, qos: QosClass) -> PathBuf {
        match (self.driver, qos.tier()) {
            (CgroupDriver::Cgroupfs, None) => self.root.join(format!("pod{uid}")),
            (CgroupDriver::Cgroupfs, Some(tier)) => self.root.join(tier).join(format!("pod{uid}")),
            (CgroupDriver::Systemd, None) => self.root.join(format!(
                "{}-pod{}.slice",
                self.slice_prefix,
                uid.systemd_escaped()
            )),
            (CgroupDriver::Systemd, Some(tier)) => {
                let parent = format!("{}-{tier}", self.slice_prefix);
                self.root
                    .join(format!("{parent}.slice"))
                    .join(format!("{parent}-pod{}.slice", uid.systemd_escaped()))
            }
        }
    }

    /// The pod's directory under every QoS class, in [`QosClass::ALL`]
    /// order, for pods whose status does not say their class yet.
    pub fn candidates(&self, uid: &PodUid) -> [PathBuf; 3] {
        QosClass::ALL.map(|qos| self.pod_dir(uid, qos))
    }
}

/// The driver and slice prefix a kubepods directory name implies.
fn kubepods_kind(name: &str) -> Option<(CgroupDriver, String)> {
    if name == "kubepods" {
        return Some((CgroupDriver::Cgroupfs, name.into()));
    }
    let stem = name.strip_suffix(".slice")?;
    let nested_ok = stem.split('-').all(|part| !part.is_empty());
    (nested_ok && (stem == "kubepods" || stem.ends_with("-kubepods")))
        .then(|| (CgroupDriver::Systemd, stem.into()))
}

pub(crate) fn is_pod_dir_name(name: &str) -> bool {
    parse_systemd_pod(name).is_some() || parse_cgroupfs_pod(name).is_some()
}

/// `<prefix>[-burstable|-besteffort]-pod<U_I_D>.slice`
fn parse_systemd_pod(name: &str) -> Option<(PodUid, QosClass)> {
    let (parent, escaped) = name.strip_suffix(".slice")?.rsplit_once("-pod")?;
    if escaped.contains('-') {
        return None;
    }
    let uid = escaped.replace('_', "-").parse().ok()?;
    let (qos, prefix) = [QosClass::Burstable, QosClass::BestEffort]
        .into_iter()
        .find_map(|q| Some((q, parent.strip_suffix(&format!("-{}", q.tier()?))?)))
        .unwrap_or((QosClass::Guaranteed, parent));
    kubepods_kind(&format!("{prefix}.slice"))?;
    Some((uid, qos))
}

/// `pod<UID>`; the QoS class is the parent directory's business.
fn parse_cgroupfs_pod(name: &str) -> Option<PodUid> {
    name.strip_prefix("pod")?.parse().ok()
}

/// The pod UID and QoS class of a pod cgroup directory of either driver.
/// systemd names carry the class; for cgroupfs it is the parent directory
/// (`burstable`, `besteffort`, or `kubepods` for Guaranteed), so pass at
/// least the last two path components.
pub fn parse_pod_dir(path: &Path) -> Option<(PodUid, QosClass)> {
    let name = path.file_name()?.to_str()?;
    if let Some(found) = parse_systemd_pod(name) {
        return Some(found);
    }
    let uid = parse_cgroupfs_pod(name)?;
    let qos = match path.parent()?.file_name()?.to_str()? {
        "kubepods" => QosClass::Guaranteed,
        "burstable" => QosClass::Burstable,
        "besteffort" => QosClass::BestEffort,
        _ => return None,
    };
    Some((uid, qos))
}

/// The container ID (64 lowercase hex digits) in a container cgroup's
/// directory name: `cri-containerd-<id>.scope`, `crio-<id>.scope` or
/// `docker-<id>.scope` under systemd, `<id>` or `crio-<id>` under cgroupfs.
/// CRI-O's `crio-conmon-<id>.scope` is its monitor, not the container.
pub fn container_id_of(name: &str) -> Option<&str> {
    let id = match name.strip_suffix(".scope") {
        Some(stem) => ["cri-containerd-", "crio-", "docker-"]
            .iter()
            .find_map(|p| stem.strip_prefix(p))?,
        None => name.strip_prefix("crio-").unwrap_or(name),
    };
    (id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(id)
}

#[cfg(test)]
mod tests;
