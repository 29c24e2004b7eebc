//! Upgrades replace the kernel programs: a daemon of another build attaches its own programs
//! beside the pinned ones, fills the maps, then detaches the old ones, and traffic never stops.
mod support;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use redirector_tests::workspace_bin;
use support::{BASELINE, Cluster, FORK, READY, VIP4, addr, attached_tags};

/// The standard config has no node router: every hook but sock_ops.
const HOOKS: usize = 8;

/// `redirector` built with the `ebpf-upgrade-probe` feature (its connect4 differs by one
/// instruction); `cargo xtask test` builds it.
fn probe_build() -> Option<std::path::PathBuf> {
    match workspace_bin("redirector-upgrade-probe") {
        Ok(path) => Some(path),
        Err(err) if redirector_tests::under_ci() => panic!("{err:#}: run `cargo xtask test`"),
        Err(err) => {
            eprintln!("SKIPPED: {err:#} (`cargo xtask test` builds it)");
            None
        }
    }
}

#[test]
fn a_new_build_replaces_the_programs_without_a_gap() {
    let Some(mut c) = Cluster::new("upgrade") else {
        return;
    };
    let Some(probe) = probe_build() else {
        return;
    };
    c.start(&[]);
    let release = attached_tags(c.node.cgroup());
    assert_eq!(release.len(), HOOKS, "{release:?}");

    let stop = AtomicBool::new(false);
    let (calls, failures) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let (mut calls, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                for (pod, want) in [(&c.member, FORK), (&c.outsider, BASELINE)] {
                    calls += 1;
                    match pod.call_tcp(&c.node, addr(VIP4), true) {
                        Ok(r) if r.server == want => {}
                        Ok(r) => failures.push(format!("{} reached {}", pod.name, r.server)),
                        Err(e) => failures.push(format!("{}: {e:#}", pod.name)),
                    }
                }
            }
            (calls, failures)
        });

        // Stops the traffic also when an assertion below fails, so the scope can end.
        let _stop_traffic = StopOnDrop(&stop);
        for (label, binary) in [
            ("redirector-probe", probe.clone()),
            ("redirector", support::redirector()),
        ] {
            c.daemon.take().expect("daemon").terminate().expect("stop");
            let daemon = c
                .node
                .spawn_daemon(label, &binary, &c.run_args(&[]))
                .expect("spawn daemon");
            daemon.wait_for_log("ready", READY).expect("ready");
            let logs = daemon.logs();
            assert!(
                logs.contains("detached the programs of another build"),
                "old programs retired:\n{logs}"
            );
            c.daemon = Some(daemon);
            // The kernel releases a detached link's program asynchronously: it may show for a
            // moment after the daemon says it retired it.
            let mut now = Vec::new();
            let retired = support::eventually(Duration::from_secs(2), || {
                now = attached_tags(c.node.cgroup());
                now.len() == HOOKS
            });
            assert!(retired, "old programs detached: {now:?}");
            let connect4 =
                |tags: &[(String, String)]| tags.iter().find(|(n, _)| n == "connect4").cloned();
            if label == "redirector-probe" {
                assert_ne!(connect4(&now), connect4(&release), "the new connect4 runs");
            } else {
                assert_eq!(now, release, "back on the release build's programs");
            }
            // Some traffic under each build.
            std::thread::sleep(Duration::from_millis(300));
        }
        drop(_stop_traffic);
        traffic.join().expect("traffic thread")
    });
    assert!(
        calls >= 10,
        "traffic ran during the upgrades ({calls} calls)"
    );
    assert!(
        failures.is_empty(),
        "{} of {calls} calls went wrong: {failures:?}",
        failures.len()
    );
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
