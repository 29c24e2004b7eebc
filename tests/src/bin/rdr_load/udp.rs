//! `udp`: request/response exchanges over UDP, one in flight at a time.
//!
//! Blocking sockets with a receive timeout: one exchange in flight needs no event loop, and
//! the loop's own cost stays a few syscalls per exchange.
use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};

use super::*;

struct Exchange {
    addr: SocketAddr,
    expect_server: Option<String>,
    timeout: Duration,
}

pub(super) fn run_udp(a: &UdpArgs) -> Result<Value> {
    let ex = Exchange {
        addr: a.addr,
        expect_server: a.expect_server.clone(),
        timeout: Duration::from_millis(a.timeout_ms.max(1)),
    };
    let duration = Duration::from_millis(a.duration_ms);
    let measure_from = Instant::now() + Duration::from_millis(a.warmup_ms);
    let end = measure_from + duration;
    let mut st = Stats::new();
    // The unconnected socket lives for the whole run, like a resolver's.
    let mut shared: Option<UdpSocket> = None;
    let mut seq: u64 = 0;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        seq += 1;
        let res = if a.connected {
            ex.connected_once(seq)
        } else {
            ex.unconnected_once(&mut shared, seq)
        };
        if t0 >= measure_from {
            st.record(t0, t0, Instant::now(), &res);
        }
        if res.is_err() {
            // A late reply must not be read as the next exchange's: start on a new socket.
            shared = None;
            // An immediate error (ICMP unreachable) must not turn into a busy loop.
            thread::sleep(Duration::from_millis(1));
        }
    }
    let mut out = summary(&st, measure_from, duration);
    out["mode"] = json!("udp");
    out["connected"] = json!(a.connected);
    Ok(out)
}

impl Exchange {
    /// A socket of the address's family on an ephemeral port, with the exchange's timeouts.
    fn socket(&self) -> Result<UdpSocket> {
        let any: SocketAddr = match self.addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(any).context("bind")?;
        sock.set_read_timeout(Some(self.timeout))
            .context("SO_RCVTIMEO")?;
        sock.set_write_timeout(Some(self.timeout))
            .context("SO_SNDTIMEO")?;
        Ok(sock)
    }

    /// sendto and recvfrom on the shared socket (opened if there is none): the reply's source
    /// must be the address dialed, whichever endpoint answered.
    fn unconnected_once(&self, shared: &mut Option<UdpSocket>, seq: u64) -> Result<()> {
        let sock = match shared {
            Some(s) => s,
            None => shared.insert(self.socket()?),
        };
        let req = seq.to_string();
        sock.send_to(req.as_bytes(), self.addr)
            .with_context(|| format!("sendto {}", self.addr))?;
        let mut buf = [0u8; 512];
        let (len, from) = sock
            .recv_from(&mut buf)
            .map_err(|e| recv_error(e, self.timeout))?;
        if from != self.addr {
            bail!("reply from {from}, dialed {}", self.addr);
        }
        self.check_reply(&buf[..len], &req)
    }

    /// A new socket: connect, getpeername (must be the address dialed), send, recv, close.
    fn connected_once(&self, seq: u64) -> Result<()> {
        let sock = self.socket()?;
        sock.connect(self.addr)
            .with_context(|| format!("connect {}", self.addr))?;
        let peer = sock.peer_addr().context("getpeername")?;
        if peer != self.addr {
            bail!("getpeername says {peer}, dialed {}", self.addr);
        }
        let req = seq.to_string();
        sock.send(req.as_bytes()).context("send")?;
        let mut buf = [0u8; 512];
        let len = sock
            .recv(&mut buf)
            .map_err(|e| recv_error(e, self.timeout))?;
        self.check_reply(&buf[..len], &req)
    }

    /// The reply is `NAME SEQ`: this exchange's, from the expected server.
    fn check_reply(&self, reply: &[u8], req: &str) -> Result<()> {
        let reply = String::from_utf8_lossy(reply);
        let Some((name, echoed)) = reply.split_once(' ') else {
            bail!("malformed reply {reply:?}");
        };
        if echoed != req {
            bail!("reply to request {echoed:?}, expected {req:?}");
        }
        if let Some(want) = &self.expect_server
            && name != want
        {
            bail!("served by {name:?}, expected {want:?}");
        }
        Ok(())
    }
}

/// Socket timeouts surface as EAGAIN; say what actually happened.
fn recv_error(e: std::io::Error, timeout: Duration) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            anyhow!("no reply within {} ms", timeout.as_millis())
        }
        _ => anyhow::Error::new(e).context("recv"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(expect: Option<&str>) -> Exchange {
        Exchange {
            addr: "10.96.0.10:8081".parse().expect("address"),
            expect_server: expect.map(str::to_owned),
            timeout: Duration::from_millis(1),
        }
    }

    #[test]
    fn a_reply_must_echo_this_request_from_the_expected_server() {
        let ex = exchange(Some("fork"));
        assert!(ex.check_reply(b"fork 7", "7").is_ok());
        let stale = ex.check_reply(b"fork 6", "7").expect_err("stale reply");
        assert!(format!("{stale}").contains("request \"6\""));
        let wrong = ex
            .check_reply(b"baseline 7", "7")
            .expect_err("wrong server");
        assert!(format!("{wrong}").contains("\"baseline\""));
        assert!(ex.check_reply(b"fork", "7").is_err());
        assert!(exchange(None).check_reply(b"baseline 7", "7").is_ok());
    }
}
