//! `GET /fractal/<uuid>`: the PNG itself.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use faafo_core::FractalState;
use faafo_core::wire::ErrorBody;

use super::parse_uuid;
use crate::{ApiError, AppState, ImagesError};

pub async fn download(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
) -> Result<Response, ApiError> {
    let uuid = parse_uuid(&uuid)?;
    let fractal = state
        .store
        .get(uuid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no fractal {uuid}")))?;
    let Some(result) = fractal
        .result
        .filter(|_| fractal.state == FractalState::Done)
    else {
        // Not an error of the server: the image does not exist yet (or never will).
        let message = match fractal.state {
            FractalState::Failed => format!(
                "fractal {uuid} failed and has no image: {}",
                fractal.error.unwrap_or_default()
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
        return Ok(response);
    };
    let png = state.images.get(uuid).await.map_err(|error| match error {
        ImagesError::Unavailable(_) => {
            ApiError::Unavailable(format!("the object store is unavailable ({error})"))
        }
        other => ApiError::Internal(Box::new(other)),
    })?;
    let etag = format!("\"{}\"", result.checksum);
    Ok((
        [
            (header::CONTENT_TYPE, "image/png".to_owned()),
            (header::ETAG, etag),
            // A fractal's image never changes: it is a pure function of the record.
            (
                header::CACHE_CONTROL,
                "public, max-age=31536000, immutable".to_owned(),
            ),
        ],
        png,
    )
        .into_response())
}
