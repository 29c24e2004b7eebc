//! The translations every hook shares.
//!
//! Forward (connect, sendmsg): service address -> a sandbox member's fork endpoint, or (TCP to
//! an HTTP service with a fork) -> the node router.
//! Reverse (getpeername, recvmsg): fork or router -> the service address the socket dialed.
//! IPv6 sockets dialing a v4-mapped address go through the IPv4 tables, so an IPv4 service
//! behaves the same whichever socket family reaches it.
use aya_ebpf::{
    Global,
    cty::c_void,
    helpers::{bpf_ktime_get_coarse_ns, bpf_map_lookup_elem, bpf_sk_release},
    programs::SockAddrContext,
};
use redirector_common::{
    EndpointKey, FAMILY_V4, FAMILY_V6, MEMBER_INJECT_KEY, ROUTER_SOCKET_V4, ROUTER_SOCKET_V6,
    ROUTER_STALE_NS, RevNatKey, RouteKey, RouteValue, SERVICE_HTTP_HANDOFF, SOCK_STATE_REVNAT,
    ServiceKey, SockAddr, dst_filter, endpoint_index, stats, table_stats,
};

use crate::{
    ctx,
    maps::{
        BPF_NOEXIST, DST_FILTER, ENDPOINTS, MEMBERS, REVNAT, ROUTER, ROUTER_SOCKETS, ROUTES,
        SERVICES, SOCK_STATE, count, count_route, count_table,
    },
};

/// Set by the loader (`redirector run --count-fast-path`): count the connections that take the
/// fast path. Off by default, so untouched traffic pays its one lookup and nothing more; being
/// read-only data, the verifier drops the counting branch entirely when it is 0.
#[unsafe(no_mangle)]
static COUNT_FAST_PATH: Global<u8> = Global::new(0);

/// Third word of a v4-mapped IPv6 address (`::ffff:a.b.c.d`) as it sits in memory.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Which forward hook runs: `connect()` gives the socket one peer; an unconnected `sendmsg()`
/// one destination among possibly several.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forward {
    Connect,
    Send,
}

/// Forward translation for an IPv4 socket.
#[inline(always)]
pub(crate) fn fwd4(ctx: &SockAddrContext, hook: Forward) {
    let dialed = SockAddr {
        addr: [ctx::ip4(ctx), 0, 0, 0],
        port: ctx::port(ctx),
        family: FAMILY_V4,
        _pad: 0,
    };
    if let Some(fork) = steer(ctx, &dialed, hook) {
        // A v4 service only ever has a v4 fork (the daemon validates families).
        ctx::set_ip4(ctx, fork.addr[0]);
        ctx::set_port(ctx, fork.port);
    }
}

/// Forward translation for an IPv6 socket (native IPv6 or v4-mapped).
#[inline(always)]
pub(crate) fn fwd6(ctx: &SockAddrContext, hook: Forward) {
    let dialed = from_ip6(ctx::ip6(ctx), ctx::port(ctx));
    if let Some(fork) = steer(ctx, &dialed, hook) {
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

/// Decides where this socket's connection goes instead of `dialed`, if anywhere: a sandbox
/// member's fork (L4), or the node router for an HTTP service (L7), also for a member whose
/// sandbox injects its key (`MEMBER_INJECT_KEY`), falling back to its fork (L4) while the
/// router is down. Records the reverse entry so the application keeps seeing `dialed`.
/// `None` leaves the destination untouched.
#[inline(always)]
fn steer(ctx: &SockAddrContext, dialed: &SockAddr, hook: Forward) -> Option<SockAddr> {
    let key = ServiceKey {
        addr: dialed.addr,
        port: dialed.port,
        family: dialed.family,
        protocol: ctx::protocol(ctx),
    };
    // The fast path: almost every connection ends here, after one array read or, when its bit
    // is shared with a service, one hash lookup.
    if !maybe_service(&key) {
        count_fast_path();
        return None;
    }
    let Some(service) = SERVICES.get_ptr(&key) else {
        count_fast_path();
        return None;
    };
    // SAFETY: pointer from a successful lookup; values are plain data and entries are replaced,
    // never mutated in place, by the daemon.
    let service = unsafe { *service };

    let http = service.flags & SERVICE_HTTP_HANDOFF != 0;
    let (target, handed_off) = match fork_of_member(ctx, service.service_id, dialed) {
        // A member whose sandbox injects its key: to the router, which adds the key to each
        // request and routes it to the fork; while the router is down, to the fork directly.
        Some((fork, route, inject)) if http && inject => match handoff(ctx, dialed, hook) {
            Some(router) => (router, true),
            None => {
                count(stats::STEERED);
                count_route(&route);
                (fork, false)
            }
        },
        Some((fork, route, _)) => {
            count(stats::STEERED);
            count_route(&route);
            (fork, false)
        }
        None if http => (handoff(ctx, dialed, hook)?, true),
        None => {
            count(stats::SERVICE_PASS);
            return None;
        }
    };

    if !handed_off && !remember(ctx, dialed, target, hook) {
        // Still redirect: the connection works, only getpeername shows the real peer.
        count(stats::REVNAT_UPDATE_FAILED);
    }
    Some(target)
}

/// Whether `key` may be a service: its bit in the destination filter is set (or the filter
/// cannot be read, when the services map must decide).
#[inline(always)]
fn maybe_service(key: &ServiceKey) -> bool {
    let (word, mask) = dst_filter::word_and_mask(key);
    match DST_FILTER.get(word) {
        Some(bits) => bits & mask != 0,
        None => true,
    }
}

#[inline(always)]
fn count_fast_path() {
    if COUNT_FAST_PATH.load() != 0 {
        count(stats::FAST_PATH);
    }
}

/// Records on the socket that `dialed` now goes to `target`, for the reverse hooks.
///
/// Creating the storage is most of what a steered or handed-off `connect()` costs here: two
/// allocations charged to the map's memory cgroup, about 0.9 µs of 1.2 µs on the benchmark
/// machine, whatever the value's size (an element takes 128 bytes plus the value, and any
/// value up to 64 bytes lands in the same 192-byte slab). So nothing is built on the stack to
/// start it with: a new storage comes zeroed from the kernel, whereas a zero `SockState` of our
/// own is cleared by a byte-at-a-time `memset` loop, 70-100 ns per connection.
#[inline(always)]
fn remember(ctx: &SockAddrContext, dialed: &SockAddr, target: SockAddr, hook: Forward) -> bool {
    // SAFETY: the helper takes the context's own socket; the pointer it returns is this
    // socket's storage, valid for the rest of the program. Without an initial value a new
    // storage starts zeroed (family 0: no connect record, no flags).
    let state = unsafe { SOCK_STATE.get_or_insert_ptr_mut(ctx, None) };
    if state.is_null() {
        return false;
    }
    if hook == Forward::Connect {
        // SAFETY: non-null storage pointer from the helper, this socket's alone (the socket
        // is locked while its syscall runs the hook). A socket that had storage already (it
        // sent unconnected datagrams first, or connects again) keeps its flags.
        unsafe {
            (*state).fork = target;
            (*state).dialed = *dialed;
        }
        return true;
    }
    // SAFETY: as above.
    unsafe { (*state).flags |= SOCK_STATE_REVNAT };
    let rev = RevNatKey {
        socket_cookie: ctx::socket_cookie(ctx),
        fork: target,
        _pad: 0,
    };
    // A socket sends many datagrams to one service: the entry it made with the first is only
    // looked up (which also marks it recently used), not written again.
    if let Some(known) = REVNAT.get_ptr(&rev) {
        // SAFETY: a value pointer from the lookup, read at once.
        if unsafe { *known } == *dialed {
            return true;
        }
        // The same fork endpoint behind another service: replaced whole, never torn.
        return REVNAT.insert(&rev, dialed, 0).is_ok();
    }
    // Creations are counted: entries leave this map only by eviction, so the daemon derives
    // the evictions from the count and what is left.
    if REVNAT.insert(&rev, dialed, BPF_NOEXIST).is_ok() {
        count_table(table_stats::REVERSE_CREATED);
        return true;
    }
    // Another thread of the process created it meanwhile.
    REVNAT.insert(&rev, dialed, 0).is_ok()
}

/// The fork this socket's pod must reach instead of the service, if the pod is a sandbox
/// member and its sandbox forks the service, with whether the sandbox injects its key
/// ([`MEMBER_INJECT_KEY`]).
#[inline(always)]
fn fork_of_member(
    ctx: &SockAddrContext,
    service_id: u32,
    dialed: &SockAddr,
) -> Option<(SockAddr, RouteKey, bool)> {
    let member = MEMBERS.get_ptr(&ctx::netns_cookie(ctx))?;
    // SAFETY: pointer from a successful lookup, copied out at once.
    let member = unsafe { *member };
    let sandbox_id = member.sandbox_id;
    let route = RouteKey {
        service_id,
        sandbox_id,
    };
    let value = ROUTES.get_ptr(&route)?;
    // SAFETY: as above; copied out before the map can change under us.
    let value = unsafe { *value };
    let fork = endpoint(|| ctx::socket_cookie(ctx), &route, &value);
    // Cannot differ with a daemon-validated state; never rewrite across families.
    let inject = member.flags & MEMBER_INJECT_KEY != 0;
    (fork.family == dialed.family).then_some((fork, route, inject))
}

/// The endpoint of the route a socket with this cookie uses (see
/// `redirector_common::endpoint_index`); the cookie is asked for only when the route has
/// several endpoints.
#[inline(always)]
pub(crate) fn endpoint(
    cookie: impl FnOnce() -> u64,
    route: &RouteKey,
    value: &RouteValue,
) -> SockAddr {
    if value.count <= 1 {
        return value.first;
    }
    let index = endpoint_index(cookie(), value.count);
    if index == 0 {
        return value.first;
    }
    let key = EndpointKey {
        route: *route,
        index,
    };
    match ENDPOINTS.get_ptr(&key) {
        // SAFETY: pointer from a successful lookup, copied out at once.
        Some(endpoint) => unsafe { *endpoint },
        // Only while the daemon shrinks the set (it removes endpoints after lowering the count
        // that this program read before): the value's own first endpoint belongs to its set.
        None => value.first,
    }
}

/// Hands the connection to the node router if it is alive, recording the original destination
/// on the socket (the sock_ops program passes it on to the router, and the reverse hooks show
/// it to the application). `None` (router down, this is the router's own upstream socket, or
/// the record cannot be made) leaves the connection on its way to `dialed`: fail open.
#[inline(always)]
fn handoff(ctx: &SockAddrContext, dialed: &SockAddr, hook: Forward) -> Option<SockAddr> {
    let router = ROUTER.get_ptr(0)?;
    // SAFETY: array slot 0 always exists; copied out at once.
    let router = unsafe { *router };
    if ctx::socket_mark(ctx) == router.mark && router.mark != 0 {
        count(stats::ROUTER_OWN);
        return None;
    }
    // CLOCK_MONOTONIC as of the last timer tick: the router's heartbeat is CLOCK_MONOTONIC
    // too, and a tick (a few ms at most) is nothing next to the 800 ms staleness bound. It
    // reads the time the kernel kept at the tick instead of the clock source: about a third
    // less than `bpf_ktime_get_ns` in a profile of the hand-off here (a virtual machine).
    // SAFETY: helper without preconditions (Linux 5.11+).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // Saturating: a heartbeat written since the last tick is ahead of `now`, and fresh.
    if now.saturating_sub(router.heartbeat_ns) > ROUTER_STALE_NS {
        count(stats::ROUTER_DOWN);
        return None;
    }
    let (target, slot) = if dialed.family == FAMILY_V4 {
        (router.v4, ROUTER_SOCKET_V4)
    } else {
        (router.v6, ROUTER_SOCKET_V6)
    };
    if target.family != dialed.family {
        // The router does not listen on this family: no per-request routing, stay direct.
        count(stats::SERVICE_PASS);
        return None;
    }
    if !router_listening(slot) {
        count(stats::ROUTER_DOWN);
        return None;
    }
    if !remember(ctx, dialed, target, hook) {
        // Without the record the router could not know where to forward: stay direct.
        count(stats::SERVICE_PASS);
        return None;
    }
    count(stats::HANDOFF);
    Some(target)
}

/// True while the router's listening socket for this family is open.
#[inline(always)]
fn router_listening(slot: u32) -> bool {
    // SockMap keeps its definition private; being `repr(transparent)` over it, the static's
    // address is the map pointer the helper wants.
    let map = core::ptr::addr_of!(ROUTER_SOCKETS) as *mut c_void;
    // SAFETY: valid map pointer and key; a non-null result is a referenced socket that must be
    // released, which happens right away.
    unsafe {
        let sk = bpf_map_lookup_elem(map, core::ptr::addr_of!(slot).cast());
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}

/// The service address this socket dialed, if `peer` is a fork it was steered to. A socket
/// the forward hooks never touched has no storage: one lookup in the socket itself, and out.
#[inline(always)]
fn dialed_service(ctx: &SockAddrContext, peer: SockAddr) -> Option<SockAddr> {
    // SAFETY: the helper takes the context's own socket; null when it has no storage.
    let state = unsafe { SOCK_STATE.get_ptr_mut(ctx) };
    if state.is_null() {
        return None;
    }
    // SAFETY: non-null storage pointer from the helper, copied out at once.
    let state = unsafe { *state };
    if state.fork.family != 0 && state.fork == peer {
        count(stats::REVERSE_HIT);
        return Some(state.dialed);
    }
    if state.flags & SOCK_STATE_REVNAT == 0 {
        return None;
    }
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
pub(crate) fn from_ip6(words: [u32; 4], port: u16) -> SockAddr {
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
