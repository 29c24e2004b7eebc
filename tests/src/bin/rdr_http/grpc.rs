//! gRPC service `rdr.Echo` (methods `Who`, unary, and `Chat`, bidirectional streaming) and its
//! client, both on tonic's codec layer with hand-written prost messages: no protoc, no codegen.
//!
//! ```proto
//! package rdr;
//! message EchoRequest { string text = 1; }
//! message EchoReply { string server = 1; string text = 2; string routing = 3; }
//! service Echo {
//!   rpc Who(EchoRequest) returns (EchoReply);
//!   rpc Chat(stream EchoRequest) returns (stream EchoReply);
//! }
//! ```

use std::future::{Future, Ready, ready};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::{Status, Streaming};
use tonic_prost::ProstCodec;
use tower_service::Service;

use crate::common::{connect, print_json, within};

pub const WHO: &str = "/rdr.Echo/Who";
pub const CHAT: &str = "/rdr.Echo/Chat";

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub text: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub server: String,
    #[prost(string, tag = "2")]
    pub text: String,
    /// The request's `baggage` metadata, so a test sees what routing data reached the server.
    #[prost(string, tag = "3")]
    pub routing: String,
}

fn routing(md: &MetadataMap) -> String {
    md.get("baggage")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

// ---------------------------------------------------------------- server

/// Dispatches one gRPC request by path, as tonic's generated server would. tonic writes the
/// `grpc-status` trailers (and trailers-only responses for errors).
pub async fn serve(name: Arc<str>, req: Request<Incoming>) -> Response<tonic::body::Body> {
    match req.uri().path() {
        WHO => {
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
            grpc.unary(Who(name), req).await
        }
        CHAT => {
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
            grpc.streaming(Chat(name), req).await
        }
        other => Status::unimplemented(format!("no method {other}")).into_http(),
    }
}

/// Request metadata that makes `Who` answer only after that many milliseconds (at most
/// [`MAX_DELAY_MS`]), e.g. to see a proxy's deadline at work.
pub const DELAY_METADATA: &str = "rdr-delay-ms";
const MAX_DELAY_MS: u64 = 60_000;

struct Who(Arc<str>);

impl Service<tonic::Request<EchoRequest>> for Who {
    type Response = tonic::Response<EchoReply>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        let routing = routing(req.metadata());
        let delay = req
            .metadata()
            .get(DELAY_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| Duration::from_millis(ms.min(MAX_DELAY_MS)));
        let server = self.0.to_string();
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            Ok(tonic::Response::new(EchoReply {
                server,
                text: req.into_inner().text,
                routing,
            }))
        })
    }
}

struct Chat(Arc<str>);

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

impl Service<tonic::Request<Streaming<EchoRequest>>> for Chat {
    type Response = tonic::Response<ReplyStream>;
    type Error = Status;
    type Future = Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Streaming<EchoRequest>>) -> Self::Future {
        let routing = routing(req.metadata());
        let name = self.0.clone();
        // One reply per request message, produced as each one arrives: a real stream, not a
        // batch, so a client can ping-pong on it.
        let replies = req.into_inner().map(move |msg| {
            msg.map(|m| EchoReply {
                server: name.to_string(),
                text: m.text,
                routing: routing.clone(),
            })
        });
        ready(Ok(tonic::Response::new(Box::pin(replies) as ReplyStream)))
    }
}

// ---------------------------------------------------------------- client

/// tonic's client over one hyper HTTP/2 connection that this program dialed itself (tonic's own
/// transport would hide the socket and add pooling and reconnects, which a test must not have).
#[derive(Clone)]
struct H2Conn(http2::SendRequest<tonic::body::Body>);

impl Service<Request<tonic::body::Body>> for H2Conn {
    type Response = Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

fn status_line(status: &Status) -> serde_json::Value {
    json!({ "grpc_status": status.code() as i32, "message": status.message() })
}

fn reply_line(m: &EchoReply) -> serde_json::Value {
    json!({ "server": m.server, "text": m.text, "routing": m.routing })
}

fn with_metadata<T>(msg: T, metadata: &[(String, String)]) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    for (k, v) in metadata {
        let key = MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
            .with_context(|| format!("bad metadata key {k:?}"))?;
        let value = MetadataValue::try_from(v.as_str())
            .with_context(|| format!("bad metadata value {v:?}"))?;
        req.metadata_mut().append(key, value);
    }
    Ok(req)
}

/// `rdr-http grpc`: one unary `Who`, or one `Chat` exchanging `stream` messages one by one.
pub async fn client(
    addr: SocketAddr,
    limit: Duration,
    metadata: &[(String, String)],
    stream: Option<u32>,
    text: &str,
) -> Result<()> {
    let tcp = connect(addr, limit).await?;
    let (sender, conn) = within(
        limit,
        "HTTP/2 handshake",
        http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tcp)),
    )
    .await?;
    tokio::spawn(conn);
    let origin: Uri = format!("http://{addr}")
        .parse()
        .context("building the origin URI")?;
    let mut grpc = tonic::client::Grpc::with_origin(H2Conn(sender), origin);
    within(limit, "HTTP/2 connection ready", grpc.ready()).await?;
    let codec = ProstCodec::<EchoRequest, EchoReply>::default();

    let Some(n) = stream else {
        let req = with_metadata(
            EchoRequest {
                text: text.to_owned(),
            },
            metadata,
        )?;
        let res = tokio::time::timeout(
            limit,
            grpc.unary(req, PathAndQuery::from_static(WHO), codec),
        )
        .await
        .map_err(|_| anyhow!("Who: no answer within {} ms", limit.as_millis()))?;
        return match res {
            Ok(resp) => {
                print_json(&reply_line(resp.get_ref()))?;
                print_json(&json!({ "grpc_status": 0 }))
            }
            Err(status) => print_json(&status_line(&status)),
        };
    };

    // Ping-pong: message i+1 goes out only after reply i came back, so every reply provably
    // travels on the open stream.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let msg = |i: u32| EchoRequest {
        text: format!("{text}-{i}"),
    };
    if n > 0 {
        tx.send(msg(0))
            .await
            .map_err(|_| anyhow!("request stream closed"))?;
    }
    let req = with_metadata(ReceiverStream::new(rx), metadata)?;
    let res = tokio::time::timeout(
        limit,
        grpc.streaming(req, PathAndQuery::from_static(CHAT), codec),
    )
    .await
    .map_err(|_| anyhow!("Chat: no response headers within {} ms", limit.as_millis()))?;
    let mut inbound = match res {
        Ok(resp) => resp.into_inner(),
        Err(status) => return print_json(&status_line(&status)),
    };
    for i in 0..n {
        if i > 0 {
            // A closed channel means tonic dropped the request stream: the call is over, and
            // the reply read below reports why.
            let _ = tx.send(msg(i)).await;
        }
        let next = tokio::time::timeout(limit, inbound.message())
            .await
            .map_err(|_| anyhow!("Chat: no reply {i} within {} ms", limit.as_millis()))?;
        match next {
            Ok(Some(m)) => print_json(&reply_line(&m))?,
            Ok(None) => bail!("Chat: stream ended after {i} of {n} replies"),
            Err(status) => return print_json(&status_line(&status)),
        }
    }
    drop(tx);
    let end = tokio::time::timeout(limit, inbound.message())
        .await
        .map_err(|_| anyhow!("Chat: stream not closed within {} ms", limit.as_millis()))?;
    match end {
        Ok(None) => print_json(&json!({ "grpc_status": 0 })),
        Ok(Some(m)) => bail!("Chat: unexpected extra reply {m:?}"),
        Err(status) => print_json(&status_line(&status)),
    }
}
