//! The node router: per-request routing of HTTP/1.1, HTTP/2 and gRPC on the routing key, for
//! connections the kernel hands to it, with fail-open when it is gone.
mod support;

use std::time::Duration;

use redirector_tests::HttpReq;
use redirector_user::api::answers::StatusAnswer;
use support::l7::{
    L7, ROUTER4, ROUTER6, Routes, SVC_A, SVC_A6, SVC_B, baggage, listening_sockets, served_by,
    upstream,
};

fn get_with_key(key: Option<&str>) -> String {
    let req = HttpReq::get("/who");
    match key {
        Some(key) => req.header("baggage", &baggage(key)).spec(),
        None => req.spec(),
    }
}

#[test]
fn one_keep_alive_connection_routes_each_request_on_its_key() {
    let Some(mut c) = L7::new("l7-h1") else {
        return;
    };
    c.start(Routes::both());
    let specs = [
        get_with_key(Some("pr-1")),
        get_with_key(Some("pr-2")),
        get_with_key(None),
        get_with_key(Some("pr-unknown")),
        get_with_key(Some("pr-1")),
        HttpReq::get("/who")
            .header("uberctx-sd-routing-key", "pr-2")
            .spec(),
        HttpReq::get("/who")
            .header("baggage", "sd-routing-key=bad key!")
            .spec(),
    ];
    for vip in [SVC_A, SVC_A6] {
        let mut args = vec!["h1", "--addr", vip];
        for spec in &specs {
            args.extend(["--req", spec.as_str()]);
        }
        let lines = c.http(&c.frontend, &args);
        assert_eq!(
            served_by(&lines),
            [
                "fork-pr1", "fork-pr2", "baseline", "baseline", "fork-pr1", "fork-pr2", "baseline"
            ],
            "{vip}: {lines:#?}"
        );
        let ports: Vec<_> = lines.iter().map(|l| l["local_port"].clone()).collect();
        assert!(
            ports.windows(2).all(|w| w[0] == w[1]),
            "one connection: {ports:?}"
        );
        assert!(
            upstream(&lines[0]).is_some_and(|u| u.starts_with("fork pr-1 ")),
            "went through the router: {:?}",
            lines[0]
        );
        assert!(upstream(&lines[2]).is_some_and(|u| u.starts_with("baseline ")));
        // The routing key keeps propagating: the fork saw the header as sent.
        assert_eq!(
            lines[0]["body"]["headers"]["baggage"][0],
            "sd-routing-key=pr-1"
        );
    }
}

#[test]
fn request_headers_reach_the_upstream_unchanged() {
    let Some(mut c) = L7::new("l7-headers") else {
        return;
    };
    c.start(Routes::both());
    // The server echoes the request headers it received in its JSON body.
    let spec = HttpReq::get("/who")
        .header("baggage", "a=1, sd-routing-key=pr-1;p=2")
        .header("x-custom", "Value With Spaces")
        .spec();
    let lines = c.http(&c.frontend, &["h1", "--addr", SVC_A, "--req", &spec]);
    assert_eq!(served_by(&lines), ["fork-pr1"]);
    let body = &lines[0]["body"];
    assert_eq!(
        body["headers"]["baggage"][0], "a=1, sd-routing-key=pr-1;p=2",
        "{body}"
    );
    assert_eq!(
        body["headers"]["x-custom"][0], "Value With Spaces",
        "{body}"
    );
    assert_eq!(body["path"], "/who");
}

#[test]
fn http2_streams_and_grpc_are_routed_per_stream() {
    let Some(mut c) = L7::new("l7-h2") else {
        return;
    };
    c.start(Routes::both());
    let specs = [
        get_with_key(Some("pr-2")),
        get_with_key(None),
        get_with_key(Some("pr-1")),
        get_with_key(Some("nope")),
        get_with_key(Some("pr-2")),
    ];
    let mut args = vec!["h2", "--addr", SVC_A];
    for spec in &specs {
        args.extend(["--req", spec.as_str()]);
    }
    let lines = c.http(&c.frontend, &args);
    assert_eq!(
        served_by(&lines),
        ["fork-pr2", "baseline", "fork-pr1", "baseline", "fork-pr2"],
        "{lines:#?}"
    );

    let unary = c.http(
        &c.frontend,
        &[
            "grpc",
            "--addr",
            SVC_A,
            "--metadata",
            "baggage=sd-routing-key=pr-1",
        ],
    );
    assert_eq!(unary[0]["server"], "fork-pr1", "{unary:?}");
    assert_eq!(unary[0]["routing"], "sd-routing-key=pr-1");
    assert_eq!(unary.last().unwrap()["grpc_status"], 0, "{unary:?}");

    let plain = c.http(&c.frontend, &["grpc", "--addr", SVC_A6]);
    assert_eq!(plain[0]["server"], "baseline", "{plain:?}");

    let stream = c.http(
        &c.frontend,
        &[
            "grpc",
            "--addr",
            SVC_A,
            "--metadata",
            "baggage=sd-routing-key=pr-2",
            "--stream",
            "5",
        ],
    );
    let servers: Vec<_> = stream.iter().filter_map(|l| l["server"].as_str()).collect();
    assert_eq!(servers, ["fork-pr2"; 5], "{stream:?}");
    assert_eq!(
        stream.last().unwrap()["grpc_status"],
        0,
        "trailers came through"
    );
}

#[test]
fn a_route_change_applies_to_the_very_next_request_on_an_open_connection() {
    let Some(mut c) = L7::new("l7-change") else {
        return;
    };
    c.start(Routes {
        pr1: true,
        ..Routes::default()
    });
    // Three requests for pr-2 on one keep-alive connection, PAUSE apart: pr-2's route is added
    // before the second and removed before the third. Each change is made half a second into
    // a pause, and `reconfigure` returns once it is applied, which leaves it the rest of the
    // pause even on a loaded machine. (A pause stays under the router's idle timeout, the
    // config's 4 s header read timeout.)
    const PAUSE: Duration = Duration::from_secs(3);
    let request = |pause: Duration| {
        HttpReq::get("/who")
            .header("baggage", &baggage("pr-2"))
            .pause_ms(pause.as_millis() as u64)
            .spec()
    };
    let specs = [request(Duration::ZERO), request(PAUSE), request(PAUSE)];
    let args = [
        "h1", "--addr", SVC_A, "--req", &specs[0], "--req", &specs[1], "--req", &specs[2],
    ];
    let c = &c;
    let lines = std::thread::scope(|scope| {
        let started = std::time::Instant::now();
        let client = scope.spawn(|| c.frontend.http(&c.node, &args));
        let into_pause = |n: u32| {
            let at = Duration::from_millis(500) + PAUSE * (n - 1);
            std::thread::sleep(at.saturating_sub(started.elapsed()));
        };
        into_pause(1);
        c.reconfigure(Routes::both());
        into_pause(2);
        c.reconfigure(Routes {
            pr1: true,
            ..Routes::default()
        });
        client.join().expect("client thread")
    })
    .expect("client");
    assert_eq!(
        served_by(&lines),
        ["baseline", "fork-pr2", "baseline"],
        "{lines:#?}"
    );
    let ports: Vec<_> = lines.iter().map(|l| l["local_port"].clone()).collect();
    assert!(
        ports.windows(2).all(|w| w[0] == w[1]),
        "one connection: {ports:?}"
    );
}

#[test]
fn fork_down_answers_502_by_default_or_falls_back_to_baseline() {
    let Some(mut c) = L7::new("l7-forkdown") else {
        return;
    };
    c.start(Routes {
        pr1: true,
        pr2: true,
        pr2_fallback: true,
    });
    // Both forks go away: pr-1's route says error (the default), pr-2's says baseline.
    c.servers.retain(|s| !s.name().starts_with("fork-"));
    let specs = [
        get_with_key(Some("pr-1")),
        get_with_key(Some("pr-2")),
        get_with_key(None),
    ];
    let lines = c.http(
        &c.frontend,
        &[
            "h1", "--addr", SVC_A, "--req", &specs[0], "--req", &specs[1], "--req", &specs[2],
        ],
    );
    assert_eq!(lines[0]["status"], 502, "{lines:#?}");
    assert_eq!(
        lines[0]["headers"]["x-redirector-error"],
        "fork-unreachable"
    );
    assert_eq!(lines[1]["status"], 200);
    assert_eq!(lines[1]["served_by"], "baseline");
    assert!(
        upstream(&lines[1]).is_some_and(|u| u.contains("unreachable")),
        "{:?}",
        lines[1]
    );
    assert_eq!(lines[2]["served_by"], "baseline");
}

#[test]
fn a_killed_router_fails_open_for_new_connections() {
    let Some(mut c) = L7::new("l7-killed") else {
        return;
    };
    c.start(Routes::both());
    let via_router = c.http(
        &c.frontend,
        &["h1", "--addr", SVC_A, "--req", &get_with_key(None)],
    );
    assert!(upstream(&via_router[0]).is_some(), "{via_router:?}");

    c.daemon().kill9();
    c.daemon = None;
    // No grace period: the kernel drops the dead router's listening sockets from its map at
    // once, so not a single new connection is refused.
    for vip in [SVC_A, SVC_A6] {
        let direct = c.http(
            &c.frontend,
            &["h1", "--addr", vip, "--req", &get_with_key(None)],
        );
        assert_eq!(served_by(&direct), ["baseline"], "{direct:?}");
        assert_eq!(
            upstream(&direct[0]),
            None,
            "bypassed the dead router: {direct:?}"
        );
    }
    // Members keep their L4 steering with the daemon gone.
    let member = c.http(
        &c.member,
        &["h1", "--addr", SVC_A, "--req", &get_with_key(None)],
    );
    assert_eq!(served_by(&member), ["fork-pr1"]);
}

#[test]
fn a_stopped_router_withdraws_at_once() {
    let Some(mut c) = L7::new("l7-stopped") else {
        return;
    };
    c.start(Routes::both());
    c.daemon().terminate().expect("stop");
    c.daemon = None;
    // No grace period: a clean stop clears the heartbeat before exiting.
    let direct = c.http(
        &c.frontend,
        &["h1", "--addr", SVC_A, "--req", &get_with_key(None)],
    );
    assert_eq!(served_by(&direct), ["baseline"]);
    assert_eq!(upstream(&direct[0]), None);
}

#[test]
fn members_keep_l4_steering_and_unforked_services_never_touch_the_router() {
    let Some(mut c) = L7::new("l7-bypass") else {
        return;
    };
    c.start(Routes::both());
    // A member's connection goes straight to its fork, whatever key its requests carry.
    let member = c.http(
        &c.member,
        &["h1", "--addr", SVC_A, "--req", &get_with_key(Some("pr-2"))],
    );
    assert_eq!(served_by(&member), ["fork-pr1"]);
    assert_eq!(upstream(&member[0]), None, "L4, not the router");
    // svc-b is HTTP but has no fork: fast path.
    let b = c.http(
        &c.frontend,
        &["h1", "--addr", SVC_B, "--req", &get_with_key(Some("pr-1"))],
    );
    assert_eq!(served_by(&b), ["b-baseline"]);
    assert_eq!(upstream(&b[0]), None, "no fork, no router");
}

#[test]
fn the_routers_own_upstream_connections_are_never_captured() {
    let Some(mut c) = L7::new("l7-loop") else {
        return;
    };
    c.start(Routes::both());
    // Put the daemon itself in the attach cgroup, as a DaemonSet under kubepods would be.
    let pid = c.daemon().pid();
    std::fs::write(c.node.cgroup().join("cgroup.procs"), pid.to_string()).expect("move daemon");
    let lines = c.http(
        &c.frontend,
        &[
            "h1",
            "--addr",
            SVC_A,
            "--req",
            &get_with_key(None),
            "--req",
            &get_with_key(Some("pr-1")),
        ],
    );
    assert_eq!(served_by(&lines), ["baseline", "fork-pr1"], "{lines:#?}");
}

#[test]
fn several_accept_loops_share_the_routers_address_and_route_every_connection() {
    let Some(mut c) = L7::new("l7-loops") else {
        return;
    };
    let config = c
        .config_text(Routes::both())
        .replace("[router]\n", "[router]\naccept_loops = 3\n");
    c.start_with(&config);
    let pid = c.daemon().pid();
    for router in [ROUTER4, ROUTER6] {
        assert_eq!(listening_sockets(pid, router), 3, "{router}");
    }

    // 24 connections open at once (a second request after a pause keeps each one open while
    // the others come), alternating families and keys.
    let keys = [Some("pr-1"), Some("pr-2"), None];
    let expected = ["fork-pr1", "fork-pr2", "baseline"];
    let c = &c;
    let results: Vec<(usize, Vec<serde_json::Value>)> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..24)
            .map(|i| {
                scope.spawn(move || {
                    let vip = if i % 2 == 0 { SVC_A } else { SVC_A6 };
                    let key = keys[i % 3];
                    let first = get_with_key(key);
                    let mut second = HttpReq::get("/who").pause_ms(1500);
                    if let Some(key) = key {
                        second = second.header("baggage", &baggage(key));
                    }
                    let second = second.spec();
                    let args = ["h1", "--addr", vip, "--req", &first, "--req", &second];
                    (i, c.http(&c.frontend, &args))
                })
            })
            .collect();
        clients
            .into_iter()
            .map(|client| client.join().expect("client thread"))
            .collect()
    });
    for (i, lines) in &results {
        assert_eq!(
            served_by(lines),
            [expected[i % 3]; 2],
            "connection {i}: {lines:#?}"
        );
        assert!(
            lines.iter().all(|l| upstream(l).is_some()),
            "connection {i} went through the router: {lines:#?}"
        );
    }

    // The kernel spread them over the loops: each family's 12 land on one loop of 3 with a
    // chance of 3 in 3^12.
    let out = std::process::Command::new(support::redirector())
        .args(["status", "-o", "json", "--socket"])
        .arg(c.node.dir().join("api.sock"))
        .output()
        .expect("redirector status");
    assert!(out.status.success(), "{out:?}");
    let status: StatusAnswer = serde_json::from_slice(&out.stdout).expect("status json");
    let router = status.router.expect("router status");
    assert_eq!(router.accept_loops, 3);
    for listen in [ROUTER4, ROUTER6] {
        let counts: Vec<u64> = router
            .accepted
            .iter()
            .filter(|l| l.listen == support::addr(listen))
            .map(|l| l.accepted)
            .collect();
        assert_eq!(counts.len(), 3, "{listen}: {router:?}");
        assert_eq!(counts.iter().sum::<u64>(), 12, "{listen}: {router:?}");
        assert!(
            counts.iter().filter(|n| **n > 0).count() > 1,
            "{listen}: one loop took every connection: {counts:?}"
        );
    }
}
