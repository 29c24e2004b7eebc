//! `cgroup/getpeername4` and `cgroup/getpeername6`: a steered socket's peer reads as the service it dialed.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{SYS_PROCEED, xlate};

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    xlate::rev4(&ctx);
    SYS_PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    xlate::rev6(&ctx);
    SYS_PROCEED
}
