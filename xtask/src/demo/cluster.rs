//! `cargo xtask demo --cluster`: a pull request's sandbox through the whole cluster workflow,
//! on one machine and with no cluster.
//!
//! The cluster is the test API server (`redirector_tests::k8s::TestCluster`: etcd and a real
//! API server on loopback, no controllers, no nodes) with the CRDs, namespace `shop`, the
//! baseline Deployment `svc-a` and its dual-stack Service. The one node is simulated
//! (`redirector_tests::Node`, network namespaces as pods): the baseline pod behind the Service's
//! VIPs, two free pods the fake kubelet (`redirector_tests::kubelet`, playing the Deployment
//! controller, the kubelet and the EndpointSlice controller) binds fork replicas to, a `member`
//! pod (job=pr-123-tests) and an `outsider`. The node agent runs inside the node and reaches the
//! API server through a `Bridge`; the sandbox controller runs on the host.
//!
//! Then the pipeline's part, with the real CLI: `redirector cluster sandbox create --fork ...
//! --wait`, the fork appearing and going Ready, the member's and keyed traffic reaching it,
//! `redirector cluster sandbox delete --wait`, everything back on the baseline. Every step is
//! checked: the demo fails with the reason when one does not do what it should.
//!
//! Same setup as tests/tests/k8s_controller.rs (its `World`), which the suite keeps working.
use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::Deployment,
        core::v1::{Pod as KubePod, Service},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams},
};
use redirector_tests::{
    Bridge, Daemon, HttpReq, Node, Pod, Server,
    k8s::TestCluster,
    kubelet::{FakeKubelet, create_ready_pod},
    shop::{HTTP_PORT, NS, TCP_PORT, VIP4, VIP6, baseline_deployment, baseline_service},
    workspace_bin,
};
use serde::Deserialize as _;
use serde_json::{Value, json};

use super::{is_root, step};
use crate::{k8s_testenv, setup};

const SANDBOX: &str = "pr-123";
/// What the controller names the fork Deployment and the fork Service.
const FORK: &str = "svc-a-pr-123";
const FORK_IMAGE: &str = "registry.local/svc-a:pr-123";
const ROUTER: &str = "10.200.0.1:15001";
const NODE_NAME: &str = "node-a";
/// What the baseline pod's servers answer as; fork slot N's answer as `fork-slot-N`.
const BASELINE: &str = "baseline";
const SLOTS: usize = 2;
/// For the API server, the CRDs, the agent and the controller to come up.
const WAIT: Duration = Duration::from_secs(30);
/// For the node agent to apply what the cluster says, after the CLI returned.
const TRAFFIC_WAIT: Duration = Duration::from_secs(15);
const LEASE_DURATION: &str = "5s";
/// The test API server has no printer columns for built-in kinds (kubectl shows only NAME and
/// CREATED AT): the labels the controller sets say which objects are forks.
const GET_WORKLOADS: [&str; 6] = [
    "get",
    "deployments,services,pods",
    "-n",
    NS,
    "-L",
    "redirector.dev/sandbox,redirector.dev/fork-of",
];

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run(&setup::Options::default())?;
    if !is_root() {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    step("The test API server and etcd (built once from pinned Debian packages, then cached)");
    let testenv = k8s_testenv::ensure()?;
    for (var, path) in testenv.env() {
        println!("  {var}={}", path.display());
        // SAFETY: no other thread runs yet (the Tokio runtime starts below), so nothing reads
        // the environment while it changes; `TestCluster::start` reads these.
        unsafe { std::env::set_var(var, path) };
    }
    step("Building redirector and the test peers");
    setup::status(Command::new(env!("CARGO")).args(["build", "--bins"]))?;
    let redirector = workspace_bin("redirector")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting a Tokio runtime")?;
    let workflow = Instant::now();
    let result = runtime.block_on(demo(&redirector));
    runtime.shutdown_timeout(Duration::from_secs(10));
    let timings = result.context("cluster demo FAILED")?;
    println!(
        "\ncluster demo passed in {} ({} of it the cluster workflow): Sandbox {SANDBOX} forked \
         svc-a (Ready {} after create), the member's connections and keyed requests reached the \
         fork, the rest the baseline; everything back on the baseline {} after delete",
        secs(started.elapsed()),
        secs(workflow.elapsed()),
        secs(timings.to_ready),
        secs(timings.to_baseline),
    );
    Ok(())
}

struct Timings {
    to_ready: Duration,
    to_baseline: Duration,
}

async fn demo(redirector: &Path) -> anyhow::Result<Timings> {
    let mut world = World::start(redirector).await?;
    world.start_controller().await?;

    step("Before any sandbox: everything reaches the baseline");
    world.traffic(false).await?;

    step("The pipeline creates the sandbox (the same command works against a real cluster)");
    let to_ready = world.cli(&[
        "cluster",
        "sandbox",
        "create",
        SANDBOX,
        "-n",
        NS,
        "--fork",
        &format!("svc-a={FORK_IMAGE}"),
        "--env",
        "svc-a:FEATURE_X=on",
        "--member",
        "job=pr-123-tests",
        "--ttl",
        "2h",
        "--wait",
        "--timeout",
        "2m",
    ])?;
    println!("  create → Ready: {} (the CLI's whole run)", secs(to_ready));

    step("The controller made the fork; the fake kubelet runs it on the node");
    world.kubectl(&GET_WORKLOADS).await?;
    world.kubectl(&["get", "sandboxes", "-n", NS]).await?;
    world.show_fork().await?;

    step("With the sandbox: the member's connections and keyed requests reach the fork");
    world.traffic(true).await?;

    step("The pipeline is done: delete the sandbox");
    let deleted = Instant::now();
    world.cli(&["cluster", "sandbox", "delete", SANDBOX, "-n", NS, "--wait"])?;

    step("Sandbox gone: everything back on the baseline");
    world.traffic(false).await?;
    let to_baseline = deleted.elapsed();
    println!("  delete → back on the baseline: {}", secs(to_baseline));
    world.check_fork_gone().await?;
    world.kubectl(&GET_WORKLOADS).await?;

    step("Tearing down");
    world.stop()?;
    drop(world);
    println!(
        "  controller, fake kubelet and node agent stopped (programs detached); namespaces, \
         cgroup and bpffs removed; API server and etcd stopped, their directory removed"
    );
    Ok(Timings {
        to_ready,
        to_baseline,
    })
}

/// The cluster, the node and what runs on them. Dropping it stops everything, in an order that
/// leaves nothing behind: the controller, the fake kubelet, the node agent, the pods' processes,
/// the node, the API server.
struct World {
    controller: Option<Daemon>,
    kubelet: Option<FakeKubelet>,
    agent: Daemon,
    _pause: Vec<Daemon>,
    _servers: Vec<Server>,
    _bridge: Bridge,
    member: Pod,
    outsider: Pod,
    node: Arc<Node>,
    client: Client,
    cluster: TestCluster,
    redirector: PathBuf,
    /// Whether kubectl can be run; without it objects are listed through the API.
    kubectl: bool,
}

impl Drop for World {
    fn drop(&mut self) {
        // The Daemon guards would stop it too; first, so nothing re-creates forks meanwhile.
        self.controller.take();
        self.kubelet.take();
        // The aborted kubelet task lets go of the node (and stops the fork pods' processes) on
        // a worker thread: wait for it, so the node goes after the agent, from here.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.node) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl World {
    async fn start(redirector: &Path) -> anyhow::Result<World> {
        step("A cluster without nodes: etcd and the API server on loopback");
        let cluster = TestCluster::start()
            .await
            .context("starting the test API server")?;
        println!("  API server {}", cluster.server_url());
        println!(
            "  export KUBECONFIG={}   (for every command below)",
            cluster.kubeconfig_path().display()
        );
        let crds = crds_of(redirector)?;
        let client = cluster.install(&crds, NS).await?;
        println!(
            "  CRDs from `redirector crds`: {} (established)",
            crds.iter()
                .map(ResourceExt::name_any)
                .collect::<Vec<_>>()
                .join(", ")
        );
        create(&client, baseline_deployment()).await?;
        create(&client, baseline_service()).await?;
        println!(
            "  namespace {NS}: Deployment svc-a (image registry.local/svc-a:main, \
             FEATURE_X=off, pods app=svc-a)"
        );
        println!(
            "  Service svc-a: {VIP4} and {VIP6}, port tcp {TCP_PORT}, port http {HTTP_PORT} \
             (appProtocol http), selects app=svc-a"
        );

        step(&format!(
            "A simulated node {NODE_NAME} (network namespaces as pods)"
        ));
        let mut node = Node::new("cluster-demo")?;
        let baseline = node.add_pod("svc-a")?;
        node.add_vip(VIP4.parse()?, &baseline)?;
        node.add_vip(VIP6.parse()?, &baseline)?;
        let slots: Vec<Pod> = (1..=SLOTS)
            .map(|i| node.add_pod(&format!("slot-{i}")))
            .collect::<anyhow::Result<_>>()?;
        let member = node.add_pod("member")?;
        let outsider = node.add_pod("outsider")?;
        let mut servers = vec![
            baseline.serve_ports(&node, BASELINE, &[TCP_PORT], &[])?,
            baseline.serve_http(&node, BASELINE, HTTP_PORT)?,
        ];
        for (i, slot) in slots.iter().enumerate() {
            let name = format!("fork-slot-{}", i + 1);
            servers.push(slot.serve_ports(&node, &name, &[TCP_PORT], &[])?);
            servers.push(slot.serve_http(&node, &name, HTTP_PORT)?);
        }
        let mut pause = Vec::new();
        for (pod, labels) in [
            (&member, json!({"job": "pr-123-tests"})),
            (&outsider, json!({"job": "other"})),
        ] {
            pause.push(create_pod(&client, &node, pod, labels).await?);
        }
        println!(
            "  {:<9} {:<12} baseline of svc-a behind {VIP4} and {VIP6}: TCP {TCP_PORT}, HTTP \
             {HTTP_PORT}; answers \"{BASELINE}\"",
            baseline.name, baseline.ipv4
        );
        for (i, slot) in slots.iter().enumerate() {
            println!(
                "  {:<9} {:<12} free: the fake kubelet runs fork replicas here; answers \
                 \"fork-slot-{}\"",
                slot.name,
                slot.ipv4,
                i + 1
            );
        }
        println!(
            "  {:<9} {:<12} Pod job=pr-123-tests: where the pull request's tests run",
            member.name, member.ipv4
        );
        println!(
            "  {:<9} {:<12} Pod job=other: everyone else",
            outsider.name, outsider.ipv4
        );

        step("The node agent, inside the node");
        let server_url = cluster.server_url();
        let port = server_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("the API server's URL has no port")?;
        let bridge = Bridge::start(&node.netns_path(), ([127, 0, 0, 1], port).into())?;
        let kubeconfig = std::fs::read_to_string(cluster.kubeconfig_path())?;
        let bridged = format!("https://127.0.0.1:{}", bridge.port());
        let agent_kubeconfig = node.dir().join("kubeconfig");
        std::fs::write(&agent_kubeconfig, kubeconfig.replace(&server_url, &bridged))?;
        let config = node.dir().join("redirector.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nbpffs = \"{}\"\napi_socket = \"{}\"\nstate_file = \"{}\"\n",
                node.bpffs().join("redirector").display(),
                node.dir().join("api.sock").display(),
                node.dir().join("state.json").display(),
            ),
        )?;
        let args: Vec<OsString> = vec![
            "run".into(),
            "--kubernetes".into(),
            "--node-name".into(),
            NODE_NAME.into(),
            "--kubeconfig".into(),
            agent_kubeconfig.into(),
            "--config".into(),
            config.into(),
            "--cgroup".into(),
            node.cgroup().into(),
            "--router-listen".into(),
            ROUTER.into(),
            "--poll-interval".into(),
            "200ms".into(),
            "--cleanup-on-exit".into(),
        ];
        println!("  $ redirector {}", show_args(&args));
        println!(
            "  (its kubeconfig points at a bridge to the API server: the node has no route out)"
        );
        let agent = node.spawn_daemon("agent", redirector, &args)?;
        agent.wait_for_log("ready", WAIT)?;
        println!("  agent ready: it watches Sandboxes, Services, EndpointSlices and node-a's Pods");

        let node = Arc::new(node);
        let mut world = World {
            controller: None,
            kubelet: None,
            agent,
            _pause: pause,
            _servers: servers,
            _bridge: bridge,
            member,
            outsider,
            node,
            client,
            cluster,
            redirector: redirector.to_owned(),
            kubectl: kubectl_available(),
        };
        world.kubelet = Some(FakeKubelet::start(
            world.client.clone(),
            world.node.clone(),
            NODE_NAME,
            NS,
            slots,
        ));
        Ok(world)
    }

    async fn start_controller(&mut self) -> anyhow::Result<()> {
        step("The sandbox controller, on the host (it only talks to the API server)");
        let args: Vec<OsString> = vec![
            "controller".into(),
            "--kubeconfig".into(),
            self.cluster.kubeconfig_path().into(),
            "--lease-namespace".into(),
            NS.into(),
            "--lease-duration".into(),
            LEASE_DURATION.into(),
        ];
        println!("  $ redirector {}", show_args(&args));
        let controller =
            self.controller
                .insert(Daemon::spawn("controller", &self.redirector, &args)?);
        controller.wait_for_log("leading", WAIT)?;
        println!(
            "  controller leading (Lease {NS}/redirector-controller); in a cluster it is a \
             Deployment whose replicas elect a leader"
        );
        println!(
            "  fake kubelet started: plays the Deployment controller, the kubelet and the \
             EndpointSlice controller for the forks"
        );
        Ok(())
    }

    /// Runs the redirector CLI against the cluster as a pipeline would, showing its output as
    /// it comes; how long it took.
    fn cli(&self, args: &[&str]) -> anyhow::Result<Duration> {
        println!("\n$ redirector {}", args.join(" "));
        let started = Instant::now();
        let mut child = Command::new(&self.redirector)
            .args(args)
            .env("KUBECONFIG", self.cluster.kubeconfig_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running the redirector CLI")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let errors = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                show_line(&line);
            }
        });
        let stdout = child.stdout.take().context("no stdout pipe")?;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            show_line(&line);
        }
        errors.join().ok();
        let status = child.wait()?;
        let took = started.elapsed();
        ensure!(
            status.success(),
            "`redirector {}` failed ({status}); see its output above",
            args.join(" ")
        );
        Ok(took)
    }

    /// Shows `kubectl <args>`, or without kubectl the same objects listed through the API.
    async fn kubectl(&self, args: &[&str]) -> anyhow::Result<()> {
        println!("\n$ kubectl {}", args.join(" "));
        if self.kubectl {
            for line in self.cluster.kubectl(args)?.lines() {
                show_line(line);
            }
            return Ok(());
        }
        println!("  (kubectl is not installed: the same objects, listed through the API)");
        for kind in args.get(1).copied().unwrap_or_default().split(',') {
            let names: Vec<String> = match kind {
                "deployments" => names::<Deployment>(&self.client).await?,
                "services" => names::<Service>(&self.client).await?,
                "pods" => names::<KubePod>(&self.client).await?,
                _ => {
                    self.cli(&["cluster", "sandbox", "get", "-n", NS])?;
                    continue;
                }
            };
            println!("  {kind}: {}", names.join(", "));
        }
        Ok(())
    }

    /// What the controller made, checked against what the pipeline asked for.
    async fn show_fork(&self) -> anyhow::Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), NS);
        let fork = deployments
            .get_opt(FORK)
            .await?
            .with_context(|| format!("the controller made no Deployment {FORK}"))?;
        let container = fork
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.containers.first())
            .context("the fork Deployment has no container")?;
        let image = container.image.clone().unwrap_or_default();
        let env: Vec<String> = container
            .env
            .iter()
            .flatten()
            .map(|e| match (&e.value, &e.value_from) {
                (Some(value), _) => format!("{}={value}", e.name),
                (None, Some(from)) => format!(
                    "{} from {}",
                    e.name,
                    from.field_ref
                        .as_ref()
                        .map_or("elsewhere", |f| f.field_path.as_str())
                ),
                (None, None) => e.name.clone(),
            })
            .collect();
        let owner = fork
            .owner_references()
            .first()
            .map(|o| format!("{}/{}", o.kind, o.name))
            .unwrap_or_default();
        println!("\n  Deployment {FORK} (owner {owner}), from svc-a's template:");
        println!("    image {image}; env {}", env.join(", "));
        ensure!(
            image == FORK_IMAGE,
            "the fork runs image {image:?}, not {FORK_IMAGE:?}"
        );
        ensure!(
            env.iter().any(|e| e == "FEATURE_X=on"),
            "the fork's environment lacks FEATURE_X=on: {env:?}"
        );

        let pods: Api<KubePod> = Api::namespaced(self.client.clone(), NS);
        let fork_pods = pods
            .list(&ListParams::default().labels(&format!("redirector.dev/sandbox={SANDBOX}")))
            .await?
            .items;
        let pod = fork_pods
            .first()
            .context("the fake kubelet made no fork pod")?;
        let labels = pod.labels();
        let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "  its pod {} ({}): {}",
            pod.name_any(),
            pod.status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default(),
            shown.join(", ")
        );
        ensure!(
            labels.get("app").map(String::as_str) != Some("svc-a"),
            "the fork pod is labelled app=svc-a: the baseline Service would send it ordinary \
             traffic"
        );
        println!("    not app=svc-a: the baseline Service never sends it ordinary traffic");

        let services: Api<Service> = Api::namespaced(self.client.clone(), NS);
        let service = services
            .get_opt(FORK)
            .await?
            .with_context(|| format!("the controller made no Service {FORK}"))?;
        let spec = service.spec.unwrap_or_default();
        let selector: Vec<String> = spec
            .selector
            .iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let ports: Vec<String> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| format!("{} {}", p.name.clone().unwrap_or_default(), p.port))
            .collect();
        println!(
            "  Service {FORK}: selects {}; ports {}",
            selector.join(","),
            ports.join(", ")
        );
        let sandboxes: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            NS,
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("redirector.dev", "v1alpha1", "Sandbox"),
                "sandboxes",
            ),
        );
        let sandbox = sandboxes.get(SANDBOX).await?;
        let status = &sandbox.data["status"];
        let named = &status["forks"][0]["services"][0];
        println!(
            "  Sandbox {SANDBOX} status: key {}, Service {} forked as {}: what every node agent \
             routes the key and the members to",
            status["routingKey"].as_str().unwrap_or("-"),
            named["baseline"].as_str().unwrap_or("-"),
            named["fork"].as_str().unwrap_or("-"),
        );
        ensure!(
            named["fork"] == FORK,
            "the Sandbox's status does not name Service {FORK} as the fork: {status}"
        );
        Ok(())
    }

    async fn check_fork_gone(&self) -> anyhow::Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), NS);
        let services: Api<Service> = Api::namespaced(self.client.clone(), NS);
        ensure!(
            deployments.get_opt(FORK).await?.is_none(),
            "Deployment {FORK} is still there after the delete"
        );
        ensure!(
            services.get_opt(FORK).await?.is_none(),
            "Service {FORK} is still there after the delete"
        );
        println!(
            "  Deployment and Service {FORK} gone before the Sandbox was (its finalizer waits \
             for them)"
        );
        // The fake kubelet, like the Deployment controller, removes the pods after the
        // Deployment.
        let pods: Api<KubePod> = Api::namespaced(self.client.clone(), NS);
        let forks = ListParams::default().labels(&format!("redirector.dev/sandbox={SANDBOX}"));
        let deadline = Instant::now() + TRAFFIC_WAIT;
        while !pods.list(&forks).await?.items.is_empty() {
            ensure!(
                Instant::now() < deadline,
                "the fork's pods are still there {} after the delete",
                secs(TRAFFIC_WAIT)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Calls svc-a from the member and the outsider until every call lands where it should
    /// (fork or baseline, depending on whether the sandbox exists), then shows the calls; fails
    /// if they do not within [`TRAFFIC_WAIT`].
    async fn traffic(&self, sandbox: bool) -> anyhow::Result<()> {
        let started = Instant::now();
        let rows = loop {
            let rows: Vec<(Probe, String)> = PROBES
                .iter()
                .map(|probe| (*probe, self.answer(probe)))
                .collect();
            let all_ok = rows.iter().all(|(p, got)| p.ok(sandbox, got));
            if all_ok || started.elapsed() >= TRAFFIC_WAIT {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!("  {:<9} {:<55} answered by", "pod", "call to svc-a");
        let mut wrong = Vec::new();
        for (probe, got) in &rows {
            let ok = probe.ok(sandbox, got);
            let want = if probe.reaches_fork(sandbox) {
                "the fork"
            } else {
                "the baseline"
            };
            let shown = if got.starts_with("error") {
                "error"
            } else {
                got.as_str()
            };
            println!(
                "  {:<9} {:<55} {:<12} {}",
                probe.who(),
                probe.describe(),
                shown,
                if ok {
                    "ok".to_owned()
                } else {
                    format!("WRONG: should reach {want}")
                }
            );
            if !ok {
                wrong.push(format!(
                    "{} {}: {got} (should reach {want})",
                    probe.who(),
                    probe.describe()
                ));
            }
        }
        if !wrong.is_empty() {
            bail!(
                "traffic still wrong after {} (the agent's and the controller's logs are above, \
                 prefixed [agent] and [controller]):\n  {}",
                secs(TRAFFIC_WAIT),
                wrong.join("\n  "),
            );
        }
        Ok(())
    }

    /// Who answered one call, or `error: ...`.
    fn answer(&self, probe: &Probe) -> String {
        let pod = match probe.from {
            Who::Member => &self.member,
            Who::Outsider => &self.outsider,
        };
        let result = match probe.call {
            Call::Tcp(ip) => {
                let ip: IpAddr = ip.parse().expect("demo addresses are valid");
                pod.call_tcp(&self.node, SocketAddr::new(ip, TCP_PORT), true)
                    .map(|r| r.server)
            }
            Call::Http(key) => {
                let vip = format!("{VIP4}:{HTTP_PORT}");
                let mut req = HttpReq::get("/");
                if let Some(key) = key {
                    req = req.header("baggage", &format!("sd-routing-key={key}"));
                }
                let spec = req.spec();
                pod.http(&self.node, &["h1", "--addr", &vip, "--req", &spec])
                    .map(|lines| {
                        lines
                            .first()
                            .and_then(|l| l["served_by"].as_str())
                            .unwrap_or("?")
                            .to_owned()
                    })
            }
        };
        result.unwrap_or_else(|err| format!("error: {err:#}"))
    }

    /// Stops the controller and the agent, checking they stop cleanly (drop does the rest).
    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut controller) = self.controller.take() {
            controller.terminate()?;
        }
        self.kubelet.take();
        self.agent.terminate()?;
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Who {
    Member,
    Outsider,
}

#[derive(Clone, Copy)]
enum Call {
    /// A TCP connection to this VIP, port `tcp`.
    Tcp(&'static str),
    /// An HTTP/1.1 request to the IPv4 VIP, port `http`, with this routing key in `baggage`.
    Http(Option<&'static str>),
}

#[derive(Clone, Copy)]
struct Probe {
    from: Who,
    call: Call,
    /// Whether it reaches the fork while the sandbox exists.
    forked: bool,
}

const PROBES: [Probe; 6] = [
    Probe {
        from: Who::Member,
        call: Call::Tcp(VIP4),
        forked: true,
    },
    Probe {
        from: Who::Member,
        call: Call::Tcp(VIP6),
        forked: true,
    },
    Probe {
        from: Who::Member,
        call: Call::Http(None),
        forked: true,
    },
    Probe {
        from: Who::Outsider,
        call: Call::Tcp(VIP4),
        forked: false,
    },
    Probe {
        from: Who::Outsider,
        call: Call::Http(Some(SANDBOX)),
        forked: true,
    },
    Probe {
        from: Who::Outsider,
        call: Call::Http(None),
        forked: false,
    },
];

impl Probe {
    fn reaches_fork(&self, sandbox: bool) -> bool {
        sandbox && self.forked
    }

    fn ok(&self, sandbox: bool, got: &str) -> bool {
        if self.reaches_fork(sandbox) {
            got.starts_with("fork-slot-")
        } else {
            got == BASELINE
        }
    }

    fn who(&self) -> &'static str {
        match self.from {
            Who::Member => "member",
            Who::Outsider => "outsider",
        }
    }

    fn describe(&self) -> String {
        match self.call {
            Call::Tcp(ip) if ip.contains(':') => format!("TCP  [{ip}]:{TCP_PORT}"),
            Call::Tcp(ip) => format!("TCP  {ip}:{TCP_PORT}"),
            Call::Http(Some(key)) => {
                format!("HTTP {VIP4}:{HTTP_PORT}, baggage: sd-routing-key={key}")
            }
            Call::Http(None) => format!("HTTP {VIP4}:{HTTP_PORT}, no routing key"),
        }
    }
}

/// The CRDs `redirector crds` prints (the demo does not link redirector-user: see Cargo.toml).
fn crds_of(redirector: &Path) -> anyhow::Result<Vec<CustomResourceDefinition>> {
    let out = Command::new(redirector)
        .arg("crds")
        .output()
        .context("running `redirector crds`")?;
    ensure!(
        out.status.success(),
        "`redirector crds` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout).context("`redirector crds` printed non-UTF-8")?;
    let crds = serde_yaml_ng::Deserializer::from_str(&text)
        .map(CustomResourceDefinition::deserialize)
        .collect::<Result<Vec<_>, _>>()
        .context("a CRD from `redirector crds`")?;
    ensure!(!crds.is_empty(), "`redirector crds` printed no CRD");
    Ok(crds)
}

async fn create<K>(client: &Client, object: K) -> anyhow::Result<()>
where
    K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = object.name_any();
    Api::<K>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating {} {NS}/{name}", K::kind(&())))?;
    Ok(())
}

async fn names<K>(client: &Client) -> anyhow::Result<Vec<String>>
where
    K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Ok(Api::<K>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|o| o.name_any())
        .collect())
}

/// The Pod object of a simulated pod, ready, with its sandbox process (the kubelet's part):
/// what lets the node agent tell the pod's connections by its labels.
async fn create_pod(
    client: &Client,
    node: &Node,
    pod: &Pod,
    labels: Value,
) -> anyhow::Result<Daemon> {
    let labels = serde_json::from_value(labels)?;
    create_ready_pod(client, node, pod, (NS, &pod.name, NODE_NAME), &labels).await
}

fn kubectl_available() -> bool {
    let kubectl = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    Command::new(kubectl)
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn show_args(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// One line of a command's output, indented (blank lines stay blank).
fn show_line(line: &str) {
    let line = line.trim_end();
    if line.is_empty() {
        println!();
    } else {
        println!("  {line}");
    }
}
