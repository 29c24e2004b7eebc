//! Pieces shared by the server and the clients: body types, the byte pattern, timeouts, output.

use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// One body type for every request and response, so handlers and clients can mix generated,
/// echoed, fixed and gRPC bodies. Unsync is enough: hyper only needs `Send`.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// Frame size of generated bodies.
pub const FRAME: usize = 64 * 1024;

pub fn boxed<B>(body: B) -> BoxBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pub fn full(data: impl Into<Bytes>) -> BoxBody {
    boxed(http_body_util::Full::new(data.into()))
}

/// Byte `i` of every generated body: a period (251, prime) that never lines up with frame or
/// buffer sizes, so a dropped, repeated or reordered chunk shows up.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// A body of `len` pattern bytes produced one frame at a time: memory stays at one frame
/// whatever the size.
pub struct PatternBody {
    offset: u64,
    remaining: u64,
    /// Advertise the exact length (Content-Length); otherwise HTTP/1.1 sends it chunked.
    exact: bool,
}

impl PatternBody {
    pub fn new(len: u64, exact: bool) -> PatternBody {
        PatternBody {
            offset: 0,
            remaining: len,
            exact,
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(FRAME as u64);
        let start = self.offset;
        let chunk: Vec<u8> = (start..start + n).map(pattern_byte).collect();
        self.offset += n;
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

/// Checks a received stream against the pattern without keeping it.
#[derive(Default)]
pub struct PatternCheck {
    pub received: u64,
    first_mismatch: Option<u64>,
}

impl PatternCheck {
    pub fn feed(&mut self, data: &[u8]) {
        if self.first_mismatch.is_none()
            && let Some(i) = data
                .iter()
                .enumerate()
                .position(|(i, b)| *b != pattern_byte(self.received + i as u64))
        {
            self.first_mismatch = Some(self.received + i as u64);
        }
        self.received += data.len() as u64;
    }

    pub fn intact(&self, expected: u64) -> bool {
        self.first_mismatch.is_none() && self.received == expected
    }
}

/// Runs `fut` with a deadline; a timeout or an error becomes an error naming `what`.
pub async fn within<T, E>(
    limit: Duration,
    what: impl Display,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(limit, fut).await {
        Err(_) => bail!("{what}: timed out after {} ms", limit.as_millis()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context(what.to_string())),
        Ok(Ok(v)) => Ok(v),
    }
}

/// The next frame of `body`, or `None` at its end; each wait is bounded, the whole body is not
/// (an 8 MiB transfer may take longer than one timeout, a stalled one must not hang).
pub async fn next_frame<B>(
    body: &mut B,
    limit: Duration,
    what: &str,
) -> Result<Option<Frame<Bytes>>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    match tokio::time::timeout(limit, body.frame()).await {
        Err(_) => bail!("{what}: no data for {} ms", limit.as_millis()),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(anyhow!("{what}: {}", e.into())),
        Ok(Some(Ok(f))) => Ok(Some(f)),
    }
}

pub async fn connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream> {
    let stream = within(
        limit,
        format!("connecting to {addr}"),
        TcpStream::connect(addr),
    )
    .await?;
    // Small requests must not wait for Nagle behind the previous response's ACK.
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    Ok(stream)
}

pub fn print_json(v: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").context("writing stdout")?;
    out.flush().context("flushing stdout")
}

pub fn print_line(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("writing stdout")?;
    out.flush().context("flushing stdout")
}

/// `k=v` (split at the first `=`, so values may contain `=` as in `baggage=sd-routing-key=x`).
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

/// Response headers as `{name: value}`; repeated names are joined with ", " as HTTP allows.
pub fn headers_json(headers: &HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for name in headers.keys() {
        let joined = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        map.insert(name.as_str().to_owned(), joined.into());
    }
    serde_json::Value::Object(map)
}

/// `[::ffff:a.b.c.d]:p` (what a dual-stack socket reports for IPv4) as `a.b.c.d:p`.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}
