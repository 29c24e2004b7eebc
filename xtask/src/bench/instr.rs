//! `--only instructions`: instructions per routed request, counted by callgrind.
//!
//! Timings on this virtual machine drift and it has no hardware counters, but valgrind counts
//! the instructions a process executes exactly, whatever else the machine does. Each proxy (the
//! daemon with its node router, nginx, HAProxy) runs under `valgrind --tool=callgrind`, doing
//! the same routing it does in the rest of the benchmark, and gets the same keyed requests
//! from `rdr-load`:
//!
//! 1. a warm-up run (every code path translated, upstream connections pooled);
//! 2. an idle window: the counters zeroed, nothing sent, the counters dumped: what the process
//!    does by itself per second (the router's heartbeat, timers);
//! 3. N requests between a zero and a dump, then 2N the same way.
//!
//! Instructions per request = (Ir(2N) - Ir(N) - idle rate x (t(2N) - t(N))) / N: everything
//! that does not grow with the request count (start-up, the client's connection set-up and
//! teardown, the zero and dump themselves) cancels exactly. Only the proxy process's own user
//! space instructions count: the kernel's work for its sockets does not show in callgrind.
//!
//! The router's window of 2N requests is kept with `callgrind_annotate`'s listings (self and
//! inclusive) under the benchmark's output directory: where its instructions go.
use std::{
    ffi::OsString,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use redirector_tests::Daemon;
use serde_json::{Value, json};

use super::{
    Bins, Profile, Results, anchors,
    load::{self, Target},
    sys::{self, Callgrind, Tools},
    topo::{self, FORK, KEY_FORK, SVC, Topo},
};

/// Request rate of the counted runs. Under callgrind a proxy runs some 50 times slower: at
/// this rate every one keeps up. It divides a second evenly, so a run sends exactly N.
pub const RATE: u32 = 200;
/// Keep-alive connections the counted requests are spread over.
pub const CONNECTIONS: usize = 4;
/// Routes the daemon loads: the router's table is a hash map, its cost per request does not
/// depend on the count, and valgrind makes a big table slow to load.
pub const ROUTES: usize = 10;
/// N of the full run and of `--quick`.
const REQUESTS: u32 = 1000;
const REQUESTS_QUICK: u32 = 200;
/// Functions listed from the router's profile.
pub const TOP: usize = 12;

/// One proxy's counts.
struct Counts {
    /// (requests, Ir, seconds) of the N and the 2N window, and of the idle one (0 requests).
    windows: Vec<(u64, u64, f64)>,
    per_request: f64,
    /// The dump of the 2N window.
    profile: PathBuf,
}

pub fn run(
    bins: &Bins,
    tools: &Tools,
    profile: &Profile,
    topo: &Topo,
    results: &mut Results,
) -> anyhow::Result<()> {
    let Some(cg) = &tools.callgrind else {
        eprintln!("bench: instructions skipped: valgrind is not available");
        return Ok(());
    };
    let n = if profile.quick {
        REQUESTS_QUICK
    } else {
        REQUESTS
    };
    let dir = profile.out_dir.join(format!("callgrind-{}", profile.stamp));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut summary = serde_json::Map::new();
    let proxies: [(&str, &str); 3] = [
        ("router", "node router"),
        ("nginx", "nginx"),
        ("haproxy", "HAProxy"),
    ];
    for (key, label) in proxies {
        sys::check_interrupted()?;
        if key == "haproxy" && tools.haproxy.is_none() {
            eprintln!("bench: instructions of HAProxy skipped: haproxy is not available");
            continue;
        }
        eprintln!(
            "bench: instructions per request, {label} under callgrind ({n} and {} requests)",
            2 * n
        );
        let out = dir.join(format!("{key}.callgrind.out"));
        let wrap: Vec<OsString> = vec![
            cg.valgrind.clone().into(),
            "--tool=callgrind".into(),
            format!("--callgrind-out-file={}", out.display()).into(),
            format!(
                "--log-file={}",
                dir.join(format!("{key}.valgrind.log")).display()
            )
            .into(),
        ];
        let (mut proc, tgt) = match key {
            "router" => (
                topo.start_daemon_wrapped(bins, ROUTES, Some(&wrap))?,
                target(topo::addr(SVC)),
            ),
            "nginx" => (
                anchors::start_nginx(tools, topo, Some(&wrap))?,
                target(Topo::ip(&topo.proxy)),
            ),
            _ => (
                anchors::start_haproxy(
                    tools.haproxy.as_deref().context("haproxy")?,
                    topo,
                    Some(&wrap),
                )?,
                target(Topo::ip(&topo.haproxy)),
            ),
        };
        let counted = count(bins, cg, topo, &proc, tgt, &out, n);
        let stopped = proc.terminate();
        let c = counted.with_context(|| format!("counting the instructions of {label}"))?;
        stopped.with_context(|| format!("stopping {label} under valgrind"))?;
        results.push(format!("instr.{key}.ir_per_request"), c.per_request);
        let mut entry = json!({
            "label": label,
            "ir_per_request": c.per_request.round(),
            "windows": c.windows.iter().map(|(req, ir, s)| json!({
                "requests": req, "ir": ir, "seconds": (s * 1000.0).round() / 1000.0,
            })).collect::<Vec<_>>(),
            "profile": c.profile,
        });
        if key == "router" {
            let requests = c.windows.get(1).map_or(1, |w| w.0).max(1);
            let (top, files) = annotate(cg, &c.profile, &dir, key, requests)?;
            entry["top_self"] = top;
            entry["listings"] = json!(files);
        }
        summary.insert(key.to_owned(), entry);
    }
    results.instructions = json!({
        "how": format!(
            "callgrind (valgrind) counts the user-space instructions (Ir) of the proxy process; {n} then {} keyed requests at {RATE}/s over {CONNECTIONS} keep-alive connections, each between a counter zero and a dump; per request = (Ir(2N) - Ir(N) - idle Ir/s x (t(2N) - t(N))) / N, so start-up and connection set-up cancel. The daemon runs with {ROUTES} routes; nginx as one process (master_process off), HAProxy with nbthread 1; all to the fork.",
            2 * n
        ),
        "requests": n,
        "rate": RATE,
        "connections": CONNECTIONS,
        "routes": ROUTES,
        "dir": dir,
        "proxies": Value::Object(summary),
    });
    eprintln!("bench: callgrind dumps and listings in {}", dir.display());
    Ok(())
}

fn target(addr: std::net::SocketAddr) -> Target<'static> {
    Target {
        addr,
        key: KEY_FORK,
        expect: FORK,
    }
}

/// Warm-up, the idle window, then N and 2N requests, each between a zero and a dump.
fn count(
    bins: &Bins,
    cg: &Callgrind,
    topo: &Topo,
    proc: &Daemon,
    tgt: Target<'_>,
    out: &Path,
    n: u32,
) -> anyhow::Result<Counts> {
    let pid = proc.pid();
    let send = |requests: u32| -> anyhow::Result<u64> {
        let v = load::fixed_count(
            bins,
            &topo.node,
            &topo.client,
            tgt,
            RATE,
            requests,
            CONNECTIONS,
        )?;
        let errors = v["errors"].as_u64().unwrap_or(0);
        if errors > 0 {
            bail!(
                "{errors} of {requests} requests failed ({}); log:\n{}",
                v["first_error"].as_str().unwrap_or(""),
                proc.logs()
            );
        }
        v["ok"].as_u64().context("rdr-load summary without `ok`")
    };
    // Every code path translated and every pool filled before anything counts.
    send(n / 2)?;
    let mut windows = Vec::new();
    let mut dumps = Vec::new();
    for requests in [0, n, 2 * n] {
        control(cg, pid, "-z")?;
        let started = Instant::now();
        let sent = if requests == 0 {
            // As long as the N window lasts.
            std::thread::sleep(Duration::from_secs_f64(f64::from(n) / f64::from(RATE)));
            0
        } else {
            send(requests)?
        };
        control(cg, pid, "-d")?;
        let seconds = started.elapsed().as_secs_f64();
        let dump = latest_dump(out)?;
        windows.push((sent, total_ir(&dump)?, seconds));
        dumps.push(dump);
    }
    let (_, idle_ir, idle_s) = windows[0];
    let idle_rate = idle_ir as f64 / idle_s.max(1e-9);
    let (n1, ir1, s1) = windows[1];
    let (n2, ir2, s2) = windows[2];
    if n2 <= n1 {
        bail!("the 2N window sent {n2} requests, the N window {n1}");
    }
    let per_request = (ir2 as f64 - ir1 as f64 - idle_rate * (s2 - s1)) / (n2 - n1) as f64;
    Ok(Counts {
        windows: vec![windows[1], windows[2], windows[0]],
        per_request,
        profile: dumps.pop().context("no dump")?,
    })
}

/// `callgrind_control <flag> <pid>`: `-z` zeroes the counters, `-d` dumps them to a new file.
fn control(cg: &Callgrind, pid: u32, flag: &str) -> anyhow::Result<()> {
    let out = Command::new(&cg.control)
        .arg(flag)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("OK") {
        bail!(
            "callgrind_control {flag} {pid} failed: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The newest dump of `out`: callgrind writes the k-th one to `<out>.<k>`.
fn latest_dump(out: &Path) -> anyhow::Result<PathBuf> {
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .context("dump file name")?;
    let dir = out.parent().context("dump directory")?;
    let prefix = format!("{name}.");
    std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let k: u32 = file.strip_prefix(&prefix)?.parse().ok()?;
            Some((k, e.path()))
        })
        .max_by_key(|(k, _)| *k)
        .map(|(_, p)| p)
        .with_context(|| format!("no dump {}.<k> after callgrind_control -d", out.display()))
}

/// The `summary:` (total Ir) of a callgrind dump.
fn total_ir(dump: &Path) -> anyhow::Result<u64> {
    let text =
        std::fs::read_to_string(dump).with_context(|| format!("reading {}", dump.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .or_else(|| text.lines().find_map(|l| l.strip_prefix("totals:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no summary line in {}", dump.display()))
}

/// The router's profile: self Ir per function, read from the dump itself, and
/// `callgrind_annotate`'s inclusive listing, both saved next to it; returns the top [`TOP`]
/// functions by self Ir (with Ir per request over `requests`) and the two files.
///
/// callgrind_annotate 3.19's own self listing of a dump taken mid-run charges the cost of the
/// calls still on the stack (`calls=0` lines: the worker threads' whole loop) to the threads'
/// entry function as if it were self cost, so the self figures are summed here instead.
fn annotate(
    cg: &Callgrind,
    dump: &Path,
    dir: &Path,
    key: &str,
    requests: u64,
) -> anyhow::Result<(Value, Vec<PathBuf>)> {
    let text =
        std::fs::read_to_string(dump).with_context(|| format!("reading {}", dump.display()))?;
    let costs = self_costs(&text);
    let total: u64 = costs.iter().map(|(_, ir)| ir).sum::<u64>().max(1);
    let per_request = |ir: u64| (ir as f64 / requests as f64).round();
    let mut listing = format!(
        "Self Ir per function, {} (window of {requests} requests), total {total} Ir\n\n{:>14} {:>7} {:>10}  function [object]\n",
        dump.display(),
        "Ir",
        "%",
        "Ir/request"
    );
    for (func, ir) in &costs {
        let _ = writeln!(
            listing,
            "{ir:>14} {:>6.2}% {:>10}  {func}",
            *ir as f64 * 100.0 / total as f64,
            per_request(*ir)
        );
    }
    let self_file = dir.join(format!("{key}.self.txt"));
    std::fs::write(&self_file, listing)
        .with_context(|| format!("writing {}", self_file.display()))?;
    let top = json!(
        costs
            .iter()
            .take(TOP)
            .map(|(func, ir)| json!({
                "ir": ir,
                "percent": (*ir as f64 * 10_000.0 / total as f64).round() / 100.0,
                "ir_per_request": per_request(*ir),
                "function": func,
            }))
            .collect::<Vec<_>>()
    );

    let out = Command::new(&cg.annotate)
        .arg("--inclusive=yes")
        .arg(dump)
        .output()
        .context("running callgrind_annotate")?;
    if !out.status.success() {
        bail!(
            "callgrind_annotate {} failed: {}",
            dump.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let inclusive_file = dir.join(format!("{key}.inclusive.txt"));
    std::fs::write(&inclusive_file, &out.stdout)
        .with_context(|| format!("writing {}", inclusive_file.display()))?;
    Ok((top, vec![self_file, inclusive_file]))
}

/// Self Ir per function (`name [object file name]`) of a callgrind dump, largest first.
///
/// The format: `fn=` names the function the following cost lines (`<line> <Ir>`) belong to;
/// `calls=` makes the next cost line the inclusive cost of a call, which is not self cost.
/// Names are compressed: `fn=(id) name` defines id, `fn=(id)` refers to it (`cfn` shares
/// the ids of `fn`, `cob` those of `ob`).
fn self_costs(dump: &str) -> Vec<(String, u64)> {
    use std::collections::HashMap;
    let mut fns: HashMap<String, String> = HashMap::new();
    let mut obs: HashMap<String, String> = HashMap::new();
    // Resolves `(id) name` / `(id)` / `name` against the table, defining ids on first use.
    fn resolve(table: &mut HashMap<String, String>, spec: &str) -> String {
        let spec = spec.trim();
        match spec.strip_prefix('(').and_then(|r| r.split_once(')')) {
            Some((id, name)) => {
                let name = name.trim();
                if name.is_empty() {
                    table.get(id).cloned().unwrap_or_else(|| format!("({id})"))
                } else {
                    table.insert(id.to_owned(), name.to_owned());
                    name.to_owned()
                }
            }
            None => spec.to_owned(),
        }
    }
    let mut ob = String::new();
    let mut current: Option<String> = None;
    let mut skip_next = false;
    let mut totals: HashMap<String, u64> = HashMap::new();
    for line in dump.lines() {
        let first = line.bytes().next();
        if matches!(first, Some(b'0'..=b'9' | b'+' | b'-' | b'*')) {
            if std::mem::take(&mut skip_next) {
                continue;
            }
            let ir: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if let Some(f) = &current {
                *totals.entry(f.clone()).or_default() += ir;
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "ob" => {
                let path = resolve(&mut obs, value);
                ob = path.rsplit('/').next().unwrap_or(&path).to_owned();
            }
            "cob" => {
                resolve(&mut obs, value);
            }
            "fn" => {
                let name = resolve(&mut fns, value);
                current = Some(if ob.is_empty() {
                    name
                } else {
                    format!("{name} [{ob}]")
                });
            }
            "cfn" => {
                resolve(&mut fns, value);
            }
            "calls" => skip_next = true,
            _ => {}
        }
    }
    let mut out: Vec<(String, u64)> = totals.into_iter().filter(|(_, ir)| *ir > 0).collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_self_cost_per_function_and_leaves_calls_out() {
        let dump = "\
# callgrind format
events: Ir
summary: 1000

ob=(1) /usr/lib/libc.so.6
fl=(1) ./malloc.c
fn=(1) malloc
10 100
+2 50

ob=(2) /x/redirector
fl=(2) ???
fn=(2) std::sys::backtrace::__rust_begin_short_backtrace
cfn=(3) router::route
calls=0 0
0 850
fn=(3)
0 800
cob=(1)
cfi=(1)
cfn=(1)
calls=3 0
* 30
+1 20
";
        let costs = self_costs(dump);
        assert_eq!(
            costs,
            vec![
                ("router::route [redirector]".to_owned(), 820),
                ("malloc [libc.so.6]".to_owned(), 150),
            ]
        );
    }
}
