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
            .map(|r| format!("{}->{}", s(&r["service"]), s(&r["fork"])))
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
    let mut t = table(&["SANDBOX", "SERVICE", "FORK", "ON FORK ERROR", "ORIGIN"]);
    for r in rows(value) {
        t.add_row(vec![
            s(&r["sandbox"]),
            s(&r["service"]),
            s(&r["fork"]),
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
            "routes": [{"service": "svc-a", "fork": "10.0.0.1:80"}]}]));
        assert!(text.contains("KEY"), "{text}");
        assert!(
            text.contains("pr-1") && text.contains("svc-a->10.0.0.1:80"),
            "{text}"
        );
        assert_eq!(sandboxes(&json!([])), "no sandboxes\n");
    }
}
