//! Which member sockets a route change resets (`reset_on_change`), and the record of what each
//! change reset, for `redirector stats`.
use std::{
    collections::{BTreeSet, VecDeque},
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use redirector_common::{
    RESET_BYPASSED_ROUTER, RESET_ROUTE_CHANGED, ResetRequest, RouteKey, SERVICE_HTTP_HANDOFF,
    ServiceKey,
};

use crate::{
    api::answers::{ResetCause, ResetReport},
    kernel::maps::{Ids, KernelState, service_key},
    state::{DesiredState, KeyRoutes, Protocol, Route},
};

/// The resets one change asks for in one routing key's member namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub key: String,
    pub members: Vec<PathBuf>,
    /// By service name, sorted.
    pub services: Vec<String>,
    /// For the reset iterator: each service as dialed, with its route (which the maps may no
    /// longer hold: then its sockets belong to the baseline again).
    pub requests: Vec<(ServiceKey, ResetRequest)>,
}

/// The resets that going from `before` to `after` asks for: per routing key, the services
/// whose route changed (added, endpoints moved, removed) where the old or the new route has
/// `reset_on_change`. TCP services only (the iterator resets TCP connections), and not the
/// HTTP services of a sandbox that injects its key, whose members' connections go through the
/// node router (which follows route changes per request). `ids` are those of `after`; a
/// sandbox or service that has none any more gets id 0, which no route has.
pub fn plan(before: &DesiredState, after: &DesiredState, ids: &Ids) -> Vec<Plan> {
    let old_keys = before.routing_keys();
    let new_keys = after.routing_keys();
    let names: BTreeSet<&str> = old_keys
        .iter()
        .chain(&new_keys)
        .map(|k| k.key.as_str())
        .collect();
    let mut plans = Vec::new();
    for name in names {
        let old = old_keys.iter().find(|k| k.key == name);
        let new = new_keys.iter().find(|k| k.key == name);
        // Members now; a key that is gone resets the namespaces that were its members.
        let Some(owner) = new.or(old) else { continue };
        if owner.members.is_empty() {
            continue;
        }
        let inject_key = new.is_some_and(|k| k.inject_key) || old.is_some_and(|k| k.inject_key);
        let route = |k: Option<&KeyRoutes>, service: &str| -> Option<Route> {
            k.and_then(|k| k.routes.get(service)).cloned()
        };
        let services: BTreeSet<&String> = old
            .into_iter()
            .chain(new)
            .flat_map(|k| k.routes.keys())
            .collect();
        let mut plan = Plan {
            key: name.to_owned(),
            members: owner.members.clone(),
            services: Vec::new(),
            requests: Vec::new(),
        };
        for service_name in services {
            let (was, is) = (route(old, service_name), route(new, service_name));
            let wants_reset = was.as_ref().is_some_and(|r| r.reset_on_change)
                || is.as_ref().is_some_and(|r| r.reset_on_change);
            let moved = was.as_ref().map(|r| &r.forks) != is.as_ref().map(|r| &r.forks);
            if !wants_reset || !moved {
                continue;
            }
            let Some(service) = after
                .services
                .get(service_name)
                .or_else(|| before.services.get(service_name))
            else {
                continue;
            };
            let via_router = service.protocol == Protocol::Http && inject_key;
            if service.protocol == Protocol::Udp || via_router {
                continue;
            }
            let key = service_key(service.address, service.protocol.ip_protocol());
            let route = RouteKey {
                service_id: ids.service_id(&key).unwrap_or(0),
                sandbox_id: ids.sandbox_id(name).unwrap_or(0),
            };
            plan.services.push(service_name.clone());
            let request = ResetRequest {
                route,
                kind: RESET_ROUTE_CHANGED,
            };
            plan.requests.push((key, request));
        }
        if !plan.requests.is_empty() {
            plans.push(plan);
        }
    }
    plans
}

/// For the router coming back (`router.reset_bypassed`): the services the kernel hands to the
/// router (`written`: the services map as last applied), each to reset the connections that
/// went straight to it, with their names from `desired`.
pub fn bypassed(
    desired: &DesiredState,
    written: &KernelState,
) -> (Vec<String>, Vec<(ServiceKey, ResetRequest)>) {
    let mut handed_off: Vec<(String, ServiceKey)> = desired
        .services
        .values()
        .map(|s| {
            let key = service_key(s.address, s.protocol.ip_protocol());
            (s.name.clone(), key)
        })
        .filter(|(_, key)| {
            written
                .services
                .get(key)
                .is_some_and(|v| v.flags & SERVICE_HTTP_HANDOFF != 0)
        })
        .collect();
    handed_off.sort_by(|a, b| a.0.cmp(&b.0));
    let request = ResetRequest {
        route: RouteKey::default(),
        kind: RESET_BYPASSED_ROUTER,
    };
    handed_off
        .into_iter()
        .map(|(name, key)| (name, (key, request)))
        .unzip()
}

/// The last changes that reset sockets, newest last, and the total.
#[derive(Debug, Default)]
pub struct ResetLog {
    recent: VecDeque<ResetReport>,
    pub total_closed: u64,
}

/// How many changes [`ResetLog`] keeps.
const KEPT: usize = 32;

impl ResetLog {
    pub fn record(
        &mut self,
        cause: ResetCause,
        sandbox: &str,
        services: &[String],
        closed: u64,
        errors: Vec<String>,
    ) {
        self.total_closed += closed;
        if self.recent.len() == KEPT {
            self.recent.pop_front();
        }
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.recent.push_back(ResetReport {
            at,
            cause,
            sandbox: sandbox.to_owned(),
            services: services.to_vec(),
            closed,
            errors,
        });
    }

    pub fn recent(&self) -> Vec<ResetReport> {
        self.recent.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{ForkErrorPolicy, Sandbox, Service};

    fn service(name: &str, address: &str, protocol: Protocol) -> (String, Service) {
        (
            name.to_owned(),
            Service {
                name: name.to_owned(),
                address: address.parse().unwrap(),
                protocol,
            },
        )
    }

    fn route(fork: &str, reset_on_change: bool) -> Route {
        let mut route = Route::new([fork.parse().unwrap()], ForkErrorPolicy::Error).unwrap();
        route.reset_on_change = reset_on_change;
        route
    }

    fn state(routes: &[(&str, Route)], inject_key: bool) -> DesiredState {
        let mut state = DesiredState {
            services: BTreeMap::from([
                service("db", "10.96.0.5:5432", Protocol::Tcp),
                service("dns", "10.96.0.10:53", Protocol::Udp),
                service("web", "10.96.0.6:80", Protocol::Http),
            ]),
            ..DesiredState::default()
        };
        state.sandboxes.insert(
            "pr-1".into(),
            Sandbox {
                key: "pr-1".into(),
                members: vec!["/run/netns/job".into()],
                routes: routes
                    .iter()
                    .map(|(s, r)| ((*s).to_owned(), r.clone()))
                    .collect(),
                inject_key,
            },
        );
        state
    }

    fn services(plans: &[Plan]) -> Vec<(&str, Vec<&str>)> {
        plans
            .iter()
            .map(|p| {
                (
                    p.key.as_str(),
                    p.services.iter().map(String::as_str).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn an_added_moved_or_removed_route_with_the_option_resets() {
        let none = state(&[], false);
        let to_7 = state(&[("db", route("10.0.1.7:5432", true))], false);
        let to_8 = state(&[("db", route("10.0.1.8:5432", true))], false);
        let ids = Ids::default();
        assert_eq!(services(&plan(&none, &to_7, &ids)), [("pr-1", vec!["db"])]);
        assert_eq!(services(&plan(&to_7, &to_8, &ids)), [("pr-1", vec!["db"])]);
        assert_eq!(services(&plan(&to_8, &none, &ids)), [("pr-1", vec!["db"])]);
        let plans = plan(&none, &to_7, &ids);
        assert_eq!(plans[0].members, [PathBuf::from("/run/netns/job")]);
        let (key, request) = plans[0].requests[0];
        let route = request.route;
        assert_eq!(key, service_key("10.96.0.5:5432".parse().unwrap(), 6));
        assert_eq!((route.service_id, route.sandbox_id), (0, 0), "no ids: none");
    }

    #[test]
    fn without_the_option_or_a_move_nothing_resets() {
        let none = state(&[], false);
        let plain = state(&[("db", route("10.0.1.7:5432", false))], false);
        let on = state(&[("db", route("10.0.1.7:5432", true))], false);
        let ids = Ids::default();
        assert!(plan(&none, &plain, &ids).is_empty());
        assert!(plan(&plain, &none, &ids).is_empty());
        // Turning the option on (or off) moves no connection.
        assert!(plan(&plain, &on, &ids).is_empty());
        assert!(plan(&on, &on, &ids).is_empty());
    }

    #[test]
    fn udp_and_routed_http_services_are_left_alone() {
        let none = state(&[], false);
        let udp = state(&[("dns", route("10.0.1.7:53", true))], false);
        assert!(plan(&none, &udp, &Ids::default()).is_empty());
        // HTTP members' connections go straight to the fork, unless the key is injected.
        let http = state(&[("web", route("10.0.1.7:80", true))], false);
        assert_eq!(
            services(&plan(&none, &http, &Ids::default())),
            [("pr-1", vec!["web"])]
        );
        let injected = state(&[("web", route("10.0.1.7:80", true))], true);
        assert!(plan(&state(&[], true), &injected, &Ids::default()).is_empty());
    }

    #[test]
    fn a_deleted_sandbox_resets_its_former_members() {
        let on = state(&[("db", route("10.0.1.7:5432", true))], false);
        let gone = DesiredState {
            services: on.services.clone(),
            ..DesiredState::default()
        };
        let plans = plan(&on, &gone, &Ids::default());
        assert_eq!(services(&plans), [("pr-1", vec!["db"])]);
        assert_eq!(plans[0].members, [PathBuf::from("/run/netns/job")]);
    }

    #[test]
    fn the_router_coming_back_resets_the_services_it_is_handed() {
        let state = state(&[("web", route("10.0.1.7:80", false))], false);
        let mut written = KernelState::default();
        let web = service_key("10.96.0.6:80".parse().unwrap(), 6);
        let db = service_key("10.96.0.5:5432".parse().unwrap(), 6);
        for (key, flags) in [(web, SERVICE_HTTP_HANDOFF), (db, 0)] {
            written.services.insert(
                key,
                redirector_common::ServiceValue {
                    service_id: 1,
                    flags,
                },
            );
        }
        let (names, requests) = bypassed(&state, &written);
        assert_eq!(names, ["web"], "only what the kernel hands to the router");
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].0, web);
        assert_eq!(requests[0].1.kind, RESET_BYPASSED_ROUTER);
        assert!(bypassed(&state, &KernelState::default()).0.is_empty());
    }

    #[test]
    fn the_log_keeps_the_last_changes_and_the_total() {
        let mut log = ResetLog::default();
        for _ in 0..(KEPT + 3) {
            log.record(ResetCause::RouteChange, "pr-1", &["db".into()], 2, vec![]);
        }
        assert_eq!(log.recent().len(), KEPT);
        assert_eq!(log.total_closed, 2 * (KEPT as u64 + 3));
    }
}
