//! Ordering an apply's writes: make-before-break, as the parent module's docs describe, and
//! the capacity checks that come before any write.
use std::{collections::HashMap, hash::Hash};

use redirector_common::{
    EndpointKey, MemberValue, RouteKey, RouteValue, ServiceKey, ServiceValue, SockAddr, map_sizes,
};

use super::{KernelState, SyncError};

/// One write of an apply: an entry set (`Some`) or removed (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Service(ServiceKey, Option<ServiceValue>),
    Member(u64, Option<MemberValue>),
    Route(RouteKey, Option<RouteValue>),
    Endpoint(EndpointKey, Option<SockAddr>),
    /// A word of the destination filter, by index.
    FilterWord(u32, u64),
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
    // A service's filter bit is set before the service is written and cleared only after it
    // is removed: first every bit either state needs, at the end only the desired ones.
    filter_words(w, &current.filter, &desired.filter, |current, desired| {
        (current | desired != current).then_some(current | desired)
    });
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
    filter_words(w, &current.filter, &desired.filter, |current, desired| {
        // The first pass left `current | desired`.
        (desired != current | desired).then_some(desired)
    });
    Ok(writes)
}

/// Writes, for every filter word either state has, the value `write(current, desired)` asks
/// for, if any.
fn filter_words(
    writes: &mut Vec<Write>,
    current: &HashMap<u32, u64>,
    desired: &HashMap<u32, u64>,
    write: fn(u64, u64) -> Option<u64>,
) {
    let indices = current
        .keys()
        .chain(desired.keys().filter(|i| !current.contains_key(i)));
    for &index in indices {
        let now = current.get(&index).copied().unwrap_or(0);
        let want = desired.get(&index).copied().unwrap_or(0);
        if let Some(value) = write(now, want) {
            writes.push(Write::FilterWord(index, value));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::maps::{
        Handoff, Ids, encode, sock_addr,
        tests::{cookies, desired, route_key},
    };

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

    /// The filter bits of `state`'s services, as the kernel would hold them after `writes`
    /// applied to `start` up to (not including) position `upto`.
    fn filter_after(start: &KernelState, writes: &[Write], upto: usize) -> HashMap<u32, u64> {
        let mut words = start.filter.clone();
        for write in &writes[..upto] {
            if let Write::FilterWord(index, value) = write {
                words.insert(*index, *value);
            }
        }
        words
    }

    fn covers(words: &HashMap<u32, u64>, key: &ServiceKey) -> bool {
        let (word, mask) = redirector_common::dst_filter::word_and_mask(key);
        words.get(&word).is_some_and(|bits| bits & mask != 0)
    }

    /// The filter never hides a service the kernel holds: at every write, each service in
    /// the services map (as it is at that point) has its bit set; at the end, only the desired
    /// services' bits are.
    #[test]
    fn the_filter_covers_every_service_at_every_step() {
        let mut ids = Ids::default();
        let c = cookies();
        let before = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080")]),
            &mut ids,
            &c,
            Handoff::default(),
        );
        let mut after_state = desired(&[("k1", "b", "[fd00::7]:53")]);
        after_state.services.remove("a");
        let after = encode(&after_state, &mut ids, &c, Handoff::default());
        assert!(!before.filter.is_empty() && !after.filter.is_empty());

        let writes = plan(&before, &after).expect("fits");
        let mut services = before.services.clone();
        for (at, write) in writes.iter().enumerate() {
            if let Write::Service(key, value) = write {
                // The filter must cover the service from before its insert until after its
                // removal.
                let filter = filter_after(&before, &writes, at);
                match value {
                    Some(value) => {
                        assert!(covers(&filter, key), "inserted uncovered: {writes:?}");
                        services.insert(*key, *value);
                    }
                    None => {
                        services.remove(key);
                    }
                }
            }
            let filter = filter_after(&before, &writes, at + 1);
            for key in services.keys() {
                assert!(covers(&filter, key), "step {at} hides {key:?}: {writes:?}");
            }
        }
        assert_eq!(
            filter_after(&before, &writes, writes.len())
                .into_iter()
                .filter(|(_, bits)| *bits != 0)
                .collect::<HashMap<_, _>>(),
            after.filter,
            "only the desired bits are left"
        );
    }

    #[test]
    fn an_unchanged_filter_is_not_written() {
        let mut ids = Ids::default();
        let c = cookies();
        let state = encode(
            &desired(&[("k1", "a", "10.0.1.7:8080")]),
            &mut ids,
            &c,
            Handoff::default(),
        );
        let writes = plan(&state, &state).expect("fits");
        assert!(writes.is_empty(), "{writes:?}");
    }
}
