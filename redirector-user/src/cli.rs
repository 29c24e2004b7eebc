//! Command-line interface: argument definitions and dispatch.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    config::{self, DEFAULT_BPFFS},
    daemon::{self, Placement},
    kernel::programs,
};

#[derive(Debug, Parser)]
#[command(
    name = "redirector",
    version,
    about = "Steers sandbox traffic to forks with eBPF, without a service mesh",
    after_help = "Examples:\n  redirector validate --config /etc/redirector/redirector.toml\n  \
                  redirector run --config /etc/redirector/redirector.toml\n  \
                  redirector uninstall --bpffs /sys/fs/bpf/redirector\n\n\
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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon: attach the programs and keep the maps in line with the config.
    Run(RunArgs),
    /// Check a config file and print what it describes; touches nothing.
    Validate(ValidateArgs),
    /// Detach every program and remove every pinned map (undo `run`).
    Uninstall(UninstallArgs),
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
    /// On exit, detach the programs and remove the pins instead of leaving steering in place.
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// How often to check the config file for changes, e.g. 500ms, 2s.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
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

pub async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            daemon::run(daemon::RunOptions {
                config: args.config,
                cgroup: args.cgroup,
                bpffs: args.bpffs,
                cleanup_on_exit: args.cleanup_on_exit,
                poll_interval: args.poll_interval,
            })
            .await
        }
        Command::Validate(args) => validate(&args.config),
        Command::Uninstall(args) => uninstall(args),
    }
}

fn validate(path: &std::path::Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    let state = &config.state;
    println!(
        "{}: valid: {} services, {} sandboxes, {} routes, {} member pods",
        path.display(),
        state.services.len(),
        state.sandboxes.len(),
        state.route_count(),
        state.member_count()
    );
    Ok(())
}

fn uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    crate::kernel::prereq::check_root()?;
    let bpffs = match (&args.bpffs, &args.config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(path)) => {
            let config = config::load(path)?;
            // Only the bpffs directory matters here; the cgroup need not be set.
            Placement::resolve(Some(std::path::Path::new("/")), None, &config, path)?.bpffs
        }
        (None, None) => PathBuf::from(DEFAULT_BPFFS),
    };
    let removed = programs::uninstall(&bpffs)
        .with_context(|| format!("removing pins under {}", bpffs.display()))?;
    if removed {
        println!(
            "detached redirector and removed its pins under {}",
            bpffs.display()
        );
    } else {
        println!("nothing to remove: {} does not exist", bpffs.display());
    }
    Ok(())
}

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
}
