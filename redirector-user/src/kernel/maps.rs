//! The kernel maps: encoding the desired state into map entries and applying it without gaps.
//!
//! Applying is make-before-break: new and changed entries are written first (fork endpoints,
//! then routes, then services, then members), stale ones removed last (members, services,
//! routes, then endpoints), so at no instant does a route that exists in both the old and the
//! new state go missing. For a route's endpoint set that means: the endpoints a route value
//! counts are written before the value that makes the set grow, and removed only after the
//! value that makes it shrink; an endpoint replaced at the same index is one atomic update.
//! [`plan`] puts the writes in that order; [`Maps::apply`] carries them out.
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap},
};
use redirector_common::{
    EndpointKey, FAMILY_V4, FAMILY_V6, MemberValue, RouteKey, RouteValue, SERVICE_HTTP_HANDOFF,
    ServiceKey, ServiceValue, SockAddr, map_sizes, stats,
};

use crate::state::{DesiredState, Protocol};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("map {map} is full: the state needs {needed} entries, the capacity is {capacity}")]
    MapFull {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error("{op} on map {map} failed")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
}

/// A socket address in the maps' encoding (network byte order, v4-mapped IPv6 folded to IPv4).
pub fn sock_addr(addr: SocketAddr) -> SockAddr {
    let port = addr.port().to_be();
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => SockAddr {
            addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
            port,
            family: FAMILY_V4,
            _pad: 0,
        },
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            SockAddr {
                addr: [word(0), word(4), word(8), word(12)],
                port,
                family: FAMILY_V6,
                _pad: 0,
            }
        }
    }
}

/// The inverse of [`sock_addr`]; None for an unset (zero-family) address.
pub fn socket_addr(addr: &SockAddr) -> Option<SocketAddr> {
    let port = u16::from_be(addr.port);
    match addr.family {
        FAMILY_V4 => Some(SocketAddr::from((addr.addr[0].to_ne_bytes(), port))),
        FAMILY_V6 => {
            let mut octets = [0u8; 16];
            for (i, word) in addr.addr.iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            Some(SocketAddr::from((octets, port)))
        }
        _ => None,
    }
}

pub fn service_key(addr: SocketAddr, protocol: u8) -> ServiceKey {
    let a = sock_addr(addr);
    ServiceKey {
        addr: a.addr,
        port: a.port,
        family: a.family,
        protocol,
    }
}

/// The content of the four state maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    pub services: HashMap<ServiceKey, ServiceValue>,
    pub members: HashMap<u64, MemberValue>,
    pub routes: HashMap<RouteKey, RouteValue>,
    /// Each route's endpoints after the first, at indices `1..count`.
    pub endpoints: HashMap<EndpointKey, SockAddr>,
}

/// Integer ids for services and sandboxes, stable for as long as the thing exists.
///
/// Ids are never reused within one daemon run: a sandbox deleted and another created in the
/// same apply must not inherit the old one's routes for the instant both exist.
#[derive(Debug, Clone, Default)]
pub struct Ids {
    services: HashMap<ServiceKey, u32>,
    sandboxes: HashMap<String, u32>,
    next: u32,
}

impl Ids {
    /// Takes over the ids already in the kernel, so that a restarted daemon rewrites nothing
    /// that did not change: services by their key, sandboxes by their members' cookies.
    pub fn adopt(current: &KernelState, desired: &DesiredState, cookies: &MemberCookies) -> Ids {
        let mut ids = Ids::default();
        for (key, value) in &current.services {
            ids.services.insert(*key, value.service_id);
        }
        let mut taken = HashSet::new();
        for sandbox in desired.routing_keys() {
            let adopted = sandbox
                .members
                .iter()
                .filter_map(|path| cookies.get(path))
                .filter_map(|cookie| current.members.get(cookie))
                .map(|m| m.sandbox_id)
                .find(|id| !taken.contains(id));
            if let Some(id) = adopted {
                taken.insert(id);
                ids.sandboxes.insert(sandbox.key.clone(), id);
            }
        }
        let highest = current
            .services
            .values()
            .map(|v| v.service_id)
            .chain(current.members.values().map(|m| m.sandbox_id))
            .chain(
                current
                    .routes
                    .keys()
                    .flat_map(|k| [k.service_id, k.sandbox_id]),
            )
            .max()
            .unwrap_or(0);
        ids.next = highest + 1;
        ids
    }

    fn allocate(next: &mut u32) -> u32 {
        let id = (*next).max(1);
        *next = id.wrapping_add(1).max(1);
        id
    }

    pub fn service_id(&self, key: &ServiceKey) -> Option<u32> {
        self.services.get(key).copied()
    }

    pub fn sandbox_id(&self, key: &str) -> Option<u32> {
        self.sandboxes.get(key).copied()
    }

    fn service(&mut self, key: ServiceKey) -> u32 {
        let next = &mut self.next;
        *self
            .services
            .entry(key)
            .or_insert_with(|| Self::allocate(next))
    }

    fn sandbox(&mut self, key: &str) -> u32 {
        if let Some(id) = self.sandboxes.get(key) {
            return *id;
        }
        let id = Self::allocate(&mut self.next);
        self.sandboxes.insert(key.to_owned(), id);
        id
    }

    /// Forgets ids of things no longer desired.
    fn retain(&mut self, state: &KernelState, desired: &DesiredState) {
        self.services
            .retain(|key, _| state.services.contains_key(key));
        self.sandboxes.retain(|key, _| {
            desired.sandboxes.contains_key(key) || desired.groups.contains_key(key)
        });
    }
}

/// Network-namespace cookies of member paths, resolved before encoding (resolution touches the
/// kernel; encoding stays pure).
pub type MemberCookies = HashMap<PathBuf, u64>;

/// IP families on which the node router listens: HTTP services of those families are handed to
/// it, the others get L4 steering only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handoff {
    pub v4: bool,
    pub v6: bool,
}

/// Encodes `desired` as map entries. Members whose cookie is unknown (their namespace is gone)
/// are left out; the caller has already warned about them.
pub fn encode(
    desired: &DesiredState,
    ids: &mut Ids,
    cookies: &MemberCookies,
    handoff: Handoff,
) -> KernelState {
    let mut state = KernelState::default();
    let keys = desired.routing_keys();
    // Only services that have a fork need an entry: everything else stays on the fast path.
    for service in desired.services.values() {
        let forked = keys.iter().any(|s| s.routes.contains_key(&service.name));
        if !forked {
            continue;
        }
        let key = service_key(service.address, service.protocol.ip_protocol());
        let service_id = ids.service(key);
        let routed = match key.family {
            FAMILY_V4 => handoff.v4,
            _ => handoff.v6,
        };
        let flags = if service.protocol == Protocol::Http && routed {
            SERVICE_HTTP_HANDOFF
        } else {
            0
        };
        state
            .services
            .insert(key, ServiceValue { service_id, flags });
    }
    for sandbox in &keys {
        let sandbox_id = ids.sandbox(&sandbox.key);
        for path in &sandbox.members {
            if let Some(cookie) = cookies.get(path) {
                state.members.insert(
                    *cookie,
                    MemberValue {
                        sandbox_id,
                        _pad: 0,
                    },
                );
            }
        }
        for (service_name, route) in &sandbox.routes {
            let Some(service) = desired.services.get(service_name) else {
                continue;
            };
            let key = service_key(service.address, service.protocol.ip_protocol());
            let route_key = RouteKey {
                service_id: ids.service(key),
                sandbox_id,
            };
            // A validated route has at least one endpoint; an empty one stays out of the kernel
            // (no route: the member reaches the baseline) rather than steer nowhere.
            let Some((first, others)) = route.forks.split_first() else {
                continue;
            };
            let count = u32::try_from(route.forks.len()).unwrap_or(u32::MAX);
            state.routes.insert(
                route_key,
                RouteValue {
                    first: sock_addr(*first),
                    count,
                },
            );
            for (index, fork) in (1..count).zip(others) {
                state.endpoints.insert(
                    EndpointKey {
                        route: route_key,
                        index,
                    },
                    sock_addr(*fork),
                );
            }
        }
    }
    ids.retain(&state, desired);
    state
}

/// Handles on the pinned maps.
pub struct Maps {
    pub services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    pub members: BpfHashMap<MapData, u64, MemberValue>,
    pub routes: BpfHashMap<MapData, RouteKey, RouteValue>,
    pub endpoints: BpfHashMap<MapData, EndpointKey, SockAddr>,
    pub stats: PerCpuArray<MapData, u64>,
    pub route_stats: PerCpuHashMap<MapData, RouteKey, u64>,
}

/// Per-event counters summed over CPUs, in `redirector_common::stats` order.
pub type Counters = [(&'static str, u64); stats::COUNT as usize];

/// One write of an apply: an entry set (`Some`) or removed (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Service(ServiceKey, Option<ServiceValue>),
    Member(u64, Option<MemberValue>),
    Route(RouteKey, Option<RouteValue>),
    Endpoint(EndpointKey, Option<SockAddr>),
}

/// The writes that take the kernel from `current` to `desired`, in the order the module docs
/// give. Fails before anything is written when `desired` does not fit. A map too full to hold
/// old and new entries at once has its stale entries removed first instead: a brief gap is
/// better than refusing a state that fits (a route whose endpoints went early falls back to its
/// first endpoint in the kernel).
pub fn plan(current: &KernelState, desired: &KernelState) -> Result<Vec<Write>, SyncError> {
    let routes_fit = check_capacity(
        "routes",
        &current.routes,
        &desired.routes,
        map_sizes::ROUTES,
    )?;
    let endpoints_fit = check_capacity(
        "endpoints",
        &current.endpoints,
        &desired.endpoints,
        map_sizes::ENDPOINTS,
    )?;
    let services_fit = check_capacity(
        "services",
        &current.services,
        &desired.services,
        map_sizes::SERVICES,
    )?;
    let members_fit = check_capacity(
        "members",
        &current.members,
        &desired.members,
        map_sizes::MEMBERS,
    )?;

    let mut writes = Vec::new();
    let w = &mut writes;
    if !routes_fit {
        stale(w, &current.routes, &desired.routes, Write::Route);
    }
    if !endpoints_fit {
        stale(w, &current.endpoints, &desired.endpoints, Write::Endpoint);
    }
    if !services_fit {
        stale(w, &current.services, &desired.services, Write::Service);
    }
    if !members_fit {
        stale(w, &current.members, &desired.members, Write::Member);
    }
    changed(w, &current.endpoints, &desired.endpoints, Write::Endpoint);
    changed(w, &current.routes, &desired.routes, Write::Route);
    changed(w, &current.services, &desired.services, Write::Service);
    changed(w, &current.members, &desired.members, Write::Member);
    if members_fit {
        stale(w, &current.members, &desired.members, Write::Member);
    }
    if services_fit {
        stale(w, &current.services, &desired.services, Write::Service);
    }
    if routes_fit {
        stale(w, &current.routes, &desired.routes, Write::Route);
    }
    if endpoints_fit {
        stale(w, &current.endpoints, &desired.endpoints, Write::Endpoint);
    }
    Ok(writes)
}

/// Sets the entries of `desired` that `current` lacks or holds with another value.
fn changed<K: Copy + Eq + Hash, V: Copy + PartialEq>(
    writes: &mut Vec<Write>,
    current: &HashMap<K, V>,
    desired: &HashMap<K, V>,
    write: fn(K, Option<V>) -> Write,
) {
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            writes.push(write(*key, Some(*value)));
        }
    }
}

/// Removes the entries of `current` that `desired` lacks.
fn stale<K: Copy + Eq + Hash, V>(
    writes: &mut Vec<Write>,
    current: &HashMap<K, V>,
    desired: &HashMap<K, V>,
    write: fn(K, Option<V>) -> Write,
) {
    for key in current.keys().filter(|k| !desired.contains_key(k)) {
        writes.push(write(*key, None));
    }
}

impl Maps {
    /// What the kernel holds now.
    pub fn read(&self) -> Result<KernelState, SyncError> {
        Ok(KernelState {
            services: read_map(&self.services, "services")?,
            members: read_map(&self.members, "members")?,
            routes: read_map(&self.routes, "routes")?,
            endpoints: read_map(&self.endpoints, "endpoints")?,
        })
    }

    /// The members map as the kernel holds it now: cookie -> sandbox id.
    pub fn read_members(&self) -> Result<HashMap<u64, u32>, SyncError> {
        Ok(read_map(&self.members, "members")?
            .into_iter()
            .map(|(cookie, member)| (cookie, member.sandbox_id))
            .collect())
    }

    /// Makes the kernel hold `desired`, given that it holds `current`: the writes of [`plan`],
    /// in its order.
    pub fn apply(&mut self, current: &KernelState, desired: &KernelState) -> Result<(), SyncError> {
        for write in plan(current, desired)? {
            match write {
                Write::Service(key, value) => put(&mut self.services, "services", &key, value)?,
                Write::Member(key, value) => put(&mut self.members, "members", &key, value)?,
                Write::Route(key, value) => put(&mut self.routes, "routes", &key, value)?,
                Write::Endpoint(key, value) => {
                    put(&mut self.endpoints, "endpoints", &key, value)?;
                }
            }
        }
        Ok(())
    }

    /// Connections steered per route since load, summed over CPUs.
    pub fn route_counters(&self) -> Result<Vec<(RouteKey, u64)>, SyncError> {
        self.route_stats
            .iter()
            .map(|entry| entry.map(|(key, values)| (key, values.iter().sum())))
            .collect::<Result<_, MapError>>()
            .map_err(|source| SyncError::Map {
                map: "route_stats",
                op: "read",
                source,
            })
    }

    pub fn counters(&self) -> Result<Counters, SyncError> {
        let mut out = stats::NAMES.map(|name| (name, 0));
        for (slot, entry) in out.iter_mut().enumerate() {
            let values = self
                .stats
                .get(&(slot as u32), 0)
                .map_err(|source| SyncError::Map {
                    map: "stats",
                    op: "read",
                    source,
                })?;
            entry.1 = values.iter().sum();
        }
        Ok(out)
    }
}

fn read_map<K: Pod + Eq + Hash, V: Pod>(
    map: &BpfHashMap<MapData, K, V>,
    name: &'static str,
) -> Result<HashMap<K, V>, SyncError> {
    map.iter()
        .collect::<Result<HashMap<K, V>, MapError>>()
        .map_err(|source| SyncError::Map {
            map: name,
            op: "read",
            source,
        })
}

/// Fails before writing anything if `desired` cannot fit. Returns whether the union of old and
/// new entries fits too, i.e. whether make-before-break is possible for this map.
fn check_capacity<K: Eq + Hash, V>(
    map: &'static str,
    current: &HashMap<K, V>,
    desired: &HashMap<K, V>,
    capacity: u32,
) -> Result<bool, SyncError> {
    if desired.len() > capacity as usize {
        return Err(SyncError::MapFull {
            map,
            needed: desired.len(),
            capacity,
        });
    }
    let added = desired.keys().filter(|k| !current.contains_key(k)).count();
    Ok(current.len() + added <= capacity as usize)
}

/// Sets (`Some`) or removes (`None`) one entry; removing an absent entry is no error.
fn put<K: Pod, V: Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    name: &'static str,
    key: &K,
    value: Option<V>,
) -> Result<(), SyncError> {
    let (op, result) = match value {
        Some(value) => ("insert", map.insert(key, value, 0)),
        None => ("remove", map.remove(key)),
    };
    match result {
        Ok(()) => Ok(()),
        Err(MapError::KeyNotFound) if value.is_none() => Ok(()),
        Err(source) => Err(SyncError::Map {
            map: name,
            op,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{Route, Sandbox, Service};

    fn desired(routes: &[(&str, &str, &str)]) -> DesiredState {
        let mut state = DesiredState::default();
        for (name, addr) in [("a", "10.96.0.10:8080"), ("b", "[fd00::10]:53")] {
            state.services.insert(
                name.to_owned(),
                Service {
                    name: name.to_owned(),
                    address: addr.parse().unwrap(),
                    protocol: if name == "b" {
                        Protocol::Udp
                    } else {
                        Protocol::Http
                    },
                },
            );
        }
        for (key, service, fork) in routes {
            let sandbox = state
                .sandboxes
                .entry(key.to_string())
                .or_insert_with(|| Sandbox {
                    key: key.to_string(),
                    members: vec![PathBuf::from(format!("/run/netns/{key}"))],
                    routes: BTreeMap::new(),
                });
            // "a,b,c": a fork with several endpoints.
            let forks = fork.split(',').map(|f| f.parse().unwrap());
            sandbox.routes.insert(
                service.to_string(),
                Route::new(forks, Default::default()).unwrap(),
            );
        }
        state
    }

    fn cookies() -> MemberCookies {
        [("k1", 100), ("k2", 200)]
            .into_iter()
            .map(|(k, c)| (PathBuf::from(format!("/run/netns/{k}")), c))
            .collect()
    }

    #[test]
    fn addresses_are_network_order_and_v4_mapped_folds_to_v4() {
        let a = sock_addr("10.1.2.3:8080".parse().unwrap());
        assert_eq!(a.family, FAMILY_V4);
        assert_eq!(a.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(a.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(sock_addr("[::ffff:10.1.2.3]:8080".parse().unwrap()), a);
        let b = sock_addr("[fd00::1]:53".parse().unwrap());
        assert_eq!(b.family, FAMILY_V6);
        assert_eq!(b.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(b.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn socket_addr_inverts_sock_addr() {
        for text in ["10.1.2.3:8080", "[fd00::1]:53"] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(socket_addr(&sock_addr(addr)), Some(addr));
        }
        assert_eq!(socket_addr(&SockAddr::default()), None);
    }

    #[test]
    fn http_services_are_handed_off_only_where_the_router_listens() {
        let want = desired(&[("k1", "a", "10.0.1.7:8080"), ("k1", "b", "[fd00::7]:53")]);
        let flags = |handoff| {
            let state = encode(&want, &mut Ids::default(), &cookies(), handoff);
            let mut flags: Vec<(u8, u32)> = state
                .services
                .iter()
                .map(|(k, v)| (k.family, v.flags))
                .collect();
            flags.sort();
            flags
        };
        // "a" is HTTP over IPv4, "b" is UDP over IPv6: only "a" can be handed off.
        assert_eq!(flags(Handoff::default()), [(FAMILY_V4, 0), (FAMILY_V6, 0)]);
        assert_eq!(
            flags(Handoff { v4: true, v6: true }),
            [(FAMILY_V4, SERVICE_HTTP_HANDOFF), (FAMILY_V6, 0)]
        );
        assert_eq!(
            flags(Handoff {
                v4: false,
                v6: true
            }),
            [(FAMILY_V4, 0), (FAMILY_V6, 0)]
        );
    }

    #[test]
    fn only_forked_services_get_entries() {
        let mut ids = Ids::default();
        let state = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080")]),
            &mut ids,
            &cookies(),
            Handoff::default(),
        );
        assert_eq!(state.services.len(), 1);
        let key = service_key(
            "10.96.0.10:8080".parse().unwrap(),
            redirector_common::IPPROTO_TCP,
        );
        let svc = state.services[&key];
        assert_eq!(
            state.members[&100].sandbox_id,
            state.routes.keys().next().unwrap().sandbox_id
        );
        assert_eq!(
            state.routes.keys().next().unwrap().service_id,
            svc.service_id
        );
    }

    #[test]
    fn ids_are_stable_across_reencoding_and_never_reused() {
        let mut ids = Ids::default();
        let c = cookies();
        let first = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080")]),
            &mut ids,
            &c,
            Handoff::default(),
        );
        let again = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080")]),
            &mut ids,
            &c,
            Handoff::default(),
        );
        assert_eq!(first, again);
        // k1 goes, k2 comes in the same apply: k2 must not get k1's id.
        let swapped = encode(
            &desired(&[("k2", "a", "10.0.1.8:8080")]),
            &mut ids,
            &c,
            Handoff::default(),
        );
        assert_ne!(
            swapped.members[&200].sandbox_id,
            first.members[&100].sandbox_id
        );
    }

    #[test]
    fn adopted_ids_reproduce_the_kernel_state() {
        let c = cookies();
        let want = desired(&[("k1", "a", "10.0.1.7:8080"), ("k2", "b", "[fd00::7]:53")]);
        let current = encode(&want, &mut Ids::default(), &c, Handoff::default());
        // A restarted daemon adopts the ids: re-encoding changes nothing.
        let mut ids = Ids::adopt(&current, &want, &c);
        assert_eq!(encode(&want, &mut ids, &c, Handoff::default()), current);
    }

    #[test]
    fn members_with_unknown_cookies_are_skipped() {
        let mut ids = Ids::default();
        let state = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080")]),
            &mut ids,
            &MemberCookies::new(),
            Handoff::default(),
        );
        assert!(state.members.is_empty());
        assert_eq!(state.routes.len(), 1);
    }

    fn route_key(state: &KernelState) -> RouteKey {
        *state.routes.keys().next().expect("one route")
    }

    #[test]
    fn a_route_holds_its_first_endpoint_and_counts_the_others() {
        let one = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080")]),
            &mut Ids::default(),
            &cookies(),
            Handoff::default(),
        );
        let value = one.routes[&route_key(&one)];
        assert_eq!(value.count, 1);
        assert_eq!(value.first, sock_addr("10.0.1.7:8080".parse().unwrap()));
        assert!(one.endpoints.is_empty());

        // Listed in any order: endpoints are numbered in sorted order.
        let three = encode(
            &desired(&[("k1", "a", "10.0.1.9:8080,10.0.1.7:8080,10.0.1.8:8080")]),
            &mut Ids::default(),
            &cookies(),
            Handoff::default(),
        );
        let route = route_key(&three);
        assert_eq!(three.routes[&route].count, 3);
        assert_eq!(
            three.routes[&route].first,
            sock_addr("10.0.1.7:8080".parse().unwrap())
        );
        let endpoint = |index| three.endpoints[&EndpointKey { route, index }];
        assert_eq!(endpoint(1), sock_addr("10.0.1.8:8080".parse().unwrap()));
        assert_eq!(endpoint(2), sock_addr("10.0.1.9:8080".parse().unwrap()));
        assert_eq!(three.endpoints.len(), 2);
    }

    /// A plan's route writes and its endpoint writes, each in plan order.
    fn route_writes(writes: &[Write]) -> (Vec<Write>, Vec<Write>) {
        let route = writes
            .iter()
            .filter(|w| matches!(w, Write::Route(..)))
            .copied()
            .collect();
        let endpoints = writes
            .iter()
            .filter(|w| matches!(w, Write::Endpoint(..)))
            .copied()
            .collect();
        (route, endpoints)
    }

    fn position(writes: &[Write], pred: impl Fn(&Write) -> bool) -> Vec<usize> {
        writes
            .iter()
            .enumerate()
            .filter(|(_, w)| pred(w))
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn a_growing_set_writes_its_endpoints_before_the_count() {
        let mut ids = Ids::default();
        let c = cookies();
        let one = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080")]),
            &mut ids,
            &c,
            Handoff::default(),
        );
        let three = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080,10.0.1.8:8080,10.0.1.9:8080")]),
            &mut ids,
            &c,
            Handoff::default(),
        );
        let route = route_key(&one);
        assert_eq!(route_key(&three), route, "the route keeps its ids");

        let writes = plan(&one, &three).expect("fits");
        let (routes, endpoints) = route_writes(&writes);
        assert_eq!(
            routes,
            [Write::Route(route, Some(three.routes[&route]))],
            "one update of the route value"
        );
        assert_eq!(endpoints.len(), 2, "{writes:?}");
        let endpoint_at = position(&writes, |w| matches!(w, Write::Endpoint(_, Some(_))));
        let route_at = position(&writes, |w| matches!(w, Write::Route(..)));
        assert!(
            endpoint_at.iter().all(|e| *e < route_at[0]),
            "endpoints 1 and 2 exist before the count says 3: {writes:?}"
        );
    }

    #[test]
    fn a_shrinking_set_lowers_the_count_before_removing_endpoints() {
        let mut ids = Ids::default();
        let c = cookies();
        let three = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080,10.0.1.8:8080,10.0.1.9:8080")]),
            &mut ids,
            &c,
            Handoff::default(),
        );
        // The first endpoint goes too: endpoint 0 changes with the count, in one update.
        let one = encode(
            &desired(&[("k1", "a", "10.0.1.9:8080")]),
            &mut ids,
            &c,
            Handoff::default(),
        );
        let route = route_key(&three);
        let writes = plan(&three, &one).expect("fits");
        let (routes, endpoints) = route_writes(&writes);
        assert_eq!(
            routes,
            [Write::Route(
                route,
                Some(RouteValue {
                    first: sock_addr("10.0.1.9:8080".parse().unwrap()),
                    count: 1
                })
            )]
        );
        let mut removed: Vec<u32> = endpoints
            .iter()
            .map(|w| match w {
                Write::Endpoint(key, None) => key.index,
                other => panic!("only removals expected: {other:?}"),
            })
            .collect();
        removed.sort();
        assert_eq!(removed, [1, 2]);
        let route_at = position(&writes, |w| matches!(w, Write::Route(..)));
        let removed_at = position(&writes, |w| matches!(w, Write::Endpoint(_, None)));
        assert!(
            removed_at.iter().all(|r| *r > route_at[0]),
            "endpoints go only once the count no longer reaches them: {writes:?}"
        );
        // And back: nothing to do when nothing changed.
        assert!(plan(&one, &one).expect("fits").is_empty());
    }

    #[test]
    fn a_replaced_endpoint_is_one_update_in_place() {
        let mut ids = Ids::default();
        let c = cookies();
        let before = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080,10.0.1.8:8080")]),
            &mut ids,
            &c,
            Handoff::default(),
        );
        let after = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080,10.0.1.9:8080")]),
            &mut ids,
            &c,
            Handoff::default(),
        );
        let route = route_key(&before);
        assert_eq!(
            plan(&before, &after).expect("fits"),
            [Write::Endpoint(
                EndpointKey { route, index: 1 },
                Some(sock_addr("10.0.1.9:8080".parse().unwrap()))
            )]
        );
    }

    #[test]
    fn too_many_endpoints_is_map_full_before_any_write() {
        let route = RouteKey {
            service_id: 1,
            sandbox_id: 2,
        };
        let mut desired = KernelState::default();
        desired.routes.insert(
            route,
            RouteValue {
                first: sock_addr("10.0.1.7:8080".parse().unwrap()),
                count: map_sizes::ENDPOINTS + 2,
            },
        );
        for index in 1..=map_sizes::ENDPOINTS + 1 {
            desired
                .endpoints
                .insert(EndpointKey { route, index }, SockAddr::default());
        }
        let err = plan(&KernelState::default(), &desired).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "map endpoints is full: the state needs {} entries, the capacity is {}",
                map_sizes::ENDPOINTS + 1,
                map_sizes::ENDPOINTS
            )
        );
    }

    #[test]
    fn endpoints_that_only_fit_without_the_old_ones_go_first() {
        let route = |sandbox_id| RouteKey {
            service_id: 1,
            sandbox_id,
        };
        let fill = |sandbox_id, n: u32| {
            let mut state = KernelState::default();
            state.routes.insert(
                route(sandbox_id),
                RouteValue {
                    first: SockAddr::default(),
                    count: n + 1,
                },
            );
            for index in 1..=n {
                state.endpoints.insert(
                    EndpointKey {
                        route: route(sandbox_id),
                        index,
                    },
                    SockAddr::default(),
                );
            }
            state
        };
        // Each state alone fits; both at once do not.
        let half = map_sizes::ENDPOINTS / 2 + 1;
        let (old, new) = (fill(1, half), fill(2, half));
        let writes = plan(&old, &new).expect("the new state fits");
        let first_insert = writes
            .iter()
            .position(|w| matches!(w, Write::Endpoint(_, Some(_))))
            .expect("inserts");
        let last_removal = writes
            .iter()
            .rposition(|w| matches!(w, Write::Endpoint(_, None)))
            .expect("removals");
        assert!(last_removal < first_insert, "stale endpoints go first");
        assert_eq!(
            writes
                .iter()
                .filter(|w| matches!(w, Write::Endpoint(_, None)))
                .count(),
            half as usize,
            "each stale endpoint is removed once"
        );
    }

    #[test]
    fn capacity_checks_desired_and_reports_whether_the_union_fits() {
        let current: HashMap<u32, u32> = (0..8).map(|i| (i, i)).collect();
        let desired: HashMap<u32, u32> = (4..12).map(|i| (i, i)).collect();
        assert!(check_capacity("t", &current, &desired, 12).unwrap());
        assert!(!check_capacity("t", &current, &desired, 11).unwrap());
        let too_big: HashMap<u32, u32> = (0..20).map(|i| (i, i)).collect();
        let err = check_capacity("t", &HashMap::new(), &too_big, 11).unwrap_err();
        assert_eq!(
            err.to_string(),
            "map t is full: the state needs 20 entries, the capacity is 11"
        );
    }
}
