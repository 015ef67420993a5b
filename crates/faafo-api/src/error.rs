//! Every error answer of the API, and the one place that maps errors to status codes.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use faafo_core::wire::ErrorBody;
use faafo_store::StoreError;

/// An error answer. User mistakes say what was wrong; server faults are logged here,
/// once, and answer with a generic message.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request cannot be read at all (not JSON, a bad header or path).
    #[error("{message}")]
    BadRequest {
        message: String,
        field: Option<String>,
    },
    /// The request is well-formed but its values are not acceptable.
    #[error("{message}")]
    Invalid {
        message: String,
        field: Option<String>,
    },
    #[error("missing or wrong worker token")]
    Unauthorized,
    #[error("the API key is not one this service accepts")]
    UnknownApiKey,
    /// A client went past one of its limits; `retry_after` says when to try again.
    #[error("{message}")]
    TooManyRequests { message: String, retry_after: u64 },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// A backing service is down; the client should retry, here or elsewhere.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            field: None,
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            message: message.into(),
            field: Some(field.into()),
        }
    }

    /// A name a member gives itself (a worker's, a probe's): 1 to 200 characters.
    pub fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
        if (1..=200).contains(&name.chars().count()) {
            Ok(())
        } else {
            Err(ApiError::invalid(
                field,
                format!("{field} name must be 1 to 200 characters"),
            ))
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized | ApiError::UnknownApiKey => StatusCode::UNAUTHORIZED,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(source) => {
                tracing::warn!(error = %source, "store unavailable");
                ApiError::Unavailable(format!(
                    "the store is unavailable ({source}); retry shortly"
                ))
            }
            StoreError::NotFound(uuid) => ApiError::NotFound(format!("no fractal {uuid}")),
            error @ StoreError::LeaseLost { .. } => ApiError::Conflict(error.to_string()),
            error @ (StoreError::Corrupt(_) | StoreError::InvalidUrl(_)) => {
                ApiError::Internal(Box::new(error))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (message, field) = match &self {
            ApiError::BadRequest { message, field } | ApiError::Invalid { message, field } => {
                (message.clone(), field.clone())
            }
            ApiError::Internal(source) => {
                tracing::error!(error = %source, source = ?source, "internal error");
                (
                    "internal error; the details are in the server log".to_owned(),
                    None,
                )
            }
            other => (other.to_string(), None),
        };
        let mut response = (status, Json(ErrorBody { message, field })).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::TooManyRequests { retry_after, .. } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
