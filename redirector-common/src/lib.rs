//! Map keys, values, names and sizes shared by redirector's kernel programs and its daemon.
//!
//! Every type here is `#[repr(C)]` with explicit padding so that the kernel and userspace agree
//! on its layout byte for byte; `size_of` checks at the bottom pin those layouts down.
//! Addresses and ports are stored in network byte order, exactly as the kernel hands them to a
//! `cgroup/sock_addr` program, so the hot path never converts.
#![no_std]

/// Suffix of every pinned map name. Bump it whenever a key or value layout changes, so that a new
/// daemon never reads maps pinned by an older one with a different layout.
pub const MAP_VERSION: &str = "v2";

/// Map names, as declared by the kernel programs and pinned under the bpffs directory.
///
/// Keep in sync with the `#[map]` statics in `redirector-ebpf/src/maps.rs`; each ends in
/// [`MAP_VERSION`].
pub mod map_names {
    pub const SERVICES: &str = "RDR_SERVICES_v2";
    pub const MEMBERS: &str = "RDR_MEMBERS_v2";
    pub const ROUTES: &str = "RDR_ROUTES_v2";
    pub const ENDPOINTS: &str = "RDR_ENDPTS_v2";
    pub const REVNAT: &str = "RDR_REVNAT_v2";
    pub const STATS: &str = "RDR_STATS_v2";
    pub const ROUTER: &str = "RDR_ROUTER_v2";
    pub const ORIG_DST: &str = "RDR_ORIGDST_v2";
    pub const ROUTER_SOCKETS: &str = "RDR_RSOCKS_v2";
    pub const ROUTE_STATS: &str = "RDR_RTSTAT_v2";
    pub const SOCK_STATE: &str = "RDR_SKSTATE_v2";
    pub const TABLE_STATS: &str = "RDR_TBLSTAT_v2";
    pub const DST_FILTER: &str = "RDR_DSTFLT_v2";
    /// Not pinned: the reset requests of one run of the socket iterator (`reset_on_change`).
    pub const RESETS: &str = "RDR_RESETS_v2";

    pub const ALL: [&str; 13] = [
        SERVICES,
        MEMBERS,
        ROUTES,
        ENDPOINTS,
        REVNAT,
        STATS,
        ROUTER,
        ORIG_DST,
        ROUTER_SOCKETS,
        ROUTE_STATS,
        SOCK_STATE,
        TABLE_STATS,
        DST_FILTER,
    ];

    // A name without the version suffix would let a daemon of another layout open the map; one
    // longer than the kernel keeps (BPF_OBJ_NAME_LEN - 1) shows truncated in bpftool.
    const _: () = {
        let mut i = 0;
        while i < ALL.len() {
            assert!(
                super::ends_with(ALL[i], super::MAP_VERSION),
                "every pinned map name ends with MAP_VERSION"
            );
            assert!(
                ALL[i].len() <= 15,
                "map names fit the kernel's 15 characters"
            );
            i += 1;
        }
    };
}

/// `str::ends_with` for constant evaluation.
const fn ends_with(name: &str, suffix: &str) -> bool {
    let (name, suffix) = (name.as_bytes(), suffix.as_bytes());
    if suffix.len() + 1 > name.len() || name[name.len() - suffix.len() - 1] != b'_' {
        return false;
    }
    let mut i = 0;
    while i < suffix.len() {
        if name[name.len() - suffix.len() + i] != suffix[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Capacities. The daemon reports "map full" against these before it writes anything.
pub mod map_sizes {
    pub const SERVICES: u32 = 131_072;
    pub const MEMBERS: u32 = 16_384;
    pub const ROUTES: u32 = 131_072;
    /// Fork endpoints after each route's first (which sits in the route's own value): room for
    /// an average of three endpoints per route at full route capacity. Allocated on use
    /// (`BPF_F_NO_PREALLOC`), so an idle capacity costs no memory.
    pub const ENDPOINTS: u32 = 262_144;
    /// LRU: one entry per steered socket and fork address; old entries age out.
    pub const REVNAT: u32 = 262_144;
    /// LRU: handed-off connections the router has not accepted yet, by client address.
    pub const ORIG_DST: u32 = 65_536;
    /// Per-CPU, allocated on use: connections steered per route (for metrics); one slot per
    /// route, removed with it.
    pub const ROUTE_STATS: u32 = ROUTES;
    /// Services whose route for one sandbox changed, per run of the reset iterator.
    pub const RESETS: u32 = 4_096;
}

/// The destination filter (`RDR_DSTFLT`): one bit per hash of each forked service's key, in
/// an array of [`WORDS`](dst_filter::WORDS) 64-bit words. A destination whose bit is clear is
/// no service, and the forward hooks return after this one array read, which the verifier
/// turns into a plain memory load, instead of a hash-map lookup (50-90 ns per run on the
/// benchmark machine). A set bit says "maybe": the services map decides. The daemon sets a
/// service's bit before the service enters the services map and clears it only after it left
/// (and no other service shares the bit), so the filter never hides a service.
pub mod dst_filter {
    use super::ServiceKey;

    /// 2^20 bits (128 KiB): with 100 000 forked services about 9 % of the bits are set, so a
    /// destination that is no service still skips the hash lookup 91 % of the time.
    pub const BITS_LOG2: u32 = 20;
    pub const WORDS: u32 = 1 << (BITS_LOG2 - 6);

    /// The filter bit of `key`: the key folded into 64 bits (which keeps every bit of an IPv4
    /// key: address, port, family, protocol), mixed by splitmix64's finaliser. A single
    /// multiply-shift left services on consecutive addresses in a third of the bits they
    /// should set (their varying bytes sit high in the address word).
    #[inline(always)]
    pub const fn bit(key: &ServiceKey) -> u32 {
        let addr =
            (key.addr[0] ^ key.addr[2]) as u64 | (((key.addr[1] ^ key.addr[3]) as u64) << 32);
        let rest = ((key.port as u64) << 16) | ((key.family as u64) << 8) | key.protocol as u64;
        let mut x = addr ^ (rest << 32);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        (x >> (64 - BITS_LOG2)) as u32
    }

    /// Word index and mask of `key`'s bit.
    #[inline(always)]
    pub const fn word_and_mask(key: &ServiceKey) -> (u32, u64) {
        let bit = bit(key);
        (bit >> 6, 1u64 << (bit & 63))
    }
}

/// Address family tags used in keys and values (not the kernel's AF_* numbers, which differ).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// An IPv4 or IPv6 socket address in network byte order.
///
/// IPv4 addresses live in `addr[0]` with the other words zero, so that one key type serves both
/// families and a v4-mapped IPv6 destination can be looked up as plain IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    /// Network byte order words, as in `bpf_sock_addr.user_ip6` / `user_ip4`.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: u8,
}

/// Key of `RDR_SERVICES`: a baseline destination as the application dials it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
}

/// `ServiceValue::flags`: an HTTP service with a fork. Connections from pods that are not
/// steered at L4 go to the node router, which routes each request on its routing key.
pub const SERVICE_HTTP_HANDOFF: u32 = 1;

/// Value of `RDR_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    /// Small integer the daemon assigns to the service; routes are keyed by it.
    pub service_id: u32,
    /// `SERVICE_*` bits.
    pub flags: u32,
}

/// Value of `RDR_MEMBERS`, keyed by a network-namespace cookie (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MemberValue {
    /// Small integer the daemon assigns to a sandbox key; key strings stay in userspace.
    pub sandbox_id: u32,
    /// `MEMBER_*` bits; 0 from daemons that predate them (this word was padding).
    pub flags: u32,
}

/// [`MemberValue::flags`]: the member's sandbox has `inject_key`, so its connections to an HTTP
/// service the sandbox forks go to the node router (which adds the key to its requests) rather
/// than straight to the fork, while the router is up.
pub const MEMBER_INJECT_KEY: u32 = 1;

/// Key of `RDR_ROUTES` (value: [`RouteValue`]) and of `RDR_RTSTAT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RouteKey {
    pub service_id: u32,
    pub sandbox_id: u32,
}

/// Value of `RDR_ROUTES`: the fork's endpoints, a set of `count` addresses numbered from 0 in
/// the daemon's (sorted) order.
///
/// Endpoint 0 sits here, so that the common one-endpoint route costs no lookup beyond the route
/// itself; endpoints `1..count` are in `RDR_ENDPOINTS`. A connection takes endpoint
/// [`endpoint_index`]`(socket cookie, count)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RouteValue {
    pub first: SockAddr,
    /// At least 1.
    pub count: u32,
}

/// Key of `RDR_ENDPOINTS`: endpoint `index` (1 or more; 0 is [`RouteValue::first`]) of a route.
/// The value is the endpoint's [`SockAddr`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EndpointKey {
    pub route: RouteKey,
    pub index: u32,
}

/// Which of a route's `count` endpoints a socket uses: a hash of its cookie, so a socket keeps
/// its endpoint for as long as the set keeps its size (an unconnected UDP socket sends every
/// datagram to one endpoint, and the reverse translation of the replies stays right), while new
/// sockets spread over all of them.
///
/// The cookie is mixed first because cookies count up in steps that depend on what else makes
/// sockets: a plain `cookie % count` with a step that shares a factor with `count` would pin
/// every connection to a subset of the endpoints.
#[inline(always)]
pub const fn endpoint_index(socket_cookie: u64, count: u32) -> u32 {
    if count <= 1 {
        return 0;
    }
    // splitmix64's finaliser: every input bit reaches every output bit.
    let mut x = socket_cookie;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    // Never None (count > 1 here); `checked_rem` keeps a panic path out of the kernel program.
    match x.checked_rem(count as u64) {
        Some(index) => index as u32,
        None => 0,
    }
}

/// Key of `RDR_REVNAT`: the fork address a steered socket really talks to. The value is the
/// service address the application dialed, given back by `getpeername` and `recvmsg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNatKey {
    pub socket_cookie: u64,
    pub fork: SockAddr,
    pub _pad: u32,
}

/// Value of `RDR_SKSTATE` (socket-local storage): what the forward hooks did to this socket,
/// so that the reverse hooks answer from the socket itself, and return at once for every
/// socket they never touched (every server's accepted socket, most clients). It lives and dies
/// with the socket: nothing to evict, nothing to clean up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockState {
    /// Where `connect()` was sent instead of `dialed` (family 0: not connected by us).
    pub fork: SockAddr,
    /// The service address the application dialed.
    pub dialed: SockAddr,
    /// [`SOCK_STATE_REVNAT`]: unconnected sends were steered too; their reverse entries are
    /// in `RDR_REVNAT` (one socket may send to several services).
    pub flags: u32,
}

/// Value of `RDR_RESETS`, keyed by a service as dialed ([`ServiceKey`]): which of its member
/// sockets one run of the reset iterator destroys.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ResetRequest {
    /// For [`RESET_ROUTE_CHANGED`]: the route whose change is being applied.
    pub route: RouteKey,
    /// `RESET_*`.
    pub kind: u32,
}

/// [`ResetRequest::kind`]: the sockets the route (as the maps hold it now) would send
/// somewhere else than they go.
pub const RESET_ROUTE_CHANGED: u32 = 0;
/// [`ResetRequest::kind`]: the sockets that went straight to this HTTP service, bypassing the
/// node router while it was down.
pub const RESET_BYPASSED_ROUTER: u32 = 1;

/// [`SockState::flags`]: look in `RDR_REVNAT` for peers other than `fork`.
pub const SOCK_STATE_REVNAT: u32 = 1;

/// The single value of `RDR_ROUTER`: where the node router listens and whether it is alive.
///
/// The kernel hands connections to the router only while `heartbeat_ns` is recent (see
/// [`ROUTER_STALE_NS`]): a daemon that stops, crashes or is killed stops refreshing it and new
/// connections go straight to their destination again (fail open).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RouterConfig {
    /// IPv4 listen address; `family == 0` when the router has none.
    pub v4: SockAddr,
    /// IPv6 listen address; `family == 0` when the router has none.
    pub v6: SockAddr,
    /// CLOCK_MONOTONIC time of the router's last heartbeat (`bpf_ktime_get_ns`).
    pub heartbeat_ns: u64,
    /// SO_MARK of the router's own upstream sockets: never handed off (no loops).
    pub mark: u32,
    pub _pad: u32,
}

/// Slots of `RDR_RSOCKS` (a sockmap) holding the router's listening sockets. The kernel drops a
/// socket from the map the moment it closes, so a killed router stops receiving connections at
/// once, not only when its heartbeat goes stale.
pub const ROUTER_SOCKET_V4: u32 = 0;
pub const ROUTER_SOCKET_V6: u32 = 1;

/// A heartbeat older than this means the router is gone (or hung).
pub const ROUTER_STALE_NS: u64 = 800_000_000;

/// Slots of the per-CPU `RDR_STATS` array.
pub mod stats {
    /// Destination is not a service: the fast path, one lookup and out.
    pub const FAST_PATH: u32 = 0;
    /// Destination is a service but the socket is not steered (not a member, or no route).
    pub const SERVICE_PASS: u32 = 1;
    /// Destination rewritten to a fork.
    pub const STEERED: u32 = 2;
    /// `getpeername`/`recvmsg` gave the application back the service address.
    pub const REVERSE_HIT: u32 = 3;
    /// The reverse translation could not be recorded (no socket storage, or no reverse entry):
    /// the socket is still steered, but `getpeername`/`recvmsg` show the fork.
    pub const REVNAT_UPDATE_FAILED: u32 = 4;
    /// Connection to an HTTP service handed to the node router.
    pub const HANDOFF: u32 = 5;
    /// Hand-off skipped because the router's heartbeat is stale (fail open).
    pub const ROUTER_DOWN: u32 = 6;
    /// The router's own upstream connection passed through untouched.
    pub const ROUTER_OWN: u32 = 7;

    pub const COUNT: u32 = 8;
    pub const NAMES: [&str; COUNT as usize] = [
        "fast_path",
        "service_pass",
        "steered",
        "reverse_hit",
        "revnat_update_failed",
        "handoff",
        "router_down",
        "router_own",
    ];
}

/// Slots of the per-CPU `RDR_TBLSTAT` array: what the programs did to the two LRU tables, from
/// which the daemon derives their evictions (the kernel counts none). A map apart from
/// `RDR_STATS`, whose size a pinned map of an older build fixes.
pub mod table_stats {
    /// A hand-off record written to `RDR_ORIGDST`.
    pub const HANDOFF_RECORDED: u32 = 0;
    /// A hand-off record that could not be written: the router will close that connection.
    pub const HANDOFF_RECORD_FAILED: u32 = 1;
    /// A new entry in `RDR_REVNAT` (not a refresh of one the socket had).
    pub const REVERSE_CREATED: u32 = 2;

    pub const COUNT: u32 = 3;
}

// Layouts are part of the kernel ABI between program and daemon: fail the build if they drift.
const _: () = {
    assert!(core::mem::size_of::<SockAddr>() == 20);
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 8);
    assert!(core::mem::size_of::<MemberValue>() == 8);
    assert!(core::mem::size_of::<RouteKey>() == 8);
    assert!(core::mem::size_of::<RouteValue>() == 24);
    assert!(core::mem::size_of::<EndpointKey>() == 12);
    assert!(core::mem::size_of::<RevNatKey>() == 32);
    assert!(core::mem::size_of::<RouterConfig>() == 56);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY (all): plain-old-data `#[repr(C)]` structs with explicit padding fields, so every
    // byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for SockAddr {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for MemberValue {}
    unsafe impl aya::Pod for RouteKey {}
    unsafe impl aya::Pod for RouteValue {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RouterConfig {}
    unsafe impl aya::Pod for ResetRequest {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn every_map_name_ends_with_the_layout_version() {
        for name in map_names::ALL {
            assert!(name.starts_with("RDR_"), "{name}");
            assert!(ends_with(name, MAP_VERSION), "{name}");
            assert!(name.len() <= 15, "{name} is longer than the kernel keeps");
        }
        assert!(!ends_with("RDR_ROUTES_v1", MAP_VERSION));
        assert!(!ends_with("RDR_ROUTESv2", "v2"));
        assert!(!ends_with("v2", "v2"));
    }

    #[test]
    fn one_endpoint_is_always_index_zero() {
        for cookie in [0, 1, 7, u64::MAX] {
            assert_eq!(endpoint_index(cookie, 1), 0);
            assert_eq!(endpoint_index(cookie, 0), 0);
        }
    }

    /// Cookies in steps of 1 to 6 (other sockets take cookies in between) spread evenly over
    /// 2 to 5 endpoints, including steps that share a factor with the count.
    #[test]
    fn counting_cookies_spread_over_every_endpoint() {
        for step in 1..=6u64 {
            for count in 2..=5u32 {
                let mut hits = [0u32; 5];
                let n = 600u64;
                for i in 0..n {
                    let index = endpoint_index(1000 + i * step, count);
                    assert!(index < count);
                    hits[index as usize] += 1;
                }
                let even = (n / u64::from(count)) as u32;
                for (i, h) in hits.iter().take(count as usize).enumerate() {
                    assert!(
                        *h > even / 2 && *h < even * 3 / 2,
                        "step {step}, {count} endpoints: endpoint {i} got {h} of {n}"
                    );
                }
            }
        }
    }

    fn v4_key(addr: [u8; 4], port: u16, protocol: u8) -> ServiceKey {
        ServiceKey {
            addr: [u32::from_ne_bytes(addr), 0, 0, 0],
            port: port.to_be(),
            family: FAMILY_V4,
            protocol,
        }
    }

    /// The benchmark's worst case: 100 000 services on consecutive addresses, one port. They
    /// must set about as many distinct bits as random keys would (1 - e^-n/m of 2^20: 9.1 %),
    /// or the filter would pass more traffic to the hash lookup than its size promises.
    #[test]
    fn consecutive_services_spread_over_the_filter() {
        let mut bits = std::collections::HashSet::new();
        for i in 0..100_000u32 {
            let [_, b, c, d] = (0x0a80_0000 + i).to_be_bytes();
            let bit = dst_filter::bit(&v4_key([10, b, c, d], 8080, IPPROTO_TCP));
            assert!(bit < 1 << dst_filter::BITS_LOG2);
            bits.insert(bit);
        }
        assert!(bits.len() > 95_000, "{} distinct bits", bits.len());
    }

    #[test]
    fn port_protocol_and_family_each_change_the_bit() {
        let key = v4_key([10, 96, 0, 10], 8080, IPPROTO_TCP);
        let bit = dst_filter::bit(&key);
        assert_ne!(
            bit,
            dst_filter::bit(&v4_key([10, 96, 0, 10], 8081, IPPROTO_TCP))
        );
        assert_ne!(
            bit,
            dst_filter::bit(&v4_key([10, 96, 0, 10], 8080, IPPROTO_UDP))
        );
        let v6 = ServiceKey {
            family: FAMILY_V6,
            ..key
        };
        assert_ne!(bit, dst_filter::bit(&v6));
        let (word, mask) = dst_filter::word_and_mask(&key);
        assert!(word < dst_filter::WORDS);
        assert_eq!(mask.count_ones(), 1);
        assert_eq!(word * 64 + mask.trailing_zeros(), bit);
    }
}
