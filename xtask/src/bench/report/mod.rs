//! Medians, spreads, ratios and targets; the printed table and the JSON file.
//!
//! This module gathers the figures and builds the JSON document; `stat` sums up one figure over
//! the repeats, `targets` judges the goals, and `table` prints the report.
mod stat;
mod table;
mod targets;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Map, Value, json};

use self::stat::{Stat, round3};
use super::{
    Profile, Results,
    load::{CONNECT_WORKERS, CONNECTIONS, MAX_P99_US},
    measure::{IPTABLES_RULES, MAIN_ROUTES, RATE_RUNS, SWEEP_ROUTES},
    sys::{CLIENT_CPU, SERVER_CPU},
};

/// Paths in table order: (key, label).
const PATHS: [(&str, &str); 7] = [
    ("direct", "direct"),
    ("fast", "fast path"),
    ("l4", "L4 steered"),
    ("l7_fork", "L7 to fork"),
    ("l7_base", "L7 to baseline"),
    ("nginx", "nginx (fork)"),
    ("haproxy", "HAProxy (fork)"),
];
/// The L7 anchors the router is compared with: (key, label).
const ANCHORS: [(&str, &str); 2] = [("nginx", "nginx"), ("haproxy", "HAProxy")];
/// Programs the cost table shows first, in this order (the daemon's hooks); any other that
/// ran follows them.
const PROGRAMS: [&str; 9] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
    "handoff_sockops",
];
/// Program-cost cases in table order: (key, label, unit of work). See `measure::cost_cases`.
const COST_CASES: [(&str, &str, &str); 13] = [
    ("fast", "fast path", PER_CONNECTION),
    ("l4", "L4 steered", PER_CONNECTION),
    ("l7", "L7 hand-off", PER_CONNECTION),
    ("fast_tcp6", "fast, TCP v6", PER_CONNECTION),
    ("l4_tcp6", "L4, TCP v6", PER_CONNECTION),
    ("fast_udp4", "fast, UDP v4", PER_EXCHANGE),
    ("l4_udp4", "L4, UDP v4", PER_EXCHANGE),
    ("fast_udp6", "fast, UDP v6", PER_EXCHANGE),
    ("l4_udp6", "L4, UDP v6", PER_EXCHANGE),
    ("fast_udp4c", "fast, UDP v4 conn", PER_EXCHANGE),
    ("l4_udp4c", "L4, UDP v4 conn", PER_EXCHANGE),
    ("fast_udp6c", "fast, UDP v6 conn", PER_EXCHANGE),
    ("l4_udp6c", "L4, UDP v6 conn", PER_EXCHANGE),
];
const PER_CONNECTION: &str = "per_connection";
const PER_EXCHANGE: &str = "per_exchange";
/// The cases whose servers are in the node's cgroup: a TCP-over-IPv4 connection's whole price,
/// both ends, which is what the connection-rate targets and the share of a direct connection
/// are about. The others count the client's programs alone.
const CONN_COST_CASES: [&str; 3] = ["fast", "l4", "l7"];

/// A path's connection-rate key and the direct rate it is compared with: the fast path and L4
/// are measured in the sweep, each right after a direct run; the others next to `direct`.
fn conn_keys(path: &str) -> (String, String) {
    if path == "fast" || path == "l4" {
        (
            format!("{path}.conn@{MAIN_ROUTES}.achieved_rate"),
            format!("pair.direct.conn@{MAIN_ROUTES}.achieved_rate"),
        )
    } else {
        (
            format!("{path}.conn.achieved_rate"),
            "direct.conn.achieved_rate".to_owned(),
        )
    }
}

pub struct Report {
    json: Value,
    cores: f64,
    results_values: std::collections::BTreeMap<String, Vec<f64>>,
    profile_quick: bool,
}

impl Report {
    pub fn build(
        results: &Results,
        machine: Value,
        profile: &Profile,
        elapsed: Duration,
    ) -> Report {
        let mut r = Report {
            json: Value::Null,
            cores: machine["cores"].as_f64().unwrap_or(1.0),
            results_values: results.values.clone(),
            profile_quick: profile.quick,
        };
        let metrics: Map<String, Value> = results
            .values
            .iter()
            .filter_map(|(k, v)| {
                Stat::of(v).map(|s| {
                    let mut j = s.json();
                    j["values"] = json!(v);
                    (k.clone(), j)
                })
            })
            .collect();
        let mut derived = Map::new();
        for (path, _) in PATHS {
            if let Some(s) = r.ratio(&format!("{path}.max.max_rate"), "direct.max.max_rate") {
                derived.insert(format!("{path}.max.max_rate.x_direct"), s.json());
            }
            let (conn, direct) = conn_keys(path);
            if let Some(s) = r.ratio(&conn, &direct) {
                derived.insert(format!("{conn}.x_direct"), s.json());
            }
            for (fig, _, _) in RATE_RUNS {
                for p in ["p50_us", "p99_us", "p999_us"] {
                    let key = format!("{path}.{fig}.{p}");
                    if let Some(s) = r.ratio(&key, &format!("direct.{fig}.{p}")) {
                        derived.insert(format!("{key}.x_direct"), s.json());
                    }
                    if let Some(s) = r.diff(&key, &format!("direct.{fig}.{p}")) {
                        derived.insert(format!("{key}.minus_direct"), s.json());
                    }
                }
            }
        }
        for path in ["l7_fork", "l7_base"] {
            let mut figs = vec!["conn.achieved_rate".to_owned(), "max.max_rate".to_owned()];
            for (fig, _, _) in RATE_RUNS {
                for p in ["p50_us", "p99_us", "p999_us", "cpu_ms_per_1k.proxy"] {
                    figs.push(format!("{fig}.{p}"));
                }
            }
            for fig in figs {
                for (anchor, _) in ANCHORS {
                    if let Some(s) = r.ratio(&format!("{path}.{fig}"), &format!("{anchor}.{fig}")) {
                        derived.insert(format!("{path}.{fig}.x_{anchor}"), s.json());
                    }
                }
            }
        }
        // The programs' own time per connection, as a share of what a direct connection costs
        // the machine (all cores, busy with the connection loop).
        let cores = machine["cores"].as_f64().unwrap_or(1.0);
        for case in CONN_COST_CASES {
            for n in SWEEP_ROUTES {
                let ns = r.values(&format!("cost.{case}.per_connection@{n}.ns"));
                let share: Vec<f64> = ns
                    .iter()
                    .zip(r.values(&format!("pair.direct.conn@{n}.achieved_rate")))
                    .map(|(ns, rate)| ns * rate / (cores * 1e9))
                    .collect();
                if let Some(s) = Stat::of(&share) {
                    derived.insert(
                        format!("cost.{case}.per_connection@{n}.share_of_direct_connection"),
                        s.json(),
                    );
                }
            }
        }
        for rules in IPTABLES_RULES {
            let key = format!("iptables.conn@{rules}.achieved_rate");
            if let Some(s) = r.ratio(&key, "pair.direct.conn@iptables.achieved_rate") {
                derived.insert(format!("{key}.x_direct"), s.json());
            }
        }
        for routes in SWEEP_ROUTES {
            for path in ["fast", "l4"] {
                let key = format!("{path}.conn@{routes}.achieved_rate");
                let direct = format!("pair.direct.conn@{routes}.achieved_rate");
                if let Some(s) = r.ratio(&key, &direct) {
                    derived.insert(format!("{key}.x_direct"), s.json());
                }
            }
        }
        let errors: Map<String, Value> = results
            .errors
            .iter()
            .map(|(k, (n, first))| (k.clone(), json!({ "count": n, "first": first })))
            .collect();
        let targets = r.targets();
        let max_search: Map<String, Value> = results
            .details
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let mut instructions = results.instructions.clone();
        if let Some(router) = r.stat("instr.router.ir_per_request") {
            for (anchor, _) in ANCHORS {
                if let (Some(a), Some(p)) = (
                    r.stat(&format!("instr.{anchor}.ir_per_request")),
                    instructions["proxies"].get_mut(anchor),
                ) {
                    p["router_x"] = json!(round3(router.median / a.median));
                }
            }
        }
        r.json = json!({
            "schema": "redirector-bench/1",
            "mode": if profile.quick { "quick" } else { "full" },
            "machine": machine,
            "setup": {
                "repeats": profile.repeats,
                "client_cpu": CLIENT_CPU,
                "server_cpu": SERVER_CPU,
                "pinning": format!(
                    "rdr-load (client) pinned to CPU {CLIENT_CPU}; servers, the daemon (its node router), nginx (1 worker) and HAProxy (nbthread 1) to CPU {SERVER_CPU}, set with sched_setaffinity before exec"
                ),
                "intervals": "ratios and differences are taken within each repeat (or pair of runs), then summed up as a mean (geometric for ratios) with a Student-t 95% confidence interval (`ci95`); a target is met when the whole interval is on its side of the bound, missed when the whole interval is on the other side, inconclusive otherwise",
                "generator": "rdr-load (tests/src/bin/rdr-load.rs): open loop, latency from the scheduled send time, hyper client, hdrhistogram",
                "request": "GET / with `baggage: sd-routing-key=<key>`, 128-byte response from `rdr-load serve`",
                "connection_close": "connection-rate and new-connection runs close with a reset after the whole response (SO_LINGER 0), so no TIME_WAIT builds up from run to run",
                "max_rate_search": "closed-loop probe for the saturation rate, then bisection with fixed-rate runs; a step that misses the p99 bound is tried once more",
                "connections": CONNECTIONS,
                "connect_workers": CONNECT_WORKERS,
                "max_rate_p99_bound_us": MAX_P99_US,
                "main_routes": MAIN_ROUTES,
                "run_ms": profile.run.as_millis() as u64,
                "warmup_ms": profile.warmup.as_millis() as u64,
                "conn_run_ms": profile.conn.as_millis() as u64,
                "max_step_ms": profile.max_step.as_millis() as u64,
                "max_steps": profile.max_steps,
                "cost_run_ms": profile.cost.as_millis() as u64,
            },
            "duration_s": round3(elapsed.as_secs_f64()),
            "metrics": metrics,
            "derived": derived,
            "targets": targets,
            "instructions": instructions,
            "errors": errors,
            "max_search_steps": max_search,
        });
        r
    }

    fn values(&self, key: &str) -> &[f64] {
        self.results_values
            .get(key)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    fn stat(&self, key: &str) -> Option<Stat> {
        Stat::of(self.values(key))
    }

    /// a / b within each repeat, then over the repeats: drift between repeats cancels.
    fn ratio(&self, a: &str, b: &str) -> Option<Stat> {
        let (a, b) = (self.values(a), self.values(b));
        let v: Vec<f64> = a
            .iter()
            .zip(b)
            .filter(|(_, b)| **b != 0.0)
            .map(|(a, b)| a / b)
            .collect();
        Stat::of_ratios(&v)
    }

    /// Connection rate of the fast path or L4 over the direct rate measured just before it,
    /// pooled over route counts and repeats (the programs' cost does not depend on the count:
    /// see the program-cost table), so the target is judged on every pair there is.
    fn paired_conn_ratio(&self, path: &str) -> Option<Stat> {
        let mut all = Vec::new();
        for n in SWEEP_ROUTES {
            let a = self.values(&format!("{path}.conn@{n}.achieved_rate"));
            let b = self.values(&format!("pair.direct.conn@{n}.achieved_rate"));
            all.extend(
                a.iter()
                    .zip(b)
                    .filter(|(_, b)| **b != 0.0)
                    .map(|(a, b)| a / b),
            );
        }
        Stat::of_ratios(&all)
    }

    fn diff(&self, a: &str, b: &str) -> Option<Stat> {
        let v: Vec<f64> = self
            .values(a)
            .iter()
            .zip(self.values(b))
            .map(|(a, b)| a - b)
            .collect();
        Stat::of(&v)
    }

    /// Writes `<dir>/bench-<date>.json` and `latest.json`; returns the first.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stamp: String = self.json["machine"]["date"]
            .as_str()
            .unwrap_or("unknown")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let text = serde_json::to_string_pretty(&self.json)? + "\n";
        let path = dir.join(format!(
            "bench-{stamp}-{}.json",
            self.json["mode"].as_str().unwrap_or("run")
        ));
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::write(dir.join("latest.json"), &text).context("writing latest.json")?;
        Ok(path)
    }
}
