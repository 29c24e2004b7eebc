//! Restart safety: steering outlives the daemon, a new daemon adopts what is pinned, and
//! cleanup removes everything.
mod support;

use std::time::Duration;

use redirector_user::api::answers::HookState;
use support::{BASELINE, Cluster, FORK, VIP4, VIP6, attached_programs, run_redirector};

/// The standard config has no node router: every hook but sock_ops.
const HOOKS: usize = 8;

#[test]
fn kill_9_keeps_steering_and_a_restart_adopts_without_duplicates() {
    let Some(mut c) = Cluster::new("restart-kill9") else {
        return;
    };
    c.start(&[]);
    assert_eq!(attached_programs(c.node.cgroup()).len(), HOOKS);
    assert_eq!(c.tcp(&c.member, VIP4), FORK);

    c.daemon().kill9();
    c.daemon = None;
    assert_eq!(c.tcp(&c.member, VIP4), FORK, "steering survives kill -9");
    assert_eq!(c.udp(&c.member, VIP6), FORK, "steering survives kill -9");
    assert_eq!(c.tcp(&c.outsider, VIP4), BASELINE);

    let daemon = c.start(&[]);
    let logs = daemon.logs();
    assert!(logs.contains("attached=[]"), "nothing re-attached:\n{logs}");
    assert!(
        logs.contains("adopted=[\"connect4\""),
        "programs adopted:\n{logs}"
    );
    let attached = attached_programs(c.node.cgroup());
    assert_eq!(
        attached.len(),
        HOOKS,
        "no duplicate attachments: {attached:?}"
    );
    assert_eq!(c.tcp(&c.member, VIP4), FORK);

    // A plain stop leaves steering in place too; `uninstall` removes it.
    c.daemon().terminate().expect("terminate");
    c.daemon = None;
    assert_eq!(
        c.tcp(&c.member, VIP4),
        FORK,
        "steering survives a clean stop"
    );
    let pins = c.pin_dir().to_string_lossy().into_owned();
    let (ok, out) = run_redirector(&c.node, &["uninstall", "--bpffs", &pins]);
    assert!(ok, "uninstall: {out}");
    assert!(
        attached_programs(c.node.cgroup()).is_empty(),
        "all detached"
    );
    assert!(!c.pin_dir().exists(), "pins removed");
    assert_eq!(c.tcp(&c.member, VIP4), BASELINE);
    let (ok, out) = run_redirector(&c.node, &["uninstall", "--bpffs", &pins]);
    assert!(
        ok && out.contains("nothing to remove"),
        "uninstall is idempotent: {out}"
    );
}

#[test]
fn cleanup_on_exit_detaches_and_unpins() {
    let Some(mut c) = Cluster::new("restart-cleanup") else {
        return;
    };
    c.start(&["--cleanup-on-exit"]);
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
    let status = c.daemon().terminate().expect("terminate");
    c.daemon = None;
    assert!(status.success(), "clean exit: {status}");
    assert!(
        attached_programs(c.node.cgroup()).is_empty(),
        "all detached"
    );
    assert!(!c.pin_dir().exists(), "pins removed");
    assert_eq!(c.tcp(&c.member, VIP4), BASELINE);
}

#[test]
fn restart_with_a_changed_config_applies_it_without_reattaching() {
    let Some(mut c) = Cluster::new("restart-changed") else {
        return;
    };
    c.start(&[]);
    c.daemon().kill9();
    c.daemon = None;
    c.write_config(&c.config_text(false));
    c.start(&[]);
    assert_eq!(attached_programs(c.node.cgroup()).len(), HOOKS);
    assert!(
        support::eventually(Duration::from_secs(2), || c.tcp(&c.member, VIP4)
            == BASELINE),
        "the route removed while the daemon was down is gone after restart"
    );
}

/// sock_ops runs only while a node router is configured: a restart that adds the router
/// attaches it, one that removes the router detaches it; the other hooks are adopted throughout.
#[test]
fn the_handoff_program_is_attached_only_with_a_router() {
    let Some(mut c) = Cluster::new("restart-sockops") else {
        return;
    };
    let sockops = |c: &Cluster| {
        support::attached_tags(c.node.cgroup())
            .iter()
            .filter(|(name, _)| name == "handoff_sockops")
            .count()
    };
    c.start(&[]);
    assert_eq!(sockops(&c), 0, "no router, no sock_ops");
    let state = |c: &Cluster| {
        support::status(c)
            .programs
            .iter()
            .find(|p| p.hook == "handoff_sockops")
            .map(|p| p.state)
    };
    assert_eq!(state(&c), Some(HookState::NotNeeded));

    c.daemon().terminate().expect("stop");
    c.start(&["--router-listen", "10.200.0.1:15001"]);
    assert_eq!(sockops(&c), 1, "attached with the router");
    assert_eq!(state(&c), Some(HookState::Attached));
    assert_eq!(attached_programs(c.node.cgroup()).len(), HOOKS + 1);
    assert_eq!(c.tcp(&c.member, VIP4), FORK);

    c.daemon().terminate().expect("stop");
    let daemon = c.start(&[]);
    assert!(daemon.logs().contains("attached=[]"), "{}", daemon.logs());
    assert_eq!(sockops(&c), 0, "detached without it");
    assert_eq!(attached_programs(c.node.cgroup()).len(), HOOKS);
    assert_eq!(c.tcp(&c.member, VIP4), FORK);
    assert_eq!(c.tcp(&c.outsider, VIP4), BASELINE);
}
