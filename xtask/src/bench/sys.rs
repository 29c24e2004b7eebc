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

use super::Profile;
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
    /// The second L7 anchor; `None` when it was not needed or could not be installed.
    pub haproxy: Option<PathBuf>,
    /// Instruction counts (`--only instructions`); `None` likewise.
    pub callgrind: Option<Callgrind>,
}

/// valgrind's instruction counter and the two scripts of its package the benchmark drives.
pub struct Callgrind {
    pub valgrind: PathBuf,
    /// Zeroes and dumps the counters of a running process (through vgdb).
    pub control: PathBuf,
    /// Turns a dump into a per-function listing.
    pub annotate: PathBuf,
}

impl Tools {
    /// Installs what `profile`'s parts need. iptables and nginx always (as before); HAProxy
    /// and valgrind only for the parts that use them, and if apt cannot provide them, those
    /// parts are skipped with a warning, except under `CI=true`, where a missing prerequisite
    /// fails the run.
    pub fn ensure(profile: &Profile) -> anyhow::Result<Tools> {
        let missing: Vec<&str> = [("iptables-restore", "iptables"), ("nginx", "nginx-light")]
            .into_iter()
            .filter(|(tool, _)| setup::which(tool).is_err())
            .map(|(_, package)| package)
            .collect();
        if !missing.is_empty() {
            apt_install(&missing)?;
        }
        let haproxy = if profile.has("haproxy") || profile.has("instructions") {
            optional_tool("haproxy", "haproxy", "the HAProxy anchor")?
        } else {
            None
        };
        let callgrind = if profile.has("instructions") {
            match optional_tool("valgrind", "valgrind", "the instruction counts")? {
                Some(valgrind) => Some(Callgrind {
                    valgrind,
                    control: setup::which("callgrind_control")?,
                    annotate: setup::which("callgrind_annotate")?,
                }),
                None => None,
            }
        } else {
            None
        };
        Ok(Tools {
            iptables_restore: setup::which("iptables-restore")?,
            nginx: setup::which("nginx")?,
            bpftool: setup::which("bpftool")?,
            haproxy,
            callgrind,
        })
    }
}

/// `tool` from PATH, else from apt's `package`. If that fails: an error under `CI=true`,
/// otherwise a loud warning and `None` (the part that needs it is skipped).
fn optional_tool(tool: &str, package: &str, part: &str) -> anyhow::Result<Option<PathBuf>> {
    if let Ok(path) = setup::which(tool) {
        return Ok(Some(path));
    }
    let installed = apt_install(&[package]).and_then(|()| setup::which(tool));
    match installed {
        Ok(path) => Ok(Some(path)),
        Err(e) if redirector_tests::under_ci() => Err(e.context(format!(
            "{tool} (apt package {package}) is needed for {part} under CI=true"
        ))),
        Err(e) => {
            eprintln!(
                "bench: WARNING: {tool} is missing and `apt-get install {package}` failed ({e:#}): {part} will be skipped"
            );
            Ok(None)
        }
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
        "haproxy": tools.haproxy.as_ref().and_then(|h| {
            command_text(&h.to_string_lossy(), &["-v"])
                .and_then(|v| v.lines().next().map(str::to_owned))
        }),
        "valgrind": tools
            .callgrind
            .as_ref()
            .and_then(|c| command_text(&c.valgrind.to_string_lossy(), &["--version"])),
    })
}

/// CPU time of the whole machine so far, from the first line of `/proc/stat`, in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineCpu {
    /// user + nice + system, all CPUs: time processes ran (guest time is inside user).
    pub busy_s: f64,
    /// irq + softirq: interrupt work, which the kernel charges to no process.
    pub irq_s: f64,
    pub steal_s: f64,
    /// Wall time the counters cover: every CPU's total (idle included) over the CPU count.
    pub wall_s: f64,
}

impl MachineCpu {
    pub fn now() -> Option<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let mut cpus = 0usize;
        let mut total = None;
        for line in stat.lines() {
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("cpu") => {
                    total = Some(
                        fields
                            .filter_map(|f| f.parse::<u64>().ok())
                            .collect::<Vec<u64>>(),
                    );
                }
                Some(name) if name.starts_with("cpu") => cpus += 1,
                _ => {}
            }
        }
        let f = total?;
        if f.len() < 8 || cpus == 0 {
            return None;
        }
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let s = |ticks: u64| ticks as f64 / hz;
        // user nice system idle iowait irq softirq steal (guest and guest_nice are in user).
        Some(MachineCpu {
            busy_s: s(f[0] + f[1] + f[2]),
            irq_s: s(f[5] + f[6]),
            steal_s: s(f[7]),
            wall_s: s(f[..8].iter().sum()) / cpus as f64,
        })
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &MachineCpu) -> MachineCpu {
        MachineCpu {
            busy_s: self.busy_s - earlier.busy_s,
            irq_s: self.irq_s - earlier.irq_s,
            steal_s: self.steal_s - earlier.steal_s,
            wall_s: self.wall_s - earlier.wall_s,
        }
    }
}

/// CPU time (user + system) of this process and of every descendant it has reaped, seconds.
/// Everything the benchmark starts (servers, the daemon, nginx, HAProxy, valgrind, every
/// rdr-load run) is a reaped descendant by the time the node is torn down.
pub fn own_cpu_s() -> f64 {
    let of = |who: libc::c_int| {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut ru) } != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    of(libc::RUSAGE_SELF) + of(libc::RUSAGE_CHILDREN)
}

/// CPU time so far of every kernel thread (the children of kthreadd, pid 2), seconds.
/// Network benchmarking keeps some of them busy on the benchmark's behalf (ksoftirqd takes
/// over softirq work under load, kworkers tear network namespaces down), so the report counts
/// them apart from other processes. Threads that come and go between two readings are missed.
pub fn kernel_threads_cpu_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After `(comm)`: state ppid ... utime (12th) stime (13th).
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(1) != Some(&"2") {
            continue;
        }
        ticks += f
            .get(11..13)
            .map_or(0, |v| v.iter().map(|t| t.parse::<u64>().unwrap_or(0)).sum());
    }
    ticks as f64 / hz
}

/// How long each idle probe watches the machine.
pub const IDLE_PROBE: std::time::Duration = std::time::Duration::from_millis(500);

/// Busy CPU of the whole machine, in cores, over [`IDLE_PROBE`] while the benchmark itself
/// does nothing (between phases: the servers and anchors are up but get no requests).
pub fn idle_probe() -> Option<f64> {
    let before = MachineCpu::now()?;
    std::thread::sleep(IDLE_PROBE);
    let d = MachineCpu::now()?.since(&before);
    (d.wall_s > 0.0).then(|| d.busy_s / d.wall_s)
}

/// Other processes are "using the machine" above this share of it (on average over the run,
/// or in the median idle probe): the figures then carry their noise.
pub const BUSY_WARNING_SHARE: f64 = 0.05;

/// The load on the machine during the run, for the report: what the whole machine did (from
/// `/proc/stat`) minus what the benchmark's own processes used (from `getrusage`).
pub fn load_report(
    during: &MachineCpu,
    own_s: f64,
    kthreads_s: f64,
    idle_probes: &[f64],
    cores: f64,
) -> Value {
    let wall = during.wall_s.max(1e-9);
    let other_s = (during.busy_s - own_s - kthreads_s).max(0.0);
    let mut probes = idle_probes.to_vec();
    probes.sort_by(f64::total_cmp);
    let probe_median = probes.get(probes.len() / 2).copied();
    let mut warnings = Vec::new();
    let other_cores = other_s / wall;
    if other_cores > BUSY_WARNING_SHARE * cores {
        warnings.push(format!(
            "other processes used {other_cores:.2} cores on average during the run ({:.0}% of the machine)",
            other_cores / cores * 100.0
        ));
    }
    if let Some(m) = probe_median
        && m > BUSY_WARNING_SHARE * cores
    {
        warnings.push(format!(
            "the machine was {m:.2} cores busy (median) while the benchmark paused between phases"
        ));
    }
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({
        "how": "from /proc/stat: busy = user + nice + system over all CPUs; the benchmark's own = getrusage of xtask and every process it started (all reaped at the end); kernel threads (children of kthreadd: ksoftirqd, kworkers, much of it working for the benchmark's traffic) apart; other = busy - own - kernel threads. Interrupt time (irq + softirq, most of it the benchmark's network traffic) is charged to no process and is reported apart. Idle probes: busy cores over 0.5 s while the benchmark paused between phases.",
        "wall_s": r(wall),
        "busy_cores": r(during.busy_s / wall),
        "bench_cores": r(own_s / wall),
        "kernel_thread_cores": r(kthreads_s / wall),
        "other_cores": r(other_cores),
        "other_share_of_machine": r(other_cores / cores),
        "irq_softirq_cores": r(during.irq_s / wall),
        "steal_cores": r(during.steal_s / wall),
        "idle_probe_busy_cores": probes.iter().map(|x| r(*x)).collect::<Vec<_>>(),
        "idle_probe_busy_cores_median": probe_median.map(r),
        "idle": warnings.is_empty(),
        "warnings": warnings,
    })
}
