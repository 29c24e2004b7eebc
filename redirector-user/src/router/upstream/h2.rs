//! HTTP/2 upstream connections, owned by one client connection each.
//!
//! A [`Pool`] belongs to one downstream connection and holds that client's upstream connections
//! per destination: as many as its concurrent streams need, each carrying at most
//! [`MAX_STREAMS`] or the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS` (read off the wire, see
//! `settings`), whichever is lower, so a request does not wait in h2's queue for a stream slot
//! while another connection could be opened. A connection with no stream for the idle timeout
//! closes; all of them close with the client's connection.
//!
//! Flow control is sized so that one stream can never take another's window: the connection
//! window is [`MAX_STREAMS`] stream windows, so even with every other stream of the connection
//! stalled (its reader gone quiet, its window full), a stream still has its whole window.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use http::{Request, Response};
use hyper::{body::Incoming, client::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::Mutex as AsyncMutex};
use tracing::debug;

use super::{
    DialError, PoolSettings, SendError, UpstreamBody, UpstreamError,
    settings::{Limit, SettingsWatch},
    socket,
};

/// Most streams the router puts on one upstream connection (the upstream may allow fewer), and
/// most concurrent streams it accepts on one client connection.
pub const MAX_STREAMS: u32 = 100;
/// The router's receive window of each stream, on client connections (request bodies) and on
/// upstream connections (response bodies): what it buffers of one stream's body when the side
/// that body goes to stops reading. The protocol's default, and linkerd2-proxy's.
pub const STREAM_WINDOW: u32 = 65_535;
/// Room for every stream's full window at once, so no set of stalled streams can exhaust it.
pub const CONNECTION_WINDOW: u32 = STREAM_WINDOW * MAX_STREAMS;
/// Most body bytes queued per stream for a peer that is not granting window.
pub const SEND_BUFFER: usize = STREAM_WINDOW as usize;
/// Most connections one client has to one destination; beyond, requests queue in h2 on the
/// least busy one (only an upstream allowing very few streams per connection gets here).
const MAX_CONNECTIONS: usize = 8;
/// Attempts on connections that turn out to be closed before the request is sent.
const ATTEMPTS: usize = 3;

type Conn = http2::Connection<TokioIo<SettingsWatch<TcpStream>>, Incoming, TokioExecutor>;

/// One client's HTTP/2 upstream connections, by destination.
pub struct Pool {
    settings: PoolSettings,
    destinations: Mutex<HashMap<SocketAddr, Arc<AsyncMutex<Destination>>>>,
}

#[derive(Default)]
struct Destination {
    connections: Vec<Upstream>,
    next_id: u64,
    /// The last failed dial: requests that waited for it get its error instead of dialing
    /// again one after another.
    failed: Option<(Instant, Arc<DialError>)>,
}

struct Upstream {
    id: u64,
    sender: http2::SendRequest<Incoming>,
    state: Arc<ConnState>,
}

/// What a connection's requests and its driver task share.
struct ConnState {
    in_flight: AtomicUsize,
    /// When `in_flight` last dropped to zero, in milliseconds since `epoch`.
    idle_since_ms: AtomicU64,
    epoch: Instant,
    /// The upstream's SETTINGS_MAX_CONCURRENT_STREAMS; None until its SETTINGS arrive.
    limit: Limit,
}

impl ConnState {
    fn new(limit: Limit) -> ConnState {
        ConnState {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            limit,
        }
    }

    /// Streams this connection takes: the upstream's limit, at most [`MAX_STREAMS`]; None
    /// while its SETTINGS are still on the way (it carries only the stream that opened it).
    fn capacity(&self) -> Option<usize> {
        (*self.limit.borrow()).map(|limit| limit.min(MAX_STREAMS as usize))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// How long the connection has had no stream, or None while it has some.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Relaxed) > 0 {
            return None;
        }
        let since = self.idle_since_ms.load(Relaxed);
        Some(Duration::from_millis(self.now_ms().saturating_sub(since)))
    }
}

/// One stream's claim on its connection; released when the exchange is over (the response
/// body ended or was dropped, or the request failed).
pub struct StreamPermit(Arc<ConnState>);

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Relaxed) == 1 {
            self.0.idle_since_ms.store(self.0.now_ms(), Relaxed);
        }
    }
}

impl Upstream {
    fn take(&self) -> (http2::SendRequest<Incoming>, StreamPermit) {
        self.state.in_flight.fetch_add(1, Relaxed);
        (self.sender.clone(), StreamPermit(self.state.clone()))
    }

    fn has_room(&self) -> bool {
        self.state
            .capacity()
            .is_some_and(|capacity| self.state.in_flight.load(Relaxed) < capacity)
    }

    fn settling(&self) -> bool {
        self.state.capacity().is_none()
    }
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Pool {
        Pool {
            settings,
            destinations: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `req` to `addr` on one of this client's connections (a new one if none has a free
    /// stream slot) and waits for the response headers, at most the request timeout.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let destination = self.destination(addr);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut sender, permit) = match self.checkout(addr, &destination).await {
                Ok(taken) => taken,
                Err(source) => return Err(SendError::unreachable(addr, source, req)),
            };
            let after = self.settings.request_timeout;
            match tokio::time::timeout(after, sender.try_send_request(req)).await {
                Err(_) => {
                    return Err(SendError {
                        error: UpstreamError::Timeout { addr, after },
                        request: None,
                    });
                }
                Ok(Ok(response)) => {
                    return Ok(response.map(|body| UpstreamBody::new(body, Some(permit))));
                }
                Ok(Err(mut err)) => match err.take_message() {
                    // Closed before the request went out (GOAWAY, idle close): another one.
                    Some(back) if attempt < ATTEMPTS => req = back,
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

    fn destination(&self, addr: SocketAddr) -> Arc<AsyncMutex<Destination>> {
        let mut map = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(addr).or_default().clone()
    }

    /// A stream slot on a connection to `addr`. The destination stays locked while a new
    /// connection is dialed, and requests wait for a new connection's SETTINGS before they
    /// decide they need another, so a burst opens as many connections as the upstream's limit
    /// asks for, not one each.
    async fn checkout(
        &self,
        addr: SocketAddr,
        destination: &Arc<AsyncMutex<Destination>>,
    ) -> Result<(http2::SendRequest<Incoming>, StreamPermit), Arc<DialError>> {
        let asked = Instant::now();
        // Connections whose SETTINGS did not come within the wait: not waited for again.
        let mut silent = Vec::new();
        let mut dest = loop {
            let mut dest = destination.lock().await;
            dest.connections.retain(|c| !c.sender.is_closed());
            if let Some(upstream) = dest.connections.iter().find(|c| c.has_room()) {
                return Ok(upstream.take());
            }
            let settling = dest
                .connections
                .iter()
                .find(|c| c.settling() && !silent.contains(&c.id));
            let Some(upstream) = settling else {
                break dest;
            };
            let (id, mut limit) = (upstream.id, upstream.state.limit.clone());
            drop(dest);
            // One round trip away; a connection that ends first ends the wait too.
            let settled = limit.wait_for(Option::is_some);
            if tokio::time::timeout(self.settings.connect_timeout, settled)
                .await
                .is_err()
            {
                silent.push(id);
            }
        };
        if dest.connections.len() >= MAX_CONNECTIONS
            && let Some(upstream) = dest
                .connections
                .iter()
                .min_by_key(|c| c.state.in_flight.load(Relaxed))
        {
            return Ok(upstream.take());
        }
        if let Some((at, error)) = &dest.failed
            && *at >= asked
        {
            return Err(error.clone());
        }
        match self.dial(addr).await {
            Ok((sender, conn, limit)) => {
                dest.next_id += 1;
                let upstream = Upstream {
                    id: dest.next_id,
                    sender,
                    state: Arc::new(ConnState::new(limit)),
                };
                tokio::spawn(drive(
                    conn,
                    upstream.state.clone(),
                    Arc::downgrade(destination),
                    upstream.id,
                    addr,
                    self.settings.idle_timeout,
                ));
                let taken = upstream.take();
                dest.connections.push(upstream);
                dest.failed = None;
                Ok(taken)
            }
            Err(error) => {
                let error = Arc::new(error);
                dest.failed = Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }

    async fn dial(
        &self,
        addr: SocketAddr,
    ) -> Result<(http2::SendRequest<Incoming>, Conn, Limit), DialError> {
        let stream = socket::connect(addr, self.settings.connect_timeout).await?;
        let (io, limit) = SettingsWatch::new(stream);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buf_size(SEND_BUFFER)
            .handshake(TokioIo::new(io))
            .await
            .map_err(DialError::Handshake)?;
        Ok((sender, conn, limit))
    }
}

/// Runs one connection until it ends; takes it out of its destination once it has had no
/// stream for the idle timeout, which lets hyper close it.
async fn drive(
    conn: Conn,
    state: Arc<ConnState>,
    destination: Weak<AsyncMutex<Destination>>,
    id: u64,
    addr: SocketAddr,
    idle_timeout: Duration,
) {
    let mut conn = std::pin::pin!(conn);
    let mut retired = false;
    loop {
        let wait = match state.idle_for() {
            Some(idle) => idle_timeout.saturating_sub(idle),
            None => idle_timeout,
        };
        tokio::select! {
            ended = &mut conn => {
                if let Err(err) = ended {
                    debug!(upstream = %addr, error = %err, "upstream h2 connection ended");
                }
                return;
            }
            () = tokio::time::sleep(wait), if !retired => {
                let Some(destination) = destination.upgrade() else {
                    // The client is gone; hyper closes the connection once its last stream
                    // ends, as no sender is left.
                    retired = true;
                    continue;
                };
                // Not waiting for the lock: `conn` must keep being polled, and whoever holds
                // it is about to use a connection anyway. Under it, no request can take a
                // slot of this one meanwhile.
                let Ok(mut dest) = destination.try_lock() else {
                    continue;
                };
                if state.idle_for().is_some_and(|idle| idle >= idle_timeout) {
                    dest.connections.retain(|c| c.id != id);
                    retired = true;
                    debug!(upstream = %addr, "closing idle upstream h2 connection");
                }
            }
        }
    }
}
