//! The one writer of the kernel's state maps: turns a desired state into map entries and
//! applies the difference, and keeps the router's table in step.
use std::{collections::HashMap, path::Path, sync::Arc};

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::{
    kernel::{
        maps::{Handoff, Ids, KernelState, MemberCookies, SyncError, encode},
        netns,
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
    /// The member cookies the kernel holds, by path, as of the last apply.
    pub resolved: MemberCookies,
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
            resolved: MemberCookies::new(),
            unresolved_members: 0,
        }
    }

    /// Makes the kernel hold `desired`, with every member path resolved now.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<Applied, SyncError> {
        let cookies = self.resolve_members(desired);
        self.apply_resolved(desired, cookies)
    }

    /// Reads every member path's cookie again and applies `desired` if one differs from what
    /// the kernel holds: a pod whose namespace appeared, went, or was replaced at the same path.
    /// Returns whether anything was applied.
    pub fn follow_members(&mut self, desired: &DesiredState) -> Result<bool, SyncError> {
        let cookies = self.resolve_members(desired);
        if self.written.is_some() && cookies == self.resolved {
            return Ok(false);
        }
        self.apply_resolved(desired, cookies)?;
        Ok(true)
    }

    fn apply_resolved(
        &mut self,
        desired: &DesiredState,
        cookies: MemberCookies,
    ) -> Result<Applied, SyncError> {
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
        self.resolved = cookies;
        Ok(Applied { members, changed })
    }

    /// The cookie of every member path of `desired` now. Paths that do not resolve are left
    /// out (their pods are gone or not there yet), so their old cookies leave the kernel.
    fn resolve_members(&mut self, desired: &DesiredState) -> MemberCookies {
        let keys = desired.routing_keys();
        let owners: HashMap<&Path, &str> = keys
            .iter()
            .flat_map(|s| s.members.iter().map(|p| (p.as_path(), s.key.as_str())))
            .collect();
        let mut cookies = MemberCookies::new();
        let mut unresolved = 0;
        for (path, result) in netns::resolve_all(owners.keys().copied()) {
            let sandbox = owners.get(path.as_path()).copied().unwrap_or_default();
            let before = self.resolved.get(&path).copied();
            match result {
                Ok(cookie) => {
                    if let Some(before) = before.filter(|b| *b != cookie) {
                        info!(sandbox, member = %path.display(), old_cookie = before, cookie,
                            "member namespace replaced; following the new one");
                    }
                    cookies.insert(path, cookie);
                }
                Err(err) => {
                    unresolved += 1;
                    // Pods come and go: not a config error. Said once per member that was
                    // steered, and once per batch while nothing resolves, not every poll.
                    if before.is_some() || self.unresolved_members == 0 {
                        warn!(sandbox, member = %path.display(),
                            error = %crate::error_chain(&err),
                            "member namespace not usable; retrying every poll interval");
                    }
                }
            }
        }
        self.unresolved_members = unresolved;
        cookies
    }
}
