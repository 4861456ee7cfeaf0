//! Our cgroup links: attaching each hook's program, swapping the program
//! inside a pinned link, and finding which pinned links are still attached.

use std::{
    collections::BTreeSet,
    fs, io,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, Program, ProgramError, ProgramFd, SockOps,
        links::FdLink,
    },
};
use tracing::{debug, info, warn};

use crate::{
    Error, Result,
    bpf::{
        enforcer::{Enforcer, MapState, StartReport},
        hook::Hook,
        pins::PinLayout,
        sys,
    },
    cgroup::mount::CgroupDir,
};

impl Enforcer {
    pub(super) fn attach_all(&mut self) -> Result<StartReport> {
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
            let held = match existing {
                Some(link) => {
                    sys::link_update(link.as_fd(), program.fd()?.as_fd(), None)?;
                    report.replaced.push(hook);
                    link
                }
                None => {
                    let cgroup =
                        fs::File::open(&root.path).map_err(Error::io("open", &root.path))?;
                    let link = program.attach(&cgroup)?;
                    report.attached.push(hook);
                    pin_link(link, &pin)?
                }
            };
            self.held.insert(hook, held);
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
}

impl Enforcer {
    /// Puts `hooks` back on our cgroup after tampering, with the programs
    /// already loaded: a new link each, no reload and no verifier run. A
    /// detached link cannot be revived (BPF_LINK_UPDATE on it fails with
    /// ENOLINK), so it is replaced. The new link is attached first, so
    /// enforcement is back before any pin changes; then the old link is
    /// let go (a link whose pin was removed is detached now, leaving one
    /// program of ours on the hook), and the new one takes its pin. Last,
    /// `desired` is written into the maps again, in case they were touched
    /// too.
    pub fn relink(&mut self, hooks: &[Hook], desired: &MapState) -> Result<()> {
        let root = self.attachment.attach_point().clone();
        let cgroup = fs::File::open(&root.path).map_err(Error::io("open", &root.path))?;
        for &hook in hooks {
            let name = hook.program(self.attachment.deny_raw_sockets);
            let link = HookProgram::of(&mut self.ebpf, hook, name)?.attach(&cgroup)?;
            drop(self.held.remove(&hook));
            let pin = self.attachment.pins.link(hook);
            match fs::remove_file(&pin) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(Error::io("unpin", &pin)(e));
                }
                _ => {}
            }
            let held = pin_link(link, &pin)?;
            self.held.insert(hook, held);
        }
        self.write_state(desired, None)
    }
}

/// Pins a new link and opens it again from the pin: aya's `FdLink` keeps
/// its fd to itself, and the held fd is what the cheap check asks about.
fn pin_link(link: FdLink, pin: &Path) -> Result<OwnedFd> {
    // Dropping the returned PinnedLink closes aya's fd; the pin holds the link.
    drop(link.pin(pin).map_err(|source| Error::Pin {
        path: pin.to_path_buf(),
        source,
    })?);
    sys::obj_get(pin)
}

/// A hook's program in the object, by kind: connect and sendmsg are
/// sock_addr programs, sock_create is a sock program, filter mode's
/// connection keeper a sock_ops one.
enum HookProgram<'a> {
    SockAddr(Hook, &'a mut CgroupSockAddr),
    Sock(Hook, &'a mut CgroupSock),
    SockOps(Hook, &'a mut SockOps),
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
            Hook::SockOps => Self::SockOps(hook, program.try_into().map_err(err)?),
        })
    }

    /// Wraps an aya error with the hook's program name.
    fn error(&self) -> impl Fn(ProgramError) -> Error + use<> {
        let name = match self {
            Self::SockAddr(hook, _) | Self::Sock(hook, _) | Self::SockOps(hook, _) => hook.name(),
        };
        move |source| Error::Program { name, source }
    }

    fn load(&mut self) -> Result<()> {
        let err = self.error();
        match self {
            Self::SockAddr(_, p) => p.load(),
            Self::Sock(_, p) => p.load(),
            Self::SockOps(_, p) => p.load(),
        }
        .map_err(err)
    }

    fn fd(&self) -> Result<&ProgramFd> {
        let err = self.error();
        match self {
            Self::SockAddr(_, p) => p.fd(),
            Self::Sock(_, p) => p.fd(),
            Self::SockOps(_, p) => p.fd(),
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
            Self::SockOps(_, p) => {
                let id = p.attach(cgroup, mode).map_err(&err)?;
                FdLink::try_from(p.take_link(id).map_err(&err)?).map_err(unsupported)
            }
        }
    }
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
