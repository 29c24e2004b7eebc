//! The desired state the daemon makes true in the kernel: services, sandboxes, route groups,
//! their member pods and routes. [`DesiredState::validate`] holds the rules every state must
//! meet, whatever its source (config file, API, or both merged); the kernel encoding lives in
//! `kernel::maps`.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
};

use crate::routing_key::{self, KeySources};

/// How a service is reached, which decides how its forks are routed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    /// HTTP/1.1 or HTTP/2 over TCP: members are steered like `tcp` today; per-request routing
    /// by the node router builds on it.
    Http,
}

impl Protocol {
    /// The IP protocol the kernel sees for sockets of this service.
    pub fn ip_protocol(self) -> u8 {
        match self {
            Protocol::Tcp | Protocol::Http => redirector_common::IPPROTO_TCP,
            Protocol::Udp => redirector_common::IPPROTO_UDP,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub address: SocketAddr,
    pub protocol: Protocol,
}

impl Service {
    /// Why a route to this service cannot have `reset_on_change` set, if it cannot: the reset
    /// ends TCP connections, and a UDP service has none. The one statement of the rule, for
    /// the config file (located) and [`DesiredState::validate`] (every source) alike.
    pub fn reset_on_change_refusal(&self, reset_on_change: bool) -> Option<String> {
        (reset_on_change && self.protocol == Protocol::Udp).then(|| {
            format!(
                "reset_on_change resets TCP connections; service {:?} is UDP",
                self.name
            )
        })
    }
}

/// What the node router does when a request's fork cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ForkErrorPolicy {
    /// Answer 502 with a header naming the cause: a tester sees their fork is down.
    #[default]
    Error,
    /// Send the request to the baseline instead.
    Baseline,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The fork's endpoints: new connections (L4) and requests (L7) spread over all of them.
    /// A set: sorted, without repeats, and not empty ([`Route::new`] makes it so).
    pub forks: Vec<SocketAddr>,
    pub on_fork_error: ForkErrorPolicy,
    /// When the route changes (added, moved, removed), the member sockets it steered or would
    /// now steer elsewhere are reset, so that long-lived connections (pools) follow it. L4 only:
    /// requests through the node router follow route changes by themselves.
    pub reset_on_change: bool,
}

impl Route {
    /// A route to the endpoints `forks`, sorted and without repeats; None when there are none.
    pub fn new(
        forks: impl IntoIterator<Item = SocketAddr>,
        on_fork_error: ForkErrorPolicy,
    ) -> Option<Route> {
        let mut forks: Vec<SocketAddr> = forks.into_iter().collect();
        forks.sort_unstable();
        forks.dedup();
        (!forks.is_empty()).then_some(Route {
            forks,
            on_fork_error,
            reset_on_change: false,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub key: String,
    /// Network-namespace paths of the pods that belong to the sandbox.
    pub members: Vec<PathBuf>,
    /// By service name.
    pub routes: BTreeMap<String, Route>,
    /// Requests of members that carry no key are routed as this sandbox's and passed on with
    /// the key added (members that do not propagate the key): their connections to the HTTP
    /// services the sandbox forks go through the node router rather than straight to the fork.
    pub inject_key: bool,
}

/// A routing key that stands for several sandboxes at once (testing two PRs that change
/// different services together): its requests and member pods reach the forks of all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub key: String,
    /// Keys of the sandboxes it combines; no two may fork the same service.
    pub sandboxes: Vec<String>,
    /// Network-namespace paths of pods that belong to the group.
    pub members: Vec<PathBuf>,
}

/// A routing key as the data paths see it: a sandbox, or a group with its sandboxes' routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRoutes {
    pub key: String,
    pub members: Vec<PathBuf>,
    /// By service name.
    pub routes: BTreeMap<String, Route>,
    /// [`Sandbox::inject_key`]; always false for a group.
    pub inject_key: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// By service name.
    pub services: BTreeMap<String, Service>,
    /// By routing key.
    pub sandboxes: BTreeMap<String, Sandbox>,
    /// By routing key.
    pub groups: BTreeMap<String, Group>,
    /// By HTTP service name: where the service's requests may carry the routing key, for the
    /// services that do not keep the default (headers only). Set by the config file only.
    pub key_sources: BTreeMap<String, KeySources>,
}

/// A rule a state breaks, named by the field it concerns (e.g. `sandbox "pr-1" route "svc-a"`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Issue {
    pub field: String,
    pub message: String,
}

impl DesiredState {
    /// Every routing key with its members and routes: sandboxes as they are, groups with the
    /// union of their sandboxes' routes.
    pub fn routing_keys(&self) -> Vec<KeyRoutes> {
        let sandboxes = self.sandboxes.values().map(|s| KeyRoutes {
            key: s.key.clone(),
            members: s.members.clone(),
            routes: s.routes.clone(),
            inject_key: s.inject_key,
        });
        let groups = self.groups.values().map(|g| KeyRoutes {
            key: g.key.clone(),
            members: g.members.clone(),
            routes: g
                .sandboxes
                .iter()
                .filter_map(|key| self.sandboxes.get(key))
                .flat_map(|s| s.routes.iter().map(|(k, v)| (k.clone(), v.clone())))
                .collect(),
            inject_key: false,
        });
        sandboxes.chain(groups).collect()
    }

    /// Every member path with its routing key and whether the key injects it (sandboxes with
    /// `inject_key`), without building the keys' routes as [`Self::routing_keys`] does: the
    /// member poll walks this every interval, whatever the number of routes.
    pub fn members(&self) -> impl Iterator<Item = (&str, &std::path::Path, bool)> {
        let sandboxes = self.sandboxes.values().flat_map(|s| {
            s.members
                .iter()
                .map(|m| (s.key.as_str(), m.as_path(), s.inject_key))
        });
        let groups = self.groups.values().flat_map(|g| {
            g.members
                .iter()
                .map(|m| (g.key.as_str(), m.as_path(), false))
        });
        sandboxes.chain(groups)
    }

    /// Checks the rules that span objects. The config file checks them too, with line numbers;
    /// this is the check for states assembled from several sources.
    pub fn validate(&self) -> Result<(), Vec<Issue>> {
        let mut issues = Vec::new();
        let mut issue = |field: String, message: String| issues.push(Issue { field, message });

        let mut destinations: HashMap<(SocketAddr, u8), &str> = HashMap::new();
        for service in self.services.values() {
            let key = (
                SocketAddr::new(service.address.ip().to_canonical(), service.address.port()),
                service.protocol.ip_protocol(),
            );
            if let Some(other) = destinations.insert(key, &service.name) {
                issue(
                    format!("service {:?} address", service.name),
                    format!(
                        "{} is already the address of service {other:?}",
                        service.address
                    ),
                );
            }
        }

        for name in self.key_sources.keys() {
            match self.services.get(name) {
                None => issue(
                    format!("service {name:?} key_from"),
                    format!("unknown service {name:?}"),
                ),
                Some(service) if service.protocol != Protocol::Http => issue(
                    format!("service {name:?} key_from"),
                    "only HTTP services carry the key in requests".to_owned(),
                ),
                Some(_) => {}
            }
        }

        let mut member_of: HashMap<&PathBuf, &str> = HashMap::new();
        for sandbox in self.sandboxes.values() {
            if let Err(e) = routing_key::validate(&sandbox.key) {
                issue(format!("sandbox {:?} key", sandbox.key), e.to_string());
            }
            for (name, route) in &sandbox.routes {
                let field = format!("sandbox {:?} route {name:?}", sandbox.key);
                if route.forks.is_empty() {
                    issue(
                        field.clone(),
                        "a route needs at least one fork endpoint".to_owned(),
                    );
                }
                let mut seen = HashSet::new();
                for fork in &route.forks {
                    if !seen.insert(fork) {
                        issue(field.clone(), format!("fork {fork} is listed twice"));
                    }
                }
                match self.services.get(name) {
                    None => issue(field, format!("unknown service {name:?}")),
                    Some(service) => {
                        let other_family = route
                            .forks
                            .iter()
                            .filter(|fork| fork.is_ipv4() != service.address.is_ipv4());
                        for fork in other_family {
                            issue(
                                field.clone(),
                                format!(
                                    "fork {fork} and service address {} must be the same IP family",
                                    service.address
                                ),
                            );
                        }
                        if let Some(message) =
                            service.reset_on_change_refusal(route.reset_on_change)
                        {
                            issue(field, message);
                        }
                    }
                }
            }
            for member in &sandbox.members {
                if let Some(other) = member_of.insert(member, &sandbox.key) {
                    issue(
                        format!("sandbox {:?} members", sandbox.key),
                        format!("{} is already a member of {other:?}", member.display()),
                    );
                }
            }
        }

        for group in self.groups.values() {
            let field = |what: &str| format!("group {:?} {what}", group.key);
            if let Err(e) = routing_key::validate(&group.key) {
                issue(field("key"), e.to_string());
            }
            if self.sandboxes.contains_key(&group.key) {
                issue(
                    field("key"),
                    format!("{:?} is already a sandbox key", group.key),
                );
            }
            if group.sandboxes.is_empty() {
                issue(
                    field("sandboxes"),
                    "a group needs at least one sandbox".to_owned(),
                );
            }
            let mut forked_by: HashMap<&str, &str> = HashMap::new();
            let mut seen = HashSet::new();
            for key in &group.sandboxes {
                if !seen.insert(key) {
                    issue(
                        field("sandboxes"),
                        format!("sandbox {key:?} is listed twice"),
                    );
                    continue;
                }
                let Some(sandbox) = self.sandboxes.get(key) else {
                    issue(field("sandboxes"), format!("unknown sandbox {key:?}"));
                    continue;
                };
                for service in sandbox.routes.keys() {
                    if let Some(other) = forked_by.insert(service, key) {
                        issue(
                            field("sandboxes"),
                            format!(
                                "conflict: sandboxes {other:?} and {key:?} both fork service {service:?}"
                            ),
                        );
                    }
                }
            }
            for member in &group.members {
                if let Some(other) = member_of.insert(member, &group.key) {
                    issue(
                        field("members"),
                        format!("{} is already a member of {other:?}", member.display()),
                    );
                }
            }
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(issues)
        }
    }

    pub fn route_count(&self) -> usize {
        self.sandboxes.values().map(|s| s.routes.len()).sum()
    }

    pub fn member_count(&self) -> usize {
        self.sandboxes
            .values()
            .map(|s| s.members.len())
            .sum::<usize>()
            + self.groups.values().map(|g| g.members.len()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_those_of_the_routing_keys_with_their_inject_flag() {
        let mut state = state();
        let pr1 = state.sandboxes.get_mut("pr-1").unwrap();
        pr1.members = vec!["/run/netns/a".into()];
        pr1.inject_key = true;
        state.sandboxes.get_mut("pr-2").unwrap().members = vec!["/run/netns/b".into()];
        state.groups.insert(
            "g".into(),
            Group {
                key: "g".into(),
                sandboxes: vec!["pr-1".into(), "pr-2".into()],
                members: vec!["/run/netns/c".into()],
            },
        );
        let members: Vec<(&str, &std::path::Path, bool)> = state.members().collect();
        let from_keys: Vec<(String, PathBuf, bool)> = state
            .routing_keys()
            .into_iter()
            .flat_map(|k| {
                k.members
                    .into_iter()
                    .map(move |m| (k.key.clone(), m, k.inject_key))
            })
            .collect();
        assert_eq!(
            members
                .iter()
                .map(|(k, m, i)| ((*k).to_owned(), m.to_path_buf(), *i))
                .collect::<Vec<_>>(),
            from_keys
        );
        assert_eq!(members.len(), 3);
        assert!(members.contains(&("pr-1", std::path::Path::new("/run/netns/a"), true)));
        assert!(members.contains(&("g", std::path::Path::new("/run/netns/c"), false)));
    }

    fn state() -> DesiredState {
        let mut state = DesiredState::default();
        for (name, addr) in [("a", "10.96.0.1:80"), ("b", "10.96.0.2:80")] {
            state.services.insert(
                name.into(),
                Service {
                    name: name.into(),
                    address: addr.parse().unwrap(),
                    protocol: Protocol::Http,
                },
            );
        }
        for (key, service, fork) in [("pr-1", "a", "10.0.0.1:80"), ("pr-2", "b", "10.0.0.2:80")] {
            state.sandboxes.insert(
                key.into(),
                Sandbox {
                    key: key.into(),
                    members: vec![],
                    routes: [(
                        service.to_owned(),
                        Route::new([fork.parse().unwrap()], ForkErrorPolicy::Error).unwrap(),
                    )]
                    .into(),
                    inject_key: false,
                },
            );
        }
        state
    }

    fn group(key: &str, sandboxes: &[&str]) -> Group {
        Group {
            key: key.into(),
            sandboxes: sandboxes.iter().map(|s| s.to_string()).collect(),
            members: vec![],
        }
    }

    #[test]
    fn a_group_carries_the_routes_of_all_its_sandboxes() {
        let mut state = state();
        state
            .groups
            .insert("g".into(), group("g", &["pr-1", "pr-2"]));
        assert_eq!(state.validate(), Ok(()));
        let keys = state.routing_keys();
        let g = keys.iter().find(|k| k.key == "g").unwrap();
        assert_eq!(g.routes.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn sandboxes_forking_the_same_service_conflict_in_a_group() {
        let mut state = state();
        let mut pr3 = state.sandboxes["pr-1"].clone();
        pr3.key = "pr-3".into();
        state.sandboxes.insert("pr-3".into(), pr3);
        state
            .groups
            .insert("g".into(), group("g", &["pr-1", "pr-3"]));
        let issues = state.validate().unwrap_err();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(
            issues[0].message.contains("both fork service \"a\""),
            "{issues:?}"
        );
    }

    #[test]
    fn group_rules() {
        let mut state = state();
        state.groups.insert("pr-1".into(), group("pr-1", &["pr-2"]));
        state.groups.insert("e".into(), group("e", &[]));
        state
            .groups
            .insert("u".into(), group("u", &["nope", "pr-2", "pr-2"]));
        let messages: Vec<String> = state
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|i| format!("{}: {}", i.field, i.message))
            .collect();
        assert_eq!(
            messages,
            [
                "group \"e\" sandboxes: a group needs at least one sandbox",
                "group \"pr-1\" key: \"pr-1\" is already a sandbox key",
                "group \"u\" sandboxes: unknown sandbox \"nope\"",
                "group \"u\" sandboxes: sandbox \"pr-2\" is listed twice",
            ]
        );
    }

    #[test]
    fn a_route_is_a_sorted_set_of_endpoints() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let route = Route::new(
            [
                addr("10.0.0.3:80"),
                addr("10.0.0.1:80"),
                addr("10.0.0.3:80"),
            ],
            ForkErrorPolicy::Error,
        )
        .unwrap();
        assert_eq!(route.forks, [addr("10.0.0.1:80"), addr("10.0.0.3:80")]);
        assert_eq!(Route::new([], ForkErrorPolicy::Error), None);
    }

    #[test]
    fn routes_built_by_hand_are_checked_too() {
        let mut state = state();
        let route = &mut state.sandboxes.get_mut("pr-1").unwrap().routes;
        route.get_mut("a").unwrap().forks.clear();
        state.sandboxes.get_mut("pr-2").unwrap().routes.insert(
            "b".into(),
            Route {
                forks: vec!["10.0.0.2:80".parse().unwrap(); 2],
                on_fork_error: ForkErrorPolicy::Error,
                reset_on_change: false,
            },
        );
        let messages: Vec<String> = state
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|i| format!("{}: {}", i.field, i.message))
            .collect();
        assert_eq!(
            messages,
            [
                "sandbox \"pr-1\" route \"a\": a route needs at least one fork endpoint",
                "sandbox \"pr-2\" route \"b\": fork 10.0.0.2:80 is listed twice",
            ]
        );
    }

    #[test]
    fn key_sources_name_http_services() {
        let mut state = state();
        state.services.get_mut("b").unwrap().protocol = Protocol::Tcp;
        let query = KeySources {
            query: true,
            ..KeySources::default()
        };
        for name in ["a", "b", "nope"] {
            state.key_sources.insert(name.into(), query);
        }
        let messages: Vec<String> = state
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|i| format!("{}: {}", i.field, i.message))
            .collect();
        assert_eq!(
            messages,
            [
                "service \"b\" key_from: only HTTP services carry the key in requests",
                "service \"nope\" key_from: unknown service \"nope\"",
            ]
        );
    }

    #[test]
    fn reset_on_change_is_refused_on_udp_services() {
        let mut state = state();
        for key in ["pr-1", "pr-2"] {
            let sandbox = state.sandboxes.get_mut(key).unwrap();
            for route in sandbox.routes.values_mut() {
                route.reset_on_change = true;
            }
        }
        // TCP services take it, HTTP ones too (members reach them at L4).
        assert_eq!(state.validate(), Ok(()));
        state.services.get_mut("b").unwrap().protocol = Protocol::Udp;
        let messages: Vec<String> = state
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|i| format!("{}: {}", i.field, i.message))
            .collect();
        assert_eq!(
            messages,
            [
                "sandbox \"pr-2\" route \"b\": reset_on_change resets TCP connections; service \"b\" is UDP"
            ]
        );
        // Off, a UDP route is fine.
        let route = state.sandboxes.get_mut("pr-2").unwrap().routes.get_mut("b");
        route.unwrap().reset_on_change = false;
        assert_eq!(state.validate(), Ok(()));
    }

    #[test]
    fn cross_object_rules() {
        let mut state = state();
        state.services.get_mut("b").unwrap().address = "10.96.0.1:80".parse().unwrap();
        state.sandboxes.get_mut("pr-1").unwrap().routes.insert(
            "zzz".into(),
            Route::new(["10.0.0.1:1".parse().unwrap()], ForkErrorPolicy::Error).unwrap(),
        );
        let issues = state.validate().unwrap_err();
        let fields: Vec<&str> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            ["service \"b\" address", "sandbox \"pr-1\" route \"zzz\""]
        );
    }
}
