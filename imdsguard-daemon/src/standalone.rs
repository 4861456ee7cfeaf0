//! Standalone mode: a static allow list from the command line, no
//! Kubernetes. Used by systemd hosts, the demo and the tests. It is only a
//! desired-state source: [`plan`] turns the flags into one fixed
//! [`MapState`], and the runtime the node agent uses too
//! ([`crate::runtime`]) enforces it.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::info;

use crate::{
    Error, Result,
    bpf::{
        enforcer::{AllowTarget, Attachment, MapState},
        owner,
    },
    cgroup::mount::CgroupDir,
    cgroup::subtree::paths_of_ids,
    cli::args::RunArgs,
    decisions::{Attribution, Attributor},
    destinations::{self, Destination},
    filter::{listen, rules::FilterRules},
    runtime::{self, FilterProxy, MetricsServer, Signals},
    vocabulary::Action,
};

/// Validated inputs of `run`.
#[derive(Clone, Debug)]
pub struct Plan {
    pub attachment: Attachment,
    pub desired: MapState,
    pub allowed_paths: BTreeMap<u64, PathBuf>,
    /// Filter mode, with `--filter-cgroup` or `--proxy-listen`.
    pub filter: Option<FilterPlan>,
}

/// The proxy's addresses and what each filter entry may read.
#[derive(Clone, Debug)]
pub struct FilterPlan {
    pub listen: Vec<SocketAddr>,
    /// Every `--filter-cgroup` reads the same profiles and paths.
    pub rules: HashMap<u64, Arc<FilterRules>>,
}

/// Checks every input and resolves cgroup paths. Nothing is loaded yet, so
/// a bad flag never leaves a half-installed state behind.
pub fn plan(args: &RunArgs) -> Result<Plan> {
    let root = CgroupDir::open(&args.cgroup_root)?;
    let mut allowed = BTreeMap::new();
    let mut allowed_paths = BTreeMap::new();
    // One static set of cgroups per action; a new set is one more row.
    for (paths, act) in [
        (&args.allow_cgroup, Action::Allow),
        (&args.audit_cgroup, Action::Audit),
        (&args.enforce_cgroup, Action::Enforce),
        (&args.filter_cgroup, Action::Filter),
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
    let filter = filter_plan(args, &allowed)?;
    let mut list = if args.no_default_destinations {
        Vec::new()
    } else {
        destinations::defaults()
    };
    for spec in &args.protect {
        list.push(spec.parse::<Destination>()?);
    }
    let mut attachment = runtime::attachment(&args.enforcement, root)?;
    attachment.filter = filter
        .as_ref()
        .map(|f| listen::target(&f.listen))
        .transpose()?;
    Ok(Plan {
        attachment,
        desired: MapState {
            mode: args.mode,
            allowed: Some(allowed),
            destinations: destinations::compile(&list)?,
        },
        allowed_paths,
        filter,
    })
}

/// The filter flags, checked: profiles and paths need filter cgroups and
/// the other way round, every profile must exist and no pattern may reach
/// a never-allowed path. The proxy listens on loopback unless told.
fn filter_plan(args: &RunArgs, allowed: &BTreeMap<u64, AllowTarget>) -> Result<Option<FilterPlan>> {
    let lists = !args.filter_profile.is_empty() || !args.filter_path.is_empty();
    if args.filter_cgroup.is_empty() {
        if lists {
            return Err(Error::FilterFlags {
                problem: "--filter-profile and --filter-path need a --filter-cgroup to apply to",
            });
        }
        if args.enforcement.proxy_listen.is_empty() {
            return Ok(None);
        }
    } else if !lists {
        return Err(Error::FilterFlags {
            problem: "--filter-cgroup needs a --filter-profile or --filter-path: with neither it would read nothing; use --enforce-cgroup",
        });
    }
    let rules = Arc::new(FilterRules::compile(
        &args.filter_profile,
        &args.filter_path,
    )?);
    let listen = if args.enforcement.proxy_listen.is_empty() {
        vec![
            listen::DEFAULT_STANDALONE
                .parse()
                .expect("the default is a valid address"),
        ]
    } else {
        args.enforcement.proxy_listen.clone()
    };
    let rules = allowed
        .iter()
        .filter(|(_, t)| t.action == Action::Filter)
        .map(|(id, _)| (*id, rules.clone()))
        .collect();
    Ok(Some(FilterPlan { listen, rules }))
}

/// Runs until SIGINT/SIGTERM: the shared runtime ([`runtime`]) with a
/// desired state that never changes. On exit the programs stay attached
/// and pinned.
pub async fn run(args: RunArgs) -> Result<()> {
    let plan = plan(&args)?;
    let mut signals = Signals::install()?;
    let filtering = plan.filter.is_some();
    let endpoints = runtime::endpoints(runtime::wanted_hooks(&args.enforcement, filtering).len());
    // Bound before anything is attached: see `FilterProxy`.
    let listeners = match &plan.filter {
        Some(f) => Some(listen::bind(&f.listen).await?),
        None => None,
    };
    let server = match args.metrics_addr {
        Some(addr) => Some(MetricsServer::bind(addr, endpoints.clone()).await?),
        None => None,
    };
    let root = plan.attachment.cgroup_root.clone();
    let hooks: Vec<&str> = runtime::wanted_hooks(&args.enforcement, filtering)
        .iter()
        .map(|h| h.name())
        .collect();
    let (allowed, protected) = (
        plan.allowed_paths.len(),
        plan.desired.destinations.entries.len(),
    );
    let names = CgroupNames::new(root.path.clone(), plan.allowed_paths);
    let pins = plan.attachment.pins.clone();
    let destinations = plan.desired.destinations.clone();
    let proxy_names = Arc::new(Mutex::new(names.clone()));
    let running = runtime::start(
        plan.attachment,
        plan.desired,
        runtime::Settings {
            checks: owner::LinkChecks {
                watch_every: owner::WATCH_EVERY,
                check_every: Duration::from_secs(args.check_interval_secs.max(1)),
            },
            revoke: runtime::revoke_settings(&args.revoke, &root, &args.netns_dirs),
        },
        &endpoints,
        names.clone(),
        Box::new(names),
    )?;
    let proxy = match (listeners, plan.filter) {
        (Some(listeners), Some(f)) => {
            let proxy = FilterProxy::start(
                listeners,
                &pins,
                destinations,
                &endpoints.metrics,
                move |id| {
                    proxy_names
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .attribute(id)
                },
                None,
            )?;
            proxy.rules.replace(f.rules);
            Some(proxy)
        }
        _ => None,
    };
    // The whole allow set is in the map from the start.
    endpoints.health.set_synced();
    info!(
        cgroup_root = %root.path.display(),
        pin_dir = %args.enforcement.pin_dir.display(),
        mode = ?args.mode,
        hooks = ?hooks,
        allowed,
        protected,
        metrics_addr = server.as_ref().map(|s| tracing::field::display(s.addr())),
        "ready"
    );
    running.until_stopped(Vec::new(), &mut signals).await;
    if let Some(proxy) = proxy {
        proxy.stop().await;
    }
    if let Some(server) = server {
        server.stop().await;
    }
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
