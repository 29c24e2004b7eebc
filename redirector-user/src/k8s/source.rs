//! The node agent's Kubernetes source: watches the cluster and publishes the part of the
//! desired state it asks for.
//!
//! Five reflectors (Sandboxes, RouteGroups, Services, EndpointSlices, and the Pods of this node)
//! keep a local copy of what the agent needs. Their watches restart with backoff, and a
//! `410 Gone` makes them relist; while the API server is unreachable the copies stay as they
//! were, so the state published (and the kernel) stays as last applied: a control plane that is
//! down never flushes routes. After any change, and every resync interval (pods' processes
//! appear without an API event), the state is derived again and published if it differs.
use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Pod, Service as KubeService},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::{
    crd::{RouteGroup, Sandbox},
    derive::{self, Derived, ObjectIssue, SelectorKey, Snapshot},
    podns::PodNamespaces,
};
use crate::state::DesiredState;

/// How the agent reaches the API server and which node it serves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// None: in-cluster configuration, else `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    /// Where pods' processes are looked for (the host's `/proc`).
    pub proc_root: PathBuf,
    /// How often members are resolved again without an API event.
    pub resync: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (not in a cluster, no kubeconfig)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// What the agent publishes: the state derived from the cluster, and the problems found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Update {
    pub state: DesiredState,
    pub issues: Vec<ObjectIssue>,
    pub members: Vec<MemberReport>,
}

/// One member pod, resolved to a namespace or not (with the reason).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberReport {
    pub key: String,
    pub pod: String,
    pub netns: Option<PathBuf>,
    pub error: Option<String>,
}

/// The agent's health, for `redirector status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub node: String,
    /// Every watch has listed once and none is failing now.
    pub connected: bool,
    /// Watches that have completed their initial list, of [`WATCHES`].
    pub watches_synced: usize,
    /// Watches failing now (retrying with backoff).
    pub watches_failing: usize,
    pub last_error: Option<String>,
    /// Seconds since the epoch of the last change published (a new state from the cluster).
    pub last_sync: Option<u64>,
    pub objects: ObjectCounts,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectCounts {
    pub sandboxes: usize,
    pub route_groups: usize,
    pub services: usize,
    pub endpoint_slices: usize,
    pub pods_on_node: usize,
}

/// Sandboxes, RouteGroups, Services, EndpointSlices, Pods.
pub const WATCHES: usize = 5;

impl Health {
    fn refresh(&mut self) {
        self.connected = self.watches_synced == WATCHES && self.watches_failing == 0;
    }
}

/// The running source: updates arrive on `updates` (None until the first full sync).
pub struct Source {
    pub updates: watch::Receiver<Option<Arc<Update>>>,
    pub health: Arc<Mutex<Health>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Source {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub async fn client(settings: &Settings) -> Result<Client, SourceError> {
    kube_client(settings.kubeconfig.as_deref()).await
}

/// A client from `kubeconfig`, or in-cluster (else `KUBECONFIG`, else `~/.kube/config`).
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<Client, SourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                SourceError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| SourceError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(SourceError::Infer)?,
    };
    Client::try_from(config).map_err(SourceError::Client)
}

/// Starts the watches and the deriving task.
pub async fn start(settings: Settings) -> Result<Source, SourceError> {
    let client = client(&settings).await?;
    let changed = Arc::new(Notify::new());
    let health = Arc::new(Mutex::new(Health {
        node: settings.node_name.clone(),
        ..Health::default()
    }));
    let mut tasks = Vec::new();
    let node_pods =
        watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
    let sliced = watcher::Config::default().labels(derive::SERVICE_NAME_LABEL);
    let sandboxes = watch_kind::<Sandbox>(
        Api::all(client.clone()),
        watcher::Config::default(),
        &changed,
        &health,
        &mut tasks,
    );
    let groups = watch_kind::<RouteGroup>(
        Api::all(client.clone()),
        watcher::Config::default(),
        &changed,
        &health,
        &mut tasks,
    );
    let services = watch_kind::<KubeService>(
        Api::all(client.clone()),
        watcher::Config::default(),
        &changed,
        &health,
        &mut tasks,
    );
    let slices = watch_kind::<EndpointSlice>(
        Api::all(client.clone()),
        sliced,
        &changed,
        &health,
        &mut tasks,
    );
    let pods = watch_kind::<Pod>(
        Api::all(client.clone()),
        node_pods,
        &changed,
        &health,
        &mut tasks,
    );
    let stores = Stores {
        sandboxes,
        groups,
        services,
        slices,
        pods,
    };
    let (tx, updates) = watch::channel(None);
    let selectors = SelectorWatches {
        client: client.clone(),
        changed: changed.clone(),
        health: health.clone(),
        active: HashMap::new(),
    };
    tasks.push(tokio::spawn(derive_loop(
        settings,
        stores,
        selectors,
        changed,
        health.clone(),
        tx,
    )));
    Ok(Source {
        updates,
        health,
        tasks,
    })
}

struct Stores {
    sandboxes: Store<Sandbox>,
    groups: Store<RouteGroup>,
    services: Store<KubeService>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
}

impl Stores {
    async fn ready(&self) {
        // Each resolves once its watch has listed; an error here means the writer is gone,
        // which only happens when the source shuts down.
        let _ = futures::join!(
            self.sandboxes.wait_until_ready(),
            self.groups.wait_until_ready(),
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
            self.pods.wait_until_ready(),
        );
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            sandboxes: self.sandboxes.state(),
            groups: self.groups.state(),
            services: self.services.state(),
            slices: self.slices.state(),
            pods: self.pods.state(),
            selected: HashMap::new(),
        }
    }
}

/// One pod watch per fork selector, cluster wide (a fork's pods run on any node), started when
/// a Sandbox starts using the selector and stopped when none does.
struct SelectorWatches {
    client: Client,
    changed: Arc<Notify>,
    health: Arc<Mutex<Health>>,
    active: HashMap<SelectorKey, (Store<Pod>, tokio::task::JoinHandle<()>)>,
}

impl SelectorWatches {
    /// Watches exactly `wanted`; returns the pods each one holds now.
    fn sync(&mut self, wanted: BTreeSet<SelectorKey>) -> HashMap<SelectorKey, Vec<Arc<Pod>>> {
        self.active.retain(|key, (_, task)| {
            let keep = wanted.contains(key);
            if !keep {
                task.abort();
            }
            keep
        });
        for key in wanted {
            if self.active.contains_key(&key) {
                continue;
            }
            let api = Api::<Pod>::namespaced(self.client.clone(), &key.namespace);
            let config = watcher::Config::default().labels(&key.selector);
            let (reader, writer) = reflector::store();
            let stream = reflector::reflector(
                writer,
                watcher(api, config).backoff(RetryBackoff::default()),
            );
            let kind = format!("Pod ({} {})", key.namespace, key.selector);
            let task = tokio::spawn(drive(
                kind,
                stream,
                self.changed.clone(),
                self.health.clone(),
                false,
            ));
            self.active.insert(key, (reader, task));
        }
        self.active
            .iter()
            .map(|(key, (store, _))| (key.clone(), store.state()))
            .collect()
    }
}

impl Drop for SelectorWatches {
    fn drop(&mut self) {
        for (_, task) in self.active.values() {
            task.abort();
        }
    }
}

/// A reflector for one kind, driven by its own task; every event wakes the deriving task.
fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: &Arc<Notify>,
    health: &Arc<Mutex<Health>>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, config).backoff(RetryBackoff::default()),
    );
    let kind = K::kind(&()).into_owned();
    tasks.push(tokio::spawn(drive(
        kind,
        stream,
        changed.clone(),
        health.clone(),
        true,
    )));
    reader
}

/// Drives one watch; `main` watches count towards [`WATCHES`] in the health report.
async fn drive<K>(
    kind: String,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    changed: Arc<Notify>,
    health: Arc<Mutex<Health>>,
    main: bool,
) {
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    let mut listed = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                let mut h = lock(&health);
                if failing {
                    info!(kind, "watch recovered");
                    failing = false;
                    h.watches_failing -= 1;
                }
                if matches!(event, watcher::Event::InitDone) {
                    if listed {
                        info!(
                            kind,
                            "watch listed again; the store holds the new list whole"
                        );
                    } else {
                        info!(kind, "watch listed");
                        listed = true;
                        if main {
                            h.watches_synced += 1;
                        }
                    }
                }
                h.refresh();
                drop(h);
                changed.notify_one();
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                // The history the watch resumes from was compacted away: the watcher lists
                // again, and the store swaps in the new list only once it is complete.
                info!(kind, "resource version too old (410 Gone); listing again");
            }
            Err(err) => {
                // The watcher retries with backoff by itself; say it once per outage.
                let text = crate::error_chain(&err);
                let mut h = lock(&health);
                if !failing {
                    warn!(kind, error = %text, "watch failed; retrying with backoff, keeping the last state");
                    failing = true;
                    h.watches_failing += 1;
                }
                h.last_error = Some(format!("{kind}: {text}"));
                h.refresh();
            }
        }
    }
}

async fn derive_loop(
    settings: Settings,
    stores: Stores,
    mut selectors: SelectorWatches,
    changed: Arc<Notify>,
    health: Arc<Mutex<Health>>,
    tx: watch::Sender<Option<Arc<Update>>>,
) {
    stores.ready().await;
    info!(node = %settings.node_name, "Kubernetes watches listed");
    let namespaces = Arc::new(Mutex::new(PodNamespaces::new(settings.proc_root.clone())));
    let mut last: Option<Arc<Update>> = None;
    loop {
        let mut snapshot = stores.snapshot();
        snapshot.selected = selectors.sync(derive::fork_selectors(&snapshot));
        let wanted = derive::member_pods(&snapshot);
        let all: std::collections::BTreeSet<_> = wanted.values().flatten().cloned().collect();
        // /proc scans and setns are blocking work: off the async threads.
        let resolver = namespaces.clone();
        let netns = match tokio::task::spawn_blocking(move || lock(&resolver).resolve(&all)).await {
            Ok(netns) => netns,
            Err(err) => {
                // Publishing with no member resolved would take every member out of the
                // kernel: keep the last state and try again at the next resync.
                warn!(error = %err, "resolving pod namespaces failed; keeping the last state");
                tokio::time::sleep(settings.resync).await;
                continue;
            }
        };
        let derived = derive::derive(&snapshot, &wanted, &netns);
        let update = Arc::new(to_update(derived));
        {
            let mut h = lock(&health);
            h.objects = ObjectCounts {
                sandboxes: snapshot.sandboxes.len(),
                route_groups: snapshot.groups.len(),
                services: snapshot.services.len(),
                endpoint_slices: snapshot.slices.len(),
                pods_on_node: snapshot.pods.len(),
            };
        }
        if last.as_deref() != Some(&update) {
            lock(&health).last_sync = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
            last = Some(update.clone());
            if tx.send(Some(update)).is_err() {
                return;
            }
        }
        // Debounce bursts (a Deployment rollout is many events) into one derive.
        tokio::select! {
            _ = changed.notified() => tokio::time::sleep(Duration::from_millis(50)).await,
            _ = tokio::time::sleep(settings.resync) => {}
        }
    }
}

fn to_update(derived: Derived) -> Update {
    let members = derived
        .members
        .into_iter()
        .flat_map(|(key, pods)| {
            pods.into_iter().map(move |(pod, resolved)| MemberReport {
                key: key.clone(),
                pod: pod.name,
                netns: resolved.as_ref().ok().cloned(),
                error: resolved.err(),
            })
        })
        .collect();
    Update {
        state: derived.state,
        issues: derived.issues,
        members,
    }
}

/// Watch retries: 250 ms doubling to at most 5 s, with jitter so that the agents of a whole
/// cluster do not retry in step. Shorter than client-go's 30 s ceiling: a node agent that
/// comes back late steers late, and one list per node every few seconds is light.
#[derive(Debug, Clone)]
struct RetryBackoff {
    next: Duration,
    seed: u64,
}

impl RetryBackoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(5);
}

impl Default for RetryBackoff {
    fn default() -> Self {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            | 1;
        RetryBackoff {
            next: Self::FIRST,
            seed,
        }
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // xorshift: jitter needs spread, not quality.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Between half and all of the nominal delay.
        let jitter = 0.5 + (self.seed % 1000) as f64 / 2000.0;
        Some(delay.mul_f64(jitter))
    }
}

impl kube::runtime::utils::Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
