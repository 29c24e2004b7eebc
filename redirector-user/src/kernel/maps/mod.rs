//! The kernel maps: encoding the desired state into map entries and applying it without gaps.
//!
//! Applying is make-before-break: new and changed entries are written first (fork endpoints,
//! then routes, then services, then members), stale ones removed last (members, services,
//! routes, then endpoints), so at no instant does a route that exists in both the old and the
//! new state go missing. For a route's endpoint set that means: the endpoints a route value
//! counts are written before the value that makes the set grow, and removed only after the
//! value that makes it shrink; an endpoint replaced at the same index is one atomic update.
//! The destination filter brackets it all: every bit the old or the new services need is set
//! before the first write, and bits only the old ones needed are cleared after the last, so
//! the filter never hides a service the services map holds. [`plan()`] puts the writes in that
//! order; [`Maps::apply`] carries them out.
//!
//! This module holds the handles on the pinned maps and carries out an apply; the `encode`
//! submodule turns the desired state into entries and ids ([`encode()`]), and the `plan`
//! submodule orders the writes ([`plan()`]).
mod counters;
mod encode;
mod plan;

use std::{collections::HashMap, hash::Hash, io, os::fd::AsFd as _};

use aya::{
    Pod,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap},
};
use redirector_common::{
    EndpointKey, MemberValue, RouteKey, RouteValue, ServiceKey, ServiceValue, SockAddr, dst_filter,
};

pub use self::{
    counters::{CounterReader, Counters},
    encode::{Handoff, Ids, MemberCookies, encode, service_key, sock_addr, socket_addr},
    plan::{Write, plan},
};

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

/// The content of the four state maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    pub services: HashMap<ServiceKey, ServiceValue>,
    pub members: HashMap<u64, MemberValue>,
    pub routes: HashMap<RouteKey, RouteValue>,
    /// Each route's endpoints after the first, at indices `1..count`.
    pub endpoints: HashMap<EndpointKey, SockAddr>,
    /// The destination filter's words that have a bit set, by index (see
    /// `redirector_common::dst_filter`).
    pub filter: HashMap<u32, u64>,
}

/// Handles on the pinned maps.
pub struct Maps {
    pub services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    pub members: BpfHashMap<MapData, u64, MemberValue>,
    pub routes: BpfHashMap<MapData, RouteKey, RouteValue>,
    pub endpoints: BpfHashMap<MapData, EndpointKey, SockAddr>,
    pub dst_filter: Array<MapData, u64>,
    pub route_stats: PerCpuHashMap<MapData, RouteKey, u64>,
}

impl Maps {
    /// What the kernel holds now.
    pub fn read(&self) -> Result<KernelState, SyncError> {
        Ok(KernelState {
            services: read_map(&self.services, "services")?,
            members: read_map(&self.members, "members")?,
            routes: read_map(&self.routes, "routes")?,
            endpoints: read_map(&self.endpoints, "endpoints")?,
            filter: self.read_filter()?,
        })
    }

    /// The filter's words that have a bit set (the map is an array: every index exists).
    fn read_filter(&self) -> Result<HashMap<u32, u64>, SyncError> {
        let mut words = HashMap::new();
        for index in 0..dst_filter::WORDS {
            let word = self
                .dst_filter
                .get(&index, 0)
                .map_err(|source| SyncError::Map {
                    map: "dst_filter",
                    op: "read",
                    source,
                })?;
            if word != 0 {
                words.insert(index, word);
            }
        }
        Ok(words)
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
                Write::FilterWord(index, word) => {
                    self.dst_filter
                        .set(index, word, 0)
                        .map_err(|source| SyncError::Map {
                            map: "dst_filter",
                            op: "set",
                            source,
                        })?
                }
            }
        }
        self.forget_route_counters(desired);
        Ok(())
    }

    /// Removes the steering counters of routes that `desired` no longer has (and any a
    /// connection created just as its route went): the counter map is not an LRU, so nothing
    /// else would.
    fn forget_route_counters(&mut self, desired: &KernelState) {
        let stale: Vec<RouteKey> = self
            .route_stats
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !desired.routes.contains_key(key))
            .collect();
        for key in stale {
            if let Err(err) = self.route_stats.remove(&key) {
                tracing::debug!(error = %err, "cannot remove a route's steering counter");
            }
        }
    }
}

/// Another handle on the kernel map behind `map`, for another thread or owner: the same map,
/// through a duplicated descriptor.
pub fn second_handle(map: &MapData) -> io::Result<MapData> {
    let fd = map.fd().as_fd().try_clone_to_owned()?;
    MapData::from_fd(fd).map_err(io::Error::other)
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

/// Fixtures shared by the tests of the submodules.
#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::PathBuf};

    use super::*;
    use crate::state::{DesiredState, Protocol, Route, Sandbox, Service};

    pub(super) fn desired(routes: &[(&str, &str, &str)]) -> DesiredState {
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
                    inject_key: false,
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

    pub(super) fn cookies() -> MemberCookies {
        [("k1", 100), ("k2", 200)]
            .into_iter()
            .map(|(k, c)| (PathBuf::from(format!("/run/netns/{k}")), c))
            .collect()
    }

    pub(super) fn route_key(state: &KernelState) -> RouteKey {
        *state.routes.keys().next().expect("one route")
    }
}
