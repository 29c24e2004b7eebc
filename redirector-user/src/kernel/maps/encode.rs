//! Encoding the desired state into map entries: the maps' address encoding, and the [`Ids`]
//! that stand for services and sandboxes in the keys.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use redirector_common::{
    EndpointKey, FAMILY_V4, FAMILY_V6, MEMBER_INJECT_KEY, MemberValue, RouteKey, RouteValue,
    SERVICE_HTTP_HANDOFF, ServiceKey, ServiceValue, SockAddr, dst_filter,
};

use super::KernelState;
use crate::state::{DesiredState, Protocol};

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
        let (word, mask) = dst_filter::word_and_mask(&key);
        *state.filter.entry(word).or_default() |= mask;
    }
    for sandbox in &keys {
        let sandbox_id = ids.sandbox(&sandbox.key);
        for path in &sandbox.members {
            if let Some(cookie) = cookies.get(path) {
                state.members.insert(
                    *cookie,
                    MemberValue {
                        sandbox_id,
                        flags: if sandbox.inject_key {
                            MEMBER_INJECT_KEY
                        } else {
                            0
                        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::maps::tests::{cookies, desired, route_key};

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
}
