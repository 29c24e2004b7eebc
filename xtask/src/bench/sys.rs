//! The machine side of the benchmark: tools it installs, CPU pinning, process accounting,
//! machine facts for the report, and a Ctrl-C that still tears everything down.
use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::setup;

/// The CPU of the load generator. Everything on the serving side (servers, the daemon and its
/// router, nginx) shares the other one: on a 2-core machine that keeps the client from
/// competing with what it measures, and gives the router and nginx the same single core.
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set a flag instead of killing us at once: the benchmark stops at the next
/// step and unwinds, so the node, the daemon, nginx and the bpf stats are all put back.
pub fn catch_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// External programs the anchors need, installed from the distribution when missing.
pub struct Tools {
    pub iptables_restore: PathBuf,
    pub nginx: PathBuf,
    pub bpftool: PathBuf,
}

impl Tools {
    pub fn ensure() -> anyhow::Result<Tools> {
        let missing: Vec<&str> = [("iptables-restore", "iptables"), ("nginx", "nginx-light")]
            .into_iter()
            .filter(|(tool, _)| setup::which(tool).is_err())
            .map(|(_, package)| package)
            .collect();
        if !missing.is_empty() {
            apt_install(&missing)?;
        }
        Ok(Tools {
            iptables_restore: setup::which("iptables-restore")?,
            nginx: setup::which("nginx")?,
            bpftool: setup::which("bpftool")?,
        })
    }
}

/// `apt-get install` without letting the package start a service: the nginx package would
/// otherwise launch a system nginx on port 80 that nobody asked for and nobody stops.
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    eprintln!("bench: installing {} with apt-get", packages.join(" "));
    let policy = Path::new("/usr/sbin/policy-rc.d");
    // An existing policy (Docker images ship one) is left as it is.
    let ours = !policy.exists();
    if ours {
        std::fs::write(
            policy,
            "#!/bin/sh\n# written by `cargo xtask bench` for one apt-get run\nexit 101\n",
        )
        .context("writing /usr/sbin/policy-rc.d")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result = setup::status(Command::new("apt-get").arg("update").arg("-qq")).and_then(|()| {
        setup::status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    });
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    result
}

/// Makes the spawned program start on `cpu` only (inherited by its threads and children).
/// Set before exec rather than afterwards, so a runtime that sizes its thread pool from the
/// CPUs it may use (tokio does) sees one.
pub fn pin_command(cmd: &mut Command, cpu: usize) {
    // SAFETY: the hook makes one raw syscall on a set prepared before the fork.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The child gets SIGKILL if we die, so an aborted benchmark leaves no load generator behind.
pub fn die_with_us(cmd: &mut Command) {
    // SAFETY: prctl only.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// CPU time so far of a process and its children (nginx's worker is the master's child).
pub fn tree_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = cpu_ns(pid)?;
    let mut children = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                children.extend(
                    text.split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    for child in children {
        // A child that just exited has nothing more to add.
        total += tree_cpu_ns(child).unwrap_or(0);
    }
    Ok(total)
}

/// CPU time of a process so far, all its threads: the sum of their scheduler run times
/// (`/proc/PID/task/*/schedstat`, nanoseconds), or utime + stime of `/proc/PID/stat` (clock
/// ticks, 10 ms) where schedstats are missing.
pub fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0u64;
    let mut found = false;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
                continue;
            };
            if let Some(ns) = text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
            {
                total += ns;
                found = true;
            }
        }
    }
    if found {
        return Ok(total);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may itself contain blanks: utime and stime are the
    // 14th and 15th fields of the line, the 12th and 13th after the comm.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/PID/stat")?
        .iter()
        .map(|v| v.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(ticks * 1_000_000_000 / hz)
}

/// `VmRSS` and `VmHWM` of a process, KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Time the hypervisor ran something else while our CPUs wanted to run (`steal` in
/// /proc/stat), in ms: the part of the noise this machine admits to.
pub fn steal_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: u64 = stat
        .lines()
        .find(|l| l.starts_with("cpu "))?
        .split_whitespace()
        .nth(8)?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 * 1000.0 / hz)
}

fn command_text(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    Some(String::from_utf8_lossy(&text).trim().to_owned())
}

/// What the report says about the machine and the code: absolute numbers only mean something
/// next to these.
pub fn machine_info(tools: &Tools) -> Value {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
    });
    let commit = command_text("git", &["rev-parse", "--short=12", "HEAD"]);
    let dirty = command_text("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    json!({
        "date": command_text("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": cpu_model,
        "git_commit": commit,
        "git_dirty": dirty,
        "nginx": command_text(&tools.nginx.to_string_lossy(), &["-v"]),
        "iptables": command_text(
            &tools.iptables_restore.with_file_name("iptables").to_string_lossy(),
            &["--version"],
        ),
    })
}
