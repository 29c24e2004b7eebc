//! The benchmark's targets: each goal, the figure it is judged on, and whether it is met.
//!
//! Each is judged on the 95 % interval of its figure (see `stat`): met when the whole interval
//! is on the right side of the bound, missed when the whole interval is on the wrong side, and
//! "inconclusive at this noise" when it straddles the bound, or when one repeat gave no
//! interval at all.
use serde_json::{Value, json};

use super::{
    ANCHORS, CONN_COST_CASES, COST_CASES, Report,
    stat::{Stat, Verdict, interval, signed_interval},
};
use crate::bench::measure::{MAIN_ROUTES, SWEEP_ROUTES};

impl Report {
    pub(super) fn targets(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut push = |name: &str,
                        basis: &str,
                        value: Option<Stat>,
                        shown: String,
                        verdict: Option<Verdict>| {
            // One repeat gives no interval: say so rather than leave "inconclusive" unexplained.
            let shown = if verdict == Some(Verdict::Inconclusive)
                && value.is_some_and(|s| s.ci.is_none())
            {
                format!("{shown} (one sample: no interval)")
            } else {
                shown
            };
            out.push(json!({
                "target": name,
                "basis": basis,
                "value": value.map(|s| s.json()),
                "shown": shown,
                "verdict": verdict.map_or("n/a", Verdict::as_str),
                "met": verdict.and_then(|v| match v {
                    Verdict::Met => Some(true),
                    Verdict::Missed => Some(false),
                    Verdict::Inconclusive => None,
                }),
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
                    s.map_or("-".into(), |s| interval(s, 3)),
                    own.zip(share).map_or(String::new(), |(ns, pct)| format!(
                        "; programs' own time {:.2} us per connection = {pct:.1}% of a direct connection's CPU",
                        ns.median / 1000.0
                    ))
                ),
                s.map(|s| s.verdict(bound, true)),
            );
        }

        // Connect program: worst median over the three kinds of connection, and how much it
        // moves between 10 and 100 000 routes. Every (kind, route count) must be within the
        // bound: judged on each one's interval over the repeats.
        let mut worst: Option<(Stat, String)> = None;
        let mut flat = true;
        let mut detail = Vec::new();
        let mut each = Vec::new();
        let conn_cases = COST_CASES
            .iter()
            .filter(|(case, _, _)| CONN_COST_CASES.contains(case));
        for (case, label, _) in conn_cases {
            let per: Vec<f64> = [10, 100_000]
                .iter()
                .filter_map(|n| self.stat(&format!("cost.{case}.connect4@{n}.ns")))
                .map(|s| s.median)
                .collect();
            for n in SWEEP_ROUTES {
                if let Some(s) = self.stat(&format!("cost.{case}.connect4@{n}.ns")) {
                    each.push(s.verdict(100.0, false));
                    if worst.as_ref().is_none_or(|(w, _)| s.median > w.median) {
                        worst = Some((s, format!("{label} at {n} routes")));
                    }
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
            worst.as_ref().map(|(w, _)| *w),
            match &worst {
                Some((w, at)) => format!(
                    "worst {:.0} ns ({at}); 10 -> 100 000 routes: {}",
                    w.median,
                    detail.join(", ")
                ),
                None => "-".into(),
            },
            worst.map(|_| {
                if flat {
                    Verdict::all(&each)
                } else {
                    Verdict::Missed
                }
            }),
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
                    p50.map_or("-".into(), |s| signed_interval(s, 1)),
                    p99.map_or("-".into(), |s| signed_interval(s, 1))
                ),
                p50.zip(p99)
                    .map(|(a, b)| Verdict::all(&[a.verdict(25.0, false), b.verdict(100.0, false)])),
            );
        }
        let s = self.ratio("l7_fork.max.max_rate", "nginx.max.max_rate");
        // The same figure against HAProxy, the second anchor: shown, not judged.
        let others: Vec<String> = ANCHORS
            .iter()
            .filter(|(a, _)| *a != "nginx")
            .filter_map(|(a, label)| {
                self.ratio("l7_fork.max.max_rate", &format!("{a}.max.max_rate"))
                    .map(|s| format!("; {}x {label}", interval(s, 2)))
            })
            .collect();
        push(
            "L7 max req/s with p99 <= 1 ms >= 1.5x nginx",
            "max fixed rate with p99 <= 1 ms, keep-alive, to the fork, over nginx's measured in the same repeat; router, nginx and HAProxy on the same core",
            s,
            format!(
                "{}{}",
                s.map_or("-".into(), |s| format!("{}x", interval(s, 2))),
                others.concat()
            ),
            s.map(|s| s.verdict(1.5, true)),
        );
        out
    }
}
