//! HTTP peers in pods: [`Pod::serve_http`] starts `rdr-http serve`, [`Pod::http`] runs one
//! `rdr-http` client subcommand and returns its JSON lines, [`Pod::spawn_http`] starts a client
//! that keeps running (the `hold` and `stall` attackers), [`HttpReq`] builds the request specs
//! of `rdr-http h1|h2 --req SPEC`.
//!
//! What the server answers and what each client prints is documented in
//! `src/bin/rdr-http.rs` and `src/bin/rdr_http/`.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use serde_json::Value;

use crate::prereq::workspace_bin;
use crate::proc::{SpawnOpts, Stream, Supervised, Wait, run_with_timeout, status_text};
use crate::simnode::{Node, Pod, Server};

const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// rdr-http's own `--timeout-ms` default.
const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// rdr-http raw's own `--read-ms` default.
const DEFAULT_READ_MS: u64 = 3000;
/// Wall-clock time a client run gets on top of the sum of its own bounds.
const SLACK: Duration = Duration::from_secs(10);

/// One request of `rdr-http h1|h2`, serialized to the `--req` JSON spec by [`HttpReq::spec`].
///
/// ```ignore
/// let spec = HttpReq::get("/x").header("baggage", "sd-routing-key=pr-1").spec();
/// pod.http(&node, &["h1", "--addr", "10.96.0.10:8080", "--req", &spec, &spec])?;
/// ```
#[derive(Clone, Debug, Default, Serialize)]
pub struct HttpReq {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Wait this long on the open connection before sending (`h1`: after the previous
    /// response; `h2`: after the connection opened).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
}

impl HttpReq {
    pub fn get(path: &str) -> HttpReq {
        HttpReq {
            path: Some(path.to_owned()),
            ..HttpReq::default()
        }
    }

    pub fn post(path: &str, body: &str) -> HttpReq {
        HttpReq {
            path: Some(path.to_owned()),
            method: Some("POST".to_owned()),
            body: Some(body.to_owned()),
            ..HttpReq::default()
        }
    }

    /// Adds a request header (repeatable; the same name twice sends it twice).
    pub fn header(mut self, name: &str, value: &str) -> HttpReq {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn method(mut self, method: &str) -> HttpReq {
        self.method = Some(method.to_owned());
        self
    }

    pub fn pause_ms(mut self, ms: u64) -> HttpReq {
        self.pause_ms = Some(ms);
        self
    }

    pub fn body(mut self, body: &str) -> HttpReq {
        self.body = Some(body.to_owned());
        self
    }

    /// The JSON text to pass after `--req`.
    pub fn spec(&self) -> String {
        // Strings and string pairs only: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// Server names become header values and log labels: keep them plain.
fn check_server_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 40
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "server name {name:?}: use 1..=40 characters of [A-Za-z0-9_-]"
    );
    Ok(())
}

/// The value following `flag` in `args`, parsed as a number.
fn flag_value(args: &[&str], flag: &str) -> Option<u64> {
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

/// How long a client run may take in all before the harness kills it. rdr-http bounds each
/// wait by `--timeout-ms` but not the run as a whole, so this adds up the waits the command
/// line implies: a few per request, the raw read window and the drip time of every byte.
fn wall_limit(args: &[&str]) -> Duration {
    let timeout = flag_value(args, "--timeout-ms").unwrap_or(DEFAULT_TIMEOUT_MS);
    let requests = args.iter().filter(|a| a.starts_with('{')).count().max(1) as u64;
    let mut ms = timeout * (2 + 3 * requests);
    if args.first() == Some(&"grpc") {
        ms += timeout * 2 * flag_value(args, "--stream").unwrap_or(1);
    }
    if args.first() == Some(&"idle") {
        ms += flag_value(args, "--hold-ms").unwrap_or(60_000);
    }
    if args.first() == Some(&"raw") {
        ms += flag_value(args, "--read-ms").unwrap_or(DEFAULT_READ_MS);
        if let Some(drip) = flag_value(args, "--drip-ms") {
            let sent = args
                .iter()
                .position(|a| *a == "--send")
                .and_then(|i| args.get(i + 1))
                .map_or(0, |s| s.len() as u64);
            let sent = sent.max(flag_value(args, "--send-header-bytes").unwrap_or(0));
            ms += drip * sent;
        }
    }
    Duration::from_millis(ms) + SLACK
}

impl Pod {
    /// Starts `rdr-http serve --name NAME --port PORT` in the pod (in the test cgroup) and
    /// waits for its `ready` line. It answers HTTP/1.1, h2c and gRPC on `[::]:PORT`; the guard
    /// kills it on drop.
    pub fn serve_http(&self, node: &Node, name: &str, port: u16) -> Result<Server> {
        self.serve_http_with(node, name, port, &[])
    }

    /// Like [`Pod::serve_http`], with more `rdr-http serve` options (e.g. `--max-streams N`).
    pub fn serve_http_with(
        &self,
        node: &Node,
        name: &str,
        port: u16,
        extra: &[&str],
    ) -> Result<Server> {
        check_server_name(name)?;
        let mut cmd = self.command(node, workspace_bin("rdr-http")?, true);
        cmd.args(["serve", "--name", name, "--port", &port.to_string()]);
        cmd.args(extra);
        let label = format!("{} {}/{name} (http)", node.label(), self.name);
        let proc = Supervised::spawn(
            &label,
            cmd,
            SpawnOpts {
                stdin: false,
                echo: true,
                grace: Duration::ZERO,
            },
        )?;
        match proc
            .log
            .wait_line(0, Some(Stream::Stdout), |l| l == "ready", READY_TIMEOUT)
        {
            Wait::Found(..) => Ok(Server::new(name, &self.name, proc)),
            Wait::Closed => bail!("[{label}] exited before ready:\n{}", proc.log.text(None)),
            Wait::TimedOut => bail!(
                "[{label}] not ready within {READY_TIMEOUT:?}:\n{}",
                proc.log.text(None)
            ),
        }
    }

    /// Starts a long-running `rdr-http <args>` client (such as `hold` or `stall`) in the pod,
    /// in the test cgroup, and waits up to `ready_within` for its first stdout line, returned
    /// parsed. The guard kills the client on drop; its name (for logs) is `label`.
    pub fn spawn_http(
        &self,
        node: &Node,
        label: &str,
        args: &[&str],
        ready_within: Duration,
    ) -> Result<(Server, Value)> {
        let mut cmd = self.command(node, workspace_bin("rdr-http")?, true);
        cmd.args(args.iter().map(OsString::from));
        let what = format!(
            "{} {}/{label} (`rdr-http {}`)",
            node.label(),
            self.name,
            args.join(" ")
        );
        let proc = Supervised::spawn(
            &what,
            cmd,
            SpawnOpts {
                stdin: false,
                echo: true,
                grace: Duration::ZERO,
            },
        )?;
        match proc.log.wait_line(
            0,
            Some(Stream::Stdout),
            |l| l.starts_with('{'),
            ready_within,
        ) {
            Wait::Found(_, line) => {
                let first = serde_json::from_str(&line)
                    .with_context(|| format!("[{what}] first line is not JSON: {line:?}"))?;
                Ok((Server::new(label, &self.name, proc), first))
            }
            Wait::Closed => bail!(
                "[{what}] exited before its first line:\n{}",
                proc.log.text(None)
            ),
            Wait::TimedOut => bail!(
                "[{what}] printed nothing within {ready_within:?}:\n{}",
                proc.log.text(None)
            ),
        }
    }

    /// Runs `rdr-http <args>` in the pod, in the test cgroup (where the daemon's programs
    /// apply), and returns its stdout JSON lines. A non-zero exit is an error carrying the
    /// command line, stderr and whatever was printed before the failure.
    pub fn http(&self, node: &Node, args: &[&str]) -> Result<Vec<Value>> {
        self.http_with(node, args, true)
    }

    /// Like [`Pod::http`], choosing whether the client runs in the test cgroup; outside it the
    /// daemon's programs do not see its connections.
    pub fn http_with(&self, node: &Node, args: &[&str], in_cgroup: bool) -> Result<Vec<Value>> {
        let mut cmd = self.command(node, workspace_bin("rdr-http")?, in_cgroup);
        cmd.args(args.iter().map(OsString::from));
        let what = format!("`rdr-http {}` in pod {}", args.join(" "), self.name);
        let limit = wall_limit(args);
        let out = run_with_timeout(cmd, limit).with_context(|| what.clone())?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}):\nstderr: {}\nstdout: {}",
                status_text(out.status),
                out.stderr.trim(),
                out.stdout.trim()
            );
        }
        out.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).with_context(|| {
                    format!(
                        "{what}: output line is not JSON: {l:?}\nstderr: {}",
                        out.stderr.trim()
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_serialize_as_rdr_http_expects() {
        let s = HttpReq::post("/echo", "hi")
            .header("baggage", "sd-routing-key=pr-1")
            .spec();
        assert_eq!(
            s,
            r#"{"path":"/echo","method":"POST","headers":[["baggage","sd-routing-key=pr-1"]],"body":"hi"}"#
        );
        assert_eq!(HttpReq::default().spec(), "{}");
    }

    #[test]
    fn wall_limit_grows_with_the_work() {
        let one = wall_limit(&["h1", "--addr", "a", "--req", "{}"]);
        let three = wall_limit(&["h1", "--addr", "a", "--req", "{}", "{}", "{}"]);
        assert!(three > one);
        let drip = wall_limit(&["raw", "--send", "0123456789", "--drip-ms", "1000"]);
        assert!(drip >= Duration::from_secs(10) + SLACK);
    }
}
