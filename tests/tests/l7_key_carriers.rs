//! The routing key from clients that cannot set headers (browsers, webhooks): the query
//! parameter and cookie carriers an HTTP service enables with `key_from`, the `baggage` member
//! the router adds so the key travels on, and the cookie it sets (`set_cookie`), through a real
//! daemon, real kernel hand-off and real HTTP/1.1 and h2c clients.
mod support;

use std::time::Duration;

use redirector_tests::HttpReq;
use serde_json::Value;
use support::l7::{L7, Routes, SVC_A, SVC_A6, served_by, upstream};

/// The config of [`L7::config_text`] (both routes) with `lines` added to service svc-a.
fn config_with(c: &L7, lines: &str) -> String {
    let text = c.config_text(Routes::both());
    let anchor = format!("name = \"svc-a\"\naddress = \"{SVC_A}\"\nprotocol = \"http\"\n");
    assert!(text.contains(&anchor), "svc-a's table in {text}");
    text.replacen(&anchor, &format!("{anchor}{lines}\n"), 1)
}

/// Writes `config` and waits until the running daemon applied it.
fn reload(c: &mut L7, config: &str) {
    let mark = c.daemon().log_len();
    c.write_config(config);
    c.daemon()
        .wait_for_log_from(mark, "reload applied", Duration::from_secs(10))
        .expect("reload applied");
}

/// Requests in sequence on one connection (`h1` or `h2`) to `addr`.
fn send(c: &L7, proto: &str, addr: &str, reqs: &[HttpReq]) -> Vec<Value> {
    let specs: Vec<String> = reqs.iter().map(HttpReq::spec).collect();
    let mut args = vec![proto, "--addr", addr];
    for spec in &specs {
        args.extend(["--req", spec.as_str()]);
    }
    let lines = c.http(&c.frontend, &args);
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

fn set_cookie(line: &Value) -> Option<&str> {
    line["headers"]["set-cookie"].as_str()
}

#[test]
fn the_query_parameter_counts_only_where_key_from_says_and_travels_on_in_baggage() {
    let Some(mut c) = L7::new("l7-query") else {
        return;
    };
    let by_query = || HttpReq::get("/x?sd-routing-key=pr-1");
    let by_cookie = || HttpReq::get("/x").header("cookie", "sd-routing-key=pr-1");

    // The default (headers only): the query parameter and the cookie are not read.
    c.start(Routes::both());
    let lines = send(&c, "h1", SVC_A, &[by_query(), by_cookie()]);
    assert_eq!(served_by(&lines), ["baseline", "baseline"], "{lines:#?}");
    for line in &lines {
        assert!(
            upstream(line).is_some_and(|u| u.starts_with("baseline ")),
            "went through the router: {line}"
        );
        assert_eq!(baggage_received(line), Vec::<String>::new(), "{line}");
        assert_eq!(set_cookie(line), None, "{line}");
    }
    assert_eq!(lines[0]["body"]["path"], "/x?sd-routing-key=pr-1");

    // key_from = ["header", "query"], applied by a reload: the query parameter routes, the
    // upstream gets the key in baggage and the URI as sent; no cookie is read or set.
    let config = config_with(&c, "key_from = [\"header\", \"query\"]");
    reload(&mut c, &config);
    for proto in ["h1", "h2"] {
        let lines = send(
            &c,
            proto,
            SVC_A,
            &[
                by_query(),
                by_cookie(),
                HttpReq::get("/x?a=1&sd-routing-key=pr-2").header("baggage", "userId=alice"),
                // The same key in a header and the query: the header's.
                HttpReq::get("/x?sd-routing-key=pr-2").header("baggage", "sd-routing-key=pr-1"),
                // Present in the query but invalid: as an invalid header key, the baseline.
                HttpReq::get("/x?sd-routing-key=bad%20key"),
                // Several that disagree are refused the same way.
                HttpReq::get("/x?sd-routing-key=pr-1&sd-routing-key=pr-2"),
                // Percent-encoded, decoded before validation.
                HttpReq::get("/x?sd-routing-key=pr%2D2"),
                // A form body is never read.
                HttpReq::post("/x", "sd-routing-key=pr-1")
                    .header("content-type", "application/x-www-form-urlencoded"),
            ],
        );
        assert_eq!(
            served_by(&lines),
            [
                "fork-pr1", "baseline", "fork-pr2", "fork-pr1", "baseline", "baseline", "fork-pr2",
                "baseline"
            ],
            "{proto}: {lines:#?}"
        );
        assert_eq!(
            baggage_received(&lines[0]),
            ["sd-routing-key=pr-1"],
            "{proto}"
        );
        assert_eq!(
            lines[0]["body"]["path"], "/x?sd-routing-key=pr-1",
            "{proto}"
        );
        assert!(
            upstream(&lines[0]).is_some_and(|u| u.starts_with("fork pr-1 ")),
            "{proto}: {}",
            lines[0]
        );
        assert_eq!(
            baggage_received(&lines[2]),
            ["userId=alice,sd-routing-key=pr-2"],
            "{proto}"
        );
        assert_eq!(
            baggage_received(&lines[3]),
            ["sd-routing-key=pr-1"],
            "{proto}: the header's key, unchanged"
        );
        for i in [1, 4, 5, 7] {
            assert_eq!(
                baggage_received(&lines[i]),
                Vec::<String>::new(),
                "{proto} #{i}"
            );
        }
        assert_eq!(
            baggage_received(&lines[6]),
            ["sd-routing-key=pr-2"],
            "{proto}"
        );
        assert!(
            lines.iter().all(|l| set_cookie(l).is_none()),
            "{proto}: no set_cookie, no cookie: {lines:#?}"
        );
    }
    // Only svc-a said key_from: its IPv6 twin svc-a6 keeps the default.
    let lines = send(&c, "h1", SVC_A6, &[by_query()]);
    assert_eq!(served_by(&lines), ["baseline"], "{lines:#?}");
}

#[test]
fn a_browser_session_that_arrives_with_the_key_in_its_url_stays_in_the_sandbox() {
    let Some(mut c) = L7::new("l7-cookie") else {
        return;
    };
    let config = config_with(
        &c,
        "key_from = [\"header\", \"query\", \"cookie\"]\nset_cookie = true\ncookie_max_age = \"2h\"",
    );
    c.start_with(&config);
    for proto in ["h1", "h2"] {
        // A link with the key, a response that sets the cookie.
        let lines = send(
            &c,
            proto,
            SVC_A,
            &[HttpReq::get("/app?sd-routing-key=pr-2")],
        );
        assert_eq!(served_by(&lines), ["fork-pr2"], "{proto}: {lines:#?}");
        assert_eq!(
            baggage_received(&lines[0]),
            ["sd-routing-key=pr-2"],
            "{proto}"
        );
        let cookie =
            set_cookie(&lines[0]).unwrap_or_else(|| panic!("{proto}: a Set-Cookie: {}", lines[0]));
        let mut attributes: Vec<&str> = cookie.split("; ").collect();
        let pair = attributes.remove(0);
        assert_eq!(pair, "sd-routing-key=pr-2", "{proto}: {cookie}");
        attributes.sort_unstable();
        assert_eq!(
            attributes,
            ["HttpOnly", "Max-Age=7200", "Path=/", "SameSite=Lax"],
            "{proto}: {cookie}"
        );

        // What the browser sends next: only the cookie, among its others.
        let with_cookie =
            |other: &str| HttpReq::get("/app/page").header("cookie", &format!("{other}; {pair}"));
        let lines = send(
            &c,
            proto,
            SVC_A,
            &[
                with_cookie("session=abc"),
                with_cookie("theme=\"dark\""),
                // A header key still wins over the cookie, the query over the cookie too.
                with_cookie("a=1").header("baggage", "sd-routing-key=pr-1"),
                HttpReq::get("/app?sd-routing-key=pr-1").header("cookie", pair),
                // No carrier at all: the baseline.
                HttpReq::get("/app/page"),
            ],
        );
        assert_eq!(
            served_by(&lines),
            ["fork-pr2", "fork-pr2", "fork-pr1", "fork-pr1", "baseline"],
            "{proto}: {lines:#?}"
        );
        for line in &lines[..2] {
            assert_eq!(baggage_received(line), ["sd-routing-key=pr-2"], "{proto}");
            assert_eq!(set_cookie(line), None, "{proto}: set only for a query key");
        }
        assert_eq!(set_cookie(&lines[2]), None, "{proto}");
        assert!(
            set_cookie(&lines[3]).is_some_and(|c| c.starts_with("sd-routing-key=pr-1;")),
            "{proto}: a new key in the URL replaces the cookie: {}",
            lines[3]
        );
        assert_eq!(baggage_received(&lines[4]), Vec::<String>::new(), "{proto}");
    }
}
