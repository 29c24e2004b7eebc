//! What a user would run instead: iptables DNAT rules the way kube-proxy writes them, and nginx
//! routing on the baggage header.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use redirector_tests::Daemon;

use super::{
    sys::{self, SERVER_CPU, Tools},
    topo::{self, BASELINE, FORK, KEY_FORK, PORT, SVC, Topo},
};

/// Replaces the nat table of the `kproxy` pod's own network namespace with `rules` DNAT rules:
/// one per service, in one chain jumped to from OUTPUT, like kube-proxy's KUBE-SERVICES chain.
/// `svc`'s rule comes last, so a new connection to it is matched against every rule (the
/// chain is a list, walked in order); only a connection's first packet sees the rules,
/// conntrack translates the rest. `rules == 0` empties the table.
pub fn iptables(tools: &Tools, topo: &Topo, rules: usize) -> anyhow::Result<()> {
    let server = Topo::ip(&topo.server);
    let mut text = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    if rules > 0 {
        text.push_str(":BENCH-SERVICES - [0:0]\n-A OUTPUT -j BENCH-SERVICES\n");
        for i in 0..rules - 1 {
            let _ = writeln!(
                text,
                "-A BENCH-SERVICES -d {}/32 -p tcp -m tcp --dport {PORT} -j DNAT --to-destination {server}",
                topo::bulk_vip(i)
            );
        }
        let _ = writeln!(
            text,
            "-A BENCH-SERVICES -d {SVC}/32 -p tcp -m tcp --dport {PORT} -j DNAT --to-destination {server}"
        );
    }
    text.push_str("COMMIT\n");
    // Enters the pod's netns only (not the cgroup): the rules exist nowhere else.
    let mut cmd = topo
        .kproxy
        .command(&topo.node, &tools.iptables_restore, false);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    sys::die_with_us(&mut cmd);
    let mut child = cmd.spawn().context("starting iptables-restore")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("iptables-restore stdin")?;
        stdin
            .write_all(text.as_bytes())
            .context("writing the rules to iptables-restore")?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore ({rules} rules) failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// nginx in the `proxy` pod, one worker on the servers' CPU (the router gets the same one),
/// routing every request on its baggage header: the pr-100 key to the fork, anything else to
/// the baseline, over pooled keep-alive upstream connections as the router does.
pub fn start_nginx(tools: &Tools, topo: &Topo) -> anyhow::Result<Daemon> {
    let dir = topo.node.dir().join("nginx");
    for sub in ["", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    let key = regex_escape(KEY_FORK);
    let text = format!(
        r#"# Written by `cargo xtask bench`; runs in the foreground, all files under {d}.
daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    # The W3C baggage list member sd-routing-key={KEY_FORK}, properties after ';' allowed.
    map $http_baggage $sandbox_upstream {{
        default {BASELINE};
        "~(^|,)\s*sd-routing-key={key}\s*(;|,|$)" {FORK};
    }}
    upstream {BASELINE} {{
        server {baseline};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    upstream {FORK} {{
        server {fork};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {PORT} backlog=4096;
        location / {{
            proxy_pass http://$sandbox_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
        baseline = Topo::ip(&topo.server),
        fork = Topo::ip(&topo.fork),
    );
    std::fs::write(&conf, text).context("writing nginx.conf")?;
    let mut cmd = topo.proxy.command(&topo.node, &tools.nginx, true);
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        // The error log nginx uses until it has read the config (default: /var/log/nginx).
        .arg("-e")
        .arg(dir.join("error.log"));
    sys::pin_command(&mut cmd, SERVER_CPU);
    let nginx = Daemon::spawn_command("nginx", cmd)?;
    wait_listening(topo, Topo::ip(&topo.proxy), &nginx)?;
    Ok(nginx)
}

/// Waits until something accepts TCP connections at `addr`, probing from the client pod.
fn wait_listening(topo: &Topo, addr: SocketAddr, proc: &Daemon) -> anyhow::Result<()> {
    let netns = std::fs::File::open(topo.client.netns_path())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<()> {
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            loop {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "nothing listens at {addr} after 10 s; log:\n{}",
                        proc.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
    })
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = !c.is_ascii_alphanumeric() && c != '-' && c != '_';
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}
