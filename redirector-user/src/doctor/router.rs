//! The `router address` check: whether each `daemon.router_listen` address belongs to this
//! node and is one pods can reach.
use std::{
    io,
    net::{SocketAddr, TcpListener},
};

use super::{Check, ROUTER_ADDRESS, Status};

// ---- router address ----

/// What binding to one router address said.
enum AddrProbe {
    Local,
    NotLocal,
    Unspecified,
    Loopback,
    Other(io::Error),
}

fn probe_router_address(addr: SocketAddr) -> AddrProbe {
    let ip = addr.ip();
    if ip.is_unspecified() {
        return AddrProbe::Unspecified;
    }
    // Port 0: whether the address is ours does not depend on the port, and the configured
    // port may well be in use by a running daemon.
    match TcpListener::bind(SocketAddr::new(ip, 0)) {
        Ok(_) if ip.is_loopback() => AddrProbe::Loopback,
        Ok(_) => AddrProbe::Local,
        Err(err) if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) => AddrProbe::NotLocal,
        Err(err) => AddrProbe::Other(err),
    }
}

pub(super) fn check_router_addresses(listen: &[SocketAddr]) -> Check {
    if listen.is_empty() {
        return Check::warn(
            ROUTER_ADDRESS,
            "no router_listen: HTTP services get L4 steering only",
            Some(
                "set daemon.router_listen to an address of this node to route HTTP per request"
                    .to_owned(),
            ),
        );
    }
    let mut status = Status::Pass;
    let mut details = Vec::new();
    let mut fixes = Vec::new();
    for addr in listen {
        let ip = addr.ip();
        let (verdict, detail) = match probe_router_address(*addr) {
            AddrProbe::Local => (Status::Pass, format!("{ip} is assigned here")),
            AddrProbe::NotLocal => {
                fixes.push(
                    "daemon.router_listen must be an address of this node (see `ip addr`; a new \
                     IPv6 address may still be tentative)",
                );
                (
                    Status::Fail,
                    format!("{ip} is not assigned to any interface of this network namespace"),
                )
            }
            AddrProbe::Unspecified => {
                fixes.push("daemon.router_listen must be an address of this node, not a wildcard");
                (
                    Status::Fail,
                    format!("{ip} is a wildcard, not an address pods can dial"),
                )
            }
            AddrProbe::Loopback => {
                fixes.push("use an address of this node that pods reach (loopback is not one)");
                (
                    Status::Warn,
                    format!(
                        "{ip} is loopback: pods in their own network namespaces cannot reach it"
                    ),
                )
            }
            AddrProbe::Other(err) => (Status::Warn, format!("{ip}: cannot check: {err}")),
        };
        status = worse(status, verdict);
        details.push(detail);
    }
    fixes.dedup();
    Check {
        name: ROUTER_ADDRESS,
        status,
        detail: details.join("; "),
        fix: (!fixes.is_empty()).then(|| fixes.join("; ")),
    }
}

fn worse(a: Status, b: Status) -> Status {
    let rank = |s| match s {
        Status::Pass => 0,
        Status::Warn => 1,
        Status::Fail => 2,
    };
    if rank(b) > rank(a) { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_addresses() {
        let empty = check_router_addresses(&[]);
        assert_eq!(empty.status, Status::Warn);
        assert_eq!(
            empty.detail,
            "no router_listen: HTTP services get L4 steering only"
        );
        // 192.0.2.0/24 is TEST-NET-1: assigned to no machine. Only a bind is attempted.
        let foreign = check_router_addresses(&["192.0.2.1:15001".parse().expect("addr")]);
        assert_eq!(foreign.status, Status::Fail);
        assert!(foreign.detail.contains("192.0.2.1"), "{}", foreign.detail);
        assert_eq!(
            foreign
                .fix
                .as_deref()
                .map(|f| f.starts_with("daemon.router_listen must be an address of this node")),
            Some(true)
        );
        let wildcard = check_router_addresses(&["0.0.0.0:15001".parse().expect("addr")]);
        assert_eq!(wildcard.status, Status::Fail);
        let loopback = check_router_addresses(&["127.0.0.1:15001".parse().expect("addr")]);
        assert_eq!(loopback.status, Status::Warn);
    }
}
