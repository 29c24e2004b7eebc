//! Prometheus metrics (text format at `GET /metrics` on `daemon.metrics_listen`).
//!
//! Kernel-side numbers (per-CPU counters, per-route steering counts, map occupancy) are read when
//! scraped; the router counts its requests as they happen.
use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::api::server::{Call, Query, Request};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub sandbox: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The routing key when it has a fork of the service, else empty: labels stay bounded
    /// whatever keys clients send.
    pub sandbox: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Request outcomes, as the `outcome` label spells them.
pub mod outcome {
    pub const FORK: &str = "fork";
    pub const BASELINE: &str = "baseline";
    pub const INVALID_KEY: &str = "invalid_key";
    pub const FORK_ERROR: &str = "fork_error";
    pub const FORK_FALLBACK: &str = "fork_fallback";
    pub const UPSTREAM_ERROR: &str = "upstream_error";
    /// Every outcome above: what a sandbox's request series are removed by.
    pub const ALL: [&str; 6] = [
        FORK,
        BASELINE,
        INVALID_KEY,
        FORK_ERROR,
        FORK_FALLBACK,
        UPSTREAM_ERROR,
    ];
}

type LatencyHistogram = Family<OutcomeLabels, Histogram, fn() -> Histogram>;

type CountersBySandbox = foldhash::HashMap<Box<str>, [Option<Counter>; outcome::ALL.len()]>;

/// The request series handed out so far, so that a request finds its counter and histogram
/// without building labels and SipHashing them in the families' maps. Handles share their
/// values with the families' series.
#[derive(Default)]
struct RequestSeries {
    /// `requests` by sandbox label, then by the outcome's index in `outcome::ALL`. Written only
    /// under its write lock, which `forget_sandbox` also takes, so a removed series never stays
    /// counted here.
    counters: RwLock<CountersBySandbox>,
    /// `request_duration_seconds` by the outcome's index; never removed.
    latency: [OnceLock<Histogram>; outcome::ALL.len()],
}

pub struct Metrics {
    registry: Registry,
    kernel_events: Family<EventLabels, Counter>,
    steered: Family<RouteLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: LatencyHistogram,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    reloads: Family<ResultLabels, Counter>,
    api_changes: Family<ResultLabels, Counter>,
    client_errors: Family<KindLabels, Counter>,
    router_shedding: Gauge,
    router_shed_connections: Counter,
    /// Every routing key with series, and the services of its `connections_steered` ones, so
    /// they can be removed with the sandbox (a family cannot list its label sets).
    keys: Mutex<BTreeMap<String, BTreeSet<String>>>,
    series: RequestSeries,
    /// 1 once the first desired state is in the kernel (with the Kubernetes source: once the
    /// cluster has been read whole); what `/readyz` answers.
    ready: Gauge,
}

fn latency_histogram() -> Histogram {
    // 20 µs .. ~5 s: the router's own hop sits at the low end, upstreams anywhere.
    Histogram::new(exponential_buckets(0.000_02, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("redirector");
        let kernel_events = Family::<EventLabels, Counter>::default();
        registry.register(
            "kernel_events",
            "Kernel program events since load: fast_path, steered, handoff, router_down, ...",
            kernel_events.clone(),
        );
        let steered = Family::<RouteLabels, Counter>::default();
        registry.register(
            "connections_steered",
            "Connections of sandbox members steered to a fork, per route (kernel, L4)",
            steered.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests routed by the node router, per sandbox and outcome",
            requests.clone(),
        );
        let request_seconds: LatencyHistogram = Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Node router time from request to upstream response headers",
            request_seconds.clone(),
        );
        let map_entries = Family::<MapLabels, Gauge>::default();
        registry.register(
            "map_entries",
            "Entries in a kernel map",
            map_entries.clone(),
        );
        let map_capacity = Family::<MapLabels, Gauge>::default();
        registry.register(
            "map_capacity",
            "Capacity of a kernel map",
            map_capacity.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config file reloads by result (ok, rejected, failed)",
            reloads.clone(),
        );
        let api_changes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "api_changes",
            "Changes requested through the API by result (ok, rejected, failed)",
            api_changes.clone(),
        );
        let client_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "router_client_errors",
            "Client connections of the node router that ended on an error, by kind \
             (protocol, malformed, header_timeout, incomplete, io)",
            client_errors.clone(),
        );
        let router_shedding = Gauge::default();
        registry.register(
            "router_shedding",
            "1 while the node router is short of descriptors and the kernel leaves new \
             connections direct",
            router_shedding.clone(),
        );
        let router_shed_connections = Counter::default();
        registry.register(
            "router_shed_connections",
            "Connections handed to the node router before it started shedding, closed unserved",
            router_shed_connections.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 once the first desired state is applied (with Kubernetes: read from the cluster)",
            ready.clone(),
        );
        Metrics {
            ready,
            registry,
            kernel_events,
            steered,
            requests,
            request_seconds,
            map_entries,
            map_capacity,
            reloads,
            api_changes,
            client_errors,
            router_shedding,
            router_shed_connections,
            keys: Mutex::default(),
            series: RequestSeries::default(),
        }
    }

    pub fn request(&self, sandbox: &str, outcome: &'static str, took: Duration) {
        let Some(index) = outcome::ALL.iter().position(|known| *known == outcome) else {
            return self.request_uncached(sandbox, outcome, took);
        };
        let counted = self
            .counters_read()
            .get(sandbox)
            .and_then(|by_outcome| by_outcome[index].as_ref())
            .map(Counter::inc)
            .is_some();
        if !counted {
            let mut counters = self.counters_write();
            if !sandbox.is_empty() {
                self.keys_lock().entry(sandbox.to_owned()).or_default();
            }
            let counter = self.requests.get_or_create_owned(&RequestLabels {
                sandbox: sandbox.to_owned(),
                outcome,
            });
            counter.inc();
            counters.entry(sandbox.into()).or_default()[index] = Some(counter);
        }
        self.series.latency[index]
            .get_or_init(|| {
                self.request_seconds
                    .get_or_create_owned(&OutcomeLabels { outcome })
            })
            .observe(took.as_secs_f64());
    }

    fn counters_read(&self) -> std::sync::RwLockReadGuard<'_, CountersBySandbox> {
        self.series
            .counters
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn counters_write(&self) -> std::sync::RwLockWriteGuard<'_, CountersBySandbox> {
        self.series
            .counters
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// An outcome outside `outcome::ALL`, which has no cached series.
    fn request_uncached(&self, sandbox: &str, outcome: &'static str, took: Duration) {
        let labels = RequestLabels {
            sandbox: sandbox.to_owned(),
            outcome,
        };
        // The same one read lock as `get_or_create` when the series exists; the key is noted
        // only when it is created.
        if let Some(counter) = self.requests.get(&labels) {
            counter.inc();
        } else {
            if !sandbox.is_empty() {
                self.keys_lock().entry(labels.sandbox.clone()).or_default();
            }
            self.requests.get_or_create(&labels).inc();
        }
        self.request_seconds
            .get_or_create(&OutcomeLabels { outcome })
            .observe(took.as_secs_f64());
    }

    pub fn set_ready(&self) {
        self.ready.set(1);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn client_error(&self, kind: &'static str) {
        self.client_errors.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn set_router_shedding(&self, shedding: bool) {
        self.router_shedding.set(i64::from(shedding));
    }

    pub fn router_shed_connection(&self) {
        self.router_shed_connections.inc();
    }

    pub fn api_change(&self, result: &'static str) {
        self.api_changes
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Sets a counter that mirrors a kernel total: counters only go up, so this adds the
    /// difference (a kernel total that went down, after maps were re-created, is not followed).
    fn mirror(counter: &Counter, total: u64) {
        let now = counter.get();
        if total > now {
            counter.inc_by(total - now);
        }
    }

    pub fn kernel_event(&self, event: &str, total: u64) {
        Self::mirror(
            &self.kernel_events.get_or_create(&EventLabels {
                event: event.to_owned(),
            }),
            total,
        );
    }

    pub fn route_steered(&self, sandbox: &str, service: &str, total: u64) {
        // Called per route at each scrape, not per request: the lock costs nothing that counts.
        self.keys_lock()
            .entry(sandbox.to_owned())
            .or_default()
            .insert(service.to_owned());
        Self::mirror(
            &self.steered.get_or_create(&RouteLabels {
                sandbox: sandbox.to_owned(),
                service: service.to_owned(),
            }),
            total,
        );
    }

    /// Removes the series of a deleted sandbox (or group: any routing key), so that sandboxes
    /// that come and go do not pile up in every scrape. A later request or route with the key
    /// starts its series from zero again.
    pub fn forget_sandbox(&self, key: &str) {
        if key.is_empty() {
            // Requests without a fork: not a sandbox's series.
            return;
        }
        {
            let mut counters = self.counters_write();
            counters.remove(key);
            for outcome in outcome::ALL {
                self.requests.remove(&RequestLabels {
                    sandbox: key.to_owned(),
                    outcome,
                });
            }
        }
        let services = self.keys_lock().remove(key).unwrap_or_default();
        for service in services {
            self.steered.remove(&RouteLabels {
                sandbox: key.to_owned(),
                service,
            });
        }
    }

    /// Removes the series of every routing key that `keep` refuses (see
    /// [`Metrics::forget_sandbox`]): give it the applied state's sandbox and group keys. It
    /// also catches series a request still in flight re-created after its key was forgotten.
    pub fn retain_sandboxes(&self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self
            .keys_lock()
            .keys()
            .filter(|key| !keep(key))
            .cloned()
            .collect();
        for key in gone {
            self.forget_sandbox(&key);
        }
    }

    fn keys_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<String>>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn map(&self, map: &'static str, entries: usize, capacity: u32) {
        self.map_entries
            .get_or_create(&MapLabels { map })
            .set(entries as i64);
        self.map_capacity
            .get_or_create(&MapLabels { map })
            .set(i64::from(capacity));
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            warn!(error = %err, "encoding metrics failed");
        }
        text
    }
}

/// Serves `GET /metrics` on `addr`. Each scrape first asks the main loop to refresh the
/// kernel-side numbers.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    calls: mpsc::Sender<Call>,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %err, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let calls = calls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let calls = calls.clone();
                async move {
                    let response = if req.uri().path() == "/healthz" && !metrics.is_ready() {
                        // Waiting for the cluster (or starting): alive, the kernel keeps its
                        // last state meanwhile; restarting would not help.
                        text_response(StatusCode::OK, "starting\n".to_owned())
                    } else if req.uri().path() == "/healthz" {
                        // Alive means the control loop answers, not only this task.
                        let (reply, done) = oneshot::channel();
                        let ping = Call {
                            request: Request::Query(Query::Ping),
                            reply,
                        };
                        let answered = calls.send(ping).await.is_ok()
                            && tokio::time::timeout(Duration::from_secs(5), done)
                                .await
                                .is_ok_and(|r| r.is_ok());
                        if answered {
                            text_response(StatusCode::OK, "ok\n".to_owned())
                        } else {
                            text_response(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "the control loop does not answer\n".to_owned(),
                            )
                        }
                    } else if req.uri().path() == "/readyz" {
                        if metrics.is_ready() {
                            text_response(StatusCode::OK, "ok\n".to_owned())
                        } else {
                            text_response(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "not ready: the first state is not applied yet\n".to_owned(),
                            )
                        }
                    } else if req.uri().path() == "/metrics" {
                        let (reply, done) = oneshot::channel();
                        let refresh = Call {
                            request: Request::Query(Query::RefreshMetrics),
                            reply,
                        };
                        // A scrape is answered even while the control loop is busy or the
                        // counters' walk is long: after REFRESH_WAIT, with the kernel counters
                        // of the last refresh (as when another scrape's refresh is under way).
                        if calls.send(refresh).await.is_ok()
                            && tokio::time::timeout(REFRESH_WAIT, done).await.is_err()
                        {
                            debug!("control loop busy: kernel counters from the last scrape");
                        }
                        text_response(StatusCode::OK, metrics.encode())
                    } else {
                        text_response(
                            StatusCode::NOT_FOUND,
                            "try /metrics, /healthz or /readyz\n".to_owned(),
                        )
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %err, "metrics connection ended with an error");
            }
        });
    }
}

/// How long a scrape waits for its refresh of the kernel-side counters.
const REFRESH_WAIT: Duration = Duration::from_millis(500);

fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_has_the_families() {
        let m = Metrics::new();
        m.request("pr-1", outcome::FORK, Duration::from_micros(300));
        m.kernel_event("steered", 5);
        m.kernel_event("steered", 7);
        m.route_steered("pr-1", "svc-a", 2);
        m.map("routes", 3, 131_072);
        m.reload("ok");
        let text = m.encode();
        for needle in [
            "redirector_requests_total{sandbox=\"pr-1\",outcome=\"fork\"} 1",
            "redirector_kernel_events_total{event=\"steered\"} 7",
            "redirector_connections_steered_total{sandbox=\"pr-1\",service=\"svc-a\"} 2",
            "redirector_map_entries{map=\"routes\"} 3",
            "redirector_map_capacity{map=\"routes\"} 131072",
            "redirector_config_reloads_total{result=\"ok\"} 1",
            "redirector_request_duration_seconds_count{outcome=\"fork\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
    }

    #[test]
    fn a_deleted_sandbox_takes_its_series_along() {
        let m = Metrics::new();
        for outcome in outcome::ALL {
            m.request("pr-gone", outcome, Duration::from_micros(300));
        }
        m.request("pr-kept", outcome::FORK, Duration::from_micros(300));
        m.request("", outcome::BASELINE, Duration::from_micros(300));
        m.route_steered("pr-gone", "svc-a", 2);
        m.route_steered("pr-gone", "svc-b", 3);
        m.route_steered("pr-kept", "svc-a", 4);
        m.route_steered("grp-gone", "svc-a", 1);

        m.forget_sandbox("pr-gone");
        let text = m.encode();
        assert!(!text.contains("pr-gone"), "series left behind:\n{text}");
        for needle in [
            "redirector_requests_total{sandbox=\"pr-kept\",outcome=\"fork\"} 1",
            "redirector_requests_total{sandbox=\"\",outcome=\"baseline\"} 1",
            "redirector_connections_steered_total{sandbox=\"pr-kept\",service=\"svc-a\"} 4",
            "redirector_connections_steered_total{sandbox=\"grp-gone\",service=\"svc-a\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }

        m.retain_sandboxes(|key| key == "pr-kept");
        let text = m.encode();
        assert!(!text.contains("grp-gone"), "series left behind:\n{text}");
        assert!(text.contains("sandbox=\"pr-kept\""), "{text}");
        assert!(
            text.contains("redirector_requests_total{sandbox=\"\",outcome=\"baseline\"} 1"),
            "requests without a fork are nobody's series: {text}"
        );

        // Back again: counted from zero.
        m.request("pr-gone", outcome::FORK, Duration::from_micros(300));
        m.route_steered("pr-gone", "svc-a", 1);
        let text = m.encode();
        for needle in [
            "redirector_requests_total{sandbox=\"pr-gone\",outcome=\"fork\"} 1",
            "redirector_connections_steered_total{sandbox=\"pr-gone\",service=\"svc-a\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
    }
}
