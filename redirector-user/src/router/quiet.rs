//! Client connections are served under a dispatcher that drops h2's own WARN events.
//!
//! h2 logs each connection it closes for abuse (too many resets, too many streams reset by the
//! library: the "rapid reset" family) with a WARN event of its own, so a client would decide how
//! much the daemon logs. The router counts and rate-limits client connection errors itself
//! (`client_errors`), so those events add nothing but volume. Everything else, h2's debug and
//! trace events included, goes to the daemon's subscriber unchanged.
use std::future::Future;

use tracing::{
    Dispatch, Event, Level, Metadata, Subscriber,
    instrument::WithSubscriber,
    level_filters::LevelFilter,
    span::{Attributes, Id, Record},
    subscriber::Interest,
};

/// The quiet dispatcher over the current default one. Build it once: every dispatcher is
/// registered globally and re-evaluates every callsite when created.
pub fn dispatcher() -> Dispatch {
    let inner = tracing::dispatcher::get_default(Dispatch::clone);
    Dispatch::new(QuietH2 {
        inner,
        hint: LevelFilter::current(),
    })
}

/// hyper's executor for the tasks of client connections (HTTP/2 streams): they run under
/// `dispatch` too, so h2 events raised while a stream task runs are filtered as well.
#[derive(Clone)]
pub struct QuietExecutor {
    pub dispatch: Dispatch,
}

impl<F> hyper::rt::Executor<F> for QuietExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut.with_subscriber(self.dispatch.clone()));
    }
}

fn is_h2_warning(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    meta.is_event()
        && *meta.level() <= Level::WARN
        && (target == "h2" || target.starts_with("h2::"))
}

/// Forwards to `inner` all it can: `current_span` cannot be named without tracing-core, and
/// nothing the router runs asks for it (the log formatter tracks spans in its own registry).
struct QuietH2 {
    inner: Dispatch,
    /// The inner subscriber's level hint when this was built (`Dispatch` does not forward it).
    hint: LevelFilter,
}

impl Subscriber for QuietH2 {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if is_h2_warning(meta) {
            Interest::never()
        } else {
            self.inner.register_callsite(meta)
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        !is_h2_warning(meta) && self.inner.enabled(meta)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.hint)
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        self.inner.new_span(span)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        self.inner.record(span, values)
    }

    fn record_follows_from(&self, span: &Id, follows: &Id) {
        self.inner.record_follows_from(span, follows)
    }

    fn event(&self, event: &Event<'_>) {
        self.inner.event(event)
    }

    fn enter(&self, span: &Id) {
        self.inner.enter(span)
    }

    fn exit(&self, span: &Id) {
        self.inner.exit(span)
    }

    fn clone_span(&self, id: &Id) -> Id {
        self.inner.clone_span(id)
    }

    fn try_close(&self, id: Id) -> bool {
        self.inner.try_close(id)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Records (target, level) of every event it is given.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<(String, Level)>>>);

    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let meta = event.metadata();
            let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
            seen.push((meta.target().to_owned(), *meta.level()));
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[test]
    fn only_h2_warnings_are_dropped() {
        let capture = Capture::default();
        let quiet = tracing::dispatcher::with_default(&Dispatch::new(capture.clone()), dispatcher);
        tracing::dispatcher::with_default(&quiet, || {
            tracing::warn!(target: "h2::proto::streams::recv", "too many resets");
            tracing::debug!(target: "h2::codec", "frame");
            tracing::warn!(target: "h2x", "not h2");
            tracing::warn!(target: "redirector::router", "ours");
        });
        let seen = capture.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(
            seen,
            [
                ("h2::codec".to_owned(), Level::DEBUG),
                ("h2x".to_owned(), Level::WARN),
                ("redirector::router".to_owned(), Level::WARN),
            ]
        );
    }
}
