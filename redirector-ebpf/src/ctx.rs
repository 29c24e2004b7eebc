//! Accessors for `struct bpf_sock_addr`.
//!
//! The verifier only accepts 4-byte loads and stores of `user_ip4`, `user_ip6[i]` and
//! `user_port`; volatile accesses keep LLVM from merging or narrowing them.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

#[inline(always)]
pub(crate) fn ip4(ctx: &SockAddrContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run; aligned 4-byte load.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_ip4)) }
}

#[inline(always)]
pub(crate) fn set_ip4(ctx: &SockAddrContext, addr: u32) {
    // SAFETY: writable field of the context for connect/sendmsg/recvmsg/getpeername hooks.
    unsafe { write_volatile(addr_of_mut!((*ctx.sock_addr).user_ip4), addr) }
}

#[inline(always)]
pub(crate) fn ip6(ctx: &SockAddrContext) -> [u32; 4] {
    // SAFETY: as `ip4`, one 4-byte load per word.
    unsafe {
        let words = addr_of!((*ctx.sock_addr).user_ip6) as *const u32;
        [
            read_volatile(words),
            read_volatile(words.add(1)),
            read_volatile(words.add(2)),
            read_volatile(words.add(3)),
        ]
    }
}

#[inline(always)]
pub(crate) fn set_ip6(ctx: &SockAddrContext, addr: &[u32; 4]) {
    // SAFETY: as `set_ip4`, one 4-byte store per word.
    unsafe {
        let words = addr_of_mut!((*ctx.sock_addr).user_ip6) as *mut u32;
        write_volatile(words, addr[0]);
        write_volatile(words.add(1), addr[1]);
        write_volatile(words.add(2), addr[2]);
        write_volatile(words.add(3), addr[3]);
    }
}

/// The port in network byte order. The kernel keeps it in the low 16 bits of a 4-byte field.
#[inline(always)]
pub(crate) fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: aligned 4-byte load of a context field.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_port)) as u16 }
}

#[inline(always)]
pub(crate) fn set_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: aligned 4-byte store of a writable context field.
    unsafe { write_volatile(addr_of_mut!((*ctx.sock_addr).user_port), port as u32) }
}

/// IPPROTO_* of the socket (TCP for stream sockets, UDP for datagram ones).
#[inline(always)]
pub(crate) fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: aligned 4-byte load of a read-only context field.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).protocol)) as u8 }
}

/// SO_MARK of the socket. The node router marks its upstream sockets so they are never handed
/// back to it.
#[inline(always)]
pub(crate) fn socket_mark(ctx: &SockAddrContext) -> u32 {
    // SAFETY: `sk` is a kernel-provided, non-null `struct bpf_sock *` for sock_addr programs
    // (Linux 5.3+); `mark` is a readable 4-byte field.
    unsafe {
        let sk = read_volatile(addr_of!((*ctx.sock_addr).__bindgen_anon_1.sk));
        read_volatile(addr_of!((*sk).mark))
    }
}

/// Identifies the pod: every socket created in one network namespace shares this cookie.
#[inline(always)]
pub(crate) fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper allowed for sock_addr programs since Linux 5.7; takes the context pointer.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// Identifies the socket for its whole life; keys the reverse translation.
#[inline(always)]
pub(crate) fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper allowed for sock_addr programs since Linux 5.7; takes the context pointer.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}
