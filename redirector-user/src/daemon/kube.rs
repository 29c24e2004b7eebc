//! The Kubernetes source's part of the desired state, laid over the file and API objects.
use std::{collections::BTreeSet, net::SocketAddr, sync::Arc};

use tracing::{info, warn};

use crate::{
    k8s::source::{Source, Update},
    state::DesiredState,
};

/// The running Kubernetes source and what it last published.
pub struct KubeSide {
    pub source: Source,
    pub update: Arc<Update>,
    /// The cluster's objects left out because they clash with file or API objects (or break
    /// a rule together with them), each with the reason; empty while all are applied.
    pub rejected: Vec<String>,
}

impl KubeSide {
    pub fn new(source: Source, update: Arc<Update>) -> KubeSide {
        KubeSide {
            source,
            update,
            rejected: Vec::new(),
        }
    }

    /// `base` (file and API objects) with the cluster's objects added. An object of the
    /// cluster that clashes with one of `base` (same name, key or service address) is left out
    /// and reported, never merged silently, and never costs the file's or the API's objects.
    pub fn overlay(&mut self, base: DesiredState) -> DesiredState {
        let (merged, rejected) = overlay(base, &self.update.state);
        if rejected != self.rejected {
            if rejected.is_empty() {
                info!("the cluster's objects fit with the config file and the API again");
            } else {
                warn!(?rejected, "cluster objects left out");
            }
        }
        self.rejected = rejected;
        merged
    }
}

/// `base` with `cluster`'s objects that fit, and what was left out, with the reason.
fn overlay(base: DesiredState, cluster: &DesiredState) -> (DesiredState, Vec<String>) {
    let mut merged = base.clone();
    let mut rejected = Vec::new();
    let taken: BTreeSet<(SocketAddr, u8)> = base
        .services
        .values()
        .map(|s| (canonical(s.address), s.protocol.ip_protocol()))
        .collect();
    let mut skipped_services = BTreeSet::new();
    for (name, service) in &cluster.services {
        if base.services.contains_key(name) {
            rejected.push(format!(
                "service {name:?}: the name is taken by the config file or the API"
            ));
        } else if taken.contains(&(canonical(service.address), service.protocol.ip_protocol())) {
            rejected.push(format!(
                "service {name:?}: {} is already a service of the config file or the API",
                service.address
            ));
        } else {
            merged.services.insert(name.clone(), service.clone());
            continue;
        }
        skipped_services.insert(name.clone());
    }
    let mut skipped_keys = BTreeSet::new();
    for (key, sandbox) in &cluster.sandboxes {
        if base.sandboxes.contains_key(key) || base.groups.contains_key(key) {
            rejected.push(format!(
                "sandbox {key:?}: the key is taken by the config file or the API"
            ));
        } else if let Some(service) = sandbox
            .routes
            .keys()
            .find(|s| skipped_services.contains(*s))
        {
            rejected.push(format!(
                "sandbox {key:?}: its service {service:?} is left out"
            ));
        } else {
            merged.sandboxes.insert(key.clone(), sandbox.clone());
            continue;
        }
        skipped_keys.insert(key.clone());
    }
    for (key, group) in &cluster.groups {
        if base.sandboxes.contains_key(key) || base.groups.contains_key(key) {
            rejected.push(format!(
                "group {key:?}: the key is taken by the config file or the API"
            ));
        } else if let Some(sandbox) = group.sandboxes.iter().find(|s| skipped_keys.contains(*s)) {
            rejected.push(format!(
                "group {key:?}: its sandbox {sandbox:?} is left out"
            ));
        } else {
            merged.groups.insert(key.clone(), group.clone());
        }
    }
    match merged.validate() {
        Ok(()) => (merged, rejected),
        Err(issues) => {
            // Together they break a rule no single object does (a member in two keys...):
            // keep what runs without the cluster's objects rather than guess.
            rejected.extend(issues.iter().map(|i| format!("{}: {}", i.field, i.message)));
            rejected
                .push("none of the cluster's objects is applied until this is fixed".to_owned());
            (base, rejected)
        }
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{ForkErrorPolicy, Protocol, Route, Sandbox, Service};

    fn state(services: &[(&str, &str)], sandboxes: &[(&str, &str, &str)]) -> DesiredState {
        let mut s = DesiredState::default();
        for (name, addr) in services {
            s.services.insert(
                (*name).into(),
                Service {
                    name: (*name).into(),
                    address: addr.parse().unwrap(),
                    protocol: Protocol::Tcp,
                },
            );
        }
        for (key, service, fork) in sandboxes {
            let routes = BTreeMap::from([(
                (*service).to_owned(),
                Route {
                    forks: vec![fork.parse().unwrap()],
                    on_fork_error: ForkErrorPolicy::Error,
                    reset_on_change: false,
                },
            )]);
            s.sandboxes.insert(
                (*key).into(),
                Sandbox {
                    key: (*key).into(),
                    members: Vec::new(),
                    routes,
                    inject_key: false,
                },
            );
        }
        s
    }

    #[test]
    fn objects_that_fit_are_merged() {
        let base = state(
            &[("db", "10.96.0.5:5432")],
            &[("pr-1", "db", "10.0.0.5:5432")],
        );
        let cluster = state(
            &[("k8s:shop/a:tcp", "10.96.0.10:80")],
            &[("pr-2", "k8s:shop/a:tcp", "10.0.0.9:80")],
        );
        let (merged, rejected) = overlay(base, &cluster);
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(merged.sandboxes.len(), 2);
        assert_eq!(merged.services.len(), 2);
    }

    #[test]
    fn a_clash_leaves_out_only_the_clusters_object() {
        let base = state(
            &[("db", "10.96.0.5:5432")],
            &[("pr-1", "db", "10.0.0.5:5432")],
        );
        let cluster = state(
            &[
                ("k8s:shop/a:tcp", "10.96.0.10:80"),
                ("k8s:shop/db:tcp", "10.96.0.5:5432"),
            ],
            &[
                ("pr-1", "k8s:shop/a:tcp", "10.0.0.9:80"),
                ("pr-2", "k8s:shop/a:tcp", "10.0.0.9:80"),
                ("pr-3", "k8s:shop/db:tcp", "10.0.0.7:5432"),
            ],
        );
        let (merged, rejected) = overlay(base.clone(), &cluster);
        assert_eq!(
            merged.sandboxes["pr-1"], base.sandboxes["pr-1"],
            "the file's pr-1 stays"
        );
        assert!(
            merged.sandboxes.contains_key("pr-2"),
            "the rest of the cluster's objects apply"
        );
        assert!(!merged.sandboxes.contains_key("pr-3"));
        assert!(!merged.services.contains_key("k8s:shop/db:tcp"));
        let text = rejected.join("\n");
        assert!(
            text.contains("sandbox \"pr-1\": the key is taken"),
            "{text}"
        );
        assert!(
            text.contains("10.96.0.5:5432 is already a service"),
            "{text}"
        );
        assert!(text.contains("sandbox \"pr-3\": its service"), "{text}");
    }
}
