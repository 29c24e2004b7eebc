//! The cluster parts the test API server lacks, played for the sandbox controller's forks: the
//! Deployment controller and the kubelet (each replica of a fork Deployment becomes a Pod
//! object bound to a free simulated pod of the node, with its IPs, readiness and a sandbox
//! process) and the EndpointSlice controller (each fork Service gets slices of its ready pods).
//!
//! A container whose image contains `pull-error` never starts: its Pod reports
//! `ImagePullBackOff`, as a kubelet does for an image that cannot be pulled.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Pod as KubePod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::{Daemon, Node, Pod};

/// Label the controller puts on everything it makes.
const SANDBOX_LABEL: &str = "redirector.dev/sandbox";
/// Marks the slices this module made.
const MADE_BY: &str = "rdr-test/fake-kubelet";

/// The running fake; dropping it stops it (the Pod objects stay; the sandbox processes go).
pub struct FakeKubelet {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Bound {
    /// Index into the slots.
    slot: usize,
    pod_name: String,
    _pause: Daemon,
}

struct State {
    client: Client,
    node: Arc<Node>,
    node_name: String,
    namespace: String,
    slots: Vec<Pod>,
    /// By Deployment UID, one per replica.
    bound: HashMap<String, Vec<Bound>>,
}

impl FakeKubelet {
    /// Plays the controllers in `namespace`, binding fork replicas to `slots` (simulated pods
    /// already serving what a fork serves) in order.
    pub fn start(
        client: Client,
        node: Arc<Node>,
        node_name: &str,
        namespace: &str,
        slots: Vec<Pod>,
    ) -> FakeKubelet {
        let mut state = State {
            client,
            node,
            node_name: node_name.to_owned(),
            namespace: namespace.to_owned(),
            slots,
            bound: HashMap::new(),
        };
        let task = tokio::spawn(async move {
            loop {
                if let Err(err) = state.sync().await {
                    eprintln!("fake kubelet: {err:#}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        FakeKubelet { task }
    }
}

impl State {
    async fn sync(&mut self) -> Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let forks = deployments
            .list(&ListParams::default().labels(SANDBOX_LABEL))
            .await
            .context("list Deployments")?
            .items;
        let pods: Api<KubePod> = Api::namespaced(self.client.clone(), &self.namespace);

        // Deployments gone, or with fewer replicas: their pods go.
        let live: HashMap<String, &Deployment> = forks
            .iter()
            .filter(|d| d.metadata.deletion_timestamp.is_none())
            .filter_map(|d| Some((d.uid()?, d)))
            .collect();
        let mut released = Vec::new();
        for (uid, bound) in &mut self.bound {
            let keep = live.get(uid).map_or(0, |d| replicas(d));
            while bound.len() > keep {
                if let Some(gone) = bound.pop() {
                    released.push(gone.pod_name.clone());
                }
            }
        }
        self.bound.retain(|_, b| !b.is_empty());
        for name in released {
            match pods.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(err) => return Err(err).context("delete Pod"),
            }
        }

        for deployment in live.values() {
            self.scale_up(deployment, &pods).await?;
        }
        self.endpoint_slices().await
    }

    async fn scale_up(&mut self, deployment: &Deployment, pods: &Api<KubePod>) -> Result<()> {
        let uid = deployment.uid().unwrap_or_default();
        let want = replicas(deployment);
        let Some(spec) = &deployment.spec else {
            return Ok(());
        };
        let template_meta = spec.template.metadata.clone().unwrap_or_default();
        let containers = spec
            .template
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let pull_error = containers
            .iter()
            .find(|c| c.image.as_deref().is_some_and(|i| i.contains("pull-error")));
        while self.bound.get(&uid).map_or(0, Vec::len) < want {
            let used: Vec<usize> = self.bound.values().flatten().map(|b| b.slot).collect();
            let Some(slot) = (0..self.slots.len()).find(|i| !used.contains(i)) else {
                anyhow::bail!("no free simulated pod for {}", deployment.name_any());
            };
            let sim = &self.slots[slot];
            let index = self.bound.get(&uid).map_or(0, Vec::len);
            let pod_name = format!("{}-{index}", deployment.name_any());
            let object: KubePod = serde_json::from_value(json!({
                "metadata": {
                    "name": pod_name, "namespace": self.namespace,
                    "labels": template_meta.labels, "annotations": template_meta.annotations,
                },
                "spec": {"nodeName": self.node_name, "containers": containers},
            }))
            .context("pod object")?;
            let created = match pods.create(&PostParams::default(), &object).await {
                Ok(created) => created,
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    pods.delete(&pod_name, &DeleteParams::default()).await.ok();
                    continue;
                }
                Err(err) => return Err(err).context("create Pod"),
            };
            let ips = json!([{"ip": sim.ipv4.to_string()}, {"ip": sim.ipv6.to_string()}]);
            let status = match pull_error {
                Some(container) => json!({"status": {
                    "phase": "Pending",
                    "conditions": [{"type": "Ready", "status": "False"}],
                    "podIP": sim.ipv4.to_string(), "podIPs": ips,
                    "containerStatuses": [{
                        "name": container.name, "image": container.image, "imageID": "",
                        "ready": false, "restartCount": 0,
                        "state": {"waiting": {"reason": "ImagePullBackOff",
                            "message": format!("Back-off pulling image {:?}", container.image.clone().unwrap_or_default())}},
                    }],
                }}),
                None => json!({"status": {
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "podIP": sim.ipv4.to_string(), "podIPs": ips,
                }}),
            };
            pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .context("Pod status")?;
            let pause = sim
                .start_sandbox_process(&self.node, &created.uid().unwrap_or_default())
                .context("sandbox process")?;
            self.bound.entry(uid.clone()).or_default().push(Bound {
                slot,
                pod_name,
                _pause: pause,
            });
        }
        let ready = if pull_error.is_some() { 0 } else { want };
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let status = json!({"status": {"replicas": want, "readyReplicas": ready,
                                       "availableReplicas": ready, "updatedReplicas": want}});
        deployments
            .patch_status(
                &deployment.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
            .context("Deployment status")?;
        Ok(())
    }

    /// The EndpointSlice controller's part, for the controller's Services only.
    async fn endpoint_slices(&self) -> Result<()> {
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.namespace);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let pods: Api<KubePod> = Api::namespaced(self.client.clone(), &self.namespace);
        let forks = services
            .list(&ListParams::default().labels(SANDBOX_LABEL))
            .await
            .context("list Services")?
            .items;
        let all_pods = pods
            .list(&ListParams::default().labels(SANDBOX_LABEL))
            .await
            .context("list Pods")?
            .items;
        let mut wanted = Vec::new();
        for service in &forks {
            let spec = service.spec.clone().unwrap_or_default();
            let selector = spec.selector.clone().unwrap_or_default();
            let chosen: Vec<&KubePod> = all_pods
                .iter()
                .filter(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
                })
                .collect();
            for (family, v6) in [("IPv4", false), ("IPv6", true)] {
                let name = format!("{}-{}", service.name_any(), family.to_lowercase());
                wanted.push(name.clone());
                let endpoints: Vec<Value> = chosen
                    .iter()
                    .filter_map(|p| {
                        let status = p.status.as_ref()?;
                        let ip = status
                            .pod_ips
                            .iter()
                            .flatten()
                            .map(|ip| ip.ip.clone())
                            .find(|ip| ip.contains(':') == v6)?;
                        let ready = status.conditions.iter().flatten().any(|c| {
                            c.type_ == "Ready" && c.status == "True"
                        });
                        Some(json!({
                            "addresses": [ip], "conditions": {"ready": ready},
                            "nodeName": self.node_name,
                            "targetRef": {"kind": "Pod", "namespace": self.namespace, "name": p.name_any()},
                        }))
                    })
                    .collect();
                let ports: Vec<Value> = spec
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| {
                        let port = match &p.target_port {
                            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) if *n != 0 => *n,
                            _ => p.port,
                        };
                        json!({"name": p.name.clone().unwrap_or_default(), "port": port, "protocol": "TCP"})
                    })
                    .collect();
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": name, "namespace": self.namespace, "labels": {
                        "kubernetes.io/service-name": service.name_any(), MADE_BY: "true"}},
                    "addressType": family, "ports": ports, "endpoints": endpoints,
                }))
                .context("slice")?;
                slices
                    .patch(
                        &name,
                        &PatchParams::apply("rdr-fake-kubelet").force(),
                        &Patch::Apply(&slice),
                    )
                    .await
                    .context("apply EndpointSlice")?;
            }
        }
        for slice in slices
            .list(&ListParams::default().labels(MADE_BY))
            .await
            .context("list slices")?
            .items
        {
            if !wanted.contains(&slice.name_any()) {
                slices
                    .delete(&slice.name_any(), &DeleteParams::default())
                    .await
                    .ok();
            }
        }
        Ok(())
    }
}

fn replicas(deployment: &Deployment) -> usize {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .map_or(1, |r| usize::try_from(r).unwrap_or(0))
}

/// The kubelet's part for a pod the test runs itself: a Pod object `namespace/name` on
/// `node_name` with `labels`, Running and Ready with the simulated pod's IPs, and a sandbox
/// process in `kubepods/pod<uid>` so that the node agent finds its network namespace. The
/// returned guard stops the sandbox process.
pub async fn create_ready_pod(
    client: &Client,
    node: &Node,
    sim: &Pod,
    placement: (&str, &str, &str),
    labels: &BTreeMap<String, String>,
) -> Result<Daemon> {
    let (namespace, name, node_name) = placement;
    let object: KubePod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node_name, "containers": [{"name": "app", "image": "app"}]},
    }))
    .context("pod object")?;
    let pods: Api<KubePod> = Api::namespaced(client.clone(), namespace);
    let created = pods
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating Pod {namespace}/{name}"))?;
    let status = json!({"status": {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
        "podIP": sim.ipv4.to_string(),
        "podIPs": [{"ip": sim.ipv4.to_string()}, {"ip": sim.ipv6.to_string()}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("Pod {namespace}/{name} status"))?;
    sim.start_sandbox_process(node, &created.uid().context("the Pod has no uid")?)
}

/// Labels as a map, for tests.
pub fn labels_of<K: kube::Resource>(object: &K) -> BTreeMap<String, String> {
    object.meta().labels.clone().unwrap_or_default()
}
