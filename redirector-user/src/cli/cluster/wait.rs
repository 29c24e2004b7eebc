//! `--wait`: watch one Sandbox until it is Ready (or Failed, or gone), printing progress as its
//! status changes.
use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    Api,
    runtime::{WatchStreamExt as _, watcher},
};

use super::{ClusterError, args::show_duration, is_unreachable};
use crate::{
    cli::out::{self, StdoutError},
    k8s::crd::Sandbox,
};

/// Where a Sandbox stands, for a caller waiting until it is Ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `Ready` is `True` for the object's current generation.
    Ready,
    /// `Failed` is `True` for the object's current generation.
    Failed { reason: String, message: String },
    /// Neither yet; says what is missing.
    Waiting(String),
}

fn condition<'a>(sandbox: &'a Sandbox, type_: &str) -> Option<&'a Condition> {
    sandbox
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// The condition `type_` when it speaks for the current generation: the status has observed
/// it, and the condition itself (when it says) is not older.
fn current_condition<'a>(sandbox: &'a Sandbox, type_: &str) -> Option<&'a Condition> {
    let generation = sandbox.metadata.generation.unwrap_or(0);
    let observed = sandbox.status.as_ref()?.observed_generation?;
    condition(sandbox, type_)
        .filter(|c| observed >= generation && c.observed_generation.is_none_or(|g| g >= generation))
}

fn explain(c: &Condition) -> String {
    match (c.reason.is_empty(), c.message.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!(" ({})", c.reason),
        (true, false) => format!(" ({})", c.message),
        (false, false) => format!(" ({}: {})", c.reason, c.message),
    }
}

/// Judges one state of the object. A condition counts only once the controller has observed
/// the object's generation (`status.observedGeneration`): a `Ready` or `Failed` left over from
/// the spec before our apply says nothing about the new one.
pub fn judge(sandbox: &Sandbox) -> Verdict {
    let generation = sandbox.metadata.generation.unwrap_or(0);
    let Some(status) = &sandbox.status else {
        return Verdict::Waiting("the controller to report on it (it has no status yet)".into());
    };
    match status.observed_generation {
        Some(observed) if observed >= generation => {}
        observed => {
            return Verdict::Waiting(format!(
                "the controller to observe generation {generation} (status.observedGeneration \
                 is {})",
                observed.map_or_else(|| "not set".to_owned(), |g| g.to_string())
            ));
        }
    }
    if let Some(failed) = current_condition(sandbox, "Failed").filter(|c| c.status == "True") {
        return Verdict::Failed {
            reason: failed.reason.clone(),
            message: failed.message.clone(),
        };
    }
    match current_condition(sandbox, "Ready") {
        Some(ready) if ready.status == "True" => Verdict::Ready,
        Some(ready) => {
            let forks: Vec<String> = status
                .forks
                .iter()
                .map(|f| {
                    format!(
                        "{} {}/{} ready",
                        f.fork_of, f.ready_endpoints, f.total_endpoints
                    )
                })
                .collect();
            let forks = if forks.is_empty() {
                String::new()
            } else {
                format!("; forks: {}", forks.join(", "))
            };
            Verdict::Waiting(format!(
                "Ready to be True (it is {}{}{forks})",
                ready.status,
                explain(ready)
            ))
        }
        None => Verdict::Waiting("a Ready condition".into()),
    }
}

/// What a person watching wants to see of one state, by topic: a line is printed again only
/// when its text changes.
pub fn progress(sandbox: &Sandbox) -> BTreeMap<String, String> {
    let mut lines = BTreeMap::new();
    let generation = sandbox.metadata.generation.unwrap_or(0);
    match sandbox.status.as_ref().map(|s| s.observed_generation) {
        None => {
            lines.insert(
                "0 status".into(),
                "waiting for the controller (no status yet)".into(),
            );
        }
        Some(observed) if observed.is_none_or(|g| g < generation) => {
            lines.insert(
                "0 status".into(),
                format!("waiting for the controller to observe generation {generation}"),
            );
        }
        Some(_) => {
            lines.insert(
                "0 status".into(),
                format!("controller has observed generation {generation}"),
            );
        }
    }
    let Some(status) = &sandbox.status else {
        return lines;
    };
    for fork in &status.forks {
        let services: Vec<String> = fork
            .services
            .iter()
            .map(|s| format!("{} -> {}", s.baseline, s.fork))
            .collect();
        let services = if services.is_empty() {
            String::new()
        } else {
            format!(", services {}", services.join(", "))
        };
        lines.insert(
            format!("1 fork {}/{}", fork.namespace, fork.fork_of),
            format!(
                "fork {}: deployment {}, {}/{} ready{services}",
                fork.fork_of, fork.deployment, fork.ready_endpoints, fork.total_endpoints
            ),
        );
    }
    for (order, type_) in ["Ready", "Failed"].into_iter().enumerate() {
        if let Some(c) = condition(sandbox, type_) {
            let stale = if current_condition(sandbox, type_).is_none() {
                " [for an older generation]"
            } else {
                ""
            };
            lines.insert(
                format!("2 condition {order}"),
                format!("{type_}={}{}{stale}", c.status, explain(c)),
            );
        }
    }
    lines
}

/// Prints progress lines: on stdout for people, on stderr when stdout carries JSON.
pub struct Reporter {
    to_stderr: bool,
    shown: BTreeMap<String, String>,
}

impl Reporter {
    pub fn new(to_stderr: bool) -> Reporter {
        Reporter {
            to_stderr,
            shown: BTreeMap::new(),
        }
    }

    pub fn line(&self, text: impl std::fmt::Display) -> Result<(), StdoutError> {
        if self.to_stderr {
            eprintln!("{text}");
            Ok(())
        } else {
            out::println(text)
        }
    }

    /// Prints the lines whose text differs from what was last printed for their topic.
    fn update(&mut self, lines: BTreeMap<String, String>) -> Result<(), StdoutError> {
        for (topic, text) in lines {
            if self.shown.get(&topic) != Some(&text) {
                self.line(&text)?;
                self.shown.insert(topic, text);
            }
        }
        Ok(())
    }
}

/// Trouble on the watch: kube's watcher retries (with backoff); the CLI gives up at once only
/// when retrying cannot help. A 404 (no Sandbox resource) is final only before the watch has
/// ever answered: an API server that restarts serves its CRDs a moment after it serves
/// anything, and answers 404 for them meanwhile.
fn fatal(err: &watcher::Error, answered: bool) -> bool {
    match err {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => {
            matches!(status.code, 401 | 403) || (status.code == 404 && !answered)
        }
        _ => false,
    }
}

fn watch_error_unreachable(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => is_unreachable(e),
        _ => false,
    }
}

/// The last watch error, kept for the timeout message.
#[derive(Default)]
struct Trouble {
    last: Option<(String, bool)>,
    /// The watch has answered at least once.
    answered: bool,
}

impl Trouble {
    fn record(&mut self, err: &watcher::Error) -> Result<(), ClusterError> {
        let text = crate::error_chain(err);
        if fatal(err, self.answered) {
            return Err(ClusterError::Watch { message: text });
        }
        if self.last.is_none() {
            // Once per outage: the watcher retries with backoff.
            eprintln!("redirector: watching failed, retrying: {text}");
        }
        self.last = Some((text, watch_error_unreachable(err)));
        Ok(())
    }

    fn timeout(&self, what: String, after: Duration, object: &str) -> ClusterError {
        let (what, unreachable) = match &self.last {
            Some((err, unreachable)) => (format!("{what}; last error: {err}"), *unreachable),
            None => (what, false),
        };
        ClusterError::Timeout {
            object: object.to_owned(),
            after: show_duration(after),
            what,
            unreachable,
        }
    }
}

/// Watches `name` until [`judge`] says Ready (the object as it was then) or Failed (an error),
/// or `timeout` passes.
pub async fn until_ready(
    api: Api<Sandbox>,
    name: &str,
    object: &str,
    timeout: Duration,
    reporter: &mut Reporter,
) -> Result<Sandbox, ClusterError> {
    let mut stream = Box::pin(watcher::watch_object(api, name).default_backoff());
    let mut trouble = Trouble::default();
    let mut waiting_for = "the first answer of the watch".to_owned();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let Ok(next) = next else {
            return Err(trouble.timeout(waiting_for, timeout, object));
        };
        match next {
            None => return Err(ClusterError::WatchEnded),
            Some(Err(err)) => trouble.record(&err)?,
            Some(Ok(None)) => {
                return Err(ClusterError::Vanished {
                    object: object.to_owned(),
                });
            }
            Some(Ok(Some(sandbox))) => {
                trouble.last = None;
                trouble.answered = true;
                if sandbox.metadata.deletion_timestamp.is_some() {
                    return Err(ClusterError::Vanished {
                        object: object.to_owned(),
                    });
                }
                reporter.update(progress(&sandbox))?;
                match judge(&sandbox) {
                    Verdict::Ready => return Ok(sandbox),
                    Verdict::Failed { reason, message } => {
                        return Err(ClusterError::Failed {
                            object: object.to_owned(),
                            reason,
                            message,
                        });
                    }
                    Verdict::Waiting(what) => waiting_for = what,
                }
            }
        }
    }
}

/// Watches `name` until no object of that name and `uid` is left, or `timeout` passes.
pub async fn until_gone(
    api: Api<Sandbox>,
    name: &str,
    uid: Option<&str>,
    object: &str,
    timeout: Duration,
    reporter: &mut Reporter,
) -> Result<(), ClusterError> {
    let mut stream = Box::pin(watcher::watch_object(api, name).default_backoff());
    let mut trouble = Trouble::default();
    let mut waiting_for = "the first answer of the watch".to_owned();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let Ok(next) = next else {
            return Err(trouble.timeout(waiting_for, timeout, object));
        };
        match next {
            None => return Err(ClusterError::WatchEnded),
            Some(Err(err)) => trouble.record(&err)?,
            Some(Ok(None)) => return Ok(()),
            // A new object of the same name: ours is gone.
            Some(Ok(Some(sandbox))) if uid.is_some() && sandbox.metadata.uid.as_deref() != uid => {
                return Ok(());
            }
            Some(Ok(Some(sandbox))) => {
                trouble.last = None;
                trouble.answered = true;
                let finalizers = sandbox.metadata.finalizers.unwrap_or_default();
                waiting_for = if finalizers.is_empty() {
                    "the API server to remove it".to_owned()
                } else {
                    format!(
                        "its finalizers to be removed ({}: the controller deletes the forks first)",
                        finalizers.join(", ")
                    )
                };
                reporter.update(BTreeMap::from([(
                    "finalizers".to_owned(),
                    format!("waiting for {waiting_for}"),
                )]))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::k8s::crd::{ForkStatus, ForkedService, SandboxSpec, SandboxStatus};

    #[test]
    fn a_404_ends_the_wait_only_before_the_watch_has_answered() {
        let status = |code: u16| {
            watcher::Error::WatchStartFailed(kube::Error::Api(
                kube::core::Status::failure("404 page not found", "NotFound")
                    .with_code(code)
                    .boxed(),
            ))
        };
        assert!(fatal(&status(404), false), "no Sandbox resource at all");
        assert!(
            !fatal(&status(404), true),
            "an API server that restarts serves its CRDs a moment later"
        );
        assert!(
            fatal(&status(403), true),
            "retrying cannot fix a permission"
        );
        assert!(!fatal(&status(503), false));
    }

    fn sandbox(generation: i64, status: Option<SandboxStatus>) -> Sandbox {
        let mut sb = Sandbox::new(
            "pr-1",
            SandboxSpec {
                routing_key: None,
                ttl: None,
                forks: Vec::new(),
                members: Vec::new(),
                inject_key: false,
            },
        );
        sb.metadata.generation = Some(generation);
        sb.status = status;
        sb
    }

    fn cond(type_: &str, status: &str, reason: &str, generation: Option<i64>) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: format!("{reason} message"),
            observed_generation: generation,
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    fn status(observed: Option<i64>, conditions: Vec<Condition>) -> SandboxStatus {
        SandboxStatus {
            observed_generation: observed,
            conditions,
            forks: vec![ForkStatus {
                fork_of: "Deployment/svc-a".into(),
                namespace: "shop".into(),
                deployment: "svc-a-pr-1".into(),
                services: vec![ForkedService {
                    baseline: "svc-a".into(),
                    fork: "svc-a-pr-1".into(),
                }],
                ready_endpoints: 0,
                total_endpoints: 1,
            }],
            ..SandboxStatus::default()
        }
    }

    #[test]
    fn ready_needs_the_current_generation() {
        let ready = || vec![cond("Ready", "True", "ForksReady", None)];
        assert!(matches!(judge(&sandbox(2, None)), Verdict::Waiting(w) if w.contains("no status")));
        assert!(
            matches!(judge(&sandbox(2, Some(status(Some(1), ready())))), Verdict::Waiting(w) if w.contains("generation 2"))
        );
        assert!(matches!(
            judge(&sandbox(2, Some(status(None, ready())))),
            Verdict::Waiting(_)
        ));
        assert_eq!(
            judge(&sandbox(2, Some(status(Some(2), ready())))),
            Verdict::Ready
        );
        assert_eq!(
            judge(&sandbox(2, Some(status(Some(3), ready())))),
            Verdict::Ready
        );
        // The condition says it is older than the object.
        assert!(matches!(
            judge(&sandbox(
                2,
                Some(status(
                    Some(2),
                    vec![cond("Ready", "True", "ForksReady", Some(1))]
                ))
            )),
            Verdict::Waiting(_)
        ));
    }

    #[test]
    fn not_ready_says_why() {
        let sb = sandbox(
            1,
            Some(status(
                Some(1),
                vec![cond("Ready", "False", "ForksNotReady", None)],
            )),
        );
        let Verdict::Waiting(what) = judge(&sb) else {
            panic!("waiting")
        };
        assert!(what.contains("Ready to be True"), "{what}");
        assert!(what.contains("ForksNotReady"), "{what}");
        assert!(what.contains("Deployment/svc-a 0/1 ready"), "{what}");
        assert!(matches!(
            judge(&sandbox(1, Some(status(Some(1), vec![])))),
            Verdict::Waiting(w) if w == "a Ready condition"
        ));
    }

    #[test]
    fn failed_wins_once_current() {
        let conditions = vec![
            cond("Ready", "False", "ForksNotReady", None),
            cond("Failed", "True", "ImagePullError", None),
        ];
        assert_eq!(
            judge(&sandbox(1, Some(status(Some(1), conditions.clone())))),
            Verdict::Failed {
                reason: "ImagePullError".into(),
                message: "ImagePullError message".into()
            }
        );
        // A failure of the spec before ours.
        assert!(matches!(
            judge(&sandbox(2, Some(status(Some(1), conditions)))),
            Verdict::Waiting(_)
        ));
        assert!(matches!(
            judge(&sandbox(
                1,
                Some(status(Some(1), vec![cond("Failed", "False", "", None)]))
            )),
            Verdict::Waiting(_)
        ));
    }

    #[test]
    fn progress_names_forks_and_conditions() {
        let lines = progress(&sandbox(
            1,
            Some(status(
                Some(1),
                vec![cond("Ready", "False", "ForksNotReady", None)],
            )),
        ));
        let texts: Vec<&str> = lines.values().map(String::as_str).collect();
        assert_eq!(
            texts,
            [
                "controller has observed generation 1",
                "fork Deployment/svc-a: deployment svc-a-pr-1, 0/1 ready, services svc-a -> svc-a-pr-1",
                "Ready=False (ForksNotReady: ForksNotReady message)",
            ]
        );
        let lines = progress(&sandbox(1, None));
        assert_eq!(
            lines.values().collect::<Vec<_>>(),
            ["waiting for the controller (no status yet)"]
        );
    }
}
