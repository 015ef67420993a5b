//! Finished fractals kept in memory, ready to send.
//!
//! A done or failed fractal never changes again; it can only be deleted. So its JSON is
//! kept, stamped with the store's deletion count ([`Deletions`]) read before the
//! database was: a copy is served only while that count has not moved, which it does
//! on every delete made through this process and, within milliseconds, on every delete
//! made through another. Stores that cannot hear other processes' deletes get no
//! memory at all.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use faafo_core::Fractal;
use faafo_core::wire::FractalView;
use faafo_store::Deletions;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Copies kept at most: about 600 bytes each. Past it the memory starts over.
const MAX_KEPT: usize = 10_000;

/// A fractal's JSON and its entity tag.
#[derive(Debug, Clone)]
pub(crate) struct FractalJson {
    body: Bytes,
    etag: HeaderValue,
}

impl FractalJson {
    pub fn of(fractal: &Fractal) -> FractalJson {
        let body = serde_json::to_vec(&FractalView::new(fractal))
            .expect("a fractal view always serializes");
        // The body's own hash: equal bodies, equal tags, on every instance.
        let digest = Sha256::digest(&body);
        let etag = HeaderValue::try_from(format!("\"{}\"", hex::encode(&digest[..12])))
            .expect("hex is a valid header value");
        FractalJson {
            body: Bytes::from(body),
            etag,
        }
    }

    /// 304 when the client's `If-None-Match` names this version, else 200 and the JSON.
    pub fn respond(self, request: &HeaderMap) -> Response {
        let unchanged = request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|tag| tag.trim().trim_start_matches("W/"))
            .any(|tag| tag == "*" || tag.as_bytes() == self.etag.as_bytes());
        if unchanged {
            return (StatusCode::NOT_MODIFIED, [(header::ETAG, self.etag)]).into_response();
        }
        (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (header::ETAG, self.etag),
            ],
            Body::from(self.body),
        )
            .into_response()
    }
}

#[derive(Debug)]
pub(crate) struct FinishedFractals {
    deletions: Option<Arc<Deletions>>,
    kept: RwLock<Kept>,
}

/// Copies read while the deletion count was `count`.
#[derive(Debug, Default)]
struct Kept {
    count: u64,
    fractals: HashMap<Uuid, FractalJson>,
}

impl FinishedFractals {
    pub fn new(deletions: Option<Arc<Deletions>>) -> Self {
        FinishedFractals {
            deletions,
            kept: RwLock::new(Kept::default()),
        }
    }

    /// The kept copy of `uuid`, if one is still good.
    pub fn get(&self, uuid: Uuid) -> Option<FractalJson> {
        let count = self.deletions.as_ref()?.current()?;
        let kept = self.kept.read().unwrap_or_else(|p| p.into_inner());
        (kept.count == count)
            .then(|| kept.fractals.get(&uuid).cloned())
            .flatten()
    }

    /// The deletion count to stamp a copy with; read it before reading the database.
    pub fn stamp(&self) -> Option<u64> {
        self.deletions.as_ref()?.current()
    }

    /// Keeps `fractal`'s JSON if it is finished and was read under `stamp`.
    pub fn keep(&self, stamp: Option<u64>, fractal: &Fractal, json: &FractalJson) {
        let Some(stamp) = stamp else { return };
        if !fractal.state.is_finished() {
            return;
        }
        let mut kept = self.kept.write().unwrap_or_else(|p| p.into_inner());
        if stamp < kept.count {
            // Read before a deletion the memory already knows of: perhaps gone since.
            return;
        }
        if stamp > kept.count || kept.fractals.len() >= MAX_KEPT {
            kept.fractals.clear();
            kept.count = stamp;
        }
        kept.fractals.insert(fractal.uuid, json.clone());
    }
}
