//! Child processes the harness owns: output capture, bounded waits, and kill-on-drop.

use std::ffi::{CStr, OsString};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// How long a daemon gets between SIGTERM and SIGKILL when it is dropped.
const DAEMON_GRACE: Duration = Duration::from_secs(5);
/// How long `terminate` waits for a clean exit before it gives up and kills.
const TERMINATE_WAIT: Duration = Duration::from_secs(10);
/// After the process is gone, how long to wait for its pipes to drain into the log.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

#[derive(Default)]
struct LogState {
    lines: Vec<(Stream, String)>,
    /// Reader threads still attached to a pipe; 0 means no more lines will ever come.
    open: usize,
}

/// Lines captured from a child, shared with the reader threads.
#[derive(Default)]
pub(crate) struct LogBuf {
    state: Mutex<LogState>,
    cond: Condvar,
}

pub(crate) enum Wait {
    Found(usize, String),
    Closed,
    TimedOut,
}

impl LogBuf {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        // A reader thread that panicked leaves valid data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, stream: Stream, line: String) {
        self.lock().lines.push((stream, line));
        self.cond.notify_all();
    }

    fn close_one(&self) {
        let mut st = self.lock();
        st.open = st.open.saturating_sub(1);
        drop(st);
        self.cond.notify_all();
    }

    pub(crate) fn text(&self, only: Option<Stream>) -> String {
        let st = self.lock();
        let mut out = String::new();
        for (s, l) in &st.lines {
            if only.is_none_or(|o| o == *s) {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Waits for the first line at index >= `from` that is on `only` (if given) and matches.
    pub(crate) fn wait_line(
        &self,
        from: usize,
        only: Option<Stream>,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Wait {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        let mut next = from;
        loop {
            while next < st.lines.len() {
                let (s, l) = &st.lines[next];
                if only.is_none_or(|o| o == *s) && pred(l) {
                    return Wait::Found(next, l.clone());
                }
                next += 1;
            }
            if st.open == 0 {
                return Wait::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Wait::TimedOut;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.open > 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

fn spawn_reader(
    pipe: impl Read + Send + 'static,
    stream: Stream,
    log: Arc<LogBuf>,
    echo: Option<String>,
) {
    log.lock().open += 1;
    // Spawned threads inherit libtest's output capture, so echoed lines show up with the test
    // that produced them (and only when it fails, unless --nocapture).
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_owned();
                    if let Some(label) = &echo {
                        eprintln!("[{label}] {line}");
                    }
                    log.push(stream, line);
                }
            }
        }
        log.close_one();
    });
}

// ---------------------------------------------------------------- pre_exec pieces
//
// These run in the forked child before exec, where the parent's other threads may hold locks
// (the allocator's included): only raw syscalls on data prepared before the fork.

pub(crate) fn enter_netns(path: &CStr) -> io::Result<()> {
    // SAFETY: path is a valid NUL-terminated string; the fd is closed on every path.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = libc::setns(fd, libc::CLONE_NEWNET);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
    }
    Ok(())
}

pub(crate) fn join_cgroup(procs: &CStr) -> io::Result<()> {
    // SAFETY: as above; "0" means "the writing process" to cgroup.procs.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 1 {
            return Err(err);
        }
    }
    Ok(())
}

/// Makes the child die with the thread that spawned it, so a test binary killed mid-run
/// (Ctrl-C, timeout) does not leave daemons or servers behind.
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the hook only calls prctl and getppid.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

// ---------------------------------------------------------------- Supervised

/// A child in its own process group, with captured output, killed (group-wide) on drop.
pub(crate) struct Supervised {
    label: String,
    child: Child,
    status: Option<ExitStatus>,
    pub(crate) log: Arc<LogBuf>,
    pub(crate) stdin: Option<ChildStdin>,
    grace: Duration,
}

pub(crate) struct SpawnOpts {
    pub(crate) stdin: bool,
    pub(crate) echo: bool,
    /// Time between SIGTERM and SIGKILL on drop; zero kills at once.
    pub(crate) grace: Duration,
}

impl Supervised {
    pub(crate) fn spawn(label: &str, mut cmd: Command, opts: SpawnOpts) -> Result<Supervised> {
        let what = describe(&cmd);
        cmd.stdin(if opts.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own group: drop can then also reach anything the child forked.
        .process_group(0);
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("[{label}] spawning `{what}`"))?;
        let log = Arc::new(LogBuf::default());
        let echo = opts.echo.then(|| label.to_owned());
        if let Some(out) = child.stdout.take() {
            spawn_reader(out, Stream::Stdout, log.clone(), echo.clone());
        }
        if let Some(err) = child.stderr.take() {
            spawn_reader(err, Stream::Stderr, log.clone(), echo);
        }
        let stdin = child.stdin.take();
        Ok(Supervised {
            label: label.to_owned(),
            child,
            status: None,
            log,
            stdin,
            grace: opts.grace,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal_group(&self, sig: libc::c_int) {
        if self.status.is_none() {
            // The group id is the child's pid; it cannot be reused while the child is unreaped.
            // SAFETY: plain kill(2); ESRCH is fine.
            unsafe { libc::kill(-(self.child.id() as libc::pid_t), sig) };
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: as above.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
    }

    /// True once the child has exited, without reaping it (so its group id stays reserved).
    fn exited(&self) -> bool {
        if self.status.is_some() {
            return true;
        }
        // SAFETY: waitid writes only into `info`.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                self.child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            rc == 0 && info.si_pid() != 0
        }
    }

    pub(crate) fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("[{}] waiting for the process", self.label))?;
        }
        Ok(self.status)
    }

    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited() {
                // Anything the child left in its group goes with it.
                self.signal_group(libc::SIGKILL);
                let st = self
                    .child
                    .wait()
                    .with_context(|| format!("[{}] reaping the process", self.label))?;
                self.status = Some(st);
                self.log.wait_drained(DRAIN_WAIT);
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM to the group, SIGKILL after `grace`; always reaps.
    pub(crate) fn shutdown(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        if !grace.is_zero() {
            self.signal_group(libc::SIGTERM);
            if let Ok(Some(st)) = self.wait_timeout(grace) {
                return Some(st);
            }
        }
        self.signal_group(libc::SIGKILL);
        match self.child.wait() {
            Ok(st) => {
                self.status = Some(st);
                self.log.wait_drained(DRAIN_WAIT);
            }
            Err(e) => eprintln!("[{}] reaping after SIGKILL: {e}", self.label),
        }
        self.status
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // Closing stdin first lets a session end on its own terms.
        self.stdin.take();
        self.shutdown(self.grace);
    }
}

// ---------------------------------------------------------------- one-shot commands

pub(crate) struct RunOutput {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `cmd` to completion with a hard wall-clock limit, capturing both streams.
pub(crate) fn run_with_timeout(cmd: Command, timeout: Duration) -> Result<RunOutput> {
    let what = describe(&cmd);
    let mut p = Supervised::spawn(
        "run",
        cmd,
        SpawnOpts {
            stdin: false,
            echo: false,
            grace: Duration::ZERO,
        },
    )?;
    match p.wait_timeout(timeout)? {
        Some(status) => Ok(RunOutput {
            status,
            stdout: p.log.text(Some(Stream::Stdout)),
            stderr: p.log.text(Some(Stream::Stderr)),
        }),
        None => {
            p.shutdown(Duration::ZERO);
            bail!(
                "`{what}` did not finish within {timeout:?}; output so far:\n{}",
                p.log.text(None)
            )
        }
    }
}

/// Like [`run_with_timeout`] but a non-zero exit is an error carrying the output.
pub(crate) fn run_ok(cmd: Command, timeout: Duration) -> Result<String> {
    let what = describe(&cmd);
    let out = run_with_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}):\n{}{}",
            status_text(out.status),
            out.stderr,
            out.stdout
        );
    }
    Ok(out.stdout)
}

/// Runs `cmd` with `input` on stdin (e.g. `ip -batch -`), bounded like [`run_ok`].
pub(crate) fn run_ok_with_input(cmd: Command, input: &str, timeout: Duration) -> Result<String> {
    let what = describe(&cmd);
    let mut p = Supervised::spawn(
        "run",
        cmd,
        SpawnOpts {
            stdin: true,
            echo: false,
            grace: Duration::ZERO,
        },
    )?;
    if let Some(mut stdin) = p.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("writing stdin of `{what}`"))?;
    }
    match p.wait_timeout(timeout)? {
        Some(st) if st.success() => Ok(p.log.text(Some(Stream::Stdout))),
        Some(st) => bail!(
            "`{what}` failed ({}) on input:\n{input}\n{}",
            status_text(st),
            p.log.text(None)
        ),
        None => bail!("`{what}` did not finish within {timeout:?}"),
    }
}

pub(crate) fn status_text(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => st.to_string(),
    }
}

// ---------------------------------------------------------------- Daemon

/// A long-running program under test (the redirector daemon, typically).
///
/// Its stdout and stderr are captured line by line and echoed to the test's stderr prefixed
/// with the label. Dropping it sends SIGTERM to its process group and SIGKILL 5 s later. The
/// child also gets SIGKILL if the thread that spawned it dies, so spawn it from the thread
/// that owns the guard (the test thread).
pub struct Daemon {
    inner: Supervised,
}

impl Daemon {
    /// Starts `program args...` in the current namespaces.
    pub fn spawn(label: &str, program: &Path, args: &[OsString]) -> Result<Daemon> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Daemon::spawn_command(label, cmd)
    }

    /// Starts a prepared command, e.g. one from `Node::command` or `Pod::command` to run inside
    /// a namespace. Stdin, stdout, stderr and the process group are set here.
    pub fn spawn_command(label: &str, cmd: Command) -> Result<Daemon> {
        Ok(Daemon {
            inner: Supervised::spawn(
                label,
                cmd,
                SpawnOpts {
                    stdin: false,
                    echo: true,
                    grace: DAEMON_GRACE,
                },
            )?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// Everything captured so far, stdout and stderr interleaved in arrival order.
    pub fn logs(&self) -> String {
        self.inner.log.text(None)
    }

    /// Waits until a captured line contains `needle` (lines logged before the call count).
    /// Fails early if the process exits without logging it; errors carry the captured log.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_from(0, needle, timeout).map(|_| ())
    }

    /// Like [`Daemon::wait_for_log`] but only lines at index >= `from` count; returns the index
    /// of the matching line, so a test can wait for the *next* occurrence of a message
    /// (pass `log_len()` taken before the action).
    pub fn wait_for_log_from(&self, from: usize, needle: &str, timeout: Duration) -> Result<usize> {
        match self
            .inner
            .log
            .wait_line(from, None, |l| l.contains(needle), timeout)
        {
            Wait::Found(i, _) => Ok(i),
            Wait::Closed => Err(anyhow!(
                "[{}] exited without logging {needle:?}; log:\n{}",
                self.inner.label,
                self.logs()
            )),
            Wait::TimedOut => Err(anyhow!(
                "[{}] did not log {needle:?} within {timeout:?}; log:\n{}",
                self.inner.label,
                self.logs()
            )),
        }
    }

    /// Number of lines captured so far (a cursor for [`Daemon::wait_for_log_from`]).
    pub fn log_len(&self) -> usize {
        self.inner.log.lock().lines.len()
    }

    /// SIGKILL to the daemon alone (not its group), then reap: simulates a crash, leaving
    /// whatever it pinned in place.
    pub fn kill9(&mut self) {
        self.inner.signal(libc::SIGKILL);
        if let Err(e) = self.inner.wait_timeout(TERMINATE_WAIT) {
            eprintln!("[{}] after SIGKILL: {e:#}", self.inner.label);
        }
    }

    /// SIGTERM to the daemon and wait for it to exit (10 s at most; after that it is killed
    /// and this is an error).
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.inner.signal(libc::SIGTERM);
        match self.inner.wait_timeout(TERMINATE_WAIT)? {
            Some(st) => Ok(st),
            None => {
                self.inner.shutdown(Duration::ZERO);
                bail!(
                    "[{}] still running {TERMINATE_WAIT:?} after SIGTERM (killed); log:\n{}",
                    self.inner.label,
                    self.logs()
                )
            }
        }
    }

    /// Waits up to `timeout` for the daemon to exit by itself (e.g. on a bad config).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.inner.wait_timeout(timeout)?.ok_or_else(|| {
            anyhow!(
                "[{}] still running after {timeout:?}; log:\n{}",
                self.inner.label,
                self.logs()
            )
        })
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.inner.try_wait()
    }
}
