//! Network-namespace cookies: how the kernel programs recognise a member pod.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// The cookie the kernel gives the network namespace at `path` (`/run/netns/NAME` or
/// `/proc/PID/ns/net`), the value `bpf_get_netns_cookie` returns for its sockets.
///
/// Reads it with `SO_NETNS_COOKIE` (Linux 5.14+) from a socket created inside the namespace by
/// a short-lived thread, so the daemon's own threads never change namespace.
pub fn cookie(path: &Path) -> io::Result<u64> {
    let ns = File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> io::Result<u64> {
                setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                let socket = std::net::UdpSocket::bind("127.0.0.1:0")
                    .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
                socket_netns_cookie(socket.as_raw_fd())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("netns cookie thread panicked")))
    })
}

/// Cookies already read, so a reload with thousands of members does not enter every namespace
/// again. Keyed by path *and* the namespace file's identity (device, inode): nsfs inode numbers
/// are reused once a namespace dies, cookies never are, so the path guards against a new pod's
/// namespace inheriting a dead one's cookie.
#[derive(Debug, Default)]
pub struct CookieCache {
    known: HashMap<(PathBuf, u64, u64), u64>,
}

impl CookieCache {
    pub fn get(&mut self, path: &Path) -> io::Result<u64> {
        let meta = std::fs::metadata(path)?;
        let id = (path.to_owned(), meta.dev(), meta.ino());
        if let Some(cookie) = self.known.get(&id) {
            return Ok(*cookie);
        }
        let value = cookie(path)?;
        self.known.insert(id, value);
        Ok(value)
    }

    /// Forgets every namespace whose path is not in `paths`.
    pub fn retain_paths(&mut self, paths: &HashSet<&Path>) {
        self.known
            .retain(|(path, _, _), _| paths.contains(path.as_path()));
    }
}

fn socket_netns_cookie(fd: i32) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_has_a_stable_nonzero_cookie() {
        let a = cookie(Path::new("/proc/self/ns/net")).expect("cookie of own netns");
        let b = cookie(Path::new("/proc/thread-self/ns/net")).expect("cookie of own netns");
        assert_ne!(a, 0);
        assert_eq!(a, b);
    }

    #[test]
    fn cache_returns_the_same_cookie() {
        let mut cache = CookieCache::default();
        let path = Path::new("/proc/self/ns/net");
        let first = cache.get(path).expect("cookie");
        assert_eq!(cache.get(path).expect("cached"), first);
        assert_eq!(first, cookie(path).expect("cookie"));
    }

    #[test]
    fn missing_namespace_is_an_error() {
        assert!(cookie(Path::new("/run/netns/definitely-not-here")).is_err());
    }
}
