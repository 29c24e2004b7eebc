//! redirector's kernel programs: `cgroup/sock_addr` hooks that steer sandbox members' connections
//! to fork endpoints and hide the rewrite from the application.
//!
//! Every hook is a thin wrapper around the shared translation in [`xlate`]; only the wrapper
//! decides the verdict, and it always lets the syscall proceed (fail open): a lookup miss or a
//! map error leaves the destination as the application chose it.
#![no_std]
#![no_main]
// The reset iterator calls a kernel function through an inline `call` (see reset.rs).
#![feature(asm_experimental_arch)]

mod connect;
mod ctx;
mod getpeername;
mod maps;
mod recvmsg;
mod reset;
mod sendmsg;
mod sockops;
mod xlate;

/// `cgroup/sock_addr` verdict: let the syscall go on (with the possibly rewritten address).
pub(crate) const SYS_PROCEED: i32 = 1;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
