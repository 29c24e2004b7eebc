//! `redirector run`: the node daemon.
//!
//! Starts the kernel side (adopting whatever a previous run pinned) and the node router, makes
//! the maps match the desired state, then keeps them matching. The desired state is the config
//! file merged with the objects created through the local API (kept in the state file across
//! restarts). This loop is the only writer: file reloads (SIGHUP, content change) and API calls
//! are handled one at a time, each applied whole or not at all.
mod kube;
mod persist;
mod reset_worker;
mod resets;
mod status;
mod sync;
mod watch;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use arc_swap::ArcSwap;
use http::StatusCode;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{error, info, warn};

use self::{kube::KubeSide, sync::Sync, watch::WatchedFile};
use crate::{
    api::{
        control::{self, Mutation},
        server::{self as api_server, Call, Request},
        types::{ApiError, StateSpec},
    },
    config::{self, Config, DEFAULT_API_SOCKET, DEFAULT_BPFFS, DEFAULT_STATE_FILE},
    k8s::{podns, source},
    kernel::{
        maps::{Handoff, SyncError},
        prereq,
        programs::{self, AttachReport, Kernel},
        tables::{self, Accounting},
    },
    metrics::{self, Metrics},
    router::{RouteTable, Router, RouterMaps},
    state::{DesiredState, Protocol},
};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    pub api_socket: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
    pub cleanup_on_exit: bool,
    pub poll_interval: Duration,
    /// Overrides `daemon.router_listen` when not empty.
    pub router_listen: Vec<SocketAddr>,
    /// Overrides `daemon.metrics_listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Turns the Kubernetes source on (as `[kubernetes] enabled = true`).
    pub kubernetes: bool,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: Option<String>,
    /// Mount a bpffs where the pins go if none is there (always on with Kubernetes).
    pub mount_bpffs: bool,
    /// Count fast-path connections in the kernel (see `programs::LoadOptions`).
    pub count_fast_path: bool,
}

impl RunOptions {
    /// The config file as the flags amend it.
    fn amend(&self, mut config: Config) -> Config {
        if !self.router_listen.is_empty() {
            config.router.listen = self.router_listen.clone();
        }
        if self.metrics_listen.is_some() {
            config.daemon.metrics_listen = self.metrics_listen;
        }
        config.kubernetes.enabled |= self.kubernetes;
        if self.kubeconfig.is_some() {
            config.kubernetes.kubeconfig = self.kubeconfig.clone();
        }
        if self.node_name.is_some() {
            config.kubernetes.node_name = self.node_name.clone();
        }
        config
    }

    /// The Kubernetes source's settings, when it is on.
    fn kube_settings(&self, config: &Config) -> anyhow::Result<Option<source::Settings>> {
        let k = &config.kubernetes;
        if !k.enabled {
            return Ok(None);
        }
        let node_name = k.node_name.clone().ok_or_else(|| {
            anyhow!(
                "the Kubernetes source needs this node's name: set NODE_NAME (the downward \
                 API's spec.nodeName), --node-name, or `node_name` in [kubernetes]"
            )
        })?;
        Ok(Some(source::Settings {
            kubeconfig: k.kubeconfig.clone(),
            node_name,
            proc_root: k
                .proc_root
                .clone()
                .unwrap_or_else(|| PathBuf::from("/proc")),
            resync: self.poll_interval,
        }))
    }
}

/// Where the daemon attaches, pins, listens and keeps state: flags win over the file, then
/// defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub api_socket: PathBuf,
    pub state_file: PathBuf,
}

impl Placement {
    pub fn resolve(opts: &RunOptions, config: &Config) -> anyhow::Result<Placement> {
        // On a cluster the pods' cgroup is the kubelet's: found, not configured.
        let kubepods = || {
            config
                .kubernetes
                .enabled
                .then(|| prereq::cgroup2_mount().ok())
                .flatten()
                .and_then(|root| podns::kubepods_cgroup(&root))
        };
        let cgroup = opts
            .cgroup
            .clone()
            .or_else(|| config.daemon.cgroup.clone())
            .or_else(kubepods)
            .ok_or_else(|| {
                anyhow!(
                    "no attach cgroup: set `cgroup` in the [daemon] table of {} or pass --cgroup{}",
                    opts.config.display(),
                    if config.kubernetes.enabled {
                        " (no kubepods.slice or kubepods cgroup under the cgroup2 mount)"
                    } else {
                        ""
                    }
                )
            })?;
        let pick = |flag: &Option<PathBuf>, file: &Option<PathBuf>, default: &str| {
            flag.clone()
                .or_else(|| file.clone())
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Ok(Placement {
            cgroup,
            bpffs: pick(&opts.bpffs, &config.daemon.bpffs, DEFAULT_BPFFS),
            api_socket: pick(
                &opts.api_socket,
                &config.daemon.api_socket,
                DEFAULT_API_SOCKET,
            ),
            state_file: pick(
                &opts.state_file,
                &config.daemon.state_file,
                DEFAULT_STATE_FILE,
            ),
        })
    }
}

/// The running daemon: what it was told, and what it holds.
struct Daemon {
    opts: RunOptions,
    placement: Placement,
    /// The config file as last accepted.
    file: Config,
    /// Objects created through the API.
    api: DesiredState,
    /// `file` and `api` together: what the kernel and the router hold.
    merged: DesiredState,
    /// The config file as the poll last saw it.
    watched: WatchedFile,
    /// The Kubernetes source and the last state it published.
    kube: Option<KubeSide>,
    sync: Sync,
    report: AttachReport,
    /// How the programs were loaded (which hooks this daemon needs).
    load: programs::LoadOptions,
    router: Option<Router>,
    /// Counts the kernel's LRU tables (their evictions are derived, not counted by the kernel).
    tables: Option<Accounting>,
    metrics: Arc<Metrics>,
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    prereq::check_root()?;
    // Before the router starts: it sizes its shedding margin from the limit it finds.
    crate::kernel::limits::raise_nofile();
    // The watcher's first copy is taken before the file is read, so a change written while the
    // daemon starts (or waits for the cluster) is noticed at the first poll, not lost.
    let watched = WatchedFile::new(&opts.config);
    let file = opts.amend(config::load(&opts.config)?);
    let kube_settings = opts.kube_settings(&file)?;
    let placement = Placement::resolve(&opts, &file)?;
    prereq::check_cgroup(&placement.cgroup)?;
    if (file.kubernetes.enabled || opts.mount_bpffs)
        && let Some(at) = prereq::mount_bpffs_if_missing(&placement.bpffs)?
    {
        info!(at = %at.display(), "no bpffs was mounted; mounted one");
    }
    prereq::check_bpffs(&placement.bpffs)?;

    // Bind the API before touching the kernel: a second daemon on the same socket stops here.
    let api_listener = api_server::bind(&placement.api_socket)
        .with_context(|| format!("cannot serve the API on {}", placement.api_socket.display()))?;
    let metrics = Arc::new(Metrics::new());
    let metrics_listener = match file.daemon.metrics_listen {
        Some(addr) => Some(
            metrics::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?,
        ),
        None => None,
    };

    // Served from here on, so probes answer while the daemon waits for the cluster: /healthz
    // says "starting" until the control loop runs, /readyz says not ready.
    let (calls_tx, mut calls) = mpsc::channel::<Call>(64);
    let metrics_task = metrics_listener
        .map(|listener| tokio::spawn(metrics::serve(listener, metrics.clone(), calls_tx.clone())));

    let load = programs::LoadOptions {
        count_fast_path: opts.count_fast_path,
        handoff: !file.router.listen.is_empty(),
    };
    let (mut kernel, resets, report) = programs::start(&placement.cgroup, &placement.bpffs, load)
        .context("starting the kernel programs")?;
    info!(
        cgroup = %placement.cgroup.display(),
        bpffs = %placement.bpffs.display(),
        programs = %report.identity,
        attached = ?report.attached,
        adopted = ?report.adopted,
        "programs in place"
    );
    for stale in &report.detached {
        info!(pins = %stale.display(), "detached programs of a cgroup no longer configured");
    }

    let api = load_api_state(&placement.state_file, &file.state);
    let mut kube = match kube_settings {
        Some(settings) => {
            let source = source::start(settings)
                .await
                .context("starting the Kubernetes source")?;
            // Until the cluster has been read whole, the kernel keeps what it last applied:
            // applying the file alone now would drop every Sandbox's routes.
            match first_update(&source).await? {
                Some(update) => Some(KubeSide::new(source, update)),
                None => {
                    // Asked to stop before the first sync: nothing was applied, the pinned
                    // state is as the previous run left it.
                    let _ = std::fs::remove_file(&placement.api_socket);
                    return Ok(());
                }
            }
        }
        None => None,
    };
    let base = control::merge(&file.state, &api).unwrap_or_else(|_| file.state.clone());
    let merged = match &mut kube {
        Some(kube) => kube.overlay(base),
        None => base,
    };

    let table = Arc::new(ArcSwap::from_pointee(RouteTable::from_state(&merged)));
    let router = start_router(&file, &mut kernel, table.clone(), metrics.clone()).await?;
    let tables = start_table_accounting(&mut kernel, router.as_ref());
    let handoff = Handoff {
        v4: router.is_some() && file.router.listen.iter().any(SocketAddr::is_ipv4),
        v6: router.is_some() && file.router.listen.iter().any(SocketAddr::is_ipv6),
    };
    let mut sync = Sync::new(kernel, resets, table, handoff);
    let applied = sync.apply(&merged).context("applying the desired state")?;
    if router.is_some() && file.router.reset_bypassed {
        sync.reset_bypassed(&merged, &placement.cgroup);
    }
    if !report.superseded.is_empty() {
        // Ours have run beside them since `start`, and the maps now hold the desired state.
        programs::retire(&placement.bpffs, &report.superseded);
        info!(programs = %report.identity, replaced = ?report.superseded,
            "detached the programs of another build");
    }

    metrics.set_ready();
    let api_task = tokio::spawn(api_server::serve(api_listener, calls_tx.clone()));
    drop(calls_tx);
    info!(
        config = %opts.config.display(),
        api = %placement.api_socket.display(),
        services = merged.services.len(),
        sandboxes = merged.sandboxes.len(),
        groups = merged.groups.len(),
        routes = merged.route_count(),
        members = applied.members,
        "ready"
    );

    let mut daemon = Daemon {
        opts,
        placement,
        file,
        api,
        merged,
        watched,
        kube,
        sync,
        report,
        load,
        router,
        tables,
        metrics,
    };
    let result = daemon.serve(&mut calls).await;

    api_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    let _ = std::fs::remove_file(&daemon.placement.api_socket);
    daemon.shutdown().await;
    result
}

/// The API-created objects saved by an earlier run, if they still fit the config file.
fn load_api_state(state_file: &Path, file: &DesiredState) -> DesiredState {
    let spec = match persist::load(state_file) {
        Ok(Some(spec)) => spec,
        Ok(None) => return DesiredState::default(),
        Err(err) => {
            let aside = persist::quarantine(state_file);
            error!(error = %crate::error_chain(&err), moved_to = ?aside, "state file unreadable; starting without API objects");
            return DesiredState::default();
        }
    };
    let api = match spec.to_state() {
        Ok(api) => api,
        Err(issues) => {
            error!(
                ?issues,
                "state file holds invalid objects; starting without API objects"
            );
            return DesiredState::default();
        }
    };
    match control::merge(file, &api) {
        Ok(_) => {
            info!(
                services = api.services.len(),
                sandboxes = api.sandboxes.len(),
                groups = api.groups.len(),
                state_file = %state_file.display(),
                "restored objects created through the API"
            );
            api
        }
        Err(err) => {
            // Keep the file as it is: fixing the config and restarting brings them back.
            error!(error = %err, ?err.issues, state_file = %state_file.display(),
                "objects created through the API no longer fit the config file; \
                 starting without them (the state file is kept)");
            DesiredState::default()
        }
    }
}

/// Starts counting the LRU tables; without it only the derived eviction counters are missing.
fn start_table_accounting(kernel: &mut Kernel, router: Option<&Router>) -> Option<Accounting> {
    let tables = kernel.tables.take()?;
    let taken: Box<dyn Fn() -> u64 + Send> = match router {
        Some(router) => {
            let stats = router.stats.clone();
            Box::new(move || stats.handoff_records_taken.load(Ordering::Relaxed))
        }
        None => Box::new(|| 0),
    };
    match Accounting::start(tables, taken, tables::INTERVAL) {
        Ok(accounting) => Some(accounting),
        Err(err) => {
            warn!(error = %err, "cannot start counting the kernel's LRU tables");
            None
        }
    }
}

async fn start_router(
    file: &Config,
    kernel: &mut programs::Kernel,
    table: Arc<ArcSwap<RouteTable>>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<Router>> {
    if file.router.listen.is_empty() {
        if file
            .state
            .services
            .values()
            .any(|s| s.protocol == Protocol::Http)
        {
            info!("no daemon.router_listen: HTTP services get L4 steering only");
        }
        return Ok(None);
    }
    let maps = match (
        kernel.orig_dst.take(),
        kernel.router.take(),
        kernel.router_sockets.take(),
    ) {
        (Some(orig_dst), Some(config), Some(sockets)) => RouterMaps {
            orig_dst,
            config,
            sockets,
        },
        _ => return Ok(None),
    };
    let router = Router::start(&file.router, table, maps, metrics)
        .await
        .context("starting the node router")?;
    Ok(Some(router))
}

impl Daemon {
    /// Reacts to SIGHUP, file changes, API calls and termination until asked to stop.
    async fn serve(&mut self, calls: &mut mpsc::Receiver<Call>) -> anyhow::Result<()> {
        let mut hangup = signal(SignalKind::hangup())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(self.opts.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut kube_updates = self.kube.as_ref().map(|k| k.source.updates.clone());
        // The member poll in flight: resolving every member path enters each namespace (and a
        // path may lead through a hung filesystem), so it runs on the blocking pool and the
        // loop keeps answering meanwhile.
        let mut poll: Option<JoinHandle<sync::Found>> = None;

        loop {
            tokio::select! {
                _ = hangup.recv() => self.reload("SIGHUP"),
                _ = tick.tick() => {
                    if self.watched.changed() {
                        self.reload("file changed");
                    } else if poll.is_none() {
                        let paths = sync::member_paths(&self.merged);
                        poll = Some(tokio::task::spawn_blocking(move || sync::resolve(&paths)));
                    }
                }
                Some(found) = poll_done(&mut poll) => {
                    if let Err(err) = self.sync.follow_members(&self.merged, found) {
                        warn!(error = %crate::error_chain(&err), "following member namespaces failed");
                    }
                }
                Some(call) = calls.recv() => self.call(call),
                Some(()) = kube_changed(&mut kube_updates) => self.kube_changed(),
                _ = terminate.recv() => return Ok(()),
                _ = interrupt.recv() => return Ok(()),
            }
        }
    }

    /// Answers one API call: at once, or, when the answer needs a walk of the kernel's
    /// counters, from the blocking pool while the loop goes on.
    fn call(&mut self, call: Call) {
        let deferred = match &call.request {
            Request::Query(query) => status::off_loop(self, query),
            Request::Mutate(_) => None,
        };
        match deferred {
            Some(work) => {
                tokio::task::spawn_blocking(move || {
                    let _ = call.reply.send(work());
                });
            }
            None => {
                let answer = self.answer(call.request);
                let _ = call.reply.send(answer);
            }
        }
    }

    fn answer(&mut self, request: Request) -> Result<serde_json::Value, ApiError> {
        match request {
            Request::Query(query) => status::query(self, query),
            Request::Mutate(mutation) => {
                let result = self.mutate(mutation);
                self.metrics.api_change(match &result {
                    Ok(_) => "ok",
                    Err(e) if e.status.is_server_error() => "failed",
                    Err(_) => "rejected",
                });
                result
            }
        }
    }

    /// Applies one API change whole, or nothing of it.
    fn mutate(&mut self, mutation: Mutation) -> Result<serde_json::Value, ApiError> {
        let described = format!("{mutation:?}");
        let next_api = control::plan(&self.file.state, &self.api, mutation)?;
        let merged = self.with_kube(control::merge(&self.file.state, &next_api)?);
        self.sync.apply(&merged).map_err(|err| match err {
            err @ SyncError::MapFull { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "map_full",
                err.to_string(),
            ),
            err => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "kernel_write_failed",
                format!("{}; the next change retries", crate::error_chain(&err)),
            ),
        })?;
        if let Err(err) = persist::save(
            &self.placement.state_file,
            &StateSpec::from_state(&next_api),
        ) {
            // Not durable means not done: put the kernel back as it was.
            if let Err(revert) = self.sync.apply(&self.merged) {
                error!(error = %revert, "reverting after a failed save failed too");
            }
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "persist_failed",
                crate::error_chain(&err),
            ));
        }
        self.api = next_api;
        self.merged = merged;
        self.forget_gone_sandboxes();
        info!(change = %described, "API change applied");
        Ok(status::summary(&self.merged))
    }

    /// Drops the metric series of routing keys the applied state no longer has (requests are
    /// labelled by routing key, so group keys count too).
    fn forget_gone_sandboxes(&self) {
        let merged = &self.merged;
        self.metrics.retain_sandboxes(|key| {
            merged.sandboxes.contains_key(key) || merged.groups.contains_key(key)
        });
    }

    /// File and API objects with the Kubernetes source's on top, when they fit together.
    fn with_kube(&mut self, base: DesiredState) -> DesiredState {
        match &mut self.kube {
            Some(kube) => kube.overlay(base),
            None => base,
        }
    }

    /// The Kubernetes source published a new state: apply it with the file and API objects.
    fn kube_changed(&mut self) {
        let Some(kube) = &mut self.kube else {
            return;
        };
        let Some(update) = kube.source.updates.borrow().clone() else {
            return;
        };
        kube.update = update;
        let base = match control::merge(&self.file.state, &self.api) {
            Ok(base) => base,
            Err(err) => {
                error!(error = %err, "file and API objects no longer merge; keeping the running state");
                return;
            }
        };
        let merged = self.with_kube(base);
        match self.sync.apply(&merged) {
            Ok(applied) => {
                if applied.changed {
                    info!(
                        sandboxes = merged.sandboxes.len(),
                        groups = merged.groups.len(),
                        routes = merged.route_count(),
                        members = applied.members,
                        "Kubernetes change applied"
                    );
                }
                self.merged = merged;
                self.forget_gone_sandboxes();
            }
            Err(err) => {
                error!(error = %crate::error_chain(&err), "applying the Kubernetes change failed; the next change retries");
            }
        }
    }

    fn reload(&mut self, reason: &str) {
        match self.try_reload(reason) {
            Ok(()) => self.metrics.reload("ok"),
            Err(ReloadError::Rejected(err)) => {
                self.metrics.reload("rejected");
                error!(reason, error = %format!("{err:#}"), "reload rejected; running state unchanged")
            }
            Err(ReloadError::Partial(err)) => {
                self.metrics.reload("failed");
                error!(reason, error = %format!("{err:#}"),
                    "reload failed part way; the kernel holds a mix of old and new state, the next reload retries")
            }
        }
    }

    fn try_reload(&mut self, reason: &str) -> Result<(), ReloadError> {
        let config = self
            .opts
            .amend(config::load(&self.opts.config).map_err(|e| ReloadError::Rejected(e.into()))?);
        let wanted = Placement::resolve(&self.opts, &config).map_err(ReloadError::Rejected)?;
        if wanted != self.placement
            || config.router != self.file.router
            || config.daemon.metrics_listen != self.file.daemon.metrics_listen
        {
            warn!(
                "[daemon] settings and [router] take effect on restart; services, sandboxes, \
                 groups and routes apply now"
            );
        }
        let merged = control::merge(&config.state, &self.api)
            .map_err(|e| ReloadError::Rejected(anyhow!("{e} {:?}", e.issues)))?;
        let merged = self.with_kube(merged);
        let applied = self.sync.apply(&merged).map_err(|err| match err {
            err @ SyncError::MapFull { .. } => ReloadError::Rejected(err.into()),
            err => ReloadError::Partial(err.into()),
        })?;
        info!(
            reason,
            services = merged.services.len(),
            sandboxes = merged.sandboxes.len(),
            groups = merged.groups.len(),
            routes = merged.route_count(),
            members = applied.members,
            changed = applied.changed,
            "reload applied"
        );
        self.file = config;
        self.merged = merged;
        self.forget_gone_sandboxes();
        Ok(())
    }

    async fn shutdown(mut self) {
        if let Some(router) = self.router.take() {
            info!(counters = ?router.stats.snapshot(), "node router counters");
            router.shutdown().await;
        }
        match self.sync.kernel.counters.counters() {
            Ok(counters) => info!(?counters, "kernel counters (all CPUs, since load)"),
            Err(err) => warn!(error = %crate::error_chain(&err), "cannot read kernel counters"),
        }
        if self.opts.cleanup_on_exit {
            let bpffs = self.placement.bpffs.clone();
            drop(self);
            match programs::uninstall(&bpffs) {
                Ok(_) => info!(bpffs = %bpffs.display(), "detached and removed all pins"),
                Err(err) => {
                    error!(bpffs = %bpffs.display(), error = %crate::error_chain(&err), "cleanup failed")
                }
            }
        } else {
            info!("exiting; steering stays in place (pinned), `redirector uninstall` removes it");
        }
    }
}

/// Waits until the Kubernetes source has read the cluster whole; None when asked to stop
/// first.
async fn first_update(source: &source::Source) -> anyhow::Result<Option<Arc<source::Update>>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut updates = source.updates.clone();
    loop {
        if let Some(update) = updates.borrow_and_update().clone() {
            return Ok(Some(update));
        }
        tokio::select! {
            changed = updates.changed() => changed.context("the Kubernetes source stopped")?,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                let health = source.health.lock().map(|h| h.last_error.clone()).unwrap_or_default();
                warn!(last_error = ?health, "still waiting for the Kubernetes API server; the kernel keeps its last state");
            }
            _ = terminate.recv() => return Ok(None),
            _ = interrupt.recv() => return Ok(None),
        }
    }
}

/// The answer of the member poll in flight, once it is there; never, while there is none.
async fn poll_done(poll: &mut Option<JoinHandle<sync::Found>>) -> Option<sync::Found> {
    let Some(handle) = poll else {
        return std::future::pending().await;
    };
    let found = handle.await;
    *poll = None;
    match found {
        Ok(found) => Some(found),
        Err(err) => {
            error!(error = %err, "the member poll failed; trying again at the next one");
            None
        }
    }
}

/// Resolves when the Kubernetes source has published something new; never without one.
async fn kube_changed(
    updates: &mut Option<tokio::sync::watch::Receiver<Option<Arc<source::Update>>>>,
) -> Option<()> {
    match updates {
        Some(rx) => rx.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// Why a reload did not take effect.
enum ReloadError {
    /// Nothing was written: the file or the state it describes is invalid.
    Rejected(anyhow::Error),
    /// Writing the maps failed after it started.
    Partial(anyhow::Error),
}
