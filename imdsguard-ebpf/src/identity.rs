//! Socket identity: a socket carries its creator's rights, not the rights of
//! whoever holds it now.
//!
//! The kernel runs sock_addr programs for the socket's cgroup (the one that
//! created it), but a socket can change hands: SCM_RIGHTS, pidfd_getfd(), or
//! an fd inherited across fork/exec into another cgroup. Judging only the
//! calling task would let a denied pod hand its socket to an allowed one,
//! have it connect, and keep talking through its own copy of the fd.
//! Judging only the creator would let an allowed pod's socket do the work
//! for a denied holder. So connect() and sendmsg() take the stricter of the
//! two, and sock_create records the creator's action in socket-local
//! storage.
//!
//! Recording costs an allocation per socket() of every pod that is not
//! allowed, so it is opt-in (`--judge-socket-creators`); without it the
//! caller alone is judged, which already keeps an allowed creator's (or a
//! host process's) rights from travelling with the socket.
//!
//! Only creators that are not allowed get a record; a socket without one
//! is judged on its caller alone. That is deliberate: sockets the kernel
//! creates for a process, which sock_create never sees, must not be denied
//! to an allowed pod. MPTCP subflows are such sockets (connect() runs the
//! hook on the first subflow, not on the MPTCP socket), and so are AF_SMC's
//! internal TCP sockets and sockets opened before imdsguard attached.
use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::generated::bpf_sk_storage_get,
    macros::btf_map,
    programs::{SockAddrContext, SockContext},
};
use imdsguard_common::{SocketOwner, action};

use crate::caller::CallerAction;

/// A BTF-defined map: the kernel requires BTF key and value types for
/// socket-local storage, which the legacy `maps` section cannot carry.
#[btf_map(name = "IMDSG_SOCKET_OWNER")]
static SOCKET_OWNER: SkStorage<SocketOwner> = SkStorage::new();

/// sock_create: stamps the new socket when its creator is not allowed.
#[inline(always)]
pub fn stamp(ctx: &SockContext, creator: CallerAction) {
    // A host process's socket (outside the judged subtree) gets no record
    // either: a pod that uses it is judged on its own action.
    if !creator.judged || creator.action == action::ALLOW {
        return;
    }
    let mut owner = SocketOwner {
        action: creator.action,
    };
    // The raw helper, because aya-ebpf's `SkStorage` (0.2.1, and 0.3.0 too:
    // `get_or_insert_ptr_mut`) takes only a `SockAddrContext`, never a
    // `SockContext`, and its map pointer (`as_ptr`) is crate-private.
    // SAFETY: for a cgroup sock program the context is the socket itself
    // (the kernel's bpf_sk_storage_get_cg_sock_proto takes PTR_TO_CTX), and
    // `owner` is a stack value the helper copies into the new storage. The
    // result is not needed: on failure (out of memory) the socket has no
    // record and is judged on its caller, who is the creator here.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCKET_OWNER).cast_mut().cast(),
            ctx.sock.cast(),
            core::ptr::from_mut(&mut owner).cast(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        );
    }
}

/// The socket creator's action, when it was recorded (not allowed).
#[inline(always)]
pub fn creator_action(ctx: &SockAddrContext) -> Option<u32> {
    // A lookup without create; the kernel checks that the context's socket
    // is a full socket. Safe since aya-ebpf 0.3 (it was `unsafe` in 0.2).
    let owner = SOCKET_OWNER.get_ptr_mut(ctx);
    if owner.is_null() {
        return None;
    }
    // SAFETY: non-null means a valid storage value for this socket.
    Some(unsafe { (*owner).action })
}
