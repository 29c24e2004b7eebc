//! `rdr-peer`: a tiny real-socket peer for redirector's end-to-end tests.
//!
//! `serve` answers on dual-stack TCP and UDP ports and names itself in every reply, so a test can
//! tell which endpoint (baseline or fork) a connection really reached. `call` and `session` are the
//! client side: they print what the kernel reports (`getpeername`, `recvfrom` source) so a test can
//! check that a redirect stays invisible to the application. Every client-side socket operation
//! has a timeout, and every failure ends with a message on stderr and exit code 1.

use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn6, recvmsg, sendmsg, setsockopt,
    sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Parser)]
#[command(name = "rdr-peer", about = "Test peer for redirector end-to-end tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer on [::]:PORT (dual-stack) for every TCP and UDP port given; print `ready` once bound.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long = "tcp", value_name = "PORT")]
        tcp: Vec<u16>,
        #[arg(long = "udp", value_name = "PORT")]
        udp: Vec<u16>,
    },
    /// One request/response exchange; prints one JSON line.
    Call {
        #[command(subcommand)]
        proto: CallProto,
    },
    /// A long-lived TCP connection driven line by line from stdin.
    Session {
        #[command(subcommand)]
        proto: SessionProto,
    },
}

#[derive(Subcommand)]
enum CallProto {
    Tcp {
        addr: SocketAddr,
        #[command(flatten)]
        common: ClientOpts,
    },
    Udp {
        addr: SocketAddr,
        #[command(flatten)]
        common: ClientOpts,
        /// connect() the socket and use send/recv; report getpeername() as "from".
        #[arg(long)]
        connected: bool,
    },
}

#[derive(Subcommand)]
enum SessionProto {
    Tcp {
        addr: SocketAddr,
        #[command(flatten)]
        common: ClientOpts,
    },
}

#[derive(Args, Clone, Copy)]
struct ClientOpts {
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Exchanges to make, one JSON line each: TCP opens a new connection for each, UDP sends
    /// them all from one socket.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// For an IPv4 ADDR, use an AF_INET6 socket and dial the v4-mapped address instead.
    #[arg(long)]
    v6_mapped: bool,
}

impl ClientOpts {
    fn timeout(&self) -> Duration {
        // A zero timeout means "block forever" to the socket API; never allow that.
        Duration::from_millis(self.timeout_ms.max(1))
    }

    fn target(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(v4) if self.v6_mapped => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
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
    let res = match cli.cmd {
        Cmd::Serve { name, tcp, udp } => serve(&name, &tcp, &udp),
        Cmd::Call {
            proto: CallProto::Tcp { addr, common },
        } => call_tcp(addr, common),
        Cmd::Call {
            proto:
                CallProto::Udp {
                    addr,
                    common,
                    connected,
                },
        } => call_udp(addr, common, connected),
        Cmd::Session {
            proto: SessionProto::Tcp { addr, common },
        } => session_tcp(addr, common),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rdr-peer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A one-line JSON object with keys in the given order (serde_json's own maps sort keys).
fn obj(fields: &[(&str, &str)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| {
            format!(
                "{}:{}",
                serde_json::Value::from(*k),
                serde_json::Value::from(*v)
            )
        })
        .collect();
    format!("{{{}}}", body.join(","))
}

/// Socket timeouts surface as EAGAIN; say what actually happened.
fn timed_out(e: io::Error, what: &str, timeout: Duration) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            anyhow!("{what}: timed out after {} ms", timeout.as_millis())
        }
        _ => anyhow::Error::new(e).context(what.to_owned()),
    }
}

fn print_line(line: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush().context("flushing stdout")
}

// ---------------------------------------------------------------- serve

fn dual_stack(ty: Type, proto: Protocol, port: u16) -> Result<Socket> {
    let sock = Socket::new(Domain::IPV6, ty, Some(proto)).context("socket(AF_INET6)")?;
    sock.set_only_v6(false).context("IPV6_V6ONLY=0")?;
    // Lets a restarted server rebind at once while old connections sit in TIME_WAIT.
    sock.set_reuse_address(true).context("SO_REUSEADDR")?;
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    sock.bind(&addr.into())
        .with_context(|| format!("bind [::]:{port}"))?;
    Ok(sock)
}

fn serve(name: &str, tcp: &[u16], udp: &[u16]) -> Result<()> {
    if tcp.is_empty() && udp.is_empty() {
        bail!("serve needs at least one --tcp or --udp port");
    }
    let mut listeners = Vec::new();
    for &port in tcp {
        let sock = dual_stack(Type::STREAM, Protocol::TCP, port)?;
        sock.listen(128)
            .with_context(|| format!("listen on tcp port {port}"))?;
        listeners.push(TcpListener::from(sock));
    }
    let mut udps = Vec::new();
    for &port in udp {
        let sock = dual_stack(Type::DGRAM, Protocol::UDP, port)?;
        // Replies must leave from the address the client dialed (a VIP on `lo`), like a
        // kube-proxy DNAT would make them; IPV6_PKTINFO also covers v4 on a dual-stack socket.
        setsockopt(&sock, sockopt::Ipv6RecvPacketInfo, &true).context("IPV6_RECVPKTINFO")?;
        udps.push(UdpSocket::from(sock));
    }

    for listener in listeners {
        let name = name.to_owned();
        thread::spawn(move || accept_loop(listener, name));
    }
    for sock in udps {
        let name = name.to_owned();
        thread::spawn(move || udp_loop(sock, name));
    }
    print_line("ready")?;
    loop {
        thread::park();
    }
}

fn accept_loop(listener: TcpListener, name: String) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let name = name.clone();
                thread::spawn(move || {
                    if let Err(e) = serve_conn(stream, &name) {
                        eprintln!("rdr-peer serve: connection: {e:#}");
                    }
                });
            }
            Err(e) => {
                eprintln!("rdr-peer serve: accept: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve_conn(stream: TcpStream, name: &str) -> Result<()> {
    // Reads block without limit on purpose: sessions stay idle between lines as long as the test
    // wants. Writes get a bound so a stuck client cannot pin the thread forever.
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let line = line?;
        let line = line.trim_end_matches('\r');
        let reply = obj(&[("server", name), ("line", line)]);
        writer.write_all(reply.as_bytes())?;
        writer.write_all(b"\n")?;
    }
    Ok(())
}

fn udp_loop(sock: UdpSocket, name: String) {
    loop {
        if let Err(e) = udp_once(&sock, &name) {
            eprintln!("rdr-peer serve: udp: {e:#}");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn udp_once(sock: &UdpSocket, name: &str) -> Result<()> {
    let mut buf = [0u8; 65536];
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
    let (len, from, local) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<SockaddrIn6>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .context("recvmsg")?;
        let from = msg
            .address
            .ok_or_else(|| anyhow!("datagram without a source address"))?;
        let mut local = None;
        for c in msg.cmsgs().context("reading control messages")? {
            if let ControlMessageOwned::Ipv6PacketInfo(info) = c {
                local = Some(info);
            }
        }
        (msg.bytes, from, local)
    };
    let payload = String::from_utf8_lossy(&buf[..len]);
    let reply = obj(&[("server", name), ("echo", &payload)]);
    let iov = [IoSlice::new(reply.as_bytes())];
    match local {
        Some(info) => {
            // Interface 0: let routing pick the way out; only the source address is pinned.
            let src = libc::in6_pktinfo {
                ipi6_addr: info.ipi6_addr,
                ipi6_ifindex: 0,
            };
            sendmsg(
                sock.as_raw_fd(),
                &iov,
                &[ControlMessage::Ipv6PacketInfo(&src)],
                MsgFlags::empty(),
                Some(&from),
            )
        }
        None => sendmsg(sock.as_raw_fd(), &iov, &[], MsgFlags::empty(), Some(&from)),
    }
    .with_context(|| format!("sendmsg to {from}"))?;
    Ok(())
}

// ---------------------------------------------------------------- clients

fn connect_tcp(addr: SocketAddr, opts: ClientOpts) -> Result<TcpStream> {
    let target = opts.target(addr);
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .context("socket")?;
    if target.is_ipv6() {
        sock.set_only_v6(false).context("IPV6_V6ONLY=0")?;
    }
    sock.connect_timeout(&target.into(), opts.timeout())
        .map_err(|e| timed_out(e, &format!("connect to {target}"), opts.timeout()))?;
    let stream = TcpStream::from(sock);
    stream.set_read_timeout(Some(opts.timeout()))?;
    stream.set_write_timeout(Some(opts.timeout()))?;
    Ok(stream)
}

fn server_name(reply: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(reply.trim_end())
        .with_context(|| format!("reply is not JSON: {reply:?}"))?;
    v.get("server")
        .and_then(|s| s.as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("reply has no \"server\" field: {reply:?}"))
}

fn read_reply_line(reader: &mut impl BufRead, timeout: Duration) -> Result<String> {
    let mut line = String::new();
    let n = reader
        .read_line(&mut line)
        .map_err(|e| timed_out(e, "reading the reply", timeout))?;
    if n == 0 {
        bail!("connection closed by peer before a reply");
    }
    if !line.ends_with('\n') {
        bail!("connection closed in the middle of a reply: {line:?}");
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn call_tcp(addr: SocketAddr, opts: ClientOpts) -> Result<()> {
    for _ in 0..opts.count {
        call_tcp_once(addr, opts)?;
    }
    Ok(())
}

fn call_tcp_once(addr: SocketAddr, opts: ClientOpts) -> Result<()> {
    let mut stream = connect_tcp(addr, opts)?;
    let peer = stream.peer_addr().context("getpeername")?;
    stream
        .write_all(b"ping\n")
        .map_err(|e| timed_out(e, "sending ping", opts.timeout()))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let reply = read_reply_line(&mut reader, opts.timeout())?;
    let server = server_name(&reply)?;
    print_line(&obj(&[("server", &server), ("peer", &peer.to_string())]))
}

fn call_udp(addr: SocketAddr, opts: ClientOpts, connected: bool) -> Result<()> {
    let target = opts.target(addr);
    let sock = Socket::new(
        Domain::for_address(target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .context("socket")?;
    let any: SocketAddr = if target.is_ipv6() {
        sock.set_only_v6(false).context("IPV6_V6ONLY=0")?;
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    sock.bind(&any.into()).context("bind")?;
    let sock = UdpSocket::from(sock);
    sock.set_read_timeout(Some(opts.timeout()))?;
    sock.set_write_timeout(Some(opts.timeout()))?;
    if connected {
        sock.connect(target)
            .with_context(|| format!("connect to {target}"))?;
    }
    let mut buf = [0u8; 65536];
    for _ in 0..opts.count {
        let (len, from) = if connected {
            sock.send(b"ping").context("send")?;
            let len = sock
                .recv(&mut buf)
                .map_err(|e| timed_out(e, "waiting for the reply", opts.timeout()))?;
            (len, sock.peer_addr().context("getpeername")?)
        } else {
            sock.send_to(b"ping", target)
                .with_context(|| format!("sendto {target}"))?;
            sock.recv_from(&mut buf)
                .map_err(|e| timed_out(e, "waiting for the reply", opts.timeout()))?
        };
        let reply = String::from_utf8_lossy(&buf[..len]);
        let server = server_name(&reply)?;
        print_line(&obj(&[("server", &server), ("from", &from.to_string())]))?;
    }
    Ok(())
}

fn session_tcp(addr: SocketAddr, opts: ClientOpts) -> Result<()> {
    let mut stream = connect_tcp(addr, opts)?;
    let peer = stream.peer_addr().context("getpeername")?;
    print_line(&obj(&[("peer", &peer.to_string())]))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    // stdin is the harness's pipe: it blocks until the test sends the next line or drops the
    // session, which is the point of a long-lived connection.
    for line in io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        stream
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| timed_out(e, "sending line", opts.timeout()))?;
        let reply = read_reply_line(&mut reader, opts.timeout())?;
        print_line(&reply)?;
    }
    Ok(())
}
