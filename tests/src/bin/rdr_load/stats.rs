//! Latency and lag histograms, and the JSON summary of a run.
use super::*;

/// Latency from the scheduled time to the end of the response, and the pacing lag (scheduled
/// time to the moment a connection picked the request up).
pub(super) struct Stats {
    pub(super) latency: Histogram<u64>,
    pub(super) lag: Histogram<u64>,
    pub(super) ok: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    pub(super) last_done: Option<Instant>,
}

impl Stats {
    pub(super) fn new() -> Stats {
        let hist = || Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
        Stats {
            latency: hist(),
            lag: hist(),
            ok: 0,
            errors: 0,
            first_error: None,
            last_done: None,
        }
    }

    pub(super) fn record(
        &mut self,
        scheduled: Instant,
        picked: Instant,
        done: Instant,
        res: &Result<()>,
    ) {
        self.last_done = Some(self.last_done.map_or(done, |d| d.max(done)));
        let _ = self
            .lag
            .record(nanos(picked.saturating_duration_since(scheduled)));
        match res {
            Ok(()) => {
                self.ok += 1;
                self.latency
                    .saturating_record(nanos(done.saturating_duration_since(scheduled)));
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

pub(super) fn us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    round1(h.value_at_quantile(q) as f64 / 1000.0)
}

pub(super) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(super) fn lock(stats: &Mutex<Stats>) -> MutexGuard<'_, Stats> {
    // Plain counters: still valid after a panic elsewhere.
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

/// The JSON summary shared by every mode. The achieved rate divides by the window, or by the
/// time until the last response if that ran past it (an overloaded server finishes late).
pub(super) fn summary(st: &Stats, measure_from: Instant, window: Duration) -> Value {
    let measured = st
        .last_done
        .map_or(window, |d| {
            window.max(d.saturating_duration_since(measure_from))
        })
        .as_secs_f64()
        .max(1e-9);
    json!({
        "ok": st.ok,
        "errors": st.errors,
        "first_error": st.first_error,
        "achieved_rate": round1(st.ok as f64 / measured),
        "p50_us": us(&st.latency, 0.50),
        "p90_us": us(&st.latency, 0.90),
        "p99_us": us(&st.latency, 0.99),
        "p999_us": us(&st.latency, 0.999),
        "max_us": us(&st.latency, 1.0),
        "mean_us": round1(if st.latency.is_empty() { 0.0 } else { st.latency.mean() / 1000.0 }),
        "lag_p50_us": us(&st.lag, 0.50),
        "lag_p99_us": us(&st.lag, 0.99),
    })
}
