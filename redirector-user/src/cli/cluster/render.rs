//! Sandboxes as tables (for people) and JSON (for scripts).
use comfy_table::{Table, presets};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use crate::k8s::crd::Sandbox;

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.to_vec());
    table
}

/// An age as kubectl prints it: `45s`, `3m20s`, `2h15m`, `3d4h`, `40d`.
pub fn human(secs: i64) -> String {
    if secs < 0 {
        return "0s".into();
    }
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if m < 10 && s % 60 != 0 => format!("{m}m{}s", s % 60),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 && m % 60 != 0 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if d < 8 && h % 24 != 0 => format!("{d}d{}h", h % 24),
        _ => format!("{d}d"),
    }
}

fn age(sandbox: &Sandbox, now: Timestamp) -> String {
    match &sandbox.metadata.creation_timestamp {
        Some(created) => human(now.duration_since(created.0).as_secs()),
        None => "-".into(),
    }
}

/// `in 1h59m`, `overdue 5s`, or the text as the status has it when it does not read.
fn expires(sandbox: &Sandbox, now: Timestamp) -> String {
    let Some(at) = sandbox
        .status
        .as_ref()
        .and_then(|s| s.expires_at.as_deref())
    else {
        return "-".into();
    };
    match at.parse::<Timestamp>() {
        Ok(at) => {
            let left = at.duration_since(now).as_secs();
            if left >= 0 {
                format!("in {}", human(left))
            } else {
                format!("overdue {}", human(-left))
            }
        }
        Err(_) => at.to_owned(),
    }
}

/// `True`, `False`, `Unknown`, `Failed` (a `Failed` condition that is True), or `-`.
fn ready(sandbox: &Sandbox) -> String {
    let conditions = sandbox
        .status
        .as_ref()
        .map_or(&[][..], |s| s.conditions.as_slice());
    if conditions
        .iter()
        .any(|c| c.type_ == "Failed" && c.status == "True")
    {
        return "Failed".into();
    }
    conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map_or_else(|| "-".into(), |c| c.status.clone())
}

/// Forks with a ready endpoint / forks in the spec.
fn forks(sandbox: &Sandbox) -> String {
    let ready = sandbox.status.as_ref().map_or(0, |s| {
        s.forks.iter().filter(|f| f.ready_endpoints > 0).count()
    });
    format!("{ready}/{}", sandbox.spec.forks.len())
}

fn key(sandbox: &Sandbox) -> String {
    sandbox
        .status
        .as_ref()
        .and_then(|s| s.routing_key.clone())
        .unwrap_or_else(|| sandbox.routing_key().to_owned())
}

fn row(sandbox: &Sandbox, all_namespaces: bool, now: Timestamp) -> Vec<String> {
    let mut row = Vec::new();
    if all_namespaces {
        row.push(sandbox.metadata.namespace.clone().unwrap_or_default());
    }
    row.extend([
        sandbox.metadata.name.clone().unwrap_or_default(),
        key(sandbox),
        ready(sandbox),
        forks(sandbox),
        age(sandbox, now),
        expires(sandbox, now),
    ]);
    row
}

const COLUMNS: [&str; 6] = ["NAME", "KEY", "READY", "FORKS", "AGE", "EXPIRES"];

/// One row per Sandbox; a NAMESPACE column first with `all_namespaces`.
pub fn list(
    sandboxes: &[Sandbox],
    all_namespaces: bool,
    namespace: &str,
    now: Timestamp,
) -> String {
    if sandboxes.is_empty() {
        return if all_namespaces {
            "no sandboxes\n".into()
        } else {
            format!("no sandboxes in namespace {namespace}\n")
        };
    }
    let mut header = Vec::new();
    if all_namespaces {
        header.push("NAMESPACE");
    }
    header.extend(COLUMNS);
    let mut t = table(&header);
    for sandbox in sandboxes {
        t.add_row(row(sandbox, all_namespaces, now));
    }
    format!("{t}\n")
}

/// One Sandbox: its row, then its forks (as the spec asks for them and as the controller made
/// them) and its conditions.
pub fn one(sandbox: &Sandbox, now: Timestamp) -> String {
    let mut out = String::new();
    let mut t = table(&COLUMNS);
    t.add_row(row(sandbox, false, now));
    out.push_str(&format!("{t}\n\n"));

    let own_ns = sandbox.metadata.namespace.clone().unwrap_or_default();
    let status = sandbox.status.as_ref();
    let mut t = table(&["FORK OF", "IMAGES", "DEPLOYMENT", "SERVICES", "READY"]);
    for fork in &sandbox.spec.forks {
        let images: Vec<String> = fork
            .customizations
            .iter()
            .flat_map(|c| &c.images)
            .map(|i| match &i.container {
                Some(c) => format!("{c}={}", i.image),
                None => i.image.clone(),
            })
            .collect();
        let images = if images.is_empty() {
            "-".to_owned()
        } else {
            images.join(", ")
        };
        let Some(of) = &fork.fork_of else {
            // A fork that runs already: `service` routed to `to`.
            let service = fork.service.as_ref().map_or("-", |s| s.name.as_str());
            let to = fork
                .to
                .as_ref()
                .and_then(|t| t.service.clone())
                .unwrap_or_else(|| "(selector)".into());
            t.add_row(vec![
                format!("Service/{service}"),
                images,
                "-".into(),
                format!("{service} -> {to}"),
                "-".into(),
            ]);
            continue;
        };
        let ns = of.namespace.clone().unwrap_or_else(|| own_ns.clone());
        let name = of.display_name();
        let shown = if ns == own_ns {
            name.clone()
        } else {
            format!("{ns}/{name}")
        };
        let made = status.and_then(|s| {
            s.forks
                .iter()
                .find(|f| f.namespace == ns && f.fork_of == name)
        });
        match made {
            Some(made) => {
                let services: Vec<String> = made
                    .services
                    .iter()
                    .map(|s| format!("{} -> {}", s.baseline, s.fork))
                    .collect();
                t.add_row(vec![
                    shown,
                    images,
                    made.deployment.clone(),
                    if services.is_empty() {
                        "-".into()
                    } else {
                        services.join(", ")
                    },
                    format!("{}/{}", made.ready_endpoints, made.total_endpoints),
                ]);
            }
            None => {
                t.add_row(vec![
                    shown,
                    images,
                    "(not made yet)".into(),
                    "-".into(),
                    "-".into(),
                ]);
            }
        }
    }
    out.push_str(&format!("{t}\n"));

    let conditions = status.map_or(&[][..], |s| s.conditions.as_slice());
    if conditions.is_empty() {
        out.push_str("\nno conditions yet (the controller has not reported)\n");
    } else {
        let mut t = table(&["CONDITION", "STATUS", "REASON", "MESSAGE", "SINCE"]);
        for c in conditions {
            t.add_row(vec![
                c.type_.clone(),
                c.status.clone(),
                c.reason.clone(),
                c.message.clone(),
                human(now.duration_since(c.last_transition_time.0).as_secs()),
            ]);
        }
        out.push_str(&format!("\n{t}\n"));
    }
    out
}

/// The object as JSON, without `metadata.managedFields` (noise for a reader, as in kubectl).
pub fn json_one(sandbox: &Sandbox) -> Result<Value, serde_json::Error> {
    let mut sandbox = sandbox.clone();
    sandbox.metadata.managed_fields = None;
    serde_json::to_value(&sandbox)
}

/// A list as kubectl prints one: `{"apiVersion": "v1", "kind": "List", "items": [...]}`.
pub fn json_list(sandboxes: &[Sandbox]) -> Result<Value, serde_json::Error> {
    let items = sandboxes
        .iter()
        .map(json_one)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json!({"apiVersion": "v1", "kind": "List", "items": items}))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    use super::*;
    use crate::k8s::crd::{
        Customizations, Fork, ForkStatus, ImageOverride, SandboxSpec, SandboxStatus, WorkloadKind,
        WorkloadRef,
    };

    #[test]
    fn ages_read_like_kubectl() {
        for (secs, want) in [
            (-3, "0s"),
            (5, "5s"),
            (119, "119s"),
            (200, "3m20s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (9 * 3600, "9h"),
            (3 * 86_400 + 4 * 3600, "3d4h"),
            (40 * 86_400, "40d"),
        ] {
            assert_eq!(human(secs), want, "{secs}");
        }
    }

    fn sample() -> Sandbox {
        let mut sb = Sandbox::new(
            "pr-1",
            SandboxSpec {
                routing_key: None,
                ttl: Some("2h".into()),
                forks: vec![
                    Fork {
                        fork_of: Some(WorkloadRef {
                            kind: WorkloadKind::Deployment,
                            name: "svc-a".into(),
                            namespace: None,
                        }),
                        customizations: Some(Customizations {
                            images: vec![ImageOverride {
                                container: Some("app".into()),
                                image: "svc-a:pr-1".into(),
                            }],
                            env: vec![],
                        }),
                        ..Fork::default()
                    },
                    Fork {
                        fork_of: Some(WorkloadRef {
                            kind: WorkloadKind::Deployment,
                            name: "svc-b".into(),
                            namespace: None,
                        }),
                        ..Fork::default()
                    },
                ],
                members: vec![],
                inject_key: false,
            },
        );
        sb.metadata.namespace = Some("shop".into());
        let now = Timestamp::UNIX_EPOCH + std::time::Duration::from_secs(10_000);
        sb.metadata.creation_timestamp = Some(Time(now - std::time::Duration::from_secs(90)));
        sb.status = Some(SandboxStatus {
            observed_generation: Some(1),
            routing_key: Some("pr-1".into()),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "ForksNotReady".into(),
                message: "svc-b has no ready endpoint".into(),
                observed_generation: None,
                last_transition_time: Time(now),
            }],
            forks: vec![ForkStatus {
                fork_of: "Deployment/svc-a".into(),
                namespace: "shop".into(),
                deployment: "svc-a-pr-1".into(),
                services: vec![],
                ready_endpoints: 1,
                total_endpoints: 1,
            }],
            expires_at: Some("1970-01-01T04:46:40Z".into()),
        });
        sb
    }

    fn now() -> Timestamp {
        Timestamp::UNIX_EPOCH + std::time::Duration::from_secs(10_000)
    }

    #[test]
    fn a_list_has_a_row_per_sandbox() {
        let text = list(&[sample()], true, "shop", now());
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines,
            [
                vec![
                    "NAMESPACE",
                    "NAME",
                    "KEY",
                    "READY",
                    "FORKS",
                    "AGE",
                    "EXPIRES"
                ],
                // Expires at 17200 s, 7200 s from now.
                vec!["shop", "pr-1", "pr-1", "False", "1/2", "90s", "in", "120m"],
            ]
        );
        assert_eq!(
            list(&[], false, "shop", now()),
            "no sandboxes in namespace shop\n"
        );
    }

    #[test]
    fn one_sandbox_shows_forks_and_conditions() {
        let text = one(&sample(), now());
        assert!(text.contains("svc-a-pr-1"), "{text}");
        assert!(text.contains("app=svc-a:pr-1"), "{text}");
        assert!(text.contains("(not made yet)"), "{text}");
        assert!(text.contains("ForksNotReady"), "{text}");
    }

    #[test]
    fn json_leaves_managed_fields_out() {
        let mut sb = sample();
        sb.metadata.managed_fields = Some(vec![Default::default()]);
        let value = json_list(&[sb]).expect("json");
        assert_eq!(value["kind"], "List");
        assert_eq!(value["items"][0]["metadata"]["name"], "pr-1");
        assert!(value["items"][0]["metadata"].get("managedFields").is_none());
    }
}
