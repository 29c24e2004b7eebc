//! `cargo xtask demo`: redirector steering real traffic on a simulated node.
//!
//! The node is built out of network namespaces (see `redirector_tests::simnode`): a baseline
//! and a fork of `svc-a`, a pod that belongs to sandbox `pr-123`, and one that does not. The
//! daemon runs from a config file; the demo shows who answers each pod, removes the route
//! with a live reload, shows traffic back on the baseline, and tears everything down.
use std::{ffi::OsString, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use redirector_tests::{Node, Pod, workspace_bin};

use crate::setup;

#[derive(clap::Args, Default)]
pub struct Options {}

const VIP4: &str = "10.96.0.10:8080";
const VIP6: &str = "[fd00:96::10]:8080";

pub fn run(_opts: &Options) -> anyhow::Result<()> {
    setup::run(&setup::Options::default())?;
    if !is_root() {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    step("Building redirector and the demo peer");
    setup::status(std::process::Command::new(env!("CARGO")).args(["build", "--bins"]))?;
    let redirector = workspace_bin("redirector")?;

    step("Bringing up a simulated node (network namespaces as pods)");
    let mut node = Node::new("demo")?;
    let baseline = node.add_pod("svc-a")?;
    let fork = node.add_pod("svc-a-pr123")?;
    let member = node.add_pod("tester-pr123")?;
    let frontend = node.add_pod("frontend")?;
    let vip4: SocketAddr = VIP4.parse()?;
    let vip6: SocketAddr = VIP6.parse()?;
    node.add_vip(vip4.ip(), &baseline)?;
    node.add_vip(vip6.ip(), &baseline)?;
    let _servers = [
        baseline.serve(&node, "svc-a-baseline", 8080)?,
        fork.serve(&node, "svc-a-fork-pr-123", 8080)?,
    ];
    println!("  pods: frontend, tester-pr123 (member of sandbox pr-123), svc-a, svc-a-pr123");
    println!(
        "  service svc-a: {VIP4} and {VIP6} -> baseline pod {}",
        baseline.ipv4
    );

    let config = node.dir().join("redirector.toml");
    let with_route = config_text(&node, &member, &fork, true);
    std::fs::write(&config, &with_route).context("writing the demo config")?;
    println!("\n{with_route}");

    step("Starting the daemon");
    let args: Vec<OsString> = vec![
        "run".into(),
        "--config".into(),
        config.clone().into(),
        "--cleanup-on-exit".into(),
    ];
    let mut daemon = node.spawn_daemon("redirector", &redirector, &args)?;
    daemon.wait_for_log("ready", Duration::from_secs(20))?;

    step("Same service, two pods: who answers?");
    show_calls(&node, &frontend, &member, vip4, vip6)?;

    step("Removing the pr-123 route (the daemon reloads the file on change)");
    let mark = daemon.log_len();
    std::fs::write(&config, config_text(&node, &member, &fork, false))?;
    daemon.wait_for_log_from(mark, "reload applied", Duration::from_secs(10))?;
    show_calls(&node, &frontend, &member, vip4, vip6)?;

    step("Tearing down");
    daemon.terminate()?;
    drop(node);
    println!("  daemon stopped (pins removed), namespaces, cgroup and bpffs removed");
    Ok(())
}

fn show_calls(
    node: &Node,
    frontend: &Pod,
    member: &Pod,
    vip4: SocketAddr,
    vip6: SocketAddr,
) -> anyhow::Result<()> {
    println!(
        "  {:<14} {:<5} {:<22} {:<26} getpeername/from",
        "pod", "proto", "dialed", "answered by"
    );
    for pod in [frontend, member] {
        for (proto, vip) in [("tcp", vip4), ("tcp", vip6), ("udp", vip4)] {
            let result = if proto == "tcp" {
                pod.call_tcp(node, vip, true)?
            } else {
                pod.call_udp(node, vip, true)?
            };
            println!(
                "  {:<14} {:<5} {:<22} {:<26} {}",
                pod.name, proto, vip, result.server, result.peer
            );
        }
    }
    Ok(())
}

fn config_text(node: &Node, member: &Pod, fork: &Pod, with_route: bool) -> String {
    let routes = if with_route {
        format!(
            "routes = [\n  {{ service = \"svc-a\", fork = \"{}:8080\" }},\n  {{ service = \"svc-a-v6\", fork = \"[{}]:8080\" }},\n  {{ service = \"svc-a-udp\", fork = \"{}:8080\" }},\n]",
            fork.ipv4, fork.ipv6, fork.ipv4
        )
    } else {
        "routes = []".to_owned()
    };
    format!(
        r#"[daemon]
cgroup = "{cgroup}"
bpffs = "{bpffs}"

[[service]]
name = "svc-a"
address = "{VIP4}"

[[service]]
name = "svc-a-v6"
address = "{VIP6}"

[[service]]
name = "svc-a-udp"
address = "{VIP4}"
protocol = "udp"

[[sandbox]]
key = "pr-123"
members = ["{member}"]
{routes}
"#,
        cgroup = node.cgroup().display(),
        bpffs = node.bpffs().join("redirector").display(),
        member = member.netns_path().display(),
    )
}

fn step(title: &str) {
    println!("\n==> {title}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
