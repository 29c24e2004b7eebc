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

/// A route. Its fork's endpoints are `forks`; a request may give a single `fork` instead (the
/// form from before routes took several), never both. Answers always carry `forks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub service: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forks: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<String>,
    #[serde(default)]
    pub on_fork_error: ForkErrorPolicy,
    /// Reset the member sockets this route steered when it changes, so that pooled connections
    /// follow it (TCP services only). Off when absent; left out when off, so that state files
    /// stay readable by daemons from before it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset_on_change: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    pub key: String,
    #[serde(default)]
    pub members: Vec<PathBuf>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Members' requests that carry no key are routed as this sandbox's, with the key added.
    /// Off when absent (clients and state files from before it); left out when off, so that
    /// state files stay readable by daemons from before it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inject_key: bool,
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
    /// A route to the endpoints `forks`, as the CLI and other clients build one.
    pub fn new(
        service: impl Into<String>,
        forks: impl IntoIterator<Item = impl Into<String>>,
        on_fork_error: ForkErrorPolicy,
    ) -> RouteSpec {
        RouteSpec {
            service: service.into(),
            forks: forks.into_iter().map(Into::into).collect(),
            fork: None,
            on_fork_error,
            reset_on_change: false,
        }
    }

    /// This route with `reset_on_change` set to `on`.
    pub fn with_reset_on_change(self, on: bool) -> RouteSpec {
        RouteSpec {
            reset_on_change: on,
            ..self
        }
    }

    pub fn to_state(&self, sandbox: &str, issues: &mut Vec<Issue>) -> Option<Route> {
        let field = format!("sandbox {sandbox:?} route {:?}", self.service);
        let (texts, name): (Vec<&String>, &str) = match (&self.fork, self.forks.as_slice()) {
            (Some(_), [_, ..]) => {
                issues.push(issue(field, "give either `fork` or `forks`, not both"));
                return None;
            }
            (None, []) => {
                issues.push(issue(
                    field,
                    "a route needs its fork's endpoints: `forks` (or a single `fork`)",
                ));
                return None;
            }
            (Some(one), []) => (vec![one], "fork"),
            (None, many) => (many.iter().collect(), "forks"),
        };
        let before = issues.len();
        let mut forks = Vec::with_capacity(texts.len());
        for (i, text) in texts.into_iter().enumerate() {
            let field = if name == "fork" {
                format!("{field} fork")
            } else {
                format!("{field} forks[{i}]")
            };
            let Some(fork) = parse_addr(text, field.clone(), issues) else {
                continue;
            };
            if forks.contains(&fork) {
                issues.push(issue(field, format!("{fork} is listed twice")));
                continue;
            }
            forks.push(fork);
        }
        if issues.len() > before {
            return None;
        }
        Route::new(forks, self.on_fork_error).map(|route| Route {
            reset_on_change: self.reset_on_change,
            ..route
        })
    }

    pub fn from_state(service: &str, route: &Route) -> RouteSpec {
        RouteSpec::new(
            service,
            route.forks.iter().map(SocketAddr::to_string),
            route.on_fork_error,
        )
        .with_reset_on_change(route.reset_on_change)
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
            inject_key: self.inject_key,
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
            inject_key: sandbox.inject_key,
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
                           "routes": [{"service": "a", "forks": ["10.0.0.1:80", "10.0.0.2:80"],
                                       "on_fork_error": "baseline"}]}],
            "groups": [{"key": "g", "sandboxes": ["pr-1"]}]
        }))
        .expect("valid json");
        let state = spec.to_state().expect("valid");
        assert_eq!(state.validate(), Ok(()));
        assert_eq!(StateSpec::from_state(&state), spec);
    }

    fn route(value: serde_json::Value) -> Result<Route, Vec<Issue>> {
        let spec: RouteSpec = serde_json::from_value(value).expect("valid json");
        let mut issues = Vec::new();
        spec.to_state("k", &mut issues).ok_or(issues)
    }

    #[test]
    fn a_single_fork_is_a_set_of_one_and_answers_carry_forks() {
        let one = route(serde_json::json!({"service": "a", "fork": "10.0.0.1:80"})).unwrap();
        assert_eq!(one.forks, ["10.0.0.1:80".parse().unwrap()]);
        assert_eq!(
            one,
            route(serde_json::json!({"service": "a", "forks": ["10.0.0.1:80"]})).unwrap()
        );
        // Sorted, whatever the order given.
        let many = route(serde_json::json!({"service": "a",
            "forks": ["10.0.0.3:80", "10.0.0.1:80", "10.0.0.2:80"]}))
        .unwrap();
        assert_eq!(
            serde_json::to_value(RouteSpec::from_state("a", &many)).unwrap(),
            serde_json::json!({"service": "a", "on_fork_error": "error",
                "forks": ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]})
        );
    }

    #[test]
    fn bad_fork_sets_are_named() {
        let cases = [
            (
                serde_json::json!({"service": "a", "fork": "10.0.0.1:80", "forks": ["10.0.0.2:80"]}),
                vec![(
                    "sandbox \"k\" route \"a\"",
                    "give either `fork` or `forks`, not both",
                )],
            ),
            (
                serde_json::json!({"service": "a"}),
                vec![(
                    "sandbox \"k\" route \"a\"",
                    "a route needs its fork's endpoints: `forks` (or a single `fork`)",
                )],
            ),
            (
                serde_json::json!({"service": "a", "forks": []}),
                vec![(
                    "sandbox \"k\" route \"a\"",
                    "a route needs its fork's endpoints: `forks` (or a single `fork`)",
                )],
            ),
            (
                serde_json::json!({"service": "a", "forks": ["10.0.0.1:80", "nope", "10.0.0.1:80"]}),
                vec![
                    (
                        "sandbox \"k\" route \"a\" forks[1]",
                        "\"nope\" is not an IP address and port (e.g. 10.96.0.10:8080 or [fd00::10]:8080)",
                    ),
                    (
                        "sandbox \"k\" route \"a\" forks[2]",
                        "10.0.0.1:80 is listed twice",
                    ),
                ],
            ),
        ];
        for (value, want) in cases {
            let issues = route(value.clone()).unwrap_err();
            let got: Vec<(&str, &str)> = issues
                .iter()
                .map(|i| (i.field.as_str(), i.message.as_str()))
                .collect();
            assert_eq!(got, want, "{value}");
        }
    }

    #[test]
    fn endpoint_families_are_checked_against_the_service() {
        let spec: StateSpec = serde_json::from_value(serde_json::json!({
            "services": [{"name": "a", "address": "10.96.0.1:80"}],
            "sandboxes": [{"key": "k", "routes": [{"service": "a",
                "forks": ["10.0.0.1:80", "[fd00::1]:80"]}]}]
        }))
        .expect("valid json");
        let issues = spec
            .to_state()
            .expect("well-formed")
            .validate()
            .unwrap_err();
        assert_eq!(
            issues,
            [Issue {
                field: "sandbox \"k\" route \"a\"".into(),
                message:
                    "fork [fd00::1]:80 and service address 10.96.0.1:80 must be the same IP family"
                        .into()
            }]
        );
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
                routes: vec![RouteSpec::new("a", ["10.0.0.1:0"], ForkErrorPolicy::Error)],
                inject_key: false,
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
                "sandbox \"k\" route \"a\" forks[0]",
                "sandbox \"k\" members"
            ]
        );
    }

    #[test]
    fn inject_key_is_off_unless_given_and_carried_to_the_state() {
        let old: SandboxSpec = serde_json::from_str(r#"{"key": "k"}"#).unwrap();
        assert!(!old.inject_key);
        assert!(!old.to_state(&mut Vec::new()).inject_key);
        let on: SandboxSpec = serde_json::from_str(r#"{"key": "k", "inject_key": true}"#).unwrap();
        let state = on.to_state(&mut Vec::new());
        assert!(state.inject_key);
        assert!(SandboxSpec::from_state(&state).inject_key);
        assert_eq!(serde_json::to_value(&on).unwrap()["inject_key"], true);
        assert!(
            serde_json::to_value(&old)
                .unwrap()
                .get("inject_key")
                .is_none()
        );
    }

    #[test]
    fn reset_on_change_is_off_unless_given_and_carried_to_the_state() {
        let old = route(serde_json::json!({"service": "a", "forks": ["10.0.0.1:80"]})).unwrap();
        assert!(!old.reset_on_change);
        let answer = serde_json::to_value(RouteSpec::from_state("a", &old)).unwrap();
        assert!(answer.get("reset_on_change").is_none(), "{answer}");

        let on = route(serde_json::json!({"service": "a", "forks": ["10.0.0.1:80"],
            "reset_on_change": true}))
        .unwrap();
        assert!(on.reset_on_change);
        let spec = RouteSpec::from_state("a", &on);
        assert!(spec.reset_on_change);
        assert_eq!(
            serde_json::to_value(&spec).unwrap()["reset_on_change"],
            true
        );
        // Through a whole sandbox too, as the state file keeps it.
        let sandbox: SandboxSpec = serde_json::from_value(serde_json::json!({"key": "k",
            "routes": [{"service": "a", "forks": ["10.0.0.1:80"], "reset_on_change": true}]}))
        .unwrap();
        let state = sandbox.to_state(&mut Vec::new());
        assert!(state.routes["a"].reset_on_change);
        assert_eq!(SandboxSpec::from_state(&state), sandbox);
        assert!(
            serde_json::from_value::<RouteSpec>(serde_json::json!({"service": "a",
                "forks": ["10.0.0.1:80"], "reset_on_change": "yes"}))
            .is_err()
        );
    }

    #[test]
    fn reset_on_change_on_a_udp_service_is_refused() {
        let spec: StateSpec = serde_json::from_value(serde_json::json!({
            "services": [{"name": "dns", "address": "10.96.0.53:53", "protocol": "udp"}],
            "sandboxes": [{"key": "k", "routes": [{"service": "dns",
                "forks": ["10.0.0.1:53"], "reset_on_change": true}]}]
        }))
        .expect("valid json");
        let issues = spec
            .to_state()
            .expect("well-formed")
            .validate()
            .unwrap_err();
        assert_eq!(
            issues,
            [Issue {
                field: "sandbox \"k\" route \"dns\"".into(),
                message: "reset_on_change resets TCP connections; service \"dns\" is UDP".into()
            }]
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
