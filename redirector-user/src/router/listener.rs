//! Accepting handed-off connections: find where each was going, then serve it as HTTP/1.1 or
//! HTTP/2 (detected from the connection preface) with per-request routing.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use hyper::service::service_fn;
use hyper_util::{rt::TokioIo, server::conn::auto};
use redirector_common::SockAddr;
use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tracing::{Dispatch, debug, instrument::WithSubscriber, warn};

use super::{
    client_errors::ClientErrors,
    idle::{Activity, SHUTDOWN_GRACE},
    proxy::{Client, Proxy},
    quiet::QuietExecutor,
    shed::{self, Shed, Why},
    stats::RouterStats,
    table::canonical,
};
use crate::kernel::maps::{sock_addr, socket_addr};

/// The kernel's hand-off records: client address -> original destination.
pub struct OrigDst {
    map: Mutex<BpfHashMap<MapData, SockAddr, SockAddr>>,
    stats: Arc<RouterStats>,
}

impl OrigDst {
    pub fn new(map: BpfHashMap<MapData, SockAddr, SockAddr>, stats: Arc<RouterStats>) -> OrigDst {
        OrigDst {
            map: Mutex::new(map),
            stats,
        }
    }

    /// Where the connection from `client` was going; the record is consumed so a later
    /// connection reusing the port cannot read a stale one.
    fn take(&self, client: SocketAddr) -> Option<SocketAddr> {
        let key = sock_addr(client);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let dialed = map.get(&key, 0).ok()?;
        // Counted only when this take removed it: the table's evictions are derived from it
        // (see `kernel::tables`).
        if map.remove(&key).is_ok() {
            RouterStats::bump(&self.stats.handoff_records_taken);
        }
        socket_addr(&dialed)
    }
}

/// What serving a client connection takes, shared by the listeners.
pub struct Acceptor {
    pub proxy: Arc<Proxy>,
    pub orig_dst: OrigDst,
    /// Its executor runs the connections' stream tasks under `quiet`.
    pub server: auto::Builder<QuietExecutor>,
    /// What client connections are served under (see `quiet`).
    pub quiet: Dispatch,
    /// Shared by the threads: its WARN lines are rate-limited for the whole router.
    pub client_errors: Arc<ClientErrors>,
    pub shed: Arc<Shed>,
    /// A client connection without a request in flight for this long is closed (see `idle`).
    pub idle_timeout: Duration,
}

/// Serves the connections of one listener; `nth` is its counter in `RouterStats::accept_loops`.
pub async fn accept_loop(listener: TcpListener, acceptor: Arc<Acceptor>, nth: usize) {
    let shed = &acceptor.shed;
    let stats = &acceptor.proxy.stats;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                if let Some(counter) = stats.accept_loops.get(nth) {
                    RouterStats::bump(&counter.accepted);
                }
                accepted
            }
            Err(err) if shed::exhausted(&err) => {
                shed.start(Why::AcceptFailed(&err));
                // The kernel queued these before it heard: close them now so their clients
                // fail at once (and retry direct) rather than wait for room.
                let forget = |peer| {
                    let _ = acceptor.orig_dst.take(canonical(peer));
                };
                if !shed.refuse_queued(&listener, forget) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
            Err(err) => {
                // A client that gave up while queued, and the like: back off instead of
                // spinning in case it persists.
                warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shed.is_active() {
            refuse(&acceptor, stream, peer);
            continue;
        }
        if let Some(why) = shed.near_limit(&stream) {
            // This one is served: the low water leaves it room for its upstream connections.
            shed.start(why);
        }
        RouterStats::bump(&stats.connections);
        let Some(dialed) = acceptor.orig_dst.take(canonical(peer)) else {
            // Not handed off by the kernel: the router is not an open proxy.
            RouterStats::bump(&stats.connections_refused);
            debug!(%peer, "connection without a hand-off record; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let quiet = acceptor.quiet.clone();
        tokio::spawn(serve(acceptor, stream, peer, dialed).with_subscriber(quiet));
    }
}

/// Closes a connection handed over before the kernel heard the router sheds, with its record.
fn refuse(acceptor: &Acceptor, stream: TcpStream, peer: SocketAddr) {
    let _ = acceptor.orig_dst.take(canonical(peer));
    acceptor.shed.refuse(stream, peer);
}

/// Serves one client connection until it ends, or until it has had no request in flight for
/// the idle timeout.
async fn serve(acceptor: Arc<Acceptor>, stream: TcpStream, peer: SocketAddr, dialed: SocketAddr) {
    let proxy = acceptor.proxy.clone();
    // Lives as long as the connection; its HTTP/2 upstream connections with it.
    let client = Arc::new(Client::new(dialed, peer.ip(), &proxy.upstreams));
    let activity = Activity::new();
    let service = service_fn({
        let activity = activity.clone();
        // The request's future itself, not wrapped in another: hyper moves it whole.
        move |req| proxy.clone().handle(client.clone(), req, activity.begin())
    });
    let connection = acceptor
        .server
        .serve_connection_with_upgrades(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let timeout = acceptor.idle_timeout;
    let ended = tokio::select! {
        // In order: spares drawing a random branch order at every wake-up of the connection.
        biased;
        ended = connection.as_mut() => Some(ended),
        () = activity.idle_for(timeout, Instant::now()) => None,
    };
    let ended = match ended {
        Some(ended) => ended,
        None => {
            RouterStats::bump(&acceptor.proxy.stats.idle_closed);
            debug!(%peer, %dialed, ?timeout, "client connection idle; closing");
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                ended = connection.as_mut() => match ended {
                    // Before the protocol was known: the wait for the first bytes was cut.
                    Err(err) if is_cancelled(err.as_ref()) => Ok(()),
                    ended => ended,
                },
                // A client that holds on (not acknowledging an HTTP/2 GOAWAY) is dropped.
                () = activity.idle_for(SHUTDOWN_GRACE, Instant::now()) => Ok(()),
            }
        }
    };
    if let Err(err) = ended {
        acceptor.client_errors.record(peer, dialed, err.as_ref());
    }
}

/// hyper-util's answer to a graceful shutdown while it waits for the first bytes.
fn is_cancelled(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::Interrupted)
}
