//! Marked upstream sockets, dialed within the connect timeout.
//!
//! Every upstream socket carries [`ROUTER_MARK`]: the kernel never hands a marked socket to the
//! router, so the router's own connections to a service cannot loop back into it.
use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;

use super::DialError;

/// SO_MARK of every upstream socket ("RDR" + 1). Must not collide with marks the node's CNI uses
/// for routing decisions; Cilium and Calico use the upper bits of the low 16 and specific
/// values, not this one.
pub const ROUTER_MARK: u32 = 0x5244_5201;

/// A marked TCP connection to `addr`, within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, DialError> {
    let socket = marked_socket(addr).map_err(DialError::Connect)?;
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| DialError::Timeout(timeout))?
        .map_err(DialError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn marked_socket(addr: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(ROUTER_MARK)?;
    socket.set_nonblocking(true)?;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}
