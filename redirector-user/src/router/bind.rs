//! Binding a router address for several accept loops: a group of listening sockets that share
//! the address through `SO_REUSEPORT`, over which the kernel spreads new connections (by a hash
//! of their addresses and ports), so that accepting is not one task's work on one core.
use std::{
    io,
    net::{SocketAddr, TcpListener},
    num::NonZeroUsize,
};

use socket2::{Domain, Protocol, Socket, Type};

/// Connections each listener's queue holds before its loop accepts them.
const BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another socket already listens on the address (or holds it without `SO_REUSEPORT`).
    #[error("{addr} is in use: is another daemon running?")]
    InUse {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// `count` listening sockets on `addr`, all in one `SO_REUSEPORT` group, once it is sure that
/// no one else listens there; non-blocking, for the runtimes of the threads that serve them.
pub fn group(addr: SocketAddr, count: NonZeroUsize) -> Result<Vec<TcpListener>, BindError> {
    claim(addr)?;
    (0..count.get())
        .map(|_| listener(addr).map_err(|source| located(addr, source)))
        .collect()
}

/// Fails if anyone listens on `addr` already.
///
/// `SO_REUSEPORT` lets any socket of the same user (root, for the daemon) join a listening
/// group without a word: a second daemon on the same address would silently take a share of
/// the connections the kernel hands over, and the map that tells the kernel the router is alive
/// would name only one of them. A socket without `SO_REUSEPORT` may not bind where another one
/// listens, so binding one first (and closing it: bound but never listening, it leaves nothing
/// behind) makes a second daemon fail with `AddrInUse` as it did with a single listener. It sets
/// `SO_REUSEADDR` like the listeners, so a previous daemon's connections in `TIME_WAIT` do not
/// count as use.
///
/// Between this check and the group's bind lie a few system calls: two daemons on one address
/// that start in that same instant could both pass. A second daemon with the same config never
/// gets this far (the local API's socket is taken first).
fn claim(addr: SocketAddr) -> Result<(), BindError> {
    let probe = socket(addr).map_err(|source| BindError::Listen { addr, source })?;
    probe
        .bind(&addr.into())
        .map_err(|source| located(addr, source))
}

fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket(addr)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// A TCP socket for `addr` with the options the claim and the listeners share.
fn socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // The IPv4 listeners may use the same port.
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

fn located(addr: SocketAddr, source: io::Error) -> BindError {
    if source.kind() == io::ErrorKind::AddrInUse {
        BindError::InUse { addr, source }
    } else {
        BindError::Listen { addr, source }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpStream};

    use super::*;

    /// A loopback address with a port that nothing uses at the moment.
    fn free_addr() -> SocketAddr {
        let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        probe.local_addr().expect("local address")
    }

    fn loops(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).expect("non-zero")
    }

    #[test]
    fn every_listener_of_the_group_shares_the_address() {
        let addr = free_addr();
        let group = group(addr, loops(3)).expect("group");
        assert_eq!(group.len(), 3);
        for listener in &group {
            assert_eq!(listener.local_addr().expect("local address"), addr);
        }
        // Loopback only: the group takes connections.
        TcpStream::connect(addr).expect("connect");
    }

    #[test]
    fn a_second_group_on_the_address_is_refused() {
        let addr = free_addr();
        let _first = group(addr, loops(2)).expect("group");
        // Without the claim it would join the first group: the listeners allow it.
        assert!(listener(addr).is_ok(), "same user, SO_REUSEPORT: joins");
        let err = group(addr, loops(2)).expect_err("in use");
        assert!(matches!(err, BindError::InUse { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("{addr} is in use: is another daemon running?")
        );
    }

    #[test]
    fn a_plain_listener_on_the_address_is_refused() {
        let addr = free_addr();
        let _other = TcpListener::bind(addr).expect("bind");
        let err = group(addr, loops(1)).expect_err("in use");
        assert!(matches!(err, BindError::InUse { .. }), "{err:?}");
    }
}
