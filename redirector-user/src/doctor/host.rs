//! Checks on the machine itself: the privileges of this process, the kernel release and the
//! kernel's BTF.
use std::{fs, path::Path};

use super::{BTF, Check, KERNEL, MIN_KERNEL, PRIVILEGES};

/// Capabilities a non-root daemon would need, as (bit in CapEff, name).
const REQUIRED_CAPS: [(u32, &str); 3] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

// ---- privileges ----

pub(super) fn check_privileges() -> Check {
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

pub(super) fn check_kernel() -> Check {
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

pub(super) fn check_btf() -> Check {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

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
}
