//! `rdr-http serve`: one dual-stack port speaking HTTP/1.1 and h2c (prior knowledge) on every
//! connection, with HTTP/1.1 upgrades and gRPC.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, UPGRADE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::common::{BoxBody, PatternBody, boxed, full, print_line, unmap};
use crate::grpc;

/// hyper's own default, stated so a slow-header (slowloris) test knows when the server gives up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound of `/delay/MS`, so a typo cannot park a request for hours.
const MAX_DELAY_MS: u64 = 60_000;

struct Ctx {
    name: Arc<str>,
    served_by: HeaderValue,
    /// Requests whose handler is running (the answer's headers are not out yet).
    inflight: AtomicUsize,
}

/// Counts one running handler in [`Ctx::inflight`] for as long as it lives.
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn new(counter: &'a AtomicUsize) -> Busy<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        Busy(counter)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The two ends of the connection a request came in on, as the server's socket saw them.
#[derive(Clone, Copy)]
struct ConnInfo {
    peer: SocketAddr,
    local: Option<SocketAddr>,
}

pub async fn serve(name: String, port: u16, max_streams: Option<u32>) -> Result<()> {
    let served_by = HeaderValue::from_str(&name)
        .with_context(|| format!("server name {name:?} is not a valid header value"))?;
    let listener = listen(port)?;
    let ctx = Arc::new(Ctx {
        name: name.into(),
        served_by,
        inflight: AtomicUsize::new(0),
    });

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    if let Some(max) = max_streams {
        // Only when asked: `None` would mean no limit, not hyper's default.
        builder.http2().max_concurrent_streams(max);
    }

    print_line("ready")?;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("rdr-http serve: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = ConnInfo {
            peer: unmap(peer),
            local: stream.local_addr().ok().map(unmap),
        };
        let builder = builder.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(&ctx, conn, req).await) }
            });
            // The auto builder peeks at the first bytes: the h2 preface selects HTTP/2, anything
            // else is HTTP/1.1 (where a 101 hands the socket to the upgrade task).
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("rdr-http serve: connection from {}: {e}", conn.peer);
            }
        });
    }
}

fn listen(port: u16) -> Result<TcpListener> {
    let sock =
        Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).context("socket(AF_INET6)")?;
    // One socket for both families: clients dial v4 and v6 VIPs of the same port.
    sock.set_only_v6(false).context("IPV6_V6ONLY=0")?;
    // A restarted server must rebind at once while old connections sit in TIME_WAIT.
    sock.set_reuse_address(true).context("SO_REUSEADDR")?;
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    sock.bind(&addr.into())
        .with_context(|| format!("bind [::]:{port}"))?;
    sock.listen(1024)
        .with_context(|| format!("listen on port {port}"))?;
    sock.set_nonblocking(true).context("O_NONBLOCK")?;
    TcpListener::from_std(sock.into()).context("registering the listener with tokio")
}

async fn handle(ctx: &Ctx, conn: ConnInfo, req: Request<Incoming>) -> Response<BoxBody> {
    if req.method() == Method::GET && req.uri().path() == "/inflight" {
        // `GET /inflight`: how many other requests are being handled right now, so a test
        // can wait until streams it cannot observe otherwise have arrived.
        let body =
            json!({ "server": &*ctx.name, "inflight": ctx.inflight.load(Ordering::Relaxed) });
        let mut resp = Response::new(full(format!("{body}\n")));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp.headers_mut()
            .insert("x-served-by", ctx.served_by.clone());
        return resp;
    }
    let _busy = Busy::new(&ctx.inflight);
    let is_grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    let mut resp = if is_grpc {
        grpc::serve(ctx.name.clone(), req).await.map(boxed)
    } else if req.uri().path() == "/upgrade" && wants_upgrade(&req) {
        upgrade(ctx, req)
    } else if req.method() == Method::POST && req.uri().path() == "/echo" {
        // The request body becomes the response body frame by frame: memory stays bounded and
        // a large upload flows back while it is still arriving.
        Response::new(boxed(req.into_body()))
    } else if let Some(n) = number_after(&req, "/bytes/") {
        let mut r = Response::new(boxed(PatternBody::new(n, true)));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        r
    } else {
        describe(ctx, conn, req).await
    };
    resp.headers_mut()
        .insert("x-served-by", ctx.served_by.clone());
    resp
}

/// `N` of a `GET <prefix>N` request.
fn number_after(req: &Request<Incoming>, prefix: &str) -> Option<u64> {
    if req.method() != Method::GET {
        return None;
    }
    req.uri().path().strip_prefix(prefix)?.parse().ok()
}

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    let connection_upgrade = req.headers().get_all(CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    let rdr_echo = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s.trim().eq_ignore_ascii_case("rdr-echo"));
    connection_upgrade && rdr_echo
}

/// Answers 101; once hyper hands over the socket, greets with `NAME\n` and echoes until EOF.
fn upgrade(ctx: &Ctx, mut req: Request<Incoming>) -> Response<BoxBody> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let greeting = format!("{}\n", ctx.name);
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(up) => up,
            Err(e) => {
                eprintln!("rdr-http serve: upgrade failed: {e}");
                return;
            }
        };
        let mut io = TokioIo::new(io);
        if let Err(e) = echo_upgraded(&mut io, greeting.as_bytes()).await {
            eprintln!("rdr-http serve: upgraded connection: {e}");
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static("rdr-echo"));
    resp
}

async fn echo_upgraded<S>(io: &mut S, greeting: &[u8]) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    io.write_all(greeting).await?;
    io.flush().await?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return io.shutdown().await;
        }
        io.write_all(&buf[..n]).await?;
        io.flush().await?;
    }
}

/// The default answer: who served the request and what it looked like on arrival, after the
/// body was consumed (and counted; that also makes hyper send `100 Continue` when asked).
async fn describe(ctx: &Ctx, conn: ConnInfo, req: Request<Incoming>) -> Response<BoxBody> {
    let (parts, mut body) = req.into_parts();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_bytes += d.len() as u64;
                }
            }
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("reading the body: {e}\n")),
        }
    }

    let mut status = StatusCode::OK;
    let path = parts.uri.path();
    if parts.method == Method::GET {
        if let Some(code) = path.strip_prefix("/status/") {
            // `/status/N`: answer with status N (200..=599), e.g. to see error codes relayed.
            match code.parse::<u16>().ok().filter(|c| (200..=599).contains(c)) {
                Some(c) => status = StatusCode::from_u16(c).unwrap_or(StatusCode::OK),
                None => return text(StatusCode::BAD_REQUEST, "bad status code\n"),
            }
        } else if let Some(ms) = path.strip_prefix("/delay/") {
            // `/delay/MS`: answer after MS milliseconds, e.g. to hold an HTTP/2 stream open.
            match ms.parse::<u64>() {
                Ok(ms) => tokio::time::sleep(Duration::from_millis(ms.min(MAX_DELAY_MS))).await,
                Err(_) => return text(StatusCode::BAD_REQUEST, "bad delay\n"),
            }
        }
    }

    let mut headers: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let body = json!({
        "server": &*ctx.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or(path, |p| p.as_str()),
        "authority": parts.uri.authority().map(|a| a.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
        "peer": conn.peer.to_string(),
        "local": conn.local.map(|a| a.to_string()),
    });
    let mut resp = Response::new(full(format!("{body}\n")));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text(status: StatusCode, msg: &str) -> Response<BoxBody> {
    let mut resp = Response::new(full(msg.to_owned()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}
