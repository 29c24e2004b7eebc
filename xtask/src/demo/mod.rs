//! `cargo xtask demo`: redirector steering real traffic, on one machine.
//!
//! Without flags, a quick demo of one node (`node.rs`): the daemon driven through its local
//! API. With `--cluster`, the whole cluster workflow (`cluster.rs`): a test API server, the
//! sandbox controller, the node agent and a fake kubelet, driven by `redirector cluster sandbox
//! create --fork ... --wait` as a pull request pipeline would.
mod cluster;
mod node;

use serde_json::Value;

#[derive(clap::Args, Default)]
pub struct Options {
    /// Show the cluster workflow instead, with no real cluster: a test API server (built the
    /// first time, in minutes, then cached), a simulated node running the node agent, the
    /// sandbox controller and a fake kubelet. `redirector cluster sandbox create --fork ... --wait`
    /// forks Deployment svc-a, the fork goes Ready, member and keyed traffic reach it, and
    /// `redirector cluster sandbox delete --wait` puts everything back on the baseline. Fails
    /// (exit 1) if any step does not do what it should, so it doubles as a smoke test.
    #[arg(long)]
    cluster: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.cluster {
        cluster::run()
    } else {
        node::run()
    }
}

fn text(value: &Value) -> String {
    value.as_str().map_or_else(|| "-".to_owned(), str::to_owned)
}

fn step(title: &str) {
    println!("\n==> {title}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
