//! The measurement sequence. Each repeat goes through every path, so slow drift of a shared
//! machine spreads over all of them instead of favouring whichever ran first.
use std::time::Duration;

use anyhow::Context as _;
use redirector_tests::{Daemon, Pod};

use super::{
    Bins, Profile, Results, anchors, instr,
    kernel::{BpfStats, Programs},
    load::{self, Kind, Target},
    sys::{self, Tools},
    topo::{self, BASELINE, FORK, KEY_FORK, KEY_NONE, SVC, SVC6, Topo},
};

/// Routes loaded while the fast path, L4 and L7 are measured: "many", but the service under
/// test has no fork (fast path) or one (L4, L7).
pub const MAIN_ROUTES: usize = 10_000;
/// Route counts of the connection-rate and program-cost sweep.
pub const SWEEP_ROUTES: [usize; 3] = [10, 10_000, 100_000];
pub const IPTABLES_RULES: [usize; 3] = [10, 1_000, 10_000];
/// Fixed rates of the latency runs, keep-alive: (key, rate, new connection per request).
pub const RATE_RUNS: [(&str, u32, bool); 3] = [
    ("ka1000", 1000, false),
    ("ka5000", 5000, false),
    ("new1000", 1000, true),
];
/// How long the daemon's idle CPU use is watched after each start.
const IDLE_WINDOW: Duration = Duration::from_secs(1);
const LATENCY_FIELDS: [&str; 5] = ["p50_us", "p99_us", "p999_us", "achieved_rate", "lag_p50_us"];

struct Ctx<'a> {
    nginx_pid: Option<u32>,
    haproxy_pid: Option<u32>,
    bins: &'a Bins,
    tools: &'a Tools,
    profile: &'a Profile,
    topo: &'a Topo,
    results: &'a mut Results,
}

/// Builds the node, runs every repeat, and tears it all down (on error too: the guards drop).
pub fn all(
    bins: &Bins,
    tools: &Tools,
    profile: &Profile,
    results: &mut Results,
) -> anyhow::Result<()> {
    eprintln!("bench: bringing up the simulated node");
    let topo = Topo::new(bins)?;
    let nginx = if profile.has("nginx") {
        Some(anchors::start_nginx(tools, &topo, None)?)
    } else {
        None
    };
    let haproxy = match &tools.haproxy {
        Some(path) if profile.has("haproxy") => Some(anchors::start_haproxy(path, &topo, None)?),
        _ => None,
    };
    let timed = PARTS_TIMED.iter().any(|part| profile.has(part));
    let mut ctx = Ctx {
        nginx_pid: nginx.as_ref().map(Daemon::pid),
        haproxy_pid: haproxy.as_ref().map(Daemon::pid),
        bins,
        tools,
        profile,
        topo: &topo,
        results,
    };
    if timed {
        ctx.idle_probe();
        for rep in 1..=profile.repeats {
            ctx.repeat(rep)
                .with_context(|| format!("repeat {rep} of {}", profile.repeats))?;
            ctx.idle_probe();
        }
    }
    // The anchors leave their ports to the same programs under valgrind.
    drop(nginx);
    drop(haproxy);
    if profile.has("instructions") {
        ctx.idle_probe();
        instr::run(bins, tools, profile, &topo, ctx.results)?;
    }
    Ok(())
}

/// The parts measured in the timed repeats (all but `instructions`).
const PARTS_TIMED: [&str; 9] = [
    "direct", "nginx", "haproxy", "iptables", "fast", "l4", "l7", "sweep", "cost",
];

/// What a program-cost case's client does in a loop.
#[derive(Clone, Copy)]
enum CostLoad {
    /// TCP connect + one request + close; `check_peer` adds a getpeername per connection.
    Tcp { check_peer: bool },
    /// UDP exchanges: one unconnected socket, or a connected socket per exchange.
    Udp { connected: bool },
}

/// One program-cost case: who dials what, how, and the hook that runs exactly once per unit
/// of work (connection or exchange), whose run count the case's total is divided by.
struct CostCase<'a> {
    label: &'static str,
    pod: &'a Pod,
    tgt: Target<'a>,
    load: CostLoad,
    unit_hook: &'static str,
}

impl CostLoad {
    /// The key of the case's total per unit of work: `cost.{case}.{unit}@{routes}.ns`.
    fn unit(self) -> &'static str {
        match self {
            CostLoad::Tcp { .. } => "per_connection",
            CostLoad::Udp { .. } => "per_exchange",
        }
    }
}

impl Ctx<'_> {
    fn step(&self, rep: usize, what: &str) {
        eprintln!("bench: [{rep}/{}] {what}", self.profile.repeats);
    }

    /// The whole machine's busy CPU while the benchmark pauses (see [`sys::idle_probe`]).
    fn idle_probe(&mut self) {
        if let Some(cores) = sys::idle_probe() {
            self.results.idle_probes.push(cores);
        }
    }

    fn repeat(&mut self, rep: usize) -> anyhow::Result<()> {
        let t = self.topo;
        let p = self.profile;
        let server = Topo::ip(&t.server);
        let svc = topo::addr(SVC);

        // Nothing loaded: the physical baseline and the L7 anchor.
        if p.has("direct") {
            self.step(rep, "direct (no redirector loaded)");
            let watch = [("server", t.server_pid(BASELINE))];
            let tgt = target(server, KEY_FORK, BASELINE);
            self.http_path("direct", &t.client, tgt, &watch, true)?;
        }
        if p.has("nginx") {
            self.step(rep, "nginx routing on the baggage header");
            let proxy = Topo::ip(&t.proxy);
            let mut watch = vec![("server", t.server_pid(FORK))];
            watch.extend(self.nginx_pid.map(|pid| ("proxy", pid)));
            let tgt = target(proxy, KEY_FORK, FORK);
            self.http_path("nginx", &t.client, tgt, &watch, true)?;
        }
        if let Some(pid) = self.haproxy_pid {
            self.step(rep, "HAProxy routing on the baggage header");
            let watch = [("server", t.server_pid(FORK)), ("proxy", pid)];
            let tgt = target(Topo::ip(&t.haproxy), KEY_FORK, FORK);
            self.http_path("haproxy", &t.client, tgt, &watch, true)?;
        }
        if ["fast", "l4", "l7"].iter().any(|part| p.has(part)) {
            self.with_daemon(rep, MAIN_ROUTES, |ctx, daemon| ctx.main_phase(rep, daemon))?;
        }
        if p.has("sweep") {
            // Connection rates compare within a few seconds: direct, then a fresh daemon with
            // the routes (its memory is that count's, not a leftover of a bigger table), fast
            // path and L4. Connection rates drift on a scale of seconds here; pairs this
            // close cancel the drift that separate phases of a repeat would not.
            for routes in SWEEP_ROUTES {
                self.paired_direct(rep, &format!("@{routes}"))?;
                self.with_daemon(rep, routes, |ctx, daemon| ctx.sweep(rep, routes, daemon))?;
            }
        } else if p.has("cost") {
            // The sweep measures the programs' cost already; alone, only that.
            for routes in SWEEP_ROUTES {
                self.with_daemon(rep, routes, |ctx, _| ctx.cost_only(rep, routes))?;
            }
        }
        if p.has("iptables") {
            self.paired_direct(rep, "@iptables")?;
            for rules in IPTABLES_RULES {
                self.step(rep, &format!("iptables DNAT, {rules} rules"));
                anchors::iptables(self.tools, t, rules)?;
                let v = self.connect(&t.kproxy, target(svc, KEY_FORK, BASELINE))?;
                self.results
                    .run(&format!("iptables.conn@{rules}"), &v, &["achieved_rate"]);
            }
            anchors::iptables(self.tools, t, 0)?;
        }
        Ok(())
    }

    /// The direct connection rate right before a comparison: `pair.direct.conn<suffix>`.
    fn paired_direct(&mut self, rep: usize, suffix: &str) -> anyhow::Result<()> {
        let t = self.topo;
        self.step(rep, "direct connection rate (no redirector loaded)");
        let v = self.connect(&t.client, target(Topo::ip(&t.server), KEY_FORK, BASELINE))?;
        self.results
            .run(&format!("pair.direct.conn{suffix}"), &v, &["achieved_rate"]);
        Ok(())
    }

    /// Starts the daemon with `routes` routes, runs `f`, and stops it again whatever `f` did
    /// (it detaches and unpins on exit).
    fn with_daemon(
        &mut self,
        rep: usize,
        routes: usize,
        f: impl FnOnce(&mut Self, &Daemon) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.step(rep, &format!("starting the daemon with {routes} routes"));
        let started = std::time::Instant::now();
        let mut daemon = self.topo.start_daemon(self.bins, routes)?;
        self.results.push(
            format!("daemon.start_s@{routes}"),
            started.elapsed().as_secs_f64(),
        );
        let result = self
            .idle_cpu(&daemon, routes)
            .and_then(|()| f(self, &daemon));
        let stopped = daemon.terminate();
        result?;
        stopped.context("stopping the daemon")?;
        Ok(())
    }

    /// What the loaded daemon costs while nothing is routed through it (its heartbeat, config
    /// polling), CPU ms per second, over [`IDLE_WINDOW`].
    fn idle_cpu(&mut self, daemon: &Daemon, routes: usize) -> anyhow::Result<()> {
        let before = sys::cpu_ns(daemon.pid())?;
        std::thread::sleep(IDLE_WINDOW);
        let cpu = sys::cpu_ns(daemon.pid())?.saturating_sub(before);
        self.results.push(
            format!("daemon.idle_cpu_ms_per_s@{routes}"),
            cpu as f64 / 1e6 / IDLE_WINDOW.as_secs_f64(),
        );
        Ok(())
    }

    fn main_phase(&mut self, rep: usize, daemon: &Daemon) -> anyhow::Result<()> {
        let t = self.topo;
        let p = self.profile;
        let server = Topo::ip(&t.server);
        let svc = topo::addr(SVC);

        if p.has("fast") {
            self.step(rep, "fast path (service without a fork)");
            let watch = [("server", t.server_pid(BASELINE))];
            let tgt = target(server, KEY_FORK, BASELINE);
            // Its connection rate comes from the sweep, paired with direct.
            self.http_path("fast", &t.client, tgt, &watch, false)?;
        }
        if p.has("l4") {
            self.step(rep, "L4 (member steered to the fork)");
            let watch = [("server", t.server_pid(FORK))];
            self.http_path("l4", &t.member, target(svc, KEY_FORK, FORK), &watch, false)?;
        }
        if p.has("l7") {
            self.step(rep, "L7 to the fork (node router)");
            let watch = [("server", t.server_pid(FORK)), ("proxy", daemon.pid())];
            let tgt = target(svc, KEY_FORK, FORK);
            self.http_path("l7_fork", &t.client, tgt, &watch, true)?;
            self.step(rep, "L7 to the baseline (node router)");
            let watch = [("server", t.server_pid(BASELINE)), ("proxy", daemon.pid())];
            let tgt = target(svc, KEY_NONE, BASELINE);
            self.http_path("l7_base", &t.client, tgt, &watch, true)?;
            let (rss, hwm) = sys::rss_kib(daemon.pid())?;
            self.results.push("daemon.rss_kib", rss as f64);
            self.results.push("daemon.hwm_kib", hwm as f64);
        }
        Ok(())
    }

    /// With `routes` routes loaded by a fresh daemon: its idle CPU and memory, the connection
    /// rate of the fast path and L4, and the programs' cost.
    fn sweep(&mut self, rep: usize, routes: usize, daemon: &Daemon) -> anyhow::Result<()> {
        let t = self.topo;
        let server = Topo::ip(&t.server);
        let svc = topo::addr(SVC);
        self.idle_cpu(daemon, routes)?;
        let (rss, _) = sys::rss_kib(daemon.pid())?;
        self.results
            .push(format!("daemon.rss_kib@{routes}"), rss as f64);
        self.step(
            rep,
            &format!("connection rate and program cost at {routes} routes"),
        );
        for (label, pod, tgt) in [
            ("fast", &t.client, target(server, KEY_FORK, BASELINE)),
            ("l4", &t.member, target(svc, KEY_FORK, FORK)),
        ] {
            let v = self.connect(pod, tgt)?;
            self.results
                .run(&format!("{label}.conn@{routes}"), &v, &["achieved_rate"]);
        }
        let programs = Programs::attached(&self.tools.bpftool, t.node.cgroup())?;
        self.program_cost(&programs, routes)
    }

    /// The programs' cost with `routes` routes, nothing else of the sweep.
    fn cost_only(&mut self, rep: usize, routes: usize) -> anyhow::Result<()> {
        self.step(rep, &format!("program cost at {routes} routes"));
        let programs = Programs::attached(&self.tools.bpftool, self.topo.node.cgroup())?;
        self.program_cost(&programs, routes)
    }

    /// Every figure of one HTTP path: latency at the fixed rates, max rate, and (with `conn`)
    /// connection rate.
    /// Around each fixed-rate run, the CPU time of the `watch`ed processes (label, pid) is
    /// taken: the server, and the proxy (the daemon's router, or nginx) if there is one.
    fn http_path(
        &mut self,
        path: &str,
        pod: &Pod,
        tgt: Target<'_>,
        watch: &[(&str, u32)],
        conn: bool,
    ) -> anyhow::Result<()> {
        for (fig, rate, new_conn) in RATE_RUNS {
            let before: Vec<u64> = watch
                .iter()
                .map(|(_, pid)| sys::tree_cpu_ns(*pid))
                .collect::<anyhow::Result<_>>()?;
            let v = self.load(pod, tgt, Kind::Rate { rate, new_conn })?;
            // Every scheduled request was served, warm-up included.
            let requests = f64::from(rate) * (self.profile.run + self.profile.warmup).as_secs_f64();
            for ((label, pid), before) in watch.iter().zip(before) {
                let cpu = sys::tree_cpu_ns(*pid)?.saturating_sub(before);
                let per_1k = cpu as f64 / 1e6 / (requests / 1000.0);
                self.results
                    .push(format!("{path}.{fig}.cpu_ms_per_1k.{label}"), per_1k);
            }
            self.results
                .run(&format!("{path}.{fig}"), &v, &LATENCY_FIELDS);
        }
        let v = self.load(pod, tgt, Kind::Max)?;
        self.results
            .run(&format!("{path}.max"), &v, &["max_rate", "saturation_rate"]);
        self.results
            .detail(format!("{path}.max.steps"), v["steps"].clone());
        if conn {
            let v = self.connect(pod, tgt)?;
            self.results
                .run(&format!("{path}.conn"), &v, &["achieved_rate", "p50_us"]);
        }
        Ok(())
    }

    fn connect(&self, pod: &Pod, tgt: Target<'_>) -> anyhow::Result<serde_json::Value> {
        self.load(
            pod,
            tgt,
            Kind::Connect {
                duration: self.profile.conn,
                warmup: self.profile.conn_warmup,
                check_peer: false,
            },
        )
    }

    fn load(&self, pod: &Pod, tgt: Target<'_>, kind: Kind) -> anyhow::Result<serde_json::Value> {
        load::run(self.bins, &self.topo.node, pod, tgt, kind, self.profile)
    }

    /// ns per run of each attached program while one kind of connection or exchange is made
    /// in a loop, each on its untouched path and its steered path (see [`cost_cases`]).
    /// Run-time accounting is on only for these runs: it costs every program two clock reads.
    fn program_cost(&mut self, programs: &Programs, routes: usize) -> anyhow::Result<()> {
        let cases = cost_cases(self.topo);
        let _stats = BpfStats::enable().context("enabling BPF run-time statistics")?;
        for case in &cases {
            self.cost_case(programs, case, routes)?;
        }
        Ok(())
    }

    /// One case's loop between two readings of the counters: `cost.{case}.{hook}@{routes}`
    /// (ns and runs) for every program that ran, and the total per unit of work.
    fn cost_case(
        &mut self,
        programs: &Programs,
        case: &CostCase<'_>,
        routes: usize,
    ) -> anyhow::Result<()> {
        let duration = self.profile.cost;
        let kind = match case.load {
            CostLoad::Tcp { check_peer } => Kind::Connect {
                duration,
                warmup: Duration::ZERO,
                check_peer,
            },
            CostLoad::Udp { connected } => Kind::Udp {
                duration,
                connected,
            },
        };
        let label = case.label;
        let before = programs.counters()?;
        let v = self.load(case.pod, case.tgt, kind)?;
        let after = programs.counters()?;
        // Only its errors: a loop that reached the wrong server measured the wrong path.
        self.results.run(&format!("cost.{label}@{routes}"), &v, &[]);
        let costs = programs.cost(&before, &after);
        let units = costs
            .iter()
            .find(|(name, _, _)| name == case.unit_hook)
            .map_or(0, |(_, _, runs)| *runs);
        let mut total = 0.0;
        for (name, ns, runs) in costs {
            total += ns * runs as f64;
            self.results
                .push(format!("cost.{label}.{name}@{routes}.ns"), ns);
            self.results
                .push(format!("cost.{label}.{name}@{routes}.runs"), runs as f64);
        }
        if units > 0 {
            // Every program run the unit of work caused (at both ends where both are in the
            // cgroup): its whole kernel-side price.
            self.results.push(
                format!("cost.{label}.{}@{routes}.ns", case.load.unit()),
                total / units as f64,
            );
        }
        Ok(())
    }
}

/// TCP over IPv4 untouched (fast path), steered (L4) and handed to the router (L7), with
/// the servers in the node's cgroup: a connection's whole price, both ends. Then, against
/// the servers outside the cgroup (the client's programs alone): TCP over IPv6 with
/// getpeername, and UDP over IPv4 and IPv6, unconnected and connected, each untouched
/// and steered. Together they drive every hook on both of its paths.
fn cost_cases(t: &Topo) -> Vec<CostCase<'_>> {
    let tcp = CostLoad::Tcp { check_peer: false };
    let tcp_peer = CostLoad::Tcp { check_peer: true };
    let udp = CostLoad::Udp { connected: false };
    let udp_conn = CostLoad::Udp { connected: true };
    let (server4, server6) = (topo::outside(t.server.ipv4), topo::outside(t.server.ipv6));
    let (svc4, svc6) = (topo::outside(SVC), topo::outside(SVC6));
    let case = |label, pod, addr, expect, load, unit_hook| CostCase {
        label,
        pod,
        tgt: target(addr, KEY_FORK, expect),
        load,
        unit_hook,
    };
    vec![
        case(
            "fast",
            &t.client,
            Topo::ip(&t.server),
            BASELINE,
            tcp,
            "connect4",
        ),
        case("l4", &t.member, topo::addr(SVC), FORK, tcp, "connect4"),
        case("l7", &t.client, topo::addr(SVC), FORK, tcp, "connect4"),
        case(
            "fast_tcp6",
            &t.client,
            server6,
            BASELINE,
            tcp_peer,
            "connect6",
        ),
        case("l4_tcp6", &t.member, svc6, FORK, tcp_peer, "connect6"),
        case("fast_udp4", &t.client, server4, BASELINE, udp, "sendmsg4"),
        case("l4_udp4", &t.member, svc4, FORK, udp, "sendmsg4"),
        case("fast_udp6", &t.client, server6, BASELINE, udp, "sendmsg6"),
        case("l4_udp6", &t.member, svc6, FORK, udp, "sendmsg6"),
        case(
            "fast_udp4c",
            &t.client,
            server4,
            BASELINE,
            udp_conn,
            "connect4",
        ),
        case("l4_udp4c", &t.member, svc4, FORK, udp_conn, "connect4"),
        case(
            "fast_udp6c",
            &t.client,
            server6,
            BASELINE,
            udp_conn,
            "connect6",
        ),
        case("l4_udp6c", &t.member, svc6, FORK, udp_conn, "connect6"),
    ]
}

fn target<'a>(addr: std::net::SocketAddr, key: &'a str, expect: &'a str) -> Target<'a> {
    Target { addr, key, expect }
}
