//! `cargo xtask demo` (no flags): redirector steering real traffic on a simulated node.
//!
//! The node is built out of network namespaces (see `redirector_tests::simnode`): an HTTP
//! service `svc-a` and a plain TCP service `db`, each with a baseline and a fork for sandbox
//! `pr-123`; a `frontend` pod that belongs to no sandbox and a `tester` pod that will belong to
//! `pr-123`. The daemon starts from a config file that only declares the services; the demo
//! then drives it through the CLI as a CI pipeline would: creates the sandbox, shows per-request
//! routing of the frontend's requests on one keep-alive connection and L4 steering of the
//! tester's connections, shows `status` and a few metrics, deletes the sandbox, shows traffic
//! back on the baseline, and tears the node down.
use std::{ffi::OsString, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use redirector_tests::{HttpReq, Node, Pod, workspace_bin};

use super::{is_root, step, text};
use crate::setup;

const SVC_A: &str = "10.96.0.10:8080";
const DB: &str = "10.96.0.20:5432";
const DB6: &str = "[fd00:96::20]:5432";
const ROUTER: &str = "10.200.0.1:15001";
const UPSTREAM_HEADER: &str = "x-redirector-upstream";

pub fn run() -> anyhow::Result<()> {
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
    let text = config_text(&node);
    std::fs::write(&config, &text).context("writing the demo config")?;
    println!("\n{text}");

    step("Starting the daemon");
    let args: Vec<OsString> = vec![
        "run".into(),
        "--config".into(),
        config.clone().into(),
        "--cleanup-on-exit".into(),
    ];
    let mut daemon = node.spawn_daemon("redirector", &redirector, &args)?;
    daemon.wait_for_log("ready", Duration::from_secs(20))?;
    let socket = node.dir().join("api.sock");
    let cli = |args: &[&str]| run_cli(&redirector, &socket, args);

    step("frontend calls svc-a with and without a routing key: no sandbox yet");
    show_requests(&node, &frontend)?;

    let member = tester.netns_path().display().to_string();
    let routes = [
        format!("svc-a={}:8080", svc_a_fork.ipv4),
        format!("db={}:5432", db_fork.ipv4),
        format!("db-v6=[{}]:5432", db_fork.ipv6),
    ];
    cli(&[
        "sandbox", "create", "pr-123", "--member", &member, "--route", &routes[0], "--route",
        &routes[1], "--route", &routes[2],
    ])?;
    cli(&["route", "ls"])?;

    step("frontend: four requests on ONE keep-alive connection to svc-a, routed one by one");
    show_requests(&node, &frontend)?;
    step("tester (member of pr-123): every connection to a forked service goes to the fork (L4)");
    show_connections(&node, &frontend, &tester)?;

    cli(&["status"])?;
    step("A few metrics (GET /metrics on the node, 127.0.0.1:9464)");
    let metrics = scrape_metrics(&node)?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("redirector_requests_total")
            || l.starts_with("redirector_connections_steered_total")
            || l.starts_with("redirector_kernel_events_total{event=\"handoff\"}")
            || l.starts_with("redirector_map_entries")
    }) {
        println!("  {line}");
    }

    cli(&["sandbox", "delete", "pr-123"])?;
    step("Sandbox gone: everything back on the baseline");
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

/// Runs and shows one CLI command, as a person would type it.
fn run_cli(redirector: &Path, socket: &Path, args: &[&str]) -> anyhow::Result<()> {
    println!("\n$ redirector {}", args.join(" "));
    let out = std::process::Command::new(redirector)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .context("running the redirector CLI")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    if !out.status.success() {
        bail!(
            "`redirector {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// GET /metrics from the daemon, which listens on the node namespace's loopback: a thread
/// enters that namespace (only that thread) to connect.
fn scrape_metrics(node: &Node) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    use std::os::fd::AsRawFd as _;
    let netns = std::fs::File::open(node.netns_path())?;
    std::thread::spawn(move || -> anyhow::Result<String> {
        // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let mut stream = std::net::TcpStream::connect("127.0.0.1:9464")?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("metrics thread panicked"))?
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

fn config_text(node: &Node) -> String {
    format!(
        r#"[daemon]
cgroup = "{cgroup}"
bpffs = "{bpffs}"
api_socket = "{api_socket}"
state_file = "{state_file}"
router_listen = "{ROUTER}"
metrics_listen = "127.0.0.1:9464"

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
"#,
        cgroup = node.cgroup().display(),
        bpffs = node.bpffs().join("redirector").display(),
        api_socket = node.dir().join("api.sock").display(),
        state_file = node.dir().join("state.json").display(),
    )
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("demo addresses are valid")
}
