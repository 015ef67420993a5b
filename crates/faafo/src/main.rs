//! The `faafo` binary: one executable, a subcommand per role.

mod bench;
mod bench_report;
mod cli;
mod client_cli;
mod config_file;
mod http_bench;
mod logging;
mod probe;
mod queue_bench;
mod render_bench;
mod render_cli;
mod roles;
mod tables;
mod tls;

fn main() -> std::process::ExitCode {
    let cli = config_file::parse();
    logging::init(cli.log_level());
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
