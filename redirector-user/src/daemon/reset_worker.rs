//! Socket resets on a thread of their own. A run enters each member namespace and walks every
//! TCP socket in it, which takes a while on a busy node (and `router.reset_bypassed` first
//! lists every pod's namespace from /proc); the control loop must keep answering the API and
//! following members meanwhile, so it only queues the work. Jobs run one at a time, in the
//! order of the applies that asked for them, each against the maps as they are when it runs.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
};

use redirector_common::{ResetRequest, ServiceKey};
use tracing::{info, warn};

use super::resets::ResetLog;
use crate::{
    api::answers::{ResetCause, ResetReport},
    kernel::{
        netns,
        reset::{MemberResets, ResetError, Resetter, Unavailable},
    },
};

/// Where a job's sockets live.
#[derive(Debug)]
pub enum Namespaces {
    /// A routing key's member namespaces.
    Members(Vec<PathBuf>),
    /// Every pod's namespace under this cgroup, listed when the job runs.
    Cgroup(PathBuf),
}

/// One reset: the services whose sockets to look at, and where.
#[derive(Debug)]
pub struct Job {
    pub cause: ResetCause,
    /// The routing key whose change this is; empty for `RouterBack`.
    pub key: String,
    pub services: Vec<String>,
    pub requests: Vec<(ServiceKey, ResetRequest)>,
    pub namespaces: Namespaces,
}

/// The queue to the reset thread and what it has done.
pub struct ResetWorker {
    /// None when this kernel cannot reset sockets.
    jobs: Option<mpsc::Sender<Job>>,
    unavailable: Option<String>,
    log: Arc<Mutex<ResetLog>>,
}

impl ResetWorker {
    /// Starts the reset thread with `resetter`, or, when there is none, a worker that says
    /// why for each job it is given.
    pub fn start(resetter: Result<Resetter, Unavailable>) -> ResetWorker {
        let log = Arc::new(Mutex::new(ResetLog::default()));
        let mut resetter = match resetter {
            Ok(resetter) => resetter,
            Err(why) => return Self::without(crate::error_chain(&why), log),
        };
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread_log = log.clone();
        let started = std::thread::Builder::new()
            .name("rdr-resets".into())
            .spawn(move || {
                // Ends when the daemon drops its sender.
                for job in queue {
                    run(&mut resetter, &thread_log, job);
                }
            });
        match started {
            Ok(_) => ResetWorker {
                jobs: Some(jobs),
                unavailable: None,
                log,
            },
            Err(err) => Self::without(format!("cannot start the reset thread: {err}"), log),
        }
    }

    fn without(why: String, log: Arc<Mutex<ResetLog>>) -> ResetWorker {
        warn!(error = %why,
            "routes with reset_on_change apply to new connections only on this node: \
            live connections cannot be reset");
        ResetWorker {
            jobs: None,
            unavailable: Some(why),
            log,
        }
    }

    /// Queues `job`; it runs after every job queued before it.
    pub fn submit(&self, job: Job) {
        let Some(jobs) = &self.jobs else {
            warn!(sandbox = %job.key, services = ?job.services,
                "connections not reset: this kernel cannot reset sockets");
            return;
        };
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            warn!(sandbox = %job.key, services = ?job.services,
                "the reset thread has stopped; connections not reset");
        }
    }

    /// The last resets, newest last.
    pub fn recent(&self) -> Vec<ResetReport> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).recent()
    }

    /// Why this node cannot reset sockets, when it cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }
}

fn run(resetter: &mut Resetter, log: &Mutex<ResetLog>, job: Job) {
    let Job {
        cause,
        key,
        services,
        requests,
        namespaces,
    } = job;
    let (namespaces, vanishing) = match namespaces {
        Namespaces::Members(paths) => (paths, false),
        Namespaces::Cgroup(cgroup) => match netns::of_cgroup(&cgroup) {
            Ok(paths) => (paths, true),
            Err(err) => {
                warn!(cgroup = %cgroup.display(), error = %err,
                    "cannot list the pods' network namespaces; no connection reset");
                return;
            }
        },
    };
    let (closed, errors) = tally(resetter.run(&requests, &namespaces), vanishing);
    match cause {
        ResetCause::RouteChange if errors.is_empty() => {
            info!(sandbox = %key, ?services, closed, "route changed: member connections reset");
        }
        ResetCause::RouteChange => {
            warn!(sandbox = %key, ?services, closed, ?errors,
                "route changed: member connections reset, some namespaces failed");
        }
        ResetCause::RouterBack => {
            info!(
                ?services,
                namespaces = namespaces.len(),
                closed,
                ?errors,
                "router up: connections that bypassed it reset"
            );
        }
    }
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .record(cause, &key, &services, closed, errors);
}

/// Sockets closed by one reset, and the namespaces it could not run in. With `vanishing`, the
/// namespaces are those of processes listed a moment before, so one whose process exited
/// meanwhile is not an error.
fn tally(outcome: Result<Vec<MemberResets>, ResetError>, vanishing: bool) -> (u64, Vec<String>) {
    let mut closed = 0;
    let mut errors = Vec::new();
    match outcome {
        Ok(namespaces) => {
            for (path, result) in namespaces {
                match result {
                    Ok(reset) => closed += reset.len() as u64,
                    Err(netns::NetnsError::Open { .. }) if vanishing => {}
                    Err(err) => {
                        errors.push(format!("{}: {}", path.display(), crate::error_chain(&err)));
                    }
                }
            }
        }
        Err(err) => errors.push(crate::error_chain(&err)),
    }
    (closed, errors)
}
