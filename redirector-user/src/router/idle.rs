//! Closing client connections that carry no request for the client idle timeout.
//!
//! hyper closes an HTTP/1.1 connection that waits longer than the header read timeout for its
//! next request, but nothing closes an HTTP/2 connection without streams (hyper's server has no
//! idle timeout; keep-alive pings only find dead peers, and a live client answers them), nor a
//! connection that never sends a byte (the protocol is detected from the first bytes, and that
//! wait has no timeout). Each holds a descriptor and its buffers for good: 10 000 idle HTTP/2
//! clients held 262 MiB. So each client connection counts its requests in flight, and once it
//! has had none for the timeout it is shut down gracefully (HTTP/2: GOAWAY, so a client knows
//! it may retry elsewhere) and, if the client does not let it end, dropped.
use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// How long a connection shut down for idleness gets to finish (an HTTP/2 client acknowledging
/// the GOAWAY's ping), counted while it stays idle.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Requests in flight on one client connection.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    /// When `in_flight` last went to 0 (or the connection was accepted).
    idle_since: Instant,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: Instant::now(),
            }),
        })
    }

    /// Marks a request in flight until the returned guard drops (with the response body).
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.lock().in_flight += 1;
        Busy {
            activity: self.clone(),
        }
    }

    /// Resolves once the connection has had no request in flight for `timeout`, counting from
    /// no earlier than `from`.
    pub async fn idle_for(&self, timeout: Duration, from: Instant) {
        loop {
            let wait = {
                let state = self.lock();
                if state.in_flight > 0 {
                    // Busy: look again after a whole timeout; the idle time restarts anyway
                    // when the last request ends.
                    timeout
                } else {
                    let idle = Instant::now().duration_since(state.idle_since.max(from));
                    match timeout.checked_sub(idle) {
                        Some(left) if !left.is_zero() => left,
                        _ => return,
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request in flight; see [`Activity::begin`].
#[derive(Debug)]
pub struct Busy {
    activity: Arc<Activity>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.activity.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
        }
    }
}

/// A response body that keeps its request counted as in flight until it ends or is dropped.
pub struct Tracked<B> {
    inner: B,
    busy: Option<Busy>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, busy: Busy) -> Tracked<B> {
        Tracked {
            inner,
            busy: Some(busy),
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // Over: idle from now, not from whenever the server drops the body.
            self.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_time_counts_only_without_requests_in_flight() {
        let activity = Activity::new();
        let timeout = Duration::from_millis(100);
        let busy = activity.begin();
        let waiting = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(timeout, Instant::now()).await }
        });
        tokio::time::sleep(timeout * 3).await;
        assert!(!waiting.is_finished(), "a request in flight is not idle");
        drop(busy);
        let ended = Instant::now();
        waiting.await.expect("idle");
        let idle = ended.elapsed();
        assert!(idle >= timeout, "idle after {idle:?}");
    }

    #[tokio::test]
    async fn counting_starts_no_earlier_than_asked() {
        let activity = Activity::new();
        let timeout = Duration::from_millis(100);
        tokio::time::sleep(timeout * 2).await;
        let from = Instant::now();
        activity.idle_for(timeout, from).await;
        assert!(from.elapsed() >= timeout);
    }
}
