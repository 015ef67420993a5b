//! Settings changed while the API runs (SIGHUP): the binary re-reads its configuration
//! and sends it here; what may change at run time is applied at once, the rest is named
//! as needing a restart, and a configuration that could not be read changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use faafo_core::WorkerToken;
use tokio::sync::watch;

use crate::{ApiConfig, AppState};

/// How long workers may keep presenting the worker token a reload replaced, so that they
/// can be given the new one without failing in between.
pub const ROTATION_GRACE: Duration = Duration::from_secs(15 * 60);

/// A configuration read again: the new settings, or why there are none.
pub type Reread = Result<ApiConfig, String>;

/// Applies each configuration sent on `updates` until shutdown.
pub(crate) async fn follow(state: Arc<AppState>, mut updates: watch::Receiver<Reread>) {
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            changed = updates.changed() => if changed.is_err() { return },
        }
        let reread = updates.borrow_and_update().clone();
        match reread {
            Ok(config) => {
                let changes = apply(&state, config);
                state.metrics.record_reload(true);
                if changes.is_empty() {
                    tracing::info!("configuration reloaded: nothing changed");
                } else {
                    tracing::info!(changes = %changes.join("; "), "configuration reloaded");
                }
            }
            Err(error) => {
                state.metrics.record_reload(false);
                tracing::error!(%error, "configuration not reloaded: nothing changed");
            }
        }
    }
}

/// Swaps in `new` and says what changed. A replaced worker token stays accepted for
/// [`ROTATION_GRACE`]; a changed create rate waits for a restart (its buckets are counted
/// from the start).
fn apply(state: &AppState, mut new: ApiConfig) -> Vec<String> {
    let old = state.config();
    let mut changes = Vec::new();
    let mut changed = |what: &str, from: String, to: String| {
        if from != to {
            changes.push(format!("{what} {from} -> {to}"));
        }
    };
    changed(
        "lease",
        format!("{:?}", old.lease),
        format!("{:?}", new.lease),
    );
    changed(
        "max-attempts",
        old.max_attempts.to_string(),
        new.max_attempts.to_string(),
    );
    changed(
        "limits",
        format!("{:?}", old.limits),
        format!("{:?}", new.limits),
    );
    changed(
        "sweep-interval",
        format!("{:?}", old.sweep_interval),
        format!("{:?}", new.sweep_interval),
    );
    changed(
        "max-lease-wait",
        format!("{:?}", old.max_lease_wait),
        format!("{:?}", new.max_lease_wait),
    );
    changed(
        "max-queued-work",
        format!("{:?}", old.clients.max_queued_work),
        format!("{:?}", new.clients.max_queued_work),
    );
    changed(
        "api-keys",
        format!("{} key(s)", old.clients.api_keys.len()),
        format!("{} key(s)", new.clients.api_keys.len()),
    );
    changed(
        "trusted-proxies",
        format!("{:?}", old.clients.trusted_proxies),
        format!("{:?}", new.clients.trusted_proxies),
    );
    changed(
        "storage-nodes",
        old.storage_nodes.join(","),
        new.storage_nodes.join(","),
    );
    if old.clients.create_rate != new.clients.create_rate {
        changes.push(format!(
            "create-rate needs a restart (stays {:?})",
            old.clients.create_rate
        ));
        new.clients.create_rate = old.clients.create_rate;
    }
    if old.worker_token.expose() != new.worker_token.expose() {
        let mut retired = state
            .retired_tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        retired.retain(|(_, until)| *until > Instant::now());
        retired.push((old.worker_token.clone(), Instant::now() + ROTATION_GRACE));
        changes.push(format!(
            "worker token rotated (the old one is accepted for {} more minutes)",
            ROTATION_GRACE.as_secs() / 60
        ));
    }
    // Where the instance listens and how it leaves are fixed at start.
    new.advertise_url = old.advertise_url.clone();
    new.drain_delay = old.drain_delay;
    *state.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    changes
}

/// Whether `presented` is the worker token, or one a reload replaced less than
/// [`ROTATION_GRACE`] ago.
pub(crate) fn accepts(state: &AppState, presented: &[u8]) -> bool {
    let current = state.config();
    if constant_time_eq(presented, current.worker_token.expose().as_bytes()) {
        return true;
    }
    let retired = state
        .retired_tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    retired
        .iter()
        .any(|(token, until): &(WorkerToken, Instant)| {
            *until > now && constant_time_eq(presented, token.expose().as_bytes())
        })
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
