//! Reading a config file: only a regular file, and only so much of it.
//!
//! What the path names can change under a running daemon. A FIFO there would block the read,
//! and with it the control loop; a symlink to `/dev/zero` would be read until memory runs out.
//! So the type is checked (symlinks followed) before and after opening, the open does not
//! block, and the read stops at a size cap.
use std::{
    fs::{File, Metadata, OpenOptions},
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

use super::ConfigError;

/// Largest config file read. A file at full route capacity, one compact route per line, takes
/// 5 to 10 MiB; parsing costs some 45 bytes of memory per byte of file, so this also bounds what
/// a reload may cost.
pub const MAX_BYTES: u64 = 16 * 1024 * 1024;

/// The bytes of the regular file at `path` (symlinks followed), at most [`MAX_BYTES`] of them.
pub fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let io_error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    // Checked before opening too: opening a device can have effects of its own.
    check(path, &std::fs::metadata(path).map_err(io_error)?)?;
    // Non-blocking: a FIFO swapped in since the check opens at once (and is refused below);
    // no controlling terminal from a tty swapped in either.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_error)?;
    // What was opened is what counts.
    let meta = file.metadata().map_err(io_error)?;
    check(path, &meta)?;
    read_capped(path, file, meta.len())
}

fn read_capped(path: &Path, file: File, len: u64) -> Result<Vec<u8>, ConfigError> {
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // One byte past the cap tells a file that grew while being read from one that fits.
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(too_large(path, bytes.len() as u64));
    }
    Ok(bytes)
}

fn check(path: &Path, meta: &Metadata) -> Result<(), ConfigError> {
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a special file"
        };
        return Err(ConfigError::NotAFile {
            path: path.to_owned(),
            kind,
        });
    }
    if meta.len() > MAX_BYTES {
        return Err(too_large(path, meta.len()));
    }
    Ok(())
}

fn too_large(path: &Path, size: u64) -> ConfigError {
    ConfigError::TooLarge {
        path: path.to_owned(),
        size,
        limit_mib: MAX_BYTES / (1024 * 1024),
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::mpsc, time::Duration};

    use super::*;

    /// Runs `read` on another thread: a read that blocks fails the test instead of hanging it.
    fn read_within_a_second(path: &Path) -> Result<Vec<u8>, ConfigError> {
        let (tx, rx) = mpsc::channel();
        let path = path.to_owned();
        std::thread::spawn(move || tx.send(read(&path)));
        rx.recv_timeout(Duration::from_secs(1))
            .expect("read must not block")
    }

    #[test]
    fn reads_a_regular_file_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("real.toml");
        std::fs::write(&file, "[daemon]\n").unwrap();
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read(&link).unwrap(), b"[daemon]\n");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = read_within_a_second(&fifo).unwrap_err();
        assert!(
            matches!(err, ConfigError::NotAFile { kind: "a FIFO", .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .ends_with("fifo.toml is a FIFO, not a regular file"),
            "{err}"
        );
    }

    #[test]
    fn a_symlink_to_dev_zero_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("zero.toml");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let err = read_within_a_second(&link).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::NotAFile {
                    kind: "a character device",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_file_over_the_cap_is_refused_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        let file = File::create(&big).unwrap();
        // Sparse: no need to write 16 MiB to test the cap.
        file.set_len(MAX_BYTES + 1).unwrap();
        let err = read(&big).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("big.toml is 16777217 bytes, over the limit of 16 MiB"),
            "{err}"
        );
        // A file that grows past the cap between the check and the read is cut off too.
        file.set_len(10).unwrap();
        let grows = File::open(&big).unwrap();
        file.set_len(MAX_BYTES + 100).unwrap();
        assert!(matches!(
            read_capped(&big, grows, 10),
            Err(ConfigError::TooLarge {
                size: 16_777_217,
                ..
            })
        ));
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = read(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::NotAFile {
                    kind: "a directory",
                    ..
                }
            ),
            "{err}"
        );
    }
}
