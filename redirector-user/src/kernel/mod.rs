//! Everything that touches the kernel: prerequisites, program loading and attachment, the maps,
//! network-namespace cookies, resetting sockets after route changes, the process limits the
//! router needs, and the accounting of the LRU tables.
pub mod kfunc;
pub mod limits;
pub mod maps;
pub mod netns;
pub mod prereq;
pub mod programs;
pub mod reset;
pub mod tables;
