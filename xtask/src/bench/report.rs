//! Medians, spreads, ratios and targets; the printed table and the JSON file.
use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::Context as _;
use serde_json::{Map, Value, json};

use super::{
    Profile, Results,
    load::{CONNECT_WORKERS, CONNECTIONS, MAX_P99_US},
    measure::{IPTABLES_RULES, MAIN_ROUTES, RATE_RUNS, SWEEP_ROUTES},
    sys::{CLIENT_CPU, SERVER_CPU},
};

/// Paths in table order: (key, label).
const PATHS: [(&str, &str); 6] = [
    ("direct", "direct"),
    ("fast", "fast path"),
    ("l4", "L4 steered"),
    ("l7_fork", "L7 to fork"),
    ("l7_base", "L7 to baseline"),
    ("nginx", "nginx (fork)"),
];
/// Programs the cost table shows first, in this order; any other that ran follows them.
const PROGRAMS: [&str; 3] = ["connect4", "handoff_sockops", "getpeername6"];
const COST_CASES: [(&str, &str); 3] = [
    ("fast", "fast path"),
    ("l4", "L4 steered"),
    ("l7", "L7 hand-off"),
];

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

/// Median, min and max of one figure over the repeats.
#[derive(Clone, Copy, Debug)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

impl Stat {
    fn of(values: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    fn json(&self) -> Value {
        json!({ "median": round3(self.median), "min": round3(self.min), "max": round3(self.max), "n": self.n })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
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
                if let Some(s) = r.ratio(&format!("{path}.{fig}"), &format!("nginx.{fig}")) {
                    derived.insert(format!("{path}.{fig}.x_nginx"), s.json());
                }
            }
        }
        // The programs' own time per connection, as a share of what a direct connection costs
        // the machine (all cores, busy with the connection loop).
        let cores = machine["cores"].as_f64().unwrap_or(1.0);
        for (case, _) in COST_CASES {
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
        r.json = json!({
            "schema": "redirector-bench/1",
            "mode": if profile.quick { "quick" } else { "full" },
            "machine": machine,
            "setup": {
                "repeats": profile.repeats,
                "client_cpu": CLIENT_CPU,
                "server_cpu": SERVER_CPU,
                "pinning": format!(
                    "rdr-load (client) pinned to CPU {CLIENT_CPU}; servers, the daemon (its node router) and nginx (1 worker) to CPU {SERVER_CPU}, set with sched_setaffinity before exec"
                ),
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
        Stat::of(&v)
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
        Stat::of(&all)
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

    fn targets(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut push =
            |name: &str, basis: &str, value: Option<Stat>, shown: String, met: Option<bool>| {
                out.push(json!({
                    "target": name,
                    "basis": basis,
                    "value": value.map(|s| s.json()),
                    "shown": shown,
                    "met": met,
                }));
            };
        for (path, name, bound) in [
            ("fast", "fast path >= 0.99x direct", 0.99),
            ("l4", "L4 >= 0.98x direct", 0.98),
        ] {
            let s = self.paired_conn_ratio(path);
            let own = self.stat(&format!("cost.{path}.per_connection@{MAIN_ROUTES}.ns"));
            let share = own
                .zip(self.stat(&format!("pair.direct.conn@{MAIN_ROUTES}.achieved_rate")))
                .map(|(ns, rate)| ns.median * rate.median / (self.cores * 1e9) * 100.0);
            push(
                name,
                "connections/s (connect + one request + close, where the programs run on every unit of work), each against the direct rate measured just before it; all route counts and repeats pooled",
                s,
                format!(
                    "{}x{}",
                    s.map_or("-".into(), |s| spread(s, 3)),
                    own.zip(share).map_or(String::new(), |(ns, pct)| format!(
                        "; programs' own time {:.2} us per connection = {pct:.1}% of a direct connection's CPU",
                        ns.median / 1000.0
                    ))
                ),
                s.map(|s| s.median >= bound),
            );
        }

        // Connect program: worst median over the three kinds of connection, and how much it
        // moves between 10 and 100 000 routes.
        let mut worst: Option<(f64, String)> = None;
        let mut flat = true;
        let mut detail = Vec::new();
        for (case, label) in COST_CASES {
            let per: Vec<f64> = [10, 100_000]
                .iter()
                .filter_map(|n| self.stat(&format!("cost.{case}.connect4@{n}.ns")))
                .map(|s| s.median)
                .collect();
            for n in SWEEP_ROUTES {
                if let Some(s) = self.stat(&format!("cost.{case}.connect4@{n}.ns"))
                    && worst.as_ref().is_none_or(|(w, _)| s.median > *w)
                {
                    worst = Some((s.median, format!("{label} at {n} routes")));
                }
            }
            if let [lo, hi] = per[..] {
                // Flat: within 20% (or 10 ns, below which the clock reads dominate).
                flat &= hi - lo <= (0.2 * lo).max(10.0);
                detail.push(format!("{label} {lo:.0} -> {hi:.0} ns"));
            }
        }
        push(
            "connect program <= 100 ns per run, flat from 10 to 100 000 routes",
            "connect4 run_time_ns / run_cnt (bpf_stats), fast path, L4 and L7 hand-off connections",
            None,
            match &worst {
                Some((w, at)) => format!(
                    "worst {w:.0} ns ({at}); 10 -> 100 000 routes: {}",
                    detail.join(", ")
                ),
                None => "-".into(),
            },
            worst.map(|(w, _)| w <= 100.0 && flat),
        );

        for path in ["l7_fork", "l7_base"] {
            let p50 = self.diff(&format!("{path}.ka1000.p50_us"), "direct.ka1000.p50_us");
            let p99 = self.diff(&format!("{path}.ka1000.p99_us"), "direct.ka1000.p99_us");
            let label = if path == "l7_fork" {
                "to fork"
            } else {
                "to baseline"
            };
            push(
                &format!("L7 ({label}) adds <= 25 us p50 and <= 100 us p99 at 1000 req/s"),
                "keep-alive, 1000 req/s: L7 minus direct, within each repeat",
                p50,
                format!(
                    "{} us p50, {} us p99",
                    p50.map_or("-".into(), |s| signed_spread(s, 1)),
                    p99.map_or("-".into(), |s| signed_spread(s, 1))
                ),
                p50.zip(p99)
                    .map(|(a, b)| a.median <= 25.0 && b.median <= 100.0),
            );
        }
        let s = self.ratio("l7_fork.max.max_rate", "nginx.max.max_rate");
        push(
            "L7 max req/s with p99 <= 1 ms >= 1.5x nginx",
            "max fixed rate with p99 <= 1 ms, keep-alive, to the fork; router and nginx on the same core",
            s,
            s.map_or("-".into(), |s| format!("{}x", spread(s, 2))),
            s.map(|s| s.median >= 1.5),
        );
        out
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let m = &self.json["machine"];
        let s = &self.json["setup"];
        let spread_note = if self.profile_quick {
            "quick: one repeat, short runs"
        } else {
            "median of the repeats, (min-max) where shown"
        };
        let _ = writeln!(
            t,
            "\nredirector bench ({}; {} repeat(s); {spread_note})",
            self.json["mode"].as_str().unwrap_or(""),
            s["repeats"]
        );
        let _ = writeln!(
            t,
            "{}  kernel {}  {} cores ({})  commit {}{}",
            m["date"].as_str().unwrap_or("?"),
            m["kernel"].as_str().unwrap_or("?"),
            m["cores"],
            m["cpu_model"].as_str().unwrap_or("?"),
            m["git_commit"].as_str().unwrap_or("?"),
            if m["git_dirty"].as_bool() == Some(true) {
                "+changes"
            } else {
                ""
            }
        );
        if let Some(steal) = m["steal_ms_during_run"].as_f64() {
            let _ = writeln!(
                t,
                "hypervisor steal time during the run: {steal:.0} ms (over {:.0} s)",
                self.json["duration_s"].as_f64().unwrap_or(0.0)
            );
        }
        let _ = writeln!(
            t,
            "client on CPU {CLIENT_CPU}; servers, daemon and nginx on CPU {SERVER_CPU}; GET with a baggage header, 128-byte answer; \
             {CONNECTIONS} keep-alive connections; {MAIN_ROUTES} routes loaded for the latency and max-rate runs"
        );

        let _ = writeln!(
            t,
            "\nLatency at a fixed rate, us: p50 / p99 / p99.9 (open loop, measured from the scheduled send time)"
        );
        let _ = writeln!(
            t,
            "{:<16}{:<26}{:<26}new connection 1000/s",
            "path", "keep-alive 1000/s", "keep-alive 5000/s"
        );
        for (path, label) in PATHS {
            let mut row = format!("{label:<16}");
            for (fig, _, _) in RATE_RUNS {
                let q = |p: &str| {
                    self.stat(&format!("{path}.{fig}.{p}"))
                        .map_or("-".into(), |s| us(s.median))
                };
                let _ = write!(
                    row,
                    "{:<26}",
                    format!("{} / {} / {}", q("p50_us"), q("p99_us"), q("p999_us"))
                );
            }
            let _ = writeln!(t, "{}", row.trim_end());
        }
        let _ = writeln!(
            t,
            "{:<16}{}",
            "",
            "(includes the client's own wake-up lag, same on every path: direct p50 lag "
                .to_owned()
                + &self
                    .stat("direct.ka1000.lag_p50_us")
                    .map_or("-".into(), |s| us(s.median))
                + " us at 1000/s)"
        );

        let _ = writeln!(
            t,
            "\nAdded latency at 1000 req/s keep-alive, us, and as a ratio (within each repeat, then median)"
        );
        let _ = writeln!(
            t,
            "{:<16}{:<26}{:<26}{:<12}x direct p99",
            "path", "p50 - direct", "p99 - direct", "x direct p50"
        );
        let rows = [
            ("fast", "fast path", "direct"),
            ("l4", "L4 steered", "direct"),
            ("l7_fork", "L7 to fork", "direct"),
            ("l7_base", "L7 to baseline", "direct"),
            ("nginx", "nginx (fork)", "direct"),
            ("l7_fork", "L7 fork - nginx", "nginx"),
        ];
        for (path, label, base) in rows {
            let d = |p: &str| {
                self.diff(&format!("{path}.ka1000.{p}"), &format!("{base}.ka1000.{p}"))
                    .map_or("-".into(), |s| signed_spread(s, 1))
            };
            let x = |p: &str| {
                self.ratio(&format!("{path}.ka1000.{p}"), &format!("{base}.ka1000.{p}"))
                    .map_or("-".into(), |s| format!("{:.2}", s.median))
            };
            let (p50, p99, x50, x99) = (d("p50_us"), d("p99_us"), x("p50_us"), x("p99_us"));
            let _ = writeln!(t, "{label:<16}{p50:<26}{p99:<26}{x50:<12}{x99}");
        }

        let _ = writeln!(
            t,
            "\n{:<16}{:<34}{:<10}{:<30}x direct",
            "Throughput", "max req/s with p99 <= 1 ms", "x direct", "connections/s"
        );
        for (path, label) in PATHS {
            let max = self.stat(&format!("{path}.max.max_rate"));
            let (conn_key, direct_key) = conn_keys(path);
            let conn = self.stat(&conn_key);
            let rmax = self.ratio(&format!("{path}.max.max_rate"), "direct.max.max_rate");
            let rconn = self.ratio(&conn_key, &direct_key);
            let _ = writeln!(
                t,
                "{label:<16}{:<34}{:<10}{:<30}{}",
                max.map_or("-".into(), |s| spread(s, 0)),
                rmax.map_or("-".into(), |s| format!("{:.2}", s.median)),
                conn.map_or("-".into(), |s| spread(s, 0)),
                rconn.map_or("-".into(), |s| format!("{:.3}", s.median)),
            );
        }
        for path in ["l7_fork", "l7_base"] {
            let rmax = self.ratio(&format!("{path}.max.max_rate"), "nginx.max.max_rate");
            let rconn = self.ratio(
                &format!("{path}.conn.achieved_rate"),
                "nginx.conn.achieved_rate",
            );
            let _ = writeln!(
                t,
                "{:<16}{:<34}{:<10}{:<30}{}",
                format!("{path} x nginx"),
                "",
                rmax.map_or("-".into(), |s| format!("{:.2}", s.median)),
                "",
                rconn.map_or("-".into(), |s| format!("{:.2}", s.median)),
            );
        }

        let _ = writeln!(
            t,
            "\nCPU per 1000 requests, ms (server; proxy = node router or nginx), measured around each fixed-rate run"
        );
        let _ = writeln!(
            t,
            "{:<16}{:<30}{:<30}new connection 1000/s",
            "path", "keep-alive 1000/s", "keep-alive 5000/s"
        );
        for (path, label) in PATHS {
            let mut row = format!("{label:<16}");
            for (fig, _, _) in RATE_RUNS {
                let c = |who: &str| {
                    self.stat(&format!("{path}.{fig}.cpu_ms_per_1k.{who}"))
                        .map(|s| format!("{:.1}", s.median))
                };
                let cell = match (c("server"), c("proxy")) {
                    (Some(srv), Some(proxy)) => format!("{srv} + {proxy}"),
                    (Some(srv), None) => srv,
                    _ => "-".into(),
                };
                let _ = write!(row, "{cell:<30}");
            }
            let _ = writeln!(t, "{}", row.trim_end());
        }

        let _ = writeln!(
            t,
            "\nConnection rate vs table size, connections/s (x direct); connect + one request + close, {CONNECT_WORKERS} workers"
        );
        // Each cell: rate (x the direct rate measured just before it).
        let row = |t: &mut String, label: &str, cells: Vec<(String, String, String)>| {
            let mut line = format!("{label:<24}");
            for (n, key, direct) in cells {
                let v = self
                    .stat(&key)
                    .map_or("-".into(), |s| format!("{:.0}", s.median));
                let r = if key == direct {
                    String::new()
                } else {
                    self.ratio(&key, &direct)
                        .map_or(" (-)".into(), |s| format!(" ({:.3})", s.median))
                };
                let _ = write!(line, "{:<28}", format!("{n}: {v}{r}"));
            }
            let _ = writeln!(t, "{}", line.trim_end());
        };
        let mut sweep = SWEEP_ROUTES;
        sweep.sort_unstable();
        let routes_row = |path: &str| -> Vec<(String, String, String)> {
            sweep
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        format!("{path}.conn@{n}.achieved_rate"),
                        format!("pair.direct.conn@{n}.achieved_rate"),
                    )
                })
                .collect()
        };
        row(&mut t, "direct, before each", routes_row("pair.direct"));
        row(&mut t, "fast path, routes", routes_row("fast"));
        row(&mut t, "redirector L4, routes", routes_row("l4"));
        let ipt = "pair.direct.conn@iptables.achieved_rate".to_owned();
        let mut cells = vec![("direct".to_owned(), ipt.clone(), ipt.clone())];
        cells.extend(IPTABLES_RULES.iter().map(|n| {
            (
                n.to_string(),
                format!("iptables.conn@{n}.achieved_rate"),
                ipt.clone(),
            )
        }));
        row(&mut t, "iptables DNAT, rules", cells);

        let _ = writeln!(
            t,
            "\nKernel program cost, ns per run (bpf_stats run_time_ns / run_cnt), and all runs a connection causes"
        );
        let _ = writeln!(
            t,
            "{:<18}{:<18}{}",
            "program",
            "connection",
            sweep
                .iter()
                .map(|n| format!("{:<19}", format!("{n} routes")))
                .collect::<String>()
                .trim_end()
        );
        let mut names: Vec<String> = PROGRAMS.iter().map(|s| (*s).to_owned()).collect();
        for key in self.results_values.keys() {
            if let Some(rest) = key.strip_prefix("cost.")
                && let Some((_, rest)) = rest.split_once('.')
                && let Some((name, _)) = rest.split_once('@')
                && name != "per_connection"
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_owned());
            }
        }
        for (case, label) in COST_CASES {
            let cells: Vec<String> = sweep
                .iter()
                .map(|n| {
                    let ns = self.stat(&format!("cost.{case}.per_connection@{n}.ns"));
                    format!("{:<19}", ns.map_or("-".into(), |s| spread(s, 0)))
                })
                .collect();
            let _ = writeln!(
                t,
                "{:<18}{:<18}{}",
                "all, per conn.",
                label,
                cells.concat().trim_end()
            );
        }
        for name in &names {
            for (case, label) in COST_CASES {
                let cells: Vec<String> = sweep
                    .iter()
                    .map(|n| {
                        let ns = self.stat(&format!("cost.{case}.{name}@{n}.ns"));
                        format!("{:<19}", ns.map_or("-".into(), |s| spread(s, 0)))
                    })
                    .collect();
                if cells.iter().all(|c| c.trim() == "-") {
                    continue;
                }
                let _ = writeln!(t, "{:<18}{:<18}{}", name, label, cells.concat().trim_end());
            }
        }

        let mib = |k: &str| {
            self.stat(k)
                .map_or("-".into(), |s| format!("{:.1}", s.median / 1024.0))
        };
        let per_count = |f: &dyn Fn(usize) -> String| {
            sweep.iter().map(|n| f(*n)).collect::<Vec<_>>().join(" / ")
        };
        let _ = writeln!(t, "\nDaemon (its node router included)");
        let _ = writeln!(
            t,
            "  RSS      {} MiB with 10 / 10 000 / 100 000 routes; {} MiB after the L7 runs (peak {})",
            per_count(&|n| mib(&format!("daemon.rss_kib@{n}"))),
            mib("daemon.rss_kib"),
            mib("daemon.hwm_kib"),
        );
        let _ = writeln!(
            t,
            "  CPU      {} ms per 1000 routed requests (L7 to fork, keep-alive 5000/s); idle {} ms per second",
            self.stat("l7_fork.ka5000.cpu_ms_per_1k.proxy")
                .map_or("-".into(), |s| spread(s, 1)),
            per_count(&|n| self
                .stat(&format!("daemon.idle_cpu_ms_per_s@{n}"))
                .map_or("-".into(), |s| format!("{:.1}", s.median))),
        );
        let _ = writeln!(
            t,
            "  start    {} s until ready with 10 / 10 000 / 100 000 routes",
            per_count(&|n| self
                .stat(&format!("daemon.start_s@{n}"))
                .map_or("-".into(), |s| format!("{:.1}", s.median))),
        );

        let _ = writeln!(t, "\nTargets (reported, never asserted)");
        for tg in self.json["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let verdict = match tg["met"].as_bool() {
                Some(true) => "met   ",
                Some(false) => "MISSED",
                None => "n/a   ",
            };
            let _ = writeln!(
                t,
                "  {verdict}  {:<68} {}",
                tg["target"].as_str().unwrap_or(""),
                tg["shown"].as_str().unwrap_or("")
            );
        }
        if let Some(errors) = self.json["errors"].as_object()
            && !errors.is_empty()
        {
            let _ = writeln!(t, "\nFailed requests (their runs' figures are suspect):");
            for (k, v) in errors {
                let _ = writeln!(
                    t,
                    "  {k}: {} ({})",
                    v["count"],
                    v["first"].as_str().unwrap_or("")
                );
            }
        }
        t
    }

    /// Writes `<target>/bench/bench-<date>.json` and `latest.json`; returns the first.
    pub fn write(&self) -> anyhow::Result<PathBuf> {
        let exe = std::env::current_exe()?;
        let target = exe
            .parent()
            .and_then(|d| d.parent())
            .context("xtask binary has no target directory")?;
        let dir = target.join("bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
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

/// Microseconds: one decimal below 100, whole above.
fn us(x: f64) -> String {
    if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// `median (min-max)` with `decimals`, or just the median for a single repeat.
fn spread(s: Stat, decimals: usize) -> String {
    if s.n > 1 {
        format!(
            "{:.d$} ({:.d$}-{:.d$})",
            s.median,
            s.min,
            s.max,
            d = decimals
        )
    } else {
        format!("{:.d$}", s.median, d = decimals)
    }
}

/// Like [`spread`], every number with its sign.
fn signed_spread(s: Stat, decimals: usize) -> String {
    if s.n > 1 {
        format!(
            "{:+.d$} ({:+.d$}..{:+.d$})",
            s.median,
            s.min,
            s.max,
            d = decimals
        )
    } else {
        format!("{:+.d$}", s.median, d = decimals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_takes_the_median_and_the_range() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let even = Stat::of(&[4.0, 1.0, 2.0, 3.0]).expect("values");
        assert_eq!(even.median, 2.5);
        assert!(Stat::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn spreads_show_the_range_only_when_there_is_one() {
        let one = Stat::of(&[1.5]).expect("value");
        assert_eq!(spread(one, 1), "1.5");
        let three = Stat::of(&[-2.0, 1.0, 4.0]).expect("values");
        assert_eq!(spread(three, 0), "1 (-2-4)");
        assert_eq!(signed_spread(three, 0), "+1 (-2..+4)");
    }
}
