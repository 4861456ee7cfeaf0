//! The kernel side as userspace sees it: the embedded object, the hooks and
//! their links, the pinned maps and their pins on bpffs, the raw bpf(2)
//! calls aya lacks, and the enforcer that loads, attaches and syncs them.
//! [`owner`] is the one task that owns the enforcer and takes commands,
//! told by [`watch`]'s thread when a link is detached;
//! [`allow_walk`] replays the kernel's allow walk for `explain` and the sweep.

pub mod allow_walk;
pub mod bpffs;
pub mod enforcer;
pub mod filter_conns;
pub mod hook;
pub mod links;
pub mod maps;
mod migrate;
pub mod object;
pub mod owner;
pub mod pins;
mod probe;
pub mod sync;
pub mod sys;
pub mod uninstall;
pub mod watch;
