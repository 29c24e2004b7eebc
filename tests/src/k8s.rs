//! A real Kubernetes API server for end-to-end tests: etcd plus the test API server of
//! `tests/k8s-apiserver` (the upstream apiextensions-apiserver for CRDs, behind a small server for
//! the built-in resources: Namespaces, Pods, Services, ConfigMaps, Secrets, ServiceAccounts,
//! Events, EndpointSlices, Leases, Deployments), both on loopback, with x509 client certificates.
//!
//! `cargo xtask k8s-testenv` builds the two binaries (`cargo xtask test` runs it first and passes
//! their paths in [`APISERVER_ENV`] and [`ETCD_ENV`]); without those variables they are looked up
//! where that task caches them, under [`testenv_dir`].
//!
//! The server has no controllers: a test plays the kubelet, the EndpointSlice controller and the
//! Deployment controller itself (creates Pods with `status.podIP`, EndpointSlices with ready
//! endpoints, writes Deployment status). Services get no ClusterIP unless the test sets one, and
//! nothing is defaulted. Every authenticated client may do anything.

use std::env;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{conditions, wait::await_condition},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::cleanup::{NAME_TAG, warn};
use crate::proc::{SpawnOpts, Stream, Supervised, run_ok_with_input, run_with_timeout};

/// Path of the test API server binary, as `cargo xtask test` exports it.
pub const APISERVER_ENV: &str = "RDR_K8S_APISERVER";
/// Path of the etcd binary, as `cargo xtask test` exports it.
pub const ETCD_ENV: &str = "RDR_ETCD";
/// Set (to anything) to echo etcd's and the API server's output to the test's stderr.
pub const ECHO_ENV: &str = "RDR_K8S_ECHO";

const ETCD_READY: Duration = Duration::from_secs(30);
const APISERVER_READY: Duration = Duration::from_secs(60);
/// Time between SIGTERM and SIGKILL in `stop_apiserver`; the server drains quickly.
const STOP_GRACE: Duration = Duration::from_secs(5);
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
const CRD_ESTABLISHED: Duration = Duration::from_secs(30);
const ETCD_HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of each log shown when a test panics with the cluster still up.
const LOG_TAIL_ON_PANIC: usize = 40;

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// Where `cargo xtask k8s-testenv` keeps its downloads, build tree and binaries (`bin/`): a
/// lasting directory under the same base as bpf-linker's LLVM link (see xtask/src/setup.rs).
pub fn testenv_dir() -> PathBuf {
    let data = match (env::var_os("XDG_DATA_HOME"), env::var_os("HOME")) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, Some(home)) => PathBuf::from(home).join(".local/share"),
        // CI runners may start without HOME; any lasting directory will do.
        (None, None) => PathBuf::from("/var/cache"),
    };
    data.join("redirector/k8s-testenv")
}

/// The binaries a [`TestCluster`] runs.
#[derive(Clone, Debug)]
pub struct TestEnvBins {
    pub apiserver: PathBuf,
    pub etcd: PathBuf,
}

impl TestEnvBins {
    /// [`APISERVER_ENV`] and [`ETCD_ENV`] if set, else `testenv_dir()/bin/{k8s-apiserver,etcd}`.
    pub fn locate() -> Result<TestEnvBins> {
        let bin = testenv_dir().join("bin");
        let find = |var: &str, name: &str| -> Result<PathBuf> {
            let path = env::var_os(var).map_or_else(|| bin.join(name), PathBuf::from);
            if !path.is_file() {
                bail!(
                    "{name} not found at {} (run `cargo xtask k8s-testenv`, or set {var})",
                    path.display()
                );
            }
            Ok(path)
        };
        Ok(TestEnvBins {
            apiserver: find(APISERVER_ENV, "k8s-apiserver")?,
            etcd: find(ETCD_ENV, "etcd")?,
        })
    }
}

/// Gate for tests that need a [`TestCluster`]: `if !redirector_tests::k8s::require_k8s() { return; }`.
///
/// True when the binaries are there. Otherwise, under `CI=true` it panics, because a CI run that
/// silently skips these tests proves nothing; elsewhere it prints a loud `SKIPPED: <reason>`
/// line and returns false. No root needed: everything listens on loopback.
pub fn require_k8s() -> bool {
    static MISSING: OnceLock<Option<String>> = OnceLock::new();
    let missing = MISSING.get_or_init(|| TestEnvBins::locate().err().map(|e| format!("{e:#}")));
    let Some(reason) = missing else {
        return true;
    };
    if env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1") {
        panic!("Kubernetes test environment missing under CI=true: {reason}");
    }
    eprintln!("SKIPPED: Kubernetes test cannot run on this machine: {reason}");
    false
}

/// How a [`TestCluster`] runs its API server.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Serve watches from the API server's own event window, as kube-apiserver does (the
    /// default); it also sends periodic BOOKMARK events. Then a watch from a revision that etcd
    /// compacted still succeeds while that revision is inside the window; it gets `410 Gone`
    /// once it is not, which is always the case after the API server restarted (the window then
    /// starts at the restart). With `false` every watch goes to etcd: a watch from a compacted
    /// revision gets 410 at once, and no periodic BOOKMARKs come.
    pub watch_cache: bool,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions { watch_cache: true }
    }
}

/// What `kubectl` printed and how it ended.
#[derive(Debug)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// etcd and the test API server, started on free loopback ports with fresh certificates. Both
/// processes are killed and the scratch directory removed on drop (if the test panicked, the
/// tails of their logs are printed first).
///
/// Start it from the test's own thread (the body of `#[tokio::test]`): the processes die with
/// the thread that spawned them, so a killed test run leaves none behind.
pub struct TestCluster {
    prefix: String,
    bins: TestEnvBins,
    opts: ClusterOptions,
    etcd_addr: SocketAddr,
    apiserver_port: u16,
    kubeconfig: PathBuf,
    config: kube::Config,
    echo: bool,
    etcd: Option<Supervised>,
    apiserver: Option<Supervised>,
    // Last, so it is removed after the processes that write into it are gone.
    dir: ScratchDir,
}

impl TestCluster {
    /// [`TestCluster::start_with`] the default options (watch cache on, as in a real cluster).
    pub async fn start() -> Result<TestCluster> {
        TestCluster::start_with(ClusterOptions::default()).await
    }

    /// Starts etcd and the API server and waits until `/readyz` answers `ok`. Namespaces
    /// `default`, `kube-system` and `kube-public` exist by then.
    pub async fn start_with(opts: ClusterOptions) -> Result<TestCluster> {
        let bins = TestEnvBins::locate()?;
        sweep_stale();
        let n = NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NAME_TAG}{}-k8s{n}", std::process::id());
        let dir = ScratchDir::create(env::temp_dir().join(&prefix))?;

        let [etcd_port, peer_port, apiserver_port] = free_ports()?;
        let certs = Certs::generate(&prefix)?;
        certs.write(&dir.0)?;
        let server = format!("https://127.0.0.1:{apiserver_port}");
        let kubeconfig = dir.0.join("kubeconfig");
        let kubeconfig_yaml = certs.kubeconfig(&prefix, &server);
        fs::write(&kubeconfig, &kubeconfig_yaml)
            .with_context(|| format!("writing {}", kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::from_yaml(&kubeconfig_yaml).context("parsing our own kubeconfig")?,
            &KubeConfigOptions::default(),
        )
        .await
        .context("kube client configuration from our own kubeconfig")?;

        let mut cluster = TestCluster {
            prefix,
            bins,
            opts,
            etcd_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, etcd_port)),
            apiserver_port,
            kubeconfig,
            config,
            echo: env::var_os(ECHO_ENV).is_some(),
            etcd: None,
            apiserver: None,
            dir,
        };
        cluster.start_etcd(peer_port)?;
        cluster.start_apiserver().await?;
        Ok(cluster)
    }

    /// Per-cluster name prefix (`rdrt-<pid>-k8s<n>`), usable as a namespace name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The scratch directory: certificates, etcd's data, the kubeconfig.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// A kubeconfig with the CA and an admin client certificate (group `system:masters`)
    /// embedded, for kubectl and for the daemon under test. Its namespace is `default`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`; the same across `stop_apiserver`/`start_apiserver`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// etcd's client URL (plain HTTP on loopback).
    pub fn etcd_url(&self) -> String {
        format!("http://{}", self.etcd_addr)
    }

    /// The client configuration the kubeconfig describes.
    pub fn kube_config(&self) -> kube::Config {
        self.config.clone()
    }

    /// A new client for the cluster. Call it inside a Tokio runtime (kube spawns a task).
    pub fn client(&self) -> Result<kube::Client> {
        kube::Client::try_from(self.config.clone()).context("building a kube client")
    }

    /// Creates `crds`, waits until the API server serves each, and creates `namespace`: where
    /// every Kubernetes test (and `cargo xtask demo --cluster`) starts. Returns a client.
    pub async fn install(
        &self,
        crds: &[CustomResourceDefinition],
        namespace: &str,
    ) -> Result<kube::Client> {
        let client = self.client()?;
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.create(&PostParams::default(), crd)
                .await
                .with_context(|| format!("creating CRD {name}"))?;
            tokio::time::timeout(
                CRD_ESTABLISHED,
                await_condition(api.clone(), &name, conditions::is_crd_established()),
            )
            .await
            .with_context(|| format!("CRD {name} not established within {CRD_ESTABLISHED:?}"))?
            .with_context(|| format!("waiting for CRD {name}"))?;
        }
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {namespace}"))?;
        Ok(client)
    }

    /// Whether the API server process is running (not stopped with `stop_apiserver`).
    pub fn apiserver_running(&self) -> bool {
        self.apiserver.is_some()
    }

    /// Starts the API server again (same port, same etcd, same certificates) and waits until it
    /// is ready. Fails if it is already running.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        if self.apiserver.is_some() {
            bail!("[{}] the API server is already running", self.prefix);
        }
        let dir = &self.dir.0;
        let mut cmd = Command::new(&self.bins.apiserver);
        cmd.arg(format!("--etcd-servers={}", self.etcd_url()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", self.apiserver_port))
            .arg("--tls-cert-file")
            .arg(dir.join("server.crt"))
            .arg("--tls-private-key-file")
            .arg(dir.join("server.key"))
            .arg("--client-ca-file")
            .arg(dir.join("ca.crt"))
            .arg("--cert-dir")
            .arg(dir.join("apiserver"))
            .arg(format!("--watch-cache={}", self.opts.watch_cache));
        let label = format!("{}-apiserver", self.prefix);
        self.apiserver = Some(Supervised::spawn(&label, cmd, self.spawn_opts())?);
        self.wait_apiserver_ready().await
    }

    /// Stops the API server: SIGTERM, so it closes its watches as on a rolling update, and
    /// SIGKILL if it is still there 5 s later. etcd keeps running. Clients see connection
    /// errors until [`TestCluster::start_apiserver`].
    pub fn stop_apiserver(&mut self) -> Result<()> {
        let mut p = self
            .apiserver
            .take()
            .ok_or_else(|| anyhow!("[{}] the API server is not running", self.prefix))?;
        p.shutdown(STOP_GRACE);
        Ok(())
    }

    /// Like [`TestCluster::stop_apiserver`] but SIGKILL at once: a crash, watches cut mid-stream.
    pub fn kill_apiserver(&mut self) -> Result<()> {
        let mut p = self
            .apiserver
            .take()
            .ok_or_else(|| anyhow!("[{}] the API server is not running", self.prefix))?;
        p.shutdown(Duration::ZERO);
        Ok(())
    }

    /// etcd's current revision (the newest resourceVersion of anything in the cluster).
    pub fn etcd_revision(&self) -> Result<i64> {
        // The gRPC gateway speaks JSON, with bytes as base64 and int64 as strings; key "\0"
        // need not exist, the header carries the revision anyway.
        let reply = self.etcd_http("POST", "/v3/kv/range", r#"{"key":"AA=="}"#)?;
        let reply: serde_json::Value =
            serde_json::from_str(&reply).context("etcd's range reply is not JSON")?;
        reply["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| anyhow!("etcd's range reply has no revision: {reply}"))
    }

    /// Compacts etcd's history up to its current revision and returns that revision: every
    /// older resourceVersion is gone from etcd, so a watch that reaches etcd from one gets
    /// `410 Gone` and a client must relist. See [`ClusterOptions::watch_cache`] for when a
    /// watch reaches etcd.
    pub fn compact_etcd(&self) -> Result<i64> {
        let revision = self.etcd_revision()?;
        self.etcd_http(
            "POST",
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        )
        .with_context(|| format!("compacting etcd at revision {revision}"))?;
        Ok(revision)
    }

    /// Runs `kubectl --kubeconfig <ours> args...`; its stdout on success, an error carrying
    /// both streams otherwise.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl_output(args)?;
        if !out.success {
            bail!(
                "`kubectl {}` failed:\n{}{}",
                args.join(" "),
                out.stderr,
                out.stdout
            );
        }
        Ok(out.stdout)
    }

    /// Runs kubectl and returns what it printed whether it succeeded or not, for tests that
    /// expect a refusal.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<KubectlOutput> {
        let out = run_with_timeout(self.kubectl_command(args), KUBECTL_TIMEOUT)?;
        Ok(KubectlOutput {
            success: out.status.success(),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    /// Runs kubectl with `input` on stdin (`kubectl_with_input(&["apply", "-f", "-"], yaml)`).
    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> Result<String> {
        run_ok_with_input(self.kubectl_command(args), input, KUBECTL_TIMEOUT)
    }

    /// Everything the API server logged since it last started.
    pub fn apiserver_logs(&self) -> String {
        self.apiserver
            .as_ref()
            .map(|p| p.log.text(None))
            .unwrap_or_default()
    }

    /// Everything etcd logged (warnings and errors only).
    pub fn etcd_logs(&self) -> String {
        self.etcd
            .as_ref()
            .map(|p| p.log.text(None))
            .unwrap_or_default()
    }

    fn spawn_opts(&self) -> SpawnOpts {
        SpawnOpts {
            stdin: false,
            echo: self.echo,
            grace: STOP_GRACE,
        }
    }

    /// `$KUBECTL`, else `kubectl` from PATH.
    fn kubectl_command(&self, args: &[&str]) -> Command {
        let kubectl = env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
        let mut cmd = Command::new(kubectl);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            // kubectl caches discovery under $HOME; a fresh server on a reused port must not be
            // answered from another cluster's cache.
            .arg("--cache-dir")
            .arg(self.dir.0.join("kubectl-cache"))
            .args(args);
        cmd
    }

    fn start_etcd(&mut self, peer_port: u16) -> Result<()> {
        let client = self.etcd_url();
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(&self.bins.etcd);
        cmd.arg(format!("--name={}", self.prefix))
            .arg("--data-dir")
            .arg(self.dir.0.join("etcd"))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}={peer}", self.prefix))
            .arg("--initial-cluster-state=new")
            .arg("--log-level=warn")
            // Test data in a scratch directory: durability buys nothing, fsync costs a lot on
            // a busy disk.
            .arg("--unsafe-no-fsync");
        let label = format!("{}-etcd", self.prefix);
        self.etcd = Some(Supervised::spawn(&label, cmd, self.spawn_opts())?);

        let deadline = Instant::now() + ETCD_READY;
        let mut last = anyhow!("no answer yet");
        loop {
            if let Some(p) = self.etcd.as_mut()
                && let Some(st) = p.try_wait()?
            {
                bail!(
                    "[{}] etcd exited ({st}) before it was healthy:\n{}",
                    self.prefix,
                    p.log.text(None)
                );
            }
            match self.etcd_http("GET", "/health", "") {
                Ok(body) if body.contains(r#""health":"true""#) => return Ok(()),
                Ok(body) => last = anyhow!("/health said {body}"),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                bail!(
                    "[{}] etcd not healthy within {ETCD_READY:?}: {last:#}\n{}",
                    self.prefix,
                    self.etcd_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn wait_apiserver_ready(&mut self) -> Result<()> {
        let client = self.client()?;
        let deadline = Instant::now() + APISERVER_READY;
        let mut last = anyhow!("no answer yet");
        loop {
            if let Some(p) = self.apiserver.as_mut()
                && let Some(st) = p.try_wait()?
            {
                bail!(
                    "[{}] the API server exited ({st}) before it was ready:\n{}",
                    self.prefix,
                    p.log.text(None)
                );
            }
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .context("building the /readyz request")?;
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = anyhow!("/readyz said {body}"),
                Err(e) => last = e.into(),
            }
            if Instant::now() >= deadline {
                bail!(
                    "[{}] the API server was not ready within {APISERVER_READY:?}: {last:#}\n{}",
                    self.prefix,
                    self.apiserver_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One request to etcd's HTTP gateway. HTTP/1.0, so the reply is never chunked and ends
    /// with the connection.
    fn etcd_http(&self, method: &str, path: &str, body: &str) -> Result<String> {
        let what = || format!("etcd {method} {path}");
        let mut conn =
            TcpStream::connect_timeout(&self.etcd_addr, ETCD_HTTP_TIMEOUT).with_context(what)?;
        conn.set_read_timeout(Some(ETCD_HTTP_TIMEOUT))
            .with_context(what)?;
        write!(
            conn,
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.etcd_addr,
            body.len()
        )
        .with_context(what)?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply).with_context(what)?;
        let (head, body) = reply
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("{}: malformed reply {reply:?}", what()))?;
        if head.split_whitespace().nth(1) != Some("200") {
            bail!(
                "{}: {}: {body}",
                what(),
                head.lines().next().unwrap_or(head)
            );
        }
        Ok(body.to_owned())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, p) in [("API server", &self.apiserver), ("etcd", &self.etcd)] {
                if let Some(p) = p {
                    let text = p.log.text(Some(Stream::Stderr));
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_PANIC)..];
                    eprintln!(
                        "[{}] last {} lines of the {name} log:\n{}",
                        self.prefix,
                        tail.len(),
                        tail.join("\n")
                    );
                }
            }
        }
        // Nothing to save: kill at once rather than wait for a graceful shutdown.
        if let Some(mut p) = self.apiserver.take() {
            p.shutdown(Duration::ZERO);
        }
        if let Some(mut p) = self.etcd.take() {
            p.shutdown(Duration::ZERO);
        }
    }
}

/// A directory removed (with everything in it) on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(path: PathBuf) -> Result<ScratchDir> {
        // A leftover of an earlier process that had our pid.
        remove_dir(&path)?;
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = remove_dir(&self.0) {
            warn(&format!("removing {}", self.0.display()), &e);
        }
    }
}

fn remove_dir(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Removes scratch directories of clusters whose test process is gone (their processes died
/// with it: see `proc::Supervised`).
fn sweep_stale() {
    let tmp = env::temp_dir();
    let Ok(entries) = fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(NAME_TAG))
            .and_then(|rest| rest.split_once("-k8s"))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && let Err(e) = remove_dir(&entry.path())
        {
            warn(&format!("sweeping {}", entry.path().display()), &e);
        }
    }
}

/// Distinct free loopback ports. They are free when this returns; the processes bind them a
/// moment later.
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding a free loopback port")?;
    let mut ports = [0; N];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l.local_addr().context("local address")?.port();
    }
    Ok(ports)
}

/// A CA, a serving certificate for 127.0.0.1 and an admin client certificate, all v3 (rustls
/// rejects v1 client certificates), PEM.
struct Certs {
    ca: String,
    server: String,
    server_key: String,
    client: String,
    client_key: String,
}

impl Certs {
    fn generate(prefix: &str) -> Result<Certs> {
        let ca_key = KeyPair::generate().context("CA key")?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
        ca.distinguished_name
            .push(DnType::CommonName, format!("{prefix} test CA"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).context("self-signing the CA")?;
        let issuer = Issuer::new(ca, ca_key);

        let leaf =
            |sans: &[&str], cn: &str, group: Option<&str>, usage| -> Result<(String, String)> {
                let key = KeyPair::generate().context("leaf key")?;
                let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
                let mut params = CertificateParams::new(sans).context("leaf parameters")?;
                params.distinguished_name.push(DnType::CommonName, cn);
                // The API server takes a client certificate's O as the user's group.
                if let Some(group) = group {
                    params
                        .distinguished_name
                        .push(DnType::OrganizationName, group);
                }
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                params.extended_key_usages = vec![usage];
                params.use_authority_key_identifier_extension = true;
                let cert = params
                    .signed_by(&key, &issuer)
                    .with_context(|| format!("signing the certificate of {cn}"))?;
                Ok((cert.pem(), key.serialize_pem()))
            };
        let (server, server_key) = leaf(
            &["127.0.0.1", "localhost"],
            "k8s-apiserver",
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client, client_key) = leaf(
            &[],
            "rdr-test-admin",
            Some("system:masters"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(Certs {
            ca: ca_cert.pem(),
            server,
            server_key,
            client,
            client_key,
        })
    }

    fn write(&self, dir: &Path) -> Result<()> {
        for (name, pem) in [
            ("ca.crt", &self.ca),
            ("server.crt", &self.server),
            ("server.key", &self.server_key),
            ("client.crt", &self.client),
            ("client.key", &self.client_key),
        ] {
            let path = dir.join(name);
            fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    fn kubeconfig(&self, name: &str, server: &str) -> String {
        let ca = BASE64.encode(&self.ca);
        let cert = BASE64.encode(&self.client);
        let key = BASE64.encode(&self.client_key);
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: {name}
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {name}-admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {name}
  context:
    cluster: {name}
    user: {name}-admin
    namespace: default
current-context: {name}
"
        )
    }
}

/// Creates `object` in `namespace` and returns it as the API server stored it.
pub async fn create_in<K>(client: &kube::Client, namespace: &str, object: &K) -> Result<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), object)
        .await
        .with_context(|| format!("creating {object:?}"))
}
