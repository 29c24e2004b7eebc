//! One figure over the repeats: its median and range, the mean with a 95 % confidence interval,
//! and how the report writes it.
//!
//! Absolute figures are shown as medians with their range. Paired figures (a ratio or a
//! difference taken within each repeat, the path against what it is compared with in the same
//! run) are shown as a mean with its 95 % interval: the interval is what tells a target met
//! or missed from one this machine's noise cannot decide. Ratios are averaged on a log scale
//! (a geometric mean), so 0.5x and 2x cancel; differences on a linear one.
use serde_json::{Value, json};

/// Median, min and max of one figure over the repeats, and its mean with a 95 % interval.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stat {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) n: usize,
    /// Arithmetic mean, or geometric for a [`Stat::of_ratios`].
    pub(super) mean: f64,
    /// Student-t 95 % confidence interval of `mean`; none below two values.
    pub(super) ci: Option<(f64, f64)>,
}

impl Stat {
    pub(super) fn of(values: &[f64]) -> Option<Stat> {
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
        let (mean, ci) = mean_ci(&v);
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
            mean,
            ci,
        })
    }

    /// Like [`Stat::of`] for ratios (positive values): mean and interval on the log scale.
    pub(super) fn of_ratios(values: &[f64]) -> Option<Stat> {
        let positive: Vec<f64> = values
            .iter()
            .copied()
            .filter(|x| x.is_finite() && *x > 0.0)
            .collect();
        let mut s = Stat::of(&positive)?;
        let logs: Vec<f64> = positive.iter().map(|x| x.ln()).collect();
        let (mean, ci) = mean_ci(&logs);
        s.mean = mean.exp();
        s.ci = ci.map(|(lo, hi)| (lo.exp(), hi.exp()));
        Some(s)
    }

    pub(super) fn json(&self) -> Value {
        let mut j = json!({
            "median": round3(self.median),
            "min": round3(self.min),
            "max": round3(self.max),
            "n": self.n,
        });
        if self.n > 1 {
            j["mean"] = json!(round3(self.mean));
            j["ci95"] = json!(self.ci.map(|(lo, hi)| [round3(lo), round3(hi)]));
        }
        j
    }

    /// Where a bound stands against this figure's interval. `higher_is_better`: the target is
    /// `figure >= bound`, else `figure <= bound`.
    pub(super) fn verdict(&self, bound: f64, higher_is_better: bool) -> Verdict {
        let Some((lo, hi)) = self.ci else {
            return Verdict::Inconclusive;
        };
        let (good, bad) = if higher_is_better {
            (lo >= bound, hi < bound)
        } else {
            (hi <= bound, lo > bound)
        };
        if good {
            Verdict::Met
        } else if bad {
            Verdict::Missed
        } else {
            Verdict::Inconclusive
        }
    }
}

/// A target against the interval of the figure it is judged on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The whole interval is on the right side of the bound.
    Met,
    /// The whole interval is on the wrong side.
    Missed,
    /// The interval straddles the bound, or there is no interval (one sample).
    Inconclusive,
}

impl Verdict {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::Inconclusive => "inconclusive",
        }
    }

    /// Every part must be met for the whole to be; one miss is a miss.
    pub(super) fn all(parts: &[Verdict]) -> Verdict {
        if parts.contains(&Verdict::Missed) {
            Verdict::Missed
        } else if parts.iter().all(|v| *v == Verdict::Met) {
            Verdict::Met
        } else {
            Verdict::Inconclusive
        }
    }
}

/// Mean and Student-t 95 % interval of the mean (none for fewer than two values).
fn mean_ci(v: &[f64]) -> (f64, Option<(f64, f64)>) {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return (mean, None);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t975(n - 1) * (var / n as f64).sqrt();
    (mean, Some((mean - half, mean + half)))
}

/// The 97.5th percentile of Student's t with `df` degrees of freedom (two-sided 95 %).
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => T[df - 1],
        31..=60 => 2.000,
        61..=120 => 1.980,
        _ => 1.960,
    }
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Microseconds: one decimal below 100, whole above.
pub(super) fn us(x: f64) -> String {
    if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// `median (min-max)` with `decimals`, or just the median for a single repeat.
pub(super) fn spread(s: Stat, decimals: usize) -> String {
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

/// A paired figure: `mean [low-high]`, the mean with its 95 % interval, or the one value.
pub(super) fn interval(s: Stat, decimals: usize) -> String {
    match s.ci {
        // A figure against itself (direct x direct) has nothing to show.
        Some((lo, hi)) if hi - lo > 0.0 => {
            format!("{:.d$} [{lo:.d$}-{hi:.d$}]", s.mean, d = decimals)
        }
        _ => format!("{:.d$}", s.mean, d = decimals),
    }
}

/// Like [`interval`], every number with its sign.
pub(super) fn signed_interval(s: Stat, decimals: usize) -> String {
    match s.ci {
        Some((lo, hi)) => format!("{:+.d$} [{lo:+.d$}..{hi:+.d$}]", s.mean, d = decimals),
        None => format!("{:+.d$}", s.mean, d = decimals),
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
        assert_eq!(interval(one, 1), "1.5");
        let three = Stat::of(&[-2.0, 1.0, 4.0]).expect("values");
        assert_eq!(spread(three, 0), "1 (-2-4)");
        // mean 1, sd 3, t(2) 4.303: 1 +- 7.45
        assert_eq!(signed_interval(three, 1), "+1.0 [-6.5..+8.5]");
    }

    #[test]
    fn ratios_average_on_a_log_scale() {
        let s = Stat::of_ratios(&[0.5, 2.0]).expect("values");
        assert!((s.mean - 1.0).abs() < 1e-12);
        let (lo, hi) = s.ci.expect("two values");
        assert!((lo * hi - 1.0).abs() < 1e-9, "symmetric in log: {lo} {hi}");
    }

    #[test]
    fn verdicts_follow_the_interval() {
        let tight = Stat::of(&[1.00, 1.01, 1.02]).expect("values");
        assert_eq!(tight.verdict(0.95, true), Verdict::Met);
        assert_eq!(tight.verdict(1.10, true), Verdict::Missed);
        assert_eq!(tight.verdict(1.01, true), Verdict::Inconclusive);
        assert_eq!(tight.verdict(1.10, false), Verdict::Met);
        let one = Stat::of(&[5.0]).expect("value");
        assert_eq!(one.verdict(1.0, true), Verdict::Inconclusive);
        assert_eq!(
            Verdict::all(&[Verdict::Met, Verdict::Inconclusive]),
            Verdict::Inconclusive
        );
        assert_eq!(
            Verdict::all(&[Verdict::Inconclusive, Verdict::Missed]),
            Verdict::Missed
        );
    }
}
