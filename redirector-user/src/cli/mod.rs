//! Command-line interface: argument definitions, dispatch, and exit codes.
//!
//! Exit codes: 0 success; 1 the operation failed (the daemon refused a change, a check failed,
//! a file is invalid); 2 bad command-line usage; 3 the daemon cannot be reached.
//!
//! Output goes through [`out`]: `print!` panics when stdout is a closed pipe.
#![deny(clippy::print_stdout)]
mod cluster;
pub(crate) mod control;
pub mod out;
mod render;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    config::{self, DEFAULT_API_SOCKET, DEFAULT_BPFFS},
    daemon, doctor,
    kernel::programs,
};

#[derive(Debug, Parser)]
#[command(
    name = "redirector",
    version,
    about = "Steers sandbox traffic to forks with eBPF, without a service mesh",
    after_help = "Examples:\n  redirector run --config /etc/redirector/redirector.toml\n  \
                  redirector sandbox create pr-123 --route svc-a=10.0.1.7:8080\n  \
                  redirector route add pr-123 db 10.0.1.8:5432\n  \
                  redirector status\n  redirector doctor --config /etc/redirector/redirector.toml\n\n\
                  Exit codes: 0 ok, 1 failed, 2 usage, 3 daemon unreachable. \
                  Log verbosity follows RUST_LOG (default: info)."
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Tables for people.
    #[default]
    Table,
    /// The API's JSON, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon: attach the programs and keep the maps in line with the config.
    Run(RunArgs),
    /// Check a config file and print what it describes; touches nothing.
    Validate(ValidateArgs),
    /// Detach every program and remove every pinned map (undo `run`).
    Uninstall(UninstallArgs),
    /// Check every prerequisite and say how to fix what fails.
    Doctor(DoctorArgs),
    /// Create or replace services, sandboxes and groups from a file, all or nothing.
    Apply(control::ApplyArgs),
    /// Sandboxes on this node's daemon, over its API socket: create, delete, list (for the
    /// cluster's Sandbox objects, see `redirector cluster sandbox`).
    #[command(subcommand)]
    Sandbox(control::SandboxCommand),
    /// Routes of a sandbox: add, remove, list.
    #[command(subcommand)]
    Route(control::RouteCommand),
    /// Route groups (one key for several sandboxes): create, delete, list.
    #[command(subcommand)]
    Group(control::GroupCommand),
    /// Services: create, delete, list.
    #[command(subcommand)]
    Service(control::ServiceCommand),
    /// Programs attached and where, map occupancy, router health, counts.
    Status(control::ApiArgs),
    /// Kernel and router counters.
    Stats(control::ApiArgs),
    /// Mount a bpffs at DIR's nearest existing (empty) ancestor unless one is there: a
    /// DaemonSet's privileged init step, so the pins live on the host, not in the container.
    MountBpffs(MountBpffsArgs),
    /// Print the CustomResourceDefinitions (Sandbox, RouteGroup) as YAML, for `kubectl apply -f -`.
    Crds,
    /// Run the cluster's sandbox controller: forks from `forkOf`, status, TTL, clean-up.
    Controller(ControllerArgs),
    /// Act on the cluster through its Kubernetes API server, not on this node's daemon
    /// (kubeconfig as kubectl: --kubeconfig, else KUBECONFIG, else ~/.kube/config, else
    /// in-cluster; --context).
    Cluster(cluster::ClusterArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Reloads on SIGHUP and when the file's content changes. Stopping the \
                        daemon (even kill -9) leaves steering in place; starting it again adopts \
                        what is pinned."
)]
pub struct RunArgs {
    /// Config file (TOML).
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,
    /// cgroup v2 directory to attach to (overrides `daemon.cgroup`).
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for pins (overrides `daemon.bpffs`; default /sys/fs/bpf/redirector).
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// Unix socket of the local API (overrides `daemon.api_socket`; default
    /// /run/redirector/api.sock).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Where objects created through the API are kept (overrides `daemon.state_file`; default
    /// /var/lib/redirector/state.json).
    #[arg(long, value_name = "FILE")]
    pub state_file: Option<PathBuf>,
    /// On exit, detach the programs and remove the pins instead of leaving steering in place.
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// How often to check the config file for changes, e.g. 500ms, 2s.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Node router listen address (repeat for IPv4 and IPv6; overrides `daemon.router_listen`),
    /// e.g. the node's address from the downward API in a DaemonSet.
    #[arg(long, value_name = "ADDR:PORT")]
    pub router_listen: Vec<std::net::SocketAddr>,
    /// Metrics, /healthz and /readyz listen address (overrides `daemon.metrics_listen`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Watch Sandboxes, RouteGroups, Services, EndpointSlices and this node's Pods (as
    /// `[kubernetes] enabled = true`).
    #[arg(long)]
    pub kubernetes: bool,
    /// kubeconfig for the Kubernetes source (default: in-cluster, else KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, for the Kubernetes source.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Mount a bpffs where the pins go when none is mounted there (on with --kubernetes).
    #[arg(long)]
    pub mount_bpffs: bool,
    /// Count connections that take the fast path (the `fast_path` kernel counter). Off by
    /// default: it costs a per-CPU map update on every connection nothing forks. Changing it
    /// replaces the kernel programs at start, without a gap.
    #[arg(long)]
    pub count_fast_path: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Run it as a Deployment (deploy/controller.yaml): replicas elect a leader on \
                  the Lease, and only the leader writes. A replica that loses the lease exits."
)]
pub struct ControllerArgs {
    /// kubeconfig (default: in-cluster, else KUBECONFIG or ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the leader-election Lease.
    #[arg(
        long,
        value_name = "NS",
        env = "POD_NAMESPACE",
        default_value = "redirector-system"
    )]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, value_name = "NAME", default_value = "redirector-controller")]
    pub lease_name: String,
    /// This replica's identity in the Lease (default: host name and process id).
    #[arg(long, value_name = "ID", env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long the Lease holds without renewal: a stand-by takes over this long after the
    /// leader dies (at once when it stops cleanly). Whole seconds, at least 2.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// Serve /healthz and /readyz here.
    #[arg(long, value_name = "ADDR:PORT")]
    pub health_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct MountBpffsArgs {
    /// Where the pins go (or the bpffs mount point itself), e.g. /sys/fs/bpf.
    #[arg(value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Config file (TOML).
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// bpffs directory the daemon pinned to.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub bpffs: Option<PathBuf>,
    /// Read the bpffs directory from this config file instead.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Config file whose attach point, pin directory and router address to check.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Attach point to check (overrides the config's).
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// Pin directory to check (overrides the config's).
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?} has no unit (use ms or s)"))?;
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms or s)")),
    };
    if d.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}

pub async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => {
            daemon::run(daemon::RunOptions {
                config: args.config,
                cgroup: args.cgroup,
                bpffs: args.bpffs,
                api_socket: args.api_socket,
                state_file: args.state_file,
                cleanup_on_exit: args.cleanup_on_exit,
                poll_interval: args.poll_interval,
                router_listen: args.router_listen,
                metrics_listen: args.metrics_listen,
                kubernetes: args.kubernetes,
                kubeconfig: args.kubeconfig,
                node_name: args.node_name,
                mount_bpffs: args.mount_bpffs,
                count_fast_path: args.count_fast_path,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate(args) => validate(&args.config),
        Command::Uninstall(args) => uninstall(args),
        Command::Doctor(args) => doctor_cmd(args),
        Command::Apply(args) => control::apply(args).await,
        Command::Sandbox(cmd) => control::sandbox(cmd).await,
        Command::Route(cmd) => control::route(cmd).await,
        Command::Group(cmd) => control::group(cmd).await,
        Command::Service(cmd) => control::service(cmd).await,
        Command::Status(args) => control::status(args).await,
        Command::Stats(args) => control::stats(args).await,
        Command::MountBpffs(args) => {
            crate::kernel::prereq::check_root()?;
            match crate::kernel::prereq::mount_bpffs_if_missing(&args.dir)? {
                Some(at) => out::println(format_args!("mounted a bpffs at {}", at.display()))?,
                None => out::println(format_args!(
                    "a bpffs is already mounted for {}",
                    args.dir.display()
                ))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster(args) => cluster::run(args).await,
        Command::Crds => {
            out::print(crate::k8s::crd::manifest()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Controller(args) => {
            crate::controller::run(crate::controller::ControllerOptions {
                kubeconfig: args.kubeconfig,
                lease_namespace: args.lease_namespace,
                lease_name: args.lease_name,
                identity: args
                    .identity
                    .unwrap_or_else(crate::controller::default_identity),
                lease_duration: args.lease_duration,
                health_listen: args.health_listen,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn validate(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = config::load(path)?;
    let state = &config.state;
    out::println(format_args!(
        "{}: valid: {} services, {} sandboxes, {} groups, {} routes, {} member pods",
        path.display(),
        state.services.len(),
        state.sandboxes.len(),
        state.groups.len(),
        state.route_count(),
        state.member_count()
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn uninstall(args: UninstallArgs) -> anyhow::Result<ExitCode> {
    crate::kernel::prereq::check_root()?;
    let bpffs = match (&args.bpffs, &args.config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(path)) => config::load(path)?
            .daemon
            .bpffs
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS)),
        (None, None) => PathBuf::from(DEFAULT_BPFFS),
    };
    let removed = programs::uninstall(&bpffs)
        .with_context(|| format!("removing pins under {}", bpffs.display()))?;
    if removed {
        out::println(format_args!(
            "detached redirector and removed its pins under {}",
            bpffs.display()
        ))?;
    } else {
        out::println(format_args!(
            "nothing to remove: {} does not exist",
            bpffs.display()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn doctor_cmd(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let config = match &args.config {
        Some(path) => Some(config::load(path)?),
        None => None,
    };
    let opts = doctor::DoctorOptions {
        cgroup: args
            .cgroup
            .or_else(|| config.as_ref().and_then(|c| c.daemon.cgroup.clone())),
        bpffs: args
            .bpffs
            .or_else(|| config.as_ref().and_then(|c| c.daemon.bpffs.clone()))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS)),
        router_listen: config
            .as_ref()
            .map(|c| c.router.listen.clone())
            .unwrap_or_default(),
    };
    let checks = doctor::run(&opts);
    match args.output {
        Output::Json => out::println(serde_json::to_string_pretty(&checks)?)?,
        Output::Table => out::print(doctor::render_table(&checks))?,
    }
    Ok(if doctor::any_failed(&checks) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The default API socket, for help texts.
pub const SOCKET_HELP: &str = DEFAULT_API_SOCKET;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_override_and_default() {
        let cli = Cli::try_parse_from([
            "redirector",
            "run",
            "-c",
            "r.toml",
            "--cgroup",
            "/cg",
            "--poll-interval",
            "250ms",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.cgroup.as_deref(), Some(std::path::Path::new("/cg")));
        assert_eq!(run.bpffs, None);
        assert_eq!(run.poll_interval, Duration::from_millis(250));
        assert!(!run.cleanup_on_exit);
    }

    #[test]
    fn durations_need_a_unit_and_a_positive_value() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("0ms").is_err());
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn run_requires_a_config() {
        assert!(Cli::try_parse_from(["redirector", "run"]).is_err());
    }

    #[test]
    fn sandbox_create_parses_routes_and_members() {
        let cli = Cli::try_parse_from([
            "redirector",
            "sandbox",
            "create",
            "pr-1",
            "--member",
            "/run/netns/a",
            "--route",
            "svc-a=10.0.0.1:80",
            "--route",
            "db=10.0.0.2:5432",
            "-o",
            "json",
        ])
        .unwrap();
        let Command::Sandbox(control::SandboxCommand::Create(args)) = cli.command else {
            panic!("not sandbox create")
        };
        assert_eq!(args.routes.len(), 2);
        assert_eq!(args.routes[1].service, "db");
        assert_eq!(args.api.output, Output::Json);
    }

    #[test]
    fn route_flag_must_name_service_and_fork() {
        assert!(
            Cli::try_parse_from(["redirector", "sandbox", "create", "k", "--route", "nofork"])
                .is_err()
        );
    }
}
