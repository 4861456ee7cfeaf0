//! sock_create (opt-in variant): raw sockets need an allow entry.
//!
//! A raw socket writes its own IP payload (or, with IP_HDRINCL, the whole
//! header) and sends it without connect(), so no sock_addr hook ever sees
//! its destination. The kernel runs this program from inet_create() and
//! inet6_create() for every socket() a task below the attach root makes,
//! after the CAP_NET_RAW check: a denied caller's SOCK_RAW socket() fails
//! with EPERM. ICMP ping sockets are SOCK_DGRAM and pass.
//!
//! The family is not tested: the hook only runs for AF_INET and AF_INET6.
//! Should a kernel ever run it for other families (AF_PACKET), denying
//! their SOCK_RAW too is what we would want.

use aya_ebpf::programs::SockContext;
use imdsguard_common::{PROTO_ANY, addr_form, hook};

use crate::{
    caller::{self, PROCEED, Subject},
    identity,
};

const SOCK_RAW: u32 = 3;

#[inline(always)]
pub fn sock_create(ctx: &SockContext) -> i32 {
    // SAFETY: a context field load, rewritten by the verifier.
    let raw = unsafe { (*ctx.sock).type_ } == SOCK_RAW;
    let scope = caller::scope();
    let records = caller::records_creators(&scope);
    // Cheapest test first: nearly every socket is a stream or datagram one,
    // and without creator records that is all they pay.
    if !raw && !records {
        return PROCEED;
    }
    let who = caller::caller_action(&scope);
    if raw {
        // A raw socket has no destination yet: the event says which hook,
        // who, and nothing else. Its creator is the caller.
        let subject = Subject {
            hook: hook::SOCK_CREATE,
            addr: [0; 4],
            port: 0,
            proto: PROTO_ANY,
            form: addr_form::PLAIN,
        };
        let verdict = caller::verdict(&subject, who, None, None);
        if verdict != PROCEED {
            return verdict;
        }
    }
    if records {
        identity::stamp(ctx, who);
    }
    PROCEED
}
