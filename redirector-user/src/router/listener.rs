//! Accepting handed-off connections: find where each was going, then serve it as HTTP/1.1 or
//! HTTP/2 (detected from the connection preface) with per-request routing.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use redirector_common::SockAddr;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::{proxy::Proxy, stats::RouterStats, table::canonical};
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

pub async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    orig_dst: Arc<OrigDst>,
    server: Arc<auto::Builder<TokioExecutor>>,
) {
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
        RouterStats::bump(&proxy.stats.connections);
        let Some(dialed) = orig_dst.take(canonical(peer)) else {
            // Not handed off by the kernel: the router is not an open proxy.
            RouterStats::bump(&proxy.stats.connections_refused);
            debug!(%peer, "connection without a hand-off record; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| proxy.clone().handle(dialed, req));
            let connection = server.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(err) = connection.await {
                debug!(%peer, %dialed, error = %err, "client connection ended with an error");
            }
        });
    }
}
