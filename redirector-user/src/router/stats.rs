//! Counters of what the router did, for logs now and metrics later.
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use super::table::BaselineWhy;

#[derive(Debug, Default)]
pub struct RouterStats {
    pub connections: AtomicU64,
    /// Connections without a hand-off record, closed: someone dialed the router directly, or
    /// the record was lost (`handoff_records_evicted`, `handoff_record_failed` in the kernel
    /// counters).
    pub connections_refused: AtomicU64,
    /// Hand-off records read and removed from the kernel's table (served or shed connections).
    pub handoff_records_taken: AtomicU64,
    pub to_fork: AtomicU64,
    pub baseline_no_key: AtomicU64,
    pub baseline_invalid_key: AtomicU64,
    pub baseline_no_route: AtomicU64,
    pub baseline_unknown_service: AtomicU64,
    /// Valid keys that came by query parameter (`key_from`), passed on in `baggage`.
    pub keys_from_query: AtomicU64,
    /// Valid keys that came by cookie, passed on in `baggage`.
    pub keys_from_cookie: AtomicU64,
    /// Requests without a key from members of a sandbox with `inject_key`, routed as that
    /// sandbox's and passed on with its key added to `baggage`.
    pub keys_injected: AtomicU64,
    /// Responses that set the routing-key cookie (`set_cookie`).
    pub cookies_set: AtomicU64,
    /// Fork unreachable, answered 502 (policy `error`).
    pub fork_error: AtomicU64,
    /// Fork unreachable, sent to the baseline (policy `baseline`).
    pub fork_fallback: AtomicU64,
    pub upstream_errors: AtomicU64,
    /// Client connections closed after the idle timeout without a request in flight.
    pub idle_closed: AtomicU64,
    /// Times the router ran short of descriptors and shed load (see `shed`).
    pub shed_episodes: AtomicU64,
    /// Connections handed over before the kernel heard of the shedding, closed unserved.
    pub connections_shed: AtomicU64,
    /// One per accept loop, in the order of the listen addresses.
    pub accept_loops: Vec<AcceptLoop>,
}

/// The connections one accept loop took from its listener's queue to serve or refuse: shows how
/// evenly the kernel spreads new connections over the loops of an address.
///
/// Each loop's thread bumps its own counter on every connection: aligned to 128 bytes (two
/// cache lines, which x86 prefetches in pairs) so neighbours in the `Vec` never share a line.
#[derive(Debug)]
#[repr(align(128))]
pub struct AcceptLoop {
    pub listen: SocketAddr,
    pub accepted: AtomicU64,
}

impl AcceptLoop {
    pub fn new(listen: SocketAddr) -> AcceptLoop {
        AcceptLoop {
            listen,
            accepted: AtomicU64::new(0),
        }
    }
}

impl RouterStats {
    pub fn baseline(&self, why: BaselineWhy) {
        match why {
            BaselineWhy::NoKey => &self.baseline_no_key,
            BaselineWhy::InvalidKey => &self.baseline_invalid_key,
            BaselineWhy::NoRoute => &self.baseline_no_route,
            BaselineWhy::UnknownService => &self.baseline_unknown_service,
        }
        .fetch_add(1, Relaxed);
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// (name, value) pairs for logging.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        [
            ("connections", &self.connections),
            ("connections_refused", &self.connections_refused),
            ("handoff_records_taken", &self.handoff_records_taken),
            ("to_fork", &self.to_fork),
            ("baseline_no_key", &self.baseline_no_key),
            ("baseline_invalid_key", &self.baseline_invalid_key),
            ("baseline_no_route", &self.baseline_no_route),
            ("baseline_unknown_service", &self.baseline_unknown_service),
            ("keys_from_query", &self.keys_from_query),
            ("keys_from_cookie", &self.keys_from_cookie),
            ("cookies_set", &self.cookies_set),
            ("keys_injected", &self.keys_injected),
            ("fork_error", &self.fork_error),
            ("fork_fallback", &self.fork_fallback),
            ("upstream_errors", &self.upstream_errors),
            ("idle_closed", &self.idle_closed),
            ("shed_episodes", &self.shed_episodes),
            ("connections_shed", &self.connections_shed),
        ]
        .into_iter()
        .map(|(name, counter)| (name, counter.load(Relaxed)))
        .collect()
    }
}
