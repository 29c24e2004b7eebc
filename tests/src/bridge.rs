//! A TCP port in a test network namespace that leads to a loopback address of the host: how a
//! daemon running in a simulated node's namespace reaches a server the test runs on the host's
//! loopback (the Kubernetes API server), without any route out of the node.
//!
//! A socket belongs to the namespace of the thread that made it: the listener is made by a
//! thread that entered the node's namespace, every upstream socket by a thread of the host's.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    thread,
};

use anyhow::{Context as _, Result};

/// Listens on 127.0.0.1:`port()` inside a network namespace and forwards every connection to
/// `target` on the host's loopback. Runs until the process ends (its threads hold nothing the
/// harness must clean up: the listener dies with the namespace).
pub struct Bridge {
    port: u16,
}

impl Bridge {
    pub fn start(netns: &Path, target: SocketAddr) -> Result<Bridge> {
        anyhow::ensure!(
            target.ip().is_loopback(),
            "a bridge only leads to loopback, not {target}"
        );
        let ns =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let listener = thread::spawn(move || -> io::Result<TcpListener> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("bridge thread panicked"))?
        .context("listening inside the namespace")?;
        let port = listener.local_addr()?.port();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                thread::spawn(move || {
                    if let Ok(upstream) = TcpStream::connect(target) {
                        pipe(client, upstream);
                    }
                });
            }
        });
        Ok(Bridge { port })
    }

    /// The port on 127.0.0.1 inside the namespace.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Copies both ways until either side closes.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let forward = thread::spawn(move || copy_then_close(a, b2));
    copy_then_close(b, a2);
    let _ = forward.join();
}

fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}
