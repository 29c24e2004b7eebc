//! Validation of the raw file schema: turns what serde read into a [`DesiredState`] and
//! [`RouterSettings`], recording every problem with its location instead of stopping at the
//! first.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    num::NonZeroUsize,
    ops::Range,
    path::PathBuf,
    time::Duration,
};

use toml::Spanned;

use super::{
    FieldError, MAX_ACCEPT_LOOPS, RawGroup, RawRoute, RawRouter, RawSandbox, RawService,
    RouterSettings, line_col,
};
use crate::{
    routing_key::{self, DEFAULT_COOKIE_MAX_AGE, KeyFrom, KeySources},
    state::{DesiredState, Group, Protocol, Route, Sandbox, Service},
};

/// Browsers cap a cookie's lifetime at 400 days (RFC 6265bis).
const MAX_COOKIE_MAX_AGE: Duration = Duration::from_secs(400 * 24 * 3600);

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) errors: Vec<FieldError>,
    /// Unresolved references are the daemon's to check (see [`parse_fragment`](super::parse_fragment)).
    pub(super) fragment: bool,
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

    pub(super) fn state(
        &mut self,
        services: Vec<RawService>,
        sandboxes: Vec<RawSandbox>,
    ) -> DesiredState {
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
            let protocol = raw
                .protocol
                .as_ref()
                .map(|p| *p.get_ref())
                .unwrap_or(Protocol::Tcp);
            let sources = self.key_sources(&raw, i, protocol);
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
            if let Some(sources) = sources
                && !state.services.contains_key(&name)
                && sources != KeySources::default()
            {
                state.key_sources.insert(name.clone(), sources);
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
            for (j, spanned) in raw.routes.iter().enumerate() {
                let route = spanned.get_ref();
                let f = |name: &str| field(&format!("routes[{j}].{name}"));
                let service_name = route.service.get_ref();
                let service = state.services.get(service_name);
                if service.is_none() && !self.fragment {
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
                let reset_on_change = route.reset_on_change.as_ref();
                if let (Some(flag), Some(service)) = (reset_on_change, service)
                    && let Some(message) = service.reset_on_change_refusal(*flag.get_ref())
                {
                    self.error(flag.span(), f("reset_on_change"), message);
                }
                let Some(forks) =
                    self.route_forks(spanned, &field(&format!("routes[{j}]")), service)
                else {
                    continue;
                };
                if service.is_some() || self.fragment {
                    routes.insert(
                        service_name.clone(),
                        Route {
                            forks,
                            on_fork_error: route.on_fork_error,
                            reset_on_change: reset_on_change.is_some_and(|flag| *flag.get_ref()),
                        },
                    );
                }
            }

            state.sandboxes.entry(key.clone()).or_insert(Sandbox {
                key,
                members,
                routes,
                inject_key: raw.inject_key,
            });
        }
        state
    }

    /// A service's `key_from`, `set_cookie` and `cookie_max_age` (of `service[i]`); None after
    /// reporting why not.
    fn key_sources(
        &mut self,
        raw: &RawService,
        i: usize,
        protocol: Protocol,
    ) -> Option<KeySources> {
        let field = |f: &str| format!("service[{i}].{f}");
        let first = [
            raw.key_from.as_ref().map(|k| (k.span(), "key_from")),
            raw.set_cookie.as_ref().map(|c| (c.span(), "set_cookie")),
            raw.cookie_max_age
                .as_ref()
                .map(|a| (a.span(), "cookie_max_age")),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(span, _)| span.start);
        let Some((span, name)) = first else {
            return Some(KeySources::default());
        };
        if self.fragment {
            // The API's service objects do not carry these (yet): refused, not dropped.
            self.error(
                span,
                field(name),
                "is read from the config file only; `redirector apply` cannot set it",
            );
            return None;
        }
        if protocol != Protocol::Http {
            self.error(
                span,
                field(name),
                "only HTTP services carry the key in requests: set protocol = \"http\"",
            );
            return None;
        }
        let mut valid = true;
        let mut sources = KeySources {
            header: false,
            ..KeySources::default()
        };
        match &raw.key_from {
            None => sources = KeySources::default(),
            Some(list) if list.get_ref().is_empty() => {
                self.error(
                    list.span(),
                    field("key_from"),
                    "must list at least one of \"header\", \"query\", \"cookie\"",
                );
                valid = false;
            }
            Some(list) => {
                for (j, entry) in list.get_ref().iter().enumerate() {
                    let f = field(&format!("key_from[{j}]"));
                    match KeyFrom::from_name(entry.get_ref()) {
                        None => {
                            self.error(
                                entry.span(),
                                f,
                                format!(
                                    "{:?} is not a key carrier: use \"header\", \"query\" or \"cookie\"",
                                    entry.get_ref()
                                ),
                            );
                            valid = false;
                        }
                        Some(from) if sources.takes(from) => {
                            self.error(
                                entry.span(),
                                f,
                                format!("{:?} is listed twice", entry.get_ref()),
                            );
                            valid = false;
                        }
                        Some(KeyFrom::Header) => sources.header = true,
                        Some(KeyFrom::Query) => sources.query = true,
                        Some(KeyFrom::Cookie) => sources.cookie = true,
                    }
                }
            }
        }
        let max_age = match &raw.cookie_max_age {
            None => Some(DEFAULT_COOKIE_MAX_AGE),
            Some(age) => self.cookie_max_age(age, field("cookie_max_age")),
        };
        valid &= max_age.is_some();
        match raw.set_cookie.as_ref().map(|c| (c.span(), *c.get_ref())) {
            Some((span, true)) if valid && !sources.query => {
                self.error(
                    span,
                    field("set_cookie"),
                    "the cookie is set when the key arrives by query parameter: add \"query\" to key_from",
                );
                valid = false;
            }
            Some((_, true)) => sources.set_cookie = max_age,
            Some((_, false)) | None => {
                if let Some(age) = &raw.cookie_max_age {
                    self.error(
                        age.span(),
                        field("cookie_max_age"),
                        "takes effect only with set_cookie = true",
                    );
                    valid = false;
                }
            }
        }
        valid.then_some(sources)
    }

    /// `cookie_max_age`: whole seconds (an integer, or a duration such as "1h", "30m", "90s"
    /// or "PT1H"), from 1 second to 400 days.
    fn cookie_max_age(&mut self, raw: &Spanned<toml::Value>, field: String) -> Option<Duration> {
        let parsed = match raw.get_ref() {
            // Zero or less: out of range, said below.
            toml::Value::Integer(secs) => {
                Some(Duration::from_secs(u64::try_from(*secs).unwrap_or(0)))
            }
            toml::Value::String(text) => text
                .parse::<jiff::SignedDuration>()
                .ok()
                .filter(|d| d.subsec_nanos() == 0)
                .and_then(|d| Duration::try_from(d).ok()),
            _ => None,
        };
        match parsed {
            Some(age) if !age.is_zero() && age <= MAX_COOKIE_MAX_AGE => Some(age),
            Some(_) => {
                self.error(raw.span(), field, "must be between 1 second and 400 days");
                None
            }
            None => {
                self.error(
                    raw.span(),
                    field,
                    "must be whole seconds (e.g. 3600) or a duration such as \"1h\", \"30m\" or \"90s\"",
                );
                None
            }
        }
    }

    /// The endpoints of a route's `fork` or `forks`, sorted; None after reporting why not.
    /// `field` names the route, e.g. `sandbox[0].routes[1]`.
    fn route_forks(
        &mut self,
        route: &Spanned<RawRoute>,
        field: &str,
        service: Option<&Service>,
    ) -> Option<Vec<SocketAddr>> {
        let raw = route.get_ref();
        let listed: Vec<(&Spanned<String>, String)> = match (&raw.fork, &raw.forks) {
            (Some(_), Some(forks)) => {
                self.error(
                    forks.span(),
                    format!("{field}.forks"),
                    "give either `fork` or `forks`, not both",
                );
                return None;
            }
            (None, None) => {
                self.error(
                    route.span(),
                    field.to_owned(),
                    "a route needs its fork's endpoints: `fork = \"ADDR:PORT\"` or `forks = [\"ADDR:PORT\", ...]`",
                );
                return None;
            }
            (Some(one), None) => vec![(one, format!("{field}.fork"))],
            (None, Some(many)) if many.get_ref().is_empty() => {
                self.error(
                    many.span(),
                    format!("{field}.forks"),
                    "must list at least one endpoint",
                );
                return None;
            }
            (None, Some(many)) => many
                .get_ref()
                .iter()
                .enumerate()
                .map(|(k, addr)| (addr, format!("{field}.forks[{k}]")))
                .collect(),
        };
        let mut forks = Vec::with_capacity(listed.len());
        let mut valid = true;
        for (text, field) in listed {
            let Some(fork) = self.socket_addr(text, field.clone()) else {
                valid = false;
                continue;
            };
            if forks.contains(&fork) {
                self.error(text.span(), field, format!("{fork} is listed twice"));
                valid = false;
                continue;
            }
            if let Some(service) = service
                && service.address.is_ipv4() != fork.is_ipv4()
            {
                self.error(
                    text.span(),
                    field,
                    format!(
                        "fork {fork} and service {:?} ({}) must be the same IP family",
                        service.name, service.address
                    ),
                );
                valid = false;
            }
            forks.push(fork);
        }
        forks.sort_unstable();
        valid.then_some(forks)
    }

    pub(super) fn groups(&mut self, state: &mut DesiredState, groups: Vec<RawGroup>) {
        let mut member_of: HashMap<PathBuf, String> = state
            .sandboxes
            .values()
            .flat_map(|s| s.members.iter().map(|m| (m.clone(), s.key.clone())))
            .collect();
        for (i, raw) in groups.into_iter().enumerate() {
            let field = |f: &str| format!("group[{i}].{f}");
            let key = raw.key.get_ref().clone();
            if let Err(e) = routing_key::validate(&key) {
                self.error(raw.key.span(), field("key"), e.to_string());
            } else if state.sandboxes.contains_key(&key) || state.groups.contains_key(&key) {
                self.error(
                    raw.key.span(),
                    field("key"),
                    format!("{key:?} is already the key of a sandbox or group"),
                );
            }
            if raw.sandboxes.is_empty() {
                self.error(
                    raw.key.span(),
                    field("sandboxes"),
                    "a group needs at least one sandbox",
                );
            }
            let mut forked_by: HashMap<String, String> = HashMap::new();
            let mut sandboxes = Vec::new();
            for (j, sandbox_key) in raw.sandboxes.iter().enumerate() {
                let f = field(&format!("sandboxes[{j}]"));
                let name = sandbox_key.get_ref();
                if sandboxes.contains(name) {
                    self.error(
                        sandbox_key.span(),
                        f,
                        format!("sandbox {name:?} is listed twice"),
                    );
                    continue;
                }
                let Some(sandbox) = state.sandboxes.get(name) else {
                    if self.fragment {
                        sandboxes.push(name.clone());
                    } else {
                        self.error(sandbox_key.span(), f, format!("unknown sandbox {name:?}"));
                    }
                    continue;
                };
                for service in sandbox.routes.keys() {
                    if let Some(other) = forked_by.insert(service.clone(), name.clone()) {
                        self.error(
                            sandbox_key.span(),
                            f.clone(),
                            format!(
                                "conflict: sandboxes {other:?} and {name:?} both fork service {service:?}"
                            ),
                        );
                    }
                }
                sandboxes.push(name.clone());
            }
            let mut members = Vec::new();
            for (j, member) in raw.members.iter().enumerate() {
                let f = field(&format!("members[{j}]"));
                let path = member.get_ref();
                if !path.starts_with('/') {
                    self.error(
                        member.span(),
                        f,
                        format!("{path:?} is not an absolute path"),
                    );
                } else if let Some(other) = member_of.insert(PathBuf::from(path), key.clone()) {
                    self.error(
                        member.span(),
                        f,
                        format!("{path} is already a member of {other:?}"),
                    );
                } else {
                    members.push(PathBuf::from(path));
                }
            }
            state.groups.entry(key.clone()).or_insert(Group {
                key,
                sandboxes,
                members,
            });
        }
    }

    pub(super) fn router(
        &mut self,
        listen: Option<Spanned<toml::Value>>,
        raw: RawRouter,
    ) -> RouterSettings {
        let mut settings = RouterSettings::default();
        let listen: Vec<Spanned<String>> = match listen {
            None => Vec::new(),
            Some(value) => {
                let span = value.span();
                let strings = match value.get_ref() {
                    toml::Value::String(one) => Some(vec![one.clone()]),
                    toml::Value::Array(many) => many
                        .iter()
                        .map(|v| v.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>(),
                    _ => None,
                };
                match strings {
                    Some(strings) => strings
                        .into_iter()
                        .map(|s| Spanned::new(span.clone(), s))
                        .collect(),
                    None => {
                        self.error(
                            span,
                            "daemon.router_listen".to_owned(),
                            "must be an \"ADDR:PORT\" string or a list of them",
                        );
                        Vec::new()
                    }
                }
            }
        };
        for (i, addr) in listen.iter().enumerate() {
            let field = format!("daemon.router_listen[{i}]");
            let Some(parsed) = self.socket_addr(addr, field.clone()) else {
                continue;
            };
            if settings
                .listen
                .iter()
                .any(|other| other.is_ipv4() == parsed.is_ipv4())
            {
                self.error(addr.span(), field, "at most one address per IP family");
                continue;
            }
            settings.listen.push(parsed);
        }

        if let Some(loops) = raw.accept_loops {
            let count = usize::try_from(*loops.get_ref())
                .ok()
                .filter(|n| *n <= MAX_ACCEPT_LOOPS)
                .and_then(NonZeroUsize::new);
            match count {
                Some(count) => settings.accept_loops = count,
                None => self.error(
                    loops.span(),
                    "router.accept_loops".to_owned(),
                    format!("must be between 1 and {MAX_ACCEPT_LOOPS}"),
                ),
            }
        }
        settings.reset_bypassed = raw.reset_bypassed;
        if let Some(name) = raw.key_name {
            let valid = !name.get_ref().is_empty()
                && http::HeaderName::from_bytes(format!("uberctx-{}", name.get_ref()).as_bytes())
                    .is_ok()
                && !name.get_ref().contains([',', ';', '=']);
            if valid {
                settings.key_name = name.get_ref().clone();
            } else {
                self.error(
                    name.span(),
                    "router.key_name".to_owned(),
                    format!(
                        "{:?} is not usable as a header-name suffix and baggage key",
                        name.get_ref()
                    ),
                );
            }
        }
        for (i, header) in raw.extra_key_headers.iter().enumerate() {
            match http::HeaderName::from_bytes(header.get_ref().as_bytes()) {
                Ok(name) => settings.extra_key_headers.push(name),
                Err(_) => self.error(
                    header.span(),
                    format!("router.extra_key_headers[{i}]"),
                    format!("{:?} is not a valid header name", header.get_ref()),
                ),
            }
        }
        if let Some(header) = raw.upstream_header {
            match http::HeaderName::from_bytes(header.get_ref().as_bytes()) {
                Ok(name) => settings.upstream_header = Some(name),
                Err(_) => self.error(
                    header.span(),
                    "router.upstream_header".to_owned(),
                    format!("{:?} is not a valid header name", header.get_ref()),
                ),
            }
        }
        for (raw, field, slot) in [
            (
                raw.connect_timeout_ms,
                "router.connect_timeout_ms",
                &mut settings.connect_timeout,
            ),
            (
                raw.request_timeout_ms,
                "router.request_timeout_ms",
                &mut settings.request_timeout,
            ),
            (
                raw.idle_timeout_ms,
                "router.idle_timeout_ms",
                &mut settings.idle_timeout,
            ),
            (
                raw.header_read_timeout_ms,
                "router.header_read_timeout_ms",
                &mut settings.header_read_timeout,
            ),
        ] {
            let Some(ms) = raw else { continue };
            if *ms.get_ref() == 0 || *ms.get_ref() > 24 * 3600 * 1000 {
                self.error(ms.span(), field.to_owned(), "must be between 1 ms and 24 h");
            } else {
                *slot = Duration::from_millis(*ms.get_ref());
            }
        }
        if let Some(bytes) = raw.max_header_bytes {
            // hyper cannot read HTTP/1 heads with a buffer smaller than 8 KiB.
            if !(8192..=1024 * 1024).contains(bytes.get_ref()) {
                self.error(
                    bytes.span(),
                    "router.max_header_bytes".to_owned(),
                    "must be between 8192 and 1048576",
                );
            } else {
                settings.max_header_bytes = *bytes.get_ref() as usize;
            }
        }
        settings
    }

    /// A listen address: unspecified (0.0.0.0) allowed, port required.
    pub(super) fn socket_addr_any(
        &mut self,
        raw: &Spanned<String>,
        field: String,
    ) -> Option<SocketAddr> {
        match raw.get_ref().parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Some(addr),
            _ => {
                self.error(
                    raw.span(),
                    field,
                    format!("{:?} is not an IP address and non-zero port", raw.get_ref()),
                );
                None
            }
        }
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
