//! The one writer of the kernel's state maps: turns a desired state into map entries and
//! applies the difference, and keeps the router's table in step.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use tracing::{info, warn};

use super::{
    reset_worker::{Job, Namespaces, ResetWorker},
    resets,
};
use crate::api::answers::ResetCause;
use crate::{
    kernel::{
        maps::{Handoff, Ids, KernelState, MemberCookies, SyncError, encode},
        netns,
        programs::{self, Kernel},
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
    /// What each member path named when last resolved (by the poll, or by an apply for a
    /// path new to it), with the error chain when it named no usable namespace.
    pub found: HashMap<PathBuf, Result<netns::Member, String>>,
    /// The addresses of the members of sandboxes with `inject_key`, as of the last apply.
    addresses: MemberAddresses,
    /// The cookie of the daemon's own network namespace (the node's, for a DaemonSet), read
    /// once: a member there shares the node's addresses with every host-network process, so
    /// its addresses cannot tell its requests apart.
    own_netns: Option<Option<u64>>,
    pub unresolved_members: usize,
    /// The state of the last apply, to tell which routes a new one changes.
    applied: Option<DesiredState>,
    /// Runs the resets that route changes ask for (`reset_on_change`), off the control loop.
    pub resets: ResetWorker,
}

pub struct Applied {
    pub members: usize,
    pub changed: bool,
}

impl Sync {
    pub fn new(
        kernel: Kernel,
        resets: programs::Resets,
        table: Arc<ArcSwap<RouteTable>>,
        handoff: Handoff,
    ) -> Sync {
        let resets = ResetWorker::start(resets);
        Sync {
            kernel,
            table,
            handoff,
            ids: None,
            written: None,
            resolved: MemberCookies::new(),
            found: HashMap::new(),
            addresses: MemberAddresses::new(),
            own_netns: None,
            unresolved_members: 0,
            applied: None,
            resets,
        }
    }

    /// Makes the kernel hold `desired`. Member paths new to the daemon are resolved now; the
    /// others as the last poll found them (the next poll follows any that changed since).
    pub fn apply(&mut self, desired: &DesiredState) -> Result<Applied, SyncError> {
        let unknown: Vec<(PathBuf, bool)> = member_paths(desired)
            .into_iter()
            .filter(|(path, addresses)| match self.found.get(path) {
                Some(Ok(member)) => *addresses && member.addresses.is_none(),
                Some(Err(_)) => false,
                None => true,
            })
            .collect();
        if !unknown.is_empty() {
            self.found_now(resolve(&unknown));
        }
        let (cookies, addresses) = self.members_of(desired);
        self.apply_resolved(desired, cookies, addresses)
    }

    /// Takes in a poll's answer for every member path (see [`member_paths`] and [`resolve`],
    /// run off the control loop) and applies `desired` if a cookie differs from what the
    /// kernel holds: a pod whose namespace appeared, went, or was replaced at the same path.
    /// Returns whether anything was applied.
    pub fn follow_members(
        &mut self,
        desired: &DesiredState,
        found: Found,
    ) -> Result<bool, SyncError> {
        self.found_now(found);
        let (cookies, addresses) = self.members_of(desired);
        if self.written.is_some() && cookies == self.resolved && addresses == self.addresses {
            return Ok(false);
        }
        self.apply_resolved(desired, cookies, addresses)?;
        Ok(true)
    }

    fn found_now(&mut self, found: Found) {
        for (path, result) in found {
            self.found
                .insert(path, result.map_err(|err| crate::error_chain(&err)));
        }
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

    /// Queues resets of the member sockets of the routes with `reset_on_change` that this
    /// apply moved, now that the maps say where their new connections go. The daemon's first
    /// apply resets nothing: it cannot know what changed while it was not running.
    fn reset_moved_sockets(&mut self, before: &DesiredState, after: &DesiredState) {
        let Some(ids) = &self.ids else { return };
        for plan in resets::plan(before, after, ids) {
            self.resets.submit(Job {
                cause: ResetCause::RouteChange,
                key: plan.key,
                services: plan.services,
                requests: plan.requests,
                namespaces: Namespaces::Members(plan.members),
            });
        }
    }

    /// Queues a reset of the connections that pods in `cgroup` opened straight to a forked HTTP
    /// service while the router was down, so that they come back through it
    /// (`router.reset_bypassed`). Call once the router is up and the maps hold `desired`.
    pub fn reset_bypassed(&mut self, desired: &DesiredState, cgroup: &Path) {
        let Some(written) = &self.written else { return };
        let (services, requests) = resets::bypassed(desired, written);
        if requests.is_empty() {
            return;
        }
        self.resets.submit(Job {
            cause: ResetCause::RouterBack,
            key: String::new(),
            services,
            requests,
            namespaces: Namespaces::Cgroup(cgroup.to_owned()),
        });
    }

    /// The cookie of every member path of `desired`, as last found, and the addresses of the
    /// members of sandboxes with `inject_key`, for the router to know their requests. Paths
    /// that did not resolve are left out (their pods are gone or not there yet), so their old
    /// cookies leave the kernel; what was found for paths `desired` no longer has is dropped.
    fn members_of(&mut self, desired: &DesiredState) -> (MemberCookies, MemberAddresses) {
        let owners: HashMap<&Path, &str> = desired
            .members()
            .map(|(key, path, _)| (path, key))
            .collect();
        self.found
            .retain(|path, _| owners.contains_key(path.as_path()));
        let mut cookies = MemberCookies::new();
        let mut addresses = MemberAddresses::new();
        let mut unresolved = 0;
        let own_netns = *self
            .own_netns
            .get_or_insert_with(|| netns::cookie(Path::new("/proc/self/ns/net")).ok());
        for (path, sandbox) in owners {
            let before = self.resolved.get(path).copied();
            match self.found.get(path) {
                Some(Ok(netns::Member {
                    cookie,
                    addresses: listed,
                })) => {
                    let cookie = *cookie;
                    if let Some(listed) = listed {
                        if Some(cookie) == own_netns {
                            if before != Some(cookie) {
                                warn!(sandbox, member = %path.display(),
                                    "member in the daemon's own network namespace: \
                                    no key is injected for it");
                            }
                        } else {
                            addresses.insert(path.to_owned(), listed.clone());
                        }
                    }
                    if let Some(before) = before.filter(|b| *b != cookie) {
                        info!(sandbox, member = %path.display(), old_cookie = before, cookie,
                            "member namespace replaced; following the new one");
                    }
                    cookies.insert(path.to_owned(), cookie);
                }
                Some(Err(error)) => {
                    unresolved += 1;
                    // Pods come and go: not a config error. Said once per member that was
                    // steered, and once per batch while nothing resolves, not every poll.
                    if before.is_some() || self.unresolved_members == 0 {
                        warn!(sandbox, member = %path.display(), error,
                            "member namespace not usable; retrying every poll interval");
                    }
                }
                // Asked for since the last poll or apply began: the next one answers.
                None => unresolved += 1,
            }
        }
        self.unresolved_members = unresolved;
        (cookies, addresses)
    }
}

/// What a poll found for each member path.
pub type Found = Vec<(PathBuf, Result<netns::Member, netns::NetnsError>)>;

/// Every member path of `desired`, with whether its addresses are wanted (members of
/// sandboxes with `inject_key`): what a poll resolves.
pub fn member_paths(desired: &DesiredState) -> Vec<(PathBuf, bool)> {
    let mut paths: HashMap<&Path, bool> = HashMap::new();
    for (_, path, inject_key) in desired.members() {
        *paths.entry(path).or_default() |= inject_key;
    }
    paths
        .into_iter()
        .map(|(path, addresses)| (path.to_owned(), addresses))
        .collect()
}

/// Resolves `paths` (see [`netns::resolve_with_addresses`]); blocking, so the control loop runs
/// it for polls on a thread of the blocking pool.
pub fn resolve(paths: &[(PathBuf, bool)]) -> Found {
    netns::resolve_with_addresses(
        paths
            .iter()
            .map(|(path, addresses)| (path.as_path(), *addresses)),
    )
}
