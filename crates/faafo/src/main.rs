//! The `faafo` binary: one executable, a subcommand per role.

mod bench;
mod cli;
mod client_cli;
mod config_file;
mod probe;
mod queue_bench;
mod render_bench;
mod render_cli;
mod roles;
mod tables;
mod tls;

fn main() -> std::process::ExitCode {
    let cli = config_file::parse();
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("faafo: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(cli.run());
    // The command is done: background tasks (a connection being closed, a timer) must not
    // hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("faafo: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, `info` and up unless `RUST_LOG` says otherwise. The certificate
/// verifier's own log is left out: a refused certificate is reported once, as an error of
/// the call, with what to do about it.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rustls_platform_verifier=off")
    });
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
}
