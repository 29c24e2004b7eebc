//! The node agent against a real API server: the test plays the kubelet (Pods with their IPs,
//! a sandbox process per pod in `kubepods/pod<uid>` under the attach cgroup) and the
//! EndpointSlice controller; the daemon does the rest from Sandbox objects.
mod support;

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsString,
    net::SocketAddr,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use redirector_tests::{
    Bridge, CallOpts, Daemon, HttpReq, Node, Pod as SimPod, Proto, Server,
    k8s::{ClusterOptions, TestCluster, create_in, require_k8s},
    kubelet::create_ready_pod,
    require_e2e,
};
use redirector_user::{
    api::answers::StatusAnswer,
    k8s::crd::{self, Sandbox},
};
use serde_json::{Value, json};
use support::{BASELINE, READY, eventually};

const NS: &str = "shop";
const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";
/// `svc-a` port `tcp`: 8080 on the Service and on every pod.
const TCP_PORT: u16 = 8080;
/// `svc-a` port `alt`: 7000 on the Service (and the baseline, which holds the VIP), 9090 on
/// the forks: the fork's port is found by name in its EndpointSlices.
const ALT_SERVICE_PORT: u16 = 7000;
const ALT_FORK_PORT: u16 = 9090;
/// `svc-a` port `http` (`appProtocol: http`): the node router routes its requests one by one.
const HTTP_PORT: u16 = 8081;
const ROUTER: &str = "10.200.0.1:15001";
const FORKS: usize = 3;

/// One simulated node wired to a test cluster: the baseline pod `svc-a` behind the VIPs, three
/// fork pods `svc-a-fork-N` (servers named `fork-N`), a `member` (label job=pr-1-tests) and an
/// `outsider`; each is also a Pod object on `node_name` with a sandbox process.
struct World {
    client: Client,
    node_name: String,
    node: Node,
    forks: Vec<SimPod>,
    member: SimPod,
    outsider: SimPod,
    _servers: Vec<Server>,
    /// Sandbox processes by pod name.
    pause: HashMap<String, Daemon>,
    daemon: Option<Daemon>,
    bridge: Bridge,
    kubeconfig: String,
    server_url: String,
}

/// The cluster with its CRDs and namespace, shared by the nodes of a test.
async fn cluster(opts: ClusterOptions) -> Option<(TestCluster, Client)> {
    if !require_e2e() || !require_k8s() {
        return None;
    }
    let cluster = TestCluster::start_with(opts).await.expect("test cluster");
    let client = cluster
        .install(&crd::definitions(), NS)
        .await
        .expect("CRDs and namespace");
    for svc in [service("svc-a", true), service("svc-a-fork", false)] {
        create_in(&client, NS, &svc).await.expect("Service");
    }
    Some((cluster, client))
}

fn service(name: &str, with_vips: bool) -> Service {
    let mut spec = json!({"ports": [
        {"name": "tcp", "port": TCP_PORT, "protocol": "TCP"},
        {"name": "alt", "port": ALT_SERVICE_PORT, "targetPort": "alt", "protocol": "TCP"},
        {"name": "http", "port": HTTP_PORT, "protocol": "TCP", "appProtocol": "http"},
    ]});
    if with_vips {
        spec["clusterIP"] = json!(VIP4);
        spec["clusterIPs"] = json!([VIP4, VIP6]);
        spec["ipFamilies"] = json!(["IPv4", "IPv6"]);
    }
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": NS}, "spec": spec}))
        .expect("service")
}

impl World {
    async fn new(label: &str, cluster: &TestCluster, client: &Client, node_name: &str) -> World {
        let mut node = Node::new(label).expect("node");
        let baseline = node.add_pod("svc-a").expect("pod");
        let forks: Vec<SimPod> = (1..=FORKS)
            .map(|i| node.add_pod(&format!("svc-a-fork-{i}")).expect("pod"))
            .collect();
        let member = node.add_pod("member").expect("pod");
        let outsider = node.add_pod("outsider").expect("pod");
        node.add_vip(VIP4.parse().expect("ip"), &baseline)
            .expect("vip");
        node.add_vip(VIP6.parse().expect("ip"), &baseline)
            .expect("vip");
        let mut servers = vec![
            baseline
                .serve_ports(&node, BASELINE, &[TCP_PORT, ALT_SERVICE_PORT], &[])
                .expect("baseline"),
        ];
        servers.push(
            baseline
                .serve_http(&node, BASELINE, HTTP_PORT)
                .expect("baseline http"),
        );
        for (i, fork) in forks.iter().enumerate() {
            let name = format!("fork-{}", i + 1);
            servers.push(
                fork.serve_ports(&node, &name, &[TCP_PORT, ALT_FORK_PORT], &[])
                    .expect("fork"),
            );
            servers.push(fork.serve_http(&node, &name, HTTP_PORT).expect("fork http"));
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
        let mut world = World {
            client: client.clone(),
            node_name: node_name.to_owned(),
            node,
            forks,
            member,
            outsider,
            _servers: servers,
            pause: HashMap::new(),
            daemon: None,
            bridge,
            kubeconfig,
            server_url,
        };
        for i in 0..FORKS {
            let fork = world.forks[i].clone();
            world
                .create_pod(
                    &fork,
                    &format!("svc-a-fork-{}", i + 1),
                    &[("app", "svc-a-fork")],
                )
                .await;
        }
        let member = world.member.clone();
        world
            .create_pod(&member, "member", &[("job", "pr-1-tests")])
            .await;
        let outsider = world.outsider.clone();
        world
            .create_pod(&outsider, "outsider", &[("job", "other")])
            .await;
        world
    }

    /// The kubelet's part: a Pod object on this node with the simulated pod's IPs, and a
    /// sandbox process in `kubepods/pod<uid>`.
    async fn create_pod(&mut self, pod: &SimPod, name: &str, labels: &[(&str, &str)]) {
        let name = self.pod_name(name);
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let pause = create_ready_pod(
            &self.client,
            &self.node,
            pod,
            (NS, &name, &self.node_name),
            &labels,
        )
        .await
        .expect("ready pod");
        self.pause.insert(name, pause);
    }

    /// Pod names carry the node's name so that two nodes' pods do not collide.
    fn pod_name(&self, name: &str) -> String {
        format!("{}-{name}", self.node_name)
    }

    /// The EndpointSlice controller's part for the fork Service: one slice per family with the
    /// given fork pods (by index) and their readiness.
    async fn set_fork_endpoints(&self, endpoints: &[(usize, bool)]) {
        for (family, v6) in [("IPv4", false), ("IPv6", true)] {
            let list: Vec<Value> = endpoints
                .iter()
                .map(|(i, ready)| {
                    let pod = &self.forks[*i];
                    let ip = if v6 {
                        pod.ipv6.to_string()
                    } else {
                        pod.ipv4.to_string()
                    };
                    json!({
                        "addresses": [ip],
                        "conditions": {"ready": ready},
                        "nodeName": self.node_name,
                        "targetRef": {"kind": "Pod", "namespace": NS,
                                      "name": self.pod_name(&format!("svc-a-fork-{}", i + 1))},
                    })
                })
                .collect();
            let name = format!("svc-a-fork-{}-{}", self.node_name, family.to_lowercase());
            let slice: EndpointSlice = serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": NS,
                             "labels": {"kubernetes.io/service-name": "svc-a-fork"}},
                "addressType": family,
                "ports": [
                    {"name": "tcp", "port": TCP_PORT, "protocol": "TCP"},
                    {"name": "alt", "port": ALT_FORK_PORT, "protocol": "TCP"},
                    {"name": "http", "port": HTTP_PORT, "protocol": "TCP"},
                ],
                "endpoints": list,
            }))
            .expect("slice");
            Api::<EndpointSlice>::namespaced(self.client.clone(), NS)
                .patch(
                    &name,
                    &PatchParams::apply("rdr-test").force(),
                    &Patch::Apply(&slice),
                )
                .await
                .expect("apply slice");
        }
    }

    fn start_daemon(&mut self) {
        self.start_daemon_with("");
    }

    /// Starts the daemon without waiting for it to be ready.
    fn spawn_daemon(&mut self) -> Daemon {
        self.write_daemon_files("");
        self.node
            .spawn_daemon("redirector", &support::redirector(), &self.daemon_args())
            .expect("spawn daemon")
    }

    /// Starts the daemon with `extra` appended to its config file.
    fn start_daemon_with(&mut self, extra: &str) {
        self.write_daemon_files(extra);
        let daemon = self
            .node
            .spawn_daemon("redirector", &support::redirector(), &self.daemon_args())
            .expect("spawn daemon");
        daemon.wait_for_log("ready", READY).expect("daemon ready");
        self.daemon = Some(daemon);
    }

    fn write_daemon_files(&self, extra: &str) {
        let kubeconfig = self.node.dir().join("kubeconfig");
        let bridged = format!("https://127.0.0.1:{}", self.bridge.port());
        std::fs::write(
            &kubeconfig,
            self.kubeconfig.replace(&self.server_url, &bridged),
        )
        .expect("write kubeconfig");
        let config = self.node.dir().join("redirector.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nbpffs = \"{}\"\napi_socket = \"{}\"\nstate_file = \"{}\"\n\n\
                 [kubernetes]\nenabled = true\n\n{extra}",
                self.node.bpffs().join("redirector").display(),
                self.api_socket().display(),
                self.node.dir().join("state.json").display(),
            ),
        )
        .expect("config");
    }

    fn daemon_args(&self) -> Vec<OsString> {
        vec![
            "run".into(),
            "--config".into(),
            self.node.dir().join("redirector.toml").into(),
            "--cgroup".into(),
            self.node.cgroup().into(),
            "--kubeconfig".into(),
            self.node.dir().join("kubeconfig").into(),
            "--node-name".into(),
            self.node_name.clone().into(),
            "--poll-interval".into(),
            "200ms".into(),
            "--router-listen".into(),
            ROUTER.into(),
        ]
    }

    fn api_socket(&self) -> std::path::PathBuf {
        self.node.dir().join("api.sock")
    }

    fn logs(&self) -> String {
        self.daemon.as_ref().map(Daemon::logs).unwrap_or_default()
    }

    /// Who answers one TCP connection from `pod` to `to`, or the error.
    fn tcp(&self, pod: &SimPod, to: SocketAddr) -> String {
        match pod.call_tcp(&self.node, to, true) {
            Ok(result) => result.server,
            Err(err) => format!("error: {err:#}"),
        }
    }

    /// Who answers each of `n` new TCP connections from `pod` to `to`, counted.
    fn spread(&self, pod: &SimPod, to: SocketAddr, n: u32) -> BTreeMap<String, usize> {
        let results = pod
            .call_many(&self.node, Proto::Tcp, to, &CallOpts::new().count(n))
            .expect("calls");
        let mut counts = BTreeMap::new();
        for r in results {
            *counts.entry(r.server).or_default() += 1;
        }
        counts
    }

    fn status(&self) -> StatusAnswer {
        let out = std::process::Command::new(support::redirector())
            .args(["status", "-o", "json", "--socket"])
            .arg(self.api_socket())
            .output()
            .expect("status");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("status json: {e}: {}", String::from_utf8_lossy(&out.stdout))
        })
    }
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::new(VIP4.parse().expect("ip"), port)
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::new(VIP6.parse().expect("ip"), port)
}

async fn apply_sandbox(client: &Client, spec: Value) -> Instant {
    let sandbox: Sandbox = serde_json::from_value(json!({
        "apiVersion": "redirector.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": "pr-1", "namespace": NS},
        "spec": spec,
    }))
    .expect("sandbox");
    Api::<Sandbox>::namespaced(client.clone(), NS)
        .patch(
            "pr-1",
            &PatchParams::apply("rdr-test").force(),
            &Patch::Apply(&sandbox),
        )
        .await
        .expect("apply sandbox");
    Instant::now()
}

/// A cluster and one node whose `member` `pr-1` steers to `fork-1`: where most tests start.
/// One test of this file at a time: each runs an API server, etcd, a daemon and a node's pods,
/// and two at once on a 2-core machine turn latency assertions into a measure of the load.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

async fn steered(label: &str, opts: ClusterOptions) -> Option<(TestCluster, Client, World)> {
    let (cluster, client) = cluster(opts).await?;
    let mut w = World::new(label, &cluster, &client, "node-a").await;
    w.set_fork_endpoints(&[(0, true)]).await;
    w.start_daemon();
    apply_sandbox(&client, pr1()).await;
    // Setup, not the latency check (a_sandbox_steers_its_members_to_the_fork_and_back has it).
    assert!(
        eventually(Duration::from_secs(5), || w.tcp(&w.member, v4(TCP_PORT))
            == "fork-1"),
        "{label}: the member is steered; daemon logs:\n{}",
        w.logs()
    );
    Some((cluster, client, w))
}

fn pr1() -> Value {
    json!({
        "forks": [{"service": {"name": "svc-a"}, "to": {"service": "svc-a-fork"}}],
        "members": [{"labelSelector": {"matchLabels": {"job": "pr-1-tests"}}}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_steers_its_members_to_the_fork_and_back() {
    let _serial = serial().await;
    let Some((cluster, client)) = cluster(ClusterOptions::default()).await else {
        return;
    };
    let mut w = World::new("k8s-sandbox", &cluster, &client, "node-a").await;
    w.set_fork_endpoints(&[(0, true)]).await;
    w.start_daemon();
    assert_eq!(w.tcp(&w.member, v4(TCP_PORT)), BASELINE, "no Sandbox yet");

    let applied = apply_sandbox(&client, pr1()).await;
    assert!(
        eventually(Duration::from_secs(1), || w.tcp(&w.member, v4(TCP_PORT))
            == "fork-1"),
        "a member reaches the fork within a second of the Sandbox; daemon logs:\n{}",
        w.logs()
    );
    eprintln!("Sandbox applied -> member steered: {:?}", applied.elapsed());
    assert_eq!(
        w.tcp(&w.outsider, v4(TCP_PORT)),
        BASELINE,
        "a non-member keeps the baseline"
    );
    let fork = w.forks[0].clone();
    assert_eq!(
        w.tcp(&fork, v4(TCP_PORT)),
        "fork-1",
        "the fork's own pod is a member"
    );
    // Every port, both families; the fork's port is the one named like the Service's.
    assert_eq!(w.tcp(&w.member, v6(TCP_PORT)), "fork-1", "IPv6 cluster IP");
    let alt = w
        .member
        .call_tcp(&w.node, v4(ALT_SERVICE_PORT), true)
        .expect("alt port");
    assert_eq!(alt.server, "fork-1");
    assert_eq!(
        alt.peer_unmapped(),
        v4(ALT_SERVICE_PORT),
        "the member sees the Service"
    );
    let status = w.status();
    let kube = status.kubernetes.expect("the Kubernetes source in status");
    assert!(kube.health.connected, "{kube:?}");
    assert_eq!(kube.members_resolved, 2, "member and fork pod: {kube:?}");
    assert_eq!(kube.issues, [], "{kube:?}");

    Api::<Sandbox>::namespaced(client.clone(), NS)
        .delete("pr-1", &DeleteParams::default())
        .await
        .expect("delete sandbox");
    assert!(
        eventually(Duration::from_secs(1), || w.tcp(&w.member, v4(TCP_PORT))
            == BASELINE),
        "a deleted Sandbox's member is back on the baseline within a second"
    );
}

/// An HTTP port (`appProtocol: http`) of a forked Service: a pod that is no member goes
/// through the node router, and each request reaches the fork or the baseline by its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_are_routed_by_their_key() {
    let _serial = serial().await;
    let Some((cluster, client)) = cluster(ClusterOptions::default()).await else {
        return;
    };
    let mut w = World::new("k8s-http", &cluster, &client, "node-a").await;
    w.set_fork_endpoints(&[(0, true)]).await;
    w.start_daemon();
    apply_sandbox(&client, pr1()).await;
    let vip = v4(HTTP_PORT).to_string();
    let keyed = HttpReq::get("/who")
        .header("baggage", "sd-routing-key=pr-1")
        .spec();
    let plain = HttpReq::get("/who").spec();
    let mut served = Vec::new();
    let routed = eventually(Duration::from_secs(2), || {
        let args = [
            "h1", "--addr", &vip, "--req", &keyed, "--req", &plain, "--req", &keyed,
        ];
        served = w
            .outsider
            .http(&w.node, &args)
            .map(|lines| {
                lines
                    .iter()
                    .map(|l| l["served_by"].as_str().unwrap_or("?").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        served == ["fork-1", BASELINE, "fork-1"]
    });
    assert!(
        routed,
        "per request, on one connection: {served:?}; daemon logs:\n{}",
        w.logs()
    );
    // A member reaches the fork without a key (L4), over the same port.
    let member = w
        .member
        .http(&w.node, &["h1", "--addr", &vip, "--req", &plain])
        .expect("member request");
    assert_eq!(member[0]["served_by"], "fork-1");
}

/// The config file and the cluster side by side: an object of the cluster that clashes with one
/// of the file is left out and reported; the file's keeps working, and so do the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clash_with_the_config_file_is_reported_not_merged() {
    let _serial = serial().await;
    let Some((cluster, client)) = cluster(ClusterOptions::default()).await else {
        return;
    };
    let mut w = World::new("k8s-clash", &cluster, &client, "node-a").await;
    w.set_fork_endpoints(&[(0, true)]).await;
    let file = format!(
        "[[service]]\nname = \"svc-a-by-hand\"\naddress = \"{VIP4}:{TCP_PORT}\"\n\n\
         [[sandbox]]\nkey = \"pr-1\"\nmembers = [\"{}\"]\n\
         routes = [{{ service = \"svc-a-by-hand\", fork = \"{}:{TCP_PORT}\" }}]\n",
        w.member.netns_path().display(),
        w.forks[1].ipv4,
    );
    w.start_daemon_with(&file);
    assert_eq!(
        w.tcp(&w.member, v4(TCP_PORT)),
        "fork-2",
        "the file's sandbox"
    );
    apply_sandbox(&client, pr1()).await;
    let mut kube = None;
    let reported = eventually(Duration::from_secs(2), || {
        kube = w.status().kubernetes;
        kube.as_ref()
            .is_some_and(|k| k.rejected.iter().any(|m| m.contains("\"pr-1\"")))
    });
    assert!(reported, "the clash is reported: {kube:?}");
    assert_eq!(
        w.tcp(&w.member, v4(TCP_PORT)),
        "fork-2",
        "the file's sandbox still rules"
    );
    // The table says so too.
    let out = std::process::Command::new(support::redirector())
        .args(["status", "--socket"])
        .arg(w.api_socket())
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("kubernetes") && text.contains("(left out)"),
        "{text}"
    );
}

/// A restarted agent rebuilds its state from the cluster; restarted while the API server is
/// down, it waits for it and never flushes what the previous run pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_the_api_server_keeps_steering() {
    let _serial = serial().await;
    let Some((mut cluster, _client, mut w)) =
        steered("k8s-restart", ClusterOptions::default()).await
    else {
        return;
    };

    w.daemon.take().expect("daemon").kill9();
    cluster.stop_apiserver().expect("stop API server");
    let daemon = w.spawn_daemon();
    let waiting = Instant::now();
    while waiting.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            w.tcp(&w.member, v4(TCP_PORT)),
            "fork-1",
            "the pinned state stays while the new agent waits for the API server:\n{}",
            daemon.logs()
        );
        assert_eq!(w.tcp(&w.outsider, v4(TCP_PORT)), BASELINE);
    }
    assert!(
        !daemon.logs().contains(" ready "),
        "not ready without the cluster:\n{}",
        daemon.logs()
    );
    cluster.start_apiserver().await.expect("start API server");
    daemon
        .wait_for_log("ready", READY)
        .expect("ready once the API server is back");
    assert!(
        daemon.logs().contains("adopted=[\"connect4\""),
        "{}",
        daemon.logs()
    );
    w.daemon = Some(daemon);
    assert_eq!(w.tcp(&w.member, v4(TCP_PORT)), "fork-1");
    assert_eq!(w.tcp(&w.outsider, v4(TCP_PORT)), BASELINE);
}

/// A fork named by a pod selector instead of a Service: its ready pods, anywhere in the cluster,
/// on the port the Service's `targetPort` names in their spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_given_by_a_pod_selector_reaches_its_ready_pods() {
    let _serial = serial().await;
    let Some((cluster, client)) = cluster(ClusterOptions::default()).await else {
        return;
    };
    let mut w = World::new("k8s-selector", &cluster, &client, "node-a").await;
    w.start_daemon();
    apply_sandbox(
        &client,
        json!({
            "forks": [{"service": {"name": "svc-a"}, "ports": ["tcp"],
                       "to": {"selector": {"matchLabels": {"app": "svc-a-fork"}}}}],
            "members": [{"labelSelector": {"matchLabels": {"job": "pr-1-tests"}}}],
        }),
    )
    .await;
    let mut spread = BTreeMap::new();
    let all = eventually(Duration::from_secs(3), || {
        spread = w.spread(&w.member, v4(TCP_PORT), 60);
        spread.len() == FORKS && spread.keys().all(|k| k.starts_with("fork-"))
    });
    assert!(
        all,
        "the selector's three ready pods: {spread:?}; logs:\n{}",
        w.logs()
    );
    // One pod stops being ready: no new connection reaches it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    pods.patch_status(
        &w.pod_name("svc-a-fork-2"),
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await
    .expect("not ready");
    let skipped = eventually(Duration::from_secs(3), || {
        spread = w.spread(&w.member, v4(TCP_PORT), 40);
        !spread.contains_key("fork-2")
    });
    assert!(skipped, "{spread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_scaled_to_three_gets_new_connections_on_all_ready_ones() {
    let _serial = serial().await;
    let Some((_cluster, _client, w)) = steered("k8s-scale", ClusterOptions::default()).await else {
        return;
    };

    w.set_fork_endpoints(&[(0, true), (1, true), (2, true)])
        .await;
    let mut spread = BTreeMap::new();
    let all_three = eventually(Duration::from_secs(3), || {
        spread = w.spread(&w.member, v4(TCP_PORT), 60);
        spread.len() == 3 && spread.values().all(|n| *n >= 5)
    });
    assert!(
        all_three,
        "60 connections spread over the three forks: {spread:?}"
    );

    w.set_fork_endpoints(&[(0, true), (1, false), (2, true)])
        .await;
    let mut without = BTreeMap::new();
    let skipped = eventually(Duration::from_secs(3), || {
        without = w.spread(&w.member, v4(TCP_PORT), 40);
        !without.contains_key("fork-2")
    });
    assert!(
        skipped,
        "a fork endpoint that is not ready gets no new connection: {without:?}"
    );
    assert!(
        without.keys().all(|k| k == "fork-1" || k == "fork-3"),
        "{without:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_pod_whose_sandbox_restarts_is_followed() {
    let _serial = serial().await;
    let Some((_cluster, client, mut w)) =
        steered("k8s-podrestart", ClusterOptions::default()).await
    else {
        return;
    };

    // The pod sandbox restarts: its process and namespace go, a new namespace and process
    // (a new PID) come, with the same pod UID and IPs.
    let name = w.pod_name("member");
    let old = w.pause.remove(&name).expect("member's sandbox process");
    drop(old);
    let member = w.member.clone();
    w.node.delete_pod_netns(&member).expect("delete netns");
    w.node.restore_pod_netns(&member).expect("restore netns");
    let uid = Api::<Pod>::namespaced(client.clone(), NS)
        .get(&name)
        .await
        .expect("pod")
        .uid()
        .expect("uid");
    let pause = member
        .start_sandbox_process(&w.node, &uid)
        .expect("new sandbox process");
    w.pause.insert(name, pause);
    assert!(
        eventually(Duration::from_secs(2), || w.tcp(&w.member, v4(TCP_PORT))
            == "fork-1"),
        "the member is steered in its new namespace; daemon logs:\n{}",
        w.logs()
    );

    // A deleted Pod leaves the members map, though its namespace is still there.
    Api::<Pod>::namespaced(client.clone(), NS)
        .delete(&w.pod_name("member"), &DeleteParams::default())
        .await
        .expect("delete pod");
    assert!(
        eventually(Duration::from_secs(1), || w.tcp(&w.member, v4(TCP_PORT))
            == BASELINE),
        "a deleted member pod is no member"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_steers_only_its_own_pods() {
    let _serial = serial().await;
    let Some((cluster, client)) = cluster(ClusterOptions::default()).await else {
        return;
    };
    let mut a = World::new("k8s-node-a", &cluster, &client, "node-a").await;
    let mut b = World::new("k8s-node-b", &cluster, &client, "node-b").await;
    a.set_fork_endpoints(&[(0, true)]).await;
    b.set_fork_endpoints(&[(0, true)]).await;
    a.start_daemon();
    b.start_daemon();
    apply_sandbox(&client, pr1()).await;
    for w in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(1), || w.tcp(&w.member, v4(TCP_PORT))
                == "fork-1"),
            "{}'s member is steered",
            w.node_name
        );
    }
    // Each daemon holds its own node's member and fork pod only: the other node's pods, with
    // the same labels (and here even the same IPs), are not its business.
    for w in [&a, &b] {
        let members = w.status().kubernetes.expect("kubernetes").members;
        let pods: Vec<&str> = members.iter().map(|m| m.pod.as_str()).collect();
        assert_eq!(pods.len(), 2, "{pods:?}");
        assert!(
            pods.iter()
                .all(|p| p.starts_with(&format!("{NS}/{}-", w.node_name))),
            "{} resolves only its pods: {pods:?}",
            w.node_name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_going_away_changes_nothing_and_its_return_applies_changes() {
    let _serial = serial().await;
    let Some((mut cluster, client, w)) = steered("k8s-outage", ClusterOptions::default()).await
    else {
        return;
    };

    cluster.stop_apiserver().expect("stop API server");
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            w.tcp(&w.member, v4(TCP_PORT)),
            "fork-1",
            "steering stays while the API server is down"
        );
        assert_eq!(w.tcp(&w.outsider, v4(TCP_PORT)), BASELINE);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!w.status().kubernetes.expect("kubernetes").health.connected);
    cluster.start_apiserver().await.expect("restart API server");
    // A change made after the return reaches the kernel: the outsider joins the sandbox.
    relabel_outsider(&w, &client).await;
    assert!(
        eventually(Duration::from_secs(10), || w.tcp(&w.outsider, v4(TCP_PORT))
            == "fork-1"),
        "a change after the API server returned is applied; daemon logs:\n{}",
        w.logs()
    );
    assert_eq!(w.tcp(&w.member, v4(TCP_PORT)), "fork-1");
}

async fn relabel_outsider(w: &World, client: &Client) {
    Api::<Pod>::namespaced(client.clone(), NS)
        .patch(
            &w.pod_name("outsider"),
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"job": "pr-1-tests"}}})),
        )
        .await
        .expect("label outsider");
}

/// After an etcd compaction the agent's watches resume from a revision that no longer exists:
/// the API server answers 410 Gone, the agent lists again, and nothing it held is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_forcing_410_relists_and_loses_nothing() {
    let _serial = serial().await;
    // Without the watch cache every watch reads etcd, so a compacted revision is 410 at once.
    let opts = ClusterOptions { watch_cache: false };
    let Some((mut cluster, client, w)) = steered("k8s-410", opts).await else {
        return;
    };

    // Changes the agent does not watch move the revision on; compaction drops the history;
    // a restart of the API server breaks every watch, which resumes from the old revision.
    for i in 0..5 {
        let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(
            json!({"metadata": {"name": format!("noise-{i}"), "namespace": NS}}),
        )
        .expect("configmap");
        create_in(&client, NS, &cm).await.expect("ConfigMap");
    }
    cluster.compact_etcd().expect("compact");
    cluster.stop_apiserver().expect("stop");
    cluster.start_apiserver().await.expect("start");
    relabel_outsider(&w, &client).await;
    assert!(
        eventually(Duration::from_secs(10), || w.tcp(&w.outsider, v4(TCP_PORT))
            == "fork-1"),
        "changes after the relist apply; daemon logs:\n{}",
        w.logs()
    );
    assert_eq!(w.tcp(&w.member, v4(TCP_PORT)), "fork-1", "nothing lost");
    let logs = w.logs();
    assert!(
        logs.contains("410 Gone") && logs.contains("watch listed again"),
        "the watches saw 410 Gone and listed again:\n{logs}"
    );
}

/// The committed CRDs are what a cluster operator applies: the real apiextensions server takes
/// them, and its schema refuses a Sandbox with a bad key or without forks, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_crds_validate_sandboxes() {
    let _serial = serial().await;
    if !require_k8s() {
        return;
    }
    let cluster = TestCluster::start().await.expect("cluster");
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds.yaml");
    cluster
        .kubectl(&["apply", "-f", crds])
        .expect("kubectl apply deploy/crds.yaml");
    for name in ["sandboxes.redirector.dev", "routegroups.redirector.dev"] {
        cluster
            .kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=30s",
                &format!("crd/{name}"),
            ])
            .expect("established");
    }
    let good = "apiVersion: redirector.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: ok}\n\
                spec:\n  forks: [{service: {name: a}, to: {service: b}}]\n";
    cluster
        .kubectl_with_input(&["apply", "-f", "-"], good)
        .expect("a valid Sandbox is accepted");
    for (bad, expect) in [
        (
            "apiVersion: redirector.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: bad-key}\n\
             spec:\n  routingKey: \"no spaces\"\n  forks: [{service: {name: a}, to: {service: b}}]\n",
            "spec.routingKey",
        ),
        (
            "apiVersion: redirector.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: no-forks}\n\
             spec:\n  forks: []\n",
            "spec.forks",
        ),
        (
            "apiVersion: redirector.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: two-targets}\n\
             spec:\n  forks: [{service: {name: a}, to: {service: b, selector: {matchLabels: {x: y}}}}]\n",
            "spec.forks[0].to",
        ),
    ] {
        let refused = cluster.kubectl_with_input(&["apply", "-f", "-"], bad);
        let message = format!("{:#}", refused.expect_err("an invalid Sandbox is refused"));
        assert!(
            message.contains(expect),
            "the schema names {expect}: {message}"
        );
    }
}

/// The agent on a busy node: 1 000 Pods on it and 500 Sandboxes, each forking its own Service
/// for one member pod. Prints the time from the last object to the whole state in the kernel,
/// and the agent's memory, for the record (figures, not assertions: timing belongs to
/// benchmarks). The member pods have no processes here, so they stay unresolved, as pods whose
/// containers are not up yet do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_1000_pods_and_500_sandboxes() {
    let _serial = serial().await;
    use futures::StreamExt as _;
    const PODS: usize = 1000;
    const SANDBOXES: usize = 500;
    let Some((cluster, client)) = cluster(ClusterOptions::default()).await else {
        return;
    };
    let mut w = World::new("k8s-scale500", &cluster, &client, "node-a").await;
    w.start_daemon();
    let ip = |net: u8, i: usize| format!("10.{net}.{}.{}", i / 250, i % 250 + 1);
    let mut objects: Vec<Value> = Vec::new();
    for i in 0..PODS {
        objects.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p-{i}"), "namespace": NS, "labels": {"sbx": (i % SANDBOXES).to_string()}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": ip(202, i), "podIPs": [{"ip": ip(202, i)}]}}));
    }
    for i in 0..SANDBOXES {
        objects.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("s-{i}"), "namespace": NS},
            "spec": {"clusterIP": ip(97, i), "clusterIPs": [ip(97, i)],
                     "ports": [{"name": "tcp", "port": 80, "protocol": "TCP"}]}}));
        objects.push(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("s-{i}-fork"), "namespace": NS,
                         "labels": {"kubernetes.io/service-name": format!("s-{i}-fork")}},
            "addressType": "IPv4",
            "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip(201, i)], "conditions": {"ready": true}}]}),
        );
        objects.push(json!({"apiVersion": "redirector.dev/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": format!("sb-{i}"), "namespace": NS},
            "spec": {"forks": [{"service": {"name": format!("s-{i}")}, "to": {"service": format!("s-{i}-fork")}}],
                     "members": [{"labelSelector": {"matchLabels": {"sbx": i.to_string()}}}]}}));
    }
    let created = Instant::now();
    let results: Vec<Result<(), String>> = futures::stream::iter(objects)
        .map(|object| {
            let client = client.clone();
            async move { create_any(&client, object).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in results {
        r.expect("create");
    }
    let creating = created.elapsed();
    let done = Instant::now();
    let applied = eventually(Duration::from_secs(120), || {
        let counts = w.status().counts;
        counts.sandboxes == SANDBOXES && counts.routes == SANDBOXES
    });
    assert!(
        applied,
        "all 500 Sandboxes in the kernel; status:\n{:?}",
        w.status().counts
    );
    let pid = w.daemon.as_ref().expect("daemon").pid();
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("daemon status")
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .map(str::to_owned)
        .unwrap_or_default();
    let status = w.status();
    eprintln!(
        "scale: {PODS} pods + {SANDBOXES} sandboxes created in {creating:?}; state complete {:?} \
         after the last object; agent {rss}; members unresolved {}",
        done.elapsed(),
        status.kubernetes.map_or(0, |k| k.members_unresolved)
    );
    // The node's own pods still work as before.
    w.set_fork_endpoints(&[(0, true)]).await;
    apply_sandbox(&client, pr1()).await;
    assert!(
        eventually(Duration::from_secs(10), || w.tcp(&w.member, v4(TCP_PORT))
            == "fork-1"),
        "the node's own sandbox works among 500 others"
    );
}

/// Creates any namespaced object from its JSON (apiVersion and kind inside).
async fn create_any(client: &Client, object: Value) -> Result<(), String> {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let api_version = object["apiVersion"].as_str().unwrap_or_default().to_owned();
    let kind = object["kind"].as_str().unwrap_or_default().to_owned();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    let plural = match kind.as_str() {
        "EndpointSlice" => "endpointslices".to_owned(),
        "Sandbox" => "sandboxes".to_owned(),
        other => format!("{}s", other.to_lowercase()),
    };
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, &kind), &plural);
    let object: DynamicObject = serde_json::from_value(object).map_err(|e| e.to_string())?;
    Api::<DynamicObject>::namespaced_with(client.clone(), NS, &resource)
        .create(&PostParams::default(), &object)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
