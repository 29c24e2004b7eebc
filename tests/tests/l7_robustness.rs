//! The node router under load and abuse: big streaming bodies in bounded memory, upgrades,
//! `Expect: 100-continue`, malformed or slow clients that must not disturb anyone else, idle
//! connections that close, and a router out of descriptors that fails open.
mod support;

use std::time::Duration;

use redirector_tests::{HttpReq, Pod};
use support::{
    eventually,
    l7::{L7, Routes, SVC_A, baggage, served_by},
    sample, scrape,
};

const KEY_HEADER: &str = "baggage=sd-routing-key=pr-1";

/// Peak resident memory of `pid` since the last [`reset_peak`], in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resets the peak RSS counter (`echo 5 > /proc/PID/clear_refs`).
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs");
}

#[test]
fn sixty_four_mib_bodies_stream_through_in_bounded_memory() {
    let Some(mut c) = L7::new("l7-bigbody") else {
        return;
    };
    c.start(Routes::both());
    let pid = c.daemon().pid();
    reset_peak(pid);
    let before = rss_kib(pid);
    let bytes = (64 * 1024 * 1024).to_string();

    let up = c.http(
        &c.frontend,
        &[
            "upload",
            "--addr",
            SVC_A,
            "--bytes",
            &bytes,
            "--header",
            KEY_HEADER,
            "--timeout-ms",
            "60000",
        ],
    );
    assert_eq!(up[0]["served_by"], "fork-pr1", "{up:?}");
    assert_eq!(up[0]["intact"], true, "{up:?}");
    assert_eq!(up[0]["received"].as_u64(), Some(64 * 1024 * 1024));

    let down = c.http(
        &c.frontend,
        &[
            "download",
            "--addr",
            SVC_A,
            "--bytes",
            &bytes,
            "--timeout-ms",
            "60000",
        ],
    );
    assert_eq!(down[0]["served_by"], "baseline", "{down:?}");
    assert_eq!(down[0]["intact"], true, "{down:?}");

    let grown_mib = peak_rss_kib(pid).saturating_sub(before) / 1024;
    assert!(
        grown_mib < 24,
        "router memory grew by {grown_mib} MiB while streaming 64 MiB each way"
    );
}

#[test]
fn upgrade_and_expect_continue_are_routed() {
    let Some(mut c) = L7::new("l7-upgrade") else {
        return;
    };
    c.start(Routes::both());
    let up = c.http(
        &c.frontend,
        &["upgrade", "--addr", SVC_A, "--header", KEY_HEADER],
    );
    assert_eq!(up[0]["status"], 101, "{up:?}");
    assert_eq!(
        up[0]["greeting"], "fork-pr1",
        "upgraded connection reached the fork"
    );
    assert_eq!(up[0]["echo"], "ping");

    let plain = c.http(&c.frontend, &["upgrade", "--addr", SVC_A]);
    assert_eq!(plain[0]["greeting"], "baseline");

    let expect = HttpReq::post("/who", "hello body")
        .header("expect", "100-continue")
        .header("baggage", &baggage("pr-2"))
        .spec();
    let lines = c.http(&c.frontend, &["h1", "--addr", SVC_A, "--req", &expect]);
    assert_eq!(lines[0]["status"], 200, "{lines:?}");
    assert_eq!(served_by(&lines), ["fork-pr2"]);
}

#[test]
fn malformed_and_slow_clients_get_an_error_and_disturb_no_one() {
    let Some(mut c) = L7::new("l7-abuse") else {
        return;
    };
    c.start(Routes::both());
    let normal = || {
        let spec = HttpReq::get("/who")
            .header("baggage", &baggage("pr-1"))
            .spec();
        c.http(&c.frontend, &["h1", "--addr", SVC_A, "--req", &spec])
    };

    let bad_line = c.http(
        &c.frontend,
        &["raw", "--addr", SVC_A, "--send", "NONSENSE\\r\\n\\r\\n"],
    );
    assert_eq!(bad_line[0]["status"], 400, "{bad_line:?}");
    assert_eq!(bad_line[0]["closed"], true, "{bad_line:?}");

    let big = c.http(
        &c.frontend,
        &["raw", "--addr", SVC_A, "--send-header-bytes", "1048576"],
    );
    let status = big[0]["status"].as_u64();
    assert!(
        status == Some(431) || big[0]["closed"] == true,
        "1 MiB of headers must be refused: {big:?}"
    );

    // A slow drip (one byte every 300 ms) is cut off by the header read timeout (4 s here)
    // while a well-behaved client on another connection is served meanwhile.
    let c_ref = &c;
    let (drip, during) = std::thread::scope(|scope| {
        let drip = scope.spawn(|| {
            c_ref.http(
                &c_ref.frontend,
                &[
                    "raw", "--addr", SVC_A, "--send", "GET /who HTTP/1.1\\r\\nHost: svc-a\\r\\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaa\\r\\n\\r\\n",
                    "--drip-ms", "300", "--read-ms", "2000",
                ],
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        let during = normal();
        (drip.join().expect("drip thread"), during)
    });
    assert_eq!(
        served_by(&during),
        ["fork-pr1"],
        "others unaffected: {during:?}"
    );
    assert!(
        drip[0]["closed"] == true || !drip[0]["write_error"].is_null(),
        "slow client cut off: {drip:?}"
    );
    assert_ne!(drip[0]["status"], 200, "slow client not served: {drip:?}");

    assert_eq!(served_by(&normal()), ["fork-pr1"], "router still routes");
    assert!(
        c.daemon().try_wait().expect("wait").is_none(),
        "router alive"
    );
}

#[test]
fn slow_upstreams_time_out_and_the_router_is_not_an_open_proxy() {
    let Some(mut c) = L7::new("l7-timeouts") else {
        return;
    };
    c.start(Routes::both());
    // request_timeout_ms is 2000 in this node's config.
    let slow = HttpReq::get("/delay/4000")
        .header("baggage", &baggage("pr-1"))
        .spec();
    let lines = c.http(&c.frontend, &["h1", "--addr", SVC_A, "--req", &slow]);
    assert_eq!(lines[0]["status"], 504, "{lines:?}");
    assert_eq!(
        lines[0]["headers"]["x-redirector-error"],
        "upstream-timeout"
    );

    // Dialing the router directly: no hand-off record, so no destination; it just closes.
    let direct = c.http(
        &c.frontend,
        &[
            "raw",
            "--addr",
            support::l7::ROUTER4,
            "--send",
            "GET / HTTP/1.1\\r\\nHost: 10.0.0.1\\r\\n\\r\\n",
        ],
    );
    assert_eq!(direct[0]["status"], serde_json::Value::Null, "{direct:?}");
    assert_eq!(direct[0]["closed"], true, "{direct:?}");

    // Chunked request bodies stream too.
    let chunked = c.http(
        &c.frontend,
        &[
            "upload",
            "--addr",
            SVC_A,
            "--bytes",
            "3000000",
            "--chunked",
            "--header",
            KEY_HEADER,
        ],
    );
    assert_eq!(chunked[0]["served_by"], "fork-pr1", "{chunked:?}");
    assert_eq!(chunked[0]["intact"], true);
}

/// Idle connections one pod opens: more than a 1 024 descriptor limit holds.
const IDLE_CONNECTIONS: &str = "1100";

/// The standard config with a client idle timeout (the header read timeout) that outlasts the
/// test, so the idle connections stay with the router.
fn long_idle_config(c: &L7) -> String {
    let text = c.config_text(Routes::both()).replace(
        "header_read_timeout_ms = 4000",
        "header_read_timeout_ms = 120000",
    );
    assert!(text.contains("header_read_timeout_ms = 120000"));
    text
}

fn hard_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid, writable rlimit.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit.rlim_max
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

/// One keyed request from `pod` on a new connection, bounded well below any idle timeout;
/// returns who served it (it must be answered).
/// Like [`keyed_request`], with the client's error as text instead of a panic.
fn try_keyed_request(c: &L7, pod: &Pod) -> Result<String, String> {
    let spec = HttpReq::get("/who")
        .header("baggage", &baggage("pr-1"))
        .spec();
    let args = [
        "h1",
        "--addr",
        SVC_A,
        "--timeout-ms",
        "3000",
        "--req",
        &spec,
    ];
    let lines = pod.http(&c.node, &args).map_err(|e| format!("{e:#}"))?;
    Ok(lines
        .first()
        .and_then(|l| l["served_by"].as_str())
        .unwrap_or("<none>")
        .to_owned())
}

fn keyed_request(c: &L7, pod: &Pod) -> String {
    let spec = HttpReq::get("/who")
        .header("baggage", &baggage("pr-1"))
        .spec();
    let lines = c.http(
        pod,
        &[
            "h1",
            "--addr",
            SVC_A,
            "--timeout-ms",
            "3000",
            "--req",
            &spec,
        ],
    );
    assert_eq!(lines[0]["status"], 200, "{lines:?}");
    served_by(&lines).remove(0)
}

#[test]
fn idle_clients_beyond_a_1024_soft_limit_do_not_lock_other_pods_out() {
    let Some(mut c) = L7::new("l7-nofile") else {
        return;
    };
    let hard = hard_nofile();
    assert!(
        hard >= 4096,
        "the test needs a hard RLIMIT_NOFILE of at least 4096, not {hard}"
    );
    let victim = c.node.add_pod("victim").expect("pod");
    let config = long_idle_config(&c);
    // A service manager's default: soft 1 024, the hard limit above it.
    c.start_limited(&config, Some((1024, hard)));
    let pid = c.daemon().pid();

    let (_attacker, open) = c
        .frontend
        .spawn_http(
            &c.node,
            "idle",
            &[
                "idle",
                "--addr",
                SVC_A,
                "--connections",
                IDLE_CONNECTIONS,
                "--hold-ms",
                "120000",
            ],
            Duration::from_secs(60),
        )
        .expect("idle attacker");
    assert_eq!(open["open"], 1100, "{open}");

    // Routed by the router, on time.
    for _ in 0..5 {
        assert_eq!(keyed_request(&c, &victim), "fork-pr1");
    }
    assert_eq!(
        keyed_request(&c, &c.frontend),
        "fork-pr1",
        "the attacker's pod too"
    );
    // ... while it holds all the idle connections, past the limit it started with.
    assert!(
        eventually(Duration::from_secs(10), || open_descriptors(pid) > 1100),
        "the router holds the idle connections: {} descriptors open",
        open_descriptors(pid)
    );
    c.daemon()
        .wait_for_log("raised the soft descriptor limit", Duration::from_secs(1))
        .expect("the raise is logged");
}

#[test]
fn a_router_out_of_descriptors_sheds_load_to_the_direct_path_and_recovers() {
    let Some(mut c) = L7::new("l7-shed") else {
        return;
    };
    let victim = c.node.add_pod("victim").expect("pod");
    let config = long_idle_config(&c);
    // No room to raise: the router itself must cope.
    c.start_limited(&config, Some((1024, 1024)));

    let (attacker, open) = c
        .frontend
        .spawn_http(
            &c.node,
            "idle",
            &[
                "idle",
                "--addr",
                SVC_A,
                "--connections",
                IDLE_CONNECTIONS,
                "--hold-ms",
                "120000",
            ],
            Duration::from_secs(60),
        )
        .expect("idle attacker");
    assert_eq!(open["open"], 1100, "{open}");

    // Answered, not left hanging: directly while the router sheds. A connection the kernel
    // handed over just before shedding began is closed at once (a reset, which a client
    // retries), never left to time out.
    let mut answered = 0;
    for _ in 0..5 {
        let started = std::time::Instant::now();
        match try_keyed_request(&c, &victim) {
            Ok(by) => {
                assert!(by == "baseline" || by == "fork-pr1", "served by {by}");
                answered += 1;
            }
            Err(err) => assert!(
                started.elapsed() < Duration::from_secs(2) && err.contains("reset"),
                "a failed request failed fast with a reset: {err}"
            ),
        }
    }
    assert!(answered >= 4, "{answered} of 5 answered");
    c.daemon()
        .wait_for_log("shedding", Duration::from_secs(1))
        .expect("shedding is logged");
    let metrics = scrape(&c.node);
    assert_eq!(sample(&metrics, "redirector_router_shedding "), 1.0);
    assert!(
        sample(
            &metrics,
            "redirector_kernel_events_total{event=\"router_down\"}"
        ) >= 1.0,
        "the kernel left connections direct:\n{metrics}"
    );

    // The idle clients go: the router has room again and routes again.
    drop(attacker);
    c.daemon()
        .wait_for_log("has room again", Duration::from_secs(15))
        .expect("shedding ends");
    assert!(
        eventually(Duration::from_secs(5), || keyed_request(&c, &victim)
            == "fork-pr1"),
        "routed by the router again"
    );
    assert_eq!(sample(&scrape(&c.node), "redirector_router_shedding "), 0.0);
}

#[test]
fn idle_client_connections_close_after_the_idle_timeout_whatever_the_protocol() {
    let Some(mut c) = L7::new("l7-idle") else {
        return;
    };
    // header_read_timeout_ms is 4000 in this node's config: the client idle timeout.
    c.start(Routes::both());
    let c_ref = &c;
    let idle = |args: &[&str]| {
        let mut all = vec!["idle", "--addr", SVC_A, "--hold-ms", "12000"];
        all.extend_from_slice(args);
        let lines = c_ref.http(&c_ref.frontend, &all);
        let last = lines.last().expect("a summary line").clone();
        assert_eq!(last["closed"], 1, "closed by the router: {lines:?}");
        let after = last["closed_after_ms"][0].as_u64().expect("a close time");
        assert!(
            (3500..9000).contains(&after),
            "closed {after} ms after going idle, not after the 4 s idle timeout"
        );
    };
    let (h2, silent) = std::thread::scope(|scope| {
        let h2 = scope.spawn(|| idle(&["--http2", "--request"]));
        let silent = scope.spawn(|| idle(&[]));
        (h2.join(), silent.join())
    });
    h2.expect("an idle HTTP/2 connection after a request");
    silent.expect("a connection that never sent a byte");
}
