//! `redirector run`: the node daemon's main loop.
//!
//! Starts the kernel side (adopting whatever a previous run pinned), makes the maps match the
//! config, then keeps them matching: on SIGHUP and whenever the file's content changes. A file
//! that fails validation is rejected whole and the running state stays as it was.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    config::{self, Config, DEFAULT_BPFFS},
    kernel::{
        maps::{Ids, KernelState, MemberCookies, encode},
        netns, prereq,
        programs::{self, Kernel},
    },
    state::DesiredState,
};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    pub cleanup_on_exit: bool,
    pub poll_interval: Duration,
}

/// Where the daemon attaches and pins: flags win over the file, then defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
}

impl Placement {
    pub fn resolve(
        flag_cgroup: Option<&Path>,
        flag_bpffs: Option<&Path>,
        config: &Config,
        config_path: &Path,
    ) -> anyhow::Result<Placement> {
        let cgroup = flag_cgroup
            .map(Path::to_owned)
            .or_else(|| config.daemon.cgroup.clone())
            .ok_or_else(|| {
                anyhow!(
                    "no attach cgroup: set `cgroup` in the [daemon] table of {} or pass --cgroup",
                    config_path.display()
                )
            })?;
        let bpffs = flag_bpffs
            .map(Path::to_owned)
            .or_else(|| config.daemon.bpffs.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS));
        Ok(Placement { cgroup, bpffs })
    }
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    prereq::check_root()?;
    let config = config::load(&opts.config)?;
    let placement = Placement::resolve(
        opts.cgroup.as_deref(),
        opts.bpffs.as_deref(),
        &config,
        &opts.config,
    )?;
    prereq::check_cgroup(&placement.cgroup)?;
    prereq::check_bpffs(&placement.bpffs)?;

    let (kernel, report) = programs::start(&placement.cgroup, &placement.bpffs)
        .context("starting the kernel programs")?;
    info!(
        cgroup = %placement.cgroup.display(),
        bpffs = %placement.bpffs.display(),
        attached = ?report.attached,
        adopted = ?report.adopted,
        "programs in place"
    );
    for stale in &report.detached {
        info!(pins = %stale.display(), "detached programs of a cgroup no longer configured");
    }

    let mut sync = Sync::new(kernel);
    let applied = sync.apply(&config.state).context("applying the config")?;
    info!(
        config = %opts.config.display(),
        services = config.state.services.len(),
        sandboxes = config.state.sandboxes.len(),
        routes = config.state.route_count(),
        members = applied.members,
        "ready"
    );

    let result = watch(&opts, &placement, config, &mut sync).await;
    match sync.kernel.maps.counters() {
        Ok(counters) => info!(?counters, "kernel counters (all CPUs, since load)"),
        Err(err) => warn!(error = %err, "cannot read kernel counters"),
    }

    if opts.cleanup_on_exit {
        drop(sync);
        match programs::uninstall(&placement.bpffs) {
            Ok(_) => info!(bpffs = %placement.bpffs.display(), "detached and removed all pins"),
            Err(err) => error!(bpffs = %placement.bpffs.display(), error = %err, "cleanup failed"),
        }
    } else {
        info!("exiting; steering stays in place (pinned), `redirector uninstall` removes it");
    }
    result
}

/// Reacts to SIGHUP, file changes and termination until asked to stop.
async fn watch(
    opts: &RunOptions,
    placement: &Placement,
    mut running: Config,
    sync: &mut Sync,
) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(opts.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = std::fs::read(&opts.config).ok();

    loop {
        let reason = tokio::select! {
            _ = hangup.recv() => "SIGHUP",
            _ = tick.tick() => {
                let now = std::fs::read(&opts.config).ok();
                if now != last_seen {
                    last_seen = now;
                    "file changed"
                } else if sync.unresolved_members > 0 {
                    // A member pod's namespace may have appeared since; retry quietly.
                    if let Err(err) = sync.apply(&running.state) {
                        warn!(error = %format!("{err:#}"), "retrying members failed");
                    }
                    continue;
                } else {
                    continue;
                }
            }
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        };
        match reload(opts, placement, sync, reason) {
            Ok(config) => running = config,
            Err(err) => {
                error!(reason, error = %format!("{err:#}"), "reload rejected; running state unchanged")
            }
        }
    }
}

fn reload(
    opts: &RunOptions,
    placement: &Placement,
    sync: &mut Sync,
    reason: &str,
) -> anyhow::Result<Config> {
    let config = config::load(&opts.config)?;
    let wanted = Placement::resolve(
        opts.cgroup.as_deref(),
        opts.bpffs.as_deref(),
        &config,
        &opts.config,
    )?;
    if &wanted != placement {
        warn!(
            "daemon.cgroup / daemon.bpffs changed; they take effect on restart, routes apply now"
        );
    }
    let applied = sync.apply(&config.state)?;
    info!(
        reason,
        services = config.state.services.len(),
        sandboxes = config.state.sandboxes.len(),
        routes = config.state.route_count(),
        members = applied.members,
        changed = applied.changed,
        "reload applied"
    );
    Ok(config)
}

/// Keeps the maps in line with a desired state.
struct Sync {
    kernel: Kernel,
    /// None until the first apply, which adopts ids from what the kernel already holds.
    ids: Option<Ids>,
    unresolved_members: usize,
}

struct Applied {
    members: usize,
    changed: bool,
}

impl Sync {
    fn new(kernel: Kernel) -> Sync {
        Sync {
            kernel,
            ids: None,
            unresolved_members: 0,
        }
    }

    fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<Applied> {
        let cookies = self.resolve_members(desired);
        let current: KernelState = self.kernel.maps.read()?;
        // Ids change only once the kernel has taken the new state: a rejected state must not
        // leave ids behind that the running one does not use.
        let mut ids = match &self.ids {
            Some(ids) => ids.clone(),
            None => Ids::adopt(&current, desired, &cookies),
        };
        let encoded = encode(desired, &mut ids, &cookies);
        let changed = encoded != current;
        if changed {
            self.kernel.maps.apply(&current, &encoded)?;
        }
        self.ids = Some(ids);
        Ok(Applied {
            members: encoded.members.len(),
            changed,
        })
    }

    fn resolve_members(&mut self, desired: &DesiredState) -> MemberCookies {
        let mut cookies = MemberCookies::new();
        let mut unresolved = 0;
        for sandbox in desired.sandboxes.values() {
            for path in &sandbox.members {
                match netns::cookie(path) {
                    Ok(cookie) => {
                        cookies.insert(path.clone(), cookie);
                    }
                    Err(err) => {
                        unresolved += 1;
                        // Pods come and go: a missing namespace is not a config error, but
                        // say so once per change rather than every retry.
                        if self.unresolved_members == 0 {
                            warn!(sandbox = %sandbox.key, member = %path.display(), error = %err,
                                "member namespace not found; retrying every poll interval");
                        }
                    }
                }
            }
        }
        self.unresolved_members = unresolved;
        cookies
    }
}
