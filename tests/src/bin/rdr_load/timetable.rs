//! The fixed-rate timetable: scheduled send times, paced from a timerfd or by spinning.
use super::*;

/// Scheduled send times, filled by the pacer thread and taken by whichever connection is free.
/// A request that finds every connection busy waits here, and its latency keeps counting.
pub(super) struct Queue {
    pub(super) items: Mutex<VecDeque<Instant>>,
    pub(super) closed: AtomicBool,
    pub(super) notify: Notify,
}

impl Queue {
    pub(super) fn new() -> Queue {
        Queue {
            items: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    pub(super) fn items(&self) -> MutexGuard<'_, VecDeque<Instant>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn push(&self, t: Instant) {
        self.items().push_back(t);
        self.notify.notify_one();
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(super) async fn pop(&self) -> Option<Instant> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before looking, so a push between the look and the await still wakes.
            notified.as_mut().enable();
            if let Some(t) = self.items().pop_front() {
                return Some(t);
            }
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            notified.await;
        }
    }
}

/// The pacer: pushes `count` send times, `interval` apart from `start`, each at its time.
///
/// It is a periodic kernel timer (timerfd) read by a task of the generator's own runtime: the
/// timer has nanosecond resolution (tokio's wheel has millisecond), and no second thread has
/// to preempt the one sending requests to hand over the send times.
///
/// With `spin`, the clock is read on every turn of the runtime instead: even a timerfd is only
/// as punctual as the timer interrupt, which on a virtual machine arrives tens of microseconds
/// late.
pub(super) async fn pace(
    queue: Arc<Queue>,
    start: Instant,
    interval_ns: u64,
    count: u64,
    spin: bool,
) -> Result<()> {
    let res = if spin {
        pace_spinning(&queue, start, interval_ns, count).await;
        Ok(())
    } else {
        pace_inner(&queue, start, interval_ns, count).await
    };
    // Closed on every path, so the connections finish instead of waiting for more work.
    queue.close();
    res
}

pub(super) async fn pace_spinning(queue: &Queue, start: Instant, interval_ns: u64, count: u64) {
    let due = |i: u64| start + Duration::from_nanos(interval_ns.saturating_mul(i));
    let mut sent = 0u64;
    while sent < count {
        let now = Instant::now();
        while sent < count && due(sent) <= now {
            queue.push(due(sent));
            sent += 1;
        }
        tokio::task::yield_now().await;
    }
}

pub(super) async fn pace_inner(
    queue: &Queue,
    start: Instant,
    interval_ns: u64,
    count: u64,
) -> Result<()> {
    let timer = timerfd(start.saturating_duration_since(Instant::now()), interval_ns)?;
    // SAFETY: the OwnedFd is a valid open timerfd that the AsyncFd owns until it is dropped.
    let timer = unsafe { AsyncFd::register_with_interest(timer, Interest::READABLE) }
        .context("registering timerfd")?;
    let mut sent = 0u64;
    while sent < count {
        let mut guard = timer.readable().await.context("waiting on timerfd")?;
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a buffer of 8 from our own open, non-blocking timerfd.
        let read = guard.try_io(|fd| {
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
        match read {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e).context("reading timerfd"),
            Err(_would_block) => continue,
        }
        // Expirations since the last read: after a busy stretch, all the overdue send times
        // go out at once, each still carrying its own scheduled time.
        let expirations = u64::from_ne_bytes(buf);
        for _ in 0..expirations.min(count - sent) {
            queue.push(start + Duration::from_nanos(interval_ns.saturating_mul(sent)));
            sent += 1;
        }
    }
    Ok(())
}

/// A periodic CLOCK_MONOTONIC timerfd (the clock `Instant` uses): first expiry after `first`,
/// then every `interval_ns`.
pub(super) fn timerfd(first: Duration, interval_ns: u64) -> Result<OwnedFd> {
    let ts = |ns: u64| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts(interval_ns.max(1)),
        // Zero would disarm the timer.
        it_value: ts(nanos(first)),
    };
    // SAFETY: plain syscalls; the fd is owned right after creation and closed on drop.
    unsafe {
        let fd = libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("timerfd_create");
        }
        let fd = OwnedFd::from_raw_fd(fd);
        if libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error()).context("timerfd_settime");
        }
        Ok(fd)
    }
}
