//! Network-namespace cookies: how the kernel programs recognise a member pod.
use std::{fs::File, io, os::fd::AsRawFd as _, path::Path};

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
    fn missing_namespace_is_an_error() {
        assert!(cookie(Path::new("/run/netns/definitely-not-here")).is_err());
    }
}
