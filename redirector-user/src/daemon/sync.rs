//! The one writer of the kernel's state maps: turns a desired state into map entries and
//! applies the difference, and keeps the router's table in step.
use std::{path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use tracing::warn;

use crate::{
    kernel::{
        maps::{Handoff, Ids, KernelState, MemberCookies, SyncError, encode},
        netns::CookieCache,
        programs::Kernel,
    },
    router::RouteTable,
    state::DesiredState,
};

/// Keeps the maps in line with a desired state.
pub struct Sync {
    pub kernel: Kernel,
    /// The node router's view of the routes, swapped after each successful apply.
    table: Arc<ArcSwap<RouteTable>>,
    handoff: Handoff,
    /// None until the first apply, which adopts ids from what the kernel already holds.
    pub ids: Option<Ids>,
    /// What the maps hold, as last written by us; None when unknown (at start, or after a
    /// write failed part way), in which case it is read back from the kernel.
    pub written: Option<KernelState>,
    cookies: CookieCache,
    pub unresolved_members: usize,
}

pub struct Applied {
    pub members: usize,
    pub changed: bool,
}

impl Sync {
    pub fn new(kernel: Kernel, table: Arc<ArcSwap<RouteTable>>, handoff: Handoff) -> Sync {
        Sync {
            kernel,
            table,
            handoff,
            ids: None,
            written: None,
            cookies: CookieCache::default(),
            unresolved_members: 0,
        }
    }

    pub fn apply(&mut self, desired: &DesiredState) -> Result<Applied, SyncError> {
        let cookies = self.resolve_members(desired);
        let current = match self.written.take() {
            Some(state) => state,
            None => self.kernel.maps.read()?,
        };
        // Ids change only once the kernel has taken the new state: a rejected state must not
        // leave ids behind that the running one does not use.
        let mut ids = match &self.ids {
            Some(ids) => ids.clone(),
            None => Ids::adopt(&current, desired, &cookies),
        };
        let encoded = encode(desired, &mut ids, &cookies, self.handoff);
        let changed = encoded != current;
        if changed {
            match self.kernel.maps.apply(&current, &encoded) {
                Ok(()) => {}
                Err(err @ SyncError::MapFull { .. }) => {
                    // Refused before any write: the kernel still holds `current`.
                    self.written = Some(current);
                    return Err(err);
                }
                Err(err) => return Err(err),
            }
        }
        self.ids = Some(ids);
        self.table.store(Arc::new(RouteTable::from_state(desired)));
        let members = encoded.members.len();
        self.written = Some(encoded);
        Ok(Applied { members, changed })
    }

    pub fn resolve_members(&mut self, desired: &DesiredState) -> MemberCookies {
        let mut cookies = MemberCookies::new();
        let mut unresolved = 0;
        let keys = desired.routing_keys();
        for sandbox in &keys {
            for path in &sandbox.members {
                match self.cookies.get(path) {
                    Ok(cookie) => {
                        cookies.insert(path.clone(), cookie);
                    }
                    Err(err) => {
                        unresolved += 1;
                        // Pods come and go: a missing namespace is not a config error, but
                        // say so once per change rather than every retry.
                        if self.unresolved_members == 0 {
                            warn!(sandbox = %sandbox.key, member = %path.display(), error = %err,
                                "member namespace not found; retrying every poll interval");
                        }
                    }
                }
            }
        }
        self.unresolved_members = unresolved;
        let wanted = keys
            .iter()
            .flat_map(|s| s.members.iter().map(PathBuf::as_path))
            .collect();
        self.cookies.retain_paths(&wanted);
        cookies
    }
}
