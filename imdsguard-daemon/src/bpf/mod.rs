//! The kernel side as userspace sees it: the embedded object, the pins on
//! bpffs, the raw bpf(2) calls aya lacks, the enforcer that loads, attaches
//! and syncs the maps, and the one task that owns it.

pub mod bpffs;
pub mod enforcer;
pub mod object;
pub mod owner;
pub mod pins;
pub mod sys;
