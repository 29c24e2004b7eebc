//! From cluster objects to the daemon's desired state: pure functions, no API calls.
//!
//! - Each port of a forked Service is one kernel service per cluster IP (dual-stack Services
//!   give both families), named `k8s:<namespace>/<service>:<port>[/v6]`; TCP ports whose
//!   `appProtocol` is `http`, `h2c`, `grpc` or `kubernetes.io/h2c` are HTTP services.
//! - A fork's endpoints are the ready endpoints of its own Service's EndpointSlices, on the port
//!   whose *name* matches the baseline Service port's name (so named `targetPort`s work).
//! - Members are the pods of this node that a member selector picks, plus the fork's own pods
//!   on this node, so a fork calling another forked service of its sandbox stays inside it.
//!
//! A problem with one object is reported against that object and leaves the others alone: one
//! bad Sandbox never stops another from being steered.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Pod, Service as KubeService, ServicePort},
    discovery::v1::EndpointSlice,
};
use kube::{
    ResourceExt as _,
    core::{Selector, SelectorExt as _},
};

use k8s_openapi::apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString};

use super::crd::{MemberSelector, OnForkError, RouteGroup, RoutedFork, Sandbox};
use crate::{
    routing_key,
    state::{
        DesiredState, ForkErrorPolicy, Group, Protocol, Route, Sandbox as StateSandbox, Service,
    },
};

/// Label EndpointSlices carry naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the node agent sees of the cluster.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub sandboxes: Vec<Arc<Sandbox>>,
    pub groups: Vec<Arc<RouteGroup>>,
    pub services: Vec<Arc<KubeService>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// The Pods of this node only.
    pub pods: Vec<Arc<Pod>>,
    /// Pods of the whole cluster that forks given by a selector pick, by [`SelectorKey`]
    /// (see [`fork_selectors`]: the source watches exactly those).
    pub selected: HashMap<SelectorKey, Vec<Arc<Pod>>>,
}

/// A label selector in a namespace, as a watch's label-selector string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SelectorKey {
    pub namespace: String,
    pub selector: String,
}

/// The pod selectors of every fork given by `to.selector`: what the source must watch, cluster
/// wide, for those forks' endpoints.
pub fn fork_selectors(snapshot: &Snapshot) -> BTreeSet<SelectorKey> {
    let mut out = BTreeSet::new();
    for sandbox in &snapshot.sandboxes {
        for fork in sandbox.routed_forks().into_iter().flatten() {
            if let Some(key) = fork
                .to
                .selector
                .as_ref()
                .and_then(|s| selector_key(&fork.to_namespace, s))
            {
                out.insert(key);
            }
        }
    }
    out
}

fn selector_key(namespace: &str, selector: &LabelSelector) -> Option<SelectorKey> {
    let selector = Selector::try_from(selector.clone()).ok()?;
    Some(SelectorKey {
        namespace: namespace.to_owned(),
        selector: selector.to_string(),
    })
}

/// A pod's network-namespace path, or why it has none.
pub type Netns = Result<PathBuf, String>;

/// A problem with one object, which is left out of the state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectIssue {
    /// `Sandbox shop/pr-1`, `RouteGroup shop/both`.
    pub object: String,
    pub message: String,
}

/// A pod of this node that belongs to a routing key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberPod {
    pub uid: String,
    /// `namespace/name`, for messages.
    pub name: String,
    pub ips: Vec<IpAddr>,
}

/// The state the cluster asks for, and what could not be part of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Derived {
    pub state: DesiredState,
    pub issues: Vec<ObjectIssue>,
    /// Member pods by routing key, resolved to namespace paths or not.
    pub members: BTreeMap<String, Vec<(MemberPod, Netns)>>,
}

/// The pods of this node that each Sandbox and RouteGroup claims as members, by routing key.
/// This is what the namespace resolver has to find before [`derive`] can finish.
pub fn member_pods(snapshot: &Snapshot) -> BTreeMap<String, BTreeSet<MemberPod>> {
    let index = Index::new(snapshot);
    let mut out: BTreeMap<String, BTreeSet<MemberPod>> = BTreeMap::new();
    for sandbox in index.live_sandboxes() {
        let key = sandbox.routing_key().to_owned();
        let pods = out.entry(key).or_default();
        pods.extend(index.selected_pods(
            &sandbox.namespace().unwrap_or_default(),
            &sandbox.spec.members,
        ));
        pods.extend(index.fork_pods(sandbox));
    }
    for group in &snapshot.groups {
        let ns = group.namespace().unwrap_or_default();
        out.entry(group.spec.routing_key.clone())
            .or_default()
            .extend(index.selected_pods(&ns, &group.spec.members));
    }
    out.retain(|_, pods| !pods.is_empty());
    out
}

/// The desired state for `snapshot`: `claimed` is what [`member_pods`] found for it (the
/// caller resolved those pods already, so it is not worked out twice), `netns` their namespace
/// paths by pod UID (an `Err` says why a pod has none).
pub fn derive(
    snapshot: &Snapshot,
    claimed: &BTreeMap<String, BTreeSet<MemberPod>>,
    netns: &HashMap<String, Netns>,
) -> Derived {
    let index = Index::new(snapshot);
    let mut out = Derived::default();
    let mut member_of: HashMap<String, String> = HashMap::new();

    for sandbox in index.live_sandboxes() {
        let object = object_name("Sandbox", sandbox.as_ref());
        let key = sandbox.routing_key().to_owned();
        if let Err(err) = routing_key::validate(&key) {
            out.issues.push(ObjectIssue {
                object,
                message: format!("routing key: {err}"),
            });
            continue;
        }
        if out.state.sandboxes.contains_key(&key) {
            out.issues.push(ObjectIssue {
                object,
                message: format!("routing key {key:?} is taken by an older Sandbox"),
            });
            continue;
        }
        let mut routes = BTreeMap::new();
        let mut services = Vec::new();
        let mut problems = Vec::new();
        for fork in sandbox.routed_forks() {
            match fork.and_then(|fork| index.fork_routes(&fork)) {
                Ok(found) => {
                    for (service, route) in found {
                        routes.insert(service.name.clone(), route);
                        services.push(service);
                    }
                }
                Err(message) => problems.push(message),
            }
        }
        if !problems.is_empty() {
            // A half-routed sandbox would send some of a test's calls to the baseline without
            // a word: leave it out whole and say why.
            out.issues.push(ObjectIssue {
                object,
                message: problems.join("; "),
            });
            continue;
        }
        for service in services {
            out.state.services.insert(service.name.clone(), service);
        }
        let members = members_of(&key, claimed, netns, &mut member_of, &mut out);
        out.state.sandboxes.insert(
            key.clone(),
            StateSandbox {
                key,
                members,
                routes,
                inject_key: sandbox.spec.inject_key,
            },
        );
    }

    for group in &snapshot.groups {
        let object = object_name("RouteGroup", group.as_ref());
        let key = group.spec.routing_key.clone();
        let ns = group.namespace().unwrap_or_default();
        let sandboxes = match index.group_sandboxes(group, &ns) {
            Ok(keys) => keys,
            Err(message) => {
                out.issues.push(ObjectIssue { object, message });
                continue;
            }
        };
        if let Err(err) = routing_key::validate(&key) {
            out.issues.push(ObjectIssue {
                object,
                message: format!("routing key: {err}"),
            });
            continue;
        }
        if out.state.sandboxes.contains_key(&key) || out.state.groups.contains_key(&key) {
            out.issues.push(ObjectIssue {
                object,
                message: format!("routing key {key:?} is taken by another object"),
            });
            continue;
        }
        let members = members_of(&key, claimed, netns, &mut member_of, &mut out);
        out.state.groups.insert(
            key.clone(),
            Group {
                key,
                sandboxes,
                members,
            },
        );
    }

    // What the daemon's validator would refuse (a group whose sandboxes fork the same
    // service, ...) is reported here against the object, and the object left out.
    if let Err(issues) = out.state.validate() {
        for issue in issues {
            drop_offender(&mut out, &issue.field);
            out.issues.push(ObjectIssue {
                object: issue.field,
                message: issue.message,
            });
        }
    }
    out
}

/// The namespace paths of `key`'s member pods; a pod two keys claim stays with the first.
fn members_of(
    key: &str,
    claimed: &BTreeMap<String, BTreeSet<MemberPod>>,
    netns: &HashMap<String, Netns>,
    member_of: &mut HashMap<String, String>,
    out: &mut Derived,
) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut report = Vec::new();
    for pod in claimed.get(key).into_iter().flatten() {
        if let Some(other) = member_of.get(&pod.uid) {
            out.issues.push(ObjectIssue {
                object: format!("Pod {}", pod.name),
                message: format!(
                    "claimed by {key:?} and {other:?}; it stays a member of {other:?}"
                ),
            });
            continue;
        }
        member_of.insert(pod.uid.clone(), key.to_owned());
        let resolved = netns
            .get(&pod.uid)
            .cloned()
            .unwrap_or_else(|| Err("not resolved yet".to_owned()));
        if let Ok(path) = &resolved {
            paths.push(path.clone());
        }
        report.push((pod.clone(), resolved));
    }
    paths.sort();
    paths.dedup();
    out.members.insert(key.to_owned(), report);
    paths
}

/// Removes the object a validation issue names (`sandbox "k" ...`, `group "k" ...`).
fn drop_offender(out: &mut Derived, field: &str) {
    let quoted = |prefix: &str| {
        field
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('"'))
            .and_then(|rest| rest.split('"').next())
            .map(str::to_owned)
    };
    if let Some(key) = quoted("sandbox ") {
        out.state.sandboxes.remove(&key);
    } else if let Some(key) = quoted("group ") {
        out.state.groups.remove(&key);
    }
}

fn object_name(kind: &str, object: &impl kube::Resource) -> String {
    format!(
        "{kind} {}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// Lookups over one snapshot.
struct Index<'a> {
    snapshot: &'a Snapshot,
    services: HashMap<(String, String), &'a KubeService>,
    /// EndpointSlices by (namespace, service name).
    slices: HashMap<(String, String), Vec<&'a EndpointSlice>>,
    /// This node's pods by (namespace, name).
    pods: HashMap<(String, String), &'a Pod>,
}

impl<'a> Index<'a> {
    fn new(snapshot: &'a Snapshot) -> Index<'a> {
        let services = snapshot
            .services
            .iter()
            .map(|s| {
                (
                    (s.namespace().unwrap_or_default(), s.name_any()),
                    s.as_ref(),
                )
            })
            .collect();
        let mut slices: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
        for slice in &snapshot.slices {
            if let Some(service) = slice.labels().get(SERVICE_NAME_LABEL) {
                slices
                    .entry((slice.namespace().unwrap_or_default(), service.clone()))
                    .or_default()
                    .push(slice);
            }
        }
        let pods = snapshot
            .pods
            .iter()
            .map(|p| {
                (
                    (p.namespace().unwrap_or_default(), p.name_any()),
                    p.as_ref(),
                )
            })
            .collect();
        Index {
            snapshot,
            services,
            slices,
            pods,
        }
    }

    /// Sandboxes not being deleted, oldest first, so that the older of two Sandboxes with the
    /// same routing key keeps it.
    fn live_sandboxes(&self) -> Vec<&'a Arc<Sandbox>> {
        let mut live: Vec<&Arc<Sandbox>> = self
            .snapshot
            .sandboxes
            .iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .collect();
        live.sort_by_key(|s| {
            (
                s.metadata.creation_timestamp.clone().map(|t| t.0),
                s.namespace(),
                s.name_any(),
            )
        });
        live
    }

    /// Running pods of this node in `namespace` (or a selector's own) that `selectors` pick.
    fn selected_pods(&self, namespace: &str, selectors: &[MemberSelector]) -> Vec<MemberPod> {
        let mut out = Vec::new();
        for member in selectors {
            let ns = member.namespace.as_deref().unwrap_or(namespace);
            let Ok(selector) = Selector::try_from(member.label_selector.clone()) else {
                continue;
            };
            for pod in &self.snapshot.pods {
                if pod.namespace().as_deref() == Some(ns) && selector.matches(pod.labels()) {
                    out.extend(member_pod(pod));
                }
            }
        }
        out
    }

    /// The fork's own pods on this node: the targets of its Service's endpoints.
    fn fork_pods(&self, sandbox: &Sandbox) -> Vec<MemberPod> {
        let mut out = Vec::new();
        for fork in sandbox.routed_forks().into_iter().flatten() {
            let ns = &fork.to_namespace;
            if let Some(selector) = &fork.to.selector {
                for pod in self.selected_by(ns, selector) {
                    let key = (pod.namespace().unwrap_or_default(), pod.name_any());
                    if let Some(local) = self.pods.get(&key) {
                        out.extend(member_pod(local));
                    }
                }
                continue;
            }
            let Some(fork_service) = &fork.to.service else {
                continue;
            };
            for slice in self.slices_of(ns, fork_service) {
                for endpoint in slice.endpoints.iter().flatten() {
                    let Some(target) = &endpoint.target_ref else {
                        continue;
                    };
                    if target.kind.as_deref() != Some("Pod") {
                        continue;
                    }
                    let pod_ns = target.namespace.clone().unwrap_or_else(|| ns.clone());
                    let name = target.name.clone().unwrap_or_default();
                    if let Some(pod) = self.pods.get(&(pod_ns, name)) {
                        out.extend(member_pod(pod));
                    }
                }
            }
        }
        out
    }

    /// The cluster's pods a fork's selector picks (in the Sandbox's namespace).
    fn selected_by(&self, namespace: &str, selector: &LabelSelector) -> &'a [Arc<Pod>] {
        selector_key(namespace, selector)
            .and_then(|key| self.snapshot.selected.get(&key))
            .map_or(&[], Vec::as_slice)
    }

    fn slices_of(&self, namespace: &str, service: &str) -> &[&'a EndpointSlice] {
        self.slices
            .get(&(namespace.to_owned(), service.to_owned()))
            .map_or(&[], Vec::as_slice)
    }

    /// The kernel services and routes one fork gives.
    fn fork_routes(&self, fork: &RoutedFork) -> Result<Vec<(Service, Route)>, String> {
        let ns = fork.service_namespace.clone();
        let own_ns = &fork.to_namespace;
        let baseline = self
            .services
            .get(&(ns.clone(), fork.service.clone()))
            .ok_or_else(|| format!("Service {ns}/{} not found", fork.service))?;
        let target = match (&fork.to.service, &fork.to.selector) {
            (Some(service), None) => Target::Slices(self.slices_of(own_ns, service)),
            (None, Some(selector)) => {
                if Selector::try_from(selector.clone()).is_err() {
                    return Err(format!(
                        "fork of {ns}/{}: invalid `to.selector`",
                        fork.service
                    ));
                }
                Target::Pods(self.selected_by(own_ns, selector))
            }
            _ => {
                return Err(format!(
                    "fork of {ns}/{}: give exactly one of `to.service` and `to.selector`",
                    fork.service
                ));
            }
        };
        let ports = baseline
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        let selected: Vec<&ServicePort> = if fork.ports.is_empty() {
            ports.iter().collect()
        } else {
            let mut picked = Vec::new();
            for wanted in &fork.ports {
                let port = ports.iter().find(|p| match wanted {
                    IntOrString::Int(n) => p.port == *n,
                    IntOrString::String(name) => p.name.as_deref() == Some(name),
                });
                match port {
                    Some(port) => picked.push(port),
                    None => {
                        return Err(format!(
                            "Service {ns}/{} has no port {}",
                            fork.service,
                            match wanted {
                                IntOrString::Int(n) => n.to_string(),
                                IntOrString::String(name) => format!("{name:?}"),
                            }
                        ));
                    }
                }
            }
            picked
        };
        let cluster_ips = cluster_ips(baseline);
        if cluster_ips.is_empty() {
            return Err(format!(
                "Service {ns}/{} has no cluster IP (headless Services are not forked yet)",
                fork.service
            ));
        }
        let policy = match fork.on_fork_error {
            Some(OnForkError::Baseline) => ForkErrorPolicy::Baseline,
            Some(OnForkError::Error) | None => ForkErrorPolicy::Error,
        };
        let mut out = Vec::new();
        for port in selected {
            let Some(protocol) = protocol_of(port) else {
                continue;
            };
            let port_label = port
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| port.port.to_string());
            for ip in &cluster_ips {
                let v6 = ip.is_ipv6();
                let endpoints = match &target {
                    Target::Slices(slices) => {
                        ready_endpoints(slices, port.name.as_deref().unwrap_or(""), v6)
                    }
                    Target::Pods(pods) => ready_pod_endpoints(pods, port, v6),
                };
                let name = format!(
                    "k8s:{ns}/{}:{port_label}{}",
                    fork.service,
                    if v6 { "/v6" } else { "" }
                );
                let Some(number) = u16::try_from(port.port).ok().filter(|n| *n != 0) else {
                    continue;
                };
                let service = Service {
                    name,
                    address: SocketAddr::new(*ip, number),
                    protocol,
                };
                // A fork takes every port of its Service: on a UDP port, which has no
                // connection to reset, `resetOnChange` is left off rather than the whole
                // Sandbox refused.
                let reset_on_change =
                    fork.reset_on_change && service.reset_on_change_refusal(true).is_none();
                // No ready endpoint in this family: no route, so the baseline keeps serving
                // (a fork that is down is not a reason to break its service).
                if let Some(route) = Route::new(endpoints, policy) {
                    out.push((
                        service,
                        Route {
                            reset_on_change,
                            ..route
                        },
                    ));
                }
            }
        }
        Ok(out)
    }

    fn group_sandboxes(&self, group: &RouteGroup, ns: &str) -> Result<Vec<String>, String> {
        let set = &group.spec.sandboxes;
        let in_ns = self
            .live_sandboxes()
            .into_iter()
            .filter(|s| s.namespace().as_deref() == Some(ns));
        let keys: Vec<String> = match (&set.names, &set.selector) {
            (Some(names), None) => {
                let by_name: HashMap<String, &Arc<Sandbox>> =
                    in_ns.map(|s| (s.name_any(), s)).collect();
                let mut keys = Vec::new();
                for name in names {
                    let sandbox = by_name
                        .get(name)
                        .ok_or_else(|| format!("Sandbox {ns}/{name} not found"))?;
                    keys.push(sandbox.routing_key().to_owned());
                }
                keys
            }
            (None, Some(selector)) => {
                let selector = Selector::try_from(selector.clone())
                    .map_err(|e| format!("sandboxes.selector: {e}"))?;
                in_ns
                    .filter(|s| selector.matches(s.labels()))
                    .map(|s| s.routing_key().to_owned())
                    .collect()
            }
            _ => return Err("sandboxes: give exactly one of `names` and `selector`".to_owned()),
        };
        if keys.is_empty() {
            return Err("no Sandbox matches".to_owned());
        }
        Ok(keys)
    }
}

/// The pod as a member, if it is running with an IP.
fn member_pod(pod: &Pod) -> Option<MemberPod> {
    let status = pod.status.as_ref()?;
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    if ips.is_empty() {
        return None;
    }
    Some(MemberPod {
        uid: pod.uid()?,
        name: format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
        ips,
    })
}

fn cluster_ips(service: &KubeService) -> Vec<IpAddr> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The service protocol of a port: UDP, TCP, or HTTP (TCP with an HTTP `appProtocol`); None
/// for what the kernel programs do not steer (SCTP).
fn protocol_of(port: &ServicePort) -> Option<Protocol> {
    match port.protocol.as_deref().unwrap_or("TCP") {
        "UDP" => Some(Protocol::Udp),
        "TCP" => Some(
            match port
                .app_protocol
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                Some("http" | "h2c" | "grpc" | "kubernetes.io/h2c") => Protocol::Http,
                _ => Protocol::Tcp,
            },
        ),
        _ => None,
    }
}

/// Ready endpoints of the slices, on the port named `port_name`, in one IP family.
fn ready_endpoints(slices: &[&EndpointSlice], port_name: &str, v6: bool) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for slice in slices {
        let family_ok = match slice.address_type.as_str() {
            "IPv4" => !v6,
            "IPv6" => v6,
            _ => false,
        };
        if !family_ok {
            continue;
        }
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name);
        let Some(number) = port
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            // An endpoint without conditions counts as ready, as kube-proxy reads it.
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            out.extend(
                endpoint
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, number)),
            );
        }
    }
    out
}

/// Where a fork's endpoints come from.
enum Target<'a> {
    /// The EndpointSlices of the fork's own Service.
    Slices(&'a [&'a EndpointSlice]),
    /// The pods a selector picks.
    Pods(&'a [Arc<Pod>]),
}

/// Ready pods' addresses in one family, on the Service port's target port as the pod spells
/// it: a named `targetPort` is the container port of that name, as a Service would resolve it.
fn ready_pod_endpoints(pods: &[Arc<Pod>], port: &ServicePort, v6: bool) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() || !is_ready(pod) {
            continue;
        }
        let number = match &port.target_port {
            // 0 is "unset" as a Go client serializes it; the API server defaults it to `port`.
            Some(IntOrString::Int(0)) | None => u16::try_from(port.port).ok(),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(name)) => pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        };
        let Some(number) = number.filter(|n| *n != 0) else {
            continue;
        };
        let status = pod.status.as_ref();
        let ips = status
            .and_then(|s| s.pod_ips.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|ip| ip.ip)
            .chain(status.and_then(|s| s.pod_ip.clone()));
        for ip in ips.filter_map(|ip| ip.parse::<IpAddr>().ok()) {
            if ip.is_ipv6() == v6 {
                out.push(SocketAddr::new(ip, number));
            }
        }
    }
    out
}

/// The pod's `Ready` condition is true.
fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(value).expect("test object"))
    }

    fn service(name: &str, ips: &[&str], ports: serde_json::Value) -> Arc<KubeService> {
        obj(json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": ips.first(), "clusterIPs": ips, "ports": ports},
        }))
    }

    fn slice(
        service: &str,
        family: &str,
        ports: serde_json::Value,
        endpoints: &[(&str, bool)],
    ) -> Arc<EndpointSlice> {
        obj(json!({
            "metadata": {"name": format!("{service}-{family}"), "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": family,
            "ports": ports,
            "endpoints": endpoints.iter().map(|(ip, ready)| json!({
                "addresses": [ip], "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("fork-{ip}")},
            })).collect::<Vec<_>>(),
        }))
    }

    fn pod(name: &str, ip: &str, labels: serde_json::Value) -> Arc<Pod> {
        obj(json!({
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "labels": labels},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
        }))
    }

    /// `pr-1` is the oldest Sandbox; every other one is created after it.
    fn sandbox(name: &str, spec: serde_json::Value) -> Arc<Sandbox> {
        let second = if name == "pr-1" { 0 } else { 5 };
        obj(json!({
            "apiVersion": "redirector.dev/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": name, "namespace": "shop",
                         "creationTimestamp": format!("2026-12-01T10:00:0{second}Z")},
            "spec": spec,
        }))
    }

    fn fork_of(service: &str, to: &str) -> serde_json::Value {
        json!({"forks": [{"service": {"name": service}, "to": {"service": to}}],
               "members": [{"labelSelector": {"matchLabels": {"job": "tests"}}}]})
    }

    /// `svc-a`: dual-stack, ports `tcp` 8080, `alt` 7000, `dns` 53/UDP, `web` 80 appProtocol
    /// http; its fork `svc-a-fork` has two ready endpoints and one not ready.
    fn world() -> Snapshot {
        let ports = json!([
            {"name": "tcp", "port": 8080},
            {"name": "alt", "port": 7000, "targetPort": "alt"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "web", "port": 80, "appProtocol": "http"},
        ]);
        let fork_ports = json!([
            {"name": "tcp", "port": 8080}, {"name": "alt", "port": 9090},
            {"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "web", "port": 8000},
        ]);
        Snapshot {
            sandboxes: vec![sandbox("pr-1", fork_of("svc-a", "svc-a-fork"))],
            groups: Vec::new(),
            services: vec![
                service("svc-a", &["10.96.0.10", "fd00::10"], ports),
                service(
                    "svc-a-fork",
                    &["10.96.0.99"],
                    json!([{"name": "tcp", "port": 8080}]),
                ),
            ],
            slices: vec![
                slice(
                    "svc-a-fork",
                    "IPv4",
                    fork_ports.clone(),
                    &[("10.0.0.2", true), ("10.0.0.1", true), ("10.0.0.3", false)],
                ),
                slice("svc-a-fork", "IPv6", fork_ports, &[("fd00::2", true)]),
            ],
            selected: HashMap::new(),
            pods: vec![
                pod("member", "10.0.1.1", json!({"job": "tests"})),
                pod("other", "10.0.1.2", json!({"job": "else"})),
                pod("fork-10.0.0.1", "10.0.0.1", json!({})),
            ],
        }
    }

    fn derive_claimed(snapshot: &Snapshot, netns: &HashMap<String, Netns>) -> Derived {
        derive(snapshot, &member_pods(snapshot), netns)
    }

    fn netns_for_all(snapshot: &Snapshot) -> HashMap<String, Netns> {
        snapshot
            .pods
            .iter()
            .map(|p| {
                (
                    p.uid().unwrap_or_default(),
                    Ok(PathBuf::from(format!("/proc/{}/ns/net", p.name_any()))),
                )
            })
            .collect()
    }

    #[test]
    fn every_port_and_family_of_a_forked_service_is_routed_to_its_ready_endpoints() {
        let snapshot = world();
        let derived = derive_claimed(&snapshot, &netns_for_all(&snapshot));
        assert_eq!(derived.issues, []);
        let state = &derived.state;
        let service = |name: &str| {
            state
                .services
                .get(name)
                .unwrap_or_else(|| panic!("{name}: {:?}", state.services.keys()))
        };
        assert_eq!(
            service("k8s:shop/svc-a:tcp").address,
            "10.96.0.10:8080".parse().unwrap()
        );
        assert_eq!(
            service("k8s:shop/svc-a:tcp/v6").address,
            "[fd00::10]:8080".parse().unwrap()
        );
        assert_eq!(service("k8s:shop/svc-a:dns").protocol, Protocol::Udp);
        assert_eq!(service("k8s:shop/svc-a:web").protocol, Protocol::Http);
        assert_eq!(service("k8s:shop/svc-a:tcp").protocol, Protocol::Tcp);
        let routes = &state.sandboxes["pr-1"].routes;
        let forks = |name: &str| {
            routes[name]
                .forks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        // Ready endpoints only, sorted; the fork port is found by the Service port's name.
        assert_eq!(
            forks("k8s:shop/svc-a:tcp"),
            ["10.0.0.1:8080", "10.0.0.2:8080"]
        );
        assert_eq!(
            forks("k8s:shop/svc-a:alt"),
            ["10.0.0.1:9090", "10.0.0.2:9090"]
        );
        assert_eq!(
            forks("k8s:shop/svc-a:dns"),
            ["10.0.0.1:5353", "10.0.0.2:5353"]
        );
        assert_eq!(forks("k8s:shop/svc-a:tcp/v6"), ["[fd00::2]:8080"]);
        assert_eq!(routes.len(), 8, "4 ports x 2 families");
    }

    #[test]
    fn members_are_the_selected_pods_and_the_forks_own_pods_of_this_node() {
        let snapshot = world();
        let derived = derive_claimed(&snapshot, &netns_for_all(&snapshot));
        let members = &derived.state.sandboxes["pr-1"].members;
        assert_eq!(
            members,
            &[
                PathBuf::from("/proc/fork-10.0.0.1/ns/net"),
                PathBuf::from("/proc/member/ns/net")
            ]
        );
    }

    #[test]
    fn inject_key_is_carried_from_the_sandbox() {
        let mut snapshot = world();
        let derived = derive_claimed(&snapshot, &netns_for_all(&snapshot));
        assert!(!derived.state.sandboxes["pr-1"].inject_key);
        let mut spec = fork_of("svc-a", "svc-a-fork");
        spec["injectKey"] = json!(true);
        snapshot.sandboxes = vec![sandbox("pr-1", spec)];
        let derived = derive_claimed(&snapshot, &netns_for_all(&snapshot));
        assert!(derived.state.sandboxes["pr-1"].inject_key);
    }

    #[test]
    fn reset_on_change_is_carried_from_the_fork_to_its_tcp_ports() {
        let mut snapshot = world();
        let derived = derive_claimed(&snapshot, &netns_for_all(&snapshot));
        let routes = &derived.state.sandboxes["pr-1"].routes;
        assert!(
            routes.values().all(|r| !r.reset_on_change),
            "off by default"
        );

        let mut spec = fork_of("svc-a", "svc-a-fork");
        spec["forks"][0]["resetOnChange"] = json!(true);
        snapshot.sandboxes = vec![sandbox("pr-1", spec)];
        let derived = derive_claimed(&snapshot, &netns_for_all(&snapshot));
        assert_eq!(derived.issues, [], "a UDP port does not refuse the Sandbox");
        let routes = &derived.state.sandboxes["pr-1"].routes;
        assert_eq!(routes.len(), 8, "4 ports x 2 families");
        for (name, route) in routes {
            let udp = derived.state.services[name].protocol == Protocol::Udp;
            assert_eq!(route.reset_on_change, !udp, "{name}");
        }
        assert!(routes["k8s:shop/svc-a:web"].reset_on_change, "HTTP is TCP");
        assert!(!routes["k8s:shop/svc-a:dns/v6"].reset_on_change);
    }

    #[test]
    fn unresolved_members_are_reported_and_left_out() {
        let snapshot = world();
        let mut netns = netns_for_all(&snapshot);
        netns.insert("uid-member".into(), Err("no process".into()));
        let derived = derive_claimed(&snapshot, &netns);
        assert_eq!(derived.state.sandboxes["pr-1"].members.len(), 1);
        let report = &derived.members["pr-1"];
        assert!(
            report
                .iter()
                .any(|(pod, r)| pod.name == "shop/member" && r.is_err())
        );
    }

    #[test]
    fn a_sandbox_that_cannot_be_routed_whole_is_left_out_whole() {
        let mut snapshot = world();
        snapshot.sandboxes.push(sandbox(
            "pr-22",
            json!({"forks": [
                {"service": {"name": "svc-a"}, "to": {"service": "svc-a-fork"}},
                {"service": {"name": "missing"}, "to": {"service": "svc-a-fork"}},
            ]}),
        ));
        snapshot.sandboxes.push(sandbox(
            "pr-333",
            json!({"forks": [{"service": {"name": "svc-a"}, "ports": ["nope"], "to": {"service": "svc-a-fork"}}]}),
        ));
        let derived = derive_claimed(&snapshot, &HashMap::new());
        assert!(
            derived.state.sandboxes.contains_key("pr-1"),
            "others are not affected"
        );
        assert!(!derived.state.sandboxes.contains_key("pr-22"));
        assert!(!derived.state.sandboxes.contains_key("pr-333"));
        let messages: Vec<String> = derived
            .issues
            .iter()
            .map(|i| format!("{}: {}", i.object, i.message))
            .collect();
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("Sandbox shop/pr-22: ")
                    && m.contains("Service shop/missing not found")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.contains("has no port \"nope\"")),
            "{messages:?}"
        );
    }

    #[test]
    fn the_older_of_two_sandboxes_with_one_key_keeps_it() {
        let mut snapshot = world();
        // Same routing key as pr-1, created later.
        snapshot.sandboxes.push(sandbox(
            "pr-1-again",
            json!({"routingKey": "pr-1", "forks": [{"service": {"name": "svc-a"}, "to": {"service": "svc-a-fork"}}]}),
        ));
        let derived = derive_claimed(&snapshot, &HashMap::new());
        assert_eq!(derived.state.sandboxes.len(), 1);
        assert!(
            derived
                .issues
                .iter()
                .any(|i| i.object == "Sandbox shop/pr-1-again" && i.message.contains("taken"))
        );
    }

    #[test]
    fn a_selector_fork_and_a_bad_key_are_reported() {
        let mut snapshot = world();
        snapshot.sandboxes.push(sandbox(
            "pr-sel",
            json!({"forks": [{"service": {"name": "svc-a"}, "to": {"selector": {"matchLabels": {"app": "x"}}}}]}),
        ));
        snapshot.sandboxes.push(sandbox(
            "pr-key",
            json!({"routingKey": "bad key", "forks": [{"service": {"name": "svc-a"}, "to": {"service": "svc-a-fork"}}]}),
        ));
        let derived = derive_claimed(&snapshot, &HashMap::new());
        let text = format!("{:?}", derived.issues);
        assert!(
            derived.state.sandboxes["pr-sel"].routes.is_empty(),
            "no ready pod: no route"
        );
        assert!(text.contains("routing key"), "{text}");
    }

    #[test]
    fn a_fork_by_selector_routes_to_its_ready_pods_on_their_named_ports() {
        let mut snapshot = world();
        snapshot.sandboxes = vec![sandbox(
            "pr-1",
            json!({"forks": [{"service": {"name": "svc-a"}, "ports": ["alt", "tcp"],
                              "to": {"selector": {"matchLabels": {"app": "svc-a-pr-1"}}}}]}),
        )];
        let keys = fork_selectors(&snapshot);
        assert_eq!(keys.len(), 1);
        let key = keys.into_iter().next().unwrap();
        assert_eq!(key.selector, "app=svc-a-pr-1");
        let fork_pod = |name: &str, ip: &str, ready: &str| -> Arc<Pod> {
            obj(json!({
                "metadata": {"name": name, "namespace": "shop", "uid": name, "labels": {"app": "svc-a-pr-1"}},
                "spec": {"containers": [{"name": "c", "ports": [{"name": "alt", "containerPort": 9191}]}]},
                "status": {"podIP": ip, "podIPs": [{"ip": ip}],
                           "conditions": [{"type": "Ready", "status": ready}]},
            }))
        };
        snapshot.selected.insert(
            key,
            vec![
                fork_pod("f1", "10.0.2.1", "True"),
                fork_pod("f2", "10.0.2.2", "False"),
            ],
        );
        let derived = derive_claimed(&snapshot, &HashMap::new());
        assert_eq!(derived.issues, []);
        let routes = &derived.state.sandboxes["pr-1"].routes;
        let forks = |name: &str| {
            routes[name]
                .forks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            forks("k8s:shop/svc-a:alt"),
            ["10.0.2.1:9191"],
            "named targetPort, ready pods only"
        );
        assert_eq!(
            forks("k8s:shop/svc-a:tcp"),
            ["10.0.2.1:8080"],
            "no targetPort: the port"
        );
    }

    #[test]
    fn a_route_group_stands_for_its_sandboxes() {
        let mut snapshot = world();
        snapshot.groups.push(obj(json!({
            "apiVersion": "redirector.dev/v1alpha1", "kind": "RouteGroup",
            "metadata": {"name": "both", "namespace": "shop"},
            "spec": {"routingKey": "both", "sandboxes": {"names": ["pr-1"]},
                     "members": [{"labelSelector": {"matchLabels": {"job": "else"}}}]},
        })));
        let derived = derive_claimed(&snapshot, &netns_for_all(&snapshot));
        let group = &derived.state.groups["both"];
        assert_eq!(group.sandboxes, ["pr-1"]);
        assert_eq!(group.members, [PathBuf::from("/proc/other/ns/net")]);
    }

    #[test]
    fn a_pod_claimed_by_two_keys_stays_with_the_first() {
        let mut snapshot = world();
        snapshot.sandboxes.push(sandbox(
            "pr-4444",
            json!({"forks": [{"service": {"name": "svc-a-fork"}, "to": {"service": "svc-a-fork"}}],
                   "members": [{"labelSelector": {"matchLabels": {"job": "tests"}}}]}),
        ));
        let derived = derive_claimed(&snapshot, &netns_for_all(&snapshot));
        assert!(derived.state.validate().is_ok());
        assert!(
            derived.issues.iter().any(|i| i.object == "Pod shop/member"),
            "{:?}",
            derived.issues
        );
    }
}
