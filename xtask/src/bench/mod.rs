//! `cargo xtask bench`: what redirector costs, next to what it replaces, on one simulated node.
//!
//! One run measures, with the same client (`rdr-load`), the same servers and the same request
//! (GET with a `baggage` header, 128-byte answer):
//!
//! - **direct**: client pod to server pod, no redirector loaded: this machine's physical
//!   baseline, the denominator of every ratio;
//! - **fast path**: the same, with the daemon loaded and 10 000 routes, none for this server;
//! - **L4**: a sandbox member dialing the service, steered to the fork in the kernel;
//! - **L7 fork / L7 baseline**: a non-member dialing the service, handed to the node router,
//!   which routes each request on its key to the fork or to the baseline;
//! - **nginx** and **HAProxy**: the L7 anchors, the same header routing in the distribution's
//!   nginx (one worker) and HAProxy (one thread), on the router's core;
//! - **iptables**: the kube-proxy anchor, DNAT with 10 / 1 000 / 10 000 rules, against the
//!   fast path and L4 with 10 / 10 000 / 100 000 routes, on connection rate;
//! - the kernel programs' own cost (ns per run) at 10 / 10 000 / 100 000 routes, every hook on
//!   its untouched and its steered path (TCP over IPv4 and IPv6, UDP over both, unconnected
//!   and connected), and the daemon's memory and CPU (idle, and per 1 000 routed requests);
//! - **instructions** per routed request of the router, nginx and HAProxy, counted by
//!   callgrind: the one figure this machine's noise cannot move (see `instr`).
//!
//! Per path: latency at fixed rates (open loop), the highest rate with p99 <= 1 ms, and
//! connections per second. Connection rates of the fast path, L4 and iptables are each
//! measured right after a direct run, because they drift on a scale of seconds here.
//!
//! Everything repeats (3 times, once with `--quick`), interleaved so that drift hits every path
//! alike; the report gives medians with their min–max, and ratios and differences computed
//! within each repeat (each path against what it is compared with, measured in the same repeat)
//! with a 95 % confidence interval over the repeats. Targets are reported as met, missed, or
//! inconclusive when the interval straddles the bound, never asserted: these are shared
//! machines, and a miss is a finding, not a failure. The load other processes put on the
//! machine during the run is measured and reported, with a warning when it was not idle.
mod anchors;
mod instr;
mod kernel;
mod load;
mod measure;
mod report;
mod sys;
mod topo;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::setup;

#[derive(clap::Args, Default)]
pub struct Options {
    /// Smoke run: every figure once, with short runs (about three minutes after the build).
    #[arg(long)]
    quick: bool,
    /// Repeats of every measurement [default: 3, or 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeats: Option<u32>,
    /// Measure only these parts (comma-separated): direct, nginx, haproxy, iptables, fast,
    /// l4, l7, sweep (connection rate and program cost per route count), cost (the program
    /// cost alone, part of sweep), instructions (callgrind's instructions per routed request
    /// of the router, nginx and HAProxy; slow, about 2 minutes). Ratios need `direct`;
    /// figures left out show as `-`.
    #[arg(long, value_delimiter = ',', value_parser = PARTS)]
    only: Vec<String>,
}

const PARTS: [&str; 10] = [
    "direct",
    "nginx",
    "haproxy",
    "iptables",
    "fast",
    "l4",
    "l7",
    "sweep",
    "cost",
    "instructions",
];

/// How long each kind of run lasts.
pub struct Profile {
    pub quick: bool,
    pub repeats: usize,
    /// Fixed-rate runs: measured window and the warm-up before it.
    pub run: Duration,
    pub warmup: Duration,
    /// Connection-rate runs.
    pub conn: Duration,
    pub conn_warmup: Duration,
    /// Max-rate search: each step, and the number of bisection steps after the probe.
    pub max_step: Duration,
    pub max_warmup: Duration,
    pub max_steps: u32,
    /// Program-cost runs (connection and exchange loops with run-time accounting on), each.
    pub cost: Duration,
    /// Parts to measure (see `--only`).
    pub parts: Vec<String>,
    /// Where the JSON and callgrind's files go (`<target>/bench`), and the run's time stamp
    /// in their names.
    pub out_dir: PathBuf,
    pub stamp: String,
}

impl Profile {
    pub fn has(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }

    fn new(opts: &Options) -> Profile {
        let ms = Duration::from_millis;
        // Connection-rate runs are the longest: their rate drifts on a scale of seconds on a
        // virtual machine (±15% between 1 s runs, ±5% between 4 s runs here).
        let mut p = if opts.quick {
            Profile {
                quick: true,
                repeats: 1,
                run: ms(800),
                warmup: ms(200),
                conn: ms(800),
                conn_warmup: ms(200),
                max_step: ms(500),
                max_warmup: ms(150),
                max_steps: 4,
                cost: ms(400),
                parts: Vec::new(),
                out_dir: PathBuf::new(),
                stamp: String::new(),
            }
        } else {
            Profile {
                quick: false,
                repeats: 3,
                run: ms(2000),
                warmup: ms(500),
                conn: ms(3000),
                conn_warmup: ms(500),
                max_step: ms(800),
                max_warmup: ms(200),
                max_steps: 5,
                cost: ms(1000),
                parts: Vec::new(),
                out_dir: PathBuf::new(),
                stamp: String::new(),
            }
        };
        if let Some(r) = opts.repeats {
            p.repeats = r as usize;
        }
        p.parts = if opts.only.is_empty() {
            PARTS.iter().map(|s| (*s).to_owned()).collect()
        } else {
            opts.only.clone()
        };
        p
    }
}

/// `<target>/bench`: the JSON reports and callgrind's files.
pub fn out_dir() -> anyhow::Result<PathBuf> {
    // xtask runs from <target>/debug.
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let target = exe
        .parent()
        .and_then(|d| d.parent())
        .context("xtask binary has no target directory")?;
    Ok(target.join("bench"))
}

/// The release binaries the benchmark runs: debug builds would measure the compiler's
/// settings, not the data path.
pub struct Bins {
    pub redirector: PathBuf,
    pub load: PathBuf,
}

impl Bins {
    fn locate() -> anyhow::Result<Bins> {
        // xtask runs from <target>/debug; the release binaries sit in <target>/release.
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let target = exe
            .parent()
            .and_then(|d| d.parent())
            .context("xtask binary has no target directory")?;
        let bin = |name: &str| -> anyhow::Result<PathBuf> {
            let p = target.join("release").join(name);
            if !p.is_file() {
                bail!("{} missing after the release build", p.display());
            }
            Ok(p)
        };
        Ok(Bins {
            redirector: bin("redirector")?,
            load: bin("rdr-load")?,
        })
    }
}

/// Every value measured, one per repeat, by key (`<path>.<figure>.<stat>`).
#[derive(Default)]
pub struct Results {
    pub values: BTreeMap<String, Vec<f64>>,
    /// Failed requests per run key, with the first error seen.
    pub errors: BTreeMap<String, (u64, String)>,
    /// Raw detail worth keeping in the JSON (the steps of every max-rate search).
    pub details: BTreeMap<String, Vec<Value>>,
    /// Busy cores of the whole machine while the benchmark paused, one per pause.
    pub idle_probes: Vec<f64>,
    /// The instruction counts and where their files are (`Null` unless measured).
    pub instructions: Value,
}

impl Results {
    pub fn push(&mut self, key: impl Into<String>, value: f64) {
        self.values.entry(key.into()).or_default().push(value);
    }

    pub fn detail(&mut self, key: impl Into<String>, value: Value) {
        self.details.entry(key.into()).or_default().push(value);
    }

    /// Keeps `fields` of an rdr-load summary under `key.<field>`, and its errors.
    pub fn run(&mut self, key: &str, summary: &Value, fields: &[&str]) {
        for f in fields {
            if let Some(v) = summary[*f].as_f64() {
                self.push(format!("{key}.{f}"), v);
            }
        }
        let errors = summary["errors"].as_u64().unwrap_or(0);
        if errors > 0 {
            let e = self
                .errors
                .entry(key.to_owned())
                .or_insert((0, String::new()));
            e.0 += errors;
            if e.1.is_empty() {
                e.1 = summary["first_error"].as_str().unwrap_or("").to_owned();
            }
        }
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run(&setup::Options::default())?;
    if !sys::is_root() {
        bail!("the benchmark builds network namespaces and loads eBPF programs: run it as root");
    }
    let mut profile = Profile::new(opts);
    let tools = sys::Tools::ensure(&profile)?;
    eprintln!("bench: building the release binaries");
    setup::status(Command::new(env!("CARGO")).args(["build", "--release", "--bins"]))?;
    let bins = Bins::locate()?;
    let mut machine = sys::machine_info(&tools);
    profile.out_dir = out_dir()?;
    profile.stamp = machine["date"]
        .as_str()
        .unwrap_or("unknown")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    sys::catch_signals();

    let started = Instant::now();
    let steal_before = sys::steal_ms();
    let cpu_before = sys::MachineCpu::now();
    let own_before = sys::own_cpu_s();
    let kthreads_before = sys::kernel_threads_cpu_s();
    let mut results = Results::default();
    measure::all(&bins, &tools, &profile, &mut results)?;
    if results.values.is_empty() {
        bail!("nothing was measured");
    }
    let elapsed = started.elapsed();
    if let (Some(a), Some(b)) = (steal_before, sys::steal_ms()) {
        machine["steal_ms_during_run"] = serde_json::json!((b - a).round());
    }
    // Every process the benchmark started has been reaped by now (the node is torn down).
    if let (Some(a), Some(b)) = (cpu_before, sys::MachineCpu::now()) {
        let cores = machine["cores"].as_f64().unwrap_or(1.0);
        let load = sys::load_report(
            &b.since(&a),
            sys::own_cpu_s() - own_before,
            sys::kernel_threads_cpu_s() - kthreads_before,
            &results.idle_probes,
            cores,
        );
        for w in load["warnings"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            eprintln!(
                "bench: WARNING: the machine was not idle: {} (figures are noisier than on a quiet machine)",
                w.as_str().unwrap_or("")
            );
        }
        machine["load"] = load;
    }

    let report = report::Report::build(&results, machine, &profile, elapsed);
    println!("{}", report.table());
    let path = report.write(&profile.out_dir)?;
    eprintln!(
        "bench: finished in {:.0} s; JSON in {}",
        elapsed.as_secs_f64(),
        path.display()
    );
    Ok(())
}
