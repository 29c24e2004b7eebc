//! `cargo xtask k8s-testenv`: a real Kubernetes API server and etcd for the tests, built once
//! and cached, as `setup` does for bpf-linker.
//!
//! No registry ships kube-apiserver, but Debian sid packages the Kubernetes Go libraries as
//! source, Go 1.26, and etcd 3.5 (stable's 3.4 lacks the watch progress requests the libraries
//! need). So this task:
//!
//! 1. fetches exactly the .deb files `tests/k8s-apiserver/sid.lock` pins, with apt-get run on a
//!    private sources list and private state (the machine's own apt setup is never touched);
//! 2. unpacks them with `dpkg -x` into a scratch prefix;
//! 3. builds `tests/k8s-apiserver` there in GOPATH mode (Debian's Go libraries are a GOPATH
//!    tree), with no module proxy and no network;
//! 4. keeps the server and etcd in `<testenv dir>/bin` (see `redirector_tests::k8s::testenv_dir`),
//!    keyed by a hash of the Go sources and the lock, so a second run only hashes a few files.
//!
//! Downloads, the unpacked tree and Go's build cache stay in the same lasting directory, so a
//! change to the Go sources rebuilds in a minute or two without the network.
use std::{
    collections::{BTreeMap, BTreeSet},
    env,
    fs::{self, File, OpenOptions},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use redirector_tests::k8s::{APISERVER_ENV, ETCD_ENV, testenv_dir};

use crate::setup;

/// The libraries the server imports; sid.lock pins their dependency closure.
const LIBRARY_ROOTS: &[&str] = &[
    "golang-k8s-apiserver-dev",
    "golang-k8s-apiextensions-apiserver-dev",
    "golang-k8s-api-dev",
    "golang-k8s-apimachinery-dev",
    "golang-k8s-client-go-dev",
];
/// Pinned alongside the libraries: the Go toolchain (and its standard library) and etcd.
const TOOLS: &[&str] = &["golang-1.26-go", "golang-1.26-src", "etcd-server"];
/// Where those packages put Go and etcd, relative to the unpacked prefix.
const GOROOT: &str = "usr/lib/go-1.26";
const GOCODE: &str = "usr/share/gocode";
const ETCD: &str = "usr/bin/etcd";
/// The server's import path inside the private GOPATH; its `//go:generate` line names it too.
const GO_PACKAGE: &str = "rdr.test/k8s-apiserver";
const SID: &str = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                   http://deb.debian.org/debian sid main\n";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Part of the cache key: bump it when the build steps below change.
const RECIPE: &str = "k8s-testenv build 1";
const LOCK_HEADER: &str = "\
# Debian sid packages the test API server (tests/k8s-apiserver) and its etcd come from: the
# dependency closure of the Kubernetes Go libraries, Go and etcd, one `package version` a line.
# `cargo xtask k8s-testenv` fetches exactly these; `cargo xtask k8s-testenv --relock` rewrites
# this file with what sid serves now (review the diff: the Go code targets the 0.36 libraries).
";

#[derive(clap::Args, Default)]
pub struct Options {
    /// Pin what Debian sid serves now: re-resolve the package closure and rewrite
    /// tests/k8s-apiserver/sid.lock, then build with it.
    #[arg(long)]
    relock: bool,
}

/// The binaries the Kubernetes tests run.
pub struct TestEnv {
    pub apiserver: PathBuf,
    pub etcd: PathBuf,
}

impl TestEnv {
    /// The variables `redirector_tests::k8s` reads, for the test processes.
    pub fn env(&self) -> [(&'static str, &Path); 2] {
        [(APISERVER_ENV, &self.apiserver), (ETCD_ENV, &self.etcd)]
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.relock {
        relock()?;
    }
    let env = ensure()?;
    for (var, path) in env.env() {
        println!("{var}={}", path.display());
    }
    Ok(())
}

/// Builds the test API server and etcd unless the cache already holds this exact build.
pub fn ensure() -> anyhow::Result<TestEnv> {
    let base = testenv_dir();
    let inputs = Inputs::read()?;
    let bin = base.join("bin");
    let env = TestEnv {
        apiserver: bin.join("k8s-apiserver"),
        etcd: bin.join("etcd"),
    };
    let up_to_date = |env: &TestEnv| {
        fs::read_to_string(bin.join("key")).is_ok_and(|k| k.trim() == inputs.key)
            && env.apiserver.is_file()
            && env.etcd.is_file()
    };
    if up_to_date(&env) {
        return Ok(env);
    }
    fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let _lock = BuildLock::acquire(&base.join("build.lock"))?;
    if up_to_date(&env) {
        // Another run built it while we waited.
        return Ok(env);
    }

    eprintln!(
        "k8s-testenv: building the test API server and etcd from Debian sid packages in {}\n\
         k8s-testenv: a cold build takes up to ~15 minutes on a busy machine (once: later runs \
         reuse it)",
        base.display()
    );
    let started = Instant::now();
    let debs = fetch(&base, &inputs.lock)?;
    let root = unpack(&base, &debs, &inputs.lock_text)?;
    build(&base, &root, &inputs)?;
    eprintln!(
        "k8s-testenv: built in {} ({})",
        minutes(started.elapsed()),
        bin.display()
    );
    Ok(env)
}

/// What a build depends on: the pinned packages and the server's Go sources.
struct Inputs {
    lock_text: String,
    /// (package, version) in file order.
    lock: Vec<(String, String)>,
    /// (file name, contents) of the `.go` files, sorted by name.
    sources: Vec<(String, Vec<u8>)>,
    key: String,
}

impl Inputs {
    fn read() -> anyhow::Result<Inputs> {
        let dir = source_dir();
        let lock_path = dir.join("sid.lock");
        let lock_text = fs::read_to_string(&lock_path)
            .with_context(|| format!("reading {}", lock_path.display()))?;
        let lock =
            parse_lock(&lock_text).with_context(|| format!("parsing {}", lock_path.display()))?;
        let mut sources = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(".go") {
                let text =
                    fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                sources.push((name.to_owned(), text));
            }
        }
        sources.sort();
        if sources.is_empty() {
            bail!("no .go files in {}", dir.display());
        }
        let mut hash = Fnv::default();
        hash.write(RECIPE.as_bytes());
        hash.write(lock_text.as_bytes());
        for (name, text) in &sources {
            hash.write(name.as_bytes());
            hash.write(text);
        }
        Ok(Inputs {
            key: format!("{:016x}", hash.0),
            lock_text,
            lock,
            sources,
        })
    }
}

fn source_dir() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).join("tests/k8s-apiserver")
}

fn parse_lock(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut lock = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next(), fields.next()) {
            (Some(name), Some(version), None) => lock.push((name.to_owned(), version.to_owned())),
            _ => bail!("not a `package version` line: {line:?}"),
        }
    }
    for needed in LIBRARY_ROOTS.iter().chain(TOOLS) {
        if !lock.iter().any(|(name, _)| name == needed) {
            bail!("{needed} is not pinned");
        }
    }
    Ok(lock)
}

/// apt-get and apt-cache on Debian sid, with lists, caches and sources of their own under
/// `<base>/apt`; they still read the machine's apt.conf (proxies, mirrors' quirks).
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(base: &Path) -> anyhow::Result<Apt> {
        if !Path::new(KEYRING).is_file() {
            bail!("{KEYRING} is missing (apt-get install debian-archive-keyring)");
        }
        let dir = base.join("apt");
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        fs::write(dir.join("sources.list"), SID).context("writing the sid sources list")?;
        // An empty dpkg status: nothing counts as installed, so nothing is held back.
        fs::write(dir.join("status"), "").context("writing the private dpkg status")?;
        Ok(Apt { dir })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let dir = |sub: &str| self.dir.join(sub).display().to_string();
        for (option, value) in [
            ("Dir::Etc::SourceList", dir("sources.list")),
            ("Dir::Etc::SourceParts", dir("sources.list.d")),
            ("Dir::State::Lists", dir("lists")),
            ("Dir::State::status", dir("status")),
            ("Dir::Cache", dir("cache")),
            ("Acquire::Languages", "none".to_owned()),
            // Downloads land in a root-owned directory that apt's _apt user cannot write.
            ("APT::Sandbox::User", "root".to_owned()),
        ] {
            cmd.arg("-o").arg(format!("{option}={value}"));
        }
        cmd
    }

    fn update(&self) -> anyhow::Result<()> {
        eprintln!("k8s-testenv: reading Debian sid's package lists");
        setup::status(self.command("apt-get").args(["-qq", "update"]))
            .context("apt-get update on the private sid sources list")
    }

    /// Versions sid serves now, for the given packages (absent ones are left out).
    fn versions(&self, names: &[&str]) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
        let out = capture(self.command("apt-cache").arg("madison").args(names))?;
        let mut versions: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in out.lines() {
            let mut fields = line.split('|').map(str::trim);
            if let (Some(name), Some(version)) = (fields.next(), fields.next()) {
                versions
                    .entry(name.to_owned())
                    .or_default()
                    .insert(version.to_owned());
            }
        }
        Ok(versions)
    }
}

/// The pinned .deb files, downloading those not cached yet. Returns them in lock order.
fn fetch(base: &Path, lock: &[(String, String)]) -> anyhow::Result<Vec<PathBuf>> {
    let debs = base.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let arch = capture(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_owned();
    let cached = |name: &str, version: &str| {
        // apt-get download's file names, with an epoch's ':' escaped.
        let version = version.replace(':', "%3a");
        [arch.as_str(), "all"]
            .map(|a| debs.join(format!("{name}_{version}_{a}.deb")))
            .into_iter()
            .find(|p| p.is_file())
    };
    let missing: Vec<&(String, String)> = lock
        .iter()
        .filter(|(name, version)| cached(name, version).is_none())
        .collect();
    if !missing.is_empty() {
        let apt = Apt::new(base)?;
        apt.update()?;
        let names: Vec<&str> = missing.iter().map(|(name, _)| name.as_str()).collect();
        let served = apt.versions(&names)?;
        let gone: Vec<String> = missing
            .iter()
            .filter(|(name, version)| !served.get(name).is_some_and(|v| v.contains(version)))
            .map(|(name, version)| match served.get(name) {
                Some(now) => format!(
                    "  {name} {version} (sid now has {})",
                    now.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
                None => format!("  {name} {version} (sid has no such package now)"),
            })
            .collect();
        if !gone.is_empty() {
            bail!(
                "Debian sid no longer serves {} pinned package(s):\n{}\n\
                 Run `cargo xtask k8s-testenv --relock` to pin what sid serves now, and review \
                 the diff of tests/k8s-apiserver/sid.lock.",
                gone.len(),
                gone.join("\n")
            );
        }
        eprintln!(
            "k8s-testenv: downloading {} of {} packages",
            missing.len(),
            lock.len()
        );
        setup::status(
            apt.command("apt-get")
                .args(["-qq", "download"])
                .args(
                    missing
                        .iter()
                        .map(|(name, version)| format!("{name}={version}")),
                )
                .current_dir(&debs),
        )
        .context("apt-get download from sid")?;
    }
    lock.iter()
        .map(|(name, version)| {
            cached(name, version).ok_or_else(|| {
                anyhow!(
                    "{name} {version} was downloaded but is not in {}",
                    debs.display()
                )
            })
        })
        .collect()
}

/// `dpkg -x` of every package into `<base>/root`, redone when the lock changes.
fn unpack(base: &Path, debs: &[PathBuf], lock_text: &str) -> anyhow::Result<PathBuf> {
    let root = base.join("root");
    let stamp = root.join(".sid.lock");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == lock_text) {
        return Ok(root);
    }
    remove_dir(&root)?;
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    eprintln!("k8s-testenv: unpacking {} packages", debs.len());
    for deb in debs {
        setup::status(Command::new("dpkg").arg("-x").arg(deb).arg(&root))?;
    }
    for needed in [GOROOT, GOCODE, ETCD] {
        if !root.join(needed).exists() {
            bail!("the pinned packages have no {needed}: is sid.lock right?");
        }
    }
    fs::write(&stamp, lock_text).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(root)
}

/// Builds the server with the unpacked Go, then installs it and etcd into `<base>/bin`.
fn build(base: &Path, root: &Path, inputs: &Inputs) -> anyhow::Result<()> {
    let gopath = base.join("gopath");
    let package = gopath.join("src").join(GO_PACKAGE);
    remove_dir(&package)?;
    fs::create_dir_all(&package).with_context(|| format!("creating {}", package.display()))?;
    for (name, text) in &inputs.sources {
        fs::write(package.join(name), text).with_context(|| format!("copying {name}"))?;
    }
    let goroot = root.join(GOROOT);
    let path = env::join_paths(
        [goroot.join("bin")]
            .into_iter()
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )?;
    let gopaths = env::join_paths([gopath.clone(), root.join(GOCODE)])?;
    let go = |args: &[&str]| {
        let mut cmd = Command::new(goroot.join("bin/go"));
        cmd.args(args)
            .current_dir(&package)
            .env("PATH", &path)
            .env("GOROOT", &goroot)
            .env("GOPATH", &gopaths)
            .env("GOCACHE", base.join("gocache"))
            // Debian's libraries are a GOPATH tree; nothing may come from a module proxy.
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOTOOLCHAIN", "local")
            .env("GOENV", "off")
            .env("GOTELEMETRY", "off")
            .env("GOFLAGS", "")
            // A static binary; no C toolchain involved.
            .env("CGO_ENABLED", "0");
        cmd
    };

    eprintln!("k8s-testenv: generating OpenAPI definitions");
    setup::status(&mut go(&["generate", GO_PACKAGE]))?;
    eprintln!("k8s-testenv: compiling the API server (the long part)");
    let staging = base.join("bin.new");
    remove_dir(&staging)?;
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let output = staging.join("k8s-apiserver");
    let output = output
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", output.display()))?;
    setup::status(&mut go(&[
        "build",
        "-trimpath",
        "-ldflags=-s -w",
        "-o",
        output,
        GO_PACKAGE,
    ]))?;
    fs::copy(root.join(ETCD), staging.join("etcd")).context("copying etcd")?;
    fs::write(staging.join("key"), &inputs.key).context("writing the build key")?;
    let bin = base.join("bin");
    remove_dir(&bin)?;
    fs::rename(&staging, &bin)
        .with_context(|| format!("moving {} to {}", staging.display(), bin.display()))
}

/// Re-resolves the closure of `LIBRARY_ROOTS` on sid and rewrites sid.lock.
fn relock() -> anyhow::Result<()> {
    let base = testenv_dir();
    fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let _lock = BuildLock::acquire(&base.join("build.lock"))?;
    let apt = Apt::new(&base)?;
    apt.update()?;
    let depends = capture(
        apt.command("apt-cache")
            .args(["depends", "--recurse", "--no-recommends", "--no-suggests"])
            .args([
                "--no-conflicts",
                "--no-breaks",
                "--no-replaces",
                "--no-enhances",
            ])
            .args(LIBRARY_ROOTS),
    )?;
    // Top-level lines name packages; `<...>` are virtual ones, whose providers follow. Only
    // the Go source packages count: everything else they pull in is for other uses.
    let mut names: BTreeSet<&str> = depends
        .lines()
        .filter(|l| !l.starts_with([' ', '<']))
        .map(str::trim)
        .filter(|n| n.starts_with("golang-") && n.ends_with("-dev"))
        .collect();
    names.extend(TOOLS);
    let names: Vec<&str> = names.into_iter().collect();
    let shown = capture(
        apt.command("apt-cache")
            .args(["show", "--no-all-versions"])
            .args(&names),
    )?;
    let mut pinned = BTreeMap::new();
    let mut package = None;
    for line in shown.lines() {
        if let Some(name) = line.strip_prefix("Package: ") {
            package = Some(name.trim().to_owned());
        } else if let (Some(version), Some(name)) = (line.strip_prefix("Version: "), &package) {
            pinned.insert(name.clone(), version.trim().to_owned());
        }
    }
    if let Some(absent) = names.iter().find(|n| !pinned.contains_key(**n)) {
        bail!("sid has no candidate version of {absent}");
    }

    let path = source_dir().join("sid.lock");
    let old: BTreeMap<String, String> = fs::read_to_string(&path)
        .ok()
        .and_then(|t| parse_lock(&t).ok())
        .map(|l| l.into_iter().collect())
        .unwrap_or_default();
    let mut text = LOCK_HEADER.to_owned();
    for (name, version) in &pinned {
        text.push_str(&format!("{name} {version}\n"));
    }
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let changed = pinned
        .iter()
        .filter(|(name, version)| old.get(*name) != Some(version))
        .count();
    let dropped = old.keys().filter(|n| !pinned.contains_key(*n)).count();
    eprintln!(
        "k8s-testenv: pinned {} packages in {} ({changed} new or changed, {dropped} dropped)",
        pinned.len(),
        path.display()
    );
    for root in LIBRARY_ROOTS {
        if !pinned.get(*root).is_some_and(|v| v.starts_with("0.36.")) {
            eprintln!(
                "k8s-testenv: warning: {root} is now {:?}; the server was written against 0.36",
                pinned.get(*root)
            );
        }
    }
    Ok(())
}

/// Serialises builds of the cache between concurrent xtask runs (flock, released on drop).
struct BuildLock {
    _file: File,
}

impl BuildLock {
    fn acquire(path: &Path) -> anyhow::Result<BuildLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let fd = file.as_raw_fd();
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!("k8s-testenv: waiting for another build of the test environment");
            // SAFETY: as above.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("locking {}", path.display()));
            }
        }
        Ok(BuildLock { _file: file })
    }
}

/// FNV-1a, 64 bits: a cache key that stays the same across Rust releases.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        // The length first, so that ("ab", "c") and ("a", "bc") differ.
        for &b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn remove_dir(path: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Runs `cmd` and returns its stdout; a failure carries its stderr.
fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_lines_parse_and_roots_are_required() {
        let mut text = String::from("# comment\n\n");
        for name in LIBRARY_ROOTS.iter().chain(TOOLS) {
            text.push_str(&format!("{name} 1.0-1\n"));
        }
        assert_eq!(
            parse_lock(&text).unwrap().len(),
            LIBRARY_ROOTS.len() + TOOLS.len()
        );
        assert!(parse_lock("etcd-server 3.5.30-2\n").is_err());
        assert!(parse_lock(&format!("{text}golang-x-dev\n")).is_err());
    }

    #[test]
    fn fnv_separates_fields() {
        let (mut a, mut b) = (Fnv::default(), Fnv::default());
        a.write(b"ab");
        a.write(b"c");
        b.write(b"a");
        b.write(b"bc");
        assert_ne!(a.0, b.0);
    }
}
