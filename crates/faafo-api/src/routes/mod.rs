//! The HTTP routes.

mod fractals;
mod gallery;
pub(crate) mod health;
mod image;
mod status;
mod worker;

use std::sync::Arc;

use axum::{Extension, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::openapi::{self, ApiDoc};
use crate::{ApiError, AppState, membership};

pub(crate) use worker::authorize_member;

pub fn router(state: Arc<AppState>) -> Router {
    // Every route from its handler's annotation: the description is made as the routes are.
    let (routes, description) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(fractals::list, fractals::create))
        .routes(routes!(fractals::show, fractals::delete))
        .routes(routes!(image::download))
        .routes(routes!(image::preview))
        .routes(routes!(worker::lease))
        .routes(routes!(worker::heartbeat))
        .routes(routes!(worker::release))
        .routes(routes!(worker::fail))
        .routes(routes!(worker::upload))
        .routes(routes!(worker::upload_preview))
        .routes(routes!(membership::status))
        .routes(routes!(membership::heartbeat))
        .routes(routes!(membership::leave))
        .routes(routes!(membership::endpoints))
        .routes(routes!(gallery::first_page))
        .routes(routes!(gallery::page))
        .routes(routes!(gallery::page_signature))
        .routes(routes!(gallery::detail))
        .routes(routes!(gallery::detail_signature))
        .routes(routes!(gallery::stylesheet))
        .routes(routes!(gallery::script))
        .routes(routes!(status::page))
        .routes(routes!(status::report))
        .routes(routes!(health::alive))
        .routes(routes!(health::ready))
        .routes(routes!(health::metrics))
        .routes(routes!(openapi::description))
        .split_for_parts();
    let description = description.to_json().expect("the description serializes");
    routes
        .fallback(not_found)
        .layer(Extension(openapi::Description(description.into())))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            crate::metrics::track_requests,
        ))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no such resource: {}", uri.path()))
}

/// The largest page number or page size: the description says int32, and flask-restless
/// clients never come near it.
pub(crate) const MAX_PAGE_NUMBER: u64 = i32::MAX as u64;

/// A page number or size: a whole number from 1 to [`MAX_PAGE_NUMBER`].
fn parse_page_number(text: &str) -> Option<u64> {
    text.parse::<u64>()
        .ok()
        .filter(|n| (1..=MAX_PAGE_NUMBER).contains(n))
}

/// A uuid from the path; anything else is the client's mistake.
fn parse_uuid(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not a valid UUID")))
}
