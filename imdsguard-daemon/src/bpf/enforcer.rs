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
    os::fd::AsFd as _,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, Program, ProgramError, ProgramFd,
        links::FdLink,
    },
};
use imdsguard_common::{
    AddrKey, AllowEntry, Config, LAYOUT_VERSION, MAX_ALLOWED, MAX_LEVEL_SPAN, PREFILTER_WORDS,
    Protected, Scope, SocketOwner, action, counter, map_names, scope_flag,
};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::{
    Error, Result,
    bpf::bpffs,
    bpf::object,
    bpf::pins::{Hook, PinLayout},
    bpf::sys,
    cgroup::mount::CgroupDir,
    destinations::Compiled,
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
    pub const fn action(self) -> u32 {
        match self {
            Mode::Enforce => action::ENFORCE,
            Mode::Audit => action::AUDIT,
        }
    }
}

/// One allow-map entry: which cgroup, at which level, with which action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AllowTarget {
    pub level: u32,
    pub action: u32,
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    pub events_dropped: u64,
}

/// What a sync changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub inserted: usize,
    pub updated: usize,
    pub removed: usize,
}

/// How each hook ended up attached by [`Enforcer::start`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartReport {
    pub attached: Vec<Hook>,
    pub replaced: Vec<Hook>,
    pub detached: Vec<Hook>,
}

const MAP_NAMES: [&str; 8] = [
    map_names::ALLOWED,
    map_names::PROTECTED,
    map_names::PREFILTER,
    map_names::CONFIG,
    map_names::COUNTERS,
    map_names::EVENTS,
    map_names::SOCKET_OWNER,
    map_names::SCOPE,
];

/// Expected (key, value) sizes of each pinned map; the ring buffer has none.
fn expected_layout(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    let s = |n: usize| n as u32;
    match name {
        map_names::ALLOWED => Some((8, s(size_of::<AllowEntry>()))),
        map_names::PROTECTED => Some((4 + s(size_of::<AddrKey>()), s(size_of::<Protected>()))),
        map_names::PREFILTER => Some((4, 8)),
        map_names::CONFIG => Some((4, s(size_of::<Config>()))),
        map_names::COUNTERS => Some((4, 8)),
        // Socket-local storage is keyed by a socket fd (an int).
        map_names::SOCKET_OWNER => Some((4, s(size_of::<SocketOwner>()))),
        map_names::SCOPE => Some((4, s(size_of::<Scope>()))),
        _ => None,
    }
}

pub struct Enforcer {
    ebpf: Ebpf,
    attachment: Attachment,
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
        check_kernel_support()?;
        bpffs::ensure_on_bpffs(&pins.dir)?;
        for dir in [pins.maps_dir(), pins.links_dir()] {
            fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        }
        check_pinned_layouts(pins)?;

        let object = object::bytes()?;
        let map_paths: Vec<_> = MAP_NAMES.iter().map(|n| (*n, pins.map(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(object).map_err(Error::Load)?;
        let mut enforcer = Self { ebpf, attachment };

        enforcer.write_scope()?;
        enforcer.sync_destinations(&desired.destinations)?;
        match &desired.allowed {
            Some(allowed) => drop(enforcer.sync_allowed(desired.mode, allowed)?),
            None => enforcer.set_mode(desired.mode)?,
        }
        let report = enforcer.attach_all()?;
        Ok((enforcer, report))
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
        let name = map_names::SCOPE;
        let mut map: Array<&mut MapData, Scope> =
            Array::try_from(self.map_mut(name)?).map_err(|source| Error::Map { name, source })?;
        map.set(0, &scope, 0)
            .map_err(|source| Error::Map { name, source })
    }

    /// The hooks this enforcer keeps attached.
    pub fn wanted_hooks(&self) -> Vec<Hook> {
        Hook::wanted(self.attachment.udp, self.attachment.sock_create())
    }

    fn attach_all(&mut self) -> Result<StartReport> {
        let mut report = StartReport::default();
        let root = self.attachment.attach_point().clone();
        let wanted = self.wanted_hooks();
        for hook in Hook::ALL {
            let pin = self.attachment.pins.link(hook);
            let existing = if pin.exists() {
                let fd = sys::obj_get(&pin)?;
                let raw = sys::link_info(fd.as_fd())?;
                debug!(
                    hook = hook.name(),
                    link_id = raw.id,
                    cgroup_id = raw.cgroup_id,
                    "found pinned link"
                );
                if raw.cgroup_id == 0 {
                    // The cgroup was removed; the link is defunct. Drop it.
                    warn!(
                        hook = hook.name(),
                        "pinned link's cgroup is gone; re-attaching"
                    );
                    fs::remove_file(&pin).map_err(Error::io("unpin", &pin))?;
                    None
                } else if raw.cgroup_id != root.id {
                    return Err(Error::LinkOnOtherCgroup {
                        path: pin.clone(),
                        found: raw.cgroup_id,
                        root: root.path.clone(),
                        want: root.id,
                    });
                } else {
                    Some(fd)
                }
            } else {
                None
            };

            if !wanted.contains(&hook) {
                if existing.is_some() {
                    // Removing the pin drops the last reference: the kernel
                    // detaches the program.
                    fs::remove_file(&pin).map_err(Error::io("unpin", &pin))?;
                    report.detached.push(hook);
                }
                continue;
            }

            let name = hook.program(self.attachment.deny_raw_sockets);
            let mut program = HookProgram::of(&mut self.ebpf, hook, name)?;
            program.load()?;
            match existing {
                Some(link) => {
                    sys::link_update(link.as_fd(), program.fd()?.as_fd(), None)?;
                    report.replaced.push(hook);
                }
                None => {
                    let cgroup =
                        fs::File::open(&root.path).map_err(Error::io("open", &root.path))?;
                    let fd = program.attach(&cgroup)?;
                    fd.pin(&pin).map_err(|source| Error::Pin {
                        path: pin.clone(),
                        source,
                    })?;
                    report.attached.push(hook);
                }
            }
        }
        info!(
            root = %root.path.display(),
            attached = ?report.attached,
            replaced = ?report.replaced,
            detached = ?report.detached,
            "programs in place"
        );
        Ok(report)
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or(Error::MapMissing { name })
    }

    /// Writes the protected set: trie entries first (insert/update, then
    /// remove extras), then the prefilter words that differ. A new
    /// destination becomes protected once both are in; a removed one stops
    /// matching as soon as its trie entry goes.
    pub fn sync_destinations(&mut self, compiled: &Compiled) -> Result<SyncReport> {
        let name = map_names::PROTECTED;
        let err = move |source| Error::Map { name, source };
        let mut report = SyncReport::default();
        {
            let mut trie: LpmTrie<&mut MapData, AddrKey, Protected> =
                LpmTrie::try_from(self.map_mut(name)?).map_err(err)?;
            let current: BTreeMap<(u32, AddrKey), Protected> = trie
                .iter()
                .filter_map(|r| r.ok())
                .map(|(k, v)| ((k.prefix_len(), k.data()), v))
                .collect();
            for (&(len, key), value) in &compiled.entries {
                match current.get(&(len, key)) {
                    Some(v) if v == value => continue,
                    Some(_) => report.updated += 1,
                    None => report.inserted += 1,
                }
                trie.insert(&Key::new(len, key), value, 0).map_err(err)?;
            }
            for &(len, key) in current.keys() {
                if !compiled.entries.contains_key(&(len, key)) {
                    trie.remove(&Key::new(len, key)).map_err(err)?;
                    report.removed += 1;
                }
            }
        }
        let name = map_names::PREFILTER;
        let err = move |source| Error::Map { name, source };
        let mut words: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(name)?).map_err(err)?;
        for i in 0..PREFILTER_WORDS {
            let want = compiled.prefilter[i as usize];
            if words.get(&i, 0).map_err(err)? != want {
                words.set(i, &want, 0).map_err(err)?;
            }
        }
        Ok(report)
    }

    fn read_config(&mut self) -> Result<Config> {
        let name = map_names::CONFIG;
        let cfg: Array<&mut MapData, Config> =
            Array::try_from(self.map_mut(name)?).map_err(|source| Error::Map { name, source })?;
        cfg.get(&0, 0).map_err(|source| Error::Map { name, source })
    }

    fn write_config(&mut self, value: Config) -> Result<()> {
        let name = map_names::CONFIG;
        let mut cfg: Array<&mut MapData, Config> =
            Array::try_from(self.map_mut(name)?).map_err(|source| Error::Map { name, source })?;
        cfg.set(0, &value, 0)
            .map_err(|source| Error::Map { name, source })
    }

    /// Makes the allow map equal `desired` without ever emptying it.
    ///
    /// The config's level window is first widened to cover both old and new
    /// entries, then entries are inserted/updated/removed one by one, then
    /// the window is narrowed to the new entries. An entry is therefore
    /// visible to the kernel from the moment it is written.
    pub fn sync_allowed(
        &mut self,
        mode: Mode,
        desired: &BTreeMap<u64, AllowTarget>,
    ) -> Result<SyncReport> {
        if desired.len() > MAX_ALLOWED as usize {
            return Err(Error::MapFull {
                what: "allowed cgroups",
                count: desired.len(),
                max: MAX_ALLOWED,
            });
        }
        let new_window = level_window(desired.values().map(|t| t.level))?;
        let old = self.read_config()?;
        let old_window = (old.layout_version == LAYOUT_VERSION && old.min_level <= old.max_level)
            .then_some((old.min_level, old.max_level));
        let union = match (old_window, new_window) {
            (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
            (a, b) => a.or(b),
        };
        let config = |w: Option<(u32, u32)>| Config {
            default_action: mode.action(),
            // An empty window is min > max.
            min_level: w.map_or(1, |w| w.0),
            max_level: w.map_or(0, |w| w.1),
            layout_version: LAYOUT_VERSION,
        };
        // The union may span more than the kernel walks; in that case the
        // deepest MAX_LEVEL_SPAN levels are walked, which only ever denies
        // more (never allows more) during the sync.
        self.write_config(config(union))?;

        let name = map_names::ALLOWED;
        let err = move |source| Error::Map { name, source };
        let mut report = SyncReport::default();
        {
            let mut map: HashMap<&mut MapData, u64, AllowEntry> =
                HashMap::try_from(self.map_mut(name)?).map_err(err)?;
            let current: BTreeMap<u64, AllowEntry> = map.iter().filter_map(|r| r.ok()).collect();
            for (&id, target) in desired {
                let entry = AllowEntry {
                    action: target.action,
                    _pad: 0,
                };
                match current.get(&id) {
                    Some(e) if *e == entry => continue,
                    Some(_) => report.updated += 1,
                    None => report.inserted += 1,
                }
                map.insert(&id, &entry, 0).map_err(err)?;
            }
            for id in current.keys() {
                if !desired.contains_key(id) {
                    map.remove(id).map_err(err)?;
                    report.removed += 1;
                }
            }
        }
        self.write_config(config(new_window))?;
        if report != SyncReport::default() {
            debug!(?report, "allow map synced");
        }
        Ok(report)
    }

    /// Sets the global default, keeping the allow entries and their window.
    pub fn set_mode(&mut self, mode: Mode) -> Result<()> {
        let old = self.read_config()?;
        let mut config = if old.layout_version == LAYOUT_VERSION {
            old
        } else {
            Config {
                min_level: 1,
                max_level: 0,
                layout_version: LAYOUT_VERSION,
                default_action: 0,
            }
        };
        config.default_action = mode.action();
        self.write_config(config)
    }

    pub fn counters(&self) -> Result<Counters> {
        read_counters(
            self.ebpf
                .map(map_names::COUNTERS)
                .ok_or(Error::MapMissing {
                    name: map_names::COUNTERS,
                })?,
        )
    }

    /// Hands the ring buffer to the event reader task. Call once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let name = map_names::EVENTS;
        let map = self.ebpf.take_map(name).ok_or(Error::MapMissing { name })?;
        RingBuf::try_from(map).map_err(|source| Error::Map { name, source })
    }

    /// The hooks whose pinned link is still attached to our cgroup root.
    /// Anything missing means someone detached us.
    pub fn attached_hooks(&self) -> Result<BTreeSet<Hook>> {
        attached_hooks(&self.attachment.pins, self.attachment.attach_point())
    }
}

/// A hook's program in the object, by kind: connect and sendmsg are
/// sock_addr programs, sock_create is a sock program.
enum HookProgram<'a> {
    SockAddr(Hook, &'a mut CgroupSockAddr),
    Sock(Hook, &'a mut CgroupSock),
}

impl<'a> HookProgram<'a> {
    fn of(ebpf: &'a mut Ebpf, hook: Hook, name: &'static str) -> Result<Self> {
        let err = move |source| Error::Program { name, source };
        let program: &mut Program = ebpf
            .program_mut(name)
            .ok_or(Error::ProgramMissing { name })?;
        Ok(match hook {
            Hook::Connect4 | Hook::Connect6 | Hook::Sendmsg4 | Hook::Sendmsg6 => {
                Self::SockAddr(hook, program.try_into().map_err(err)?)
            }
            Hook::SockCreate => Self::Sock(hook, program.try_into().map_err(err)?),
        })
    }

    /// Wraps an aya error with the hook's program name.
    fn error(&self) -> impl Fn(ProgramError) -> Error + use<> {
        let name = match self {
            Self::SockAddr(hook, _) | Self::Sock(hook, _) => hook.name(),
        };
        move |source| Error::Program { name, source }
    }

    fn load(&mut self) -> Result<()> {
        let err = self.error();
        match self {
            Self::SockAddr(_, p) => p.load(),
            Self::Sock(_, p) => p.load(),
        }
        .map_err(err)
    }

    fn fd(&self) -> Result<&ProgramFd> {
        let err = self.error();
        match self {
            Self::SockAddr(_, p) => p.fd(),
            Self::Sock(_, p) => p.fd(),
        }
        .map_err(err)
    }

    /// Attaches to `cgroup` and hands the link over to the caller, to pin.
    fn attach(&mut self, cgroup: &fs::File) -> Result<FdLink> {
        let err = self.error();
        // A cgroup bpf_link is always attached in multi mode (the kernel
        // adds BPF_F_ALLOW_MULTI itself) and rejects that flag in
        // link_create with EINVAL. aya's `Single` passes no flag, so it
        // yields exactly a multi-attach link: other tools' programs on this
        // cgroup stay in place and run alongside ours, and a deny from any
        // program wins.
        let mode = CgroupAttachMode::Single;
        // Only bpf_link attachments (kernel >= 5.7) can be pinned and so
        // outlive the daemon.
        let unsupported = |source| Error::KernelUnsupported {
            what: "cgroup bpf_link (Linux 5.7+), needed to keep enforcement pinned",
            source: std::io::Error::other(source),
        };
        match self {
            Self::SockAddr(_, p) => {
                let id = p.attach(cgroup, mode).map_err(&err)?;
                FdLink::try_from(p.take_link(id).map_err(&err)?).map_err(unsupported)
            }
            Self::Sock(_, p) => {
                let id = p.attach(cgroup, mode).map_err(&err)?;
                FdLink::try_from(p.take_link(id).map_err(&err)?).map_err(unsupported)
            }
        }
    }
}

/// Sums the per-CPU counters.
pub fn read_counters(map: &aya::maps::Map) -> Result<Counters> {
    let name = map_names::COUNTERS;
    let err = move |source| Error::Map { name, source };
    let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(err)?;
    let sum = |i: u32| -> Result<u64> { Ok(arr.get(&i, 0).map_err(err)?.iter().sum()) };
    Ok(Counters {
        allowed: sum(counter::ALLOWED)?,
        denied: sum(counter::DENIED)?,
        audited: sum(counter::AUDITED)?,
        events_dropped: sum(counter::EVENTS_DROPPED)?,
    })
}

/// Hooks whose pinned link exists and is attached to `root`.
pub fn attached_hooks(pins: &PinLayout, root: &CgroupDir) -> Result<BTreeSet<Hook>> {
    let mut out = BTreeSet::new();
    for hook in Hook::ALL {
        let pin = pins.link(hook);
        if !pin.exists() {
            continue;
        }
        let info = sys::link_info(sys::obj_get(&pin)?.as_fd())?;
        if info.cgroup_id == root.id && info.attach_type == hook.attach_type() {
            out.insert(hook);
        }
    }
    Ok(out)
}

/// (min, max) absolute level among the entries, or None when there are none.
pub fn level_window(levels: impl Iterator<Item = u32>) -> Result<Option<(u32, u32)>> {
    let mut window: Option<(u32, u32)> = None;
    for l in levels {
        window = Some(window.map_or((l, l), |(a, b)| (a.min(l), b.max(l))));
    }
    if let Some((min, max)) = window
        && max - min >= MAX_LEVEL_SPAN
    {
        return Err(Error::LevelSpanTooWide {
            min,
            max,
            span: MAX_LEVEL_SPAN,
        });
    }
    Ok(window)
}

/// Names the missing piece when the kernel cannot run us, instead of
/// failing later with a bare EINVAL from the loader.
fn check_kernel_support() -> Result<()> {
    use aya::{
        maps::MapType,
        programs::ProgramType,
        sys::{is_map_supported, is_program_supported},
    };
    let unsupported = |what, source| Error::KernelUnsupported { what, source };
    match is_program_supported(ProgramType::CgroupSockAddr) {
        Ok(true) => {}
        Ok(false) => {
            return Err(unsupported(
                "cgroup sock_addr programs (CONFIG_CGROUP_BPF)",
                std::io::ErrorKind::Unsupported.into(),
            ));
        }
        Err(e) => {
            return Err(unsupported(
                "cgroup sock_addr programs (probe failed)",
                std::io::Error::other(e),
            ));
        }
    }
    for (map, what) in [
        (MapType::RingBuf, "ring buffer maps (Linux 5.8+)"),
        (MapType::LpmTrie, "LPM trie maps"),
    ] {
        if !is_map_supported(map).map_err(|e| unsupported(what, std::io::Error::other(e)))? {
            return Err(unsupported(what, std::io::ErrorKind::Unsupported.into()));
        }
    }
    Ok(())
}

/// Refuses pinned maps whose layout differs from this build's.
fn check_pinned_layouts(pins: &PinLayout) -> Result<()> {
    for name in MAP_NAMES {
        let path = pins.map(name);
        let Some((want_key, want_value)) = expected_layout(name) else {
            continue;
        };
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| Error::Map { name, source })?;
        if info.key_size() != want_key || info.value_size() != want_value {
            return Err(Error::PinnedMapLayout {
                name,
                found_key: info.key_size(),
                found_value: info.value_size(),
                want_key,
                want_value,
            });
        }
    }
    Ok(())
}

/// What [`uninstall`] removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UninstallReport {
    pub links: Vec<String>,
    pub maps: Vec<String>,
}

/// Detaches every link, then unpins the maps and removes the directories.
/// Links go first so no program runs against a half-removed installation.
pub fn uninstall(pins: &PinLayout) -> Result<UninstallReport> {
    let mut report = UninstallReport::default();
    if !pins.dir.exists() {
        return Ok(report);
    }
    bpffs::ensure_on_bpffs(&pins.dir)?;
    for hook in Hook::ALL {
        let pin = pins.link(hook);
        if pin.exists() {
            fs::remove_file(&pin).map_err(Error::io("unpin", &pin))?;
            report.links.push(hook.name().into());
        }
    }
    for name in MAP_NAMES {
        let pin = pins.map(name);
        if pin.exists() {
            fs::remove_file(&pin).map_err(Error::io("unpin", &pin))?;
            report.maps.push(name.into());
        }
    }
    for dir in [pins.links_dir(), pins.maps_dir(), pins.dir.clone()] {
        if dir.exists() {
            fs::remove_dir(&dir).map_err(Error::io("remove", &dir))?;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_window_spans_entries() {
        assert_eq!(level_window([].into_iter()).unwrap(), None);
        assert_eq!(level_window([3, 5, 4].into_iter()).unwrap(), Some((3, 5)));
        assert!(matches!(
            level_window([1, 1 + MAX_LEVEL_SPAN].into_iter()),
            Err(Error::LevelSpanTooWide { .. })
        ));
    }
}
