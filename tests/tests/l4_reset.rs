//! Connection resets by the kernel's socket iterator.
//!
//! `reset_on_change`: a route change reaches the member connections that L4 steering decided
//! at `connect()`. In the sandbox's member namespaces, the connections that the new route would
//! send elsewhere are reset; the application reconnects and its new connection goes where the
//! new route says. Other pods' connections, and routes without the option, are left alone.
//!
//! `router.reset_bypassed`: the connections that went around a dead node router are reset when
//! it is back, so that their requests are routed again.
mod support;

use std::time::Duration;

use redirector_tests::{HttpReq, Pod};
use redirector_user::api::answers::{ResetCause, StatsAnswer};
use support::{
    BASELINE, Cluster, FORK, OTHER4, VIP6, addr, cli, eventually,
    l7::{L7, Routes, SVC_A, SVC_B, served_by, upstream},
    redirector, stats,
};

/// How soon after the change is applied its resets must show.
const WITHIN: Duration = Duration::from_secs(1);

fn route(c: &Cluster, args: &[&str]) {
    let (code, stdout, stderr) = cli(c, args);
    assert_eq!(code, 0, "redirector {args:?}: {stderr}{stdout}");
}

/// Starts the daemon with the standard services and `pr-1` (the member, no routes) made
/// through the API, whose routes the tests then change.
fn start(c: &mut Cluster) {
    let config = c.config_text(false);
    let services_only = config.split("[[sandbox]]").next().expect("config text");
    c.write_config(services_only);
    c.start(&[]);
    let member = c.member.netns_path();
    let member = member.to_str().expect("utf-8 path");
    route(c, &["sandbox", "create", "pr-1", "--member", member]);
}

/// Sockets closed by the changes recorded so far for `sandbox`.
fn closed(c: &Cluster, sandbox: &str) -> u64 {
    stats(c)
        .resets
        .iter()
        .filter(|r| r.sandbox == sandbox)
        .map(|r| r.closed)
        .sum()
}

#[test]
fn a_route_added_with_reset_on_change_resets_the_members_live_connection() {
    let Some(mut c) = Cluster::new("l4-reset-add") else {
        return;
    };
    start(&mut c);
    let mut member = c
        .member
        .session_tcp(&c.node, addr(OTHER4))
        .expect("session");
    let mut outsider = c
        .outsider
        .session_tcp(&c.node, addr(OTHER4))
        .expect("session");
    assert_eq!(member.send("before").expect("reply").server, BASELINE);
    assert_eq!(outsider.send("before").expect("reply").server, BASELINE);
    assert!(
        stats(&c).reset_unavailable.is_none(),
        "this kernel resets sockets"
    );

    let fork = format!("{}:9090", c.fork.ipv4);
    route(
        &c,
        &["route", "add", "pr-1", "svc-b", &fork, "--reset-on-change"],
    );
    assert!(
        eventually(WITHIN, || closed(&c, "pr-1") == 1),
        "one member connection reset: {:?}",
        stats(&c).resets
    );
    let report = stats(&c).resets.pop().expect("a reset report");
    assert_eq!(report.services, ["svc-b"]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    assert!(
        member.send("after").is_err(),
        "the member's old connection to the baseline is gone"
    );
    assert_eq!(
        c.tcp(&c.member, OTHER4),
        FORK,
        "its reconnect reaches the fork"
    );
    assert_eq!(
        outsider.send("after").expect("outsider untouched").server,
        BASELINE
    );
    outsider.close().expect("outsider session ends cleanly");

    let (code, text, stderr) = cli(&c, &["stats"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        text.contains("svc-b") && text.contains("SOCKETS RESET"),
        "stats shows the change: {text}"
    );
}

#[test]
fn without_reset_on_change_live_connections_are_left_alone() {
    let Some(mut c) = Cluster::new("l4-reset-off") else {
        return;
    };
    start(&mut c);
    let mut member = c
        .member
        .session_tcp(&c.node, addr(OTHER4))
        .expect("session");
    assert_eq!(member.send("before").expect("reply").server, BASELINE);

    let fork = format!("{}:9090", c.fork.ipv4);
    route(&c, &["route", "add", "pr-1", "svc-b", &fork]);
    assert_eq!(c.tcp(&c.member, OTHER4), FORK, "new connections follow");
    std::thread::sleep(WITHIN);
    assert_eq!(
        member.send("after").expect("old connection kept").server,
        BASELINE,
        "the old connection stays where it went"
    );
    assert!(stats(&c).resets.is_empty());
    member.close().expect("session ends cleanly");
}

/// IPv6, and both directions: a route added moves the baseline connection to the fork, the
/// route removed moves the fork connection back to the baseline.
#[test]
fn a_removed_route_sends_its_connections_back_to_the_baseline_over_ipv6() {
    let Some(mut c) = Cluster::new("l4-reset-v6") else {
        return;
    };
    start(&mut c);
    let mut to_baseline = c.member.session_tcp(&c.node, addr(VIP6)).expect("session");
    assert_eq!(to_baseline.send("before").expect("reply").server, BASELINE);

    let fork = format!("[{}]:8080", c.fork.ipv6);
    route(
        &c,
        &[
            "route",
            "add",
            "pr-1",
            "svc-a-v6",
            &fork,
            "--reset-on-change",
        ],
    );
    assert!(eventually(WITHIN, || closed(&c, "pr-1") == 1));
    assert!(to_baseline.send("after").is_err(), "reset");

    let mut to_fork = c.member.session_tcp(&c.node, addr(VIP6)).expect("session");
    assert_eq!(to_fork.send("steered").expect("reply").server, FORK);
    assert_eq!(
        to_fork.peer(),
        addr(VIP6),
        "the application sees the service"
    );

    route(&c, &["route", "remove", "pr-1", "svc-a-v6"]);
    assert!(
        eventually(WITHIN, || closed(&c, "pr-1") == 2),
        "{:?}",
        stats(&c).resets
    );
    assert!(to_fork.send("after").is_err(), "reset");
    assert_eq!(c.tcp(&c.member, VIP6), BASELINE, "back on the baseline");
}

/// Established TCP connections in `pod` to `to`, as `ss` lists them.
fn established(c: &L7, pod: &Pod, to: &str) -> usize {
    let out = pod
        .command(&c.node, "ss", false)
        .args(["-tnH", "state", "established", "dst", to])
        .output()
        .expect("ss (iproute2)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn l7_stats(c: &L7) -> StatsAnswer {
    let out = std::process::Command::new(redirector())
        .args(["stats", "-o", "json", "--socket"])
        .arg(c.node.dir().join("api.sock"))
        .output()
        .expect("redirector stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats json")
}

fn get(c: &L7, pod: &Pod, to: &str) -> Vec<serde_json::Value> {
    c.http(
        pod,
        &["h1", "--addr", to, "--req", &HttpReq::get("/who").spec()],
    )
}

/// A connection opened while the router was dead went straight to the baseline; with
/// `reset_bypassed`, the restarted router resets it (and only it), and the reconnect is routed.
#[test]
fn connections_that_bypassed_a_dead_router_are_reset_when_it_is_back() {
    let Some(mut c) = L7::new("reset-bypass") else {
        return;
    };
    let config = c
        .config_text(Routes::both())
        .replace("[router]\n", "[router]\nreset_bypassed = true\n");
    c.start_with(&config);
    c.daemon().kill9();
    c.daemon = None;

    // While it is dead: a pod's connection to the forked service bypasses it, one to the
    // service without a fork never used it, and the member's goes to its fork at L4.
    let bypassed = c
        .frontend
        .session_tcp(&c.node, addr(SVC_A))
        .expect("session");
    let unforked = c
        .frontend
        .session_tcp(&c.node, addr(SVC_B))
        .expect("session");
    let member = c.member.session_tcp(&c.node, addr(SVC_A)).expect("session");
    assert_eq!(
        established(&c, &c.frontend, SVC_A),
        1,
        "straight to the baseline"
    );
    assert_eq!(
        established(&c, &c.member, &format!("{}:8080", c.fork1.ipv4)),
        1
    );

    c.start_with(&config);
    assert!(
        eventually(WITHIN, || established(&c, &c.frontend, SVC_A) == 0),
        "the bypassing connection is reset"
    );
    // The run is recorded once it has been through every namespace.
    assert!(
        eventually(WITHIN, || !l7_stats(&c).resets.is_empty()),
        "a reset report"
    );
    let stats = l7_stats(&c);
    let report = stats.resets.last().expect("a reset report");
    assert_eq!(report.cause, ResetCause::RouterBack);
    assert_eq!(report.closed, 1, "{report:?}");
    assert_eq!(report.services, ["svc-a", "svc-a6"]);
    assert_eq!(
        established(&c, &c.frontend, SVC_B),
        1,
        "not handed off: kept"
    );
    assert_eq!(
        established(&c, &c.member, &format!("{}:8080", c.fork1.ipv4)),
        1,
        "steered at L4: kept"
    );
    let again = get(&c, &c.frontend, SVC_A);
    assert_eq!(served_by(&again), ["baseline"]);
    assert!(
        upstream(&again[0]).is_some(),
        "through the router: {again:?}"
    );
    drop((bypassed, unforked, member));
}

/// Without the option (the default), the router's return leaves such connections alone.
#[test]
fn by_default_the_routers_return_resets_nothing() {
    let Some(mut c) = L7::new("reset-bypass-off") else {
        return;
    };
    c.start(Routes::both());
    c.daemon().kill9();
    c.daemon = None;
    let bypassed = c
        .frontend
        .session_tcp(&c.node, addr(SVC_A))
        .expect("session");
    c.start(Routes::both());
    std::thread::sleep(WITHIN);
    assert_eq!(established(&c, &c.frontend, SVC_A), 1);
    assert!(l7_stats(&c).resets.is_empty());
    drop(bypassed);
}
