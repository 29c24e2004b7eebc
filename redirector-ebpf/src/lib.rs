#![no_std]
// The programs are in the `redirector` binary target (src/main.rs); this empty library target
// exists so that redirector-user can name this crate as a build-dependency, which makes cargo
// rebuild the daemon when the kernel side changes.
