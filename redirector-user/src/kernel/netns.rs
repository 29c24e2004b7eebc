//! Network-namespace cookies: how the kernel programs recognise a member pod.
//!
//! A member is named by a path (`/run/netns/NAME`, `/proc/PID/ns/net`), but the kernel knows
//! it by the cookie of the namespace the path names *now*. A pod sandbox restart deletes the
//! namespace and creates a new one at the same path, and the kernel may hand the new one the
//! dead one's nsfs inode number, so neither the path nor (device, inode) identifies a
//! namespace: only the cookie does, and it is never reused. The daemon therefore reads the
//! cookie of every member path at every poll and compares cookies.
use std::{
    collections::BTreeSet,
    fs::File,
    io,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};
use tracing::warn;

/// Why a member path does not name a usable network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a namespace file (not on nsfs)")]
    NotNamespace { path: PathBuf },
    #[error("cannot work inside the network namespace at {path}")]
    Inside {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the network namespace cookie of {path}")]
    Cookie {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Opening the path did not return within [`OPEN_TIMEOUT`] (a hung FUSE or network
    /// filesystem on the way, say). The thread stuck in that open is left to it, and the path
    /// is not tried again until the open returns.
    #[error(
        "opening {path} did not return within {}s (a hung filesystem on the way?); \
         not tried again until it does", OPEN_TIMEOUT.as_secs())]
    Stalled { path: PathBuf },
}

/// How long opening one member path may take before it counts as stalled. Opening a namespace
/// file takes microseconds; only a path through a hung filesystem takes longer.
pub const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Paths whose open is stuck in the kernel, each with the one thread waiting in it.
static STALLED: std::sync::Mutex<BTreeSet<PathBuf>> = std::sync::Mutex::new(BTreeSet::new());

/// nsfs' `f_type` (`NSFS_MAGIC` in linux/magic.h).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The cookie of the network namespace at `path`, the value `bpf_get_netns_cookie` returns
/// for its sockets.
pub fn cookie(path: &Path) -> Result<u64, NetnsError> {
    only_answer(path, resolve_all([path]))
}

/// The one result of a batch of one `path`.
fn only_answer<T>(
    path: &Path,
    mut batch: Vec<(PathBuf, Result<T, NetnsError>)>,
) -> Result<T, NetnsError> {
    batch.pop().map_or_else(
        || {
            Err(NetnsError::Cookie {
                path: path.to_owned(),
                source: io::Error::other("no answer from the namespace worker"),
            })
        },
        |(_, result)| result,
    )
}

/// The cookies of the network namespaces at `paths` now, each with its own result, in order.
///
/// A worker thread opens every path (non-blocking, so a FIFO or a device at a member path
/// cannot stall the caller; it must be an nsfs file), then enters each namespace in turn and
/// reads `SO_NETNS_COOKIE` (Linux 5.14+) from a socket made there. The caller's threads never
/// change namespace, and one thread serves the whole batch: a poll over thousands of members
/// costs one thread and a `setns` per member, no thread per member.
pub fn resolve_all<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
) -> Vec<(PathBuf, Result<u64, NetnsError>)> {
    resolve_with_addresses(paths.into_iter().map(|path| (path, false)))
        .into_iter()
        .map(|(path, result)| (path, result.map(|member| member.cookie)))
        .collect()
}

/// A member namespace as [`resolve_with_addresses`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub cookie: u64,
    /// The addresses configured in it, when asked for (empty when they could not be read).
    pub addresses: Option<Vec<IpAddr>>,
}

/// As [`resolve_all`], and for each path paired with `true`, also the addresses configured in
/// the namespace (on any interface), read while the worker is inside it.
pub fn resolve_with_addresses<'a>(
    paths: impl IntoIterator<Item = (&'a Path, bool)>,
) -> Vec<(PathBuf, Result<Member, NetnsError>)> {
    let (paths, want): (Vec<PathBuf>, Vec<bool>) = paths
        .into_iter()
        .map(|(path, addresses)| (path.to_owned(), addresses))
        .unzip();
    let cookie_error = |path, source| NetnsError::Cookie { path, source };
    run_in_each(&paths, cookie_error, |index, path| {
        let cookie = read_cookie()?;
        let addresses = want[index].then(|| {
            local_addresses().unwrap_or_else(|err| {
                warn!(member = %path.display(), error = %err,
                    "cannot read the member namespace's addresses");
                Vec::new()
            })
        });
        Ok(Member { cookie, addresses })
    })
}

/// The IP addresses configured in the network namespace at `path` (on any interface), read by
/// a short-lived thread that enters it.
pub fn addresses(path: &Path) -> Result<Vec<std::net::IpAddr>, NetnsError> {
    let cookie_error = |path, source| NetnsError::Cookie { path, source };
    only_answer(
        path,
        run_in_each(&[path.to_owned()], cookie_error, |_, _| local_addresses()),
    )
}

/// Runs `work` inside the network namespace at each of `paths` in turn, on one worker thread
/// (the caller's threads never change namespace), with each path's own result, in order (`work`
/// is given the path and its index in `paths`); a
/// failure to enter a namespace or of `work` there is reported through `error`. Every path is
/// opened first ([`open_all`]: never blocking for longer than [`OPEN_TIMEOUT`] per path, and
/// it must be an nsfs file), before the worker enters any namespace.
pub fn run_in_each<T: Send>(
    paths: &[PathBuf],
    error: impl Fn(PathBuf, io::Error) -> NetnsError + Sync,
    work: impl FnMut(usize, &Path) -> io::Result<T> + Send,
) -> Vec<(PathBuf, Result<T, NetnsError>)> {
    let mut work = work;
    let error = &error;
    let failed = |why: &str| {
        paths
            .iter()
            .map(|path| {
                (
                    path.clone(),
                    Err(error(path.clone(), io::Error::other(why.to_owned()))),
                )
            })
            .collect()
    };
    let opened = open_all(paths);
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("netns-worker".into())
            .spawn_scoped(scope, || {
                paths
                    .iter()
                    .zip(opened)
                    .enumerate()
                    .map(|(index, (path, file))| {
                        let result = file.and_then(|file| {
                            setns(&file, CloneFlags::CLONE_NEWNET)
                                .map_err(io::Error::from)
                                .and_then(|()| work(index, path))
                                .map_err(|source| error(path.clone(), source))
                        });
                        (path.clone(), result)
                    })
                    .collect::<Vec<_>>()
            });
        match worker {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| failed("the namespace worker panicked")),
            Err(_) => failed("cannot start the namespace worker thread"),
        }
    })
}

/// The network namespaces of the processes in `cgroup` and its descendants (the pods on the
/// node, for the attach cgroup), one `/proc/PID/ns/net` path per namespace, leaving out the
/// daemon's own (the node's: its sockets include the router's own). Processes that exit
/// meanwhile are skipped; a cgroup tree deeper than 32 levels is not followed further.
pub fn of_cgroup(cgroup: &Path) -> io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::MetadataExt as _;
    let identity = |path: &Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino()));
    let own = identity(Path::new("/proc/self/ns/net"))?;
    let mut seen = std::collections::HashSet::from([own]);
    let mut namespaces = Vec::new();
    let mut pending = vec![(cgroup.to_owned(), 0)];
    while let Some((dir, depth)) = pending.pop() {
        let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(procs) => procs,
            // The cgroup went away while we walked it.
            Err(err) if err.kind() == io::ErrorKind::NotFound && dir != cgroup => continue,
            Err(err) => return Err(err),
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Ok(id) = identity(&path)
                && seen.insert(id)
            {
                namespaces.push(path);
            }
        }
        if depth >= 32 {
            continue;
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push((entry.path(), depth + 1));
            }
        }
    }
    Ok(namespaces)
}

/// The addresses configured in the calling thread's network namespace.
fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let addresses = nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| ifa.address)
        .filter_map(|addr| {
            addr.as_sockaddr_in()
                .map(|a| IpAddr::V4(a.ip()))
                .or_else(|| addr.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
        })
        .collect();
    Ok(addresses)
}

/// Opens every path as [`open_namespace`] does, on opener threads, so that an open stuck in
/// the kernel (a path through a hung FUSE or NFS mount: no flag makes a path lookup
/// non-blocking) costs the caller [`OPEN_TIMEOUT`] once. That path then fails with
/// [`NetnsError::Stalled`], its opener is left waiting, and a fresh opener carries on with the
/// rest; later calls fail the path at once until the stuck open returns. Paths opened by
/// another thread name the same namespaces: only `/proc/thread-self` differs, and every thread
/// here is in the daemon's own namespaces.
fn open_all(paths: &[PathBuf]) -> Vec<Result<File, NetnsError>> {
    use std::sync::mpsc;
    let mut results: Vec<Option<Result<File, NetnsError>>> = paths.iter().map(|_| None).collect();
    let mut todo: Vec<usize> = Vec::with_capacity(paths.len());
    {
        let stalled = STALLED.lock().unwrap_or_else(|e| e.into_inner());
        for (index, path) in paths.iter().enumerate() {
            if stalled.contains(path) {
                results[index] = Some(Err(NetnsError::Stalled { path: path.clone() }));
            } else {
                todo.push(index);
            }
        }
    }
    while !todo.is_empty() {
        let (sender, answers) = mpsc::channel();
        let batch: Vec<(usize, PathBuf)> = todo.iter().map(|&i| (i, paths[i].clone())).collect();
        let started = std::thread::Builder::new()
            .name("netns-opener".into())
            .spawn(move || {
                for (index, path) in batch {
                    let result = open_namespace(&path);
                    // Given up on as stalled while it waited: its open has returned, so the
                    // path may be tried again, and the rest of the batch is another opener's.
                    let given_up = STALLED
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&path);
                    if given_up || sender.send((index, result)).is_err() {
                        return;
                    }
                }
            });
        if let Err(source) = started {
            for index in todo.drain(..) {
                let path = paths[index].clone();
                let source = io::Error::new(source.kind(), "cannot start a thread to open it");
                results[index] = Some(Err(NetnsError::Open { path, source }));
            }
            break;
        }
        let mut done = 0;
        loop {
            match answers.recv_timeout(OPEN_TIMEOUT) {
                Ok((index, result)) => {
                    results[index] = Some(result);
                    done += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // The opener is stuck on the first path it has not answered.
                    let index = todo[done];
                    let path = paths[index].clone();
                    STALLED
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(path.clone());
                    warn!(member = %path.display(), timeout = ?OPEN_TIMEOUT,
                        "opening a member path hangs; leaving a thread waiting in it");
                    results[index] = Some(Err(NetnsError::Stalled { path }));
                    done += 1;
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    done = todo.len();
                    break;
                }
            }
        }
        todo.drain(..done.min(todo.len()));
    }
    results
        .into_iter()
        .zip(paths)
        .map(|(result, path)| {
            result.unwrap_or_else(|| {
                Err(NetnsError::Open {
                    path: path.clone(),
                    source: io::Error::other("the opener thread ended without an answer"),
                })
            })
        })
        .collect()
}

/// Opens `path` as a namespace file without ever blocking, and refuses anything not on nsfs.
fn open_namespace(path: &Path) -> Result<File, NetnsError> {
    let open_error = |source: io::Error| NetnsError::Open {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(open_error)?;
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| open_error(e.into()))?;
    if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(NetnsError::NotNamespace {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// The cookie of the calling thread's network namespace.
fn read_cookie() -> io::Result<u64> {
    // Any socket of the namespace carries its cookie; an unbound one needs no interface up.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .or_else(|_| socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None))?;
    socket_netns_cookie(socket.as_raw_fd())
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
    fn a_batch_answers_each_path_in_order() {
        let own = Path::new("/proc/self/ns/net");
        let missing = Path::new("/run/netns/definitely-not-here");
        let results = resolve_all([own, missing, own]);
        assert_eq!(results.len(), 3);
        let first = *results[0].1.as_ref().expect("own netns");
        assert!(matches!(results[1].1, Err(NetnsError::Open { .. })));
        assert_eq!(*results[2].1.as_ref().expect("own netns again"), first);
        assert_eq!(results[1].0, missing);
    }

    #[test]
    fn addresses_are_read_only_when_asked_for() {
        let own = Path::new("/proc/self/ns/net");
        let results = resolve_with_addresses([(own, true), (own, false)]);
        let with = results[0].1.as_ref().expect("own netns");
        let without = results[1].1.as_ref().expect("own netns");
        assert_eq!(with.cookie, without.cookie);
        assert_eq!(without.addresses, None);
        let listed = with.addresses.as_ref().expect("asked for");
        assert_eq!(listed, &addresses(own).expect("addresses of own netns"));
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let err = cookie(&fifo).expect_err("a FIFO is no namespace");
        assert!(matches!(err, NetnsError::NotNamespace { .. }), "{err}");
    }

    #[test]
    fn a_regular_file_or_device_is_refused() {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        for path in [file.path(), Path::new("/dev/zero")] {
            let err = cookie(path).expect_err("not a namespace");
            assert!(matches!(err, NetnsError::NotNamespace { .. }), "{err}");
        }
    }

    #[test]
    fn another_kind_of_namespace_is_refused() {
        let err = cookie(Path::new("/proc/self/ns/uts")).expect_err("not a network namespace");
        assert!(matches!(err, NetnsError::Cookie { .. }), "{err}");
    }

    #[test]
    fn a_cgroup_that_is_not_there_is_an_error() {
        assert!(of_cgroup(Path::new("/nonexistent-cgroup")).is_err());
    }

    #[test]
    fn missing_namespace_is_an_error() {
        assert!(cookie(Path::new("/run/netns/definitely-not-here")).is_err());
    }
}
