//! The interface to the kernel: which cgroup made a proxied connection,
//! and where it was going. The proxy never trusts the source address or a
//! header for this; only what the connect programs recorded.

use std::net::SocketAddr;

/// Who made a proxied connection, as the kernel recorded it at connect() time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The caller's own cgroup, for attribution and logs.
    pub caller_cgroup: u64,
    /// The cgroup holding the policy entry that said filter; rules are
    /// keyed by it.
    pub entry_cgroup: u64,
    /// The metadata ip:port the caller connected to.
    pub upstream: SocketAddr,
}

pub trait ConnIdentity: Send + Sync + 'static {
    /// `peer` is the accepted socket's remote address, `local` its local one.
    fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> crate::Result<Option<Origin>>;
}
