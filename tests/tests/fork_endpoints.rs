//! Forks backed by several endpoints: new connections (kernel, L4) and requests (node router,
//! L7) spread over all of them, and an endpoint taken out of the set gets nothing new from the
//! next sync on.
mod support;

use std::{collections::BTreeMap, ffi::OsString, path::PathBuf, time::Duration};

use redirector_tests::{CallOpts, Daemon, HttpReq, Node, Pod, Proto, Server, require_e2e};
use redirector_user::api::answers::StatusAnswer;
use serde_json::Value;
use support::{READY, addr, l7::served_by, redirector, write_atomically};

const VIP: &str = "10.96.0.10";
/// TCP and UDP (rdr-peer) on this port of the VIP and of every pod.
const PEER_PORT: u16 = 8080;
/// HTTP (rdr-http) on this port of the VIP and of every pod.
const HTTP_PORT: u16 = 8081;
const ROUTER: &str = "10.200.0.1:15001";
const FORKS: [&str; 3] = ["fork-a", "fork-b", "fork-c"];
const CONNECTIONS: u32 = 60;
/// What "reaches every endpoint" means for [`CONNECTIONS`] over three: a fair spread gives 20
/// each, and a hash that kept an endpoint below this would be broken, not unlucky.
const AT_LEAST: usize = 5;

/// A node with a baseline and three fork pods behind one VIP, a `member` pod of sandbox `pr-1`,
/// a `frontend` (no sandbox) and a `tester` pod for API-made sandboxes. Services: `svc-tcp`,
/// `svc-udp` (VIP:8080) and the HTTP service `svc-web` (VIP:8081).
struct Setup {
    node: Node,
    forks: Vec<Pod>,
    member: Pod,
    frontend: Pod,
    tester: Pod,
    config: PathBuf,
    daemon: Option<Daemon>,
    /// Write routes as `fork = "..."`, which every daemon version reads.
    single_form: bool,
    _servers: Vec<Server>,
}

impl Setup {
    fn new(label: &str) -> Option<Setup> {
        if !require_e2e() {
            return None;
        }
        let mut node = Node::new(label).expect("simulated node");
        let baseline = node.add_pod("baseline").expect("pod");
        let forks: Vec<Pod> = FORKS
            .iter()
            .map(|name| node.add_pod(name).expect("pod"))
            .collect();
        let member = node.add_pod("member").expect("pod");
        let frontend = node.add_pod("frontend").expect("pod");
        let tester = node.add_pod("tester").expect("pod");
        node.add_vip(VIP.parse().expect("vip"), &baseline)
            .expect("vip");
        let mut servers = Vec::new();
        for (pod, name) in std::iter::once((&baseline, "baseline")).chain(forks.iter().zip(FORKS)) {
            servers.push(
                pod.serve_ports(&node, name, &[PEER_PORT], &[PEER_PORT])
                    .expect("rdr-peer server"),
            );
            servers.push(
                pod.serve_http(&node, name, HTTP_PORT)
                    .expect("rdr-http server"),
            );
        }
        let config = node.dir().join("redirector.toml");
        Some(Setup {
            node,
            forks,
            member,
            frontend,
            tester,
            config,
            daemon: None,
            single_form: false,
            _servers: servers,
        })
    }

    /// The first `n` fork pods as a route's fields: `forks = ["ip:port", ...]`, or, for the
    /// layout before fork sets, `fork = "ip:port"`.
    fn forks_toml(&self, n: usize, port: u16) -> String {
        let list: Vec<String> = self.forks[..n]
            .iter()
            .map(|pod| format!("\"{}:{port}\"", pod.ipv4))
            .collect();
        if self.single_form {
            assert_eq!(n, 1, "the single form names one endpoint");
            format!("fork = {}", list[0])
        } else {
            format!("forks = [{}]", list.join(", "))
        }
    }

    /// Sandbox `pr-1` forks all three services to the first `n` fork pods.
    fn config_text(&self, n: usize) -> String {
        format!(
            r#"[daemon]
cgroup = "{cgroup}"
bpffs = "{bpffs}"
api_socket = "{api_socket}"
state_file = "{state_file}"
router_listen = "{ROUTER}"

[[service]]
name = "svc-tcp"
address = "{VIP}:{PEER_PORT}"

[[service]]
name = "svc-udp"
address = "{VIP}:{PEER_PORT}"
protocol = "udp"

[[service]]
name = "svc-web"
address = "{VIP}:{HTTP_PORT}"
protocol = "http"

[[sandbox]]
key = "pr-1"
members = ["{member}"]
routes = [
  {{ service = "svc-tcp", {peer} }},
  {{ service = "svc-udp", {peer} }},
  {{ service = "svc-web", {web} }},
]
"#,
            cgroup = self.node.cgroup().display(),
            bpffs = self.node.bpffs().join("redirector").display(),
            api_socket = self.api_socket().display(),
            state_file = self.node.dir().join("state.json").display(),
            member = self.member.netns_path().display(),
            peer = self.forks_toml(n, PEER_PORT),
            web = self.forks_toml(n, HTTP_PORT),
        )
    }

    fn api_socket(&self) -> PathBuf {
        self.node.dir().join("api.sock")
    }

    fn start(&mut self, forks: usize) {
        self.start_binary(forks, &redirector());
    }

    fn start_binary(&mut self, forks: usize, binary: &std::path::Path) {
        let daemon = self.spawn(forks, binary);
        self.daemon = Some(daemon);
    }

    /// Writes the config for `forks` endpoints and starts `binary` on it; returns once ready.
    fn spawn(&self, forks: usize, binary: &std::path::Path) -> Daemon {
        write_atomically(&self.config, &self.config_text(forks));
        let args: Vec<OsString> = vec![
            "run".into(),
            "--config".into(),
            self.config.clone().into(),
            "--poll-interval".into(),
            "200ms".into(),
        ];
        let daemon = self
            .node
            .spawn_daemon("redirector", binary, &args)
            .expect("spawn daemon");
        daemon.wait_for_log("ready", READY).expect("daemon ready");
        daemon
    }

    /// Rewrites the config for `forks` endpoints and waits until the daemon applied it.
    fn reconfigure(&self, forks: usize) {
        let daemon = self.daemon.as_ref().expect("daemon started");
        let mark = daemon.log_len();
        write_atomically(&self.config, &self.config_text(forks));
        daemon
            .wait_for_log_from(mark, "reload applied", Duration::from_secs(10))
            .expect("reload applied");
    }

    /// `redirector ARGS -o json` against this node's daemon.
    fn cli_json(&self, args: &[&str]) -> Value {
        let out = std::process::Command::new(redirector())
            .args(args)
            .args(["-o", "json", "--socket"])
            .arg(self.api_socket())
            .output()
            .expect("run redirector CLI");
        assert!(
            out.status.success(),
            "redirector {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).expect("CLI JSON")
    }

    /// Who answered each of `count` new TCP connections from `pod` to `svc-tcp`; asserts the
    /// application saw the service address every time.
    fn tcp_spread(&self, pod: &Pod, count: u32) -> BTreeMap<String, usize> {
        let to = addr(&format!("{VIP}:{PEER_PORT}"));
        let results = pod
            .call_many(&self.node, Proto::Tcp, to, &CallOpts::new().count(count))
            .unwrap_or_else(|e| panic!("tcp from {}: {e:#}", pod.name));
        for r in &results {
            assert_eq!(r.peer_unmapped(), to, "getpeername shows the service");
        }
        tally(results.into_iter().map(|r| r.server))
    }

    /// Who answered each of `count` requests for `key`, sent over one keep-alive connection
    /// from the frontend to `svc-web`.
    fn http_spread(&self, key: &str, count: usize) -> BTreeMap<String, usize> {
        let spec = HttpReq::get("/who")
            .header("baggage", &format!("sd-routing-key={key}"))
            .spec();
        let target = format!("{VIP}:{HTTP_PORT}");
        let mut args = vec!["h1", "--addr", target.as_str()];
        for _ in 0..count {
            args.extend(["--req", spec.as_str()]);
        }
        let lines = self
            .frontend
            .http(&self.node, &args)
            .unwrap_or_else(|e| panic!("rdr-http from the frontend: {e:#}"));
        let ports: Vec<&Value> = lines.iter().map(|l| &l["local_port"]).collect();
        assert!(
            ports.windows(2).all(|w| w[0] == w[1]),
            "one connection: {ports:?}"
        );
        tally(served_by(&lines))
    }
}

fn tally(servers: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for server in servers {
        *counts.entry(server).or_insert(0) += 1;
    }
    counts
}

/// Asserts that exactly `endpoints` answered, each at least `at_least` times.
fn assert_spread(
    what: &str,
    counts: &BTreeMap<String, usize>,
    endpoints: &[&str],
    at_least: usize,
) {
    eprintln!("{what}: {counts:?}");
    let answered: Vec<&str> = counts.keys().map(String::as_str).collect();
    assert_eq!(answered, endpoints, "{what}: who answered: {counts:?}");
    for (server, n) in counts {
        assert!(
            *n >= at_least,
            "{what}: {server} only {n} times: {counts:?}"
        );
    }
}

#[test]
fn connections_and_requests_spread_over_every_endpoint_and_leave_a_removed_one() {
    let Some(mut c) = Setup::new("forkset") else {
        return;
    };
    c.start(3);

    let tcp = c.tcp_spread(&c.member, CONNECTIONS);
    assert_spread("member tcp, 3 endpoints", &tcp, &FORKS, AT_LEAST);
    // Through the router, per request, on one connection: turns come round exactly.
    let web = c.http_spread("pr-1", 30);
    assert_spread("frontend http, 3 endpoints", &web, &FORKS, 10);
    // Without the key: the baseline, as ever.
    assert_spread(
        "frontend tcp",
        &c.tcp_spread(&c.frontend, 3),
        &["baseline"],
        3,
    );

    // Listings show every endpoint.
    let routes = c.cli_json(&["route", "ls", "pr-1"]);
    let web_route = routes
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["service"] == "svc-web")
        .expect("svc-web route");
    let want: Vec<String> = c
        .forks
        .iter()
        .map(|p| format!("{}:{HTTP_PORT}", p.ipv4))
        .collect();
    assert_eq!(web_route["forks"], serde_json::json!(want), "{routes}");
    let endpoints_in_kernel = |c: &Setup| {
        let status: StatusAnswer =
            serde_json::from_value(c.cli_json(&["status"])).expect("status answer");
        status.map("endpoints").map(|m| m.entries)
    };
    // Three routes, each with two endpoints beyond the one in the route value.
    assert_eq!(endpoints_in_kernel(&c), Some(6));

    // fork-c leaves the set: nothing new reaches it from the next sync on.
    c.reconfigure(2);
    let tcp = c.tcp_spread(&c.member, CONNECTIONS);
    assert_spread("member tcp, 2 endpoints", &tcp, &FORKS[..2], AT_LEAST);
    let web = c.http_spread("pr-1", 20);
    assert_spread("frontend http, 2 endpoints", &web, &FORKS[..2], 10);
    assert_eq!(endpoints_in_kernel(&c), Some(3));

    // Down to one endpoint and back up to three.
    c.reconfigure(1);
    assert_spread(
        "member tcp, 1 endpoint",
        &c.tcp_spread(&c.member, 10),
        &FORKS[..1],
        10,
    );
    assert_eq!(endpoints_in_kernel(&c), Some(0));
    c.reconfigure(3);
    let tcp = c.tcp_spread(&c.member, CONNECTIONS);
    assert_spread("member tcp, 3 endpoints again", &tcp, &FORKS, AT_LEAST);
}

#[test]
fn one_udp_socket_stays_on_one_endpoint_and_sees_the_service_reply() {
    let Some(mut c) = Setup::new("forkset-udp") else {
        return;
    };
    c.start(3);
    let to = addr(&format!("{VIP}:{PEER_PORT}"));

    let one_socket = c
        .member
        .call_many(&c.node, Proto::Udp, to, &CallOpts::new().count(20))
        .expect("udp datagrams from one socket");
    let servers = tally(one_socket.iter().map(|r| r.server.clone()));
    assert_eq!(servers.len(), 1, "one socket, one endpoint: {servers:?}");
    assert!(
        FORKS.contains(&servers.keys().next().expect("a server").as_str()),
        "{servers:?}"
    );
    for reply in &one_socket {
        assert_eq!(
            reply.peer_unmapped(),
            to,
            "every reply comes from the service"
        );
    }

    // Each new socket is a new draw: 30 sockets cannot all land on one of three endpoints
    // unless the spread is broken (a fair one does that with probability 3^-29).
    let mut sockets = Vec::new();
    for _ in 0..30 {
        let r = c.member.call_udp(&c.node, to, true).expect("udp");
        assert_eq!(r.peer_unmapped(), to, "the reply comes from the service");
        sockets.push(r.server);
    }
    let servers = tally(sockets);
    assert!(servers.len() >= 2, "sockets spread: {servers:?}");
    assert!(
        servers.keys().all(|s| FORKS.contains(&s.as_str())),
        "{servers:?}"
    );

    // A connected UDP socket is steered once, at connect().
    let connected = c
        .member
        .call_many(
            &c.node,
            Proto::Udp,
            to,
            &CallOpts::new().connected().count(10),
        )
        .expect("connected udp");
    let servers = tally(connected.iter().map(|r| r.server.clone()));
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert!(connected.iter().all(|r| r.peer_unmapped() == to));
}

/// Routes with several endpoints made through the CLI (and so the API), in both forms.
#[test]
fn the_cli_makes_routes_with_several_endpoints() {
    let Some(mut c) = Setup::new("forkset-cli") else {
        return;
    };
    c.start(1);
    let endpoints: Vec<String> = c
        .forks
        .iter()
        .map(|p| format!("{}:{PEER_PORT}", p.ipv4))
        .collect();
    let tester = c.tester.netns_path();
    c.cli_json(&[
        "sandbox",
        "create",
        "pr-api",
        "--member",
        tester.to_str().expect("utf-8 path"),
        "--route",
        &format!("svc-tcp={},{}", endpoints[0], endpoints[1]),
    ]);
    let tcp = c.tcp_spread(&c.tester, CONNECTIONS);
    assert_spread("tester tcp, 2 endpoints", &tcp, &FORKS[..2], AT_LEAST);

    c.cli_json(&["route", "add", "pr-api", "svc-tcp", &endpoints.join(",")]);
    let routes = c.cli_json(&["route", "ls", "pr-api"]);
    assert_eq!(routes[0]["forks"], serde_json::json!(endpoints), "{routes}");
    let tcp = c.tcp_spread(&c.tester, CONNECTIONS);
    assert_spread("tester tcp, 3 endpoints", &tcp, &FORKS, AT_LEAST);

    // The single-endpoint form still works, and replaces the set.
    c.cli_json(&["route", "add", "pr-api", "svc-tcp", &endpoints[2]]);
    let tcp = c.tcp_spread(&c.tester, 10);
    assert_spread("tester tcp, 1 endpoint", &tcp, &FORKS[2..], 10);
}

/// `RDR_PREVIOUS_LAYOUT_BIN`: a `redirector` built from the commit before fork sets (map
/// layout v1). The upgrade to this build's layout and the downgrade back are checked against it
/// when it is given; nothing here builds it.
fn previous_layout_binary() -> Option<PathBuf> {
    let path = std::env::var_os("RDR_PREVIOUS_LAYOUT_BIN").map(PathBuf::from);
    if path.is_none() {
        assert!(
            !redirector_tests::under_ci(),
            "RDR_PREVIOUS_LAYOUT_BIN is not set under CI=true"
        );
        eprintln!(
            "SKIPPED: set RDR_PREVIOUS_LAYOUT_BIN to a redirector of map layout v1 to check upgrades from it"
        );
    }
    path
}

/// The pinned maps' names in the daemon's pin directory.
fn pinned_maps(c: &Setup) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(c.node.bpffs().join("redirector"))
        .expect("pin directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("RDR_"))
        .collect();
    names.sort();
    names
}

/// Needs a build of the previous map layout, which the suite does not make (it would be a second
/// full build of an old commit): reported as ignored, run by hand with
/// `RDR_PREVIOUS_LAYOUT_BIN=... cargo test --test fork_endpoints -- --ignored`.
#[test]
#[ignore = "needs RDR_PREVIOUS_LAYOUT_BIN, a redirector of map layout v1"]
fn a_daemon_of_the_previous_layout_is_replaced_and_back_without_a_gap() {
    let Some(previous) = previous_layout_binary() else {
        return;
    };
    let Some(mut c) = Setup::new("forkset-upgrade") else {
        return;
    };
    c.single_form = true;
    c.start_binary(1, &previous);
    let before = pinned_maps(&c);
    assert!(
        before.iter().all(|name| name.ends_with("_v1")),
        "{before:?}"
    );

    let to = addr(&format!("{VIP}:{PEER_PORT}"));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let failures = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let (mut calls, mut failures) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (pod, want) in [(&c.member, FORKS[0]), (&c.frontend, "baseline")] {
                    calls += 1;
                    match pod.call_tcp(&c.node, to, true) {
                        Ok(r) if r.server == want && r.peer_unmapped() == to => {}
                        Ok(r) => failures.push(format!("{}: {r:?}", pod.name)),
                        Err(e) => failures.push(format!("{}: {e:#}", pod.name)),
                    }
                }
            }
            (calls, failures)
        });
        let stop_traffic = StopOnDrop(&stop);
        for (binary, suffix) in [(redirector(), "_v2"), (previous.clone(), "_v1")] {
            c.daemon.take().expect("daemon").terminate().expect("stop");
            let daemon = c.daemon.insert(c.spawn(1, &binary));
            let logs = daemon.logs();
            assert!(
                logs.contains("detached the programs of another build"),
                "old programs retired:\n{logs}"
            );
            let now = pinned_maps(&c);
            assert!(
                !now.is_empty() && now.iter().all(|name| name.ends_with(suffix)),
                "only the running layout's maps are left: {now:?}"
            );
            assert_eq!(
                support::attached_programs(c.node.cgroup()).len(),
                9,
                "one set of programs"
            );
            if suffix == "_v2" {
                // An API object with one endpoint, for the way back: the state file keeps it
                // in the form the previous layout's daemon reads.
                let tester = c.tester.netns_path();
                c.cli_json(&[
                    "sandbox",
                    "create",
                    "pr-api",
                    "--member",
                    tester.to_str().expect("utf-8 path"),
                    "--route",
                    &format!("svc-tcp={}:{PEER_PORT}", c.forks[1].ipv4),
                ]);
            } else {
                assert!(!logs.contains("state file"), "state file restored:\n{logs}");
                assert_spread(
                    "tester after the downgrade",
                    &c.tcp_spread(&c.tester, 3),
                    &FORKS[1..2],
                    3,
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        drop(stop_traffic);
        traffic.join().expect("traffic thread")
    });
    let (calls, failures) = failures;
    assert!(
        calls >= 10,
        "traffic ran during the upgrades ({calls} calls)"
    );
    assert!(
        failures.is_empty(),
        "{} of {calls} calls went wrong: {failures:?}",
        failures.len()
    );
}

struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
