//! From a Sandbox's `forkOf` to the objects the controller creates: pure functions over
//! k8s-openapi types, no API calls.
//!
//! The fork Deployment is the baseline's pod template with the customizations applied, and with
//! the values of the labels that select the baseline rewritten: every key of the baseline
//! Deployment's selector and of the selector of every Service that selects the baseline's pods
//! gets a value naming the sandbox. So no Service that selects the baseline (and not the
//! baseline Deployment either) selects the fork, while labels nothing selects by (team, version,
//! the ones NetworkPolicies often use) stay as they are. Each forked Service gets a copy (same
//! ports, names and families) that selects the fork's pods.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Container, EnvVar, EnvVarSource, ObjectFieldSelector, PodTemplateSpec,
            Service as KubeService, ServicePort, ServiceSpec,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{Resource as _, ResourceExt as _};
use sha2::{Digest as _, Sha256};

use super::crd::{Fork, Sandbox};

/// On every object the controller makes: the Sandbox's name...
pub const SANDBOX_LABEL: &str = "redirector.dev/sandbox";
/// ...and namespace (a fork may live in the baseline's namespace, not the Sandbox's).
pub const SANDBOX_NAMESPACE_LABEL: &str = "redirector.dev/sandbox-namespace";
/// The baseline Deployment a fork copies.
pub const FORK_OF_LABEL: &str = "redirector.dev/fork-of";
/// On the fork's pods: the routing key, which the downward API hands to the application.
pub const ROUTING_KEY_ANNOTATION: &str = "redirector.dev/routing-key";
/// On the fork Deployment: the Sandbox generation it was made from. The fork is made again
/// only when the Sandbox changes, never because the baseline did.
pub const GENERATION_ANNOTATION: &str = "redirector.dev/sandbox-generation";
/// The environment variable fork containers find the routing key in.
pub const ROUTING_KEY_ENV: &str = "REDIRECTOR_ROUTING_KEY";

/// What the controller creates for one `forkOf`.
#[derive(Debug, Clone, PartialEq)]
pub struct ForkPlan {
    pub deployment: Deployment,
    /// The fork's Services, by the baseline Service each stands in for.
    pub services: Vec<(String, KubeService)>,
}

/// Why a fork cannot be made; `reason` is the `Failed` condition's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForkError {
    #[error("{0}")]
    InvalidCustomization(String),
    #[error("{0}")]
    BaselineUnusable(String),
    #[error("{0}")]
    ServiceNotFound(String),
    #[error("{0}")]
    NoService(String),
}

impl ForkError {
    pub fn reason(&self) -> &'static str {
        match self {
            ForkError::InvalidCustomization(_) => "InvalidCustomization",
            ForkError::BaselineUnusable(_) => "BaselineUnusable",
            ForkError::ServiceNotFound(_) => "ServiceNotFound",
            ForkError::NoService(_) => "NoServiceSelectsBaseline",
        }
    }
}

/// `<base>-<sandbox>` as a DNS label (Service names, and Deployment names short enough for
/// their pods' host names): at most 63 characters, a hash of the whole when it would be longer.
pub fn fork_name(base: &str, sandbox: &str) -> String {
    let whole = format!("{base}-{sandbox}")
        .to_ascii_lowercase()
        .replace('.', "-");
    if whole.len() <= 63 {
        return whole;
    }
    let hash = short_hash(&whole);
    let prefix: String = whole.chars().take(63 - 1 - hash.len()).collect();
    format!("{}-{hash}", prefix.trim_end_matches('-'))
}

/// A label value (at most 63 characters, alphanumeric at both ends) that stands for `value`.
pub fn label_value(value: &str) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let clean = value.len() <= 63
        && value.chars().all(ok)
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if clean {
        return value.to_owned();
    }
    let hash = short_hash(value);
    let prefix: String = value
        .chars()
        .filter(|c| ok(*c))
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(63 - 1 - hash.len())
        .collect();
    let prefix = prefix.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        hash
    } else {
        format!("{prefix}-{hash}")
    }
}

fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest[..5].iter().map(|b| format!("{b:02x}")).collect()
}

/// The labels every object of one fork carries, which are also the fork pods' selector.
pub fn fork_labels(sandbox: &Sandbox, baseline: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (SANDBOX_LABEL.to_owned(), label_value(&sandbox.name_any())),
        (
            SANDBOX_NAMESPACE_LABEL.to_owned(),
            label_value(&sandbox.namespace().unwrap_or_default()),
        ),
        (FORK_OF_LABEL.to_owned(), label_value(baseline)),
    ])
}

/// The label selector of every object the controller made for `sandbox`.
pub fn sandbox_selector(sandbox: &Sandbox) -> String {
    format!(
        "{SANDBOX_LABEL}={},{SANDBOX_NAMESPACE_LABEL}={}",
        label_value(&sandbox.name_any()),
        label_value(&sandbox.namespace().unwrap_or_default())
    )
}

/// Services of the baseline's namespace whose selector picks the baseline's pods.
pub fn selecting_services<'a>(
    template_labels: &BTreeMap<String, String>,
    services: &'a [KubeService],
) -> Vec<&'a KubeService> {
    services
        .iter()
        .filter(|service| {
            let selector = service.spec.as_ref().and_then(|s| s.selector.as_ref());
            selector.is_some_and(|selector| {
                !selector.is_empty()
                    && selector
                        .iter()
                        .all(|(k, v)| template_labels.get(k) == Some(v))
            })
        })
        .collect()
}

/// The fork Deployment and Services for `fork` (a `forkOf` fork of `sandbox`) of `baseline`;
/// `services` are the Services of the baseline's namespace.
pub fn plan(
    sandbox: &Sandbox,
    fork: &Fork,
    baseline: &Deployment,
    services: &[KubeService],
) -> Result<ForkPlan, ForkError> {
    let base_name = baseline.name_any();
    let namespace = baseline.namespace().unwrap_or_default();
    let spec = baseline.spec.as_ref().ok_or_else(|| {
        ForkError::BaselineUnusable(format!("Deployment {namespace}/{base_name} has no spec"))
    })?;
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();

    let forked: Vec<&KubeService> = match &fork.service {
        Some(wanted) => {
            let found = services
                .iter()
                .find(|s| s.name_any() == wanted.name)
                .ok_or_else(|| {
                    ForkError::ServiceNotFound(format!(
                        "Service {namespace}/{} not found",
                        wanted.name
                    ))
                })?;
            if selecting_services(&template_labels, std::slice::from_ref(found)).is_empty() {
                return Err(ForkError::ServiceNotFound(format!(
                    "Service {namespace}/{} does not select the pods of Deployment {base_name}",
                    wanted.name
                )));
            }
            vec![found]
        }
        None => selecting_services(&template_labels, services),
    };
    if forked.is_empty() {
        return Err(ForkError::NoService(format!(
            "no Service in {namespace} selects the pods of Deployment {base_name}"
        )));
    }

    // Every key something selects the baseline by gets a new value; see the module comment.
    let mut rewritten: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    for (k, _) in spec.selector.match_labels.iter().flatten() {
        rewritten.insert(k);
    }
    for expression in spec.selector.match_expressions.iter().flatten() {
        rewritten.insert(&expression.key);
    }
    for service in selecting_services(&template_labels, services) {
        for k in service
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            rewritten.insert(k);
        }
    }
    let sandbox_name = sandbox.name_any();
    let own = fork_labels(sandbox, &base_name);
    let mut pod_labels = template_labels.clone();
    for key in rewritten {
        if let Some(value) = pod_labels.get_mut(key) {
            *value = label_value(&format!("{value}-{sandbox_name}"));
        }
    }
    pod_labels.extend(own.clone());

    let mut template: PodTemplateSpec = spec.template.clone();
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels = Some(pod_labels);
    meta.annotations.get_or_insert_with(BTreeMap::new).insert(
        ROUTING_KEY_ANNOTATION.to_owned(),
        sandbox.routing_key().to_owned(),
    );
    let pod = template.spec.as_mut().ok_or_else(|| {
        ForkError::BaselineUnusable(format!(
            "Deployment {namespace}/{base_name} has no pod spec"
        ))
    })?;
    customize(pod, fork, &base_name)?;
    for container in pod
        .containers
        .iter_mut()
        .chain(pod.init_containers.iter_mut().flatten())
    {
        set_env(container, routing_key_env());
    }

    let owner = owner_reference(sandbox, &namespace);
    let name = fork_name(&base_name, &sandbox_name);
    let mut annotations = BTreeMap::from([(
        GENERATION_ANNOTATION.to_owned(),
        sandbox.metadata.generation.unwrap_or_default().to_string(),
    )]);
    annotations.insert(
        ROUTING_KEY_ANNOTATION.to_owned(),
        sandbox.routing_key().to_owned(),
    );
    let deployment = Deployment {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.clone()),
            labels: Some(own.clone()),
            annotations: Some(annotations),
            owner_references: owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(fork.replicas.unwrap_or(1)),
            selector: LabelSelector {
                match_labels: Some(own.clone()),
                match_expressions: None,
            },
            template,
            min_ready_seconds: spec.min_ready_seconds,
            progress_deadline_seconds: spec.progress_deadline_seconds,
            revision_history_limit: Some(1),
            strategy: spec.strategy.clone(),
            paused: None,
        }),
        status: None,
    };

    let services = forked
        .into_iter()
        .map(|service| {
            let baseline_name = service.name_any();
            let spec = service.spec.clone().unwrap_or_default();
            let copy = KubeService {
                metadata: ObjectMeta {
                    name: Some(fork_name(&baseline_name, &sandbox_name)),
                    namespace: Some(namespace.clone()),
                    labels: Some(own.clone()),
                    owner_references: owner.clone().map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                spec: Some(ServiceSpec {
                    ports: spec.ports.map(|ports| {
                        ports
                            .into_iter()
                            .map(|p| ServicePort {
                                name: p.name,
                                port: p.port,
                                // What the API server defaults it to, said outright.
                                target_port: p.target_port.or(Some(IntOrString::Int(p.port))),
                                protocol: p.protocol,
                                app_protocol: p.app_protocol,
                                node_port: None,
                            })
                            .collect()
                    }),
                    selector: Some(own.clone()),
                    ip_families: spec.ip_families,
                    ip_family_policy: spec.ip_family_policy,
                    ..ServiceSpec::default()
                }),
                status: None,
            };
            (baseline_name, copy)
        })
        .collect();
    Ok(ForkPlan {
        deployment,
        services,
    })
}

/// An owner reference to the Sandbox when the fork shares its namespace (owner references
/// cannot cross namespaces; the finalizer cleans up either way).
fn owner_reference(sandbox: &Sandbox, namespace: &str) -> Option<OwnerReference> {
    if sandbox.namespace().as_deref() != Some(namespace) {
        return None;
    }
    let mut owner = sandbox.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

fn routing_key_env() -> EnvVar {
    EnvVar {
        name: ROUTING_KEY_ENV.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: format!("metadata.annotations['{ROUTING_KEY_ANNOTATION}']"),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// Sets `var` in `container`, replacing one of the same name.
fn set_env(container: &mut Container, var: EnvVar) {
    let env = container.env.get_or_insert_with(Vec::new);
    match env.iter_mut().find(|e| e.name == var.name) {
        Some(existing) => *existing = var,
        None => env.push(var),
    }
}

fn customize(
    pod: &mut k8s_openapi::api::core::v1::PodSpec,
    fork: &Fork,
    base_name: &str,
) -> Result<(), ForkError> {
    let Some(custom) = &fork.customizations else {
        return Ok(());
    };
    for image in &custom.images {
        if image.image.trim().is_empty() {
            return Err(ForkError::InvalidCustomization(
                "an image override has an empty image".to_owned(),
            ));
        }
        container_named(pod, image.container.as_deref(), base_name)?.image =
            Some(image.image.clone());
    }
    for var in &custom.env {
        if var.name.is_empty() || var.name.contains('=') {
            return Err(ForkError::InvalidCustomization(format!(
                "{:?} is not an environment variable name",
                var.name
            )));
        }
        let container = container_named(pod, var.container.as_deref(), base_name)?;
        set_env(
            container,
            EnvVar {
                name: var.name.clone(),
                value: Some(var.value.clone()),
                value_from: None,
            },
        );
    }
    Ok(())
}

/// The container a customization names; with no name, the pod's only container.
fn container_named<'a>(
    pod: &'a mut k8s_openapi::api::core::v1::PodSpec,
    name: Option<&str>,
    base_name: &str,
) -> Result<&'a mut Container, ForkError> {
    let names = || {
        pod.containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        None if pod.containers.len() == 1 => Ok(&mut pod.containers[0]),
        None => Err(ForkError::InvalidCustomization(format!(
            "Deployment {base_name} has {} containers ({}): name the one to change",
            pod.containers.len(),
            names()
        ))),
        Some(name) => {
            let known = names();
            pod.containers
                .iter_mut()
                .chain(pod.init_containers.iter_mut().flatten())
                .find(|c| c.name == name)
                .ok_or_else(|| {
                    ForkError::InvalidCustomization(format!(
                        "Deployment {base_name} has no container {name:?} (it has: {known})"
                    ))
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{Customizations, EnvOverride, ImageOverride, ServiceRef, WorkloadKind};
    use kube::core::{Selector, SelectorExt as _};
    use serde_json::json;

    fn baseline() -> Deployment {
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "svc-a", "namespace": "shop", "uid": "d-1"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "svc-a"}},
                "template": {
                    "metadata": {"labels": {"app": "svc-a", "tier": "backend", "team": "cart"}},
                    "spec": {"containers": [
                        {"name": "app", "image": "registry.local/svc-a:main",
                         "env": [{"name": "FEATURE_X", "value": "off"}, {"name": "LOG", "value": "info"}]},
                        {"name": "proxy", "image": "envoy:1"}
                    ], "initContainers": [{"name": "migrate", "image": "registry.local/svc-a-migrate:main"}]}
                }
            }
        }))
        .expect("deployment")
    }

    fn service(name: &str, selector: serde_json::Value) -> KubeService {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "selector": selector,
                "clusterIP": "10.96.0.10",
                "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http", "protocol": "TCP"},
                    {"name": "grpc", "port": 9090, "targetPort": 9090, "nodePort": 30090, "protocol": "TCP"}
                ]
            }
        }))
        .expect("service")
    }

    fn services() -> Vec<KubeService> {
        vec![
            service("svc-a", json!({"app": "svc-a"})),
            service("backends", json!({"tier": "backend"})),
            service("other", json!({"app": "svc-b"})),
        ]
    }

    fn sandbox(fork: Fork) -> Sandbox {
        let mut sandbox: Sandbox = serde_json::from_value(json!({
            "apiVersion": "redirector.dev/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": "pr-123", "namespace": "shop", "uid": "s-1", "generation": 4},
            "spec": {"routingKey": "key-123", "forks": []}
        }))
        .expect("sandbox");
        sandbox.spec.forks.push(fork);
        sandbox
    }

    fn fork_of(customizations: Option<Customizations>) -> Fork {
        Fork {
            fork_of: Some(crate::k8s::crd::WorkloadRef {
                kind: WorkloadKind::Deployment,
                name: "svc-a".into(),
                namespace: None,
            }),
            customizations,
            ..Fork::default()
        }
    }

    fn planned(fork: Fork) -> Result<ForkPlan, ForkError> {
        let sandbox = sandbox(fork.clone());
        plan(&sandbox, &fork, &baseline(), &services())
    }

    fn pod_labels(plan: &ForkPlan) -> BTreeMap<String, String> {
        plan.deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap()
    }

    fn container<'a>(plan: &'a ForkPlan, name: &str) -> &'a Container {
        let pod = plan
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        pod.containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
            .find(|c| c.name == name)
            .unwrap()
    }

    #[test]
    fn no_service_that_selects_the_baseline_selects_the_fork() {
        let plan = planned(fork_of(None)).expect("plan");
        let labels = pod_labels(&plan);
        for service in services() {
            let selector = service.spec.clone().unwrap().selector.unwrap();
            let selects = selector.iter().all(|(k, v)| labels.get(k) == Some(v));
            assert!(
                !selects,
                "{} selects the fork: {labels:?}",
                service.name_any()
            );
        }
        // Nor does the baseline Deployment's own selector.
        let baseline_selector =
            Selector::try_from(baseline().spec.unwrap().selector).expect("selector");
        assert!(!baseline_selector.matches(&labels));
        // Labels nothing selects by are kept; the selected ones name the sandbox.
        assert_eq!(labels["team"], "cart");
        assert_eq!(labels["app"], "svc-a-pr-123");
        assert_eq!(labels["tier"], "backend-pr-123");
        assert_eq!(labels[SANDBOX_LABEL], "pr-123");
        assert_eq!(labels[FORK_OF_LABEL], "svc-a");
    }

    #[test]
    fn the_fork_deployment_selects_its_pods_and_is_owned_by_the_sandbox() {
        let plan = planned(fork_of(None)).expect("plan");
        let d = &plan.deployment;
        assert_eq!(d.name_any(), "svc-a-pr-123");
        assert_eq!(d.namespace().as_deref(), Some("shop"));
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1), "one replica unless told otherwise");
        let selector = Selector::try_from(spec.selector.clone()).expect("selector");
        assert!(selector.matches(&pod_labels(&plan)));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Sandbox", "pr-123", "s-1")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(d.annotations()[GENERATION_ANNOTATION], "4");
        assert_eq!(d.labels()[SANDBOX_NAMESPACE_LABEL], "shop");
    }

    #[test]
    fn replicas_follow_the_fork() {
        let mut fork = fork_of(None);
        fork.replicas = Some(3);
        let plan = planned(fork).expect("plan");
        assert_eq!(plan.deployment.spec.unwrap().replicas, Some(3));
    }

    #[test]
    fn every_service_that_selects_the_baseline_gets_a_fork_copy() {
        let plan = planned(fork_of(None)).expect("plan");
        let names: Vec<(&str, String)> = plan
            .services
            .iter()
            .map(|(b, s)| (b.as_str(), s.name_any()))
            .collect();
        assert_eq!(
            names,
            [
                ("svc-a", "svc-a-pr-123".to_owned()),
                ("backends", "backends-pr-123".to_owned())
            ]
        );
        let (_, copy) = &plan.services[0];
        let spec = copy.spec.as_ref().unwrap();
        let selector = spec.selector.clone().unwrap();
        assert!(
            selector
                .iter()
                .all(|(k, v)| pod_labels(&plan).get(k) == Some(v))
        );
        let ports = spec.ports.as_ref().unwrap();
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(ports[0].app_protocol.as_deref(), Some("http"));
        assert_eq!(
            ports[1].node_port, None,
            "node ports belong to the baseline"
        );
        assert_eq!(
            spec.cluster_ip, None,
            "the API server allocates the fork's own"
        );
        assert_eq!(
            spec.ip_families.as_deref(),
            Some(&["IPv4".to_owned(), "IPv6".to_owned()][..])
        );
    }

    #[test]
    fn a_named_service_is_the_only_one_forked() {
        let mut fork = fork_of(None);
        fork.service = Some(ServiceRef {
            name: "svc-a".into(),
            namespace: None,
        });
        let plan = planned(fork).expect("plan");
        assert_eq!(plan.services.len(), 1);
        // Still no Service that selects the baseline selects the fork.
        assert_eq!(pod_labels(&plan)["tier"], "backend-pr-123");

        let mut fork = fork_of(None);
        fork.service = Some(ServiceRef {
            name: "missing".into(),
            namespace: None,
        });
        assert_eq!(planned(fork).unwrap_err().reason(), "ServiceNotFound");
        let mut fork = fork_of(None);
        fork.service = Some(ServiceRef {
            name: "other".into(),
            namespace: None,
        });
        let err = planned(fork).unwrap_err();
        assert!(err.to_string().contains("does not select"), "{err}");
    }

    #[test]
    fn a_baseline_no_service_selects_cannot_be_forked() {
        let sandbox = sandbox(fork_of(None));
        let err = plan(&sandbox, &fork_of(None), &baseline(), &[]).unwrap_err();
        assert_eq!(err.reason(), "NoServiceSelectsBaseline");
    }

    #[test]
    fn images_and_env_are_customized_and_the_key_is_in_every_container() {
        let plan = planned(fork_of(Some(Customizations {
            images: vec![
                ImageOverride {
                    container: Some("app".into()),
                    image: "registry.local/svc-a:pr-123".into(),
                },
                ImageOverride {
                    container: Some("migrate".into()),
                    image: "registry.local/svc-a-migrate:pr-123".into(),
                },
            ],
            env: vec![
                EnvOverride {
                    container: Some("app".into()),
                    name: "FEATURE_X".into(),
                    value: "on".into(),
                },
                EnvOverride {
                    container: Some("app".into()),
                    name: "NEW".into(),
                    value: "1".into(),
                },
            ],
        })))
        .expect("plan");
        let app = container(&plan, "app");
        assert_eq!(app.image.as_deref(), Some("registry.local/svc-a:pr-123"));
        let env: Vec<(&str, Option<&str>)> = app
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert_eq!(
            env,
            [
                ("FEATURE_X", Some("on")),
                ("LOG", Some("info")),
                ("NEW", Some("1")),
                (ROUTING_KEY_ENV, None)
            ]
        );
        assert_eq!(container(&plan, "proxy").image.as_deref(), Some("envoy:1"));
        assert_eq!(
            container(&plan, "migrate").image.as_deref(),
            Some("registry.local/svc-a-migrate:pr-123")
        );
        for name in ["app", "proxy", "migrate"] {
            let key = container(&plan, name)
                .env
                .iter()
                .flatten()
                .find(|e| e.name == ROUTING_KEY_ENV)
                .and_then(|e| e.value_from.as_ref())
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.clone());
            assert_eq!(
                key.as_deref(),
                Some("metadata.annotations['redirector.dev/routing-key']")
            );
        }
        let annotations = plan
            .deployment
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap();
        assert_eq!(annotations[ROUTING_KEY_ANNOTATION], "key-123");
    }

    #[test]
    fn a_customization_must_name_a_container_that_exists() {
        let err = planned(fork_of(Some(Customizations {
            images: vec![ImageOverride {
                container: Some("nope".into()),
                image: "x".into(),
            }],
            env: vec![],
        })))
        .unwrap_err();
        assert_eq!(err.reason(), "InvalidCustomization");
        assert!(
            err.to_string()
                .contains("no container \"nope\" (it has: app, proxy, migrate)"),
            "{err}"
        );
        // Two containers: an unnamed override is ambiguous.
        let err = planned(fork_of(Some(Customizations {
            images: vec![ImageOverride {
                container: None,
                image: "x".into(),
            }],
            env: vec![],
        })))
        .unwrap_err();
        assert!(err.to_string().contains("name the one to change"), "{err}");
        let err = planned(fork_of(Some(Customizations {
            images: vec![],
            env: vec![EnvOverride {
                container: Some("app".into()),
                name: "A=B".into(),
                value: String::new(),
            }],
        })))
        .unwrap_err();
        assert_eq!(err.reason(), "InvalidCustomization");
    }

    #[test]
    fn an_unnamed_override_changes_a_single_container() {
        let mut single = baseline();
        let pod = single
            .spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap();
        pod.containers.truncate(1);
        let fork = fork_of(Some(Customizations {
            images: vec![ImageOverride {
                container: None,
                image: "img:pr".into(),
            }],
            env: vec![],
        }));
        let plan = plan(&sandbox(fork.clone()), &fork, &single, &services()).expect("plan");
        assert_eq!(container(&plan, "app").image.as_deref(), Some("img:pr"));
    }

    #[test]
    fn names_and_label_values_stay_within_kubernetes_limits() {
        assert_eq!(fork_name("svc-a", "pr-1"), "svc-a-pr-1");
        assert_eq!(fork_name("svc.a", "PR.1"), "svc-a-pr-1");
        let long = fork_name(&"a".repeat(40), &"b".repeat(40));
        assert_eq!(long.len(), 63);
        assert_ne!(
            long,
            fork_name(&"a".repeat(40), &"b".repeat(41)),
            "hashes keep them apart"
        );
        assert!(long.chars().last().unwrap().is_ascii_alphanumeric());
        assert_eq!(label_value("svc-a"), "svc-a");
        for weird in ["", "-x-", &"v".repeat(80), "a b/c"] {
            let v = label_value(weird);
            assert!(v.len() <= 63 && !v.is_empty(), "{weird:?} -> {v:?}");
            assert!(v.starts_with(|c: char| c.is_ascii_alphanumeric()), "{v:?}");
            assert!(v.ends_with(|c: char| c.is_ascii_alphanumeric()), "{v:?}");
        }
    }
}
