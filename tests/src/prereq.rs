//! What the machine must offer before an end-to-end test can run, and where things live.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// The cgroup2 mount point, read from /proc/mounts. On hybrid hosts it is not
/// `/sys/fs/cgroup` (here it is `/sys/fs/cgroup/unified`), so it is never assumed.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(dir)))
        })
        .next()
        .context("no cgroup2 file system is mounted (see /proc/mounts)")
}

/// /proc/mounts escapes blanks and backslashes as `\ooo` octal.
pub(crate) fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points listed in /proc/mounts, in mount order.
pub(crate) fn mount_points() -> Result<Vec<PathBuf>> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|d| PathBuf::from(unescape_mount_field(d)))
        .collect())
}

/// The `ip` binary (iproute2). Test runners may start us with a PATH lacking /usr/sbin, so the
/// usual sbin locations are tried after PATH.
pub fn ip_bin() -> Result<&'static Path> {
    static IP: OnceLock<Option<PathBuf>> = OnceLock::new();
    IP.get_or_init(|| {
        let from_path = env::var_os("PATH")
            .map(|p| {
                env::split_paths(&p)
                    .map(|d| d.join("ip"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        from_path
            .into_iter()
            .chain(["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].map(PathBuf::from))
            .find(|p| p.is_file())
    })
    .as_deref()
    .context("iproute2 `ip` not found in PATH or /usr/sbin, /sbin (apt-get install iproute2)")
}

fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (network namespaces, cgroups and bpffs need it)".into());
    }
    if let Err(e) = cgroup2_mount() {
        return Some(format!("{e:#}"));
    }
    if let Err(e) = ip_bin() {
        return Some(format!("{e:#}"));
    }
    match fs::read_to_string("/proc/filesystems") {
        Ok(fss)
            if fss
                .lines()
                .any(|l| l.split_whitespace().last() == Some("bpf")) => {}
        Ok(_) => return Some("kernel has no bpf file system (CONFIG_BPF_SYSCALL)".into()),
        Err(e) => return Some(format!("reading /proc/filesystems: {e}")),
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Some("kernel has no network namespaces (/proc/self/ns/net missing)".into());
    }
    None
}

/// Gate for end-to-end tests: `if !redirector_tests::require_e2e() { return; }`.
///
/// Returns true when the machine can run them. Otherwise, under `CI=true` it panics, because a
/// CI run that silently skips its end-to-end tests proves nothing; elsewhere it prints a loud
/// `SKIPPED: <reason>` line to stderr and returns false.
pub fn require_e2e() -> bool {
    static MISSING: OnceLock<Option<String>> = OnceLock::new();
    let Some(reason) = MISSING.get_or_init(missing_prerequisite) else {
        return true;
    };
    if under_ci() {
        panic!("end-to-end prerequisites missing under CI=true: {reason}");
    }
    eprintln!("SKIPPED: end-to-end test cannot run on this machine: {reason}");
    false
}

/// `CI=true` (or `1`): a missing prerequisite fails the test instead of skipping it.
pub fn under_ci() -> bool {
    env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Path of a binary built from this workspace.
///
/// `<NAME>_BIN` (upper case, `-` as `_`, e.g. `REDIRECTOR_BIN`, `RDR_PEER_BIN`) overrides it;
/// otherwise it is looked up next to the running executable's profile directory (test
/// executables live in `target/<profile>/deps`, xtask in `target/<profile>`).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(p) = env::var_os(&var) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{var}={} does not name a file", p.display());
        }
        return Ok(p);
    }
    let exe = env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    if matches!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("deps" | "examples")
    ) {
        dir = dir.parent().unwrap_or(dir);
    }
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} not found: run `cargo build` first (or set {var} to the binary)",
            p.display()
        );
    }
    Ok(p)
}
