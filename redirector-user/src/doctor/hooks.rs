//! The `hooks` check: loads the eBPF programs into the kernel (the verifier runs) without
//! attaching them, with the maps pinned into a scratch directory removed before returning.
use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{Program, ProgramError},
};

use super::{Check, HOOKS, MIN_KERNEL, Status};
use crate::kernel::{prereq, programs};

/// Prefix of the scratch pin directory of the `hooks` check. Not a hidden `.name`: bpffs
/// refuses every name with a dot in it (EPERM, "reserved for future use").
const SCRATCH_PREFIX: &str = "redirector-doctor-";

// ---- hooks ----

#[derive(Debug, thiserror::Error)]
enum HookError {
    #[error("not in the embedded eBPF object (build mismatch)")]
    Missing,
    #[error("is a {0} program, not a cgroup sock_addr or sock_ops one (build mismatch)")]
    UnexpectedType(String),
    #[error("{}", describe_program_error(.0))]
    Load(#[source] ProgramError),
}

/// What loading the programs one by one gave.
#[derive(Debug, Default)]
struct HookLoad {
    loaded: Vec<&'static str>,
    failed: Vec<(&'static str, HookError)>,
}

pub(super) fn check_hooks(pin_dir: &Path, needs: &[&str]) -> Check {
    if !needs.is_empty() {
        return Check::fail(
            HOOKS,
            format!("skipped: needs {}", needs.join(" and ")),
            "resolve the checks named above, then run doctor again",
        );
    }
    let Some(parent) = scratch_parent(pin_dir) else {
        return Check::fail(
            HOOKS,
            format!(
                "skipped: found no directory on a bpffs near {} for the scratch pins",
                pin_dir.display()
            ),
            "see the bpffs check",
        );
    };
    let scratch = match ScratchDir::create(&parent) {
        Ok(scratch) => scratch,
        Err(err) => {
            return Check::fail(
                HOOKS,
                format!(
                    "cannot create a scratch pin directory in {}: {err}",
                    parent.display()
                ),
                format!(
                    "make {} writable for this user (or run as root)",
                    parent.display()
                ),
            );
        }
    };
    let outcome = load_hooks(scratch.path());
    let scratch_path = scratch.path().to_owned();
    let cleanup = scratch.remove();

    let mut check = match outcome {
        Ok(load) => hooks_verdict(&load),
        Err(err) => Check::fail(
            HOOKS,
            format!("the eBPF object did not load: {}", crate::error_chain(&err)),
            hooks_fix(),
        ),
    };
    if let Err(err) = cleanup {
        // Leaving pins behind breaks the promise that doctor changes nothing: say so loudly.
        check.detail.push_str(&format!(
            "; could not remove the scratch pins {}: {err}",
            scratch_path.display()
        ));
        if check.status == Status::Pass {
            check.status = Status::Warn;
        }
        check.fix = Some(format!("rm -r {}", scratch_path.display()));
    }
    check
}

fn hooks_fix() -> String {
    format!(
        "use Linux {}.{}+ with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF; RUST_LOG=debug prints \
         the whole verifier log",
        MIN_KERNEL.0, MIN_KERNEL.1
    )
}

fn hooks_verdict(load: &HookLoad) -> Check {
    let total = programs::HOOKS.len();
    match load.failed.first() {
        None => Check::pass(
            HOOKS,
            format!(
                "all {total} programs verified (loaded, not attached): {}",
                load.loaded.join(", ")
            ),
        ),
        Some((name, err)) => {
            let loaded = if load.loaded.is_empty() {
                "none".to_owned()
            } else {
                load.loaded.join(", ")
            };
            Check::fail(
                HOOKS,
                format!(
                    "{}/{total} programs load ({loaded}); first refused: {name}: {err}",
                    load.loaded.len()
                ),
                hooks_fix(),
            )
        }
    }
}

/// Loads the embedded object (maps pinned under `pin_dir`) and each hook's program into the
/// kernel, which runs the verifier; nothing is attached. Everything is released on return.
fn load_hooks(pin_dir: &Path) -> Result<HookLoad, EbpfError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(programs::EBPF_OBJECT)?;
    let mut load = HookLoad::default();
    // Every program is tried, not just up to the first refusal, to tell which ones work.
    for name in programs::HOOKS {
        match load_program(&mut ebpf, name) {
            Ok(()) => load.loaded.push(name),
            Err(err) => {
                if let HookError::Load(ProgramError::LoadError { verifier_log, .. }) = &err {
                    tracing::debug!(program = name, log = %verifier_log, "verifier log");
                }
                load.failed.push((name, err));
            }
        }
    }
    Ok(load)
}

fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<(), HookError> {
    match ebpf.program_mut(name).ok_or(HookError::Missing)? {
        Program::CgroupSockAddr(program) => program.load().map_err(HookError::Load),
        Program::SockOps(program) => program.load().map_err(HookError::Load),
        other => Err(HookError::UnexpectedType(format!(
            "{:?}",
            other.prog_type()
        ))),
    }
}

/// A program error in one line: for a verifier refusal, the syscall error and the last lines
/// of the log, which say what was refused (the whole log goes to the debug log).
fn describe_program_error(err: &ProgramError) -> String {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let tail = verifier_tail(&verifier_log.to_string(), 3);
            if tail.is_empty() {
                format!("BPF_PROG_LOAD: {io_error}")
            } else {
                format!("BPF_PROG_LOAD: {io_error}; verifier: {tail}")
            }
        }
        other => crate::error_chain(other),
    }
}

/// The last `lines` lines of a verifier log that say something, without its statistics.
fn verifier_tail(log: &str, lines: usize) -> String {
    let meaningful: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("processed ")
                && !line.starts_with("verification time")
                && !line.starts_with("stack depth")
        })
        .collect();
    meaningful[meaningful.len().saturating_sub(lines)..].join(" / ")
}

/// Where the scratch pin directory goes: the pin directory's nearest existing ancestor, if it
/// is on a bpffs (so nothing lands in the daemon's own directory, whose `uninstall` removes it
/// only when empty); else the pin directory itself, when it exists on a bpffs (a bpffs mounted
/// right there).
pub(super) fn scratch_parent(pin_dir: &Path) -> Option<PathBuf> {
    let above = pin_dir
        .parent()
        .and_then(|parent| parent.ancestors().find(|dir| dir.is_dir()));
    let itself = pin_dir.is_dir().then_some(pin_dir);
    // For an existing directory, check_bpffs looks at that very directory.
    [above, itself]
        .into_iter()
        .flatten()
        .find(|dir| prereq::check_bpffs(dir).is_ok())
        .map(Path::to_owned)
}

/// A uniquely named directory that is removed when done with, and on unwind too.
struct ScratchDir {
    path: PathBuf,
    removed: bool,
}

impl ScratchDir {
    fn create(parent: &Path) -> io::Result<ScratchDir> {
        // pid plus a counter: unique among processes and among concurrent runs in one process.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = parent.join(format!("{SCRATCH_PREFIX}{pid}-{n}"));
            // create_dir, not create_dir_all: never adopt (and later delete) a directory that
            // someone else made. A leftover of a dead process with our pid is skipped over.
            match fs::create_dir(&path) {
                Ok(()) => {
                    return Ok(ScratchDir {
                        path,
                        removed: false,
                    });
                }
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists && n < 1000 => {}
                Err(err) => return Err(err),
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn remove(mut self) -> io::Result<()> {
        self.removed = true;
        remove_tree(&self.path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.removed
            && let Err(err) = remove_tree(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %err, "cannot remove doctor's scratch pins");
        }
    }
}

fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_skipped_without_their_prerequisites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let check = check_hooks(dir.path(), &["a bpffs"]);
        assert_eq!(check.status, Status::Fail);
        assert_eq!(check.detail, "skipped: needs a bpffs");
        // Not on a bpffs: refused before anything is created.
        let check = check_hooks(dir.path(), &[]);
        assert_eq!(check.status, Status::Fail);
        assert_eq!(fs::read_dir(dir.path()).expect("read").count(), 0);
    }

    #[test]
    fn hook_verdicts() {
        let all = HookLoad {
            loaded: programs::HOOKS.to_vec(),
            failed: Vec::new(),
        };
        let pass = hooks_verdict(&all);
        assert_eq!(pass.status, Status::Pass);
        assert!(pass.detail.contains("handoff_sockops"), "{}", pass.detail);
        let some = HookLoad {
            loaded: vec!["connect4"],
            failed: vec![
                ("connect6", HookError::Missing),
                ("sendmsg4", HookError::Missing),
            ],
        };
        let fail = hooks_verdict(&some);
        assert_eq!(fail.status, Status::Fail);
        assert!(
            fail.detail
                .starts_with("1/9 programs load (connect4); first refused: connect6: "),
            "{}",
            fail.detail
        );
    }

    #[test]
    fn verifier_tail_keeps_the_refusal() {
        let log = "0: R1=ctx() R10=fp0\n; return ctx->user_port;\n0: (61) r0 = *(u32 *)(r1 +24)\n\
                   invalid bpf_context access off=24 size=4\n\
                   processed 1 insns (limit 1000000) max_states_per_insn 0 total_states 0\n\n";
        assert_eq!(
            verifier_tail(log, 2),
            "0: (61) r0 = *(u32 *)(r1 +24) / invalid bpf_context access off=24 size=4"
        );
        assert_eq!(verifier_tail("", 3), "");
    }
}
