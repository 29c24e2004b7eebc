//! The desired state the daemon makes true in the kernel: services, sandboxes, their member pods
//! and routes. Validated on construction (see `config`); the kernel encoding lives in
//! `kernel::maps`.
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

/// How a service is reached, which decides how its forks are routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// HTTP/1.1 or HTTP/2 over TCP: members are steered like `tcp` today; per-request routing
    /// by the node router builds on it.
    Http,
}

impl Protocol {
    /// The IP protocol the kernel sees for sockets of this service.
    pub fn ip_protocol(self) -> u8 {
        match self {
            Protocol::Tcp | Protocol::Http => redirector_common::IPPROTO_TCP,
            Protocol::Udp => redirector_common::IPPROTO_UDP,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub address: SocketAddr,
    pub protocol: Protocol,
}

/// What the node router does when a request's fork cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ForkErrorPolicy {
    /// Answer 502 with a header naming the cause: a tester sees their fork is down.
    #[default]
    Error,
    /// Send the request to the baseline instead.
    Baseline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub fork: SocketAddr,
    pub on_fork_error: ForkErrorPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub key: String,
    /// Network-namespace paths of the pods that belong to the sandbox.
    pub members: Vec<PathBuf>,
    /// By service name.
    pub routes: BTreeMap<String, Route>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// By service name.
    pub services: BTreeMap<String, Service>,
    /// By routing key.
    pub sandboxes: BTreeMap<String, Sandbox>,
}

impl DesiredState {
    pub fn route_count(&self) -> usize {
        self.sandboxes.values().map(|s| s.routes.len()).sum()
    }

    pub fn member_count(&self) -> usize {
        self.sandboxes.values().map(|s| s.members.len()).sum()
    }
}
