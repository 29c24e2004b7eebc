//! HTTP/1.1 and h2c clients: `h1`, `h2`, `upload`, `download`, `upgrade`.
//!
//! Every client dials exactly one TCP connection itself (hyper's connection-level API, no
//! pool), so a test knows which requests shared a connection and from which local port.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http::header::{CONNECTION, HOST, UPGRADE};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    BoxBody, PatternBody, PatternCheck, boxed, connect, full, headers_json, next_frame, print_json,
    within,
};

/// How much of a response body `h1`/`h2` keep to parse as JSON; the rest is only counted.
const KEEP_BODY: usize = 1024 * 1024;
/// Longest greeting line accepted from an upgraded connection.
const MAX_GREETING: usize = 256;

/// One request of `h1`/`h2`: `{"path": "/x", "method": "GET", "headers": [["k","v"]],
/// "body": "text", "pause_ms": 0}`, every field optional. `pause_ms` waits that long on the open
/// connection before sending, so a test can change things between requests: after the previous
/// response on `h1`, after the connection opened on `h2` (whose streams all start at once).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReqSpec {
    path: Option<String>,
    method: Option<String>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    body: Option<String>,
    #[serde(default)]
    pause_ms: u64,
}

impl ReqSpec {
    pub fn parse(s: &str) -> Result<ReqSpec> {
        serde_json::from_str(s).with_context(|| format!("bad request spec {s:?}"))
    }
}

enum Sender {
    H1(http1::SendRequest<BoxBody>),
    H2(http2::SendRequest<BoxBody>),
}

struct Conn {
    sender: Sender,
    addr: SocketAddr,
    local_port: u16,
    limit: Duration,
}

impl Conn {
    async fn open(addr: SocketAddr, limit: Duration, h2: bool) -> Result<Conn> {
        let stream = connect(addr, limit).await?;
        let local_port = stream.local_addr().context("getsockname")?.port();
        let io = TokioIo::new(stream);
        let sender = if h2 {
            let (sender, conn) = within(
                limit,
                "HTTP/2 handshake",
                http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io),
            )
            .await?;
            // Connection errors surface through the requests; nothing to report here.
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = within(limit, "HTTP/1.1 handshake", http1::handshake(io)).await?;
            tokio::spawn(conn.with_upgrades());
            Sender::H1(sender)
        };
        Ok(Conn {
            sender,
            addr,
            local_port,
            limit,
        })
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: BoxBody,
    ) -> Result<Request<BoxBody>> {
        let method = Method::from_bytes(method.as_bytes())
            .with_context(|| format!("bad method {method:?}"))?;
        let mut b = Request::builder().method(method);
        match self.sender {
            Sender::H1(_) => {
                // Origin form plus Host, as a browser or curl sends it.
                b = b.uri(path);
                if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
                    b = b.header(HOST, self.addr.to_string());
                }
            }
            Sender::H2(_) => {
                // HTTP/2 carries scheme and authority as pseudo-headers, taken from the URI.
                b = b
                    .version(Version::HTTP_2)
                    .uri(format!("http://{}{path}", self.addr));
            }
        }
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .with_context(|| format!("bad header name {k:?}"))?;
            let value =
                HeaderValue::from_str(v).with_context(|| format!("bad header value {v:?}"))?;
            b = b.header(name, value);
        }
        b.body(body).context("building the request")
    }

    async fn send(&mut self, req: Request<BoxBody>) -> Result<Response<Incoming>> {
        let limit = self.limit;
        let what = format!("{} {}", req.method(), req.uri());
        match &mut self.sender {
            Sender::H1(s) => {
                within(limit, "waiting for the connection", s.ready()).await?;
                within(limit, what, s.send_request(req)).await
            }
            Sender::H2(s) => {
                within(limit, "waiting for the connection", s.ready()).await?;
                within(limit, what, s.send_request(req)).await
            }
        }
    }
}

fn served_by(resp: &Response<Incoming>) -> Value {
    resp.headers()
        .get("x-served-by")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .into()
}

/// What `h1`/`h2` print for one response. `body` is the parsed JSON body (the server's echo of
/// the request), else its first 512 bytes as text, else null.
/// `elapsed_ms` runs from just before the request was handed to the connection until the end
/// of its response body.
async fn summarize(
    resp: Response<Incoming>,
    local_port: u16,
    limit: Duration,
    started: Instant,
) -> Result<Value> {
    let status = resp.status().as_u16();
    let version = format!("{:?}", resp.version());
    let headers = headers_json(resp.headers());
    let served_by = served_by(&resp);
    let mut body = resp.into_body();
    let mut kept = Vec::new();
    let mut body_bytes = 0u64;
    while let Some(frame) = next_frame(&mut body, limit, "reading the response body").await? {
        if let Some(d) = frame.data_ref() {
            body_bytes += d.len() as u64;
            let room = KEEP_BODY.saturating_sub(kept.len());
            kept.extend_from_slice(&d[..d.len().min(room)]);
        }
    }
    let parsed: Option<Value> = serde_json::from_slice(&kept).ok();
    let server = parsed
        .as_ref()
        .and_then(|v| v.get("server"))
        .cloned()
        .unwrap_or(Value::Null);
    let body = match parsed {
        Some(v) => v,
        None if kept.is_empty() => Value::Null,
        None => String::from_utf8_lossy(&kept[..kept.len().min(512)])
            .into_owned()
            .into(),
    };
    Ok(json!({
        "status": status,
        "served_by": served_by,
        "server": server,
        "headers": headers,
        "local_port": local_port,
        "version": version,
        "body": body,
        "body_bytes": body_bytes,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }))
}

fn spec_request(conn: &Conn, spec: &ReqSpec) -> Result<Request<BoxBody>> {
    let body = match &spec.body {
        Some(text) => full(text.clone()),
        None => full(Bytes::new()),
    };
    conn.request(
        spec.method.as_deref().unwrap_or("GET"),
        spec.path.as_deref().unwrap_or("/"),
        &spec.headers,
        body,
    )
}

/// `rdr-http h1`: the requests one after another on one keep-alive connection.
pub async fn h1(addr: SocketAddr, limit: Duration, specs: &[ReqSpec]) -> Result<()> {
    let mut conn = Conn::open(addr, limit, false).await?;
    for (i, spec) in specs.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(spec.pause_ms)).await;
        let req = spec_request(&conn, spec)?;
        let started = Instant::now();
        let resp = conn.send(req).await.with_context(|| {
            format!(
                "request {i} on the connection from port {}",
                conn.local_port
            )
        })?;
        print_json(&summarize(resp, conn.local_port, limit, started).await?)?;
    }
    Ok(())
}

/// `rdr-http h2`: all requests at once, as concurrent streams of one connection; answers are
/// printed in request order.
pub async fn h2(addr: SocketAddr, limit: Duration, specs: &[ReqSpec]) -> Result<()> {
    let conn = Conn::open(addr, limit, true).await?;
    let Sender::H2(sender) = &conn.sender else {
        bail!("internal: h2 connection without an h2 sender");
    };
    let mut tasks = Vec::new();
    for spec in specs {
        let req = spec_request(&conn, spec)?;
        let mut s = sender.clone();
        let port = conn.local_port;
        let pause = Duration::from_millis(spec.pause_ms);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            let started = Instant::now();
            within(limit, "waiting for the connection", s.ready()).await?;
            let what = format!("{} {}", req.method(), req.uri());
            let resp = within(limit, what, s.send_request(req)).await?;
            summarize(resp, port, limit, started).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let line = task
            .await
            .map_err(|e| anyhow!("request task {i}: {e}"))?
            .with_context(|| {
                format!("stream {i} on the connection from port {}", conn.local_port)
            })?;
        print_json(&line)?;
    }
    Ok(())
}

/// `rdr-http upload`: POST /echo with a generated body, checking what comes back.
pub async fn upload(
    addr: SocketAddr,
    limit: Duration,
    bytes: u64,
    headers: &[(String, String)],
    http2: bool,
    chunked: bool,
) -> Result<()> {
    let mut conn = Conn::open(addr, limit, http2).await?;
    let req = conn.request(
        "POST",
        "/echo",
        headers,
        boxed(PatternBody::new(bytes, !chunked)),
    )?;
    let resp = conn.send(req).await?;
    let status = resp.status().as_u16();
    let served_by = served_by(&resp);
    let check = check_body(resp.into_body(), limit, "reading the echoed body").await?;
    print_json(&json!({
        "status": status,
        "served_by": served_by,
        "sent": bytes,
        "received": check.received,
        "intact": check.intact(bytes),
    }))
}

/// `rdr-http download`: GET /bytes/N, checking length and pattern.
pub async fn download(
    addr: SocketAddr,
    limit: Duration,
    bytes: u64,
    headers: &[(String, String)],
    http2: bool,
) -> Result<()> {
    let mut conn = Conn::open(addr, limit, http2).await?;
    let req = conn.request(
        "GET",
        &format!("/bytes/{bytes}"),
        headers,
        full(Bytes::new()),
    )?;
    let resp = conn.send(req).await?;
    let status = resp.status().as_u16();
    let served_by = served_by(&resp);
    let check = check_body(resp.into_body(), limit, "reading the downloaded body").await?;
    print_json(&json!({
        "status": status,
        "served_by": served_by,
        "received": check.received,
        "intact": check.intact(bytes),
    }))
}

async fn check_body(mut body: Incoming, limit: Duration, what: &str) -> Result<PatternCheck> {
    let mut check = PatternCheck::default();
    while let Some(frame) = next_frame(&mut body, limit, what).await? {
        if let Some(d) = frame.data_ref() {
            check.feed(d);
        }
    }
    Ok(check)
}

/// `rdr-http upgrade`: HTTP/1.1 upgrade to `rdr-echo`, then a greeting and one echo.
pub async fn upgrade(
    addr: SocketAddr,
    limit: Duration,
    headers: &[(String, String)],
) -> Result<()> {
    let mut conn = Conn::open(addr, limit, false).await?;
    let mut all = vec![
        (CONNECTION.as_str().to_owned(), "upgrade".to_owned()),
        (UPGRADE.as_str().to_owned(), "rdr-echo".to_owned()),
    ];
    all.extend_from_slice(headers);
    let req = conn.request("GET", "/upgrade", &all, full(Bytes::new()))?;
    let resp = conn.send(req).await?;
    let status = resp.status();
    let served_by = served_by(&resp);
    if status != StatusCode::SWITCHING_PROTOCOLS {
        print_json(&json!({
            "status": status.as_u16(),
            "served_by": served_by,
            "greeting": null,
            "echo": null,
        }))?;
        bail!("expected 101 Switching Protocols, got {status}");
    }
    let upgraded = within(
        limit,
        "taking over the upgraded connection",
        hyper::upgrade::on(resp),
    )
    .await?;
    let mut io = TokioIo::new(upgraded);

    let mut greeting = Vec::new();
    while !greeting.ends_with(b"\n") {
        if greeting.len() > MAX_GREETING {
            bail!(
                "greeting longer than {MAX_GREETING} bytes: {:?}",
                String::from_utf8_lossy(&greeting)
            );
        }
        let mut byte = [0u8; 1];
        let n = within(limit, "reading the greeting", io.read(&mut byte)).await?;
        if n == 0 {
            bail!(
                "connection closed during the greeting after {:?}",
                String::from_utf8_lossy(&greeting)
            );
        }
        greeting.push(byte[0]);
    }
    within(limit, "sending ping", io.write_all(b"ping")).await?;
    within(limit, "flushing ping", io.flush()).await?;
    let mut echo = [0u8; 4];
    within(limit, "reading the echo", io.read_exact(&mut echo)).await?;
    // A clean close: the server sees EOF and ends the echo loop.
    let _ = tokio::time::timeout(limit, io.shutdown()).await;
    print_json(&json!({
        "status": 101,
        "served_by": served_by,
        "greeting": String::from_utf8_lossy(&greeting[..greeting.len() - 1]),
        "echo": String::from_utf8_lossy(&echo),
    }))
}
