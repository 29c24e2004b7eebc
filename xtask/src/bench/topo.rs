//! The benchmark's simulated node.
//!
//! ```text
//!   client   ── non-member pod: direct, fast path, L7 (fork and baseline), nginx
//!   member   ── member of sandbox pr-100: L4 steering
//!   kproxy   ── the kube-proxy-style client: iptables DNAT rules in its own netns only
//!   server   ── the baseline of `svc` (10.96.0.10:8080, routed to it by the node) and of
//!               `svc6` ([fd00:96::10]:8081, TCP) and `svc-udp` / `svc6-udp` (UDP, 8081)
//!   fork     ── their forks for pr-100
//!   proxy    ── nginx, routing on the baggage header like the node router does
//!   haproxy  ── HAProxy, the same routing (the second L7 anchor)
//! ```
//!
//! Every server is `rdr-load serve` (same binary, same 128-byte answer). Servers, the daemon,
//! nginx and HAProxy run on [`SERVER_CPU`]; clients on [`CLIENT_CPU`](super::sys::CLIENT_CPU).
//! The baseline and the fork each run a second server, TCP and UDP on [`OUTSIDE_PORT`], outside
//! the node's cgroup: the IPv6 and UDP program-cost cases dial it, so the programs that run
//! there are the client's alone (see [`OUTSIDE_PORT`]).
use std::{
    ffi::OsString,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use redirector_tests::{Daemon, NODE_GW_V4, Node, Pod};

use super::{
    Bins,
    sys::{self, SERVER_CPU},
};

pub const PORT: u16 = 8080;
/// The port of the servers outside the node's cgroup. A dual-stack server in the cgroup runs
/// the same IPv6 programs as an IPv6 or UDP client (getpeername6 at accept, sendmsg6 and
/// recvmsg6 for every datagram): untouched runs that would be averaged into the client's
/// steered ones. Out of the cgroup, each hook's ns per run is one end's, one path's.
pub const OUTSIDE_PORT: u16 = 8081;
/// The HTTP service: forked for [`KEY_FORK`], so members are steered (L4) and non-members go
/// through the node router (L7).
pub const SVC: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The IPv6 service address: `svc6` (TCP) and `svc6-udp`, both on [`OUTSIDE_PORT`] and forked
/// for [`KEY_FORK`]. `svc-udp` is [`SVC`] on that port.
pub const SVC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// Services of `svc`'s sandbox: `svc`, `svc6`, `svc-udp` and `svc6-udp`. The bulk services
/// make up the rest of a route count.
const OWN_ROUTES: usize = 4;
/// A routing key with a fork of `svc`.
pub const KEY_FORK: &str = "pr-100";
/// A routing key without one (same length, so the payload stays the same): the router sends
/// these requests to the baseline.
pub const KEY_NONE: &str = "pr-999";
pub const BASELINE: &str = "baseline";
pub const FORK: &str = "fork";
const ROUTER_PORT: u16 = 15001;
/// Generous: 100 000 routes take a while to validate and write.
const DAEMON_READY: Duration = Duration::from_secs(120);
const SERVER_READY: Duration = Duration::from_secs(10);

pub struct Topo {
    pub client: Pod,
    pub member: Pod,
    pub kproxy: Pod,
    pub server: Pod,
    pub fork: Pod,
    pub proxy: Pod,
    pub haproxy: Pod,
    config: PathBuf,
    /// Processes before the node: dropped (killed) first. By server name.
    servers: Vec<(&'static str, Daemon)>,
    /// The servers on [`OUTSIDE_PORT`]; killed before the node likewise.
    outside_servers: Vec<Daemon>,
    pub node: Node,
}

/// Address of bulk service `i`: 10.128.0.1 onwards, clear of the pods, the node and `svc`.
pub fn bulk_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + i as u32)
}

pub fn addr(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), PORT)
}

/// `ip` on [`OUTSIDE_PORT`].
pub fn outside(ip: impl Into<IpAddr>) -> SocketAddr {
    SocketAddr::new(ip.into(), OUTSIDE_PORT)
}

impl Topo {
    pub fn new(bins: &Bins) -> anyhow::Result<Topo> {
        let mut node = Node::new("bench")?;
        let client = node.add_pod("client")?;
        let member = node.add_pod("member")?;
        let kproxy = node.add_pod("kproxy")?;
        let server = node.add_pod("server")?;
        let fork = node.add_pod("fork")?;
        let proxy = node.add_pod("proxy")?;
        let haproxy = node.add_pod("haproxy")?;
        node.add_vip(IpAddr::V4(SVC), &server)?;
        node.add_vip(IpAddr::V6(SVC6), &server)?;
        let config = node.dir().join("redirector.toml");
        let mut topo = Topo {
            client,
            member,
            kproxy,
            server,
            fork,
            proxy,
            haproxy,
            config,
            servers: Vec::new(),
            outside_servers: Vec::new(),
            node,
        };
        for (pod, name) in [(topo.server.clone(), BASELINE), (topo.fork.clone(), FORK)] {
            let server = topo.serve(bins, &pod, name, PORT)?;
            topo.servers.push((name, server));
            let outside = topo.serve(bins, &pod, name, OUTSIDE_PORT)?;
            topo.outside_servers.push(outside);
        }
        Ok(topo)
    }

    /// `rdr-load serve` in `pod`: on [`PORT`] inside the node's cgroup like any pod's process,
    /// on [`OUTSIDE_PORT`] outside it and with UDP too.
    fn serve(&self, bins: &Bins, pod: &Pod, name: &str, port: u16) -> anyhow::Result<Daemon> {
        let in_cgroup = port != OUTSIDE_PORT;
        let mut cmd = pod.command(&self.node, &bins.load, in_cgroup);
        cmd.args([
            "serve",
            "--name",
            name,
            "--port",
            &port.to_string(),
            "--cpu",
            &SERVER_CPU.to_string(),
        ]);
        if !in_cgroup {
            cmd.arg("--udp");
        }
        let server = Daemon::spawn_command(&format!("{}/{name}:{port}", pod.name), cmd)?;
        server.wait_for_log("ready", SERVER_READY)?;
        Ok(server)
    }

    /// Process id of the server named `name` ([`BASELINE`] or [`FORK`]).
    pub fn server_pid(&self, name: &str) -> u32 {
        self.servers
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, server)| server.pid())
    }

    pub fn ip(pod: &Pod) -> SocketAddr {
        addr(pod.ipv4)
    }

    /// Starts the daemon with `routes` routes, pinned to the servers' CPU, and waits until it
    /// is ready. It detaches and unpins on exit.
    pub fn start_daemon(&self, bins: &Bins, routes: usize) -> anyhow::Result<Daemon> {
        self.start_daemon_wrapped(bins, routes, None)
    }

    /// [`Topo::start_daemon`] under `wrap` (valgrind) when given.
    pub fn start_daemon_wrapped(
        &self,
        bins: &Bins,
        routes: usize,
        wrap: Option<&[OsString]>,
    ) -> anyhow::Result<Daemon> {
        std::fs::write(&self.config, self.config_text(routes))
            .context("writing the daemon config")?;
        let mut cmd = match wrap {
            Some([first, rest @ ..]) => {
                let mut cmd = self.node.command(first);
                cmd.args(rest).arg(&bins.redirector);
                cmd
            }
            _ => self.node.command(&bins.redirector),
        };
        sys::pin_command(&mut cmd, SERVER_CPU);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--cleanup-on-exit");
        let daemon = Daemon::spawn_command("redirector", cmd)?;
        daemon.wait_for_log("ready", DAEMON_READY)?;
        Ok(daemon)
    }

    /// `svc` (HTTP), `svc6` (TCP), `svc-udp` and `svc6-udp`, all forked for pr-100 whose
    /// member is the `member` pod, and the bulk TCP services, each forked in sandbox `bulk`:
    /// `routes` routes in all (at least [`OWN_ROUTES`]) and as many entries in the kernel's
    /// service map. The router listens on the node's bridge address; `[router]` keeps its
    /// defaults, so no `upstream_header` is added to responses.
    fn config_text(&self, routes: usize) -> String {
        let fork = Self::ip(&self.fork);
        let mut text = format!(
            r#"[daemon]
cgroup = "{cgroup}"
bpffs = "{bpffs}"
api_socket = "{api}"
state_file = "{state}"
router_listen = "{NODE_GW_V4}:{ROUTER_PORT}"

[[service]]
name = "svc"
address = "{svc}"
protocol = "http"

[[service]]
name = "svc6"
address = "{svc6}"

[[service]]
name = "svc-udp"
address = "{svc_udp}"
protocol = "udp"

[[service]]
name = "svc6-udp"
address = "{svc6}"
protocol = "udp"
"#,
            cgroup = self.node.cgroup().display(),
            bpffs = self.node.bpffs().join("redirector").display(),
            api = self.node.dir().join("api.sock").display(),
            state = self.node.dir().join("state.json").display(),
            svc = addr(SVC),
            svc6 = outside(SVC6),
            svc_udp = outside(SVC),
        );
        let bulk = routes.saturating_sub(OWN_ROUTES);
        for i in 0..bulk {
            let _ = write!(
                text,
                "\n[[service]]\nname = \"b{i}\"\naddress = \"{}\"\n",
                addr(bulk_vip(i))
            );
        }
        let (fork4, fork6) = (outside(self.fork.ipv4), outside(self.fork.ipv6));
        let _ = write!(
            text,
            "\n[[sandbox]]\nkey = \"{KEY_FORK}\"\nmembers = [\"{}\"]\nroutes = [\n  \
             {{ service = \"svc\", fork = \"{fork}\" }},\n  \
             {{ service = \"svc6\", fork = \"{fork6}\" }},\n  \
             {{ service = \"svc-udp\", fork = \"{fork4}\" }},\n  \
             {{ service = \"svc6-udp\", fork = \"{fork6}\" }},\n]\n",
            self.member.netns_path().display()
        );
        if bulk > 0 {
            text.push_str("\n[[sandbox]]\nkey = \"bulk\"\nroutes = [\n");
            for i in 0..bulk {
                let _ = writeln!(text, "  {{ service = \"b{i}\", fork = \"{fork}\" }},");
            }
            text.push_str("]\n");
        }
        text
    }
}
