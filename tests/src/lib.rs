//! End-to-end test harness for redirector: a simulated Kubernetes node built from network
//! namespaces ([`Node`], [`Pod`]), supervised processes ([`Daemon`]), and the `rdr-peer` test
//! peer binary driven through [`Pod::serve`], [`Pod::call`] and [`Pod::session`], and the
//! `rdr-http` HTTP/1.1, h2c and gRPC peer driven through [`Pod::serve_http`] and [`Pod::http`].
//!
//! Everything created carries the prefix `rdrt-<pid>-<n>` and is removed when the [`Node`] is
//! dropped; leftovers of runs that died are swept by the next [`Node::new`].

mod bridge;
mod cleanup;
mod http;
pub mod hung_fs;
pub mod k8s;
pub mod kubelet;
mod prereq;
mod proc;
pub mod shop;
mod simnode;

pub use bridge::Bridge;
pub use http::HttpReq;
pub use prereq::{cgroup2_mount, ip_bin, require_e2e, under_ci, workspace_bin};
pub use proc::Daemon;
pub use simnode::{
    CallOpts, CallResult, NODE_GW_V4, NODE_GW_V6, Node, Pod, Proto, Reply, Server, Session, unmap,
};
