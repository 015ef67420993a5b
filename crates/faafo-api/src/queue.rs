//! Waking lease requests when work appears, and returning expired leases to the queue.

use std::sync::Arc;

use faafo_store::WorkHints;
use tokio::sync::Notify;

use crate::AppState;

/// An in-process hint that the queue may have work. Hints can be missed (work created
/// by another process sends none), so waiters also poll.
#[derive(Debug, Default)]
pub struct WorkSignal(Notify);

impl WorkSignal {
    /// Many tasks may be ready (a sweep, a restart of the listener): wake every waiter.
    pub fn notify(&self) {
        self.0.notify_waiters();
    }

    /// One task is ready: wake one waiter, or the next one to wait.
    pub fn notify_one(&self) {
        self.0.notify_one();
    }

    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.notified()
    }
}

/// Passes the store's cross-process wake-ups (PostgreSQL's announcements, SQLite's commit
/// watcher) on to waiting lease requests in this process: one waiter for each task the
/// store heard of. Tasks nobody heard of are found by polling.
pub async fn forward_store_hints(state: Arc<AppState>, hints: Arc<WorkHints>) {
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            tasks = hints.take() => for _ in 0..tasks {
                state.work.notify_one();
            },
        }
    }
}

/// Returns expired leases to the queue (or fails tasks out of attempts) every
/// `sweep_interval`, until shutdown. Lease expiry produces no event, so this polls.
pub async fn sweep_expired_leases(state: Arc<AppState>) {
    loop {
        // Read each time: a reload may change it.
        let interval = state.config().sweep_interval;
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        state.granted.forget_ended(std::time::Instant::now());
        match state.store.expire_leases().await {
            Ok(expired) => {
                let total = expired.requeued + expired.failed;
                if total > 0 {
                    state.metrics.lease_expiries.inc_by(total);
                    tracing::info!(
                        requeued = expired.requeued,
                        failed = expired.failed,
                        "expired leases swept"
                    );
                }
                if expired.requeued > 0 {
                    state.work.notify();
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, source = ?std::error::Error::source(&error), "sweeping expired leases failed")
            }
        }
    }
}
