//! The config file (TOML): parsing and validation into a [`DesiredState`].
//!
//! A file is accepted whole or rejected whole. Validation does not stop at the first problem:
//! every error is reported with the file, line, column and field it concerns, so one run of
//! `redirector validate` shows everything to fix.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    routing_key,
    state::{DesiredState, Protocol, Sandbox, Service},
};

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/redirector";

/// Daemon settings from the `[daemon]` table; command-line flags override them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    /// cgroup v2 directory the programs attach to.
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    pub bpffs: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub daemon: DaemonSettings,
    pub state: DesiredState,
}

/// One problem in a config file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub line: usize,
    pub column: usize,
    /// Path of the offending field, e.g. `sandbox[0].routes[1].service`.
    pub field: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", Invalid { path, errors })]
    Invalid {
        path: PathBuf,
        errors: Vec<FieldError>,
    },
}

/// Display helper: `invalid config F (N errors)` and one indented `F:line:col: field: message`
/// per error.
struct Invalid<'a> {
    path: &'a Path,
    errors: &'a [FieldError],
}

impl fmt::Display for Invalid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "invalid config {} ({n} error{})",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for e in self.errors {
            write!(
                f,
                "\n  {}:{}:{}: {}: {}",
                self.path.display(),
                e.line,
                e.column,
                e.field,
                e.message
            )?;
        }
        Ok(())
    }
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|errors| ConfigError::Invalid {
        path: path.to_owned(),
        errors,
    })
}

// === raw file schema ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    service: Vec<RawService>,
    #[serde(default)]
    sandbox: Vec<RawSandbox>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    cgroup: Option<PathBuf>,
    bpffs: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    address: Spanned<String>,
    protocol: Option<Spanned<Protocol>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    key: Spanned<String>,
    #[serde(default)]
    members: Vec<Spanned<String>>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    service: Spanned<String>,
    fork: Spanned<String>,
}

// === validation ===

/// Parses and validates config text; on failure returns every problem found.
pub fn parse(text: &str) -> Result<Config, Vec<FieldError>> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map(|span| line_col(text, span.start))
            .unwrap_or((1, 1));
        vec![FieldError {
            line,
            column,
            field: "toml".to_owned(),
            message: e.message().trim().to_owned(),
        }]
    })?;
    let mut v = Validator {
        text,
        errors: Vec::new(),
    };
    let state = v.state(raw.service, raw.sandbox);
    if v.errors.is_empty() {
        Ok(Config {
            daemon: DaemonSettings {
                cgroup: raw.daemon.cgroup,
                bpffs: raw.daemon.bpffs,
            },
            state,
        })
    } else {
        v.errors.sort_by_key(|e| (e.line, e.column));
        Err(v.errors)
    }
}

struct Validator<'a> {
    text: &'a str,
    errors: Vec<FieldError>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, field: String, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(FieldError {
            line,
            column,
            field,
            message: message.into(),
        });
    }

    fn state(&mut self, services: Vec<RawService>, sandboxes: Vec<RawSandbox>) -> DesiredState {
        let mut state = DesiredState::default();
        // (address, protocol) -> service name: two services cannot claim one destination.
        let mut destinations: HashMap<(SocketAddr, u8), String> = HashMap::new();
        // Names seen so far, valid or not, so that a duplicate is reported even next to another
        // error.
        let mut names = HashSet::new();

        for (i, raw) in services.into_iter().enumerate() {
            let field = |f: &str| format!("service[{i}].{f}");
            let name = raw.name.get_ref().clone();
            if name.is_empty() {
                self.error(raw.name.span(), field("name"), "must not be empty");
            } else if !names.insert(name.clone()) {
                self.error(
                    raw.name.span(),
                    field("name"),
                    format!("duplicate service name {name:?}"),
                );
            }
            let protocol = raw.protocol.map(|p| *p.get_ref()).unwrap_or(Protocol::Tcp);
            let Some(address) = self.socket_addr(&raw.address, field("address")) else {
                continue;
            };
            if let Some(other) =
                destinations.insert((address, protocol.ip_protocol()), name.clone())
            {
                self.error(
                    raw.address.span(),
                    field("address"),
                    format!("{address} is already the address of service {other:?}"),
                );
            }
            state.services.entry(name.clone()).or_insert(Service {
                name,
                address,
                protocol,
            });
        }

        // Member path -> sandbox key: a pod belongs to one sandbox at most.
        let mut member_of: HashMap<String, String> = HashMap::new();
        for (i, raw) in sandboxes.into_iter().enumerate() {
            let field = |f: &str| format!("sandbox[{i}].{f}");
            let key = raw.key.get_ref().clone();
            if let Err(e) = routing_key::validate(&key) {
                self.error(raw.key.span(), field("key"), e.to_string());
            } else if state.sandboxes.contains_key(&key) {
                self.error(
                    raw.key.span(),
                    field("key"),
                    format!("duplicate sandbox key {key:?}"),
                );
            }

            let mut members = Vec::new();
            for (j, member) in raw.members.iter().enumerate() {
                let path = member.get_ref();
                let f = field(&format!("members[{j}]"));
                if !path.starts_with('/') {
                    self.error(
                        member.span(),
                        f,
                        format!("{path:?} is not an absolute network-namespace path (e.g. /run/netns/NAME or /proc/PID/ns/net)"),
                    );
                } else if let Some(other) = member_of.insert(path.clone(), key.clone()) {
                    self.error(
                        member.span(),
                        f,
                        format!("{path} is already a member of sandbox {other:?}"),
                    );
                } else {
                    members.push(PathBuf::from(path));
                }
            }

            let mut routes = BTreeMap::new();
            let mut routed = HashSet::new();
            for (j, route) in raw.routes.iter().enumerate() {
                let f = |name: &str| field(&format!("routes[{j}].{name}"));
                let service_name = route.service.get_ref();
                let service = state.services.get(service_name);
                if service.is_none() {
                    self.error(
                        route.service.span(),
                        f("service"),
                        format!("unknown service {service_name:?}"),
                    );
                }
                if !routed.insert(service_name.clone()) {
                    self.error(
                        route.service.span(),
                        f("service"),
                        format!("sandbox {key:?} already routes service {service_name:?}"),
                    );
                }
                let Some(fork) = self.socket_addr(&route.fork, f("fork")) else {
                    continue;
                };
                if let Some(service) = service {
                    if service.address.is_ipv4() != fork.is_ipv4() {
                        self.error(
                            route.fork.span(),
                            f("fork"),
                            format!(
                                "fork {fork} and service {:?} ({}) must be the same IP family",
                                service.name, service.address
                            ),
                        );
                    }
                    routes.insert(service_name.clone(), fork);
                }
            }

            state.sandboxes.entry(key.clone()).or_insert(Sandbox {
                key,
                members,
                routes,
            });
        }
        state
    }

    fn socket_addr(&mut self, raw: &Spanned<String>, field: String) -> Option<SocketAddr> {
        match raw.get_ref().parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => {
                self.error(raw.span(), field, "port must not be 0");
                None
            }
            Ok(addr) if addr.ip().is_unspecified() => {
                self.error(
                    raw.span(),
                    field,
                    format!("{addr} is an unspecified address"),
                );
                None
            }
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    raw.span(),
                    field,
                    format!(
                        "{:?} is not an IP address and port (e.g. 10.96.0.10:8080 or [fd00::10]:8080)",
                        raw.get_ref()
                    ),
                );
                None
            }
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
cgroup = "/sys/fs/cgroup/kubepods"
bpffs = "/sys/fs/bpf/redirector"

[[service]]
name = "svc-a"
address = "10.96.0.10:8080"
protocol = "http"

[[service]]
name = "db"
address = "[fd00:96::20]:5432"

[[service]]
name = "dns"
address = "10.96.0.53:53"
protocol = "udp"

[[sandbox]]
key = "pr-123"
members = ["/run/netns/pod-a-fork"]
routes = [
  { service = "svc-a", fork = "10.0.1.7:8080" },
  { service = "db", fork = "[fd00:1::7]:5432" },
]
"#;

    fn errors(text: &str) -> Vec<FieldError> {
        parse(text).expect_err("config should be rejected")
    }

    #[test]
    fn parses_the_documented_example() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(
            config.daemon.cgroup.as_deref(),
            Some(Path::new("/sys/fs/cgroup/kubepods"))
        );
        assert_eq!(config.state.services.len(), 3);
        assert_eq!(config.state.services["db"].protocol, Protocol::Tcp);
        assert_eq!(config.state.services["svc-a"].protocol, Protocol::Http);
        let sandbox = &config.state.sandboxes["pr-123"];
        assert_eq!(sandbox.members, [PathBuf::from("/run/netns/pod-a-fork")]);
        assert_eq!(sandbox.routes["svc-a"], "10.0.1.7:8080".parse().unwrap());
        assert_eq!(config.state.route_count(), 2);
    }

    #[test]
    fn empty_file_is_an_empty_state() {
        let config = parse("").expect("valid");
        assert_eq!(config.state, DesiredState::default());
    }

    #[test]
    fn syntax_error_names_line() {
        let errs = errors("[[service]]\nname = \"a\"\naddress = 10.0.0.1:80\n");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 3, "{errs:?}");
    }

    #[test]
    fn unknown_field_is_rejected_with_its_line() {
        let errs = errors("[[service]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nport = 3\n");
        assert_eq!(errs[0].line, 4, "{errs:?}");
        assert!(errs[0].message.contains("port"), "{errs:?}");
    }

    #[test]
    fn unknown_protocol_is_rejected() {
        let errs =
            errors("[[service]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nprotocol = \"sctp\"\n");
        assert_eq!(errs[0].line, 4, "{errs:?}");
    }

    #[test]
    fn unknown_service_in_route_names_field_and_line() {
        let text = GOOD.replace("service = \"db\"", "service = \"nope\"");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "sandbox[0].routes[1].service");
        assert!(errs[0].message.contains("unknown service \"nope\""));
        let line = text.lines().position(|l| l.contains("\"nope\"")).unwrap() + 1;
        assert_eq!(errs[0].line, line);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[[service]]
name = "a"
address = "10.0.0.1"

[[service]]
name = "a"
address = "10.0.0.2:80"

[[service]]
name = "b"
address = "10.0.0.2:80"

[[sandbox]]
key = "bad key!"
routes = [{ service = "b", fork = "[fd00::1]:80" }]

[[sandbox]]
key = "ok"
members = ["relative/path"]
routes = [{ service = "b", fork = "0.0.0.0:80" }, { service = "b", fork = "10.1.1.1:0" }]
"#;
        let errs = errors(text);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "service[0].address",
                "service[1].name",
                "service[2].address",
                "sandbox[0].key",
                "sandbox[0].routes[0].fork",
                "sandbox[1].members[0]",
                "sandbox[1].routes[0].fork",
                "sandbox[1].routes[1].service",
                "sandbox[1].routes[1].fork",
            ],
            "{errs:#?}"
        );
    }

    #[test]
    fn duplicate_keys_and_shared_members_are_rejected() {
        let text = r#"
[[sandbox]]
key = "k"
members = ["/run/netns/p"]

[[sandbox]]
key = "k"

[[sandbox]]
key = "j"
members = ["/run/netns/p"]
"#;
        let errs = errors(text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].message.contains("duplicate sandbox key"));
        assert!(
            errs[1]
                .message
                .contains("already a member of sandbox \"k\"")
        );
    }

    #[test]
    fn invalid_display_lists_each_error_with_location() {
        let err = ConfigError::Invalid {
            path: PathBuf::from("r.toml"),
            errors: errors("[[sandbox]]\nkey = \"\"\n"),
        };
        let text = err.to_string();
        assert!(
            text.starts_with("invalid config r.toml (1 error)"),
            "{text}"
        );
        assert!(
            text.contains("r.toml:2:7: sandbox[0].key: routing key is empty"),
            "{text}"
        );
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
