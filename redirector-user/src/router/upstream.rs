//! Upstream connections: marked sockets, connect timeouts, and pools per destination.
//!
//! The pool is the router's own because the fallback policy needs something generic clients do
//! not give: when a fork cannot be reached, the request (with its unread, streaming body) must
//! come back intact so it can go to the baseline instead. Connecting happens before the request
//! is handed over, and a pooled connection that turns out closed hands the request back too.
//!
//! Every upstream socket carries [`ROUTER_MARK`]: the kernel never hands a marked socket to the
//! router, so the router's own connections to a service cannot loop back into it.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{Request, Response, Version};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;

/// SO_MARK of every upstream socket ("RDR" + 1). Must not collide with marks the node's CNI uses
/// for routing decisions; Cilium and Calico use the upper bits of the low 16 and specific
/// values, not this one.
pub const ROUTER_MARK: u32 = 0x5244_5201;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("protocol handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("request to {addr} failed: {source}")]
    Request {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("no response headers from {addr} within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
}

impl UpstreamError {
    /// Nothing reached the upstream: the request is still whole and may go elsewhere.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Handshake { .. }
        )
    }
}

/// A failed send; `request` is Some when it was never sent and can be retried elsewhere.
pub struct SendError {
    pub error: UpstreamError,
    pub request: Option<Request<Incoming>>,
}

#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
}

struct Idle {
    sender: http1::SendRequest<Incoming>,
    since: Instant,
}

/// Pools of upstream connections, keyed by destination address.
#[derive(Clone)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

struct Inner {
    settings: PoolSettings,
    h1_idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<Incoming>>>,
}

impl Upstreams {
    pub fn new(settings: PoolSettings) -> Upstreams {
        Upstreams {
            inner: Arc::new(Inner {
                settings,
                h1_idle: Mutex::new(HashMap::new()),
                h2: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Sends `req` to `addr` over HTTP/2 if the request came over HTTP/2 (h2c prior knowledge,
    /// as gRPC does), else over a pooled HTTP/1.1 connection, and waits for the response
    /// headers (at most the request timeout).
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, SendError> {
        if req.version() == Version::HTTP_2 {
            let mut sender = match self.h2_sender(addr).await {
                Ok(sender) => sender,
                Err(error) => {
                    return Err(SendError {
                        error,
                        request: Some(req),
                    });
                }
            };
            let response = sender.send_request(req);
            return self.await_response(addr, response).await;
        }

        let mut req = req;
        loop {
            let (mut sender, pooled) = match self.checkout_h1(addr) {
                Some(sender) => (sender, true),
                None => match self.connect_h1(addr).await {
                    Ok(sender) => (sender, false),
                    Err(error) => {
                        return Err(SendError {
                            error,
                            request: Some(req),
                        });
                    }
                },
            };
            let response = sender.try_send_request(req);
            self.recycle_when_ready(addr, sender);
            let timeout = self.inner.settings.request_timeout;
            match tokio::time::timeout(timeout, response).await {
                Err(_) => {
                    return Err(SendError {
                        error: UpstreamError::Timeout {
                            addr,
                            after: timeout,
                        },
                        request: None,
                    });
                }
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(mut err)) => match err.take_message() {
                    // A pooled connection the server closed meanwhile: try the next one.
                    Some(back) if pooled => req = back,
                    request => {
                        return Err(SendError {
                            error: UpstreamError::Request {
                                addr,
                                source: err.into_error(),
                            },
                            request,
                        });
                    }
                },
            }
        }
    }

    async fn await_response(
        &self,
        addr: SocketAddr,
        response: impl Future<Output = Result<Response<Incoming>, hyper::Error>>,
    ) -> Result<Response<Incoming>, SendError> {
        let after = self.inner.settings.request_timeout;
        match tokio::time::timeout(after, response).await {
            Err(_) => Err(SendError {
                error: UpstreamError::Timeout { addr, after },
                request: None,
            }),
            Ok(Err(source)) => Err(SendError {
                error: UpstreamError::Request { addr, source },
                request: None,
            }),
            Ok(Ok(response)) => Ok(response),
        }
    }

    fn checkout_h1(&self, addr: SocketAddr) -> Option<http1::SendRequest<Incoming>> {
        let idle_timeout = self.inner.settings.idle_timeout;
        let mut pools = self.inner.h1_idle.lock().unwrap_or_else(|e| e.into_inner());
        let pool = pools.get_mut(&addr)?;
        while let Some(idle) = pool.pop() {
            if idle.since.elapsed() < idle_timeout && idle.sender.is_ready() {
                return Some(idle.sender);
            }
        }
        None
    }

    /// Puts the connection back in the pool once the exchange in flight is complete (the
    /// response body read to its end). A connection that closes or is upgraded instead is
    /// dropped.
    fn recycle_when_ready(&self, addr: SocketAddr, mut sender: http1::SendRequest<Incoming>) {
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.checkin_h1(addr, sender);
            }
        });
    }

    fn checkin_h1(&self, addr: SocketAddr, sender: http1::SendRequest<Incoming>) {
        let mut pools = self.inner.h1_idle.lock().unwrap_or_else(|e| e.into_inner());
        let pool = pools.entry(addr).or_default();
        pool.retain(|idle| idle.since.elapsed() < self.inner.settings.idle_timeout);
        pool.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    async fn connect_h1(
        &self,
        addr: SocketAddr,
    ) -> Result<http1::SendRequest<Incoming>, UpstreamError> {
        let io = self.connect(addr).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                tracing::debug!(upstream = %addr, error = %err, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// The shared HTTP/2 connection to `addr` (streams multiplex over it), opened if needed.
    async fn h2_sender(
        &self,
        addr: SocketAddr,
    ) -> Result<http2::SendRequest<Incoming>, UpstreamError> {
        let existing = {
            let map = self.inner.h2.lock().unwrap_or_else(|e| e.into_inner());
            map.get(&addr).filter(|s| !s.is_closed()).cloned()
        };
        if let Some(sender) = existing {
            return Ok(sender);
        }
        let sender = self.connect_h2(addr).await?;
        let mut map = self.inner.h2.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(addr, sender.clone());
        Ok(sender)
    }

    async fn connect_h2(
        &self,
        addr: SocketAddr,
    ) -> Result<http2::SendRequest<Incoming>, UpstreamError> {
        let io = self.connect(addr).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(upstream = %addr, error = %err, "upstream h2 connection ended");
            }
        });
        Ok(sender)
    }

    /// A marked TCP connection to `addr`, within the connect timeout.
    async fn connect(&self, addr: SocketAddr) -> Result<TokioIo<TcpStream>, UpstreamError> {
        let after = self.inner.settings.connect_timeout;
        let socket =
            marked_socket(addr).map_err(|source| UpstreamError::Connect { addr, source })?;
        let stream = tokio::time::timeout(after, socket.connect(addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { addr, after })?
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }
}

fn marked_socket(addr: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(ROUTER_MARK)?;
    socket.set_nonblocking(true)?;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}
