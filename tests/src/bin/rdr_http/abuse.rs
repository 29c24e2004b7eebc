//! Hostile HTTP/2 clients: `hold` keeps streams open with request bodies that never end, and
//! `stall` starts large downloads with a receive window of zero. Both keep going until
//! `--hold-ms` has passed (or they are killed), so a test can measure other clients meanwhile.
//!
//! Each prints one JSON line once its attack is in place; `hold` cannot see its streams arrive
//! at the server, so a test that needs them there asks the server (`GET /inflight`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Version};
use http_body::{Body, Frame};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::json;
use tokio::time::Instant;

use crate::common::{BoxBody, boxed, connect, full, print_json, within};

/// Pause before a stream that ended is opened again.
const REOPEN_PAUSE: Duration = Duration::from_millis(20);

/// A request body that sends one byte and then never ends nor sends more.
struct Unfinished {
    sent: bool,
}

impl Body for Unfinished {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent {
            // Never woken: the body stays open for as long as the stream does.
            return Poll::Pending;
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
    }
}

/// What both attacks share: where, with which headers, for how long.
pub struct Attack<'a> {
    pub addr: SocketAddr,
    pub limit: Duration,
    pub headers: &'a [(String, String)],
    pub hold: Duration,
}

impl Attack<'_> {
    async fn open(&self, stream_window: Option<u32>) -> Result<http2::SendRequest<BoxBody>> {
        let tcp = connect(self.addr, self.limit).await?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        if let Some(window) = stream_window {
            builder.initial_stream_window_size(window);
        }
        let (sender, conn) = within(
            self.limit,
            "HTTP/2 handshake",
            builder.handshake(TokioIo::new(tcp)),
        )
        .await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    fn template(&self, method: Method, path: &str) -> Result<Template> {
        let mut headers = http::HeaderMap::new();
        for (k, v) in self.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .with_context(|| format!("bad header name {k:?}"))?;
            let value =
                HeaderValue::from_str(v).with_context(|| format!("bad header value {v:?}"))?;
            headers.append(name, value);
        }
        let uri = format!("http://{}{path}", self.addr)
            .parse()
            .with_context(|| format!("bad path {path:?}"))?;
        Ok(Template {
            method,
            uri,
            headers,
        })
    }
}

/// One request, made as often as needed.
#[derive(Clone)]
struct Template {
    method: Method,
    uri: http::Uri,
    headers: http::HeaderMap,
}

impl Template {
    fn with_body(&self, body: BoxBody) -> Request<BoxBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_2;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// `rdr-http hold`: `streams` POSTs on each of `connections` connections, each body one byte
/// and then silence. A stream that ends anyway (the server or a proxy gave up on it) is opened
/// again at once, so the streams stay taken for the whole run.
pub async fn hold(attack: Attack<'_>, connections: u32, streams: u32, path: &str) -> Result<()> {
    let deadline = Instant::now() + attack.hold;
    let mut senders = Vec::new();
    for _ in 0..connections {
        senders.push(attack.open(None).await?);
    }
    let template = attack.template(Method::POST, path)?;
    let mut tasks = Vec::new();
    for sender in &senders {
        for _ in 0..streams {
            let mut sender = sender.clone();
            let template = template.clone();
            tasks.push(tokio::spawn(async move {
                let mut reopened = 0u64;
                loop {
                    if sender.ready().await.is_err() {
                        return reopened;
                    }
                    let req = template.with_body(boxed(Unfinished { sent: false }));
                    // The answer (if one ever comes) is dropped unread.
                    let _ = tokio::time::timeout_at(deadline, sender.send_request(req)).await;
                    if Instant::now() >= deadline {
                        return reopened;
                    }
                    reopened += 1;
                    // Whoever ended it may do so at once every time: do not spin.
                    tokio::time::sleep(REOPEN_PAUSE).await;
                }
            }));
        }
    }
    print_json(&json!({ "holding": connections * streams }))?;
    let mut reopened = 0;
    for task in tasks {
        reopened += task.await.map_err(|e| anyhow!("stream task: {e}"))?;
    }
    print_json(&json!({ "done": true, "reopened": reopened }))
}

/// `rdr-http stall`: `streams` GET /bytes/`bytes` on one connection whose streams have a
/// receive window of zero: the response headers arrive, the bodies never can. The responses
/// are held unread until the run ends.
pub async fn stall(attack: Attack<'_>, streams: u32, bytes: u64) -> Result<()> {
    let sender = attack.open(Some(0)).await?;
    let template = attack.template(Method::GET, &format!("/bytes/{bytes}"))?;
    let mut pending = Vec::new();
    for _ in 0..streams {
        let mut sender = sender.clone();
        let req = template.with_body(full(Bytes::new()));
        let limit = attack.limit;
        pending.push(tokio::spawn(async move {
            within(limit, "waiting for the connection", sender.ready()).await?;
            within(limit, "GET /bytes", sender.send_request(req)).await
        }));
    }
    let mut held = Vec::new();
    for task in pending {
        held.push(task.await.map_err(|e| anyhow!("stream task: {e}"))??);
    }
    let statuses: Vec<u16> = held.iter().map(|r| r.status().as_u16()).collect();
    print_json(&json!({ "stalled": streams, "statuses": statuses }))?;
    tokio::time::sleep(attack.hold).await;
    drop(held);
    print_json(&json!({ "done": true }))
}
