//! The socket()+close() cost loop of the sock_create benchmark.

use std::{net::SocketAddr, time::Instant};

use serde::{Deserialize, Serialize};

/// Time per socket()+close() of a datagram socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SocketLoopReport {
    pub iterations: u32,
    pub ns_per_socket: f64,
    /// socket() calls that failed (none should).
    pub failed: u64,
}

/// `iterations` × socket(SOCK_DGRAM)+close() in `target`'s family, after a
/// tenth as many to warm up.
pub(super) fn socket_loop(target: SocketAddr, iterations: u32) -> SocketLoopReport {
    let family = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let mut failed = 0;
    let mut once = || {
        // SAFETY: plain socket(2) and close(2) of the fd it returned.
        unsafe {
            let fd = libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                failed += 1;
            } else {
                libc::close(fd);
            }
        }
    };
    for _ in 0..iterations / 10 {
        once();
    }
    let start = Instant::now();
    for _ in 0..iterations {
        once();
    }
    let elapsed = start.elapsed();
    SocketLoopReport {
        iterations,
        ns_per_socket: elapsed.as_nanos() as f64 / f64::from(iterations.max(1)),
        failed,
    }
}
