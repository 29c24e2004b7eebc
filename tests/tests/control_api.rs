//! The control plane end to end: the CLI and the API against a running daemon on a simulated
//! node, with real traffic proving what the kernel does.
mod support;

use std::{
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use redirector_tests::HttpReq;
use support::{
    BASELINE, Cluster, FORK, OTHER4, VIP4, cli, cli_json, eventually,
    l7::{L7, Routes, SVC_A, baggage, served_by},
    sample, scrape,
};

/// Keys of the sandboxes the daemon lists, in its order.
fn sandbox_keys(c: &Cluster) -> Vec<String> {
    cli_json(c, &["sandbox", "list"])
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["key"].as_str().expect("a key").to_owned())
        .collect()
}

fn fork_route(c: &Cluster, service: &str) -> String {
    format!("{service}={}:8080", c.fork.ipv4)
}

#[test]
fn sandboxes_created_through_the_cli_steer_and_go_away_again() {
    let Some(mut c) = Cluster::new("api-crud") else {
        return;
    };
    c.start(&[]);
    assert_eq!(c.tcp(&c.outsider, VIP4), BASELINE);

    let outsider = c.outsider.netns_path().to_string_lossy().into_owned();
    let route = fork_route(&c, "svc-a-v6");
    let (code, out, err) = cli(
        &c,
        &[
            "sandbox", "create", "pr-api", "--member", &outsider, "--route", &route,
        ],
    );
    // svc-a-v6 is an IPv6 service: an IPv4 fork is refused, naming the route.
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("sandbox \"pr-api\" route \"svc-a-v6\""),
        "{err}"
    );

    let route = fork_route(&c, "svc-a");
    let (code, out, err) = cli(
        &c,
        &[
            "sandbox", "create", "pr-api", "--member", &outsider, "--route", &route,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sandbox pr-api created"), "{out}");
    assert_eq!(
        c.tcp(&c.outsider, VIP4),
        FORK,
        "the new sandbox steers its member"
    );

    let list = cli_json(&c, &["sandbox", "list"]);
    let origins: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["key"].as_str().unwrap().into(),
                s["origin"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        origins,
        [
            ("pr-1".into(), "file".into()),
            ("pr-api".into(), "api".into())
        ]
    );
    let (code, table, _) = cli(&c, &["sandbox", "list"]);
    assert_eq!(code, 0);
    assert!(table.contains("KEY") && table.contains("pr-api"), "{table}");

    // A route added to it works the next connection; removed, it is gone.
    let other = format!("{}:9090", c.fork.ipv4);
    let (code, _, err) = cli(&c, &["route", "add", "pr-api", "svc-b", &other]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(c.tcp(&c.outsider, OTHER4), FORK);
    let routes = cli_json(&c, &["route", "ls", "pr-api"]);
    assert_eq!(routes.as_array().unwrap().len(), 2, "{routes}");
    let (code, _, err) = cli(&c, &["route", "rm", "pr-api", "svc-b"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(c.tcp(&c.outsider, OTHER4), BASELINE);

    let (code, _, err) = cli(&c, &["sandbox", "delete", "pr-api"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        c.tcp(&c.outsider, VIP4),
        BASELINE,
        "deleted: back to the baseline"
    );
    let (code, _, err) = cli(&c, &["sandbox", "delete", "pr-api"]);
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn config_file_objects_are_read_only_through_the_api() {
    let Some(mut c) = Cluster::new("api-fileowned") else {
        return;
    };
    c.start(&[]);
    let (code, _, err) = cli(&c, &["sandbox", "delete", "pr-1"]);
    assert_eq!(code, 1);
    assert!(err.contains("comes from the config file"), "{err}");
    let (code, _, err) = cli(&c, &["route", "rm", "pr-1", "svc-a"]);
    assert_eq!(code, 1);
    assert!(err.contains("comes from the config file"), "{err}");
    assert_eq!(c.tcp(&c.member, VIP4), FORK, "nothing changed");
}

#[test]
fn apply_is_all_or_nothing() {
    let Some(mut c) = Cluster::new("api-apply") else {
        return;
    };
    c.start(&[]);
    let outsider = c.outsider.netns_path().to_string_lossy().into_owned();
    let good = format!(
        r#"
[[sandbox]]
key = "pr-a"
members = ["{outsider}"]
routes = [{{ service = "svc-a", fork = "{f}:8080" }}]

[[sandbox]]
key = "pr-b"
routes = [{{ service = "svc-b", fork = "{f}:9090" }}]
"#,
        f = c.fork.ipv4
    );
    let bad = format!(
        "{good}\n[[sandbox]]\nkey = \"pr-c\"\nroutes = [{{ service = \"svc-a\", fork = \"{}:8080\" }}]\n\n[[group]]\nkey = \"g\"\nsandboxes = [\"pr-a\", \"pr-c\"]\n",
        c.fork.ipv4
    );
    let file = c.node.dir().join("bad.toml");
    std::fs::write(&file, &bad).unwrap();
    let (code, out, err) = cli(&c, &["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("both fork service \"svc-a\""), "{err}");
    assert_eq!(sandbox_keys(&c).len(), 1, "nothing of the bad file applied");
    assert_eq!(c.tcp(&c.outsider, VIP4), BASELINE);

    let file = c.node.dir().join("good.toml");
    std::fs::write(&file, &good).unwrap();
    let (code, out, err) = cli(&c, &["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(c.tcp(&c.outsider, VIP4), FORK);

    // JSON works the same, and --prune removes what the request does not list.
    let json_file = c.node.dir().join("only-b.json");
    let spec = serde_json::json!({"sandboxes": [{"key": "pr-b",
        "routes": [{"service": "svc-b", "fork": format!("{}:9090", c.fork.ipv4)}]}]});
    std::fs::write(&json_file, spec.to_string()).unwrap();
    let (code, _, err) = cli(&c, &["apply", "-f", json_file.to_str().unwrap(), "--prune"]);
    assert_eq!(code, 0, "{err}");
    let keys = sandbox_keys(&c);
    assert_eq!(keys, ["pr-1", "pr-b"]);
    assert_eq!(c.tcp(&c.outsider, VIP4), BASELINE, "pr-a pruned");
}

#[test]
fn route_groups_steer_to_every_sandbox_and_refuse_conflicts() {
    let Some(mut c) = Cluster::new("api-groups") else {
        return;
    };
    c.start(&[]);
    let f = c.fork.ipv4;
    for (key, route) in [
        ("pr-x", format!("svc-b={f}:9090")),
        ("pr-y", format!("svc-b={f}:9091")),
    ] {
        let (code, _, err) = cli(&c, &["sandbox", "create", key, "--route", &route]);
        assert_eq!(code, 0, "{err}");
    }
    let outsider = c.outsider.netns_path().to_string_lossy().into_owned();
    // pr-1 (file) forks svc-a, pr-x forks svc-b: together they make a group.
    let (code, _, err) = cli(
        &c,
        &[
            "group",
            "create",
            "pr-1-and-x",
            "--sandbox",
            "pr-1",
            "--sandbox",
            "pr-x",
            "--member",
            &outsider,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        c.tcp(&c.outsider, VIP4),
        FORK,
        "group member reaches pr-1's fork"
    );
    assert_eq!(c.tcp(&c.outsider, OTHER4), FORK, "... and pr-x's");

    let (code, _, err) = cli(
        &c,
        &[
            "group",
            "create",
            "bad",
            "--sandbox",
            "pr-x",
            "--sandbox",
            "pr-y",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("conflict") && err.contains("svc-b"), "{err}");
    let groups = cli_json(&c, &["group", "list"]);
    assert_eq!(groups.as_array().unwrap().len(), 1, "{groups}");

    let (code, _, err) = cli(&c, &["group", "delete", "pr-1-and-x"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(c.tcp(&c.outsider, OTHER4), BASELINE);
}

#[test]
fn api_state_survives_a_daemon_restart() {
    let Some(mut c) = Cluster::new("api-restart") else {
        return;
    };
    c.start(&[]);
    let outsider = c.outsider.netns_path().to_string_lossy().into_owned();
    let route = fork_route(&c, "svc-a");
    let (code, _, err) = cli(
        &c,
        &[
            "sandbox", "create", "pr-keep", "--member", &outsider, "--route", &route,
        ],
    );
    assert_eq!(code, 0, "{err}");

    c.daemon().terminate().expect("stop");
    c.daemon = None;
    let daemon = c.start(&[]);
    assert!(
        daemon
            .logs()
            .contains("restored objects created through the API"),
        "{}",
        daemon.logs()
    );
    let keys = sandbox_keys(&c);
    assert_eq!(keys, ["pr-1", "pr-keep"]);
    assert_eq!(c.tcp(&c.outsider, VIP4), FORK);
}

#[test]
fn the_socket_is_for_root_only_and_bad_requests_get_clear_errors() {
    let Some(mut c) = Cluster::new("api-perms") else {
        return;
    };
    c.start(&[]);
    let mode = std::fs::metadata(c.api_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let binary = c.node.dir().join("redirector-cli");
    std::fs::copy(support::redirector(), &binary).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&binary)
        .args(["status", "--socket"])
        .arg(c.api_socket())
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(3), "unreachable for non-root");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");

    // Straight to the socket: malformed JSON and unknown endpoints.
    let raw = |request: &str| {
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(c.api_socket()).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read_to_string(&mut text);
        text
    };
    let body = "{not json";
    let answer = raw(&format!(
        "PUT /v1/sandboxes/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid JSON body"), "{answer}");
    let answer = raw("GET /v1/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    // The daemon is fine.
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
}

#[test]
fn status_stats_and_metrics_follow_real_traffic() {
    let Some(mut c) = Cluster::new("api-metrics") else {
        return;
    };
    c.start(&[]);
    let status = support::status(&c);
    assert_eq!(status.programs.len(), 9, "{status:?}");
    assert_eq!(status.maps[1].map, "routes");
    assert_eq!(status.maps[1].entries, 4, "{status:?}");
    let (code, table, _) = cli(&c, &["status"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("attach point") && table.contains("routes"),
        "{table}"
    );

    let before = scrape(&c.node);
    let steered = "redirector_connections_steered_total{sandbox=\"pr-1\",service=\"svc-a\"}";
    let kernel_steered = "redirector_kernel_events_total{event=\"steered\"}";
    for _ in 0..3 {
        assert_eq!(c.tcp(&c.member, VIP4), FORK);
    }
    let after = scrape(&c.node);
    assert_eq!(
        sample(&after, steered) - sample(&before, steered),
        3.0,
        "{after}"
    );
    assert!(sample(&after, kernel_steered) >= sample(&before, kernel_steered) + 3.0);
    assert!(
        after.contains("redirector_map_entries{map=\"routes\"} 4"),
        "{after}"
    );

    let stats = support::stats(&c);
    assert!(stats.kernel.get("steered").unwrap() >= 3, "{stats:?}");
    let steered = stats
        .routes
        .iter()
        .find(|r| r.sandbox == "pr-1" && r.service == "svc-a")
        .map_or(0, |r| r.steered);
    assert!(steered >= 3, "{stats:?}");

    // A reload shows up too.
    c.write_config(&c.config_text(false));
    let mut reloaded = String::new();
    let counted = eventually(Duration::from_secs(5), || {
        reloaded = scrape(&c.node);
        sample(&reloaded, "redirector_config_reloads_total{result=\"ok\"}") == 1.0
    });
    assert!(counted, "{reloaded}");
}

/// Untouched traffic pays one lookup: the fast path is counted only on request, and turning
/// the count on at a restart replaces the programs while steering goes on.
#[test]
fn the_fast_path_is_counted_only_when_asked() {
    let Some(mut c) = Cluster::new("api-fastpath") else {
        return;
    };
    c.start(&[]);
    for _ in 0..3 {
        assert_eq!(c.tcp(&c.outsider, OTHER4), BASELINE);
    }
    let fast_path = |c: &Cluster| support::stats(c).kernel.get("fast_path");
    assert_eq!(fast_path(&c), Some(0), "not counted by default");
    let quiet = support::status(&c).programs_identity;
    assert!(!quiet.ends_with("-fpc"), "{quiet}");

    c.daemon().terminate().expect("stop");
    c.start(&["--count-fast-path"]);
    let counting = support::status(&c).programs_identity;
    assert_eq!(
        counting,
        format!("{quiet}-fpc"),
        "other programs, told apart"
    );
    assert_eq!(c.tcp(&c.member, VIP4), FORK, "steering went on");
    for _ in 0..3 {
        assert_eq!(c.tcp(&c.outsider, OTHER4), BASELINE);
    }
    assert!(fast_path(&c).unwrap_or(0) >= 3, "{:?}", support::stats(&c));
    // Only the counting programs are attached: the quiet ones were retired.
    assert_eq!(support::status(&c).programs.len(), 9);
    let mut tags = Vec::new();
    let retired = eventually(Duration::from_secs(5), || {
        tags = support::attached_tags(c.node.cgroup());
        tags.len() == 8
    });
    assert!(retired, "{tags:?}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let Some(mut c) = Cluster::new("api-pipe") else {
        return;
    };
    c.start(&[]);
    for args in [
        &["status", "-o", "json"][..],
        &["status"],
        &["sandbox", "list"],
    ] {
        // `redirector status -o json | head`, with head already gone: every write fails.
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        drop(read_end);
        let child = Command::new(support::redirector())
            .args(args)
            .arg("--socket")
            .arg(c.api_socket())
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .spawn()
            .expect("run redirector CLI");
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "redirector {args:?} into a closed pipe: {} {stderr}",
            out.status
        );
    }
}

/// `redirector ARGS --socket` against an L7 node's daemon; asserts success.
fn l7_cli(c: &L7, args: &[&str]) -> String {
    let out = Command::new(support::redirector())
        .args(args)
        .arg("--socket")
        .arg(c.node.dir().join("api.sock"))
        .output()
        .expect("run redirector CLI");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redirector {args:?}: {text}");
    text
}

#[test]
fn a_deleted_sandbox_leaves_no_metric_series_behind() {
    let Some(mut c) = L7::new("api-series") else {
        return;
    };
    let pr3_member = c.node.add_pod("pr3-member").expect("pod");
    c.start(Routes::both());
    let member = pr3_member.netns_path().to_string_lossy().into_owned();
    let route = format!("svc-a={}:8080", c.fork2.ipv4);
    l7_cli(
        &c,
        &[
            "sandbox", "create", "pr-3", "--member", &member, "--route", &route,
        ],
    );

    // A series in each per-sandbox family: a request routed on its key, a steered connection.
    let keyed = HttpReq::get("/who")
        .header("baggage", &baggage("pr-3"))
        .spec();
    let lines = c.http(&c.frontend, &["h1", "--addr", SVC_A, "--req", &keyed]);
    assert_eq!(served_by(&lines), ["fork-pr2"], "routed on the new key");
    let lines = c.http(&pr3_member, &["h1", "--addr", SVC_A]);
    assert_eq!(served_by(&lines), ["fork-pr2"], "the member is steered");
    let requests = "redirector_requests_total{sandbox=\"pr-3\",outcome=\"fork\"}";
    let steered = "redirector_connections_steered_total{sandbox=\"pr-3\",service=\"svc-a\"}";
    let metrics = scrape(&c.node);
    assert_eq!(sample(&metrics, requests), 1.0, "{metrics}");
    assert!(sample(&metrics, steered) >= 1.0, "{metrics}");

    l7_cli(&c, &["sandbox", "delete", "pr-3"]);
    let mut metrics = String::new();
    let gone = eventually(Duration::from_secs(5), || {
        metrics = scrape(&c.node);
        !metrics.contains("sandbox=\"pr-3\"")
    });
    assert!(gone, "pr-3's series outlived it:\n{metrics}");
    let lines = c.http(&c.frontend, &["h1", "--addr", SVC_A, "--req", &keyed]);
    assert_eq!(
        served_by(&lines),
        ["baseline"],
        "the key has no fork any more"
    );
}
