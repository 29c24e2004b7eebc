//! Per-request routing: read the key, pick the fork or the original destination, forward, and
//! answer for the upstream when it cannot.
//!
//! Requests and responses stream through untouched (headers included, so the key keeps
//! propagating downstream); the router adds at most one response header naming the upstream.
//! A key that came by query parameter or cookie (`key_from`) is the exception: the request
//! gains a `baggage` member with it, and, for a query parameter and `set_cookie`, the response
//! gains a `Set-Cookie`. A request without a key from a member of a sandbox with `inject_key`
//! is routed as that sandbox's and gains its key in `baggage` too.
use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use super::{
    idle::{Busy, Tracked},
    reply::{self, Cause},
    stats::RouterStats,
    table::{BaselineWhy, Decision, RouteTable, ServiceRoutes},
    upstream::{ClientUpstreams, SendError, UpstreamBody, UpstreamError, Upstreams},
};
use crate::{
    metrics::{Metrics, outcome},
    routing_key::{self, Carriers, Extracted, Found, KeyFrom, KeySources},
    state::ForkErrorPolicy,
};

pub type ProxyBody = Either<UpstreamBody, Full<Bytes>>;

pub struct Proxy {
    pub table: Arc<ArcSwap<RouteTable>>,
    pub carriers: Carriers,
    pub upstreams: Upstreams,
    pub upstream_header: Option<HeaderName>,
    pub stats: Arc<RouterStats>,
    pub metrics: Arc<Metrics>,
}

/// Which upstream served a request, for the optional response header.
enum Served<'a> {
    Fork {
        key: &'a str,
        addr: SocketAddr,
    },
    Baseline {
        addr: SocketAddr,
    },
    /// The fork was unreachable and its route says `on_fork_error = "baseline"`.
    Fallback {
        key: &'a str,
        addr: SocketAddr,
    },
}

impl Served<'_> {
    fn header_value(&self) -> Option<HeaderValue> {
        let text = match self {
            Served::Fork { key, addr } => format!("fork {key} {addr}"),
            Served::Baseline { addr } => format!("baseline {addr}"),
            Served::Fallback { key, addr } => {
                format!("baseline {addr} (fork of {key} unreachable)")
            }
        };
        HeaderValue::from_str(&text).ok()
    }
}

/// One client connection, as the router serves it.
pub struct Client {
    /// Where the connection was going when the kernel handed it over.
    pub dialed: SocketAddr,
    /// The client's address (the hand-off keeps it): who the request comes from.
    pub peer: IpAddr,
    /// Its upstream connections (HTTP/2 ones are its own; see `upstream`).
    pub upstreams: ClientUpstreams,
}

impl Client {
    pub fn new(dialed: SocketAddr, peer: IpAddr, upstreams: &Upstreams) -> Client {
        Client {
            dialed,
            peer,
            upstreams: upstreams.for_client(),
        }
    }
}

impl Proxy {
    /// Routes one request of `client`, and records how it went; `busy` counts it in flight
    /// until its response body ends.
    pub async fn handle(
        self: Arc<Self>,
        client: Arc<Client>,
        req: Request<Incoming>,
        busy: Busy,
    ) -> Result<Response<Tracked<ProxyBody>>, Infallible> {
        let started = Instant::now();
        // Held until the response headers: the decision borrows its key and the sandbox label
        // from it instead of copying them per request.
        let table = self.table.load_full();
        let (response, sandbox, outcome) = self.route(&table, &client, req).await;
        self.metrics.request(sandbox, outcome, started.elapsed());
        Ok(response.map(|body| Tracked::new(body, busy)))
    }

    /// Routes `req` with `table`; returns the response, the sandbox label (the fork's key, or
    /// empty) and the outcome label.
    async fn route<'t>(
        &self,
        table: &'t RouteTable,
        client: &Client,
        mut req: Request<Incoming>,
    ) -> (Response<ProxyBody>, &'t str, &'static str) {
        let (decision, found, sources, injected) = match table.service(client.dialed) {
            Some(service) => {
                let sources = *service.key_sources();
                let found = self.carriers.find(&req, &sources);
                // Only a request without a key can be injected one: others skip the lookup.
                let client_key = match found.key {
                    Extracted::Absent => table.injected_key(client.peer),
                    _ => None,
                };
                let (decision, injected) = decide(service, &found, client_key);
                (decision, found, sources, injected)
            }
            None => (
                Decision::Baseline {
                    why: BaselineWhy::UnknownService,
                },
                Found::absent(),
                KeySources::default(),
                None,
            ),
        };
        let sandbox = match decision {
            Decision::Fork { key, .. } => key,
            Decision::Baseline { .. } => "",
        };
        // Taken before forwarding: the extension does not travel with the request.
        let client_upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        strip_hop_by_hop(req.headers_mut(), client_upgrade.is_some());
        let set_cookie = self.pass_on_edge_key(&mut req, &found, &sources);
        if let Some(key) = injected {
            routing_key::add_to_baggage(req.headers_mut(), self.carriers.key_name(), key);
            RouterStats::bump(&self.stats.keys_injected);
        }

        let (mut response, outcome) = self.forward(client, req, &decision, client_upgrade).await;
        if let Some(cookie) = set_cookie {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        (response, sandbox, outcome)
    }

    /// A valid key that came by query parameter or cookie joins the request's `baggage`, so
    /// that services behind this one that propagate baggage keep it. Returns the `Set-Cookie`
    /// for the response when the key came by query parameter and the service sets the cookie
    /// (whatever the response: the browser session stays in the sandbox).
    fn pass_on_edge_key(
        &self,
        req: &mut Request<Incoming>,
        found: &Found,
        sources: &KeySources,
    ) -> Option<HeaderValue> {
        let key = found.from_edge()?;
        let name = self.carriers.key_name();
        routing_key::add_to_baggage(req.headers_mut(), name, key);
        if found.via != Some(KeyFrom::Query) {
            RouterStats::bump(&self.stats.keys_from_cookie);
            return None;
        }
        RouterStats::bump(&self.stats.keys_from_query);
        let cookie = routing_key::set_cookie(name, key, sources.set_cookie?)?;
        RouterStats::bump(&self.stats.cookies_set);
        Some(cookie)
    }

    /// Sends the request where `decision` says, and answers for the upstream when it cannot.
    async fn forward(
        &self,
        client: &Client,
        req: Request<Incoming>,
        decision: &Decision<'_>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> (Response<ProxyBody>, &'static str) {
        let dialed = client.dialed;
        let grpc = reply::is_grpc(req.headers());
        let (target, fork, mut outcome) = match decision {
            Decision::Fork { key, fork, .. } => {
                RouterStats::bump(&self.stats.to_fork);
                (fork.addr, Some((*key, fork.on_error)), outcome::FORK)
            }
            Decision::Baseline { why } => {
                self.stats.baseline(*why);
                let outcome = if *why == BaselineWhy::InvalidKey {
                    outcome::INVALID_KEY
                } else {
                    outcome::BASELINE
                };
                (dialed, None, outcome)
            }
        };

        let (mut response, served) = match client.upstreams.send(target, req).await {
            Ok(response) => {
                let served = match fork {
                    Some((key, _)) => Served::Fork { key, addr: target },
                    None => Served::Baseline { addr: target },
                };
                (response, served)
            }
            Err(SendError {
                error,
                request: Some(req),
            }) if matches!(error, UpstreamError::Unreachable { .. })
                && matches!(fork, Some((_, ForkErrorPolicy::Baseline))) =>
            {
                RouterStats::bump(&self.stats.fork_fallback);
                outcome = outcome::FORK_FALLBACK;
                let key = fork.map_or("", |(key, _)| key);
                warn!(
                    error = %reply::chain(&error),
                    key,
                    baseline = %dialed,
                    "fork unreachable; sending to the baseline"
                );
                match client.upstreams.send(dialed, req).await {
                    Ok(response) => (response, Served::Fallback { key, addr: dialed }),
                    Err(SendError { error, .. }) => {
                        return self.failure(&error, false, grpc);
                    }
                }
            }
            Err(SendError { error, .. }) => {
                return self.failure(&error, fork.is_some(), grpc);
            }
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client) = client_upgrade
        {
            let upstream = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(client, upstream));
        }
        if let Some(name) = &self.upstream_header
            && let Some(value) = served.header_value()
        {
            response.headers_mut().insert(name.clone(), value);
        }
        (response.map(Either::Left), outcome)
    }

    /// The router's own answer when the upstream could not give one, and its outcome label.
    fn failure(
        &self,
        error: &UpstreamError,
        to_fork: bool,
        grpc: bool,
    ) -> (Response<ProxyBody>, &'static str) {
        let cause = Cause::of(error, to_fork);
        RouterStats::bump(if cause == Cause::ForkUnreachable {
            &self.stats.fork_error
        } else {
            &self.stats.upstream_errors
        });
        debug!(error = %reply::chain(error), cause = cause.label(), grpc, "answering for the upstream");
        (
            reply::answer(cause, grpc, error).map(Either::Right),
            cause.outcome(),
        )
    }
}

/// Where a request to `service` goes, given the key `found` in it and the key of the client's
/// sandbox if that sandbox injects it (`inject_key`). A request that names a key in any
/// carrier it may use, even an invalid one, is routed on it alone; one that names none, from
/// such a client, is routed as that sandbox's, and the key to add to it is returned too.
fn decide<'t>(
    service: &'t ServiceRoutes,
    found: &Found,
    client_key: Option<&'t str>,
) -> (Decision<'t>, Option<&'t str>) {
    match (&found.key, client_key) {
        (Extracted::Absent, Some(key)) => (service.decide_key(key), Some(key)),
        _ => (service.decide(&found.key), None),
    }
}

/// Removes the hop-by-hop headers of the client's connection (RFC 9110 7.6.1) so they do not
/// steer the router's pooled upstream connection: a client's `Connection: close` must not cost
/// a fresh upstream connection per request. End-to-end headers (the routing key's carriers
/// included) pass unchanged; an upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut http::HeaderMap, upgrade: bool) {
    // Most requests carry none of them: one pass over the names is cheaper than a lookup each.
    let hop_by_hop = |name: &HeaderName| {
        name == header::CONNECTION || name == KEEP_ALIVE || name == PROXY_CONNECTION
    };
    if !upgrade && !headers.keys().any(hop_by_hop) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [KEEP_ALIVE, PROXY_CONNECTION] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
}

/// Joins the client's and the upstream's upgraded connections (WebSocket and the like) once
/// both sides have switched protocols.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(err) => {
            debug!(error = %err, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        debug!(error = %err, "upgraded connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn web() -> RouteTable {
        let config = crate::config::parse(
            r#"
[[service]]
name = "web"
address = "10.96.0.10:8080"
protocol = "http"

[[sandbox]]
key = "pr-1"
routes = [{ service = "web", fork = "10.0.0.7:8080" }]
inject_key = true

[[sandbox]]
key = "pr-2"
routes = [{ service = "web", fork = "10.0.0.8:8080" }]
"#,
        )
        .expect("valid");
        RouteTable::from_state(&config.state)
    }

    fn found(key: Extracted) -> Found {
        Found {
            key,
            via: Some(KeyFrom::Header),
        }
    }

    fn fork_of<'t>(decision: &Decision<'t>) -> Option<(&'t str, SocketAddr)> {
        match decision {
            Decision::Fork { key, fork, .. } => Some((*key, fork.addr)),
            Decision::Baseline { .. } => None,
        }
    }

    #[test]
    fn a_request_without_a_key_from_an_injecting_member_goes_as_its_sandbox() {
        let table = web();
        let service = table.service("10.96.0.10:8080".parse().unwrap()).unwrap();
        let (decision, injected) = decide(service, &Found::absent(), Some("pr-1"));
        assert_eq!(
            fork_of(&decision),
            Some(("pr-1", "10.0.0.7:8080".parse().unwrap()))
        );
        assert_eq!(injected, Some("pr-1"));
        // What `route` then does with the request's headers.
        let mut h = headers(&[("baggage", "user=alice")]);
        routing_key::add_to_baggage(&mut h, "sd-routing-key", injected.unwrap());
        assert_eq!(h["baggage"], "user=alice,sd-routing-key=pr-1");

        // A key of the member's sandbox without a fork of this service: the baseline, with
        // the key passed on all the same.
        let (decision, injected) = decide(service, &Found::absent(), Some("pr-9"));
        assert_eq!(
            decision,
            Decision::Baseline {
                why: BaselineWhy::NoRoute
            }
        );
        assert_eq!(injected, Some("pr-9"));
    }

    #[test]
    fn a_request_with_a_key_keeps_it_whoever_sends_it() {
        let table = web();
        let service = table.service("10.96.0.10:8080".parse().unwrap()).unwrap();
        let other = found(Extracted::Key("pr-2".into()));
        let (decision, injected) = decide(service, &other, Some("pr-1"));
        assert_eq!(
            fork_of(&decision),
            Some(("pr-2", "10.0.0.8:8080".parse().unwrap()))
        );
        assert_eq!(injected, None);
        let (decision, injected) = decide(service, &found(Extracted::Invalid), Some("pr-1"));
        assert_eq!(
            decision,
            Decision::Baseline {
                why: BaselineWhy::InvalidKey
            }
        );
        assert_eq!(injected, None);
    }

    #[test]
    fn a_client_of_no_injecting_sandbox_is_routed_as_before() {
        let table = web();
        let service = table.service("10.96.0.10:8080".parse().unwrap()).unwrap();
        let (decision, injected) = decide(service, &Found::absent(), None);
        assert_eq!(
            decision,
            Decision::Baseline {
                why: BaselineWhy::NoKey
            }
        );
        assert_eq!(injected, None);
        let (decision, injected) = decide(service, &found(Extracted::Key("pr-2".into())), None);
        assert_eq!(fork_of(&decision).map(|(k, _)| k), Some("pr-2"));
        assert_eq!(injected, None);
    }

    #[test]
    fn hop_by_hop_headers_stay_on_the_client_connection() {
        let mut h = headers(&[
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("baggage", "sd-routing-key=pr-1"),
            ("x-end", "2"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["baggage", "x-end"]);
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }
}
