//! Long-lived `rdr-peer` processes in a pod: a server, and a session holding one TCP connection.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

use crate::proc::{Stream, Supervised, Wait, status_text};

/// A running `rdr-peer serve`; killed on drop.
pub struct Server {
    pub(super) name: String,
    pub(super) pod: String,
    pub(super) proc: Supervised,
}

impl Server {
    pub(crate) fn new(name: &str, pod: &str, proc: Supervised) -> Server {
        Server {
            name: name.to_owned(),
            pod: pod.to_owned(),
            proc,
        }
    }

    /// The name the server puts in its replies.
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn pod(&self) -> &str {
        &self.pod
    }
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
    /// What the server printed (its stderr carries per-connection errors).
    pub fn logs(&self) -> String {
        self.proc.log.text(None)
    }
    /// Kills the server now (e.g. to make a fork disappear mid-test).
    pub fn stop(mut self) {
        self.proc.shutdown(Duration::ZERO);
    }
}

/// One TCP reply within a [`Session`].
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Reply {
    pub server: String,
    pub line: String,
}

/// A long-lived TCP connection held by `rdr-peer session` inside a pod.
pub struct Session {
    pub(super) label: String,
    pub(super) peer: SocketAddr,
    pub(super) cursor: usize,
    pub(super) wait: Duration,
    pub(super) proc: Supervised,
}

impl Session {
    /// getpeername() of the connection, as the application saw it right after connect.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Sends one line over the connection and returns the server's reply. An error means the
    /// connection broke (or timed out); the session is unusable afterwards.
    pub fn send(&mut self, line: &str) -> Result<Reply> {
        ensure!(
            !line.contains('\n'),
            "a session line cannot contain a newline"
        );
        let stdin = self
            .proc
            .stdin
            .as_mut()
            .with_context(|| format!("[{}] session already closed", self.label))?;
        use std::io::Write as _;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .with_context(|| {
                format!(
                    "[{}] session process gone:\n{}",
                    self.label,
                    self.proc.log.text(None)
                )
            })?;
        let raw =
            match self
                .proc
                .log
                .wait_line(self.cursor, Some(Stream::Stdout), |_| true, self.wait)
            {
                Wait::Found(i, l) => {
                    self.cursor = i + 1;
                    l
                }
                Wait::Closed => bail!(
                    "[{}] connection broke on {line:?}:\n{}",
                    self.label,
                    self.proc.log.text(None)
                ),
                Wait::TimedOut => bail!(
                    "[{}] no reply to {line:?} within {:?}",
                    self.label,
                    self.wait
                ),
            };
        serde_json::from_str(&raw)
            .with_context(|| format!("[{}] unexpected reply {raw:?}", self.label))
    }

    /// Closes the connection from the client side and checks that rdr-peer exited cleanly.
    pub fn close(mut self) -> Result<()> {
        self.proc.stdin.take();
        match self.proc.wait_timeout(self.wait)? {
            Some(st) if st.success() => Ok(()),
            Some(st) => bail!(
                "[{}] ended with {}:\n{}",
                self.label,
                status_text(st),
                self.proc.log.text(None)
            ),
            None => bail!("[{}] did not exit after stdin closed", self.label),
        }
    }
}
