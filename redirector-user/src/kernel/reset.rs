//! Resetting member sockets after a route change (`reset_on_change`): the daemon's side of the
//! reset iterator (redirector-ebpf/src/reset.rs).
//!
//! L4 steering decides at `connect()`, so a connection keeps the destination it was given for
//! as long as it lives. After a route with `reset_on_change` changes, the daemon writes the
//! changed routes to `RDR_RESETS` and runs the TCP iterator inside each member namespace of the
//! sandbox (a TCP iterator walks the namespace it is created in); the program destroys each
//! socket that the maps, as they are now, would send somewhere else, and reports it.
use std::{io::Read as _, path::PathBuf};

use aya::{
    Btf, Ebpf,
    maps::{HashMap as BpfHashMap, MapData, MapError},
    programs::{Iter, ProgramError},
};
use redirector_common::{ResetRequest, ServiceKey, SockAddr, map_names};

use super::netns::{self, NetnsError};

/// The iterator program's name in redirector-ebpf.
const PROGRAM: &str = "reset_tcp";

/// Why sockets cannot be reset on this node; said once at start.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error(transparent)]
    Kernel(#[from] super::kfunc::KfuncError),
    #[error("the reset iterator was refused: {0}")]
    Program(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("cannot write the reset requests")]
    Requests(#[source] MapError),
    #[error("cannot run the reset iterator")]
    Iterator(#[source] ProgramError),
}

/// The loaded reset iterator and its request map, with the object they belong to (the only
/// part of it used once the programs are attached), so that resets can run on a thread of
/// their own.
pub struct Resetter {
    ebpf: Ebpf,
    requests: BpfHashMap<MapData, ServiceKey, ResetRequest>,
}

/// One run in one namespace: the dialed address of every socket it reset.
pub type MemberResets = (PathBuf, Result<Vec<SockAddr>, NetnsError>);

/// The reset iterator loaded into its object, with its request map, until the object is
/// handed over with [`Loaded::holding`].
pub struct Loaded(BpfHashMap<MapData, ServiceKey, ResetRequest>);

impl Loaded {
    /// The resetter, owning `ebpf`: the object this was loaded into.
    pub fn holding(self, ebpf: Ebpf) -> Resetter {
        Resetter {
            ebpf,
            requests: self.0,
        }
    }
}

impl Resetter {
    /// Loads the iterator of an object whose socket-destroy call was patched in
    /// ([`super::kfunc::patch_sock_destroy`]).
    pub fn load(ebpf: &mut Ebpf) -> Result<Loaded, Unavailable> {
        let refused = |e: &dyn std::fmt::Display| Unavailable::Program(e.to_string());
        let btf = Btf::from_sys_fs().map_err(|e| refused(&e))?;
        let program: &mut Iter = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| refused(&"no such program (build mismatch)"))?
            .try_into()
            .map_err(|e| refused(&e))?;
        program
            .load("tcp", &btf)
            .map_err(|e| refused(&crate::error_chain(&e)))?;
        let requests = ebpf
            .take_map(map_names::RESETS)
            .ok_or_else(|| refused(&"no request map (build mismatch)"))?;
        let requests = BpfHashMap::try_from(requests).map_err(|e| refused(&e))?;
        Ok(Loaded(requests))
    }

    /// Resets, in each of `namespaces`, the TCP sockets of the services in `requests` (service
    /// as dialed -> which of its sockets) that the requests select.
    pub fn run(
        &mut self,
        requests: &[(ServiceKey, ResetRequest)],
        namespaces: &[PathBuf],
    ) -> Result<Vec<MemberResets>, ResetError> {
        self.clear();
        for (service, request) in requests {
            self.requests
                .insert(service, request, 0)
                .map_err(ResetError::Requests)?;
        }
        let program: &mut Iter = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(ResetError::Iterator(ProgramError::NotLoaded))?
            .try_into()
            .map_err(ResetError::Iterator)?;
        let inside = |path, source| NetnsError::Inside { path, source };
        let results = netns::run_in_each(namespaces, inside, |_, _| {
            // Each run is a fresh link and iterator: the iterator walks the namespace it is
            // created in, and reading it to the end runs the program over every socket.
            let link = program.attach().map_err(std::io::Error::other)?;
            let link = program.take_link(link).map_err(std::io::Error::other)?;
            let mut output = Vec::new();
            link.into_file()
                .map_err(std::io::Error::other)?
                .read_to_end(&mut output)?;
            Ok(decode(&output))
        });
        self.clear();
        Ok(results)
    }

    fn clear(&mut self) {
        let keys: Vec<ServiceKey> = self.requests.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = self.requests.remove(&key);
        }
    }
}

/// The iterator's output: one `SockAddr` per reset socket.
fn decode(output: &[u8]) -> Vec<SockAddr> {
    output
        .chunks_exact(size_of::<SockAddr>())
        .map(|record| {
            // SAFETY: `SockAddr` is plain `repr(C)` data valid for any bit pattern; the read
            // is unaligned-safe.
            unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<SockAddr>()) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_records_decode_to_dialed_addresses() {
        let one = SockAddr {
            addr: [0x0a00_0001, 0, 0, 0],
            port: 80u16.to_be(),
            family: redirector_common::FAMILY_V4,
            _pad: 0,
        };
        // SAFETY: plain data viewed as bytes for the test.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::addr_of!(one).cast::<u8>(), size_of::<SockAddr>())
        };
        let output = [bytes, bytes, &bytes[..3]].concat();
        assert_eq!(decode(&output), [one, one], "a torn record is ignored");
        assert!(decode(&[]).is_empty());
    }
}
