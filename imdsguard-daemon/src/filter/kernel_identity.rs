//! [`ConnIdentity`] from the kernel's record of each redirected connection
//! (see `bpf::filter_conns`).

use std::net::SocketAddr;

use super::identity::{ConnIdentity, Origin};
use crate::{Result, bpf::filter_conns::FilterConns};

impl ConnIdentity for FilterConns {
    fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Result<Option<Origin>> {
        Ok(self.take(peer, local)?.map(|o| Origin {
            caller_cgroup: o.caller_cgroup,
            entry_cgroup: o.entry_cgroup,
            upstream: o.upstream,
        }))
    }
}
