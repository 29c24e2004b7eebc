//! `redirector doctor`: checks every prerequisite of running the daemon on this machine and says,
//! for each, whether it holds and how to fix it when it does not.
//!
//! Nothing here changes the machine for good: the one check that touches the kernel (`hooks`)
//! loads the programs without attaching them, pins its maps into a scratch directory of its own,
//! and removes that directory before it returns, on failure too.
//!
//! This module holds the verdict types and the order of the checks; each area's checks live in
//! a submodule of their own ([`host`], [`mounts`], [`hooks`], [`router`], [`running`]), and
//! [`render`] lays the verdicts out for a terminal.
mod hooks;
mod host;
mod mounts;
mod render;
mod router;
mod running;

use std::{
    fmt,
    net::SocketAddr,
    panic::{self, AssertUnwindSafe},
    path::PathBuf,
};

pub use render::render_table;

use self::{
    hooks::check_hooks,
    host::{check_btf, check_kernel, check_privileges},
    mounts::{check_attach_point, check_bpffs, check_cgroup2},
    router::check_router_addresses,
    running::check_already_running,
};

/// What to check; the CLI fills it from its flags and the config file.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// The attach point (`--cgroup` or `daemon.cgroup`); `None` makes that check a warning.
    pub cgroup: Option<PathBuf>,
    /// The pin directory (`daemon.bpffs`, default /sys/fs/bpf/redirector).
    pub bpffs: PathBuf,
    /// `daemon.router_listen`; empty when the node has no router.
    pub router_listen: Vec<SocketAddr>,
}

/// The verdict on one prerequisite.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about it; set for failures and for warnings that have a remedy.
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: Option<String>) -> Check {
        Check {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

// Check names, in the order `run` reports them. They are part of the JSON output.
const PRIVILEGES: &str = "privileges";
const KERNEL: &str = "kernel";
const BTF: &str = "btf";
const CGROUP2: &str = "cgroup2";
const ATTACH_POINT: &str = "attach point";
const BPFFS: &str = "bpffs";
const HOOKS: &str = "hooks";
const ROUTER_ADDRESS: &str = "router address";
const ALREADY_RUNNING: &str = "already running";

/// Oldest kernel with everything the programs use: `SO_NETNS_COOKIE` (5.14) is the newest;
/// sockmap holding listening sockets needs 5.10 and `bpf_link` for cgroup hooks 5.7.
const MIN_KERNEL: (u32, u32) = (5, 14);

/// Runs every check, in a fixed order. Each check stands on its own: one that fails (or, by a
/// bug, panics) does not stop the others; `hooks` only looks at the verdicts of `privileges`
/// and `bpffs` to skip a load that could not work.
pub fn run(opts: &DoctorOptions) -> Vec<Check> {
    let privileges = guarded(PRIVILEGES, check_privileges);
    let bpffs = guarded(BPFFS, || check_bpffs(&opts.bpffs));
    let mut needs = Vec::new();
    if privileges.status == Status::Fail {
        needs.push("root (or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)");
    }
    if bpffs.status == Status::Fail {
        needs.push("a bpffs");
    }
    vec![
        privileges,
        guarded(KERNEL, check_kernel),
        guarded(BTF, check_btf),
        guarded(CGROUP2, check_cgroup2),
        guarded(ATTACH_POINT, || check_attach_point(opts.cgroup.as_deref())),
        bpffs,
        guarded(HOOKS, || check_hooks(&opts.bpffs, &needs)),
        guarded(ROUTER_ADDRESS, || {
            check_router_addresses(&opts.router_listen)
        }),
        guarded(ALREADY_RUNNING, || check_already_running(&opts.bpffs)),
    ]
}

/// True when any check failed: the daemon would not start (or not work) here.
pub fn any_failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}

/// Runs one check, turning a panic into a failed check: `run` promises never to panic, and a
/// report with eight answers is worth more than none.
fn guarded(name: &'static str, check: impl FnOnce() -> Check) -> Check {
    panic::catch_unwind(AssertUnwindSafe(check)).unwrap_or_else(|_| {
        Check::fail(
            name,
            "internal error: the check panicked",
            "report a bug to the redirector maintainers, with the message printed above",
        )
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    pub(super) fn check(name: &'static str, status: Status, fix: Option<&str>) -> Check {
        Check {
            name,
            status,
            detail: format!("{name} detail"),
            fix: fix.map(str::to_owned),
        }
    }

    #[test]
    fn any_failed_looks_for_fail_only() {
        assert!(!any_failed(&[]));
        assert!(!any_failed(&[
            check("a", Status::Pass, None),
            check("b", Status::Warn, Some("do b"))
        ]));
        assert!(any_failed(&[
            check("a", Status::Pass, None),
            check("c", Status::Fail, Some("do c"))
        ]));
    }

    #[test]
    fn status_serializes_lowercase() {
        // toml stands in for serde_json (not a dependency here): same serde derive.
        let text = toml::to_string(&check("btf", Status::Warn, None)).expect("serialize");
        assert!(text.contains(r#"status = "warn""#), "{text}");
    }

    #[test]
    fn a_panicking_check_becomes_a_failure() {
        let check = guarded(BTF, || panic!("boom"));
        assert_eq!(check.name, BTF);
        assert_eq!(check.status, Status::Fail);
    }

    #[test]
    fn run_reports_every_check_in_order() {
        // Side-effect free: the pin directory is not on a bpffs, so `hooks` is skipped.
        let dir = tempfile::tempdir().expect("tempdir");
        let checks = run(&DoctorOptions {
            cgroup: Some(dir.path().join("no-such-cgroup")),
            bpffs: dir.path().join("redirector"),
            router_listen: Vec::new(),
        });
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "privileges",
                "kernel",
                "btf",
                "cgroup2",
                "attach point",
                "bpffs",
                "hooks",
                "router address",
                "already running"
            ]
        );
        assert!(any_failed(&checks));
        let hooks = &checks[6];
        assert_eq!(hooks.status, Status::Fail);
        assert!(
            hooks.detail.starts_with("skipped: needs "),
            "{}",
            hooks.detail
        );
        assert_eq!(fs::read_dir(dir.path()).expect("read").count(), 0);
    }
}
