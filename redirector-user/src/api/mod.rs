//! The local control API: JSON over HTTP on a Unix socket, used by the CLI and scripts.
pub mod answers;
pub mod client;
pub mod control;
pub mod server;
pub mod types;
