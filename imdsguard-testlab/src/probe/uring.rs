//! io_uring: a connect or an unconnected UDP send issued by the ring, not
//! by a syscall of the probe, through a one-entry ring of the `io-uring`
//! crate (one SQE in, one CQE out).

use std::{io, net::SocketAddr, os::fd::AsRawFd as _};

use io_uring::{IoUring, opcode, squeue, types::Fd};

use super::{
    Outcome,
    socket::{UDP_PAYLOAD, bind_udp, recv_echo, setup_failed},
};

/// Which task issues the operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Issue {
    /// The submitting task itself, inside io_uring_enter(2).
    Inline,
    /// An io-wq worker thread (IOSQE_ASYNC).
    Worker,
    /// The ring's SQPOLL kernel thread (IORING_SETUP_SQPOLL); we only
    /// wake it and wait for the completion.
    SqPoll,
}

/// Submits `entry` on a new ring and waits for its completion. Ok holds
/// the CQE's `res` (negative errno on failure); Err means the ring itself
/// could not be set up or entered.
///
/// # Safety
/// Whatever `entry` points to (sockaddr, msghdr, buffers) must stay valid
/// until this returns.
pub(super) unsafe fn run_one(entry: squeue::Entry, issue: Issue) -> io::Result<i32> {
    let mut builder = IoUring::builder();
    if issue == Issue::SqPoll {
        builder.setup_sqpoll(1000);
    }
    let mut ring: IoUring = builder.build(1)?;
    let entry = match issue {
        Issue::Worker => entry.flags(squeue::Flags::ASYNC),
        Issue::Inline | Issue::SqPoll => entry,
    };
    // SAFETY: the caller keeps what the entry points to alive until we
    // have its completion, below.
    unsafe { ring.submission().push(&entry) }
        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    // With SQPOLL the kernel thread submits: this only wakes it and waits.
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("io_uring_enter returned without a completion"))?;
    Ok(cqe.result())
}

/// IORING_OP_CONNECT of the stream socket `fd` to `target`. Ok holds the
/// CQE's `res`, as [`run_one`].
pub(super) fn connect(fd: i32, target: &socket2::SockAddr, issue: Issue) -> io::Result<i32> {
    let entry = opcode::Connect::new(Fd(fd), target.as_ptr().cast(), target.len()).build();
    // SAFETY: `target` outlives the call.
    unsafe { run_one(entry, issue) }
}

/// An unconnected UDP send through IORING_OP_SENDMSG.
pub(super) fn udp_sendmsg(target: SocketAddr, issue: Issue) -> Outcome {
    let result = (|| {
        let sock = bind_udp(target.is_ipv4())?;
        let addr = socket2::SockAddr::from(target);
        let mut iov = libc::iovec {
            iov_base: UDP_PAYLOAD.as_ptr().cast_mut().cast(),
            iov_len: UDP_PAYLOAD.len(),
        };
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = addr.as_ptr().cast_mut().cast();
        msg.msg_namelen = addr.len();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        let entry = opcode::SendMsg::new(Fd(sock.as_raw_fd()), &raw const msg).build();
        // SAFETY: `msg`, `iov`, `addr` and the payload outlive the call.
        let res = unsafe { run_one(entry, issue) }.map_err(|e| setup_failed(&e, "io_uring"))?;
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            return Err(Outcome::from_io(&e, "IORING_OP_SENDMSG"));
        }
        Ok(recv_echo(&sock))
    })();
    result.unwrap_or_else(|o| o)
}
