//! Reading request bodies with size limits and errors that name the field at fault.

use axum::body::Body;
use serde::de::DeserializeOwned;

use crate::ApiError;

/// Largest JSON body any endpoint takes.
pub const MAX_JSON_BYTES: usize = 64 * 1024;

/// Reads at most `limit` bytes of `body`.
pub async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let over_limit = std::error::Error::source(&error)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if over_limit {
            return ApiError::PayloadTooLarge { limit };
        }
        ApiError::bad_request(format!("could not read the request body: {error}"))
    })
}

/// Parses a JSON body into `T`: malformed JSON is a 400, a wrong, missing or unknown
/// field a 422 naming the field.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let field = (path != ".").then_some(path);
                let message = match &field {
                    Some(field) => format!("{field}: {inner}"),
                    None => inner.to_string(),
                };
                ApiError::Invalid { message, field }
            }
            _ => ApiError::bad_request(format!("request body is not valid JSON: {inner}")),
        }
    })
}

pub async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    parse(&read_body(body, MAX_JSON_BYTES).await?)
}

#[cfg(test)]
mod tests {
    use faafo_core::wire::CreateFractal;

    use super::*;

    fn error_of(body: &str) -> (u16, String, Option<String>) {
        match parse::<CreateFractal>(body.as_bytes()).unwrap_err() {
            e @ (ApiError::BadRequest { .. } | ApiError::Invalid { .. }) => {
                let status = e.status().as_u16();
                let (ApiError::BadRequest { message, field }
                | ApiError::Invalid { message, field }) = e
                else {
                    unreachable!()
                };
                (status, message, field)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wrong_type_names_the_field() {
        let (status, message, field) = error_of(
            r#"{"width": "abc", "height": 1, "iterations": 1, "xa": 0, "xb": 1, "ya": 0, "yb": 1}"#,
        );
        assert_eq!((status, field.as_deref()), (422, Some("width")));
        assert!(
            message.starts_with("width: invalid type: string \"abc\""),
            "{message}"
        );
    }

    #[test]
    fn negative_size_names_the_field() {
        let (status, _, field) = error_of(
            r#"{"width": -5, "height": 1, "iterations": 1, "xa": 0, "xb": 1, "ya": 0, "yb": 1}"#,
        );
        assert_eq!((status, field.as_deref()), (422, Some("width")));
    }

    #[test]
    fn missing_and_unknown_fields() {
        let (status, message, _) = error_of(r#"{"width": 5}"#);
        assert_eq!(status, 422);
        assert!(message.contains("missing field `height`"), "{message}");
        let (status, message, _) = error_of(
            r#"{"width": 5, "height": 1, "iterations": 1, "xa": 0, "xb": 1, "ya": 0, "yb": 1, "colour": "red"}"#,
        );
        assert_eq!(status, 422);
        assert!(message.contains("unknown field `colour`"), "{message}");
    }

    #[test]
    fn malformed_json_is_a_bad_request() {
        assert_eq!(error_of("{not json").0, 400);
        assert_eq!(error_of("").0, 400);
        // JSON has no NaN and no numbers this large.
        assert_eq!(
            error_of(r#"{"width": 5, "height": 1, "iterations": 1, "xa": 1e999, "xb": 1, "ya": 0, "yb": 1}"#).0,
            400
        );
    }
}
