//! What a user would run instead: iptables DNAT rules the way kube-proxy writes them, and nginx
//! and HAProxy routing on the baggage header.
use std::{
    ffi::OsString,
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use redirector_tests::{Daemon, Pod};

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
///
/// `wrap`: a command line to run nginx under (valgrind); nginx then runs as one process (no
/// master), so the process counted is the one that routes.
pub fn start_nginx(
    tools: &Tools,
    topo: &Topo,
    wrap: Option<&[OsString]>,
) -> anyhow::Result<Daemon> {
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
master_process {master};
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
        master = if wrap.is_some() { "off" } else { "on" },
    );
    std::fs::write(&conf, text).context("writing nginx.conf")?;
    let mut cmd = wrapped(&topo.proxy, topo, &tools.nginx, wrap);
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        // The error log nginx uses until it has read the config (default: /var/log/nginx).
        .arg("-e")
        .arg(dir.join("error.log"));
    sys::pin_command(&mut cmd, SERVER_CPU);
    let nginx = Daemon::spawn_command("nginx", cmd)?;
    wait_listening(topo, Topo::ip(&topo.proxy), &nginx, ready_within(wrap))?;
    Ok(nginx)
}

/// HAProxy in the `haproxy` pod, the second L7 anchor: one thread on the servers' CPU, the
/// same routing as nginx (the pr-100 member of the baggage list to the fork, anything else to
/// the baseline) and the same pooled keep-alive upstream connections (`http-reuse always`).
/// `req.hdr(baggage)` yields each comma-separated list member of every baggage header, so the
/// ACL matches one member exactly, properties after ';' allowed. `wrap` as for nginx.
pub fn start_haproxy(
    haproxy: &Path,
    topo: &Topo,
    wrap: Option<&[OsString]>,
) -> anyhow::Result<Daemon> {
    let dir = topo.node.dir().join("haproxy");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let conf = dir.join("haproxy.cfg");
    let key = regex_escape(KEY_FORK);
    let text = format!(
        r#"# Written by `cargo xtask bench`; runs in the foreground (-db).
global
    nbthread 1
    # As many connections as nginx's worker_connections (valgrind leaves too few descriptors
    # for HAProxy's default).
    maxconn 8192
    pidfile {d}/haproxy.pid

defaults
    mode http
    maxconn 8192
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    option http-keep-alive
    http-reuse always

frontend bench
    bind :{PORT} backlog 4096
    # The W3C baggage list member sd-routing-key={KEY_FORK}, properties after ';' allowed.
    acl to_fork req.hdr(baggage) -m reg '^[ 	]*sd-routing-key={key}[ 	]*(;|$)'
    use_backend {FORK} if to_fork
    default_backend {BASELINE}

backend {BASELINE}
    server {BASELINE} {baseline}

backend {FORK}
    server {FORK} {fork}
"#,
        d = dir.display(),
        baseline = Topo::ip(&topo.server),
        fork = Topo::ip(&topo.fork),
    );
    std::fs::write(&conf, text).context("writing haproxy.cfg")?;
    let check = Command::new(haproxy)
        .arg("-c")
        .arg("-f")
        .arg(&conf)
        .output()
        .context("running haproxy -c")?;
    if !check.status.success() {
        bail!(
            "haproxy rejects {}: {}{}",
            conf.display(),
            String::from_utf8_lossy(&check.stdout).trim(),
            String::from_utf8_lossy(&check.stderr).trim()
        );
    }
    let mut cmd = wrapped(&topo.haproxy, topo, haproxy, wrap);
    cmd.arg("-db").arg("-f").arg(&conf);
    sys::pin_command(&mut cmd, SERVER_CPU);
    let proc = Daemon::spawn_command("haproxy", cmd)?;
    wait_listening(topo, Topo::ip(&topo.haproxy), &proc, ready_within(wrap))?;
    Ok(proc)
}

/// `program` in `pod` (and the node's cgroup), or `wrap` running it there.
fn wrapped(pod: &Pod, topo: &Topo, program: &Path, wrap: Option<&[OsString]>) -> Command {
    match wrap {
        Some([first, rest @ ..]) => {
            let mut cmd = pod.command(&topo.node, first, true);
            cmd.args(rest).arg(program);
            cmd
        }
        _ => pod.command(&topo.node, program, true),
    }
}

/// How long a proxy may take to listen: under valgrind, start-up is some 50 times slower.
fn ready_within(wrap: Option<&[OsString]>) -> Duration {
    Duration::from_secs(if wrap.is_some() { 90 } else { 10 })
}

/// Waits until something accepts TCP connections at `addr`, probing from the client pod.
fn wait_listening(
    topo: &Topo,
    addr: SocketAddr,
    proc: &Daemon,
    within: Duration,
) -> anyhow::Result<()> {
    let netns = std::fs::File::open(topo.client.netns_path())?;
    let deadline = Instant::now() + within;
    let pid = proc.pid();
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
                if exited(pid) {
                    bail!("exited before listening at {addr}; log:\n{}", proc.logs());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "nothing listens at {addr} after {within:?}; log:\n{}",
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

/// True once `pid` is gone or a zombie.
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X")
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
