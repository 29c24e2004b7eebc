//! `cgroup/connect4` and `cgroup/connect6`: steer a member's TCP connection or connected UDP socket to its fork.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{SYS_PROCEED, xlate};

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // The `upgrade-probe` test build differs from a release build by this one instruction, so
    // the upgrade test can tell old programs from new ones by their kernel tags. The limited
    // broadcast address is never a service, so skipping it changes no behaviour.
    #[cfg(feature = "upgrade-probe")]
    if crate::ctx::ip4(&ctx) == u32::MAX {
        return SYS_PROCEED;
    }
    xlate::fwd4(&ctx, xlate::Forward::Connect);
    SYS_PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    xlate::fwd6(&ctx, xlate::Forward::Connect);
    SYS_PROCEED
}
