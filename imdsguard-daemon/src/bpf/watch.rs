//! The link watch: a thread that asks the kernel every [`WATCH_EVERY`]
//! whether our links are still attached, and tells the owner task when one
//! is not. The owner task looks again itself and re-attaches.
//!
//! A thread of its own, not a timer on the async runtime: a runtime tick
//! ten times a second woke it about twice per tick and cost the idle agent
//! about 0.8 ms of CPU per second (BENCHMARKS.md, "The tamper window"),
//! where a thread's timed wait is one wake-up and two or so bpf(2) calls.
//! The thread reads duplicates of the held link fds and nothing else.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, Mutex, Weak},
    thread,
    time::Duration,
};

use crate::{
    Result,
    bpf::{hook::Hook, sys},
};

/// How often the held links are asked whether they are still attached.
/// A detached link lets every connect through until this check sees it:
/// this bounds that window. Each check is one bpf(2) call per link (2 to 6
/// links), ten times a second.
pub const WATCH_EVERY: Duration = Duration::from_millis(100);

/// The wanted hooks in `held` whose link is no longer attached to the
/// cgroup `at`: someone detached it (BPF_LINK_DETACH, `bpftool link
/// detach`), which leaves the link and its pin in place but sets its cgroup
/// to none (cgroup_id 0). One BPF_OBJ_GET_INFO_BY_FD per link and nothing
/// else: no path lookup, no fd opened or closed.
pub fn detached<'a>(
    held: impl IntoIterator<Item = (&'a Hook, &'a OwnedFd)>,
    at: u64,
) -> Result<Vec<Hook>> {
    let mut out = Vec::new();
    for (hook, fd) in held {
        if sys::link_info(fd.as_fd())?.cgroup_id != at {
            out.push(*hook);
        }
    }
    Ok(out)
}

/// The links the watch asks about: duplicates of the held fds, shared
/// with the owner task, which empties the list before it touches a link.
/// A duplicate keeps its link alive, so a link the owner lets go must not
/// linger here; the lock also means the list never changes mid-check.
type Watched = Mutex<Vec<(Hook, OwnedFd)>>;

/// The running watch. Dropping it stops the thread at its next wake-up.
pub struct LinkWatch {
    links: Arc<Watched>,
}

impl LinkWatch {
    /// Watches, every `every`, the links [`LinkWatch::set`] gives it on
    /// the cgroup `at`; a notice goes to `notify` for every check that
    /// finds one detached (or cannot ask), at most one waiting at a time.
    pub fn spawn(
        every: Duration,
        at: u64,
        notify: tokio::sync::mpsc::Sender<()>,
    ) -> io::Result<Self> {
        let links = Arc::new(Watched::default());
        let weak = Arc::downgrade(&links);
        thread::Builder::new()
            .name("link-watch".into())
            .spawn(move || run(every, at, &weak, &notify))?;
        Ok(Self { links })
    }

    /// Watches `links` from now on.
    pub fn set(&self, links: Vec<(Hook, OwnedFd)>) {
        *self.lock() = links;
    }

    /// Lets go of every link at once (their fds are closed on return).
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Hook, OwnedFd)>> {
        // A poisoned list is still a list of fds.
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn run(every: Duration, at: u64, links: &Weak<Watched>, notify: &tokio::sync::mpsc::Sender<()>) {
    loop {
        thread::sleep(every);
        let Some(links) = links.upgrade() else { return };
        let found = {
            let links = links.lock().unwrap_or_else(|p| p.into_inner());
            detached(links.iter().map(|(h, fd)| (h, fd)), at)
        };
        if !matches!(found, Ok(ref d) if d.is_empty()) {
            // A full channel means a notice is already waiting.
            let _ = notify.try_send(());
        }
    }
}
