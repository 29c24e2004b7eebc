//! The HTTP/1.1 pool: idle keep-alive connections per destination, shared by every client.
//!
//! Sharing is safe here because an HTTP/1.1 connection carries one exchange at a time: a client
//! that stalls holds only the connection it is using, and every other request takes another
//! one or dials a new one. Idle connections close after the pool's idle timeout.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use http::{Request, Response};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::{DialError, PoolSettings, SendError, UpstreamError, socket};

struct Idle {
    sender: http1::SendRequest<Incoming>,
    since: Instant,
}

pub struct Pool {
    settings: PoolSettings,
    /// Looked up twice per request (checkout, checkin): foldhash, as the route table.
    idle: Mutex<foldhash::HashMap<SocketAddr, Vec<Idle>>>,
}

impl Pool {
    /// A pool whose idle connections a background task closes once they have been idle for
    /// the idle timeout (the task ends with the pool).
    pub fn start(settings: PoolSettings) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            settings,
            idle: Mutex::default(),
        });
        tokio::spawn(sweep(Arc::downgrade(&pool), settings.idle_timeout));
        pool
    }

    /// Sends `req` over a pooled connection to `addr` (or a new one) and waits for the response
    /// headers, at most the request timeout. The connection goes back to the pool when the
    /// returned [`Lease`] drops (with the response body) and its exchange is complete.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        loop {
            let (mut sender, pooled) = match self.checkout(addr) {
                Some(sender) => (sender, true),
                None => match self.connect(addr).await {
                    Ok(sender) => (sender, false),
                    Err(source) => {
                        return Err(SendError::unreachable(addr, source.into(), req));
                    }
                },
            };
            let response = sender.try_send_request(req);
            let lease = Lease {
                pool: Arc::downgrade(self),
                addr,
                sender: Some(sender),
            };
            let after = self.settings.request_timeout;
            match tokio::time::timeout(after, response).await {
                Err(_) => {
                    return Err(SendError {
                        error: UpstreamError::Timeout { addr, after },
                        request: None,
                    });
                }
                Ok(Ok(response)) => return Ok((response, lease)),
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

    fn checkout(&self, addr: SocketAddr) -> Option<http1::SendRequest<Incoming>> {
        let idle_timeout = self.settings.idle_timeout;
        let mut pools = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let pool = pools.get_mut(&addr)?;
        while let Some(idle) = pool.pop() {
            if idle.since.elapsed() < idle_timeout && idle.sender.is_ready() {
                return Some(idle.sender);
            }
        }
        None
    }

    fn checkin(&self, addr: SocketAddr, sender: http1::SendRequest<Incoming>) {
        let mut pools = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        pools.entry(addr).or_default().push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    /// Drops the connections idle for the idle timeout, which closes them.
    fn expire(&self) {
        let idle_timeout = self.settings.idle_timeout;
        let mut pools = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|_, pool| {
            pool.retain(|idle| idle.since.elapsed() < idle_timeout && !idle.sender.is_closed());
            !pool.is_empty()
        });
    }

    async fn connect(&self, addr: SocketAddr) -> Result<http1::SendRequest<Incoming>, DialError> {
        let io = TokioIo::new(socket::connect(addr, self.settings.connect_timeout).await?);
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(DialError::Handshake)?;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                debug!(upstream = %addr, error = %err, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// A pooled connection's exchange in flight. Dropped, it puts the connection back in the pool
/// once the exchange is complete (the response body read to its end); a connection that closes
/// or is upgraded instead is dropped.
pub struct Lease {
    pool: Weak<Pool>,
    addr: SocketAddr,
    sender: Option<http1::SendRequest<Incoming>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(mut sender) = self.sender.take() else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let (pool, addr) = (self.pool.clone(), self.addr);
        if sender.is_ready() {
            // Dropped with a body read to its end, the exchange is usually over already: no
            // task to wait for it.
            if let Some(pool) = pool.upgrade() {
                pool.checkin(addr, sender);
            }
            return;
        }
        // Outside the runtime (at exit) there is no pool left to go back to.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if sender.ready().await.is_ok()
                    && let Some(pool) = pool.upgrade()
                {
                    pool.checkin(addr, sender);
                }
            });
        }
    }
}

async fn sweep(pool: Weak<Pool>, idle_timeout: Duration) {
    // Half the timeout: an idle connection lives at most 1.5 times the idle timeout.
    let mut tick = tokio::time::interval((idle_timeout / 2).max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.expire();
    }
}
