//! The `already running` check: links pinned by a daemon that ran here before.
use std::{fs, io, path::Path};

use super::{ALREADY_RUNNING, Check};

/// Where the daemon pins its links, below the pin directory (see `kernel::programs`).
const LINKS_DIR: &str = "links";

// ---- already running ----

pub(super) fn check_already_running(pin_dir: &Path) -> Check {
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
    use crate::doctor::Status;

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
}
