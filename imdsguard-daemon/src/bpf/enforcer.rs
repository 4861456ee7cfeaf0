//! The enforcer owns the loaded object, the pinned maps and the links.
//!
//! Install and re-adoption are one path: load the embedded object reusing
//! every pinned map, write the desired state into the maps, then for each
//! hook either swap the program inside the existing pinned link
//! (BPF_LINK_UPDATE, atomic) or attach a new link and pin it. Programs are
//! never detached and maps never emptied on the way, so a restart or an
//! upgrade has no window of wrong verdicts. Maps are filled before the first
//! attach, so the programs never run with an empty protected set.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::OwnedFd,
};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use imdsguard_common::{Scope, map_names, scope_flag};
use serde::Serialize;
use tracing::info;

use crate::{
    Error, Result,
    bpf::{
        bpffs, filter_conns::ProxyTarget, hook::Hook, links, maps, migrate, object,
        pins::PinLayout, probe, watch,
    },
    cgroup::mount::CgroupDir,
    destinations::Compiled,
    vocabulary::Action,
};

/// Global default for cgroups without an allow entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny with EPERM and report.
    #[default]
    Enforce,
    /// Allow, but report what would have been denied.
    Audit,
}

impl Mode {
    pub const fn action(self) -> Action {
        match self {
            Mode::Enforce => Action::Enforce,
            Mode::Audit => Action::Audit,
        }
    }
}

/// One allow-map entry: which cgroup, at which level, with which action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AllowTarget {
    pub level: u32,
    pub action: Action,
}

/// Everything the maps should hold.
#[derive(Clone, Debug)]
pub struct MapState {
    pub mode: Mode,
    /// `None` keeps the pinned allow entries as they are: a restarted node
    /// agent does not know the allowed pods until its first full sync, and
    /// must not revoke them in the meantime.
    pub allowed: Option<BTreeMap<u64, AllowTarget>>,
    pub destinations: Compiled,
}

/// Where and how to attach.
#[derive(Clone, Debug)]
pub struct Attachment {
    /// The judged subtree: its processes need an allow entry.
    pub cgroup_root: CgroupDir,
    /// Where the programs are attached, when above `cgroup_root` (up to
    /// the hierarchy root): sockets that host processes create are then
    /// judged too when a pod uses them, at the price of every socket below
    /// this point running the programs. None attaches at `cgroup_root`.
    pub attach_at: Option<CgroupDir>,
    pub pins: PinLayout,
    pub udp: bool,
    /// Attach sock_create, in its variant that makes a raw socket need an
    /// allow entry.
    pub deny_raw_sockets: bool,
    /// Attach sock_create and have it record socket creators that are not
    /// allowed, so that connect() and sendmsg() judge them too.
    pub judge_socket_creators: bool,
    /// Filter mode: where filtered callers' metadata connections go, and
    /// sock_ops attached to key them. None: filtered callers are denied.
    pub filter: Option<ProxyTarget>,
}

impl Attachment {
    /// The cgroup the programs are attached to.
    pub fn attach_point(&self) -> &CgroupDir {
        self.attach_at.as_ref().unwrap_or(&self.cgroup_root)
    }

    /// Whether sock_create is attached at all.
    pub fn sock_create(&self) -> bool {
        self.deny_raw_sockets || self.judge_socket_creators
    }
}

/// Counter totals across CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    pub events_dropped: u64,
}

/// How each hook ended up attached by [`Enforcer::start`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartReport {
    pub attached: Vec<Hook>,
    pub replaced: Vec<Hook>,
    pub detached: Vec<Hook>,
    /// Pinned maps of another shape (an upgrade) that new maps replaced.
    pub maps_replaced: Vec<&'static str>,
}

pub struct Enforcer {
    pub(super) ebpf: Ebpf,
    pub(super) attachment: Attachment,
    /// An fd of each wanted hook's link, opened from its pin once the link
    /// is in place. [`Enforcer::detached_links`] asks the kernel about these
    /// fds, one bpf(2) call per link, with no path lookup: cheap enough to
    /// run every 100 ms. Holding them also keeps a link attached while its
    /// pin is missing, until the pin check makes a new one.
    pub(super) held: BTreeMap<Hook, OwnedFd>,
}

impl Enforcer {
    /// Installs or re-adopts the installation in `attachment.pins`. Pinned
    /// links of hooks this attachment does not want (sendmsg without `udp`,
    /// sock_create without `deny_raw_sockets` or `judge_socket_creators`)
    /// are detached.
    pub fn start(attachment: Attachment, desired: &MapState) -> Result<(Self, StartReport)> {
        let pins = &attachment.pins;
        let root = &attachment.cgroup_root;
        if root.level == 0 {
            // Attaching at the hierarchy root would judge every host process.
            return Err(Error::RootIsHierarchyRoot {
                path: root.path.clone(),
            });
        }
        let attach_point = attachment.attach_point();
        if !root.is_within(attach_point) {
            return Err(Error::AttachBelowRoot {
                attach_at: attach_point.path.clone(),
                root: root.path.clone(),
            });
        }
        probe::check_kernel_support()?;
        bpffs::ensure_on_bpffs(&pins.dir)?;
        for dir in [pins.maps_dir(), pins.links_dir()] {
            fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        }
        let migrate::Loaded { ebpf, replaced } = migrate::load(pins, object::bytes()?)?;
        let mut enforcer = Self {
            ebpf,
            attachment,
            held: BTreeMap::new(),
        };

        // A node agent starts without the allow set: what an upgrade's new
        // maps need from the old ones is carried over.
        let mut window = None;
        if desired.allowed.is_none() {
            if migrate::carries_allow_entries(&replaced) {
                let n = migrate::copy_allowed(&enforcer.attachment.pins, &mut enforcer.ebpf)?;
                info!(
                    entries = n,
                    "copied the allow entries into the new allow map"
                );
            }
            if migrate::carries_config(&replaced) {
                window = migrate::old_window(&enforcer.attachment.pins);
                info!(?window, "carried the level window into the new config");
            }
        }
        enforcer.write_state(desired, window)?;
        let mut report = enforcer.attach_all()?;
        // Only now, with our programs in every link, do the new maps take
        // the old ones' pins.
        migrate::repin(&enforcer.attachment.pins, &enforcer.ebpf, &replaced)?;
        report.maps_replaced = replaced;
        Ok((enforcer, report))
    }

    /// Writes everything `desired` says into the maps: the scope, the
    /// proxy, the protected destinations, the mode and (when known) the
    /// allow set. Each is a diff against what the map holds.
    /// `carried`: the level window of a config an upgrade replaces, for a
    /// start without the allow set.
    pub(super) fn write_state(
        &mut self,
        desired: &MapState,
        carried: Option<(u32, u32)>,
    ) -> Result<()> {
        self.write_scope()?;
        self.write_proxy()?;
        self.sync_destinations(&desired.destinations)?;
        match &desired.allowed {
            Some(allowed) => drop(self.sync_allowed(desired.mode, allowed)?),
            None => self.set_mode(desired.mode, carried)?,
        }
        Ok(())
    }

    pub fn attachment(&self) -> &Attachment {
        &self.attachment
    }

    /// Tells the programs which callers to judge. Written before any
    /// attach, like every map.
    fn write_scope(&mut self) -> Result<()> {
        let (root, at) = (&self.attachment.cgroup_root, self.attachment.attach_point());
        let (cgroup_id, level) = if at.id == root.id {
            (0, 0)
        } else {
            (root.id, root.level)
        };
        let flags = if self.attachment.judge_socket_creators {
            scope_flag::RECORD_CREATORS
        } else {
            0
        };
        let scope = Scope {
            cgroup_id,
            level,
            flags,
        };
        maps::ScopeMap::of(&mut self.ebpf)?.set(&scope)
    }

    /// The hooks this enforcer keeps attached.
    pub fn wanted_hooks(&self) -> Vec<Hook> {
        Hook::wanted(
            self.attachment.udp,
            self.attachment.sock_create(),
            self.attachment.filter.is_some(),
        )
    }

    pub fn counters(&self) -> Result<Counters> {
        maps::CounterMap::of(&self.ebpf)?.totals()
    }

    /// Hands the ring buffer to the event reader task. Call once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let name = map_names::EVENTS;
        let map = self.ebpf.take_map(name).ok_or(Error::MapMissing { name })?;
        RingBuf::try_from(map).map_err(|source| Error::Map { name, source })
    }

    /// The hooks whose pinned link is still attached to our cgroup root.
    /// Anything missing means someone detached us or removed a pin. This
    /// opens every pin: [`Enforcer::detached_links`] is the cheap check.
    pub fn attached_hooks(&self) -> Result<BTreeSet<Hook>> {
        links::attached_hooks(&self.attachment.pins, self.attachment.attach_point())
    }

    /// The wanted hooks whose held link is no longer attached to our
    /// cgroup ([`watch::detached`]): one bpf(2) call per link.
    pub fn detached_links(&self) -> Result<Vec<Hook>> {
        watch::detached(&self.held, self.attachment.attach_point().id)
    }

    /// Duplicates of the held link fds, for the link watch's thread.
    pub fn held_dups(&self) -> Result<Vec<(Hook, OwnedFd)>> {
        self.held
            .iter()
            .map(|(hook, fd)| {
                let dup = fd.try_clone().map_err(|source| Error::Syscall {
                    call: "dup(link)",
                    source,
                })?;
                Ok((*hook, dup))
            })
            .collect()
    }

    /// How many links [`Enforcer::detached_links`] asks about.
    pub fn held_links(&self) -> usize {
        self.held.len()
    }
}
