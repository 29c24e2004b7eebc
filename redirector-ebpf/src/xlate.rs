//! The translations every hook shares.
//!
//! Forward (connect, sendmsg): service address -> fork endpoint, for sandbox members only.
//! Reverse (getpeername, recvmsg): fork endpoint -> the service address the socket dialed.
//! IPv6 sockets dialing a v4-mapped address go through the IPv4 tables, so an IPv4 service
//! behaves the same whichever socket family reaches it.
use aya_ebpf::programs::SockAddrContext;
use redirector_common::{FAMILY_V4, FAMILY_V6, RevNatKey, RouteKey, ServiceKey, SockAddr, stats};

use crate::{
    ctx,
    maps::{MEMBERS, REVNAT, ROUTES, SERVICES, count},
};

/// Third word of a v4-mapped IPv6 address (`::ffff:a.b.c.d`) as it sits in memory.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Forward translation for an IPv4 socket.
#[inline(always)]
pub(crate) fn fwd4(ctx: &SockAddrContext) {
    let dialed = SockAddr {
        addr: [ctx::ip4(ctx), 0, 0, 0],
        port: ctx::port(ctx),
        family: FAMILY_V4,
        _pad: 0,
    };
    if let Some(fork) = steer(ctx, &dialed) {
        // A v4 service only ever has a v4 fork (the daemon validates families).
        ctx::set_ip4(ctx, fork.addr[0]);
        ctx::set_port(ctx, fork.port);
    }
}

/// Forward translation for an IPv6 socket (native IPv6 or v4-mapped).
#[inline(always)]
pub(crate) fn fwd6(ctx: &SockAddrContext) {
    let dialed = from_ip6(ctx::ip6(ctx), ctx::port(ctx));
    if let Some(fork) = steer(ctx, &dialed) {
        ctx::set_ip6(ctx, &to_ip6(&fork));
        ctx::set_port(ctx, fork.port);
    }
}

/// Reverse translation for an IPv4 socket.
#[inline(always)]
pub(crate) fn rev4(ctx: &SockAddrContext) {
    let peer = SockAddr {
        addr: [ctx::ip4(ctx), 0, 0, 0],
        port: ctx::port(ctx),
        family: FAMILY_V4,
        _pad: 0,
    };
    if let Some(service) = dialed_service(ctx, peer) {
        ctx::set_ip4(ctx, service.addr[0]);
        ctx::set_port(ctx, service.port);
    }
}

/// Reverse translation for an IPv6 socket.
#[inline(always)]
pub(crate) fn rev6(ctx: &SockAddrContext) {
    let peer = from_ip6(ctx::ip6(ctx), ctx::port(ctx));
    if let Some(service) = dialed_service(ctx, peer) {
        ctx::set_ip6(ctx, &to_ip6(&service));
        ctx::set_port(ctx, service.port);
    }
}

/// Decides whether this socket's destination must go to a fork, and if so records the reverse
/// entry and returns the fork. `None` leaves the destination untouched.
#[inline(always)]
fn steer(ctx: &SockAddrContext, dialed: &SockAddr) -> Option<SockAddr> {
    let key = ServiceKey {
        addr: dialed.addr,
        port: dialed.port,
        family: dialed.family,
        protocol: ctx::protocol(ctx),
    };
    // The fast path: almost every connection ends here after this one lookup.
    let Some(service) = SERVICES.get_ptr(&key) else {
        count(stats::FAST_PATH);
        return None;
    };
    // SAFETY: pointer from a successful lookup; values are plain data and entries are replaced,
    // never mutated in place, by the daemon.
    let service_id = unsafe { (*service).service_id };

    let Some(member) = MEMBERS.get_ptr(&ctx::netns_cookie(ctx)) else {
        count(stats::SERVICE_PASS);
        return None;
    };
    // SAFETY: as above.
    let sandbox_id = unsafe { (*member).sandbox_id };

    let route = RouteKey {
        service_id,
        sandbox_id,
    };
    let Some(fork) = ROUTES.get_ptr(&route) else {
        count(stats::SERVICE_PASS);
        return None;
    };
    // SAFETY: as above; copied out before the map can change under us.
    let fork = unsafe { *fork };
    if fork.family != dialed.family {
        // Cannot happen with a daemon-validated state; never rewrite across families.
        count(stats::SERVICE_PASS);
        return None;
    }

    let rev = RevNatKey {
        socket_cookie: ctx::socket_cookie(ctx),
        fork,
        _pad: 0,
    };
    if REVNAT.insert(&rev, dialed, 0).is_err() {
        // Still steer: the connection works, only getpeername shows the fork.
        count(stats::REVNAT_UPDATE_FAILED);
    }
    count(stats::STEERED);
    Some(fork)
}

/// The service address this socket dialed, if `peer` is a fork it was steered to.
#[inline(always)]
fn dialed_service(ctx: &SockAddrContext, peer: SockAddr) -> Option<SockAddr> {
    let key = RevNatKey {
        socket_cookie: ctx::socket_cookie(ctx),
        fork: peer,
        _pad: 0,
    };
    let service = REVNAT.get_ptr(&key)?;
    count(stats::REVERSE_HIT);
    // SAFETY: pointer from a successful lookup, copied out at once.
    Some(unsafe { *service })
}

#[inline(always)]
fn from_ip6(words: [u32; 4], port: u16) -> SockAddr {
    if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD {
        SockAddr {
            addr: [words[3], 0, 0, 0],
            port,
            family: FAMILY_V4,
            _pad: 0,
        }
    } else {
        SockAddr {
            addr: words,
            port,
            family: FAMILY_V6,
            _pad: 0,
        }
    }
}

#[inline(always)]
fn to_ip6(addr: &SockAddr) -> [u32; 4] {
    if addr.family == FAMILY_V4 {
        [0, 0, V4_MAPPED_WORD, addr.addr[0]]
    } else {
        addr.addr
    }
}
