//! Upstream connections: marked sockets, connect timeouts, and pools that keep clients apart.
//!
//! The pools are the router's own because the fallback policy needs something generic clients
//! do not give: when a fork cannot be reached, the request (with its unread, streaming body)
//! must come back intact so it can go to the baseline instead. Connecting happens before the
//! request is handed over, and a pooled connection that turns out closed hands the request back
//! too.
//!
//! # Isolation between clients
//!
//! The router stands between many pods and one service, so whatever the pods share upstream
//! is something one pod can take from the others. What each protocol shares:
//!
//! - HTTP/1.1 connections carry one exchange at a time, so they are pooled for every client
//!   ([`h1`]): a client that stalls holds the one connection it uses, never anyone else's.
//! - An HTTP/2 connection is shared state: its stream slots (the upstream's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`), its connection-level flow-control windows both ways,
//!   its HPACK tables and its fate (one GOAWAY or protocol error ends every stream on it).
//!   Multiplexing several clients onto one lets a client that opens streams and never finishes
//!   them, or stops reading its responses, stall everyone else's requests. Part of that is
//!   beyond the router's reach: how large the upstream's receive windows are, and when its
//!   application reads request bodies.
//!
//! So HTTP/2 upstream connections belong to one client connection each ([`h2`]): the router
//! keeps the topology the pods would have without it, where each client's connection is its
//! own. A client gets as many upstream connections per destination as its concurrent streams
//! need (capped per connection by the upstream's limit), holds them for as long as it uses them
//! (they close after the idle timeout, and with the client), and cannot reach anyone else's.
//! The cost is the sharing gained by merging clients, which the pods never had: one upstream
//! connection per client connection and destination, and a handshake on a client connection's
//! first request to each.
//!
//! Within one client, flow control is sized so that one stalled stream cannot stall its
//! siblings either, and buffering stays bounded per stream (see [`h2`]'s constants, which also
//! configure the client side in `server_builder`).
mod body;
mod h1;
pub mod h2;
mod settings;
mod socket;

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response, Version};
use hyper::body::Incoming;

pub use self::{body::UpstreamBody, socket::ROUTER_MARK};

/// Why a connection to an upstream could not be opened. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect failed")]
    Connect(#[source] io::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("protocol handshake failed")]
    Handshake(#[source] hyper::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Shared: one failed dial answers every request that was waiting for it.
    #[error("cannot reach {addr}")]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: Arc<DialError>,
    },
    #[error("request to {addr} failed")]
    Request {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("no response headers from {addr} within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
}

/// A failed send; `request` is Some when it was never sent and can be retried elsewhere.
pub struct SendError {
    pub error: UpstreamError,
    pub request: Option<Request<Incoming>>,
}

impl SendError {
    fn unreachable(addr: SocketAddr, source: Arc<DialError>, req: Request<Incoming>) -> SendError {
        SendError {
            error: UpstreamError::Unreachable { addr, source },
            request: Some(req),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
}

/// The upstream connections every client shares (HTTP/1.1).
#[derive(Clone)]
pub struct Upstreams {
    settings: PoolSettings,
    h1: Arc<h1::Pool>,
}

impl Upstreams {
    /// Must run inside the runtime: the HTTP/1.1 pool's idle sweeper starts here.
    pub fn new(settings: PoolSettings) -> Upstreams {
        Upstreams {
            settings,
            h1: h1::Pool::start(settings),
        }
    }

    /// The upstream side of one client connection.
    pub fn for_client(&self) -> ClientUpstreams {
        ClientUpstreams {
            shared: self.clone(),
            h2: h2::Pool::new(self.settings),
        }
    }
}

/// What one client connection sends upstream through: the shared HTTP/1.1 pool and its own
/// HTTP/2 connections, which close when this is dropped (with the client's connection).
pub struct ClientUpstreams {
    shared: Upstreams,
    h2: h2::Pool,
}

impl ClientUpstreams {
    /// Sends `req` to `addr` over HTTP/2 if the request came over HTTP/2 (h2c prior knowledge,
    /// as gRPC does), else over HTTP/1.1, and waits for the response headers (at most the
    /// request timeout).
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<Incoming>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        if req.version() == Version::HTTP_2 {
            return self.h2.send(addr, req).await;
        }
        let (response, lease) = self.shared.h1.send(addr, req).await?;
        Ok(response.map(|body| UpstreamBody::leased(body, lease)))
    }
}
