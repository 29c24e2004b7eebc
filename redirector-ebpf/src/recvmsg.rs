//! `cgroup/recvmsg4` and `cgroup/recvmsg6`: replies to a steered UDP socket come from the service it sent to.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{SYS_PROCEED, xlate};

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    xlate::rev4(&ctx);
    SYS_PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    xlate::rev6(&ctx);
    SYS_PROCEED
}
