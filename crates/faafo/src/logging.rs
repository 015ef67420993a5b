//! Logs to stderr; a role's `--log-level` can change while it runs (SIGHUP).

use std::sync::OnceLock;

use anyhow::Context;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

type Handle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

static FILTER: OnceLock<Handle> = OnceLock::new();

/// `level`, else RUST_LOG, else `info`. The certificate verifier's own log is left out:
/// a refused certificate is reported once, as an error of the call, with what to do.
fn filter(level: Option<&str>) -> anyhow::Result<EnvFilter> {
    let directives = match level {
        Some(level) => level.to_owned(),
        None => std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
    };
    EnvFilter::try_new(format!("{directives},rustls_platform_verifier=off"))
        .with_context(|| format!("{directives:?} is not a log level or filter"))
}

/// Starts logging to stderr at `level` (a wrong one falls back to `info`, and says so).
pub fn init(level: Option<&str>) {
    let (chosen, problem) = match filter(level) {
        Ok(filter) => (filter, None),
        Err(error) => (filter(Some("info")).expect("info is a level"), Some(error)),
    };
    let (layer, handle) = reload::Layer::new(chosen);
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour),
        )
        .init();
    let _ = FILTER.set(handle);
    if let Some(error) = problem {
        tracing::warn!("{error:#}; logging at info");
    }
}

/// Changes what is logged.
pub fn set_level(level: Option<&str>) -> anyhow::Result<()> {
    let filter = filter(level)?;
    let handle = FILTER.get().context("logging is not started")?;
    handle.reload(filter).context("changing the log level")
}
