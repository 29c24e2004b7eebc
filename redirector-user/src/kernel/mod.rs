//! Everything that touches the kernel: prerequisites, program loading and attachment, the maps,
//! and network-namespace cookies.
pub mod maps;
pub mod netns;
pub mod prereq;
pub mod programs;
