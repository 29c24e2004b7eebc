//! `iter/tcp`: resets TCP connections whose destination the daemon wants decided again.
//!
//! The daemon runs this iterator in one network namespace at a time (a TCP iterator walks the
//! sockets of the namespace it was created in), after writing to `RDR_RESETS` the services
//! concerned and what to reset (`ResetRequest`):
//! - a route with `reset_on_change` changed: in the sandbox's member namespaces, the sockets
//!   of the service whose destination differs from where `connect()` would send them under
//!   the maps as they are now;
//! - the node router is back (`reset_bypassed`): in the pods' namespaces, the sockets that went
//!   straight to an HTTP service while it was down, so that they come back through it.
//!
//! It destroys them with the kernel function `bpf_sock_destroy` (Linux 6.5+): the application
//! sees the connection aborted and reconnects. Each destroyed socket writes its dialed address
//! to the iterator's output, which the daemon counts.
use aya_ebpf::{
    Global,
    cty::c_void,
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_seq_write, bpf_sk_storage_get},
};
use redirector_common::{
    FAMILY_V4, IPPROTO_TCP, RESET_BYPASSED_ROUTER, ServiceKey, SockAddr, SockState,
};

use crate::{
    maps::{RESETS, ROUTES, SOCK_STATE},
    xlate,
};

/// `struct bpf_iter__tcp`, the context of a TCP iterator program.
#[repr(C)]
pub struct IterTcpContext {
    meta: *const IterMeta,
    sk_common: *mut c_void,
    uid: u32,
}

/// The head of `struct bpf_iter_meta`.
#[repr(C)]
struct IterMeta {
    seq: *mut c_void,
}

/// Offsets of `struct sock_common` fields, read by the loader from the running kernel's BTF
/// (the defaults are those of x86-64 kernels since 4.x; the program is loaded only with BTF).
#[unsafe(no_mangle)]
static SKC_DADDR_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKC_DPORT_OFFSET: Global<u32> = Global::new(12);
#[unsafe(no_mangle)]
static SKC_FAMILY_OFFSET: Global<u32> = Global::new(16);
#[unsafe(no_mangle)]
static SKC_V6_DADDR_OFFSET: Global<u32> = Global::new(56);

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The placeholder the loader replaces with a call of the kernel function `bpf_sock_destroy`:
/// a helper call with this (nonexistent) number, rewritten before the object is loaded into a
/// kernel-function call with the function's BTF id (`BPF_PSEUDO_KFUNC_CALL`), since the loader
/// has no relocation for kernel functions. See `redirector-user/src/kernel/kfunc.rs`.
pub const SOCK_DESTROY_PLACEHOLDER: u32 = 0x7ead_0001;

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn reset_tcp(ctx: *mut IterTcpContext) -> i32 {
    // SAFETY: the context is valid for the program's run; its `sk_common` is null at the end of
    // the walk, which is checked before use.
    let (sk, meta) = unsafe { ((*ctx).sk_common, (*ctx).meta) };
    if sk.is_null() {
        return 0;
    }
    if let Some(dialed) = to_reset(sk)
        && sock_destroy(sk) == 0
    {
        // SAFETY: `meta` is the iterator's own, valid for its run, and its `seq` the output.
        unsafe {
            let seq = (*meta).seq;
            bpf_seq_write(
                seq.cast(),
                core::ptr::addr_of!(dialed).cast(),
                size_of::<SockAddr>() as u32,
            );
        }
    }
    0
}

/// The service address a socket dialed, if a changed route would now send its connection
/// somewhere else than where it goes.
#[inline(always)]
fn to_reset(sk: *mut c_void) -> Option<SockAddr> {
    let peer = peer_of(sk)?;
    // A socket the forward hooks sent elsewhere (to a fork, or to the router) records what it
    // dialed on itself; any other went where it dialed. The daemon never asks for the services
    // whose member connections go through the router (it routes those per request).
    // SAFETY: the map pointer is the socket storage map's (a BTF map's static is its
    // definition); `sk` is the iterator's socket; no storage is created (flags 0).
    let state = unsafe {
        bpf_sk_storage_get(
            core::ptr::addr_of!(SOCK_STATE) as *mut c_void,
            sk,
            core::ptr::null_mut(),
            0,
        )
    } as *const SockState;
    let dialed = if state.is_null() {
        peer
    } else {
        // SAFETY: non-null storage pointer from the helper, copied out at once.
        let state = unsafe { *state };
        if state.fork.family == 0 || state.fork != peer {
            return None;
        }
        state.dialed
    };
    let key = ServiceKey {
        addr: dialed.addr,
        port: dialed.port,
        family: dialed.family,
        protocol: IPPROTO_TCP,
    };
    let request = RESETS.get_ptr(&key)?;
    // SAFETY: pointer from a successful lookup, copied out at once.
    let request = unsafe { *request };
    if request.kind == RESET_BYPASSED_ROUTER {
        // Went straight to the service (no storage: neither handed to the router nor
        // steered to a fork), which the router would have routed per request.
        return state.is_null().then_some(dialed);
    }
    let route = request.route;
    // Where connect() would send it now: the same endpoint choice, by the socket's cookie.
    let now = match ROUTES.get_ptr(&route) {
        // SAFETY: as above; `sk` is the iterator's socket.
        Some(value) => xlate::endpoint(|| unsafe { bpf_get_socket_cookie(sk) }, &route, &unsafe {
            *value
        }),
        None => dialed,
    };
    (now != peer).then_some(dialed)
}

/// The socket's remote address, IPv4 ones of IPv6 sockets (v4-mapped) as IPv4.
#[inline(always)]
fn peer_of(sk: *mut c_void) -> Option<SockAddr> {
    let field = |offset: &Global<u32>| sk.cast::<u8>().wrapping_add(offset.load() as usize);
    // SAFETY: reads of the iterator's socket at offsets the loader took from the kernel's BTF;
    // a failed read (never expected) skips the socket.
    unsafe {
        let family: u16 = bpf_probe_read_kernel(field(&SKC_FAMILY_OFFSET).cast()).ok()?;
        let port: u16 = bpf_probe_read_kernel(field(&SKC_DPORT_OFFSET).cast()).ok()?;
        match family {
            AF_INET => {
                let addr: u32 = bpf_probe_read_kernel(field(&SKC_DADDR_OFFSET).cast()).ok()?;
                Some(SockAddr {
                    addr: [addr, 0, 0, 0],
                    port,
                    family: FAMILY_V4,
                    _pad: 0,
                })
            }
            AF_INET6 => {
                let words: [u32; 4] =
                    bpf_probe_read_kernel(field(&SKC_V6_DADDR_OFFSET).cast()).ok()?;
                Some(xlate::from_ip6(words, port))
            }
            _ => None,
        }
    }
}

/// `bpf_sock_destroy(sk)`: aborts the connection (the peer gets a reset, the application
/// `ECONNABORTED`). 0 on success.
#[inline(always)]
fn sock_destroy(sk: *mut c_void) -> i64 {
    let ret: i64;
    // SAFETY: a call instruction the loader turns into the kernel function's call (see
    // SOCK_DESTROY_PLACEHOLDER); it takes the socket in r1 and clobbers r1-r5 like any call.
    unsafe {
        core::arch::asm!(
            "call {placeholder}",
            placeholder = const SOCK_DESTROY_PLACEHOLDER,
            inlateout("r1") sk => _,
            lateout("r0") ret,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
        );
    }
    ret
}
