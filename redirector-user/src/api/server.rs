//! The API's HTTP side: a Unix socket only root can open, routing of requests to [`Request`]s,
//! and JSON in and out. The daemon's main loop answers each [`Call`]: it alone changes state.
//!
//! Resources (all JSON):
//! ```text
//! GET    /v1/status                       what is attached where, map occupancy, router health
//! GET    /v1/stats                        kernel and router counters
//! GET    /v1/services                     PUT/DELETE /v1/services/{name}, GET one
//! GET    /v1/sandboxes                    PUT/DELETE /v1/sandboxes/{key}, GET one
//! GET    /v1/routes                       every route; GET /v1/sandboxes/{key}/routes
//! PUT    /v1/sandboxes/{key}/routes/{service}   DELETE the same
//! GET    /v1/groups                       PUT/DELETE /v1/groups/{key}, GET one
//! POST   /v1/apply                        {services, sandboxes, groups, prune}: all or nothing
//! ```
use std::{convert::Infallible, io, os::unix::fs::PermissionsExt as _, path::Path};

use bytes::Bytes;
use http::{Method, Request as HttpRequest, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::{
    net::UnixListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use super::{
    control::Mutation,
    types::{ApiError, ApplyRequest, GroupSpec, RouteSpec, SandboxSpec, ServiceSpec},
};

/// Largest accepted request body: a whole state with many thousands of routes fits.
const MAX_BODY: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone)]
pub enum Query {
    Status,
    Stats,
    Services,
    Service(String),
    Sandboxes,
    Sandbox(String),
    Routes(Option<String>),
    Groups,
    Group(String),
    /// Internal (the metrics endpoint): refresh the kernel-side metrics.
    RefreshMetrics,
    /// Internal (`/healthz`): answered at once by the control loop, proving it runs.
    Ping,
}

#[derive(Debug, Clone)]
pub enum Request {
    Query(Query),
    Mutate(Mutation),
}

/// One API request for the main loop, with where to send the answer.
pub struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Result<serde_json::Value, ApiError>>,
}

/// Binds the API socket: parent directory created, a stale socket from a dead daemon replaced,
/// mode 0600 so only root can talk to it.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use: is another daemon running?", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                warn!(error = %err, "API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, calls.clone()));
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %err, "API connection ended with an error");
            }
        });
    }
}

async fn handle(
    req: HttpRequest<Incoming>,
    calls: mpsc::Sender<Call>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let result = match route(req).await {
        Ok(request) => dispatch(request, &calls).await,
        Err(err) => Err(err),
    };
    let (status, body) = match result {
        Ok(value) => (StatusCode::OK, value),
        Err(err) => (err.status, err.body()),
    };
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(&body).unwrap_or_default(),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

async fn dispatch(
    request: Request,
    calls: &mpsc::Sender<Call>,
) -> Result<serde_json::Value, ApiError> {
    let (reply, answer) = oneshot::channel();
    let gone = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the daemon is stopping",
        )
    };
    calls
        .send(Call { request, reply })
        .await
        .map_err(|_| gone())?;
    answer.await.map_err(|_| gone())?
}

/// Maps method and path to a request, reading the body where one is expected.
async fn route(req: HttpRequest<Incoming>) -> Result<Request, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    use Query as Q;
    let request = match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => Request::Query(Q::Status),
        (&Method::GET, ["v1", "stats"]) => Request::Query(Q::Stats),
        (&Method::GET, ["v1", "services"]) => Request::Query(Q::Services),
        (&Method::GET, ["v1", "services", name]) => Request::Query(Q::Service(decode(name)?)),
        (&Method::PUT, ["v1", "services", name]) => {
            let spec: ServiceSpec = body(req).await?;
            same_name("name", &spec.name, &decode(name)?)?;
            Request::Mutate(Mutation::PutService(spec))
        }
        (&Method::DELETE, ["v1", "services", name]) => {
            Request::Mutate(Mutation::DeleteService(decode(name)?))
        }
        (&Method::GET, ["v1", "sandboxes"]) => Request::Query(Q::Sandboxes),
        (&Method::GET, ["v1", "sandboxes", key]) => Request::Query(Q::Sandbox(decode(key)?)),
        (&Method::PUT, ["v1", "sandboxes", key]) => {
            let spec: SandboxSpec = body(req).await?;
            same_name("key", &spec.key, &decode(key)?)?;
            Request::Mutate(Mutation::PutSandbox(spec))
        }
        (&Method::DELETE, ["v1", "sandboxes", key]) => {
            Request::Mutate(Mutation::DeleteSandbox(decode(key)?))
        }
        (&Method::GET, ["v1", "routes"]) => Request::Query(Q::Routes(None)),
        (&Method::GET, ["v1", "sandboxes", key, "routes"]) => {
            Request::Query(Q::Routes(Some(decode(key)?)))
        }
        (&Method::PUT, ["v1", "sandboxes", key, "routes", service]) => {
            let sandbox = decode(key)?;
            let route: RouteSpec = body(req).await?;
            same_name("service", &route.service, &decode(service)?)?;
            Request::Mutate(Mutation::PutRoute { sandbox, route })
        }
        (&Method::DELETE, ["v1", "sandboxes", key, "routes", service]) => {
            Request::Mutate(Mutation::DeleteRoute {
                sandbox: decode(key)?,
                service: decode(service)?,
            })
        }
        (&Method::GET, ["v1", "groups"]) => Request::Query(Q::Groups),
        (&Method::GET, ["v1", "groups", key]) => Request::Query(Q::Group(decode(key)?)),
        (&Method::PUT, ["v1", "groups", key]) => {
            let spec: GroupSpec = body(req).await?;
            same_name("key", &spec.key, &decode(key)?)?;
            Request::Mutate(Mutation::PutGroup(spec))
        }
        (&Method::DELETE, ["v1", "groups", key]) => {
            Request::Mutate(Mutation::DeleteGroup(decode(key)?))
        }
        (&Method::POST, ["v1", "apply"]) => {
            let apply: ApplyRequest = body(req).await?;
            Request::Mutate(Mutation::Apply {
                state: apply.state,
                prune: apply.prune,
            })
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_such_endpoint",
                format!("no endpoint {method} {path}"),
            ));
        }
    };
    Ok(request)
}

fn decode(segment: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "malformed", "path is not UTF-8"))
}

fn same_name(field: &str, in_body: &str, in_path: &str) -> Result<(), ApiError> {
    if in_body == in_path {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("body {field} {in_body:?} does not match the path's {in_path:?}"),
        ))
    }
}

async fn body<T: DeserializeOwned>(req: HttpRequest<Incoming>) -> Result<T, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("cannot read the body: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("invalid JSON body: {e}"),
        )
    })
}
