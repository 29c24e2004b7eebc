//! A mount whose file system never answers: every path lookup under it blocks in the kernel
//! until the mount is released, as under a hung FUSE or NFS server. It is a FUSE mount whose
//! server never reads its device, so the kernel's first request (INIT) stays unanswered and
//! every later one waits for it. Releasing it closes the device, which aborts the connection:
//! the waiting lookups fail with ENOTCONN, and the mount is detached.
use std::{
    fs::{File, OpenOptions},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

pub struct HungMount {
    dir: PathBuf,
    device: Option<File>,
}

impl HungMount {
    /// Mounts it on `dir` (created if missing). The mount is seen by processes started
    /// afterwards in this mount namespace (the daemons the tests spawn).
    pub fn new(dir: &Path) -> Result<HungMount> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .context("opening /dev/fuse (is the fuse module available?)")?;
        let options = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            device.as_raw_fd()
        );
        mount(
            Some("rdr-hung"),
            dir,
            Some("fuse"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .with_context(|| format!("mounting a FUSE file system on {}", dir.display()))?;
        Ok(HungMount {
            dir: dir.to_owned(),
            device: Some(device),
        })
    }

    /// A path under the mount: looking it up blocks until [`HungMount::release`]. Never
    /// inspect it from the test itself.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Aborts the file system (blocked lookups fail) and detaches the mount.
    pub fn release(&mut self) {
        if self.device.take().is_some() {
            let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for HungMount {
    fn drop(&mut self) {
        self.release();
    }
}
