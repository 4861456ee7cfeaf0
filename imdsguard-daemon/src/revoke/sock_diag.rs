//! A minimal NETLINK_SOCK_DIAG client: the interface `ss` dumps sockets
//! with, and `ss -K` destroys them with.
//!
//! A netlink socket answers for the network namespace it was created in, so
//! a [`SockDiag`] sees the namespace of the thread that called
//! [`SockDiag::open`]; [`super::netns::in_netns`] reaches other ones. Replies
//! are parsed as untrusted bytes: every length is checked before use, and
//! malformed input is an `io::Error`, never a panic.

use std::{
    cell::Cell,
    fmt, io,
    mem::size_of,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// `linux/sock_diag.h`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `linux/netlink.h`.
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// Masks off `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER` from attribute types.
const NLA_TYPE_MASK: u16 = !0xc000;
const NLA_HDRLEN: usize = 4;
/// `linux/inet_diag.h`: the u64 cgroup v2 id the kernel adds, unrequested,
/// for full sockets.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `net/tcp_states.h`.
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;
/// Every TCP state but LISTEN and CLOSE: sockets that hold, are making or
/// are tearing down a connection.
const TCP_CONNECTION_STATES: u32 = !((1 << TCP_LISTEN) | (1 << TCP_CLOSE));
/// The kernel sizes dump chunks for a 32 KiB reader; twice that leaves room,
/// and MSG_TRUNC still reveals a reply that did not fit.
const RECV_BUF_LEN: usize = 64 * 1024;
const NLMSG_HDRLEN: usize = size_of::<NlMsgHdr>();

macro_rules! malformed {
    ($($fmt:tt)*) => {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed sock_diag reply: {}", format_args!($($fmt)*)),
        )
    };
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
    id: SockId,
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
        let family = if dst.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
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
            id: SockId::default(),
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

/// Plain-integer `repr(C)` types without padding: any bytes of their size
/// are a valid value, and every value is initialised bytes.
///
/// # Safety
/// Implementors must be `repr(C)`, made only of integers or arrays of them,
/// and have no padding.
unsafe trait Pod: Copy {}

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`. Ports and addresses are network byte order,
/// kept as bytes so they go back to the kernel untouched; `ifindex` and
/// `cookie` are host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`, the fixed part of each dumped socket.
#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// Implements [`Pod`] for a type after checking its size against the uapi
/// header's; a mismatch would mean hidden padding.
macro_rules! pod {
    ($($t:ty = $size:literal),*) => {$(
        const _: () = assert!(size_of::<$t>() == $size);
        // SAFETY: every type listed below is repr(C) and made of integers,
        // and the size assert above rules out padding.
        unsafe impl Pod for $t {}
    )*};
}
pod!(
    NlMsgHdr = 16,
    SockId = 48,
    InetDiagReqV2 = 56,
    InetDiagMsg = 72
);

/// Reads a `T` from the start of `bytes`, or `None` if there are too few.
fn read_pod<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked above, T: Pod accepts any bytes, and
    // read_unaligned copes with wherever the value sits in the buffer.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn as_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T: Pod has no padding, so all size_of::<T>() bytes behind the
    // reference are initialised, and they live as long as the borrow.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

fn context(what: impl fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Runs a syscall returning -1 on error, retrying on EINTR.
fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        match usize::try_from(call()) {
            Ok(n) => return Ok(n),
            Err(_) => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::Interrupted => {}
                e => return Err(e),
            },
        }
    }
}

/// A NETLINK_SOCK_DIAG socket. Not `Sync`: replies are matched to requests
/// by sequence number, and threads sharing one socket would consume each
/// other's replies.
#[derive(Debug)]
pub struct SockDiag {
    fd: OwnedFd,
    seq: Cell<u32>,
}

impl SockDiag {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let (domain, ty) = (libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC);
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(domain, ty, libc::NETLINK_SOCK_DIAG) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(context("open NETLINK_SOCK_DIAG socket")(e));
        }
        // SAFETY: socket() just returned this descriptor and nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let seq = Cell::new(0);
        Ok(Self { fd, seq })
    }

    /// Every socket of `transport`/`family` in the namespace except TCP
    /// LISTEN and CLOSE, i.e. connections only. UDP sockets come in every
    /// state; the connected ones have a nonzero destination port.
    ///
    /// After an error, open a new `SockDiag`: while an abandoned dump is
    /// pending, the kernel refuses another (EBUSY).
    pub fn dump(&self, transport: Transport, family: u8) -> io::Result<Vec<DiagSocket>> {
        let what = format!("sock_diag dump of {transport} sockets of family {family}");
        if !matches!(i32::from(family), libc::AF_INET | libc::AF_INET6) {
            let e = io::Error::new(io::ErrorKind::InvalidInput, "not AF_INET or AF_INET6");
            return Err(context(what)(e));
        }
        let states = match transport {
            Transport::Tcp => TCP_CONNECTION_STATES,
            Transport::Udp => u32::MAX,
        };
        let req = InetDiagReqV2::new(transport, family, states, SockId::default());
        let mut out = Vec::new();
        self.exchange(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, req, |buf, seq| {
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
        let req = InetDiagReqV2::new(s.transport, s.family, u32::MAX, s.id);
        let errno = self
            .exchange(SOCK_DESTROY, NLM_F_ACK, req, parse_ack)
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
    fn exchange<R>(
        &self,
        ty: u16,
        flags: u16,
        req: InetDiagReqV2,
        mut handle: impl FnMut(&[u8], u32) -> io::Result<Option<R>>,
    ) -> io::Result<R> {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        let len = (NLMSG_HDRLEN + size_of::<InetDiagReqV2>()) as u32;
        let flags = NLM_F_REQUEST | flags;
        let hdr = NlMsgHdr {
            len,
            ty,
            flags,
            seq,
            pid: 0,
        };
        let msg = [as_bytes(&hdr), as_bytes(&req)].concat();
        let fd = self.fd.as_raw_fd();
        // SAFETY: msg is a live buffer of msg.len() bytes. An unconnected
        // netlink socket sends to the kernel, and a datagram goes whole.
        retry_eintr(|| unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) })?;
        let mut buf = vec![0; RECV_BUF_LEN];
        loop {
            // SAFETY: all-zero is a valid sockaddr_nl.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut from_len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            let (ptr, cap) = (buf.as_mut_ptr().cast(), buf.len());
            // SAFETY: buf and from are live and writable for the lengths
            // given. MSG_TRUNC makes netlink return the datagram's full
            // length, so one bigger than buf is caught below. No timeout is
            // needed: the kernel queues each reply during our own calls.
            let n = retry_eintr(|| unsafe {
                let from_ptr = (&raw mut from).cast();
                libc::recvfrom(fd, ptr, cap, libc::MSG_TRUNC, from_ptr, &mut from_len)
            })?;
            if n > buf.len() {
                return Err(malformed!("{n}-byte datagram, {cap}-byte buffer"));
            }
            // Other processes may send to our port; only the kernel (port 0)
            // speaks for the sockets of this namespace.
            if from.nl_pid == 0
                && let Some(r) = handle(&buf[..n], seq)?
            {
                return Ok(r);
            }
        }
    }
}

impl InetDiagReqV2 {
    fn new(transport: Transport, family: u8, states: u32, id: SockId) -> Self {
        let protocol = match transport {
            Transport::Tcp => libc::IPPROTO_TCP as u8,
            Transport::Udp => libc::IPPROTO_UDP as u8,
        };
        Self {
            family,
            protocol,
            ext: 0,
            pad: 0,
            states,
            id,
        }
    }
}

/// Splits the first item, `len` bytes of which `hdr` are header, off `buf`,
/// returning its payload; items are padded to 4 bytes, except maybe the last.
fn split<'a>(buf: &mut &'a [u8], hdr: usize, len: usize) -> io::Result<&'a [u8]> {
    let b: &'a [u8] = buf;
    if len < hdr || len > b.len() {
        return Err(malformed!("length {len} with {} bytes left", b.len()));
    }
    *buf = &b[len.next_multiple_of(4).min(b.len())..];
    Ok(&b[hdr..len])
}

/// The next netlink message in `buf`, which must not be empty.
fn next_message<'a>(buf: &mut &'a [u8]) -> io::Result<(NlMsgHdr, &'a [u8])> {
    let hdr = read_pod::<NlMsgHdr>(buf).ok_or_else(|| malformed!("truncated header"))?;
    Ok((hdr, split(buf, NLMSG_HDRLEN, hdr.len as usize)?))
}

/// The errno in an NLMSG_ERROR (or NLMSG_DONE) payload; 0 for success.
fn error_code(payload: &[u8]) -> io::Result<i32> {
    let Some(&code) = payload.first_chunk::<4>() else {
        return Err(malformed!("truncated error"));
    };
    match i32::from_ne_bytes(code) {
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
        let (hdr, payload) = next_message(&mut buf)?;
        match hdr.ty {
            // A late reply to an earlier request this socket gave up on.
            _ if hdr.seq != seq => {}
            SOCK_DIAG_BY_FAMILY => out.push(parse_socket(t, payload)?),
            NLMSG_NOOP => {}
            // DONE carries the dump's final status, but not on old kernels.
            NLMSG_DONE if payload.is_empty() => return Ok(true),
            NLMSG_DONE | NLMSG_ERROR => match error_code(payload)? {
                0 if hdr.ty == NLMSG_DONE => return Ok(true),
                0 => return Err(malformed!("acknowledgement in a dump")),
                e => return Err(io::Error::from_raw_os_error(e)),
            },
            ty => return Err(malformed!("message type {ty} in a dump")),
        }
    }
    Ok(false)
}

/// The errno answering request `seq`, or `None` if `buf` does not hold it.
fn parse_ack(mut buf: &[u8], seq: u32) -> io::Result<Option<i32>> {
    while !buf.is_empty() {
        let (hdr, payload) = next_message(&mut buf)?;
        match hdr.ty {
            _ if hdr.seq != seq => {}
            NLMSG_ERROR => return error_code(payload).map(Some),
            ty => return Err(malformed!("message type {ty} instead of an ack")),
        }
    }
    Ok(None)
}

fn parse_socket(transport: Transport, payload: &[u8]) -> io::Result<DiagSocket> {
    let msg = read_pod::<InetDiagMsg>(payload).ok_or_else(|| malformed!("truncated socket"))?;
    let id = msg.id;
    let addr = |a: [u8; 16], port: [u8; 2]| {
        let port = u16::from_be_bytes(port);
        match i32::from(msg.family) {
            libc::AF_INET => Ok(SocketAddrV4::new([a[0], a[1], a[2], a[3]].into(), port).into()),
            libc::AF_INET6 => Ok(SocketAddrV6::new(a.into(), port, 0, 0).into()),
            f => Err(malformed!("address family {f}")),
        }
    };
    let mut cgroup_id = None;
    let mut attrs = &payload[size_of::<InetDiagMsg>()..];
    while !attrs.is_empty() {
        // struct nlattr: u16 length, u16 type.
        let Some(&[l0, l1, t0, t1]) = attrs.first_chunk::<NLA_HDRLEN>() else {
            return Err(malformed!("truncated attribute"));
        };
        let ty = u16::from_ne_bytes([t0, t1]) & NLA_TYPE_MASK;
        let value = split(&mut attrs, NLA_HDRLEN, u16::from_ne_bytes([l0, l1]).into())?;
        if ty == INET_DIAG_CGROUP_ID {
            let v = <[u8; 8]>::try_from(value);
            let v = v.map_err(|_| malformed!("cgroup id of {} bytes", value.len()))?;
            cgroup_id = Some(u64::from_ne_bytes(v));
        }
    }
    Ok(DiagSocket {
        transport,
        family: msg.family,
        state: msg.state,
        src: addr(id.src, id.sport)?,
        dst: addr(id.dst, id.dport)?,
        cgroup_id,
        inode: msg.inode,
        uid: msg.uid,
        id,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read as _,
        net::{TcpListener, TcpStream, UdpSocket},
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

    fn message(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let (len, flags, pid) = ((NLMSG_HDRLEN + payload.len()) as u32, 0, 0);
        let mut m = [
            as_bytes(&NlMsgHdr {
                len,
                ty,
                flags,
                seq,
                pid,
            }),
            payload,
        ]
        .concat();
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let len = (NLA_HDRLEN + value.len()) as u16;
        let mut a = [&len.to_ne_bytes()[..], &ty.to_ne_bytes(), value].concat();
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    /// A dumped AF_INET socket 10.0.0.1:1234 -> 169.254.169.254:80 with the
    /// given attributes after the fixed part.
    fn socket(attrs: &[u8]) -> Vec<u8> {
        let (sport, dport) = (1234u16.to_be_bytes(), 80u16.to_be_bytes());
        let mut id = SockId {
            sport,
            dport,
            ..SockId::default()
        };
        id.src[..4].copy_from_slice(&[10, 0, 0, 1]);
        id.dst[..4].copy_from_slice(&[169, 254, 169, 254]);
        let mut msg = read_pod::<InetDiagMsg>(&[0; size_of::<InetDiagMsg>()]).unwrap();
        (msg.family, msg.state, msg.id, msg.uid, msg.inode) =
            (libc::AF_INET as u8, 1, id, 1000, 42);
        [as_bytes(&msg), attrs].concat()
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
            message(20, 8, &[]),
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
        let good = message(20, 1, &socket(&attr(INET_DIAG_CGROUP_ID, &[0; 8])));
        // Every truncation, then header lengths too short and past the end.
        let mut bad: Vec<Vec<u8>> = (1..good.len()).map(|n| good[..n].to_vec()).collect();
        for len in [0u32, 15, good.len() as u32 + 4] {
            bad.push([&len.to_ne_bytes()[..], &good[4..]].concat());
        }
        // An attribute longer than the message.
        let mut m = good.clone();
        let at = NLMSG_HDRLEN + size_of::<InetDiagMsg>();
        m[at..at + 2].copy_from_slice(&200u16.to_ne_bytes());
        bad.push(m);
        // A 4-byte cgroup id, an unknown family, a short error, a bad type.
        bad.push(message(20, 1, &socket(&attr(INET_DIAG_CGROUP_ID, &[0; 4]))));
        let mut m = message(20, 1, &socket(&[]));
        m[NLMSG_HDRLEN] = 99;
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
}
