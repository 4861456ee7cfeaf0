//! Standalone mode: a static allow list from the command line, no
//! Kubernetes. Used by systemd hosts, the demo and the tests.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::signal::unix::SignalKind;
use tracing::{info, warn};

use crate::{
    Error, Result,
    bpf::enforcer::{AllowTarget, Attachment, Enforcer, MapState},
    bpf::pins::PinLayout,
    cgroup::mount::CgroupDir,
    cgroup::subtree::paths_of_ids,
    cli::args::RunArgs,
    decisions::{self, Attribution, Attributor},
    destinations::{self, Destination},
    revoke,
    vocabulary::Action,
};

/// Validated inputs of `run`.
#[derive(Clone, Debug)]
pub struct Plan {
    pub attachment: Attachment,
    pub desired: MapState,
    pub allowed_paths: BTreeMap<u64, PathBuf>,
}

/// Checks every input and resolves cgroup paths. Nothing is loaded yet, so
/// a bad flag never leaves a half-installed state behind.
pub fn plan(args: &RunArgs) -> Result<Plan> {
    let root = CgroupDir::open(&args.cgroup_root)?;
    let mut allowed = BTreeMap::new();
    let mut allowed_paths = BTreeMap::new();
    for (paths, act) in [
        (&args.allow_cgroup, Action::Allow),
        (&args.audit_cgroup, Action::Audit),
        (&args.enforce_cgroup, Action::Enforce),
    ] {
        for path in paths {
            let dir = CgroupDir::open(path)?;
            if !dir.is_within(&root) {
                return Err(Error::AllowedOutsideRoot {
                    allowed: path.clone(),
                    root: args.cgroup_root.clone(),
                });
            }
            allowed.insert(
                dir.id,
                AllowTarget {
                    level: dir.level,
                    action: act,
                },
            );
            allowed_paths.insert(dir.id, dir.path);
        }
    }
    crate::bpf::sync::level_window(allowed.values().map(|t| t.level))?;
    let mut list = if args.no_default_destinations {
        Vec::new()
    } else {
        destinations::defaults()
    };
    for spec in &args.protect {
        list.push(spec.parse::<Destination>()?);
    }
    Ok(Plan {
        attachment: Attachment {
            cgroup_root: root,
            attach_at: args.attach_at.as_ref().map(CgroupDir::open).transpose()?,
            pins: PinLayout::new(&args.pin_dir),
            udp: args.udp,
            deny_raw_sockets: args.deny_raw_sockets,
            judge_socket_creators: args.judge_socket_creators,
        },
        desired: MapState {
            mode: args.mode,
            allowed: Some(allowed),
            destinations: destinations::compile(&list)?,
        },
        allowed_paths,
    })
}

/// Runs until SIGINT/SIGTERM. On exit the programs stay attached and pinned:
/// enforcement must not depend on this process being alive. Removing it is
/// the explicit `uninstall` command.
pub async fn run(args: RunArgs) -> Result<()> {
    let plan = plan(&args)?;
    let root = plan.attachment.cgroup_root.clone();
    let start = || Enforcer::start(plan.attachment.clone(), &plan.desired);
    let (mut enforcer, _report) = start()?;
    let ring = enforcer.take_events()?;
    let names = CgroupNames::new(root.path.clone(), plan.allowed_paths.clone());
    let events = tokio::spawn(decisions::report(ring, names.clone(), None));

    // First attach (or re-adoption with a new list): close what the
    // denied cgroups already had open.
    let _revoker = (!args.no_revoke).then(|| {
        let (revoker, task) = revoke::task::spawn(
            revoke::task::Settings {
                root: root.clone(),
                netns_dirs: args.netns_dirs.clone(),
                resweep: Duration::from_secs(args.revoke_interval_secs.max(1)),
            },
            None,
            Some(Box::new(names)),
        );
        if let Some(policy) = revoke::sweep::EnforcedState::of(&plan.desired) {
            revoker.sweep(policy);
        }
        (revoker, task)
    });

    let wanted = enforcer.wanted_hooks();
    let hooks: Vec<&str> = wanted.iter().map(|h| h.name()).collect();
    info!(
        cgroup_root = %root.path.display(),
        pin_dir = %args.pin_dir.display(),
        mode = ?args.mode,
        hooks = ?hooks,
        allowed = plan.allowed_paths.len(),
        protected = plan.desired.destinations.entries.len(),
        "ready"
    );

    let mut term =
        tokio::signal::unix::signal(SignalKind::terminate()).map_err(|source| Error::Syscall {
            call: "sigaction(SIGTERM)",
            source,
        })?;
    let mut check = tokio::time::interval(Duration::from_secs(args.check_interval_secs.max(1)));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = check.tick() => {
                // Someone may have removed our pins/links: put them back.
                let attached = enforcer.attached_hooks()?;
                let missing: Vec<_> = wanted.iter().filter(|h| !attached.contains(h)).map(|h| h.name()).collect();
                if !missing.is_empty() {
                    warn!(?missing, "programs were detached behind our back; re-attaching");
                    let (e, _) = start()?;
                    enforcer = e;
                }
            }
        }
    }
    events.abort();
    info!(
        pin_dir = %args.pin_dir.display(),
        "exiting; enforcement stays attached and pinned (remove it with `imdsguard uninstall --pin-dir {}`)",
        args.pin_dir.display()
    );
    Ok(())
}

/// Standalone attribution: the cgroup path, resolved lazily by walking
/// below the root.
#[derive(Clone)]
struct CgroupNames {
    root: PathBuf,
    cache: HashMap<u64, String>,
}

impl CgroupNames {
    fn new(root: PathBuf, known: BTreeMap<u64, PathBuf>) -> Self {
        let cache = known
            .into_iter()
            .map(|(id, p)| (id, p.display().to_string()))
            .collect();
        Self { root, cache }
    }
}

impl Attributor for CgroupNames {
    fn attribute(&mut self, cgroup_id: u64) -> Attribution {
        if let Some(p) = self.cache.get(&cgroup_id) {
            return Attribution {
                cgroup: p.clone(),
                ..Default::default()
            };
        }
        let found = paths_of_ids(Path::new(&self.root), &[cgroup_id]);
        let name = found.get(&cgroup_id).map_or_else(
            || format!("(cgroup id {cgroup_id})"),
            |p| p.display().to_string(),
        );
        if self.cache.len() < 10_000 {
            self.cache.insert(cgroup_id, name.clone());
        }
        Attribution {
            cgroup: name,
            ..Default::default()
        }
    }
}
