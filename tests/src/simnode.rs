//! A simulated Kubernetes node made of network namespaces.
//!
//! ```text
//!   node netns <prefix>-node          pod netns <prefix>-<name>
//!   br0 10.200.0.1/24, fd00:200::1/64 ── vpN ═══ eth0 10.200.0.(10+N), fd00:200::(10+N)
//! ```
//!
//! The node namespace has no uplink, so nothing a test sends can leave the machine. Pods join
//! the node's bridge; the node forwards between them and routes service VIPs to backend pods
//! (a kube-proxy stand-in). Test processes run inside a dedicated child cgroup, the attach
//! point for the daemon under test, and the daemon pins into a private bpffs instance.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns};
use serde::Deserialize;

use crate::cleanup::{self, NAME_TAG, NETNS_LOCK, RUN_DIR, warn};
use crate::prereq::{cgroup2_mount, ip_bin, workspace_bin};
use crate::proc::{
    Daemon, SpawnOpts, Stream, Supervised, Wait, enter_netns, join_cgroup, run_ok,
    run_ok_with_input, run_with_timeout, status_text,
};

/// The node's address on the pod bridge: the pods' default gateway.
pub const NODE_GW_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The node's IPv6 address on the pod bridge: the pods' default gateway.
pub const NODE_GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);

const IP_TIMEOUT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra wall-clock time a harness wait allows on top of rdr-peer's own socket timeout.
const SLACK: Duration = Duration::from_secs(5);
const MAX_PODS: u32 = 200;

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", p.display()))
}

fn ip(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(ip_bin()?);
    cmd.args(args);
    run_ok(cmd, IP_TIMEOUT)
}

/// Runs `commands` (one `ip` command per line, without the leading `ip`) in netns `ns`.
fn ip_batch(ns: &str, commands: &str) -> Result<()> {
    let mut cmd = Command::new(ip_bin()?);
    cmd.args(["-n", ns, "-batch", "-"]);
    run_ok_with_input(cmd, commands, IP_TIMEOUT)
        .with_context(|| format!("configuring netns {ns}"))
        .map(|_| ())
}

/// Writes sysctls of a network namespace. /proc/sys/net shows the namespace of the calling
/// thread, so a short-lived thread enters the namespace; this needs no `sysctl` binary and no
/// `ip netns exec` (which would remount /sys).
fn netns_sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let ns_file = File::open(netns_path(ns)).with_context(|| format!("opening netns {ns}"))?;
    thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            setns(&ns_file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering netns {ns}"))?;
            for (key, value) in settings {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                fs::write(&path, value)
                    .with_context(|| format!("setting {key}={value} in netns {ns}"))?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow!("sysctl thread for netns {ns} panicked"))?
    })
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

/// Checks a pod or label name: it becomes part of netns names and process labels.
fn check_name(what: &str, name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 40
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{what} {name:?}: use 1..=40 characters of [A-Za-z0-9_-]"
    );
    Ok(())
}

/// What a [`Node`] has created so far, so teardown undoes exactly that, even after a
/// half-finished `Node::new`.
#[derive(Default)]
struct Created {
    dir: bool,
    cgroup: bool,
    bpffs: bool,
    /// Pods first, node namespace last.
    netns: Vec<String>,
}

/// One simulated node. Dropping it tears everything down (also during a panic unwind).
pub struct Node {
    label: String,
    prefix: String,
    netns: String,
    dir: PathBuf,
    cgroup: PathBuf,
    bpffs: PathBuf,
    pods: Vec<Pod>,
    vips: Vec<(IpAddr, String)>,
    created: Created,
}

impl Node {
    /// Creates the node: netns `<prefix>-node` with bridge `br0` (10.200.0.1/24,
    /// fd00:200::1/64) and forwarding on; cgroup `<cgroup2 mount>/<prefix>`; a private bpffs
    /// at `/run/redirector-test/<prefix>/bpffs`. Leftovers of dead runs are swept first.
    /// `label` names the node in logs.
    pub fn new(label: &str) -> Result<Node> {
        cleanup::sweep();
        let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NAME_TAG}{}-{n}", std::process::id());
        let cgroup_root = cgroup2_mount()?;
        let dir = Path::new(RUN_DIR).join(&prefix);
        let mut node = Node {
            label: label.to_owned(),
            netns: format!("{prefix}-node"),
            cgroup: cgroup_root.join(&prefix),
            bpffs: dir.join("bpffs"),
            dir,
            prefix,
            pods: Vec::new(),
            vips: Vec::new(),
            created: Created::default(),
        };
        // On error `node` is dropped here and removes whatever was registered.
        node.build().with_context(|| {
            format!("creating simulated node {:?} ({})", node.label, node.prefix)
        })?;
        Ok(node)
    }

    fn build(&mut self) -> Result<()> {
        fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
        fs::create_dir(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        self.created.dir = true;

        fs::create_dir(&self.cgroup)
            .with_context(|| format!("creating cgroup {}", self.cgroup.display()))?;
        self.created.cgroup = true;

        fs::create_dir(&self.bpffs)
            .with_context(|| format!("creating {}", self.bpffs.display()))?;
        // Each bpf mount is a fresh, empty instance: the daemon's pins stay private to this
        // node and vanish with the umount.
        mount(
            Some("bpf"),
            &self.bpffs,
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0700"),
        )
        .with_context(|| format!("mounting bpffs at {}", self.bpffs.display()))?;
        self.created.bpffs = true;

        let ns = self.netns.clone();
        self.add_netns(&ns)?;
        netns_sysctls(
            &ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                // The node forwards pod to pod over the same bridge; an ICMP redirect would
                // make pods bypass it and hide routing mistakes.
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.default.send_redirects", "0"),
                // Addresses must be usable at once; DAD on a private bridge only adds delay.
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )?;
        ip_batch(
            &ns,
            &format!(
                "link set lo up\n\
                 link add br0 type bridge forward_delay 0 mcast_snooping 0\n\
                 link set br0 up\n\
                 addr add {NODE_GW_V4}/24 dev br0\n\
                 addr add {NODE_GW_V6}/64 dev br0 nodad\n"
            ),
        )
    }

    fn add_netns(&mut self, ns: &str) -> Result<()> {
        let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        ip(&["netns", "add", ns])?;
        // Registered before anything else can fail, so teardown deletes it.
        self.created.netns.insert(0, ns.to_owned());
        Ok(())
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// `rdrt-<pid>-<n>`: every name this node creates starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The cgroup to attach the daemon's programs to; pod commands run inside it.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// A private bpffs mount; give the daemon a directory below it, e.g. `bpffs().join("redirector")`.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Scratch directory `/run/redirector-test/<prefix>` for config files, sockets and the like;
    /// removed on teardown.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Name of the node network namespace (`<prefix>-node`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// A command that runs `program` in the node network namespace (not in the test cgroup),
    /// e.g. a daemon whose router must be reachable from the pods at 10.200.0.1.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        ns_command(&self.netns, None, program)
    }

    /// Starts a daemon in the node namespace (outside the test cgroup); see [`Daemon`].
    pub fn spawn_daemon(&self, label: &str, program: &Path, args: &[OsString]) -> Result<Daemon> {
        let mut cmd = self.command(program);
        cmd.args(args);
        Daemon::spawn_command(label, cmd)
    }

    /// Runs `ip <args>` in the node namespace and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.netns.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Adds a pod: netns `<prefix>-<name>` linked to the node bridge by a veth pair created
    /// inside the node namespace (no interface ever appears in the host namespace), with
    /// 10.200.0.(10+N)/24 and fd00:200::(10+N)/64 and default routes via the node.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        check_name("pod name", name)?;
        ensure!(
            name != "node",
            "pod name \"node\" is taken by the node namespace"
        );
        ensure!(
            self.pods.iter().all(|p| p.name != name),
            "pod {name:?} already exists"
        );
        let index = self.pods.len() as u32 + 1;
        ensure!(index <= MAX_PODS, "at most {MAX_PODS} pods per node");
        let host = 10 + index;
        // fd00:200::<same digits as the IPv4 host part>, so 10.200.0.11 pairs with fd00:200::11.
        let v6_host = u16::from_str_radix(&host.to_string(), 16)
            .context("pod index does not fit an IPv6 group")?;
        let pod = Pod {
            name: name.to_owned(),
            netns: format!("{}-{name}", self.prefix),
            ipv4: Ipv4Addr::new(10, 200, 0, host as u8),
            ipv6: Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, v6_host),
            index,
            node_prefix: self.prefix.clone(),
            cgroup: self.cgroup.clone(),
        };
        self.add_netns(&pod.netns)
            .with_context(|| format!("creating pod {name}"))?;
        self.plumb_pod(&pod)?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// First half of a pod sandbox restart: deletes the pod's network namespace (its veth goes
    /// with it). Processes still running in it keep it alive: stop the pod's servers first.
    pub fn delete_pod_netns(&mut self, pod: &Pod) -> Result<()> {
        pod.check_node(self);
        let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        ip(&["netns", "delete", &pod.netns])
            .with_context(|| format!("deleting the namespace of pod {}", pod.name))?;
        Ok(())
    }

    /// Second half of a pod sandbox restart: a new namespace at the same path with the same
    /// addresses. The kernel may give it the dead one's nsfs inode number; only its cookie is
    /// surely new.
    pub fn restore_pod_netns(&mut self, pod: &Pod) -> Result<()> {
        pod.check_node(self);
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            ip(&["netns", "add", &pod.netns])
                .with_context(|| format!("re-creating the namespace of pod {}", pod.name))?;
        }
        self.plumb_pod(pod)
    }

    /// Sysctls, veth pair to the node bridge, addresses and routes of a pod's new namespace.
    fn plumb_pod(&self, pod: &Pod) -> Result<()> {
        netns_sysctls(
            &pod.netns,
            &[
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
                // Pods always go through the node, like pods behind a CNI gateway.
                ("net.ipv4.conf.all.accept_redirects", "0"),
                ("net.ipv4.conf.default.accept_redirects", "0"),
                ("net.ipv6.conf.all.accept_redirects", "0"),
                ("net.ipv6.conf.default.accept_redirects", "0"),
            ],
        )?;
        let veth = pod.veth();
        // A fixed MAC per pod: a pod whose namespace is re-created keeps its addresses, and the
        // node's neighbour entries for them must stay right (a CNI sends a gratuitous ARP).
        ip_batch(
            &self.netns,
            &format!(
                "link add {veth} type veth peer name eth0 address 02:52:44:00:00:{:02x} netns {}\n\
                 link set {veth} master br0\n\
                 link set {veth} up\n",
                pod.index, pod.netns
            ),
        )?;
        ip_batch(
            &pod.netns,
            &format!(
                "link set lo up\n\
                 link set eth0 up\n\
                 addr add {}/24 dev eth0\n\
                 addr add {}/64 dev eth0 nodad\n\
                 route add default via {NODE_GW_V4}\n\
                 route add default via {NODE_GW_V6}\n",
                pod.ipv4, pod.ipv6
            ),
        )?;
        Ok(())
    }

    /// kube-proxy stand-in: `vip` goes on the backend pod's `lo` (/32 or /128) and the node
    /// routes it to the backend's pod address. Servers bind `[::]`, so they answer on it.
    pub fn add_vip(&mut self, vip: IpAddr, backend: &Pod) -> Result<()> {
        ensure!(
            backend.node_prefix == self.prefix,
            "pod {} belongs to another node",
            backend.name
        );
        ensure!(
            self.vips.iter().all(|(v, _)| *v != vip),
            "VIP {vip} already exists"
        );
        let (lo, route) = match vip {
            IpAddr::V4(v4) => (
                format!("addr add {v4}/32 dev lo\n"),
                format!("route add {v4}/32 via {}\n", backend.ipv4),
            ),
            IpAddr::V6(v6) => (
                format!("addr add {v6}/128 dev lo nodad\n"),
                format!("route add {v6}/128 via {}\n", backend.ipv6),
            ),
        };
        ip_batch(&backend.netns, &lo)?;
        ip_batch(&self.netns, &route)?;
        self.vips.push((vip, backend.name.clone()));
        Ok(())
    }

    fn teardown(&mut self) {
        if self.created.cgroup {
            match cleanup::remove_cgroup(&self.cgroup) {
                Ok(()) => self.created.cgroup = false,
                Err(e) => warn(&format!("removing cgroup {}", self.cgroup.display()), &e),
            }
        }
        for ns in std::mem::take(&mut self.created.netns) {
            if let Err(e) = cleanup::delete_netns(&ns) {
                warn(&format!("deleting netns {ns}"), &e);
            }
        }
        if self.created.bpffs {
            match cleanup::umount_under(&self.bpffs) {
                Ok(()) => self.created.bpffs = false,
                Err(e) => warn(&format!("unmounting {}", self.bpffs.display()), &e),
            }
        }
        if self.created.dir {
            match cleanup::remove_scratch(&self.dir) {
                Ok(()) => self.created.dir = false,
                Err(e) => warn(&format!("removing {}", self.dir.display()), &e),
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("label", &self.label)
            .field("prefix", &self.prefix)
            .field("pods", &self.pods)
            .field("vips", &self.vips)
            .finish()
    }
}

/// A command that enters netns `ns` (and, if given, the cgroup whose `cgroup.procs` is
/// `procs`) between fork and exec.
fn ns_command(ns: &str, procs: Option<&Path>, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // Paths are prepared before the fork: the hook must not allocate. A NUL byte cannot occur
    // in names we build; if it ever did, the hook fails the spawn instead of running outside.
    let ns_path = cstring(&netns_path(ns)).ok();
    let procs = procs.map(|p| cstring(p).ok());
    // SAFETY: the hook only makes syscalls on the prepared strings.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // Into the cgroup first: `ip netns exec` would hide /sys/fs/cgroup from us.
                let procs = procs
                    .as_deref()
                    .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
                join_cgroup(procs)?;
            }
            let ns_path = ns_path
                .as_deref()
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            enter_netns(ns_path)
        });
    }
    cmd
}

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
    node_prefix: String,
    cgroup: PathBuf,
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

    fn veth(&self) -> String {
        format!("vp{}", self.index)
    }

    fn check_node(&self, node: &Node) {
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

/// A running `rdr-peer serve`; killed on drop.
pub struct Server {
    name: String,
    pod: String,
    proc: Supervised,
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
    label: String,
    peer: SocketAddr,
    cursor: usize,
    wait: Duration,
    proc: Supervised,
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
