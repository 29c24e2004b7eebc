//! Developer tasks. `cargo xtask setup` installs the build prerequisites; every other task runs
//! it first, so `cargo xtask demo` and `cargo xtask test` work on a fresh machine.
mod bench;
mod demo;
mod k8s_testenv;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "redirector's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install rust-src and a bpf-linker built against this toolchain's LLVM (idempotent).
    Setup(setup::Options),
    /// Live demo on a simulated node: a member pod and a non-member pod call the same service
    /// (`--cluster`: the whole cluster workflow, with a test API server and the controller).
    Demo(demo::Options),
    /// Build (once) the real Kubernetes API server and etcd the Kubernetes tests run against,
    /// from pinned Debian sid packages; `test` runs this first. A cold build takes ~15 minutes.
    #[command(name = "k8s-testenv")]
    K8sTestenv(k8s_testenv::Options),
    /// Run the whole test suite (unit and end-to-end; needs root).
    Test(test::Options),
    /// Benchmarks on a simulated node: direct vs fast path, L4, L7, iptables and nginx.
    Bench(bench::Options),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup(opts) => setup::run(&opts),
        Task::Demo(opts) => demo::run(&opts),
        Task::K8sTestenv(opts) => k8s_testenv::run(&opts),
        Task::Test(opts) => test::run(&opts),
        Task::Bench(opts) => bench::run(&opts),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
