//! `redirector cluster sandbox create|delete|get` against a real API server. There is no
//! controller: the test plays it, writing the Sandbox's status and removing its finalizer.
mod support;

use std::{
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams},
};
use redirector_tests::k8s::{TestCluster, require_k8s};
use redirector_user::k8s::crd::{self, Sandbox, WorkloadKind};
use serde_json::{Value, json};

const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(30);
/// Longest a CLI run may take before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(60);
const FINALIZER: &str = "redirector.dev/forks";

/// What one `redirector` run printed and how it ended.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "exit code of {self:#?}");
        self
    }
}

/// Runs `redirector ARGS...` (without a KUBECONFIG from the environment).
async fn redirector(args: Vec<String>) -> Run {
    let started = Instant::now();
    let out = tokio::time::timeout(
        RUN_LIMIT,
        tokio::process::Command::new(support::redirector())
            .args(&args)
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("redirector {args:?} still running after {RUN_LIMIT:?}"))
    .expect("run redirector");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// `redirector cluster sandbox ARGS... --kubeconfig KUBECONFIG`.
async fn sandbox(kubeconfig: &Path, args: &[&str]) -> Run {
    redirector(sandbox_args(kubeconfig, args)).await
}

fn sandbox_args(kubeconfig: &Path, args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = ["cluster", "sandbox"].map(String::from).to_vec();
    all.extend(args.iter().map(|a| a.to_string()));
    all.push("--kubeconfig".into());
    all.push(kubeconfig.display().to_string());
    all
}

/// A test cluster with the CRDs established and namespace `shop`; None (SKIPPED) when the
/// machine has no test cluster binaries (a failure under CI=true).
async fn cluster() -> Option<(TestCluster, Client)> {
    if !require_k8s() {
        return None;
    }
    let cluster = TestCluster::start().await.expect("test cluster");
    let client = cluster
        .install(&crd::definitions(), NS)
        .await
        .expect("CRDs and namespace");
    Some((cluster, client))
}

/// Waits until the CLI has applied `name`, and returns it.
async fn applied(api: &Api<Sandbox>, name: &str) -> Sandbox {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(sandbox) = api.get_opt(name).await.expect("get sandbox") {
            return sandbox;
        }
        assert!(Instant::now() < deadline, "sandbox {name} never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    })
}

fn fork_status(sandbox: &str, ready: i32) -> Value {
    json!({
        "forkOf": "Deployment/svc-a",
        "namespace": NS,
        "deployment": format!("svc-a-{sandbox}"),
        "services": [{"baseline": "svc-a", "fork": format!("svc-a-{sandbox}")}],
        "readyEndpoints": ready,
        "totalEndpoints": 1,
    })
}

/// Writes the status as the controller would (a merge patch: lists are replaced whole).
async fn set_status(api: &Api<Sandbox>, name: &str, status: Value) {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .expect("patch status");
}

fn json_of(run: &Run) -> Value {
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {run:#?}"))
}

#[tokio::test]
async fn create_applies_the_spec_and_again_is_an_idempotent_update() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let kc = cluster.kubeconfig_path();
    let api: Api<Sandbox> = Api::namespaced(client.clone(), NS);
    let args = [
        "create",
        "pr-1",
        "-n",
        NS,
        "--fork",
        "svc-a:app=registry.local/svc-a:pr-1",
        "--fork",
        "svc-a:sidecar=registry.local/proxy:2",
        "--fork",
        "svc-b=registry.local/svc-b:pr-1",
        "--env",
        "svc-a:app:FEATURE_X=on",
        "--env",
        "svc-b:MODE=fast",
        "--member",
        "job=pr-1-tests",
        "--member",
        "app=web,tier=preview",
        "--ttl",
        "2h",
        "--key",
        "pr-1-key",
    ];
    let run = sandbox(kc, &args).await;
    run.assert_code(0);
    assert_eq!(run.stdout.trim(), "sandbox shop/pr-1 created", "{run:#?}");

    let made = api.get("pr-1").await.expect("the Sandbox exists");
    let spec = &made.spec;
    assert_eq!(spec.routing_key.as_deref(), Some("pr-1-key"));
    assert_eq!(spec.ttl.as_deref(), Some("2h"));
    assert_eq!(spec.forks.len(), 2, "one fork per Deployment: {spec:#?}");
    let a = &spec.forks[0];
    let of = a.fork_of.as_ref().expect("forkOf");
    assert_eq!(
        (of.kind, of.name.as_str()),
        (WorkloadKind::Deployment, "svc-a")
    );
    let custom = a.customizations.as_ref().expect("customizations");
    let images: Vec<(Option<&str>, &str)> = custom
        .images
        .iter()
        .map(|i| (i.container.as_deref(), i.image.as_str()))
        .collect();
    assert_eq!(
        images,
        [
            (Some("app"), "registry.local/svc-a:pr-1"),
            (Some("sidecar"), "registry.local/proxy:2")
        ]
    );
    assert_eq!(custom.env.len(), 1);
    assert_eq!(
        (
            custom.env[0].container.as_deref(),
            custom.env[0].name.as_str(),
            custom.env[0].value.as_str()
        ),
        (Some("app"), "FEATURE_X", "on")
    );
    let b = spec.forks[1]
        .customizations
        .as_ref()
        .expect("customizations");
    assert_eq!(b.images[0].container, None);
    assert_eq!(b.env[0].name, "MODE");
    let members: Vec<Value> = spec
        .members
        .iter()
        .map(|m| serde_json::to_value(&m.label_selector).expect("json"))
        .collect();
    assert_eq!(
        members,
        [
            json!({"matchLabels": {"job": "pr-1-tests"}}),
            json!({"matchLabels": {"app": "web", "tier": "preview"}})
        ]
    );
    let managers: Vec<String> = made
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == "redirector-cli"),
        "{managers:?}"
    );

    // The same step of a pipeline run again: nothing changes.
    let run = sandbox(kc, &args).await;
    run.assert_code(0);
    assert!(run.stdout.contains("sandbox shop/pr-1 updated"), "{run:#?}");
    let again = api.get("pr-1").await.expect("still there");
    assert_eq!(again.metadata.generation, made.metadata.generation);
    assert_eq!(again.spec, made.spec);

    // A changed step replaces what the CLI applied before (server-side apply drops the rest).
    let run = sandbox(
        kc,
        &[
            "create",
            "pr-1",
            "-n",
            NS,
            "--fork",
            "svc-a=registry.local/svc-a:pr-1b",
        ],
    )
    .await;
    run.assert_code(0);
    assert_eq!(run.stdout.trim(), "sandbox shop/pr-1 updated", "{run:#?}");
    let changed = api.get("pr-1").await.expect("still there");
    assert!(changed.metadata.generation > made.metadata.generation);
    assert_eq!(changed.spec.forks.len(), 1);
    assert!(changed.spec.members.is_empty() && changed.spec.ttl.is_none());

    // Without -n: the kubeconfig context's namespace (`default`).
    sandbox(
        kc,
        &["create", "pr-2", "--fork", "svc-a=img:2", "-o", "json"],
    )
    .await
    .assert_code(0);
    let default: Api<Sandbox> = Api::namespaced(client.clone(), "default");
    assert!(default.get_opt("pr-2").await.expect("get").is_some());

    // get: one, a namespace, everywhere; JSON and tables.
    let run = sandbox(kc, &["get", "pr-1", "-n", NS, "-o", "json"]).await;
    run.assert_code(0);
    let one = json_of(&run);
    assert_eq!(one["kind"], "Sandbox");
    assert_eq!(one["metadata"]["name"], "pr-1");
    assert_eq!(one["spec"]["forks"][0]["forkOf"]["name"], "svc-a");
    assert!(one["metadata"].get("managedFields").is_none());
    let run = sandbox(kc, &["get", "-n", NS, "-o", "json"]).await;
    run.assert_code(0);
    let list = json_of(&run);
    let names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["pr-1"]);
    let run = sandbox(kc, &["get", "-A", "-o", "json"]).await;
    run.assert_code(0);
    assert_eq!(json_of(&run)["items"].as_array().map(Vec::len), Some(2));
    let run = sandbox(kc, &["get", "-A"]).await;
    run.assert_code(0);
    let rows: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "NAMESPACE",
            "NAME",
            "KEY",
            "READY",
            "FORKS",
            "AGE",
            "EXPIRES"
        ],
        "{run:#?}"
    );
    assert_eq!(rows.len(), 3, "{run:#?}");
    assert_eq!(&rows[1][..5], ["default", "pr-2", "pr-2", "-", "0/1"]);
    assert_eq!(&rows[2][..5], ["shop", "pr-1", "pr-1", "-", "0/1"]);
    let run = sandbox(kc, &["get", "pr-1", "-n", NS]).await;
    run.assert_code(0);
    assert!(run.stdout.contains("Deployment/svc-a"), "{run:#?}");
    assert!(run.stdout.contains("(not made yet)"), "{run:#?}");
    let run = sandbox(kc, &["get", "nope", "-n", NS]).await;
    run.assert_code(1);
    assert!(
        run.stderr.contains("sandbox shop/nope not found"),
        "{run:#?}"
    );
    let run = sandbox(kc, &["get", "-n", "empty"]).await;
    run.assert_code(0);
    assert_eq!(run.stdout, "no sandboxes in namespace empty\n");
}

#[tokio::test]
async fn create_wait_ends_when_ready_for_the_applied_generation() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let api: Api<Sandbox> = Api::namespaced(client.clone(), NS);
    let cli = tokio::spawn(redirector(sandbox_args(
        cluster.kubeconfig_path(),
        &[
            "create",
            "pr-123",
            "-n",
            NS,
            "--fork",
            "svc-a=registry.local/svc-a:pr-123",
            "--member",
            "job=pr-123-tests",
            "--wait",
            "--timeout",
            "30s",
        ],
    )));
    let made = applied(&api, "pr-123").await;
    let generation = made.metadata.generation.expect("generation");

    // Ready, but for an older generation: not good enough.
    set_status(
        &api,
        "pr-123",
        json!({
            "observedGeneration": generation - 1,
            "routingKey": "pr-123",
            "conditions": [condition("Ready", "True", "ForksReady", "old news")],
            "forks": [fork_status("pr-123", 0)],
        }),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    set_status(
        &api,
        "pr-123",
        json!({
            "observedGeneration": generation,
            "conditions": [condition("Ready", "False", "ForksNotReady", "svc-a has no ready endpoint")],
            "forks": [fork_status("pr-123", 0)],
        }),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!cli.is_finished(), "the CLI returned before Ready");
    set_status(
        &api,
        "pr-123",
        json!({
            "conditions": [condition("Ready", "True", "ForksReady", "every fork has a ready endpoint")],
            "forks": [fork_status("pr-123", 1)],
        }),
    )
    .await;
    let run = cli.await.expect("CLI task");
    run.assert_code(0);
    let out = &run.stdout;
    let position = |text: &str| {
        out.find(text)
            .unwrap_or_else(|| panic!("{text:?} missing from {run:#?}"))
    };
    let created = position("sandbox shop/pr-123 created");
    let pending = position("fork Deployment/svc-a: deployment svc-a-pr-123, 0/1 ready");
    let not_ready = position("Ready=False (ForksNotReady: svc-a has no ready endpoint)");
    let ready_fork = position("fork Deployment/svc-a: deployment svc-a-pr-123, 1/1 ready");
    let done = position("sandbox shop/pr-123 is Ready (key pr-123) after ");
    assert!(created < pending && pending < ready_fork && not_ready < done && ready_fork < done);
    assert!(run.took >= Duration::from_millis(1600), "{run:#?}");
    eprintln!("create --wait: Ready {:?} after the CLI started", run.took);
}

#[tokio::test]
async fn create_wait_rides_out_an_api_server_restart() {
    let Some((mut cluster, client)) = cluster().await else {
        return;
    };
    let api: Api<Sandbox> = Api::namespaced(client.clone(), NS);
    let cli = tokio::spawn(redirector(sandbox_args(
        cluster.kubeconfig_path(),
        &[
            "create",
            "pr-4",
            "-n",
            NS,
            "--fork",
            "svc-a=img",
            "--wait",
            "--timeout",
            "40s",
        ],
    )));
    let made = applied(&api, "pr-4").await;
    // Let the CLI's watch start before the server goes away (the outage under test is during
    // the wait, not during the apply; a loaded 2-core machine needs more than a moment).
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.stop_apiserver().expect("stop the API server");
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster
        .start_apiserver()
        .await
        .expect("start the API server");
    set_status(
        &api,
        "pr-4",
        json!({
            "observedGeneration": made.metadata.generation,
            "conditions": [condition("Ready", "True", "ForksReady", "every fork has a ready endpoint")],
            "forks": [fork_status("pr-4", 1)],
        }),
    )
    .await;
    let run = cli.await.expect("CLI task");
    run.assert_code(0);
    assert!(run.stderr.contains("watching failed, retrying"), "{run:#?}");
    assert!(
        run.stdout.contains("sandbox shop/pr-4 is Ready (key pr-4)"),
        "{run:#?}"
    );
}

#[tokio::test]
async fn create_wait_fails_on_a_failed_condition() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let api: Api<Sandbox> = Api::namespaced(client.clone(), NS);
    let cli = tokio::spawn(redirector(sandbox_args(
        cluster.kubeconfig_path(),
        &[
            "create",
            "pr-9",
            "-n",
            NS,
            "--fork",
            "svc-a=registry.local/svc-a:nope",
            "--wait",
        ],
    )));
    let made = applied(&api, "pr-9").await;
    set_status(
        &api,
        "pr-9",
        json!({
            "observedGeneration": made.metadata.generation,
            "conditions": [
                condition("Ready", "False", "ForksNotReady", "svc-a has no ready endpoint"),
                condition("Failed", "True", "ImagePullError",
                    "pod svc-a-pr-9-0: cannot pull registry.local/svc-a:nope"),
            ],
            "forks": [fork_status("pr-9", 0)],
        }),
    )
    .await;
    let run = cli.await.expect("CLI task");
    run.assert_code(1);
    assert!(
        run.stderr.contains(
            "sandbox shop/pr-9 Failed: ImagePullError: pod svc-a-pr-9-0: cannot pull \
             registry.local/svc-a:nope"
        ),
        "{run:#?}"
    );
    assert!(
        run.stdout
            .contains("fork Deployment/svc-a: deployment svc-a-pr-9, 0/1 ready"),
        "{run:#?}"
    );
    assert!(
        run.stdout.contains("Failed=True (ImagePullError"),
        "{run:#?}"
    );
    assert!(!run.stdout.contains("is Ready"), "{run:#?}");
}

#[tokio::test]
async fn create_wait_times_out_saying_what_it_waits_for() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let kc = cluster.kubeconfig_path();
    let api: Api<Sandbox> = Api::namespaced(client.clone(), NS);
    let wait = [
        "create",
        "pr-5",
        "-n",
        NS,
        "--fork",
        "svc-a=img:1",
        "--wait",
        "--timeout",
        "2s",
    ];
    let run = sandbox(kc, &wait).await;
    run.assert_code(1);
    assert!(
        run.stderr.contains(
            "timed out after 2s waiting for sandbox shop/pr-5: still waiting for the \
             controller to report on it"
        ),
        "{run:#?}"
    );
    assert!(run.took >= Duration::from_secs(2), "{run:#?}");

    // A failure of the spec before ours does not fail the new one: the CLI waits for the
    // controller to observe the new generation.
    set_status(
        &api,
        "pr-5",
        json!({
            "observedGeneration": 1,
            "conditions": [condition("Failed", "True", "ImagePullError", "img:1 not found")],
        }),
    )
    .await;
    let mut fixed = wait;
    fixed[5] = "svc-a=img:2";
    let run = sandbox(kc, &fixed).await;
    run.assert_code(1);
    assert!(run.stdout.contains("sandbox shop/pr-5 updated"), "{run:#?}");
    assert!(
        run.stdout
            .contains("Failed=True (ImagePullError: img:1 not found) [for an older generation]"),
        "{run:#?}"
    );
    assert!(
        run.stderr
            .contains("still waiting for the controller to observe generation 2"),
        "{run:#?}"
    );
    assert!(!run.stderr.contains(" Failed:"), "{run:#?}");
}

#[tokio::test]
async fn delete_wait_returns_once_the_controller_has_removed_its_finalizer() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let kc = cluster.kubeconfig_path();
    let api: Api<Sandbox> = Api::namespaced(client.clone(), NS);
    sandbox(kc, &["create", "pr-7", "-n", NS, "--fork", "svc-a=img"])
        .await
        .assert_code(0);
    api.patch(
        "pr-7",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": [FINALIZER]}})),
    )
    .await
    .expect("add finalizer");

    let cli = tokio::spawn(redirector(sandbox_args(
        kc,
        &["delete", "pr-7", "-n", NS, "--wait", "--timeout", "30s"],
    )));
    // The controller: sees the deletion, deletes the forks, lets go.
    let deadline = Instant::now() + WAIT;
    loop {
        let sb = api.get("pr-7").await.expect("still there");
        if sb.metadata.deletion_timestamp.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "never marked for deletion");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let marked = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !cli.is_finished(),
        "delete --wait returned with the finalizer in place"
    );
    api.patch(
        "pr-7",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("remove finalizer");
    let run = cli.await.expect("CLI task");
    run.assert_code(0);
    assert!(marked.elapsed() >= Duration::from_secs(1));
    assert!(
        run.stdout.contains("sandbox shop/pr-7 marked for deletion"),
        "{run:#?}"
    );
    assert!(
        run.stdout.contains(&format!(
            "waiting for its finalizers to be removed ({FINALIZER}"
        )),
        "{run:#?}"
    );
    assert!(
        run.stdout.contains("sandbox shop/pr-7 is gone after"),
        "{run:#?}"
    );
    assert!(api.get_opt("pr-7").await.expect("get").is_none());

    // Gone already: not found.
    let run = sandbox(kc, &["delete", "pr-7", "-n", NS, "--wait"]).await;
    run.assert_code(1);
    assert!(
        run.stderr.contains("sandbox shop/pr-7 not found"),
        "{run:#?}"
    );

    // Without a finalizer, without --wait.
    sandbox(kc, &["create", "pr-8", "-n", NS, "--fork", "svc-a=img"])
        .await
        .assert_code(0);
    let run = sandbox(kc, &["delete", "pr-8", "-n", NS]).await;
    run.assert_code(0);
    assert_eq!(run.stdout.trim(), "sandbox shop/pr-8 deleted", "{run:#?}");

    // Re-creating a sandbox that is still being deleted is refused rather than lost.
    sandbox(kc, &["create", "pr-9", "-n", NS, "--fork", "svc-a=img"])
        .await
        .assert_code(0);
    api.patch(
        "pr-9",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": [FINALIZER]}})),
    )
    .await
    .expect("add finalizer");
    let run = sandbox(kc, &["delete", "pr-9", "-n", NS]).await;
    run.assert_code(0);
    assert!(run.stdout.contains("marked for deletion"), "{run:#?}");
    let run = sandbox(kc, &["create", "pr-9", "-n", NS, "--fork", "svc-a=img"]).await;
    run.assert_code(1);
    assert!(run.stderr.contains("is being deleted"), "{run:#?}");
}

/// A kubeconfig for an API server on a loopback port nobody listens on.
fn closed_port_kubeconfig(dir: &Path) -> (PathBuf, u16) {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: closed
  cluster:
    server: https://127.0.0.1:{port}
    insecure-skip-tls-verify: true
users:
- name: nobody
  user: {{}}
contexts:
- name: closed
  context: {{cluster: closed, user: nobody, namespace: default}}
current-context: closed
"
        ),
    )
    .expect("write kubeconfig");
    (path, port)
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rdrt-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[tokio::test]
async fn an_unreachable_api_server_exits_3() {
    let dir = scratch_dir("cluster-cli-unreachable");
    let (kc, port) = closed_port_kubeconfig(&dir);
    for args in [
        &["get"][..],
        &["get", "pr-1", "-n", NS],
        &["create", "pr-1", "--fork", "svc-a=img", "--wait"],
        &["delete", "pr-1", "--wait"],
    ] {
        let run = sandbox(&kc, args).await;
        run.assert_code(3);
        assert!(
            run.stderr.contains(&format!(
                "cannot reach the Kubernetes API server at https://127.0.0.1:{port}/"
            )),
            "{args:?}: {run:#?}"
        );
    }
    // No configuration at all: nothing to reach either.
    let mut cmd = tokio::process::Command::new(support::redirector());
    let out = cmd
        .args(["cluster", "sandbox", "get"])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", &dir)
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no Kubernetes configuration"), "{stderr}");
    // A context the kubeconfig does not have is a usage error.
    let run = sandbox(&kc, &["get", "--context", "nope"]).await;
    run.assert_code(2);
    assert!(run.stderr.contains("--context nope"), "{run:#?}");
    std::fs::remove_dir_all(&dir).expect("remove scratch dir");
}

#[tokio::test]
async fn bad_arguments_exit_2_before_any_request() {
    // Nothing listens there: a usage error must come first.
    let dir = scratch_dir("cluster-cli-usage");
    let (kc, _) = closed_port_kubeconfig(&dir);
    for (args, says) in [
        (&["create", "pr-1"][..], "--fork"),
        (&["create", "pr-1", "--fork", "svc-a"], "no image"),
        (&["create", "pr-1", "--fork", "svc-a="], "image is empty"),
        (
            &[
                "create",
                "pr-1",
                "--fork",
                "svc-a=img",
                "--env",
                "svc-b:X=1",
            ],
            "which no --fork forks",
        ),
        (
            &["create", "pr-1", "--fork", "svc-a=img", "--env", "X=1"],
            "no Deployment",
        ),
        (
            &["create", "pr-1", "--fork", "svc-a=img", "--member", "job"],
            "has no '='",
        ),
        (
            &[
                "create",
                "pr-1",
                "--fork",
                "svc-a=img",
                "--member",
                "job=a,job=b",
            ],
            "given twice",
        ),
        (
            &[
                "create",
                "pr-1",
                "--fork",
                "svc-a=img",
                "--key",
                "no spaces",
            ],
            "--key",
        ),
        (
            &["create", "pr-1", "--fork", "svc-a=img", "--ttl", "2x"],
            "--ttl",
        ),
        (
            &["create", "pr-1", "--fork", "svc-a=img", "--ttl", "30m1h"],
            "--ttl",
        ),
        (
            &["create", "pr-1", "--fork", "svc-a=img", "--timeout", "5"],
            "--timeout",
        ),
        (
            &[
                "create",
                "pr-1",
                "--fork",
                "svc-a=img",
                "--fork",
                "svc-a=img2",
            ],
            "twice",
        ),
        (
            &["create", "PR_1", "--fork", "svc-a=img"],
            "not a valid Kubernetes name",
        ),
        (&["get", "pr-1", "-A"], "cannot be used with"),
        (&["delete"], "NAME"),
    ] {
        let run = sandbox(&kc, args).await;
        run.assert_code(2);
        assert!(run.stderr.contains(says), "{args:?}: {run:#?}");
    }
    std::fs::remove_dir_all(&dir).expect("remove scratch dir");
}

#[tokio::test]
async fn help_tells_the_cluster_and_the_node_commands_apart() {
    let run = redirector(vec!["--help".into()]).await;
    run.assert_code(0);
    let line = |name: &str| {
        run.stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} line in {}", run.stdout))
            .to_owned()
    };
    assert!(line("cluster").contains("API server"), "{}", run.stdout);
    assert!(line("sandbox").contains("daemon"), "{}", run.stdout);
    // The node-local commands are as they were: they talk to a daemon's socket.
    let run = redirector(
        [
            "sandbox",
            "create",
            "pr-1",
            "--route",
            "svc-a=10.0.1.7:8080",
            "--socket",
            "/nonexistent/api.sock",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    run.assert_code(3);
    assert!(run.stderr.contains("cannot reach the daemon"), "{run:#?}");
}
