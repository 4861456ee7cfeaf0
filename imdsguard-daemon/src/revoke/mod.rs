//! Revocation: closing connections to protected destinations that their
//! owner is no longer allowed to hold.
//!
//! The sock_addr programs judge connect() and sendmsg(); a connection made
//! while its pod was allowed (or before imdsguard attached) outlives any
//! later change. After every change that takes an allow away, and once
//! after attaching, the daemon sweeps the sockets of every network
//! namespace used below the attach root and destroys (SOCK_DESTROY, as
//! `ss -K` does) those whose owner cgroup is now denied.

pub mod netns;
pub mod sock_diag;
pub mod sweep;
pub mod task;
