//! `redirector doctor`: checks every prerequisite of running the daemon on this machine and says,
//! for each, whether it holds and how to fix it when it does not.
//!
//! Nothing here changes the machine for good: the one check that touches the kernel (`hooks`)
//! loads the programs without attaching them, pins its maps into a scratch directory of its own,
//! and removes that directory before it returns, on failure too.
use std::{
    fmt, fs, io,
    net::{SocketAddr, TcpListener},
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{Program, ProgramError},
};
use comfy_table::{ContentArrangement, Table};

use crate::kernel::{
    prereq::{self, PrereqError},
    programs,
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

/// Capabilities a non-root daemon would need, as (bit in CapEff, name).
const REQUIRED_CAPS: [(u32, &str); 3] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Where the daemon pins its links, below the pin directory (see `kernel::programs`).
const LINKS_DIR: &str = "links";

/// Prefix of the scratch pin directory of the `hooks` check. Not a hidden `.name`: bpffs
/// refuses every name with a dot in it (EPERM, "reserved for future use").
const SCRATCH_PREFIX: &str = "redirector-doctor-";

/// Width the table wraps its DETAIL column to: the table must not depend on the terminal (it
/// is often piped into a ticket or a log), and 100 columns read well everywhere.
const TABLE_WIDTH: u16 = 100;

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

/// The checks as a table with columns CHECK, STATUS and DETAIL. The DETAIL cell of a check that
/// did not pass ends with a `fix: ...` line when there is something to do. Ends with a newline,
/// ready for `print!`.
pub fn render_table(checks: &[Check]) -> String {
    let mut table = Table::new();
    table
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(TABLE_WIDTH)
        .set_header(["CHECK", "STATUS", "DETAIL"]);
    for check in checks {
        let mut detail = check.detail.clone();
        if check.status != Status::Pass
            && let Some(fix) = &check.fix
        {
            detail.push_str("\nfix: ");
            detail.push_str(fix);
        }
        table.add_row([check.name.to_owned(), check.status.to_string(), detail]);
    }
    let mut text = table.to_string();
    text.push('\n');
    text
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

// ---- privileges ----

fn check_privileges() -> Check {
    let euid = nix::unistd::geteuid().as_raw();
    let cap_eff = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| parse_cap_eff(&status));
    // Capabilities newer than the running kernel cannot be granted (CAP_BPF is 5.8+); there
    // CAP_SYS_ADMIN covers BPF, so they are not asked for.
    let last_cap = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    privileges_verdict(euid, cap_eff, last_cap)
}

/// The effective capability mask from the text of /proc/self/status.
fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

fn missing_caps(cap_eff: u64, last_cap: Option<u32>) -> Vec<&'static str> {
    REQUIRED_CAPS
        .iter()
        .filter(|(bit, _)| last_cap.is_none_or(|last| *bit <= last))
        .filter(|(bit, _)| cap_eff & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

fn privileges_verdict(euid: u32, cap_eff: Option<u64>, last_cap: Option<u32>) -> Check {
    let Some(cap_eff) = cap_eff else {
        // No CapEff to go by (a /proc without it): fall back on the uid alone.
        return if euid == 0 {
            Check::pass(
                PRIVILEGES,
                "uid 0 (capabilities not readable from /proc/self/status)",
            )
        } else {
            Check::fail(
                PRIVILEGES,
                format!("uid {euid}, and the capabilities are not readable from /proc/self/status"),
                "run as root",
            )
        };
    };
    let missing = missing_caps(cap_eff, last_cap);
    if missing.is_empty() {
        let held: Vec<&str> = REQUIRED_CAPS
            .iter()
            .filter(|(bit, _)| last_cap.is_none_or(|last| *bit <= last))
            .map(|(_, name)| *name)
            .collect();
        let detail = format!("uid {euid} with {} effective", held.join(", "));
        if euid != 0 {
            // The capabilities would do for the kernel, but `redirector run` also writes root's
            // files (the API socket, the state file) and checks for uid 0 up front.
            return Check::warn(
                PRIVILEGES,
                format!("{detail}; `redirector run` requires uid 0"),
                Some("run the daemon as root".to_owned()),
            );
        }
        return Check::pass(PRIVILEGES, detail);
    }
    let detail = format!(
        "uid {euid}; the effective capabilities lack {}",
        missing.join(", ")
    );
    // The kernel checks capabilities, not the uid: root in a container that drops them cannot
    // load programs either.
    let fix = if euid == 0 {
        "root without these capabilities (a container that drops them?): give the container \
         BPF, NET_ADMIN and SYS_ADMIN (or run it privileged)"
            .to_owned()
    } else {
        "run as root, or grant the capabilities: \
         setcap cap_bpf,cap_net_admin,cap_sys_admin+ep $(command -v redirector)"
            .to_owned()
    };
    Check::fail(PRIVILEGES, detail, fix)
}

// ---- kernel ----

fn check_kernel() -> Check {
    // The same string `uname -r` prints, without needing nix's `feature` feature or unsafe.
    match fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(release) => kernel_verdict(release.trim()),
        Err(err) => Check::warn(
            KERNEL,
            format!("cannot read the kernel release from /proc/sys/kernel/osrelease: {err}"),
            Some(min_kernel_fix()),
        ),
    }
}

/// (major, minor) of a release such as "6.18.44-fc-v669" or "5.14.0-rc1".
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?;
    let digits = minor
        .find(|c: char| !c.is_ascii_digit())
        .map_or(minor, |end| &minor[..end]);
    Some((major, digits.parse().ok()?))
}

fn min_kernel_fix() -> String {
    format!("use Linux {}.{} or newer", MIN_KERNEL.0, MIN_KERNEL.1)
}

fn kernel_verdict(release: &str) -> Check {
    let (min_major, min_minor) = MIN_KERNEL;
    match parse_release(release) {
        Some(version) if version >= MIN_KERNEL => {
            Check::pass(KERNEL, format!("{release} (>= {min_major}.{min_minor})"))
        }
        Some(_) => Check::fail(
            KERNEL,
            format!(
                "{release} is older than {min_major}.{min_minor}: SO_NETNS_COOKIE needs 5.14, \
                 sockmap with listening sockets 5.10, bpf_link for cgroups 5.7"
            ),
            min_kernel_fix(),
        ),
        None => Check::warn(
            KERNEL,
            format!(
                "cannot tell the version of kernel release {release:?}; redirector needs {min_major}.{min_minor}+"
            ),
            Some(min_kernel_fix()),
        ),
    }
}

// ---- btf ----

fn check_btf() -> Check {
    match Path::new(VMLINUX_BTF).try_exists() {
        Ok(true) => Check::pass(BTF, format!("{VMLINUX_BTF} present")),
        Ok(false) => Check::fail(
            BTF,
            format!("{VMLINUX_BTF} not found: the kernel exposes no BTF type information"),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (distribution kernels are)",
        ),
        Err(err) => Check::warn(BTF, format!("cannot look at {VMLINUX_BTF}: {err}"), None),
    }
}

// ---- cgroup2 ----

fn check_cgroup2() -> Check {
    match prereq::cgroup2_mount() {
        Ok(mount) => Check::pass(CGROUP2, format!("mounted at {}", mount.display())),
        Err(err) => Check::fail(
            CGROUP2,
            err.to_string(),
            "mount cgroup v2: mount -t cgroup2 none /sys/fs/cgroup (a hybrid host: /sys/fs/cgroup/unified)",
        ),
    }
}

// ---- attach point ----

fn check_attach_point(cgroup: Option<&Path>) -> Check {
    let Some(path) = cgroup else {
        return Check::warn(
            ATTACH_POINT,
            "not configured",
            Some(
                "pass --cgroup DIR or set daemon.cgroup: the pods' cgroup v2 directory \
                 (e.g. kubepods)"
                    .to_owned(),
            ),
        );
    };
    let Err(err) = prereq::check_cgroup(path) else {
        return Check::pass(
            ATTACH_POINT,
            format!("{} is a child cgroup v2 directory", path.display()),
        );
    };
    let fix = match &err {
        PrereqError::CgroupMissing { path } => format!(
            "point --cgroup / daemon.cgroup at the pods' cgroup, or create it: mkdir {}",
            path.display()
        ),
        PrereqError::NotCgroup2 { mount, .. } => format!(
            "point --cgroup / daemon.cgroup at a directory under {}",
            mount.display()
        ),
        PrereqError::RootCgroup { path } => format!(
            "point --cgroup / daemon.cgroup at a child of {}, e.g. the pods' cgroup",
            path.display()
        ),
        PrereqError::NoCgroup2 => "mount cgroup v2 first (see the cgroup2 check)".to_owned(),
        // check_cgroup does not return the others; a new variant still gets a sensible fix.
        _ => "fix --cgroup / daemon.cgroup".to_owned(),
    };
    Check::fail(ATTACH_POINT, err.to_string(), fix)
}

// ---- bpffs ----

fn check_bpffs(pin_dir: &Path) -> Check {
    match prereq::check_bpffs(pin_dir) {
        Ok(()) => Check::pass(BPFFS, format!("{} is on a bpffs", pin_dir.display())),
        Err(err) => Check::fail(
            BPFFS,
            err.to_string(),
            "mount -t bpf bpf /sys/fs/bpf, or point --bpffs / daemon.bpffs at a directory on a bpffs",
        ),
    }
}

// ---- hooks ----

#[derive(Debug, thiserror::Error)]
enum HookError {
    #[error("not in the embedded eBPF object (build mismatch)")]
    Missing,
    #[error("is a {0} program, not a cgroup sock_addr or sock_ops one (build mismatch)")]
    UnexpectedType(String),
    #[error("{}", describe_program_error(.0))]
    Load(#[source] ProgramError),
}

/// What loading the programs one by one gave.
#[derive(Debug, Default)]
struct HookLoad {
    loaded: Vec<&'static str>,
    failed: Vec<(&'static str, HookError)>,
}

fn check_hooks(pin_dir: &Path, needs: &[&str]) -> Check {
    if !needs.is_empty() {
        return Check::fail(
            HOOKS,
            format!("skipped: needs {}", needs.join(" and ")),
            "resolve the checks named above, then run doctor again",
        );
    }
    let Some(parent) = scratch_parent(pin_dir) else {
        return Check::fail(
            HOOKS,
            format!(
                "skipped: found no directory on a bpffs near {} for the scratch pins",
                pin_dir.display()
            ),
            "see the bpffs check",
        );
    };
    let scratch = match ScratchDir::create(&parent) {
        Ok(scratch) => scratch,
        Err(err) => {
            return Check::fail(
                HOOKS,
                format!(
                    "cannot create a scratch pin directory in {}: {err}",
                    parent.display()
                ),
                format!(
                    "make {} writable for this user (or run as root)",
                    parent.display()
                ),
            );
        }
    };
    let outcome = load_hooks(scratch.path());
    let scratch_path = scratch.path().to_owned();
    let cleanup = scratch.remove();

    let mut check = match outcome {
        Ok(load) => hooks_verdict(&load),
        Err(err) => Check::fail(
            HOOKS,
            format!("the eBPF object did not load: {}", crate::error_chain(&err)),
            hooks_fix(),
        ),
    };
    if let Err(err) = cleanup {
        // Leaving pins behind breaks the promise that doctor changes nothing: say so loudly.
        check.detail.push_str(&format!(
            "; could not remove the scratch pins {}: {err}",
            scratch_path.display()
        ));
        if check.status == Status::Pass {
            check.status = Status::Warn;
        }
        check.fix = Some(format!("rm -r {}", scratch_path.display()));
    }
    check
}

fn hooks_fix() -> String {
    format!(
        "use Linux {}.{}+ with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF; RUST_LOG=debug prints \
         the whole verifier log",
        MIN_KERNEL.0, MIN_KERNEL.1
    )
}

fn hooks_verdict(load: &HookLoad) -> Check {
    let total = programs::HOOKS.len();
    match load.failed.first() {
        None => Check::pass(
            HOOKS,
            format!(
                "all {total} programs verified (loaded, not attached): {}",
                load.loaded.join(", ")
            ),
        ),
        Some((name, err)) => {
            let loaded = if load.loaded.is_empty() {
                "none".to_owned()
            } else {
                load.loaded.join(", ")
            };
            Check::fail(
                HOOKS,
                format!(
                    "{}/{total} programs load ({loaded}); first refused: {name}: {err}",
                    load.loaded.len()
                ),
                hooks_fix(),
            )
        }
    }
}

/// Loads the embedded object (maps pinned under `pin_dir`) and each hook's program into the
/// kernel, which runs the verifier; nothing is attached. Everything is released on return.
fn load_hooks(pin_dir: &Path) -> Result<HookLoad, EbpfError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(programs::EBPF_OBJECT)?;
    let mut load = HookLoad::default();
    // Every program is tried, not just up to the first refusal, to tell which ones work.
    for name in programs::HOOKS {
        match load_program(&mut ebpf, name) {
            Ok(()) => load.loaded.push(name),
            Err(err) => {
                if let HookError::Load(ProgramError::LoadError { verifier_log, .. }) = &err {
                    tracing::debug!(program = name, log = %verifier_log, "verifier log");
                }
                load.failed.push((name, err));
            }
        }
    }
    Ok(load)
}

fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<(), HookError> {
    match ebpf.program_mut(name).ok_or(HookError::Missing)? {
        Program::CgroupSockAddr(program) => program.load().map_err(HookError::Load),
        Program::SockOps(program) => program.load().map_err(HookError::Load),
        other => Err(HookError::UnexpectedType(format!(
            "{:?}",
            other.prog_type()
        ))),
    }
}

/// A program error in one line: for a verifier refusal, the syscall error and the last lines
/// of the log, which say what was refused (the whole log goes to the debug log).
fn describe_program_error(err: &ProgramError) -> String {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let tail = verifier_tail(&verifier_log.to_string(), 3);
            if tail.is_empty() {
                format!("BPF_PROG_LOAD: {io_error}")
            } else {
                format!("BPF_PROG_LOAD: {io_error}; verifier: {tail}")
            }
        }
        other => crate::error_chain(other),
    }
}

/// The last `lines` lines of a verifier log that say something, without its statistics.
fn verifier_tail(log: &str, lines: usize) -> String {
    let meaningful: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("processed ")
                && !line.starts_with("verification time")
                && !line.starts_with("stack depth")
        })
        .collect();
    meaningful[meaningful.len().saturating_sub(lines)..].join(" / ")
}

/// Where the scratch pin directory goes: the pin directory's nearest existing ancestor, if it
/// is on a bpffs (so nothing lands in the daemon's own directory, whose `uninstall` removes it
/// only when empty); else the pin directory itself, when it exists on a bpffs (a bpffs mounted
/// right there).
fn scratch_parent(pin_dir: &Path) -> Option<PathBuf> {
    let above = pin_dir
        .parent()
        .and_then(|parent| parent.ancestors().find(|dir| dir.is_dir()));
    let itself = pin_dir.is_dir().then_some(pin_dir);
    // For an existing directory, check_bpffs looks at that very directory.
    [above, itself]
        .into_iter()
        .flatten()
        .find(|dir| prereq::check_bpffs(dir).is_ok())
        .map(Path::to_owned)
}

/// A uniquely named directory that is removed when done with, and on unwind too.
struct ScratchDir {
    path: PathBuf,
    removed: bool,
}

impl ScratchDir {
    fn create(parent: &Path) -> io::Result<ScratchDir> {
        // pid plus a counter: unique among processes and among concurrent runs in one process.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = parent.join(format!("{SCRATCH_PREFIX}{pid}-{n}"));
            // create_dir, not create_dir_all: never adopt (and later delete) a directory that
            // someone else made. A leftover of a dead process with our pid is skipped over.
            match fs::create_dir(&path) {
                Ok(()) => {
                    return Ok(ScratchDir {
                        path,
                        removed: false,
                    });
                }
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists && n < 1000 => {}
                Err(err) => return Err(err),
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn remove(mut self) -> io::Result<()> {
        self.removed = true;
        remove_tree(&self.path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.removed
            && let Err(err) = remove_tree(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %err, "cannot remove doctor's scratch pins");
        }
    }
}

fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

// ---- router address ----

/// What binding to one router address said.
enum AddrProbe {
    Local,
    NotLocal,
    Unspecified,
    Loopback,
    Other(io::Error),
}

fn probe_router_address(addr: SocketAddr) -> AddrProbe {
    let ip = addr.ip();
    if ip.is_unspecified() {
        return AddrProbe::Unspecified;
    }
    // Port 0: whether the address is ours does not depend on the port, and the configured
    // port may well be in use by a running daemon.
    match TcpListener::bind(SocketAddr::new(ip, 0)) {
        Ok(_) if ip.is_loopback() => AddrProbe::Loopback,
        Ok(_) => AddrProbe::Local,
        Err(err) if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) => AddrProbe::NotLocal,
        Err(err) => AddrProbe::Other(err),
    }
}

fn check_router_addresses(listen: &[SocketAddr]) -> Check {
    if listen.is_empty() {
        return Check::warn(
            ROUTER_ADDRESS,
            "no router_listen: HTTP services get L4 steering only",
            Some(
                "set daemon.router_listen to an address of this node to route HTTP per request"
                    .to_owned(),
            ),
        );
    }
    let mut status = Status::Pass;
    let mut details = Vec::new();
    let mut fixes = Vec::new();
    for addr in listen {
        let ip = addr.ip();
        let (verdict, detail) = match probe_router_address(*addr) {
            AddrProbe::Local => (Status::Pass, format!("{ip} is assigned here")),
            AddrProbe::NotLocal => {
                fixes.push(
                    "daemon.router_listen must be an address of this node (see `ip addr`; a new \
                     IPv6 address may still be tentative)",
                );
                (
                    Status::Fail,
                    format!("{ip} is not assigned to any interface of this network namespace"),
                )
            }
            AddrProbe::Unspecified => {
                fixes.push("daemon.router_listen must be an address of this node, not a wildcard");
                (
                    Status::Fail,
                    format!("{ip} is a wildcard, not an address pods can dial"),
                )
            }
            AddrProbe::Loopback => {
                fixes.push("use an address of this node that pods reach (loopback is not one)");
                (
                    Status::Warn,
                    format!(
                        "{ip} is loopback: pods in their own network namespaces cannot reach it"
                    ),
                )
            }
            AddrProbe::Other(err) => (Status::Warn, format!("{ip}: cannot check: {err}")),
        };
        status = worse(status, verdict);
        details.push(detail);
    }
    fixes.dedup();
    Check {
        name: ROUTER_ADDRESS,
        status,
        detail: details.join("; "),
        fix: (!fixes.is_empty()).then(|| fixes.join("; ")),
    }
}

fn worse(a: Status, b: Status) -> Status {
    let rank = |s| match s {
        Status::Pass => 0,
        Status::Warn => 1,
        Status::Fail => 2,
    };
    if rank(b) > rank(a) { b } else { a }
}

// ---- already running ----

fn check_already_running(pin_dir: &Path) -> Check {
    let links = pin_dir.join(LINKS_DIR);
    match count_pinned_links(&links) {
        Ok(0) => Check::pass(ALREADY_RUNNING, "none"),
        Ok(_) => Check::pass(
            ALREADY_RUNNING,
            "pinned programs found (a daemon ran here; `redirector run` adopts them)",
        ),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Check::pass(ALREADY_RUNNING, "none"),
        Err(err) => Check::warn(
            ALREADY_RUNNING,
            format!("cannot look at {}: {err}", links.display()),
            None,
        ),
    }
}

/// Pinned links under `links/cg<INODE>/<hook>`.
fn count_pinned_links(links: &Path) -> io::Result<usize> {
    let mut count = 0;
    for entry in fs::read_dir(links)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            count += fs::read_dir(entry.path())?.count();
        } else {
            count += 1;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &'static str, status: Status, fix: Option<&str>) -> Check {
        Check {
            name,
            status,
            detail: format!("{name} detail"),
            fix: fix.map(str::to_owned),
        }
    }

    #[test]
    fn release_versions() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.14.0-rc1+"), Some((5, 14)));
        assert_eq!(parse_release("5.4"), Some((5, 4)));
        assert_eq!(parse_release("6.1-custom"), Some((6, 1)));
        assert_eq!(parse_release("6"), None);
        assert_eq!(parse_release("linux"), None);
        assert_eq!(parse_release(""), None);
    }

    #[test]
    fn kernel_verdicts() {
        let new = kernel_verdict("6.18.44-fc-v669");
        assert_eq!(new.status, Status::Pass);
        assert!(new.detail.contains("6.18.44-fc-v669"), "{}", new.detail);
        assert_eq!(kernel_verdict("5.14.0").status, Status::Pass);
        let old = kernel_verdict("5.10.0-21-amd64");
        assert_eq!(old.status, Status::Fail);
        assert!(old.detail.contains("5.10.0-21-amd64") && old.fix.is_some());
        assert_eq!(kernel_verdict("weird").status, Status::Warn);
    }

    #[test]
    fn cap_eff_is_parsed() {
        let status = "Name:\tcat\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tcat\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tnot-hex\n"), None);
    }

    #[test]
    fn privileges_follow_capabilities() {
        let all = (1u64 << 39) | (1 << 12) | (1 << 21);
        assert_eq!(
            privileges_verdict(1000, Some(all), Some(40)).status,
            Status::Warn,
            "enough for the kernel, but the daemon insists on root"
        );
        assert_eq!(
            privileges_verdict(0, Some(all), Some(40)).status,
            Status::Pass
        );
        let none = privileges_verdict(1000, Some(0), Some(40));
        assert_eq!(none.status, Status::Fail);
        assert!(
            none.detail.contains("CAP_BPF") && none.detail.contains("CAP_SYS_ADMIN"),
            "{}",
            none.detail
        );
        assert!(none.fix.as_deref().is_some_and(|f| f.contains("root")));
        // Root on a kernel without CAP_BPF (cap_last_cap 37): CAP_SYS_ADMIN covers BPF.
        assert_eq!(
            privileges_verdict(0, Some(0x3f_ffff_ffff), Some(37)).status,
            Status::Pass
        );
        // Root whose container dropped the capabilities cannot load programs.
        assert_eq!(
            privileges_verdict(0, Some(1 << 12), Some(40)).status,
            Status::Fail
        );
        assert_eq!(privileges_verdict(0, None, None).status, Status::Pass);
        assert_eq!(privileges_verdict(1000, None, None).status, Status::Fail);
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
    fn table_has_header_rows_and_fixes_under_failures() {
        let table = render_table(&[
            check("privileges", Status::Pass, Some("never shown")),
            check("attach point", Status::Fail, Some("mkdir /x")),
            check("router address", Status::Warn, None),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.contains("CHECK"))
            .expect("header");
        assert!(
            lines[header].contains("STATUS") && lines[header].contains("DETAIL"),
            "{table}"
        );
        let failed = lines
            .iter()
            .position(|l| l.contains("attach point"))
            .expect("row");
        assert!(lines[failed].contains("FAIL"), "{table}");
        assert!(lines[failed + 1].contains("fix: mkdir /x"), "{table}");
        assert!(table.contains("PASS") && table.contains("WARN"), "{table}");
        assert!(!table.contains("never shown"), "{table}");
        assert!(
            lines
                .iter()
                .all(|l| l.chars().count() <= usize::from(TABLE_WIDTH)),
            "{table}"
        );
    }

    #[test]
    fn long_details_wrap_within_the_table() {
        let long = Check::fail(ATTACH_POINT, "word ".repeat(60), "fix it");
        let table = render_table(&[long]);
        assert!(
            table
                .lines()
                .all(|l| l.chars().count() <= usize::from(TABLE_WIDTH)),
            "{table}"
        );
    }

    #[test]
    fn status_serializes_lowercase() {
        // toml stands in for serde_json (not a dependency here): same serde derive.
        let text = toml::to_string(&check("btf", Status::Warn, None)).expect("serialize");
        assert!(text.contains(r#"status = "warn""#), "{text}");
    }

    #[test]
    fn missing_cgroup_fails_and_names_the_path() {
        let mount = prereq::cgroup2_mount().expect("cgroup2 must be mounted to run these tests");
        let missing = mount.join("no-such-doctor-cgroup");
        let check = check_attach_point(Some(&missing));
        assert_eq!(check.status, Status::Fail);
        assert!(
            check.detail.contains("no-such-doctor-cgroup"),
            "{}",
            check.detail
        );
        assert!(check.fix.is_some_and(|f| f.contains("mkdir")));
    }

    #[test]
    fn root_cgroup_fails() {
        let mount = prereq::cgroup2_mount().expect("cgroup2 must be mounted to run these tests");
        let check = check_attach_point(Some(&mount));
        assert_eq!(check.status, Status::Fail);
        assert!(check.detail.contains("root cgroup"), "{}", check.detail);
    }

    #[test]
    fn unconfigured_cgroup_is_a_warning() {
        let check = check_attach_point(None);
        assert_eq!(check.status, Status::Warn);
        assert_eq!(check.detail, "not configured");
    }

    #[test]
    fn non_bpffs_directory_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let check = check_bpffs(&dir.path().join("redirector"));
        assert_eq!(check.status, Status::Fail);
        assert!(
            check
                .fix
                .is_some_and(|f| f.contains("mount -t bpf bpf /sys/fs/bpf"))
        );
        assert_eq!(scratch_parent(&dir.path().join("redirector")), None);
    }

    #[test]
    fn hooks_are_skipped_without_their_prerequisites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let check = check_hooks(dir.path(), &["a bpffs"]);
        assert_eq!(check.status, Status::Fail);
        assert_eq!(check.detail, "skipped: needs a bpffs");
        // Not on a bpffs: refused before anything is created.
        let check = check_hooks(dir.path(), &[]);
        assert_eq!(check.status, Status::Fail);
        assert_eq!(fs::read_dir(dir.path()).expect("read").count(), 0);
    }

    #[test]
    fn hook_verdicts() {
        let all = HookLoad {
            loaded: programs::HOOKS.to_vec(),
            failed: Vec::new(),
        };
        let pass = hooks_verdict(&all);
        assert_eq!(pass.status, Status::Pass);
        assert!(pass.detail.contains("handoff_sockops"), "{}", pass.detail);
        let some = HookLoad {
            loaded: vec!["connect4"],
            failed: vec![
                ("connect6", HookError::Missing),
                ("sendmsg4", HookError::Missing),
            ],
        };
        let fail = hooks_verdict(&some);
        assert_eq!(fail.status, Status::Fail);
        assert!(
            fail.detail
                .starts_with("1/9 programs load (connect4); first refused: connect6: "),
            "{}",
            fail.detail
        );
    }

    #[test]
    fn verifier_tail_keeps_the_refusal() {
        let log = "0: R1=ctx() R10=fp0\n; return ctx->user_port;\n0: (61) r0 = *(u32 *)(r1 +24)\n\
                   invalid bpf_context access off=24 size=4\n\
                   processed 1 insns (limit 1000000) max_states_per_insn 0 total_states 0\n\n";
        assert_eq!(
            verifier_tail(log, 2),
            "0: (61) r0 = *(u32 *)(r1 +24) / invalid bpf_context access off=24 size=4"
        );
        assert_eq!(verifier_tail("", 3), "");
    }

    #[test]
    fn router_addresses() {
        let empty = check_router_addresses(&[]);
        assert_eq!(empty.status, Status::Warn);
        assert_eq!(
            empty.detail,
            "no router_listen: HTTP services get L4 steering only"
        );
        // 192.0.2.0/24 is TEST-NET-1: assigned to no machine. Only a bind is attempted.
        let foreign = check_router_addresses(&["192.0.2.1:15001".parse().expect("addr")]);
        assert_eq!(foreign.status, Status::Fail);
        assert!(foreign.detail.contains("192.0.2.1"), "{}", foreign.detail);
        assert_eq!(
            foreign
                .fix
                .as_deref()
                .map(|f| f.starts_with("daemon.router_listen must be an address of this node")),
            Some(true)
        );
        let wildcard = check_router_addresses(&["0.0.0.0:15001".parse().expect("addr")]);
        assert_eq!(wildcard.status, Status::Fail);
        let loopback = check_router_addresses(&["127.0.0.1:15001".parse().expect("addr")]);
        assert_eq!(loopback.status, Status::Warn);
    }

    #[test]
    fn pinned_links_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(check_already_running(dir.path()).detail, "none");
        let cg = dir.path().join(LINKS_DIR).join("cg1234");
        fs::create_dir_all(&cg).expect("mkdir");
        assert_eq!(check_already_running(dir.path()).detail, "none");
        fs::write(cg.join("connect4"), b"").expect("write");
        let found = check_already_running(dir.path());
        assert_eq!(found.status, Status::Pass);
        assert!(
            found.detail.starts_with("pinned programs found"),
            "{}",
            found.detail
        );
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
