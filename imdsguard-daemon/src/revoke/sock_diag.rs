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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One socket from a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    pub transport: Transport,
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
        transport: Transport,
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
    pub fn dump(&self, transport: Transport, family: u8) -> io::Result<Vec<DiagSocket>> {
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
            Transport::Tcp => TCP_CONNECTION_STATES,
            Transport::Udp => u32::MAX,
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

fn inet_request(transport: Transport, family: u8, states: u32, socket_id: SocketId) -> InetRequest {
    let protocol = match transport {
        Transport::Tcp => libc::IPPROTO_TCP as u8,
        Transport::Udp => libc::IPPROTO_UDP as u8,
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
    t: Transport,
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

fn parse_socket(transport: Transport, r: InetResponse) -> io::Result<DiagSocket> {
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
mod tests {
    use std::{
        io::Read as _,
        net::{TcpListener, TcpStream, UdpSocket},
        os::fd::AsRawFd as _,
        time::Duration,
    };

    use super::*;
    use crate::revoke::netns::tests::own_cgroup_id;

    /// Runs `f` on a thread of its own in a new network namespace with `lo`
    /// up, so the test neither sees nor disturbs the host's sockets.
    fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare(2) moves only this thread, which ends with f.
                let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "{}", io::Error::last_os_error());
                let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
                // SAFETY: all-zero is a valid ifreq; "lo" stays NUL-terminated.
                let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
                ifr.ifr_name[..2].copy_from_slice(&[b'l' as libc::c_char, b'o' as libc::c_char]);
                // SAFETY: both ioctls take an ifreq naming a device and fill
                // or read ifru_flags, the union member we use.
                unsafe {
                    assert_eq!(
                        libc::ioctl(udp.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr),
                        0
                    );
                    ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                    assert_eq!(libc::ioctl(udp.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr), 0);
                }
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    fn family_of(a: SocketAddr) -> u8 {
        (if a.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        }) as u8
    }

    #[test]
    fn tcp_connections_are_dumped_and_destroyed() {
        let cgroup = own_cgroup_id();
        in_fresh_netns(|| {
            for bind in ["127.0.0.1:0", "[::1]:0"] {
                let listener = TcpListener::bind(bind).unwrap();
                let server = listener.local_addr().unwrap();
                let mut client = TcpStream::connect(server).unwrap();
                let local = client.local_addr().unwrap();
                let _accepted = listener.accept().unwrap();
                let diag = SockDiag::open().unwrap();
                let family = family_of(server);
                let dumped = diag.dump(Transport::Tcp, family).unwrap();
                // The accepted end shows, the listener does not.
                assert!(dumped.iter().any(|s| s.src == server && s.dst == local));
                assert!(dumped.iter().all(|s| s.state != TCP_LISTEN), "{dumped:#?}");
                let s = dumped
                    .iter()
                    .find(|s| s.src == local)
                    .expect("client socket");
                assert_eq!(
                    (s.transport, s.family, s.dst, s.state),
                    (Transport::Tcp, family, server, 1)
                );
                assert_eq!(s.cgroup_id, Some(cgroup));
                // SAFETY: geteuid(2) cannot fail.
                assert_eq!(s.uid, unsafe { libc::geteuid() });
                assert_ne!(s.inode, 0);

                assert_eq!(diag.destroy(s).unwrap(), Destroyed::Closed);
                let e = client.read(&mut [0; 1]).unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
                assert_eq!(diag.destroy(s).unwrap(), Destroyed::Gone);
                // Destroyed, it is CLOSE and unhashed: gone from the dump.
                let after = diag.dump(Transport::Tcp, family).unwrap();
                assert!(after.iter().all(|a| a.src != local), "{after:#?}");
            }
        });
    }

    #[test]
    fn connected_udp_sockets_are_dumped_and_destroyed() {
        let cgroup = own_cgroup_id();
        in_fresh_netns(|| {
            for bind in ["127.0.0.1:0", "[::1]:0"] {
                let server = UdpSocket::bind(bind).unwrap();
                let server_addr = server.local_addr().unwrap();
                let client = UdpSocket::bind(bind).unwrap();
                client.connect(server_addr).unwrap();
                let local = client.local_addr().unwrap();
                let diag = SockDiag::open().unwrap();
                let dumped = diag.dump(Transport::Udp, family_of(server_addr)).unwrap();
                let s = dumped
                    .iter()
                    .find(|s| s.src == local)
                    .expect("client socket");
                assert_eq!(
                    (s.transport, s.dst, s.state),
                    (Transport::Udp, server_addr, 1)
                );
                assert_eq!(s.cgroup_id, Some(cgroup));
                let unconnected = dumped.iter().find(|s| s.src == server_addr).unwrap();
                assert_eq!((unconnected.dst.port(), unconnected.state), (0, TCP_CLOSE));

                assert_eq!(diag.destroy(s).unwrap(), Destroyed::Closed);
                client
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let e = client.recv(&mut [0; 1]).unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
                assert_eq!(diag.destroy(s).unwrap(), Destroyed::Gone);
            }
        });
    }

    #[test]
    fn dump_rejects_other_families() {
        let e = SockDiag::open()
            .unwrap()
            .dump(Transport::Tcp, libc::AF_UNIX as u8);
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    /// `linux/netlink.h` and `linux/sock_diag.h`, spelled out here so the
    /// tests check the crate against the uapi rather than against itself.
    const NLMSG_HDRLEN: usize = 16;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLA_HDRLEN: usize = 4;
    /// `struct inet_diag_msg`, the fixed part of each dumped socket.
    const INET_DIAG_MSG_LEN: usize = 72;

    fn message(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        // struct nlmsghdr: length, type, flags, seq, port.
        let header = [
            &len.to_ne_bytes()[..],
            &ty.to_ne_bytes(),
            &0u16.to_ne_bytes(),
            &seq.to_ne_bytes(),
            &0u32.to_ne_bytes(),
        ];
        let mut m = [&header.concat()[..], payload].concat();
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let len = (NLA_HDRLEN + value.len()) as u16;
        let mut a = [&len.to_ne_bytes()[..], &ty.to_ne_bytes(), value].concat();
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    /// A dumped AF_INET socket 10.0.0.1:1234 -> 169.254.169.254:80 (uid
    /// 1000, inode 42) with the given attributes after the fixed part, laid
    /// out byte by byte as `struct inet_diag_msg`.
    fn socket(attrs: &[u8]) -> Vec<u8> {
        let mut msg = vec![libc::AF_INET as u8, 1, 0, 0];
        msg.extend(1234u16.to_be_bytes());
        msg.extend(80u16.to_be_bytes());
        msg.extend([10, 0, 0, 1]);
        msg.extend([0; 12]);
        msg.extend([169, 254, 169, 254]);
        msg.extend([0; 12]);
        // ifindex, cookie, expires, rqueue, wqueue.
        msg.extend([0; 4 + 8 + 4 + 4 + 4]);
        msg.extend(1000u32.to_ne_bytes());
        msg.extend(42u32.to_ne_bytes());
        assert_eq!(msg.len(), INET_DIAG_MSG_LEN);
        [&msg[..], attrs].concat()
    }

    #[test]
    fn parses_dumps_and_acks() {
        // INET_DIAG_SHUTDOWN (8) is one to step over.
        let attrs = [
            attr(8, &[0]),
            attr(INET_DIAG_CGROUP_ID, &7u64.to_ne_bytes()),
        ]
        .concat();
        let buf = [
            message(SOCK_DIAG_BY_FAMILY, 9, &socket(&attrs)),
            message(SOCK_DIAG_BY_FAMILY, 8, &[]),
        ];
        let mut out = Vec::new();
        assert!(!parse_dump(&buf.concat(), 9, Transport::Tcp, &mut out).unwrap());
        assert_eq!(out.len(), 1, "the stale seq 8 message is skipped");
        assert_eq!(out[0].src, "10.0.0.1:1234".parse().unwrap());
        assert_eq!(out[0].dst, "169.254.169.254:80".parse().unwrap());
        assert_eq!(
            (out[0].cgroup_id, out[0].uid, out[0].inode),
            (Some(7), 1000, 42)
        );
        let done = message(NLMSG_DONE, 9, &0i32.to_ne_bytes());
        assert!(parse_dump(&done, 9, Transport::Tcp, &mut out).unwrap());
        let eperm = message(NLMSG_ERROR, 9, &(-libc::EPERM).to_ne_bytes());
        let e = parse_dump(&eperm, 9, Transport::Tcp, &mut out).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let enoent = message(NLMSG_ERROR, 3, &(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_ack(&enoent, 3).unwrap(), Some(libc::ENOENT));
        assert_eq!(parse_ack(&enoent, 4).unwrap(), None);
    }

    #[test]
    fn malformed_replies_are_errors() {
        let good = message(
            SOCK_DIAG_BY_FAMILY,
            1,
            &socket(&attr(INET_DIAG_CGROUP_ID, &[0; 8])),
        );
        // Every truncation, then header lengths too short and past the end.
        let mut bad: Vec<Vec<u8>> = (1..good.len()).map(|n| good[..n].to_vec()).collect();
        for len in [0u32, 15, good.len() as u32 + 4] {
            bad.push([&len.to_ne_bytes()[..], &good[4..]].concat());
        }
        // An attribute longer than the message.
        let mut m = good.clone();
        let at = NLMSG_HDRLEN + INET_DIAG_MSG_LEN;
        m[at..at + 2].copy_from_slice(&200u16.to_ne_bytes());
        bad.push(m);
        // A 4-byte cgroup id, an unknown family, a short error, a bad type.
        bad.push(message(
            SOCK_DIAG_BY_FAMILY,
            1,
            &socket(&attr(INET_DIAG_CGROUP_ID, &[0; 4])),
        ));
        let mut m = message(SOCK_DIAG_BY_FAMILY, 1, &socket(&[]));
        m[NLMSG_HDRLEN] = 99;
        bad.push(m);
        // An AF_UNIX socket where an inet one belongs.
        let mut m = message(SOCK_DIAG_BY_FAMILY, 1, &socket(&[]));
        m[NLMSG_HDRLEN] = libc::AF_UNIX as u8;
        bad.push(m);
        bad.push(message(NLMSG_ERROR, 1, &[0; 2]));
        bad.push(message(77, 1, &[]));
        for buf in &bad {
            let e = parse_dump(buf, 1, Transport::Tcp, &mut Vec::new()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        }
        assert!(parse_ack(&good[..10], 1).is_err());
        assert!(parse_ack(&message(NLMSG_ERROR, 1, &5i32.to_ne_bytes()), 1).is_err());
    }

    #[test]
    fn a_destroy_request_names_the_dumped_socket_with_its_cookie() {
        let mut attrs = attr(INET_DIAG_CGROUP_ID, &7u64.to_ne_bytes());
        let mut dumped = socket(&[]);
        // The cookie, at offset 4 + 2 * 2 + 2 * 16 + 4 of inet_diag_msg.
        dumped[44..52].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        dumped.append(&mut attrs);
        let mut out = Vec::new();
        let reply = message(SOCK_DIAG_BY_FAMILY, 1, &dumped);
        parse_dump(&reply, 1, Transport::Udp, &mut out).unwrap();
        let s = &out[0];
        let req = inet_request(s.transport, s.family, u32::MAX, s.id.clone());
        let req = SockDiagDestroy::new(SockDiagMessage::InetRequest(req));
        let bytes = request_bytes(req, NLM_F_ACK, 5);
        // struct inet_diag_req_v2 after the header.
        assert_eq!(bytes.len(), NLMSG_HDRLEN + 56);
        let header = [
            &(bytes.len() as u32).to_ne_bytes()[..],
            &21u16.to_ne_bytes(), // SOCK_DESTROY
            &(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes(),
            &5u32.to_ne_bytes(),
            &0u32.to_ne_bytes(),
        ]
        .concat();
        assert_eq!(bytes[..NLMSG_HDRLEN], header[..]);
        let body = &bytes[NLMSG_HDRLEN..];
        assert_eq!(
            body[..8],
            [
                libc::AF_INET as u8,
                libc::IPPROTO_UDP as u8,
                0,
                0,
                255,
                255,
                255,
                255
            ]
        );
        // The socket id as dumped: ports, addresses, ifindex and cookie.
        assert_eq!(body[8..], dumped[4..52]);
    }
}
