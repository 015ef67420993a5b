//! `/v1/fractal`: the original faafo API, in flask-restless's shapes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use faafo_core::FractalSpec;
use faafo_core::wire::{CreateFractal, ErrorBody, FractalPage, FractalView};
use faafo_store::{CreateOutcome, ListCursor, ListOrder, ListStart, NewFractal};
use uuid::Uuid;

use super::parse_uuid;
use crate::finished::FractalJson;
use crate::{ApiError, AppState, json};

const DEFAULT_PER_PAGE: u64 = 10;
const MAX_PER_PAGE: u64 = 100;
/// When a client over its quota is told to try again: work frees up as renders finish.
const QUOTA_RETRY_AFTER_S: u64 = 5;

#[utoipa::path(get, path = "/v1/fractal", tag = "fractals",
    summary = "List fractals, oldest first",
    description = "By page number (`page`), as flask-restless does, or by cursor: `after` set to the `next` of the page before. A cursor costs the same however deep into the list it is, and fractals created or deleted meanwhile neither skip nor repeat any; a walk by page number reads every fractal it skips, and a deletion from an earlier page shifts the later pages by one.",
    params(
        ("page" = Option<u32>, Query, minimum = 1, description = "Page number, from 1"),
        ("after" = Option<String>, Query, description = "The page after the one whose `next` this is (not with `page`)"),
        ("results_per_page" = Option<u32>, Query, minimum = 1, description = "Page size (default 10; more than 100 counts as 100)"),
    ),
    responses(
        (status = 200, body = FractalPage),
        (status = 400, description = "A page parameter is not a whole number from 1 to 2147483647, `after` is not a page's `next`, or both `page` and `after` are given", body = ErrorBody),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut page = None;
    let mut after = None;
    let mut per_page = DEFAULT_PER_PAGE;
    for (key, value) in form_pairs(query.as_deref().unwrap_or("")) {
        let bad = |message: String| ApiError::BadRequest {
            message,
            field: Some(key.clone()),
        };
        let number = || {
            super::parse_page_number(&value).ok_or_else(|| {
                bad(format!(
                    "{key} must be a whole number from 1 to {}, got {value:?}",
                    super::MAX_PAGE_NUMBER
                ))
            })
        };
        match key.as_str() {
            "page" => page = Some(number()?),
            "after" => {
                let cursor: ListCursor = value.parse().map_err(|_| {
                    bad(format!(
                        "after must be the `next` of an earlier page, got {value:?}"
                    ))
                })?;
                after = Some(cursor);
            }
            // flask-restless caps the page size silently; so does this.
            "results_per_page" => per_page = number()?.min(MAX_PER_PAGE),
            // Other flask-restless parameters (such as `q`) are accepted and ignored.
            _ => {}
        }
    }
    let (start, page) = match (after, page) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest {
                message: "page and after each say where the page starts: give one".to_owned(),
                field: Some("after".to_owned()),
            });
        }
        (Some(cursor), None) => (ListStart::After(cursor), 0),
        (None, page) => {
            let page = page.unwrap_or(1);
            (ListStart::Offset((page - 1).saturating_mul(per_page)), page)
        }
    };
    let stamp = state.finished.stamp();
    let found = state
        .store
        .list(ListOrder::OldestFirst, start, per_page)
        .await?;
    let objects: Vec<FractalJson> = found
        .fractals
        .iter()
        .map(|fractal| state.finished.json_of(stamp, fractal))
        .collect();
    Ok(FractalJson::page(
        &objects,
        found.total,
        page,
        found.total.div_ceil(per_page),
        found.next,
    ))
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

#[utoipa::path(post, path = "/v1/fractal", tag = "fractals",
    summary = "Ask for a fractal",
    description = "Queues a render. Sending the same `uuid` again is safe: the same spec answers 200 with the existing fractal, another spec 409. A client is its API key, or its address; each has a create rate and a quota of unfinished work.",
    request_body = CreateFractal,
    security((), ("api_key" = [])),
    responses(
        (status = 201, description = "Queued", body = FractalView, headers(("Location" = String, description = "/v1/fractal/UUID"))),
        (status = 200, description = "A fractal with this uuid and spec already existed", body = FractalView),
        (status = 400, description = "Not JSON, or a bad Authorization header", body = ErrorBody),
        (status = 401, description = "An API key this service does not accept", body = ErrorBody),
        (status = 409, description = "The uuid exists with another spec", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 422, description = "A wrong, missing or unknown field, or a value past a limit", body = ErrorBody),
        (status = 429, description = "Past the client's create rate or queued-work quota (the message says which); nothing was stored", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let config = state.config();
    let policy = &config.clients;
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
    let spec = FractalSpec::parse(&request, &config.limits, seed)
        .map_err(|e| ApiError::invalid(e.field, e.to_string()))?;
    let outcome = state
        .store
        .create(NewFractal {
            uuid,
            spec,
            max_attempts: config.max_attempts,
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

#[utoipa::path(get, path = "/v1/fractal/{uuid}", tag = "fractals",
    summary = "One fractal",
    description = "Answers with an ETag; a request whose If-None-Match names it gets 304 and no body. A finished fractal is served from memory.",
    params(
        ("uuid" = Uuid, Path, description = "The fractal's uuid"),
        ("if-none-match" = Option<String>, Header, description = "ETags the client holds"),
    ),
    responses(
        (status = 200, body = FractalView, headers(("ETag" = String, description = "This version of the fractal"))),
        (status = 304, description = "The fractal is still the version If-None-Match named", headers(("ETag" = String))),
        (status = 400, description = "Not a uuid", body = ErrorBody),
        (status = 404, description = "No such fractal", body = ErrorBody),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn show(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let uuid = parse_uuid(&uuid)?;
    if let Some(json) = state.finished.get(uuid) {
        return Ok(json.respond(&headers));
    }
    let stamp = state.finished.stamp();
    let fractal = state
        .store
        .get(uuid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no fractal {uuid}")))?;
    Ok(state.finished.json_of(stamp, &fractal).respond(&headers))
}

#[utoipa::path(delete, path = "/v1/fractal/{uuid}", tag = "fractals",
    summary = "Delete a fractal and its images, cancelling its render",
    params(("uuid" = Uuid, Path, description = "The fractal's uuid")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not a uuid", body = ErrorBody),
        (status = 404, description = "No such fractal", body = ErrorBody),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
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
