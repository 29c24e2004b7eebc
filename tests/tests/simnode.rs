//! Self-tests of the simulated-node harness: no daemon involved, only namespaces, the kube-proxy
//! stand-in and rdr-peer.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use redirector_tests::{CallOpts, Daemon, Node, Pod, Proto, Server, require_e2e};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const PORT: u16 = 8080;

struct Cluster {
    // Field order is drop order: the server goes before the node tears the namespaces down.
    _baseline: Server,
    client: Pod,
    base: Pod,
    node: Node,
}

fn cluster(label: &str) -> Cluster {
    let mut node = Node::new(label).expect("node");
    let client = node.add_pod("client").expect("client pod");
    let base = node.add_pod("base").expect("base pod");
    let baseline = base
        .serve(&node, "baseline", PORT)
        .expect("baseline server");
    node.add_vip(IpAddr::V4(VIP4), &base).expect("v4 VIP");
    node.add_vip(IpAddr::V6(VIP6), &base).expect("v6 VIP");
    Cluster {
        _baseline: baseline,
        client,
        base,
        node,
    }
}

struct Footprint {
    prefix: String,
    cgroup: PathBuf,
    bpffs: PathBuf,
    dir: PathBuf,
}

impl Footprint {
    fn of(node: &Node) -> Footprint {
        Footprint {
            prefix: node.prefix().to_owned(),
            cgroup: node.cgroup().to_owned(),
            bpffs: node.bpffs().to_owned(),
            dir: node.dir().to_owned(),
        }
    }

    fn assert_gone(&self) {
        let out = Command::new(redirector_tests::ip_bin().expect("ip"))
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        let list = String::from_utf8_lossy(&out.stdout);
        let ours = format!("{}-", self.prefix);
        assert!(
            !list.lines().any(|l| l.starts_with(&ours)),
            "netns left behind:\n{list}"
        );
        assert!(
            !self.cgroup.exists(),
            "cgroup {} left behind",
            self.cgroup.display()
        );
        let mounts = fs::read_to_string("/proc/mounts").expect("/proc/mounts");
        assert!(
            !mounts.contains(&self.prefix),
            "mount left behind:\n{mounts}"
        );
        assert!(!self.bpffs.exists(), "{} left behind", self.bpffs.display());
        assert!(!self.dir.exists(), "{} left behind", self.dir.display());
    }
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP4), port)
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(VIP6), port)
}

fn mapped(port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(VIP4.to_ipv6_mapped(), port, 0, 0))
}

/// True once `pid` has exited (a zombie awaiting its new parent counts as exited).
fn gone(pid: u32) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return true;
            }
            Ok(_) if std::time::Instant::now() > deadline => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn vips_answer_over_tcp_and_udp() {
    if !require_e2e() {
        return;
    }
    let c = cluster("vips");
    let footprint = Footprint::of(&c.node);

    for (addr, opts, expect) in [
        (v4(PORT), CallOpts::new(), v4(PORT)),
        (v6(PORT), CallOpts::new(), v6(PORT)),
        (v4(PORT), CallOpts::new().v6_mapped(), mapped(PORT)),
        (v4(PORT), CallOpts::new().in_cgroup(false), v4(PORT)),
    ] {
        let r = c
            .client
            .call(&c.node, Proto::Tcp, addr, &opts)
            .unwrap_or_else(|e| panic!("tcp {addr} {opts:?}: {e:#}"));
        assert_eq!(r.server, "baseline", "tcp {addr} {opts:?}");
        assert_eq!(r.peer, expect, "tcp {addr} {opts:?}");
        assert_eq!(r.peer_unmapped(), addr, "tcp {addr} {opts:?}");
    }

    for (addr, opts, expect) in [
        (v4(PORT), CallOpts::new(), v4(PORT)),
        (v6(PORT), CallOpts::new(), v6(PORT)),
        (v4(PORT), CallOpts::new().v6_mapped(), mapped(PORT)),
        (v4(PORT), CallOpts::new().connected(), v4(PORT)),
        (v6(PORT), CallOpts::new().connected(), v6(PORT)),
        (
            v4(PORT),
            CallOpts::new().connected().v6_mapped(),
            mapped(PORT),
        ),
    ] {
        let r = c
            .client
            .call(&c.node, Proto::Udp, addr, &opts)
            .unwrap_or_else(|e| panic!("udp {addr} {opts:?}: {e:#}"));
        assert_eq!(r.server, "baseline", "udp {addr} {opts:?}");
        // An unconnected reply must come from the VIP itself, as through kube-proxy's DNAT.
        assert_eq!(r.peer, expect, "udp {addr} {opts:?}");
    }

    // The short forms, and pod addresses directly (the way forks are reached).
    let r = c
        .client
        .call_tcp(&c.node, v4(PORT), true)
        .expect("call_tcp");
    assert_eq!((r.server.as_str(), r.peer), ("baseline", v4(PORT)));
    let r = c
        .client
        .call_udp(&c.node, v6(PORT), true)
        .expect("call_udp");
    assert_eq!((r.server.as_str(), r.peer), ("baseline", v6(PORT)));
    let direct = SocketAddr::new(IpAddr::V6(c.base.ipv6), PORT);
    let r = c.client.call_tcp(&c.node, direct, true).expect("pod ip");
    assert_eq!(r.peer, direct);

    drop(c);
    footprint.assert_gone();
}

#[test]
fn unreachable_and_closed_ports_fail_fast() {
    if !require_e2e() {
        return;
    }
    let c = cluster("failures");
    let fast = CallOpts::new().timeout(Duration::from_millis(500));
    // Nothing listens there: refused, reported as an error, not a hang.
    let err = c
        .client
        .call(&c.node, Proto::Tcp, v4(PORT + 1), &fast)
        .expect_err("closed port");
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
    // No route beyond the node: the node ns has no uplink.
    let outside = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 80);
    assert!(c.client.call(&c.node, Proto::Tcp, outside, &fast).is_err());
    assert!(
        c.client
            .call(&c.node, Proto::Udp, v6(PORT + 1), &fast)
            .is_err()
    );
}

#[test]
fn session_carries_several_lines() {
    if !require_e2e() {
        return;
    }
    let c = cluster("session");
    for addr in [v4(PORT), v6(PORT)] {
        let mut s = c.client.session_tcp(&c.node, addr).expect("session");
        assert_eq!(s.peer(), addr);
        for line in ["one", "two", "three"] {
            let reply = s.send(line).expect("reply");
            assert_eq!(reply.server, "baseline");
            assert_eq!(reply.line, line);
        }
        s.close().expect("clean close");
    }

    // A session notices when the server goes away.
    let second = c.base.serve(&c.node, "second", PORT + 2).expect("server");
    let mut s = c
        .client
        .session_tcp(&c.node, v4(PORT + 2))
        .expect("session");
    assert_eq!(s.send("before").expect("reply").server, "second");
    second.stop();
    assert!(s.send("after").is_err(), "session survived its server");
}

#[test]
fn pod_command_enters_cgroup_and_netns() {
    if !require_e2e() {
        return;
    }
    let c = cluster("command");
    let script = "cat /proc/self/cgroup; stat -L -c %i /proc/self/ns/net";
    let run = |in_cgroup: bool| {
        let out = c
            .client
            .command(&c.node, "/bin/sh", in_cgroup)
            .args(["-c", script])
            .output()
            .expect("run sh in pod");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ns_ino = fs::metadata(c.client.netns_path()).expect("netns").ino();
    let cg_line = format!("0::/{}", c.node.prefix());

    let inside = run(true);
    assert!(inside.lines().any(|l| l == cg_line), "{inside}");
    assert!(inside.lines().any(|l| l == ns_ino.to_string()), "{inside}");

    let outside = run(false);
    assert!(!outside.lines().any(|l| l == cg_line), "{outside}");
    assert!(
        outside.lines().any(|l| l == ns_ino.to_string()),
        "{outside}"
    );

    // The node command runs in the node namespace, outside the cgroup.
    let out = c
        .node
        .command("/bin/sh")
        .args(["-c", script])
        .output()
        .expect("run sh in node");
    let text = String::from_utf8_lossy(&out.stdout);
    let node_ino = fs::metadata(c.node.netns_path()).expect("netns").ino();
    assert!(text.lines().any(|l| l == node_ino.to_string()), "{text}");
    assert!(!text.lines().any(|l| l == cg_line), "{text}");
}

#[test]
fn teardown_kills_strays_and_leaves_nothing() {
    if !require_e2e() {
        return;
    }
    let c = cluster("teardown");
    let footprint = Footprint::of(&c.node);
    // A process in the cgroup and one only in the pod's netns: both must be gone afterwards.
    let mut in_cg = c
        .client
        .command(&c.node, "/bin/sleep", true)
        .arg("600")
        .spawn()
        .expect("sleep in cgroup");
    let mut in_ns = c
        .base
        .command(&c.node, "/bin/sleep", false)
        .arg("600")
        .spawn()
        .expect("sleep in netns");
    // Something pinned in the private bpffs, like a daemon would leave.
    fs::create_dir(c.node.bpffs().join("redirector")).expect("mkdir in bpffs");
    fs::write(c.node.dir().join("config.toml"), "x = 1\n").expect("scratch file");

    drop(c);
    footprint.assert_gone();
    assert!(
        in_cg.wait().expect("wait").code().is_none(),
        "killed by a signal"
    );
    assert!(
        in_ns.wait().expect("wait").code().is_none(),
        "killed by a signal"
    );
}

#[test]
fn teardown_runs_on_panic() {
    if !require_e2e() {
        return;
    }
    let mut footprint = None;
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let c = cluster("panic");
        footprint = Some(Footprint::of(&c.node));
        panic!("test failure inside a node");
    }));
    assert!(res.is_err());
    footprint.expect("node was built").assert_gone();
}

#[test]
fn sweep_removes_leftovers_of_dead_runs() {
    if !require_e2e() {
        return;
    }
    // A pid that surely is not running any more.
    let mut child = Command::new("/bin/true").spawn().expect("spawn true");
    let dead = child.id();
    child.wait().expect("wait");
    let prefix = format!("rdrt-{dead}-0");
    let ip = redirector_tests::ip_bin().expect("ip");
    let ns = format!("{prefix}-node");
    assert!(
        Command::new(ip)
            .args(["netns", "add", &ns])
            .status()
            .expect("ip netns add")
            .success()
    );
    let cgroup = redirector_tests::cgroup2_mount()
        .expect("cgroup2")
        .join(&prefix);
    fs::create_dir(&cgroup).expect("cgroup");
    let dir = Path::new("/run/redirector-test").join(&prefix);
    let bpffs = dir.join("bpffs");
    // A concurrent test run may sweep this fake leftover between mkdir and mount; retry.
    let mounted = (0..20).any(|_| {
        fs::create_dir_all(&bpffs).is_ok()
            && Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&bpffs)
                .status()
                .is_ok_and(|s| s.success())
    });
    assert!(mounted, "could not mount a bpffs at {}", bpffs.display());

    let node = Node::new("sweeper").expect("node");
    let footprint = Footprint {
        prefix,
        cgroup,
        bpffs,
        dir,
    };
    footprint.assert_gone();
    drop(node);
}

#[test]
fn daemon_logs_and_signals() {
    if !require_e2e() {
        return;
    }
    let sh = Path::new("/bin/sh");
    let script = |s: &str| vec!["-c".into(), s.into()];

    let mut d = Daemon::spawn(
        "d1",
        sh,
        &script("echo started; echo oops >&2; exec sleep 600"),
    )
    .expect("spawn");
    d.wait_for_log("started", Duration::from_secs(5))
        .expect("stdout line");
    d.wait_for_log("oops", Duration::from_secs(5))
        .expect("stderr line");
    let err = d
        .wait_for_log("never", Duration::from_millis(200))
        .expect_err("absent line");
    assert!(
        format!("{err:#}").contains("started"),
        "error carries the log: {err:#}"
    );
    assert!(d.try_wait().expect("try_wait").is_none());
    let st = d.terminate().expect("terminate");
    assert!(st.code().is_none(), "sleep dies of SIGTERM: {st:?}");

    let mut d = Daemon::spawn(
        "d2",
        sh,
        &script("trap 'echo bye; exit 3' TERM; echo up; while :; do sleep 0.1; done"),
    )
    .expect("spawn");
    d.wait_for_log("up", Duration::from_secs(5)).expect("up");
    let st = d.terminate().expect("terminate");
    assert_eq!(st.code(), Some(3));
    assert!(d.logs().contains("bye"), "{}", d.logs());

    let mut d = Daemon::spawn("d3", sh, &script("echo up; exec sleep 600")).expect("spawn");
    d.wait_for_log("up", Duration::from_secs(5)).expect("up");
    let pid = d.pid();
    d.kill9();
    assert!(gone(pid), "pid {pid} survived kill9");

    // Exit without the line: fails fast with the log rather than waiting out the timeout.
    let d = Daemon::spawn("d4", sh, &script("echo bad config; exit 2")).expect("spawn");
    let t = std::time::Instant::now();
    assert!(d.wait_for_log("ready", Duration::from_secs(30)).is_err());
    assert!(t.elapsed() < Duration::from_secs(10));

    // Drop reaches the whole process group, grandchildren included.
    let d = Daemon::spawn("d5", sh, &script("sleep 600 & echo $!; wait")).expect("spawn");
    d.wait_for_log("", Duration::from_secs(5))
        .expect("pid line");
    let grandchild: u32 = d.logs().trim().parse().expect("pid");
    drop(d);
    assert!(gone(grandchild), "grandchild {grandchild} survived");
}
