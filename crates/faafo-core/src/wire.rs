//! JSON shapes of the HTTP API, shared by the server and the client library.
//!
//! The fractal shapes follow the original faafo API (flask-restless), with faafo's own
//! fields added; the worker protocol is faafo's own.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Fractal, FractalState};

/// `POST /v1/fractal`: the original's body, plus an optional `c`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFractal {
    /// Chosen by the client so that a retried create cannot make a second fractal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
    /// Pixels; at most 10000 by default (`--max-width`).
    #[schema(minimum = 1, maximum = 10000)]
    pub width: u32,
    /// Pixels; at most 10000 by default (`--max-height`).
    #[schema(minimum = 1, maximum = 10000)]
    pub height: u32,
    /// At most 100000 by default (`--max-iterations`); width x height x iterations at
    /// most 5e11 (`--max-work`).
    #[schema(minimum = 1, maximum = 100000)]
    pub iterations: u32,
    /// The window in the complex plane: finite, `xa != xb`, `ya != yb`.
    pub xa: f64,
    pub xb: f64,
    pub ya: f64,
    pub yb: f64,
    /// `c`, chosen by the server (from the uuid) unless given; both or neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cx: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cy: Option<f64>,
}

/// A fractal as `GET /v1/fractal/<uuid>` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FractalView {
    pub uuid: Uuid,
    pub width: u32,
    pub height: u32,
    pub iterations: u32,
    pub xa: f64,
    pub xb: f64,
    pub ya: f64,
    pub yb: f64,
    pub checksum: Option<String>,
    pub size: Option<u64>,
    /// Seconds.
    pub duration: Option<f64>,
    pub generated_by: Option<String>,
    /// Where the image is, once it exists.
    pub url: Option<String>,
    pub cx: f64,
    pub cy: f64,
    pub state: FractalState,
    pub attempts: u32,
    /// RFC 3339.
    pub created_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
}

impl FractalView {
    pub fn new(fractal: &Fractal) -> FractalView {
        let spec = &fractal.spec;
        let window = spec.window();
        let result = fractal.result.as_ref();
        FractalView {
            uuid: fractal.uuid,
            width: spec.width(),
            height: spec.height(),
            iterations: spec.iterations(),
            xa: window.xa,
            xb: window.xb,
            ya: window.ya,
            yb: window.yb,
            checksum: result.map(|r| r.checksum.clone()),
            size: result.map(|r| r.size),
            duration: result.map(|r| r.duration),
            generated_by: result.map(|r| r.generated_by.clone()),
            url: result.map(|_| image_path(fractal.uuid)),
            cx: spec.cx(),
            cy: spec.cy(),
            state: fractal.state,
            attempts: fractal.attempts,
            created_at: rfc3339(fractal.created_at_ms),
            finished_at: fractal.finished_at_ms.map(rfc3339),
            error: fractal.error.clone(),
        }
    }
}

/// Where the PNG of a fractal is served.
pub fn image_path(uuid: Uuid) -> String {
    format!("/fractal/{uuid}")
}

/// Where its preview is served: at most 512 pixels on the long side, or the image
/// itself when that is no larger.
pub fn preview_path(uuid: Uuid) -> String {
    format!("/fractal/{uuid}/preview")
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// `GET /v1/fractal`: one page, in flask-restless's shape, and a cursor to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FractalPage {
    pub num_results: u64,
    pub objects: Vec<FractalView>,
    /// The page number asked for; 0 for a page asked for by cursor (`after`).
    pub page: u64,
    pub total_pages: u64,
    /// The page after this one starts after this cursor (`?after=`); null when this page
    /// ends the list. Missing from the answers of releases before cursors.
    #[serde(default)]
    pub next: Option<String>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub message: String,
    /// The request field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `POST /v1/worker/lease`: a worker asks for one task it can start now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// The worker's name, recorded as `generated_by`.
    #[schema(min_length = 1, max_length = 200)]
    pub worker: String,
    /// How long the server may hold the request open waiting for work (long poll); it
    /// holds it at most its `--max-lease-wait-ms` (30 s by default), whatever is asked.
    #[schema(minimum = 0)]
    pub wait_ms: i64,
}

/// A task given to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseGrant {
    pub uuid: Uuid,
    pub lease_token: Uuid,
    /// The lease lapses this long after it was granted or last renewed.
    pub lease_ms: u64,
    pub attempt: u32,
    pub width: u32,
    pub height: u32,
    pub iterations: u32,
    pub xa: f64,
    pub xb: f64,
    pub ya: f64,
    pub yb: f64,
    pub cx: f64,
    pub cy: f64,
}

impl LeaseGrant {
    /// What the worker is to render.
    pub fn render_params(&self) -> faafo_render::JuliaParams {
        faafo_render::JuliaParams {
            width: self.width,
            height: self.height,
            iterations: self.iterations,
            xa: self.xa,
            xb: self.xb,
            ya: self.ya,
            yb: self.yb,
            cx: self.cx,
            cy: self.cy,
        }
    }
}

/// The answer to `PUT /v1/worker/tasks/<uuid>/image`: the fractal, now done, and with
/// `faafo-take-next: 1`, the worker's next task when one was queued, so that a busy
/// worker asks once per task instead of twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageTaken {
    #[serde(flatten)]
    pub fractal: FractalView,
    /// Leased to the uploading worker (its `faafo-generated-by`) as the upload ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_task: Option<LeaseGrant>,
}

/// `POST /v1/worker/tasks/<uuid>/heartbeat` and `/release`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseHeld {
    pub lease_token: Uuid,
}

/// `POST /v1/worker/tasks/<uuid>/fail`: the render cannot succeed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailTask {
    pub lease_token: Uuid,
    pub error: String,
}

/// Headers of `PUT /v1/worker/tasks/<uuid>/image`, whose body is the PNG.
pub mod upload_headers {
    pub const LEASE_TOKEN: &str = "faafo-lease-token";
    /// Lower-case hex sha256 of the body; the server recomputes and compares it.
    pub const CHECKSUM: &str = "faafo-checksum";
    /// Seconds the render took, as a decimal number.
    pub const DURATION: &str = "faafo-duration";
    pub const GENERATED_BY: &str = "faafo-generated-by";
    /// `1`: lease the worker's next task in the same request, if one is queued.
    pub const TAKE_NEXT: &str = "faafo-take-next";
}
