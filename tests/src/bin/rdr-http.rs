//! `rdr-http`: real HTTP/1.1, h2c and gRPC peers for redirector's end-to-end tests.
//!
//! `serve` answers HTTP/1.1 (keep-alive, chunked, `Expect: 100-continue`, upgrades) and HTTP/2
//! with prior knowledge on the same dual-stack port, plus the gRPC service `rdr.Echo`, and names
//! itself in every answer (`x-served-by`), so a test can tell which endpoint (baseline or fork)
//! each request reached. The client subcommands each open exactly one connection, print one JSON
//! object per line on stdout, bound every network wait by `--timeout-ms`, and end with a message
//! on stderr and exit code 1 on failure.

#[path = "rdr_http/abuse.rs"]
mod abuse;
#[path = "rdr_http/client.rs"]
mod client;
#[path = "rdr_http/common.rs"]
mod common;
#[path = "rdr_http/grpc.rs"]
mod grpc;
#[path = "rdr_http/idle.rs"]
mod idle;
#[path = "rdr_http/raw.rs"]
mod raw;
#[path = "rdr_http/server.rs"]
mod server;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::common::parse_kv;

#[derive(Parser)]
#[command(
    name = "rdr-http",
    about = "HTTP/1.1, h2c and gRPC test peer for redirector end-to-end tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone, Copy)]
struct Target {
    /// Server address: IP:PORT or [IPv6]:PORT.
    #[arg(long)]
    addr: SocketAddr,
    /// Bound of every single network wait (connect, handshake, each response, each frame).
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

impl Target {
    fn timeout(&self) -> Duration {
        // Zero would mean "no time at all" to tokio; treat it as the smallest real bound.
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve HTTP/1.1, h2c and gRPC on [::]:PORT (dual-stack); print `ready` once listening.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        /// SETTINGS_MAX_CONCURRENT_STREAMS of HTTP/2 connections (hyper's default: 200).
        #[arg(long, value_name = "N")]
        max_streams: Option<u32>,
    },
    /// Requests in sequence on one HTTP/1.1 keep-alive connection; one JSON line per response.
    H1 {
        #[command(flatten)]
        target: Target,
        /// Request spec, JSON: {"path","method","headers":[[k,v],...],"body"}; all optional.
        /// Several may follow one --req, or --req may repeat. None: one GET /.
        #[arg(long = "req", value_name = "SPEC", num_args = 1..)]
        req: Vec<String>,
    },
    /// Requests as concurrent streams on one h2c (prior knowledge) connection.
    H2 {
        #[command(flatten)]
        target: Target,
        #[arg(long = "req", value_name = "SPEC", num_args = 1..)]
        req: Vec<String>,
    },
    /// gRPC rdr.Echo over one h2c connection: unary Who, or Chat with --stream N messages.
    Grpc {
        #[command(flatten)]
        target: Target,
        /// Request metadata NAME=VALUE (repeatable), e.g. baggage=sd-routing-key=pr-1.
        #[arg(long = "metadata", value_name = "NAME=VALUE", value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
        /// Bidirectional streaming: send N messages, one after each reply.
        #[arg(long, value_name = "N")]
        stream: Option<u32>,
        /// Text of the message (streamed messages get `-<i>` appended).
        #[arg(long, default_value = "hello")]
        text: String,
    },
    /// POST /echo with a generated N-byte body; verify what comes back.
    Upload {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        bytes: u64,
        #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_kv)]
        header: Vec<(String, String)>,
        /// Use h2c instead of HTTP/1.1.
        #[arg(long)]
        http2: bool,
        /// Do not announce the length (HTTP/1.1: chunked transfer encoding).
        #[arg(long)]
        chunked: bool,
    },
    /// GET /bytes/N; verify length and pattern.
    Download {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        bytes: u64,
        #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_kv)]
        header: Vec<(String, String)>,
        #[arg(long)]
        http2: bool,
    },
    /// HTTP/1.1 Upgrade to rdr-echo; read the greeting, echo "ping".
    Upgrade {
        #[command(flatten)]
        target: Target,
        #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_kv)]
        header: Vec<(String, String)>,
    },
    /// Attack: keep N streams per connection open with request bodies that never end (a
    /// stream that ends anyway is opened again); print `{"holding": total}` once sent.
    Hold {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1)]
        connections: u32,
        /// Streams per connection.
        #[arg(long, default_value_t = 100)]
        streams: u32,
        #[arg(long, default_value = "/who")]
        path: String,
        #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_kv)]
        header: Vec<(String, String)>,
        /// How long to keep attacking.
        #[arg(long, value_name = "MS", default_value_t = 60_000)]
        hold_ms: u64,
    },
    /// Attack: N downloads of /bytes/BYTES on one h2c connection whose stream receive window
    /// is zero; print `{"stalled": N, "statuses": [...]}` once all response headers are in.
    Stall {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 8)]
        streams: u32,
        #[arg(long, default_value_t = 16 * 1024 * 1024)]
        bytes: u64,
        #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_kv)]
        header: Vec<(String, String)>,
        #[arg(long, value_name = "MS", default_value_t = 60_000)]
        hold_ms: u64,
    },
    /// Open N connections and leave them idle (plain: not a byte sent; --http2: after the
    /// handshake, and with --request one GET /who); print `{"open": N}`, then, once all were
    /// closed by the server or --hold-ms passed, `{"closed": K, "closed_after_ms": [...]}`.
    Idle {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1)]
        connections: u32,
        #[arg(long)]
        http2: bool,
        /// HTTP/2 only: one request before going idle.
        #[arg(long, requires = "http2")]
        request: bool,
        #[arg(long, value_name = "MS", default_value_t = 60_000)]
        hold_ms: u64,
    },
    /// Raw bytes on a plain TCP connection; report what comes back.
    Raw {
        #[command(flatten)]
        target: Target,
        /// Bytes to send; \r \n \t \0 \\ \xHH are interpreted.
        #[arg(
            long,
            required_unless_present = "send_header_bytes",
            conflicts_with = "send_header_bytes"
        )]
        send: Option<String>,
        /// Send `GET / HTTP/1.1`, `Host: x` and `X-Big: ` followed by N 'a' bytes.
        #[arg(long, value_name = "N")]
        send_header_bytes: Option<usize>,
        /// Send one byte every MS milliseconds.
        #[arg(long, value_name = "MS")]
        drip_ms: Option<u64>,
        /// How long to keep reading after the last byte went out.
        #[arg(long, value_name = "MS", default_value_t = 3000)]
        read_ms: u64,
    },
}

fn specs(raw: &[String]) -> Result<Vec<client::ReqSpec>> {
    if raw.is_empty() {
        return Ok(vec![client::ReqSpec::default()]);
    }
    raw.iter().map(|s| client::ReqSpec::parse(s)).collect()
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Serve {
            name,
            port,
            max_streams,
        } => server::serve(name, port, max_streams).await,
        Cmd::H1 { target, req } => client::h1(target.addr, target.timeout(), &specs(&req)?).await,
        Cmd::H2 { target, req } => client::h2(target.addr, target.timeout(), &specs(&req)?).await,
        Cmd::Grpc {
            target,
            metadata,
            stream,
            text,
        } => grpc::client(target.addr, target.timeout(), &metadata, stream, &text).await,
        Cmd::Upload {
            target,
            bytes,
            header,
            http2,
            chunked,
        } => {
            client::upload(
                target.addr,
                target.timeout(),
                bytes,
                &header,
                http2,
                chunked,
            )
            .await
        }
        Cmd::Download {
            target,
            bytes,
            header,
            http2,
        } => client::download(target.addr, target.timeout(), bytes, &header, http2).await,
        Cmd::Upgrade { target, header } => {
            client::upgrade(target.addr, target.timeout(), &header).await
        }
        Cmd::Hold {
            target,
            connections,
            streams,
            path,
            header,
            hold_ms,
        } => {
            let attack = abuse::Attack {
                addr: target.addr,
                limit: target.timeout(),
                headers: &header,
                hold: Duration::from_millis(hold_ms),
            };
            abuse::hold(attack, connections, streams, &path).await
        }
        Cmd::Stall {
            target,
            streams,
            bytes,
            header,
            hold_ms,
        } => {
            let attack = abuse::Attack {
                addr: target.addr,
                limit: target.timeout(),
                headers: &header,
                hold: Duration::from_millis(hold_ms),
            };
            abuse::stall(attack, streams, bytes).await
        }
        Cmd::Idle {
            target,
            connections,
            http2,
            request,
            hold_ms,
        } => {
            idle::idle(idle::Idle {
                addr: target.addr,
                limit: target.timeout(),
                connections,
                http2,
                request,
                hold: Duration::from_millis(hold_ms),
            })
            .await
        }
        Cmd::Raw {
            target,
            send,
            send_header_bytes,
            drip_ms,
            read_ms,
        } => {
            let data = match (send, send_header_bytes) {
                (Some(s), _) => raw::unescape(&s)?,
                (None, Some(n)) => raw::big_header_request(n),
                (None, None) => anyhow::bail!("give --send or --send-header-bytes"),
            };
            raw::raw(
                target.addr,
                target.timeout(),
                &data,
                drip_ms.map(Duration::from_millis),
                Duration::from_millis(read_ms),
            )
            .await
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            // Tests treat any failure as exit 1, usage errors included (clap would use 2).
            return ExitCode::FAILURE;
        }
    };
    // Two workers match the machine; the server needs more than one so a slow connection
    // cannot delay the others' first bytes.
    let res = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| rt.block_on(run(cli.cmd)));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rdr-http: {e:#}");
            ExitCode::FAILURE
        }
    }
}
