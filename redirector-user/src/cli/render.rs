//! Human tables for the CLI's `-o table` output (the default).
use comfy_table::{Table, presets};
use serde_json::Value;

use crate::api::answers::{
    KernelCounters, KubernetesStatus, MemberState, MemberStatus, ResetCause, StatsAnswer,
    StatusAnswer,
};

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.to_vec());
    table
}

fn s(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn list(value: &Value) -> String {
    match value.as_array() {
        Some(items) if !items.is_empty() => items.iter().map(s).collect::<Vec<_>>().join(", "),
        _ => "-".to_owned(),
    }
}

/// A route's fork endpoints, `a,b,c` (`fork` is the single-endpoint form of older daemons).
fn forks(route: &Value) -> String {
    match route["forks"].as_array() {
        Some(forks) if !forks.is_empty() => forks.iter().map(s).collect::<Vec<_>>().join(","),
        _ => s(&route["fork"]),
    }
}

fn rows(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

fn finish(table: Table, empty: &str, value: &Value) -> String {
    if rows(value).is_empty() {
        format!("{empty}\n")
    } else {
        format!("{table}\n")
    }
}

pub fn sandboxes(value: &Value) -> String {
    let mut t = table(&["KEY", "ORIGIN", "MEMBERS", "ROUTES"]);
    for sb in rows(value) {
        let routes: Vec<String> = rows(&sb["routes"])
            .iter()
            .map(|r| format!("{}->{}", s(&r["service"]), forks(r)))
            .collect();
        t.add_row(vec![
            s(&sb["key"]),
            s(&sb["origin"]),
            list(&sb["members"]),
            if routes.is_empty() {
                "-".into()
            } else {
                routes.join(", ")
            },
        ]);
    }
    finish(t, "no sandboxes", value)
}

pub fn routes(value: &Value) -> String {
    let mut t = table(&[
        "SANDBOX",
        "SERVICE",
        "FORKS",
        "ON FORK ERROR",
        "ON CHANGE",
        "ORIGIN",
    ]);
    for r in rows(value) {
        t.add_row(vec![
            s(&r["sandbox"]),
            s(&r["service"]),
            forks(r),
            s(&r["on_fork_error"]),
            // `reset_on_change` is left out of answers when off.
            if r["reset_on_change"] == true {
                "reset".to_owned()
            } else {
                "-".to_owned()
            },
            s(&r["origin"]),
        ]);
    }
    finish(t, "no routes", value)
}

pub fn groups(value: &Value) -> String {
    let mut t = table(&["KEY", "ORIGIN", "SANDBOXES", "MEMBERS"]);
    for g in rows(value) {
        t.add_row(vec![
            s(&g["key"]),
            s(&g["origin"]),
            list(&g["sandboxes"]),
            list(&g["members"]),
        ]);
    }
    finish(t, "no groups", value)
}

pub fn services(value: &Value) -> String {
    let mut t = table(&["NAME", "ADDRESS", "PROTOCOL", "ORIGIN"]);
    for sv in rows(value) {
        t.add_row(vec![
            s(&sv["name"]),
            s(&sv["address"]),
            s(&sv["protocol"]),
            s(&sv["origin"]),
        ]);
    }
    finish(t, "no services", value)
}

pub fn status(answer: &StatusAnswer) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "redirector {}\n  attach point  {}\n  pins          {}\n  api           {}\n",
        answer.version,
        answer.cgroup.display(),
        answer.bpffs.display(),
        answer.api_socket.display(),
    ));
    let hooks: Vec<String> = answer
        .programs
        .iter()
        .map(|p| format!("{} ({})", p.hook, word(p.state)))
        .collect();
    out.push_str(&format!("  programs      {}\n", hooks.join(", ")));
    match &answer.router {
        Some(router) => {
            // 0 comes from a daemon older than the setting, which had one listener.
            let loops = router.accept_loops.max(1);
            out.push_str(&format!(
                "  router        serving on {} ({} connections, {loops} accept loop{} per address)\n",
                joined(&router.listen),
                router.connections,
                if loops == 1 { "" } else { "s" }
            ))
        }
        None => out.push_str("  router        off (no daemon.router_listen)\n"),
    }
    let c = &answer.counts;
    out.push_str(&format!(
        "  state         {} services, {} sandboxes, {} groups, {} routes, {} member pods ({} not found)\n\n",
        c.services, c.sandboxes, c.groups, c.routes, c.member_pods, c.unresolved_member_pods,
    ));
    let mut t = table(&["MAP", "ENTRIES", "CAPACITY", "USED"]);
    for m in &answer.maps {
        let used = 100.0 * m.entries as f64 / f64::from(m.capacity.max(1));
        t.add_row(vec![
            m.map.clone(),
            m.entries.to_string(),
            m.capacity.to_string(),
            format!("{used:.1}%"),
        ]);
    }
    out.push_str(&format!("{t}\n"));
    if let Some(kube) = &answer.kubernetes {
        out.push_str(&kubernetes(kube));
    }
    // Only the members that are not steered: on a busy node the healthy ones are noise.
    let unhealthy: Vec<&MemberStatus> = answer
        .members
        .iter()
        .filter(|m| m.state != MemberState::Steered)
        .collect();
    if !unhealthy.is_empty() {
        let mut t = table(&["SANDBOX", "MEMBER", "STATE"]);
        for m in unhealthy {
            t.add_row(vec![
                m.sandbox.clone(),
                m.path.display().to_string(),
                word(m.state),
            ]);
        }
        out.push_str(&format!("\n{t}\n"));
    }
    out
}

/// A unit enum variant as it reads on the wire (`not_applied`).
fn word(value: impl serde::Serialize) -> String {
    s(&serde_json::to_value(value).unwrap_or(Value::Null))
}

fn joined(items: &[impl std::fmt::Display]) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Kubernetes source: connection and objects on a few lines, then only what needs a look
/// (objects left out, members not found, with the reason).
fn kubernetes(kube: &KubernetesStatus) -> String {
    let h = &kube.health;
    let o = &h.objects;
    let mut out = format!(
        "\nkubernetes      node {}, {} ({} of 5 watches listed, {} failing){}\n  \
         objects       {} sandboxes, {} route groups, {} services, {} endpoint slices, {} pods on this node\n  \
         members       {} resolved, {} not found\n  \
         last sync     {}\n",
        h.node,
        if h.connected {
            "connected"
        } else {
            "NOT connected"
        },
        h.watches_synced,
        h.watches_failing,
        h.last_error
            .as_ref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default(),
        o.sandboxes,
        o.route_groups,
        o.services,
        o.endpoint_slices,
        o.pods_on_node,
        kube.members_resolved,
        kube.members_unresolved,
        h.last_sync.map_or_else(
            || "never".to_owned(),
            |at| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(at, |d| d.as_secs());
                format!("{} s ago", now.saturating_sub(at))
            }
        ),
    );
    let mut t = table(&["OBJECT", "PROBLEM"]);
    let mut problems = 0;
    for issue in &kube.issues {
        t.add_row(vec![issue.object.clone(), issue.message.clone()]);
        problems += 1;
    }
    for rejected in &kube.rejected {
        t.add_row(vec!["(left out)".to_owned(), rejected.clone()]);
        problems += 1;
    }
    for m in &kube.members {
        if let Some(error) = &m.error {
            t.add_row(vec![format!("Pod {} ({})", m.pod, m.key), error.clone()]);
            problems += 1;
        }
    }
    if problems > 0 {
        out.push_str(&format!("{t}\n"));
    }
    out
}

pub fn stats(answer: &StatsAnswer) -> String {
    let mut out = String::new();
    let mut t = table(&["KERNEL EVENT", "COUNT"]);
    match &answer.kernel {
        KernelCounters::Counters(counters) => {
            for (name, count) in counters {
                t.add_row(vec![name.clone(), count.to_string()]);
            }
        }
        KernelCounters::Error { error } => {
            t.add_row(vec!["error".to_owned(), error.clone()]);
        }
    }
    out.push_str(&format!("{t}\n\n"));
    if let Some(router) = &answer.router {
        let mut t = table(&["ROUTER", "COUNT"]);
        for (name, count) in router {
            t.add_row(vec![name.clone(), count.to_string()]);
        }
        out.push_str(&format!("{t}\n\n"));
    }
    let mut t = table(&["SANDBOX", "SERVICE", "CONNECTIONS STEERED"]);
    for r in &answer.routes {
        t.add_row(vec![
            r.sandbox.clone(),
            r.service.clone(),
            r.steered.to_string(),
        ]);
    }
    out.push_str(&format!("{t}\n"));
    if !answer.resets.is_empty() {
        let mut t = table(&[
            "ROUTE CHANGE (UNIX TIME)",
            "SANDBOX",
            "SERVICES",
            "SOCKETS RESET",
        ]);
        for r in &answer.resets {
            let closed = if r.errors.is_empty() {
                r.closed.to_string()
            } else {
                format!("{} ({} namespaces failed)", r.closed, r.errors.len())
            };
            let who = match r.cause {
                ResetCause::RouteChange => r.sandbox.clone(),
                ResetCause::RouterBack => "(router back: any pod)".to_owned(),
            };
            t.add_row(vec![r.at.to_string(), who, r.services.join(","), closed]);
        }
        out.push_str(&format!("\n{t}\n"));
    }
    if let Some(why) = &answer.reset_unavailable {
        out.push_str(&format!(
            "\nreset_on_change unavailable on this node: {why}\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_shows_the_routers_accept_loops() {
        let answer = |router: serde_json::Value| -> StatusAnswer {
            serde_json::from_value(json!({
                "version": "1", "config": "/etc/r.toml", "cgroup": "/sys/fs/cgroup",
                "bpffs": "/sys/fs/bpf/r", "api_socket": "/run/r.sock", "state_file": "/var/lib/r",
                "programs": [], "programs_identity": "abc", "maps": [], "router": router,
                "counts": {"services": 0, "sandboxes": 0, "groups": 0, "routes": 0,
                    "member_pods": 0, "unresolved_member_pods": 0,
                    "from_api": {"services": 0, "sandboxes": 0, "groups": 0}},
            }))
            .expect("status")
        };
        let text = status(&answer(
            json!({"listen": ["10.0.0.5:15001"], "serving": true,
            "connections": 7, "accept_loops": 3}),
        ));
        assert!(
            text.contains("serving on 10.0.0.5:15001 (7 connections, 3 accept loops per address)"),
            "{text}"
        );
        // A daemon older than the setting had one listener per address.
        let text = status(&answer(
            json!({"listen": ["10.0.0.5:15001"], "serving": true,
            "connections": 7}),
        ));
        assert!(
            text.contains("(7 connections, 1 accept loop per address)"),
            "{text}"
        );
    }

    #[test]
    fn stats_show_what_route_changes_reset() {
        let answer: StatsAnswer = serde_json::from_value(json!({
            "kernel": {"steered": 2}, "routes": [], "router": null,
            "resets": [{"at": 1_700_000_000u64, "sandbox": "pr-1", "services": ["db", "cache"],
                        "closed": 3},
                       {"at": 1_700_000_060u64, "sandbox": "pr-2", "services": ["db"],
                        "closed": 0, "errors": ["/run/netns/x: gone"]},
                       {"at": 1_700_000_090u64, "cause": "router_back", "sandbox": "",
                        "services": ["web"], "closed": 4}]
        }))
        .unwrap();
        let text = stats(&answer);
        assert!(text.contains("SOCKETS RESET"), "{text}");
        assert!(text.contains("db,cache") && text.contains('3'), "{text}");
        assert!(text.contains("0 (1 namespaces failed)"), "{text}");
        assert!(text.contains("(router back: any pod)"), "{text}");
        assert!(!text.contains("unavailable"), "{text}");
        // A daemon from before resets existed answers without them.
        let old: StatsAnswer = serde_json::from_value(json!({
            "kernel": {}, "routes": [], "router": null
        }))
        .unwrap();
        assert!(!stats(&old).contains("SOCKETS RESET"));
        let unavailable = StatsAnswer {
            reset_unavailable: Some("the kernel has no bpf_sock_destroy".into()),
            ..old
        };
        assert!(stats(&unavailable).contains("unavailable on this node: the kernel has no"));
    }

    #[test]
    fn sandbox_table() {
        let text = sandboxes(&json!([{"key": "pr-1", "origin": "api", "members": [],
            "routes": [{"service": "svc-a", "forks": ["10.0.0.1:80"]},
                       {"service": "db", "forks": ["10.0.0.2:5432", "10.0.0.3:5432"]}]}]));
        assert!(text.contains("KEY"), "{text}");
        assert!(
            text.contains("pr-1") && text.contains("svc-a->10.0.0.1:80"),
            "{text}"
        );
        assert!(text.contains("db->10.0.0.2:5432,10.0.0.3:5432"), "{text}");
        assert_eq!(sandboxes(&json!([])), "no sandboxes\n");
    }

    #[test]
    fn route_table_shows_every_endpoint() {
        let text = routes(
            &json!([{"sandbox": "pr-1", "service": "svc-a", "origin": "file",
            "forks": ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], "on_fork_error": "error"}]),
        );
        assert!(text.contains("FORKS"), "{text}");
        assert!(
            text.contains("10.0.0.1:80,10.0.0.2:80,10.0.0.3:80"),
            "{text}"
        );
    }

    #[test]
    fn route_table_says_which_routes_reset_on_change() {
        let text = routes(&json!([
            {"sandbox": "pr-1", "service": "svc-a", "origin": "api", "forks": ["10.0.0.1:80"],
             "on_fork_error": "error", "reset_on_change": true},
            {"sandbox": "pr-1", "service": "db", "origin": "api", "forks": ["10.0.0.2:5432"],
             "on_fork_error": "baseline"},
        ]));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("ON CHANGE"), "{text}");
        let cells = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[1]),
            ["pr-1", "svc-a", "10.0.0.1:80", "error", "reset", "api"],
            "{text}"
        );
        assert_eq!(
            cells(lines[2]),
            ["pr-1", "db", "10.0.0.2:5432", "baseline", "-", "api"],
            "{text}"
        );
    }
}
