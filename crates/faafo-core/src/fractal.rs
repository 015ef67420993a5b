//! The stored fractal record and its task lifecycle.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::FractalSpec;

/// Where a fractal is in its lifecycle: `queued -> running -> done`, or `failed` after
/// an error or too many expired leases. Deleting a fractal removes it and cancels its task.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FractalState {
    Queued,
    Running,
    Done,
    Failed,
}

impl FractalState {
    pub const ALL: [FractalState; 4] = [
        FractalState::Queued,
        FractalState::Running,
        FractalState::Done,
        FractalState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FractalState::Queued => "queued",
            FractalState::Running => "running",
            FractalState::Done => "done",
            FractalState::Failed => "failed",
        }
    }

    /// Done and failed fractals never change again.
    pub fn is_finished(self) -> bool {
        matches!(self, FractalState::Done | FractalState::Failed)
    }
}

impl fmt::Display for FractalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text is not one of the four states.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unknown fractal state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for FractalState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FractalState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// Proof that a worker holds the lease of a task. Every write a worker makes carries it,
/// and the store refuses the write once the lease has passed to someone else (fencing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(pub Uuid);

impl LeaseToken {
    pub fn generate() -> Self {
        LeaseToken(Uuid::new_v4())
    }
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A fractal as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fractal {
    pub uuid: Uuid,
    pub spec: FractalSpec,
    pub state: FractalState,
    /// How many times a worker has been given this task.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Set once done.
    pub result: Option<RenderResult>,
    /// Why the fractal failed.
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

/// What a worker reports with a finished image.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderResult {
    /// Lower-case hex sha256 of the PNG.
    pub checksum: String,
    pub size: u64,
    /// Seconds the render took on the worker.
    pub duration: f64,
    pub generated_by: String,
}
