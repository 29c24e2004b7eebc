//! `cgroup/sendmsg4` and `cgroup/sendmsg6`: steer a member's unconnected UDP datagram to its fork.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{SYS_PROCEED, xlate};

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    xlate::fwd4(&ctx, xlate::Forward::Send);
    SYS_PROCEED
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    xlate::fwd6(&ctx, xlate::Forward::Send);
    SYS_PROCEED
}
