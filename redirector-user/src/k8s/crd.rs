//! The custom resources redirector reads on a cluster: `Sandbox` and `RouteGroup`
//! (group `redirector.dev`, version `v1alpha1`).
//!
//! The CRD manifests under `deploy/` are generated from these types (`redirector crds`), and a
//! test fails when the committed files drift from them.
// Each `printcolumn(...)` of kube's derive says its own `type_`; clippy takes the repeats for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]
use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::{
        apis::meta::v1::{Condition, LabelSelector},
        util::intstr::IntOrString,
    },
};
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The routing key rule the daemon enforces, also checked by the API server (see
/// `routing_key::valid_key`).
const KEY_PATTERN: &str = "^[A-Za-z0-9._-]{1,63}$";

/// A TTL: whole numbers with units, largest first (`90m`, `2h`, `1h30m`, `7d`).
const TTL_PATTERN: &str = "^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$";

/// A sandbox: a routing key, the services it forks and the pods that belong to it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "redirector.dev",
    version = "v1alpha1",
    kind = "Sandbox",
    namespaced,
    shortname = "sbx",
    doc = "A sandbox: requests and member pods carrying its routing key reach its forks",
    status = "SandboxStatus",
    printcolumn(
        name = "Key",
        type_ = "string",
        json_path = ".status.routingKey",
        description = "the routing key in use"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(name = "TTL", type_ = "string", json_path = ".spec.ttl"),
    printcolumn(
        name = "Expires",
        type_ = "string",
        json_path = ".status.expiresAt",
        description = "when the TTL deletes the Sandbox"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// The routing key; defaults to the Sandbox's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(KEY_PATTERN))]
    pub routing_key: Option<String>,
    /// Delete the Sandbox (and its forks) this long after it was created: `90m`, `2h`, `1d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(TTL_PATTERN))]
    pub ttl: Option<String>,
    /// The services this sandbox forks.
    #[schemars(length(min = 1))]
    pub forks: Vec<Fork>,
    /// Pods that belong to the sandbox (test jobs, preview frontends): all of their connections
    /// to a forked service reach the fork. A fork's own pods belong to it without being listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberSelector>,
    /// Members' HTTP requests that carry no routing key are routed as this sandbox's and
    /// passed on with the key added to `baggage` (for members that do not propagate the key).
    /// Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inject_key: bool,
}

/// One forked service: either a fork that runs already (`service` and `to`), or one the
/// controller creates from a baseline workload (`forkOf`, with an optional `service`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["service", "to"]}, {"required": ["forkOf"]}]))]
pub struct Fork {
    /// The baseline Service whose traffic the fork takes for this sandbox. With `forkOf`: only
    /// this one of the Services that select the baseline's pods is forked (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// Ports of the Service to fork, by name or number; all of them when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<IntOrString>,
    /// Where the fork runs, when it runs already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<ForkTarget>,
    /// The baseline workload the controller copies into a fork.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork_of: Option<WorkloadRef>,
    /// Changes to the copy of the baseline's pod template (with `forkOf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customizations: Option<Customizations>,
    /// Replicas of the fork (with `forkOf`); 1 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: Option<i32>,
    /// What the node router does with a request whose fork cannot be reached: answer an error
    /// (default) or send it to the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_fork_error: Option<OnForkError>,
    /// When this fork's routes change (the fork is added or removed, its endpoints move), reset
    /// the members' TCP connections they steered or would now steer elsewhere, so that pooled
    /// connections follow the change (Linux 6.5+; UDP ports are left alone). Off by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_on_change: Option<bool>,
}

/// A baseline workload, in the Sandbox's namespace unless another is given.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    pub kind: WorkloadKind,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkloadKind {
    Deployment,
}

/// What differs between the baseline's pods and the fork's.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Customizations {
    /// Container images to replace, by container name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageOverride>,
    /// Environment variables to set (added, or replacing one of that name), by container name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvOverride>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageOverride {
    /// The container (or init container); the only one when the pod has one and this is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[schemars(length(min = 1))]
    pub image: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvOverride {
    /// The container (or init container); the only one when the pod has one and this is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// A Service, by name, in the Sandbox's namespace unless another is given.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The fork's endpoints: the ready endpoints of its own Service (in the Sandbox's namespace),
/// or the ready pods a label selector picks there. Exactly one of the two.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["service"]}, {"required": ["selector"]}]))]
pub struct ForkTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnForkError {
    Error,
    Baseline,
}

/// Pods picked by labels, in one namespace (the object's own unless given).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub label_selector: LabelSelector,
}

/// What the controller reports back.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The routing key in use (the spec's, or the name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// `Ready`: every fork has a ready endpoint. `Failed`: a fork cannot be made (the reason
    /// says why: `BaselineNotFound`, `InvalidCustomization`, `ImagePullError`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The forks the controller made, one per `forkOf`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forks: Vec<ForkStatus>,
    /// When the TTL deletes the Sandbox (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// One `forkOf` fork as the controller made it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForkStatus {
    /// The baseline workload, `Deployment/<name>`.
    pub fork_of: String,
    /// Where the baseline and the fork live.
    pub namespace: String,
    /// The fork Deployment.
    pub deployment: String,
    /// Each forked Service and the fork's Service that stands in for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ForkedService>,
    /// Fork pods that are ready, and all of them.
    #[serde(default)]
    pub ready_endpoints: i32,
    #[serde(default)]
    pub total_endpoints: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForkedService {
    /// The baseline Service.
    pub baseline: String,
    /// The fork's Service (same ports and names, selecting the fork's pods).
    pub fork: String,
}

/// A routing key standing for several sandboxes at once (test two PRs that fork different
/// services together).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "redirector.dev",
    version = "v1alpha1",
    kind = "RouteGroup",
    namespaced,
    shortname = "rg",
    doc = "A routing key that reaches the forks of several sandboxes",
    status = "RouteGroupStatus",
    printcolumn(name = "Key", type_ = "string", json_path = ".spec.routingKey"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RouteGroupSpec {
    #[schemars(pattern(KEY_PATTERN))]
    pub routing_key: String,
    /// The sandboxes (in the RouteGroup's namespace), by name or by label selector.
    pub sandboxes: SandboxSet,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberSelector>,
}

/// What the controller reports back.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteGroupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Sandboxes the group stands for now, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sandboxes: Vec<String>,
    /// `Ready`: every one of them is Ready (and there is at least one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Sandboxes by name, or by a label selector; exactly one of the two.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["names"]}, {"required": ["selector"]}]))]
pub struct SandboxSet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

impl Sandbox {
    /// The routing key: `spec.routingKey`, or the name.
    pub fn routing_key(&self) -> &str {
        self.spec
            .routing_key
            .as_deref()
            .or(self.metadata.name.as_deref())
            .unwrap_or_default()
    }

    /// The forks as the node agents route them: a fork given by `service` and `to` as it is,
    /// and each Service of a `forkOf` fork that the controller has set up (from the status).
    /// A `forkOf` fork the controller has not set up yet is an `Err` saying so.
    pub fn routed_forks(&self) -> Vec<Result<RoutedFork, String>> {
        let own_ns = self.metadata.namespace.clone().unwrap_or_default();
        let mut out = Vec::new();
        for fork in &self.spec.forks {
            match (&fork.fork_of, &fork.service, &fork.to) {
                (None, Some(service), Some(to)) => out.push(Ok(RoutedFork {
                    service: service.name.clone(),
                    service_namespace: service.namespace.clone().unwrap_or(own_ns.clone()),
                    ports: fork.ports.clone(),
                    to: to.clone(),
                    to_namespace: own_ns.clone(),
                    on_fork_error: fork.on_fork_error,
                    reset_on_change: fork.reset_on_change.unwrap_or(false),
                })),
                (Some(of), _, None) => {
                    let ns = of.namespace.clone().unwrap_or(own_ns.clone());
                    let made = self.status.as_ref().and_then(|status| {
                        status
                            .forks
                            .iter()
                            .find(|f| f.namespace == ns && f.fork_of == of.display_name())
                    });
                    let Some(made) = made.filter(|made| !made.services.is_empty()) else {
                        out.push(Err(format!(
                            "fork of {}/{}: waiting for the controller to create it",
                            ns,
                            of.display_name()
                        )));
                        continue;
                    };
                    for forked in &made.services {
                        out.push(Ok(RoutedFork {
                            service: forked.baseline.clone(),
                            service_namespace: ns.clone(),
                            ports: fork.ports.clone(),
                            to: ForkTarget {
                                service: Some(forked.fork.clone()),
                                selector: None,
                            },
                            to_namespace: ns.clone(),
                            on_fork_error: fork.on_fork_error,
                            reset_on_change: fork.reset_on_change.unwrap_or(false),
                        }));
                    }
                }
                _ => out.push(Err(
                    "a fork needs either `service` and `to`, or `forkOf` (without `to`)".to_owned(),
                )),
            }
        }
        out
    }
}

/// A TTL in the `ttl` field's format (`90m`, `2h`, `1h30m`, `7d`) as a duration.
pub fn parse_ttl(ttl: &str) -> Result<std::time::Duration, String> {
    let mut seconds: u64 = 0;
    let mut number = String::new();
    let mut last_unit = u8::MAX;
    for c in ttl.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let (rank, unit) = match c {
            'd' => (0, 86_400),
            'h' => (1, 3_600),
            'm' => (2, 60),
            's' => (3, 1),
            _ => return Err(format!("{ttl:?}: unknown unit {c:?} (use d, h, m, s)")),
        };
        if number.is_empty() || (last_unit != u8::MAX && rank <= last_unit) {
            return Err(format!(
                "{ttl:?}: write whole numbers with units, largest first (90m, 2h, 1h30m, 7d)"
            ));
        }
        last_unit = rank;
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{ttl:?}: number too large"))?;
        seconds = n
            .checked_mul(unit)
            .and_then(|s| s.checked_add(seconds))
            .ok_or_else(|| format!("{ttl:?}: too long"))?;
        number.clear();
    }
    if !number.is_empty() {
        return Err(format!("{ttl:?}: {number} has no unit (use d, h, m, s)"));
    }
    if seconds == 0 {
        return Err(format!("{ttl:?}: must be longer than zero"));
    }
    Ok(std::time::Duration::from_secs(seconds))
}

impl WorkloadRef {
    /// `Deployment/<name>`, as the status names it.
    pub fn display_name(&self) -> String {
        match self.kind {
            WorkloadKind::Deployment => format!("Deployment/{}", self.name),
        }
    }
}

/// One baseline Service and the fork that takes its sandbox's traffic, as a node agent routes it.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutedFork {
    pub service: String,
    pub service_namespace: String,
    pub ports: Vec<IntOrString>,
    pub to: ForkTarget,
    /// Where `to` is looked up.
    pub to_namespace: String,
    pub on_fork_error: Option<OnForkError>,
    /// `resetOnChange` (false when not given).
    pub reset_on_change: bool,
}

/// Every CRD redirector defines.
pub fn definitions() -> Vec<CustomResourceDefinition> {
    vec![Sandbox::crd(), RouteGroup::crd()]
}

/// The CRDs as one multi-document YAML file, as committed in `deploy/crds.yaml`.
pub fn manifest() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::from(
        "# Generated by `redirector crds` from redirector-user/src/k8s/crd.rs; do not edit.\n",
    );
    for crd in definitions() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crds_match_the_types() {
        let committed = include_str!("../../../deploy/crds.yaml");
        let generated = manifest().expect("CRDs serialize");
        assert!(
            committed == generated,
            "deploy/crds.yaml drifted from the Rust types: run \
             `cargo run -p redirector-user -- crds > deploy/crds.yaml`"
        );
    }

    #[test]
    fn fork_of_forks_are_routed_once_the_controller_has_made_them() {
        let mut sandbox: Sandbox = serde_yaml_ng::from_str(
            r#"
apiVersion: redirector.dev/v1alpha1
kind: Sandbox
metadata: {name: pr-1, namespace: shop}
spec:
  forks:
  - forkOf: {kind: Deployment, name: svc-a}
    ports: [http]
  - service: {name: db}
    to: {service: db-pr-1}
"#,
        )
        .expect("parses");
        let routed = sandbox.routed_forks();
        assert_eq!(routed.len(), 2);
        let waiting = routed[0].clone().unwrap_err();
        assert!(waiting.contains("waiting for the controller"), "{waiting}");
        assert_eq!(
            routed[1].as_ref().expect("ok").to.service.as_deref(),
            Some("db-pr-1")
        );

        sandbox.status = Some(SandboxStatus {
            forks: vec![ForkStatus {
                fork_of: "Deployment/svc-a".into(),
                namespace: "shop".into(),
                deployment: "svc-a-pr-1".into(),
                services: vec![
                    ForkedService {
                        baseline: "svc-a".into(),
                        fork: "svc-a-pr-1".into(),
                    },
                    ForkedService {
                        baseline: "svc-a-admin".into(),
                        fork: "svc-a-admin-pr-1".into(),
                    },
                ],
                ready_endpoints: 1,
                total_endpoints: 1,
            }],
            ..SandboxStatus::default()
        });
        let routed: Vec<RoutedFork> = sandbox
            .routed_forks()
            .into_iter()
            .map(|r| r.expect("routed"))
            .collect();
        assert_eq!(
            routed.len(),
            3,
            "one per forked Service, then the running fork"
        );
        assert_eq!(routed[0].service, "svc-a");
        assert_eq!(routed[0].to.service.as_deref(), Some("svc-a-pr-1"));
        assert_eq!(routed[0].to_namespace, "shop");
        assert_eq!(routed[0].ports, [IntOrString::String("http".into())]);
        assert_eq!(routed[1].service, "svc-a-admin");

        // A fork in another namespace is looked for there.
        sandbox.spec.forks[0]
            .fork_of
            .as_mut()
            .expect("forkOf")
            .namespace = Some("data".into());
        assert!(
            sandbox.routed_forks()[0].is_err(),
            "the status names shop, not data"
        );
    }

    #[test]
    fn ttls_parse_as_the_schema_reads_them() {
        let secs = |s: &str| parse_ttl(s).map(|d| d.as_secs());
        assert_eq!(secs("90m"), Ok(5_400));
        assert_eq!(secs("2h"), Ok(7_200));
        assert_eq!(secs("1h30m"), Ok(5_400));
        assert_eq!(secs("7d"), Ok(604_800));
        assert_eq!(secs("1d2h3m4s"), Ok(93_784));
        for bad in [
            "",
            "0m",
            "2",
            "h",
            "30m1h",
            "2h2h",
            "1w",
            "-1h",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn reset_on_change_is_read_in_both_fork_forms_and_carried_to_the_routes() {
        let mut sandbox: Sandbox = serde_yaml_ng::from_str(
            r#"
apiVersion: redirector.dev/v1alpha1
kind: Sandbox
metadata: {name: pr-1, namespace: shop}
spec:
  forks:
  - forkOf: {kind: Deployment, name: svc-a}
    resetOnChange: true
  - service: {name: db}
    to: {service: db-pr-1}
    resetOnChange: true
  - service: {name: cache}
    to: {service: cache-pr-1}
"#,
        )
        .expect("parses");
        let flags: Vec<Option<bool>> = sandbox
            .spec
            .forks
            .iter()
            .map(|f| f.reset_on_change)
            .collect();
        assert_eq!(flags, [Some(true), Some(true), None]);
        let yaml = serde_yaml_ng::to_string(&sandbox.spec).expect("serializes");
        assert_eq!(yaml.matches("resetOnChange: true").count(), 2, "{yaml}");
        assert!(!yaml.contains("reset_on_change"), "{yaml}");

        sandbox.status = Some(SandboxStatus {
            forks: vec![ForkStatus {
                fork_of: "Deployment/svc-a".into(),
                namespace: "shop".into(),
                deployment: "svc-a-pr-1".into(),
                services: vec![ForkedService {
                    baseline: "svc-a".into(),
                    fork: "svc-a-pr-1".into(),
                }],
                ..ForkStatus::default()
            }],
            ..SandboxStatus::default()
        });
        let routed: Vec<(String, bool)> = sandbox
            .routed_forks()
            .into_iter()
            .map(|r| r.expect("routed"))
            .map(|r| (r.service, r.reset_on_change))
            .collect();
        assert_eq!(
            routed,
            [
                ("svc-a".to_owned(), true),
                ("db".to_owned(), true),
                ("cache".to_owned(), false)
            ]
        );
    }

    #[test]
    fn the_routing_key_defaults_to_the_name() {
        let mut sandbox = Sandbox::new(
            "pr-1",
            SandboxSpec {
                routing_key: None,
                ttl: None,
                forks: Vec::new(),
                members: Vec::new(),
                inject_key: false,
            },
        );
        assert_eq!(sandbox.routing_key(), "pr-1");
        sandbox.spec.routing_key = Some("key-2".into());
        assert_eq!(sandbox.routing_key(), "key-2");
    }

    #[test]
    fn a_sandbox_reads_from_yaml() {
        let sandbox: Sandbox = serde_yaml_ng::from_str(
            r#"
apiVersion: redirector.dev/v1alpha1
kind: Sandbox
metadata: {name: pr-1, namespace: shop}
spec:
  forks:
  - service: {name: svc-a}
    ports: [http, 9090]
    to: {service: svc-a-pr-1}
    onForkError: baseline
  - service: {name: db, namespace: data}
    to: {selector: {matchLabels: {app: db-pr-1}}}
  members:
  - labelSelector: {matchLabels: {job: pr-1-tests}}
"#,
        )
        .expect("parses");
        let forks = &sandbox.spec.forks;
        assert_eq!(
            forks[0].ports,
            [IntOrString::String("http".into()), IntOrString::Int(9090)]
        );
        assert_eq!(forks[0].on_fork_error, Some(OnForkError::Baseline));
        assert_eq!(
            forks[1]
                .service
                .as_ref()
                .and_then(|s| s.namespace.as_deref()),
            Some("data")
        );
        assert!(forks[1].to.as_ref().is_some_and(|t| t.selector.is_some()));
        assert_eq!(sandbox.spec.members.len(), 1);
    }
}
