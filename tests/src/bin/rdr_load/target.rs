//! The server under test and one request/response exchange with it.
use super::*;

/// One client connection: the request handle and the task driving the socket.
pub(super) type Conn = (
    http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
);

pub(super) struct Target {
    pub(super) addr: SocketAddr,
    pub(super) path: String,
    pub(super) host: HeaderValue,
    pub(super) headers: Vec<(HeaderName, HeaderValue)>,
    pub(super) expect_server: Option<String>,
    pub(super) timeout: Duration,
    pub(super) spin: bool,
    pub(super) check_peer: bool,
}

impl Target {
    pub(super) fn new(a: &TargetArgs) -> Result<Target> {
        let headers = a
            .header
            .iter()
            .map(|(k, v)| {
                Ok((
                    HeaderName::from_bytes(k.as_bytes())
                        .with_context(|| format!("bad header name {k:?}"))?,
                    HeaderValue::from_str(v).with_context(|| format!("bad header value {v:?}"))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Target {
            addr: a.addr,
            path: a.path.clone(),
            host: HeaderValue::from_str(&a.addr.to_string()).context("host header")?,
            headers,
            expect_server: a.expect_server.clone(),
            timeout: Duration::from_millis(a.timeout_ms.max(1)),
            spin: a.spin,
            check_peer: a.check_peer,
        })
    }

    pub(super) fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = self
            .path
            .parse()
            .unwrap_or_else(|_| "/".parse().expect("/"));
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        for (k, v) in &self.headers {
            h.append(k.clone(), v.clone());
        }
        req
    }

    /// A new HTTP/1.1 connection; its driver runs as its own task and ends with the socket.
    /// `reset_on_close`: see [`Target::one_shot`].
    pub(super) async fn open(&self, reset_on_close: bool) -> Result<Conn> {
        let stream = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connect {}", self.addr))?;
        // Small requests must not wait for Nagle behind the previous response's ACK.
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        if self.check_peer {
            let peer = stream.peer_addr().context("getpeername")?;
            if peer != self.addr {
                bail!("getpeername says {peer}, dialed {}", self.addr);
            }
        }
        if reset_on_close {
            // Zero linger never blocks: close sends a reset at once.
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .context("SO_LINGER")?;
        }
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .context("handshake")?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, driver))
    }

    /// Sends one request and reads the whole response; anything but a 200 from the expected
    /// server is an error.
    pub(super) async fn exchange(
        &self,
        sender: &mut http1::SendRequest<Empty<Bytes>>,
    ) -> Result<()> {
        sender.ready().await.context("connection not ready")?;
        let resp = sender
            .send_request(self.request())
            .await
            .context("request")?;
        let status = resp.status();
        let served_by = resp.headers().get("x-served-by").cloned();
        resp.into_body().collect().await.context("response body")?;
        if status != StatusCode::OK {
            bail!("status {status}");
        }
        if let Some(want) = &self.expect_server
            && served_by.as_ref().map(HeaderValue::as_bytes) != Some(want.as_bytes())
        {
            bail!(
                "served by {:?}, expected {want:?}",
                served_by.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            );
        }
        Ok(())
    }

    /// Connect, one request, read the whole response, close.
    ///
    /// The close is a reset (SO_LINGER 0, the connection's task dropped before hyper can
    /// shut the socket down gracefully), so neither end keeps the connection in TIME_WAIT. At
    /// thousands of connections per second, TIME_WAIT entries would pile up by the hundred
    /// thousand over a benchmark, and every later run would pay for the ones before it (longer
    /// hash chains, SYNs recycling TIME_WAIT 4-tuples, conntrack filling up behind iptables):
    /// each run must start from the same state. No `Connection: close` either, for the same
    /// reason: it makes the server close first, and the server would keep the TIME_WAIT.
    pub(super) async fn one_shot(&self) -> Result<()> {
        let (mut sender, driver) = self.open(true).await?;
        let res = self.exchange(&mut sender).await;
        // Aborted while the request handle still lives, so the connection is idle, not
        // shutting down: dropping it closes the socket, which sends the reset.
        driver.abort();
        drop(sender);
        let _ = driver.await;
        res
    }
}
