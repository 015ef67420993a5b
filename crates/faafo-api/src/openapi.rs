//! The OpenAPI 3.1 description of the API (`GET /openapi.json`). Each handler carries its
//! own `#[utoipa::path]`, and the router is built from those same annotations
//! (`routes/mod.rs`), so a route cannot exist undescribed or be described elsewhere than
//! where it is served.

use std::sync::Arc;

use axum::Extension;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "faafo",
        description = "Fractals as a Service: Julia-set images rendered by a fleet of workers. The v1 fractal API keeps the shapes of the original faafo (flask-restless).",
    ),
    modifiers(&Credentials),
    tags(
        (name = "fractals", description = "The v1 fractal API"),
        (name = "images", description = "Rendered PNGs"),
        (name = "worker protocol", description = "How workers take, renew and deliver tasks (worker token)"),
        (name = "membership", description = "Which gateways, APIs and workers are alive"),
        (name = "health", description = "Liveness, readiness, metrics"),
        (name = "gallery", description = "The web gallery (HTML)"),
    )
)]
pub struct ApiDoc;

/// The two bearer credentials: a client's API key and the workers' shared token.
struct Credentials;

impl Modify for Credentials {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            (
                "api_key",
                "A client's API key: names the client for its limits and fair share",
            ),
            (
                "worker_token",
                "The secret shared by workers, gateways and API instances",
            ),
        ] {
            let mut scheme = Http::new(HttpAuthScheme::Bearer);
            scheme.description = Some(what.to_owned());
            components.add_security_scheme(name, SecurityScheme::Http(scheme));
        }
    }
}

/// The description as served, made once when the router is built.
#[derive(Debug, Clone)]
pub struct Description(pub Arc<str>);

#[utoipa::path(get, path = "/openapi.json", tag = "health",
    summary = "This description",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object)))]
pub async fn description(
    Extension(Description(json)): Extension<Description>,
) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        json.to_string(),
    )
}
