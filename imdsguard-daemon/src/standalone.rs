//! Standalone mode: a static allow list from the command line, no
//! Kubernetes. Used by systemd hosts, the demo and the tests.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use imdsguard_common::action;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{error, info, warn};

use crate::{
    Error, Result,
    cgroup::{CgroupDir, paths_of_ids},
    cli::RunArgs,
    destinations::{self, Destination},
    enforcer::{AllowTarget, Attachment, Desired, Enforcer},
    events::{Decision, Summarizer, Verdict},
    pins::{Hook, PinLayout},
};

/// Validated inputs of `run`.
#[derive(Clone, Debug)]
pub struct Plan {
    pub attachment: Attachment,
    pub desired: Desired,
    pub allowed_paths: BTreeMap<u64, PathBuf>,
}

/// Checks every input and resolves cgroup paths. Nothing is loaded yet, so
/// a bad flag never leaves a half-installed state behind.
pub fn plan(args: &RunArgs) -> Result<Plan> {
    let root = CgroupDir::open(&args.cgroup_root)?;
    let mut allowed = BTreeMap::new();
    let mut allowed_paths = BTreeMap::new();
    for (paths, act) in [
        (&args.allow_cgroup, action::ALLOW),
        (&args.audit_cgroup, action::AUDIT),
        (&args.enforce_cgroup, action::ENFORCE),
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
    crate::enforcer::level_window(allowed.values().map(|t| t.level))?;
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
            pins: PinLayout::new(&args.pin_dir),
            udp: args.udp,
        },
        desired: Desired {
            mode: args.mode,
            allowed,
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
    let (mut enforcer, _report) = Enforcer::start(plan.attachment.clone(), &plan.desired)?;
    let ring = enforcer.take_events()?;
    let events = tokio::spawn(report_events(
        ring,
        root.path.clone(),
        plan.allowed_paths.clone(),
    ));

    let hooks: Vec<&str> = Hook::wanted(args.udp).iter().map(|h| h.name()).collect();
    info!(
        cgroup_root = %root.path.display(),
        pin_dir = %args.pin_dir.display(),
        mode = ?args.mode,
        hooks = ?hooks,
        allowed = plan.desired.allowed.len(),
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
                let wanted = Hook::wanted(args.udp);
                let attached = enforcer.attached_hooks()?;
                let missing: Vec<_> = wanted.iter().filter(|h| !attached.contains(h)).map(|h| h.name()).collect();
                if !missing.is_empty() {
                    warn!(?missing, "programs were detached behind our back; re-attaching");
                    let (e, _) = Enforcer::start(plan.attachment.clone(), &plan.desired)?;
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

/// Reads decision events and logs them, summarising repeats.
async fn report_events(ring: RingBuf<MapData>, root: PathBuf, known: BTreeMap<u64, PathBuf>) {
    // SAFETY: the RingBuf owns its map fd for its whole life and always
    // returns that same fd from as_raw_fd().
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            error!(error = %e, "cannot poll the event ring buffer; decisions will only be counted");
            return;
        }
    };
    let mut names = CgroupNames::new(root, known);
    let mut summarizer = Summarizer::new(Duration::from_secs(10), Instant::now());
    let mut flush = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    let Some(d) = Decision::decode(&item) else { continue };
                    if summarizer.observe(&d) {
                        log_decision(&d, &names.path_of(d.cgroup_id));
                    }
                }
                guard.clear_ready();
            }
            _ = flush.tick() => {
                for s in summarizer.flush(Instant::now()) {
                    match s.key {
                        Some(k) => info!(
                            cgroup_id = k.cgroup_id,
                            cgroup = %names.path_of(k.cgroup_id),
                            destination = %k.destination,
                            verdict = %k.verdict,
                            hook = k.hook,
                            address_form = k.address_form,
                            repeats = s.suppressed,
                            "repeated metadata access (summarised)"
                        ),
                        None => warn!(repeats = s.suppressed, "metadata access from too many distinct sources to list (summarised)"),
                    }
                }
            }
        }
    }
}

fn log_decision(d: &Decision, cgroup: &str) {
    match d.verdict {
        Verdict::Denied => warn!(
            verdict = %d.verdict, cgroup_id = d.cgroup_id, cgroup, pid = d.tgid, tid = d.pid, comm = %d.comm,
            destination = %d.destination, protocol = d.protocol, hook = d.hook, address_form = d.address_form,
            "metadata access denied"
        ),
        Verdict::Audited => info!(
            verdict = %d.verdict, cgroup_id = d.cgroup_id, cgroup, pid = d.tgid, tid = d.pid, comm = %d.comm,
            destination = %d.destination, protocol = d.protocol, hook = d.hook, address_form = d.address_form,
            "metadata access would be denied (audit)"
        ),
    }
}

/// cgroup id → path, resolved lazily by walking below the root.
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

    fn path_of(&mut self, id: u64) -> String {
        if let Some(p) = self.cache.get(&id) {
            return p.clone();
        }
        let found = paths_of_ids(Path::new(&self.root), &[id]);
        let name = found
            .get(&id)
            .map_or_else(|| format!("(cgroup id {id})"), |p| p.display().to_string());
        if self.cache.len() < 10_000 {
            self.cache.insert(id, name.clone());
        }
        name
    }
}
