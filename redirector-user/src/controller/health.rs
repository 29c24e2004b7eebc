//! `/healthz` and `/readyz` for the controller's probes.
use std::sync::{
    Arc,
    atomic::{AtomicU8, Ordering},
};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    StandingBy = 1,
    Leading = 2,
    Stopping = 3,
}

/// The process's phase, shared with the probe server.
#[derive(Debug, Clone)]
pub struct State(Arc<AtomicU8>);

impl Default for State {
    fn default() -> State {
        State(Arc::new(AtomicU8::new(Phase::Starting as u8)))
    }
}

impl State {
    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Relaxed);
    }

    fn phase(&self) -> u8 {
        self.0.load(Ordering::Relaxed)
    }
}

/// `/healthz`: the process runs. `/readyz`: it reached the API server and is leading or
/// standing by (a stand-by is ready: it is what takes over).
pub async fn serve(listener: tokio::net::TcpListener, state: State) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %err, "probe accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let phase = state.phase();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/healthz" => (StatusCode::OK, "ok\n"),
                        "/readyz" if phase == Phase::Leading as u8 => (StatusCode::OK, "leading\n"),
                        "/readyz" if phase == Phase::StandingBy as u8 => {
                            (StatusCode::OK, "standing by\n")
                        }
                        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
                        _ => (StatusCode::NOT_FOUND, "not found\n"),
                    };
                    let mut response =
                        Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *response.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %err, "probe connection");
            }
        });
    }
}
