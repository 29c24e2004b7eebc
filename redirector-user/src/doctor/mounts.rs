//! Checks on the file systems the daemon needs: cgroup v2, the attach point below it, and the
//! bpffs its pin directory lives on.
use std::path::Path;

use super::{ATTACH_POINT, BPFFS, CGROUP2, Check};
use crate::kernel::prereq::{self, PrereqError};

// ---- cgroup2 ----

pub(super) fn check_cgroup2() -> Check {
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

pub(super) fn check_attach_point(cgroup: Option<&Path>) -> Check {
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

pub(super) fn check_bpffs(pin_dir: &Path) -> Check {
    match prereq::check_bpffs(pin_dir) {
        Ok(()) => Check::pass(BPFFS, format!("{} is on a bpffs", pin_dir.display())),
        Err(err) => Check::fail(
            BPFFS,
            err.to_string(),
            "mount -t bpf bpf /sys/fs/bpf, or point --bpffs / daemon.bpffs at a directory on a bpffs",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::{Status, hooks::scratch_parent};

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
}
