//! The one writer of the kernel's state maps: turns a desired state into map entries and
//! applies the difference, and keeps the router's table in step.
use std::{collections::HashMap, path::Path, sync::Arc};

use arc_swap::ArcSwap;
use tracing::{info, warn};

use super::resets::{self, ResetLog};
use crate::{
    api::answers::ResetCause,
    kernel::reset::{MemberResets, ResetError},
};
use crate::{
    kernel::{
        maps::{Handoff, Ids, KernelState, MemberCookies, SyncError, encode},
        netns,
        programs::Kernel,
    },
    router::{RouteTable, table::MemberAddresses},
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
    /// The addresses of the members of sandboxes with `inject_key`, as of the last apply.
    addresses: MemberAddresses,
    /// The cookie of the daemon's own network namespace (the node's, for a DaemonSet), read
    /// once: a member there shares the node's addresses with every host-network process, so
    /// its addresses cannot tell its requests apart.
    own_netns: Option<Option<u64>>,
    pub unresolved_members: usize,
    /// The state of the last apply, to tell which routes a new one changes.
    applied: Option<DesiredState>,
    /// What route changes reset (`reset_on_change`).
    pub resets: ResetLog,
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
            addresses: MemberAddresses::new(),
            own_netns: None,
            unresolved_members: 0,
            applied: None,
            resets: ResetLog::default(),
        }
    }

    /// Makes the kernel hold `desired`, with every member path resolved now.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<Applied, SyncError> {
        let (cookies, addresses) = self.resolve_members(desired);
        self.apply_resolved(desired, cookies, addresses)
    }

    /// Reads every member path's cookie again and applies `desired` if one differs from what
    /// the kernel holds: a pod whose namespace appeared, went, or was replaced at the same path.
    /// Returns whether anything was applied.
    pub fn follow_members(&mut self, desired: &DesiredState) -> Result<bool, SyncError> {
        let (cookies, addresses) = self.resolve_members(desired);
        if self.written.is_some() && cookies == self.resolved && addresses == self.addresses {
            return Ok(false);
        }
        self.apply_resolved(desired, cookies, addresses)?;
        Ok(true)
    }

    fn apply_resolved(
        &mut self,
        desired: &DesiredState,
        cookies: MemberCookies,
        addresses: MemberAddresses,
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
        self.table
            .store(Arc::new(RouteTable::with_members(desired, &addresses)));
        let members = encoded.members.len();
        self.written = Some(encoded);
        self.resolved = cookies;
        self.addresses = addresses;
        if changed && let Some(before) = self.applied.take() {
            self.reset_moved_sockets(&before, desired);
        }
        self.applied = Some(desired.clone());
        Ok(Applied { members, changed })
    }

    /// Resets the member sockets of the routes with `reset_on_change` that this apply moved,
    /// now that the maps say where their new connections go. The daemon's first apply resets
    /// nothing: it cannot know what changed while it was not running.
    fn reset_moved_sockets(&mut self, before: &DesiredState, after: &DesiredState) {
        let Some(ids) = &self.ids else { return };
        for plan in resets::plan(before, after, ids) {
            let Some(outcome) = self.kernel.reset_sockets(&plan.requests, &plan.members) else {
                warn!(sandbox = %plan.key, services = ?plan.services,
                    "route changed with reset_on_change, but this kernel cannot reset sockets");
                continue;
            };
            let (closed, errors) = tally(outcome, false);
            if errors.is_empty() {
                info!(sandbox = %plan.key, services = ?plan.services, closed,
                    "route changed: member connections reset");
            } else {
                warn!(sandbox = %plan.key, services = ?plan.services, closed, ?errors,
                    "route changed: member connections reset, some namespaces failed");
            }
            self.resets.record(
                ResetCause::RouteChange,
                &plan.key,
                &plan.services,
                closed,
                errors,
            );
        }
    }

    /// Resets the connections that pods in `cgroup` opened straight to a forked HTTP service
    /// while the router was down, so that they come back through it (`router.reset_bypassed`).
    /// Call once the router is up and the maps hold `desired`.
    pub fn reset_bypassed(&mut self, desired: &DesiredState, cgroup: &Path) {
        let Some(written) = &self.written else { return };
        let (services, requests) = resets::bypassed(desired, written);
        if requests.is_empty() {
            return;
        }
        let namespaces = match netns::of_cgroup(cgroup) {
            Ok(namespaces) => namespaces,
            Err(err) => {
                warn!(cgroup = %cgroup.display(), error = %err,
                    "cannot list the pods' network namespaces; no connection reset");
                return;
            }
        };
        let Some(outcome) = self.kernel.reset_sockets(&requests, &namespaces) else {
            warn!("router.reset_bypassed is set, but this kernel cannot reset sockets");
            return;
        };
        let (closed, errors) = tally(outcome, true);
        info!(services = ?services, namespaces = namespaces.len(), closed,
            "router up: connections that bypassed it reset");
        self.resets
            .record(ResetCause::RouterBack, "", &services, closed, errors);
    }

    /// The cookie of every member path of `desired` now. Paths that do not resolve are left
    /// out (their pods are gone or not there yet), so their old cookies leave the kernel.
    /// The members of sandboxes with `inject_key` also have their addresses read, for the
    /// router to know their requests.
    fn resolve_members(&mut self, desired: &DesiredState) -> (MemberCookies, MemberAddresses) {
        let keys = desired.routing_keys();
        let owners: HashMap<&Path, (&str, bool)> = keys
            .iter()
            .flat_map(|s| {
                s.members
                    .iter()
                    .map(|p| (p.as_path(), (s.key.as_str(), s.inject_key)))
            })
            .collect();
        let mut cookies = MemberCookies::new();
        let mut addresses = MemberAddresses::new();
        let mut unresolved = 0;
        let asked = owners.iter().map(|(path, (_, inject))| (*path, *inject));
        let own_netns = *self
            .own_netns
            .get_or_insert_with(|| netns::cookie(Path::new("/proc/self/ns/net")).ok());
        for (path, result) in netns::resolve_with_addresses(asked) {
            let sandbox = owners.get(path.as_path()).map_or("", |(key, _)| *key);
            let before = self.resolved.get(&path).copied();
            match result {
                Ok(netns::Member {
                    cookie,
                    addresses: listed,
                }) => {
                    if let Some(listed) = listed {
                        if Some(cookie) == own_netns {
                            if before != Some(cookie) {
                                warn!(sandbox, member = %path.display(),
                                    "member in the daemon's own network namespace: \
                                    no key is injected for it");
                            }
                        } else {
                            addresses.insert(path.clone(), listed);
                        }
                    }
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
        (cookies, addresses)
    }
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
