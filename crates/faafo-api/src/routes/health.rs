//! Liveness, readiness and metrics.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::AppState;

/// The process is alive and serving HTTP.
pub async fn alive() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

/// The process can do useful work: it is not shutting down and both the store and the
/// object store answer. Load balancers route only to ready instances.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.shutdown.is_cancelled() {
        let body =
            json!({ "status": "draining", "message": "shutting down; send requests elsewhere" });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let (store, images) = tokio::join!(state.store.ping(), state.images.probe());
    let describe = |result: Result<(), String>| match result {
        Ok(()) => "ok".to_owned(),
        Err(message) => message,
    };
    let healthy = store.is_ok() && images.is_ok();
    let body = json!({
        "status": if healthy { "ready" } else { "unavailable" },
        "store": describe(store.map_err(|e| error_chain(&e))),
        "object_store": describe(images.map_err(|e| error_chain(&e))),
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Prometheus text format. The queue gauges are read from the store at scrape time.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.store.stats().await {
        Ok(stats) => state.metrics.set_queue(&stats),
        Err(error) => tracing::warn!(error = %error, "queue statistics unavailable for /metrics"),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
