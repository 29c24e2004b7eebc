//! redirector: the node daemon, its node router, the control API and the CLI, as a library so
//! that the `redirector` binary, the end-to-end tests and tools share one set of typed messages
//! (the API types, the Kubernetes resources) instead of reading JSON by key.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod cli;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod doctor;
pub mod k8s;
pub mod kernel;
pub mod metrics;
pub mod router;
pub mod routing_key;
pub mod state;

/// An error and its sources on one line, each cause once: libraries (aya among them) often
/// repeat their source in their own message, so a cause already in the text is not added.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
