//! One figure over the repeats: its median and range, and how the report writes it.
use serde_json::{Value, json};

/// Median, min and max of one figure over the repeats.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stat {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) n: usize,
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
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    pub(super) fn json(&self) -> Value {
        json!({ "median": round3(self.median), "min": round3(self.min), "max": round3(self.max), "n": self.n })
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

/// Like [`spread`], every number with its sign.
pub(super) fn signed_spread(s: Stat, decimals: usize) -> String {
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
