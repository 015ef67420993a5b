//! `/v1/fractal`: the original faafo API, in flask-restless's shapes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use faafo_core::FractalSpec;
use faafo_core::wire::{CreateFractal, FractalPage, FractalView};
use faafo_store::{CreateOutcome, ListOrder, NewFractal};
use uuid::Uuid;

use super::parse_uuid;
use crate::{ApiError, AppState, json};

const DEFAULT_PER_PAGE: u64 = 10;
const MAX_PER_PAGE: u64 = 100;
/// When a client over its quota is told to try again: work frees up as renders finish.
const QUOTA_RETRY_AFTER_S: u64 = 5;

pub async fn list(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<FractalPage>, ApiError> {
    let mut page = 1;
    let mut per_page = DEFAULT_PER_PAGE;
    for (key, value) in form_pairs(query.as_deref().unwrap_or("")) {
        let number = || {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| ApiError::BadRequest {
                    message: format!("{key} must be a whole number of at least 1, got {value:?}"),
                    field: Some(key.clone()),
                })
        };
        match key.as_str() {
            "page" => page = number()?,
            // flask-restless caps the page size silently; so does this.
            "results_per_page" => per_page = number()?.min(MAX_PER_PAGE),
            // Other flask-restless parameters (such as `q`) are accepted and ignored.
            _ => {}
        }
    }
    let offset = (page - 1).saturating_mul(per_page);
    let found = state
        .store
        .list(ListOrder::OldestFirst, offset, per_page)
        .await?;
    Ok(Json(FractalPage {
        num_results: found.total,
        objects: found.fractals.iter().map(FractalView::new).collect(),
        page,
        total_pages: found.total.div_ceil(per_page),
    }))
}

fn form_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key.to_owned(), value.to_owned())
        })
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let policy = &state.config.clients;
    let client = policy.identify(&headers, peer)?;
    if let Some(limiter) = &state.create_rate
        && let Err(wait) = limiter.take(&client)
    {
        state.metrics.record_limited("create_rate");
        return Err(ApiError::TooManyRequests {
            message: format!(
                "too many creates: this client may make {} a second (--create-rate); retry in {:.1} s",
                limiter.rate(),
                wait.as_secs_f64()
            ),
            retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
        });
    }
    let request: CreateFractal = json::read_json(body).await?;
    let uuid = request.uuid.unwrap_or_else(Uuid::new_v4);
    // The seed comes from the uuid, so a retried create chooses the same `c`.
    let seed = uuid.as_u64_pair().1;
    let spec = FractalSpec::parse(&request, &state.config.limits, seed)
        .map_err(|e| ApiError::invalid(e.field, e.to_string()))?;
    let outcome = state
        .store
        .create(NewFractal {
            uuid,
            spec,
            max_attempts: state.config.max_attempts,
            client,
            max_queued_work: policy.max_queued_work,
        })
        .await?;
    let (status, fractal) = match outcome {
        CreateOutcome::Created(fractal) => {
            state.work.notify_one();
            (StatusCode::CREATED, fractal)
        }
        CreateOutcome::Existing(fractal) if fractal.spec.matches_request(&request) => {
            (StatusCode::OK, fractal)
        }
        CreateOutcome::Existing(_) => {
            return Err(ApiError::Conflict(format!(
                "fractal {uuid} already exists with a different spec; use a new uuid for a new fractal"
            )));
        }
        CreateOutcome::OverQuota { queued_work } => {
            state.metrics.record_limited("max_queued_work");
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "too much queued work: this client's unfinished fractals add up to {queued_work:.3e} \
                     (width x height x iterations) and this one would take it past the limit of {:.3e} \
                     (--max-queued-work); retry when some are done",
                    policy.max_queued_work.unwrap_or_default()
                ),
                retry_after: QUOTA_RETRY_AFTER_S,
            });
        }
    };
    let location = format!("/v1/fractal/{uuid}");
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(FractalView::new(&fractal)),
    )
        .into_response())
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
) -> Result<Json<FractalView>, ApiError> {
    let uuid = parse_uuid(&uuid)?;
    let fractal = state
        .store
        .get(uuid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no fractal {uuid}")))?;
    Ok(Json(FractalView::new(&fractal)))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
) -> Result<StatusCode, ApiError> {
    let uuid = parse_uuid(&uuid)?;
    // The record goes first: an image without a record is garbage, a record without its
    // image would be a broken promise.
    state
        .store
        .delete(uuid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no fractal {uuid}")))?;
    if let Err(error) = state.images.delete(uuid).await {
        tracing::warn!(fractal.uuid = %uuid, error = %error, "deleted fractal left its image behind");
    }
    Ok(StatusCode::NO_CONTENT)
}
