//! The cgroup hooks we attach, and which program each runs.

use imdsguard_common::hook;

use crate::{bpf::sys::attach_type, vocabulary::kernel_enum};

kernel_enum! {
    /// A cgroup hook we attach: the sock_addr hooks, the opt-in
    /// sock_create (a cgroup sock program) that denies raw sockets and
    /// records socket creators, and filter mode's sock_ops program, which
    /// keys each connection sent to the proxy by its 4-tuple. Its name is the file name of the link pin,
    /// the program name in the object (but see [`Hook::program`]), and what
    /// an event's `hook` says.
    pub enum Hook("hook") {
        Connect4 = hook::CONNECT4 => "connect4",
        Connect6 = hook::CONNECT6 => "connect6",
        Sendmsg4 = hook::SENDMSG4 => "sendmsg4",
        Sendmsg6 = hook::SENDMSG6 => "sendmsg6",
        SockCreate = hook::SOCK_CREATE => "sock_create",
        SockOps = hook::SOCK_OPS => "sock_ops",
    }
}

impl Hook {
    pub const fn attach_type(self) -> u32 {
        match self {
            Hook::Connect4 => attach_type::INET4_CONNECT,
            Hook::Connect6 => attach_type::INET6_CONNECT,
            Hook::Sendmsg4 => attach_type::UDP4_SENDMSG,
            Hook::Sendmsg6 => attach_type::UDP6_SENDMSG,
            Hook::SockCreate => attach_type::INET_SOCK_CREATE,
            Hook::SockOps => attach_type::SOCK_OPS,
        }
    }

    /// The program attached for this hook. sock_create has two: the
    /// identity-only one, and one that also denies raw sockets; switching
    /// between them is a BPF_LINK_UPDATE of the same link.
    pub const fn program(self, deny_raw_sockets: bool) -> &'static str {
        match self {
            Hook::SockCreate if deny_raw_sockets => "sock_create_raw",
            Hook::SockOps => "filter_conns",
            _ => self.name(),
        }
    }

    /// The hooks attached: connect always; sendmsg only with UDP
    /// enforcement, because any attached sendmsg program makes every UDP
    /// send on the machine take the socket lock for the check; sock_create
    /// only when raw sockets are denied or socket creators recorded, as it
    /// runs on every socket() below the attach point; sock_ops only in
    /// filter mode (with a proxy), as it runs on every TCP connect.
    pub fn wanted(udp: bool, sock_create: bool, filter: bool) -> Vec<Hook> {
        let mut hooks = vec![Hook::Connect4, Hook::Connect6];
        if udp {
            hooks.extend([Hook::Sendmsg4, Hook::Sendmsg6]);
        }
        if sock_create {
            hooks.push(Hook::SockCreate);
        }
        if filter {
            hooks.push(Hook::SockOps);
        }
        hooks
    }

    pub fn from_attach_type(t: u32) -> Option<Hook> {
        Self::ALL.into_iter().find(|h| h.attach_type() == t)
    }
}
