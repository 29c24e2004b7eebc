//! `serve`: the benchmark's upstream, one thread and a fixed answer.
use super::*;

/// One thread serves every connection: pinned to its core, the server never waits for a
/// sibling thread to be scheduled, so its own latency tail stays out of the figures (the
/// general-purpose rdr-http test server runs two workers, which on one core hand work to each
/// other at the scheduler's pace).
pub(super) async fn serve(name: &str, port: u16, body_bytes: usize, udp: bool) -> Result<()> {
    let served_by = HeaderValue::from_str(name).context("server name is not a header value")?;
    let body = Bytes::from(vec![b'x'; body_bytes]);
    let listener = listen(port)?;
    if udp {
        let sock = bind_udp(port)?;
        tokio::spawn(echo_udp(sock, name.to_owned()));
    }
    println!("ready");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("rdr-load serve: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (served_by, body) = (served_by.clone(), body.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (served_by, body) = (served_by.clone(), body.clone());
                async move {
                    // Requests carry no body here; whatever comes is read and dropped.
                    let _ = req.into_body().collect().await;
                    let mut resp = http::Response::new(http_body_util::Full::new(body));
                    resp.headers_mut().insert("x-served-by", served_by);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            // Client resets at the end of a run are normal: not worth a line each.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Answers each datagram `SEQ` with `NAME SEQ`. The reply leaves from the address routing
/// picks, the pod's own: the benchmark only ever dials pods' addresses here (a steered service
/// address reaches the fork's), so that is the address the client dialed or was steered to.
async fn echo_udp(sock: tokio::net::UdpSocket, name: String) {
    let mut buf = [0u8; 512];
    loop {
        let (len, from) = match sock.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) => {
                // ICMP errors of earlier replies surface here; they must not end the server.
                eprintln!("rdr-load serve: udp recv: {e}");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let mut reply = Vec::with_capacity(name.len() + 1 + len);
        reply.extend_from_slice(name.as_bytes());
        reply.push(b' ');
        reply.extend_from_slice(&buf[..len]);
        if let Err(e) = sock.send_to(&reply, from).await {
            eprintln!("rdr-load serve: udp send to {from}: {e}");
        }
    }
}

fn bind_udp(port: u16) -> Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock =
        Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).context("socket(AF_INET6)")?;
    sock.set_only_v6(false).context("IPV6_V6ONLY=0")?;
    let addr = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port);
    sock.bind(&addr.into())
        .with_context(|| format!("bind udp [::]:{port}"))?;
    sock.set_nonblocking(true).context("O_NONBLOCK")?;
    tokio::net::UdpSocket::from_std(sock.into()).context("registering the UDP socket")
}

pub(super) fn listen(port: u16) -> Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock =
        Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).context("socket(AF_INET6)")?;
    sock.set_only_v6(false).context("IPV6_V6ONLY=0")?;
    // Connection-rate runs leave many server sockets in TIME_WAIT; a restart must still bind.
    sock.set_reuse_address(true).context("SO_REUSEADDR")?;
    let addr = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port);
    sock.bind(&addr.into())
        .with_context(|| format!("bind [::]:{port}"))?;
    // Deep enough for the connection-rate runs' bursts of SYNs.
    sock.listen(4096)
        .with_context(|| format!("listen on port {port}"))?;
    sock.set_nonblocking(true).context("O_NONBLOCK")?;
    tokio::net::TcpListener::from_std(sock.into()).context("registering the listener")
}
