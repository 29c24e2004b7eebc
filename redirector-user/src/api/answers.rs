//! The answers of the read-only questions `GET /v1/status` and `GET /v1/stats`, and of every
//! successful change: built by the daemon, rendered by the CLI, read by the tests.
//!
//! Field names are the wire format; an answer from an older daemon without the Kubernetes or
//! member parts still reads (they default to empty).
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::k8s::{
    derive::ObjectIssue,
    source::{Health, MemberReport},
};

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusAnswer {
    pub version: String,
    pub config: PathBuf,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub api_socket: PathBuf,
    pub state_file: PathBuf,
    pub programs: Vec<ProgramStatus>,
    pub programs_identity: String,
    pub maps: Vec<MapStatus>,
    /// None: no node router (`daemon.router_listen` unset).
    pub router: Option<RouterStatus>,
    pub counts: Counts,
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// None: no Kubernetes source.
    #[serde(default)]
    pub kubernetes: Option<KubernetesStatus>,
}

impl StatusAnswer {
    /// The map named `name` (`services`, `routes`, `members`, `endpoints`).
    pub fn map(&self, name: &str) -> Option<&MapStatus> {
        self.maps.iter().find(|m| m.map == name)
    }
}

/// One attach point of the programs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStatus {
    pub hook: String,
    pub state: HookState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookState {
    /// Found attached by an earlier daemon of this build, and kept.
    Adopted,
    Attached,
    Missing,
    /// Not attached because nothing needs it (sock_ops without a node router).
    NotNeeded,
}

/// One kernel map: entries written against its capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapStatus {
    pub map: String,
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterStatus {
    pub listen: Vec<SocketAddr>,
    pub serving: bool,
    pub connections: u64,
    /// Listening sockets, each with its accept loop, per listen address (`router.accept_loops`);
    /// 0 from a daemon older than the setting.
    #[serde(default)]
    pub accept_loops: usize,
    /// Connections each accept loop accepted, in the order of `listen`.
    #[serde(default)]
    pub accepted: Vec<LoopAccepted>,
}

/// One accept loop of the router: its address and the connections it accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopAccepted {
    pub listen: SocketAddr,
    pub accepted: u64,
}

/// The merged state's size, and what of it came from the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub services: usize,
    pub sandboxes: usize,
    pub groups: usize,
    pub routes: usize,
    pub member_pods: usize,
    pub unresolved_member_pods: usize,
    pub from_api: ApiCounts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiCounts {
    pub services: usize,
    pub sandboxes: usize,
    pub groups: usize,
}

/// One member path: the namespace it names now against what the kernel's members map holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// The sandbox or group key.
    pub sandbox: String,
    pub path: PathBuf,
    pub state: MemberState,
    /// The namespace cookie the path names now.
    pub cookie: Option<u64>,
    /// The cookie the kernel's members map holds for the path.
    pub kernel_cookie: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    Steered,
    /// The namespace was replaced; the next poll follows it.
    Stale,
    NotApplied,
    /// The namespace is gone (see `error`).
    Unresolved,
}

/// The Kubernetes source: connection, watches, objects seen, members found or not, and the
/// objects that could not be applied with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KubernetesStatus {
    pub health: Health,
    /// Cluster objects left out of the merged state (a clash with the file or the API).
    pub rejected: Vec<String>,
    pub issues: Vec<ObjectIssue>,
    pub members_resolved: usize,
    pub members_unresolved: usize,
    pub members: Vec<MemberReport>,
}

/// `GET /v1/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsAnswer {
    pub kernel: KernelCounters,
    pub routes: Vec<RouteStats>,
    /// None: no node router.
    pub router: Option<BTreeMap<String, u64>>,
    /// The last route changes that reset member sockets (`reset_on_change`), oldest first.
    #[serde(default)]
    pub resets: Vec<ResetReport>,
    /// Why this node cannot reset sockets, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_unavailable: Option<String>,
}

/// What one reset of connections did: after a route change (`reset_on_change`), in one
/// routing key's member namespaces, or at start for the router (`router.reset_bypassed`), in
/// every pod's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetReport {
    /// Unix time of the change, in seconds.
    pub at: u64,
    #[serde(default)]
    pub cause: ResetCause,
    /// The routing key whose members were reset; empty for [`ResetCause::RouterBack`].
    pub sandbox: String,
    /// The services whose route changed.
    pub services: Vec<String>,
    /// Member sockets closed.
    pub closed: u64,
    /// Member namespaces the iterator could not run in, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// The kernel's event counters by name, or why they could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KernelCounters {
    Counters(BTreeMap<String, u64>),
    Error { error: String },
}

impl KernelCounters {
    /// The counter `name`; None if it is unknown or the counters could not be read.
    pub fn get(&self, name: &str) -> Option<u64> {
        match self {
            Self::Counters(counters) => counters.get(name).copied(),
            Self::Error { .. } => None,
        }
    }
}

/// Connections steered by one route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStats {
    pub sandbox: String,
    pub service: String,
    pub steered: u64,
}

/// Why connections were reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetCause {
    /// A route with `reset_on_change` changed.
    #[default]
    RouteChange,
    /// The router started (`router.reset_bypassed`): connections that went around it.
    RouterBack,
}

/// The answer to every successful change: the counts it leaves behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSummary {
    pub ok: bool,
    pub services: usize,
    pub sandboxes: usize,
    pub groups: usize,
    pub routes: usize,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn kernel_counters_read_both_forms() {
        let counters: KernelCounters = serde_json::from_value(json!({"steered": 3})).unwrap();
        assert_eq!(counters.get("steered"), Some(3));
        let failed: KernelCounters = serde_json::from_value(json!({"error": "no map"})).unwrap();
        assert_eq!(
            failed,
            KernelCounters::Error {
                error: "no map".into()
            }
        );
        assert_eq!(
            serde_json::to_value(&failed).unwrap(),
            json!({"error": "no map"})
        );
    }

    #[test]
    fn status_round_trips() {
        let value = json!({
            "version": "1", "config": "/etc/r.toml", "cgroup": "/sys/fs/cgroup",
            "bpffs": "/sys/fs/bpf/r", "api_socket": "/run/r.sock", "state_file": "/var/lib/r",
            "programs": [{"hook": "connect4", "state": "adopted"}],
            "programs_identity": "abc",
            "maps": [{"map": "routes", "entries": 4, "capacity": 1024}],
            "router": {"listen": ["127.0.0.1:15001"], "serving": true, "connections": 2,
                "accept_loops": 2, "accepted": [{"listen": "127.0.0.1:15001", "accepted": 1},
                {"listen": "127.0.0.1:15001", "accepted": 1}]},
            "counts": {"services": 1, "sandboxes": 1, "groups": 0, "routes": 4,
                "member_pods": 1, "unresolved_member_pods": 0,
                "from_api": {"services": 0, "sandboxes": 1, "groups": 0}},
            "members": [{"sandbox": "pr-1", "path": "/run/netns/a", "state": "not_applied",
                "cookie": 7, "kernel_cookie": null, "error": null}],
            "kubernetes": null,
        });
        let answer: StatusAnswer = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(answer.map("routes").unwrap().entries, 4);
        assert_eq!(answer.members[0].state, MemberState::NotApplied);
        assert_eq!(serde_json::to_value(&answer).unwrap(), value);
    }
}
