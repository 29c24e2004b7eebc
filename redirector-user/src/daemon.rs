//! `redirector run`: the node daemon's main loop.
//!
//! Starts the kernel side (adopting whatever a previous run pinned), makes the maps match the
//! config, then keeps them matching: on SIGHUP and whenever the file's content changes. A file
//! that fails validation is rejected whole and the running state stays as it was.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;

use anyhow::{Context as _, anyhow};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    config::{self, Config, DEFAULT_BPFFS, RouterSettings},
    kernel::{
        maps::{Handoff, Ids, KernelState, MemberCookies, SyncError, encode},
        netns::CookieCache,
        prereq,
        programs::{self, Kernel},
    },
    router::{RouteTable, Router, RouterMaps},
    state::{DesiredState, Protocol},
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

    let mut kernel = kernel;
    let table = Arc::new(ArcSwap::from_pointee(RouteTable::from_state(&config.state)));
    let router_maps = match (
        kernel.orig_dst.take(),
        kernel.router.take(),
        kernel.router_sockets.take(),
    ) {
        (Some(orig_dst), Some(config), Some(sockets)) => Some(RouterMaps {
            orig_dst,
            config,
            sockets,
        }),
        _ => None,
    };
    let router = match router_maps {
        Some(maps) if !config.router.listen.is_empty() => Some(
            Router::start(&config.router, table.clone(), maps)
                .await
                .context("starting the node router")?,
        ),
        _ => {
            if config
                .state
                .services
                .values()
                .any(|s| s.protocol == Protocol::Http)
            {
                info!("no daemon.router_listen: HTTP services get L4 steering only");
            }
            None
        }
    };
    let handoff = Handoff {
        v4: router.is_some() && config.router.listen.iter().any(SocketAddr::is_ipv4),
        v6: router.is_some() && config.router.listen.iter().any(SocketAddr::is_ipv6),
    };

    let mut sync = Sync::new(kernel, table, handoff);
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
    if let Some(router) = router {
        info!(counters = ?router.stats.snapshot(), "node router counters");
        router.shutdown().await;
    }
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
    let mut file = WatchedFile::new(&opts.config);

    loop {
        let reason = tokio::select! {
            _ = hangup.recv() => "SIGHUP",
            _ = tick.tick() => {
                if file.changed() {
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
        match reload(opts, placement, &running.router, sync, reason) {
            Ok(config) => running = config,
            Err(ReloadError::Rejected(err)) => {
                error!(reason, error = %format!("{err:#}"), "reload rejected; running state unchanged")
            }
            Err(ReloadError::Partial(err)) => {
                error!(reason, error = %format!("{err:#}"),
                    "reload failed part way; the kernel holds a mix of old and new state, the next reload retries")
            }
        }
    }
}

/// Why a reload did not take effect.
enum ReloadError {
    /// Nothing was written: the file or the state it describes is invalid.
    Rejected(anyhow::Error),
    /// Writing the maps failed after it started.
    Partial(anyhow::Error),
}

fn reload(
    opts: &RunOptions,
    placement: &Placement,
    running_router: &RouterSettings,
    sync: &mut Sync,
    reason: &str,
) -> Result<Config, ReloadError> {
    let config = config::load(&opts.config).map_err(|e| ReloadError::Rejected(e.into()))?;
    let wanted = Placement::resolve(
        opts.cgroup.as_deref(),
        opts.bpffs.as_deref(),
        &config,
        &opts.config,
    )
    .map_err(ReloadError::Rejected)?;
    if &wanted != placement || config.router != *running_router {
        warn!(
            "daemon.cgroup, daemon.bpffs, daemon.router_listen and [router] take effect on \
             restart; sandboxes and routes apply now"
        );
    }
    let applied = sync.apply(&config.state).map_err(|err| match err {
        err @ SyncError::MapFull { .. } => ReloadError::Rejected(err.into()),
        err => ReloadError::Partial(err.into()),
    })?;
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

/// Notices when the config file's content changes. Cheap metadata is compared every poll; the
/// file is read only when that moved, and a reload happens only when the bytes differ.
struct WatchedFile {
    path: PathBuf,
    stamp: Option<(std::time::SystemTime, u64, u64)>,
    content: Option<Vec<u8>>,
}

impl WatchedFile {
    fn new(path: &Path) -> WatchedFile {
        WatchedFile {
            path: path.to_owned(),
            stamp: Self::stamp(path),
            content: std::fs::read(path).ok(),
        }
    }

    /// (mtime, size, inode): an in-place write, a rename over the file, and a ConfigMap's
    /// symlink swap all move it.
    fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len(), meta.ino()))
    }

    fn changed(&mut self) -> bool {
        let stamp = Self::stamp(&self.path);
        if stamp == self.stamp {
            return false;
        }
        self.stamp = stamp;
        let content = std::fs::read(&self.path).ok();
        if content == self.content {
            return false;
        }
        self.content = content;
        true
    }
}

/// Keeps the maps in line with a desired state.
struct Sync {
    kernel: Kernel,
    /// The node router's view of the routes, swapped after each successful apply.
    table: Arc<ArcSwap<RouteTable>>,
    handoff: Handoff,
    /// None until the first apply, which adopts ids from what the kernel already holds.
    ids: Option<Ids>,
    /// What the maps hold, as last written by us; None when unknown (at start, or after a
    /// write failed part way), in which case it is read back from the kernel.
    written: Option<KernelState>,
    cookies: CookieCache,
    unresolved_members: usize,
}

struct Applied {
    members: usize,
    changed: bool,
}

impl Sync {
    fn new(kernel: Kernel, table: Arc<ArcSwap<RouteTable>>, handoff: Handoff) -> Sync {
        Sync {
            kernel,
            table,
            handoff,
            ids: None,
            written: None,
            cookies: CookieCache::default(),
            unresolved_members: 0,
        }
    }

    fn apply(&mut self, desired: &DesiredState) -> Result<Applied, SyncError> {
        let cookies = self.resolve_members(desired);
        let current = match self.written.take() {
            Some(state) => state,
            None => self.kernel.maps.read()?,
        };
        // Ids change only once the kernel has taken the new state: a rejected state must not
        // leave ids behind that the running one does not use.
        let mut ids = match &self.ids {
            Some(ids) => ids.clone(),
            None => Ids::adopt(&current, desired, &cookies),
        };
        let encoded = encode(desired, &mut ids, &cookies, self.handoff);
        let changed = encoded != current;
        if changed {
            match self.kernel.maps.apply(&current, &encoded) {
                Ok(()) => {}
                Err(err @ SyncError::MapFull { .. }) => {
                    // Refused before any write: the kernel still holds `current`.
                    self.written = Some(current);
                    return Err(err);
                }
                Err(err) => return Err(err),
            }
        }
        self.ids = Some(ids);
        self.table.store(Arc::new(RouteTable::from_state(desired)));
        let members = encoded.members.len();
        self.written = Some(encoded);
        Ok(Applied { members, changed })
    }

    fn resolve_members(&mut self, desired: &DesiredState) -> MemberCookies {
        let mut cookies = MemberCookies::new();
        let mut unresolved = 0;
        for sandbox in desired.sandboxes.values() {
            for path in &sandbox.members {
                match self.cookies.get(path) {
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
        let wanted = desired
            .sandboxes
            .values()
            .flat_map(|s| s.members.iter().map(PathBuf::as_path))
            .collect();
        self.cookies.retain_paths(&wanted);
        cookies
    }
}
