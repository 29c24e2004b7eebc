//! A simulated node with one forked service, shared by the end-to-end tests.
//!
//! Pods: `svc-a` (baseline), `svc-a-fork` (the fork of sandbox `pr-1`), `member` (a member of
//! `pr-1`) and `outsider` (no sandbox). Services, all backed by the baseline pod:
//! `svc-a` TCP and UDP on VIP4/VIP6 port 8080 (forked for `pr-1`), `svc-b` TCP on
//! OTHER4 port 9090 (never forked). Both servers answer on 8080 and 9090, so a wrong steer shows
//! up as the wrong name rather than as a timeout.
#![allow(dead_code)]

pub mod l7;

use std::{
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use redirector_tests::{Daemon, Node, Pod, Server, require_e2e, workspace_bin};

pub const VIP4: &str = "10.96.0.10:8080";
pub const VIP6: &str = "[fd00:96::10]:8080";
pub const OTHER4: &str = "10.96.0.11:9090";
pub const BASELINE: &str = "baseline";
pub const FORK: &str = "fork";
pub const READY: Duration = Duration::from_secs(30);

pub fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

pub struct Cluster {
    pub node: Node,
    pub baseline: Pod,
    pub fork: Pod,
    pub member: Pod,
    pub outsider: Pod,
    pub config: PathBuf,
    pub daemon: Option<Daemon>,
    _servers: Vec<Server>,
}

impl Cluster {
    /// None when the machine cannot run end-to-end tests (and not under CI, where that panics).
    pub fn new(label: &str) -> Option<Cluster> {
        if !require_e2e() {
            return None;
        }
        let mut node = Node::new(label).expect("simulated node");
        let baseline = node.add_pod("svc-a").expect("pod");
        let fork = node.add_pod("svc-a-fork").expect("pod");
        let member = node.add_pod("member").expect("pod");
        let outsider = node.add_pod("outsider").expect("pod");
        for vip in [VIP4, VIP6, OTHER4] {
            node.add_vip(addr(vip).ip(), &baseline).expect("vip");
        }
        let servers = vec![
            baseline
                .serve_ports(&node, BASELINE, &[8080, 9090], &[8080, 9090])
                .expect("baseline server"),
            fork.serve_ports(&node, FORK, &[8080, 9090], &[8080, 9090])
                .expect("fork server"),
        ];
        let config = node.dir().join("redirector.toml");
        Some(Cluster {
            node,
            baseline,
            fork,
            member,
            outsider,
            config,
            daemon: None,
            _servers: servers,
        })
    }

    pub fn api_socket(&self) -> PathBuf {
        self.node.dir().join("api.sock")
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.node.bpffs().join("redirector")
    }

    /// The standard config: `pr-1` routes every `svc-a` flavour to the fork, or nothing.
    pub fn config_text(&self, with_routes: bool) -> String {
        let routes = if with_routes {
            format!(
                r#"routes = [
  {{ service = "svc-a", fork = "{f4}:8080" }},
  {{ service = "svc-a-v6", fork = "[{f6}]:8080" }},
  {{ service = "svc-a-udp", fork = "{f4}:8080" }},
  {{ service = "svc-a-v6-udp", fork = "[{f6}]:8080" }},
]"#,
                f4 = self.fork.ipv4,
                f6 = self.fork.ipv6
            )
        } else {
            "routes = []".to_owned()
        };
        format!(
            r#"[daemon]
cgroup = "{cgroup}"
bpffs = "{bpffs}"
api_socket = "{api_socket}"
state_file = "{state_file}"
metrics_listen = "127.0.0.1:9464"

[[service]]
name = "svc-a"
address = "{VIP4}"
protocol = "http"

[[service]]
name = "svc-a-v6"
address = "{VIP6}"

[[service]]
name = "svc-a-udp"
address = "{VIP4}"
protocol = "udp"

[[service]]
name = "svc-a-v6-udp"
address = "{VIP6}"
protocol = "udp"

[[service]]
name = "svc-b"
address = "{OTHER4}"

[[sandbox]]
key = "pr-1"
members = ["{member}"]
{routes}
"#,
            cgroup = self.node.cgroup().display(),
            bpffs = self.pin_dir().display(),
            api_socket = self.api_socket().display(),
            state_file = self.node.dir().join("state.json").display(),
            member = self.member.netns_path().display(),
        )
    }

    pub fn write_config(&self, text: &str) {
        write_atomically(&self.config, text);
    }

    pub fn run_args(&self, extra: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> =
            vec!["run".into(), "--config".into(), self.config.clone().into()];
        args.extend(extra.iter().map(OsString::from));
        args
    }

    /// Writes the standard config and starts the daemon; returns once it is ready.
    pub fn start(&mut self, extra: &[&str]) -> &mut Daemon {
        if !self.config.exists() {
            self.write_config(&self.config_text(true));
        }
        let daemon = self
            .node
            .spawn_daemon("redirector", &redirector(), &self.run_args(extra))
            .expect("spawn daemon");
        daemon.wait_for_log("ready", READY).expect("daemon ready");
        self.daemon.insert(daemon)
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon started")
    }

    /// Who answers a TCP call from `pod` (in the attach cgroup) to `to`; asserts that the
    /// application sees the address it dialed.
    pub fn tcp(&self, pod: &Pod, to: &str) -> String {
        let result = pod
            .call_tcp(&self.node, addr(to), true)
            .unwrap_or_else(|e| panic!("tcp {} -> {to}: {e:#}", pod.name));
        assert_eq!(
            result.peer_unmapped(),
            addr(to),
            "getpeername must show the dialed address"
        );
        result.server
    }

    pub fn udp(&self, pod: &Pod, to: &str) -> String {
        let result = pod
            .call_udp(&self.node, addr(to), true)
            .unwrap_or_else(|e| panic!("udp {} -> {to}: {e:#}", pod.name));
        assert_eq!(
            result.peer_unmapped(),
            addr(to),
            "the reply must come from the dialed address"
        );
        result.server
    }
}

pub fn redirector() -> PathBuf {
    workspace_bin("redirector").expect("redirector binary (cargo build --bins)")
}

/// Runs `redirector ARGS` to completion in the node namespace; returns (success, stderr).
pub fn run_redirector(node: &Node, args: &[&str]) -> (bool, String) {
    let out = node
        .command(redirector())
        .args(args)
        .output()
        .expect("run redirector");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// Write-then-rename: a watching daemon never reads a half-written file.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// Runs the CLI against this node's daemon: (exit code, stdout, stderr).
pub fn cli(c: &Cluster, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(redirector())
        .args(args)
        .arg("--socket")
        .arg(c.api_socket())
        .output()
        .expect("run redirector CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Like [`cli`] with `-o json`, asserting success and parsing the output.
pub fn cli_json(c: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (code, stdout, stderr) = cli(c, &all);
    assert_eq!(code, 0, "redirector {args:?}: {stderr}{stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `redirector status -o json`, read into the API's answer type.
pub fn status(c: &Cluster) -> redirector_user::api::answers::StatusAnswer {
    typed(cli_json(c, &["status"]))
}

/// `redirector stats -o json`, read into the API's answer type.
pub fn stats(c: &Cluster) -> redirector_user::api::answers::StatsAnswer {
    typed(cli_json(c, &["stats"]))
}

fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
}

/// Scrapes the daemon's metrics endpoint (127.0.0.1:9464 inside the node namespace) from a
/// thread that enters the node's network namespace.
pub fn scrape(node: &Node) -> String {
    use std::io::{Read as _, Write as _};
    let netns = std::fs::File::open(node.netns_path()).expect("node netns");
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut stream = std::net::TcpStream::connect("127.0.0.1:9464").expect("connect metrics");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("read");
        text
    })
    .join()
    .expect("scrape thread")
}

/// The value of the sample `line_prefix` (a metric name with its labels) in a scrape, 0 if
/// absent.
pub fn sample(scrape: &str, line_prefix: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Programs attached to `cgroup`, as the kernel reports them (bpftool, not the daemon).
pub fn attached_programs(cgroup: &Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool is needed to count attachments (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    let list: Vec<serde_json::Value> = serde_json::from_str(&text).expect("bpftool json");
    list.iter()
        .map(|p| {
            format!(
                "{}:{}",
                p["attach_type"].as_str().unwrap_or("?"),
                p["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (program name, kernel tag) of every program attached to `cgroup`, sorted; the tag is the
/// kernel's hash of the program's instructions, so it tells builds apart.
pub fn attached_tags(cgroup: &Path) -> Vec<(String, String)> {
    let bpftool = |args: &[&str]| -> Option<serde_json::Value> {
        let out = Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .expect("bpftool (cargo xtask setup installs it)");
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null))
    };
    let cgroup = cgroup.to_string_lossy();
    let attached = bpftool(&["cgroup", "show", &cgroup]).expect("bpftool cgroup show");
    let mut tags: Vec<(String, String)> = attached
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let id = p["id"].as_u64().expect("program id").to_string();
            // A program detached between the two calls (its last link was just released) is
            // no longer attached: leave it out.
            let prog = bpftool(&["prog", "show", "id", &id])?;
            Some((
                p["name"].as_str().unwrap_or("?").to_owned(),
                prog["tag"].as_str().unwrap_or("?").to_owned(),
            ))
        })
        .collect();
    tags.sort();
    tags
}
