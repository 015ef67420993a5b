//! Domain types of faafo, shared by every process: the validated fractal spec, the
//! stored record and its lifecycle, membership, and the JSON shapes of the HTTP API.
//! No I/O.

pub mod fractal;
pub mod node;
pub mod spec;
pub mod wire;

pub use fractal::{Fractal, FractalState, LeaseToken};
pub use node::{NodeBeat, NodeRole};
pub use spec::{FractalSpec, Limits, SpecError, Window};

/// Now, in milliseconds since the Unix epoch: how records and probe rounds are dated.
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The shared secret workers present to the API. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkerToken(String);

impl WorkerToken {
    pub fn new(token: impl Into<String>) -> Self {
        WorkerToken(token.into())
    }

    /// The token itself, for the one place that sends or compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for WorkerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerToken(***)")
    }
}

/// `error` and its sources, as one line ("outer: inner: innermost"), for logs and for
/// answers that carry a failure's whole story.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
