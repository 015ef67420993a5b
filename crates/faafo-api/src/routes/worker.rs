//! The worker protocol: lease (long poll), heartbeat, upload, fail, release.
//!
//! Every call needs the worker token; every call about a task needs the lease token,
//! and the store refuses it once the lease has moved on (409).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use faafo_core::fractal::RenderResult;
use faafo_core::wire::{
    ErrorBody, FailTask, FractalView, ImageTaken, LeaseGrant, LeaseHeld, LeaseRequest,
    upload_headers,
};
use faafo_core::{FractalSpec, FractalState, LeaseToken};
use faafo_store::{Lease, StoreError};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::parse_uuid;
use crate::{ApiError, AppState, Rendition, json};

/// Longest `error` text a worker may report.
const MAX_ERROR_CHARS: usize = 2000;

/// Checks the worker token, which workers and gateways (members of the deployment) hold.
pub(crate) fn authorize_member(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match presented {
        Some(token) if crate::reload::accepts(state, token.as_bytes()) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

/// Gives the caller one task, waiting up to `wait_ms` for one to appear. Answers 204 when
/// none appeared in time, and 503 when the server is draining, so that the worker's
/// client asks another instance.
#[utoipa::path(post, path = "/v1/worker/lease", tag = "worker protocol",
    summary = "Take a task (long poll)",
    request_body = LeaseRequest,
    security(("worker_token" = [])),
    responses(
        (status = 200, description = "A task and its lease", body = LeaseGrant),
        (status = 204, description = "No work within wait_ms"),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong worker token", body = ErrorBody),
        (status = 422, description = "A wrong field", body = ErrorBody),
        (status = 503, description = "Unavailable or draining; ask another instance", body = ErrorBody),
    ))]
pub async fn lease(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize_member(&state, &headers)?;
    let request: LeaseRequest = json::read_json(body).await?;
    ApiError::check_name("worker", &request.worker)?;
    let wait_ms = u64::try_from(request.wait_ms)
        .map_err(|_| ApiError::invalid("wait_ms", "wait_ms must be 0 or more"))?;
    let deadline =
        Instant::now() + Duration::from_millis(wait_ms).min(state.config().max_lease_wait);
    let _waiting = GaugeGuard::enter(&state.metrics.lease_waiters);
    loop {
        // Register for the wake-up before looking, so work created in between is not missed.
        let notified = state.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if state.shutdown.is_cancelled() {
            return Err(ApiError::Unavailable(
                "this instance is shutting down; ask another".into(),
            ));
        }
        let lease_duration = state.config().lease;
        let asking = state.granted.asking();
        if let Some(lease) = state.store.claim(&request.worker, lease_duration).await? {
            state.granted.granted(asking, &lease, lease_duration);
            state.metrics.leases_granted.inc();
            tracing::debug!(fractal.uuid = %lease.fractal.uuid, worker = %request.worker, attempt = lease.fractal.attempts, "lease granted");
            return Ok(Json(grant(&lease, lease_duration)).into_response());
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let nap = (deadline - now).min(state.config().poll_interval);
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(nap) => {}
            _ = state.shutdown.cancelled() => {}
        }
    }
}

/// Counts this request in a gauge for as long as it lives.
struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl<'a> GaugeGuard<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn grant(lease: &Lease, duration: Duration) -> LeaseGrant {
    let spec = &lease.fractal.spec;
    let window = spec.window();
    LeaseGrant {
        uuid: lease.fractal.uuid,
        lease_token: lease.token.0,
        lease_ms: duration.as_millis() as u64,
        attempt: lease.fractal.attempts,
        width: spec.width(),
        height: spec.height(),
        iterations: spec.iterations(),
        xa: window.xa,
        xb: window.xb,
        ya: window.ya,
        yb: window.yb,
        cx: spec.cx(),
        cy: spec.cy(),
    }
}

#[utoipa::path(post, path = "/v1/worker/tasks/{uuid}/heartbeat", tag = "worker protocol",
    summary = "Renew a lease",
    params(("uuid" = Uuid, Path, description = "The task's fractal")),
    request_body = LeaseHeld,
    security(("worker_token" = [])),
    responses(
        (status = 200, description = "Renewed, for this long", body = Object, example = json!({"lease_ms": 10000})),
        (status = 400, description = "Not JSON, or not a uuid", body = ErrorBody),
        (status = 401, description = "Missing or wrong worker token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "The lease is no longer held by this token", body = ErrorBody),
        (status = 422, description = "A wrong field", body = ErrorBody),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn heartbeat(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize_member(&state, &headers)?;
    let uuid = parse_uuid(&uuid)?;
    let held: LeaseHeld = json::read_json(body).await?;
    let (token, lease) = (LeaseToken(held.lease_token), state.config().lease);
    let asking = state.granted.asking();
    state.store.renew(uuid, token, lease).await?;
    state.granted.renewed(asking, uuid, token, lease);
    Ok(Json(json!({ "lease_ms": lease.as_millis() as u64 })))
}

#[utoipa::path(post, path = "/v1/worker/tasks/{uuid}/release", tag = "worker protocol",
    summary = "Give a task back unfinished",
    params(("uuid" = Uuid, Path, description = "The task's fractal")),
    request_body = LeaseHeld,
    security(("worker_token" = [])),
    responses(
        (status = 204, description = "Done"),
        (status = 400, description = "Not JSON, or not a uuid", body = ErrorBody),
        (status = 401, description = "Missing or wrong worker token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "The lease is no longer held by this token", body = ErrorBody),
        (status = 422, description = "A wrong field", body = ErrorBody),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn release(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    authorize_member(&state, &headers)?;
    let uuid = parse_uuid(&uuid)?;
    let held: LeaseHeld = json::read_json(body).await?;
    state.granted.forget(uuid);
    state
        .store
        .release(uuid, LeaseToken(held.lease_token))
        .await?;
    state.work.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/worker/tasks/{uuid}/fail", tag = "worker protocol",
    summary = "Report that a render cannot succeed",
    params(("uuid" = Uuid, Path, description = "The task's fractal")),
    request_body = FailTask,
    security(("worker_token" = [])),
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Not JSON, or not a uuid", body = ErrorBody),
        (status = 401, description = "Missing or wrong worker token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "The lease is no longer held by this token", body = ErrorBody),
        (status = 422, description = "A wrong field", body = ErrorBody),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn fail(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    authorize_member(&state, &headers)?;
    let uuid = parse_uuid(&uuid)?;
    let failure: FailTask = json::read_json(body).await?;
    let reason: String = failure.error.chars().take(MAX_ERROR_CHARS).collect();
    state.granted.forget(uuid);
    state
        .store
        .fail(uuid, LeaseToken(failure.lease_token), &reason)
        .await?;
    tracing::warn!(fractal.uuid = %uuid, reason = %reason, "worker reported a failed render");
    Ok(StatusCode::NO_CONTENT)
}

/// A PNG a worker sent for a task it holds: lease checked, body read and hashed.
struct ReceivedPng {
    token: LeaseToken,
    png: bytes::Bytes,
    checksum: String,
}

/// Checks the lease before reading a possibly large body (from memory for a lease
/// granted here, see [`crate::granted`]; else with the store), then checks that the body
/// is what the worker hashed, that it is a PNG and that it has the dimensions `expected`
/// gives for the fractal.
async fn receive_png(
    state: &AppState,
    uuid: Uuid,
    headers: &HeaderMap,
    body: Body,
    expected: impl FnOnce(&FractalSpec) -> Result<(u32, u32), ApiError>,
) -> Result<ReceivedPng, ApiError> {
    let token = header_text(headers, upload_headers::LEASE_TOKEN)?;
    let token = Uuid::parse_str(token).map(LeaseToken).map_err(|_| {
        ApiError::bad_request(format!("{} is not a UUID", upload_headers::LEASE_TOKEN))
    })?;
    let claimed_checksum = header_text(headers, upload_headers::CHECKSUM)?.to_ascii_lowercase();
    let remembered = state.granted.held_spec(uuid, token, Instant::now());
    state.metrics.record_lease_check(remembered.is_some());
    let spec = match remembered {
        Some(spec) => spec,
        None => state.store.leased(uuid, token).await?.spec,
    };
    let expected = expected(&spec)?;

    let png = json::read_body(body, state.config().max_upload_bytes).await?;
    let checksum = hex::encode(Sha256::digest(&png));
    if checksum != claimed_checksum {
        return Err(ApiError::invalid(
            upload_headers::CHECKSUM,
            format!(
                "the body hashes to {checksum}, not {claimed_checksum}: the upload was damaged, send it again"
            ),
        ));
    }
    match faafo_render::png_dimensions(&png) {
        Ok(dimensions) if dimensions == expected => Ok(ReceivedPng {
            token,
            png,
            checksum,
        }),
        Ok((w, h)) => Err(ApiError::invalid(
            "body",
            format!(
                "the PNG is {w}x{h}, it should be {}x{}",
                expected.0, expected.1
            ),
        )),
        Err(error) => Err(ApiError::invalid(
            "body",
            format!("the body is not a PNG: {error}"),
        )),
    }
}

fn header_text<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, ApiError> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| ApiError::BadRequest {
            message: format!("missing or non-text header {name}"),
            field: Some(name.into()),
        })
}

fn store_unavailable(error: crate::ImagesError) -> ApiError {
    ApiError::Unavailable(format!("could not store the image ({error}); retry"))
}

/// Takes the small preview of a task's image (see `JuliaParams::preview`). Workers send
/// it before the image, whose upload ends the lease. Storing it twice is harmless.
#[utoipa::path(put, path = "/v1/worker/tasks/{uuid}/preview", tag = "worker protocol",
    summary = "Deliver the preview (before the image)",
    params(
        ("uuid" = Uuid, Path, description = "The task's fractal"),
        ("faafo-lease-token" = Uuid, Header, description = "The lease's token"),
        ("faafo-checksum" = String, Header, pattern = "^[0-9a-f]{64}$", description = "Lower-case hex SHA-256 of the body"),
    ),
    request_body(content = Vec<u8>, content_type = "image/png"),
    security(("worker_token" = [])),
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "A missing or bad header, or not a uuid", body = ErrorBody),
        (status = 401, description = "Missing or wrong worker token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "The lease is no longer held by this token", body = ErrorBody),
        (status = 413, description = "Larger than the upload limit", body = ErrorBody),
        (status = 422, description = "The checksum does not match, or not a PNG of the right size", body = ErrorBody),
        (status = 503, description = "The store or the object store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn upload_preview(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    authorize_member(&state, &headers)?;
    let uuid = parse_uuid(&uuid)?;
    let received = receive_png(&state, uuid, &headers, body, |spec| {
        let (width, height) = (spec.width(), spec.height());
        spec.render_params()
            .preview()
            .map(|preview| (preview.width, preview.height))
            .ok_or_else(|| {
                ApiError::invalid(
                    "body",
                    format!("the fractal is {width}x{height}: it is its own preview"),
                )
            })
    })
    .await?;
    state
        .images
        .put(uuid, Rendition::Preview, received.png)
        .await
        .map_err(store_unavailable)?;
    // Deleted meanwhile: do not leave the preview behind.
    if let Err(StoreError::NotFound(_)) = state.store.leased(uuid, received.token).await {
        let _ = state.images.delete(uuid).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Takes a finished PNG: checks the lease, the checksum and the image size, stores the
/// image, then marks the fractal done. Storing the same image twice is harmless: a
/// fractal's PNG is a pure function of its record.
#[utoipa::path(put, path = "/v1/worker/tasks/{uuid}/image", tag = "worker protocol",
    summary = "Deliver the image; the fractal is done",
    params(
        ("uuid" = Uuid, Path, description = "The task's fractal"),
        ("faafo-lease-token" = Uuid, Header, description = "The lease's token"),
        ("faafo-checksum" = String, Header, pattern = "^[0-9a-f]{64}$", description = "Lower-case hex SHA-256 of the body"),
        ("faafo-duration" = f64, Header, minimum = 0.0, description = "Seconds the render took"),
        ("faafo-generated-by" = String, Header, description = "The worker's name"),
        ("faafo-take-next" = Option<String>, Header, nullable = false, pattern = "^1$", description = "`1`: lease this worker's next task in the same request, if one is queued (it comes as `next_task`)"),
    ),
    request_body(content = Vec<u8>, content_type = "image/png"),
    security(("worker_token" = [])),
    responses(
        (status = 200, description = "Stored; the fractal is done", body = ImageTaken),
        (status = 400, description = "A missing or bad header, or not a uuid", body = ErrorBody),
        (status = 401, description = "Missing or wrong worker token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "The lease is no longer held by this token", body = ErrorBody),
        (status = 413, description = "Larger than the upload limit", body = ErrorBody),
        (status = 422, description = "The checksum does not match, or not a PNG of the right size", body = ErrorBody),
        (status = 503, description = "The store or the object store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn upload(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize_member(&state, &headers)?;
    let uuid = parse_uuid(&uuid)?;
    let duration: f64 = header_text(&headers, upload_headers::DURATION)?
        .parse()
        .ok()
        .filter(|d: &f64| d.is_finite() && *d >= 0.0)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{} must be a number of seconds",
                upload_headers::DURATION
            ))
        })?;
    let generated_by = header_text(&headers, upload_headers::GENERATED_BY)?.to_owned();
    let take_next = match headers.get(upload_headers::TAKE_NEXT) {
        None => false,
        Some(value) if value == "1" => true,
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "{} must be 1 when present",
                upload_headers::TAKE_NEXT
            )));
        }
    };
    let ReceivedPng {
        token,
        png,
        checksum,
    } = receive_png(&state, uuid, &headers, body, |spec| {
        Ok((spec.width(), spec.height()))
    })
    .await?;

    let size = png.len() as u64;
    state
        .images
        .put(uuid, Rendition::Full, png)
        .await
        .map_err(store_unavailable)?;
    let result = RenderResult {
        checksum,
        size,
        duration,
        generated_by: generated_by.clone(),
    };
    // The next task, if asked for, is leased in the completion's own transaction; none
    // while draining or for a worker name a lease request would refuse.
    let lease_duration = state.config().lease;
    let next = (take_next
        && !state.shutdown.is_cancelled()
        && ApiError::check_name("worker", &generated_by).is_ok())
    .then_some((generated_by.as_str(), lease_duration));
    let asking = state.granted.asking();
    let completed = state
        .store
        .complete_and_claim(uuid, token, result, next)
        .await;
    state.granted.forget(uuid);
    match completed {
        Ok((done, next)) => {
            state
                .metrics
                .render_seconds
                .with_label_values(&[&generated_by])
                .observe(duration);
            tracing::info!(fractal.uuid = %uuid, worker = %generated_by, duration_s = duration, size_bytes = size, "fractal done");
            let next_task = next.map(|lease| {
                state.granted.granted(asking, &lease, lease_duration);
                state.metrics.leases_granted.inc();
                tracing::debug!(fractal.uuid = %lease.fractal.uuid, worker = %generated_by, attempt = lease.fractal.attempts, "lease granted with an upload");
                grant(&lease, lease_duration)
            });
            Ok(Json(ImageTaken {
                fractal: FractalView::new(&done),
                next_task,
            })
            .into_response())
        }
        Err(StoreError::NotFound(_)) => {
            // Deleted while the image was being stored: do not leave the image behind.
            let _ = state.images.delete(uuid).await;
            Err(ApiError::NotFound(format!("fractal {uuid} was deleted")))
        }
        Err(
            error @ StoreError::LeaseLost {
                state: FractalState::Failed,
                ..
            },
        ) => {
            // It failed meanwhile (out of attempts) and will never show an image. Queued,
            // running or done fractals keep it: their image is these same bytes.
            let _ = state.images.delete(uuid).await;
            Err(error.into())
        }
        Err(error) => Err(error.into()),
    }
}
