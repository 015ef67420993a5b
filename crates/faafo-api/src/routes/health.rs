//! Liveness, readiness and metrics.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use faafo_core::error_chain;
use serde_json::json;

use crate::AppState;

/// The process is alive and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "health",
    summary = "The process is alive",
    responses((status = 200, description = "Alive", body = Object)))]
pub async fn alive() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

/// The process can do useful work: it is not shutting down and both the store and the
/// object store answer. Load balancers route only to ready instances.
#[utoipa::path(get, path = "/readyz", tag = "health",
    summary = "Ready for traffic: the store and the object store answer, not draining",
    responses(
        (status = 200, description = "Ready", body = Object),
        (status = 503, description = "Not ready, with the reason", body = Object),
    ))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.shutdown.is_cancelled() {
        let body =
            json!({ "status": "draining", "message": "shutting down; send requests elsewhere" });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let store = state.store.ping().await;
    let images = state.object_store_health.borrow().clone();
    let describe = |result: Result<(), String>| match result {
        Ok(()) => "ok".to_owned(),
        Err(message) => message,
    };
    let healthy = store.is_ok() && images.is_ok();
    let body = json!({
        "status": if healthy { "ready" } else { "unavailable" },
        "store": describe(store.map_err(|e| error_chain(&e))),
        "object_store": describe(images),
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// How often the object store is probed for `/readyz`, and how long a probe may take.
const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Probes the object store every second and keeps the outcome for `/readyz`: a store
/// that answers slowly (a Swift cluster healing itself) does not make the health checks
/// of the load balancers time out, while one that fails or stops answering within 5 s is
/// reported within seconds.
pub async fn watch_object_store(state: Arc<AppState>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        let outcome = match tokio::time::timeout(PROBE_TIMEOUT, state.images.probe()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error_chain(&error)),
            Err(_) => Err(format!(
                "the object store did not answer within {PROBE_TIMEOUT:?}"
            )),
        };
        state.object_store_health.send_if_modified(|current| {
            let changed = *current != outcome;
            *current = outcome;
            changed
        });
    }
}

/// Prometheus text format. The queue gauges are read from the store at scrape time.
#[utoipa::path(get, path = "/metrics", tag = "health",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
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
