//! Filter mode in the node agent: the proxy beside the enforcer, the rules
//! of each filtered pod, an allow entry for the agent's own cgroup (its
//! proxy forwards to the metadata service from there), and Events on pods
//! whose requests the proxy refused.

use std::{
    fs,
    path::Path,
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, sync::mpsc};
use tracing::{info, warn};

use crate::{
    Error, Result,
    bpf::{enforcer::AllowTarget, pins::PinLayout},
    cgroup::{mount::CgroupDir, subtree},
    decisions::Attributor as _,
    destinations::Compiled,
    filter::events::DeniedPath,
    metrics::Metrics,
    node::attribution::PodAttributor,
    policy::file::{Access, PolicyFile},
    runtime::FilterProxy,
    vocabulary::Action,
};

/// A policy with filter rules needs a proxy: without one the kernel would
/// deny those pods everything, which is not what the rule says. Refused at
/// start, and kept out on reload like any invalid policy.
pub(super) fn check_policy(policy: &PolicyFile, proxy: bool) -> Result<()> {
    let rules: Vec<String> = policy
        .rules()
        .iter()
        .filter(|r| r.access() == Access::Filter)
        .map(|r| r.name().to_string())
        .collect();
    if proxy || rules.is_empty() {
        return Ok(());
    }
    Err(Error::FilterWithoutProxy { rules })
}

/// The agent's own cgroup, when it is inside the judged root: the proxy's
/// upstream connections come from there and must reach the metadata
/// service. Found by our pid in `cgroup.procs` (which the kernel shows in
/// our own pid namespace): in a container, `/proc/self/cgroup` is relative
/// to a private cgroup namespace and names no host path.
pub(super) fn own_entry(root: &CgroupDir) -> Result<Option<(u64, AllowTarget)>> {
    let pid = std::process::id().to_string();
    let cgroups =
        subtree::walk(&root.path).map_err(Error::io("walk", root.path.display().to_string()))?;
    for c in cgroups {
        if holds(&c.path, &pid) {
            let dir = CgroupDir::open(&c.path)?;
            info!(cgroup = %dir.path.display(), "filter mode: the agent's own cgroup may reach the metadata service (its proxy forwards from there)");
            return Ok(Some((
                dir.id,
                AllowTarget {
                    level: dir.level,
                    action: Action::Allow,
                },
            )));
        }
    }
    Ok(None)
}

fn holds(dir: &Path, pid: &str) -> bool {
    fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| procs.lines().any(|l| l == pid))
}

/// Starts the proxy on `listeners` (bound before anything was attached),
/// naming callers by pod, with a task that puts an Event on a pod whose
/// request was refused (at most once a minute per pod).
pub(super) fn start(
    listeners: Vec<TcpListener>,
    pins: &PinLayout,
    destinations: Compiled,
    metrics: &Metrics,
    attributor: PodAttributor,
) -> Result<FilterProxy> {
    let attributor = Arc::new(Mutex::new(attributor));
    let (tx, mut rx) = mpsc::channel::<DeniedPath>(64);
    let names = attributor.clone();
    let proxy = FilterProxy::start(
        listeners,
        pins,
        destinations,
        metrics,
        move |id| {
            names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .attribute(id)
        },
        Some(tx),
    )?;
    tokio::spawn(async move {
        while let Some(denied) = rx.recv().await {
            attributor
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .denied_path(&denied);
        }
        warn!("the filter proxy's event channel closed");
    });
    Ok(proxy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_rules_need_a_proxy() {
        let filtered = PolicyFile::from_yaml(
            "rules:\n  - name: report\n    access: filter\n    profile: region\n  - name: prod\n    access: allow\n",
        )
        .unwrap();
        let e = check_policy(&filtered, false).unwrap_err().to_string();
        assert!(
            e.contains("[\"report\"]") && e.contains("--proxy-listen"),
            "{e}"
        );
        check_policy(&filtered, true).unwrap();
        // Without filter rules a proxy is not needed.
        let plain = PolicyFile::from_yaml("rules:\n  - name: prod\n    access: allow\n").unwrap();
        check_policy(&plain, false).unwrap();
    }
}
