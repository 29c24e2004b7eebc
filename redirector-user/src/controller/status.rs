//! What a Sandbox's status says, worked out from what the controller saw: pure functions.
use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

pub const READY: &str = "Ready";
pub const FAILED: &str = "Failed";

/// Container waiting reasons that mean the fork's image will not run.
const IMAGE_PROBLEMS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
];

/// One fork as the controller found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkReport {
    /// `Deployment/svc-a`, `Service svc-a-fork`.
    pub name: String,
    pub ready: i32,
    pub total: i32,
}

/// Why the sandbox cannot work: the `Failed` condition's reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    pub message: String,
}

/// Ready and not-terminating pods, and all not-terminating ones.
pub fn pod_counts(pods: &[Pod]) -> (i32, i32) {
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let ready = live.iter().filter(|p| pod_ready(p)).count();
    (
        i32::try_from(ready).unwrap_or(i32::MAX),
        i32::try_from(live.len()).unwrap_or(i32::MAX),
    )
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The first image problem a container of `pods` reports, as `pod/container: reason: message`.
pub fn image_problem(pods: &[Pod]) -> Option<String> {
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let statuses = pod.status.as_ref().into_iter().flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
        });
        for status in statuses {
            let Some(waiting) = status.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = waiting.reason.as_deref().unwrap_or_default();
            if IMAGE_PROBLEMS.contains(&reason) {
                let message = waiting.message.as_deref().unwrap_or("no message");
                return Some(format!(
                    "pod {name} container {}: {reason}: {message}",
                    status.name
                ));
            }
        }
    }
    None
}

/// The conditions for this round: `Failed` when `failure` says so, else `Ready` when every
/// fork has a ready endpoint. A condition whose status does not change keeps its transition
/// time, so writing the same status twice changes nothing.
pub fn conditions(
    old: &[Condition],
    forks: &[ForkReport],
    failure: Option<&Failure>,
    generation: Option<i64>,
    now: Time,
) -> Vec<Condition> {
    let (ready, reason, message) = match failure {
        Some(failure) => (false, "Failed".to_owned(), failure.message.clone()),
        None => {
            let waiting: Vec<String> = forks
                .iter()
                .filter(|f| f.ready < 1)
                .map(|f| format!("{} ({}/{} ready)", f.name, f.ready, f.total))
                .collect();
            if waiting.is_empty() {
                (
                    true,
                    "ForksReady".to_owned(),
                    format!("{} fork(s) ready", forks.len()),
                )
            } else {
                (
                    false,
                    "ForksNotReady".to_owned(),
                    format!("waiting for {}", waiting.join(", ")),
                )
            }
        }
    };
    let failed = match failure {
        Some(f) => (true, f.reason.clone(), f.message.clone()),
        None => (false, "NoFailure".to_owned(), String::new()),
    };
    vec![
        condition(old, READY, ready, reason, message, generation, &now),
        condition(old, FAILED, failed.0, failed.1, failed.2, generation, &now),
    ]
}

fn condition(
    old: &[Condition],
    type_: &str,
    status: bool,
    reason: String,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status,
        reason,
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Whether `conditions` say `type_` is `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn time(s: &str) -> Time {
        Time(s.parse().expect("time"))
    }

    fn fork(name: &str, ready: i32, total: i32) -> ForkReport {
        ForkReport {
            name: name.into(),
            ready,
            total,
        }
    }

    #[test]
    fn ready_when_every_fork_has_a_ready_endpoint() {
        let now = time("2026-12-01T10:00:00Z");
        let c = conditions(
            &[],
            &[fork("Deployment/a", 1, 1), fork("Deployment/b", 0, 1)],
            None,
            Some(2),
            now.clone(),
        );
        assert!(!is_true(&c, READY));
        assert!(c[0].message.contains("Deployment/b (0/1 ready)"), "{c:?}");
        let c = conditions(&c, &[fork("Deployment/a", 1, 1)], None, Some(2), now);
        assert!(is_true(&c, READY) && !is_true(&c, FAILED));
        assert_eq!(c[0].observed_generation, Some(2));
    }

    #[test]
    fn a_failure_is_not_ready_and_says_why() {
        let failure = Failure {
            reason: "BaselineNotFound".into(),
            message: "Deployment shop/nope not found".into(),
        };
        let c = conditions(
            &[],
            &[],
            Some(&failure),
            Some(1),
            time("2026-12-01T10:00:00Z"),
        );
        assert!(is_true(&c, FAILED) && !is_true(&c, READY));
        assert_eq!(c[1].reason, "BaselineNotFound");
    }

    #[test]
    fn transition_times_move_only_on_transitions() {
        let t0 = time("2026-12-01T10:00:00Z");
        let t1 = time("2026-12-01T10:05:00Z");
        let first = conditions(&[], &[fork("a", 0, 1)], None, Some(1), t0.clone());
        let same = conditions(&first, &[fork("a", 0, 1)], None, Some(1), t1.clone());
        assert_eq!(first, same, "nothing changed, nothing to write");
        let ready = conditions(&same, &[fork("a", 1, 1)], None, Some(1), t1.clone());
        assert_eq!(ready[0].last_transition_time, t1);
        assert_eq!(ready[1].last_transition_time, t0, "Failed stayed False");
    }

    #[test]
    fn image_pull_errors_are_found_in_pod_statuses() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "svc-a-pr-1-x"},
            "status": {"containerStatuses": [
                {"name": "app", "image": "bad", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"bad\""}}}
            ]}
        }))
        .expect("pod");
        let problem = image_problem(&[pod]).expect("found");
        assert!(
            problem.contains("container app: ImagePullBackOff"),
            "{problem}"
        );
        let fine: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "app", "image": "ok", "imageID": "", "ready": true,
                        "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}
        }))
        .expect("pod");
        assert_eq!(image_problem(std::slice::from_ref(&fine)), None);
        assert_eq!(pod_counts(&[fine]), (1, 1));
    }
}
