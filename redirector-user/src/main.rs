//! `redirector`: the node daemon and its command-line interface.
use std::io::IsTerminal as _;

use clap::Parser as _;
use redirector_user::{
    api,
    cli::{self, Cli, LogFormat},
};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("redirector: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::dispatch(cli.command)) {
        Ok(code) => code,
        Err(err)
            if err
                .downcast_ref::<cli::out::StdoutError>()
                .is_some_and(cli::out::StdoutError::is_closed) =>
        {
            // The reader of our output went away (`redirector status | head`): it has what it
            // wanted. Exit quietly and successfully, as ripgrep does (Rust ignores SIGPIPE, so
            // the write fails instead of killing us as it would a C tool).
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            // One place prints the whole error chain, once.
            eprintln!("redirector: {err:#}");
            if err
                .downcast_ref::<api::client::ClientError>()
                .is_some_and(|e| matches!(e, api::client::ClientError::Unreachable { .. }))
            {
                std::process::ExitCode::from(3)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: log collectors and tests read plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
