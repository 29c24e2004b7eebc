//! The API's JSON objects and errors, and their conversion to and from the desired state.
//!
//! Objects are flat and list-shaped (routes are a list, not a map) so they read the same in
//! `redirector apply -f` files, API bodies and the daemon's state file.
use std::{net::SocketAddr, path::PathBuf};

use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::state::{
    DesiredState, ForkErrorPolicy, Group, Issue, Protocol, Route, Sandbox, Service,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub service: String,
    pub fork: String,
    #[serde(default)]
    pub on_fork_error: ForkErrorPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    pub key: String,
    #[serde(default)]
    pub members: Vec<PathBuf>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub key: String,
    pub sandboxes: Vec<String>,
    #[serde(default)]
    pub members: Vec<PathBuf>,
}

/// A whole state: the body of `POST /v1/apply`, and the daemon's state file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub sandboxes: Vec<SandboxSpec>,
    #[serde(default)]
    pub groups: Vec<GroupSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    #[serde(flatten)]
    pub state: StateSpec,
    /// Also delete the API-created objects the request does not list.
    #[serde(default)]
    pub prune: bool,
}

/// Where an object comes from: the config file (read-only through the API) or the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    File,
    Api,
}

/// An object as listed by the API, with its origin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Owned<T> {
    #[serde(flatten)]
    pub spec: T,
    pub origin: Origin,
}

/// An API error: HTTP status, a stable code, a sentence, and the fields at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub issues: Vec<Issue>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            issues: Vec::new(),
        }
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{} not found", what.into()),
        )
    }

    pub fn invalid(issues: Vec<Issue>) -> ApiError {
        let message = match issues.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            many => format!("{} problems; nothing was changed", many.len()),
        };
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid",
            message,
            issues,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "code": self.code, "message": self.message, "issues": self.issues }
        })
    }
}

fn issue(field: String, message: impl Into<String>) -> Issue {
    Issue {
        field,
        message: message.into(),
    }
}

fn parse_addr(text: &str, field: String, issues: &mut Vec<Issue>) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() == 0 => {
            issues.push(issue(field, "port must not be 0"));
            None
        }
        Ok(addr) if addr.ip().is_unspecified() => {
            issues.push(issue(field, format!("{addr} is an unspecified address")));
            None
        }
        Ok(addr) => Some(addr),
        Err(_) => {
            issues.push(issue(
                field,
                format!("{text:?} is not an IP address and port (e.g. 10.96.0.10:8080 or [fd00::10]:8080)"),
            ));
            None
        }
    }
}

impl ServiceSpec {
    pub fn to_state(&self, issues: &mut Vec<Issue>) -> Option<Service> {
        if self.name.is_empty() {
            issues.push(issue("service name".into(), "must not be empty"));
        }
        let address = parse_addr(
            &self.address,
            format!("service {:?} address", self.name),
            issues,
        )?;
        Some(Service {
            name: self.name.clone(),
            address,
            protocol: self.protocol,
        })
    }

    pub fn from_state(service: &Service) -> ServiceSpec {
        ServiceSpec {
            name: service.name.clone(),
            address: service.address.to_string(),
            protocol: service.protocol,
        }
    }
}

impl RouteSpec {
    pub fn to_state(&self, sandbox: &str, issues: &mut Vec<Issue>) -> Option<Route> {
        let field = format!("sandbox {sandbox:?} route {:?} fork", self.service);
        Some(Route {
            fork: parse_addr(&self.fork, field, issues)?,
            on_fork_error: self.on_fork_error,
        })
    }

    pub fn from_state(service: &str, route: &Route) -> RouteSpec {
        RouteSpec {
            service: service.to_owned(),
            fork: route.fork.to_string(),
            on_fork_error: route.on_fork_error,
        }
    }
}

impl SandboxSpec {
    pub fn to_state(&self, issues: &mut Vec<Issue>) -> Sandbox {
        let mut routes = std::collections::BTreeMap::new();
        for route in &self.routes {
            if routes.contains_key(&route.service) {
                issues.push(issue(
                    format!("sandbox {:?} route {:?}", self.key, route.service),
                    "listed twice",
                ));
            } else if let Some(r) = route.to_state(&self.key, issues) {
                routes.insert(route.service.clone(), r);
            }
        }
        for member in &self.members {
            if !member.is_absolute() {
                issues.push(issue(
                    format!("sandbox {:?} members", self.key),
                    format!(
                        "{} is not an absolute network-namespace path",
                        member.display()
                    ),
                ));
            }
        }
        Sandbox {
            key: self.key.clone(),
            members: self.members.clone(),
            routes,
        }
    }

    pub fn from_state(sandbox: &Sandbox) -> SandboxSpec {
        SandboxSpec {
            key: sandbox.key.clone(),
            members: sandbox.members.clone(),
            routes: sandbox
                .routes
                .iter()
                .map(|(service, route)| RouteSpec::from_state(service, route))
                .collect(),
        }
    }
}

impl GroupSpec {
    pub fn to_state(&self) -> Group {
        Group {
            key: self.key.clone(),
            sandboxes: self.sandboxes.clone(),
            members: self.members.clone(),
        }
    }

    pub fn from_state(group: &Group) -> GroupSpec {
        GroupSpec {
            key: group.key.clone(),
            sandboxes: group.sandboxes.clone(),
            members: group.members.clone(),
        }
    }
}

impl StateSpec {
    /// The desired state this spec describes; every malformed field is reported.
    pub fn to_state(&self) -> Result<DesiredState, Vec<Issue>> {
        let mut issues = Vec::new();
        let mut state = DesiredState::default();
        for spec in &self.services {
            if let Some(service) = spec.to_state(&mut issues)
                && state
                    .services
                    .insert(service.name.clone(), service)
                    .is_some()
            {
                issues.push(issue(format!("service {:?}", spec.name), "listed twice"));
            }
        }
        for spec in &self.sandboxes {
            let sandbox = spec.to_state(&mut issues);
            if state
                .sandboxes
                .insert(sandbox.key.clone(), sandbox)
                .is_some()
            {
                issues.push(issue(format!("sandbox {:?}", spec.key), "listed twice"));
            }
        }
        for spec in &self.groups {
            if state
                .groups
                .insert(spec.key.clone(), spec.to_state())
                .is_some()
            {
                issues.push(issue(format!("group {:?}", spec.key), "listed twice"));
            }
        }
        if issues.is_empty() {
            Ok(state)
        } else {
            Err(issues)
        }
    }

    pub fn from_state(state: &DesiredState) -> StateSpec {
        StateSpec {
            services: state
                .services
                .values()
                .map(ServiceSpec::from_state)
                .collect(),
            sandboxes: state
                .sandboxes
                .values()
                .map(SandboxSpec::from_state)
                .collect(),
            groups: state.groups.values().map(GroupSpec::from_state).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_through_the_state() {
        let spec: StateSpec = serde_json::from_value(serde_json::json!({
            "services": [{"name": "a", "address": "10.96.0.1:80", "protocol": "http"}],
            "sandboxes": [{"key": "pr-1", "members": ["/run/netns/x"],
                           "routes": [{"service": "a", "fork": "10.0.0.1:80", "on_fork_error": "baseline"}]}],
            "groups": [{"key": "g", "sandboxes": ["pr-1"]}]
        }))
        .expect("valid json");
        let state = spec.to_state().expect("valid");
        assert_eq!(state.validate(), Ok(()));
        assert_eq!(StateSpec::from_state(&state), spec);
    }

    #[test]
    fn malformed_fields_are_named() {
        let spec = StateSpec {
            services: vec![ServiceSpec {
                name: "a".into(),
                address: "nope".into(),
                protocol: Protocol::Tcp,
            }],
            sandboxes: vec![SandboxSpec {
                key: "k".into(),
                members: vec!["relative".into()],
                routes: vec![RouteSpec {
                    service: "a".into(),
                    fork: "10.0.0.1:0".into(),
                    on_fork_error: ForkErrorPolicy::Error,
                }],
            }],
            groups: vec![],
        };
        let fields: Vec<String> = spec
            .to_state()
            .unwrap_err()
            .into_iter()
            .map(|i| i.field)
            .collect();
        assert_eq!(
            fields,
            [
                "service \"a\" address",
                "sandbox \"k\" route \"a\" fork",
                "sandbox \"k\" members"
            ]
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<SandboxSpec>(r#"{"key": "k", "rutes": []}"#).unwrap_err();
        assert!(err.to_string().contains("rutes"), "{err}");
    }

    #[test]
    fn error_body_shape() {
        let err = ApiError::invalid(vec![issue("sandbox \"k\" key".into(), "bad")]);
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            err.body(),
            serde_json::json!({"error": {"code": "invalid", "message": "sandbox \"k\" key: bad",
                "issues": [{"field": "sandbox \"k\" key", "message": "bad"}]}})
        );
    }
}
