//! Answers to the API's read-only questions, built from what the daemon holds.
use std::{
    collections::HashMap,
    sync::{Mutex, TryLockError, atomic::Ordering::Relaxed},
};

use redirector_common::{RouteKey, map_sizes};
use serde_json::{Value, json};

use super::Daemon;
use crate::{
    api::{
        answers::{
            ApiCounts, ChangeSummary, Counts, HookState, KernelCounters, KubernetesStatus,
            LoopAccepted, MapStatus, MemberState, MemberStatus, ProgramStatus, RouteStats,
            RouterStatus, StatsAnswer, StatusAnswer,
        },
        server::Query,
        types::{ApiError, GroupSpec, Origin, Owned, RouteSpec, SandboxSpec, ServiceSpec},
    },
    kernel::{
        maps::{KernelState, service_key},
        programs::{self, HOOKS},
        tables::TableCounts,
    },
    state::DesiredState,
};

pub(super) fn query(daemon: &Daemon, query: Query) -> Result<Value, ApiError> {
    let merged = &daemon.merged;
    let origin = |in_file: bool| if in_file { Origin::File } else { Origin::Api };
    let file = &daemon.file.state;
    let value = match query {
        Query::Status => to_json(status(daemon)),
        // Normally run off the loop (see `off_loop`); here when asked inline.
        Query::Stats => stats(daemon)()?,
        Query::RefreshMetrics => refresh_metrics(daemon)()?,
        Query::Ping => Value::Null,
        Query::Services => to_json(
            merged
                .services
                .values()
                .map(|s| Owned {
                    spec: ServiceSpec::from_state(s),
                    origin: origin(file.services.contains_key(&s.name)),
                })
                .collect::<Vec<_>>(),
        ),
        Query::Service(name) => {
            let s = merged
                .services
                .get(&name)
                .ok_or_else(|| ApiError::not_found(format!("service {name:?}")))?;
            to_json(Owned {
                spec: ServiceSpec::from_state(s),
                origin: origin(file.services.contains_key(&name)),
            })
        }
        Query::Sandboxes => to_json(
            merged
                .sandboxes
                .values()
                .map(|s| Owned {
                    spec: SandboxSpec::from_state(s),
                    origin: origin(file.sandboxes.contains_key(&s.key)),
                })
                .collect::<Vec<_>>(),
        ),
        Query::Sandbox(key) => {
            let s = merged
                .sandboxes
                .get(&key)
                .ok_or_else(|| ApiError::not_found(format!("sandbox {key:?}")))?;
            to_json(Owned {
                spec: SandboxSpec::from_state(s),
                origin: origin(file.sandboxes.contains_key(&key)),
            })
        }
        Query::Routes(sandbox) => {
            if let Some(key) = &sandbox
                && !merged.sandboxes.contains_key(key)
            {
                return Err(ApiError::not_found(format!("sandbox {key:?}")));
            }
            let routes: Vec<Value> = merged
                .sandboxes
                .values()
                .filter(|s| sandbox.as_ref().is_none_or(|k| *k == s.key))
                .flat_map(|s| {
                    let origin = origin(file.sandboxes.contains_key(&s.key));
                    s.routes.iter().map(move |(service, route)| {
                        let mut value = to_json(RouteSpec::from_state(service, route));
                        value["sandbox"] = json!(s.key);
                        value["origin"] = to_json(origin);
                        value
                    })
                })
                .collect();
            Value::Array(routes)
        }
        Query::Groups => to_json(
            merged
                .groups
                .values()
                .map(|g| Owned {
                    spec: GroupSpec::from_state(g),
                    origin: origin(file.groups.contains_key(&g.key)),
                })
                .collect::<Vec<_>>(),
        ),
        Query::Group(key) => {
            let g = merged
                .groups
                .get(&key)
                .ok_or_else(|| ApiError::not_found(format!("group {key:?}")))?;
            to_json(Owned {
                spec: GroupSpec::from_state(g),
                origin: origin(file.groups.contains_key(&key)),
            })
        }
    };
    Ok(value)
}

/// The counts a change leaves behind: the answer to every successful change.
pub(super) fn summary(merged: &DesiredState) -> Value {
    to_json(ChangeSummary {
        ok: true,
        services: merged.services.len(),
        sandboxes: merged.sandboxes.len(),
        groups: merged.groups.len(),
        routes: merged.route_count(),
    })
}

fn to_json(value: impl serde::Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn status(daemon: &Daemon) -> StatusAnswer {
    let written = daemon.sync.written.as_ref();
    let map = |map: &str, count: fn(&KernelState) -> usize, capacity: u32| MapStatus {
        map: map.to_owned(),
        entries: written.map_or(0, count),
        capacity,
    };
    let programs = HOOKS
        .iter()
        .map(|hook| ProgramStatus {
            hook: (*hook).to_owned(),
            state: if daemon.report.adopted.contains(hook) {
                HookState::Adopted
            } else if daemon.report.attached.contains(hook) {
                HookState::Attached
            } else if !programs::hooks(daemon.load).any(|needed| needed == *hook) {
                HookState::NotNeeded
            } else {
                HookState::Missing
            },
        })
        .collect();
    let router = daemon.router.as_ref().map(|router| RouterStatus {
        listen: daemon.file.router.listen.clone(),
        serving: true,
        connections: router.stats.connections.load(Relaxed),
        accept_loops: router.accept_loops,
        accepted: router
            .stats
            .accept_loops
            .iter()
            .map(|l| LoopAccepted {
                listen: l.listen,
                accepted: l.accepted.load(Relaxed),
            })
            .collect(),
    });
    let merged = &daemon.merged;
    StatusAnswer {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        config: daemon.opts.config.clone(),
        cgroup: daemon.placement.cgroup.clone(),
        bpffs: daemon.placement.bpffs.clone(),
        api_socket: daemon.placement.api_socket.clone(),
        state_file: daemon.placement.state_file.clone(),
        programs,
        programs_identity: daemon.report.identity.clone(),
        maps: vec![
            map("services", |s| s.services.len(), map_sizes::SERVICES),
            map("routes", |s| s.routes.len(), map_sizes::ROUTES),
            map("members", |s| s.members.len(), map_sizes::MEMBERS),
            map("endpoints", |s| s.endpoints.len(), map_sizes::ENDPOINTS),
        ]
        .into_iter()
        .chain(
            table_counts(daemon)
                .iter()
                .flat_map(TableCounts::occupancy)
                .map(|(map, entries, capacity)| MapStatus {
                    map: map.to_owned(),
                    entries,
                    capacity,
                }),
        )
        .collect(),
        router,
        counts: Counts {
            services: merged.services.len(),
            sandboxes: merged.sandboxes.len(),
            groups: merged.groups.len(),
            routes: merged.route_count(),
            member_pods: merged.member_count(),
            unresolved_member_pods: daemon.sync.unresolved_members,
            from_api: ApiCounts {
                services: daemon.api.services.len(),
                sandboxes: daemon.api.sandboxes.len(),
                groups: daemon.api.groups.len(),
            },
        },
        members: members(daemon),
        kubernetes: kubernetes(daemon),
    }
}

/// The Kubernetes source: connection, watches, objects seen, members found or not, and the
/// objects that could not be applied with the reason.
fn kubernetes(daemon: &Daemon) -> Option<KubernetesStatus> {
    let kube = daemon.kube.as_ref()?;
    let health = kube
        .source
        .health
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    let update = &kube.update;
    let resolved = update.members.iter().filter(|m| m.netns.is_some()).count();
    Some(KubernetesStatus {
        health,
        rejected: kube.rejected.clone(),
        issues: update.issues.clone(),
        members_resolved: resolved,
        members_unresolved: update.members.len() - resolved,
        members: update.members.clone(),
    })
}

/// Every member path: the namespace it named at the last poll (or the apply that added it)
/// against what the kernel's members map holds. A pod whose namespace was replaced shows as
/// `stale` while the kernel has not taken the new one (a failed apply), instead of looking
/// steered; one whose namespace is gone shows as `unresolved`, with the reason. Nothing is
/// resolved here: a status call never waits for a namespace.
fn members(daemon: &Daemon) -> Vec<MemberStatus> {
    let in_kernel = daemon.sync.kernel.maps.read_members().unwrap_or_default();
    let ids = daemon.sync.ids.as_ref();
    daemon
        .merged
        .members()
        .map(|(sandbox, path, _)| {
            let sandbox_id = ids.and_then(|ids| ids.sandbox_id(sandbox));
            let now = match daemon.sync.found.get(path) {
                Some(Ok(member)) => Ok(member.cookie),
                Some(Err(error)) => Err(error.clone()),
                None => Err("not resolved yet: the next poll resolves it".to_owned()),
            };
            let cookie = now.as_ref().ok().copied();
            let (state, error) = match now {
                Ok(cookie)
                    if sandbox_id.is_some() && in_kernel.get(&cookie) == sandbox_id.as_ref() =>
                {
                    (MemberState::Steered, None)
                }
                Ok(_) if daemon.sync.resolved.contains_key(path) => (MemberState::Stale, None),
                Ok(_) => (MemberState::NotApplied, None),
                Err(error) => (MemberState::Unresolved, Some(error)),
            };
            MemberStatus {
                sandbox: sandbox.to_owned(),
                path: path.to_path_buf(),
                state,
                cookie,
                kernel_cookie: daemon.sync.resolved.get(path).copied(),
                error,
            }
        })
        .collect()
}

/// (sandbox or group key, service name) of each route id, for labelling per-route counters.
fn route_names(daemon: &Daemon) -> HashMap<RouteKey, (String, String)> {
    let Some(ids) = daemon.sync.ids.as_ref() else {
        return HashMap::new();
    };
    let mut names = HashMap::new();
    for key in daemon.merged.routing_keys() {
        let Some(sandbox_id) = ids.sandbox_id(&key.key) else {
            continue;
        };
        for service_name in key.routes.keys() {
            let Some(service) = daemon.merged.services.get(service_name) else {
                continue;
            };
            let skey = service_key(service.address, service.protocol.ip_protocol());
            if let Some(service_id) = ids.service_id(&skey) {
                names.insert(
                    RouteKey {
                        service_id,
                        sandbox_id,
                    },
                    (key.key.clone(), service_name.clone()),
                );
            }
        }
    }
    names
}

/// What answering `stats` or refreshing the metrics reads from the kernel's counter maps (a
/// walk of up to one entry per route), done on the blocking pool while the control loop goes
/// on; the rest is taken from the daemon on the loop, at once.
pub(super) type OffLoop = Box<dyn FnOnce() -> Result<Value, ApiError> + Send>;

/// The work of `query` that reads counter maps, to run off the loop; None for the others.
pub(super) fn off_loop(daemon: &Daemon, query: &Query) -> Option<OffLoop> {
    match query {
        Query::Stats => Some(stats(daemon)),
        Query::RefreshMetrics => Some(refresh_metrics(daemon)),
        _ => None,
    }
}

fn stats(daemon: &Daemon) -> OffLoop {
    let counters = daemon.sync.kernel.counters.clone();
    let tables = table_counts(daemon);
    let names = route_names(daemon);
    let router = daemon.router.as_ref().map(|router| {
        router
            .stats
            .snapshot()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect()
    });
    let resets = daemon.sync.resets.recent();
    let reset_unavailable = daemon.sync.resets.unavailable().map(str::to_owned);
    Box::new(move || {
        let kernel = match counters.counters() {
            Ok(events) => KernelCounters::Counters(
                events
                    .into_iter()
                    .chain(tables.iter().flat_map(TableCounts::counters))
                    .map(|(name, value)| (name.to_owned(), value))
                    .collect(),
            ),
            Err(err) => KernelCounters::Error {
                error: crate::error_chain(&err),
            },
        };
        let routes = counters
            .route_counters()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(key, steered)| {
                let (sandbox, service) = names.get(&key)?;
                Some(RouteStats {
                    sandbox: sandbox.clone(),
                    service: service.clone(),
                    steered,
                })
            })
            .collect();
        Ok(to_json(StatsAnswer {
            kernel,
            routes,
            router,
            resets,
            reset_unavailable,
        }))
    })
}

/// Held by the refresh in progress. Refreshes mirror kernel totals into counters by adding the
/// difference, so two at once would add it twice; and a flood of scrapes must not pile walks up
/// on the blocking pool: a refresh that finds one in progress leaves the work to it.
static REFRESHING: Mutex<()> = Mutex::new(());

fn refresh_metrics(daemon: &Daemon) -> OffLoop {
    let metrics = daemon.metrics.clone();
    let tables = table_counts(daemon);
    for (map, entries, capacity) in tables.iter().flat_map(TableCounts::occupancy) {
        metrics.map(map, entries, capacity);
    }
    if let Some(written) = &daemon.sync.written {
        metrics.map("services", written.services.len(), map_sizes::SERVICES);
        metrics.map("routes", written.routes.len(), map_sizes::ROUTES);
        metrics.map("members", written.members.len(), map_sizes::MEMBERS);
        metrics.map("endpoints", written.endpoints.len(), map_sizes::ENDPOINTS);
    }
    let counters = daemon.sync.kernel.counters.clone();
    let names = route_names(daemon);
    Box::new(move || {
        let _turn = match REFRESHING.try_lock() {
            Ok(turn) => turn,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(Value::Null),
        };
        if let Ok(events) = counters.counters() {
            for (name, value) in events {
                metrics.kernel_event(name, value);
            }
        }
        for (name, value) in tables.iter().flat_map(TableCounts::counters) {
            metrics.kernel_event(name, value);
        }
        for (key, steered) in counters.route_counters().unwrap_or_default() {
            if let Some((sandbox, service)) = names.get(&key) {
                metrics.route_steered(sandbox, service, steered);
            }
        }
        Ok(Value::Null)
    })
}

fn table_counts(daemon: &Daemon) -> Option<TableCounts> {
    daemon.tables.as_ref()?.counts()
}
