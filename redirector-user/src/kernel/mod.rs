//! Everything that touches the kernel: prerequisites, program loading and attachment, the maps,
//! network-namespace cookies, and the process limits the router needs.
pub mod limits;
pub mod maps;
pub mod netns;
pub mod prereq;
pub mod programs;
