//! Noticing config file changes.
use std::path::{Path, PathBuf};

/// Notices when the config file's content changes. Cheap metadata is compared every poll; the
/// file is read only when that moved, and a reload happens only when the bytes differ.
pub struct WatchedFile {
    path: PathBuf,
    stamp: Option<(std::time::SystemTime, u64, u64)>,
    content: Option<Vec<u8>>,
}

impl WatchedFile {
    pub fn new(path: &Path) -> WatchedFile {
        WatchedFile {
            path: path.to_owned(),
            stamp: Self::stamp(path),
            content: std::fs::read(path).ok(),
        }
    }

    /// (mtime, size, inode): an in-place write, a rename over the file, and a ConfigMap's
    /// symlink swap all move it.
    fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len(), meta.ino()))
    }

    pub fn changed(&mut self) -> bool {
        let stamp = Self::stamp(&self.path);
        if stamp == self.stamp {
            return false;
        }
        self.stamp = stamp;
        let content = std::fs::read(&self.path).ok();
        if content == self.content {
            return false;
        }
        self.content = content;
        true
    }
}
