//! The node router as a multi-tenant proxy: one pod's HTTP/2 abuse (streams held open, flow
//! control stalled) must not slow another pod's requests to the same service, idle upstream
//! HTTP/2 connections close, and gRPC clients get gRPC answers when the router answers for an
//! upstream.
mod support;

use std::time::{Duration, Instant};

use redirector_tests::{HttpReq, Pod};
use serde_json::Value;
use support::{
    eventually,
    l7::{L7, Routes, SVC_A, baggage, served_by},
    sample, scrape,
};

/// What "normal latency" means for one victim request on this (2-core, shared) machine: the
/// quiet requests take a few milliseconds, a request queued behind an attacker never finishes.
const VICTIM_BUDGET_MS: u64 = 1000;
/// Streams the hold attacker keeps open per service: 3 connections of 100.
const HELD_PER_SERVICE: u64 = 300;
/// Downloads the stall attacker keeps stalled per service.
const STALLED_PER_SERVICE: u64 = 8;
/// hyper's default SETTINGS_MAX_CONCURRENT_STREAMS, which rdr-http serve keeps: the most one
/// upstream connection can carry. Held streams filling what the stalled ones leave of it show
/// the attack is in place, whatever the router does with the rest.
const UPSTREAM_STREAM_LIMIT: u64 = 200;
const HELD_ENOUGH: u64 = UPSTREAM_STREAM_LIMIT - STALLED_PER_SERVICE;
const KEY_PR1: &str = "baggage=sd-routing-key=pr-1";

/// The standard L7 node config with other `[router]` timeouts.
fn config(c: &L7, request_timeout_ms: u64, idle_timeout_ms: u64) -> String {
    let text = c
        .config_text(Routes::both())
        .replace(
            "request_timeout_ms = 2000",
            &format!("request_timeout_ms = {request_timeout_ms}"),
        )
        .replace(
            "[router]\n",
            &format!("[router]\nidle_timeout_ms = {idle_timeout_ms}\n"),
        );
    assert!(text.contains(&format!("idle_timeout_ms = {idle_timeout_ms}")));
    text
}

/// Requests the server `ip:8080` is handling right now, asked directly (not through the router).
fn inflight(c: &L7, pod: &Pod) -> u64 {
    let addr = format!("{}:8080", pod.ipv4);
    let spec = HttpReq::get("/inflight").spec();
    match pod.http_with(&c.node, &["h1", "--addr", &addr, "--req", &spec], false) {
        Ok(lines) => lines[0]["body"]["inflight"].as_u64().unwrap_or(0),
        Err(_) => 0,
    }
}

/// What one victim round measured, in milliseconds.
#[derive(Default)]
struct Latencies {
    /// Each request on the victim's h2c connection, as the client timed it.
    requests: Vec<u64>,
    /// Each 1 MiB download, the whole client run (process start and connection included).
    downloads: Vec<u64>,
}

impl Latencies {
    fn extend(&mut self, other: Latencies) {
        self.requests.extend(other.requests);
        self.downloads.extend(other.downloads);
    }

    fn summary(&self) -> String {
        format!(
            "requests {}; 1 MiB downloads {}",
            summary(&self.requests),
            summary(&self.downloads)
        )
    }

    fn worst(&self) -> u64 {
        self.requests
            .iter()
            .chain(&self.downloads)
            .max()
            .copied()
            .unwrap_or(0)
    }
}

/// One victim round on one h2c connection: unkeyed and keyed requests as concurrent streams,
/// then a 1 MiB download over its own connection (it needs flow-control window all the way),
/// unkeyed and keyed. Panics, naming the round, on any failure.
fn victim_round(c: &L7, victim: &Pod, round: &str) -> Latencies {
    let plain = HttpReq::get("/who").spec();
    let pr1 = HttpReq::get("/who")
        .header("baggage", &baggage("pr-1"))
        .spec();
    let pr2 = HttpReq::get("/who")
        .header("baggage", &baggage("pr-2"))
        .spec();
    let specs = [&plain, &pr1, &plain, &pr1, &pr2, &plain, &pr1, &plain];
    let mut args = vec!["h2", "--addr", SVC_A, "--timeout-ms", "5000"];
    for spec in specs {
        args.extend(["--req", spec.as_str()]);
    }
    let lines = victim
        .http(&c.node, &args)
        .unwrap_or_else(|e| panic!("{round}: victim h2 requests failed: {e:#}"));
    assert_eq!(
        served_by(&lines),
        [
            "baseline", "fork-pr1", "baseline", "fork-pr1", "fork-pr2", "baseline", "fork-pr1",
            "baseline"
        ],
        "{round}: {lines:#?}"
    );
    let mut took = Latencies {
        requests: lines
            .iter()
            .map(|l| l["elapsed_ms"].as_u64().unwrap_or(u64::MAX))
            .collect(),
        downloads: Vec::new(),
    };

    for (header, served) in [(None, "baseline"), (Some(KEY_PR1), "fork-pr1")] {
        let mut args = vec![
            "download",
            "--http2",
            "--addr",
            SVC_A,
            "--bytes",
            "1048576",
            "--timeout-ms",
            "5000",
        ];
        if let Some(h) = header {
            args.extend(["--header", h]);
        }
        let started = Instant::now();
        let down = victim
            .http(&c.node, &args)
            .unwrap_or_else(|e| panic!("{round}: victim download ({header:?}) failed: {e:#}"));
        took.downloads.push(started.elapsed().as_millis() as u64);
        assert_eq!(down[0]["intact"], true, "{round}: {down:?}");
        assert_eq!(down[0]["served_by"], served, "{round}: {down:?}");
    }
    took
}

fn summary(took: &[u64]) -> String {
    let mut sorted = took.to_vec();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let max = sorted.last().copied().unwrap_or(0);
    format!("median {median} ms, max {max} ms of {}", sorted.len())
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

#[test]
fn one_pod_cannot_stall_other_pods_http2_through_the_router() {
    let Some(mut c) = L7::new("l7-isolation") else {
        return;
    };
    let attacker = c.node.add_pod("attacker").expect("pod");
    let staller = c.node.add_pod("staller").expect("pod");
    let victim = c.node.add_pod("victim").expect("pod");
    // A long request timeout: held streams stay held for the whole test instead of being
    // answered 504 and opened again.
    let text = config(&c, 30_000, 60_000);
    c.start_with(&text);

    let pid = c.daemon().pid();
    let mut quiet = Latencies::default();
    for round in 0..3 {
        quiet.extend(victim_round(&c, &victim, &format!("quiet round {round}")));
    }
    let rss_before = rss_kib(pid);

    // Flow control first: once streams are held, a shared upstream connection could not even
    // take the stalled downloads.
    let mut attacks = Vec::new();
    let stalled = STALLED_PER_SERVICE.to_string();
    for (label, key) in [("stall-baseline", None), ("stall-pr1", Some(KEY_PR1))] {
        let mut args = vec![
            "stall",
            "--addr",
            SVC_A,
            "--streams",
            &stalled,
            "--bytes",
            "16777216",
        ];
        if let Some(h) = key {
            args.extend(["--header", h]);
        }
        let (guard, first) = staller
            .spawn_http(&c.node, label, &args, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{label}: {e:#}"));
        assert_eq!(
            first["stalled"].as_u64(),
            Some(STALLED_PER_SERVICE),
            "{label}: {first}"
        );
        attacks.push(guard);
    }
    for (label, key) in [("hold-baseline", None), ("hold-pr1", Some(KEY_PR1))] {
        let mut args = vec![
            "hold",
            "--addr",
            SVC_A,
            "--connections",
            "3",
            "--streams",
            "100",
        ];
        if let Some(h) = key {
            args.extend(["--header", h]);
        }
        let (guard, first) = attacker
            .spawn_http(&c.node, label, &args, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{label}: {e:#}"));
        assert_eq!(first["holding"].as_u64(), Some(HELD_PER_SERVICE), "{first}");
        attacks.push(guard);
    }
    let mut held = (0, 0);
    let in_place = eventually(Duration::from_secs(20), || {
        held = (inflight(&c, &c.baseline), inflight(&c, &c.fork1));
        held.0 >= HELD_ENOUGH && held.1 >= HELD_ENOUGH
    });
    assert!(
        in_place,
        "the attack never took hold: (baseline, fork) handling {held:?} requests"
    );

    let mut attacked = Latencies::default();
    for round in 0..3 {
        attacked.extend(victim_round(
            &c,
            &victim,
            &format!("attacked round {round}"),
        ));
    }
    let grown_mib = rss_kib(pid).saturating_sub(rss_before) / 1024;
    eprintln!(
        "victim latency quiet: {}\nvictim latency under attack: {}\n(servers handling \
         {held:?} held streams; router memory grew by {grown_mib} MiB)",
        quiet.summary(),
        attacked.summary()
    );
    let worst = attacked.worst();
    assert!(
        worst < VICTIM_BUDGET_MS,
        "a victim request took {worst} ms under attack: {:?} {:?} (quiet: {:?} {:?})",
        attacked.requests,
        attacked.downloads,
        quiet.requests,
        quiet.downloads
    );
    // Bounded buffering: each stalled stream holds at most its windows, not its 16 MiB.
    assert!(
        grown_mib < 64,
        "router memory grew by {grown_mib} MiB during the attack"
    );
    assert!(
        c.daemon().try_wait().expect("wait").is_none(),
        "router alive"
    );
    drop(attacks);
}

/// ESTABLISHED TCP connections of `pid`'s network namespace to remote port `port`.
fn established_to(pid: u32, port: u16) -> usize {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    let remote_port = cols
                        .get(2)
                        .and_then(|r| r.rsplit(':').next())
                        .and_then(|p| u16::from_str_radix(p, 16).ok());
                    remote_port == Some(port) && cols.get(3) == Some(&"01")
                })
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .count()
}

#[test]
fn idle_upstream_http2_connections_close_after_the_idle_timeout() {
    let Some(mut c) = L7::new("l7-h2-idle") else {
        return;
    };
    let text = config(&c, 2_000, 1_000);
    c.start_with(&text);
    let pid = c.daemon().pid();

    // One client connection: a request now, another after 4 s on the same connection. The
    // upstream connection of the first must close in between, and the second must not mind.
    let now = HttpReq::get("/who").spec();
    let later = HttpReq::get("/who").pause_ms(4_000).spec();
    let c_ref = &c;
    let (lines, opened, closed) = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            c_ref.http(
                &c_ref.frontend,
                &["h2", "--addr", SVC_A, "--req", &now, "--req", &later],
            )
        });
        let opened = eventually(Duration::from_secs(3), || established_to(pid, 8080) >= 1);
        let closed = eventually(Duration::from_millis(3_500), || {
            established_to(pid, 8080) == 0
        });
        (client.join().expect("client thread"), opened, closed)
    });
    assert!(opened, "the router never connected upstream");
    assert!(
        closed,
        "the idle upstream HTTP/2 connection was still open after the idle timeout"
    );
    assert_eq!(served_by(&lines), ["baseline", "baseline"], "{lines:#?}");
    let ports: Vec<_> = lines.iter().map(|l| l["local_port"].clone()).collect();
    assert_eq!(ports[0], ports[1], "one client connection: {ports:?}");
}

fn grpc(c: &L7, metadata: &[&str]) -> Value {
    let mut args = vec!["grpc", "--addr", SVC_A];
    for m in metadata {
        args.extend(["--metadata", m]);
    }
    let lines = c.http(&c.frontend, &args);
    lines.last().cloned().unwrap_or(Value::Null)
}

#[test]
fn grpc_requests_the_router_answers_get_grpc_status_codes() {
    let Some(mut c) = L7::new("l7-grpc-errors") else {
        return;
    };
    // request_timeout_ms is 2000 in the standard config.
    c.start(Routes::both());
    assert_eq!(grpc(&c, &[KEY_PR1])["grpc_status"], 0);

    let slow = grpc(&c, &[KEY_PR1, "rdr-delay-ms=4000"]);
    assert_eq!(slow["grpc_status"], 4, "DEADLINE_EXCEEDED: {slow}");
    assert!(
        slow["message"]
            .as_str()
            .is_some_and(|m| m.contains("redirector")),
        "{slow}"
    );

    c.servers.retain(|s| s.name() != "fork-pr2");
    let down = grpc(&c, &["baggage=sd-routing-key=pr-2"]);
    assert_eq!(down["grpc_status"], 14, "UNAVAILABLE: {down}");
    assert!(
        down["message"]
            .as_str()
            .is_some_and(|m| m.contains("fork-unreachable")),
        "{down}"
    );
    // The baseline is still served.
    assert_eq!(grpc(&c, &[])["grpc_status"], 0);
}

/// An h2c connection that opens `streams` requests and cancels each at once (the "rapid reset"
/// pattern, CVE-2023-44487), as `rdr-http raw --send` text.
fn rapid_reset(streams: u32) -> String {
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS, empty.
    bytes.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
    for i in 0..streams {
        let id = (2 * i + 1).to_be_bytes();
        // HEADERS, END_STREAM | END_HEADERS: `:method GET`, `:scheme http`, `:path /` from
        // HPACK's static table.
        bytes.extend([0, 0, 3, 1, 5]);
        bytes.extend(id);
        bytes.extend([0x82, 0x86, 0x84]);
        // RST_STREAM, CANCEL.
        bytes.extend([0, 0, 4, 3, 0]);
        bytes.extend(id);
        bytes.extend([0, 0, 0, 8]);
    }
    bytes.iter().map(|b| format!("\\x{b:02x}")).collect()
}

#[test]
fn abusive_http2_connections_are_counted_not_logged_one_by_one() {
    let Some(mut c) = L7::new("l7-h2-abuse") else {
        return;
    };
    c.start(Routes::both());
    let mark = c.daemon().log_len();
    let payload = rapid_reset(100);
    let abusers = 10;
    for i in 0..abusers {
        let out = c.http(
            &c.frontend,
            &[
                "raw",
                "--addr",
                SVC_A,
                "--send",
                &payload,
                "--read-ms",
                "3000",
            ],
        );
        assert_eq!(out[0]["closed"], true, "abuser {i} was cut off: {out:?}");
    }
    let counted = |scrape: &str| {
        sample(
            scrape,
            "redirector_router_client_errors_total{kind=\"protocol\"} ",
        )
    };
    let mut last = 0.0;
    assert!(
        eventually(Duration::from_secs(5), || {
            last = counted(&scrape(&c.node));
            last >= f64::from(abusers)
        }),
        "{abusers} abusive connections counted as {last}"
    );
    let logs: Vec<String> = c
        .daemon()
        .logs()
        .lines()
        .skip(mark)
        .map(str::to_owned)
        .collect();
    let warnings: Vec<&String> = logs.iter().filter(|l| l.contains("WARN")).collect();
    assert_eq!(
        warnings.len(),
        1,
        "one WARN line for {abusers} abusive connections: {warnings:#?}"
    );
    assert!(
        warnings[0].contains("client connection closed for a protocol error"),
        "{warnings:?}"
    );
    // Everyone else is served as before.
    let ok = c.http(
        &c.frontend,
        &["h2", "--addr", SVC_A, "--req", &HttpReq::get("/who").spec()],
    );
    assert_eq!(served_by(&ok), ["baseline"]);
}

#[test]
fn more_upstream_connections_open_beyond_the_upstreams_stream_limit() {
    const SVC_C: &str = "10.96.0.12:8082";
    const LIMIT: usize = 4;
    let Some(mut c) = L7::new("l7-h2-limit") else {
        return;
    };
    let limited = c.node.add_pod("svc-c").expect("pod");
    c.node
        .add_vip(support::addr(SVC_C).ip(), &limited)
        .expect("vip");
    let server = limited
        .serve_http_with(
            &c.node,
            "limited",
            8082,
            &["--max-streams", &LIMIT.to_string()],
        )
        .expect("server");
    c.servers.push(server);
    // svc-c needs a fork to go through the router; pr-3's is the same server.
    let text = format!(
        "{}\n[[service]]\nname = \"svc-c\"\naddress = \"{SVC_C}\"\nprotocol = \"http\"\n\n\
         [[sandbox]]\nkey = \"pr-3\"\nroutes = [{{ service = \"svc-c\", fork = \"{}:8082\" }}]\n",
        c.config_text(Routes::both()),
        limited.ipv4
    );
    c.start_with(&text);
    let pid = c.daemon().pid();

    // One request opens the upstream connection (and brings its SETTINGS); then three times
    // the upstream's limit of one-second requests at once on the same client connection.
    let burst = 3 * LIMIT;
    let mut specs = vec![HttpReq::get("/who").spec()];
    specs.extend((0..burst).map(|_| HttpReq::get("/delay/1000").pause_ms(300).spec()));
    let mut args = vec!["h2", "--addr", SVC_C];
    for spec in &specs {
        args.extend(["--req", spec.as_str()]);
    }
    let c_ref = &c;
    let (lines, connections) = std::thread::scope(|scope| {
        let client = scope.spawn(|| c_ref.http(&c_ref.frontend, &args));
        let mut most = 0;
        eventually(Duration::from_secs(2), || {
            most = most.max(established_to(pid, 8082));
            most >= burst / LIMIT
        });
        (client.join().expect("client thread"), most)
    });
    assert!(lines.iter().all(|l| l["status"] == 200), "{lines:#?}");
    let slowest = lines[1..]
        .iter()
        .map(|l| l["elapsed_ms"].as_u64().unwrap_or(u64::MAX))
        .max()
        .unwrap_or(u64::MAX);
    assert!(
        slowest < 1900,
        "the burst waited for stream slots ({slowest} ms) instead of using more connections"
    );
    assert_eq!(
        connections,
        burst / LIMIT,
        "upstream connections for {burst} streams at {LIMIT} per connection"
    );
}
