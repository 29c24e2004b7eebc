//! A pod of the simulated node, and the `rdr-peer` clients run inside it.
use std::ffi::{OsStr, OsString};
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

use super::{Node, READY_TIMEOUT, SLACK, Server, Session, check_name, ip, netns_path, ns_command};
use crate::prereq::workspace_bin;
use crate::proc::{Daemon, SpawnOpts, Stream, Supervised, Wait, run_with_timeout, status_text};

/// A pod of a [`Node`]: a network namespace on the node bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// Network namespace name (`<prefix>-<name>`).
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// N in 10.200.0.(10+N) and in the node-side veth name `vpN`.
    pub index: u32,
    pub(super) node_prefix: String,
    pub(super) cgroup: PathBuf,
}

/// Transport for [`Pod::call`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Options of a `rdr-peer` client run.
#[derive(Clone, Debug)]
pub struct CallOpts {
    /// Run inside the test cgroup, where the daemon's programs apply (default true).
    pub in_cgroup: bool,
    /// For an IPv4 address: dial it as `[::ffff:a.b.c.d]` from an AF_INET6 socket.
    pub v6_mapped: bool,
    /// UDP only: connect() the socket and report getpeername() instead of recvfrom's source.
    pub connected: bool,
    /// rdr-peer's socket timeout (default 3 s).
    pub timeout: Duration,
    /// Exchanges per call (default 1): TCP makes a new connection for each, UDP sends each
    /// datagram from the same socket. See [`Pod::call_many`].
    pub count: u32,
}

impl Default for CallOpts {
    fn default() -> Self {
        CallOpts {
            in_cgroup: true,
            v6_mapped: false,
            connected: false,
            timeout: Duration::from_secs(3),
            count: 1,
        }
    }
}

impl CallOpts {
    pub fn new() -> CallOpts {
        CallOpts::default()
    }
    pub fn in_cgroup(mut self, yes: bool) -> CallOpts {
        self.in_cgroup = yes;
        self
    }
    pub fn v6_mapped(mut self) -> CallOpts {
        self.v6_mapped = true;
        self
    }
    pub fn connected(mut self) -> CallOpts {
        self.connected = true;
        self
    }
    pub fn timeout(mut self, timeout: Duration) -> CallOpts {
        self.timeout = timeout;
        self
    }
    pub fn count(mut self, count: u32) -> CallOpts {
        self.count = count.max(1);
        self
    }

    fn client_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "--timeout-ms".into(),
            self.timeout.as_millis().max(1).to_string().into(),
        ];
        if self.v6_mapped {
            a.push("--v6-mapped".into());
        }
        if self.count > 1 {
            a.extend(["--count".into(), self.count.to_string().into()]);
        }
        a
    }
}

/// What a client saw: who answered, and the peer address the kernel reported to it
/// (getpeername for TCP and connected UDP, recvfrom's source for unconnected UDP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallResult {
    pub server: String,
    pub peer: SocketAddr,
}

impl CallResult {
    /// `peer` with a v4-mapped IPv6 address turned back into IPv4.
    pub fn peer_unmapped(&self) -> SocketAddr {
        unmap(self.peer)
    }
}

/// `[::ffff:a.b.c.d]:p` becomes `a.b.c.d:p`; anything else is returned as is.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

#[derive(Deserialize)]
struct CallLine {
    server: String,
    #[serde(alias = "from")]
    peer: String,
}

impl Pod {
    /// `/run/netns/<netns>`.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    pub(super) fn veth(&self) -> String {
        format!("vp{}", self.index)
    }

    pub(super) fn check_node(&self, node: &Node) {
        assert_eq!(
            self.node_prefix, node.prefix,
            "pod {} used with a node it does not belong to",
            self.name
        );
    }

    /// A command that runs `program` inside the pod: between fork and exec the child moves
    /// itself into the node's test cgroup (if `in_cgroup`), then enters the pod's network
    /// namespace. Mount namespace and /sys stay the host's, unlike `ip netns exec`.
    pub fn command(&self, node: &Node, program: impl AsRef<OsStr>, in_cgroup: bool) -> Command {
        self.check_node(node);
        let procs = self.cgroup.join("cgroup.procs");
        ns_command(&self.netns, in_cgroup.then_some(procs.as_path()), program)
    }

    /// What a kubelet leaves running for a pod: a long-lived process ("pause") in the pod's
    /// network namespace and in the cgroup `<node cgroup>/kubepods/pod<uid>/pause` (the
    /// cgroupfs driver's layout), where a node agent finds it by the pod's UID. Killed on drop
    /// of the returned guard, and with the node's cgroup in any case.
    pub fn start_sandbox_process(&self, node: &Node, uid: &str) -> Result<Daemon> {
        self.check_node(node);
        let cgroup = self
            .cgroup
            .join("kubepods")
            .join(format!("pod{uid}"))
            .join("pause");
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let procs = cgroup.join("cgroup.procs");
        let mut cmd = ns_command(&self.netns, Some(&procs), "sleep");
        cmd.arg("infinity");
        Daemon::spawn_command(&format!("{}-pause", self.name), cmd)
    }

    /// Runs `ip <args>` in the pod namespace and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.netns.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    fn peer_command(&self, node: &Node, in_cgroup: bool, args: &[OsString]) -> Result<Command> {
        let mut cmd = self.command(node, workspace_bin("rdr-peer")?, in_cgroup);
        cmd.args(args);
        Ok(cmd)
    }

    /// Starts `rdr-peer serve --name NAME --tcp PORT --udp PORT` in the pod (in the cgroup)
    /// and waits for it to be ready. The returned guard kills it.
    pub fn serve(&self, node: &Node, name: &str, port: u16) -> Result<Server> {
        self.serve_ports(node, name, &[port], &[port])
    }

    /// Like [`Pod::serve`] with separate TCP and UDP port lists.
    pub fn serve_ports(&self, node: &Node, name: &str, tcp: &[u16], udp: &[u16]) -> Result<Server> {
        check_name("server name", name)?;
        let mut args: Vec<OsString> = vec!["serve".into(), "--name".into(), name.into()];
        for p in tcp {
            args.extend(["--tcp".into(), p.to_string().into()]);
        }
        for p in udp {
            args.extend(["--udp".into(), p.to_string().into()]);
        }
        let cmd = self.peer_command(node, true, &args)?;
        let label = format!("{} {}/{}", node.label, self.name, name);
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
            Wait::Found(..) => Ok(Server {
                name: name.to_owned(),
                pod: self.name.clone(),
                proc,
            }),
            Wait::Closed => bail!("[{label}] exited before ready:\n{}", proc.log.text(None)),
            Wait::TimedOut => bail!(
                "[{label}] not ready within {READY_TIMEOUT:?}:\n{}",
                proc.log.text(None)
            ),
        }
    }

    /// One TCP exchange from this pod to `addr`.
    pub fn call_tcp(&self, node: &Node, addr: SocketAddr, in_cgroup: bool) -> Result<CallResult> {
        self.call(
            node,
            Proto::Tcp,
            addr,
            &CallOpts::new().in_cgroup(in_cgroup),
        )
    }

    /// One UDP exchange (unconnected socket) from this pod to `addr`.
    pub fn call_udp(&self, node: &Node, addr: SocketAddr, in_cgroup: bool) -> Result<CallResult> {
        self.call(
            node,
            Proto::Udp,
            addr,
            &CallOpts::new().in_cgroup(in_cgroup),
        )
    }

    /// Runs `rdr-peer call tcp|udp ADDR` in the pod and parses its answer. Any failure
    /// (refused, unreachable, timeout) is an error carrying rdr-peer's message.
    pub fn call(
        &self,
        node: &Node,
        proto: Proto,
        addr: SocketAddr,
        opts: &CallOpts,
    ) -> Result<CallResult> {
        let mut results = self.call_many(node, proto, addr, &opts.clone().count(1))?;
        results
            .pop()
            .with_context(|| format!("{proto:?} call from pod {} to {addr}: no answer", self.name))
    }

    /// Like [`Pod::call`], `opts.count` exchanges from one rdr-peer run, one result each: TCP
    /// opens a new connection for every exchange, UDP sends every datagram from one socket.
    pub fn call_many(
        &self,
        node: &Node,
        proto: Proto,
        addr: SocketAddr,
        opts: &CallOpts,
    ) -> Result<Vec<CallResult>> {
        let mut args: Vec<OsString> = vec![
            "call".into(),
            match proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            }
            .into(),
            addr.to_string().into(),
        ];
        args.extend(opts.client_args());
        if opts.connected {
            ensure!(proto == Proto::Udp, "`connected` applies to UDP calls only");
            args.push("--connected".into());
        }
        let cmd = self.peer_command(node, opts.in_cgroup, &args)?;
        let what = format!("{proto:?} call from pod {} to {addr}", self.name);
        // Every exchange is bounded by the socket timeout; the rest is slack for a busy machine.
        let budget = opts.timeout + SLACK + Duration::from_millis(50) * opts.count;
        let out = run_with_timeout(cmd, budget).with_context(|| what.clone())?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}",
                status_text(out.status),
                out.stderr.trim()
            );
        }
        let results =
            out.stdout
                .lines()
                .map(|line| {
                    let parsed: CallLine = serde_json::from_str(line)
                        .with_context(|| format!("{what}: unexpected output {:?}", out.stdout))?;
                    Ok(CallResult {
                        server: parsed.server,
                        peer: parsed.peer.parse().with_context(|| {
                            format!("{what}: bad peer address {:?}", parsed.peer)
                        })?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
        ensure!(
            results.len() == opts.count as usize,
            "{what}: {} answers for {} exchanges: {:?}",
            results.len(),
            opts.count,
            out.stdout
        );
        Ok(results)
    }

    /// A long-lived TCP connection from this pod (in the cgroup) to `addr`.
    pub fn session_tcp(&self, node: &Node, addr: SocketAddr) -> Result<Session> {
        self.session(node, addr, &CallOpts::new())
    }

    /// Like [`Pod::session_tcp`] with options (`in_cgroup`, `v6_mapped`, `timeout`).
    pub fn session(&self, node: &Node, addr: SocketAddr, opts: &CallOpts) -> Result<Session> {
        let mut args: Vec<OsString> = vec!["session".into(), "tcp".into(), addr.to_string().into()];
        args.extend(opts.client_args());
        let cmd = self.peer_command(node, opts.in_cgroup, &args)?;
        let label = format!("{} {}/session->{addr}", node.label, self.name);
        let proc = Supervised::spawn(
            &label,
            cmd,
            SpawnOpts {
                stdin: true,
                echo: false,
                grace: Duration::ZERO,
            },
        )?;
        let wait = opts.timeout + SLACK;
        let (idx, line) = match proc.log.wait_line(0, Some(Stream::Stdout), |_| true, wait) {
            Wait::Found(i, l) => (i, l),
            Wait::Closed => bail!("[{label}] failed to connect:\n{}", proc.log.text(None)),
            Wait::TimedOut => bail!("[{label}] no answer within {wait:?}"),
        };
        #[derive(Deserialize)]
        struct PeerLine {
            peer: String,
        }
        let peer: PeerLine = serde_json::from_str(&line)
            .with_context(|| format!("[{label}] unexpected first line {line:?}"))?;
        Ok(Session {
            peer: peer
                .peer
                .parse()
                .with_context(|| format!("[{label}] bad peer address {:?}", peer.peer))?,
            label,
            cursor: idx + 1,
            wait,
            proc,
        })
    }
}
