//! Live reconfiguration: reload on file change and SIGHUP, make-before-break, and rejection of
//! bad files with the running state untouched.
mod support;

use std::time::Duration;

use support::{BASELINE, Cluster, FORK, VIP4, VIP6, addr, run_redirector};

const RELOAD: Duration = Duration::from_secs(10);

#[test]
fn removed_route_sends_new_connections_to_baseline_and_keeps_established_ones() {
    let Some(mut c) = Cluster::new("reload-remove") else {
        return;
    };
    c.start(&["--poll-interval", "200ms"]);
    let mut established = c.member.session_tcp(&c.node, addr(VIP4)).expect("session");
    assert_eq!(established.peer(), addr(VIP4));
    assert_eq!(established.send("before").expect("send").server, FORK);

    let mark = c.daemon().log_len();
    c.write_config(&c.config_text(false));
    c.daemon()
        .wait_for_log_from(mark, "reload applied", RELOAD)
        .expect("reload on file change");

    assert_eq!(c.tcp(&c.member, VIP4), BASELINE, "new tcp connection");
    assert_eq!(c.udp(&c.member, VIP6), BASELINE, "new udp socket");
    let reply = established
        .send("after")
        .expect("established connection survives");
    assert_eq!(
        reply.server, FORK,
        "established connection stays on the fork"
    );

    // And back: adding the route again steers the next connection.
    let mark = c.daemon().log_len();
    c.write_config(&c.config_text(true));
    c.daemon()
        .wait_for_log_from(mark, "reload applied", RELOAD)
        .expect("reload");
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
}

#[test]
fn sighup_reloads_without_waiting_for_the_poll() {
    let Some(mut c) = Cluster::new("reload-hup") else {
        return;
    };
    // A poll interval far longer than the test: only SIGHUP can trigger the reload.
    c.start(&["--poll-interval", "3600s"]);
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
    c.write_config(&c.config_text(false));
    let mark = c.daemon().log_len();
    let pid = nix::unistd::Pid::from_raw(c.daemon().pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    c.daemon()
        .wait_for_log_from(mark, "reload applied", RELOAD)
        .expect("reload on SIGHUP");
    assert!(c.daemon().logs().contains("SIGHUP"));
    assert_eq!(c.tcp(&c.member, VIP4), BASELINE);
}

#[test]
fn invalid_file_is_rejected_whole_and_the_running_state_stays() {
    let Some(mut c) = Cluster::new("reload-bad") else {
        return;
    };
    c.start(&["--poll-interval", "200ms"]);
    // Removes every route (a valid change) *and* references an unknown service: nothing of it
    // may apply.
    let bad = c.config_text(false).replace(
        "routes = []",
        "routes = [{ service = \"svc-zzz\", fork = \"10.1.1.1:80\" }]",
    );
    let line = bad.lines().position(|l| l.contains("svc-zzz")).unwrap() + 1;
    let mark = c.daemon().log_len();
    c.write_config(&bad);
    c.daemon()
        .wait_for_log_from(mark, "reload rejected", RELOAD)
        .expect("rejection logged");
    // The error's detail lines follow the first one: wait for them rather than race the pipe.
    let location = format!("redirector.toml:{line}:");
    c.daemon()
        .wait_for_log_from(mark, &location, RELOAD)
        .unwrap_or_else(|e| panic!("error names the line {line}: {e:#}"));
    let logs = c.daemon().logs();
    assert!(
        logs.contains("sandbox[0].routes[0].service"),
        "error names the field:\n{logs}"
    );
    assert!(logs.contains("unknown service"), "{logs}");

    assert_eq!(c.tcp(&c.member, VIP4), FORK, "running state unchanged");
    assert_eq!(c.udp(&c.member, VIP4), FORK, "running state unchanged");
    assert!(
        c.daemon().try_wait().expect("wait").is_none(),
        "daemon still running"
    );

    // A TOML syntax error is rejected the same way.
    let mark = c.daemon().log_len();
    c.write_config("[[service]\nname = ");
    c.daemon()
        .wait_for_log_from(mark, "reload rejected", RELOAD)
        .expect("syntax error rejected");
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
}

#[test]
fn invalid_file_at_start_is_a_clear_error_and_touches_nothing() {
    let Some(c) = Cluster::new("reload-badstart") else {
        return;
    };
    let bad = c.config_text(true).replace(VIP6, "fd00:96::10:8080");
    let line = bad
        .lines()
        .position(|l| l.contains("fd00:96::10:8080"))
        .unwrap()
        + 1;
    c.write_config(&bad);
    let config = c.config.to_string_lossy().into_owned();
    let (ok, output) = run_redirector(&c.node, &["run", "--config", &config]);
    assert!(!ok, "daemon must refuse the file:\n{output}");
    assert!(
        output.contains(&format!("redirector.toml:{line}:"))
            && output.contains("service[1].address"),
        "error names line {line} and the field:\n{output}"
    );
    assert!(!c.pin_dir().exists(), "nothing pinned");
    assert!(
        support::attached_programs(c.node.cgroup()).is_empty(),
        "nothing attached"
    );
    assert_eq!(c.tcp(&c.member, VIP4), BASELINE);
}
