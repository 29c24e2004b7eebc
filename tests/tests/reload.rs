//! Live reconfiguration: reload on file change and SIGHUP, make-before-break, and rejection of
//! bad files with the running state untouched.
mod support;

use std::{
    ffi::OsString,
    fmt::Write as _,
    io::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use support::{BASELINE, Cluster, FORK, VIP4, VIP6, addr, redirector, run_redirector};

const RELOAD: Duration = Duration::from_secs(10);

#[test]
fn removed_route_sends_new_connections_to_baseline_and_keeps_established_ones() {
    let Some(mut c) = Cluster::new("reload-remove") else {
        return;
    };
    c.start(&["--poll-interval", "200ms"]);
    watching(&mut c);
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
    watching(&mut c);
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

/// A file with nothing in it (truncated, or caught between an editor's truncate and write) is
/// refused as a reload even when `--cgroup` leaves the file nothing it must hold, and
/// `validate` says the same; an explicit `[daemon]` table and nothing else does empty it.
#[test]
fn empty_file_over_a_running_config_is_refused_and_steering_stays() {
    let Some(mut c) = Cluster::new("reload-empty") else {
        return;
    };
    let cgroup = c.node.cgroup().to_string_lossy().into_owned();
    c.start(&["--poll-interval", "200ms", "--cgroup", &cgroup]);
    watching(&mut c);
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
    let config = c.config.to_string_lossy().into_owned();
    for empty in ["", "\n# every line commented out\n# [[sandbox]]\n\n"] {
        let mark = c.daemon().log_len();
        c.write_config(empty);
        c.daemon()
            .wait_for_log_from(mark, "reload rejected", RELOAD)
            .unwrap_or_else(|e| panic!("{empty:?} must be refused: {e:#}"));
        c.daemon()
            .wait_for_log_from(mark, "write an empty `[daemon]` table", RELOAD)
            .expect("the error says how to empty the state for real");
        assert_eq!(c.tcp(&c.member, VIP4), FORK, "steering stays");
        assert_eq!(c.udp(&c.member, VIP6), FORK, "steering stays");
        let (ok, output) = run_redirector(&c.node, &["validate", "--config", &config]);
        assert!(
            !ok && output.contains("write an empty `[daemon]` table"),
            "validate agrees with the daemon on {empty:?}:\n{output}"
        );
    }

    let text = c.config_text(true);
    let daemon_only = &text[..text.find("[[service]]").expect("services")];
    let mark = c.daemon().log_len();
    c.write_config(daemon_only);
    c.daemon()
        .wait_for_log_from(mark, "reload applied", RELOAD)
        .expect("an explicit [daemon] table empties the state");
    assert_eq!(c.tcp(&c.member, VIP4), BASELINE);
}

/// A config path that is a FIFO: refused at start at once, and on reload without stalling the
/// control loop (the API still answers) or the steering.
#[test]
fn fifo_config_fails_fast_at_start_and_is_refused_on_reload_without_blocking_the_api() {
    let Some(mut c) = Cluster::new("reload-fifo") else {
        return;
    };
    let fifo = c.node.dir().join("fifo.toml");
    mkfifo(&fifo);
    let args: Vec<OsString> = vec!["run".into(), "--config".into(), fifo.clone().into()];
    let mut refused = c
        .node
        .spawn_daemon("redirector-fifo", &redirector(), &args)
        .expect("spawn");
    let status = refused
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon must not block on a FIFO config");
    assert!(!status.success());
    assert!(
        refused
            .logs()
            .contains("fifo.toml is a FIFO, not a regular file"),
        "{}",
        refused.logs()
    );
    assert!(!c.pin_dir().exists(), "nothing pinned");

    c.start(&["--poll-interval", "200ms"]);
    watching(&mut c);
    let mark = c.daemon().log_len();
    std::fs::rename(&fifo, &c.config).expect("FIFO over the config");
    c.daemon()
        .wait_for_log_from(
            mark,
            "redirector.toml is a FIFO, not a regular file",
            RELOAD,
        )
        .expect("reload refused");
    assert!(c.daemon().logs().contains("reload rejected"));
    assert_answers(&c);
    assert_eq!(c.tcp(&c.member, VIP4), FORK, "steering stays");

    // A regular file again is read again.
    let mark = c.daemon().log_len();
    c.write_config(&c.config_text(false));
    c.daemon()
        .wait_for_log_from(mark, "reload applied", RELOAD)
        .expect("reload of the repaired file");
    assert_eq!(c.tcp(&c.member, VIP4), BASELINE);
}

/// A config path that leads to `/dev/zero` is refused for what it is, never read (it was read
/// until the daemon ran out of memory).
#[test]
fn dev_zero_symlink_as_config_is_refused_with_the_type_error() {
    let Some(mut c) = Cluster::new("reload-zero") else {
        return;
    };
    c.start(&["--poll-interval", "200ms"]);
    watching(&mut c);
    let link = c.node.dir().join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &link).expect("symlink");
    let zero = link.to_string_lossy().into_owned();
    let (ok, output) = run_redirector(&c.node, &["validate", "--config", &zero]);
    assert!(
        !ok && output.contains("zero.toml is a character device, not a regular file"),
        "{output}"
    );

    let mark = c.daemon().log_len();
    std::fs::rename(&link, &c.config).expect("symlink over the config");
    c.daemon()
        .wait_for_log_from(
            mark,
            "redirector.toml is a character device, not a regular file",
            RELOAD,
        )
        .expect("reload refused");
    assert_answers(&c);
    assert_eq!(c.tcp(&c.member, VIP4), FORK, "steering stays");
}

/// A file rewritten in place, in pieces with pauses shorter than a poll interval, is applied
/// once, whole: no partial file (each of them valid TOML) is ever applied or even rejected.
#[test]
fn file_written_in_place_in_pieces_is_applied_once_whole() {
    let Some(mut c) = Cluster::new("reload-pieces") else {
        return;
    };
    const POLL: Duration = Duration::from_millis(500);
    // Five pauses span 1.5 polls, so some poll lands on a partial file; none lasts a poll.
    const PAUSE: Duration = Duration::from_millis(150);
    c.start(&["--poll-interval", "500ms"]);
    watching(&mut c);
    let text = c.config_text(false);
    // Each cut leaves a valid file behind it: the [daemon] table and the first services.
    let mut cuts: Vec<usize> = text.match_indices("[[service]]").map(|(i, _)| i).collect();
    cuts.remove(0);
    cuts.push(text.find("[[sandbox]]").expect("sandbox"));
    cuts.push(text.len());
    assert_eq!(cuts.len(), 6);

    let mark = c.daemon().log_len();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&c.config)
        .expect("open the config in place");
    let mut from = 0;
    for (n, &cut) in cuts.iter().enumerate() {
        if n > 0 {
            std::thread::sleep(PAUSE);
        }
        file.write_all(&text.as_bytes()[from..cut]).expect("write");
        from = cut;
    }
    drop(file);
    assert!(PAUSE * 5 > POLL);

    let since_mark = |c: &mut Cluster| -> Vec<String> {
        c.daemon()
            .logs()
            .lines()
            .skip(mark)
            .filter(|l| l.contains("reload"))
            .map(str::to_owned)
            .collect()
    };
    let whole = |l: &String| {
        l.contains("reload applied") && l.contains("sandboxes=1") && l.contains("routes=0")
    };
    assert!(
        support::eventually(RELOAD, || since_mark(&mut c).iter().any(whole)),
        "the whole file is applied:\n{}",
        c.daemon().logs()
    );
    let reloads = since_mark(&mut c);
    assert_eq!(
        reloads.len(),
        1,
        "one reload, of the whole file: {reloads:#?}"
    );
    assert_eq!(c.tcp(&c.member, VIP4), BASELINE);
}

/// `validate` refuses a file the kernel maps cannot hold, as the daemon does, and does so
/// before building the file into values (which took half a gigabyte for this one).
#[test]
fn validate_refuses_a_file_over_route_capacity_quickly_and_in_little_memory() {
    const ROUTES: usize = 300_003;
    const SERVICES: usize = 1000;
    let dir = ScratchDir::new("validate-capacity");
    let path = dir.0.join("big.toml");
    let mut text = String::new();
    for s in 0..SERVICES {
        let _ = write!(
            text,
            "[[service]]\nname = \"s{s}\"\naddress = \"10.96.{}.{}:80\"\n",
            s / 250,
            s % 250 + 1
        );
    }
    let mut written = 0;
    for b in 0.. {
        if written == ROUTES {
            break;
        }
        let n = SERVICES.min(ROUTES - written);
        let _ = write!(text, "[[sandbox]]\nkey = \"b{b}\"\nroutes = [");
        for s in 0..n {
            let _ = write!(text, "{{ service = \"s{s}\", fork = \"10.0.0.1:80\" }},");
        }
        text.push_str("]\n");
        written += n;
    }
    std::fs::write(&path, &text).expect("write the file");

    let started = Instant::now();
    let (status, max_rss_kib, output) = run_measured(
        std::process::Command::new(redirector())
            .arg("validate")
            .arg("--config")
            .arg(&path),
        &dir.0,
    );
    let took = started.elapsed();
    assert!(!status.success(), "validate must refuse it:\n{output}");
    assert!(
        output.contains(
            "map routes is full: the sandboxes have 300003 routes, the capacity is 131072"
        ),
        "{output}"
    );
    // The file is 13 MB; building it into values took 500 MB.
    assert!(
        max_rss_kib < 200 * 1024,
        "validate peaked at {max_rss_kib} KiB"
    );
    assert!(took < Duration::from_secs(20), "validate took {took:?}");
}

/// Returns once the daemon's file watcher runs: it takes the file as it finds it when it starts,
/// a moment after "ready", so a change made before that would go unnoticed (hence a retry).
fn watching(c: &mut Cluster) {
    let text = std::fs::read_to_string(&c.config).expect("config");
    for attempt in 0..3 {
        let mark = c.daemon().log_len();
        c.write_config(&format!("{text}# watched {attempt}\n"));
        let seen = c
            .daemon()
            .wait_for_log_from(mark, "reload applied", Duration::from_secs(3));
        if seen.is_ok() {
            return;
        }
    }
    panic!(
        "the daemon never reloaded a changed file:\n{}",
        c.daemon().logs()
    );
}

fn mkfifo(path: &std::path::Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

/// `redirector status` answers within a few seconds: the control loop is not stuck.
fn assert_answers(c: &Cluster) {
    let out_path = c.node.dir().join("status.out");
    let out = std::fs::File::create(&out_path).expect("status output file");
    let mut child = std::process::Command::new(redirector())
        .args(["status", "--socket"])
        .arg(c.api_socket())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("run redirector status");
    let answered = support::eventually(Duration::from_secs(5), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !answered {
        let _ = child.kill();
        let _ = child.wait();
    }
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(answered, "`redirector status` did not answer within 5 s");
    assert!(
        child.wait().expect("status").success(),
        "redirector status:\n{output}"
    );
}

/// A directory of the test's own under the temp dir, removed when dropped (pass or fail).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(label: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("rdr-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` to completion: (status, peak resident memory in KiB, stdout and stderr). The
/// peak is the child's own (wait4), not that of other tests' children.
#[expect(
    clippy::zombie_processes,
    reason = "reaped by wait4, which std's wait does not offer"
)]
fn run_measured(
    cmd: &mut std::process::Command,
    dir: &std::path::Path,
) -> (std::process::ExitStatus, i64, String) {
    use std::os::unix::process::ExitStatusExt as _;
    let out_path = dir.join("output");
    let out = std::fs::File::create(&out_path).expect("output file");
    let child = cmd
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawn");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 reaps our own child and fills both.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4");
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    (
        std::process::ExitStatus::from_raw(status),
        usage.ru_maxrss,
        output,
    )
}
