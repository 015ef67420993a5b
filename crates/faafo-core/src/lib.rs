//! Domain types of faafo, shared by every process: the validated fractal spec, the
//! stored record and its lifecycle, and the JSON shapes of the HTTP API. No I/O.

pub mod fractal;
pub mod spec;
pub mod wire;

pub use fractal::{Fractal, FractalState, LeaseToken};
pub use spec::{FractalSpec, Limits, SpecError, Window};
