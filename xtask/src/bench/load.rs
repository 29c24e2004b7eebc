//! Runs `rdr-load` inside a pod and returns its JSON summary.
use std::{
    io::Read as _,
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use redirector_tests::{Node, Pod};
use serde_json::Value;

use super::{
    Bins, Profile,
    sys::{self, CLIENT_CPU},
};

/// Keep-alive connections of every fixed-rate and max-rate run.
pub const CONNECTIONS: usize = 16;
/// Workers of every connection-rate run.
pub const CONNECT_WORKERS: usize = 8;
/// The p99 bound of the max-rate search, µs.
pub const MAX_P99_US: u64 = 1000;

/// Where a run sends its requests and who must answer them.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub addr: SocketAddr,
    /// Routing key in the `baggage` header. Every path sends one, so the payload is the same
    /// everywhere; paths without a router ignore it.
    pub key: &'a str,
    /// The `x-served-by` every response must carry: a run that reached the wrong server
    /// counts errors instead of numbers.
    pub expect: &'a str,
}

#[derive(Clone, Copy)]
pub enum Kind {
    /// Fixed rate, open loop.
    Rate { rate: u32, new_conn: bool },
    /// Connections per second (connect + one request + close), closed loop. With
    /// `check_peer`, every connection also asks getpeername (and checks it names the address
    /// dialed): the program-cost runs need that hook driven, the rate runs need the bare loop.
    Connect {
        duration: Duration,
        warmup: Duration,
        check_peer: bool,
    },
    /// UDP request/response exchanges, one in flight, for `duration` (no warm-up): one
    /// unconnected socket (sendto, recvfrom), or with `connected` a socket per exchange
    /// (connect, getpeername, send, recv). Only the servers on `OUTSIDE_PORT` answer UDP.
    Udp { duration: Duration, connected: bool },
    /// Highest fixed rate with p99 within [`MAX_P99_US`].
    Max,
}

pub fn run(
    bins: &Bins,
    node: &Node,
    pod: &Pod,
    target: Target<'_>,
    kind: Kind,
    profile: &Profile,
) -> anyhow::Result<Value> {
    sys::check_interrupted()?;
    let ms = |d: Duration| d.as_millis().to_string();
    let mut args: Vec<String> = vec![
        match kind {
            Kind::Rate { .. } => "rate",
            Kind::Connect { .. } => "connect",
            Kind::Max => "max",
            Kind::Udp { .. } => "udp",
        }
        .into(),
        "--addr".into(),
        target.addr.to_string(),
        "--expect-server".into(),
        target.expect.into(),
        "--cpu".into(),
        CLIENT_CPU.to_string(),
    ];
    if !matches!(kind, Kind::Udp { .. }) {
        args.extend([
            "--header".into(),
            format!("baggage=sd-routing-key={}", target.key),
            // The client has its core to itself: polling instead of sleeping takes its own
            // wake-up latency (tens of microseconds on a VM) out of every figure.
            "--spin".into(),
        ]);
    }
    let expected = match kind {
        Kind::Rate { rate, new_conn } => {
            args.extend([
                "--rate".into(),
                rate.to_string(),
                "--duration-ms".into(),
                ms(profile.run),
                "--warmup-ms".into(),
                ms(profile.warmup),
                "--connections".into(),
                CONNECTIONS.to_string(),
            ]);
            if new_conn {
                args.push("--new-conn".into());
            }
            profile.run + profile.warmup
        }
        Kind::Connect {
            duration,
            warmup,
            check_peer,
        } => {
            args.extend([
                "--concurrency".into(),
                CONNECT_WORKERS.to_string(),
                "--duration-ms".into(),
                ms(duration),
                "--warmup-ms".into(),
                ms(warmup),
            ]);
            if check_peer {
                args.push("--check-peer".into());
            }
            duration + warmup
        }
        Kind::Udp {
            duration,
            connected,
        } => {
            args.extend([
                "--duration-ms".into(),
                ms(duration),
                "--warmup-ms".into(),
                "0".into(),
            ]);
            if connected {
                args.push("--connected".into());
            }
            duration
        }
        Kind::Max => {
            args.extend([
                "--connections".into(),
                CONNECTIONS.to_string(),
                "--p99-us".into(),
                MAX_P99_US.to_string(),
                "--steps".into(),
                profile.max_steps.to_string(),
                "--step-ms".into(),
                ms(profile.max_step),
                "--step-warmup-ms".into(),
                ms(profile.max_warmup),
            ]);
            // The probe, and every step tried at most twice.
            (profile.max_step + profile.max_warmup) * (2 * profile.max_steps + 1)
        }
    };
    // rdr-load bounds itself; this is the backstop if it wedges anyway.
    let limit = expected + Duration::from_secs(20);
    run_args(bins, node, pod, &args, limit)
}

/// Exactly `requests` keyed requests at `rate` per second over `connections` keep-alive
/// connections (opened before the first), with a generous per-request timeout: the run the
/// instruction counts are taken around, where the proxy runs under valgrind.
pub fn fixed_count(
    bins: &Bins,
    node: &Node,
    pod: &Pod,
    target: Target<'_>,
    rate: u32,
    requests: u32,
    connections: usize,
) -> anyhow::Result<Value> {
    sys::check_interrupted()?;
    // Send times are i * (1e9 / rate) ns, i < ceil(duration / interval): with a rate that
    // divides a second evenly, exactly `requests` of them.
    let duration = Duration::from_secs_f64(f64::from(requests) / f64::from(rate.max(1)));
    let timeout = Duration::from_secs(20);
    let args: Vec<String> = vec![
        "rate".into(),
        "--addr".into(),
        target.addr.to_string(),
        "--header".into(),
        format!("baggage=sd-routing-key={}", target.key),
        "--expect-server".into(),
        target.expect.into(),
        "--cpu".into(),
        CLIENT_CPU.to_string(),
        "--rate".into(),
        rate.to_string(),
        "--duration-ms".into(),
        duration.as_millis().to_string(),
        "--warmup-ms".into(),
        "0".into(),
        "--connections".into(),
        connections.to_string(),
        "--timeout-ms".into(),
        timeout.as_millis().to_string(),
    ];
    run_args(
        bins,
        node,
        pod,
        &args,
        duration + timeout + Duration::from_secs(20),
    )
}

fn run_args(
    bins: &Bins,
    node: &Node,
    pod: &Pod,
    args: &[String],
    limit: Duration,
) -> anyhow::Result<Value> {
    // In the node's cgroup, so the daemon's programs see the client's sockets.
    let mut cmd = pod.command(node, &bins.load, true);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    sys::die_with_us(&mut cmd);
    let what = format!("rdr-load {} in pod {}", args.join(" "), pod.name);
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline || sys::check_interrupted().is_err() {
            let _ = child.kill();
            let _ = child.wait();
            sys::check_interrupted()?;
            bail!("{what}: no result within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The summary is one short line: it fits the pipe, so reading after the exit is safe.
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout)?;
    }
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr)?;
    }
    if !status.success() {
        bail!("{what} failed ({status}): {}", stderr.trim());
    }
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("{what}: output is not JSON: {stdout:?}"))
}
