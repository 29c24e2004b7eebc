//! CLI commands that talk to the running daemon through its API socket.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use http::Method;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{Output, SOCKET_HELP, out, render};
use crate::{
    api::{
        client,
        types::{ApplyRequest, GroupSpec, RouteSpec, SandboxSpec, ServiceSpec, StateSpec},
    },
    config,
    state::{ForkErrorPolicy, Protocol},
};

#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", env = "REDIRECTOR_SOCKET", default_value = SOCKET_HELP, global = true)]
    pub socket: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

#[derive(Debug, Args)]
#[command(
    after_help = "FILE is JSON ({\"services\": [...], \"sandboxes\": [...], \"groups\": [...]}) \
                        or TOML with [[service]], [[sandbox]] and [[group]] tables as in the \
                        config file.\n\nExample:\n  redirector apply -f sandboxes.toml --prune"
)]
pub struct ApplyArgs {
    /// File with the objects to create or replace.
    #[arg(short, long, value_name = "FILE")]
    pub file: PathBuf,
    /// Also delete objects created through the API that the file does not list.
    #[arg(long)]
    pub prune: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `SERVICE=ADDR[,ADDR...]` on the command line.
#[derive(Debug, Clone)]
pub struct RouteArg {
    pub service: String,
    pub forks: Vec<String>,
}

/// `ADDR[,ADDR...]` on the command line (a newtype: clap would read a `Vec` as repeated values).
#[derive(Debug, Clone)]
pub struct ForksArg(pub Vec<String>);

fn parse_route(s: &str) -> Result<RouteArg, String> {
    let (service, forks) = s.split_once('=').ok_or_else(|| {
        format!("{s:?}: expected SERVICE=ADDR[,ADDR...], e.g. svc-a=10.0.1.7:8080")
    })?;
    if service.is_empty() {
        return Err(format!("{s:?}: expected SERVICE=ADDR[,ADDR...]"));
    }
    Ok(RouteArg {
        service: service.to_owned(),
        forks: parse_forks(forks)?,
    })
}

fn parse_forks_arg(s: &str) -> Result<ForksArg, String> {
    parse_forks(s).map(ForksArg)
}

/// `ADDR[,ADDR...]`: a fork's endpoints. The daemon checks the addresses themselves.
fn parse_forks(s: &str) -> Result<Vec<String>, String> {
    let forks: Vec<String> = s.split(',').map(|a| a.trim().to_owned()).collect();
    if forks.iter().any(String::is_empty) {
        return Err(format!(
            "{s:?}: expected ADDR[,ADDR...], e.g. 10.0.1.7:8080,10.0.1.8:8080"
        ));
    }
    Ok(forks)
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create (or replace) a sandbox.
    #[command(after_help = "Example:\n  redirector sandbox create pr-123 \
                            --member /run/netns/pr-123-tests --route svc-a=10.0.1.7:8080 \
                            --route db=10.0.1.8:5432,10.0.1.9:5432")]
    Create(SandboxCreateArgs),
    /// Delete a sandbox and its routes.
    Delete(KeyArgs),
    /// List sandboxes.
    #[command(alias = "ls")]
    List(ApiArgs),
    /// Show one sandbox.
    Get(KeyArgs),
}

#[derive(Debug, Args)]
pub struct SandboxCreateArgs {
    /// Routing key (1-63 of [A-Za-z0-9._-]).
    pub key: String,
    /// Network namespace of a member pod (repeatable), e.g. /run/netns/NAME or /proc/PID/ns/net.
    #[arg(long = "member", value_name = "NETNS")]
    pub members: Vec<PathBuf>,
    /// A route, SERVICE=ADDR[,ADDR...]: the fork's endpoints (repeatable).
    #[arg(long = "route", value_name = "SERVICE=ADDR[,ADDR...]", value_parser = parse_route)]
    pub routes: Vec<RouteArg>,
    /// What the node router does when a fork is down.
    #[arg(long, value_enum, default_value_t = PolicyArg::Error)]
    pub on_fork_error: PolicyArg,
    /// Reset the members' TCP connections these routes steered when they change, so pooled
    /// connections follow them (Linux 6.5+).
    #[arg(long)]
    pub reset_on_change: bool,
    /// Route the members' requests to HTTP services that carry no routing key as this
    /// sandbox's, adding the key (for members that do not propagate it).
    #[arg(long)]
    pub inject_key: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PolicyArg {
    /// Answer 502.
    Error,
    /// Send the request to the baseline.
    Baseline,
}

impl From<PolicyArg> for ForkErrorPolicy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Error => ForkErrorPolicy::Error,
            PolicyArg::Baseline => ForkErrorPolicy::Baseline,
        }
    }
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    pub key: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Route a service of a sandbox to a fork (replaces an existing route).
    #[command(
        after_help = "Examples:\n  redirector route add pr-123 svc-a 10.0.1.7:8080 --on-fork-error baseline\n  \
                      redirector route add pr-123 svc-a 10.0.1.7:8080,10.0.1.8:8080"
    )]
    Add(RouteAddArgs),
    /// Remove a route.
    #[command(alias = "remove")]
    Rm(RouteRmArgs),
    /// List routes, of one sandbox or all.
    #[command(alias = "list")]
    Ls(RouteLsArgs),
}

#[derive(Debug, Args)]
pub struct RouteAddArgs {
    pub sandbox: String,
    pub service: String,
    /// The fork's endpoints, ADDRESS:PORT[,ADDRESS:PORT...]: new connections and requests
    /// spread over all of them.
    #[arg(value_name = "ADDR[,ADDR...]", value_parser = parse_forks_arg)]
    pub forks: ForksArg,
    #[arg(long, value_enum, default_value_t = PolicyArg::Error)]
    pub on_fork_error: PolicyArg,
    /// Reset the members' TCP connections this route steered when it changes, so pooled
    /// connections follow it (Linux 6.5+).
    #[arg(long)]
    pub reset_on_change: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

impl SandboxCreateArgs {
    /// The sandbox the command creates: every route with the command's policies.
    fn spec(&self) -> SandboxSpec {
        SandboxSpec {
            key: self.key.clone(),
            members: self.members.clone(),
            routes: self
                .routes
                .iter()
                .map(|r| {
                    RouteSpec::new(&r.service, &r.forks, self.on_fork_error.into())
                        .with_reset_on_change(self.reset_on_change)
                })
                .collect(),
            inject_key: self.inject_key,
        }
    }
}

impl RouteAddArgs {
    fn spec(&self) -> RouteSpec {
        RouteSpec::new(&self.service, &self.forks.0, self.on_fork_error.into())
            .with_reset_on_change(self.reset_on_change)
    }
}

#[derive(Debug, Args)]
pub struct RouteRmArgs {
    pub sandbox: String,
    pub service: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct RouteLsArgs {
    pub sandbox: Option<String>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create (or replace) a route group.
    #[command(
        after_help = "Example:\n  redirector group create pr-123-and-456 --sandbox pr-123 --sandbox pr-456"
    )]
    Create(GroupCreateArgs),
    /// Delete a route group (its sandboxes stay).
    Delete(KeyArgs),
    /// List route groups.
    #[command(alias = "ls")]
    List(ApiArgs),
}

#[derive(Debug, Args)]
pub struct GroupCreateArgs {
    /// The group's own routing key.
    pub key: String,
    /// A sandbox of the group (repeatable; at least one).
    #[arg(long = "sandbox", value_name = "KEY", required = true)]
    pub sandboxes: Vec<String>,
    /// Network namespace of a member pod of the group (repeatable).
    #[arg(long = "member", value_name = "NETNS")]
    pub members: Vec<PathBuf>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Declare (or replace) a service.
    #[command(
        after_help = "Example:\n  redirector service create svc-a 10.96.0.10:8080 --protocol http"
    )]
    Create(ServiceCreateArgs),
    /// Delete a service (no route may use it).
    Delete(KeyArgs),
    /// List services.
    #[command(alias = "ls")]
    List(ApiArgs),
}

#[derive(Debug, Args)]
pub struct ServiceCreateArgs {
    pub name: String,
    /// ADDRESS:PORT the pods dial (a ClusterIP or pod IP).
    pub address: String,
    #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
    pub protocol: ProtocolArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProtocolArg {
    Tcp,
    Udp,
    Http,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Udp => Protocol::Udp,
            ProtocolArg::Http => Protocol::Http,
        }
    }
}

/// An API failure the CLI reports (exit 1); unreachable daemons surface as
/// `client::ClientError` (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub message: String,
}

/// Calls the API; a refusal becomes an error carrying the daemon's explanation.
async fn call(
    api: &ApiArgs,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (status, value) = client::call(&api.socket, method, path, body.as_ref()).await?;
    if status.is_success() {
        return Ok(value);
    }
    let error = &value["error"];
    let mut message = error["message"]
        .as_str()
        .map_or_else(|| format!("the daemon answered {status}"), str::to_owned);
    if let Some(issues) = error["issues"].as_array().filter(|i| i.len() > 1) {
        for issue in issues {
            message.push_str(&format!(
                "\n  {}: {}",
                issue["field"].as_str().unwrap_or("?"),
                issue["message"].as_str().unwrap_or("?")
            ));
        }
    }
    Err(Refused { message }.into())
}

fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn print(
    api: &ApiArgs,
    value: &Value,
    table: impl FnOnce(&Value) -> String,
) -> anyhow::Result<ExitCode> {
    match api.output {
        Output::Json => out::println(serde_json::to_string_pretty(value)?)?,
        Output::Table => out::print(table(value))?,
    }
    Ok(ExitCode::SUCCESS)
}

fn done(api: &ApiArgs, value: &Value, what: String) -> anyhow::Result<ExitCode> {
    print(api, value, |v| {
        format!(
            "{what} (now {} services, {} sandboxes, {} groups, {} routes)\n",
            v["services"], v["sandboxes"], v["groups"], v["routes"]
        )
    })
}

pub async fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    // The config file's reader: a FIFO or /dev/zero is refused, not waited on or read forever.
    let bytes = config::read_file(&args.file)?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{} is not UTF-8 text", args.file.display()))?;
    let mut request: ApplyRequest = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", args.file.display()))?
    } else {
        let parsed =
            config::parse_fragment(&text).map_err(|errors| config::ConfigError::Invalid {
                path: args.file.clone(),
                errors,
            })?;
        ApplyRequest {
            state: StateSpec::from_state(&parsed),
            prune: false,
        }
    };
    request.prune |= args.prune;
    let body = serde_json::to_value(&request)?;
    let value = call(&args.api, Method::POST, "/v1/apply", Some(body)).await?;
    let listed =
        request.state.services.len() + request.state.sandboxes.len() + request.state.groups.len();
    done(
        &args.api,
        &value,
        format!("applied {listed} objects from {}", args.file.display()),
    )
}

/// Creates or replaces `/v1/{collection}/{key}` and reports it.
async fn put(
    api: &ApiArgs,
    collection: &str,
    key: &str,
    spec: impl serde::Serialize,
    noun: &str,
) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/{collection}/{}", segment(key));
    let body = serde_json::to_value(spec)?;
    let value = call(api, Method::PUT, &path, Some(body)).await?;
    done(api, &value, format!("{noun} {key} created"))
}

async fn delete(
    api: &ApiArgs,
    collection: &str,
    key: &str,
    noun: &str,
) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/{collection}/{}", segment(key));
    let value = call(api, Method::DELETE, &path, None).await?;
    done(api, &value, format!("{noun} {key} deleted"))
}

async fn list(
    api: &ApiArgs,
    path: &str,
    table: impl FnOnce(&Value) -> String,
) -> anyhow::Result<ExitCode> {
    let value = call(api, Method::GET, path, None).await?;
    print(api, &value, table)
}

pub async fn sandbox(cmd: SandboxCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SandboxCommand::Create(args) => {
            let spec = args.spec();
            put(&args.api, "sandboxes", &args.key, spec, "sandbox").await
        }
        SandboxCommand::Delete(args) => delete(&args.api, "sandboxes", &args.key, "sandbox").await,
        SandboxCommand::List(api) => list(&api, "/v1/sandboxes", render::sandboxes).await,
        SandboxCommand::Get(args) => {
            let path = format!("/v1/sandboxes/{}", segment(&args.key));
            let value = call(&args.api, Method::GET, &path, None).await?;
            print(&args.api, &json!([value]), render::sandboxes)
        }
    }
}

pub async fn route(cmd: RouteCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RouteCommand::Add(args) => {
            let spec = args.spec();
            let path = format!(
                "/v1/sandboxes/{}/routes/{}",
                segment(&args.sandbox),
                segment(&args.service)
            );
            let value = call(
                &args.api,
                Method::PUT,
                &path,
                Some(serde_json::to_value(spec)?),
            )
            .await?;
            done(
                &args.api,
                &value,
                format!(
                    "route {} {} -> {} added",
                    args.sandbox,
                    args.service,
                    args.forks.0.join(",")
                ),
            )
        }
        RouteCommand::Rm(args) => {
            let path = format!(
                "/v1/sandboxes/{}/routes/{}",
                segment(&args.sandbox),
                segment(&args.service)
            );
            let value = call(&args.api, Method::DELETE, &path, None).await?;
            done(
                &args.api,
                &value,
                format!("route {} {} removed", args.sandbox, args.service),
            )
        }
        RouteCommand::Ls(args) => {
            let path = match &args.sandbox {
                Some(key) => format!("/v1/sandboxes/{}/routes", segment(key)),
                None => "/v1/routes".to_owned(),
            };
            let value = call(&args.api, Method::GET, &path, None).await?;
            print(&args.api, &value, render::routes)
        }
    }
}

pub async fn group(cmd: GroupCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        GroupCommand::Create(args) => {
            let spec = GroupSpec {
                key: args.key.clone(),
                sandboxes: args.sandboxes,
                members: args.members,
            };
            put(&args.api, "groups", &args.key, spec, "group").await
        }
        GroupCommand::Delete(args) => delete(&args.api, "groups", &args.key, "group").await,
        GroupCommand::List(api) => list(&api, "/v1/groups", render::groups).await,
    }
}

pub async fn service(cmd: ServiceCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ServiceCommand::Create(args) => {
            let spec = ServiceSpec {
                name: args.name.clone(),
                address: args.address,
                protocol: args.protocol.into(),
            };
            put(&args.api, "services", &args.name, spec, "service").await
        }
        ServiceCommand::Delete(args) => delete(&args.api, "services", &args.key, "service").await,
        ServiceCommand::List(api) => list(&api, "/v1/services", render::services).await,
    }
}

pub async fn status(api: ApiArgs) -> anyhow::Result<ExitCode> {
    let value = call(&api, Method::GET, "/v1/status", None).await?;
    print_typed(&api, &value, "status", render::status)
}

pub async fn stats(api: ApiArgs) -> anyhow::Result<ExitCode> {
    let value = call(&api, Method::GET, "/v1/stats", None).await?;
    if value.is_null() {
        bail!("the daemon returned no stats");
    }
    print_typed(&api, &value, "stats", render::stats)
}

/// An answer with a type of its own: `-o json` prints it as the daemon sent it, the table is
/// rendered from the typed answer.
fn print_typed<T: DeserializeOwned>(
    api: &ApiArgs,
    value: &Value,
    what: &str,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<ExitCode> {
    if api.output == Output::Json {
        return print(api, value, |_| String::new());
    }
    let answer = T::deserialize(value)
        .with_context(|| format!("the daemon's {what} answer does not read"))?;
    out::print(table(&answer))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("redirector").chain(args.iter().copied()))
            .map(|cli| cli.command)
    }

    #[test]
    fn route_add_takes_one_endpoint_or_a_list() {
        for (arg, want) in [
            ("10.0.1.7:8080", vec!["10.0.1.7:8080"]),
            (
                "10.0.1.7:8080,[fd00::8]:8080, 10.0.1.9:8080",
                vec!["10.0.1.7:8080", "[fd00::8]:8080", "10.0.1.9:8080"],
            ),
        ] {
            match parse(&["route", "add", "pr-1", "svc-a", arg]) {
                Ok(Command::Route(RouteCommand::Add(args))) => assert_eq!(args.forks.0, want),
                other => panic!("{arg}: {other:?}"),
            }
        }
        for bad in ["", "10.0.1.7:8080,", ",10.0.1.7:8080"] {
            assert!(
                parse(&["route", "add", "pr-1", "svc-a", bad]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sandbox_create_injects_the_key_only_when_asked() {
        let inject = |extra: &[&str]| {
            let mut args = vec!["sandbox", "create", "pr-1"];
            args.extend(extra);
            match parse(&args) {
                Ok(Command::Sandbox(SandboxCommand::Create(args))) => args.inject_key,
                _ => panic!("sandbox create parses"),
            }
        };
        assert!(!inject(&[]));
        assert!(inject(&["--inject-key"]));
    }

    #[test]
    fn reset_on_change_is_off_unless_asked_and_goes_into_every_route() {
        let sandbox = |extra: &[&str]| {
            let mut args = vec![
                "sandbox",
                "create",
                "pr-1",
                "--route",
                "svc-a=10.0.1.7:8080",
                "--route",
                "db=10.0.1.8:5432",
            ];
            args.extend(extra);
            match parse(&args) {
                Ok(Command::Sandbox(SandboxCommand::Create(args))) => args.spec(),
                other => panic!("sandbox create parses: {other:?}"),
            }
        };
        assert!(sandbox(&[]).routes.iter().all(|r| !r.reset_on_change));
        let spec = sandbox(&["--reset-on-change"]);
        assert_eq!(spec.routes.len(), 2);
        assert!(spec.routes.iter().all(|r| r.reset_on_change), "{spec:?}");

        let route = |extra: &[&str]| {
            let mut args = vec!["route", "add", "pr-1", "svc-a", "10.0.1.7:8080"];
            args.extend(extra);
            match parse(&args) {
                Ok(Command::Route(RouteCommand::Add(args))) => args.spec(),
                other => panic!("route add parses: {other:?}"),
            }
        };
        assert!(!route(&[]).reset_on_change);
        let spec = route(&["--reset-on-change", "--on-fork-error", "baseline"]);
        assert!(spec.reset_on_change);
        assert_eq!(spec.on_fork_error, ForkErrorPolicy::Baseline);
        assert_eq!(spec.forks, ["10.0.1.7:8080"]);
        // A flag, not an option that takes a value.
        assert!(
            parse(&[
                "route",
                "add",
                "pr-1",
                "svc-a",
                "10.0.1.7:8080",
                "--reset-on-change=yes"
            ])
            .is_err()
        );
    }

    #[test]
    fn sandbox_create_routes_take_one_endpoint_or_a_list() {
        let Ok(Command::Sandbox(SandboxCommand::Create(args))) = parse(&[
            "sandbox",
            "create",
            "pr-1",
            "--route",
            "svc-a=10.0.1.7:8080",
            "--route",
            "db=10.0.1.8:5432,10.0.1.9:5432",
        ]) else {
            panic!("sandbox create with routes parses");
        };
        let routes: Vec<(&str, Vec<&str>)> = args
            .routes
            .iter()
            .map(|r| {
                (
                    r.service.as_str(),
                    r.forks.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            routes,
            [
                ("svc-a", vec!["10.0.1.7:8080"]),
                ("db", vec!["10.0.1.8:5432", "10.0.1.9:5432"])
            ]
        );
        for bad in [
            "svc-a",
            "svc-a=",
            "=10.0.1.7:8080",
            "svc-a=10.0.1.7:8080,,10.0.1.8:8080",
        ] {
            assert!(
                parse(&["sandbox", "create", "pr-1", "--route", bad]).is_err(),
                "{bad:?}"
            );
        }
    }
}
