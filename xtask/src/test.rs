//! `cargo xtask test`: the whole suite. Unit tests, then the end-to-end tests that build
//! simulated nodes out of network namespaces and run the real daemon against the real kernel.
//!
//! The end-to-end tests need root. Without it they say SKIPPED loudly, except under `CI=true`,
//! where a missing prerequisite fails the run.
use std::process::Command;

use crate::setup;

#[derive(clap::Args, Default)]
pub struct Options {
    /// Extra arguments for `cargo test` (e.g. a test-name filter), after `--`.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run(&setup::Options::default())?;
    // The e2e tests spawn the `redirector` and `rdr-peer` binaries: build them first so the
    // tests always run the current code.
    setup::status(Command::new(env!("CARGO")).args(["build", "--bins"]))?;
    setup::status(
        Command::new(env!("CARGO"))
            .args(["test", "--no-fail-fast"])
            .args(&opts.cargo_test_args),
    )
}
