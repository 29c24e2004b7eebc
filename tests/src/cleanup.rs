//! Removal of everything a simulated node creates, for its own teardown and for sweeping the
//! leftovers of runs that died (SIGKILL, power loss) before their teardown ran.
//!
//! Only names of the form `rdrt-<pid>-...` are ever touched, and a sweep only takes those whose
//! `<pid>` is not a live process.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, umount2};

use crate::prereq::{cgroup2_mount, ip_bin, mount_points};
use crate::proc::run_ok;

pub(crate) const NAME_TAG: &str = "rdrt-";
pub(crate) const RUN_DIR: &str = "/run/redirector-test";
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// `ip netns add/del` create and reshape the /run/netns mount on first use; doing that from
/// several test threads at once can stack mounts, so this process does it one at a time.
pub(crate) static NETNS_LOCK: Mutex<()> = Mutex::new(());
static SWEEP_LOCK: Mutex<()> = Mutex::new(());

/// The pid embedded in a harness name, if the name is one of ours.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_TAG)?;
    let (pid, _) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| {
        pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
    })
}

pub(crate) fn warn(what: &str, e: &anyhow::Error) {
    eprintln!("[redirector-tests] teardown: {what}: {e:#}");
}

fn ip(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(ip_bin()?);
    cmd.args(args);
    run_ok(cmd, IP_TIMEOUT)
}

pub(crate) fn netns_list() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Kills every process whose network namespace is `ns` (processes that ran outside the test
/// cgroup are not reached by `cgroup.kill`), then deletes the name.
pub(crate) fn delete_netns(ns: &str) -> Result<()> {
    if !ns.starts_with(NAME_TAG) {
        bail!("refusing to delete netns {ns:?}: not a harness name");
    }
    if !Path::new("/run/netns").join(ns).exists() {
        return Ok(());
    }
    let me = std::process::id();
    let pids = ip(&["netns", "pids", ns]).unwrap_or_default();
    for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pid > 1 && pid as u32 != me {
            // SAFETY: plain kill(2) on a process that lives in our own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ip(&["netns", "del", ns]).map(|_| ())
}

/// Kills every process in the cgroup (and below), then removes it and any child cgroups.
pub(crate) fn remove_cgroup(path: &Path) -> Result<()> {
    let root = cgroup2_mount()?;
    let name_ok = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(NAME_TAG));
    // Never the root cgroup: every other process of the machine lives there.
    if path.parent() != Some(root.as_path()) || !name_ok {
        bail!(
            "refusing to remove cgroup {}: not a harness cgroup",
            path.display()
        );
    }
    if !path.exists() {
        return Ok(());
    }
    if let Err(e) = fs::write(path.join("cgroup.kill"), "1") {
        // Kernels before 5.14 lack cgroup.kill; fall back to killing pid by pid.
        if e.kind() != ErrorKind::NotFound {
            return Err(e).with_context(|| format!("writing {}/cgroup.kill", path.display()));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = cgroup_pids(path)?;
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("processes {pids:?} still in {} after 5 s", path.display());
        }
        for pid in pids {
            // SAFETY: plain kill(2) on a process inside our own test cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
    remove_cgroup_dirs(path)
}

fn cgroup_pids(path: &Path) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}/cgroup.procs", dir.display()));
            }
        };
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        stack.extend(sub_dirs(&dir));
    }
    Ok(pids)
}

fn sub_dirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Cgroup directories go depth first with rmdir (their files cannot be unlinked). The kernel
/// may briefly report EBUSY while exited tasks are being released, so retry for a while.
fn remove_cgroup_dirs(path: &Path) -> Result<()> {
    for sub in sub_dirs(path) {
        remove_cgroup_dirs(&sub)?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", path.display())),
        }
    }
}

/// Unmounts everything at or below `dir`, deepest first; a busy mount is detached lazily.
pub(crate) fn umount_under(dir: &Path) -> Result<()> {
    let mut mounts: Vec<PathBuf> = mount_points()?
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect();
    // Later mounts may sit on top of earlier ones: undo in reverse order.
    mounts.reverse();
    for m in mounts {
        if let Err(e) = umount2(&m, MntFlags::empty()) {
            umount2(&m, MntFlags::MNT_DETACH)
                .with_context(|| format!("umount {} (plain umount said {e})", m.display()))?;
        }
    }
    Ok(())
}

/// Removes a scratch directory, but only once nothing is mounted below it: deleting files on a
/// still-mounted bpffs would unpin live objects.
pub(crate) fn remove_scratch(dir: &Path) -> Result<()> {
    umount_under(dir)?;
    if mount_points()?.iter().any(|m| m.starts_with(dir)) {
        bail!(
            "{} still has mounts below it; not removing it",
            dir.display()
        );
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Removes what dead runs left behind: network namespaces, cgroups, bpffs mounts and scratch
/// directories whose owner pid is gone. Failures are logged, never fatal.
pub(crate) fn sweep() {
    let _guard = SWEEP_LOCK.lock().unwrap_or_else(|e| e.into_inner());

    // Processes first (cgroups), so nothing holds namespaces or mounts afterwards.
    if let Ok(root) = cgroup2_mount() {
        for dir in sub_dirs(&root) {
            let stale = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_stale);
            if stale && let Err(e) = remove_cgroup(&dir) {
                warn(&format!("sweeping cgroup {}", dir.display()), &e);
            }
        }
    }
    match netns_list() {
        Ok(list) => {
            for ns in list.iter().filter(|n| is_stale(n)) {
                if let Err(e) = delete_netns(ns) {
                    warn(&format!("sweeping netns {ns}"), &e);
                }
            }
        }
        Err(e) => warn("listing network namespaces", &e),
    }
    // Mounts first, from /proc/mounts: a scratch dir may be gone while its mount is not.
    let run = Path::new(RUN_DIR);
    if let Ok(mounts) = mount_points() {
        for m in mounts {
            let Ok(rel) = m.strip_prefix(run) else {
                continue;
            };
            let Some(first) = rel.iter().next().and_then(|c| c.to_str()) else {
                continue;
            };
            if is_stale(first)
                && let Err(e) = umount_under(&run.join(first))
            {
                warn(
                    &format!("sweeping mounts under {}", run.join(first).display()),
                    &e,
                );
            }
        }
    }
    for dir in sub_dirs(run) {
        let stale = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(is_stale);
        if stale && let Err(e) = remove_scratch(&dir) {
            warn(&format!("sweeping {}", dir.display()), &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_harness_names() {
        assert_eq!(owner_pid("rdrt-123-4-node"), Some(123));
        assert_eq!(owner_pid("rdrt-123-4"), Some(123));
        assert_eq!(owner_pid("rdrt-123"), None);
        assert_eq!(owner_pid("rdrt--4"), None);
        assert_eq!(owner_pid("rdrt-12a-4"), None);
        assert_eq!(owner_pid("xrdrt-123-4"), None);
        assert_eq!(owner_pid("cni-123-4"), None);
    }

    #[test]
    fn own_pid_is_never_stale() {
        assert!(!is_stale(&format!("rdrt-{}-0-node", std::process::id())));
    }
}
