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
//!   `udp` is the datagram counterpart the kernel-cost runs need: request/response exchanges
//!   over unconnected (`sendto`/`recvfrom`) or connected sockets, each reply checked for the
//!   server's name and for coming from the address dialed.
//! - **Maintained parts only**: hyper is the HTTP stack the daemon's router already uses, and
//!   `hdrhistogram` is the Rust port of HdrHistogram (3 significant digits, 1 ns to 60 s). The
//!   whole generator is this file and the modules under `rdr_load/`.
//!
//! It runs inside a pod (the harness enters the pod's network namespace and the node's cgroup,
//! so the daemon's programs see its sockets) and pins itself to one CPU with `--cpu`. One tokio
//! current-thread runtime drives all connections: on a dedicated core that is the cheapest
//! client, and it keeps the client's own cost identical across the paths being compared.
//! `serve` is the other end: one thread, a fixed answer, the same for every path.

#[path = "rdr_load/modes.rs"]
mod modes;
#[path = "rdr_load/server.rs"]
mod server;
#[path = "rdr_load/stats.rs"]
mod stats;
#[path = "rdr_load/target.rs"]
mod target;
#[path = "rdr_load/timetable.rs"]
mod timetable;
#[path = "rdr_load/udp.rs"]
mod udp;

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
    /// After connecting, getpeername must return --addr: a redirect stays invisible to the
    /// application. Costs a syscall per connection, so only the runs that measure the
    /// getpeername programs ask for it.
    #[arg(long)]
    check_peer: bool,
}

#[derive(Args, Clone)]
struct UdpArgs {
    /// Server address: IP:PORT or [IPv6]:PORT.
    #[arg(long)]
    addr: SocketAddr,
    /// Count a reply that does not name NAME as an error.
    #[arg(long, value_name = "NAME")]
    expect_server: Option<String>,
    /// Bound of one exchange; a slower one counts as an error.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Pin the generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// A new socket per exchange: connect, getpeername, send, recv, close. Without it, one
    /// unconnected socket does every exchange with sendto and recvfrom.
    #[arg(long)]
    connected: bool,
    #[arg(long, default_value_t = 3000)]
    duration_ms: u64,
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
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
        /// Also answer UDP datagrams on [::]:PORT, each with `NAME SEQ` for a request `SEQ`.
        #[arg(long)]
        udp: bool,
    },
    /// Request/response over UDP, one exchange in flight (closed loop): exchanges per second,
    /// each reply checked for --expect-server and for its source being --addr.
    Udp {
        #[command(flatten)]
        udp: UdpArgs,
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

use modes::*;
use server::*;
use stats::*;
use target::*;
use timetable::*;
use udp::*;

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
        Cmd::Udp { udp } => udp.duration_ms + udp.warmup_ms + 2 * udp.timeout_ms,
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
        Cmd::Udp { udp } => udp.cpu,
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
