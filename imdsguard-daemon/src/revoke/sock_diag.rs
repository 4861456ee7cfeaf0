//! A minimal NETLINK_SOCK_DIAG client: the interface `ss` dumps sockets
//! with, and `ss -K` destroys them with.
//!
//! A netlink socket answers for the network namespace it was created in, so
//! a [`SockDiag`] sees the namespace of the thread that called
//! [`SockDiag::open`]; [`super::netns::in_netns`] reaches other ones. The
//! messages are framed and parsed by netlink-packet-sock-diag over a
//! netlink-sys socket. Replies are untrusted bytes: malformed input is an
//! `io::Error` (`InvalidData`), never a panic.

use std::{cell::Cell, fmt, io, net::SocketAddr};

use netlink_packet_core::{
    DecodeError, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable, Nla as _,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

use crate::vocabulary::Protocol;

/// `linux/inet_diag.h`: the u64 cgroup v2 id the kernel adds, unrequested,
/// for full sockets. netlink-packet-sock-diag has no variant for it, so it
/// arrives as [`Nla::Other`].
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `net/tcp_states.h`.
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;
/// Every TCP state but LISTEN and CLOSE: sockets that hold, are making or
/// are tearing down a connection. Kept as raw bits: [`StateFlags`] names
/// only the classic states, and the kernel's newer ones (NEW_SYN_RECV,
/// BOUND_INACTIVE) must stay in the filter.
const TCP_CONNECTION_STATES: u32 = !((1 << TCP_LISTEN) | (1 << TCP_CLOSE));
/// The kernel sizes dump chunks for a 32 KiB reader; twice that leaves room,
/// and MSG_TRUNC still reveals a reply that did not fit.
const RECV_BUF_LEN: usize = 64 * 1024;

macro_rules! malformed {
    ($($fmt:tt)*) => {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed sock_diag reply: {}", format_args!($($fmt)*)),
        )
    };
}

fn decode_error(e: DecodeError) -> io::Error {
    malformed!("{e}")
}

/// One socket from a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    pub transport: Protocol,
    /// `libc::AF_INET` or `libc::AF_INET6`.
    pub family: u8,
    /// The kernel's TCP state numbers (ESTABLISHED = 1); a connected UDP
    /// socket shows ESTABLISHED, an unconnected one CLOSE.
    pub state: u8,
    pub src: SocketAddr,
    /// IPv4-mapped addresses of AF_INET6 sockets stay as the kernel gives them.
    pub dst: SocketAddr,
    /// `INET_DIAG_CGROUP_ID`: the cgroup v2 id of the socket's creator.
    /// Absent for TIME_WAIT and SYN_RECV entries, which have no owner.
    pub cgroup_id: Option<u64>,
    pub inode: u32,
    pub uid: u32,
    /// The identity as dumped, cookie included, so that a destroy hits this
    /// socket and never a later one that reuses its addresses.
    id: SocketId,
}

#[cfg(test)]
impl DiagSocket {
    /// A socket as a dump would describe it, for tests of what to revoke.
    pub(crate) fn for_tests(
        transport: Protocol,
        src: SocketAddr,
        dst: SocketAddr,
        cgroup_id: Option<u64>,
    ) -> Self {
        let (family, id) = if dst.is_ipv4() {
            (libc::AF_INET, SocketId::new_v4())
        } else {
            (libc::AF_INET6, SocketId::new_v6())
        };
        Self {
            transport,
            family: family as u8,
            state: 1,
            src,
            dst,
            cgroup_id,
            inode: 0,
            uid: 0,
            id,
        }
    }
}

/// What [`SockDiag::destroy`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destroyed {
    Closed,
    /// The kernel found no such socket (ENOENT): it closed since the dump.
    Gone,
}

fn context(what: impl fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Runs a socket call, retrying on EINTR.
fn retry_eintr<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// A NETLINK_SOCK_DIAG socket. Not `Sync`: replies are matched to requests
/// by sequence number, and threads sharing one socket would consume each
/// other's replies.
#[derive(Debug)]
pub struct SockDiag {
    /// Never cloned: netlink-sys's `Socket` is `Clone` over a raw fd that
    /// each copy closes on drop.
    socket: Socket,
    seq: Cell<u32>,
}

impl SockDiag {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let socket =
            Socket::new(NETLINK_SOCK_DIAG).map_err(context("open NETLINK_SOCK_DIAG socket"))?;
        let seq = Cell::new(0);
        Ok(Self { socket, seq })
    }

    /// Every socket of `transport`/`family` in the namespace except TCP
    /// LISTEN and CLOSE, i.e. connections only. UDP sockets come in every
    /// state; the connected ones have a nonzero destination port.
    ///
    /// After an error, open a new `SockDiag`: while an abandoned dump is
    /// pending, the kernel refuses another (EBUSY).
    pub fn dump(&self, transport: Protocol, family: u8) -> io::Result<Vec<DiagSocket>> {
        let what = format!("sock_diag dump of {transport} sockets of family {family}");
        let any = match i32::from(family) {
            libc::AF_INET => SocketId::new_v4(),
            libc::AF_INET6 => SocketId::new_v6(),
            _ => {
                let e = io::Error::new(io::ErrorKind::InvalidInput, "not AF_INET or AF_INET6");
                return Err(context(what)(e));
            }
        };
        let states = match transport {
            Protocol::Tcp => TCP_CONNECTION_STATES,
            Protocol::Udp => u32::MAX,
        };
        let req = SockDiagMessage::InetRequest(inet_request(transport, family, states, any));
        let mut out = Vec::new();
        self.exchange(req, NLM_F_DUMP, |buf, seq| {
            Ok(parse_dump(buf, seq, transport, &mut out)?.then_some(()))
        })
        .map_err(context(what))?;
        Ok(out)
    }

    /// SOCK_DESTROY for exactly `s` (same identity and cookie), as `ss -K`
    /// does: a TCP peer gets a RST, and the owner's next call on the socket
    /// fails with ECONNABORTED.
    pub fn destroy(&self, s: &DiagSocket) -> io::Result<Destroyed> {
        let what = format!("destroy {} socket {} -> {}", s.transport, s.src, s.dst);
        // The kernel ignores states when the id names one socket.
        let req = inet_request(s.transport, s.family, u32::MAX, s.id.clone());
        let req = SockDiagDestroy::new(SockDiagMessage::InetRequest(req));
        let errno = self
            .exchange(req, NLM_F_ACK, parse_ack)
            .map_err(context(&what))?;
        match errno {
            0 => Ok(Destroyed::Closed),
            libc::ENOENT => Ok(Destroyed::Gone),
            libc::EOPNOTSUPP => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{what}: kernel built without CONFIG_INET_DIAG_DESTROY"),
            )),
            e => Err(context(what)(io::Error::from_raw_os_error(e))),
        }
    }

    /// Sends one request, then feeds each reply datagram and the request's
    /// sequence number to `handle` until it returns a result.
    fn exchange<M: NetlinkSerializable, R>(
        &self,
        msg: M,
        flags: u16,
        mut handle: impl FnMut(&[u8], u32) -> io::Result<Option<R>>,
    ) -> io::Result<R> {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        let bytes = request_bytes(msg, flags, seq);
        // An unconnected netlink socket sends to the kernel, and a datagram
        // goes whole.
        retry_eintr(|| self.socket.send(&bytes, 0))?;
        let mut buf = vec![0; RECV_BUF_LEN];
        loop {
            // MSG_TRUNC makes netlink return the datagram's full length, so
            // one bigger than buf is caught below. No timeout is needed: the
            // kernel queues each reply during our own calls.
            let (n, from) =
                retry_eintr(|| self.socket.recv_from(&mut &mut buf[..], libc::MSG_TRUNC))?;
            if n > buf.len() {
                return Err(malformed!("{n}-byte datagram, {}-byte buffer", buf.len()));
            }
            // Other processes may send to our port; only the kernel (port 0)
            // speaks for the sockets of this namespace.
            if from.port_number() == 0
                && let Some(r) = handle(&buf[..n], seq)?
            {
                return Ok(r);
            }
        }
    }
}

/// One request as it goes on the wire.
fn request_bytes<M: NetlinkSerializable>(msg: M, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    // Sets the length and the message type: SOCK_DIAG_BY_FAMILY, or
    // SOCK_DESTROY for a SockDiagDestroy.
    msg.finalize();
    let mut bytes = vec![0; msg.buffer_len()];
    msg.serialize(&mut bytes);
    bytes
}

fn inet_request(transport: Protocol, family: u8, states: u32, socket_id: SocketId) -> InetRequest {
    let protocol = match transport {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    };
    InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::from_bits_retain(states),
        socket_id,
    }
}

/// Splits the next netlink message off `buf`, which must not be empty, and
/// parses it, unless it answers another request than `seq` (a late reply to
/// one this socket gave up on): then `None`, and its payload is not read.
/// Messages are padded to 4 bytes, except maybe the last.
fn next_message(buf: &mut &[u8], seq: u32) -> io::Result<Option<NetlinkMessage<SockDiagMessage>>> {
    let b: &[u8] = buf;
    // Checks that the header fits and that its length covers the header
    // and stays within `b`.
    let nl = NetlinkBuffer::new_checked(b).map_err(decode_error)?;
    let len = nl.length() as usize;
    *buf = &b[len.next_multiple_of(4).min(b.len())..];
    if nl.sequence_number() != seq {
        return Ok(None);
    }
    NetlinkMessage::deserialize(&b[..len])
        .map(Some)
        .map_err(decode_error)
}

/// The errno in an NLMSG_ERROR or NLMSG_DONE code; 0 for success.
fn errno(code: i32) -> io::Result<i32> {
    match code {
        c if c <= 0 => Ok(c.wrapping_neg()),
        c => Err(malformed!("positive error code {c}")),
    }
}

/// Adds the sockets in one dump datagram to `out`; true once the dump ended.
fn parse_dump(
    mut buf: &[u8],
    seq: u32,
    t: Protocol,
    out: &mut Vec<DiagSocket>,
) -> io::Result<bool> {
    while !buf.is_empty() {
        let Some(msg) = next_message(&mut buf, seq)? else {
            continue;
        };
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                out.push(parse_socket(t, *r)?)
            }
            NetlinkPayload::Noop => {}
            // DONE carries the dump's final status, but not on old kernels:
            // the crate reads an empty one as success.
            NetlinkPayload::Done(done) => match errno(done.code)? {
                0 => return Ok(true),
                e => return Err(io::Error::from_raw_os_error(e)),
            },
            NetlinkPayload::Error(e) => match errno(e.raw_code())? {
                0 => return Err(malformed!("acknowledgement in a dump")),
                e => return Err(io::Error::from_raw_os_error(e)),
            },
            _ => {
                let ty = msg.header.message_type;
                return Err(malformed!("message type {ty} in a dump"));
            }
        }
    }
    Ok(false)
}

/// The errno answering request `seq`, or `None` if `buf` does not hold it.
fn parse_ack(mut buf: &[u8], seq: u32) -> io::Result<Option<i32>> {
    while !buf.is_empty() {
        let Some(msg) = next_message(&mut buf, seq)? else {
            continue;
        };
        match msg.payload {
            NetlinkPayload::Error(e) => return errno(e.raw_code()).map(Some),
            _ => {
                let ty = msg.header.message_type;
                return Err(malformed!("message type {ty} instead of an ack"));
            }
        }
    }
    Ok(None)
}

fn parse_socket(transport: Protocol, r: InetResponse) -> io::Result<DiagSocket> {
    let h = r.header;
    let mut cgroup_id = None;
    for nla in &r.nlas {
        if let Nla::Other(a) = nla
            && a.kind() & NLA_TYPE_MASK == INET_DIAG_CGROUP_ID
        {
            // DefaultNla keeps its value private; emit_value copies it out.
            let mut v = [0; 8];
            if a.value_len() != v.len() {
                return Err(malformed!("cgroup id of {} bytes", a.value_len()));
            }
            a.emit_value(&mut v);
            cgroup_id = Some(u64::from_ne_bytes(v));
        }
    }
    let id = h.socket_id;
    Ok(DiagSocket {
        transport,
        family: h.family,
        state: h.state,
        src: SocketAddr::new(id.source_address, id.source_port),
        dst: SocketAddr::new(id.destination_address, id.destination_port),
        cgroup_id,
        inode: h.inode,
        uid: h.uid,
        id,
    })
}

#[cfg(test)]
mod tests;
