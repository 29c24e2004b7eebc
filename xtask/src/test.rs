//! `cargo xtask test`: the whole suite. Unit tests, then the end-to-end tests that build
//! simulated nodes out of network namespaces and run the real daemon against the real kernel.
//!
//! The end-to-end tests need root. Without it they say SKIPPED loudly, except under `CI=true`,
//! where a missing prerequisite fails the run.
use std::process::Command;

use anyhow::Context as _;

use crate::{k8s_testenv, setup};

#[derive(clap::Args, Default)]
pub struct Options {
    /// Extra arguments for `cargo test` (e.g. a test-name filter), after `--`.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run(&setup::Options::default())?;
    // The Kubernetes tests run a real API server and etcd, built once and cached.
    let k8s = k8s_testenv::ensure()?;
    build_upgrade_probe()?;
    // The e2e tests spawn the `redirector` and `rdr-peer` binaries: build them first so the
    // tests always run the current code.
    setup::status(Command::new(env!("CARGO")).args(["build", "--bins"]))?;
    setup::status(
        Command::new(env!("CARGO"))
            .args(["test", "--no-fail-fast"])
            .envs(k8s.env())
            .args(&opts.cargo_test_args),
    )
}

/// The upgrade test (tests/tests/upgrade.rs) restarts the daemon as a build whose kernel
/// programs differ: `redirector` built with the `ebpf-upgrade-probe` feature, kept beside the
/// real one as `redirector-upgrade-probe`. Built before the plain `--bins` build, which then
/// puts the release-feature `redirector` back in place.
fn build_upgrade_probe() -> anyhow::Result<()> {
    setup::status(Command::new(env!("CARGO")).args([
        "build",
        "-p",
        "redirector-user",
        "--bin",
        "redirector",
        "--features",
        "ebpf-upgrade-probe",
    ]))?;
    // xtask itself runs from <target>/debug, where cargo just put the probe build.
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let debug = exe.parent().context("xtask binary has no directory")?;
    let probe = debug.join("redirector-upgrade-probe");
    std::fs::copy(debug.join("redirector"), &probe)
        .with_context(|| format!("copying the probe build to {}", probe.display()))?;
    Ok(())
}
