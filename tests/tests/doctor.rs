//! `redirector doctor` on a simulated node: a good placement passes, a missing attach cgroup
//! fails by name, and neither run leaves anything behind on the bpffs or attaches anything.
mod support;

use std::{collections::BTreeSet, path::Path};

use redirector_tests::{Node, require_e2e};
use support::{attached_programs, redirector};

/// Exit code, stdout and stderr of `redirector ARGS`, run in the node namespace.
fn doctor(node: &Node, args: &[&str]) -> (Option<i32>, String, String) {
    let out = node
        .command(redirector())
        .arg("doctor")
        .args(args)
        .output()
        .expect("run redirector doctor");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (name, status, detail) of each check in `-o json` output.
fn parse(stdout: &str) -> Vec<(String, String, String)> {
    let checks: Vec<serde_json::Value> =
        serde_json::from_str(stdout).unwrap_or_else(|e| panic!("doctor json: {e}: {stdout}"));
    checks
        .iter()
        .map(|c| {
            let field = |name: &str| c[name].as_str().unwrap_or_default().to_owned();
            (field("name"), field("status"), field("detail"))
        })
        .collect()
}

/// Every path below `dir`, to compare before and after a run.
fn tree(dir: &Path) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read bpffs").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            paths.insert(path.display().to_string());
        }
    }
    paths
}

fn assert_untouched(node: &Node, before: &BTreeSet<String>) {
    let after = tree(node.bpffs());
    assert_eq!(&after, before, "doctor left something on the bpffs");
    assert!(
        !after.iter().any(|p| p.contains("redirector-doctor")),
        "{after:?}"
    );
    assert!(
        attached_programs(node.cgroup()).is_empty(),
        "doctor must not attach anything"
    );
}

#[test]
fn good_setup_passes_and_leaves_nothing_behind() {
    if !require_e2e() {
        return;
    }
    let node = Node::new("doctor-ok").expect("simulated node");
    let cgroup = node.cgroup().to_str().expect("utf-8 path").to_owned();
    let before = tree(node.bpffs());

    // The pin directory does not exist yet: scratch pins go to the bpffs root.
    let pin_dir = node.bpffs().join("redirector");
    let pin_dir = pin_dir.to_str().expect("utf-8 path");
    let (code, stdout, stderr) = doctor(
        &node,
        &["--cgroup", &cgroup, "--bpffs", pin_dir, "-o", "json"],
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let checks = parse(&stdout);
    let names: Vec<&str> = checks.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "privileges",
            "kernel",
            "btf",
            "cgroup2",
            "attach point",
            "bpffs",
            "hooks",
            "router address",
            "already running"
        ]
    );
    for (name, status, detail) in &checks {
        assert!(
            status == "pass" || status == "warn",
            "{name}: {status}: {detail}"
        );
    }
    let hooks = checks.iter().find(|(n, _, _)| n == "hooks").expect("hooks");
    assert_eq!(hooks.1, "pass", "the kernel must accept every program");
    assert_untouched(&node, &before);

    // The bpffs mount itself as the pin directory (no bpffs above it), human output.
    let bpffs = node.bpffs().to_str().expect("utf-8 path");
    let (code, stdout, stderr) = doctor(&node, &["--cgroup", &cgroup, "--bpffs", bpffs]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("CHECK") && stdout.contains("STATUS") && stdout.contains("DETAIL"),
        "{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert_untouched(&node, &before);
}

#[test]
fn missing_attach_cgroup_fails_and_is_named() {
    if !require_e2e() {
        return;
    }
    let node = Node::new("doctor-nocg").expect("simulated node");
    let missing = node.cgroup().join("no-such-pods");
    let missing = missing.to_str().expect("utf-8 path");
    let pin_dir = node.bpffs().join("redirector");
    let pin_dir = pin_dir.to_str().expect("utf-8 path");
    let before = tree(node.bpffs());

    let (code, stdout, stderr) = doctor(
        &node,
        &["--cgroup", missing, "--bpffs", pin_dir, "-o", "json"],
    );
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let checks = parse(&stdout);
    let (_, status, detail) = checks
        .iter()
        .find(|(n, _, _)| n == "attach point")
        .expect("attach point check");
    assert_eq!(status, "fail");
    assert!(detail.contains("no-such-pods"), "{detail}");
    // The other checks do not depend on the attach point.
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(_, s, _)| s == "fail")
        .map(|(n, _, _)| n.as_str())
        .collect();
    assert_eq!(failed, ["attach point"], "{stdout}");
    assert_untouched(&node, &before);

    // Human output names the path and says how to fix it.
    let (code, stdout, stderr) = doctor(&node, &["--cgroup", missing, "--bpffs", pin_dir]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("no-such-pods") && stdout.contains("fix:"),
        "{stdout}"
    );
}
