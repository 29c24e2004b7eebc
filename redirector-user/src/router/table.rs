//! The router's routing table: for each HTTP service address, its forks by routing key.
//!
//! Rebuilt from the desired state on every apply and swapped in atomically, so the very next
//! request sees a route change, including requests on connections opened before it. A fork
//! with several endpoints gets its requests round-robin, one endpoint per request.
//!
//! It also knows the clients whose sandbox injects its key (`inject_key`), by the addresses of
//! the member pods' network namespaces: a connection the kernel hands over keeps its source
//! address, and pods on a node have addresses of their own.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use tracing::warn;

use crate::{
    routing_key::{Extracted, KeySources},
    state::{DesiredState, ForkErrorPolicy, Protocol},
};

/// Looked up on every request; foldhash because SipHash cost more than the routing itself.
/// Its per-process random seed still keeps collisions out of a client's control.
type FastMap<K, V> = foldhash::HashMap<K, V>;

#[derive(Debug, Default)]
pub struct RouteTable {
    /// By the service address as connections dial it (canonical: no v4-mapped IPv6).
    services: FastMap<SocketAddr, ServiceRoutes>,
    /// The routing key of each client address (canonical) that belongs to a member of a
    /// sandbox with `inject_key`.
    clients: FastMap<IpAddr, String>,
}

/// The addresses configured in member namespaces, by member path; read only for the members
/// of sandboxes with `inject_key` (see `kernel::netns::resolve_all`).
pub type MemberAddresses = HashMap<PathBuf, Vec<IpAddr>>;

/// One HTTP service with forks, as the router sees it.
#[derive(Debug)]
pub struct ServiceRoutes {
    name: String,
    /// Where its requests may carry the key (`key_from`).
    sources: KeySources,
    /// By routing key.
    forks: FastMap<String, ForkSet>,
}

impl ServiceRoutes {
    pub fn key_sources(&self) -> &KeySources {
        &self.sources
    }

    /// Where a request to this service with `key` goes.
    pub fn decide(&self, key: &Extracted) -> Decision<'_> {
        let key = match key {
            Extracted::Key(key) => key,
            Extracted::Invalid => {
                return Decision::Baseline {
                    why: BaselineWhy::InvalidKey,
                };
            }
            Extracted::Absent => {
                return Decision::Baseline {
                    why: BaselineWhy::NoKey,
                };
            }
        };
        self.decide_key(key)
    }

    /// Where a request to this service with the valid key `key` goes.
    pub fn decide_key(&self, key: &str) -> Decision<'_> {
        match self.forks.get_key_value(key) {
            Some((key, forks)) => Decision::Fork {
                service: &self.name,
                key,
                fork: forks.pick(),
            },
            None => Decision::Baseline {
                why: BaselineWhy::NoRoute,
            },
        }
    }
}

/// A fork's endpoints, taken in turn.
#[derive(Debug)]
struct ForkSet {
    /// Never empty.
    addrs: Box<[SocketAddr]>,
    on_error: ForkErrorPolicy,
    /// Requests routed so far; the next one goes to `addrs[next % len]`. Relaxed: concurrent
    /// requests need distinct turns, not an order among them.
    next: AtomicUsize,
}

impl ForkSet {
    fn pick(&self) -> Fork {
        // The counter wraps after usize::MAX requests, which skews one round at most.
        let turn = match self.addrs.len() {
            0 | 1 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        Fork {
            // In range: `addrs` is never empty (`from_state` skips empty sets).
            addr: self.addrs[turn],
            on_error: self.on_error,
        }
    }
}

/// The endpoint of a fork that one request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fork {
    pub addr: SocketAddr,
    pub on_error: ForkErrorPolicy,
}

/// Where one request goes; borrowed from the table the request was routed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'t> {
    Fork {
        service: &'t str,
        key: &'t str,
        fork: Fork,
    },
    /// The original destination.
    Baseline { why: BaselineWhy },
}

/// Why a request goes to the baseline; counted per outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaselineWhy {
    NoKey,
    InvalidKey,
    /// A valid key without a fork of this service.
    NoRoute,
    /// The destination is not (or no longer) an HTTP service with forks.
    UnknownService,
}

impl RouteTable {
    /// The table without clients to inject keys for (see [`RouteTable::with_members`]).
    pub fn from_state(state: &DesiredState) -> RouteTable {
        RouteTable::with_members(state, &MemberAddresses::new())
    }

    /// The table, with the clients at `addresses` that are members of a sandbox with
    /// `inject_key`. An address that several keys' members share (pods in the host's network
    /// namespace, say) stands for none of them: the router could not tell whose request it is.
    pub fn with_members(state: &DesiredState, addresses: &MemberAddresses) -> RouteTable {
        let mut table = RouteTable::services_of(state);
        let mut shared = HashSet::new();
        for sandbox in state.routing_keys().iter().filter(|s| s.inject_key) {
            for ip in sandbox
                .members
                .iter()
                .filter_map(|path| addresses.get(path))
                .flatten()
                .map(IpAddr::to_canonical)
                .filter(|ip| client_address(*ip))
            {
                match table.clients.get(&ip) {
                    Some(other) if *other != sandbox.key => {
                        shared.insert(ip);
                    }
                    _ => {
                        table.clients.insert(ip, sandbox.key.clone());
                    }
                }
            }
        }
        for ip in shared {
            if let Some(key) = table.clients.remove(&ip) {
                warn!(%ip, key, "members of several sandboxes have this address; \
                    requests from it get no key injected");
            }
        }
        table
    }

    /// The key to inject into the requests of the client at `ip` that carry none, if it is a
    /// member of a sandbox with `inject_key`.
    pub fn injected_key(&self, ip: IpAddr) -> Option<&str> {
        self.clients.get(&ip.to_canonical()).map(String::as_str)
    }

    fn services_of(state: &DesiredState) -> RouteTable {
        let mut services: FastMap<SocketAddr, ServiceRoutes> = FastMap::default();
        let keys = state.routing_keys();
        for service in state.services.values() {
            if service.protocol != Protocol::Http {
                continue;
            }
            let forks: FastMap<String, ForkSet> = keys
                .iter()
                .filter_map(|sandbox| {
                    let route = sandbox.routes.get(&service.name)?;
                    if route.forks.is_empty() {
                        return None;
                    }
                    Some((
                        sandbox.key.clone(),
                        ForkSet {
                            addrs: route.forks.clone().into_boxed_slice(),
                            on_error: route.on_fork_error,
                            next: AtomicUsize::new(0),
                        },
                    ))
                })
                .collect();
            if !forks.is_empty() {
                services.insert(
                    canonical(service.address),
                    ServiceRoutes {
                        name: service.name.clone(),
                        sources: state
                            .key_sources
                            .get(&service.name)
                            .copied()
                            .unwrap_or_default(),
                        forks,
                    },
                );
            }
        }
        RouteTable {
            services,
            clients: FastMap::default(),
        }
    }

    /// The HTTP service with forks at `dialed`, if any: only those are routed.
    pub fn service(&self, dialed: SocketAddr) -> Option<&ServiceRoutes> {
        self.services.get(&canonical(dialed))
    }

    pub fn decide(&self, dialed: SocketAddr, key: &Extracted) -> Decision<'_> {
        match self.service(dialed) {
            Some(service) => service.decide(key),
            None => Decision::Baseline {
                why: BaselineWhy::UnknownService,
            },
        }
    }
}

/// Whether a member's address can tell its connections apart: not loopback (every namespace
/// has it), unspecified, or IPv6 link-local (not unique across links).
fn client_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unspecified() && !v6.is_unicast_link_local(),
    }
}

pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn table() -> RouteTable {
        let config = config::parse(
            r#"
[[service]]
name = "web"
address = "10.96.0.10:8080"
protocol = "http"

[[service]]
name = "db"
address = "10.96.0.20:5432"

[[sandbox]]
key = "pr-1"
routes = [{ service = "web", fork = "10.0.0.7:8080" }, { service = "db", fork = "10.0.0.7:5432" }]

[[sandbox]]
key = "pr-2"
routes = [{ service = "web", fork = "10.0.0.8:8080", on_fork_error = "baseline" }]
"#,
        )
        .expect("valid");
        RouteTable::from_state(&config.state)
    }

    fn key(k: &str) -> Extracted {
        Extracted::Key(k.to_owned())
    }

    #[test]
    fn routes_by_key_and_falls_back_to_baseline() {
        let t = table();
        let web: SocketAddr = "10.96.0.10:8080".parse().unwrap();
        match t.decide(web, &key("pr-2")) {
            Decision::Fork { fork, key, service } => {
                assert_eq!(fork.addr, "10.0.0.8:8080".parse().unwrap());
                assert_eq!(fork.on_error, ForkErrorPolicy::Baseline);
                assert_eq!((key, service), ("pr-2", "web"));
            }
            other => panic!("{other:?}"),
        }
        let baseline = |why| Decision::Baseline { why };
        assert_eq!(t.decide(web, &key("pr-9")), baseline(BaselineWhy::NoRoute));
        assert_eq!(
            t.decide(web, &Extracted::Absent),
            baseline(BaselineWhy::NoKey)
        );
        assert_eq!(
            t.decide(web, &Extracted::Invalid),
            baseline(BaselineWhy::InvalidKey)
        );
    }

    #[test]
    fn requests_take_a_forks_endpoints_in_turn() {
        let config = config::parse(
            r#"
[[service]]
name = "web"
address = "10.96.0.10:8080"
protocol = "http"

[[sandbox]]
key = "pr-1"
routes = [{ service = "web", forks = ["10.0.0.9:8080", "10.0.0.7:8080", "10.0.0.8:8080"] }]
"#,
        )
        .expect("valid");
        let t = RouteTable::from_state(&config.state);
        let web: SocketAddr = "10.96.0.10:8080".parse().unwrap();
        let picks: Vec<String> = (0..6)
            .map(|_| match t.decide(web, &key("pr-1")) {
                Decision::Fork { fork, .. } => fork.addr.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            picks,
            [
                "10.0.0.7:8080",
                "10.0.0.8:8080",
                "10.0.0.9:8080",
                "10.0.0.7:8080",
                "10.0.0.8:8080",
                "10.0.0.9:8080"
            ]
        );
    }

    #[test]
    fn each_service_keeps_its_key_sources() {
        let config = config::parse(
            r#"
[[service]]
name = "web"
address = "10.96.0.10:8080"
protocol = "http"
key_from = ["header", "query", "cookie"]
set_cookie = true
cookie_max_age = "2h"

[[service]]
name = "api"
address = "10.96.0.11:8080"
protocol = "http"

[[sandbox]]
key = "pr-1"
routes = [{ service = "web", fork = "10.0.0.7:8080" }, { service = "api", fork = "10.0.0.7:8081" }]
"#,
        )
        .expect("valid");
        let t = RouteTable::from_state(&config.state);
        let web = t.service("10.96.0.10:8080".parse().unwrap()).unwrap();
        assert_eq!(
            *web.key_sources(),
            KeySources {
                header: true,
                query: true,
                cookie: true,
                set_cookie: Some(std::time::Duration::from_secs(7200)),
            }
        );
        let api = t.service("10.96.0.11:8080".parse().unwrap()).unwrap();
        assert_eq!(*api.key_sources(), KeySources::default());
        assert!(t.service("10.96.0.12:8080".parse().unwrap()).is_none());
    }

    #[test]
    fn clients_of_sandboxes_with_inject_key_are_known_by_address() {
        let config = config::parse(
            r#"
[[service]]
name = "web"
address = "10.96.0.10:8080"
protocol = "http"

[[sandbox]]
key = "pr-1"
members = ["/run/netns/a", "/run/netns/shared-1"]
inject_key = true
routes = [{ service = "web", fork = "10.0.0.7:8080" }]

[[sandbox]]
key = "pr-2"
members = ["/run/netns/b", "/run/netns/shared-2"]
inject_key = true

[[sandbox]]
key = "pr-3"
members = ["/run/netns/c"]
"#,
        )
        .expect("valid");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let addresses = MemberAddresses::from([
            (
                PathBuf::from("/run/netns/a"),
                vec![ip("127.0.0.1"), ip("::1"), ip("10.1.0.2"), ip("fe80::1")],
            ),
            (PathBuf::from("/run/netns/b"), vec![ip("fd00:1::3")]),
            (PathBuf::from("/run/netns/c"), vec![ip("10.1.0.4")]),
            (PathBuf::from("/run/netns/shared-1"), vec![ip("10.9.0.1")]),
            (PathBuf::from("/run/netns/shared-2"), vec![ip("10.9.0.1")]),
        ]);
        let t = RouteTable::with_members(&config.state, &addresses);
        assert_eq!(t.injected_key(ip("10.1.0.2")), Some("pr-1"));
        assert_eq!(t.injected_key(ip("::ffff:10.1.0.2")), Some("pr-1"));
        assert_eq!(t.injected_key(ip("fd00:1::3")), Some("pr-2"));
        for none in [
            "10.1.0.4",
            "127.0.0.1",
            "::1",
            "fe80::1",
            "10.9.0.1",
            "10.1.0.9",
        ] {
            assert_eq!(t.injected_key(ip(none)), None, "{none}");
        }
        assert_eq!(
            RouteTable::from_state(&config.state).injected_key(ip("10.1.0.2")),
            None
        );
    }

    #[test]
    fn only_http_services_and_v4_mapped_dialing() {
        let t = table();
        let db: SocketAddr = "10.96.0.20:5432".parse().unwrap();
        assert_eq!(
            t.decide(db, &key("pr-1")),
            Decision::Baseline {
                why: BaselineWhy::UnknownService
            }
        );
        let mapped: SocketAddr = "[::ffff:10.96.0.10]:8080".parse().unwrap();
        assert!(matches!(
            t.decide(mapped, &key("pr-1")),
            Decision::Fork { .. }
        ));
    }
}
