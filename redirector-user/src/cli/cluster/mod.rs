//! `redirector cluster ...`: commands that act on the cluster through its Kubernetes API server
//! (Sandbox objects the controller turns into forks), as opposed to the node-local commands
//! (`redirector sandbox ...`) that talk to one daemon over its socket.
//!
//! Exit codes as the rest of the CLI: 0 done (and Ready, with `--wait`), 1 failed (the API
//! server refused, the Sandbox `Failed`, a wait timed out), 2 usage, 3 the API server cannot be
//! reached (or no cluster is configured at all).
mod args;
mod render;
mod wait;

use std::{process::ExitCode, time::Instant};

use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
};
use serde_json::json;

pub use self::args::ClusterArgs;
use self::{
    args::{
        ClusterCommand, CreateArgs, DeleteArgs, GetArgs, KubeArgs, SandboxCommand, show_duration,
    },
    wait::Reporter,
};
use super::{Output, out};
use crate::k8s::crd::Sandbox;

/// The field manager of `cluster sandbox create`'s server-side apply.
pub const FIELD_MANAGER: &str = "redirector-cli";

/// Why a cluster command did not do what it was asked; [`ClusterError::exit_code`] says how
/// the process ends.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "no Kubernetes configuration: no --kubeconfig, KUBECONFIG is not set, {home} does not \
         exist, and this is not a pod ({in_cluster})"
    )]
    NoConfig { home: String, in_cluster: String },
    #[error("cannot use kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: KubeconfigError,
    },
    #[error("cannot build a client for {url}")]
    Client {
        url: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot reach the Kubernetes API server at {url} ({doing})")]
    Unreachable {
        url: String,
        doing: String,
        #[source]
        source: kube::Error,
    },
    #[error("{doing}: the API server refused: {message}")]
    Refused { doing: String, message: String },
    #[error("{doing}: {source}")]
    Other {
        doing: String,
        #[source]
        source: kube::Error,
    },
    #[error("sandbox {0} not found")]
    NotFound(String),
    #[error(
        "sandbox {0} is being deleted; wait until it is gone \
         (`redirector cluster sandbox delete NAME --wait`) and create it again"
    )]
    BeingDeleted(String),
    #[error("sandbox {object} Failed: {reason}: {message}")]
    Failed {
        object: String,
        reason: String,
        message: String,
    },
    #[error("sandbox {object} was deleted while waiting for it to be Ready")]
    Vanished { object: String },
    #[error("timed out after {after} waiting for sandbox {object}: still waiting for {what}")]
    Timeout {
        object: String,
        after: String,
        what: String,
        unreachable: bool,
    },
    #[error("watching the sandbox failed: {message}")]
    Watch { message: String },
    #[error("the watch ended unexpectedly")]
    WatchEnded,
    /// Progress could not be printed; `main` exits quietly when the reader went away.
    #[error(transparent)]
    Stdout(#[from] out::StdoutError),
}

impl ClusterError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClusterError::Usage(_) => 2,
            ClusterError::NoConfig { .. } | ClusterError::Unreachable { .. } => 3,
            ClusterError::Timeout { unreachable, .. } if *unreachable => 3,
            _ => 1,
        }
    }
}

/// A client error that means no answer came from the API server: the connection was refused
/// or cut, the name did not resolve, TLS failed, the connection timed out. An answer (any HTTP
/// status) is not one.
pub(crate) fn is_unreachable(err: &kube::Error) -> bool {
    matches!(err, kube::Error::HyperError(_) | kube::Error::Service(_))
}

/// Runs a cluster command. Usage errors (exit 2) and an unreachable API server (exit 3) are
/// reported here; other failures go back to `main` as errors (exit 1).
pub async fn run(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    let err = match dispatch(args).await {
        Ok(code) => return Ok(code),
        Err(err) => err,
    };
    match err.downcast::<ClusterError>() {
        Ok(ClusterError::Stdout(err)) => Err(err.into()),
        Ok(err) if err.exit_code() != 1 => {
            let code = err.exit_code();
            // Each cause once: kube's errors repeat their sources in their own text.
            eprintln!("redirector: {}", crate::error_chain(&err));
            Ok(ExitCode::from(code))
        }
        Ok(err) => Err(err.into()),
        Err(err) => Err(err),
    }
}

async fn dispatch(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    let ClusterCommand::Sandbox(command) = args.command;
    match command {
        SandboxCommand::Create(create_args) => create(&args.kube, create_args).await,
        SandboxCommand::Delete(delete_args) => delete(&args.kube, delete_args).await,
        SandboxCommand::Get(get_args) => get(&args.kube, get_args).await,
    }
}

/// A client for the cluster, its default namespace, and its URL (for messages).
struct Cluster {
    client: Client,
    default_namespace: String,
    url: String,
}

impl Cluster {
    /// As kubectl: `--kubeconfig`, else `$KUBECONFIG`, else `~/.kube/config`, else the
    /// in-cluster service account; `--context` picks the context.
    async fn connect(kube_args: &KubeArgs) -> Result<Cluster, ClusterError> {
        let options = KubeConfigOptions {
            context: kube_args.context.clone(),
            ..KubeConfigOptions::default()
        };
        let context = kube_args.context.as_deref();
        let env_set = std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty());
        let home = std::env::home_dir().map(|h| h.join(".kube").join("config"));
        let config = match (&kube_args.kubeconfig, &home) {
            (Some(path), _) => {
                load(
                    path.display().to_string(),
                    Kubeconfig::read_from(path),
                    &options,
                    context,
                )
                .await?
            }
            (None, _) if env_set => {
                load("$KUBECONFIG".into(), Kubeconfig::read(), &options, context).await?
            }
            (None, Some(home)) if home.exists() => {
                load(
                    home.display().to_string(),
                    Kubeconfig::read_from(home),
                    &options,
                    context,
                )
                .await?
            }
            (None, _) if kube_args.context.is_some() => {
                return Err(ClusterError::Usage(
                    "--context needs a kubeconfig (--kubeconfig, KUBECONFIG or ~/.kube/config)"
                        .into(),
                ));
            }
            (None, _) => kube::Config::incluster().map_err(|err| ClusterError::NoConfig {
                home: home.map_or_else(|| "~/.kube/config".to_owned(), |h| h.display().to_string()),
                in_cluster: err.to_string(),
            })?,
        };
        let url = config.cluster_url.to_string();
        let default_namespace = config.default_namespace.clone();
        let client = Client::try_from(config).map_err(|source| ClusterError::Client {
            url: url.clone(),
            source,
        })?;
        Ok(Cluster {
            client,
            default_namespace,
            url,
        })
    }

    fn namespace(&self, given: &Option<String>) -> String {
        given
            .clone()
            .unwrap_or_else(|| self.default_namespace.clone())
    }

    fn sandboxes(&self, namespace: &str) -> Api<Sandbox> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Sorts a client error into unreachable (exit 3), refused (the server's own words), or
    /// other.
    fn error(&self, doing: impl Into<String>, err: kube::Error) -> ClusterError {
        let doing = doing.into();
        match err {
            err if is_unreachable(&err) => ClusterError::Unreachable {
                url: self.url.clone(),
                doing,
                source: err,
            },
            kube::Error::Api(status) => {
                let mut message =
                    format!("{} ({}, {})", status.message, status.reason, status.code);
                if no_such_resource(&status) {
                    message.push_str(
                        "; is the Sandbox CRD installed? (`redirector crds | kubectl apply -f -`)",
                    );
                }
                ClusterError::Refused { doing, message }
            }
            source => ClusterError::Other { doing, source },
        }
    }
}

/// A client configuration from a kubeconfig that was found (or failed to read).
async fn load(
    path: String,
    kubeconfig: Result<Kubeconfig, KubeconfigError>,
    options: &KubeConfigOptions,
    context: Option<&str>,
) -> Result<kube::Config, ClusterError> {
    let config = match kubeconfig {
        Ok(kubeconfig) => kube::Config::from_custom_kubeconfig(kubeconfig, options).await,
        Err(err) => Err(err),
    };
    config.map_err(|source| match (&source, context) {
        (KubeconfigError::LoadContext(_), Some(context)) => ClusterError::Usage(format!(
            "--context {context}: kubeconfig {path} has no such context"
        )),
        _ => ClusterError::Kubeconfig { path, source },
    })
}

/// The API server's 404 for a resource type it does not serve (not for a missing object).
fn no_such_resource(status: &kube::core::Status) -> bool {
    status.code == 404
        && status
            .message
            .contains("could not find the requested resource")
}

async fn create(kube_args: &KubeArgs, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let spec = args
        .spec()
        .map_err(|err| ClusterError::Usage(err.to_string()))?;
    let started = Instant::now();
    let cluster = Cluster::connect(kube_args).await?;
    let ns = cluster.namespace(&args.namespace.namespace);
    let name = &args.name;
    let object = format!("{ns}/{name}");
    let api = cluster.sandboxes(&ns);

    let before = api
        .get_opt(name)
        .await
        .map_err(|e| cluster.error(format!("reading sandbox {object}"), e))?;
    if before
        .as_ref()
        .is_some_and(|b| b.metadata.deletion_timestamp.is_some())
    {
        return Err(ClusterError::BeingDeleted(object).into());
    }
    let patch = json!({
        "apiVersion": "redirector.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    });
    let applied = api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|e| cluster.error(format!("applying sandbox {object}"), e))?;
    let json_out = args.output == Output::Json;
    let mut reporter = Reporter::new(json_out);
    let verb = match &before {
        None => "created".to_owned(),
        Some(b) if b.metadata.generation == applied.metadata.generation => {
            "updated (no change)".to_owned()
        }
        Some(_) => "updated".to_owned(),
    };
    reporter.line(format_args!("sandbox {object} {verb}"))?;

    let result = if args.wait.wait {
        reporter.line(format_args!(
            "waiting up to {} for sandbox {object} to be Ready",
            show_duration(args.wait.timeout)
        ))?;
        let ready =
            wait::until_ready(api.clone(), name, &object, args.wait.timeout, &mut reporter).await?;
        reporter.line(format_args!(
            "sandbox {object} is Ready (key {}) after {}",
            ready
                .status
                .as_ref()
                .and_then(|s| s.routing_key.as_deref())
                .unwrap_or(ready.routing_key()),
            show_duration(started.elapsed())
        ))?;
        ready
    } else {
        applied
    };
    if json_out {
        out::println(serde_json::to_string_pretty(&render::json_one(&result)?)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn delete(kube_args: &KubeArgs, args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let cluster = Cluster::connect(kube_args).await?;
    let ns = cluster.namespace(&args.namespace.namespace);
    let name = &args.name;
    let object = format!("{ns}/{name}");
    let api = cluster.sandboxes(&ns);
    let mut reporter = Reporter::new(false);
    let deleted = match api.delete(name, &DeleteParams::default()).await {
        Ok(deleted) => deleted,
        Err(kube::Error::Api(status)) if status.code == 404 && !no_such_resource(&status) => {
            return Err(ClusterError::NotFound(object).into());
        }
        Err(err) => {
            return Err(cluster
                .error(format!("deleting sandbox {object}"), err)
                .into());
        }
    };
    let Some(still_there) = deleted.left() else {
        reporter.line(format_args!("sandbox {object} deleted"))?;
        return Ok(ExitCode::SUCCESS);
    };
    let finalizers = still_there.metadata.finalizers.clone().unwrap_or_default();
    if !args.wait.wait {
        if finalizers.is_empty() {
            reporter.line(format_args!("sandbox {object} deleted"))?;
        } else {
            reporter.line(format_args!(
                "sandbox {object} marked for deletion; it goes once the controller has deleted \
                 its forks (finalizers: {})",
                finalizers.join(", ")
            ))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    reporter.line(format_args!("sandbox {object} marked for deletion"))?;
    wait::until_gone(
        api,
        name,
        still_there.metadata.uid.as_deref(),
        &object,
        args.wait.timeout,
        &mut reporter,
    )
    .await?;
    reporter.line(format_args!(
        "sandbox {object} is gone after {}",
        show_duration(started.elapsed())
    ))?;
    Ok(ExitCode::SUCCESS)
}

async fn get(kube_args: &KubeArgs, args: GetArgs) -> anyhow::Result<ExitCode> {
    let cluster = Cluster::connect(kube_args).await?;
    let ns = cluster.namespace(&args.namespace.namespace);
    let now = k8s_openapi::jiff::Timestamp::now();
    if let Some(name) = &args.name {
        let object = format!("{ns}/{name}");
        let sandbox = cluster
            .sandboxes(&ns)
            .get_opt(name)
            .await
            .map_err(|e| cluster.error(format!("reading sandbox {object}"), e))?
            .ok_or(ClusterError::NotFound(object))?;
        match args.output {
            Output::Json => {
                out::println(serde_json::to_string_pretty(&render::json_one(&sandbox)?)?)?
            }
            Output::Table => out::print(render::one(&sandbox, now))?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (api, doing) = if args.all_namespaces {
        (
            Api::<Sandbox>::all(cluster.client.clone()),
            "listing sandboxes".to_owned(),
        )
    } else {
        (
            cluster.sandboxes(&ns),
            format!("listing sandboxes in namespace {ns}"),
        )
    };
    let mut items = api
        .list(&ListParams::default())
        .await
        .map_err(|e| cluster.error(doing, e))?
        .items;
    items.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    match args.output {
        Output::Json => out::println(serde_json::to_string_pretty(&render::json_list(&items)?)?)?,
        Output::Table => out::print(render::list(&items, args.all_namespaces, &ns, now))?,
    }
    Ok(ExitCode::SUCCESS)
}
