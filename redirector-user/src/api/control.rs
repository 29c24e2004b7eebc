//! What API changes mean for the desired state, as pure functions: ownership, all-or-nothing
//! apply, merging with the config file, validation.
//!
//! The rule between the two sources: an object belongs to the source that created it. Objects
//! from the config file are read-only through the API (change the file instead); a name cannot
//! exist in both. Whatever is applied is the merge of both sources, validated as a whole.
use http::StatusCode;

use super::types::{ApiError, GroupSpec, RouteSpec, SandboxSpec, ServiceSpec, StateSpec};
use crate::state::{DesiredState, Issue};

/// A change requested through the API.
#[derive(Debug, Clone)]
pub enum Mutation {
    PutService(ServiceSpec),
    DeleteService(String),
    PutSandbox(SandboxSpec),
    DeleteSandbox(String),
    PutRoute { sandbox: String, route: RouteSpec },
    DeleteRoute { sandbox: String, service: String },
    PutGroup(GroupSpec),
    DeleteGroup(String),
    Apply { state: StateSpec, prune: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service,
    Sandbox,
    Group,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Sandbox => "sandbox",
            Kind::Group => "group",
        }
    }

    fn contains(self, state: &DesiredState, name: &str) -> bool {
        match self {
            Kind::Service => state.services.contains_key(name),
            Kind::Sandbox => state.sandboxes.contains_key(name),
            Kind::Group => state.groups.contains_key(name),
        }
    }
}

fn file_owned(kind: Kind, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "file_owned",
        format!(
            "{} {name:?} comes from the config file and is read-only through the API; edit the file",
            kind.noun()
        ),
    )
}

/// Checks that `name` may be created or replaced through the API.
fn writable(file: &DesiredState, kind: Kind, name: &str) -> Result<(), ApiError> {
    if kind.contains(file, name) {
        return Err(file_owned(kind, name));
    }
    Ok(())
}

/// Checks that `name` exists and belongs to the API.
fn owned(file: &DesiredState, api: &DesiredState, kind: Kind, name: &str) -> Result<(), ApiError> {
    if kind.contains(api, name) {
        Ok(())
    } else if kind.contains(file, name) {
        Err(file_owned(kind, name))
    } else {
        Err(ApiError::not_found(format!("{} {name:?}", kind.noun())))
    }
}

fn malformed(issues: Vec<Issue>) -> ApiError {
    let mut err = ApiError::invalid(issues);
    err.status = StatusCode::BAD_REQUEST;
    err.code = "malformed";
    err
}

/// The API-owned state after `mutation`, or why it cannot happen. Validation of the merged
/// result is [`merge`]'s job.
pub fn plan(
    file: &DesiredState,
    api: &DesiredState,
    mutation: Mutation,
) -> Result<DesiredState, ApiError> {
    let mut next = api.clone();
    match mutation {
        Mutation::PutService(spec) => {
            writable(file, Kind::Service, &spec.name)?;
            let mut issues = Vec::new();
            let service = spec
                .to_state(&mut issues)
                .ok_or_else(|| malformed(issues))?;
            next.services.insert(service.name.clone(), service);
        }
        Mutation::DeleteService(name) => {
            owned(file, api, Kind::Service, &name)?;
            next.services.remove(&name);
        }
        Mutation::PutSandbox(spec) => {
            writable(file, Kind::Sandbox, &spec.key)?;
            let mut issues = Vec::new();
            let sandbox = spec.to_state(&mut issues);
            if !issues.is_empty() {
                return Err(malformed(issues));
            }
            next.sandboxes.insert(sandbox.key.clone(), sandbox);
        }
        Mutation::DeleteSandbox(key) => {
            owned(file, api, Kind::Sandbox, &key)?;
            next.sandboxes.remove(&key);
        }
        Mutation::PutRoute { sandbox, route } => {
            owned(file, api, Kind::Sandbox, &sandbox)?;
            let mut issues = Vec::new();
            let parsed = route
                .to_state(&sandbox, &mut issues)
                .ok_or_else(|| malformed(issues))?;
            if let Some(s) = next.sandboxes.get_mut(&sandbox) {
                s.routes.insert(route.service, parsed);
            }
        }
        Mutation::DeleteRoute { sandbox, service } => {
            owned(file, api, Kind::Sandbox, &sandbox)?;
            let removed = next
                .sandboxes
                .get_mut(&sandbox)
                .and_then(|s| s.routes.remove(&service));
            if removed.is_none() {
                return Err(ApiError::not_found(format!(
                    "route of sandbox {sandbox:?} for service {service:?}"
                )));
            }
        }
        Mutation::PutGroup(spec) => {
            writable(file, Kind::Group, &spec.key)?;
            next.groups.insert(spec.key.clone(), spec.to_state());
        }
        Mutation::DeleteGroup(key) => {
            owned(file, api, Kind::Group, &key)?;
            next.groups.remove(&key);
        }
        Mutation::Apply { state, prune } => {
            let incoming = state.to_state().map_err(malformed)?;
            for name in incoming.services.keys() {
                writable(file, Kind::Service, name)?;
            }
            for key in incoming.sandboxes.keys() {
                writable(file, Kind::Sandbox, key)?;
            }
            for key in incoming.groups.keys() {
                writable(file, Kind::Group, key)?;
            }
            if prune {
                next = incoming;
            } else {
                next.services.extend(incoming.services);
                next.sandboxes.extend(incoming.sandboxes);
                next.groups.extend(incoming.groups);
            }
        }
    }
    Ok(next)
}

/// The state the kernel gets: both sources together, validated as a whole.
pub fn merge(file: &DesiredState, api: &DesiredState) -> Result<DesiredState, ApiError> {
    let mut merged = file.clone();
    let mut clashes = Vec::new();
    for (name, service) in &api.services {
        if merged
            .services
            .insert(name.clone(), service.clone())
            .is_some()
        {
            clashes.push(clash(Kind::Service, name));
        }
    }
    for (key, sandbox) in &api.sandboxes {
        if merged
            .sandboxes
            .insert(key.clone(), sandbox.clone())
            .is_some()
        {
            clashes.push(clash(Kind::Sandbox, key));
        }
    }
    for (key, group) in &api.groups {
        if merged.groups.insert(key.clone(), group.clone()).is_some() {
            clashes.push(clash(Kind::Group, key));
        }
    }
    if !clashes.is_empty() {
        let mut err = ApiError::invalid(clashes);
        err.status = StatusCode::CONFLICT;
        err.code = "conflict";
        return Err(err);
    }
    merged.validate().map_err(ApiError::invalid)?;
    Ok(merged)
}

fn clash(kind: Kind, name: &str) -> Issue {
    Issue {
        field: format!("{} {name:?}", kind.noun()),
        message: "defined both in the config file and through the API".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config, state::ForkErrorPolicy};

    fn file() -> DesiredState {
        config::parse(
            r#"
[[service]]
name = "a"
address = "10.96.0.1:80"
protocol = "http"

[[sandbox]]
key = "file-box"
routes = [{ service = "a", fork = "10.0.0.9:80" }]
"#,
        )
        .expect("valid")
        .state
    }

    fn sandbox(key: &str, service: &str, fork: &str) -> SandboxSpec {
        SandboxSpec {
            key: key.into(),
            members: vec![],
            routes: vec![RouteSpec::new(service, [fork], ForkErrorPolicy::Error)],
            inject_key: false,
        }
    }

    fn apply(
        file: &DesiredState,
        api: &DesiredState,
        m: Mutation,
    ) -> Result<DesiredState, ApiError> {
        let next = plan(file, api, m)?;
        merge(file, &next)?;
        Ok(next)
    }

    #[test]
    fn create_replace_delete_a_sandbox() {
        let file = file();
        let api = apply(
            &file,
            &DesiredState::default(),
            Mutation::PutSandbox(sandbox("pr-1", "a", "10.0.0.1:80")),
        )
        .expect("created");
        assert!(api.sandboxes.contains_key("pr-1"));
        let api = apply(
            &file,
            &api,
            Mutation::PutRoute {
                sandbox: "pr-1".into(),
                route: RouteSpec::new(
                    "a",
                    ["10.0.0.3:80", "10.0.0.2:80"],
                    ForkErrorPolicy::Baseline,
                ),
            },
        )
        .expect("route replaced");
        assert_eq!(
            api.sandboxes["pr-1"].routes["a"].forks,
            [
                "10.0.0.2:80".parse::<std::net::SocketAddr>().unwrap(),
                "10.0.0.3:80".parse().unwrap()
            ]
        );
        let api = apply(&file, &api, Mutation::DeleteSandbox("pr-1".into())).expect("deleted");
        assert!(api.sandboxes.is_empty());
        let err = apply(&file, &api, Mutation::DeleteSandbox("pr-1".into())).unwrap_err();
        assert_eq!(err.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn file_objects_are_read_only() {
        let file = file();
        let api = DesiredState::default();
        for m in [
            Mutation::PutSandbox(sandbox("file-box", "a", "10.0.0.1:80")),
            Mutation::DeleteSandbox("file-box".into()),
            Mutation::DeleteService("a".into()),
            Mutation::DeleteRoute {
                sandbox: "file-box".into(),
                service: "a".into(),
            },
        ] {
            let err = apply(&file, &api, m).unwrap_err();
            assert_eq!(
                (err.status, err.code),
                (StatusCode::CONFLICT, "file_owned"),
                "{err}"
            );
        }
    }

    #[test]
    fn invalid_results_are_refused_with_the_field() {
        let file = file();
        let err = apply(
            &file,
            &DesiredState::default(),
            Mutation::PutSandbox(sandbox("pr-1", "zzz", "10.0.0.1:80")),
        )
        .unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(err.issues[0].field, "sandbox \"pr-1\" route \"zzz\"");
        let err = apply(
            &file,
            &DesiredState::default(),
            Mutation::PutSandbox(sandbox("bad key", "a", "10.0.0.1:80")),
        )
        .unwrap_err();
        assert_eq!(err.issues[0].field, "sandbox \"bad key\" key");
        let err = apply(
            &file,
            &DesiredState::default(),
            Mutation::PutSandbox(sandbox("pr-1", "a", "nope")),
        )
        .unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::BAD_REQUEST, "malformed")
        );
    }

    #[test]
    fn apply_is_all_or_nothing_and_can_prune() {
        let file = file();
        let api = apply(
            &file,
            &DesiredState::default(),
            Mutation::PutSandbox(sandbox("old", "a", "10.0.0.1:80")),
        )
        .expect("created");
        let good = StateSpec {
            sandboxes: vec![sandbox("pr-2", "a", "10.0.0.2:80")],
            ..StateSpec::default()
        };
        let mut bad = good.clone();
        bad.sandboxes
            .push(sandbox("pr-3", "missing", "10.0.0.3:80"));
        assert!(
            apply(
                &file,
                &api,
                Mutation::Apply {
                    state: bad,
                    prune: false
                }
            )
            .is_err()
        );
        let merged = apply(
            &file,
            &api,
            Mutation::Apply {
                state: good.clone(),
                prune: false,
            },
        )
        .unwrap();
        assert_eq!(merged.sandboxes.keys().collect::<Vec<_>>(), ["old", "pr-2"]);
        let pruned = apply(
            &file,
            &api,
            Mutation::Apply {
                state: good,
                prune: true,
            },
        )
        .unwrap();
        assert_eq!(pruned.sandboxes.keys().collect::<Vec<_>>(), ["pr-2"]);
    }

    #[test]
    fn group_conflicts_are_refused() {
        let file = file();
        let mut api = DesiredState::default();
        for (key, fork) in [("pr-1", "10.0.0.1:80"), ("pr-2", "10.0.0.2:80")] {
            api = apply(&file, &api, Mutation::PutSandbox(sandbox(key, "a", fork))).unwrap();
        }
        let err = apply(
            &file,
            &api,
            Mutation::PutGroup(GroupSpec {
                key: "g".into(),
                sandboxes: vec!["pr-1".into(), "pr-2".into()],
                members: vec![],
            }),
        )
        .unwrap_err();
        assert!(err.message.contains("both fork service \"a\""), "{err}");
    }

    #[test]
    fn a_name_in_both_sources_is_a_conflict() {
        let file = file();
        let mut api = DesiredState::default();
        api.sandboxes
            .insert("file-box".into(), file.sandboxes["file-box"].clone());
        let err = merge(&file, &api).unwrap_err();
        assert_eq!((err.status, err.code), (StatusCode::CONFLICT, "conflict"));
    }
}
