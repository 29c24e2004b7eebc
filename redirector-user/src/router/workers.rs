//! The router's threads: one per accept loop, each running a single-threaded runtime that
//! serves the connections its listeners accept, from accept to the last upstream byte, with
//! its own upstream pools.
//!
//! A connection's work never leaves its thread, so nothing is handed between cores per request
//! (no work-stealing queues, wake-ups across threads or shared pool locks), as nginx's workers
//! do; the kernel spreads new connections over the threads' listeners (`bind`). What the
//! threads share is read-mostly (the route table) or counters.
use std::{
    io,
    net::TcpListener as StdListener,
    sync::{Arc, mpsc},
    thread::JoinHandle,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use redirector_common::SockAddr;
use tokio::{net::TcpListener, sync::watch};

use super::{
    Acceptor, ClientErrors, OrigDst, Proxy, QuietExecutor, Shed, Upstreams, listener::accept_loop,
    server_builder,
};
use crate::{
    config::RouterSettings, kernel::tables::reopen_handoff, metrics::Metrics, routing_key::Carriers,
};

/// What every thread's proxy shares.
pub struct Shared {
    pub settings: RouterSettings,
    pub table: Arc<arc_swap::ArcSwap<super::RouteTable>>,
    pub stats: Arc<super::RouterStats>,
    pub metrics: Arc<Metrics>,
    pub shed: Arc<Shed>,
    pub quiet: tracing::Dispatch,
    pub client_errors: Arc<ClientErrors>,
    pub pools: super::PoolSettings,
}

/// One thread's listeners, each with its index in `RouterStats::accept_loops`.
pub type Listeners = Vec<(usize, StdListener)>;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start router thread {nth}")]
    Start {
        nth: usize,
        #[source]
        source: io::Error,
    },
    #[error("router thread {nth} ended before it was serving")]
    Gone { nth: usize },
}

/// Starts one thread per entry of `listeners`; returns once each serves its listeners.
/// `orig_dst` is opened again for each thread (a map handle per thread, no lock between them).
/// The threads stop when `stop` says so or is dropped.
pub fn start(
    listeners: Vec<Listeners>,
    shared: &Arc<Shared>,
    orig_dst: &BpfHashMap<MapData, SockAddr, SockAddr>,
    stop: &watch::Sender<bool>,
) -> Result<Vec<JoinHandle<()>>, WorkerError> {
    let mut threads = Vec::new();
    for (nth, own) in listeners.into_iter().enumerate() {
        let start_error = |source| WorkerError::Start { nth, source };
        let orig_dst = reopen_handoff(orig_dst).map_err(start_error)?;
        let shared = shared.clone();
        let stopped = stop.subscribe();
        let (ready, serving) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("rdr-router-{nth}"))
            .spawn(move || run(own, shared, orig_dst, stopped, ready))
            .map_err(start_error)?;
        match serving.recv() {
            Ok(Ok(())) => threads.push(thread),
            Ok(Err(source)) => return Err(start_error(source)),
            Err(_) => return Err(WorkerError::Gone { nth }),
        }
    }
    Ok(threads)
}

/// A thread's life: its runtime, its proxy, its accept loops, until told to stop. Dropping the
/// runtime at the end drops the connections it still serves.
fn run(
    listeners: Listeners,
    shared: Arc<Shared>,
    orig_dst: BpfHashMap<MapData, SockAddr, SockAddr>,
    mut stopped: watch::Receiver<bool>,
    ready: mpsc::Sender<io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    runtime.block_on(async move {
        let listeners: io::Result<Vec<(usize, TcpListener)>> = listeners
            .into_iter()
            .map(|(nth, listener)| Ok((nth, TcpListener::from_std(listener)?)))
            .collect();
        let listeners = match listeners {
            Ok(listeners) => listeners,
            Err(err) => {
                let _ = ready.send(Err(err));
                return;
            }
        };
        let acceptor = Arc::new(acceptor(&shared, orig_dst));
        let loops = listeners
            .into_iter()
            .map(|(nth, listener)| tokio::spawn(accept_loop(listener, acceptor.clone(), nth)))
            .collect::<Vec<_>>();
        let _ = ready.send(Ok(()));
        // Ends on `true`, and when the router is dropped without a shutdown.
        let _ = stopped.wait_for(|stop| *stop).await;
        for accepting in loops {
            accepting.abort();
        }
    });
}

/// This thread's acceptor and proxy: its own upstream pools (their sweeper runs on this
/// thread's runtime), the rest shared.
fn acceptor(shared: &Shared, orig_dst: BpfHashMap<MapData, SockAddr, SockAddr>) -> Acceptor {
    let settings = &shared.settings;
    let proxy = Arc::new(Proxy {
        table: shared.table.clone(),
        carriers: Carriers::new(&settings.key_name, &settings.extra_key_headers),
        upstreams: Upstreams::new(shared.pools),
        upstream_header: settings.upstream_header.clone(),
        stats: shared.stats.clone(),
        metrics: shared.metrics.clone(),
    });
    Acceptor {
        proxy,
        orig_dst: OrigDst::new(orig_dst, shared.stats.clone()),
        server: server_builder(
            settings,
            QuietExecutor {
                dispatch: shared.quiet.clone(),
            },
        ),
        quiet: shared.quiet.clone(),
        client_errors: shared.client_errors.clone(),
        shed: shared.shed.clone(),
        // What HTTP/1.1 waits for a next request (hyper's header read timeout), for every
        // protocol.
        idle_timeout: settings.header_read_timeout,
    }
}
