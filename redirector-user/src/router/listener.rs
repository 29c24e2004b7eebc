//! Accepting handed-off connections: find where each was going, then serve it as HTTP/1.1 or
//! HTTP/2 (detected from the connection preface) with per-request routing.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use hyper::service::service_fn;
use hyper_util::{rt::TokioIo, server::conn::auto};
use redirector_common::SockAddr;
use tokio::net::TcpListener;
use tracing::{Dispatch, debug, instrument::WithSubscriber, warn};

use super::{
    client_errors::ClientErrors,
    proxy::{Client, Proxy},
    quiet::QuietExecutor,
    stats::RouterStats,
    table::canonical,
};
use crate::kernel::maps::{sock_addr, socket_addr};

/// The kernel's hand-off records: client address -> original destination.
pub struct OrigDst {
    map: Mutex<BpfHashMap<MapData, SockAddr, SockAddr>>,
}

impl OrigDst {
    pub fn new(map: BpfHashMap<MapData, SockAddr, SockAddr>) -> OrigDst {
        OrigDst {
            map: Mutex::new(map),
        }
    }

    /// Where the connection from `client` was going; the record is consumed so a later
    /// connection reusing the port cannot read a stale one.
    fn take(&self, client: SocketAddr) -> Option<SocketAddr> {
        let key = sock_addr(client);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let dialed = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
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
    pub client_errors: ClientErrors,
}

pub async fn accept_loop(listener: TcpListener, acceptor: Arc<Acceptor>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let stats = &acceptor.proxy.stats;
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
        tokio::spawn(
            async move {
                let proxy = acceptor.proxy.clone();
                // Lives as long as the connection; its HTTP/2 upstream connections with it.
                let client = Arc::new(Client::new(dialed, &proxy.upstreams));
                let service = service_fn(move |req| proxy.clone().handle(client.clone(), req));
                let connection = acceptor
                    .server
                    .serve_connection_with_upgrades(TokioIo::new(stream), service);
                if let Err(err) = connection.await {
                    acceptor.client_errors.record(peer, dialed, err.as_ref());
                }
            }
            .with_subscriber(quiet),
        );
    }
}
