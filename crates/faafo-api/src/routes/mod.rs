//! The HTTP routes.

mod fractals;
mod gallery;
pub(crate) mod health;
mod image;
mod worker;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post, put};
use uuid::Uuid;

use crate::{ApiError, AppState, membership};

pub(crate) use worker::authorize_member;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/fractal", get(fractals::list).post(fractals::create))
        .route(
            "/v1/fractal/{uuid}",
            get(fractals::show).delete(fractals::delete),
        )
        .route("/fractal/{uuid}", get(image::download))
        .route("/fractal/{uuid}/preview", get(image::preview))
        .route("/v1/worker/lease", post(worker::lease))
        .route("/v1/worker/tasks/{uuid}/heartbeat", post(worker::heartbeat))
        .route("/v1/worker/tasks/{uuid}/release", post(worker::release))
        .route("/v1/worker/tasks/{uuid}/fail", post(worker::fail))
        .route("/v1/worker/tasks/{uuid}/image", put(worker::upload))
        .route(
            "/v1/worker/tasks/{uuid}/preview",
            put(worker::upload_preview),
        )
        .route("/v1/nodes", get(membership::status))
        .route("/v1/nodes/heartbeat", post(membership::heartbeat))
        .route("/v1/nodes/leave", post(membership::leave))
        .route("/v1/endpoints", get(membership::endpoints))
        .route("/", get(gallery::first_page))
        .route("/index/{page}", get(gallery::page))
        .route("/index/{page}/signature", get(gallery::page_signature))
        .route("/view/{uuid}", get(gallery::detail))
        .route("/view/{uuid}/signature", get(gallery::detail_signature))
        .route("/static/style.css", get(gallery::stylesheet))
        .route("/static/gallery.js", get(gallery::script))
        .route("/healthz", get(health::alive))
        .route("/readyz", get(health::ready))
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            crate::metrics::track_requests,
        ))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no such resource: {}", uri.path()))
}

/// A uuid from the path; anything else is the client's mistake.
fn parse_uuid(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not a valid UUID")))
}
