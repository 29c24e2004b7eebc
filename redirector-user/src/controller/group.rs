//! A RouteGroup's status: the Sandboxes it stands for, and Ready when all of them are.
use std::{sync::Arc, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    core::{Selector, SelectorExt as _},
    runtime::controller::Action,
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    sandbox::{Context, ReconcileError},
    status,
};
use crate::k8s::crd::{RouteGroup, RouteGroupStatus, Sandbox};

pub async fn reconcile(
    group: Arc<RouteGroup>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let namespace = group.namespace().ok_or(ReconcileError::NoNamespace)?;
    let sandboxes: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &namespace);
    let all = sandboxes.list(&ListParams::default()).await?.items;
    let (names, problem) = members(&group, &all);
    let not_ready: Vec<&str> = names
        .iter()
        .filter(|name| {
            !all.iter().any(|s| {
                &s.name_any() == *name
                    && s.metadata.deletion_timestamp.is_none()
                    && s.status
                        .as_ref()
                        .is_some_and(|st| status::is_true(&st.conditions, status::READY))
            })
        })
        .map(String::as_str)
        .collect();
    let (ready, reason, message) = match (&problem, not_ready.is_empty()) {
        (Some(problem), _) => (false, "SandboxesMissing", problem.clone()),
        (None, true) => (
            true,
            "SandboxesReady",
            format!("{} sandbox(es) ready", names.len()),
        ),
        (None, false) => (
            false,
            "SandboxesNotReady",
            format!("waiting for {}", not_ready.join(", ")),
        ),
    };
    let old = group.status.clone().unwrap_or_default();
    let status_value = if ready { "True" } else { "False" };
    let since = old
        .conditions
        .iter()
        .find(|c| c.type_ == status::READY && c.status == status_value)
        .map_or_else(
            || Time(jiff::Timestamp::now()),
            |c| c.last_transition_time.clone(),
        );
    let status = RouteGroupStatus {
        observed_generation: group.metadata.generation,
        sandboxes: names,
        conditions: vec![Condition {
            type_: status::READY.to_owned(),
            status: status_value.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: group.metadata.generation,
            last_transition_time: since,
        }],
    };
    if status != old {
        let api: Api<RouteGroup> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch_status(
            &group.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
        info!(group = %format!("{namespace}/{}", group.name_any()), ready, "RouteGroup status updated");
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The names of the Sandboxes `group` stands for (sorted), and what is wrong with the set.
fn members(group: &RouteGroup, all: &[Sandbox]) -> (Vec<String>, Option<String>) {
    let set = &group.spec.sandboxes;
    let mut names: Vec<String>;
    let mut problem = None;
    match (&set.names, &set.selector) {
        (Some(wanted), None) => {
            names = wanted.clone();
            let missing: Vec<&str> = wanted
                .iter()
                .filter(|n| !all.iter().any(|s| &s.name_any() == *n))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                problem = Some(format!("Sandbox not found: {}", missing.join(", ")));
            }
        }
        (None, Some(selector)) => match Selector::try_from(selector.clone()) {
            Ok(selector) => {
                names = all
                    .iter()
                    .filter(|s| selector.matches(s.labels()))
                    .map(ResourceExt::name_any)
                    .collect();
            }
            Err(err) => {
                names = Vec::new();
                problem = Some(format!("sandboxes.selector: {err}"));
            }
        },
        _ => {
            names = Vec::new();
            problem = Some("sandboxes: give exactly one of `names` and `selector`".to_owned());
        }
    }
    names.sort();
    names.dedup();
    if names.is_empty() && problem.is_none() {
        problem = Some("no Sandbox matches".to_owned());
    }
    (names, problem)
}

pub fn error_policy(group: Arc<RouteGroup>, err: &ReconcileError, _ctx: Arc<Context>) -> Action {
    warn!(group = %group.name_any(), error = %err, "RouteGroup reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sandbox(name: &str, team: &str) -> Sandbox {
        serde_json::from_value(json!({
            "apiVersion": "redirector.dev/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": name, "namespace": "shop", "labels": {"team": team}},
            "spec": {"forks": []}
        }))
        .expect("sandbox")
    }

    fn group(sandboxes: serde_json::Value) -> RouteGroup {
        serde_json::from_value(json!({
            "apiVersion": "redirector.dev/v1alpha1", "kind": "RouteGroup",
            "metadata": {"name": "both", "namespace": "shop"},
            "spec": {"routingKey": "both", "sandboxes": sandboxes}
        }))
        .expect("group")
    }

    #[test]
    fn members_by_name_and_by_selector() {
        let all = [sandbox("b", "x"), sandbox("a", "x"), sandbox("c", "y")];
        let (names, problem) = members(&group(json!({"names": ["b", "a"]})), &all);
        assert_eq!((names, problem), (vec!["a".into(), "b".into()], None));
        let (names, problem) = members(
            &group(json!({"selector": {"matchLabels": {"team": "x"}}})),
            &all,
        );
        assert_eq!((names, problem), (vec!["a".into(), "b".into()], None));
        let (_, problem) = members(&group(json!({"names": ["a", "zz"]})), &all);
        assert_eq!(problem.as_deref(), Some("Sandbox not found: zz"));
        let (_, problem) = members(
            &group(json!({"selector": {"matchLabels": {"team": "none"}}})),
            &all,
        );
        assert_eq!(problem.as_deref(), Some("no Sandbox matches"));
    }
}
