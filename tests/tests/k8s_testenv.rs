//! The Kubernetes test cluster itself (`redirector_tests::k8s::TestCluster`): a real API server
//! over etcd, exercised the way the node agent and the controller will use it (kube-rs clients
//! and watchers, kubectl), including outages and etcd compaction.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, conditions, wait::await_condition, watcher};
use kube::{Client, ResourceExt};
use redirector_tests::k8s::{ClusterOptions, TestCluster, require_k8s};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn widget_crd() -> Result<CustomResourceDefinition> {
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.redirector.dev"},
        "spec": {
            "group": "test.redirector.dev",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "selectableFields": [{"jsonPath": ".spec.nodeName"}],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["size"],
                            "properties": {
                                "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                "nodeName": {"type": "string"}
                            }
                        },
                        "status": {
                            "type": "object",
                            "properties": {"ready": {"type": "boolean"}}
                        }
                    }
                }}
            }]
        }
    });
    serde_json::from_value(crd).context("the Widget CRD")
}

fn widget_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("test.redirector.dev", "v1", "Widget"),
        "widgets",
    )
}

fn widget(name: &str, size: i64, node: &str) -> DynamicObject {
    DynamicObject::new(name, &widget_resource())
        .within("default")
        .data(json!({"spec": {"size": size, "nodeName": node}}))
}

fn pod(name: &str, node: &str, ip: &str) -> Result<Pod> {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "demo"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .context("a Pod")
}

async fn install_widget_crd(client: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &widget_crd()?).await?;
    tokio::time::timeout(
        WAIT,
        await_condition(
            crds,
            "widgets.test.redirector.dev",
            conditions::is_crd_established(),
        ),
    )
    .await
    .context("the CRD was not established in time")??;
    Ok(())
}

/// Names of the Pods in `events` (any variant carrying one), in order.
fn pod_names(events: &[watcher::Event<Pod>]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) | watcher::Event::Delete(p) => {
                Some(p.name_any())
            }
            _ => None,
        })
        .collect()
}

/// Polls `stream` until `done` holds for everything received so far (errors are skipped: a
/// watcher reports its reconnection attempts as errors), or fails after `WAIT`.
async fn collect_until<S>(
    stream: &mut S,
    seen: &mut Vec<watcher::Event<Pod>>,
    done: impl Fn(&[watcher::Event<Pod>]) -> bool,
) -> Result<()>
where
    S: Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(seen) {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => bail!("timed out; events so far: {:?}", pod_names(seen)),
            Ok(None) => bail!("the watcher ended"),
            Ok(Some(Ok(event))) => seen.push(event),
            Ok(Some(Err(_))) => {}
        }
    }
    Ok(())
}

fn init_done_count(seen: &[watcher::Event<Pod>]) -> usize {
    seen.iter()
        .filter(|e| matches!(e, watcher::Event::InitDone))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_schema_status_selectable_fields_and_discovery() -> Result<()> {
    if !require_k8s() {
        return Ok(());
    }
    let cluster = TestCluster::start().await?;
    let client = cluster.client()?;
    install_widget_crd(&client).await?;

    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &widget_resource());
    let pp = PostParams::default();
    widgets.create(&pp, &widget("w-a", 3, "node-a")).await?;
    widgets.create(&pp, &widget("w-b", 4, "node-b")).await?;
    match widgets.create(&pp, &widget("too-big", 30, "node-a")).await {
        Err(kube::Error::Api(status)) => ensure!(
            status.code == 422 && status.message.contains("less than or equal to 10"),
            "unexpected refusal: {status:?}"
        ),
        other => bail!("an object violating the schema was not refused: {other:?}"),
    }

    let on_a = widgets
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await?;
    let names: Vec<String> = on_a.items.iter().map(|w| w.name_any()).collect();
    ensure!(
        names == ["w-a"],
        "field selector spec.nodeName=node-a gave {names:?}"
    );

    // /status is a subresource: a status write through the main resource is dropped.
    let status = json!({"status": {"ready": true}, "spec": {"size": 9}});
    widgets
        .patch_status("w-a", &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    let w = widgets.get("w-a").await?;
    ensure!(
        w.data["status"]["ready"] == json!(true),
        "status not written: {w:?}"
    );
    ensure!(
        w.data["spec"]["size"] == json!(3),
        "/status changed spec: {w:?}"
    );

    // A streaming list ends its initial events with a BOOKMARK; kube's watcher waits for it.
    let config = watcher::Config::default()
        .streaming_lists()
        .fields("spec.nodeName=node-b");
    let mut stream = watcher(widgets.clone(), config).boxed();
    let mut listed = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, stream.next()).await? {
            Some(Ok(watcher::Event::InitApply(w))) => listed.push(w.name_any()),
            Some(Ok(watcher::Event::InitDone)) => break,
            Some(Ok(_)) => {}
            other => bail!("streaming list of widgets: {other:?}"),
        }
    }
    ensure!(listed == ["w-b"], "streaming list gave {listed:?}");

    // Discovery must list the CRD group, or kubectl and kube's Discovery cannot find it.
    let groups = client.list_api_groups().await?;
    ensure!(
        groups
            .groups
            .iter()
            .any(|g| g.name == "test.redirector.dev"),
        "/apis lacks the CRD group: {:?}",
        groups.groups.iter().map(|g| &g.name).collect::<Vec<_>>()
    );
    let discovery = kube::Discovery::new(client.clone()).run().await?;
    ensure!(
        discovery.has_group("test.redirector.dev") && discovery.has_group("apps"),
        "kube's Discovery misses groups: {:?}",
        discovery.groups().map(|g| g.name()).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_listed_and_watched_by_node() -> Result<()> {
    if !require_k8s() {
        return Ok(());
    }
    let cluster = TestCluster::start().await?;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client()?);
    let pp = PostParams::default();
    pods.create(&pp, &pod("a-1", "node-a", "10.0.0.1")?).await?;
    pods.create(&pp, &pod("b-1", "node-b", "10.0.1.1")?).await?;

    let on_a = pods
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await?;
    let names: Vec<String> = on_a.items.iter().map(|p| p.name_any()).collect();
    ensure!(
        names == ["a-1"],
        "field selector spec.nodeName=node-a gave {names:?}"
    );
    ensure!(
        on_a.items[0]
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            == Some("10.0.0.1"),
        "a Pod created with a status keeps it"
    );
    let running = pods
        .list(&ListParams::default().fields("status.phase=Running,spec.nodeName=node-b"))
        .await?;
    ensure!(
        running.items.len() == 1,
        "status.phase selector: {running:?}"
    );

    let config = watcher::Config::default().fields("spec.nodeName=node-a");
    let mut stream = watcher(pods.clone(), config).default_backoff().boxed();
    let mut seen = Vec::new();
    collect_until(&mut stream, &mut seen, |s| init_done_count(s) == 1).await?;
    ensure!(
        pod_names(&seen) == ["a-1"],
        "initial list: {:?}",
        pod_names(&seen)
    );

    seen.clear();
    pods.create(&pp, &pod("b-2", "node-b", "10.0.1.2")?).await?;
    pods.create(&pp, &pod("a-2", "node-a", "10.0.0.2")?).await?;
    pods.delete("a-1", &DeleteParams::default()).await?;
    collect_until(&mut stream, &mut seen, |s| s.len() >= 2).await?;
    ensure!(
        matches!(&seen[..], [watcher::Event::Apply(a), watcher::Event::Delete(d)]
            if a.name_any() == "a-2" && d.name_any() == "a-1"),
        "watch events: {:?}",
        pod_names(&seen)
    );

    // The kubelet's write: status through /status; a main-resource update keeps status.
    let status = json!({"status": {"phase": "Succeeded"}});
    pods.patch_status("a-2", &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    let mut p = pods.get("a-2").await?;
    p.status = None;
    p.metadata.labels = Some([("app".to_owned(), "changed".to_owned())].into());
    pods.replace("a-2", &pp, &p).await?;
    let p = pods.get("a-2").await?;
    ensure!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"),
        "status lost on a main-resource update: {:?}",
        p.status
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpointslices_by_service_name_label() -> Result<()> {
    if !require_k8s() {
        return Ok(());
    }
    let cluster = TestCluster::start().await?;
    let slices: Api<EndpointSlice> = Api::default_namespaced(cluster.client()?);
    for (name, service, ip) in [
        ("svc-a-1", "svc-a", "10.0.0.1"),
        ("svc-a-2", "svc-a", "10.0.0.2"),
        ("svc-b-1", "svc-b", "10.0.0.3"),
    ] {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))?;
        slices.create(&PostParams::default(), &slice).await?;
    }
    let of_a = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=svc-a"))
        .await?;
    let names: BTreeSet<String> = of_a.items.iter().map(|s| s.name_any()).collect();
    ensure!(
        names == BTreeSet::from(["svc-a-1".to_owned(), "svc-a-2".to_owned()]),
        "label selector gave {names:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_deployments_scale_and_namespaces() -> Result<()> {
    if !require_k8s() {
        return Ok(());
    }
    let cluster = TestCluster::start().await?;
    let client = cluster.client()?;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let names: BTreeSet<String> = namespaces
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    ensure!(
        ["default", "kube-system", "kube-public"]
            .iter()
            .all(|n| names.contains(*n)),
        "system namespaces: {names:?}"
    );

    // Leader election writes a Lease with optimistic concurrency: a stale write must conflict.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "redirector-controller"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}
    }))?;
    let created = leases.create(&PostParams::default(), &lease).await?;
    let mut update = created.clone();
    update.spec.get_or_insert_default().holder_identity = Some("b".into());
    leases
        .replace("redirector-controller", &PostParams::default(), &update)
        .await?;
    match leases
        .replace("redirector-controller", &PostParams::default(), &created)
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        other => bail!("a stale Lease write did not conflict: {other:?}"),
    }

    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "svc-a-pr-1"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "svc-a-pr-1"}},
            "template": {
                "metadata": {"labels": {"app": "svc-a-pr-1"}},
                "spec": {"containers": [{"name": "c", "image": "svc-a:pr-1"}]}
            }
        }
    }))?;
    let applied = deployments
        .patch(
            "svc-a-pr-1",
            &PatchParams::apply("redirector-controller").force(),
            &Patch::Apply(&deployment),
        )
        .await?;
    ensure!(
        applied.metadata.generation == Some(1),
        "generation: {applied:?}"
    );
    let scale = json!({"spec": {"replicas": 3}});
    deployments
        .patch_scale("svc-a-pr-1", &PatchParams::default(), &Patch::Merge(&scale))
        .await?;
    let status = json!({"status": {"replicas": 3, "readyReplicas": 3, "observedGeneration": 2}});
    deployments
        .patch_status(
            "svc-a-pr-1",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    let d = deployments.get("svc-a-pr-1").await?;
    ensure!(
        d.spec.as_ref().and_then(|s| s.replicas) == Some(3)
            && d.metadata.generation == Some(2)
            && d.status.as_ref().and_then(|s| s.ready_replicas) == Some(3),
        "after /scale and /status: {d:?}"
    );
    Ok(())
}

/// The API server goes away for a while and comes back: a kube watcher keeps going and sees
/// what changed meanwhile, without the test restarting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_survives_apiserver_restart() -> Result<()> {
    if !require_k8s() {
        return Ok(());
    }
    let mut cluster = TestCluster::start().await?;
    let pods: Api<Pod> = Api::default_namespaced(cluster.client()?);
    pods.create(
        &PostParams::default(),
        &pod("before", "node-a", "10.0.0.1")?,
    )
    .await?;
    let config = watcher::Config::default().fields("spec.nodeName=node-a");
    let mut stream = watcher(pods.clone(), config).default_backoff().boxed();
    let mut seen = Vec::new();
    collect_until(&mut stream, &mut seen, |s| init_done_count(s) == 1).await?;

    cluster.stop_apiserver()?;
    let poll = tokio::time::timeout(Duration::from_secs(3), async {
        // Keep polling so the watcher notices and retries while the server is down.
        while stream.next().await.is_some() {}
    });
    let _ = poll.await;
    ensure!(
        pods.list(&ListParams::default()).await.is_err(),
        "the API server still answers after stop_apiserver"
    );
    cluster.start_apiserver().await?;

    pods.create(&PostParams::default(), &pod("after", "node-a", "10.0.0.2")?)
        .await?;
    seen.clear();
    collect_until(&mut stream, &mut seen, |s| {
        pod_names(s).iter().any(|n| n == "after")
    })
    .await?;
    Ok(())
}

/// After etcd compaction, a watch from a compacted resourceVersion gets 410 Gone, and a kube
/// watcher that has to resume from one relists (a new Init ... InitDone round) and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_gives_410_and_the_watcher_relists() -> Result<()> {
    if !require_k8s() {
        return Ok(());
    }
    // Watches go to etcd, so compaction alone decides what is too old.
    let mut cluster = TestCluster::start_with(ClusterOptions { watch_cache: false }).await?;
    let client = cluster.client()?;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let first = pods
        .create(&PostParams::default(), &pod("first", "node-a", "10.0.0.1")?)
        .await?;
    let old_rv = first.resource_version().context("no resourceVersion")?;

    let mut stream = watcher(pods.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut seen = Vec::new();
    collect_until(&mut stream, &mut seen, |s| init_done_count(s) == 1).await?;

    // Writes the Pod watcher does not see move etcd's revision past everything it saw.
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    for i in 0..3 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}}))?;
        configmaps.create(&PostParams::default(), &cm).await?;
    }
    let compacted = cluster.compact_etcd()?;
    ensure!(
        compacted > old_rv.parse::<i64>()?,
        "compacted at {compacted}, not past {old_rv}"
    );

    let mut raw = pods.watch(&WatchParams::default(), &old_rv).await?.boxed();
    match tokio::time::timeout(WAIT, raw.next()).await? {
        Some(Ok(WatchEvent::Error(status))) if status.code == 410 => {}
        Some(Err(kube::Error::Api(status))) if status.code == 410 => {}
        other => bail!("a watch from compacted resourceVersion {old_rv} gave {other:?}"),
    }

    // Cut the watcher's connection: it resumes from its last resourceVersion, which is gone.
    cluster.stop_apiserver()?;
    cluster.start_apiserver().await?;
    pods.create(
        &PostParams::default(),
        &pod("second", "node-a", "10.0.0.2")?,
    )
    .await?;
    seen.clear();
    collect_until(&mut stream, &mut seen, |s| {
        init_done_count(s) >= 1 && pod_names(s).iter().any(|n| n == "second")
    })
    .await?;
    ensure!(
        matches!(seen.first(), Some(watcher::Event::Init)),
        "the watcher did not relist: {:?}",
        pod_names(&seen)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_and_get_by_node() -> Result<()> {
    if !require_k8s() {
        return Ok(());
    }
    let cluster = TestCluster::start().await?;
    let manifest = "\
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: default}
spec:
  nodeName: node-a
  containers: [{name: web, image: nginx}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: default}
spec:
  nodeName: node-b
  containers: [{name: web, image: nginx}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
";
    let path = cluster.dir().join("web.yaml");
    std::fs::write(&path, manifest)?;
    let path = path.to_str().context("non-UTF-8 temp path")?;
    cluster.kubectl(&["apply", "-f", path])?;
    // A second apply patches what exists (client-side apply's three-way merge).
    let again = cluster.kubectl(&["apply", "-f", path])?;
    ensure!(again.contains("unchanged"), "second apply: {again}");

    let on_a = cluster.kubectl(&[
        "get",
        "pods",
        "--field-selector",
        "spec.nodeName=node-a",
        "-o",
        "name",
    ])?;
    ensure!(on_a.trim() == "pod/web-a", "kubectl get by node: {on_a:?}");
    let ip = cluster.kubectl(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"])?;
    ensure!(ip.trim() == "10.96.0.10", "service: {ip:?}");

    // CRDs through kubectl too, with the schema enforced and discovery picking the kind up.
    let crd = serde_json::to_string(&widget_crd()?)?;
    cluster.kubectl_with_input(&["apply", "-f", "-"], &crd)?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/widgets.test.redirector.dev",
    ])?;
    let refused = cluster.kubectl_with_input(
        &["apply", "-f", "-"],
        "{\"apiVersion\":\"test.redirector.dev/v1\",\"kind\":\"Widget\",\
         \"metadata\":{\"name\":\"w\",\"namespace\":\"default\"},\"spec\":{\"size\":0}}",
    );
    let err = format!(
        "{:#}",
        refused.err().context("an invalid Widget was applied")?
    );
    ensure!(err.contains("greater than or equal to 1"), "refusal: {err}");
    cluster.kubectl_with_input(
        &["apply", "-f", "-"],
        "{\"apiVersion\":\"test.redirector.dev/v1\",\"kind\":\"Widget\",\
         \"metadata\":{\"name\":\"w\",\"namespace\":\"default\"},\"spec\":{\"size\":2,\"nodeName\":\"node-a\"}}",
    )?;
    let widgets = cluster.kubectl(&[
        "get",
        "widgets",
        "--field-selector",
        "spec.nodeName=node-a",
        "-o",
        "name",
    ])?;
    ensure!(
        widgets.trim() == "widget.test.redirector.dev/w",
        "kubectl get widgets: {widgets:?}"
    );
    Ok(())
}
