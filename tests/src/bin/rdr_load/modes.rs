//! The measurements: fixed rate, closed loop, connections per second, and the search for
//! the highest rate under a p99 bound.
use super::*;

pub(super) struct RatePlan {
    pub(super) rate: f64,
    pub(super) duration: Duration,
    pub(super) warmup: Duration,
}

/// One fixed-rate run; returns its statistics and the measured window.
pub(super) async fn run_rate(
    target: &Arc<Target>,
    args: RateArgs,
    plan: &RatePlan,
) -> Result<Value> {
    if !(plan.rate > 0.0 && plan.rate.is_finite()) {
        bail!("--rate must be positive");
    }
    let interval_ns = (1e9 / plan.rate).round().max(1.0) as u64;
    // Send times are start + i * interval: i < warm fall in the warm-up, i < total in the run.
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let warm = ns(plan.warmup).div_ceil(interval_ns);
    let total = ns(plan.warmup + plan.duration).div_ceil(interval_ns);
    let stats = Arc::new(Mutex::new(Stats::new()));
    let queue = Arc::new(Queue::new());

    // Keep-alive connections are open before the first scheduled time: the run measures
    // requests, not connection setup.
    let mut senders = Vec::new();
    if !args.new_conn {
        for _ in 0..args.connections.max(1) {
            let opened = tokio::time::timeout(target.timeout, target.open(false)).await;
            match opened {
                Ok(Ok(s)) => senders.push(s),
                Ok(Err(e)) => return Err(e.context("opening the keep-alive connections")),
                Err(_) => bail!("opening the keep-alive connections: timed out"),
            }
        }
    }
    let start = Instant::now() + Duration::from_millis(5);
    let measure_from = start + plan.warmup;
    let pacer = tokio::spawn(pace(queue.clone(), start, interval_ns, total, target.spin));

    let mut workers = JoinSet::new();
    if args.new_conn {
        let (target, queue, stats) = (target.clone(), queue.clone(), stats.clone());
        let limit = Arc::new(Semaphore::new(args.max_in_flight.max(1)));
        workers.spawn(async move {
            let mut inflight = JoinSet::new();
            while let Some(at) = queue.pop().await {
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    break;
                };
                let (target, stats) = (target.clone(), stats.clone());
                inflight.spawn(async move {
                    let picked = Instant::now();
                    let res = within(target.timeout, target.one_shot()).await;
                    drop(permit);
                    if at >= measure_from {
                        lock(&stats).record(at, picked, Instant::now(), &res);
                    }
                });
                // Reap finished tasks as we go so the set stays small.
                while inflight.try_join_next().is_some() {}
            }
            while inflight.join_next().await.is_some() {}
        });
    } else {
        for (sender, driver) in senders {
            let (target, queue, stats) = (target.clone(), queue.clone(), stats.clone());
            workers.spawn(async move {
                let mut conn: Option<Conn> = Some((sender, driver));
                while let Some(at) = queue.pop().await {
                    let picked = Instant::now();
                    let res = within(target.timeout, async {
                        if conn.as_ref().is_none_or(|(s, _)| s.is_closed()) {
                            conn = Some(target.open(false).await?);
                        }
                        let (sender, _) = conn.as_mut().expect("just opened");
                        target.exchange(sender).await
                    })
                    .await;
                    if res.is_err() {
                        // Whatever state the connection is in, start the next one clean.
                        if let Some((_, driver)) = conn.take() {
                            driver.abort();
                        }
                    }
                    if at >= measure_from {
                        lock(&stats).record(at, picked, Instant::now(), &res);
                    }
                }
            });
        }
    }

    // Wait for the timetable to end, then give stragglers one request timeout to finish.
    let end = start + plan.warmup + plan.duration;
    tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
    let drained = tokio::time::timeout(target.timeout + Duration::from_millis(500), async {
        while workers.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    workers.abort_all();
    pacer.abort();
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_millis(100), pacer).await {
        return Err(e.context("pacing the requests"));
    }

    let scheduled = total - warm;
    let mut st = lock(&stats);
    let unfinished = scheduled.saturating_sub(st.ok + st.errors);
    if unfinished > 0 {
        st.errors += unfinished;
        st.first_error.get_or_insert_with(|| {
            format!("{unfinished} requests unfinished at the end of the run")
        });
    }
    let mut out = summary(&st, measure_from, plan.duration);
    out["rate"] = json!(plan.rate);
    out["scheduled"] = json!(scheduled);
    out["drained"] = json!(drained);
    Ok(out)
}

pub(super) async fn within<T>(limit: Duration, fut: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("timed out after {} ms", limit.as_millis())),
    }
}

/// Closed loop: `workers` tasks each repeat `op` until the end; returns the stats of the
/// operations that started after the warmup.
pub(super) async fn closed_loop(
    target: &Arc<Target>,
    workers: usize,
    duration: Duration,
    warmup: Duration,
    keep_alive: bool,
) -> Result<Value> {
    let stats = Arc::new(Mutex::new(Stats::new()));
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut set = JoinSet::new();
    for _ in 0..workers.max(1) {
        let (target, stats) = (target.clone(), stats.clone());
        set.spawn(async move {
            let mut conn: Option<Conn> = None;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let res = if keep_alive {
                    let res = within(target.timeout, async {
                        if conn.as_ref().is_none_or(|(s, _)| s.is_closed()) {
                            conn = Some(target.open(false).await?);
                        }
                        let (sender, _) = conn.as_mut().expect("just opened");
                        target.exchange(sender).await
                    })
                    .await;
                    if res.is_err() {
                        conn = None;
                    }
                    res
                } else {
                    within(target.timeout, target.one_shot()).await
                };
                if t0 >= measure_from {
                    lock(&stats).record(t0, t0, Instant::now(), &res);
                }
                if res.is_err() {
                    // A refused or reset connection must not turn into a busy loop.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
    }
    let bound = duration + warmup + target.timeout + Duration::from_millis(500);
    if tokio::time::timeout(bound, async { while set.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        set.abort_all();
    }
    let st = lock(&stats);
    let mut out = summary(&st, measure_from, duration);
    out["workers"] = json!(workers);
    Ok(out)
}

/// Keeps the runtime busy so it never parks in `epoll_wait` with a timeout: `yield_now`
/// defers the task until the I/O driver has been polled, so every turn of this loop is one
/// non-blocking poll for socket and timer events.
pub(super) async fn spin(stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        tokio::task::yield_now().await;
    }
}

pub(super) async fn run(cmd: Cmd) -> Result<Value> {
    let spinning = match &cmd {
        Cmd::Rate { target, .. } | Cmd::Connect { target, .. } | Cmd::Max { target, .. } => {
            target.spin
        }
        Cmd::Serve { .. } | Cmd::Udp { .. } => false,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = spinning.then(|| tokio::spawn(spin(stop.clone())));
    let result = run_cmd(cmd).await;
    stop.store(true, Ordering::Relaxed);
    if let Some(spinner) = spinner {
        let _ = spinner.await;
    }
    result
}

pub(super) async fn run_cmd(cmd: Cmd) -> Result<Value> {
    match cmd {
        Cmd::Serve {
            name,
            port,
            body_bytes,
            udp,
            ..
        } => serve(&name, port, body_bytes, udp)
            .await
            .map(|()| Value::Null),
        // Blocking socket calls on the runtime's only thread: nothing else runs on it here.
        Cmd::Udp { udp } => run_udp(&udp),
        Cmd::Rate {
            target,
            rate_args,
            rate,
            duration_ms,
            warmup_ms,
        } => {
            let t = Arc::new(Target::new(&target)?);
            let plan = RatePlan {
                rate,
                duration: Duration::from_millis(duration_ms),
                warmup: Duration::from_millis(warmup_ms),
            };
            let mut out = run_rate(&t, rate_args, &plan).await?;
            out["mode"] = json!("rate");
            out["new_conn"] = json!(rate_args.new_conn);
            out["connections"] = json!(rate_args.connections);
            Ok(out)
        }
        Cmd::Connect {
            target,
            concurrency,
            duration_ms,
            warmup_ms,
        } => {
            let t = Arc::new(Target::new(&target)?);
            let mut out = closed_loop(
                &t,
                concurrency,
                Duration::from_millis(duration_ms),
                Duration::from_millis(warmup_ms),
                false,
            )
            .await?;
            out["mode"] = json!("connect");
            out["conn_rate"] = out["achieved_rate"].clone();
            Ok(out)
        }
        Cmd::Max {
            target,
            rate_args,
            p99_us,
            steps,
            step_ms,
            step_warmup_ms,
            retries,
        } => {
            let t = Arc::new(Target::new(&target)?);
            let search = Search {
                p99_us,
                steps,
                retries,
                duration: Duration::from_millis(step_ms),
                warmup: Duration::from_millis(step_warmup_ms),
            };
            max_rate(&t, rate_args, &search).await
        }
    }
}

pub(super) struct Search {
    pub(super) p99_us: u64,
    pub(super) steps: u32,
    pub(super) retries: u32,
    pub(super) duration: Duration,
    pub(super) warmup: Duration,
}

/// Saturation probe, then bisection on the fixed rate. A step passes when it had no errors, its
/// p99 is within the bound and it completed (nearly) the scheduled rate.
pub(super) async fn max_rate(t: &Arc<Target>, args: RateArgs, search: &Search) -> Result<Value> {
    let concurrency = if args.new_conn {
        args.max_in_flight
    } else {
        args.connections
    };
    let probe = closed_loop(
        t,
        concurrency,
        search.duration,
        search.warmup,
        !args.new_conn,
    )
    .await?;
    let saturation = probe["achieved_rate"].as_f64().unwrap_or(0.0);
    if saturation <= 0.0 {
        bail!(
            "saturation probe completed no request: {}",
            probe["first_error"]
        );
    }
    let passes = |step: &Value, rate: f64| {
        step["errors"].as_u64() == Some(0)
            && step["p99_us"]
                .as_f64()
                .is_some_and(|p| p <= search.p99_us as f64)
            && step["achieved_rate"]
                .as_f64()
                .is_some_and(|a| a >= 0.97 * rate)
    };
    let (mut lo, mut hi) = (0.0_f64, saturation);
    let mut best: Option<Value> = None;
    let mut log = Vec::new();
    for _ in 0..search.steps {
        let rate = ((lo + hi) / 2.0).round().max(1.0);
        let plan = RatePlan {
            rate,
            duration: search.duration,
            warmup: search.warmup,
        };
        let mut tries = 0;
        let (step, pass) = loop {
            tries += 1;
            let step = run_rate(t, args, &plan).await?;
            let pass = passes(&step, rate);
            if pass || tries > search.retries {
                break (step, pass);
            }
        };
        log.push(json!({
            "rate": rate,
            "pass": pass,
            "tries": tries,
            "p50_us": step["p50_us"],
            "p99_us": step["p99_us"],
            "achieved_rate": step["achieved_rate"],
            "errors": step["errors"],
        }));
        if pass {
            lo = rate;
            best = Some(step);
        } else {
            hi = rate;
        }
    }
    Ok(json!({
        "mode": "max",
        "p99_bound_us": search.p99_us,
        "max_rate": lo,
        "saturation_rate": saturation,
        "saturation_p50_us": probe["p50_us"],
        "saturation_p99_us": probe["p99_us"],
        "at_max": best.unwrap_or_else(|| json!({})),
        "steps": log,
        "connections": args.connections,
    }))
}
