//! The custom resources redirector reads on a cluster: `Sandbox` and `RouteGroup`
//! (group `redirector.dev`, version `v1alpha1`).
//!
//! The CRD manifests under `deploy/` are generated from these types (`redirector crds`), and a
//! test fails when the committed files drift from them.
use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The routing key rule the daemon enforces, also checked by the API server (see
/// `routing_key::valid_key`).
const KEY_PATTERN: &str = "^[A-Za-z0-9._-]{1,63}$";

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
        json_path = ".spec.routingKey",
        description = "routing key (the name when empty)"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// The routing key; defaults to the Sandbox's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(KEY_PATTERN))]
    pub routing_key: Option<String>,
    /// The services this sandbox forks.
    #[schemars(length(min = 1))]
    pub forks: Vec<Fork>,
    /// Pods that belong to the sandbox (test jobs, preview frontends): all of their connections
    /// to a forked service reach the fork. A fork's own pods belong to it without being listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberSelector>,
}

/// One forked service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fork {
    /// The baseline Service whose traffic the fork takes for this sandbox.
    pub service: ServiceRef,
    /// Ports of the Service to fork, by name or number; all of them when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<IntOrString>,
    /// Where the fork runs.
    pub to: ForkTarget,
    /// What the node router does with a request whose fork cannot be reached: answer an error
    /// (default) or send it to the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_fork_error: Option<OnForkError>,
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

/// What the node agents and the controller report back.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
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
    printcolumn(name = "Key", type_ = "string", json_path = ".spec.routingKey"),
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
    fn the_routing_key_defaults_to_the_name() {
        let mut sandbox = Sandbox::new(
            "pr-1",
            SandboxSpec {
                routing_key: None,
                forks: Vec::new(),
                members: Vec::new(),
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
        assert_eq!(forks[1].service.namespace.as_deref(), Some("data"));
        assert!(forks[1].to.selector.is_some());
        assert_eq!(sandbox.spec.members.len(), 1);
    }
}
