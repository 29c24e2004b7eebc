//! `idle`: connections that are opened and then left alone, as pooled clients leave them. Plain
//! connections send nothing at all; `--http2` ones complete the h2c handshake (and with
//! `--request`, one `GET /who` first) and then stay quiet, answering only what the HTTP/2
//! connection itself asks (pings, GOAWAY), as a real client library does.
//!
//! Prints `{"open": N}` once every connection is up, then waits until all of them were closed
//! by the other side or `--hold-ms` passed, and prints `{"open", "closed", "closed_after_ms"}`
//! (close times counted from the moment each went idle).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::{Request, Version};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::common::{BoxBody, connect, full, print_json, within};

pub struct Idle {
    pub addr: SocketAddr,
    pub limit: Duration,
    pub connections: u32,
    pub http2: bool,
    pub request: bool,
    pub hold: Duration,
}

/// Raises the soft descriptor limit to the hard one: a thousand connections are the point.
fn raise_nofile() -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit");
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: valid rlimit; raising the soft limit to the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit");
    }
    Ok(())
}

pub async fn idle(opts: Idle) -> Result<()> {
    raise_nofile()?;
    // Each connection reports once, when the other side ended it: how long after it went idle.
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel::<Duration>();
    // Kept alive until the end: dropping a sender would close its connection.
    let mut senders = Vec::new();
    for i in 0..opts.connections {
        let stream = connect(opts.addr, opts.limit)
            .await
            .with_context(|| format!("connection {i}"))?;
        let closed = closed_tx.clone();
        if !opts.http2 {
            let mut stream = stream;
            tokio::spawn(async move {
                let since = Instant::now();
                let mut buf = [0u8; 512];
                // Nothing is sent, so anything but more bytes means the server closed it.
                loop {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => continue,
                        _ => break,
                    }
                }
                let _ = closed.send(since.elapsed());
            });
            continue;
        }
        let (mut sender, conn) = within(
            opts.limit,
            "HTTP/2 handshake",
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake::<_, BoxBody>(TokioIo::new(stream)),
        )
        .await?;
        let (idle_tx, idle_rx) = tokio::sync::oneshot::channel::<Instant>();
        tokio::spawn(async move {
            // The connection task answers the server's pings and GOAWAY; it ends with the
            // connection.
            let _ = conn.await;
            let since = idle_rx.await.unwrap_or_else(|_| Instant::now());
            let _ = closed.send(since.elapsed());
        });
        if opts.request {
            let req = Request::builder()
                .version(Version::HTTP_2)
                .uri(format!("http://{}/who", opts.addr))
                .body(full(""))
                .context("building the request")?;
            within(opts.limit, "waiting for the connection", sender.ready()).await?;
            let resp = within(opts.limit, "GET /who", sender.send_request(req)).await?;
            let status = resp.status();
            if !status.is_success() {
                bail!("GET /who answered {status}");
            }
            // Read to the end, so the stream is over on both sides.
            let body = http_body_util::BodyExt::collect(resp.into_body());
            within(opts.limit, "reading the response", body).await?;
        }
        let _ = idle_tx.send(Instant::now());
        senders.push(sender);
    }
    drop(closed_tx);
    print_json(&json!({ "open": opts.connections }))?;

    let mut closed_after_ms = Vec::new();
    let deadline = Instant::now() + opts.hold;
    while (closed_after_ms.len() as u32) < opts.connections {
        match tokio::time::timeout_at(deadline, closed_rx.recv()).await {
            Ok(Some(after)) => closed_after_ms.push(after.as_millis() as u64),
            Ok(None) | Err(_) => break,
        }
    }
    print_json(&json!({
        "open": opts.connections,
        "closed": closed_after_ms.len(),
        "closed_after_ms": closed_after_ms,
    }))
}
