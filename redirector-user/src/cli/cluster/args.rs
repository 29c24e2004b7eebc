//! `redirector cluster ...` on the command line: the arguments, their parsers, and the Sandbox
//! spec they make. Everything here is pure: a bad argument is refused before any request.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use clap::{Args, Subcommand};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::{
    cli::{Output, control::PolicyArg},
    k8s::crd::{
        self, Customizations, EnvOverride, Fork, ImageOverride, MemberSelector, SandboxSpec,
        WorkloadKind, WorkloadRef,
    },
    routing_key,
};

/// How to reach the API server: as kubectl does.
#[derive(Debug, Clone, Default, Args)]
pub struct KubeArgs {
    /// kubeconfig file [default: $KUBECONFIG, else ~/.kube/config, else the in-cluster service
    /// account].
    #[arg(long, value_name = "FILE", global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context to use [default: its current context].
    #[arg(long, value_name = "NAME", global = true)]
    pub context: Option<String>,
}

#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Sandbox objects (redirector.dev/v1alpha1) in the cluster: create, delete, get.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create or update a Sandbox that forks Deployments (server-side apply: re-running it is
    /// safe), and optionally wait until it is Ready.
    #[command(
        after_help = "Each --fork names a baseline Deployment the controller copies with \
                            the given image; --env sets a variable in a fork named by --fork; \
                            --member picks the pods (by labels) whose connections reach the forks.\n\n\
                            Example:\n  redirector cluster sandbox create pr-123 -n shop \
                            --fork svc-a=registry.local/svc-a:pr-123 \
                            --env svc-a:FEATURE_X=on --member job=pr-123-tests --ttl 2h \
                            --wait --timeout 5m\n\n\
                            Exit codes: 0 created (and Ready with --wait), 1 failed (Failed \
                            condition, timeout, refused), 2 usage, 3 API server unreachable."
    )]
    Create(CreateArgs),
    /// Delete a Sandbox; with --wait, until the controller has removed its forks and the
    /// object is gone.
    Delete(DeleteArgs),
    /// Show one Sandbox, or list them.
    #[command(
        alias = "list",
        alias = "ls",
        after_help = "FORKS is forks with a ready endpoint / forks in the spec. -o json prints \
                      the object, or for a list {\"apiVersion\": \"v1\", \"kind\": \"List\", \
                      \"items\": [...]} as kubectl does (managedFields left out)."
    )]
    Get(GetArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The Sandbox's name; also its routing key unless --key is given.
    #[arg(value_name = "NAME", value_parser = parse_name)]
    pub name: String,
    #[command(flatten)]
    pub namespace: NamespaceArg,
    /// Routing key (1-63 of [A-Za-z0-9._-]) [default: NAME].
    #[arg(long, value_name = "KEY", value_parser = parse_key)]
    pub key: Option<String>,
    /// Delete the Sandbox this long after it was created: 90m, 2h, 1h30m, 7d.
    #[arg(long, value_name = "TTL", value_parser = parse_ttl)]
    pub ttl: Option<Ttl>,
    /// Fork a Deployment with this image (repeatable; at least one). The same DEPLOYMENT with
    /// different containers is one fork with several images.
    #[arg(
        long = "fork",
        value_name = "DEPLOYMENT[:CONTAINER]=IMAGE",
        required = true,
        value_parser = parse_fork
    )]
    pub forks: Vec<ForkArg>,
    /// Set an environment variable in a fork named by --fork (repeatable).
    #[arg(long = "env", value_name = "DEPLOYMENT[:CONTAINER]:NAME=VALUE", value_parser = parse_env)]
    pub env: Vec<EnvArg>,
    /// Pods that belong to the sandbox, by labels (repeatable: one selector per flag).
    #[arg(long = "member", value_name = "LABEL=VALUE[,LABEL=VALUE...]", value_parser = parse_member)]
    pub members: Vec<MemberArg>,
    /// Route the members' HTTP requests that carry no routing key as this sandbox's, adding
    /// the key (`spec.injectKey`, for members that do not propagate it).
    #[arg(long)]
    pub inject_key: bool,
    /// What the node router does with a request whose fork cannot be reached, for every fork
    /// (`onForkError`) [default: error].
    #[arg(long, value_enum, value_name = "POLICY")]
    pub on_fork_error: Option<PolicyArg>,
    /// Reset the members' TCP connections when a fork's routes change, so pooled connections
    /// follow them, for every fork (`resetOnChange`; Linux 6.5+ on the nodes).
    #[arg(long)]
    pub reset_on_change: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
    /// Output format (with json, progress goes to stderr and the object to stdout).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[arg(value_name = "NAME", value_parser = parse_name)]
    pub name: String,
    #[command(flatten)]
    pub namespace: NamespaceArg,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// One Sandbox; all of them (in the namespace, or with -A everywhere) when omitted.
    #[arg(value_name = "NAME", value_parser = parse_name, conflicts_with = "all_namespaces")]
    pub name: Option<String>,
    #[command(flatten)]
    pub namespace: NamespaceArg,
    /// List the Sandboxes of every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct NamespaceArg {
    /// Namespace [default: the kubeconfig context's, else `default`].
    #[arg(short, long, value_name = "NAMESPACE", value_parser = parse_namespace)]
    pub namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait for the outcome, printing progress.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits: 90s, 5m, 1h, 1m30s.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// `--fork DEPLOYMENT[:CONTAINER]=IMAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkArg {
    pub deployment: String,
    pub container: Option<String>,
    pub image: String,
}

/// `--env DEPLOYMENT[:CONTAINER]:NAME=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvArg {
    pub deployment: String,
    pub container: Option<String>,
    pub name: String,
    pub value: String,
}

/// `--member LABEL=VALUE[,LABEL=VALUE...]`: one `matchLabels` selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberArg(pub BTreeMap<String, String>);

/// `--ttl`, checked against the CRD's pattern and kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ttl(pub String);

/// A combination of arguments that each parsed but do not make a Sandbox together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "--env {arg:?} names Deployment {deployment:?}, which no --fork forks (add --fork {deployment}=IMAGE)"
    )]
    EnvWithoutFork { arg: String, deployment: String },
    #[error("--fork gives Deployment {deployment:?} {what} twice")]
    DuplicateImage { deployment: String, what: String },
    #[error(
        "--fork names the container of Deployment {deployment:?} in some flags and not in others: \
         name it in all of them (DEPLOYMENT:CONTAINER=IMAGE) or give one image without it"
    )]
    MixedContainers { deployment: String },
    #[error("--env sets {name:?} twice for {target}")]
    DuplicateEnv { name: String, target: String },
    #[error(
        "the routing key defaults to the name, and {name:?} is not a valid key ({reason}): pass --key"
    )]
    NameIsNoKey { name: String, reason: String },
}

impl CreateArgs {
    /// The Sandbox spec these arguments describe: one fork per Deployment (in the order first
    /// named), its images and env in the order given.
    pub fn spec(&self) -> Result<SandboxSpec, SpecError> {
        if self.key.is_none()
            && let Err(err) = routing_key::validate(&self.name)
        {
            return Err(SpecError::NameIsNoKey {
                name: self.name.clone(),
                reason: err.to_string(),
            });
        }
        let mut forks: Vec<(String, Customizations)> = Vec::new();
        for arg in &self.forks {
            let index = match forks.iter().position(|(d, _)| *d == arg.deployment) {
                Some(i) => i,
                None => {
                    forks.push((arg.deployment.clone(), Customizations::default()));
                    forks.len() - 1
                }
            };
            let images = &mut forks[index].1.images;
            if images
                .iter()
                .any(|i| i.container.is_some() != arg.container.is_some())
            {
                return Err(SpecError::MixedContainers {
                    deployment: arg.deployment.clone(),
                });
            }
            if images.iter().any(|i| i.container == arg.container) {
                return Err(SpecError::DuplicateImage {
                    deployment: arg.deployment.clone(),
                    what: arg.container.as_ref().map_or_else(
                        || "an image".to_owned(),
                        |c| format!("an image for container {c:?}"),
                    ),
                });
            }
            images.push(ImageOverride {
                container: arg.container.clone(),
                image: arg.image.clone(),
            });
        }
        for arg in &self.env {
            let Some((_, custom)) = forks.iter_mut().find(|(d, _)| *d == arg.deployment) else {
                return Err(SpecError::EnvWithoutFork {
                    arg: arg.to_string(),
                    deployment: arg.deployment.clone(),
                });
            };
            if custom
                .env
                .iter()
                .any(|e| e.container == arg.container && e.name == arg.name)
            {
                return Err(SpecError::DuplicateEnv {
                    name: arg.name.clone(),
                    target: match &arg.container {
                        Some(c) => format!("{}:{c}", arg.deployment),
                        None => arg.deployment.clone(),
                    },
                });
            }
            custom.env.push(EnvOverride {
                container: arg.container.clone(),
                name: arg.name.clone(),
                value: arg.value.clone(),
            });
        }
        Ok(SandboxSpec {
            routing_key: self.key.clone(),
            ttl: self.ttl.as_ref().map(|t| t.0.clone()),
            forks: forks
                .into_iter()
                .map(|(name, customizations)| Fork {
                    fork_of: Some(WorkloadRef {
                        kind: WorkloadKind::Deployment,
                        name,
                        namespace: None,
                    }),
                    customizations: Some(customizations),
                    on_fork_error: self.on_fork_error.map(|policy| match policy {
                        PolicyArg::Error => crd::OnForkError::Error,
                        PolicyArg::Baseline => crd::OnForkError::Baseline,
                    }),
                    reset_on_change: self.reset_on_change.then_some(true),
                    ..Fork::default()
                })
                .collect(),
            members: self
                .members
                .iter()
                .map(|m| MemberSelector {
                    namespace: None,
                    label_selector: LabelSelector {
                        match_labels: Some(m.0.clone()),
                        match_expressions: None,
                    },
                })
                .collect(),
            inject_key: self.inject_key,
        })
    }
}

impl std::fmt::Display for EnvArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.deployment)?;
        if let Some(c) = &self.container {
            write!(f, ":{c}")?;
        }
        write!(f, ":{}={}", self.name, self.value)
    }
}

/// A DNS-1123 label: 1-63 of `[a-z0-9-]`, starting and ending with a letter or digit.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: dot-separated labels, 253 characters at most.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn check_object_name(what: &str, s: &str) -> Result<(), String> {
    if is_dns_subdomain(s) {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} is not a valid Kubernetes name (lower-case letters, digits, '-' and \
             '.', starting and ending with a letter or digit, at most 253 characters)"
        ))
    }
}

fn check_container_name(s: &str) -> Result<(), String> {
    if is_dns_label(s) {
        Ok(())
    } else {
        Err(format!(
            "container {s:?} is not a valid container name (lower-case letters, digits and '-', \
             starting and ending with a letter or digit, at most 63 characters)"
        ))
    }
}

/// `DEPLOYMENT[:CONTAINER]`.
fn parse_target(s: &str) -> Result<(String, Option<String>), String> {
    let (deployment, container) = match s.split_once(':') {
        Some((d, c)) => (d, Some(c)),
        None => (s, None),
    };
    check_object_name("Deployment", deployment)?;
    if let Some(c) = container {
        check_container_name(c)?;
    }
    Ok((deployment.to_owned(), container.map(str::to_owned)))
}

pub fn parse_name(s: &str) -> Result<String, String> {
    check_object_name("name", s)?;
    Ok(s.to_owned())
}

pub fn parse_namespace(s: &str) -> Result<String, String> {
    if is_dns_label(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "namespace {s:?} is not valid (lower-case letters, digits and '-', at most 63)"
        ))
    }
}

pub fn parse_key(s: &str) -> Result<String, String> {
    routing_key::validate(s).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(s.to_owned())
}

pub fn parse_fork(s: &str) -> Result<ForkArg, String> {
    const FORM: &str =
        "expected DEPLOYMENT[:CONTAINER]=IMAGE, e.g. svc-a=registry.local/svc-a:pr-123";
    let (target, image) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: no image: {FORM}"))?;
    if image.is_empty() {
        return Err(format!("{s:?}: the image is empty: {FORM}"));
    }
    if image.chars().any(char::is_whitespace) {
        return Err(format!("{s:?}: the image {image:?} contains white space"));
    }
    let (deployment, container) = parse_target(target).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(ForkArg {
        deployment,
        container,
        image: image.to_owned(),
    })
}

pub fn parse_env(s: &str) -> Result<EnvArg, String> {
    const FORM: &str = "expected DEPLOYMENT[:CONTAINER]:NAME=VALUE, e.g. svc-a:FEATURE_X=on";
    let (left, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: no '=': {FORM}"))?;
    let (target, name) = left
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: no Deployment: {FORM}"))?;
    if name.is_empty() {
        return Err(format!("{s:?}: the variable name is empty: {FORM}"));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{s:?}: the variable name {name:?} contains white space or control characters"
        ));
    }
    let (deployment, container) = parse_target(target).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(EnvArg {
        deployment,
        container,
        name: name.to_owned(),
        value: value.to_owned(),
    })
}

/// A label name or value: `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters.
fn is_label_word(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A label key: `[PREFIX/]NAME`, PREFIX a DNS subdomain.
fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_word(name),
        None => is_label_word(s),
    }
}

pub fn parse_member(s: &str) -> Result<MemberArg, String> {
    const FORM: &str = "expected LABEL=VALUE[,LABEL=VALUE...], e.g. job=pr-123-tests";
    let mut labels = BTreeMap::new();
    for pair in s.split(',') {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: {pair:?} has no '=': {FORM}"))?;
        if !is_label_key(key) {
            return Err(format!("{s:?}: {key:?} is not a valid label name: {FORM}"));
        }
        if !value.is_empty() && !is_label_word(value) {
            return Err(format!(
                "{s:?}: {value:?} is not a valid label value (letters, digits, '-', '_', '.', \
                 starting and ending with a letter or digit, at most 63 characters)"
            ));
        }
        if labels.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(format!("{s:?}: label {key:?} is given twice"));
        }
    }
    Ok(MemberArg(labels))
}

/// Numbers with units, each unit at most once and in the order given by `units` (millis per
/// unit); the total, which must not be zero.
fn parse_units(s: &str, units: &[(&str, u64)], example: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: expected a duration such as {example}");
    if s.is_empty() {
        return Err(bad());
    }
    let mut rest = s;
    let mut next_unit = 0;
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        // The longest unit that matches ("ms" before "m").
        let (index, (unit, factor)) = units
            .iter()
            .enumerate()
            .skip(next_unit)
            .filter(|(_, (u, _))| rest.starts_with(u))
            .max_by_key(|(_, (u, _))| u.len())
            .ok_or_else(bad)?;
        rest = &rest[unit.len()..];
        next_unit = index + 1;
        total = n
            .checked_mul(*factor)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too long"))?;
    }
    if total == 0 {
        return Err(format!("{s:?}: must be greater than zero"));
    }
    Ok(Duration::from_millis(total))
}

/// The CRD's TTL format (`^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$`), not zero: read by
/// the same parser as the controller's.
pub fn parse_ttl(s: &str) -> Result<Ttl, String> {
    crd::parse_ttl(s)?;
    Ok(Ttl(s.to_owned()))
}

/// `--timeout`: hours, minutes, seconds, milliseconds (`5m`, `90s`, `1m30s`, `500ms`).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    parse_units(
        s,
        &[("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)],
        "5m, 90s or 1m30s",
    )
}

/// A duration as the CLI prints it: `4.2s`, `2m`, `1h30m`.
pub fn show_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 && d.subsec_millis() == 0 {
        return format!("{secs}s");
    }
    if secs < 60 {
        return format!("{:.1}s", d.as_secs_f64());
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
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

    fn create(extra: &[&str]) -> Result<CreateArgs, clap::Error> {
        let mut args = vec!["cluster", "sandbox", "create", "pr-123"];
        args.extend_from_slice(extra);
        match parse(&args)? {
            Command::Cluster(ClusterArgs {
                command: ClusterCommand::Sandbox(SandboxCommand::Create(args)),
                ..
            }) => Ok(args),
            other => panic!("not cluster sandbox create: {other:?}"),
        }
    }

    fn spec(extra: &[&str]) -> Result<SandboxSpec, SpecError> {
        create(extra).expect("arguments parse").spec()
    }

    fn usage_error(extra: &[&str]) -> String {
        let err = create(extra).expect_err("refused");
        // clap exits 2 for these.
        assert_eq!(err.exit_code(), 2, "{err}");
        err.to_string()
    }

    #[test]
    fn forks_images_env_members_and_ttl_make_the_spec() {
        let spec = spec(&[
            "--fork",
            "svc-a:app=registry.local:5000/svc-a:pr-123",
            "--fork",
            "svc-b=svc-b:pr-123",
            "--fork",
            "svc-a:sidecar=proxy:2",
            "--env",
            "svc-a:app:FEATURE_X=on",
            "--env",
            "svc-b:MODE=a=b",
            "--env",
            "svc-b:EMPTY=",
            "--member",
            "job=pr-123-tests",
            "--member",
            "app.kubernetes.io/name=web,tier=",
            "--ttl",
            "1h30m",
            "--key",
            "Key_1.x",
        ])
        .expect("spec");
        assert_eq!(spec.routing_key.as_deref(), Some("Key_1.x"));
        assert_eq!(spec.ttl.as_deref(), Some("1h30m"));
        assert_eq!(spec.forks.len(), 2, "one fork per Deployment");
        let a = &spec.forks[0];
        assert_eq!(
            a.fork_of,
            Some(WorkloadRef {
                kind: WorkloadKind::Deployment,
                name: "svc-a".into(),
                namespace: None
            })
        );
        let custom = a.customizations.as_ref().expect("customizations");
        assert_eq!(
            custom.images,
            [
                ImageOverride {
                    container: Some("app".into()),
                    image: "registry.local:5000/svc-a:pr-123".into()
                },
                ImageOverride {
                    container: Some("sidecar".into()),
                    image: "proxy:2".into()
                }
            ]
        );
        assert_eq!(
            custom.env,
            [EnvOverride {
                container: Some("app".into()),
                name: "FEATURE_X".into(),
                value: "on".into()
            }]
        );
        assert!(a.service.is_none() && a.to.is_none() && a.replicas.is_none());
        let b = spec.forks[1]
            .customizations
            .as_ref()
            .expect("customizations");
        assert_eq!(b.images[0].container, None);
        assert_eq!(
            b.env
                .iter()
                .map(|e| (e.name.as_str(), e.value.as_str()))
                .collect::<Vec<_>>(),
            [("MODE", "a=b"), ("EMPTY", "")]
        );
        let members: Vec<BTreeMap<String, String>> = spec
            .members
            .iter()
            .map(|m| m.label_selector.match_labels.clone().expect("labels"))
            .collect();
        assert_eq!(
            members,
            [
                BTreeMap::from([("job".to_owned(), "pr-123-tests".to_owned())]),
                BTreeMap::from([
                    ("app.kubernetes.io/name".to_owned(), "web".to_owned()),
                    ("tier".to_owned(), String::new())
                ]),
            ]
        );
        assert!(spec.members.iter().all(|m| m.namespace.is_none()));
    }

    #[test]
    fn the_spec_reads_as_the_crd_expects() {
        let spec = spec(&["--fork", "svc-a=img:1", "--member", "job=t"]).expect("spec");
        let value = serde_json::to_value(&spec).expect("serializes");
        assert_eq!(
            value,
            serde_json::json!({
                "forks": [{
                    "forkOf": {"kind": "Deployment", "name": "svc-a"},
                    "customizations": {"images": [{"image": "img:1"}]}
                }],
                "members": [{"labelSelector": {"matchLabels": {"job": "t"}}}]
            })
        );
    }

    #[test]
    fn fork_error_policy_and_reset_go_into_every_fork_only_when_asked() {
        let off = spec(&["--fork", "svc-a=img:1", "--fork", "svc-b=img:2"]).expect("spec");
        let json = serde_json::to_value(&off).expect("serializes");
        for fork in json["forks"].as_array().expect("forks") {
            assert!(fork.get("onForkError").is_none() && fork.get("resetOnChange").is_none());
        }
        let on = spec(&[
            "--fork",
            "svc-a=img:1",
            "--fork",
            "svc-b=img:2",
            "--on-fork-error",
            "baseline",
            "--reset-on-change",
        ])
        .expect("spec");
        let json = serde_json::to_value(&on).expect("serializes");
        let forks = json["forks"].as_array().expect("forks");
        assert_eq!(forks.len(), 2);
        for fork in forks {
            assert_eq!(fork["onForkError"], "baseline", "{fork}");
            assert_eq!(fork["resetOnChange"], true, "{fork}");
        }
        let bad = usage_error(&["--fork", "svc-a=img:1", "--on-fork-error", "retry"]);
        assert!(bad.contains("possible values: error, baseline"), "{bad}");
    }

    #[test]
    fn inject_key_is_set_only_when_asked() {
        let off = spec(&["--fork", "svc-a=img:1"]).expect("spec");
        assert!(!off.inject_key);
        let on = spec(&["--fork", "svc-a=img:1", "--inject-key"]).expect("spec");
        assert!(on.inject_key);
        assert_eq!(
            serde_json::to_value(&on).expect("serializes")["injectKey"],
            true
        );
    }

    #[test]
    fn defaults_wait_five_minutes_in_tables() {
        let args = create(&["--fork", "svc-a=img"]).expect("parses");
        assert!(!args.wait.wait);
        assert_eq!(args.wait.timeout, Duration::from_secs(300));
        assert_eq!(args.output, Output::Table);
        assert_eq!(args.namespace.namespace, None);
        let args = create(&[
            "--fork",
            "svc-a=img",
            "-n",
            "shop",
            "--wait",
            "--timeout",
            "2s",
            "-o",
            "json",
        ])
        .expect("parses");
        assert!(args.wait.wait);
        assert_eq!(args.wait.timeout, Duration::from_secs(2));
        assert_eq!(args.namespace.namespace.as_deref(), Some("shop"));
        assert_eq!(args.output, Output::Json);
    }

    #[test]
    fn kubeconfig_and_context_go_anywhere() {
        let cli = parse(&[
            "cluster",
            "sandbox",
            "get",
            "--kubeconfig",
            "/tmp/kc",
            "--context",
            "ci",
            "-A",
        ])
        .expect("parses");
        let Command::Cluster(args) = cli else {
            panic!("not cluster")
        };
        assert_eq!(
            args.kube.kubeconfig.as_deref(),
            Some(std::path::Path::new("/tmp/kc"))
        );
        assert_eq!(args.kube.context.as_deref(), Some("ci"));
        assert!(parse(&["cluster", "--context", "ci", "sandbox", "get", "pr-1"]).is_ok());
        assert!(parse(&["cluster", "sandbox", "get", "pr-1", "-A"]).is_err());
        assert!(parse(&["cluster", "sandbox", "get", "-A", "-n", "shop"]).is_err());
        assert!(parse(&["cluster", "sandbox", "delete", "pr-1", "--wait"]).is_ok());
        assert!(parse(&["cluster", "sandbox", "delete"]).is_err());
    }

    #[test]
    fn a_fork_is_required() {
        let err = usage_error(&[]);
        assert!(err.contains("--fork"), "{err}");
    }

    #[test]
    fn bad_forks_are_refused() {
        for (bad, says) in [
            ("svc-a", "no image"),
            ("svc-a=", "image is empty"),
            ("=img", "not a valid Kubernetes name"),
            ("svc-a:=img", "not a valid container name"),
            ("Svc-A=img", "not a valid Kubernetes name"),
            ("svc-a:App=img", "not a valid container name"),
            ("svc-a:app:x=img", "not a valid container name"),
            ("svc-a=img 1", "white space"),
        ] {
            let err = usage_error(&[&format!("--fork={bad}")]);
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn bad_env_is_refused() {
        for (bad, says) in [
            ("svc-a:FEATURE", "no '='"),
            ("FEATURE=on", "no Deployment"),
            ("svc-a:=on", "variable name is empty"),
            ("svc-a:app: X=on", "white space"),
            (":X=on", "not a valid Kubernetes name"),
            ("svc-a:App:X=on", "not a valid container name"),
        ] {
            let err = usage_error(&["--fork", "svc-a=img", &format!("--env={bad}")]);
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn bad_members_are_refused() {
        for (bad, says) in [
            ("", "has no '='"),
            ("job", "has no '='"),
            ("job=a,", "has no '='"),
            ("=a", "not a valid label name"),
            ("-job=a", "not a valid label name"),
            ("Bad_Prefix/job=a", "not a valid label name"),
            ("job=a b", "not a valid label value"),
            ("job=-a", "not a valid label value"),
            ("job=a,job=b", "given twice"),
        ] {
            let err = usage_error(&["--fork", "svc-a=img", &format!("--member={bad}")]);
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn ttls_follow_the_crd_pattern() {
        for good in ["90m", "2h", "1h30m", "7d", "1d2h3m4s", "30s"] {
            assert_eq!(parse_ttl(good), Ok(Ttl(good.to_owned())), "{good}");
        }
        for bad in [
            "",
            "2",
            "h",
            "2x",
            "30m1h",
            "1h1h",
            "0m",
            "0d0h",
            "-1h",
            "1.5h",
            " 2h",
            "2h ",
            "1ms",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
            assert!(
                usage_error(&["--fork", "svc-a=img", &format!("--ttl={bad}")]).contains("--ttl"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn timeouts_take_hours_minutes_seconds_and_millis() {
        for (good, want) in [
            ("5m", 300_000),
            ("90s", 90_000),
            ("1m30s", 90_000),
            ("500ms", 500),
            ("1h", 3_600_000),
            ("2s", 2000),
        ] {
            assert_eq!(
                parse_timeout(good),
                Ok(Duration::from_millis(want)),
                "{good}"
            );
        }
        for bad in ["", "5", "0s", "5d", "s", "1s1m", "5 m", "-5m"] {
            assert!(parse_timeout(bad).is_err(), "{bad:?}");
            assert!(
                usage_error(&["--fork", "svc-a=img", &format!("--timeout={bad}")])
                    .contains("--timeout"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn keys_names_and_namespaces_are_checked() {
        for bad in ["", "a b", "ключ", &"k".repeat(64)] {
            assert!(
                usage_error(&["--fork", "svc-a=img", &format!("--key={bad}")]).contains("--key"),
                "{bad:?}"
            );
        }
        for bad in ["", "Shop", "shop.a", "-shop"] {
            assert!(
                usage_error(&["--fork", "svc-a=img", &format!("--namespace={bad}")])
                    .contains("namespace"),
                "{bad:?}"
            );
        }
        for bad in ["PR-1", "pr_1", "", "pr-1-"] {
            assert!(
                parse(&["cluster", "sandbox", "create", bad, "--fork", "a=b"]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_long_name_needs_a_key() {
        // A valid object name (labels of at most 63), too long for a key.
        let name = format!("pr.{}", "a".repeat(62));
        let args = |extra: &[&str]| {
            let mut all = vec![
                "cluster",
                "sandbox",
                "create",
                name.as_str(),
                "--fork",
                "a=b",
            ];
            all.extend_from_slice(extra);
            let Ok(Command::Cluster(ClusterArgs {
                command: ClusterCommand::Sandbox(SandboxCommand::Create(args)),
                ..
            })) = parse(&all)
            else {
                panic!("parses")
            };
            args
        };
        assert!(matches!(
            args(&[]).spec(),
            Err(SpecError::NameIsNoKey { .. })
        ));
        assert!(args(&["--key", "pr-1"]).spec().is_ok());
    }

    #[test]
    fn inconsistent_combinations_are_refused() {
        assert_eq!(
            spec(&["--fork", "svc-a=img", "--env", "svc-b:X=1"]),
            Err(SpecError::EnvWithoutFork {
                arg: "svc-b:X=1".into(),
                deployment: "svc-b".into()
            })
        );
        assert!(matches!(
            spec(&["--fork", "svc-a=img", "--fork", "svc-a=img2"]),
            Err(SpecError::DuplicateImage { .. })
        ));
        assert!(matches!(
            spec(&["--fork", "svc-a:app=img", "--fork", "svc-a:app=img2"]),
            Err(SpecError::DuplicateImage { .. })
        ));
        assert!(matches!(
            spec(&["--fork", "svc-a=img", "--fork", "svc-a:app=img2"]),
            Err(SpecError::MixedContainers { .. })
        ));
        assert!(matches!(
            spec(&[
                "--fork",
                "svc-a=img",
                "--env",
                "svc-a:X=1",
                "--env",
                "svc-a:X=2"
            ]),
            Err(SpecError::DuplicateEnv { .. })
        ));
        // The same variable for two containers is two settings.
        assert!(
            spec(&[
                "--fork",
                "svc-a=img",
                "--env",
                "svc-a:app:X=1",
                "--env",
                "svc-a:side:X=2"
            ])
            .is_ok()
        );
    }

    #[test]
    fn durations_print_short() {
        assert_eq!(show_duration(Duration::from_millis(4200)), "4.2s");
        assert_eq!(show_duration(Duration::from_secs(2)), "2s");
        assert_eq!(show_duration(Duration::from_secs(300)), "5m");
        assert_eq!(show_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(show_duration(Duration::from_secs(61)), "1m1s");
    }
}
