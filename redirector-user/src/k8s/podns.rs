//! Finding a pod's network namespace from a node agent that is not the CNI.
//!
//! The CNI is told each pod's namespace; a DaemonSet is not. What it can see is `/proc` (with
//! `hostPID`): every process of a pod runs in a cgroup whose path names the pod's UID, as
//! `pod<uid>` (cgroupfs driver) or `pod<uid with _ for ->.slice` (systemd driver). A process
//! found that way gives `/proc/<pid>/ns/net`, which is accepted only if it is not the host's
//! own namespace (host-network pods share it; steering them by namespace would steer the whole
//! node) and one of the pod's IPs is configured in it (a PID reused by an unrelated process, or
//! a pod whose sandbox is being torn down, fails that check).
use std::{
    collections::{BTreeSet, HashMap},
    fs,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::derive::{MemberPod, Netns};
use crate::kernel::netns;

/// Resolves member pods to namespace paths, remembering what it found so that a resync only
/// scans `/proc` for pods it has not found yet or whose process went away.
#[derive(Debug)]
pub struct PodNamespaces {
    proc_root: PathBuf,
    /// Pod UID -> the PID whose namespace was accepted.
    found: HashMap<String, u32>,
    /// The pods the last scan did not find, when, and why: a pod that stays missing (its
    /// containers are not up yet, or it is not on this host's /proc) is looked for again only
    /// after [`RESCAN_MISSING`], not at every resync, so a node full of such pods does not
    /// read all of /proc every second.
    missing: Option<(Instant, HashMap<String, String>)>,
}

/// How long the answer for pods a scan did not find stands, unless the set of pods changes.
const RESCAN_MISSING: Duration = Duration::from_secs(5);

impl PodNamespaces {
    pub fn new(proc_root: PathBuf) -> PodNamespaces {
        PodNamespaces {
            proc_root,
            found: HashMap::new(),
            missing: None,
        }
    }

    /// The namespace path of every pod, or why there is none.
    pub fn resolve(&mut self, pods: &BTreeSet<MemberPod>) -> HashMap<String, Netns> {
        let wanted: std::collections::HashSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
        self.found.retain(|uid, _| wanted.contains(uid.as_str()));
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        for pod in pods {
            match self.found.get(&pod.uid) {
                Some(pid) if self.still_in_pod(*pid, &pod.uid) => {
                    out.insert(pod.uid.clone(), Ok(self.ns_path(*pid)));
                }
                _ => missing.push(pod),
            }
        }
        if missing.is_empty() {
            self.missing = None;
            return out;
        }
        if let Some((at, reasons)) = &self.missing
            && at.elapsed() < RESCAN_MISSING
            && missing.len() == reasons.len()
            && missing.iter().all(|p| reasons.contains_key(&p.uid))
            // A pod found before and lost since (its sandbox restarted) is looked for at
            // every resync: its new namespace is expected any moment.
            && missing.iter().all(|p| !self.found.contains_key(&p.uid))
        {
            for pod in missing {
                out.insert(pod.uid.clone(), Err(reasons[&pod.uid].clone()));
            }
            return out;
        }
        let wanted: Vec<&str> = missing.iter().map(|p| p.uid.as_str()).collect();
        let candidates = match self.scan(&wanted) {
            Ok(found) => found,
            Err(err) => {
                let why = format!("cannot scan {}: {err}", self.proc_root.display());
                for pod in missing {
                    out.insert(pod.uid.clone(), Err(why.clone()));
                }
                return out;
            }
        };
        let host = fs::metadata(self.proc_root.join("self/ns/net"))
            .or_else(|_| fs::metadata("/proc/self/ns/net"))
            .map(|m| (m.dev(), m.ino()))
            .ok();
        let mut still_missing = HashMap::new();
        for pod in missing {
            let result = self.pick(pod, candidates.get(pod.uid.as_str()), host);
            match &result {
                Ok(pid) => {
                    self.found.insert(pod.uid.clone(), *pid);
                }
                Err(why) => {
                    still_missing.insert(pod.uid.clone(), why.clone());
                }
            }
            out.insert(pod.uid.clone(), result.map(|pid| self.ns_path(pid)));
        }
        self.missing = (!still_missing.is_empty()).then(|| (Instant::now(), still_missing));
        out
    }

    fn ns_path(&self, pid: u32) -> PathBuf {
        self.proc_root.join(pid.to_string()).join("ns/net")
    }

    fn still_in_pod(&self, pid: u32, uid: &str) -> bool {
        fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
            .is_ok_and(|cgroups| names_pod(&cgroups, uid))
    }

    /// One pass over `/proc`: the PIDs of each wanted pod, lowest first (the sandbox's pause
    /// process, which lives as long as the namespace, usually has the lowest).
    fn scan<'a>(&self, uids: &[&'a str]) -> std::io::Result<HashMap<&'a str, Vec<u32>>> {
        let mut found: HashMap<&str, Vec<u32>> = HashMap::new();
        for entry in fs::read_dir(&self.proc_root)?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Processes come and go during the scan: a vanished one is simply skipped.
            let Ok(cgroups) = fs::read_to_string(entry.path().join("cgroup")) else {
                continue;
            };
            for uid in uids {
                if names_pod(&cgroups, uid) {
                    found.entry(uid).or_default().push(pid);
                }
            }
        }
        for pids in found.values_mut() {
            pids.sort_unstable();
        }
        Ok(found)
    }

    fn pick(
        &self,
        pod: &MemberPod,
        pids: Option<&Vec<u32>>,
        host: Option<(u64, u64)>,
    ) -> Result<u32, String> {
        let pids = pids.filter(|p| !p.is_empty()).ok_or_else(|| {
            format!(
                "no process of pod {} ({}) under {}",
                pod.name,
                pod.uid,
                self.proc_root.display()
            )
        })?;
        let mut seen = Vec::new();
        let mut host_only = true;
        for pid in pids {
            let path = self.ns_path(*pid);
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let id = (meta.dev(), meta.ino());
            if Some(id) == host {
                continue;
            }
            host_only = false;
            if seen.contains(&id) {
                continue;
            }
            seen.push(id);
            match netns::addresses(&path) {
                Ok(addresses) if addresses.iter().any(|a| pod.ips.contains(a)) => return Ok(*pid),
                _ => {}
            }
        }
        if host_only {
            Err(format!("pod {} uses the host network namespace", pod.name))
        } else {
            Err(format!(
                "no namespace of pod {} holds its IP {}",
                pod.name,
                pod.ips
                    .iter()
                    .map(IpAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
}

/// Whether a `/proc/PID/cgroup` text places the process in the pod with this UID, in either
/// driver's spelling.
pub fn names_pod(cgroups: &str, uid: &str) -> bool {
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    cgroups.lines().any(|line| {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        path.split('/').any(|part| {
            part == cgroupfs
                || part.ends_with(&systemd) && part[..part.len() - systemd.len()].ends_with('-')
        })
    })
}

/// Path of the kubepods cgroup under the cgroup2 mount: `kubepods.slice` (systemd driver) or
/// `kubepods` (cgroupfs driver).
pub fn kubepods_cgroup(cgroup2: &Path) -> Option<PathBuf> {
    ["kubepods.slice", "kubepods"]
        .iter()
        .map(|name| cgroup2.join(name))
        .find(|path| path.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc";

    #[test]
    fn cgroupfs_and_systemd_spellings_name_the_pod() {
        let cgroupfs = format!("0::/kubepods/burstable/pod{UID}/8d7c6b\n");
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-1.scope\n",
            UID.replace('-', "_")
        );
        let v1_and_v2 = format!("12:memory:/kubepods/pod{UID}/x\n0::/\n");
        for text in [cgroupfs, systemd, v1_and_v2] {
            assert!(names_pod(&text, UID), "{text}");
        }
    }

    #[test]
    fn other_pods_and_prefixes_do_not_match() {
        let other = "0::/kubepods/burstable/pod0f1e2d3c-aaaa-bbbb-cccc-123456789abd/x\n";
        assert!(!names_pod(other, UID));
        let longer = format!("0::/kubepods/pod{UID}0/x\n");
        assert!(!names_pod(&longer, UID));
        assert!(!names_pod("0::/\n", UID));
    }

    #[test]
    fn the_kubepods_cgroup_is_found_in_either_drivers_layout() {
        let root = tempfile::tempdir().expect("tempdir");
        assert_eq!(kubepods_cgroup(root.path()), None);
        std::fs::create_dir(root.path().join("kubepods")).expect("mkdir");
        assert_eq!(
            kubepods_cgroup(root.path()),
            Some(root.path().join("kubepods"))
        );
        std::fs::create_dir(root.path().join("kubepods.slice")).expect("mkdir");
        assert_eq!(
            kubepods_cgroup(root.path()),
            Some(root.path().join("kubepods.slice"))
        );
    }

    #[test]
    fn a_pod_without_processes_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut resolver = PodNamespaces::new(dir.path().to_owned());
        let pod = MemberPod {
            uid: UID.into(),
            name: "shop/job".into(),
            ips: vec!["10.0.0.9".parse().expect("ip")],
        };
        let result = resolver.resolve(&BTreeSet::from([pod]));
        let err = result[UID]
            .as_ref()
            .expect_err("nothing under an empty /proc");
        assert!(err.contains("no process of pod shop/job"), "{err}");
    }
}
