//! The sandbox controller against a real API server, with the node agent steering real traffic:
//! the test plays the Deployment controller, the kubelet and the EndpointSlice controller
//! (`redirector_tests::kubelet`), binding fork replicas to simulated pods that serve as `fork`.
mod support;

use std::{
    collections::BTreeMap,
    ffi::OsString,
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{Pod, Service},
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use redirector_tests::{
    Bridge, Daemon, HttpReq, Node, Pod as SimPod, Server,
    k8s::{TestCluster, create_in, require_k8s},
    kubelet::{FakeKubelet, create_ready_pod},
    require_e2e,
    shop::{HTTP_PORT, NS, TCP_PORT, VIP4, VIP6, baseline_deployment, baseline_service},
};
use redirector_user::k8s::crd::{self, RouteGroup, Sandbox};
use serde_json::{Value, json};
use support::{BASELINE, READY, eventually};

const ROUTER: &str = "10.200.0.1:15001";
const WAIT: Duration = Duration::from_secs(30);
const SLOTS: usize = 2;
const NODE_NAME: &str = "node-a";

/// A cluster with the baseline `svc-a` (a Deployment, a dual-stack Service, a simulated pod
/// behind the VIPs), simulated pods the fake kubelet binds forks to (servers `slot-N`), a
/// `member` (job=pr-1-tests) and an `outsider`; the node agent; the fake kubelet.
struct World {
    cluster: TestCluster,
    client: Client,
    node: Arc<Node>,
    member: SimPod,
    outsider: SimPod,
    _servers: Vec<Server>,
    _pause: Vec<Daemon>,
    agent: Daemon,
    _bridge: Bridge,
    _kubelet: FakeKubelet,
    controllers: Vec<Daemon>,
}

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

impl World {
    async fn new(label: &str) -> Option<World> {
        if !require_e2e() || !require_k8s() {
            return None;
        }
        let cluster = TestCluster::start().await.expect("test cluster");
        let client = cluster
            .install(&crd::definitions(), NS)
            .await
            .expect("CRDs and namespace");
        create_in(&client, NS, &baseline_deployment())
            .await
            .expect("baseline Deployment");
        create_in(&client, NS, &baseline_service())
            .await
            .expect("baseline Service");

        let mut node = Node::new(label).expect("node");
        let baseline = node.add_pod("svc-a").expect("pod");
        node.add_vip(VIP4.parse().expect("ip"), &baseline)
            .expect("vip");
        node.add_vip(VIP6.parse().expect("ip"), &baseline)
            .expect("vip");
        let slots: Vec<SimPod> = (1..=SLOTS)
            .map(|i| node.add_pod(&format!("slot-{i}")).expect("pod"))
            .collect();
        let member = node.add_pod("member").expect("pod");
        let outsider = node.add_pod("outsider").expect("pod");
        let mut servers = vec![
            baseline
                .serve_ports(&node, BASELINE, &[TCP_PORT], &[])
                .expect("baseline"),
            baseline
                .serve_http(&node, BASELINE, HTTP_PORT)
                .expect("baseline http"),
        ];
        for (i, slot) in slots.iter().enumerate() {
            let name = format!("slot-{}", i + 1);
            servers.push(
                slot.serve_ports(&node, &name, &[TCP_PORT], &[])
                    .expect("slot"),
            );
            servers.push(slot.serve_http(&node, &name, HTTP_PORT).expect("slot http"));
        }
        let mut pause = Vec::new();
        for (pod, name, labels) in [
            (&member, "member", json!({"job": "pr-1-tests"})),
            (&outsider, "outsider", json!({"job": "other"})),
        ] {
            pause.push(create_pod(&client, &node, pod, name, labels).await);
        }

        let server_url = cluster.server_url();
        let port = server_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let bridge =
            Bridge::start(&node.netns_path(), ([127, 0, 0, 1], port).into()).expect("bridge");
        let kubeconfig = std::fs::read_to_string(cluster.kubeconfig_path()).expect("kubeconfig");
        let bridged = format!("https://127.0.0.1:{}", bridge.port());
        std::fs::write(
            node.dir().join("kubeconfig"),
            kubeconfig.replace(&server_url, &bridged),
        )
        .expect("write kubeconfig");
        std::fs::write(
            node.dir().join("redirector.toml"),
            format!(
                "[daemon]\nbpffs = \"{}\"\napi_socket = \"{}\"\nstate_file = \"{}\"\n\n\
                 [kubernetes]\nenabled = true\n",
                node.bpffs().join("redirector").display(),
                node.dir().join("api.sock").display(),
                node.dir().join("state.json").display(),
            ),
        )
        .expect("config");
        let args: Vec<OsString> = vec![
            "run".into(),
            "--config".into(),
            node.dir().join("redirector.toml").into(),
            "--cgroup".into(),
            node.cgroup().into(),
            "--kubeconfig".into(),
            node.dir().join("kubeconfig").into(),
            "--node-name".into(),
            NODE_NAME.into(),
            "--poll-interval".into(),
            "200ms".into(),
            "--router-listen".into(),
            ROUTER.into(),
        ];
        let agent = node
            .spawn_daemon("redirector", &support::redirector(), &args)
            .expect("spawn agent");
        agent.wait_for_log("ready", READY).expect("agent ready");
        let node = Arc::new(node);
        let kubelet = FakeKubelet::start(client.clone(), node.clone(), NODE_NAME, NS, slots);
        Some(World {
            cluster,
            client,
            node,
            member,
            outsider,
            _servers: servers,
            _pause: pause,
            agent,
            _bridge: bridge,
            _kubelet: kubelet,
            controllers: Vec::new(),
        })
    }

    /// Starts a controller replica named `identity` (on the host: it only talks to the API).
    fn start_controller(&mut self, identity: &str) -> usize {
        self.start_controller_with(identity, &[])
    }

    fn start_controller_with(&mut self, identity: &str, extra: &[&str]) -> usize {
        let kubeconfig = self.cluster.kubeconfig_path().to_owned();
        let mut args: Vec<OsString> = vec![
            "controller".into(),
            "--kubeconfig".into(),
            kubeconfig.into(),
            "--lease-namespace".into(),
            NS.into(),
            "--identity".into(),
            identity.into(),
            "--lease-duration".into(),
            "3s".into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        let daemon = Daemon::spawn(identity, &support::redirector(), &args).expect("controller");
        self.controllers.push(daemon);
        self.controllers.len() - 1
    }

    fn logs(&self) -> String {
        let mut out = format!("--- agent:\n{}", self.agent.logs());
        for c in &self.controllers {
            out.push_str(&format!("\n--- controller:\n{}", c.logs()));
        }
        out
    }

    fn tcp(&self, pod: &SimPod) -> String {
        let to = SocketAddr::new(VIP4.parse().expect("ip"), TCP_PORT);
        match pod.call_tcp(&self.node, to, true) {
            Ok(result) => result.server,
            Err(err) => format!("error: {err:#}"),
        }
    }

    /// Who serves `key`'s request (or a plain one) from the outsider, over HTTP/1.1.
    fn http(&self, key: Option<&str>) -> String {
        let vip = SocketAddr::new(VIP4.parse().expect("ip"), HTTP_PORT).to_string();
        let mut req = HttpReq::get("/who");
        if let Some(key) = key {
            req = req.header("baggage", &format!("sd-routing-key={key}"));
        }
        let spec = req.spec();
        self.outsider
            .http(&self.node, &["h1", "--addr", &vip, "--req", &spec])
            .ok()
            .and_then(|lines| {
                lines
                    .first()
                    .map(|l| l["served_by"].as_str().unwrap_or("?").to_owned())
            })
            .unwrap_or_else(|| "error".to_owned())
    }

    fn agent_status(&self) -> String {
        let out = std::process::Command::new(support::redirector())
            .args(["status", "-o", "json", "--socket"])
            .arg(self.node.dir().join("api.sock"))
            .output()
            .expect("status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn sandboxes(&self) -> Api<Sandbox> {
        Api::namespaced(self.client.clone(), NS)
    }

    async fn sandbox(&self, name: &str) -> Option<Sandbox> {
        self.sandboxes().get_opt(name).await.expect("get sandbox")
    }
}

/// A Pod object for a simulated pod, ready, with a sandbox process (the kubelet's part).
async fn create_pod(
    client: &Client,
    node: &Node,
    pod: &SimPod,
    name: &str,
    labels: Value,
) -> Daemon {
    let labels = serde_json::from_value(labels).expect("labels");
    create_ready_pod(client, node, pod, (NS, name, NODE_NAME), &labels)
        .await
        .expect("ready pod")
}

async fn apply_sandbox(client: &Client, name: &str, spec: Value) -> Instant {
    let sandbox: Sandbox = serde_json::from_value(json!({
        "apiVersion": "redirector.dev/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }))
    .expect("sandbox");
    Api::<Sandbox>::namespaced(client.clone(), NS)
        .patch(
            name,
            &PatchParams::apply("rdr-test").force(),
            &Patch::Apply(&sandbox),
        )
        .await
        .expect("apply sandbox");
    Instant::now()
}

fn fork_of_svc_a(image: &str) -> Value {
    json!({
        "forks": [{
            "forkOf": {"kind": "Deployment", "name": "svc-a"},
            "customizations": {
                "images": [{"container": "app", "image": image}],
                "env": [{"container": "app", "name": "FEATURE_X", "value": "on"}],
            },
        }],
        "members": [{"labelSelector": {"matchLabels": {"job": "pr-1-tests"}}}],
    })
}

/// `GET path` on a controller's probe port on loopback: status code and body.
fn probe(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("probe connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let code = answer
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned();
    format!("{code} {body}")
}

/// Polls `check` until it holds or `timeout` passes.
async fn until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition(sandbox: &Sandbox, type_: &str) -> Option<(String, String, String)> {
    sandbox
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn is_ready(sandbox: &Sandbox) -> bool {
    condition(sandbox, "Ready").is_some_and(|c| c.0 == "True")
        && sandbox.status.as_ref().and_then(|s| s.observed_generation)
            == sandbox.metadata.generation
}

/// The whole life of a pull request's sandbox: apply → fork made from the baseline with the
/// customizations → Ready → keyed requests and the member's connections reach it, nothing else
/// does → delete → forks gone, everything back on the baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_of_a_deployment_is_made_routed_reported_and_removed() {
    let _serial = serial().await;
    let Some(mut w) = World::new("ctl-life").await else {
        return;
    };
    w.start_controller("controller-1");
    let applied = apply_sandbox(
        &w.client,
        "pr-1",
        fork_of_svc_a("registry.local/svc-a:pr-1"),
    )
    .await;
    let ready = until(WAIT, || async {
        w.sandbox("pr-1").await.is_some_and(|s| is_ready(&s))
    })
    .await;
    let to_ready = applied.elapsed();
    assert!(ready, "the sandbox goes Ready; logs:\n{}", w.logs());
    eprintln!("apply to Ready: {to_ready:?}");

    // The fork Deployment: the baseline's template, customized, labelled and owned.
    let deployments: Api<Deployment> = Api::namespaced(w.client.clone(), NS);
    let fork = deployments
        .get("svc-a-pr-1")
        .await
        .expect("fork Deployment");
    let sandbox = w.sandbox("pr-1").await.expect("sandbox");
    let owner = &fork.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Sandbox", "pr-1")
    );
    assert_eq!(Some(owner.uid.clone()), sandbox.uid());
    assert_eq!(fork.labels()["redirector.dev/sandbox"], "pr-1");
    assert_eq!(fork.labels()["redirector.dev/fork-of"], "svc-a");
    let spec = fork.spec.clone().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    let container = &spec.template.spec.as_ref().expect("pod spec").containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.local/svc-a:pr-1")
    );
    let env: BTreeMap<String, Value> = container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), serde_json::to_value(e).expect("env")))
        .collect();
    assert_eq!(env["FEATURE_X"]["value"], "on");
    assert_eq!(
        env["REDIRECTOR_ROUTING_KEY"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['redirector.dev/routing-key']"
    );

    // Its pods: not selected by the baseline Service; carrying the key for the downward API.
    let pods: Api<Pod> = Api::namespaced(w.client.clone(), NS);
    let fork_pods = pods
        .list(&ListParams::default().labels("redirector.dev/sandbox=pr-1"))
        .await
        .expect("pods")
        .items;
    assert_eq!(fork_pods.len(), 1);
    let baseline_selector = baseline_service()
        .spec
        .and_then(|s| s.selector)
        .expect("selector");
    let labels = fork_pods[0].labels();
    assert!(
        !baseline_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v)),
        "the baseline Service must not select the fork: {labels:?}"
    );
    assert_eq!(labels["team"], "cart", "labels nothing selects by are kept");
    assert_eq!(
        fork_pods[0].annotations()["redirector.dev/routing-key"],
        "pr-1"
    );

    // The fork Service, and the status naming everything.
    let services: Api<Service> = Api::namespaced(w.client.clone(), NS);
    let fork_service = services.get("svc-a-pr-1").await.expect("fork Service");
    let ports: Vec<_> = fork_service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .expect("ports");
    assert_eq!(
        ports
            .iter()
            .map(|p| p.name.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["tcp", "http"]
    );
    let status = sandbox.status.clone().expect("status");
    assert_eq!(status.routing_key.as_deref(), Some("pr-1"));
    assert_eq!(status.forks.len(), 1);
    let made = &status.forks[0];
    assert_eq!(
        (made.fork_of.as_str(), made.deployment.as_str()),
        ("Deployment/svc-a", "svc-a-pr-1")
    );
    assert_eq!((made.ready_endpoints, made.total_endpoints), (1, 1));
    assert_eq!(made.services[0].fork, "svc-a-pr-1");

    // Traffic: the member's connections and keyed requests reach the fork; nothing else does.
    assert!(
        eventually(Duration::from_secs(5), || w.tcp(&w.member) == "slot-1"),
        "member steered to the fork: {}; slices: {}; status: {:?}; logs:\n{}",
        w.tcp(&w.member),
        w.cluster
            .kubectl(&["get", "endpointslices", "-n", NS, "-o", "yaml"])
            .unwrap_or_default(),
        w.agent_status(),
        w.logs()
    );
    assert_eq!(w.tcp(&w.outsider), BASELINE);
    assert!(
        eventually(Duration::from_secs(5), || w.http(Some("pr-1")) == "slot-1"),
        "keyed request: {}",
        w.http(Some("pr-1"))
    );
    assert_eq!(w.http(None), BASELINE);

    // kubectl shows the key and readiness.
    let table = w
        .cluster
        .kubectl(&["get", "sandboxes", "-n", NS])
        .expect("kubectl");
    assert!(table.contains("KEY") && table.contains("READY"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("pr-1") && l.contains("True")),
        "{table}"
    );

    // A RouteGroup over it is Ready too.
    let group: RouteGroup = serde_json::from_value(json!({
        "apiVersion": "redirector.dev/v1alpha1", "kind": "RouteGroup",
        "metadata": {"name": "both", "namespace": NS},
        "spec": {"routingKey": "both", "sandboxes": {"names": ["pr-1"]}},
    }))
    .expect("group");
    let groups: Api<RouteGroup> = Api::namespaced(w.client.clone(), NS);
    groups
        .create(&PostParams::default(), &group)
        .await
        .expect("group");
    assert!(
        until(WAIT, || async {
            groups
                .get("both")
                .await
                .ok()
                .and_then(|g| g.status)
                .is_some_and(|s| {
                    s.sandboxes == ["pr-1"]
                        && s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                })
        })
        .await,
        "RouteGroup Ready with its sandbox; logs:\n{}",
        w.logs()
    );

    // A baseline that changes leaves the fork alone; a Sandbox that changes re-makes it.
    deployments
        .patch(
            "svc-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "app", "image": "registry.local/svc-a:next"}]}}}})),
        )
        .await
        .expect("patch baseline");
    apply_sandbox(
        &w.client,
        "pr-1",
        fork_of_svc_a("registry.local/svc-a:pr-1"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let image = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers[0].image.clone())
    };
    assert_eq!(
        image(&deployments.get("svc-a-pr-1").await.expect("fork")).as_deref(),
        Some("registry.local/svc-a:pr-1")
    );
    apply_sandbox(
        &w.client,
        "pr-1",
        fork_of_svc_a("registry.local/svc-a:pr-1b"),
    )
    .await;
    assert!(
        until(WAIT, || async {
            deployments
                .get("svc-a-pr-1")
                .await
                .ok()
                .and_then(|d| image(&d))
                .as_deref()
                == Some("registry.local/svc-a:pr-1b")
        })
        .await,
        "a changed Sandbox re-makes its fork; logs:\n{}",
        w.logs()
    );

    // Delete: the finalizer holds the Sandbox until its forks are gone; traffic returns.
    let deleted = Instant::now();
    w.sandboxes()
        .delete("pr-1", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(
        until(WAIT, || async { w.sandbox("pr-1").await.is_none() }).await,
        "the Sandbox goes; logs:\n{}",
        w.logs()
    );
    assert!(
        deployments
            .get_opt("svc-a-pr-1")
            .await
            .expect("get")
            .is_none()
    );
    assert!(services.get_opt("svc-a-pr-1").await.expect("get").is_none());
    assert!(
        eventually(Duration::from_secs(5), || w.tcp(&w.member) == BASELINE),
        "member back on the baseline; logs:\n{}",
        w.logs()
    );
    assert_eq!(w.http(Some("pr-1")), BASELINE);
    eprintln!("delete to back on the baseline: {:?}", deleted.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_whose_ttl_runs_out_is_deleted_with_its_forks() {
    let _serial = serial().await;
    let Some(mut w) = World::new("ctl-ttl").await else {
        return;
    };
    w.start_controller("controller-1");
    let mut spec = fork_of_svc_a("registry.local/svc-a:pr-1");
    spec["ttl"] = json!("4s");
    let applied = apply_sandbox(&w.client, "pr-1", spec).await;
    assert!(
        until(WAIT, || async {
            w.sandbox("pr-1").await.is_some_and(|s| is_ready(&s))
        })
        .await,
        "Ready first; logs:\n{}",
        w.logs()
    );
    let expires = w
        .sandbox("pr-1")
        .await
        .and_then(|s| s.status)
        .and_then(|s| s.expires_at);
    assert!(expires.is_some(), "status says when it expires");
    assert!(
        until(WAIT, || async { w.sandbox("pr-1").await.is_none() }).await,
        "expired and deleted; logs:\n{}",
        w.logs()
    );
    let gone_after = applied.elapsed();
    // The TTL counts from creationTimestamp, which has whole seconds: up to 1 s before
    // the moment the test applied it.
    assert!(
        gone_after >= Duration::from_secs(3),
        "not before the TTL: {gone_after:?}"
    );
    let deployments: Api<Deployment> = Api::namespaced(w.client.clone(), NS);
    assert!(
        deployments
            .get_opt("svc-a-pr-1")
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        eventually(Duration::from_secs(5), || w.tcp(&w.member) == BASELINE),
        "member back on the baseline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_that_cannot_be_made_or_run_fails_with_the_reason() {
    let _serial = serial().await;
    let Some(mut w) = World::new("ctl-fail").await else {
        return;
    };
    w.start_controller("controller-1");
    let failed = |name: &'static str, reason: &'static str| {
        let w = &w;
        async move {
            until(WAIT, || async {
                w.sandbox(name)
                    .await
                    .and_then(|s| condition(&s, "Failed"))
                    .is_some_and(|c| c.0 == "True" && c.1 == reason)
            })
            .await
        }
    };
    apply_sandbox(
        &w.client,
        "pr-missing",
        json!({"forks": [{"forkOf": {"kind": "Deployment", "name": "nope"}}]}),
    )
    .await;
    assert!(
        failed("pr-missing", "BaselineNotFound").await,
        "logs:\n{}",
        w.logs()
    );
    let sandbox = w.sandbox("pr-missing").await.expect("sandbox");
    assert!(
        condition(&sandbox, "Failed")
            .expect("failed")
            .2
            .contains("Deployment shop/nope not found")
    );
    assert!(!is_ready(&sandbox));

    let mut bad = fork_of_svc_a("x");
    bad["forks"][0]["customizations"]["images"][0]["container"] = json!("sidecar");
    apply_sandbox(&w.client, "pr-bad", bad).await;
    assert!(
        failed("pr-bad", "InvalidCustomization").await,
        "logs:\n{}",
        w.logs()
    );

    apply_sandbox(
        &w.client,
        "pr-pull",
        fork_of_svc_a("registry.local/svc-a:pull-error"),
    )
    .await;
    assert!(
        failed("pr-pull", "ImagePullError").await,
        "logs:\n{}",
        w.logs()
    );
    let message = condition(&w.sandbox("pr-pull").await.expect("sandbox"), "Failed")
        .expect("c")
        .2;
    assert!(message.contains("ImagePullBackOff"), "{message}");

    // A missing baseline that appears later is forked then.
    let mut nope = baseline_deployment();
    nope.metadata.name = Some("nope".into());
    create_in(&w.client, NS, &nope)
        .await
        .expect("Deployment nope");
    assert!(
        until(WAIT, || async {
            w.sandbox("pr-missing").await.is_some_and(|s| is_ready(&s))
        })
        .await,
        "the baseline appeared: forked and Ready; logs:\n{}",
        w.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_and_the_other_takes_over() {
    let _serial = serial().await;
    let Some(mut w) = World::new("ctl-lease").await else {
        return;
    };
    let first = w.start_controller_with("controller-1", &["--health-listen", "127.0.0.1:19091"]);
    w.controllers[first]
        .wait_for_log("leading", WAIT)
        .expect("the first replica leads");
    let second = w.start_controller_with("controller-2", &["--health-listen", "127.0.0.1:19092"]);
    w.controllers[second]
        .wait_for_log("standing by", WAIT)
        .expect("the second stands by");
    // Both are ready (a stand-by is what takes over) and say which they are.
    assert_eq!(probe(19091, "/readyz"), "200 leading");
    assert_eq!(probe(19092, "/readyz"), "200 standing by");
    assert_eq!(probe(19092, "/healthz"), "200 ok");
    let leases: Api<Lease> = Api::namespaced(w.client.clone(), NS);
    let holder = leases
        .get("redirector-controller")
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("controller-1"));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !w.controllers[second].logs().contains("leading:"),
        "one leader at a time; logs:\n{}",
        w.logs()
    );

    // The leader dies without releasing: the stand-by takes over once the lease runs out.
    w.controllers[first].kill9();
    let killed = Instant::now();
    w.controllers[second]
        .wait_for_log("leading", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("take-over: {e}; logs:\n{}", w.logs()));
    let took = killed.elapsed();
    eprintln!("take-over after the leader was killed: {took:?} (lease 3s)");
    assert!(
        took < Duration::from_secs(8),
        "within the lease time and a renewal: {took:?}"
    );
    apply_sandbox(
        &w.client,
        "pr-1",
        fork_of_svc_a("registry.local/svc-a:pr-1"),
    )
    .await;
    assert!(
        until(WAIT, || async {
            w.sandbox("pr-1").await.is_some_and(|s| is_ready(&s))
        })
        .await,
        "the new leader reconciles; logs:\n{}",
        w.logs()
    );
    assert!(
        eventually(Duration::from_secs(5), || w.tcp(&w.member) == "slot-1"),
        "and the member is steered to the fork"
    );
}
