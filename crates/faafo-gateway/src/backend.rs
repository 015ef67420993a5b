//! One backend: its health, as the checker and the proxy see it, and its counters.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Whether a backend gets requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Up,
    Down,
}

#[derive(Debug)]
pub struct Backend {
    pub url: String,
    pub(crate) target: crate::upstream::Target,
    up: AtomicBool,
    outstanding: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    latency_micros: AtomicU64,
    checks_ok: AtomicU64,
    checks_failed: AtomicU64,
    good_in_row: AtomicU32,
    bad_in_row: AtomicU32,
    last_error: Mutex<Option<String>>,
    /// Stops this backend's health checks when it is removed.
    pub(crate) removed: CancellationToken,
}

/// A backend's figures, for `/__stats`.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStats {
    pub url: String,
    pub state: BackendState,
    pub outstanding: u64,
    pub requests: u64,
    pub errors: u64,
    pub mean_latency_ms: f64,
    pub checks_ok: u64,
    pub checks_failed: u64,
    pub last_error: Option<String>,
}

impl Backend {
    /// A new backend starts down and comes up at its first good check.
    pub(crate) fn new(url: String, target: crate::upstream::Target, rise: u32) -> Backend {
        Backend {
            url,
            target,
            up: AtomicBool::new(false),
            outstanding: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_micros: AtomicU64::new(0),
            checks_ok: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            good_in_row: AtomicU32::new(rise.saturating_sub(1)),
            bad_in_row: AtomicU32::new(0),
            last_error: Mutex::new(None),
            removed: CancellationToken::new(),
        }
    }

    pub fn state(&self) -> BackendState {
        if self.up.load(Ordering::Relaxed) {
            BackendState::Up
        } else {
            BackendState::Down
        }
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// A good `/readyz` answer.
    pub fn check_passed(&self, rise: u32) {
        self.checks_ok.fetch_add(1, Ordering::Relaxed);
        self.bad_in_row.store(0, Ordering::Relaxed);
        let good = self.good_in_row.fetch_add(1, Ordering::Relaxed) + 1;
        if good >= rise && !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!(backend = %self.url, "backend up");
        }
    }

    /// A failed check: down after `fall` in a row, or at once when `refused`.
    pub fn check_failed(&self, fall: u32, refused: bool, error: String) {
        self.checks_failed.fetch_add(1, Ordering::Relaxed);
        self.good_in_row.store(0, Ordering::Relaxed);
        let bad = self.bad_in_row.fetch_add(1, Ordering::Relaxed) + 1;
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
        if refused || bad >= fall {
            self.mark_down();
        }
    }

    /// Takes the backend out of rotation now (a refused connection).
    pub fn mark_down(&self) {
        self.good_in_row.store(0, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(backend = %self.url, "backend down");
        }
    }

    /// Counts a request in flight for as long as the guard lives.
    pub(crate) fn begin(&self) -> InFlight<'_> {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub(crate) fn finished(&self, latency: Duration, failed: bool) {
        self.latency_micros
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> BackendStats {
        let requests = self.requests.load(Ordering::Relaxed);
        BackendStats {
            url: self.url.clone(),
            state: self.state(),
            outstanding: self.outstanding(),
            requests,
            errors: self.errors.load(Ordering::Relaxed),
            mean_latency_ms: self.latency_micros.load(Ordering::Relaxed) as f64
                / 1e3
                / requests.max(1) as f64,
            checks_ok: self.checks_ok.load(Ordering::Relaxed),
            checks_failed: self.checks_failed.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// A request in flight on a backend.
pub(crate) struct InFlight<'a>(&'a Backend);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}
