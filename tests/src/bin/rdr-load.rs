//! `rdr-load`: the HTTP load generator (and the benchmark server) of `cargo xtask bench`.
//!
//! Why a small generator of our own, built on hyper's client and the `hdrhistogram` crate,
//! rather than a packaged tool:
//!
//! - **No coordinated omission.** Every request has a *scheduled* send time on a fixed-rate
//!   timetable, and its latency is measured from that time, not from when it was actually sent.
//!   A server that stalls therefore shows every request that should have been sent during the
//!   stall as late, instead of the client politely waiting and under-reporting the tail.
//!   `wrk`, the generator the distribution packages, is closed-loop and measures exactly that
//!   wrong way; `wrk2`, which fixed it, is unmaintained and not packaged.
//! - **Pacing at microsecond precision.** tokio's timer wheel, which async generators pace
//!   with, has millisecond resolution: 5 000 req/s would go out as bursts of five every
//!   millisecond. rdr-load paces from a periodic timerfd (nanosecond resolution) or, with
//!   `--spin` (what the benchmark uses, the client having a core to itself), by reading the
//!   clock on every turn of its event loop: requests leave within a few microseconds of their
//!   scheduled time, and the remaining lag is measured and reported (`lag_p50_us`,
//!   `lag_p99_us`). Spinning also keeps the client's own wake-up latency (tens of
//!   microseconds on a virtual machine) out of every path's figures.
//! - **Every figure the benchmark needs, one JSON line each**: latency at a fixed rate over
//!   keep-alive connections or a new connection per request (`rate`), connections per second
//!   with connect + one request + close (`connect`), and the highest rate whose p99 stays
//!   under a bound (`max`). Each response's `x-served-by` is checked, so a run that silently
//!   took the wrong path (the baseline instead of the fork) counts errors, not numbers.
//! - **Maintained parts only**: hyper is the HTTP stack the daemon's router already uses, and
//!   `hdrhistogram` is the Rust port of HdrHistogram (3 significant digits, 1 ns to 60 s). The
//!   whole generator is this file.
//!
//! It runs inside a pod (the harness enters the pod's network namespace and the node's cgroup,
//! so the daemon's programs see its sockets) and pins itself to one CPU with `--cpu`. One tokio
//! current-thread runtime drives all connections: on a dedicated core that is the cheapest
//! client, and it keeps the client's own cost identical across the paths being compared.
//! `serve` is the other end: one thread, a fixed answer, the same for every path.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use http::header::HOST;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(
    name = "rdr-load",
    about = "Open-loop HTTP/1.1 load generator for `cargo xtask bench`; prints one JSON object"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct TargetArgs {
    /// Server address: IP:PORT or [IPv6]:PORT.
    #[arg(long)]
    addr: SocketAddr,
    /// Request path (GET).
    #[arg(long, default_value = "/")]
    path: String,
    /// Extra request header NAME=VALUE (repeatable), e.g. baggage=sd-routing-key=pr-1.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_kv)]
    header: Vec<(String, String)>,
    /// Count a response whose `x-served-by` is not NAME as an error.
    #[arg(long, value_name = "NAME")]
    expect_server: Option<String>,
    /// Bound of one request (connect included); a slower one counts as an error.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Pin the generator (all its threads) to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Never let the generator's thread sleep: poll for events continuously. With a core of
    /// its own, this takes the client's wake-up latency out of every measurement.
    #[arg(long)]
    spin: bool,
}

#[derive(Args, Clone, Copy)]
struct RateArgs {
    /// Keep-alive connections the requests are spread over (ignored with --new-conn).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// A new connection per request (connect, request, close) instead of keep-alive.
    #[arg(long)]
    new_conn: bool,
    /// New-connection mode: most requests in flight at once; beyond it, requests wait (and
    /// their latency keeps counting from the scheduled time).
    #[arg(long, default_value_t = 512)]
    max_in_flight: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Latency at a fixed request rate (open loop, measured from the scheduled send time).
    Rate {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        rate_args: RateArgs,
        /// Requests per second.
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
        /// Requests scheduled in this first stretch run but are not recorded.
        #[arg(long, default_value_t = 500)]
        warmup_ms: u64,
    },
    /// Connections per second: CONCURRENCY workers each connect, send one request, read the
    /// response and close, in a loop (closed loop: this is a throughput figure).
    Connect {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 500)]
        warmup_ms: u64,
    },
    /// The benchmark server: answers every request with 200, `x-served-by: NAME` and a fixed
    /// body, on [::]:PORT (dual-stack), keep-alive or not as the client asks. Prints `ready`.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        /// Response body size.
        #[arg(long, default_value_t = 128)]
        body_bytes: usize,
        /// Pin the server to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Highest fixed rate whose p99 stays within --p99-us: a closed-loop probe finds the
    /// saturation rate X, then --steps bisection steps of fixed-rate runs search [0, X]. A
    /// step that misses the bound is tried again (--retries) before it counts as a miss: one
    /// multi-millisecond stall of a virtual machine can push the p99 of a one-second run over
    /// a millisecond at any rate, and bisection cannot recover from a false miss.
    Max {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        rate_args: RateArgs,
        #[arg(long, default_value_t = 1000)]
        p99_us: u64,
        #[arg(long, default_value_t = 6)]
        steps: u32,
        /// Length of each step (the probe included).
        #[arg(long, default_value_t = 1000)]
        step_ms: u64,
        #[arg(long, default_value_t = 300)]
        step_warmup_ms: u64,
        #[arg(long, default_value_t = 1)]
        retries: u32,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

// ---------------------------------------------------------------- target and one exchange

/// One client connection: the request handle and the task driving the socket.
type Conn = (
    http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
);

struct Target {
    addr: SocketAddr,
    path: String,
    host: HeaderValue,
    headers: Vec<(HeaderName, HeaderValue)>,
    expect_server: Option<String>,
    timeout: Duration,
    spin: bool,
}

impl Target {
    fn new(a: &TargetArgs) -> Result<Target> {
        let headers = a
            .header
            .iter()
            .map(|(k, v)| {
                Ok((
                    HeaderName::from_bytes(k.as_bytes())
                        .with_context(|| format!("bad header name {k:?}"))?,
                    HeaderValue::from_str(v).with_context(|| format!("bad header value {v:?}"))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Target {
            addr: a.addr,
            path: a.path.clone(),
            host: HeaderValue::from_str(&a.addr.to_string()).context("host header")?,
            headers,
            expect_server: a.expect_server.clone(),
            timeout: Duration::from_millis(a.timeout_ms.max(1)),
            spin: a.spin,
        })
    }

    fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = self
            .path
            .parse()
            .unwrap_or_else(|_| "/".parse().expect("/"));
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        for (k, v) in &self.headers {
            h.append(k.clone(), v.clone());
        }
        req
    }

    /// A new HTTP/1.1 connection; its driver runs as its own task and ends with the socket.
    /// `reset_on_close`: see [`Target::one_shot`].
    async fn open(&self, reset_on_close: bool) -> Result<Conn> {
        let stream = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connect {}", self.addr))?;
        // Small requests must not wait for Nagle behind the previous response's ACK.
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        if reset_on_close {
            // Zero linger never blocks: close sends a reset at once.
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .context("SO_LINGER")?;
        }
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .context("handshake")?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, driver))
    }

    /// Sends one request and reads the whole response; anything but a 200 from the expected
    /// server is an error.
    async fn exchange(&self, sender: &mut http1::SendRequest<Empty<Bytes>>) -> Result<()> {
        sender.ready().await.context("connection not ready")?;
        let resp = sender
            .send_request(self.request())
            .await
            .context("request")?;
        let status = resp.status();
        let served_by = resp.headers().get("x-served-by").cloned();
        resp.into_body().collect().await.context("response body")?;
        if status != StatusCode::OK {
            bail!("status {status}");
        }
        if let Some(want) = &self.expect_server
            && served_by.as_ref().map(HeaderValue::as_bytes) != Some(want.as_bytes())
        {
            bail!(
                "served by {:?}, expected {want:?}",
                served_by.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            );
        }
        Ok(())
    }

    /// Connect, one request, read the whole response, close.
    ///
    /// The close is a reset (SO_LINGER 0, the connection's task dropped before hyper can
    /// shut the socket down gracefully), so neither end keeps the connection in TIME_WAIT. At
    /// thousands of connections per second, TIME_WAIT entries would pile up by the hundred
    /// thousand over a benchmark, and every later run would pay for the ones before it (longer
    /// hash chains, SYNs recycling TIME_WAIT 4-tuples, conntrack filling up behind iptables):
    /// each run must start from the same state. No `Connection: close` either, for the same
    /// reason: it makes the server close first, and the server would keep the TIME_WAIT.
    async fn one_shot(&self) -> Result<()> {
        let (mut sender, driver) = self.open(true).await?;
        let res = self.exchange(&mut sender).await;
        // Aborted while the request handle still lives, so the connection is idle, not
        // shutting down: dropping it closes the socket, which sends the reset.
        driver.abort();
        drop(sender);
        let _ = driver.await;
        res
    }
}

// ---------------------------------------------------------------- measurements

/// Latency from the scheduled time to the end of the response, and the pacing lag (scheduled
/// time to the moment a connection picked the request up).
struct Stats {
    latency: Histogram<u64>,
    lag: Histogram<u64>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

impl Stats {
    fn new() -> Stats {
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

    fn record(&mut self, scheduled: Instant, picked: Instant, done: Instant, res: &Result<()>) {
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

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    round1(h.value_at_quantile(q) as f64 / 1000.0)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn lock(stats: &Mutex<Stats>) -> MutexGuard<'_, Stats> {
    // Plain counters: still valid after a panic elsewhere.
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

/// The JSON summary shared by every mode. The achieved rate divides by the window, or by the
/// time until the last response if that ran past it (an overloaded server finishes late).
fn summary(st: &Stats, measure_from: Instant, window: Duration) -> Value {
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

// ---------------------------------------------------------------- the timetable

/// Scheduled send times, filled by the pacer thread and taken by whichever connection is free.
/// A request that finds every connection busy waits here, and its latency keeps counting.
struct Queue {
    items: Mutex<VecDeque<Instant>>,
    closed: AtomicBool,
    notify: Notify,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            items: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    fn items(&self) -> MutexGuard<'_, VecDeque<Instant>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, t: Instant) {
        self.items().push_back(t);
        self.notify.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    async fn pop(&self) -> Option<Instant> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before looking, so a push between the look and the await still wakes.
            notified.as_mut().enable();
            if let Some(t) = self.items().pop_front() {
                return Some(t);
            }
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            notified.await;
        }
    }
}

/// The pacer: pushes `count` send times, `interval` apart from `start`, each at its time.
///
/// It is a periodic kernel timer (timerfd) read by a task of the generator's own runtime: the
/// timer has nanosecond resolution (tokio's wheel has millisecond), and no second thread has
/// to preempt the one sending requests to hand over the send times.
///
/// With `spin`, the clock is read on every turn of the runtime instead: even a timerfd is only
/// as punctual as the timer interrupt, which on a virtual machine arrives tens of microseconds
/// late.
async fn pace(
    queue: Arc<Queue>,
    start: Instant,
    interval_ns: u64,
    count: u64,
    spin: bool,
) -> Result<()> {
    let res = if spin {
        pace_spinning(&queue, start, interval_ns, count).await;
        Ok(())
    } else {
        pace_inner(&queue, start, interval_ns, count).await
    };
    // Closed on every path, so the connections finish instead of waiting for more work.
    queue.close();
    res
}

async fn pace_spinning(queue: &Queue, start: Instant, interval_ns: u64, count: u64) {
    let due = |i: u64| start + Duration::from_nanos(interval_ns.saturating_mul(i));
    let mut sent = 0u64;
    while sent < count {
        let now = Instant::now();
        while sent < count && due(sent) <= now {
            queue.push(due(sent));
            sent += 1;
        }
        tokio::task::yield_now().await;
    }
}

async fn pace_inner(queue: &Queue, start: Instant, interval_ns: u64, count: u64) -> Result<()> {
    let timer = timerfd(start.saturating_duration_since(Instant::now()), interval_ns)?;
    // SAFETY: the OwnedFd is a valid open timerfd that the AsyncFd owns until it is dropped.
    let timer = unsafe { AsyncFd::register_with_interest(timer, Interest::READABLE) }
        .context("registering timerfd")?;
    let mut sent = 0u64;
    while sent < count {
        let mut guard = timer.readable().await.context("waiting on timerfd")?;
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a buffer of 8 from our own open, non-blocking timerfd.
        let read = guard.try_io(|fd| {
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
        match read {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e).context("reading timerfd"),
            Err(_would_block) => continue,
        }
        // Expirations since the last read: after a busy stretch, all the overdue send times
        // go out at once, each still carrying its own scheduled time.
        let expirations = u64::from_ne_bytes(buf);
        for _ in 0..expirations.min(count - sent) {
            queue.push(start + Duration::from_nanos(interval_ns.saturating_mul(sent)));
            sent += 1;
        }
    }
    Ok(())
}

/// A periodic CLOCK_MONOTONIC timerfd (the clock `Instant` uses): first expiry after `first`,
/// then every `interval_ns`.
fn timerfd(first: Duration, interval_ns: u64) -> Result<OwnedFd> {
    let ts = |ns: u64| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts(interval_ns.max(1)),
        // Zero would disarm the timer.
        it_value: ts(nanos(first)),
    };
    // SAFETY: plain syscalls; the fd is owned right after creation and closed on drop.
    unsafe {
        let fd = libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("timerfd_create");
        }
        let fd = OwnedFd::from_raw_fd(fd);
        if libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error()).context("timerfd_settime");
        }
        Ok(fd)
    }
}

// ---------------------------------------------------------------- modes

struct RatePlan {
    rate: f64,
    duration: Duration,
    warmup: Duration,
}

/// One fixed-rate run; returns its statistics and the measured window.
async fn run_rate(target: &Arc<Target>, args: RateArgs, plan: &RatePlan) -> Result<Value> {
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

async fn within<T>(limit: Duration, fut: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("timed out after {} ms", limit.as_millis())),
    }
}

/// Closed loop: `workers` tasks each repeat `op` until the end; returns the stats of the
/// operations that started after the warmup.
async fn closed_loop(
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
async fn spin(stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        tokio::task::yield_now().await;
    }
}

async fn run(cmd: Cmd) -> Result<Value> {
    let spinning = match &cmd {
        Cmd::Rate { target, .. } | Cmd::Connect { target, .. } | Cmd::Max { target, .. } => {
            target.spin
        }
        Cmd::Serve { .. } => false,
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

async fn run_cmd(cmd: Cmd) -> Result<Value> {
    match cmd {
        Cmd::Serve {
            name,
            port,
            body_bytes,
            ..
        } => serve(&name, port, body_bytes).await.map(|()| Value::Null),
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

struct Search {
    p99_us: u64,
    steps: u32,
    retries: u32,
    duration: Duration,
    warmup: Duration,
}

/// Saturation probe, then bisection on the fixed rate. A step passes when it had no errors, its
/// p99 is within the bound and it completed (nearly) the scheduled rate.
async fn max_rate(t: &Arc<Target>, args: RateArgs, search: &Search) -> Result<Value> {
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

// ---------------------------------------------------------------- server

/// One thread serves every connection: pinned to its core, the server never waits for a
/// sibling thread to be scheduled, so its own latency tail stays out of the figures (the
/// general-purpose rdr-http test server runs two workers, which on one core hand work to each
/// other at the scheduler's pace).
async fn serve(name: &str, port: u16, body_bytes: usize) -> Result<()> {
    let served_by = HeaderValue::from_str(name).context("server name is not a header value")?;
    let body = Bytes::from(vec![b'x'; body_bytes]);
    let listener = listen(port)?;
    println!("ready");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("rdr-load serve: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (served_by, body) = (served_by.clone(), body.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (served_by, body) = (served_by.clone(), body.clone());
                async move {
                    // Requests carry no body here; whatever comes is read and dropped.
                    let _ = req.into_body().collect().await;
                    let mut resp = http::Response::new(http_body_util::Full::new(body));
                    resp.headers_mut().insert("x-served-by", served_by);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            // Client resets at the end of a run are normal: not worth a line each.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn listen(port: u16) -> Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock =
        Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).context("socket(AF_INET6)")?;
    sock.set_only_v6(false).context("IPV6_V6ONLY=0")?;
    // Connection-rate runs leave many server sockets in TIME_WAIT; a restart must still bind.
    sock.set_reuse_address(true).context("SO_REUSEADDR")?;
    let addr = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port);
    sock.bind(&addr.into())
        .with_context(|| format!("bind [::]:{port}"))?;
    // Deep enough for the connection-rate runs' bursts of SYNs.
    sock.listen(4096)
        .with_context(|| format!("listen on port {port}"))?;
    sock.set_nonblocking(true).context("O_NONBLOCK")?;
    tokio::net::TcpListener::from_std(sock.into()).context("registering the listener")
}

// ---------------------------------------------------------------- process

fn pin(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) applies to this thread, and every
    // thread started afterwards (the runtime's, the pacer) inherits it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Longest the whole command may run; past it the process exits on its own, so a wedged run
/// can never hold a benchmark up.
fn hard_limit(cmd: &Cmd) -> Option<Duration> {
    let ms = match cmd {
        Cmd::Serve { .. } => return None,
        Cmd::Rate {
            target,
            duration_ms,
            warmup_ms,
            ..
        }
        | Cmd::Connect {
            target,
            duration_ms,
            warmup_ms,
            ..
        } => duration_ms + warmup_ms + 2 * target.timeout_ms,
        Cmd::Max {
            target,
            steps,
            step_ms,
            step_warmup_ms,
            retries,
            ..
        } => {
            u64::from(steps * (retries + 1) + 1)
                * (step_ms + step_warmup_ms + 2 * target.timeout_ms)
                + target.timeout_ms
        }
    };
    Some(Duration::from_millis(ms + 10_000))
}

fn cpu(cmd: &Cmd) -> Option<usize> {
    match cmd {
        Cmd::Rate { target, .. } | Cmd::Connect { target, .. } | Cmd::Max { target, .. } => {
            target.cpu
        }
        Cmd::Serve { cpu, .. } => *cpu,
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::FAILURE;
        }
    };
    if let Some(cpu) = cpu(&cli.cmd)
        && let Err(e) = pin(cpu)
    {
        eprintln!("rdr-load: {e:#}");
        return ExitCode::FAILURE;
    }
    if let Some(limit) = hard_limit(&cli.cmd) {
        thread::spawn(move || {
            thread::sleep(limit);
            eprintln!("rdr-load: still running after {limit:?}; giving up");
            std::process::exit(3);
        });
    }
    let res = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| rt.block_on(run(cli.cmd)));
    match res {
        Ok(Value::Null) => ExitCode::SUCCESS,
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rdr-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}
