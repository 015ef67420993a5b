//! `GET /fractal/<uuid>` (the PNG itself) and `GET /fractal/<uuid>/preview` (its small
//! rendition), streamed from the object store. A done fractal's images never change, so
//! they are cacheable forever and revalidated by its checksum (`ETag`, `If-None-Match`
//! -> 304); the image is also served in byte ranges.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use faafo_core::wire::ErrorBody;
use faafo_core::{Fractal, FractalState};

use super::parse_uuid;
use crate::images::ImageStream;
use crate::{ApiError, AppState, ImagesError, Rendition};

#[utoipa::path(get, path = "/fractal/{uuid}", tag = "images",
    summary = "The fractal's PNG",
    params(
        ("uuid" = Uuid, Path, description = "The fractal's uuid"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag seen before"),
        ("Range" = Option<String>, Header, description = "bytes=START-END"),
    ),
    responses(
        (status = 200, description = "The PNG, cacheable forever", content_type = "image/png", body = Vec<u8>, headers(("ETag" = String))),
        (status = 206, description = "The range asked for", content_type = "image/png", body = Vec<u8>),
        (status = 304, description = "Not modified"),
        (status = 400, description = "Not a uuid", body = ErrorBody),
        (status = 404, description = "No such fractal, or not rendered yet (with Retry-After while it may still be)", body = ErrorBody),
        (status = 416, description = "The range is outside the image"),
        (status = 503, description = "The store or the object store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn download(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(&state, &uuid, &headers, Rendition::Full).await
}

/// `GET /fractal/<uuid>/preview`: the small rendition the gallery shows. An image no
/// larger than a preview is its own preview, and so is the image of a fractal rendered
/// before previews existed.
#[utoipa::path(get, path = "/fractal/{uuid}/preview", tag = "images",
    summary = "The fractal at most 512 pixels on its long side",
    params(
        ("uuid" = Uuid, Path, description = "The fractal's uuid"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag seen before"),
        ("Range" = Option<String>, Header, description = "bytes=START-END"),
    ),
    responses(
        (status = 200, description = "The PNG, cacheable forever", content_type = "image/png", body = Vec<u8>, headers(("ETag" = String))),
        (status = 206, description = "The range asked for", content_type = "image/png", body = Vec<u8>),
        (status = 304, description = "Not modified"),
        (status = 400, description = "Not a uuid", body = ErrorBody),
        (status = 404, description = "No such fractal, or not rendered yet (with Retry-After while it may still be)", body = ErrorBody),
        (status = 416, description = "The range is outside the image"),
        (status = 503, description = "The store or the object store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn preview(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(&state, &uuid, &headers, Rendition::Preview).await
}

async fn serve(
    state: &AppState,
    uuid: &str,
    headers: &HeaderMap,
    rendition: Rendition,
) -> Result<Response, ApiError> {
    let uuid = parse_uuid(uuid)?;
    let fractal = state
        .store
        .get(uuid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no fractal {uuid}")))?;
    let has_preview = fractal.spec.render_params().preview().is_some();
    let Some(result) = fractal
        .result
        .as_ref()
        .filter(|_| fractal.state == FractalState::Done)
    else {
        return Ok(not_rendered(&fractal));
    };
    if rendition == Rendition::Preview && has_preview {
        match state.images.stream(uuid, Rendition::Preview, None).await {
            // Previews are small: sent whole, byte ranges are not worth their keep.
            Ok(image) => {
                let etag = format!("\"{}-preview\"", result.checksum);
                return Ok(respond(headers, &etag, image, None));
            }
            Err(ImagesError::Missing(..)) => {}
            Err(error) => return Err(unavailable(error)),
        }
    }
    let etag = format!("\"{}\"", result.checksum);
    if if_none_match(headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, cache_headers(&etag)).into_response());
    }
    let wanted = match headers
        .get(header::RANGE)
        .map(|r| byte_range(r, result.size))
    {
        None | Some(RangeAsked::Ignored) => None,
        Some(RangeAsked::Satisfiable(range)) => Some(range),
        Some(RangeAsked::Unsatisfiable) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{}", result.size))],
            )
                .into_response());
        }
    };
    let image = state
        .images
        .stream(uuid, Rendition::Full, wanted.clone())
        .await
        .map_err(unavailable)?;
    let mut response = respond(headers, &etag, image, wanted);
    response
        .headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    Ok(response)
}

/// 404 for a fractal with no image (yet): not an error of the server.
fn not_rendered(fractal: &Fractal) -> Response {
    let uuid = fractal.uuid;
    let message = match fractal.state {
        FractalState::Failed => format!(
            "fractal {uuid} failed and has no image: {}",
            fractal.error.clone().unwrap_or_default()
        ),
        state => format!("fractal {uuid} is {state}; its image is not rendered yet"),
    };
    let mut response = (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            message,
            field: None,
        }),
    )
        .into_response();
    if !fractal.state.is_finished() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn unavailable(error: ImagesError) -> ApiError {
    match error {
        ImagesError::Unavailable(_) => {
            ApiError::Unavailable(format!("the object store is unavailable ({error})"))
        }
        other => ApiError::Internal(Box::new(other)),
    }
}

/// A fractal's images never change: each is a pure function of the record.
fn cache_headers(etag: &str) -> [(header::HeaderName, String); 2] {
    [
        (header::ETAG, etag.to_owned()),
        (
            header::CACHE_CONTROL,
            "public, max-age=31536000, immutable".to_owned(),
        ),
    ]
}

/// The image streamed (or `304` when the client has it): the bytes `wanted`, or all.
fn respond(
    headers: &HeaderMap,
    etag: &str,
    image: ImageStream,
    wanted: Option<std::ops::Range<u64>>,
) -> Response {
    if if_none_match(headers, etag) {
        return (StatusCode::NOT_MODIFIED, cache_headers(etag)).into_response();
    }
    let length = image.range.end - image.range.start;
    let mut response = (
        cache_headers(etag),
        [
            (header::CONTENT_TYPE, "image/png".to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        Body::from_stream(image.bytes),
    )
        .into_response();
    if wanted.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let content_range = format!(
            "bytes {}-{}/{}",
            image.range.start,
            image.range.end - 1,
            image.size
        );
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&content_range).expect("ASCII"),
        );
    }
    response
}

/// Whether `If-None-Match` names `etag` (or is `*`).
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*")
}

/// What a `Range` header asks of an image of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum RangeAsked {
    /// One range of bytes, `start..end`.
    Satisfiable(std::ops::Range<u64>),
    /// A range that starts past the end.
    Unsatisfiable,
    /// Not one byte range we serve (several ranges, another unit, garbage): the whole
    /// image is sent, as RFC 9110 allows.
    Ignored,
}

fn byte_range(header: &HeaderValue, size: u64) -> RangeAsked {
    let Some(spec) = header
        .to_str()
        .ok()
        .and_then(|h| h.trim().strip_prefix("bytes="))
    else {
        return RangeAsked::Ignored;
    };
    if spec.contains(',') {
        return RangeAsked::Ignored;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAsked::Ignored;
    };
    let number = |text: &str| text.trim().parse::<u64>().ok();
    let range = match (first.trim().is_empty(), number(first), number(last)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(suffix)) if suffix > 0 => size.saturating_sub(suffix)..size,
        (true, _, _) => return RangeAsked::Unsatisfiable,
        (false, Some(start), None) if last.trim().is_empty() => start..size,
        (false, Some(start), Some(end)) if end >= start => start..(end + 1).min(size),
        _ => return RangeAsked::Ignored,
    };
    if range.start >= size {
        return RangeAsked::Unsatisfiable;
    }
    RangeAsked::Satisfiable(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(text: &str) -> RangeAsked {
        byte_range(&HeaderValue::from_str(text).unwrap(), 1000)
    }

    #[test]
    fn ranges() {
        assert_eq!(asked("bytes=0-99"), RangeAsked::Satisfiable(0..100));
        assert_eq!(asked("bytes=900-"), RangeAsked::Satisfiable(900..1000));
        assert_eq!(asked("bytes=-100"), RangeAsked::Satisfiable(900..1000));
        assert_eq!(asked("bytes=-5000"), RangeAsked::Satisfiable(0..1000));
        assert_eq!(asked("bytes=990-5000"), RangeAsked::Satisfiable(990..1000));
        assert_eq!(asked("bytes=1000-"), RangeAsked::Unsatisfiable);
        assert_eq!(asked("bytes=-0"), RangeAsked::Unsatisfiable);
        assert_eq!(asked("bytes=5-1"), RangeAsked::Ignored);
        assert_eq!(asked("bytes=0-1,5-9"), RangeAsked::Ignored);
        assert_eq!(asked("items=0-1"), RangeAsked::Ignored);
        assert_eq!(asked("bytes=x-y"), RangeAsked::Ignored);
    }

    #[test]
    fn etags_match_with_or_without_weakness() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"a\", W/\"b\""),
        );
        assert!(if_none_match(&headers, "\"b\""));
        assert!(if_none_match(&headers, "\"a\""));
        assert!(!if_none_match(&headers, "\"c\""));
    }
}
