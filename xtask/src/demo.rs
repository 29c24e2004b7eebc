//! `cargo xtask demo`: redirector steering real traffic on a simulated node.
//!
//! The node is built out of network namespaces (see `redirector_tests::simnode`): an HTTP
//! service `svc-a` and a plain TCP service `db`, each with a baseline and a fork for sandbox
//! `pr-123`; a `frontend` pod that belongs to no sandbox and a `tester` pod that belongs to
//! `pr-123`. The daemon runs from a config file. The demo shows per-request routing of the
//! frontend's requests on one keep-alive connection, L4 steering of the tester's connections,
//! then removes the sandbox with a live reload, shows everything back on the baseline, and tears
//! the node down.
use std::{ffi::OsString, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use redirector_tests::{HttpReq, Node, Pod, workspace_bin};
use serde_json::Value;

use crate::setup;

#[derive(clap::Args, Default)]
pub struct Options {}

const SVC_A: &str = "10.96.0.10:8080";
const DB: &str = "10.96.0.20:5432";
const DB6: &str = "[fd00:96::20]:5432";
const ROUTER: &str = "10.200.0.1:15001";
const UPSTREAM_HEADER: &str = "x-redirector-upstream";

pub fn run(_opts: &Options) -> anyhow::Result<()> {
    setup::run(&setup::Options::default())?;
    if !is_root() {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    step("Building redirector and the demo peers");
    setup::status(std::process::Command::new(env!("CARGO")).args(["build", "--bins"]))?;
    let redirector = workspace_bin("redirector")?;

    step("Bringing up a simulated node (network namespaces as pods)");
    let mut node = Node::new("demo")?;
    let svc_a = node.add_pod("svc-a")?;
    let svc_a_fork = node.add_pod("svc-a-pr123")?;
    let db = node.add_pod("db")?;
    let db_fork = node.add_pod("db-pr123")?;
    let frontend = node.add_pod("frontend")?;
    let tester = node.add_pod("tester")?;
    node.add_vip(addr(SVC_A).ip(), &svc_a)?;
    node.add_vip(addr(DB).ip(), &db)?;
    node.add_vip(addr(DB6).ip(), &db)?;
    let _servers = [
        svc_a.serve_http(&node, "svc-a-baseline", 8080)?,
        svc_a_fork.serve_http(&node, "svc-a-fork-pr-123", 8080)?,
        db.serve_ports(&node, "db-baseline", &[5432], &[])?,
        db_fork.serve_ports(&node, "db-fork-pr-123", &[5432], &[])?,
    ];
    println!(
        "  svc-a (HTTP) at {SVC_A}, db (TCP) at {DB} and {DB6}, both routed to their baselines"
    );
    println!("  frontend: no sandbox; tester: member of sandbox pr-123");

    let config = node.dir().join("redirector.toml");
    let with_sandbox = config_text(&node, &tester, &svc_a_fork, &db_fork, true);
    std::fs::write(&config, &with_sandbox).context("writing the demo config")?;
    println!("\n{with_sandbox}");

    step("Starting the daemon");
    let args: Vec<OsString> = vec![
        "run".into(),
        "--config".into(),
        config.clone().into(),
        "--cleanup-on-exit".into(),
    ];
    let mut daemon = node.spawn_daemon("redirector", &redirector, &args)?;
    daemon.wait_for_log("ready", Duration::from_secs(20))?;

    step("frontend: four requests on ONE keep-alive connection to svc-a, routed one by one");
    show_requests(&node, &frontend)?;
    step("tester (member of pr-123): every connection to a forked service goes to the fork (L4)");
    show_connections(&node, &frontend, &tester)?;

    step("Deleting sandbox pr-123 (the daemon reloads the file when it changes)");
    let mark = daemon.log_len();
    std::fs::write(
        &config,
        config_text(&node, &tester, &svc_a_fork, &db_fork, false),
    )?;
    daemon.wait_for_log_from(mark, "reload applied", Duration::from_secs(10))?;
    show_requests(&node, &frontend)?;
    show_connections(&node, &frontend, &tester)?;

    step("Tearing down");
    daemon.terminate()?;
    drop(node);
    println!(
        "  daemon stopped (programs detached, pins removed); namespaces, cgroup and bpffs removed"
    );
    Ok(())
}

fn show_requests(node: &Node, frontend: &Pod) -> anyhow::Result<()> {
    let keys = [None, Some("pr-123"), Some("pr-999"), Some("pr-123")];
    let specs: Vec<String> = keys
        .iter()
        .map(|key| match key {
            Some(key) => HttpReq::get("/")
                .header("baggage", &format!("userId=alice,sd-routing-key={key}"))
                .spec(),
            None => HttpReq::get("/").spec(),
        })
        .collect();
    let mut args = vec!["h1", "--addr", SVC_A];
    for spec in &specs {
        args.extend(["--req", spec.as_str()]);
    }
    let lines = frontend.http(node, &args)?;
    println!(
        "  {:<34} {:<20} via ({UPSTREAM_HEADER})",
        "request baggage", "answered by"
    );
    for (key, line) in keys.iter().zip(&lines) {
        let baggage = key.map_or("(none)".to_owned(), |k| {
            format!("userId=alice,sd-routing-key={k}")
        });
        println!(
            "  {:<34} {:<20} {}",
            baggage,
            text(&line["served_by"]),
            text(&line["headers"][UPSTREAM_HEADER])
        );
    }
    if let Some(port) = lines.first().map(|l| &l["local_port"]) {
        println!("  (all four on the connection from local port {port})");
    }
    Ok(())
}

fn show_connections(node: &Node, frontend: &Pod, tester: &Pod) -> anyhow::Result<()> {
    println!(
        "  {:<10} {:<22} {:<20} getpeername()",
        "pod", "dialed", "answered by"
    );
    for pod in [frontend, tester] {
        for vip in [DB, DB6] {
            let result = pod.call_tcp(node, addr(vip), true)?;
            println!(
                "  {:<10} {:<22} {:<20} {}",
                pod.name, vip, result.server, result.peer
            );
        }
        let http = pod.http(node, &["h1", "--addr", SVC_A])?;
        println!(
            "  {:<10} {:<22} {:<20} (HTTP, no key)",
            pod.name,
            SVC_A,
            text(&http[0]["served_by"])
        );
    }
    Ok(())
}

fn config_text(
    node: &Node,
    tester: &Pod,
    svc_a_fork: &Pod,
    db_fork: &Pod,
    sandbox: bool,
) -> String {
    let sandbox = if sandbox {
        format!(
            r#"
[[sandbox]]
key = "pr-123"
members = ["{member}"]
routes = [
  {{ service = "svc-a", fork = "{a}:8080" }},
  {{ service = "db", fork = "{d}:5432" }},
  {{ service = "db-v6", fork = "[{d6}]:5432" }},
]
"#,
            member = tester.netns_path().display(),
            a = svc_a_fork.ipv4,
            d = db_fork.ipv4,
            d6 = db_fork.ipv6,
        )
    } else {
        String::new()
    };
    format!(
        r#"[daemon]
cgroup = "{cgroup}"
bpffs = "{bpffs}"
api_socket = "{api_socket}"
state_file = "{state_file}"
router_listen = "{ROUTER}"

[router]
upstream_header = "{UPSTREAM_HEADER}"

[[service]]
name = "svc-a"
address = "{SVC_A}"
protocol = "http"

[[service]]
name = "db"
address = "{DB}"

[[service]]
name = "db-v6"
address = "{DB6}"
{sandbox}"#,
        cgroup = node.cgroup().display(),
        bpffs = node.bpffs().join("redirector").display(),
        api_socket = node.dir().join("api.sock").display(),
        state_file = node.dir().join("state.json").display(),
    )
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("demo addresses are valid")
}

fn text(value: &Value) -> String {
    value.as_str().map_or_else(|| "-".to_owned(), str::to_owned)
}

fn step(title: &str) {
    println!("\n==> {title}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
