//! Loading the kernel programs, attaching them to the cgroup, and pinning everything so that
//! steering survives the daemon.
//!
//! Layout under the pin directory (default `/sys/fs/bpf/redirector`):
//!
//! ```text
//! RDR_*_v2                              maps, pinned by name (reused on start: the state survives)
//! links/cg<INODE>/<IDENTITY>/<hook>     one bpf_link per hook, for the cgroup with that inode
//! ```
//!
//! `IDENTITY` names the programs: the map layout version and a hash of the eBPF object
//! (`v2-0123456789abcdef`). On start, a hook whose link is already pinned for the configured
//! cgroup *and this identity* is adopted, not attached again, so a restart (even after
//! `kill -9`) never leaves a window without steering and never stacks duplicate programs.
//!
//! A daemon of another build finds links of another identity: it attaches its own programs
//! beside them (cgroup links stack, so both run for a moment, the old ones first, and steer
//! alike) and retires the old ones only once its first sync has filled the maps, so there is no
//! instant where neither runs. Links pinned for another cgroup are left from an older config:
//! they are detached once the new ones are in place.
use std::{
    fs::{self, File},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, SockMap},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use redirector_common::{MAP_VERSION, RouterConfig, SockAddr, map_names};
use sha2::{Digest as _, Sha256};

use super::{
    kfunc,
    maps::{CounterReader, Maps},
    reset::{self, Resetter},
    tables::Tables,
};

/// The hooks, by program name (the function names in redirector-ebpf).
pub const HOOKS: [&str; 9] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
    SOCK_OPS,
];

/// The sock_ops program that completes hand-off records (see redirector-ebpf/src/sockops.rs).
const SOCK_OPS: &str = "handoff_sockops";

const LINKS_DIR: &str = "links";

/// The compiled kernel programs, built by build.rs.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot create pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open attach cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object failed")]
    Object(#[from] EbpfError),
    #[error("the eBPF object has no {kind} {name:?} (build mismatch)")]
    Missing { kind: &'static str, name: String },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open a second handle on map {name}")]
    Handle {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot pin link of {name} at {path}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("pinned link {path} is unusable")]
    BadPin {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
}

/// How the programs are loaded: settings baked into them as read-only data, so that the
/// verifier removes what they turn off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Count fast-path connections (`fast_path` in the kernel counters): one per-CPU map
    /// update on every connection to a destination nothing forks. Off by default.
    pub count_fast_path: bool,
    /// A node router is configured: attach the sock_ops program that completes hand-off
    /// records. Without a router nothing is handed off, and sock_ops would only run for
    /// nothing on every TCP connection of the cgroup, so it is not attached (and detached if
    /// an earlier daemon with a router left it).
    pub handoff: bool,
}

/// The hooks these options attach: all of them, but sock_ops only with a router.
pub fn hooks(options: LoadOptions) -> impl Iterator<Item = &'static str> {
    HOOKS
        .into_iter()
        .filter(move |hook| options.handoff || *hook != SOCK_OPS)
}

/// Identity of the kernel programs this daemon carries: the map layout version and the first
/// 64 bits of the eBPF object's SHA-256, e.g. `v2-0123456789abcdef`, with `-fpc` when the
/// fast path is counted (other programs, so a restart that changes it replaces them).
pub fn identity(options: LoadOptions) -> String {
    let digest = Sha256::digest(EBPF_OBJECT);
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let counted = if options.count_fast_path { "-fpc" } else { "" };
    format!("{MAP_VERSION}-{hash}{counted}")
}

/// What starting the kernel side did.
#[derive(Debug, Clone, Default)]
pub struct AttachReport {
    /// [`identity`] of the programs now attached.
    pub identity: String,
    pub adopted: Vec<&'static str>,
    pub attached: Vec<&'static str>,
    /// Link pins of other cgroups removed (their programs detached).
    pub detached: Vec<PathBuf>,
    /// Link pins of another build's programs on the same cgroup, still attached beside ours
    /// until [`retire`] removes them.
    pub superseded: Vec<PathBuf>,
}

/// The loaded kernel side: map handles, plus the object kept alive for as long as the daemon
/// runs.
pub struct Kernel {
    pub maps: Maps,
    /// Read off the control loop (`stats`, metrics scrapes), hence shared.
    pub counters: Arc<CounterReader>,
    /// The router's side of the hand-off: where each accepted connection was going. Taken by
    /// the router when there is one.
    pub orig_dst: Option<BpfHashMap<MapData, SockAddr, SockAddr>>,
    /// The LRU tables, for counting their evictions; taken by the daemon.
    pub tables: Option<Tables>,
    /// Where the router listens and its heartbeat; taken by the router.
    pub router: Option<Array<MapData, RouterConfig>>,
    /// The router's listening sockets; taken by the router.
    pub router_sockets: Option<SockMap<MapData>>,
    /// The object, when no reset iterator holds it (see [`start`]).
    _ebpf: Option<Ebpf>,
}

/// The reset iterator (`reset_on_change`), which holds the object, or why this kernel cannot
/// reset sockets.
pub type Resets = Result<Resetter, reset::Unavailable>;

/// Loads (or adopts) the programs and maps under `pin_dir` and makes sure every hook is
/// attached to `cgroup` exactly once. Returns the reset iterator apart, for the thread that
/// runs resets.
///
/// Needs Linux 5.7+ (`bpf_link` for cgroup hooks, `bpf_get_netns_cookie`).
pub fn start(
    cgroup: &Path,
    pin_dir: &Path,
    options: LoadOptions,
) -> Result<(Kernel, Resets, AttachReport), LoadError> {
    fs::create_dir_all(pin_dir).map_err(|source| LoadError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })?;
    let count_fast_path = u8::from(options.count_fast_path);
    // Socket storage is a BTF map, which has no pinning attribute: pinned by name explicitly,
    // so that a new build's programs see the sockets the old ones steered.
    let sock_state_pin = pin_dir.join(map_names::SOCK_STATE);
    // The reset iterator needs the kernel's socket-destroy function, called by BTF id, and the
    // layout of its socket structure; without them everything else still loads and runs.
    let sock_destroy = kfunc::SockDestroy::probe().and_then(|facts| {
        let object = kfunc::patch_sock_destroy(EBPF_OBJECT, facts.btf_id)?;
        Ok((facts.offsets, object))
    });
    let (offsets, object) = match &sock_destroy {
        Ok((offsets, object)) => (Some(*offsets), object.as_ref()),
        Err(_) => (None, EBPF_OBJECT),
    };
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(pin_dir)
        .map_pin_path(map_names::SOCK_STATE, sock_state_pin.as_path())
        .override_global("COUNT_FAST_PATH", &count_fast_path, true);
    if let Some(offsets) = &offsets {
        loader
            .override_global("SKC_DADDR_OFFSET", &offsets.daddr, true)
            .override_global("SKC_DPORT_OFFSET", &offsets.dport, true)
            .override_global("SKC_FAMILY_OFFSET", &offsets.family, true)
            .override_global("SKC_V6_DADDR_OFFSET", &offsets.v6_daddr, true);
    }
    let mut ebpf = loader.load(object)?;
    let (maps, counters) = take_maps(&mut ebpf)?;
    let orig_dst = take(&mut ebpf, map_names::ORIG_DST)?;
    let tables = Tables::new(
        &orig_dst,
        take(&mut ebpf, map_names::REVNAT)?,
        take(&mut ebpf, map_names::TABLE_STATS)?,
    )
    .map_err(|source| LoadError::Handle {
        name: map_names::ORIG_DST,
        source,
    })?;
    let router = take(&mut ebpf, map_names::ROUTER)?;
    let router_sockets = take(&mut ebpf, map_names::ROUTER_SOCKETS)?;
    let cgroup_file = File::open(cgroup).map_err(|source| LoadError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    let inode = cgroup_file
        .metadata()
        .map_err(|source| LoadError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?
        .ino();
    let links = pin_dir.join(LINKS_DIR);
    let our_cgroup = links.join(format!("cg{inode}"));
    let identity = identity(options);
    let our_links = our_cgroup.join(&identity);
    fs::create_dir_all(&our_links).map_err(|source| LoadError::PinDir {
        path: our_links.clone(),
        source,
    })?;

    let mut report = AttachReport {
        identity,
        ..AttachReport::default()
    };
    for name in HOOKS {
        let pin = our_links.join(name);
        if !hooks(options).any(|hook| hook == name) {
            if pin.exists() {
                // Unpinning the last reference detaches it.
                remove_pins(&pin);
                report.detached.push(pin);
            }
            continue;
        }
        if pin.exists() {
            PinnedLink::from_pin(&pin).map_err(|source| LoadError::BadPin {
                path: pin.clone(),
                source,
            })?;
            report.adopted.push(name);
            continue;
        }
        attach_and_pin(&mut ebpf, name, &cgroup_file, &pin)?;
        report.attached.push(name);
    }

    // Another build's links on this cgroup (other identities, or hook pins of the layout
    // before identities): ours now run beside them, and they go after the first sync.
    for entry in fs::read_dir(&our_cgroup).into_iter().flatten().flatten() {
        let path = entry.path();
        if path != our_links {
            report.superseded.push(path);
        }
    }
    // Links of a cgroup the config no longer names: unpinning the last reference detaches.
    for entry in fs::read_dir(&links).into_iter().flatten().flatten() {
        let path = entry.path();
        if path != our_cgroup {
            report.detached.push(path.clone());
            remove_pins(&path);
        }
    }

    let loaded = match sock_destroy {
        Ok(_) => Resetter::load(&mut ebpf),
        Err(err) => Err(err.into()),
    };
    let (resetter, ebpf) = match loaded {
        Ok(loaded) => (Ok(loaded.holding(ebpf)), None),
        Err(why) => (Err(why), Some(ebpf)),
    };
    Ok((
        Kernel {
            maps,
            counters: Arc::new(counters),
            orig_dst: Some(orig_dst),
            tables: Some(tables),
            router: Some(router),
            router_sockets: Some(router_sockets),
            _ebpf: ebpf,
        },
        resetter,
        report,
    ))
}

fn attach_and_pin(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    pin: &Path,
) -> Result<(), LoadError> {
    let program_error = |source| LoadError::Program { name, source };
    let program = ebpf.program_mut(name).ok_or_else(|| LoadError::Missing {
        kind: "program",
        name: name.to_owned(),
    })?;
    // `Single` means "no flags": the kernel refuses flags on bpf_link_create for cgroups, and a
    // link-based attachment coexists with other tools' programs on the same hooks anyway.
    let fd_link: Result<FdLink, _> = if name == SOCK_OPS {
        let program: &mut SockOps = program.try_into().map_err(program_error)?;
        program.load().map_err(program_error)?;
        let link_id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(program_error)?;
        FdLink::try_from(program.take_link(link_id).map_err(program_error)?)
    } else {
        let program: &mut CgroupSockAddr = program.try_into().map_err(program_error)?;
        program.load().map_err(program_error)?;
        let link_id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(program_error)?;
        FdLink::try_from(program.take_link(link_id).map_err(program_error)?)
    };
    let pin_error = |source: Box<dyn std::error::Error + Send + Sync>| LoadError::PinLink {
        name,
        path: pin.to_owned(),
        source,
    };
    fd_link
        .map_err(|e| pin_error(e.into()))?
        .pin(pin)
        .map_err(|e| pin_error(e.into()))?;
    Ok(())
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, LoadError> {
    let map = ebpf.take_map(name).ok_or_else(|| LoadError::Missing {
        kind: "map",
        name: name.to_owned(),
    })?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

fn take_maps(ebpf: &mut Ebpf) -> Result<(Maps, CounterReader), LoadError> {
    let maps = Maps {
        services: take::<BpfHashMap<MapData, _, _>>(ebpf, map_names::SERVICES)?,
        members: take::<BpfHashMap<MapData, _, _>>(ebpf, map_names::MEMBERS)?,
        routes: take::<BpfHashMap<MapData, _, _>>(ebpf, map_names::ROUTES)?,
        endpoints: take::<BpfHashMap<MapData, _, _>>(ebpf, map_names::ENDPOINTS)?,
        dst_filter: take::<Array<MapData, _>>(ebpf, map_names::DST_FILTER)?,
        route_stats: take::<PerCpuHashMap<MapData, _, _>>(ebpf, map_names::ROUTE_STATS)?,
    };
    let stats = take::<PerCpuArray<MapData, _>>(ebpf, map_names::STATS)?;
    let counters =
        CounterReader::new(stats, &maps.route_stats).map_err(|source| LoadError::Handle {
            name: map_names::ROUTE_STATS,
            source,
        })?;
    Ok((maps, counters))
}

/// Detaches the programs of another build that [`start`] left running beside ours (call it once
/// the maps hold the desired state), and removes maps pinned under another layout version,
/// which only those programs used.
pub fn retire(pin_dir: &Path, superseded: &[PathBuf]) {
    for path in superseded {
        remove_pins(path);
    }
    for entry in fs::read_dir(pin_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("RDR_") && !map_names::ALL.contains(&name.as_ref()) {
            remove_pins(&entry.path());
        }
    }
}

/// Removes a pin, or every pin under a directory and the directory itself; pins that are the
/// last reference detach their links and free their maps.
fn remove_pins(path: &Path) {
    let removed = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    if let Err(err) = removed
        && err.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %err, "cannot remove pins");
    }
}

/// Detaches every hook and removes every map pinned under `pin_dir`. Returns false if there was
/// nothing to remove.
pub fn uninstall(pin_dir: &Path) -> Result<bool, io::Error> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    // Links first: once they are gone nothing steers, then the maps can go.
    let links = pin_dir.join(LINKS_DIR);
    if links.exists() {
        fs::remove_dir_all(&links)?;
    }
    // Every layout's maps: a node upgraded from an older layout whose daemon never got to
    // retire them may still hold its pins.
    for entry in fs::read_dir(pin_dir)? {
        let entry = entry?;
        let ours = entry.file_name().to_string_lossy().starts_with("RDR_");
        if !ours {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => Ok(true),
        // Someone else's pins live there too: leave them.
        Err(err) if err.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(true),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The programs declare their maps by literal name (redirector-ebpf/src/maps.rs); the
    /// daemon opens them by `map_names`. A map renamed on one side only would fail at load.
    #[test]
    fn the_object_declares_every_map_under_its_versioned_name() {
        let contains = |needle: &str| {
            EBPF_OBJECT
                .windows(needle.len())
                .any(|window| window == needle.as_bytes())
        };
        for name in map_names::ALL {
            assert!(contains(name), "{name} is not in the eBPF object");
        }
        assert!(!contains("RDR_ROUTES_v1"), "a map of the previous layout");
        assert!(identity(LoadOptions::default()).starts_with(&format!("{MAP_VERSION}-")));
        let counted = identity(LoadOptions {
            count_fast_path: true,
            ..LoadOptions::default()
        });
        assert_ne!(counted, identity(LoadOptions::default()));
    }

    /// The programs clear and copy their structs with plain stores. The `memset` and `memcpy`
    /// the BPF target links in go one byte at a time: clearing one 44-byte `SockState` that way
    /// cost every steered connection 70-100 ns (see `remember` in redirector-ebpf/src/xlate.rs).
    #[test]
    fn no_program_calls_a_byte_at_a_time_memory_builtin() {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};
        const BUILTINS: [&str; 5] = ["memset", "memcpy", "memmove", "memcmp", "bcmp"];
        let elf = object::File::parse(EBPF_OBJECT).expect("the eBPF object is ELF");
        let mut calls = Vec::new();
        for section in elf.sections() {
            for (_, relocation) in section.relocations() {
                let RelocationTarget::Symbol(index) = relocation.target() else {
                    continue;
                };
                let name = elf.symbol_by_index(index).and_then(|s| s.name());
                if let Ok(name) = name
                    && BUILTINS.contains(&name)
                {
                    calls.push(format!("{} -> {name}", section.name().unwrap_or("?")));
                }
            }
        }
        assert!(calls.is_empty(), "{calls:?}");
    }
}
