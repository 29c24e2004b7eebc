//! `cargo xtask setup`: the build prerequisites of the kernel programs, installed idempotently.
//!
//! - `rust-src` for the active toolchain (aya-build compiles `core` for the BPF target);
//! - `bpf-linker`, built against the toolchain's own libLLVM so both agree on the LLVM version;
//! - the system tools the tests and the demo drive (`ip`, `bpftool`), from apt when missing.
//!
//! A second run only inspects and returns in well under a second.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

/// bpf-linker release known to work with aya-ebpf 0.2.1 and LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(clap::Args, Default)]
pub struct Options {}

pub fn run(_opts: &Options) -> anyhow::Result<()> {
    let toolchain = Toolchain::active()?;
    ensure_rust_src(&toolchain)?;
    ensure_bpf_linker(&toolchain)?;
    ensure_system_tools()?;
    Ok(())
}

struct Toolchain {
    /// As rustup names it, e.g. `stable-x86_64-unknown-linux-gnu`.
    name: String,
    sysroot: PathBuf,
    /// `rustc -vV` release, e.g. `1.95.0`.
    release: String,
    /// Major LLVM version rustc uses, e.g. `22`.
    llvm_major: String,
}

impl Toolchain {
    fn active() -> anyhow::Result<Toolchain> {
        let name = match env::var("RUSTUP_TOOLCHAIN") {
            Ok(name) => name,
            Err(_) => output("rustup", &["show", "active-toolchain"])?
                .split_whitespace()
                .next()
                .ok_or_else(|| anyhow!("rustup has no active toolchain"))?
                .to_owned(),
        };
        let sysroot = PathBuf::from(output("rustc", &["--print", "sysroot"])?.trim());
        let verbose = output("rustc", &["-vV"])?;
        let field = |key: &str| {
            verbose
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .ok_or_else(|| anyhow!("`rustc -vV` has no {key:?} line"))
        };
        let release = field("release:")?;
        let llvm = field("LLVM version:")?;
        let llvm_major = llvm.split('.').next().unwrap_or(&llvm).to_owned();
        Ok(Toolchain {
            name,
            sysroot,
            release,
            llvm_major,
        })
    }

    /// The toolchain's shared libLLVM (`libLLVM.so.<ver>-rust-<release>`).
    fn libllvm(&self) -> anyhow::Result<PathBuf> {
        let lib = self.sysroot.join("lib");
        std::fs::read_dir(&lib)
            .with_context(|| format!("reading {}", lib.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM.so."))
            })
            .ok_or_else(|| anyhow!("no libLLVM.so.* in {}", lib.display()))
    }
}

fn ensure_rust_src(tc: &Toolchain) -> anyhow::Result<()> {
    let core = tc.sysroot.join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        return Ok(());
    }
    eprintln!("setup: installing rust-src for {}", tc.name);
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &tc.name]))
}

/// A directory that outlives the build: the installed bpf-linker keeps an rpath into it.
fn llvm_prefix(tc: &Toolchain) -> anyhow::Result<PathBuf> {
    let data = match (env::var_os("XDG_DATA_HOME"), env::var_os("HOME")) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, Some(home)) => PathBuf::from(home).join(".local/share"),
        // CI runners may start without HOME; any lasting directory will do.
        (None, None) => PathBuf::from("/var/cache"),
    };
    Ok(data.join(format!("redirector/llvm-{}", tc.release)))
}

fn ensure_bpf_linker(tc: &Toolchain) -> anyhow::Result<()> {
    let libllvm = tc.libllvm()?;
    if bpf_linker_uses(&libllvm) {
        return Ok(());
    }
    let prefix = llvm_prefix(tc)?;
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let file_name = libllvm
        .file_name()
        .ok_or_else(|| anyhow!("bad libLLVM path"))?;
    for link in [lib.join("libLLVM.so"), lib.join(file_name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (takes a few minutes, once)",
        libllvm.display()
    );
    status(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--force", "--version"])
            .arg(BPF_LINKER_VERSION)
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{}", tc.llvm_major))
            .env("LLVM_PREFIX", &prefix)
            // The install must not inherit this workspace's target dir or flags.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .current_dir(env::temp_dir()),
    )?;
    if !bpf_linker_uses(&libllvm) {
        bail!(
            "bpf-linker was installed but does not load {}; is ~/.cargo/bin on PATH?",
            libllvm.display()
        );
    }
    Ok(())
}

/// True if the `bpf-linker` on PATH runs and loads exactly this libLLVM.
fn bpf_linker_uses(libllvm: &Path) -> bool {
    let Ok(linker) = which("bpf-linker") else {
        return false;
    };
    let Ok(ldd) = output("ldd", &[linker.to_string_lossy().as_ref()]) else {
        return false;
    };
    let want = libllvm
        .canonicalize()
        .unwrap_or_else(|_| libllvm.to_owned());
    let loads_ours = ldd.lines().any(|line| {
        line.trim_start().starts_with("libLLVM")
            && line
                .split("=>")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|p| Path::new(p).canonicalize().ok())
                .is_some_and(|p| p == want)
    });
    loads_ours && output(linker.to_string_lossy().as_ref(), &["--version"]).is_ok()
}

/// The tests and the demo build nodes out of network namespaces with `ip`, and count attached
/// programs with `bpftool`.
fn ensure_system_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [("ip", "iproute2"), ("bpftool", "bpftool")]
        .into_iter()
        .filter(|(tool, _)| which(tool).is_err())
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {} with apt-get", missing.join(" "));
    status(Command::new("apt-get").arg("update").arg("-qq"))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

pub fn which(tool: &str) -> anyhow::Result<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    // Where `cargo install` and Debian put things, even when PATH lacks them.
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    } else if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{tool} not found"))
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
