//! What a cluster operator applies (`deploy/*.yaml`), checked without a cluster and without root:
//! every document reads as the Kubernetes type of its kind with nothing left over, the agent's
//! RBAC is exactly the read-only set it needs, the DaemonSet carries what the node agent needs
//! (and nothing the API server would refuse), the agent's config file passes the daemon's own
//! parser, the sandbox controller's RBAC is exactly the set it needs (leases in its own namespace
//! only), and its Deployment runs it unprivileged with its probes and leader-election identity.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            ConfigMap, Container, Namespace, PodSpec, Probe, ResourceQuota, ServiceAccount,
        },
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;

const NAMESPACE: &str = "redirector-system";
const AGENT: &str = "redirector";
/// The sandbox controller's ServiceAccount, ClusterRole(Binding) and Deployment.
const CONTROLLER: &str = "redirector-controller";
/// Its leader-election Role and RoleBinding, in [`NAMESPACE`].
const LEADER_ELECTION: &str = "redirector-controller-leader-election";
/// The controller's container, and the address its /healthz and /readyz listen on.
const CONTROLLER_CONTAINER: &str = "controller";
const HEALTH_LISTEN: &str = "0.0.0.0:9091";
const CONFIG_KEY: &str = "redirector.toml";
const CONFIG_PATH: &str = "/etc/redirector/redirector.toml";
/// The one container allowed `privileged`: it mounts a bpffs on the host, which takes
/// Bidirectional propagation, which the API server allows only in privileged containers.
const BPFFS_INIT: &str = "mount-bpffs";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every object under deploy/, typed.
#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    quotas: Vec<ResourceQuota>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    crds: Vec<CustomResourceDefinition>,
}

impl Manifests {
    /// Reads every document of every deploy/*.yaml but the kustomization. Panics on a document
    /// of a kind not listed here, and on one the type does not read back exactly.
    fn load() -> Manifests {
        let mut all = Manifests::default();
        for file in yaml_files() {
            let text = std::fs::read_to_string(deploy_dir().join(&file))
                .unwrap_or_else(|e| panic!("reading deploy/{file}: {e}"));
            for doc in documents(&format!("deploy/{file}"), &text) {
                let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
                let at = format!("deploy/{file}: {kind} {}", doc["metadata"]["name"]);
                match kind.as_str() {
                    "Namespace" => all.namespaces.push(typed(&at, &doc)),
                    "ResourceQuota" => all.quotas.push(typed(&at, &doc)),
                    "ServiceAccount" => all.service_accounts.push(typed(&at, &doc)),
                    "ClusterRole" => all.cluster_roles.push(typed(&at, &doc)),
                    "ClusterRoleBinding" => all.bindings.push(typed(&at, &doc)),
                    "Role" => all.roles.push(typed(&at, &doc)),
                    "RoleBinding" => all.role_bindings.push(typed(&at, &doc)),
                    "ConfigMap" => all.config_maps.push(typed(&at, &doc)),
                    "DaemonSet" => all.daemon_sets.push(typed(&at, &doc)),
                    "Deployment" => all.deployments.push(typed(&at, &doc)),
                    "CustomResourceDefinition" => all.crds.push(typed(&at, &doc)),
                    _ => panic!("{at}: a kind this test does not know; add it here"),
                }
            }
        }
        all
    }

    fn daemon_set(&self) -> &DaemonSet {
        let [ds] = self.daemon_sets.as_slice() else {
            panic!("expected one DaemonSet, found {}", self.daemon_sets.len());
        };
        ds
    }

    fn config_map(&self, name: &str) -> &ConfigMap {
        self.config_maps
            .iter()
            .find(|cm| cm.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no ConfigMap {name:?}"))
    }

    fn deployment(&self, name: &str) -> &Deployment {
        named("Deployment", &self.deployments, name, |d| &d.metadata)
    }

    fn cluster_role(&self, name: &str) -> &ClusterRole {
        named("ClusterRole", &self.cluster_roles, name, |r| &r.metadata)
    }

    fn cluster_role_binding(&self, name: &str) -> &ClusterRoleBinding {
        named("ClusterRoleBinding", &self.bindings, name, |b| &b.metadata)
    }

    fn role(&self, name: &str) -> &Role {
        named("Role", &self.roles, name, |r| &r.metadata)
    }

    fn role_binding(&self, name: &str) -> &RoleBinding {
        named("RoleBinding", &self.role_bindings, name, |b| &b.metadata)
    }
}

/// The one object of `objects` called `name`.
fn named<'a, K>(
    kind: &str,
    objects: &'a [K],
    name: &str,
    meta: impl Fn(&K) -> &ObjectMeta,
) -> &'a K {
    let mut found = objects
        .iter()
        .filter(|o| meta(o).name.as_deref() == Some(name));
    let one = found.next().unwrap_or_else(|| panic!("no {kind} {name:?}"));
    assert!(found.next().is_none(), "two {kind}s {name:?}");
    one
}

/// deploy/*.yaml but kustomization.yaml, by name.
fn yaml_files() -> BTreeSet<String> {
    std::fs::read_dir(deploy_dir())
        .expect("reading deploy/")
        .map(|e| {
            e.expect("deploy/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect()
}

/// The documents of a multi-document YAML file; empty ones (a comment before `---`) are skipped.
fn documents(origin: &str, text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .enumerate()
        .filter_map(|(i, doc)| {
            Option::<Value>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{origin}: document {}: {e}", i + 1))
        })
        .collect()
}

/// `doc` as the Kubernetes type `K`. k8s-openapi ignores fields it does not know, so the typed
/// object is written back and must equal the document: a misspelt or unknown field, or a value
/// of the wrong shape, shows up as a difference.
fn typed<K: DeserializeOwned + Serialize>(at: &str, doc: &Value) -> K {
    let object: K = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{at}: not a {}: {e}", std::any::type_name::<K>()));
    let back = serde_json::to_value(&object).expect("a typed object serializes");
    if let Some(difference) = first_difference("", doc, &back) {
        panic!("{at}: {difference}");
    }
    object
}

/// Where the file's document and the typed object's writing differ, first in document order.
fn first_difference(path: &str, file: &Value, typed: &Value) -> Option<String> {
    match (file, typed) {
        (Value::Object(file), Value::Object(typed)) => {
            for (key, value) in file {
                let at = format!("{path}.{key}");
                match typed.get(key) {
                    None => {
                        return Some(format!(
                            "{at}: not a field of this type (unknown, misspelt or null)"
                        ));
                    }
                    Some(t) => {
                        if let Some(d) = first_difference(&at, value, t) {
                            return Some(d);
                        }
                    }
                }
            }
            typed
                .keys()
                .find(|key| !file.contains_key(*key))
                .map(|key| format!("{path}.{key}: written by the type, absent from the file"))
        }
        (Value::Array(file), Value::Array(typed)) if file.len() == typed.len() => file
            .iter()
            .zip(typed)
            .enumerate()
            .find_map(|(i, (f, t))| first_difference(&format!("{path}[{i}]"), f, t)),
        _ => (file != typed).then(|| format!("{path}: {file} in the file, {typed} as read")),
    }
}

#[test]
fn every_document_is_a_known_kubernetes_object() {
    let all = Manifests::load();
    let namespaced = all
        .quotas
        .iter()
        .map(|o| (&o.metadata, "ResourceQuota"))
        .chain(
            all.service_accounts
                .iter()
                .map(|o| (&o.metadata, "ServiceAccount")),
        )
        .chain(all.config_maps.iter().map(|o| (&o.metadata, "ConfigMap")))
        .chain(all.daemon_sets.iter().map(|o| (&o.metadata, "DaemonSet")))
        .chain(all.deployments.iter().map(|o| (&o.metadata, "Deployment")))
        .chain(all.roles.iter().map(|o| (&o.metadata, "Role")))
        .chain(
            all.role_bindings
                .iter()
                .map(|o| (&o.metadata, "RoleBinding")),
        );
    for (meta, kind) in namespaced {
        assert_eq!(
            meta.namespace.as_deref(),
            Some(NAMESPACE),
            "{kind} {:?} must be in {NAMESPACE}",
            meta.name
        );
    }
    let namespaces: Vec<_> = all
        .namespaces
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    assert_eq!(namespaces, [NAMESPACE]);
}

#[test]
fn the_kustomization_applies_every_file_crds_first() {
    let text = std::fs::read_to_string(deploy_dir().join("kustomization.yaml"))
        .expect("reading deploy/kustomization.yaml");
    let docs = documents("deploy/kustomization.yaml", &text);
    let [kustomization] = docs.as_slice() else {
        panic!("deploy/kustomization.yaml: expected one document");
    };
    assert_eq!(kustomization["kind"], "Kustomization");
    let resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .expect("resources is a list")
        .iter()
        .map(|r| r.as_str().expect("a resource is a file name"))
        .collect();
    assert_eq!(
        resources,
        [
            "crds.yaml",
            "namespace.yaml",
            "rbac.yaml",
            "daemonset.yaml",
            "controller.yaml"
        ],
        "apply order: CRDs, namespace, RBAC, agent, controller"
    );
    let listed: BTreeSet<String> = resources.iter().map(|r| r.to_string()).collect();
    assert_eq!(listed, yaml_files(), "every deploy/*.yaml is applied");
}

/// (API group, resource) -> verbs.
type Grants = BTreeMap<(String, String), BTreeSet<String>>;

/// `(group, resource, verbs)` rows as [`Grants`].
fn grants(rows: &[(&str, &str, &[&str])]) -> Grants {
    rows.iter()
        .map(|(group, resource, verbs)| {
            (
                ((*group).to_owned(), (*resource).to_owned()),
                verbs.iter().map(|v| (*v).to_owned()).collect(),
            )
        })
        .collect()
}

/// What `rules` grant, per (group, resource). Panics on anything but plain resource rules: a
/// resourceNames or nonResourceURLs rule, or a wildcard, would slip past an exact comparison.
fn granted(at: &str, rules: &[PolicyRule]) -> Grants {
    let mut granted = Grants::new();
    for rule in rules {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{at}: plain resource rules only: {rule:?}"
        );
        let words = rule
            .api_groups
            .iter()
            .flatten()
            .chain(rule.resources.iter().flatten())
            .chain(&rule.verbs);
        for word in words {
            assert_ne!(word, "*", "{at}: no wildcard: {rule:?}");
        }
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted
                    .entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    granted
}

fn expected_rules() -> Grants {
    const READ: &[&str] = &["get", "list", "watch"];
    grants(&[
        ("redirector.dev", "sandboxes", READ),
        ("redirector.dev", "routegroups", READ),
        ("", "pods", READ),
        ("", "services", READ),
        ("discovery.k8s.io", "endpointslices", READ),
    ])
}

/// The sandbox controller's ClusterRole: what the comments in deploy/rbac.yaml justify, verb by
/// verb. A verb added there without a reason here (or dropped) fails the comparison.
fn expected_controller_rules() -> Grants {
    const READ: &[&str] = &["get", "list", "watch"];
    const WRITE: &[&str] = &[
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    grants(&[
        // Finalizer (patch/update), TTL expiry (delete); never create.
        (
            "redirector.dev",
            "sandboxes",
            &["get", "list", "watch", "patch", "update", "delete"],
        ),
        ("redirector.dev", "sandboxes/status", &["patch", "update"]),
        // blockOwnerDeletion on the forks' owner references.
        ("redirector.dev", "sandboxes/finalizers", &["update"]),
        ("redirector.dev", "routegroups", READ),
        ("redirector.dev", "routegroups/status", &["patch", "update"]),
        // Baselines read, forks written.
        ("apps", "deployments", WRITE),
        ("", "services", WRITE),
        ("", "pods", READ),
        ("discovery.k8s.io", "endpointslices", READ),
    ])
}

/// Leader election, in the controller's own namespace.
fn expected_leader_election_rules() -> Grants {
    grants(&[(
        "coordination.k8s.io",
        "leases",
        &["get", "list", "watch", "create", "update", "patch"],
    )])
}

fn subjects(subjects: Option<&Vec<Subject>>) -> Vec<(&str, &str, Option<&str>)> {
    subjects
        .into_iter()
        .flatten()
        .map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()))
        .collect()
}

#[test]
fn the_agent_may_only_read_what_it_watches() {
    let all = Manifests::load();
    let role = all.cluster_role(AGENT);
    assert!(role.aggregation_rule.is_none(), "no aggregated rules");
    let rules = role.rules.as_deref().unwrap_or_default();
    assert_eq!(
        granted("ClusterRole redirector", rules),
        expected_rules(),
        "get/list/watch on exactly these"
    );

    let binding = all.cluster_role_binding(AGENT);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    assert_eq!(
        subjects(binding.subjects.as_ref()),
        [("ServiceAccount", AGENT, Some(NAMESPACE))]
    );
    let accounts: BTreeSet<_> = all
        .service_accounts
        .iter()
        .filter_map(|a| a.metadata.name.as_deref())
        .collect();
    assert_eq!(
        accounts,
        [AGENT, CONTROLLER].into(),
        "one account for the agent, one for the controller"
    );
    let pod = all
        .daemon_set()
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(AGENT));
    // The agent gets nothing else: no other binding names its account.
    let bound_elsewhere = all
        .bindings
        .iter()
        .filter(|b| b.metadata.name.as_deref() != Some(AGENT))
        .flat_map(|b| subjects(b.subjects.as_ref()))
        .chain(
            all.role_bindings
                .iter()
                .flat_map(|b| subjects(b.subjects.as_ref())),
        )
        .any(|(_, name, _)| name == AGENT);
    assert!(
        !bound_elsewhere,
        "the agent is bound to its ClusterRole only"
    );
}

#[test]
fn the_controller_may_do_exactly_what_it_needs() {
    let all = Manifests::load();
    let role = all.cluster_role(CONTROLLER);
    assert!(role.aggregation_rule.is_none(), "no aggregated rules");
    let rules = role.rules.as_deref().unwrap_or_default();
    assert_eq!(
        granted("ClusterRole redirector-controller", rules),
        expected_controller_rules(),
        "the controller's cluster-wide verbs, exactly"
    );
    let binding = all.cluster_role_binding(CONTROLLER);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, CONTROLLER);
    assert_eq!(
        subjects(binding.subjects.as_ref()),
        [("ServiceAccount", CONTROLLER, Some(NAMESPACE))]
    );

    let leases = all.role(LEADER_ELECTION);
    assert_eq!(leases.metadata.namespace.as_deref(), Some(NAMESPACE));
    let rules = leases.rules.as_deref().unwrap_or_default();
    assert_eq!(
        granted("Role redirector-controller-leader-election", rules),
        expected_leader_election_rules(),
        "leader election, exactly"
    );
    let binding = all.role_binding(LEADER_ELECTION);
    assert_eq!(binding.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        (
            binding.role_ref.kind.as_str(),
            binding.role_ref.name.as_str()
        ),
        ("Role", LEADER_ELECTION),
        "a Role, so the grant stays in {NAMESPACE}"
    );
    assert_eq!(
        subjects(binding.subjects.as_ref()),
        [("ServiceAccount", CONTROLLER, Some(NAMESPACE))]
    );

    let pod = pod_spec(all.deployment(CONTROLLER));
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some(CONTROLLER),
        "the Deployment runs as the account the bindings name"
    );
    assert!(
        all.service_accounts.iter().any(|a| {
            a.metadata.name.as_deref() == Some(CONTROLLER)
                && a.metadata.namespace.as_deref() == Some(NAMESPACE)
        }),
        "the ServiceAccount the Deployment and the bindings name"
    );
}

/// No ClusterRole lets anyone touch leases, and no RoleBinding lends a ClusterRole into a
/// namespace: the controller's lease writes stay in its own namespace, where other components'
/// leader election cannot be disrupted.
#[test]
fn lease_writes_are_namespaced_only() {
    let all = Manifests::load();
    for role in &all.cluster_roles {
        let at = format!("ClusterRole {:?}", role.metadata.name);
        let granted = granted(&at, role.rules.as_deref().unwrap_or_default());
        assert!(
            !granted
                .keys()
                .any(|(group, _)| group == "coordination.k8s.io"),
            "{at}: no cluster-wide lease permission"
        );
    }
    for binding in &all.role_bindings {
        assert_eq!(
            binding.role_ref.kind, "Role",
            "RoleBinding {:?} binds a Role of its namespace",
            binding.metadata.name
        );
    }
    for role in &all.roles {
        assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
    }
}

/// Every binding names a role and an account that deploy/ creates.
#[test]
fn every_binding_names_what_exists() {
    let all = Manifests::load();
    let accounts: BTreeSet<(&str, &str)> = all
        .service_accounts
        .iter()
        .filter_map(|a| {
            Some((
                a.metadata.namespace.as_deref()?,
                a.metadata.name.as_deref()?,
            ))
        })
        .collect();
    let check_subjects = |at: &str, list: Option<&Vec<Subject>>| {
        let list = subjects(list);
        assert!(!list.is_empty(), "{at}: binds someone");
        for (kind, name, namespace) in list {
            assert_eq!(kind, "ServiceAccount", "{at}");
            let namespace = namespace.unwrap_or_else(|| panic!("{at}: subject namespace"));
            assert!(
                accounts.contains(&(namespace, name)),
                "{at}: no ServiceAccount {namespace}/{name}"
            );
        }
    };
    for b in &all.bindings {
        let at = format!("ClusterRoleBinding {:?}", b.metadata.name);
        assert_eq!(b.role_ref.kind, "ClusterRole", "{at}");
        all.cluster_role(&b.role_ref.name);
        check_subjects(&at, b.subjects.as_ref());
    }
    for b in &all.role_bindings {
        let at = format!("RoleBinding {:?}", b.metadata.name);
        let role = all.role(&b.role_ref.name);
        assert_eq!(
            role.metadata.namespace, b.metadata.namespace,
            "{at}: the Role is in the binding's namespace"
        );
        check_subjects(&at, b.subjects.as_ref());
    }
}

#[test]
fn the_crds_define_the_resources_the_agent_reads() {
    let all = Manifests::load();
    let defined: BTreeSet<(String, String, String)> = all
        .crds
        .iter()
        .map(|crd| {
            (
                crd.spec.group.clone(),
                crd.spec.names.plural.clone(),
                crd.spec.names.kind.clone(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String, String)> = [
        ("redirector.dev", "sandboxes", "Sandbox"),
        ("redirector.dev", "routegroups", "RouteGroup"),
    ]
    .map(|(g, p, k)| (g.to_owned(), p.to_owned(), k.to_owned()))
    .into();
    assert_eq!(
        defined, want,
        "deploy/crds.yaml (generated by `redirector crds`) defines these, and RBAC names them"
    );
    for crd in &all.crds {
        assert!(
            crd.spec
                .versions
                .iter()
                .any(|v| v.name == "v1alpha1" && v.served && v.storage),
            "{} serves and stores v1alpha1",
            crd.spec.names.kind
        );
    }
}

fn container<'a>(containers: &'a [Container], name: &str) -> &'a Container {
    containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name:?}"))
}

fn is_privileged(c: &Container) -> bool {
    c.security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false)
}

/// The container port an HTTP probe on `path` reaches, by number or by the port's name.
fn probe_port(c: &Container, path: &str, probe: Option<&Probe>) -> i32 {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{}: an HTTP probe on {path}", c.name));
    assert_eq!(get.path.as_deref(), Some(path));
    match &get.port {
        IntOrString::Int(port) => *port,
        IntOrString::String(name) => {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| {
                    panic!("{}: probe port {name:?} is not a container port", c.name)
                })
                .container_port
        }
    }
}

fn pod_spec(deployment: &Deployment) -> &PodSpec {
    deployment
        .spec
        .as_ref()
        .expect("Deployment spec")
        .template
        .spec
        .as_ref()
        .expect("pod spec")
}

/// The value of `--flag VALUE` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

#[test]
fn the_daemonset_has_what_the_node_agent_needs() {
    let all = Manifests::load();
    let ds = all.daemon_set();
    let spec = ds.spec.as_ref().expect("DaemonSet spec");

    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));

    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref());
    for (key, value) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            template_labels.and_then(|l| l.get(key)),
            Some(value),
            "the selector matches the pods"
        );
    }

    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.host_pid, Some(true), "hostPID: the /proc scan");
    assert_eq!(pod.host_network, Some(true), "hostNetwork: the node router");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint"
    );

    // Privileged is allowed only where the API server demands it: Bidirectional propagation,
    // which only the bpffs init container uses, and only for the bpffs.
    let init = pod.init_containers.as_deref().unwrap_or_default();
    let every = init.iter().chain(&pod.containers);
    for c in every {
        let bidirectional: Vec<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.mount_propagation.as_deref() == Some("Bidirectional"))
            .map(|m| m.mount_path.as_str())
            .collect();
        if is_privileged(c) {
            assert_eq!(c.name, BPFFS_INIT, "no other container is privileged");
            assert!(
                init.iter().any(|i| i.name == c.name),
                "{BPFFS_INIT} is an init container"
            );
            let mounts: Vec<&str> = c
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.as_str())
                .collect();
            assert_eq!(mounts, ["/sys/fs/bpf"], "{BPFFS_INIT} sees the bpffs only");
            assert_eq!(bidirectional, ["/sys/fs/bpf"]);
        } else {
            assert!(
                bidirectional.is_empty(),
                "{}: Bidirectional needs a privileged container",
                c.name
            );
        }
    }

    let agent = container(&pod.containers, AGENT);
    assert!(!is_privileged(agent), "the agent is not privileged");
    let security = agent.security_context.as_ref().expect("securityContext");
    assert_ne!(
        security.allow_privilege_escalation,
        Some(false),
        "the API server refuses allowPrivilegeEscalation: false with SYS_ADMIN"
    );
    let caps = security.capabilities.as_ref().expect("capabilities");
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(
        added,
        [
            "BPF",
            "NET_ADMIN",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "SYS_RESOURCE"
        ]
        .into(),
        "the capabilities the README explains"
    );
    let dropped: Vec<&str> = caps.drop.iter().flatten().map(String::as_str).collect();
    assert_eq!(dropped, ["ALL"]);

    let args = agent.args.as_deref().expect("args");
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert!(args.iter().any(|a| a == "--kubernetes"));
    assert_eq!(flag(args, "--config"), Some(CONFIG_PATH));
    assert_eq!(flag(args, "--node-name"), Some("$(NODE_NAME)"));
    assert_eq!(flag(args, "--router-listen"), Some("$(HOST_IP):15001"));
    let env: BTreeMap<&str, &str> = agent
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let field = e.value_from.as_ref()?.field_ref.as_ref()?;
            Some((e.name.as_str(), field.field_path.as_str()))
        })
        .collect();
    assert_eq!(env.get("NODE_NAME"), Some(&"spec.nodeName"));
    assert_eq!(env.get("HOST_IP"), Some(&"status.hostIP"));

    let ports: BTreeMap<&str, i32> = agent
        .ports
        .iter()
        .flatten()
        .filter_map(|p| Some((p.name.as_deref()?, p.container_port)))
        .collect();
    assert_eq!(ports.get("router"), Some(&15001));
    let ready = probe_port(agent, "/readyz", agent.readiness_probe.as_ref());
    let live = probe_port(agent, "/healthz", agent.liveness_probe.as_ref());
    assert_eq!(
        (ready, live),
        (9464, 9464),
        "both probes on the metrics port"
    );

    let resources = agent.resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    assert!(
        resources
            .limits
            .as_ref()
            .is_some_and(|l| l.contains_key("memory")),
        "a memory limit"
    );

    // Host paths: where each volume comes from and how the agent mounts it.
    let volumes: BTreeMap<&str, &k8s_openapi::api::core::v1::Volume> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mount = |path: &str| {
        let m = agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("the agent mounts {path}"));
        (m, volumes[m.name.as_str()])
    };
    let host_path =
        |v: &k8s_openapi::api::core::v1::Volume| v.host_path.as_ref().map(|h| h.path.clone());
    let (bpffs, volume) = mount("/sys/fs/bpf");
    assert_eq!(host_path(volume).as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    let (cgroup, volume) = mount("/sys/fs/cgroup");
    assert_eq!(host_path(volume).as_deref(), Some("/sys/fs/cgroup"));
    assert_eq!(cgroup.read_only, Some(true), "attaching needs no write");
    let (_, volume) = mount("/var/lib/redirector");
    assert_eq!(host_path(volume).as_deref(), Some("/var/lib/redirector"));
    let (config, volume) = mount("/etc/redirector");
    assert_eq!(config.read_only, Some(true));
    let config_map = volume
        .config_map
        .as_ref()
        .expect("the config is a ConfigMap");
    all.config_map(&config_map.name);
}

#[test]
fn the_config_file_passes_the_daemons_parser() {
    let all = Manifests::load();
    let pod = all
        .daemon_set()
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.config_map.as_ref())
        .expect("a ConfigMap volume");
    let text = all
        .config_map(&volume.name)
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY))
        .unwrap_or_else(|| panic!("the ConfigMap has {CONFIG_KEY}"));

    let config = redirector_user::config::parse(text).unwrap_or_else(|errors| {
        panic!("{CONFIG_KEY} is refused by the daemon's parser: {errors:#?}")
    });
    let daemon = &config.daemon;
    assert_eq!(
        daemon.bpffs.as_deref(),
        Some(Path::new("/sys/fs/bpf/redirector")),
        "pins on the host's bpffs volume"
    );
    assert_eq!(
        daemon.state_file.as_deref(),
        Some(Path::new("/var/lib/redirector/state.json")),
        "the state file on its hostPath volume"
    );
    assert_eq!(
        daemon.metrics_listen.map(|a| a.port()),
        Some(9464),
        "the probes' port"
    );
    assert_eq!(daemon.cgroup, None, "the Kubernetes source finds kubepods");
    assert!(config.router.listen.is_empty(), "--router-listen sets it");

    let kubernetes = &config.kubernetes;
    assert!(kubernetes.enabled, "[kubernetes] enabled = true");
    assert_eq!(
        kubernetes.proc_root.as_deref(),
        Some(Path::new("/proc")),
        "hostPID: the container's /proc is the node's"
    );
    assert_eq!(kubernetes.kubeconfig, None, "in-cluster configuration");
    assert_eq!(kubernetes.node_name, None, "--node-name sets it");
}

/// The README's "On a cluster" example is a Sandbox as the agent reads it.
#[test]
fn the_readmes_sandbox_reads_as_a_sandbox() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("reading README.md");
    let example = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|block| block.split_once("```").map(|(yaml, _)| yaml))
        .find(|yaml| yaml.contains("kind: Sandbox\n"))
        .expect("README.md shows a Sandbox in a yaml block");
    let [doc] = documents("README.md", example)
        .try_into()
        .expect("one document");
    let sandbox: redirector_user::k8s::crd::Sandbox = typed("README.md: Sandbox", &doc);
    assert_eq!(sandbox.routing_key(), "pr-123");
    assert_eq!(sandbox.spec.forks.len(), 2);
    assert_eq!(sandbox.spec.members.len(), 1);
}

#[test]
fn the_controller_deployment_runs_it_unprivileged_with_probes_and_identity() {
    let all = Manifests::load();
    let deployment = all.deployment(CONTROLLER);
    let spec = deployment.spec.as_ref().expect("Deployment spec");
    assert_eq!(
        spec.replicas,
        Some(2),
        "a standby: leader election makes two safe"
    );

    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    assert!(!selector.is_empty(), "selects by label");
    for (key, value) in &selector {
        assert_eq!(
            template_labels.get(key),
            Some(value),
            "the selector matches the pods"
        );
    }
    // The agent's DaemonSet and the controller's Deployment must not claim each other's pods.
    let agent_spec = all.daemon_set().spec.as_ref().unwrap();
    let agent_selector = agent_spec.selector.match_labels.clone().unwrap_or_default();
    let agent_labels = agent_spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selects = |selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>| {
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(
        !selects(&agent_selector, &template_labels),
        "the DaemonSet does not select the controller"
    );
    assert!(
        !selects(&selector, &agent_labels),
        "the Deployment does not select the agent"
    );

    let pod = pod_spec(deployment);
    assert_eq!(pod.service_account_name.as_deref(), Some(CONTROLLER));
    assert_ne!(pod.host_pid, Some(true), "no host namespaces");
    assert_ne!(pod.host_network, Some(true), "no host namespaces");
    assert!(
        pod.volumes.as_deref().unwrap_or_default().is_empty(),
        "no volumes: nothing on the node, nothing written"
    );
    assert!(pod.init_containers.is_none(), "no init container");

    // Spread over nodes, as a preference only: a one-node cluster still runs both replicas.
    let spread = pod
        .topology_spread_constraints
        .iter()
        .flatten()
        .any(|t| t.topology_key == "kubernetes.io/hostname");
    let anti_affinity = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref());
    let preferred_anti_affinity = anti_affinity
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_some_and(|terms| {
            terms
                .iter()
                .any(|t| t.pod_affinity_term.topology_key == "kubernetes.io/hostname")
        });
    assert!(
        spread || preferred_anti_affinity,
        "replicas spread over nodes"
    );
    assert!(
        pod.topology_spread_constraints
            .iter()
            .flatten()
            .all(|t| t.when_unsatisfiable == "ScheduleAnyway"),
        "spreading is preferred, not required"
    );
    assert!(
        anti_affinity
            .and_then(|a| a
                .required_during_scheduling_ignored_during_execution
                .as_ref())
            .is_none_or(Vec::is_empty),
        "no required anti-affinity"
    );

    let [controller] = pod.containers.as_slice() else {
        panic!("one container, found {}", pod.containers.len());
    };
    assert_eq!(controller.name, CONTROLLER_CONTAINER);
    let agent = container(&pod_spec_of_daemon_set(&all).containers, AGENT);
    assert_eq!(
        controller.image, agent.image,
        "the agent's image (kustomize sets the tag of both)"
    );

    let args = controller.args.as_deref().expect("args");
    assert_eq!(
        args.first().map(String::as_str),
        Some("controller"),
        "runs `redirector controller`"
    );
    assert!(controller.command.is_none(), "the image's entrypoint");
    let health: std::net::SocketAddr = flag(args, "--health-listen")
        .expect("--health-listen")
        .parse()
        .expect("--health-listen is ADDR:PORT");
    assert!(
        health.ip().is_unspecified(),
        "the kubelet probes the pod's address"
    );
    assert_eq!(health.to_string(), HEALTH_LISTEN);

    let env: BTreeMap<&str, &str> = controller
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let field = e.value_from.as_ref()?.field_ref.as_ref()?;
            Some((e.name.as_str(), field.field_path.as_str()))
        })
        .collect();
    assert_eq!(
        env.get("POD_NAME"),
        Some(&"metadata.name"),
        "--identity: each replica its own"
    );
    assert_eq!(
        env.get("POD_NAMESPACE"),
        Some(&"metadata.namespace"),
        "--lease-namespace: where its Role lets it write leases"
    );

    let port = i32::from(health.port());
    assert_eq!(
        probe_port(controller, "/healthz", controller.liveness_probe.as_ref()),
        port,
        "liveness on --health-listen"
    );
    assert_eq!(
        probe_port(controller, "/readyz", controller.readiness_probe.as_ref()),
        port,
        "readiness on --health-listen"
    );

    // Non-root, read-only, unprivileged, no capability: the restricted Pod Security Standard.
    let pod_security = pod.security_context.clone().unwrap_or_default();
    let security = controller
        .security_context
        .as_ref()
        .expect("container securityContext");
    let run_as_non_root = security.run_as_non_root.or(pod_security.run_as_non_root);
    assert_eq!(run_as_non_root, Some(true), "runAsNonRoot");
    let user = security.run_as_user.or(pod_security.run_as_user);
    assert!(
        user.is_some_and(|uid| uid != 0),
        "a non-root uid: the image's user is root, so the kubelet would refuse runAsNonRoot alone"
    );
    assert!(!is_privileged(controller), "not privileged");
    assert_eq!(
        security.allow_privilege_escalation,
        Some(false),
        "allowPrivilegeEscalation: false"
    );
    assert_eq!(
        security.read_only_root_filesystem,
        Some(true),
        "a read-only root filesystem"
    );
    let caps = security.capabilities.as_ref().expect("capabilities");
    let dropped: Vec<&str> = caps.drop.iter().flatten().map(String::as_str).collect();
    assert_eq!(dropped, ["ALL"]);
    assert!(
        caps.add.as_deref().unwrap_or_default().is_empty(),
        "no capability added"
    );
    let seccomp = security
        .seccomp_profile
        .as_ref()
        .or(pod_security.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    assert_eq!(seccomp, Some("RuntimeDefault"));

    let resources = controller.resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    assert!(
        resources
            .limits
            .as_ref()
            .is_some_and(|l| l.contains_key("memory")),
        "a memory limit"
    );
}

fn pod_spec_of_daemon_set(all: &Manifests) -> &PodSpec {
    all.daemon_set()
        .spec
        .as_ref()
        .expect("DaemonSet spec")
        .template
        .spec
        .as_ref()
        .expect("pod spec")
}
