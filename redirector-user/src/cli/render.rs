//! Human tables for the CLI's `-o table` output (the default).
use comfy_table::{Table, presets};
use serde_json::Value;

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
    let mut t = table(&["SANDBOX", "SERVICE", "FORKS", "ON FORK ERROR", "ORIGIN"]);
    for r in rows(value) {
        t.add_row(vec![
            s(&r["sandbox"]),
            s(&r["service"]),
            forks(r),
            s(&r["on_fork_error"]),
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

pub fn status(value: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "redirector {}\n  attach point  {}\n  pins          {}\n  api           {}\n",
        s(&value["version"]),
        s(&value["cgroup"]),
        s(&value["bpffs"]),
        s(&value["api_socket"]),
    ));
    let hooks: Vec<String> = rows(&value["programs"])
        .iter()
        .map(|p| format!("{} ({})", s(&p["hook"]), s(&p["state"])))
        .collect();
    out.push_str(&format!("  programs      {}\n", hooks.join(", ")));
    match value["router"].as_object() {
        Some(router) => out.push_str(&format!(
            "  router        serving on {} ({} connections)\n",
            list(&router["listen"]),
            s(&router["connections"])
        )),
        None => out.push_str("  router        off (no daemon.router_listen)\n"),
    }
    let c = &value["counts"];
    out.push_str(&format!(
        "  state         {} services, {} sandboxes, {} groups, {} routes, {} member pods ({} not found)\n\n",
        s(&c["services"]),
        s(&c["sandboxes"]),
        s(&c["groups"]),
        s(&c["routes"]),
        s(&c["member_pods"]),
        s(&c["unresolved_member_pods"]),
    ));
    let mut t = table(&["MAP", "ENTRIES", "CAPACITY", "USED"]);
    for m in rows(&value["maps"]) {
        let entries = m["entries"].as_f64().unwrap_or(0.0);
        let capacity = m["capacity"].as_f64().unwrap_or(1.0).max(1.0);
        t.add_row(vec![
            s(&m["map"]),
            s(&m["entries"]),
            s(&m["capacity"]),
            format!("{:.1}%", 100.0 * entries / capacity),
        ]);
    }
    out.push_str(&format!("{t}\n"));
    if let Some(kube) = value["kubernetes"].as_object() {
        out.push_str(&kubernetes(kube));
    }
    // Only the members that are not steered: on a busy node the healthy ones are noise.
    let unhealthy: Vec<&Value> = rows(&value["members"])
        .iter()
        .filter(|m| m["state"] != "steered")
        .collect();
    if !unhealthy.is_empty() {
        let mut t = table(&["SANDBOX", "MEMBER", "STATE"]);
        for m in unhealthy {
            t.add_row(vec![s(&m["sandbox"]), s(&m["path"]), s(&m["state"])]);
        }
        out.push_str(&format!("\n{t}\n"));
    }
    out
}

/// The Kubernetes source: connection and objects on a few lines, then only what needs a look
/// (objects left out, members not found, with the reason).
fn kubernetes(kube: &serde_json::Map<String, Value>) -> String {
    let h = &kube["health"];
    let o = &h["objects"];
    let mut out = format!(
        "\nkubernetes      node {}, {} ({} of 5 watches listed, {} failing){}\n  \
         objects       {} sandboxes, {} route groups, {} services, {} endpoint slices, {} pods on this node\n  \
         members       {} resolved, {} not found\n  \
         last sync     {}\n",
        s(&h["node"]),
        if h["connected"] == true {
            "connected"
        } else {
            "NOT connected"
        },
        s(&h["watches_synced"]),
        s(&h["watches_failing"]),
        h["last_error"]
            .as_str()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default(),
        s(&o["sandboxes"]),
        s(&o["route_groups"]),
        s(&o["services"]),
        s(&o["endpoint_slices"]),
        s(&o["pods_on_node"]),
        s(&kube["members_resolved"]),
        s(&kube["members_unresolved"]),
        h["last_sync"].as_u64().map_or_else(
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
    for issue in rows(&kube["issues"]) {
        t.add_row(vec![s(&issue["object"]), s(&issue["message"])]);
        problems += 1;
    }
    for rejected in rows(&kube["rejected"]) {
        t.add_row(vec!["(left out)".to_owned(), s(rejected)]);
        problems += 1;
    }
    for m in rows(&kube["members"])
        .iter()
        .filter(|m| !m["error"].is_null())
    {
        t.add_row(vec![
            format!("Pod {} ({})", s(&m["pod"]), s(&m["key"])),
            s(&m["error"]),
        ]);
        problems += 1;
    }
    if problems > 0 {
        out.push_str(&format!("{t}\n"));
    }
    out
}

pub fn stats(value: &Value) -> String {
    let mut out = String::new();
    let mut t = table(&["KERNEL EVENT", "COUNT"]);
    if let Some(kernel) = value["kernel"].as_object() {
        for (name, count) in kernel {
            t.add_row(vec![name.clone(), s(count)]);
        }
    }
    out.push_str(&format!("{t}\n\n"));
    if let Some(router) = value["router"].as_object() {
        let mut t = table(&["ROUTER", "COUNT"]);
        for (name, count) in router {
            t.add_row(vec![name.clone(), s(count)]);
        }
        out.push_str(&format!("{t}\n\n"));
    }
    let mut t = table(&["SANDBOX", "SERVICE", "CONNECTIONS STEERED"]);
    for r in rows(&value["routes"]) {
        t.add_row(vec![s(&r["sandbox"]), s(&r["service"]), s(&r["steered"])]);
    }
    out.push_str(&format!("{t}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
