//! Kernel program cost: run time per run of each program attached to the node's cgroup, from
//! the kernel's own accounting (`run_time_ns` / `run_cnt`).
use std::{
    collections::BTreeMap,
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// `BPF_ENABLE_STATS` and `BPF_STATS_RUN_TIME` from `linux/bpf.h`.
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time accounting switched on for as long as this lives.
///
/// Preferably through `BPF_ENABLE_STATS`: the kernel keeps the accounting on while the returned
/// file descriptor is open and switches it off when it closes, which happens however this
/// process ends (even SIGKILL), and `kernel.bpf_stats_enabled` is never touched. Kernels before
/// 5.8 lack that command; there the sysctl is set and its previous value restored on drop.
pub enum BpfStats {
    /// Held only to be closed on drop.
    Fd {
        _fd: OwnedFd,
    },
    Sysctl {
        previous: String,
    },
}

impl BpfStats {
    pub fn enable() -> anyhow::Result<BpfStats> {
        // union bpf_attr { struct { __u32 type; } enable_stats; ... }: the rest stays zero.
        let mut attr = [0u8; 16];
        attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
        // SAFETY: bpf(2) reads `attr.len()` bytes from a live buffer; a non-negative result is
        // a new file descriptor that we own from here on.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                attr.len() as libc::c_uint,
            )
        };
        if fd >= 0 {
            // SAFETY: see above.
            return Ok(BpfStats::Fd {
                _fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            });
        }
        let previous = std::fs::read_to_string(SYSCTL)
            .with_context(|| format!("reading {SYSCTL}"))?
            .trim()
            .to_owned();
        std::fs::write(SYSCTL, "1").with_context(|| format!("setting {SYSCTL}=1"))?;
        Ok(BpfStats::Sysctl { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let BpfStats::Sysctl { previous } = self
            && let Err(e) = std::fs::write(SYSCTL, previous.as_bytes())
        {
            eprintln!("bench: could not restore {SYSCTL}={previous}: {e}");
        }
    }
}

/// One program attached to the node's cgroup.
#[derive(Clone, Debug)]
pub struct Prog {
    pub id: u64,
    pub name: String,
}

/// Run count and total run time per program id.
pub type Counters = BTreeMap<u64, (u64, u64)>;

pub struct Programs {
    bpftool: PathBuf,
    pub progs: Vec<Prog>,
}

impl Programs {
    /// The programs the daemon attached to `cgroup` (`bpftool cgroup show`), one per name.
    pub fn attached(bpftool: &Path, cgroup: &Path) -> anyhow::Result<Programs> {
        let list = bpftool_json(bpftool, &["cgroup", "show", &cgroup.to_string_lossy()])?;
        let mut progs: Vec<Prog> = list
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                Some(Prog {
                    id: p["id"].as_u64()?,
                    name: p["name"].as_str()?.to_owned(),
                })
            })
            .collect();
        progs.sort_by(|a, b| a.name.cmp(&b.name));
        progs.dedup_by(|a, b| a.id == b.id);
        if progs.is_empty() {
            bail!("no programs attached to {}", cgroup.display());
        }
        Ok(Programs {
            bpftool: bpftool.to_owned(),
            progs,
        })
    }

    /// Current (run_cnt, run_time_ns) of each of our programs.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        let all = bpftool_json(&self.bpftool, &["prog", "show"])?;
        let mut out = Counters::new();
        for p in all.as_array().map(Vec::as_slice).unwrap_or_default() {
            let Some(id) = p["id"].as_u64() else { continue };
            if self.progs.iter().any(|q| q.id == id) {
                // bpftool leaves both fields out while they are zero.
                let cnt = p["run_cnt"].as_u64().unwrap_or(0);
                let ns = p["run_time_ns"].as_u64().unwrap_or(0);
                out.insert(id, (cnt, ns));
            }
        }
        Ok(out)
    }

    /// ns per run of each program that ran between `before` and `after`, with its run count.
    pub fn cost(&self, before: &Counters, after: &Counters) -> Vec<(String, f64, u64)> {
        self.progs
            .iter()
            .filter_map(|p| {
                let (c0, t0) = before.get(&p.id).copied().unwrap_or_default();
                let (c1, t1) = after.get(&p.id).copied()?;
                let runs = c1.saturating_sub(c0);
                (runs > 0).then(|| {
                    (
                        p.name.clone(),
                        t1.saturating_sub(t0) as f64 / runs as f64,
                        runs,
                    )
                })
            })
            .collect()
    }
}

fn bpftool_json(bpftool: &Path, args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new(bpftool)
        .arg("-j")
        .args(args)
        .output()
        .with_context(|| format!("running bpftool {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "bpftool {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool {}: output is not JSON", args.join(" ")))
}
