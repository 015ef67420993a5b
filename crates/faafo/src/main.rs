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

/// jemalloc rather than glibc's malloc: the HTTP and database paths allocate and free
/// many small buffers across threads, where glibc's allocator took about 6% of the API's
/// CPU (see README, "Measuring"). mimalloc was measured too and dropped: the streamed
/// 9999x9999 render peaked at 35 MiB with it (10 with glibc, 14 with jemalloc).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
        // The reader of the output went away (`faafo list | head`): nothing to say, and the
        // status a shell gives a command that SIGPIPE stopped.
        Err(error) if is_broken_pipe(&error) => std::process::ExitCode::from(141),
        Err(error) => {
            eprintln!("faafo: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        let kind = match cause.downcast_ref::<serde_json::Error>() {
            Some(json) => json.io_error_kind(),
            None => cause.downcast_ref::<std::io::Error>().map(|io| io.kind()),
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}
