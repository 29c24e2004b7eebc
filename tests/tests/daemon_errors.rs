//! The daemon refuses bad placements and states with a clear error and leaves the machine as it
//! found it (or, for a rejected reload, as it was running).
mod support;

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use redirector_tests::hung_fs::HungMount;
use redirector_user::api::answers::MemberState;
use support::{Cluster, FORK, VIP4, attached_programs, cli, eventually, run_redirector, scrape};

fn run_with(c: &Cluster, extra: &[&str]) -> (bool, String) {
    c.write_config(&c.config_text(true));
    let config = c.config.to_string_lossy().into_owned();
    let mut args = vec!["run", "--config", &config];
    args.extend_from_slice(extra);
    run_redirector(&c.node, &args)
}

#[test]
fn missing_attach_cgroup_is_named() {
    let Some(c) = Cluster::new("err-cgroup") else {
        return;
    };
    let missing = c.node.cgroup().join("no-such-pods");
    let (ok, out) = run_with(&c, &["--cgroup", missing.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("no-such-pods") && out.contains("does not exist"),
        "{out}"
    );
    assert!(!c.pin_dir().exists());
}

#[test]
fn root_cgroup_is_refused() {
    let Some(c) = Cluster::new("err-rootcg") else {
        return;
    };
    let root = redirector_tests::cgroup2_mount().expect("cgroup2");
    let (ok, out) = run_with(&c, &["--cgroup", root.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("refusing to attach to the root cgroup"),
        "{out}"
    );
}

#[test]
fn pin_directory_outside_bpffs_is_refused() {
    let Some(c) = Cluster::new("err-bpffs") else {
        return;
    };
    let not_bpffs = c.node.dir().join("not-bpffs/redirector");
    let (ok, out) = run_with(&c, &["--bpffs", not_bpffs.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("no bpffs at") && out.contains("mount -t bpf"),
        "{out}"
    );
    assert!(attached_programs(c.node.cgroup()).is_empty());
}

#[test]
fn missing_member_namespace_is_a_warning_not_a_failure() {
    let Some(mut c) = Cluster::new("err-member") else {
        return;
    };
    let text = c.config_text(true).replace(
        "members = [\"",
        "members = [\"/run/netns/rdr-gone-pod\", \"",
    );
    c.write_config(&text);
    let daemon = c.start(&[]);
    assert!(
        daemon.logs().contains("member namespace not usable"),
        "{}",
        daemon.logs()
    );
    assert_eq!(c.tcp(&c.member, VIP4), FORK, "the other member is steered");
}

/// A member path through a file system that never answers (a hung FUSE or NFS mount: no
/// open flag makes that lookup non-blocking) costs the daemon one thread, not its control
/// loop: it starts, steers the other member, answers the API and the metrics endpoint at every
/// poll, applies changes, says what is wrong once, and tries the path again once the lookup
/// returns.
#[test]
fn member_path_on_a_hung_file_system_stalls_neither_the_api_nor_steering() {
    let Some(mut c) = Cluster::new("err-hung") else {
        return;
    };
    let mut hung = HungMount::new(&c.node.dir().join("hung")).expect("hung mount");
    let hung_member = hung.path("pod-ns");
    let text = c.config_text(true).replace(
        "members = [\"",
        &format!("members = [\"{}\", \"", hung_member.display()),
    );
    c.write_config(&text);
    c.start(&["--poll-interval", "200ms"]);
    assert_eq!(c.tcp(&c.member, VIP4), FORK, "the other member is steered");

    // Every call answers promptly over several polls (each poll sees the path again).
    let member_error = |c: &Cluster| {
        support::status(c)
            .members
            .into_iter()
            .find(|m| m.path == hung_member)
            .map(|m| (m.state, m.error.unwrap_or_default()))
    };
    for _ in 0..5 {
        let started = Instant::now();
        let (state, error) = member_error(&c).expect("the hung member is listed");
        assert_eq!(state, MemberState::Unresolved);
        assert!(error.contains("did not return within"), "{error}");
        assert!(scrape(&c.node).contains("redirector_"), "metrics answer");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "status and metrics took {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // A change through the API (its new member resolved as it applies) is not held up.
    let started = Instant::now();
    let outsider = c.outsider.netns_path().display().to_string();
    let route = format!("svc-a={}:8080", c.fork.ipv4);
    let (code, _, err) = cli(
        &c,
        &[
            "sandbox", "create", "pr-api", "--member", &outsider, "--route", &route,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "an API change applies promptly"
    );
    assert_eq!(c.tcp(&c.outsider, VIP4), FORK, "the change took effect");
    let logs = c.daemon().logs();
    assert_eq!(
        logs.matches("opening a member path hangs").count(),
        1,
        "said once, not at every poll:\n{logs}"
    );

    // Once the lookup returns, the path is tried again and fails for what it is now.
    hung.release();
    assert!(
        eventually(Duration::from_secs(3), || member_error(&c)
            .is_some_and(|(_, error)| !error.contains("did not return within"))),
        "tried again after the hung lookup returned: {:?}",
        member_error(&c)
    );
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
}

/// More routes than the routes map holds: the reload is refused before anything is written.
#[test]
fn full_route_map_is_refused_and_the_running_state_stays() {
    let Some(mut c) = Cluster::new("err-full") else {
        return;
    };
    c.start(&["--poll-interval", "200ms"]);
    let capacity = redirector_common_capacity();
    // services x sandboxes > capacity
    let services = 400;
    let sandboxes = capacity / services + 1;
    let mut text = c.config_text(true);
    for s in 0..services {
        let _ = write!(
            text,
            "\n[[service]]\nname = \"bulk-{s}\"\naddress = \"10.98.{}.{}:80\"\n",
            s / 250,
            s % 250 + 1
        );
    }
    for b in 0..sandboxes {
        let _ = write!(text, "\n[[sandbox]]\nkey = \"bulk-{b}\"\nroutes = [");
        for s in 0..services {
            let _ = write!(
                text,
                "{{ service = \"bulk-{s}\", fork = \"10.99.0.1:80\" }},"
            );
        }
        text.push_str("]\n");
    }
    let mark = c.daemon().log_len();
    c.write_config(&text);
    c.daemon()
        .wait_for_log_from(mark, "reload rejected", Duration::from_secs(60))
        .expect("refused");
    // The reason is on the lines after the first (one per error), written a moment later.
    c.daemon()
        .wait_for_log_from(mark, "the capacity is", Duration::from_secs(10))
        .expect("the reason follows");
    let logs = c.daemon().logs();
    assert!(logs.contains("map routes is full"), "{logs}");
    assert!(
        logs.contains(&format!("the capacity is {capacity}")),
        "{logs}"
    );
    assert_eq!(c.tcp(&c.member, VIP4), FORK, "running state unchanged");
}

/// Keep in sync with `redirector_common::map_sizes::ROUTES`.
fn redirector_common_capacity() -> usize {
    131_072
}

#[test]
fn not_root_is_a_clear_error() {
    let Some(c) = Cluster::new("err-notroot") else {
        return;
    };
    c.write_config(&c.config_text(true));
    // A copy nobody can execute wherever the build tree lives.
    let binary = c.node.dir().join("redirector");
    std::fs::copy(support::redirector(), &binary).expect("copy binary");
    // The copy's write descriptor may live on a moment in a child another test thread forked
    // meanwhile, and exec then fails with "Text file busy": try again until it is gone.
    let mut out;
    let mut tries = 0;
    loop {
        out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&binary)
            .args(["run", "--config"])
            .arg(&c.config)
            .output()
            .expect("setpriv (util-linux) runs the daemon as nobody");
        tries += 1;
        if tries == 50 || !String::from_utf8_lossy(&out.stderr).contains("Text file busy") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("redirector must run as root"), "{stderr}");
    assert!(attached_programs(c.node.cgroup()).is_empty());
}

#[test]
fn json_logs_for_collectors() {
    let Some(mut c) = Cluster::new("err-jsonlog") else {
        return;
    };
    let daemon = c.start(&["--log-format", "json"]);
    let logs = daemon.logs();
    let ready = logs
        .lines()
        .filter_map(|l| l.find('{').map(|i| &l[i..]))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "ready")
        .unwrap_or_else(|| panic!("no JSON `ready` line in:\n{logs}"));
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["fields"]["routes"], 4);
}

/// With `--mount-bpffs` (always on with Kubernetes), a pin directory whose mount point is an
/// empty directory without a bpffs gets one, as on a node that never mounted /sys/fs/bpf.
#[test]
fn an_empty_mount_point_gets_a_bpffs_when_asked() {
    let Some(mut c) = Cluster::new("auto-bpffs") else {
        return;
    };
    let mount_point = c.node.dir().join("bpf-auto");
    std::fs::create_dir(&mount_point).expect("mount point");
    let _unmount = UnmountOnDrop(mount_point.clone());
    let pins = mount_point.join("redirector");
    let pins = pins.to_str().expect("utf-8 path");
    let daemon = c.start(&["--mount-bpffs", "--bpffs", pins, "--cleanup-on-exit"]);
    assert!(daemon.logs().contains("mounted one"), "{}", daemon.logs());
    let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(mount_point.to_str().unwrap_or("?")) && l.contains(" bpf ")),
        "a bpffs at {}: {mounts}",
        mount_point.display()
    );
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
    c.daemon().terminate().expect("stop");
}

struct UnmountOnDrop(std::path::PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A `stats` call walks the route counters (one entry per route that steered, up to the
/// capacity): the walk runs off the control loop, so a call sent meanwhile is answered first.
#[test]
fn a_long_stats_walk_does_not_hold_up_other_calls() {
    use aya::maps::{Map, MapData, PerCpuHashMap, PerCpuValues};
    use redirector_common::{RouteKey, map_names, map_sizes};

    let Some(mut c) = Cluster::new("err-walk") else {
        return;
    };
    c.start(&[]);
    // Counters of routes that do not exist (the next apply would remove them), as many as the
    // map holds: the longest walk a node can ask of `stats`.
    let pin = c.pin_dir().join(map_names::ROUTE_STATS);
    let data = MapData::from_pin(&pin).expect("route counters pinned");
    let mut counters: PerCpuHashMap<MapData, RouteKey, u64> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).expect("a per-CPU hash map");
    let cpus = aya::util::nr_cpus().expect("possible CPUs");
    for n in 0..map_sizes::ROUTE_STATS {
        let key = RouteKey {
            service_id: u32::MAX - n,
            sandbox_id: u32::MAX,
        };
        let values = PerCpuValues::try_from(vec![1u64; cpus]).expect("values");
        counters.insert(key, values, 0).expect("insert");
    }

    let started = Instant::now();
    let stats = std::thread::spawn({
        let socket = c.api_socket();
        move || {
            let out = std::process::Command::new(support::redirector())
                .args(["stats", "-o", "json", "--socket"])
                .arg(&socket)
                .output()
                .expect("run redirector stats");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            started.elapsed()
        }
    });
    // Sent once the stats call is surely with the daemon.
    std::thread::sleep(Duration::from_millis(100));
    let (code, _, stderr) = cli(&c, &["sandbox", "list"]);
    assert_eq!(code, 0, "{stderr}");
    let listed = started.elapsed();
    let walked = stats.join().expect("stats thread");
    // On the loop, the list would wait for the whole walk and end with it.
    assert!(
        listed * 2 < walked,
        "the list ({listed:?}) was answered well before the stats walk ended ({walked:?})"
    );
}
