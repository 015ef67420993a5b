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
use faafo_store::{Deletions, ListCursor};
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

    /// A page of the list, in [`faafo_core::wire::FractalPage`]'s shape, framed around
    /// the fractals' JSON as it is.
    pub fn page(
        objects: &[FractalJson],
        num_results: u64,
        page: u64,
        total_pages: u64,
        next: Option<ListCursor>,
    ) -> Response {
        use std::io::Write;
        let size = objects.iter().map(|o| o.body.len() + 1).sum::<usize>() + 96;
        let mut body = Vec::with_capacity(size);
        let _ = write!(body, "{{\"num_results\":{num_results},\"objects\":[");
        for (index, object) in objects.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&object.body);
        }
        let _ = write!(
            body,
            "],\"page\":{page},\"total_pages\":{total_pages},\"next\":"
        );
        // A cursor is a number: nothing in it needs escaping.
        let _ = match next {
            Some(cursor) => write!(body, "\"{cursor}\"}}"),
            None => write!(body, "null}}"),
        };
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            Body::from(body),
        )
            .into_response()
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
        self.kept_under(self.stamp(), uuid)
    }

    /// The copy of `uuid` kept while the deletion count was `stamp`.
    fn kept_under(&self, stamp: Option<u64>, uuid: Uuid) -> Option<FractalJson> {
        let stamp = stamp?;
        let kept = self.kept.read().unwrap_or_else(|p| p.into_inner());
        (kept.count == stamp)
            .then(|| kept.fractals.get(&uuid).cloned())
            .flatten()
    }

    /// The deletion count to stamp a copy with; read it before reading the database.
    pub fn stamp(&self) -> Option<u64> {
        self.deletions.as_ref()?.current()
    }

    /// The JSON of `fractal`, just read from the store under `stamp`: the kept copy when
    /// one is good (the same record: no deletion since, so its uuid was not reused), else
    /// made now, and kept if the fractal is finished.
    pub fn json_of(&self, stamp: Option<u64>, fractal: &Fractal) -> FractalJson {
        if !fractal.state.is_finished() {
            return FractalJson::of(fractal);
        }
        self.kept_under(stamp, fractal.uuid).unwrap_or_else(|| {
            let json = FractalJson::of(fractal);
            self.keep(stamp, fractal.uuid, &json);
            json
        })
    }

    /// Keeps a finished fractal's JSON, read under `stamp`.
    fn keep(&self, stamp: Option<u64>, uuid: Uuid, json: &FractalJson) {
        let Some(stamp) = stamp else { return };
        let mut kept = self.kept.write().unwrap_or_else(|p| p.into_inner());
        if stamp < kept.count {
            // Read before a deletion the memory already knows of: perhaps gone since.
            return;
        }
        if stamp > kept.count || kept.fractals.len() >= MAX_KEPT {
            kept.fractals.clear();
            kept.count = stamp;
        }
        kept.fractals.insert(uuid, json.clone());
    }
}

#[cfg(test)]
mod tests {
    use faafo_core::fractal::RenderResult;
    use faafo_core::wire::FractalPage;
    use faafo_core::{FractalSpec, FractalState, Window};

    use super::*;

    fn fractal(state: FractalState) -> Fractal {
        let window = Window {
            xa: -2.0,
            xb: 2.0,
            ya: -1.5,
            yb: 1.5,
        };
        Fractal {
            uuid: Uuid::new_v4(),
            spec: FractalSpec::from_stored(40, 30, 64, window, -0.8, 0.156, None),
            state,
            attempts: 1,
            max_attempts: 5,
            result: (state == FractalState::Done).then(|| RenderResult {
                checksum: "ab".repeat(32),
                size: 1234,
                duration: 0.25,
                generated_by: "w \"1\"".into(),
            }),
            error: (state == FractalState::Failed).then(|| "it \\ broke\n".into()),
            created_at_ms: 1_700_000_000_123,
            finished_at_ms: state.is_finished().then_some(1_700_000_001_000),
        }
    }

    async fn body_of(response: Response) -> Vec<u8> {
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn a_page_is_what_serde_makes_of_a_fractal_page() {
        let fractals: Vec<Fractal> = [
            FractalState::Done,
            FractalState::Queued,
            FractalState::Failed,
            FractalState::Running,
        ]
        .into_iter()
        .map(fractal)
        .collect();
        let expected = FractalPage {
            num_results: 14,
            objects: fractals.iter().map(FractalView::new).collect(),
            page: 2,
            total_pages: 4,
            next: Some("31".to_owned()),
        };
        let jsons: Vec<FractalJson> = fractals.iter().map(FractalJson::of).collect();
        let cursor = "31".parse().unwrap();
        let framed = body_of(FractalJson::page(&jsons, 14, 2, 4, Some(cursor))).await;
        assert_eq!(framed, serde_json::to_vec(&expected).unwrap());
        let empty = body_of(FractalJson::page(&[], 0, 1, 0, None)).await;
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&empty).unwrap(),
            serde_json::json!({"num_results": 0, "objects": [], "page": 1, "total_pages": 0, "next": null})
        );
    }

    #[test]
    fn only_finished_fractals_are_kept_and_a_deletion_drops_them() {
        let deletions = Arc::new(Deletions::new(true));
        let memory = FinishedFractals::new(Some(Arc::clone(&deletions)));
        let (done, queued) = (fractal(FractalState::Done), fractal(FractalState::Queued));
        let stamp = memory.stamp();
        memory.json_of(stamp, &done);
        memory.json_of(stamp, &queued);
        assert!(memory.get(done.uuid).is_some());
        assert!(memory.get(queued.uuid).is_none());
        deletions.heard();
        assert!(memory.get(done.uuid).is_none());
        // A copy read before the deletion is not kept after it.
        memory.json_of(stamp, &done);
        assert!(memory.get(done.uuid).is_none());
        memory.json_of(memory.stamp(), &done);
        assert!(memory.get(done.uuid).is_some());
    }
}
