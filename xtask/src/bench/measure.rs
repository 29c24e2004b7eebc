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
    topo::{self, BASELINE, FORK, KEY_FORK, KEY_NONE, SVC, Topo},
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
const PARTS_TIMED: [&str; 8] = [
    "direct", "nginx", "haproxy", "iptables", "fast", "l4", "l7", "sweep",
];

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
            },
        )
    }

    fn load(&self, pod: &Pod, tgt: Target<'_>, kind: Kind) -> anyhow::Result<serde_json::Value> {
        load::run(self.bins, &self.topo.node, pod, tgt, kind, self.profile)
    }

    /// ns per run of each attached program while one kind of connection is made in a loop:
    /// untouched (fast path), steered (L4) and handed to the router (L7). Run-time accounting
    /// is on only for these runs: it costs every program two clock reads.
    fn program_cost(&mut self, programs: &Programs, routes: usize) -> anyhow::Result<()> {
        let t = self.topo;
        let svc = topo::addr(SVC);
        let cases = [
            (
                "fast",
                &t.client,
                target(Topo::ip(&t.server), KEY_FORK, BASELINE),
            ),
            ("l4", &t.member, target(svc, KEY_FORK, FORK)),
            ("l7", &t.client, target(svc, KEY_FORK, FORK)),
        ];
        let _stats = BpfStats::enable().context("enabling BPF run-time statistics")?;
        for (label, pod, tgt) in cases {
            let before = programs.counters()?;
            self.load(
                pod,
                tgt,
                Kind::Connect {
                    duration: self.profile.cost,
                    warmup: Duration::ZERO,
                },
            )?;
            let after = programs.counters()?;
            let costs = programs.cost(&before, &after);
            // One connect4 run per connection the loop made.
            let connections = costs
                .iter()
                .find(|(name, _, _)| name == "connect4")
                .map_or(0, |(_, _, runs)| *runs);
            let mut total = 0.0;
            for (name, ns, runs) in costs {
                total += ns * runs as f64;
                self.results
                    .push(format!("cost.{label}.{name}@{routes}.ns"), ns);
                self.results
                    .push(format!("cost.{label}.{name}@{routes}.runs"), runs as f64);
            }
            if connections > 0 {
                // Every program run the connection caused, at both ends: its whole kernel-side
                // price.
                self.results.push(
                    format!("cost.{label}.per_connection@{routes}.ns"),
                    total / connections as f64,
                );
            }
        }
        Ok(())
    }
}

fn target<'a>(addr: std::net::SocketAddr, key: &'a str, expect: &'a str) -> Target<'a> {
    Target { addr, key, expect }
}
