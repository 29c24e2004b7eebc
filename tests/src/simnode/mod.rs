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
//!
//! This module sets up the node and its pods; `pod` holds what runs in a pod (clients and their
//! options) and `peer` the long-lived processes a pod runs (servers and sessions).
mod peer;
mod pod;

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns};

use crate::cleanup::{self, NAME_TAG, NETNS_LOCK, RUN_DIR, warn};
use crate::prereq::{cgroup2_mount, ip_bin};
use crate::proc::{Daemon, enter_netns, join_cgroup, run_ok, run_ok_with_input};

pub use self::peer::{Reply, Server, Session};
pub use self::pod::{CallOpts, CallResult, Pod, Proto, unmap};

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
        // The CNI's part first: remove the veth pair (both ends go at once). Left to the
        // namespace's teardown, which the kernel does asynchronously, the node-side end may
        // still exist when the namespace is re-created, and plumbing it again would fail.
        ip(&["-n", &self.netns, "link", "del", &pod.veth()])
            .with_context(|| format!("deleting the veth of pod {}", pod.name))?;
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
