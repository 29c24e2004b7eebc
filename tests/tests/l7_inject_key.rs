//! `inject_key`: a member of a sandbox whose requests carry no routing key (its code does not
//! propagate one) reaches the sandbox's forks of HTTP services through the node router, which
//! adds the key to the forwarded request's `baggage`; a request that carries a key keeps it.
//! Non-HTTP services stay L4-steered. Through a real daemon, kernel hand-off and real HTTP/1.1
//! and h2c clients.
mod support;

use std::{net::SocketAddr, time::Duration};

use redirector_tests::HttpReq;
use serde_json::Value;
use support::l7::{L7, Routes, SVC_A, SVC_A6, baggage, served_by, upstream};

/// A TCP (non-HTTP) service: the baseline on the svc-a pod, pr-1's fork on its fork pod.
const DB: &str = "10.96.0.20:5432";

/// The config of [`L7::config_text`] (both routes), with `inject_key` on pr-1 when `inject`,
/// and a TCP service `db` that pr-1 forks.
fn config(c: &L7, inject: bool) -> String {
    let text = c.config_text(Routes::both());
    let anchor = "[[sandbox]]\nkey = \"pr-1\"\n";
    assert!(text.contains(anchor), "pr-1's table in {text}");
    let inject_line = if inject { "inject_key = true\n" } else { "" };
    let text = text.replacen(
        anchor,
        &format!("[[service]]\nname = \"db\"\naddress = \"{DB}\"\n\n{anchor}{inject_line}"),
        1,
    );
    // pr-1's routes: add db's.
    let routes = "routes = [\n  { service = \"svc-a\"";
    assert!(text.contains(routes), "pr-1's routes in {text}");
    text.replacen(
        routes,
        &format!(
            "routes = [\n  {{ service = \"db\", fork = \"{}:5432\" }},\n  {{ service = \"svc-a\"",
            c.fork1.ipv4
        ),
        1,
    )
}

/// Serves `db`: its baseline and pr-1's fork, answering with their names.
fn serve_db(c: &mut L7) {
    let vip: SocketAddr = DB.parse().unwrap();
    c.node.add_vip(vip.ip(), &c.baseline).expect("vip");
    let baseline = c.baseline.serve(&c.node, "db-baseline", 5432).expect("db");
    let fork = c.fork1.serve(&c.node, "db-pr1", 5432).expect("db fork");
    c.servers.extend([baseline, fork]);
}

/// Requests in sequence on one connection (`h1` or `h2`) from the member pod to `addr`.
fn from_member(c: &L7, proto: &str, addr: &str, reqs: &[HttpReq]) -> Vec<Value> {
    let specs: Vec<String> = reqs.iter().map(HttpReq::spec).collect();
    let mut args = vec![proto, "--addr", addr];
    for spec in &specs {
        args.extend(["--req", spec.as_str()]);
    }
    let lines = c.http(&c.member, &args);
    assert_eq!(lines.len(), reqs.len(), "{lines:#?}");
    lines
}

/// The `baggage` headers the upstream received, as it echoes them.
fn baggage_received(line: &Value) -> Vec<String> {
    line["body"]["headers"]["baggage"]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The router's counters, from `redirector stats -o json`.
fn router_stats(c: &L7) -> Value {
    let out = std::process::Command::new(support::redirector())
        .args(["stats", "-o", "json", "--socket"])
        .arg(c.node.dir().join("api.sock"))
        .output()
        .expect("run redirector stats");
    assert!(
        out.status.success(),
        "redirector stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value: Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    value["router"].clone()
}

fn db_from_member(c: &L7) -> String {
    c.member
        .call_tcp(&c.node, DB.parse().unwrap(), true)
        .expect("db call")
        .server
}

#[test]
fn a_member_without_the_key_reaches_its_fork_through_the_router_with_the_key_added() {
    let Some(mut c) = L7::new("l7-inject") else {
        return;
    };
    serve_db(&mut c);
    let text = config(&c, true);
    c.start_with(&text);
    // The router learns the member's addresses when the daemon resolves its namespace.
    for proto in ["h1", "h2"] {
        for svc in [SVC_A, SVC_A6] {
            let lines = from_member(
                &c,
                proto,
                svc,
                &[
                    // No key at all: pr-1's fork, with the key added.
                    HttpReq::get("/who"),
                    // Other baggage, no key: the key joins it.
                    HttpReq::get("/who").header("baggage", "userId=alice"),
                    // Another valid key: where that key says, untouched.
                    HttpReq::get("/who").header("baggage", &baggage("pr-2")),
                    // A valid key without a fork of this service: the baseline.
                    HttpReq::get("/who").header("baggage", &baggage("pr-9")),
                    // An invalid key: as from anyone else, the baseline.
                    HttpReq::get("/who").header("baggage", "sd-routing-key=bad%20key"),
                ],
            );
            assert_eq!(
                served_by(&lines),
                ["fork-pr1", "fork-pr1", "fork-pr2", "baseline", "baseline"],
                "{proto} {svc}: {lines:#?}"
            );
            assert!(
                upstream(&lines[0]).is_some_and(|u| u.starts_with("fork pr-1 ")),
                "{proto} {svc}: through the router: {}",
                lines[0]
            );
            assert_eq!(
                baggage_received(&lines[0]),
                [baggage("pr-1")],
                "{proto} {svc}"
            );
            assert_eq!(
                baggage_received(&lines[1]),
                [format!("userId=alice,{}", baggage("pr-1"))],
                "{proto} {svc}"
            );
            assert_eq!(
                baggage_received(&lines[2]),
                [baggage("pr-2")],
                "{proto} {svc}"
            );
            assert_eq!(
                baggage_received(&lines[3]),
                [baggage("pr-9")],
                "{proto} {svc}"
            );
        }
    }
    // Requests from anyone else are routed as before: no key, the baseline, nothing added.
    let lines = c.http(
        &c.frontend,
        &["h1", "--addr", SVC_A, "--req", &HttpReq::get("/who").spec()],
    );
    assert_eq!(served_by(&lines), ["baseline"], "{lines:#?}");
    assert_eq!(baggage_received(&lines[0]), Vec::<String>::new());

    // A TCP service of the sandbox stays L4-steered.
    assert_eq!(db_from_member(&c), "db-pr1");

    let stats = router_stats(&c);
    // 2 protocols x 2 services x 2 requests without a key.
    assert_eq!(stats["keys_injected"], 8, "{stats:#}");

    // With the daemon gone the member still reaches its fork, directly (fail open).
    c.daemon().kill9();
    c.daemon = None;
    let lines = from_member(&c, "h1", SVC_A, &[HttpReq::get("/who")]);
    assert_eq!(served_by(&lines), ["fork-pr1"], "{lines:#?}");
    assert_eq!(upstream(&lines[0]), None, "L4: {lines:#?}");
    assert_eq!(baggage_received(&lines[0]), Vec::<String>::new());
}

#[test]
fn without_inject_key_a_member_is_l4_steered_and_nothing_is_added() {
    let Some(mut c) = L7::new("l7-noinject") else {
        return;
    };
    serve_db(&mut c);
    let text = config(&c, false);
    c.start_with(&text);
    for proto in ["h1", "h2"] {
        let lines = from_member(
            &c,
            proto,
            SVC_A,
            &[
                HttpReq::get("/who"),
                // L4: the connection is the fork's, whatever key its requests carry.
                HttpReq::get("/who").header("baggage", &baggage("pr-2")),
            ],
        );
        assert_eq!(
            served_by(&lines),
            ["fork-pr1", "fork-pr1"],
            "{proto}: {lines:#?}"
        );
        assert_eq!(upstream(&lines[0]), None, "{proto}: L4, not the router");
        assert_eq!(baggage_received(&lines[0]), Vec::<String>::new(), "{proto}");
    }
    assert_eq!(db_from_member(&c), "db-pr1");
    assert_eq!(router_stats(&c)["keys_injected"], 0);

    // Turned on by a reload: the next connection goes through the router.
    let mark = c.daemon().log_len();
    c.write_config(&config(&c, true));
    c.daemon()
        .wait_for_log_from(mark, "reload applied", Duration::from_secs(10))
        .expect("reload applied");
    let lines = from_member(&c, "h1", SVC_A, &[HttpReq::get("/who")]);
    assert_eq!(served_by(&lines), ["fork-pr1"], "{lines:#?}");
    assert_eq!(baggage_received(&lines[0]), [baggage("pr-1")], "{lines:#?}");
    assert_eq!(db_from_member(&c), "db-pr1");
}
