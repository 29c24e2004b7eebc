//! Client connections that end on an error: counted by kind, each logged at debug, and abuse
//! (protocol violations, malformed requests) logged at WARN at most once a minute with the
//! number of others since, because clients, not the operator, decide how many there are.
use std::{
    error::Error,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use super::reply::chain;
use crate::metrics::Metrics;

/// At most one WARN line per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// How a client connection failed, as the `kind` label spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request headers did not arrive within the header read timeout (slow client).
    HeaderTimeout,
    /// Not HTTP, or headers over the size limit.
    Malformed,
    /// The connection closed in the middle of a request.
    Incomplete,
    /// The socket failed (reset by the client, and the like).
    Io,
    /// An HTTP/2 protocol error or abuse the connection was closed for (GOAWAY).
    Protocol,
}

impl ErrorKind {
    /// Classifies what hyper's server returned for a connection.
    pub fn of(err: &(dyn Error + 'static)) -> ErrorKind {
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            if hyper.is_timeout() {
                return ErrorKind::HeaderTimeout;
            }
            if hyper.is_parse() || hyper.is_parse_too_large() || hyper.is_parse_version_h2() {
                return ErrorKind::Malformed;
            }
            if hyper.is_incomplete_message() {
                return ErrorKind::Incomplete;
            }
        }
        let mut next = Some(err);
        while let Some(e) = next {
            if e.is::<io::Error>() {
                return ErrorKind::Io;
            }
            next = e.source();
        }
        ErrorKind::Protocol
    }

    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::HeaderTimeout => "header_timeout",
            ErrorKind::Malformed => "malformed",
            ErrorKind::Incomplete => "incomplete",
            ErrorKind::Io => "io",
            ErrorKind::Protocol => "protocol",
        }
    }

    /// What a well-behaved client does not cause (a reset or a slow network can).
    fn is_abuse(self) -> bool {
        matches!(self, ErrorKind::Malformed | ErrorKind::Protocol)
    }
}

pub struct ClientErrors {
    metrics: Arc<Metrics>,
    log: Mutex<RateLimit>,
}

#[derive(Default)]
struct RateLimit {
    last_warned: Option<Instant>,
    /// Abusive connections not logged since the last WARN line.
    unlogged: u64,
}

impl ClientErrors {
    pub fn new(metrics: Arc<Metrics>) -> ClientErrors {
        ClientErrors {
            metrics,
            log: Mutex::new(RateLimit::default()),
        }
    }

    pub fn record(&self, peer: SocketAddr, dialed: SocketAddr, err: &(dyn Error + 'static)) {
        let kind = ErrorKind::of(err);
        self.metrics.client_error(kind.label());
        let error = chain(err);
        debug!(%peer, %dialed, kind = kind.label(), %error, "client connection ended with an error");
        if !kind.is_abuse() {
            return;
        }
        let unlogged = {
            let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            if log
                .last_warned
                .is_some_and(|at| at.elapsed() < WARN_INTERVAL)
            {
                log.unlogged += 1;
                return;
            }
            log.last_warned = Some(Instant::now());
            std::mem::take(&mut log.unlogged)
        };
        warn!(
            %peer,
            %dialed,
            kind = kind.label(),
            %error,
            unlogged,
            "client connection closed for a protocol error; further ones within a minute are \
             only counted (redirector_router_client_errors_total)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_anywhere_in_the_chain_are_io() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(ErrorKind::of(&reset), ErrorKind::Io);
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] io::Error);
        assert_eq!(ErrorKind::of(&Wrapped(reset)), ErrorKind::Io);
        assert_eq!(
            ErrorKind::of(&std::fmt::Error),
            ErrorKind::Protocol,
            "anything else closed the connection on purpose"
        );
    }

    #[test]
    fn abuse_is_logged_once_per_interval_and_always_counted() {
        let metrics = Arc::new(Metrics::new());
        let errors = ClientErrors::new(metrics.clone());
        let peer: SocketAddr = "10.200.0.10:40000".parse().expect("address");
        for _ in 0..5 {
            errors.record(peer, peer, &std::fmt::Error);
        }
        errors.record(peer, peer, &io::Error::from(io::ErrorKind::ConnectionReset));
        let log = errors.log.lock().unwrap_or_else(|e| e.into_inner());
        assert!(log.last_warned.is_some());
        assert_eq!(
            log.unlogged, 4,
            "resets are not abuse and never logged at WARN"
        );
        let text = metrics.encode();
        for needle in [
            "redirector_router_client_errors_total{kind=\"protocol\"} 5",
            "redirector_router_client_errors_total{kind=\"io\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
    }
}
