//! The node router under load and abuse: big streaming bodies in bounded memory, upgrades,
//! `Expect: 100-continue`, and malformed or slow clients that must not disturb anyone else.
mod support;

use std::time::Duration;

use redirector_tests::HttpReq;
use support::l7::{L7, Routes, SVC_A, baggage, served_by};

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
