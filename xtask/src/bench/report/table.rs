//! The printed report: the machine and setup, the paths' figures, the program costs, the
//! targets and the errors.
use std::fmt::Write as _;

use super::{
    ANCHORS, CONN_COST_CASES, COST_CASES, PATHS, PER_CONNECTION, PER_EXCHANGE, PROGRAMS, Report,
    conn_keys,
    stat::{interval, signed_interval, spread, us},
};
use crate::bench::{
    load::{CONNECT_WORKERS, CONNECTIONS},
    measure::{IPTABLES_RULES, MAIN_ROUTES, RATE_RUNS, SWEEP_ROUTES},
    sys::{CLIENT_CPU, SERVER_CPU},
};

impl Report {
    pub fn table(&self) -> String {
        let mut t = String::new();
        let m = &self.json["machine"];
        let s = &self.json["setup"];
        let instructions_only = self.results_values.keys().all(|k| k.starts_with("instr."));
        let spread_note = if instructions_only {
            "instructions only: callgrind's counts, no timed runs"
        } else if self.profile_quick {
            "quick: one repeat, short runs, no intervals"
        } else {
            "median of the repeats, (min-max) where shown; ratios and differences within each repeat: mean [95% interval]"
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
        let load = &m["load"];
        if let Some(other) = load["other_cores"].as_f64() {
            let _ = writeln!(
                t,
                "machine load: other processes {other:.2} cores on average (the benchmark {:.2}, kernel threads {:.2}, interrupts {:.2}); idle probes {} cores busy",
                load["bench_cores"].as_f64().unwrap_or(0.0),
                load["kernel_thread_cores"].as_f64().unwrap_or(0.0),
                load["irq_softirq_cores"].as_f64().unwrap_or(0.0),
                load["idle_probe_busy_cores_median"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.2}")),
            );
        }
        for w in load["warnings"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let _ = writeln!(t, "WARNING: machine not idle: {}", w.as_str().unwrap_or(""));
        }
        let _ = writeln!(
            t,
            "client on CPU {CLIENT_CPU}; servers, daemon, nginx and HAProxy on CPU {SERVER_CPU}; GET with a baggage header, 128-byte answer; \
             {CONNECTIONS} keep-alive connections; {MAIN_ROUTES} routes loaded for the latency and max-rate runs"
        );
        // `--only instructions`: the timed sections would be all dashes.
        if instructions_only {
            self.instructions_table(&mut t);
            return t;
        }

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
            "\nAdded latency at 1000 req/s keep-alive, us, and as a ratio (within each repeat; mean [95% interval])"
        );
        let _ = writeln!(
            t,
            "{:<16}{:<28}{:<28}{:<14}x direct p99",
            "path", "p50 - direct", "p99 - direct", "x direct p50"
        );
        let rows = [
            ("fast", "fast path", "direct"),
            ("l4", "L4 steered", "direct"),
            ("l7_fork", "L7 to fork", "direct"),
            ("l7_base", "L7 to baseline", "direct"),
            ("nginx", "nginx (fork)", "direct"),
            ("haproxy", "HAProxy (fork)", "direct"),
            ("l7_fork", "L7 fork - nginx", "nginx"),
            ("l7_fork", "L7 fork - HAPrx", "haproxy"),
        ];
        for (path, label, base) in rows {
            let d = |p: &str| {
                self.diff(&format!("{path}.ka1000.{p}"), &format!("{base}.ka1000.{p}"))
                    .map_or("-".into(), |s| signed_interval(s, 1))
            };
            let x = |p: &str| {
                self.ratio(&format!("{path}.ka1000.{p}"), &format!("{base}.ka1000.{p}"))
                    .map_or("-".into(), |s| format!("{:.2}", s.mean))
            };
            let (p50, p99, x50, x99) = (d("p50_us"), d("p99_us"), x("p50_us"), x("p99_us"));
            // Cells keep a blank between them however wide the interval.
            let _ = writeln!(
                t,
                "{label:<16}{:<28}{:<28}{x50:<14}{x99}",
                format!("{p50} "),
                format!("{p99} ")
            );
        }

        let _ = writeln!(
            t,
            "\n{:<18}{:<28}{:<20}{:<26}x direct",
            "Throughput", "max req/s, p99 <= 1 ms", "x direct", "connections/s"
        );
        for (path, label) in PATHS {
            let max = self.stat(&format!("{path}.max.max_rate"));
            let (conn_key, direct_key) = conn_keys(path);
            let conn = self.stat(&conn_key);
            let rmax = self.ratio(&format!("{path}.max.max_rate"), "direct.max.max_rate");
            let rconn = self.ratio(&conn_key, &direct_key);
            let _ = writeln!(
                t,
                "{label:<18}{:<28}{:<20}{:<26}{}",
                max.map_or("-".into(), |s| spread(s, 0)),
                rmax.map_or("-".into(), |s| interval(s, 2)),
                conn.map_or("-".into(), |s| spread(s, 0)),
                rconn.map_or("-".into(), |s| interval(s, 3)),
            );
        }
        for path in ["l7_fork", "l7_base"] {
            for (anchor, label) in ANCHORS {
                let rmax = self.ratio(
                    &format!("{path}.max.max_rate"),
                    &format!("{anchor}.max.max_rate"),
                );
                let rconn = self.ratio(
                    &format!("{path}.conn.achieved_rate"),
                    &format!("{anchor}.conn.achieved_rate"),
                );
                if rmax.is_none() && rconn.is_none() {
                    continue;
                }
                let _ = writeln!(
                    t,
                    "{:<18}{:<28}{:<20}{:<26}{}",
                    format!("{path} x {label}"),
                    "",
                    rmax.map_or("-".into(), |s| interval(s, 2)),
                    "",
                    rconn.map_or("-".into(), |s| interval(s, 2)),
                );
            }
        }

        let _ = writeln!(
            t,
            "\nCPU per 1000 requests, ms (server; proxy = node router, nginx or HAProxy), measured around each fixed-rate run"
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
            "\nKernel program cost, ns per run (bpf_stats run_time_ns / run_cnt), and all runs a connection or exchange causes"
        );
        let _ = writeln!(
            t,
            "(TCP v4 cases: both ends' programs; TCP v6 with getpeername and UDP (one socket, or a connected socket per exchange): the client's alone)"
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
                && name != PER_CONNECTION
                && name != PER_EXCHANGE
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_owned());
            }
        }
        for (case, label, unit) in COST_CASES {
            let cells: Vec<String> = sweep
                .iter()
                .map(|n| {
                    let ns = self.stat(&format!("cost.{case}.{unit}@{n}.ns"));
                    format!("{:<19}", ns.map_or("-".into(), |s| spread(s, 0)))
                })
                .collect();
            if cells.iter().all(|c| c.trim() == "-") && !CONN_COST_CASES.contains(&case) {
                continue;
            }
            let what = if unit == PER_EXCHANGE {
                "all, per exch."
            } else {
                "all, per conn."
            };
            let _ = writeln!(t, "{what:<18}{label:<18}{}", cells.concat().trim_end());
        }
        for name in &names {
            for (case, label, _) in COST_CASES {
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

        self.instructions_table(&mut t);

        let _ = writeln!(
            t,
            "\nTargets (reported, never asserted; judged on the 95% interval: inconclusive when it straddles the bound)"
        );
        for tg in self.json["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let verdict = match tg["verdict"].as_str() {
                Some("met") => "met         ",
                Some("missed") => "MISSED      ",
                Some("inconclusive") => "inconclusive",
                _ => "n/a         ",
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

    /// Instructions per routed request (callgrind), the router's top functions, and where
    /// the listings are.
    fn instructions_table(&self, t: &mut String) {
        let ins = &self.json["instructions"];
        let Some(proxies) = ins["proxies"].as_object() else {
            return;
        };
        let _ = writeln!(
            t,
            "\nInstructions per routed request (callgrind, the proxy's user space only): (Ir(2N) - Ir(N)) / N, N = {}, {} req/s, {} keep-alive connections, to the fork",
            ins["requests"], ins["rate"], ins["connections"]
        );
        let router = proxies
            .get("router")
            .and_then(|r| r["ir_per_request"].as_f64());
        let _ = writeln!(t, "{:<16}{:<18}router x this", "proxy", "Ir per request");
        for key in ["router", "nginx", "haproxy"] {
            let Some(p) = proxies.get(key) else { continue };
            let ir = p["ir_per_request"].as_f64().unwrap_or(0.0);
            let x = match router {
                Some(r) if key != "router" && ir > 0.0 => format!("{:.2}", r / ir),
                _ => String::new(),
            };
            let _ = writeln!(
                t,
                "{:<16}{:<18}{x}",
                p["label"].as_str().unwrap_or(key),
                thousands(ir)
            );
        }
        if let Some(top) = proxies.get("router").and_then(|r| r["top_self"].as_array()) {
            let _ = writeln!(
                t,
                "Router's top functions by self Ir (window of 2N requests): Ir per request, share"
            );
            for f in top {
                let name = f["function"].as_str().unwrap_or("?");
                let short: String = if name.chars().count() > 110 {
                    name.chars().take(107).chain("...".chars()).collect()
                } else {
                    name.to_owned()
                };
                let _ = writeln!(
                    t,
                    "  {:>9}  {:>5.1}%  {short}",
                    thousands(f["ir_per_request"].as_f64().unwrap_or(0.0)),
                    f["percent"].as_f64().unwrap_or(0.0),
                );
            }
        }
        if let Some(files) = proxies.get("router").and_then(|r| r["listings"].as_array()) {
            for f in files {
                let _ = writeln!(t, "  listing: {}", f.as_str().unwrap_or(""));
            }
        }
    }
}

/// A whole number with thin groups of three: 52 345.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    if x < 0.0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::bench::{Options, Profile, Results};

    fn report(values: &[(&str, f64)]) -> String {
        let mut results = Results::default();
        for (k, v) in values {
            results.push(*k, *v);
        }
        let profile = Profile::new(&Options::default());
        let machine = json!({ "cores": 2 });
        Report::build(&results, machine, &profile, Duration::ZERO).table()
    }

    #[test]
    fn cost_table_shows_the_new_cases_beside_the_old() {
        let t = report(&[
            ("cost.l4.connect4@10.ns", 1300.0),
            ("cost.l4.per_connection@10.ns", 2000.0),
            ("cost.l4_udp6.sendmsg6@10.ns", 700.0),
            ("cost.l4_udp6.per_exchange@10.ns", 1500.0),
            ("cost.fast_udp4c.getpeername4@10000.ns", 90.0),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        let has = |row: &str| {
            assert!(lines.contains(&row), "no row {row:?} in\n{t}");
        };
        // One cell per route count (10, 10 000, 100 000), 19 wide.
        has("connect4          L4 steered        1300               -                  -");
        has("sendmsg6          L4, UDP v6        700                -                  -");
        has("all, per exch.    L4, UDP v6        1500               -                  -");
        has("getpeername4      fast, UDP v4 conn -                  90                 -");
        // Cases that did not run stay out, the TCP-over-IPv4 ones excepted.
        assert!(!t.contains("all, per exch.    fast, UDP v6"));
        assert!(t.contains("all, per conn.    L7 hand-off       -"));
        // The unit totals are not programs.
        assert!(!lines.iter().any(|l| l.starts_with("per_exchange")));
    }
}
