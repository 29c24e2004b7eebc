//! The node router: per-request HTTP/1.1, HTTP/2 and gRPC routing on the routing key, for the
//! connections the kernel hands to it (see redirector-ebpf's `xlate::handoff`).
//!
//! The kernel only hands connections over while the router's heartbeat in `RDR_ROUTER` is fresh,
//! so a router that stops or dies costs new connections nothing: they go straight to their
//! destination (fail open). A router that runs out of descriptors withdraws its heartbeat until
//! it has room again, for the same effect (see `shed`).
mod bind;
mod client_errors;
mod idle;
mod listener;
mod proxy;
mod quiet;
mod reply;
mod shed;
pub mod stats;
pub mod table;
mod upstream;
mod workers;

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, SockMap};
use hyper_util::{rt::TokioTimer, server::conn::auto};
use redirector_common::{ROUTER_SOCKET_V4, ROUTER_SOCKET_V6, RouterConfig, SockAddr};
use tokio::task::JoinHandle;
use tracing::{error, info};

pub use self::bind::BindError;
use self::{
    client_errors::ClientErrors,
    listener::{Acceptor, OrigDst},
    proxy::Proxy,
    quiet::QuietExecutor,
    shed::Shed,
    stats::AcceptLoop,
    upstream::{PoolSettings, Upstreams, h2},
};
pub use self::{stats::RouterStats, table::RouteTable, upstream::ROUTER_MARK};
use crate::{config::RouterSettings, kernel::maps::sock_addr, metrics::Metrics};

/// How often the router tells the kernel it is alive; well under `ROUTER_STALE_NS`.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);

/// The kernel maps the router drives (see redirector-common for their layouts).
pub struct RouterMaps {
    pub orig_dst: BpfHashMap<MapData, SockAddr, SockAddr>,
    pub config: Array<MapData, RouterConfig>,
    pub sockets: SockMap<MapData>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot write the router's address into the kernel")]
    Map(#[from] aya::maps::MapError),
    #[error(transparent)]
    Workers(#[from] workers::WorkerError),
}

/// A running router. Dropping it stops accepting; [`Router::shutdown`] also tells the kernel at
/// once so new connections stop coming.
pub struct Router {
    pub stats: Arc<RouterStats>,
    /// Listening sockets, each with its accept loop, per listen address.
    pub accept_loops: usize,
    /// One per accept loop (see `workers`).
    threads: Vec<std::thread::JoinHandle<()>>,
    heartbeat: JoinHandle<Array<MapData, RouterConfig>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Router {
    /// Binds the listen addresses, starts serving, and starts the heartbeat that makes the
    /// kernel hand connections over. Raise the descriptor limit before (see
    /// `kernel::limits::raise_nofile`): the router reads it here to know when it runs short.
    pub async fn start(
        settings: &RouterSettings,
        table: Arc<ArcSwap<RouteTable>>,
        maps: RouterMaps,
        metrics: Arc<Metrics>,
    ) -> Result<Router, RouterError> {
        let RouterMaps {
            orig_dst,
            config: mut router_map,
            mut sockets,
        } = maps;
        // Thread `i` serves the `i`th listener of every address.
        let mut per_thread: Vec<workers::Listeners> = (0..settings.accept_loops.get())
            .map(|_| Vec::new())
            .collect();
        let mut loops = Vec::new();
        for addr in &settings.listen {
            let group = bind::group(*addr, settings.accept_loops)?;
            let slot = if addr.is_ipv4() {
                ROUTER_SOCKET_V4
            } else {
                ROUTER_SOCKET_V6
            };
            // The kernel hands over only while the socket in this slot is open: it leaves the
            // map when it closes. One socket stands for the whole group (the map's layout is
            // pinned, one slot per family): the group's sockets all belong to this process,
            // whose end closes them all at once, however it dies, and they are only ever
            // closed together otherwise (`shutdown`). A thread ending alone (a panic) either
            // closes this one, and the kernel fails open early, or another one, whose share
            // the kernel gives to the rest of the group: never connections to a socket that
            // nobody accepts on.
            if let Some(first) = group.first() {
                sockets.set(slot, first, 0)?;
            }
            for (listener, own) in group.into_iter().zip(&mut per_thread) {
                own.push((loops.len(), listener));
                loops.push(AcceptLoop::new(*addr));
            }
        }

        let stats = Arc::new(RouterStats {
            accept_loops: loops,
            ..RouterStats::default()
        });
        let shed = Arc::new(Shed::new(stats.clone(), metrics.clone()));
        let shared = Arc::new(workers::Shared {
            settings: settings.clone(),
            table,
            stats: stats.clone(),
            metrics: metrics.clone(),
            shed: shed.clone(),
            quiet: quiet::dispatcher(),
            client_errors: Arc::new(ClientErrors::new(metrics)),
            pools: PoolSettings {
                connect_timeout: settings.connect_timeout,
                request_timeout: settings.request_timeout,
                idle_timeout: settings.idle_timeout,
            },
        });
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let threads = workers::start(per_thread, &shared, &orig_dst, &stop)?;

        let mut config = RouterConfig {
            mark: ROUTER_MARK,
            ..RouterConfig::default()
        };
        for addr in &settings.listen {
            if addr.is_ipv4() {
                config.v4 = sock_addr(*addr);
            } else {
                config.v6 = sock_addr(*addr);
            }
        }
        config.heartbeat_ns = monotonic_ns();
        router_map.set(0, config, 0)?;
        let heartbeat = tokio::spawn(beat(router_map, config, shed, stopped));
        info!(listen = ?settings.listen, accept_loops = settings.accept_loops.get(),
            "node router listening");
        Ok(Router {
            stats,
            accept_loops: settings.accept_loops.get(),
            threads,
            heartbeat,
            stop,
        })
    }

    /// Stops accepting and tells the kernel at once, so new connections go direct again.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let threads = self.threads;
        // Each thread ends once its runtime has dropped its connections (closing them).
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        if let Err(err) = joined.await {
            error!(error = %err, "router threads did not end cleanly");
        }
        match self.heartbeat.await {
            Ok(mut map) => {
                if let Err(err) = map.set(0, RouterConfig::default(), 0) {
                    error!(error = %err, "cannot withdraw the router from the kernel");
                }
            }
            Err(err) => error!(error = %err, "router heartbeat task failed"),
        }
    }
}

/// Refreshes the heartbeat, except while the router sheds load: then it is withdrawn at once
/// (a heartbeat of 0 is stale to the kernel, which then leaves connections direct as when the
/// router is down), and restored once the router has room again.
async fn beat(
    mut map: Array<MapData, RouterConfig>,
    mut config: RouterConfig,
    shed: Arc<Shed>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Array<MapData, RouterConfig> {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut withdrawn = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shed.started() => {}
            _ = stopped.changed() => return map,
        }
        if !shed.try_resume() {
            if !withdrawn {
                let stale = RouterConfig {
                    heartbeat_ns: 0,
                    ..config
                };
                match map.set(0, stale, 0) {
                    Ok(()) => withdrawn = true,
                    // Not beating has the same effect within ROUTER_STALE_NS.
                    Err(err) => error!(error = %err, "cannot withdraw the router's heartbeat"),
                }
            }
            continue;
        }
        withdrawn = false;
        config.heartbeat_ns = monotonic_ns();
        if let Err(err) = map.set(0, config, 0) {
            error!(error = %err, "router heartbeat failed; the kernel will stop handing over");
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the hand-off check in the kernel reads (coarsely,
/// as of its last tick: `bpf_ktime_get_coarse_ns`).
fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64);
    now.unwrap_or(0)
}

/// The client side of the router. Its HTTP/2 limits mirror the upstream side's (see
/// `upstream::h2`): each client connection gets at most as many streams as one upstream
/// connection carries, and stream and connection windows sized so that the client's stalled
/// streams (an upstream not reading a request body) never take its other streams' window.
fn server_builder(
    settings: &RouterSettings,
    executor: QuietExecutor,
) -> auto::Builder<QuietExecutor> {
    let mut builder = auto::Builder::new(executor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes as u32)
        .max_concurrent_streams(h2::MAX_STREAMS)
        .initial_stream_window_size(h2::STREAM_WINDOW)
        .initial_connection_window_size(h2::CONNECTION_WINDOW)
        .max_send_buf_size(h2::SEND_BUFFER);
    builder
}
