//! `imdsguard explain`: would this pod (or cgroup) reach each protected
//! destination, and what decided it? The verdict is read from what the
//! kernel will actually use (the pinned maps); with `--pod`, the policy rule
//! that produced the entry is shown next to it, so a mismatch (cgroup not
//! created yet, agent not synced) is visible.

use std::{fmt::Write as _, path::PathBuf};

use imdsguard_common::LAYOUT_VERSION;
use serde::Serialize;

use crate::{
    Error, Result,
    bpf::allow_walk::deepest_entry,
    bpf::maps::{AllowMap, ConfigMap, ProtectedMap, ScopeMap, ports_text},
    bpf::pins::PinLayout,
    cgroup::mount::CgroupDir,
    cgroup::mount::primary_cgroup2_mount,
    cli::args::ExplainArgs,
    cli::status::action_name,
    destinations::Prefix,
    vocabulary::Action,
};

#[derive(Clone, Debug, Serialize)]
pub struct DestinationVerdict {
    pub destination: String,
    pub ports: Vec<String>,
    /// `reachable`, `reachable (audited)`, `EPERM`, or for a filtered
    /// cgroup `filtered (tcp/80 through the proxy), else EPERM`.
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The allow entry that decides, if any: (cgroup path, action).
    pub entry: Option<(PathBuf, &'static str)>,
    /// What applies: the entry's action, or the global default.
    pub action: &'static str,
    pub decided_by: String,
    pub pod: Option<String>,
    pub policy_rule: Option<String>,
    /// A filtered pod's profiles and paths, from its policy rule.
    pub filter: Option<String>,
    pub destinations: Vec<DestinationVerdict>,
}

/// Explains the verdict for processes in `cgroup`, from the pinned maps.
pub fn for_cgroup(pins: &PinLayout, cgroup: &CgroupDir) -> Result<Explanation> {
    if !pins.exists() {
        return Err(Error::NotInstalled {
            path: pins.dir.clone(),
        });
    }
    let config = ConfigMap::open_pinned(pins)?.get()?;
    let allowed = AllowMap::open_pinned(pins)?;

    // With the programs attached above the judged subtree, a cgroup
    // outside it is not judged at all.
    let scope = ScopeMap::read_pinned(pins)?;

    // The cgroup's path, itself and its ancestors up to the mount point.
    let mount = primary_cgroup2_mount()?;
    let mut path = Vec::new();
    let mut dir = Some(cgroup.path.as_path());
    while let Some(d) = dir {
        if !d.starts_with(&mount.mount_point) {
            break;
        }
        if let Ok(c) = CgroupDir::open(d) {
            path.push(c);
        }
        dir = d.parent();
    }
    let judged = scope.cgroup_id == 0 || path.iter().any(|c| c.id == scope.cgroup_id);
    // The kernel's walk over the configured level window, over this path.
    let entry = deepest_entry(
        config.min_level,
        config.max_level,
        |level| path.iter().find(|c| c.level == level).map(|c| c.id),
        // An entry that cannot be read counts as none, like a failed lookup
        // in the kernel.
        |id| allowed.get(id).ok().flatten(),
    )
    .and_then(|found| {
        let dir = path.iter().find(|c| c.id == found.cgroup_id)?;
        Some((dir.path.clone(), found.entry.action))
    });
    let configured = config.layout_version == LAYOUT_VERSION;
    let (act, decided_by) = match &entry {
        _ if !judged => (
            Action::Allow.kernel(),
            "outside the judged subtree (programs attached above it): not judged".to_string(),
        ),
        Some((p, a)) => (*a, format!("allow-map entry on {}", p.display())),
        None if configured => (
            config.default_action,
            "no entry on the path: global default".to_string(),
        ),
        None => (
            Action::Enforce.kernel(),
            "installation not configured: fail closed".to_string(),
        ),
    };
    // A value this build does not know is enforced, as the kernel does.
    let verdict = match Action::try_from(act) {
        Ok(Action::Allow) => "reachable",
        Ok(Action::Audit) => "reachable (audited)",
        Ok(Action::Filter) => "filtered (tcp/80 through the proxy), else EPERM",
        _ => "EPERM",
    };

    let destinations: Vec<(Prefix, DestinationVerdict)> = ProtectedMap::open_pinned(pins)?
        .listing()?
        .into_iter()
        .map(|(prefix, ranges)| {
            let verdict = DestinationVerdict {
                destination: prefix.to_string(),
                ports: ranges.iter().map(ports_text).collect(),
                verdict,
            };
            (prefix, verdict)
        })
        .collect();
    Ok(Explanation {
        cgroup: cgroup.path.clone(),
        cgroup_id: cgroup.id,
        entry: entry.map(|(p, a)| (p, action_name(a))),
        action: action_name(act),
        decided_by,
        pod: None,
        policy_rule: None,
        filter: None,
        destinations: destinations.into_iter().map(|(_, d)| d).collect(),
    })
}

/// Runs `imdsguard explain`; returns the text to print.
pub async fn run(args: &ExplainArgs) -> Result<String> {
    let pins = PinLayout::new(&args.pin_dir);
    let e = match (&args.pod, &args.cgroup) {
        (Some(pod), _) => {
            for_pod(
                &pins,
                pod,
                args.policy.as_deref(),
                args.kubepods_root.as_deref(),
            )
            .await?
        }
        (None, Some(cg)) => for_cgroup(&pins, &CgroupDir::open(cg)?)?,
        (None, None) => unreachable!("clap requires --pod or --cgroup"),
    };
    super::output(args.output, &e, render)
}

pub fn render(e: &Explanation) -> String {
    let mut o = String::new();
    if let Some(pod) = &e.pod {
        let _ = writeln!(o, "pod:        {pod}");
    }
    let _ = writeln!(o, "cgroup:     {} (id {})", e.cgroup.display(), e.cgroup_id);
    if let Some(rule) = &e.policy_rule {
        let _ = writeln!(o, "policy:     {rule}");
    }
    if let Some(filter) = &e.filter {
        let _ = writeln!(o, "filter:     {filter}");
    }
    let _ = writeln!(o, "decided by: {}", e.decided_by);
    let _ = writeln!(o, "action:     {}\n", e.action);
    let _ = writeln!(o, "{:<28} {:<22} VERDICT", "DESTINATION", "PROTECTED PORTS");
    for d in &e.destinations {
        let _ = writeln!(
            o,
            "{:<28} {:<22} {}",
            d.destination,
            d.ports.join(","),
            d.verdict
        );
    }
    let _ = writeln!(
        o,
        "{:<28} {:<22} reachable (not protected)",
        "anything else", ""
    );
    o
}

/// Explains a pod: finds its cgroup the way the agent does, explains that
/// cgroup from the maps, and names the policy rule that matches it.
pub async fn for_pod(
    pins: &PinLayout,
    pod_ref: &str,
    policy: Option<&std::path::Path>,
    kubepods_root: Option<&std::path::Path>,
) -> Result<Explanation> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::{Api, Client};

    use crate::{cgroup::pod, node::pod_view::PodView, policy::desired, policy::file::PolicyFile};

    let (ns, name) = pod_ref
        .split_once('/')
        .ok_or_else(|| Error::InvalidDestination {
            spec: pod_ref.into(),
            reason: "--pod takes NAMESPACE/NAME".into(),
        })?;
    let client = Client::try_default().await.map_err(Error::Kube)?;
    let pod = Api::<PodView>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(Error::Kube)?;
    let namespace = Api::<Namespace>::all(client)
        .get(ns)
        .await
        .map_err(Error::Kube)?;
    let layout = match kubepods_root {
        Some(p) => pod::KubepodsLayout::at(p),
        None => crate::cgroup::discover::discover(&primary_cgroup2_mount()?.mount_point),
    }
    .map_err(Error::PodCgroup)?;
    let root = CgroupDir::open(layout.root())?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let cgroups = crate::node::pod_cgroups::Cgroupfs {
        root: &root,
        layout: &layout,
    };
    let cgroup = desired::pod_cgroup(pod.status.qos_class, &uid, &cgroups);
    let (rule, filter) = match policy {
        Some(path) => {
            let (_, policy) = PolicyFile::load(path)?;
            let labels = |m: &kube::api::ObjectMeta| m.labels.clone().unwrap_or_default();
            match policy.evaluate(ns, &labels(&namespace.metadata), &labels(&pod.metadata)) {
                Some(d) => (
                    Some(format!(
                        "rule {} ({}) -> {}",
                        d.rule_index, d.rule_name, d.action
                    )),
                    d.filter.map(|f| f.describe()),
                ),
                None => (
                    Some(
                        format!("no rule matches -> default {:?}", policy.default_mode())
                            .to_lowercase(),
                    ),
                    None,
                ),
            }
        }
        None => (None, None),
    };
    let mut e = match cgroup {
        Some(c) => for_cgroup(pins, &c)?,
        // No cgroup yet: its processes cannot exist; when they do, they
        // start without an entry and get the default until the next sync.
        None => {
            let mut e = for_cgroup(pins, &root)?;
            e.decided_by = format!("pod cgroup not created yet; {}", e.decided_by);
            e
        }
    };
    e.pod = Some(pod_ref.to_string());
    e.policy_rule = rule;
    e.filter = filter;
    Ok(e)
}
