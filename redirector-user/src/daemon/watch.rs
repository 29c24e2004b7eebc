//! Noticing config file changes.
use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::config;

/// (mtime, size, inode): an in-place write, a rename over the file, and a ConfigMap's symlink
/// swap all move it.
type Stamp = Option<(SystemTime, u64, u64)>;

/// The file's bytes, or None when it cannot be read (gone, not a regular file, over the size
/// cap): a change to "unreadable" is reported too, and the reload says why.
type Content = Option<Vec<u8>>;

/// Notices when the config file's content changes, and reports it only once the content has
/// come to rest: the same stamp and bytes at two polls in a row. A file rewritten in place by
/// a writer that pauses (shorter than a poll interval) is therefore not applied half-written;
/// writing a new file and renaming it over the old one is the way to be safe from any pause.
///
/// Cheap metadata is compared every poll; the file is read only when that moved or a change
/// is waiting to settle. Reads go through [`config::read_file`]: a FIFO or a device at the
/// path never blocks the poll, and nothing is read past the size cap.
pub struct WatchedFile {
    path: PathBuf,
    stamp: Stamp,
    /// What the last poll read, when that differed from what it read before: a change that
    /// has not settled yet.
    settling: Option<(Stamp, Content)>,
    /// The content last reported (or found at start).
    reported: Content,
}

impl WatchedFile {
    pub fn new(path: &Path) -> WatchedFile {
        WatchedFile {
            path: path.to_owned(),
            stamp: stamp(path),
            settling: None,
            reported: read(path),
        }
    }

    /// True when the file's content differs from the last reported and has settled.
    pub fn changed(&mut self) -> bool {
        let stamp = stamp(&self.path);
        if self.settling.is_none() && stamp == self.stamp {
            return false;
        }
        self.stamp = stamp;
        let content = read(&self.path);
        match self.settling.take() {
            Some((before, ref seen)) if before == stamp && *seen == content => {
                if content == self.reported {
                    return false;
                }
                self.reported = content;
                true
            }
            _ => {
                self.settling = Some((stamp, content));
                false
            }
        }
    }
}

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

fn read(path: &Path) -> Content {
    config::read_file(path).ok()
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, sync::mpsc, time::Duration};

    use super::*;

    fn write_in_place(path: &Path, text: &str) {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    fn append(path: &Path, text: &str) {
        let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn a_change_is_reported_once_it_has_settled_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, "[daemon]\n").unwrap();
        let mut watched = WatchedFile::new(&path);
        assert!(!watched.changed(), "nothing changed");

        write_in_place(&path, "[daemon]\n[[service]]\n");
        assert!(!watched.changed(), "seen once: may still be being written");
        assert!(watched.changed(), "the same at the next poll: settled");
        assert!(!watched.changed(), "reported once");

        // Rewritten with the same bytes: nothing to reload.
        write_in_place(&path, "[daemon]\n[[service]]\n");
        assert!(!watched.changed());
        assert!(!watched.changed());
    }

    #[test]
    fn a_file_written_in_two_halves_is_reported_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, "[daemon]\n").unwrap();
        let mut watched = WatchedFile::new(&path);

        write_in_place(&path, "[[service]]\nname = \"a\"\n");
        assert!(!watched.changed(), "first half seen");
        append(&path, "address = \"10.0.0.1:80\"\n");
        assert!(!watched.changed(), "it moved: not settled");
        assert!(watched.changed(), "whole and at rest");
        assert_eq!(
            watched.reported.as_deref(),
            Some(&b"[[service]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\n"[..])
        );
    }

    #[test]
    fn a_rename_over_the_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, "[daemon]\n").unwrap();
        let mut watched = WatchedFile::new(&path);
        let tmp = dir.path().join("r.toml.tmp");
        std::fs::write(&tmp, "[router]\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(!watched.changed());
        assert!(watched.changed());
    }

    #[test]
    fn a_fifo_in_place_of_the_file_never_blocks_the_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, "[daemon]\n").unwrap();
        let mut watched = WatchedFile::new(&path);
        std::fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let polls = [watched.changed(), watched.changed(), watched.changed()];
            let _ = tx.send(polls);
        });
        let polls = rx
            .recv_timeout(Duration::from_secs(2))
            .expect("polls must not block on a FIFO");
        // Reported (once) so that the reload says the file is not a regular file.
        assert_eq!(polls, [false, true, false]);
    }
}
