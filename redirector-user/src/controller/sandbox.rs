//! Reconciling one Sandbox: its TTL, its fork Deployments and Services, its status, and the
//! clean-up its finalizer holds the deletion for.
use std::{collections::BTreeSet, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Pod, Service as KubeService},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy},
    runtime::{
        controller::Action,
        finalizer::{Event, finalizer},
    },
};
use serde_json::json;
use tracing::{debug, info, warn};

use super::status::{self, Failure, ForkReport};
use crate::{
    k8s::{
        crd::{Fork, ForkStatus, ForkedService, Sandbox, SandboxStatus, parse_ttl},
        derive::SERVICE_NAME_LABEL,
        fork::{self, SANDBOX_LABEL},
    },
    routing_key,
};

/// Held on every Sandbox until its forks are gone.
pub const FINALIZER: &str = "redirector.dev/forks";
/// Field manager of everything the controller writes.
pub const MANAGER: &str = "redirector-controller";
/// On every object the controller makes: `namespace/name` of its Sandbox (labels cannot hold
/// every name; this can).
pub const SANDBOX_REF_ANNOTATION: &str = "redirector.dev/sandbox-ref";

/// How soon to look again at a Sandbox that is not Ready (forks given by `to` are not watched)
/// and one that is.
const RECHECK_NOT_READY: Duration = Duration::from_secs(5);
const RECHECK_READY: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("Sandbox has no namespace")]
    NoNamespace,
}

pub struct Context {
    pub client: Client,
}

pub async fn reconcile(sandbox: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let namespace = sandbox.namespace().ok_or(ReconcileError::NoNamespace)?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, sandbox, |event| async {
        match event {
            Event::Apply(sandbox) => apply(&sandbox, &ctx).await,
            Event::Cleanup(sandbox) => cleanup(&sandbox, &ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => ReconcileError::Finalizer(other.to_string()),
    })
}

pub fn sandbox_ref(sandbox: &Sandbox) -> String {
    format!(
        "{}/{}",
        sandbox.namespace().unwrap_or_default(),
        sandbox.name_any()
    )
}

async fn apply(sandbox: &Sandbox, ctx: &Context) -> Result<Action, ReconcileError> {
    let name = sandbox_ref(sandbox);
    let now = jiff::Timestamp::now();

    let mut expires_at = None;
    if let Some(ttl) = &sandbox.spec.ttl {
        // The API server checks the pattern; a bad value here came around it.
        if let (Ok(ttl), Some(created)) = (parse_ttl(ttl), &sandbox.metadata.creation_timestamp) {
            let expiry = jiff::SignedDuration::try_from(ttl)
                .ok()
                .and_then(|d| created.0.checked_add(d).ok())
                .unwrap_or(jiff::Timestamp::MAX);
            if expiry <= now {
                info!(sandbox = %name, ttl = %ttl.as_secs(), "TTL expired: deleting the Sandbox");
                let api: Api<Sandbox> =
                    Api::namespaced(ctx.client.clone(), &sandbox.namespace().unwrap_or_default());
                match api
                    .delete(&sandbox.name_any(), &DeleteParams::default())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(err) => return Err(err.into()),
                }
                return Ok(Action::await_change());
            }
            expires_at = Some(expiry);
        }
    }

    let mut reports = Vec::new();
    let mut forks = Vec::new();
    let mut failures: Vec<Failure> = Vec::new();
    let mut wanted: BTreeSet<(String, String, String)> = BTreeSet::new();
    if let Err(err) = routing_key::validate(sandbox.routing_key()) {
        failures.push(Failure {
            reason: "InvalidRoutingKey".into(),
            message: format!("routing key {:?}: {err}", sandbox.routing_key()),
        });
    }
    for fork in &sandbox.spec.forks {
        if fork.fork_of.is_some() {
            match make_fork(sandbox, fork, ctx, &mut wanted).await? {
                Ok((report, made, image_problem)) => {
                    if let Some(message) = image_problem {
                        failures.push(Failure {
                            reason: "ImagePullError".into(),
                            message,
                        });
                    }
                    reports.push(report);
                    forks.push(made);
                }
                Err(failure) => failures.push(failure),
            }
        } else {
            reports.push(running_fork(sandbox, fork, ctx).await?);
        }
    }
    if failures.is_empty() {
        // A fork removed from the spec (or a Service no longer forked) leaves nothing behind.
        // Not while something failed: a baseline that is briefly missing keeps its fork.
        remove_unwanted(sandbox, ctx, &wanted).await?;
    }

    let failure = (!failures.is_empty()).then(|| Failure {
        reason: failures[0].reason.clone(),
        message: failures
            .iter()
            .map(|f| f.message.as_str())
            .collect::<Vec<_>>()
            .join("; "),
    });
    let old = sandbox.status.clone().unwrap_or_default();
    let generation = sandbox.metadata.generation;
    let status = SandboxStatus {
        observed_generation: generation,
        routing_key: Some(sandbox.routing_key().to_owned()),
        conditions: status::conditions(
            &old.conditions,
            &reports,
            failure.as_ref(),
            generation,
            Time(now),
        ),
        forks,
        expires_at: expires_at.map(|t| t.to_string()),
    };
    if status != old {
        let api: Api<Sandbox> =
            Api::namespaced(ctx.client.clone(), &sandbox.namespace().unwrap_or_default());
        // Every field named, absent ones as null: a merge patch would keep a stale `expiresAt`
        // or `forks` that this round no longer has.
        let patch = json!({ "status": {
            "observedGeneration": status.observed_generation,
            "routingKey": status.routing_key,
            "conditions": status.conditions,
            "forks": status.forks,
            "expiresAt": status.expires_at,
        }});
        api.patch_status(
            &sandbox.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await?;
        let ready = status::is_true(&status.conditions, status::READY);
        info!(sandbox = %name, ready, failure = ?failure.as_ref().map(|f| &f.reason), "status updated");
    }

    let ready = failure.is_none() && reports.iter().all(|r| r.ready > 0);
    let mut next = if ready {
        RECHECK_READY
    } else {
        RECHECK_NOT_READY
    };
    if let Some(expiry) = expires_at {
        let left = now
            .duration_until(expiry)
            .try_into()
            .unwrap_or(Duration::ZERO);
        next = next.min(left + Duration::from_millis(100));
    }
    Ok(Action::requeue(next))
}

/// Creates (or re-creates, when the Sandbox changed) one `forkOf` fork and reports on it; an
/// inner `Err` is why it cannot be made.
async fn make_fork(
    sandbox: &Sandbox,
    fork: &Fork,
    ctx: &Context,
    wanted: &mut BTreeSet<(String, String, String)>,
) -> Result<Result<(ForkReport, ForkStatus, Option<String>), Failure>, ReconcileError> {
    let Some(of) = &fork.fork_of else {
        return Ok(Err(Failure {
            reason: "InvalidFork".into(),
            message: "not a forkOf fork".into(),
        }));
    };
    let namespace = of
        .namespace
        .clone()
        .unwrap_or_else(|| sandbox.namespace().unwrap_or_default());
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(baseline) = deployments.get_opt(&of.name).await? else {
        return Ok(Err(Failure {
            reason: "BaselineNotFound".into(),
            message: format!("Deployment {namespace}/{} not found", of.name),
        }));
    };
    let services: Api<KubeService> = Api::namespaced(ctx.client.clone(), &namespace);
    let in_namespace = services.list(&ListParams::default()).await?.items;
    let mut plan = match fork::plan(sandbox, fork, &baseline, &in_namespace) {
        Ok(plan) => plan,
        Err(err) => {
            return Ok(Err(Failure {
                reason: err.reason().into(),
                message: format!("fork of {}: {err}", of.display_name()),
            }));
        }
    };
    let owner = sandbox_ref(sandbox);
    mark(&mut plan.deployment.metadata, &owner);
    if let Some(template) = plan
        .deployment
        .spec
        .as_mut()
        .and_then(|s| s.template.metadata.as_mut())
    {
        template
            .annotations
            .get_or_insert_with(Default::default)
            .insert(SANDBOX_REF_ANNOTATION.into(), owner.clone());
    }
    let fork_name = plan.deployment.name_any();
    wanted.insert(("Deployment".into(), namespace.clone(), fork_name.clone()));

    let existing = deployments.get_opt(&fork_name).await?;
    if let Some(existing) = &existing
        && existing.annotations().get(SANDBOX_REF_ANNOTATION) != Some(&owner)
    {
        return Ok(Err(Failure {
            reason: "NameTaken".into(),
            message: format!(
                "Deployment {namespace}/{fork_name} exists and is not this Sandbox's fork"
            ),
        }));
    }
    let made_from = existing
        .as_ref()
        .and_then(|d| d.annotations().get(fork::GENERATION_ANNOTATION).cloned());
    let generation = sandbox.metadata.generation.unwrap_or_default().to_string();
    let params = PatchParams::apply(MANAGER).force();
    if made_from.as_deref() != Some(generation.as_str()) {
        // Only a new Sandbox generation re-renders the fork: a baseline that changes later
        // does not change a fork under a running test.
        info!(sandbox = %owner, deployment = %format!("{namespace}/{fork_name}"),
              "applying the fork Deployment");
        deployments
            .patch(&fork_name, &params, &Patch::Apply(&plan.deployment))
            .await?;
    }
    let service_api: Api<KubeService> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut forked = Vec::new();
    for (baseline_service, mut service) in plan.services {
        mark(&mut service.metadata, &owner);
        let name = service.name_any();
        wanted.insert(("Service".into(), namespace.clone(), name.clone()));
        let present = in_namespace.iter().find(|s| s.name_any() == name);
        let current = present.is_some_and(|s| {
            s.annotations().get(fork::GENERATION_ANNOTATION) == Some(&generation)
                && s.annotations().get(SANDBOX_REF_ANNOTATION) == Some(&owner)
        });
        if let Some(present) = present
            && present.annotations().get(SANDBOX_REF_ANNOTATION) != Some(&owner)
        {
            return Ok(Err(Failure {
                reason: "NameTaken".into(),
                message: format!(
                    "Service {namespace}/{name} exists and is not this Sandbox's fork"
                ),
            }));
        }
        if !current {
            service
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(fork::GENERATION_ANNOTATION.into(), generation.clone());
            debug!(sandbox = %owner, service = %name, "applying a fork Service");
            service_api
                .patch(&name, &params, &Patch::Apply(&service))
                .await?;
        }
        forked.push(ForkedService {
            baseline: baseline_service,
            fork: name,
        });
    }

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = fork::fork_labels(sandbox, &of.name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let fork_pods = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let (ready, total) = status::pod_counts(&fork_pods);
    let problem = status::image_problem(&fork_pods);
    Ok(Ok((
        ForkReport {
            name: of.display_name(),
            ready,
            total,
        },
        ForkStatus {
            fork_of: of.display_name(),
            namespace,
            deployment: fork_name,
            services: forked,
            ready_endpoints: ready,
            total_endpoints: total,
        },
        problem,
    )))
}

fn mark(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, owner: &str) {
    meta.annotations
        .get_or_insert_with(Default::default)
        .insert(SANDBOX_REF_ANNOTATION.into(), owner.to_owned());
}

/// A fork that runs already (`to`): its ready endpoints, for the Ready condition.
async fn running_fork(
    sandbox: &Sandbox,
    fork: &Fork,
    ctx: &Context,
) -> Result<ForkReport, ReconcileError> {
    let namespace = sandbox.namespace().unwrap_or_default();
    let baseline = fork
        .service
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    let Some(to) = &fork.to else {
        return Ok(ForkReport {
            name: format!("fork of Service {baseline}"),
            ready: 0,
            total: 0,
        });
    };
    if let Some(service) = &to.service {
        let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
        let list = slices
            .list(&ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={service}")))
            .await?
            .items;
        let mut ready = BTreeSet::new();
        let mut total = BTreeSet::new();
        for endpoint in list.iter().flat_map(|s| s.endpoints.iter().flatten()) {
            let id = endpoint.addresses.join(",");
            if endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true)
            {
                ready.insert(id.clone());
            }
            total.insert(id);
        }
        return Ok(ForkReport {
            name: format!("Service {service}"),
            ready: i32::try_from(ready.len()).unwrap_or(i32::MAX),
            total: i32::try_from(total.len()).unwrap_or(i32::MAX),
        });
    }
    let selector = to
        .selector
        .clone()
        .and_then(|s| kube::core::Selector::try_from(s).ok())
        .map(|s| s.to_string())
        .unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let (ready, total) = status::pod_counts(&list);
    Ok(ForkReport {
        name: format!("pods {selector}"),
        ready,
        total,
    })
}

/// Deletes what the controller made for `sandbox` that is not in `wanted`.
async fn remove_unwanted(
    sandbox: &Sandbox,
    ctx: &Context,
    wanted: &BTreeSet<(String, String, String)>,
) -> Result<(), ReconcileError> {
    let owner = sandbox_ref(sandbox);
    let selector = fork::sandbox_selector(sandbox);
    let params = ListParams::default().labels(&selector);
    let deployments: Api<Deployment> = Api::all(ctx.client.clone());
    for d in deployments.list(&params).await?.items {
        if d.annotations().get(SANDBOX_REF_ANNOTATION) != Some(&owner) {
            continue;
        }
        let ns = d.namespace().unwrap_or_default();
        if !wanted.contains(&("Deployment".into(), ns.clone(), d.name_any())) {
            info!(sandbox = %owner, deployment = %format!("{ns}/{}", d.name_any()), "deleting a fork Deployment no longer wanted");
            delete::<Deployment>(ctx, &ns, &d.name_any()).await?;
        }
    }
    let services: Api<KubeService> = Api::all(ctx.client.clone());
    for s in services.list(&params).await?.items {
        if s.annotations().get(SANDBOX_REF_ANNOTATION) != Some(&owner) {
            continue;
        }
        let ns = s.namespace().unwrap_or_default();
        if !wanted.contains(&("Service".into(), ns.clone(), s.name_any())) {
            info!(sandbox = %owner, service = %format!("{ns}/{}", s.name_any()), "deleting a fork Service no longer wanted");
            delete::<KubeService>(ctx, &ns, &s.name_any()).await?;
        }
    }
    Ok(())
}

async fn delete<K>(ctx: &Context, namespace: &str, name: &str) -> Result<(), ReconcileError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// The Sandbox is being deleted: remove every fork it made, then let it go.
async fn cleanup(sandbox: &Sandbox, ctx: &Context) -> Result<Action, ReconcileError> {
    let owner = sandbox_ref(sandbox);
    // By the annotation, not the label values: those are cut short for long names.
    let by_label = ListParams::default().labels(SANDBOX_LABEL);
    let deployments: Api<Deployment> = Api::all(ctx.client.clone());
    for d in deployments.list(&by_label).await?.items {
        if d.annotations().get(SANDBOX_REF_ANNOTATION) == Some(&owner) {
            delete::<Deployment>(ctx, &d.namespace().unwrap_or_default(), &d.name_any()).await?;
        }
    }
    let services: Api<KubeService> = Api::all(ctx.client.clone());
    for s in services.list(&by_label).await?.items {
        if s.annotations().get(SANDBOX_REF_ANNOTATION) == Some(&owner) {
            delete::<KubeService>(ctx, &s.namespace().unwrap_or_default(), &s.name_any()).await?;
        }
    }
    info!(sandbox = %owner, "Sandbox deleted: its forks are gone");
    Ok(Action::await_change())
}

/// The `namespace/name` of the Sandbox an object the controller made belongs to.
pub fn owner_of<K: kube::Resource>(object: &K) -> Option<(String, String)> {
    let owner = object
        .meta()
        .annotations
        .as_ref()?
        .get(SANDBOX_REF_ANNOTATION)?;
    let (ns, name) = owner.split_once('/')?;
    Some((ns.to_owned(), name.to_owned()))
}

pub fn error_policy(sandbox: Arc<Sandbox>, err: &ReconcileError, _ctx: Arc<Context>) -> Action {
    warn!(sandbox = %sandbox_ref(&sandbox), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}
