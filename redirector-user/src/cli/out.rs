//! The CLI's standard output. `print!` panics when stdout is gone, and it is gone in ordinary
//! use: `redirector status -o json | head` closes the pipe after ten lines. Writes go through
//! here instead and fail with [`StdoutError`], which `main` turns into a quiet exit, as ripgrep
//! and the traditional Unix tools (killed by SIGPIPE, which Rust ignores) do.
use std::{
    fmt::Display,
    io::{self, Write as _},
};

#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output")]
pub struct StdoutError(#[source] io::Error);

impl StdoutError {
    /// The reader went away (a closed pipe): nobody is left to tell, nothing went wrong.
    pub fn is_closed(&self) -> bool {
        self.0.kind() == io::ErrorKind::BrokenPipe
    }
}

/// Writes `text` to stdout as it is, flushed.
pub fn print(text: impl Display) -> Result<(), StdoutError> {
    let mut out = io::stdout().lock();
    write!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(StdoutError)
}

/// Writes `text` and a newline to stdout, flushed.
pub fn println(text: impl Display) -> Result<(), StdoutError> {
    print(format_args!("{text}\n"))
}
