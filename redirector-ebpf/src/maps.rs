//! The maps, pinned by name under the daemon's bpffs directory so that they (and the steering
//! they drive) outlive a daemon restart. Names and sizes come from `redirector_common`, which
//! the daemon reads too.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockMap},
};
use redirector_common::{
    EndpointKey, MemberValue, ResetRequest, RevNatKey, RouteKey, RouteValue, RouterConfig,
    ServiceKey, ServiceValue, SockAddr, SockState, dst_filter, map_sizes, stats, table_stats,
};

/// One bit per hash of each `SERVICES` key (see `redirector_common::dst_filter`): a clear bit
/// is the fast path without a hash lookup. Only the daemon writes it.
#[map(name = "RDR_DSTFLT_v2")]
pub(crate) static DST_FILTER: Array<u64> = Array::pinned(dst_filter::WORDS, 0);

/// Destinations that have at least one fork. A miss here is the fast path.
#[map(name = "RDR_SERVICES_v2")]
pub(crate) static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(map_sizes::SERVICES, 0);

/// Network-namespace cookie of a member pod -> its sandbox.
#[map(name = "RDR_MEMBERS_v2")]
pub(crate) static MEMBERS: HashMap<u64, MemberValue> = HashMap::pinned(map_sizes::MEMBERS, 0);

/// (service, sandbox) -> the fork's endpoint count and its first endpoint.
#[map(name = "RDR_ROUTES_v2")]
pub(crate) static ROUTES: HashMap<RouteKey, RouteValue> = HashMap::pinned(map_sizes::ROUTES, 0);

/// (route, index) -> the fork's endpoints after the first. Only the daemon writes it, so
/// allocating on insert costs the data path nothing and leaves unused capacity free.
#[map(name = "RDR_ENDPTS_v2")]
pub(crate) static ENDPOINTS: HashMap<EndpointKey, SockAddr> =
    HashMap::pinned(map_sizes::ENDPOINTS, BPF_F_NO_PREALLOC);

/// Per socket: what the forward hooks did to it (see `redirector_common::SockState`). A BTF
/// map (socket storage has no legacy definition); the daemon pins it by name like the others.
#[btf_map(name = "RDR_SKSTATE_v2")]
pub(crate) static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

/// (socket, fork endpoint) -> the service address the application dialed, for unconnected UDP
/// sends only (one socket may send to several services; connected sockets use `SOCK_STATE`).
#[map(name = "RDR_REVNAT_v2")]
pub(crate) static REVNAT: LruHashMap<RevNatKey, SockAddr> =
    LruHashMap::pinned(map_sizes::REVNAT, 0);

/// Where the node router listens and whether it is alive; one entry, written by the daemon.
#[map(name = "RDR_ROUTER_v2")]
pub(crate) static ROUTER: Array<RouterConfig> = Array::pinned(1, 0);

/// The router's listening sockets, by `ROUTER_SOCKET_V4`/`_V6`; a closed socket leaves the
/// map by itself.
#[map(name = "RDR_RSOCKS_v2")]
pub(crate) static ROUTER_SOCKETS: SockMap = SockMap::pinned(2, 0);

/// Client address (as the router sees the peer) -> original destination. The router reads and
/// deletes the entry when it accepts the connection.
#[map(name = "RDR_ORIGDST_v2")]
pub(crate) static ORIG_DST: LruHashMap<SockAddr, SockAddr> =
    LruHashMap::pinned(map_sizes::ORIG_DST, 0);

/// The services whose sockets one run of the reset iterator (`reset.rs`) may destroy, and
/// which. Written and cleared by the daemon around each run, so not pinned.
#[map(name = "RDR_RESETS_v2")]
pub(crate) static RESETS: HashMap<ServiceKey, ResetRequest> =
    HashMap::with_max_entries(map_sizes::RESETS, 0);

/// Per-CPU event counters, one slot per `redirector_common::stats` constant.
#[map(name = "RDR_STATS_v2")]
pub(crate) static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

/// Per-CPU counters of the LRU tables' writes, one slot per `redirector_common::table_stats`
/// constant.
#[map(name = "RDR_TBLSTAT_v2")]
pub(crate) static TABLE_STATS: PerCpuArray<u64> = PerCpuArray::pinned(table_stats::COUNT, 0);

/// Connections steered per route, per CPU (metrics). Only the steering path touches it.
/// Allocated on use (`BPF_F_NO_PREALLOC`): a preallocated per-CPU map of the route capacity
/// would take about 1 MiB per CPU whether routes exist or not. The daemon removes the counters
/// of routes that are gone, so it never fills while the routes map does not.
#[map(name = "RDR_RTSTAT_v2")]
pub(crate) static ROUTE_STATS: PerCpuHashMap<RouteKey, u64> =
    PerCpuHashMap::pinned(map_sizes::ROUTE_STATS, BPF_F_NO_PREALLOC);

/// BPF_NOEXIST: create only.
pub(crate) const BPF_NOEXIST: u64 = 1;

#[inline(always)]
pub(crate) fn count_route(route: &RouteKey) {
    match ROUTE_STATS.get_ptr_mut(route) {
        // SAFETY: this CPU's slot, touched by one program at a time.
        Some(counter) => unsafe { *counter += 1 },
        // Another CPU may have created the slot meanwhile, which is fine.
        None => {
            let _ = ROUTE_STATS.insert(route, &1, BPF_NOEXIST);
        }
    }
}

#[inline(always)]
pub(crate) fn count(slot: u32) {
    bump(&STATS, slot);
}

#[inline(always)]
pub(crate) fn count_table(slot: u32) {
    bump(&TABLE_STATS, slot);
}

#[inline(always)]
fn bump(counters: &PerCpuArray<u64>, slot: u32) {
    if let Some(counter) = counters.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot is only touched by programs running on this CPU, one at a time.
        unsafe { *counter += 1 };
    }
}
