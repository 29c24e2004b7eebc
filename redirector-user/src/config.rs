//! The config file (TOML): parsing and validation into a [`DesiredState`].
//!
//! A file is accepted whole or rejected whole. Validation does not stop at the first problem:
//! every error is reported with the file, line, column and field it concerns, so one run of
//! `redirector validate` shows everything to fix.
//!
//! [`load`] is the one way a file is read and judged: the daemon at start and on every reload,
//! and `redirector validate`, all call it, so they agree on every file. It refuses what is not a
//! regular file or is over [`MAX_BYTES`], a file with nothing in it, and a file that cannot
//! fit the kernel maps (counted before the file is built into values: the `outline` module).
//! The checks of the file's values, field by field, are in the `validate` module.
mod file;
mod outline;
mod validate;

use std::{
    fmt,
    net::SocketAddr,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use self::validate::Validator;
use crate::state::{DesiredState, ForkErrorPolicy, Protocol};

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/redirector";

pub const DEFAULT_KEY_NAME: &str = "sd-routing-key";
pub const DEFAULT_API_SOCKET: &str = "/run/redirector/api.sock";
pub const DEFAULT_STATE_FILE: &str = "/var/lib/redirector/state.json";

/// The most `router.accept_loops`: past the cores of large nodes, more listeners only add
/// queues to drain and descriptors to hold.
pub const MAX_ACCEPT_LOOPS: usize = 64;

/// One accept loop per CPU the daemon may run on (its affinity and cgroup CPU quota, as
/// `available_parallelism` reads them), at most [`MAX_ACCEPT_LOOPS`]; one if that cannot be
/// read.
pub fn default_accept_loops() -> NonZeroUsize {
    let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    NonZeroUsize::new(cpus.min(MAX_ACCEPT_LOOPS)).unwrap_or(NonZeroUsize::MIN)
}

/// Daemon settings from the `[daemon]` table; command-line flags override them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    /// cgroup v2 directory the programs attach to.
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    pub bpffs: Option<PathBuf>,
    /// Unix socket of the local API.
    pub api_socket: Option<PathBuf>,
    /// Where objects created through the API are kept across restarts.
    pub state_file: Option<PathBuf>,
    /// Prometheus text endpoint (`GET /metrics`); off when None.
    pub metrics_listen: Option<SocketAddr>,
}

/// Node router settings: `[daemon] router_listen` and the `[router]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterSettings {
    /// At most one address per IP family; empty: no router, HTTP services get L4 steering only.
    pub listen: Vec<SocketAddr>,
    /// Listening sockets per address, each with its own accept loop, so that accepting
    /// connections is spread over the cores (see `router::bind`).
    pub accept_loops: NonZeroUsize,
    /// Routing-key name looked for in the carriers (`baggage`, `tracestate`, `uberctx-*`,
    /// `ot-baggage-*`).
    pub key_name: String,
    /// Further headers whose whole value is the routing key, checked after the standard ones.
    pub extra_key_headers: Vec<http::HeaderName>,
    /// Response header naming the upstream that served the request (off when None).
    pub upstream_header: Option<http::HeaderName>,
    pub connect_timeout: Duration,
    /// From sending a request upstream to its response headers.
    pub request_timeout: Duration,
    /// How long an unused upstream connection stays pooled.
    pub idle_timeout: Duration,
    /// How long a client may take to send a request's headers (slow-drip guard). HTTP/1.1
    /// counts the wait for the next request on an idle keep-alive connection too, so this is
    /// also the idle timeout of client connections.
    pub header_read_timeout: Duration,
    /// Largest accepted request header block.
    pub max_header_bytes: usize,
    /// When the router starts, reset the pods' connections that went straight to a forked
    /// HTTP service while it was down (the daemon was stopped), so that they come back through
    /// it and their requests are routed again. Off by default: it aborts connections that work.
    pub reset_bypassed: bool,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            listen: Vec::new(),
            accept_loops: default_accept_loops(),
            key_name: DEFAULT_KEY_NAME.to_owned(),
            extra_key_headers: Vec::new(),
            upstream_header: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            reset_bypassed: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub daemon: DaemonSettings,
    pub router: RouterSettings,
    pub kubernetes: KubernetesSettings,
    pub state: DesiredState,
}

/// `[kubernetes]`: the node agent's Kubernetes source (off unless `enabled`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSettings {
    #[serde(default)]
    pub enabled: bool,
    /// None: in-cluster configuration, else `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (default: the `NODE_NAME` environment variable).
    pub node_name: Option<String>,
    /// Where pods' processes are found (default `/proc`; the host's, with `hostPID`).
    pub proc_root: Option<PathBuf>,
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

pub use file::MAX_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A FIFO would block the reader, a device could be read without end.
    #[error("config {path} is {kind}, not a regular file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("config {path} is {size} bytes, over the limit of {limit_mib} MiB")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit_mib: u64,
    },
    #[error("config {path} is not UTF-8 text")]
    NotText {
        path: PathBuf,
        #[source]
        source: std::string::FromUtf8Error,
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

/// Reads and validates the config file at `path`: what the daemon applies and what
/// `redirector validate` judges.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = String::from_utf8(read_file(path)?).map_err(|source| ConfigError::NotText {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|errors| ConfigError::Invalid {
        path: path.to_owned(),
        errors,
    })
}

/// The bytes of the config file at `path`, if it is a regular file (symlinks followed) of at
/// most [`MAX_BYTES`]; never blocks on a FIFO.
pub fn read_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    file::read(path)
}

// === raw file schema ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    router: RawRouter,
    #[serde(default)]
    kubernetes: KubernetesSettings,
    #[serde(default)]
    service: Vec<RawService>,
    #[serde(default)]
    sandbox: Vec<RawSandbox>,
    #[serde(default)]
    group: Vec<RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    key: Spanned<String>,
    #[serde(default)]
    sandboxes: Vec<Spanned<String>>,
    #[serde(default)]
    members: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    cgroup: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    api_socket: Option<PathBuf>,
    state_file: Option<PathBuf>,
    metrics_listen: Option<Spanned<String>>,
    /// One address or a list (untagged enums lose spans in toml, hence the raw value).
    router_listen: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    accept_loops: Option<Spanned<u64>>,
    key_name: Option<Spanned<String>>,
    #[serde(default)]
    extra_key_headers: Vec<Spanned<String>>,
    upstream_header: Option<Spanned<String>>,
    connect_timeout_ms: Option<Spanned<u64>>,
    request_timeout_ms: Option<Spanned<u64>>,
    idle_timeout_ms: Option<Spanned<u64>>,
    header_read_timeout_ms: Option<Spanned<u64>>,
    max_header_bytes: Option<Spanned<u64>>,
    /// At start, reset the connections that went straight to HTTP services while the router
    /// was down.
    #[serde(default)]
    reset_bypassed: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    address: Spanned<String>,
    protocol: Option<Spanned<Protocol>>,
    /// Where requests may carry the routing key: "header", "query", "cookie" (HTTP only).
    key_from: Option<Spanned<Vec<Spanned<String>>>>,
    /// Hand a key that came by query parameter back as a cookie.
    set_cookie: Option<Spanned<bool>>,
    /// Seconds, or a duration such as "1h" (seconds or a string, hence the raw value).
    cookie_max_age: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    key: Spanned<String>,
    #[serde(default)]
    members: Vec<Spanned<String>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
    /// Route members' requests that carry no key as this sandbox's, adding the key.
    #[serde(default)]
    inject_key: bool,
}

/// A route names its fork's endpoints with exactly one of `fork` and `forks`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    service: Spanned<String>,
    /// One endpoint: the form from before routes took several, kept for existing files.
    fork: Option<Spanned<String>>,
    forks: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    on_fork_error: ForkErrorPolicy,
    /// Reset the member sockets the route steered when it changes (TCP services only).
    reset_on_change: Option<Spanned<bool>>,
}

// === validation ===

/// Parses and validates config text; on failure returns every problem found.
///
/// A text with no table and no key at all (empty, or only comments and whitespace) is refused:
/// a file truncated or caught half-written looks just like it, and applying it would remove
/// every sandbox. A file that means "nothing" says so with a table, e.g. an empty `[daemon]`.
pub fn parse(text: &str) -> Result<Config, Vec<FieldError>> {
    parse_with(text, false)
}

/// Parses a fragment for `redirector apply`: its routes and groups may name services and
/// sandboxes the daemon already has, so references are checked by the daemon against the whole
/// state, not here. Everything else is checked as for a config file.
pub fn parse_fragment(text: &str) -> Result<DesiredState, Vec<FieldError>> {
    parse_with(text, true).map(|config| config.state)
}

fn parse_with(text: &str, fragment: bool) -> Result<Config, Vec<FieldError>> {
    // Before the full parse: it costs far more memory than the text, and a file over capacity
    // is refused without paying it. A malformed text gets its syntax error from the full parse.
    let outline = outline::scan(text);
    if !outline.malformed {
        let mut errors = outline.over_capacity(|at| line_col(text, at));
        if outline.items == 0 && !fragment {
            errors.push(FieldError {
                line: 1,
                column: 1,
                field: "file".to_owned(),
                message: "has no tables or keys, only comments or whitespace: refused, as a \
                          truncated or half-written file looks the same; to run without \
                          services and sandboxes, write an empty `[daemon]` table"
                    .to_owned(),
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
    }
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
        fragment,
    };
    let mut state = v.state(raw.service, raw.sandbox);
    v.groups(&mut state, raw.group);
    if v.errors.is_empty() {
        // Exact, now that groups' copies of their sandboxes' routes can be counted.
        v.errors.extend(outline::check_entries(&state));
    }
    if v.errors.is_empty()
        && !fragment
        && let Err(issues) = state.validate()
    {
        // Every rule is checked above with its location; this is the safety net for one that
        // is not, reported without a line rather than not at all.
        for issue in issues {
            v.errors.push(FieldError {
                line: 1,
                column: 1,
                field: issue.field,
                message: issue.message,
            });
        }
    }
    let router = v.router(raw.daemon.router_listen, raw.router);
    let metrics_listen = raw
        .daemon
        .metrics_listen
        .as_ref()
        .and_then(|addr| v.socket_addr_any(addr, "daemon.metrics_listen".to_owned()));
    if v.errors.is_empty() {
        Ok(Config {
            daemon: DaemonSettings {
                cgroup: raw.daemon.cgroup,
                bpffs: raw.daemon.bpffs,
                api_socket: raw.daemon.api_socket,
                state_file: raw.daemon.state_file,
                metrics_listen,
            },
            router,
            kubernetes: raw.kubernetes,
            state,
        })
    } else {
        v.errors.sort_by_key(|e| (e.line, e.column));
        Err(v.errors)
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
    use crate::routing_key::{self, KeySources};

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
        assert_eq!(
            sandbox.routes["svc-a"].forks,
            ["10.0.1.7:8080".parse().unwrap()]
        );
        assert_eq!(
            sandbox.routes["svc-a"].on_fork_error,
            ForkErrorPolicy::Error
        );
        assert_eq!(config.state.route_count(), 2);
    }

    #[test]
    fn inject_key_is_per_sandbox_and_off_by_default() {
        let config = parse(
            r#"
[[service]]
name = "web"
address = "10.96.0.10:8080"
protocol = "http"

[[sandbox]]
key = "pr-1"
members = ["/run/netns/a"]
inject_key = true
routes = [{ service = "web", fork = "10.0.0.7:8080" }]

[[sandbox]]
key = "pr-2"
routes = [{ service = "web", fork = "10.0.0.8:8080" }]
"#,
        )
        .expect("valid");
        assert!(config.state.sandboxes["pr-1"].inject_key);
        assert!(!config.state.sandboxes["pr-2"].inject_key);
        assert!(!parse(GOOD).unwrap().state.sandboxes["pr-123"].inject_key);
    }

    #[test]
    fn inject_key_must_be_a_boolean() {
        let errs = errors("[[sandbox]]\nkey = \"pr-1\"\ninject_key = \"yes\"\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].message.contains("bool"), "{errs:?}");
        assert_eq!(errs[0].line, 3, "{errs:?}");
    }

    #[test]
    fn router_settings_parse_with_defaults() {
        let config = parse(
            r#"
[daemon]
router_listen = ["10.200.0.1:15001", "[fd00:200::1]:15001"]

[router]
key_name = "My-Key"
extra_key_headers = ["x-sandbox"]
upstream_header = "x-redirector-upstream"
connect_timeout_ms = 500
reset_bypassed = true
accept_loops = 3
"#,
        )
        .expect("valid");
        let router = config.router;
        assert_eq!(router.accept_loops.get(), 3);
        assert!(router.reset_bypassed);
        assert!(!RouterSettings::default().reset_bypassed, "off by default");
        assert_eq!(router.listen.len(), 2);
        assert_eq!(router.key_name, "My-Key");
        assert_eq!(router.extra_key_headers[0], "x-sandbox");
        assert_eq!(router.upstream_header.unwrap(), "x-redirector-upstream");
        assert_eq!(router.connect_timeout, Duration::from_millis(500));
        assert_eq!(
            router.request_timeout,
            RouterSettings::default().request_timeout
        );

        let single = parse("[daemon]\nrouter_listen = \"10.200.0.1:15001\"\n").expect("valid");
        assert_eq!(single.router.listen, ["10.200.0.1:15001".parse().unwrap()]);
        assert_eq!(
            parse("[daemon]\n").unwrap().router,
            RouterSettings::default()
        );
    }

    #[test]
    fn accept_loops_default_to_the_cpus_the_daemon_may_use() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let default = parse("[router]\n").expect("valid").router.accept_loops;
        assert_eq!(default.get(), cpus.min(MAX_ACCEPT_LOOPS));
        assert_eq!(default, RouterSettings::default().accept_loops);
        for n in [1, MAX_ACCEPT_LOOPS] {
            let text = format!("[router]\naccept_loops = {n}\n");
            assert_eq!(parse(&text).expect("valid").router.accept_loops.get(), n);
        }
    }

    #[test]
    fn accept_loops_out_of_range_are_located() {
        for value in ["0", "65", "4294967296", "9223372036854775807"] {
            let text = format!("[daemon]\n[router]\nkey_name = \"k\"\naccept_loops = {value}\n");
            assert_eq!(
                located(&text),
                [(
                    4,
                    16,
                    "router.accept_loops".to_owned(),
                    format!("must be between 1 and {MAX_ACCEPT_LOOPS}")
                )],
                "{value}"
            );
        }
        // Not a count at all: the parser's own message, at the value.
        for value in ["-1", "\"4\"", "2.5"] {
            let text = format!("[router]\naccept_loops = {value}\n");
            let errs = errors(&text);
            assert_eq!(errs.len(), 1, "{value}: {errs:?}");
            assert_eq!((errs[0].line, errs[0].column), (2, 16), "{value}: {errs:?}");
        }
    }

    #[test]
    fn bad_router_settings_are_located() {
        let errs = errors(
            r#"[daemon]
router_listen = ["10.0.0.1:1", "10.0.0.2:2", "0.0.0.0:3"]
[router]
key_name = "a b"
extra_key_headers = ["bad header"]
connect_timeout_ms = 0
max_header_bytes = 10
"#,
        );
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "daemon.router_listen[1]",
                "daemon.router_listen[2]",
                "router.key_name",
                "router.extra_key_headers[0]",
                "router.connect_timeout_ms",
                "router.max_header_bytes",
            ],
            "{errs:#?}"
        );
    }

    #[test]
    fn fork_error_policy_parses() {
        let text = GOOD.replace(
            "{ service = \"svc-a\", fork = \"10.0.1.7:8080\" }",
            "{ service = \"svc-a\", fork = \"10.0.1.7:8080\", on_fork_error = \"baseline\" }",
        );
        let config = parse(&text).expect("valid");
        assert_eq!(
            config.state.sandboxes["pr-123"].routes["svc-a"].on_fork_error,
            ForkErrorPolicy::Baseline
        );
        let bad = text.replace("\"baseline\" }", "\"retry\" }");
        assert_eq!(errors(&bad).len(), 1);
    }

    #[test]
    fn reset_on_change_is_per_route_and_off_by_default() {
        let text = GOOD.replace(
            "{ service = \"svc-a\", fork = \"10.0.1.7:8080\" }",
            "{ service = \"svc-a\", fork = \"10.0.1.7:8080\", reset_on_change = true }",
        );
        let config = parse(&text).expect("valid");
        let routes = &config.state.sandboxes["pr-123"].routes;
        assert!(routes["svc-a"].reset_on_change);
        assert!(!routes["db"].reset_on_change, "absent: off");
        let off = text.replace("reset_on_change = true", "reset_on_change = false");
        assert_eq!(parse(&off).expect("valid"), parse(GOOD).expect("valid"));
    }

    #[test]
    fn reset_on_change_must_be_a_boolean() {
        let text = GOOD.replace(
            "{ service = \"db\", fork = \"[fd00:1::7]:5432\" }",
            "{ service = \"db\", fork = \"[fd00:1::7]:5432\",\n    reset_on_change = \"yes\" }",
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].message.contains("bool"), "{errs:?}");
        assert_eq!(errs[0].line, at(&text, "reset_on_change").0, "{errs:?}");
    }

    #[test]
    fn reset_on_change_is_refused_on_udp_services_with_its_location() {
        let text = GOOD.replace(
            "  { service = \"db\"",
            "  { service = \"dns\", fork = \"10.0.1.53:53\", reset_on_change = true },\n  { service = \"db\"",
        );
        let (line, column) = at(&text, "true }");
        assert_eq!(
            located(&text),
            [(
                line,
                column,
                "sandbox[0].routes[1].reset_on_change".to_owned(),
                "reset_on_change resets TCP connections; service \"dns\" is UDP".to_owned()
            )]
        );
        // Off, or on a TCP service, it is fine.
        assert!(parse(&text.replace("reset_on_change = true", "reset_on_change = false")).is_ok());
        // A fragment is checked where the service is known; the daemon checks the rest against
        // its whole state (`DesiredState::validate`).
        let fragment = format!(
            "{}\n[[sandbox]]\nkey = \"pr-9\"\nroutes = [{{ service = \"elsewhere\", fork = \"10.0.0.1:53\", reset_on_change = true }}]\n",
            "[[service]]\nname = \"dns\"\naddress = \"10.96.0.53:53\"\nprotocol = \"udp\"\n"
        );
        let state = parse_fragment(&fragment).expect("fragment");
        assert!(state.sandboxes["pr-9"].routes["elsewhere"].reset_on_change);
        let errs = parse_fragment(&fragment.replace("\"elsewhere\"", "\"dns\"")).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "sandbox[0].routes[0].reset_on_change");
    }

    #[test]
    fn groups_parse_and_conflicts_are_located() {
        let text = r#"
[[service]]
name = "a"
address = "10.96.0.1:80"

[[service]]
name = "b"
address = "10.96.0.2:80"

[[sandbox]]
key = "pr-1"
routes = [{ service = "a", fork = "10.0.0.1:80" }]

[[sandbox]]
key = "pr-2"
routes = [{ service = "b", fork = "10.0.0.2:80" }]

[[sandbox]]
key = "pr-3"
routes = [{ service = "a", fork = "10.0.0.3:80" }]

[[group]]
key = "pr-1-and-2"
sandboxes = ["pr-1", "pr-2"]
members = ["/run/netns/tester"]
"#;
        let config = parse(text).expect("valid");
        assert_eq!(
            config.state.groups["pr-1-and-2"].sandboxes,
            ["pr-1", "pr-2"]
        );

        let bad =
            format!("{text}\n[[group]]\nkey = \"x\"\nsandboxes = [\"pr-1\", \"pr-3\", \"pr-9\"]\n");
        let errs = errors(&bad);
        let line = bad.lines().count();
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert_eq!(
            (errs[0].field.as_str(), errs[0].line),
            ("group[1].sandboxes[1]", line)
        );
        assert!(
            errs[0].message.contains("both fork service \"a\""),
            "{errs:?}"
        );
        assert_eq!(errs[1].message, "unknown sandbox \"pr-9\"");
    }

    #[test]
    fn fragments_may_reference_what_the_daemon_has() {
        let text = "[[sandbox]]\nkey = \"pr-9\"\nroutes = [{ service = \"elsewhere\", fork = \"10.0.0.1:80\" }]\n\n[[group]]\nkey = \"g\"\nsandboxes = [\"pr-9\", \"other\"]\n";
        assert!(parse(text).is_err());
        let state = parse_fragment(text).expect("fragment");
        assert_eq!(
            state.sandboxes["pr-9"].routes["elsewhere"].forks,
            ["10.0.0.1:80".parse().unwrap()]
        );
        assert_eq!(state.groups["g"].sandboxes, ["pr-9", "other"]);
        // Malformed values are still caught.
        assert!(parse_fragment("[[sandbox]]\nkey = \"bad key\"\n").is_err());
    }

    /// GOOD with svc-a's route replaced by `route` (an inline table's fields).
    fn with_svc_a_route(route: &str) -> String {
        GOOD.replace(
            "{ service = \"svc-a\", fork = \"10.0.1.7:8080\" }",
            &format!("{{ service = \"svc-a\", {route} }}"),
        )
    }

    #[test]
    fn a_route_takes_one_fork_or_a_set_of_forks() {
        let text = with_svc_a_route(
            r#"forks = ["10.0.1.9:8080", "10.0.1.7:8080", "10.0.1.8:8080"], on_fork_error = "baseline""#,
        );
        let config = parse(&text).expect("valid");
        let route = &config.state.sandboxes["pr-123"].routes["svc-a"];
        let sorted: Vec<SocketAddr> = ["10.0.1.7:8080", "10.0.1.8:8080", "10.0.1.9:8080"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(route.forks, sorted, "a set, in sorted order");
        assert_eq!(route.on_fork_error, ForkErrorPolicy::Baseline);
        // `fork = "..."` and `forks = ["..."]` are the same route.
        let one = parse(&with_svc_a_route(r#"forks = ["10.0.1.7:8080"]"#)).expect("valid");
        assert_eq!(one, parse(GOOD).expect("valid"));
    }

    /// (line, column, field, message) of each error.
    fn located(text: &str) -> Vec<(usize, usize, String, String)> {
        errors(text)
            .into_iter()
            .map(|e| (e.line, e.column, e.field, e.message))
            .collect()
    }

    /// Line and 1-based column of the first occurrence of `needle` in `text`.
    fn at(text: &str, needle: &str) -> (usize, usize) {
        line_col(text, text.find(needle).expect("needle in text"))
    }

    #[test]
    fn bad_fork_sets_are_located() {
        let cases = [
            (
                r#"fork = "10.0.1.7:8080", forks = ["10.0.1.8:8080"]"#,
                "[\"10.0.1.8",
                "sandbox[0].routes[0].forks",
                "give either `fork` or `forks`, not both",
            ),
            (
                r#"on_fork_error = "baseline""#,
                "{ service = \"svc-a\"",
                "sandbox[0].routes[0]",
                "a route needs its fork's endpoints: `fork = \"ADDR:PORT\"` or `forks = [\"ADDR:PORT\", ...]`",
            ),
            (
                "forks = []",
                "[]",
                "sandbox[0].routes[0].forks",
                "must list at least one endpoint",
            ),
            (
                r#"forks = ["10.0.1.7:8080", "10.0.1.8:8080", "10.0.1.7:8080"]"#,
                "\"10.0.1.7:8080\" ]",
                "sandbox[0].routes[0].forks[2]",
                "10.0.1.7:8080 is listed twice",
            ),
            (
                r#"forks = ["10.0.1.7:8080", "10.0.1.8"]"#,
                "\"10.0.1.8\"",
                "sandbox[0].routes[0].forks[1]",
                "\"10.0.1.8\" is not an IP address and port (e.g. 10.96.0.10:8080 or [fd00::10]:8080)",
            ),
            (
                r#"forks = ["10.0.1.7:8080", "[fd00::8]:8080"]"#,
                "\"[fd00::8]",
                "sandbox[0].routes[0].forks[1]",
                "fork [fd00::8]:8080 and service \"svc-a\" (10.96.0.10:8080) must be the same IP family",
            ),
        ];
        for (route, needle, field, message) in cases {
            // The duplicate case's needle needs the closing bracket to find the second copy.
            let text = with_svc_a_route(route).replace("7:8080\"]", "7:8080\" ]");
            let (line, column) = at(&text, needle);
            assert_eq!(
                located(&text),
                [(line, column, field.to_owned(), message.to_owned())],
                "{route}"
            );
        }
    }

    /// GOOD with `lines` added to svc-a's service table (protocol http).
    fn with_svc_a_lines(lines: &str) -> String {
        GOOD.replace(
            "protocol = \"http\"\n",
            &format!("protocol = \"http\"\n{lines}\n"),
        )
    }

    #[test]
    fn key_from_and_the_cookie_parse_with_defaults() {
        let sources = |lines: &str| {
            let config = parse(&with_svc_a_lines(lines)).expect("valid");
            config.state.key_sources.get("svc-a").copied()
        };
        // Not said, or said as the default: nothing stored, headers only.
        assert_eq!(sources(""), None);
        assert_eq!(sources("key_from = [\"header\"]"), None);
        assert_eq!(sources("key_from = [\"header\"]\nset_cookie = false"), None);
        let query = KeySources {
            query: true,
            ..KeySources::default()
        };
        assert_eq!(sources("key_from = [\"header\", \"query\"]"), Some(query));
        // Precedence is fixed, whatever the order of the list.
        assert_eq!(
            sources("key_from = [\"cookie\", \"query\", \"header\"]"),
            Some(KeySources {
                cookie: true,
                ..query
            })
        );
        assert_eq!(
            sources("key_from = [\"query\"]"),
            Some(KeySources {
                header: false,
                ..query
            })
        );
        let hour = Duration::from_secs(3600);
        for (age, expected) in [
            ("", routing_key::DEFAULT_COOKIE_MAX_AGE),
            ("cookie_max_age = 90", Duration::from_secs(90)),
            ("cookie_max_age = \"1h\"", hour),
            ("cookie_max_age = \"PT1H\"", hour),
            (
                "cookie_max_age = \"1h 30m\"",
                hour + Duration::from_secs(1800),
            ),
            ("cookie_max_age = \"30 minutes\"", Duration::from_secs(1800)),
            (
                "cookie_max_age = \"9600h\"",
                Duration::from_secs(9600 * 3600),
            ),
        ] {
            assert_eq!(
                sources(&format!(
                    "key_from = [\"header\", \"query\", \"cookie\"]\nset_cookie = true\n{age}"
                )),
                Some(KeySources {
                    header: true,
                    query: true,
                    cookie: true,
                    set_cookie: Some(expected),
                }),
                "{age}"
            );
        }
    }

    #[test]
    fn bad_key_from_and_cookie_settings_are_located() {
        let cases = [
            (
                "key_from = []",
                "[]",
                "service[0].key_from",
                "must list at least one of \"header\", \"query\", \"cookie\"",
            ),
            (
                "key_from = [\"header\", \"form\"]",
                "\"form\"",
                "service[0].key_from[1]",
                "\"form\" is not a key carrier: use \"header\", \"query\" or \"cookie\"",
            ),
            (
                "key_from = [\"Query\"]",
                "\"Query\"",
                "service[0].key_from[0]",
                "\"Query\" is not a key carrier: use \"header\", \"query\" or \"cookie\"",
            ),
            (
                "key_from = [\"query\", \"header\", \"query\"]",
                "\"query\"]",
                "service[0].key_from[2]",
                "\"query\" is listed twice",
            ),
            (
                "set_cookie = true",
                "true",
                "service[0].set_cookie",
                "the cookie is set when the key arrives by query parameter: add \"query\" to key_from",
            ),
            (
                "key_from = [\"header\", \"cookie\"]\nset_cookie = true",
                "true",
                "service[0].set_cookie",
                "the cookie is set when the key arrives by query parameter: add \"query\" to key_from",
            ),
            (
                "key_from = [\"query\"]\ncookie_max_age = 60",
                "60",
                "service[0].cookie_max_age",
                "takes effect only with set_cookie = true",
            ),
            (
                "key_from = [\"query\"]\nset_cookie = true\ncookie_max_age = 0",
                "0",
                "service[0].cookie_max_age",
                "must be between 1 second and 400 days",
            ),
            (
                "key_from = [\"query\"]\nset_cookie = true\ncookie_max_age = -5",
                "-5",
                "service[0].cookie_max_age",
                "must be between 1 second and 400 days",
            ),
            (
                "key_from = [\"query\"]\nset_cookie = true\ncookie_max_age = \"9601h\"",
                "\"9601h\"",
                "service[0].cookie_max_age",
                "must be between 1 second and 400 days",
            ),
            (
                "key_from = [\"query\"]\nset_cookie = true\ncookie_max_age = \"1.5s\"",
                "\"1.5s\"",
                "service[0].cookie_max_age",
                "must be whole seconds (e.g. 3600) or a duration such as \"1h\", \"30m\" or \"90s\"",
            ),
            (
                "key_from = [\"query\"]\nset_cookie = true\ncookie_max_age = \"a while\"",
                "\"a while\"",
                "service[0].cookie_max_age",
                "must be whole seconds (e.g. 3600) or a duration such as \"1h\", \"30m\" or \"90s\"",
            ),
            (
                "key_from = [\"query\"]\nset_cookie = true\ncookie_max_age = 1.5",
                "1.5",
                "service[0].cookie_max_age",
                "must be whole seconds (e.g. 3600) or a duration such as \"1h\", \"30m\" or \"90s\"",
            ),
        ];
        for (lines, needle, field, message) in cases {
            let text = with_svc_a_lines(lines);
            // The needle's last occurrence in the added lines: `"query"]` of the repeat case.
            let offset = text.find(lines).unwrap() + lines.rfind(needle).expect("needle");
            let (line, column) = line_col(&text, offset);
            assert_eq!(
                located(&text),
                [(line, column, field.to_owned(), message.to_owned())],
                "{lines}"
            );
        }
    }

    #[test]
    fn key_from_is_for_http_services_and_config_files_only() {
        let text = GOOD.replace(
            "address = \"[fd00:96::20]:5432\"\n",
            "address = \"[fd00:96::20]:5432\"\nset_cookie = true\nkey_from = [\"query\"]\n",
        );
        let (line, column) = at(&text, "true\nkey_from");
        assert_eq!(
            located(&text),
            [(
                line,
                column,
                "service[1].set_cookie".to_owned(),
                "only HTTP services carry the key in requests: set protocol = \"http\"".to_owned()
            )]
        );
        let fragment = "[[service]]\nname = \"web\"\naddress = \"10.96.0.9:80\"\nprotocol = \"http\"\nkey_from = [\"header\", \"query\"]\n";
        let errs = parse_fragment(fragment).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            (
                errs[0].line,
                errs[0].field.as_str(),
                errs[0].message.as_str()
            ),
            (
                5,
                "service[0].key_from",
                "is read from the config file only; `redirector apply` cannot set it"
            )
        );
        // Reported together with the service's other problems.
        let both =
            with_svc_a_lines("key_from = [\"nope\"]").replace("10.96.0.10:8080", "10.96.0.10");
        let fields: Vec<String> = errors(&both).into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "service[0].address",
                "service[0].key_from[0]",
                // svc-a is not declared without its address.
                "sandbox[0].routes[0].service"
            ]
        );
    }

    #[test]
    fn a_file_with_nothing_in_it_is_refused_and_says_how_to_mean_nothing() {
        for text in ["", "\n  \n", "# all commented out\n# [[sandbox]]\n"] {
            let errs = errors(text);
            assert_eq!(errs.len(), 1, "{text:?}: {errs:?}");
            assert_eq!((errs[0].line, errs[0].column), (1, 1));
            assert_eq!(errs[0].field, "file");
            assert!(
                errs[0].message.contains("empty `[daemon]` table"),
                "{errs:?}"
            );
        }
        // What the message suggests: a valid, empty state.
        let config = parse("# nothing here on purpose\n[daemon]\n").expect("valid");
        assert_eq!(config.state, DesiredState::default());
        // A fragment for `redirector apply` may be empty: it changes nothing.
        assert_eq!(parse_fragment("").unwrap(), DesiredState::default());
    }

    /// A file of `routes` compact routes over 1000 services, 1000 routes per sandbox.
    fn many_routes(routes: usize) -> String {
        let services = 1000;
        let mut text = String::new();
        for s in 0..services {
            text.push_str(&format!(
                "[[service]]\nname = \"s{s}\"\naddress = \"10.96.{}.{}:80\"\n",
                s / 250,
                s % 250 + 1
            ));
        }
        let mut written = 0;
        let mut box_index = 0;
        while written < routes {
            let n = services.min(routes - written);
            text.push_str(&format!("[[sandbox]]\nkey = \"b{box_index}\"\nroutes = ["));
            for s in 0..n {
                text.push_str(&format!("{{service=\"s{s}\",fork=\"10.0.0.1:80\"}},"));
            }
            text.push_str("]\n");
            written += n;
            box_index += 1;
        }
        text
    }

    #[test]
    fn a_file_over_route_capacity_is_refused_with_the_route_that_does_not_fit() {
        let capacity = redirector_common::map_sizes::ROUTES as usize;
        assert!(parse(&many_routes(capacity)).is_ok(), "exactly full fits");
        let text = many_routes(capacity + 1);
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        // The last route of the last sandbox is the one past capacity.
        let last = text.rfind("{service=").unwrap();
        assert_eq!((errs[0].line, errs[0].column), line_col(&text, last));
        assert_eq!(errs[0].field, "sandbox.routes");
        assert_eq!(
            errs[0].message,
            format!(
                "map routes is full: the sandboxes have {} routes, the capacity is {capacity}",
                capacity + 1
            )
        );
    }

    #[test]
    fn routes_that_groups_repeat_count_against_capacity() {
        let capacity = redirector_common::map_sizes::ROUTES as usize;
        // Sandboxes fill 3/4 of the map; a group over the first half of them repeats their
        // routes: 1.25 times the capacity in all.
        let mut text = many_routes(capacity / 4 * 3);
        let boxes = text.matches("[[sandbox]]").count();
        let half: Vec<String> = (0..boxes / 2).map(|b| format!("\"b{b}\"")).collect();
        // Two sandboxes that fork the same service cannot share a group: one group each.
        for (g, key) in half.iter().enumerate() {
            text.push_str(&format!("[[group]]\nkey = \"g{g}\"\nsandboxes = [{key}]\n"));
        }
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "routes");
        assert!(
            errs[0]
                .message
                .starts_with("map routes is full: the file needs ")
                && errs[0]
                    .message
                    .ends_with(&format!("the capacity is {capacity}")),
            "{errs:?}"
        );
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
