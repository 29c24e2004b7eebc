//! `sockops`: completes the hand-off record of a connection the connect hook sent to the node
//! router. At `connect()` the source port is not chosen yet, so the connect hook records the
//! original destination by socket cookie; when TCP picks the port (`TCP_CONNECT_CB`, before the
//! SYN leaves) this program re-keys it by the client address the router will see on accept.
use aya_ebpf::{
    EbpfContext as _, bindings::BPF_SOCK_OPS_TCP_CONNECT_CB, helpers::bpf_get_socket_cookie,
    macros::sock_ops, programs::SockOpsContext,
};
use redirector_common::{FAMILY_V4, SockAddr};

use crate::{
    maps::{HANDOFF, ORIG_DST, ROUTER},
    xlate,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sock_ops]
pub fn handoff_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        record_client(&ctx);
    }
    // sock_ops verdicts are advisory here; 1 = proceed.
    1
}

#[inline(always)]
fn record_client(ctx: &SockOpsContext) {
    let Some(router) = ROUTER.get_ptr(0) else {
        return;
    };
    // SAFETY: array slot 0 always exists; copied out at once.
    let router = unsafe { *router };
    // remote_port holds the network-order port shifted into the upper 16 bits on little-endian
    // machines (the kernel's ctx rewrite does `<< 16`); local_port is in host byte order.
    #[cfg(target_endian = "little")]
    let remote_port = (ctx.remote_port() >> 16) as u16;
    #[cfg(target_endian = "big")]
    let remote_port = ctx.remote_port() as u16;
    let local_port = (ctx.local_port() as u16).to_be();
    let (remote, local) = match ctx.family() {
        AF_INET => (
            SockAddr {
                addr: [ctx.remote_ip4(), 0, 0, 0],
                port: remote_port,
                family: FAMILY_V4,
                _pad: 0,
            },
            SockAddr {
                addr: [ctx.local_ip4(), 0, 0, 0],
                port: local_port,
                family: FAMILY_V4,
                _pad: 0,
            },
        ),
        AF_INET6 => (
            xlate::from_ip6(ctx.remote_ip6(), remote_port),
            xlate::from_ip6(ctx.local_ip6(), local_port),
        ),
        _ => return,
    };
    // Only connections to the router can have a hand-off record: everything else leaves here
    // without a hash lookup.
    if remote != router.v4 && remote != router.v6 {
        return;
    }
    // SAFETY: helper allowed for sock_ops programs; takes the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(dialed) = HANDOFF.get_ptr(&cookie) else {
        return;
    };
    // SAFETY: pointer from a successful lookup, copied out at once.
    let dialed = unsafe { *dialed };
    let _ = ORIG_DST.insert(&local, &dialed, 0);
    let _ = HANDOFF.remove(&cookie);
}
