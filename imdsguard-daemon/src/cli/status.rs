//! `imdsguard status`: a read-only view of an installation, from its pins
//! alone, so it works while no daemon runs.

use std::{fmt::Write as _, fs, os::fd::AsFd as _, path::PathBuf};

use imdsguard_common::{LAYOUT_VERSION, scope_flag};
use serde::Serialize;

use crate::{
    Error, Result,
    bpf::sys,
    bpf::{
        enforcer::Counters,
        maps::{AllowMap, ConfigMap, CounterMap, ProtectedMap, ProxyMap, ScopeMap, ports_text},
    },
    bpf::{hook::Hook, pins::PinLayout},
    cgroup::mount::primary_cgroup2_mount,
    cgroup::subtree::paths_of_ids,
    cli::args::StatusArgs,
    destinations::Prefix,
    vocabulary::{Action, Protocol},
};

#[derive(Clone, Debug, Serialize)]
pub struct LinkStatus {
    pub hook: Hook,
    pub link_id: u32,
    pub program_id: u32,
    /// The program's name: tells `sock_create` from `sock_create_raw`.
    pub program: String,
    pub cgroup_id: u64,
    pub cgroup: Option<PathBuf>,
    /// Every program attached directly to that cgroup on this hook (ours
    /// included). More than one of ours would be a leftover.
    pub programs_on_hook: Vec<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProtectedStatus {
    pub prefix: String,
    pub ranges: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AllowedStatus {
    pub cgroup_id: u64,
    pub action: &'static str,
    pub cgroup: Option<PathBuf>,
    /// From the cgroup name, when it is a kubelet pod cgroup.
    pub pod_uid: Option<String>,
    /// `namespace/name`, when resolved through the API (`status --kubernetes`).
    pub pod: Option<String>,
}

/// The policy file's rules, when `status --policy` names one.
#[derive(Clone, Debug, Serialize)]
pub struct PolicySummary {
    pub path: PathBuf,
    pub default_mode: String,
    /// `name: access[/mode]`, in evaluation order.
    pub rules: Vec<String>,
}

/// Who is judged when the programs sit above the judged subtree
/// (`--attach-at`), and whether socket creators are recorded.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScopeStatus {
    /// The judged subtree's cgroup id; None when everything below the
    /// attach point is judged.
    pub judged_root_id: Option<u64>,
    pub judged_root: Option<PathBuf>,
    pub records_socket_creators: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub policy: Option<PolicySummary>,
    pub pin_dir: PathBuf,
    pub default_action: &'static str,
    pub scope: ScopeStatus,
    /// Filter mode: where filtered callers' connections go (`None`: no
    /// proxy, filtered callers are denied).
    pub proxy: Option<Vec<String>>,
    pub links: Vec<LinkStatus>,
    pub protected: Vec<ProtectedStatus>,
    pub allowed: Vec<AllowedStatus>,
    pub counters: Counters,
}

/// The name of an action read from a pinned map; the kernel enforces a
/// value it does not know.
pub fn action_name(raw: u32) -> &'static str {
    Action::try_from(raw).map_or("unknown(enforce)", Action::name)
}

fn proto_name(mask: u16) -> &'static str {
    Protocol::try_from(u32::from(mask)).map_or("tcp+udp", Protocol::name)
}

/// The pinned proxy entry as addresses; an installation from before filter
/// mode has none, which means the same as no proxy.
fn read_proxy(pins: &PinLayout) -> Option<Vec<String>> {
    let p = ProxyMap::read_pinned(pins).ok()?;
    if p.port == 0 {
        return None;
    }
    let v4 = (p.addr4 != 0).then(|| {
        std::net::SocketAddr::from((std::net::Ipv4Addr::from(u32::from_be(p.addr4)), p.port))
    });
    let v6 = (p.addr6 != [0; 4])
        .then(|| std::net::SocketAddr::from((crate::destinations::addr_of_words(p.addr6), p.port)));
    Some(v4.into_iter().chain(v6).map(|a| a.to_string()).collect())
}

/// Reads the installation under `pins`.
pub fn read(pins: &PinLayout) -> Result<Status> {
    if !pins.exists() {
        return Err(Error::NotInstalled {
            path: pins.dir.clone(),
        });
    }
    let mut links = Vec::new();
    for hook in Hook::ALL {
        let pin = pins.link(hook);
        if !pin.exists() {
            continue;
        }
        let info = sys::link_info(sys::obj_get(&pin)?.as_fd())?;
        links.push(LinkStatus {
            hook,
            link_id: info.id,
            program_id: info.prog_id,
            program: String::new(),
            cgroup_id: info.cgroup_id,
            cgroup: None,
            programs_on_hook: Vec::new(),
        });
    }

    // Names are only informative: a program that vanished between the two
    // reads keeps an empty one.
    for p in aya::programs::loaded_programs().filter_map(|p| p.ok()) {
        if let Some(l) = links.iter_mut().find(|l| l.program_id == p.id()) {
            l.program = p.name_as_str().unwrap_or_default().to_string();
        }
    }

    let config = ConfigMap::open_pinned(pins)?.get()?;
    let default_action = if config.layout_version == LAYOUT_VERSION {
        action_name(config.default_action)
    } else {
        "unconfigured(enforce)"
    };

    let protected: Vec<(Prefix, ProtectedStatus)> = ProtectedMap::open_pinned(pins)?
        .listing()?
        .into_iter()
        .map(|(prefix, ranges)| {
            let ranges = ranges
                .iter()
                .map(|r| format!("{}:{}", proto_name(r.proto_mask), ports_text(r)))
                .collect();
            let status = ProtectedStatus {
                prefix: prefix.to_string(),
                ranges,
            };
            (prefix, status)
        })
        .collect();

    // A listing that skipped an entry on a read error would show a map
    // that is not there: entries() fails instead.
    let mut allowed: Vec<AllowedStatus> = AllowMap::open_pinned(pins)?
        .entries()?
        .into_iter()
        .map(|(id, e)| AllowedStatus {
            cgroup_id: id,
            action: action_name(e.action),
            cgroup: None,
            pod_uid: None,
            pod: None,
        })
        .collect();
    allowed.sort_by_key(|a| a.cgroup_id);

    let counters = CounterMap::open_pinned(pins)?.totals()?;

    let raw_scope = ScopeMap::read_pinned(pins)?;
    let mut scope = ScopeStatus {
        judged_root_id: (raw_scope.cgroup_id != 0).then_some(raw_scope.cgroup_id),
        judged_root: None,
        records_socket_creators: raw_scope.flags & scope_flag::RECORD_CREATORS != 0,
    };

    // Resolve cgroup ids to paths in one walk of the hierarchy.
    if let Ok(mount) = primary_cgroup2_mount() {
        let ids: Vec<u64> = links
            .iter()
            .map(|l| l.cgroup_id)
            .chain(allowed.iter().map(|a| a.cgroup_id))
            .chain(scope.judged_root_id)
            .collect();
        let paths = paths_of_ids(&mount.mount_point, &ids);
        scope.judged_root = scope.judged_root_id.and_then(|id| paths.get(&id).cloned());
        for l in &mut links {
            l.cgroup = paths.get(&l.cgroup_id).cloned();
            if let Some(dir) = &l.cgroup
                && let Ok(f) = fs::File::open(dir)
            {
                l.programs_on_hook =
                    sys::query_cgroup_programs(f.as_fd(), l.hook.attach_type()).unwrap_or_default();
            }
        }
        for a in &mut allowed {
            a.cgroup = paths.get(&a.cgroup_id).cloned();
            a.pod_uid = a
                .cgroup
                .as_deref()
                .and_then(crate::cgroup::pod::parse_pod_dir)
                .map(|(uid, _)| uid.as_str().to_string());
        }
    }

    Ok(Status {
        policy: None,
        pin_dir: pins.dir.clone(),
        default_action,
        scope,
        proxy: read_proxy(pins),
        links,
        protected: protected.into_iter().map(|(_, s)| s).collect(),
        allowed,
        counters,
    })
}

fn path_or_unknown(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "(not found)".into(), |p| p.display().to_string())
}

/// The POD column: the name when `--kubernetes` resolved it, else the UID
/// from the cgroup name, else `-` (not a pod cgroup).
fn pod_cell(a: &AllowedStatus) -> String {
    match (&a.pod, &a.pod_uid) {
        (Some(pod), _) => pod.clone(),
        (None, Some(uid)) => format!("(uid {uid})"),
        (None, None) => "-".into(),
    }
}

/// Human-readable rendering.
/// Runs `imdsguard status`; returns the text to print.
pub async fn run(args: &StatusArgs) -> Result<String> {
    let mut s = read(&PinLayout::new(&args.pin_dir))?;
    if let Some(p) = &args.policy {
        with_policy(&mut s, p)?;
    }
    if args.kubernetes {
        with_pod_names(&mut s).await?;
    }
    super::output(args.output, &s, render)
}

pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "imdsguard installation at {}", s.pin_dir.display());
    let _ = writeln!(
        o,
        "default for cgroups without an entry: {}",
        s.default_action
    );
    if let Some(id) = s.scope.judged_root_id {
        let _ = writeln!(
            o,
            "attached above the judged subtree: only {} (id {id}) is judged",
            path_or_unknown(&s.scope.judged_root)
        );
    }
    if s.scope.records_socket_creators {
        let _ = writeln!(o, "socket creators: recorded and judged too");
    }
    if let Some(proxy) = &s.proxy {
        let _ = writeln!(
            o,
            "filter proxy: {} (filtered cgroups' tcp/80 metadata connections go there)",
            proxy.join(", ")
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<12} {:>6} {:>6}  {:<16} {:<9} CGROUP",
        "HOOK", "LINK", "PROG", "PROGRAM", "ON-HOOK"
    );
    if s.links.is_empty() {
        let _ = writeln!(o, "(no program attached: NOT ENFORCING)");
    }
    for l in &s.links {
        let _ = writeln!(
            o,
            "{:<12} {:>6} {:>6}  {:<16} {:<9} {} (id {})",
            l.hook,
            l.link_id,
            l.program_id,
            l.program,
            l.programs_on_hook.len(),
            path_or_unknown(&l.cgroup),
            l.cgroup_id
        );
    }
    let _ = writeln!(o, "\n{:<28} PROTECTED PORTS", "DESTINATION");
    for p in &s.protected {
        let _ = writeln!(o, "{:<28} {}", p.prefix, p.ranges.join(" "));
    }
    if let Some(p) = &s.policy {
        let _ = writeln!(
            o,
            "\npolicy {} (default {}):",
            p.path.display(),
            p.default_mode
        );
        for r in &p.rules {
            let _ = writeln!(o, "  {r}");
        }
    }
    // As wide as the widest pod (names run to 317 characters), at least 40.
    let pods: Vec<String> = s.allowed.iter().map(pod_cell).collect();
    let w = pods.iter().map(String::len).max().unwrap_or(0).max(40);
    let _ = writeln!(
        o,
        "\n{:>12}  {:<8} {:<w$} CGROUP",
        "CGROUP-ID", "ACTION", "POD"
    );
    if s.allowed.is_empty() {
        let _ = writeln!(o, "(no allow entries: every cgroup gets the default)");
    }
    for (a, pod) in s.allowed.iter().zip(&pods) {
        let _ = writeln!(
            o,
            "{:>12}  {:<8} {pod:<w$} {}",
            a.cgroup_id,
            a.action,
            path_or_unknown(&a.cgroup)
        );
    }
    let c = &s.counters;
    let _ = writeln!(
        o,
        "\ncounters: allowed={} denied={} audited={} events_dropped={}",
        c.allowed, c.denied, c.audited, c.events_dropped
    );
    o
}

/// Adds the policy file's summary.
pub fn with_policy(status: &mut Status, path: &std::path::Path) -> Result<()> {
    use crate::policy::file::{Access, PolicyFile};
    let (_, policy) = PolicyFile::load(path)?;
    status.policy = Some(PolicySummary {
        path: path.into(),
        default_mode: format!("{:?}", policy.default_mode()).to_lowercase(),
        rules: policy
            .rules()
            .iter()
            .map(|r| match (r.access(), r.mode()) {
                (Access::Allow, _) => format!("{}: allow", r.name()),
                (Access::Deny, Some(m)) => {
                    format!("{}: deny/{}", r.name(), format!("{m:?}").to_lowercase())
                }
                (Access::Deny, None) => format!("{}: deny", r.name()),
                (Access::Filter, _) => {
                    let f = r.filter().map(|f| f.describe()).unwrap_or_default();
                    format!("{}: filter ({f})", r.name())
                }
            })
            .collect(),
    });
    Ok(())
}

/// Resolves allowed pods' UIDs to `namespace/name` through the API.
pub async fn with_pod_names(status: &mut Status) -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    let client = kube::Client::try_default().await.map_err(Error::Kube)?;
    let pods = kube::Api::<Pod>::all(client)
        .list(&Default::default())
        .await
        .map_err(Error::Kube)?;
    for a in &mut status.allowed {
        let Some(uid) = &a.pod_uid else { continue };
        a.pod = pods
            .items
            .iter()
            .find(|p| p.metadata.uid.as_deref() == Some(uid))
            .map(|p| {
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or(""),
                    p.metadata.name.as_deref().unwrap_or("")
                )
            });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(id: u64, pod: Option<&str>, uid: Option<&str>, cgroup: &str) -> AllowedStatus {
        AllowedStatus {
            cgroup_id: id,
            action: "allow",
            cgroup: Some(cgroup.into()),
            pod_uid: uid.map(str::to_string),
            pod: pod.map(str::to_string),
        }
    }

    #[test]
    fn table_rows_fill_the_pod_column() {
        let uid = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b";
        let s = Status {
            policy: None,
            pin_dir: "/sys/fs/bpf/imdsguard".into(),
            default_action: "enforce",
            scope: ScopeStatus::default(),
            proxy: None,
            links: Vec::new(),
            protected: Vec::new(),
            allowed: vec![
                allowed(11, Some("imds/prod-1"), Some(uid), "/cg/kubepods/pod-a"),
                allowed(12, None, Some(uid), "/cg/kubepods/pod-b"),
                allowed(13, None, None, "/cg/other"),
            ],
            counters: Counters::default(),
        };
        let out = render(&s);
        let lines: Vec<&str> = out.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.trim_start().starts_with("CGROUP-ID"))
            .expect("allow table header");
        let col = |l: &str, name: &str| {
            let at = lines[header].rfind(name).unwrap();
            l.get(at..)
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string()
        };
        let rows = &lines[header + 1..header + 4];
        assert_eq!(col(rows[0], "POD"), "imds/prod-1", "{out}");
        assert_eq!(col(rows[0], "CGROUP"), "/cg/kubepods/pod-a", "{out}");
        assert_eq!(col(rows[1], "POD"), "(uid", "{out}");
        assert!(rows[1].contains(&format!("(uid {uid})")), "{out}");
        assert_eq!(col(rows[1], "CGROUP"), "/cg/kubepods/pod-b", "{out}");
        assert_eq!(col(rows[2], "POD"), "-", "{out}");
        assert_eq!(col(rows[2], "CGROUP"), "/cg/other", "{out}");
    }
}
