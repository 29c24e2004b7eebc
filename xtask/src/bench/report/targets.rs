//! The benchmark's targets: each goal, the figure it is judged on, and whether it is met.
use serde_json::{Value, json};

use super::{
    COST_CASES, Report,
    stat::{Stat, signed_spread, spread},
};
use crate::bench::measure::{MAIN_ROUTES, SWEEP_ROUTES};

impl Report {
    pub(super) fn targets(&self) -> Vec<Value> {
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
}
