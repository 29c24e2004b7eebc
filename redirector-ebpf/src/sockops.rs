//! `sockops`: tells the node router where a connection handed to it was going. At `connect()`
//! the source port is not chosen yet, so the connect hook records the original destination on
//! the socket itself (socket storage, which dies with it); when TCP picks the port
//! (`TCP_CONNECT_CB`, before the SYN leaves) this program copies it to `RDR_ORIGDST`, keyed by
//! the client address the router will see on accept.
use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB, cty::c_void, helpers::bpf_sk_storage_get,
    macros::sock_ops, programs::SockOpsContext,
};
use redirector_common::{FAMILY_V4, SockAddr, SockState, table_stats};

use crate::{
    maps::{ORIG_DST, ROUTER, SOCK_STATE, count_table},
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
    // SAFETY: the context is valid for the program's run; `sk` is a field of it.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: the map pointer is the socket storage map's (a BTF map's static is its
    // definition); `sk` is the context's non-null socket; no storage is created (flags 0).
    let state = unsafe {
        bpf_sk_storage_get(
            core::ptr::addr_of!(SOCK_STATE) as *mut c_void,
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    } as *const SockState;
    if state.is_null() {
        return;
    }
    // SAFETY: non-null storage pointer from the helper, copied out at once.
    let state = unsafe { *state };
    // Handed over by the connect hook (rather than a client that dialed the router itself).
    if state.fork != remote {
        return;
    }
    // Counted either way: the daemon derives the table's evictions from what was written, what
    // the router took and what is left.
    match ORIG_DST.insert(&local, &state.dialed, 0) {
        Ok(()) => count_table(table_stats::HANDOFF_RECORDED),
        Err(_) => count_table(table_stats::HANDOFF_RECORD_FAILED),
    }
}
