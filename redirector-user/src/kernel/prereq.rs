//! Checks that the machine can host redirector, each failing with a message that says how to
//! fix it. The daemon runs them before it touches the kernel.
use std::path::{Path, PathBuf};

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, FsType, statfs};

/// `BPF_FS_MAGIC` from linux/magic.h (nix does not export it).
const BPF_FS_MAGIC: FsType = FsType(0xcafe_4a11);

#[derive(Debug, thiserror::Error)]
pub enum PrereqError {
    #[error(
        "redirector must run as root (loading eBPF programs needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    )]
    NotRoot,
    #[error(
        "no cgroup2 filesystem is mounted (see /proc/mounts); mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    #[error("attach point {path} does not exist; create the cgroup or fix `daemon.cgroup`")]
    CgroupMissing { path: PathBuf },
    #[error("attach point {path} is not a cgroup v2 directory (cgroup2 is mounted at {mount})")]
    NotCgroup2 { path: PathBuf, mount: PathBuf },
    #[error(
        "refusing to attach to the root cgroup {path}: every process of the machine runs there; use a child cgroup (e.g. the pods' cgroup)"
    )]
    RootCgroup { path: PathBuf },
    #[error("no bpffs at {path}: mount one with `mount -t bpf bpf {path}` or fix `daemon.bpffs`")]
    NoBpffs { path: PathBuf },
    #[error("cannot mount a bpffs at {path}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn check_root() -> Result<(), PrereqError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(PrereqError::NotRoot)
    }
}

/// Where cgroup2 is mounted, read from /proc/mounts (hybrid layouts put it under
/// /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf, PrereqError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|_| PrereqError::NoCgroup2)?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_src, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .next()
        .ok_or(PrereqError::NoCgroup2)
}

/// The attach point must be an existing, non-root cgroup v2 directory.
pub fn check_cgroup(path: &Path) -> Result<(), PrereqError> {
    let mount = cgroup2_mount()?;
    if !path.is_dir() {
        return Err(PrereqError::CgroupMissing {
            path: path.to_owned(),
        });
    }
    let fs = statfs(path).map_err(|_| PrereqError::CgroupMissing {
        path: path.to_owned(),
    })?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
        return Err(PrereqError::NotCgroup2 {
            path: path.to_owned(),
            mount,
        });
    }
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mount = mount.canonicalize().unwrap_or(mount);
    if canonical == mount {
        return Err(PrereqError::RootCgroup {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// The pin directory's nearest existing ancestor must be on a bpffs: pins only work there.
pub fn check_bpffs(pin_dir: &Path) -> Result<(), PrereqError> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match statfs(existing) {
        Ok(fs) if fs.filesystem_type() == BPF_FS_MAGIC => Ok(()),
        _ => Err(PrereqError::NoBpffs {
            path: existing.to_owned(),
        }),
    }
}

/// Makes sure a bpffs covers `pin_dir`: when none does and the nearest existing ancestor is an
/// empty directory (as `/sys/fs/bpf` is on a node that never mounted one), mounts one there,
/// as Cilium's agent does, and says where. Mounting over a directory with anything in it would
/// hide it, so that is refused. Returns the mount point it created, if any.
pub fn mount_bpffs_if_missing(pin_dir: &Path) -> Result<Option<PathBuf>, PrereqError> {
    if check_bpffs(pin_dir).is_ok() {
        return Ok(None);
    }
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let empty = existing != Path::new("/")
        && std::fs::read_dir(existing).is_ok_and(|mut entries| entries.next().is_none());
    if !empty {
        return Err(PrereqError::NoBpffs {
            path: existing.to_owned(),
        });
    }
    nix::mount::mount(
        Some("bpf"),
        existing,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|errno| PrereqError::MountBpffs {
        path: existing.to_owned(),
        source: errno.into(),
    })?;
    Ok(Some(existing.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_is_not_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_bpffs(&dir.path().join("redirector")).unwrap_err();
        assert!(matches!(err, PrereqError::NoBpffs { .. }), "{err}");
    }

    #[test]
    fn a_directory_with_files_is_never_mounted_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep"), "x").unwrap();
        let err = mount_bpffs_if_missing(&dir.path().join("redirector")).unwrap_err();
        assert!(matches!(err, PrereqError::NoBpffs { .. }), "{err}");
        assert!(dir.path().join("keep").exists());
    }

    #[test]
    fn root_cgroup_is_refused() {
        let mount = cgroup2_mount().expect("cgroup2 must be mounted to run these tests");
        let err = check_cgroup(&mount).unwrap_err();
        assert!(matches!(err, PrereqError::RootCgroup { .. }), "{err}");
    }

    #[test]
    fn missing_cgroup_is_named() {
        let mount = cgroup2_mount().expect("cgroup2 must be mounted to run these tests");
        let err = check_cgroup(&mount.join("no-such-cgroup-here")).unwrap_err();
        assert!(err.to_string().contains("no-such-cgroup-here"), "{err}");
    }
}
