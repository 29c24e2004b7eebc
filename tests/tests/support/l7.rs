//! A simulated node for the node router: an HTTP service `svc-a` with a baseline and two
//! forks (sandboxes `pr-1`, `pr-2`), an HTTP service `svc-b` without forks, a `frontend` pod
//! that belongs to no sandbox and a `member` pod of `pr-1`. The router listens on the node's
//! bridge addresses.
use std::{path::PathBuf, time::Duration};

use redirector_tests::{Daemon, Node, Pod, Server, require_e2e};
use serde_json::Value;

use super::{READY, redirector};

pub const SVC_A: &str = "10.96.0.10:8080";
pub const SVC_A6: &str = "[fd00:96::10]:8080";
pub const SVC_B: &str = "10.96.0.11:8081";
pub const ROUTER4: &str = "10.200.0.1:15001";
pub const ROUTER6: &str = "[fd00:200::1]:15001";
pub const UPSTREAM_HEADER: &str = "x-redirector-upstream";

pub struct L7 {
    pub node: Node,
    pub frontend: Pod,
    pub member: Pod,
    pub baseline: Pod,
    pub fork1: Pod,
    pub fork2: Pod,
    pub config: PathBuf,
    pub daemon: Option<Daemon>,
    pub servers: Vec<Server>,
}

/// Per-route options in the generated config.
#[derive(Clone, Copy, Default)]
pub struct Routes {
    pub pr1: bool,
    pub pr2: bool,
    /// `on_fork_error = "baseline"` on pr-2's route.
    pub pr2_fallback: bool,
}

impl Routes {
    pub fn both() -> Routes {
        Routes {
            pr1: true,
            pr2: true,
            pr2_fallback: false,
        }
    }
}

impl L7 {
    pub fn new(label: &str) -> Option<L7> {
        if !require_e2e() {
            return None;
        }
        let mut node = Node::new(label).expect("simulated node");
        let frontend = node.add_pod("frontend").expect("pod");
        let member = node.add_pod("member").expect("pod");
        let baseline = node.add_pod("svc-a").expect("pod");
        let fork1 = node.add_pod("svc-a-pr1").expect("pod");
        let fork2 = node.add_pod("svc-a-pr2").expect("pod");
        let b = node.add_pod("svc-b").expect("pod");
        for vip in [SVC_A, SVC_A6] {
            node.add_vip(super::addr(vip).ip(), &baseline).expect("vip");
        }
        node.add_vip(super::addr(SVC_B).ip(), &b).expect("vip");
        let servers = vec![
            baseline
                .serve_http(&node, "baseline", 8080)
                .expect("server"),
            fork1.serve_http(&node, "fork-pr1", 8080).expect("server"),
            fork2.serve_http(&node, "fork-pr2", 8080).expect("server"),
            b.serve_http(&node, "b-baseline", 8081).expect("server"),
        ];
        let config = node.dir().join("redirector.toml");
        Some(L7 {
            node,
            frontend,
            member,
            baseline,
            fork1,
            fork2,
            config,
            daemon: None,
            servers,
        })
    }

    pub fn config_text(&self, routes: Routes) -> String {
        let mut pr1 = String::new();
        if routes.pr1 {
            pr1 = format!(
                "  {{ service = \"svc-a\", fork = \"{}:8080\" }},\n  {{ service = \"svc-a6\", fork = \"[{}]:8080\" }},\n",
                self.fork1.ipv4, self.fork1.ipv6
            );
        }
        let mut pr2 = String::new();
        if routes.pr2 {
            let policy = if routes.pr2_fallback {
                ", on_fork_error = \"baseline\""
            } else {
                ""
            };
            pr2 = format!(
                "  {{ service = \"svc-a\", fork = \"{}:8080\"{policy} }},\n  {{ service = \"svc-a6\", fork = \"[{}]:8080\"{policy} }},\n",
                self.fork2.ipv4, self.fork2.ipv6
            );
        }
        format!(
            r#"[daemon]
cgroup = "{cgroup}"
bpffs = "{bpffs}"
api_socket = "{api_socket}"
state_file = "{state_file}"
metrics_listen = "127.0.0.1:9464"
router_listen = ["{ROUTER4}", "{ROUTER6}"]

[router]
upstream_header = "{UPSTREAM_HEADER}"
connect_timeout_ms = 1000
request_timeout_ms = 2000
header_read_timeout_ms = 4000

[[service]]
name = "svc-a"
address = "{SVC_A}"
protocol = "http"

[[service]]
name = "svc-a6"
address = "{SVC_A6}"
protocol = "http"

[[service]]
name = "svc-b"
address = "{SVC_B}"
protocol = "http"

[[sandbox]]
key = "pr-1"
members = ["{member}"]
routes = [
{pr1}]

[[sandbox]]
key = "pr-2"
routes = [
{pr2}]
"#,
            cgroup = self.node.cgroup().display(),
            bpffs = self.node.bpffs().join("redirector").display(),
            api_socket = self.node.dir().join("api.sock").display(),
            state_file = self.node.dir().join("state.json").display(),
            member = self.member.netns_path().display(),
        )
    }

    pub fn write_config(&self, text: &str) {
        super::write_atomically(&self.config, text);
    }

    pub fn start(&mut self, routes: Routes) -> &mut Daemon {
        self.start_with(&self.config_text(routes))
    }

    /// Starts the daemon on a config of the caller's making (e.g. [`L7::config_text`] with
    /// other `[router]` settings).
    pub fn start_with(&mut self, config: &str) -> &mut Daemon {
        self.start_limited(config, None)
    }

    /// Like [`L7::start_with`], with the daemon started under `RLIMIT_NOFILE` (soft, hard) as a
    /// service manager would set it.
    pub fn start_limited(&mut self, config: &str, nofile: Option<(u64, u64)>) -> &mut Daemon {
        self.write_config(config);
        let mut cmd = self.node.command(redirector());
        cmd.args([
            "run".as_ref(),
            "--config".as_ref(),
            self.config.as_os_str(),
            "--poll-interval".as_ref(),
            "200ms".as_ref(),
        ]);
        if let Some((soft, hard)) = nofile {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit is async-signal-safe and `limit` was made before the fork.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let daemon = Daemon::spawn_command("redirector", cmd).expect("spawn daemon");
        daemon.wait_for_log("ready", READY).expect("daemon ready");
        self.daemon.insert(daemon)
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon started")
    }

    /// Rewrites the config and waits until the daemon applied it.
    pub fn reconfigure(&self, routes: Routes) {
        let daemon = self.daemon.as_ref().expect("daemon started");
        let mark = daemon.log_len();
        self.write_config(&self.config_text(routes));
        daemon
            .wait_for_log_from(mark, "reload applied", Duration::from_secs(10))
            .expect("reload applied");
    }

    /// `rdr-http ARGS` from the frontend pod (in the attach cgroup).
    pub fn http(&self, pod: &Pod, args: &[&str]) -> Vec<Value> {
        pod.http(&self.node, args)
            .unwrap_or_else(|e| panic!("rdr-http {args:?} from {}: {e:#}", pod.name))
    }
}

/// Listening TCP sockets on `addr` in the network namespace of process `pid`, from its
/// `/proc/PID/net/tcp` or `tcp6` (addresses there are the kernel's words in hex, in the
/// machine's byte order, the port in plain hex).
pub fn listening_sockets(pid: u32, addr: &str) -> usize {
    const LISTEN: &str = "0A";
    let addr = super::addr(addr);
    let (table, ip) = match addr.ip() {
        std::net::IpAddr::V4(ip) => ("tcp", ip.octets().to_vec()),
        std::net::IpAddr::V6(ip) => ("tcp6", ip.octets().to_vec()),
    };
    let words: String = ip
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    let local = format!("{words}:{:04X}", addr.port());
    let path = format!("/proc/{pid}/net/{table}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&LISTEN)
        })
        .count()
}

/// `served_by` of each response line.
pub fn served_by(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["served_by"].as_str().unwrap_or("<none>").to_owned())
        .collect()
}

/// The router's upstream header of a response line, if it went through the router.
pub fn upstream(line: &Value) -> Option<String> {
    line["headers"][UPSTREAM_HEADER].as_str().map(str::to_owned)
}

pub fn baggage(key: &str) -> String {
    format!("sd-routing-key={key}")
}
