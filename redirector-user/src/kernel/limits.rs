//! Process resource limits the daemon depends on.
//!
//! The node router holds one descriptor per client connection plus its upstream connections,
//! so the common default soft `RLIMIT_NOFILE` of 1 024 caps it at a few hundred idle clients.
//! The hard limit (often 524 288 under systemd, 1 048 576 in containers) is what the operator
//! actually granted; the soft one is only a default kept low for programs that still use
//! `select()` (FD_SETSIZE), which the daemon does not (tokio uses epoll).
use std::io;

use tracing::{info, warn};

/// The descriptor limits of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("cannot read RLIMIT_NOFILE")]
    Read(#[source] io::Error),
    #[error("cannot raise the soft RLIMIT_NOFILE from {from} to the hard limit {to}")]
    Raise {
        from: u64,
        to: u64,
        #[source]
        source: io::Error,
    },
}

/// Reads `RLIMIT_NOFILE`.
pub fn nofile() -> Result<Nofile, LimitError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(LimitError::Read(io::Error::last_os_error()));
    }
    Ok(Nofile {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Sets the soft `RLIMIT_NOFILE` to the hard one. Returns the limits before and after.
pub fn try_raise_nofile() -> Result<(Nofile, Nofile), LimitError> {
    let before = nofile()?;
    if before.soft >= before.hard {
        return Ok((before, before));
    }
    let limit = libc::rlimit {
        rlim_cur: before.hard,
        rlim_max: before.hard,
    };
    // SAFETY: `limit` is a valid rlimit; raising the soft limit up to the hard one needs no
    // privilege and changes nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(LimitError::Raise {
            from: before.soft,
            to: before.hard,
            source: io::Error::last_os_error(),
        });
    }
    let after = nofile()?;
    Ok((before, after))
}

/// Raises the soft descriptor limit to the hard one and says so; a failure is logged and the
/// daemon carries on with what it has (the router then sheds load earlier, see
/// `router::shed`). Returns the soft limit in force. Call it before the router starts: the
/// router reads the limit once to know when it is running short.
pub fn raise_nofile() -> Option<u64> {
    match try_raise_nofile() {
        Ok((before, after)) if before.soft == after.soft => {
            info!(
                soft = after.soft,
                hard = after.hard,
                "descriptor limit (RLIMIT_NOFILE) is the hard limit"
            );
            Some(after.soft)
        }
        Ok((before, after)) => {
            info!(
                from = before.soft,
                to = after.soft,
                "raised the soft descriptor limit (RLIMIT_NOFILE) to the hard limit"
            );
            Some(after.soft)
        }
        Err(err) => {
            warn!(error = %crate::error_chain(&err),
                "keeping the descriptor limit; the node router holds fewer connections");
            nofile().ok().map(|n| n.soft)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_is_raised_to_the_hard_one() {
        let here = nofile().expect("read the limit");
        if here.hard <= 1024 {
            eprintln!("hard RLIMIT_NOFILE {} too low to test a raise", here.hard);
            return;
        }
        // Lowering the soft limit for a moment is harmless to the tests running beside this
        // one (none holds 1 024 descriptors), and the raise below restores at least as much.
        let low = libc::rlimit {
            rlim_cur: 1024,
            rlim_max: here.hard,
        };
        // SAFETY: valid rlimit; lowering the soft limit needs no privilege.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        let (before, after) = try_raise_nofile().expect("raise");
        assert_eq!(before.soft, 1024);
        assert_eq!(
            after,
            Nofile {
                soft: here.hard,
                hard: here.hard
            }
        );
        assert_eq!(
            raise_nofile(),
            Some(here.hard),
            "a second raise changes nothing"
        );
    }
}
