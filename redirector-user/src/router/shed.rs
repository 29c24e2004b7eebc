//! Load shedding, the fail-open way.
//!
//! Once the kernel has handed a connection to the router, only the router can serve it. A router
//! out of descriptors (or socket memory) cannot accept: handed-off connections pile up in its
//! listen queue and their clients hang, though without the router they would have been served
//! directly. So a router that runs short *sheds*: it withdraws its heartbeat from `RDR_ROUTER`,
//! and the kernel leaves new connections on their way to their destination exactly as when the
//! router is down (counted as `router_down`); what the kernel queued before it heard is closed at
//! once, so those clients fail fast (a retry goes direct) instead of waiting for room; the
//! connections being served carry on. Each heartbeat tick checks whether there is room again,
//! and the router takes hand-offs again when there is.
//!
//! Running short means accept failed for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM), or
//! the descriptor just accepted is within [`LOW_WATER`] of the soft `RLIMIT_NOFILE`: every client
//! also needs descriptors for its upstream connections, so waiting for accept itself to fail
//! would leave the last clients accepted with nothing to forward them on.
use std::{
    io,
    net::SocketAddr,
    os::{fd::AsRawFd, unix::net::UnixDatagram},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::FutureExt as _;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
};
use tracing::{debug, info, warn};

use super::stats::RouterStats;
use crate::{kernel::limits, metrics::Metrics};

/// Shed once fewer descriptors than this remain below the soft limit.
pub const LOW_WATER: u64 = 32;
/// Take hand-offs again only once this many descriptors can be opened.
pub const RESUME_HEADROOM: usize = 64;
/// Shortest shedding episode: the kernel is told at most about once a second, however a client
/// plays with the limit.
pub const MIN_EPISODE: Duration = Duration::from_secs(1);
/// At most one WARN line per this interval; further episodes are counted.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// True for accept errors that mean "no resources now", as opposed to a failed client.
pub fn exhausted(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Why shedding started.
#[derive(Debug)]
pub enum Why<'a> {
    AcceptFailed(&'a io::Error),
    /// The descriptor accepted last; the soft limit.
    NearLimit {
        fd: u64,
        limit: u64,
    },
}

pub struct Shed {
    active: AtomicBool,
    /// Wakes the heartbeat task when shedding starts, so the kernel hears at once.
    started: Notify,
    /// The soft descriptor limit; None when unknown or unlimited.
    limit: Option<u64>,
    /// A descriptor kept for the moment accept fails: closing it makes room to accept a queued
    /// connection and close it.
    reserve: Mutex<Option<UnixDatagram>>,
    episode: Mutex<Episode>,
    stats: Arc<RouterStats>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Episode {
    since: Option<Instant>,
    /// Queued connections closed in this episode.
    refused: u64,
    last_warned: Option<Instant>,
    /// Episodes not logged at WARN since the last WARN line.
    unlogged: u64,
}

impl Shed {
    /// Reads the descriptor limit now: call after the daemon raised it.
    pub fn new(stats: Arc<RouterStats>, metrics: Arc<Metrics>) -> Shed {
        let limit = limits::nofile()
            .ok()
            .map(|n| n.soft)
            .filter(|soft| *soft != libc::RLIM_INFINITY);
        Shed {
            active: AtomicBool::new(false),
            started: Notify::new(),
            limit,
            reserve: Mutex::new(UnixDatagram::unbound().ok()),
            episode: Mutex::new(Episode::default()),
            stats,
            metrics,
        }
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves when shedding starts (or started since the last call).
    pub async fn started(&self) {
        self.started.notified().await;
    }

    /// A reason to shed if `stream`'s descriptor leaves fewer than [`LOW_WATER`] free below the
    /// limit. Descriptors are allocated lowest first, so every one below it is in use: one
    /// comparison per accepted connection tells how close the router is.
    pub fn near_limit(&self, stream: &TcpStream) -> Option<Why<'static>> {
        let fd = u64::try_from(stream.as_raw_fd()).ok()?;
        let limit = self.limit?;
        (fd >= limit.saturating_sub(LOW_WATER)).then_some(Why::NearLimit { fd, limit })
    }

    /// Starts shedding unless it is under way.
    pub fn start(&self, why: Why<'_>) {
        // Held while the flag flips, so that `try_resume` never sees an episode without its
        // start time.
        let mut episode = self.lock();
        if self.active.swap(true, Ordering::AcqRel) {
            return;
        }
        let now = Instant::now();
        episode.since = Some(now);
        episode.refused = 0;
        self.started.notify_one();
        RouterStats::bump(&self.stats.shed_episodes);
        self.metrics.set_router_shedding(true);
        let cause = match why {
            Why::AcceptFailed(err) => format!("accept failed: {err}"),
            Why::NearLimit { fd, limit } => {
                format!("descriptor {fd} accepted, the limit (RLIMIT_NOFILE) is {limit}")
            }
        };
        if episode
            .last_warned
            .is_some_and(|at| now.duration_since(at) < WARN_INTERVAL)
        {
            episode.unlogged += 1;
            debug!(%cause, "node router out of resources again; shedding");
            return;
        }
        episode.last_warned = Some(now);
        let unlogged = std::mem::take(&mut episode.unlogged);
        warn!(
            %cause,
            unlogged,
            "node router out of resources: shedding, new connections go direct until it has \
             room again (further episodes within a minute are only counted)"
        );
    }

    /// Closes a connection the kernel handed over before it heard that the router sheds.
    pub fn refuse(&self, stream: TcpStream, peer: SocketAddr) {
        drop(stream);
        RouterStats::bump(&self.stats.connections_shed);
        self.metrics.router_shed_connection();
        self.lock().refused += 1;
        debug!(%peer, "queued connection closed while shedding");
    }

    /// Accept just failed for lack of a descriptor: accepts one queued connection on the
    /// descriptor kept in reserve and refuses it (`forget` drops what the router knows of the
    /// client), then takes the reserve again. False when nothing was queued or there is no
    /// reserve (someone else took the descriptor it freed), for the caller to back off.
    pub fn refuse_queued(&self, listener: &TcpListener, forget: impl FnOnce(SocketAddr)) -> bool {
        let Some(spare) = self.reserve().take() else {
            return false;
        };
        drop(spare);
        // One attempt, no waiting: `accept` tries the socket at once while it is readable.
        let accepted = listener.accept().now_or_never().and_then(Result::ok);
        let refused = accepted.is_some();
        if let Some((stream, peer)) = accepted {
            forget(peer);
            self.refuse(stream, peer);
        }
        // Taken after the refused connection closed, so its descriptor is free for it.
        self.refill_reserve();
        refused
    }

    /// Ends shedding if it has lasted [`MIN_EPISODE`] and [`RESUME_HEADROOM`] descriptors can
    /// be opened (with the reserve back in place). Returns whether the router takes hand-offs
    /// again.
    pub fn try_resume(&self) -> bool {
        if !self.is_active() {
            return true;
        }
        let since = self.lock().since;
        let lasted = since.map(|at| at.elapsed()).unwrap_or_default();
        if lasted < MIN_EPISODE || !has_room() {
            return false;
        }
        self.refill_reserve();
        let refused = {
            let episode = self.lock();
            self.active.store(false, Ordering::Release);
            episode.refused
        };
        self.metrics.set_router_shedding(false);
        info!(
            after = ?lasted,
            refused,
            "node router has room again: taking hand-offs"
        );
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Episode> {
        self.episode.lock().unwrap_or_else(|e| e.into_inner())
    }

    // Never held together with the episode lock.
    fn reserve(&self) -> std::sync::MutexGuard<'_, Option<UnixDatagram>> {
        self.reserve.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refill_reserve(&self) {
        let mut reserve = self.reserve();
        if reserve.is_none() {
            *reserve = UnixDatagram::unbound().ok();
        }
    }
}

/// True if [`RESUME_HEADROOM`] descriptors (sockets, which also need socket memory) can be
/// opened now; they are closed again at once.
fn has_room() -> bool {
    let mut probe = Vec::with_capacity(RESUME_HEADROOM);
    for _ in 0..RESUME_HEADROOM {
        match UnixDatagram::unbound() {
            Ok(socket) => probe.push(socket),
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_are_told_apart() {
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(exhausted(&io::Error::from_raw_os_error(code)), "{code}");
        }
        for code in [libc::ECONNABORTED, libc::EPERM, libc::EINTR] {
            assert!(!exhausted(&io::Error::from_raw_os_error(code)), "{code}");
        }
    }

    /// With the descriptor table full, queued connections are still closed, one after the other,
    /// on the reserve descriptor. Runs in a child process (this test binary again, this test
    /// only): the limit it lowers is process-wide, and the tests beside it need descriptors.
    #[test]
    fn queued_connections_are_closed_even_with_no_descriptor_left() {
        const CHILD: &str = "RDR_SHED_EMFILE_CHILD";
        const NAME: &str =
            "router::shed::tests::queued_connections_are_closed_even_with_no_descriptor_left";
        if std::env::var_os(CHILD).is_none() {
            let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args(["--exact", NAME, "--test-threads=1"])
                .env(CHILD, "1")
                .status()
                .expect("run the child");
            assert!(status.success(), "child: {status}");
            return;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            use std::io::Read as _;
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
            let addr = listener.local_addr().expect("address");
            let stats = Arc::new(RouterStats::default());
            let shed = Shed::new(stats.clone(), Arc::new(Metrics::new()));
            let clients: Vec<std::net::TcpStream> = (0..2)
                .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
                .collect();

            let low = libc::rlimit {
                rlim_cur: 256,
                rlim_max: limits::nofile().expect("limit").hard,
            };
            // SAFETY: valid rlimit; this process runs this test alone.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
            let mut hog = Vec::new();
            let full = loop {
                match UnixDatagram::unbound() {
                    Ok(socket) => hog.push(socket),
                    Err(err) => break err,
                }
            };
            assert!(exhausted(&full), "{full}");
            let err = listener
                .accept()
                .await
                .expect_err("no descriptor to accept on");
            assert!(exhausted(&err), "{err}");

            let mut forgotten = Vec::new();
            assert!(shed.refuse_queued(&listener, |peer| forgotten.push(peer)));
            assert!(
                shed.refuse_queued(&listener, |peer| forgotten.push(peer)),
                "the reserve is back for the next one"
            );
            assert!(
                !shed.refuse_queued(&listener, |_| {}),
                "nothing queued any more"
            );
            drop(hog);

            let mut expected: Vec<SocketAddr> = clients
                .iter()
                .map(|c| c.local_addr().expect("address"))
                .collect();
            expected.sort();
            forgotten.sort();
            assert_eq!(forgotten, expected);
            for mut client in clients {
                client
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                let mut byte = [0u8; 1];
                match client.read(&mut byte) {
                    Ok(0) => {}
                    Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {}
                    other => panic!("the client's connection is not closed: {other:?}"),
                }
            }
            assert_eq!(stats.connections_shed.load(Ordering::Relaxed), 2);
        });
    }

    #[tokio::test]
    async fn an_episode_lasts_at_least_the_minimum_and_is_counted() {
        let stats = Arc::new(RouterStats::default());
        let metrics = Arc::new(Metrics::new());
        let shed = Shed::new(stats.clone(), metrics.clone());
        assert!(!shed.is_active());
        let err = io::Error::from_raw_os_error(libc::EMFILE);
        shed.start(Why::AcceptFailed(&err));
        shed.start(Why::AcceptFailed(&err));
        assert!(shed.is_active());
        // Woken without waiting for a tick.
        tokio::time::timeout(Duration::from_secs(1), shed.started())
            .await
            .expect("the heartbeat task is woken");
        assert!(!shed.try_resume(), "not before the minimum episode");
        assert!(metrics.encode().contains("redirector_router_shedding 1"));
        shed.lock().since = Some(Instant::now() - MIN_EPISODE);
        assert!(shed.try_resume(), "room enough in a test process");
        assert!(!shed.is_active());
        assert!(metrics.encode().contains("redirector_router_shedding 0"));
        assert_eq!(
            stats.shed_episodes.load(Ordering::Relaxed),
            1,
            "one episode"
        );
    }
}
