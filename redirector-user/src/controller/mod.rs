//! `redirector controller`: the cluster's sandbox controller. It turns each Sandbox's `forkOf`
//! into a fork Deployment and Services, keeps the Sandbox's and RouteGroups' status, deletes
//! Sandboxes whose TTL ran out, and removes forks when their Sandbox goes.
//!
//! Several replicas may run: they elect a leader on a `Lease`, and only the leader reconciles.
//! A replica that loses the lease exits (its Deployment restarts it as a stand-by) rather than
//! risk two writers.
mod group;
mod health;
pub mod sandbox;
pub mod status;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Pod, Service as KubeService},
};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{Controller, reflector::ObjectRef, watcher},
};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{debug, error, info, warn};

use crate::k8s::{
    crd::{RouteGroup, Sandbox},
    fork::SANDBOX_LABEL,
    source::kube_client,
};
use health::Phase;
use sandbox::Context;

pub struct ControllerOptions {
    pub kubeconfig: Option<PathBuf>,
    pub lease_namespace: String,
    pub lease_name: String,
    /// Unique among the replicas (the pod's name).
    pub identity: String,
    pub lease_duration: Duration,
    pub health_listen: Option<SocketAddr>,
}

/// The identity a replica takes when none is given: host name and process id.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "redirector".to_owned());
    format!("{host}-{}", std::process::id())
}

pub async fn run(opts: ControllerOptions) -> anyhow::Result<()> {
    let phase = health::State::default();
    if let Some(addr) = opts.health_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for /healthz and /readyz"))?;
        info!(%addr, "serving /healthz and /readyz");
        tokio::spawn(health::serve(listener, phase.clone()));
    }
    let client = kube_client(opts.kubeconfig.as_deref())
        .await
        .context("cannot build a Kubernetes client")?;
    let duration = opts.lease_duration.as_secs().max(2);
    // Renew a third of the lease before it runs out: room for a slow API server.
    let grace = (duration / 3).max(1);
    let manager = LeaseManagerBuilder::new(client.clone(), &opts.lease_name)
        .with_namespace(&opts.lease_namespace)
        .with_identity(&opts.identity)
        .with_duration(duration)
        .with_grace(grace)
        .build()
        .await
        .with_context(|| {
            format!(
                "cannot use the Lease {}/{}",
                opts.lease_namespace, opts.lease_name
            )
        })?;
    let (mut leader, lease_task) = manager.watch().await;
    phase.set(Phase::StandingBy);
    info!(identity = %opts.identity, lease = %format!("{}/{}", opts.lease_namespace, opts.lease_name),
          lease_seconds = duration, "standing by for the lease");

    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leader.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the lease manager stopped: {:?}", lease_task.await);
                }
            }
            () = &mut shutdown => {
                drop(leader);
                let _ = lease_task.await;
                info!("stopped while standing by");
                return Ok(());
            }
        }
    }
    info!(identity = %opts.identity, "leading: reconciling Sandboxes and RouteGroups");
    phase.set(Phase::Leading);
    let mut work = tokio::spawn(reconcile_all(client));
    let outcome = loop {
        tokio::select! {
            changed = leader.changed() => {
                if changed.is_err() || !*leader.borrow_and_update() {
                    break Err(anyhow::anyhow!("lost the lease: exiting so that only the new leader writes"));
                }
            }
            finished = &mut work => {
                break Err(anyhow::anyhow!("the reconcilers stopped: {finished:?}"));
            }
            () = &mut shutdown => break Ok(()),
        }
    };
    work.abort();
    phase.set(Phase::Stopping);
    // Dropping the receiver releases the lease, so a stand-by takes over at once rather than
    // after the lease runs out.
    drop(leader);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => info!("lease released"),
        other => {
            warn!(result = ?other.map(|r| r.map(|r| r.map(|_| ()))), "lease not released cleanly")
        }
    }
    outcome
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            error!(error = %err, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: stopping"),
    }
}

/// The Sandbox and RouteGroup controllers, until one of them ends.
async fn reconcile_all(client: Client) {
    let ctx = Arc::new(Context {
        client: client.clone(),
    });
    // Only the objects the controller made: a watch on every Pod of the cluster would cost
    // memory for nothing.
    let made = watcher::Config::default().labels(SANDBOX_LABEL);
    let owner = |object: &dyn OwnedBy| object.owner();
    let sandboxes = Controller::new(
        Api::<Sandbox>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<Deployment>::all(client.clone()),
        made.clone(),
        move |d| owner(&d),
    )
    .watches(Api::<Pod>::all(client.clone()), made.clone(), move |p| {
        owner(&p)
    })
    .watches(Api::<KubeService>::all(client.clone()), made, move |s| {
        owner(&s)
    })
    .run(sandbox::reconcile, sandbox::error_policy, ctx.clone())
    .for_each(|result| async move {
        match result {
            Ok((object, _)) => debug!(sandbox = %object, "reconciled"),
            Err(err) => debug!(error = %err, "sandbox controller"),
        }
    });

    let groups = Controller::new(
        Api::<RouteGroup>::all(client.clone()),
        watcher::Config::default(),
    );
    let store = groups.store();
    let groups = groups
        .watches(
            Api::<Sandbox>::all(client),
            watcher::Config::default(),
            move |sandbox| {
                let namespace = sandbox.namespace();
                store
                    .state()
                    .into_iter()
                    .filter(|g| g.namespace() == namespace)
                    .map(|g| ObjectRef::from_obj(g.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .run(group::reconcile, group::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                debug!(error = %err, "route group controller");
            }
        });
    tokio::join!(sandboxes, groups);
}

/// Objects the controller made, which name their Sandbox.
trait OwnedBy {
    fn owner(&self) -> Option<ObjectRef<Sandbox>>;
}

impl<K: kube::Resource> OwnedBy for K {
    fn owner(&self) -> Option<ObjectRef<Sandbox>> {
        let (namespace, name) = sandbox::owner_of(self)?;
        Some(ObjectRef::new(&name).within(&namespace))
    }
}
