//! The API served for real on port 0, driven over HTTP.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use faafo_api::{ApiConfig, Images};
use faafo_client::{Client, LeaseOutcome, RetryPolicy, Upload};
use faafo_core::wire::{FractalPage, FractalView, LeaseGrant};
use faafo_core::{FractalState, WorkerToken};
use faafo_render::{Engine, JuliaParams, render_png};
use faafo_store::SqliteStore;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TOKEN: &str = "test-worker-token";

/// A real API server on a free port over a temporary data directory.
struct TestApp {
    base: String,
    http: reqwest::Client,
    worker: Client,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: Arc<tempfile::TempDir>,
}

impl TestApp {
    async fn start() -> TestApp {
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut ApiConfig)) -> TestApp {
        Self::serve(Arc::new(tempfile::tempdir().unwrap()), configure).await
    }

    /// Another instance on the same database and images, as a second process would be.
    async fn beside(&self) -> TestApp {
        Self::serve(Arc::clone(&self._dir), |_| {}).await
    }

    async fn serve(dir: Arc<tempfile::TempDir>, configure: impl FnOnce(&mut ApiConfig)) -> TestApp {
        let store = Arc::new(
            SqliteStore::open(dir.path().join("faafo.db"))
                .await
                .unwrap(),
        );
        let images = Images::open(&format!("file://{}", dir.path().join("images").display()))
            .await
            .unwrap();
        let mut config = ApiConfig::new(WorkerToken::new(TOKEN));
        configure(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(faafo_api::serve(
            listener,
            store,
            images,
            config,
            shutdown.clone(),
        ));
        let worker = Client::new(&base, RetryPolicy::default())
            .unwrap()
            .with_worker_token(WorkerToken::new(TOKEN));
        TestApp {
            base,
            http: reqwest::Client::new(),
            worker,
            shutdown,
            server,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url(path))
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn create(&self, spec: Value) -> FractalView {
        let (status, body) = self.post("/v1/fractal", &spec.to_string()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        serde_json::from_value(body).unwrap()
    }

    /// Leases one task without waiting; panics if there is none.
    async fn lease(&self) -> LeaseGrant {
        self.worker
            .lease("test-worker", Duration::ZERO)
            .await
            .unwrap()
            .expect("a queued task")
    }

    /// Claims the next task, renders it and uploads it: one deterministic step of a worker.
    async fn run_one(&self) -> FractalView {
        let grant = self.lease().await;
        let png = render(&grant);
        assert_eq!(
            self.worker.upload(&upload_of(&grant, &png)).await.unwrap(),
            LeaseOutcome::Held
        );
        self.worker.get(grant.uuid).await.unwrap()
    }

    /// Shuts the server down; the data stays until the returned directory is dropped.
    async fn stop(self) -> Arc<tempfile::TempDir> {
        self.shutdown.cancel();
        self.server.await.unwrap().unwrap();
        self._dir
    }
}

/// The PNG of a leased task, as a worker would render it.
fn render(grant: &LeaseGrant) -> faafo_render::RenderedPng {
    render_png(
        &grant.render_params(),
        Engine::Scalar,
        &AtomicBool::new(false),
    )
    .unwrap()
}

fn spec() -> Value {
    json!({"width": 40, "height": 30, "iterations": 64, "xa": -2.0, "xb": 2.0, "ya": -1.5, "yb": 1.5})
}

#[tokio::test]
async fn create_render_download_delete() {
    let app = TestApp::start().await;
    let created = app.create(spec()).await;
    assert_eq!(created.state, faafo_core::FractalState::Queued);
    assert!(created.checksum.is_none() && created.url.is_none());

    // Not rendered yet: a JSON answer, not a crash.
    let (status, body) = app.get(&format!("/fractal/{}", created.uuid)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["message"].as_str().unwrap().contains("queued"),
        "{body}"
    );

    let done = app.run_one().await;
    assert_eq!(done.state, faafo_core::FractalState::Done);
    assert_eq!(
        (done.attempts, done.generated_by.as_deref()),
        (1, Some("test-worker"))
    );
    assert_eq!(
        done.url.as_deref(),
        Some(format!("/fractal/{}", done.uuid).as_str())
    );
    let png = app
        .http
        .get(app.url(done.url.as_deref().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(png.headers()["content-type"], "image/png");
    let png = png.bytes().await.unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&png)),
        done.checksum.clone().unwrap()
    );
    assert_eq!(png.len() as u64, done.size.unwrap());

    let response = app
        .http
        .delete(app.url(&format!("/v1/fractal/{}", done.uuid)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.get(&format!("/v1/fractal/{}", done.uuid)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.get(&format!("/fractal/{}", done.uuid)).await.0,
        StatusCode::NOT_FOUND
    );
    let response = app
        .http
        .delete(app.url(&format!("/v1/fractal/{}", done.uuid)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn create_has_a_location_and_is_idempotent_by_uuid() {
    let app = TestApp::start().await;
    let uuid = Uuid::new_v4();
    let mut body = spec();
    body["uuid"] = json!(uuid);
    let response = app
        .http
        .post(app.url("/v1/fractal"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.headers()["location"],
        format!("/v1/fractal/{uuid}")
    );
    let first: FractalView = response.json().await.unwrap();

    // The same request again, as a client retrying after a lost answer.
    let (status, again) = app.post("/v1/fractal", &body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_value::<FractalView>(again).unwrap(), first);

    // The same uuid for a different fractal is refused.
    body["width"] = json!(41);
    let (status, error) = app.post("/v1/fractal", &body.to_string()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("different spec"),
        "{error}"
    );

    let page: FractalPage = serde_json::from_value(app.get("/v1/fractal").await.1).unwrap();
    assert_eq!(page.num_results, 1);
    app.stop().await;
}

#[tokio::test]
async fn given_c_is_used_and_chosen_c_is_reproducible() {
    let app = TestApp::start().await;
    let mut with_c = spec();
    with_c["cx"] = json!(-0.8);
    with_c["cy"] = json!(0.156);
    let created = app.create(with_c).await;
    assert_eq!((created.cx, created.cy), (-0.8, 0.156));

    // c comes from the uuid: two servers (or a retry) choose the same one.
    let uuid = Uuid::new_v4();
    let mut keyed = spec();
    keyed["uuid"] = json!(uuid);
    let first = app.create(keyed.clone()).await;
    let other = TestApp::start().await;
    let second = other.create(keyed).await;
    assert_eq!((first.cx, first.cy), (second.cx, second.cy));
    app.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn list_pages_like_flask_restless() {
    let app = TestApp::start().await;
    let mut uuids = Vec::new();
    for _ in 0..23 {
        uuids.push(app.create(spec()).await.uuid);
    }
    let (status, first) = app.get("/v1/fractal").await;
    assert_eq!(status, StatusCode::OK);
    let first: FractalPage = serde_json::from_value(first).unwrap();
    assert_eq!(
        (
            first.num_results,
            first.page,
            first.total_pages,
            first.objects.len()
        ),
        (23, 1, 3, 10)
    );
    let third: FractalPage = serde_json::from_value(app.get("/v1/fractal?page=3").await.1).unwrap();
    assert_eq!(
        third.objects.iter().map(|f| f.uuid).collect::<Vec<_>>(),
        uuids[20..]
    );
    let sized: FractalPage =
        serde_json::from_value(app.get("/v1/fractal?results_per_page=5&page=2").await.1).unwrap();
    assert_eq!(
        sized.objects.iter().map(|f| f.uuid).collect::<Vec<_>>(),
        uuids[5..10]
    );
    assert_eq!(sized.total_pages, 5);
    let capped: FractalPage =
        serde_json::from_value(app.get("/v1/fractal?results_per_page=1000").await.1).unwrap();
    assert_eq!(capped.objects.len(), 23);
    let past: FractalPage = serde_json::from_value(app.get("/v1/fractal?page=9").await.1).unwrap();
    assert!(past.objects.is_empty());
    for bad in ["page=0", "page=x", "results_per_page=-1"] {
        let (status, body) = app.get(&format!("/v1/fractal?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    app.stop().await;
}

/// A walk by cursor goes on where the page before ended, even once the fractals there
/// are deleted; a cursor the API never gave, or one beside a page number, is refused.
#[tokio::test]
async fn list_walks_by_cursor_across_deletions() {
    let app = TestApp::start().await;
    let mut uuids = Vec::new();
    for _ in 0..23 {
        uuids.push(app.create(spec()).await.uuid);
    }
    let page = |value: Value| -> FractalPage { serde_json::from_value(value).unwrap() };
    let listed = |page: &FractalPage| page.objects.iter().map(|f| f.uuid).collect::<Vec<_>>();
    let first = page(app.get("/v1/fractal").await.1);
    assert_eq!(listed(&first), uuids[..10]);
    let after = |page: &FractalPage| format!("/v1/fractal?after={}", page.next.as_ref().unwrap());
    let (status, second) = app.get(&after(&first)).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let second = page(second);
    assert_eq!(listed(&second), uuids[10..20]);
    assert_eq!((second.page, second.num_results), (0, 23));
    // The fractal the second page ended with goes, and the one after it.
    for gone in [uuids[19], uuids[20]] {
        let response = app
            .http
            .delete(app.url(&format!("/v1/fractal/{gone}")))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{response:?}");
    }
    let third = page(app.get(&after(&second)).await.1);
    assert_eq!(listed(&third), uuids[21..]);
    assert_eq!((third.num_results, third.next.as_deref()), (21, None));

    for (query, says) in [
        ("after=abc", "after must be the `next` of an earlier page"),
        ("after=-1", "after must be the `next` of an earlier page"),
        ("after=", "after must be the `next` of an earlier page"),
        ("after=1&page=2", "give one"),
    ] {
        let (status, body) = app.get(&format!("/v1/fractal?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(says),
            "{query}: {body}"
        );
        assert_eq!(body["field"], "after", "{query}: {body}");
    }
    app.stop().await;
}

/// The client lists every fractal in order across pages of 100.
#[tokio::test]
async fn the_client_lists_every_fractal_across_pages() {
    let app = TestApp::start().await;
    let mut uuids = Vec::new();
    for _ in 0..205 {
        uuids.push(app.create(spec()).await.uuid);
    }
    let listed: Vec<Uuid> = app
        .worker
        .list_all()
        .await
        .unwrap()
        .iter()
        .map(|f| f.uuid)
        .collect();
    assert_eq!(listed, uuids);
    app.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_the_service_keeps_rendering() {
    let app = TestApp::start().await;
    let valid = spec();
    let with = |key: &str, value: Value| {
        let mut body = valid.clone();
        body[key] = value;
        body.to_string()
    };
    let without = |key: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(key);
        body.to_string()
    };
    let cases: Vec<(String, u16, &str, &str)> = vec![
        ("not json".into(), 400, "", "not valid JSON"),
        (String::new(), 400, "", "not valid JSON"),
        ("[1, 2]".into(), 422, "", "invalid type"),
        (with("width", json!(-5)), 422, "width", "-5"),
        (with("width", json!("abc")), 422, "width", "\"abc\""),
        (with("width", json!(1.5)), 422, "width", "1.5"),
        (with("width", json!(0)), 422, "width", "between 1 and 10000"),
        (with("height", json!(10_001)), 422, "height", "between 1 and 10000"),
        (with("iterations", json!(100_001)), 422, "iterations", "between 1 and 100000"),
        (with("iterations", json!(null)), 422, "iterations", "invalid type"),
        (without("xa"), 422, "", "missing field `xa`"),
        (with("colour", json!("red")), 422, "", "unknown field `colour`"),
        (with("xa", json!(2.0)), 422, "xb", "must differ"),
        (with("yb", json!(-1.5)), 422, "yb", "must differ"),
        (valid.to_string().replace("-2.0", "1e999"), 400, "", "not valid JSON"),
        (with("cx", json!(0.1)), 422, "cy", "give both or neither"),
        (with("uuid", json!("not-a-uuid")), 422, "uuid", "UUID"),
        (
            json!({"width": 10000, "height": 10000, "iterations": 5001, "xa": -2, "xb": 2, "ya": -1, "yb": 1}).to_string(),
            422,
            "iterations",
            "limit of 500000000000",
        ),
    ];
    for (body, status, field, needle) in cases {
        let (got, answer) = app.post("/v1/fractal", &body).await;
        assert_eq!(got.as_u16(), status, "{body} -> {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{body}: message {message:?} lacks {needle:?}"
        );
        if !field.is_empty() {
            assert_eq!(answer["field"], field, "{body} -> {answer}");
        }
    }
    // A body past the limit is refused before it is read whole.
    let huge = format!("{{\"pad\": \"{}\"}}", "x".repeat(100_000));
    assert_eq!(
        app.post("/v1/fractal", &huge).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // Nothing was stored, and the service still works.
    let page: FractalPage = serde_json::from_value(app.get("/v1/fractal").await.1).unwrap();
    assert_eq!(page.num_results, 0);
    app.create(spec()).await;
    assert_eq!(app.run_one().await.state, faafo_core::FractalState::Done);
    app.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_bad_uuids_answer_json() {
    let app = TestApp::start().await;
    let (status, body) = app.get("/v2/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["message"].as_str().unwrap().contains("/v2/nothing"));
    let (status, body) = app.get("/v1/fractal/abc").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("not a valid UUID")
    );
    let (status, body) = app.get(&format!("/v1/fractal/{}", Uuid::new_v4())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["message"].as_str().unwrap().starts_with("no fractal"));
    app.stop().await;
}

#[tokio::test]
async fn worker_calls_need_the_token() {
    let app = TestApp::start().await;
    let lease = json!({"worker": "w", "wait_ms": 0}).to_string();
    let response = app
        .http
        .post(app.url("/v1/worker/lease"))
        .body(lease.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = app
        .http
        .post(app.url("/v1/worker/lease"))
        .bearer_auth("wrong")
        .body(lease.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = app
        .http
        .post(app.url("/v1/worker/lease"))
        .bearer_auth(TOKEN)
        .body(lease)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    app.stop().await;
}

#[tokio::test]
async fn a_fractal_has_an_etag_and_an_unchanged_one_answers_304() {
    let app = TestApp::start().await;
    let created = app.create(spec()).await;
    let path = app.url(&format!("/v1/fractal/{}", created.uuid));
    let etag_of =
        |response: &reqwest::Response| response.headers()["etag"].to_str().unwrap().to_owned();
    let conditional = |etag: String| app.http.get(&path).header("if-none-match", etag).send();

    let queued = app.http.get(&path).send().await.unwrap();
    let queued_tag = etag_of(&queued);
    assert!(
        queued_tag.starts_with('"') && queued_tag.ends_with('"'),
        "{queued_tag}"
    );
    let unchanged = conditional(queued_tag.clone()).await.unwrap();
    assert_eq!(unchanged.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(etag_of(&unchanged), queued_tag);
    assert!(unchanged.bytes().await.unwrap().is_empty());

    // Done, it is another version: the old tag gets the whole new body.
    app.run_one().await;
    let done = conditional(queued_tag.clone()).await.unwrap();
    assert_eq!(done.status(), StatusCode::OK);
    let done_tag = etag_of(&done);
    assert_ne!(done_tag, queued_tag);
    let view: FractalView = done.json().await.unwrap();
    assert_eq!(view.state, faafo_core::FractalState::Done);
    // Served again (from memory now), the same tag; a list of tags, weak or strong, matches.
    let again = app.http.get(&path).send().await.unwrap();
    assert_eq!(etag_of(&again), done_tag);
    assert_eq!(again.json::<FractalView>().await.unwrap(), view);
    let listed = conditional(format!("\"other\", W/{done_tag}"))
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::NOT_MODIFIED);
    app.stop().await;
}

#[tokio::test]
async fn a_done_fractal_deleted_through_another_instance_is_gone_from_this_one() {
    let app = TestApp::start().await;
    let other = app.beside().await;
    let mut uuids = Vec::new();
    for _ in 0..3 {
        app.create(spec()).await;
        uuids.push(app.run_one().await.uuid);
    }
    let path = |uuid: Uuid| format!("/v1/fractal/{uuid}");
    // Read twice, so that the second answer can come from memory.
    let read_all = |uuids: &[Uuid]| {
        let uuids = uuids.to_vec();
        let app = &app;
        async move {
            for uuid in uuids {
                for _ in 0..2 {
                    assert_eq!(app.get(&path(uuid)).await.0, StatusCode::OK);
                }
            }
        }
    };
    read_all(&uuids).await;
    // Deleted here: gone at once.
    app.worker.delete(uuids[0]).await.unwrap();
    assert_eq!(app.get(&path(uuids[0])).await.0, StatusCode::NOT_FOUND);
    read_all(&uuids[1..]).await;
    // Deleted through the other instance: gone here as soon as this one hears of it.
    other.worker.delete(uuids[1]).await.unwrap();
    wait_for(|| async {
        (app.get(&path(uuids[1])).await.0 == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    // The others are still served.
    let (status, body) = app.get(&path(uuids[2])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "done");
    other.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_long_poll_is_woken_by_a_create() {
    let app = TestApp::start().await;
    let waiting = {
        let worker = Client::new(&app.base, RetryPolicy::default())
            .unwrap()
            .with_worker_token(WorkerToken::new(TOKEN));
        tokio::spawn(async move { worker.lease("w", Duration::from_secs(20)).await })
    };
    // Wait until the lease request is parked on the server, then create.
    wait_for_metric(&app, "faafo_lease_requests_waiting", "1").await;
    let created = app.create(spec()).await;
    let grant = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(grant.uuid, created.uuid);
    app.stop().await;
}

/// Polls `probe` until it gives a value, for up to 10 s.
async fn wait_for<T, F, Fut>(mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the metric line starting with `prefix` shows `value`.
async fn wait_for_metric(app: &TestApp, prefix: &str, value: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.lines().any(|line| {
            line.strip_prefix(prefix)
                .is_some_and(|rest| rest.trim() == value)
        }) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metric {prefix} never showed {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn raw_upload(
    app: &TestApp,
    grant: &LeaseGrant,
    png: Vec<u8>,
    checksum: &str,
) -> (StatusCode, Value) {
    let response = app
        .http
        .put(app.url(&format!("/v1/worker/tasks/{}/image", grant.uuid)))
        .bearer_auth(TOKEN)
        .header("faafo-lease-token", grant.lease_token.to_string())
        .header("faafo-checksum", checksum)
        .header("faafo-duration", "0.1")
        .header("faafo-generated-by", "w")
        .body(png)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn uploads_are_verified() {
    let app = TestApp::start().await;
    let created = app.create(spec()).await;
    let grant = app.lease().await;
    let png = render(&grant);

    let (status, body) = raw_upload(&app, &grant, png.bytes.clone(), &"0".repeat(64)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("damaged"),
        "{body}"
    );

    let not_png = b"hello".to_vec();
    let (status, body) = raw_upload(
        &app,
        &grant,
        not_png.clone(),
        &hex::encode(Sha256::digest(&not_png)),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["message"].as_str().unwrap().contains("not a PNG"),
        "{body}"
    );

    let other_size = JuliaParams {
        width: 7,
        ..grant.render_params()
    };
    let wrong = render_png(&other_size, Engine::Scalar, &AtomicBool::new(false)).unwrap();
    let (status, body) = raw_upload(&app, &grant, wrong.bytes, &wrong.checksum).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["message"].as_str().unwrap().contains("7x30"), "{body}");

    // None of that was stored; the right image is.
    assert_eq!(
        app.worker.get(created.uuid).await.unwrap().state,
        faafo_core::FractalState::Running
    );
    let (status, body) = raw_upload(&app, &grant, png.bytes, &png.checksum).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checksum"], png.checksum);
    app.stop().await;
}

#[tokio::test]
async fn a_worker_takes_its_next_task_with_the_upload() {
    let app = TestApp::start().await;
    let first = app.create(spec()).await;
    let second = app.create(spec()).await;
    let third = app.create(spec()).await;
    let grant = app.lease().await;
    assert_eq!(grant.uuid, first.uuid);

    // The upload's answer leases the next queued task to the same worker.
    let png = render(&grant);
    let (outcome, next) = app
        .worker
        .upload_and_take_next(&upload_of(&grant, &png))
        .await
        .unwrap();
    assert_eq!(outcome, LeaseOutcome::Held);
    let next = next.expect("a queued task comes with the answer");
    assert_eq!(next.uuid, second.uuid);
    assert_eq!(next.attempt, 1);
    let (_, listed) = app.get(&format!("/v1/fractal/{}", second.uuid)).await;
    assert_eq!(listed["state"], "running", "{listed}");
    assert_eq!(
        app.worker.get(first.uuid).await.unwrap().state,
        FractalState::Done
    );

    // A wrong value is refused before anything is stored, and nothing is leased.
    let png = render(&next);
    let response = app
        .http
        .put(app.url(&format!("/v1/worker/tasks/{}/image", next.uuid)))
        .bearer_auth(TOKEN)
        .header("faafo-lease-token", next.lease_token.to_string())
        .header("faafo-checksum", &png.checksum)
        .header("faafo-duration", "0.1")
        .header("faafo-generated-by", "test-worker")
        .header("faafo-take-next", "yes")
        .body(png.bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("faafo-take-next"),
        "{body}"
    );
    assert_eq!(
        app.worker.get(next.uuid).await.unwrap().state,
        FractalState::Running
    );
    assert_eq!(
        app.worker.get(third.uuid).await.unwrap().state,
        FractalState::Queued
    );

    // Without the header the answer is the fractal alone, as before.
    assert_eq!(
        app.worker.upload(&upload_of(&next, &png)).await.unwrap(),
        LeaseOutcome::Held
    );
    assert_eq!(
        app.worker.get(third.uuid).await.unwrap().state,
        FractalState::Queued
    );

    // With nothing queued after the last one, the answer carries no task.
    let last = app.lease().await;
    let png = render(&last);
    let (outcome, next) = app
        .worker
        .upload_and_take_next(&upload_of(&last, &png))
        .await
        .unwrap();
    assert_eq!((outcome, next), (LeaseOutcome::Held, None));
    assert_eq!(
        app.worker.get(third.uuid).await.unwrap().state,
        FractalState::Done
    );
    app.stop().await;
}

#[tokio::test]
async fn an_upload_under_a_lease_granted_here_is_checked_without_the_store() {
    let app = TestApp::start().await;
    let other = app.beside().await;
    let fractals: Vec<Uuid> = {
        let mut created = Vec::new();
        for _ in 0..3 {
            created.push(app.create(spec()).await.uuid);
        }
        created
    };

    // Leased here, uploaded here: the lease is known held, and so is the image's size.
    let first = app.lease().await;
    let png = render(&first);
    let (outcome, second) = app
        .worker
        .upload_and_take_next(&upload_of(&first, &png))
        .await
        .unwrap();
    assert_eq!(outcome, LeaseOutcome::Held);
    assert_eq!(lease_checks(&app).await, (1, 0));
    let (image, _) = fetch(&app, &format!("/fractal/{}", first.uuid)).await;
    assert_eq!(image, png.bytes);

    // The next task came with that answer, from this instance; uploaded to another one,
    // which granted nothing, the store is asked.
    let second = second.expect("a queued task comes with the answer");
    let png = render(&second);
    assert_eq!(
        other
            .worker
            .upload(&upload_of(&second, &png))
            .await
            .unwrap(),
        LeaseOutcome::Held
    );
    assert_eq!(lease_checks(&other).await, (0, 1));

    // A deletion heard since the grant, even of another fractal, sends the check to the
    // store; a wrong size is refused as before.
    let third = app.lease().await;
    let (status, body) = raw_upload(&app, &third, b"x".to_vec(), &"0".repeat(64)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(lease_checks(&app).await, (2, 0));
    app.worker.delete(first.uuid).await.unwrap();
    let png = render(&third);
    assert_eq!(
        app.worker.upload(&upload_of(&third, &png)).await.unwrap(),
        LeaseOutcome::Held
    );
    assert_eq!(lease_checks(&app).await, (2, 1));
    for uuid in &fractals[1..] {
        assert_eq!(
            app.worker.get(*uuid).await.unwrap().state,
            FractalState::Done
        );
    }
    other.stop().await;
    app.stop().await;
}

/// How many uploads' lease checks `app` answered from memory and with the store.
async fn lease_checks(app: &TestApp) -> (u64, u64) {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |answer: &str| {
        let prefix = format!("faafo_upload_lease_checks_total{{answered_by=\"{answer}\"}}");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    (count("memory"), count("store"))
}

/// The bytes and `ETag` of a `GET` that must succeed.
async fn fetch(app: &TestApp, path: &str) -> (bytes::Bytes, String) {
    let response = app.http.get(app.url(path)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    (response.bytes().await.unwrap(), etag)
}

fn upload_of<'a>(grant: &LeaseGrant, png: &'a faafo_render::RenderedPng) -> Upload<'a> {
    Upload {
        uuid: grant.uuid,
        lease_token: grant.lease_token,
        png: png.bytes.clone().into(),
        checksum: &png.checksum,
        duration: Duration::from_millis(5),
        generated_by: "test-worker",
    }
}

#[tokio::test]
async fn previews_are_taken_under_the_lease_served_small_and_deleted_with_the_image() {
    let app = TestApp::start().await;
    let big = app
        .create(json!({"width": 600, "height": 400, "iterations": 64, "xa": -1.5, "xb": 1.5, "ya": -1.0, "yb": 1.0}))
        .await;
    let grant = app.lease().await;
    let (full, preview_params) = (render(&grant), grant.render_params().preview().unwrap());
    assert_eq!((preview_params.width, preview_params.height), (512, 341));
    let preview = render_png(&preview_params, Engine::Scalar, &AtomicBool::new(false)).unwrap();

    // A preview of the wrong size is refused; the right one is taken.
    let response = app
        .http
        .put(app.url(&format!("/v1/worker/tasks/{}/preview", big.uuid)))
        .bearer_auth(TOKEN)
        .header("faafo-lease-token", grant.lease_token.to_string())
        .header("faafo-checksum", &full.checksum)
        .body(full.bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("512x341"),
        "{body}"
    );
    let sent = app
        .worker
        .upload_preview(
            big.uuid,
            grant.lease_token,
            preview.bytes.clone().into(),
            &preview.checksum,
        )
        .await
        .unwrap();
    assert_eq!(sent, LeaseOutcome::Held);
    // Nothing is shown before the fractal is done.
    let (status, _) = app.get(&format!("/fractal/{}/preview", big.uuid)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let uploaded = app.worker.upload(&upload_of(&grant, &full)).await.unwrap();
    assert_eq!(uploaded, LeaseOutcome::Held);

    let (bytes, etag) = fetch(&app, &format!("/fractal/{}/preview", big.uuid)).await;
    assert_eq!(bytes, preview.bytes);
    assert_eq!(etag, format!("\"{}-preview\"", full.checksum));
    let revalidated = app
        .http
        .get(app.url(&format!("/fractal/{}/preview", big.uuid)))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED);
    let (bytes, _) = fetch(&app, &format!("/fractal/{}", big.uuid)).await;
    assert_eq!(bytes, full.bytes);

    // An image no larger than a preview is its own; a preview for it is refused.
    let small = app.create(spec()).await;
    let grant = app.lease().await;
    let small_png = render(&grant);
    let refused = app
        .worker
        .upload_preview(
            small.uuid,
            grant.lease_token,
            small_png.bytes.clone().into(),
            &small_png.checksum,
        )
        .await;
    let error = refused.unwrap_err().to_string();
    assert!(error.contains("its own preview"), "{error}");
    app.worker
        .upload(&upload_of(&grant, &small_png))
        .await
        .unwrap();
    let (bytes, etag) = fetch(&app, &format!("/fractal/{}/preview", small.uuid)).await;
    assert_eq!(
        (bytes, etag),
        (
            small_png.bytes.into(),
            format!("\"{}\"", small_png.checksum)
        )
    );

    // A large fractal rendered before previews existed shows its image.
    let old = app
        .create(json!({"width": 700, "height": 100, "iterations": 16, "xa": -1.5, "xb": 1.5, "ya": -1.0, "yb": 1.0}))
        .await;
    let grant = app.lease().await;
    let old_png = render(&grant);
    app.worker
        .upload(&upload_of(&grant, &old_png))
        .await
        .unwrap();
    let (bytes, _) = fetch(&app, &format!("/fractal/{}/preview", old.uuid)).await;
    assert_eq!(bytes, old_png.bytes);

    // Deleting the fractal takes its preview too.
    let text = big.uuid.to_string();
    let preview_file = app
        ._dir
        .path()
        .join(format!("images/fractals/{}/{text}.preview.png", &text[..2]));
    assert!(preview_file.exists(), "{}", preview_file.display());
    app.worker.delete(big.uuid).await.unwrap();
    assert!(!preview_file.exists());
    assert!(!preview_file.with_file_name(format!("{text}.png")).exists());
    app.stop().await;
}

#[tokio::test]
async fn an_expired_lease_is_fenced_and_the_task_goes_to_the_next_worker() {
    let app = TestApp::start_with(|config| {
        config.lease = Duration::from_millis(200);
        config.sweep_interval = Duration::from_millis(20);
    })
    .await;
    let created = app.create(spec()).await;
    let stale = app.lease().await;
    // The first worker goes silent; its lease expires and the task is offered again.
    let fresh = app
        .worker
        .lease("second", Duration::from_secs(10))
        .await
        .unwrap()
        .expect("requeued task");
    assert_eq!((fresh.uuid, fresh.attempt), (created.uuid, 2));
    assert!(matches!(
        app.worker
            .heartbeat(stale.uuid, stale.lease_token)
            .await
            .unwrap(),
        LeaseOutcome::Lost(_)
    ));
    let png = render(&stale);
    let (status, body) = raw_upload(&app, &stale, png.bytes.clone(), &png.checksum).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("no longer held"),
        "{body}"
    );
    let (status, _) = raw_upload(&app, &fresh, png.bytes, &png.checksum).await;
    assert_eq!(status, StatusCode::OK);
    let done = app.worker.get(created.uuid).await.unwrap();
    assert_eq!(
        (done.state, done.attempts),
        (faafo_core::FractalState::Done, 2)
    );
    app.stop().await;
}

#[tokio::test]
async fn a_task_whose_leases_keep_expiring_fails_with_the_reason() {
    let app = TestApp::start_with(|config| {
        config.lease = Duration::from_millis(100);
        config.sweep_interval = Duration::from_millis(10);
        config.max_attempts = 2;
    })
    .await;
    let created = app.create(spec()).await;
    app.lease().await;
    app.worker
        .lease("w", Duration::from_secs(10))
        .await
        .unwrap()
        .expect("second attempt");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let failed = loop {
        let view = app.worker.get(created.uuid).await.unwrap();
        if view.state == faafo_core::FractalState::Failed {
            break view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never failed: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(failed.error.unwrap().contains("gave up after 2 attempts"));
    let (status, body) = app.get(&format!("/fractal/{}", created.uuid)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["message"].as_str().unwrap().contains("failed"),
        "{body}"
    );
    wait_for_metric(&app, "faafo_lease_expiries_total", "2").await;
    app.stop().await;
}

#[tokio::test]
async fn a_worker_failure_report_fails_the_fractal() {
    let app = TestApp::start().await;
    let created = app.create(spec()).await;
    let grant = app.lease().await;
    let outcome = app
        .worker
        .fail(
            grant.uuid,
            grant.lease_token,
            "PNG encoding failed: disk full",
        )
        .await
        .unwrap();
    assert_eq!(outcome, LeaseOutcome::Held);
    let view = app.worker.get(created.uuid).await.unwrap();
    assert_eq!(view.state, faafo_core::FractalState::Failed);
    assert_eq!(
        view.error.as_deref(),
        Some("PNG encoding failed: disk full")
    );
    app.stop().await;
}

#[tokio::test]
async fn deleting_a_running_fractal_cancels_its_lease() {
    let app = TestApp::start().await;
    let created = app.create(spec()).await;
    let grant = app.lease().await;
    app.worker.delete(created.uuid).await.unwrap();
    assert!(matches!(
        app.worker
            .heartbeat(grant.uuid, grant.lease_token)
            .await
            .unwrap(),
        LeaseOutcome::Lost(_)
    ));
    let png = render(&grant);
    let (status, _) = raw_upload(&app, &grant, png.bytes, &png.checksum).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The deletion was heard: the store was asked, before anything was written.
    assert_eq!(lease_checks(&app).await, (0, 1));
    app.stop().await;
}

#[tokio::test]
async fn released_tasks_return_to_the_queue_without_using_an_attempt() {
    let app = TestApp::start().await;
    let created = app.create(spec()).await;
    let grant = app.lease().await;
    assert_eq!(
        app.worker
            .release(grant.uuid, grant.lease_token)
            .await
            .unwrap(),
        LeaseOutcome::Held
    );
    let view = app.worker.get(created.uuid).await.unwrap();
    assert_eq!(
        (view.state, view.attempts),
        (faafo_core::FractalState::Queued, 0)
    );
    assert_eq!(app.run_one().await.attempts, 1);
    app.stop().await;
}

#[tokio::test]
async fn health_readiness_metrics_and_draining() {
    let app = TestApp::start_with(|config| config.drain_delay = Duration::from_secs(3)).await;
    assert_eq!(
        app.get("/healthz").await,
        (StatusCode::OK, json!({"status": "alive"}))
    );
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ready["status"], "ready");
    app.create(spec()).await;
    app.create(spec()).await;
    app.run_one().await;
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        "faafo_fractals{state=\"done\"} 1",
        "faafo_fractals{state=\"queued\"} 1",
        "faafo_queue_depth 1",
        "faafo_leases_granted_total 1",
        "faafo_render_duration_seconds_count{worker=\"test-worker\"} 1",
        "faafo_http_requests_total{method=\"POST\",route=\"/v1/fractal\",status=\"201\"} 2",
        "faafo_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/fractal\"} 2",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in\n{metrics}"
        );
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("faafo_queue_oldest_age_seconds ") && !l.ends_with(" 0"))
    );

    // Draining: a parked lease request is sent elsewhere at once (503), /readyz turns
    // 503, and other requests are still served until the drain delay ends.
    let policy = RetryPolicy {
        total: Duration::from_millis(100),
        ..RetryPolicy::default()
    };
    let worker = Client::new(&app.base, policy)
        .unwrap()
        .with_worker_token(WorkerToken::new(TOKEN));
    app.lease().await;
    let parked = tokio::spawn(async move { worker.lease("w", Duration::from_secs(30)).await });
    wait_for_metric(&app, "faafo_lease_requests_waiting", "1").await;
    app.shutdown.cancel();
    let answer = tokio::time::timeout(Duration::from_secs(2), parked)
        .await
        .expect("parked lease returned")
        .unwrap();
    let error = answer.unwrap_err().to_string();
    assert!(
        error.contains("503") && error.contains("shutting down"),
        "{error}"
    );
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["status"], "draining");
    let (status, _) = app.get("/v1/fractal").await;
    assert_eq!(status, StatusCode::OK, "still serving while draining");
    app.server.await.unwrap().unwrap();
}

#[tokio::test]
async fn membership_lists_nodes_and_endpoints() {
    let app = TestApp::start_with(|config| {
        config.advertise_url = Some("http://api-1.test:9210".into());
    })
    .await;
    let beat = |id: &str, role: &str, address: Option<&str>| {
        let mut beat = json!({ "id": id, "role": role, "version": "9.9.9", "load": 7 });
        if let Some(address) = address {
            beat["address"] = json!(address);
        }
        beat.to_string()
    };
    let send = |path: &'static str, body: String, token: Option<&'static str>| {
        let mut request = app.http.post(app.url(path)).body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let heartbeat = "/v1/nodes/heartbeat";
    let gateway = beat("gw-1", "gateway", Some("http://gw-1.test:9100"));
    assert_eq!(
        send(heartbeat, gateway.clone(), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, error) = send(heartbeat, beat("gw-2", "gateway", None), Some(TOKEN)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        error["message"].as_str().unwrap().contains("address"),
        "{error}"
    );
    let (status, error) = send(heartbeat, beat("x", "api", Some("http://x:1")), Some(TOKEN)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error["field"], "role");
    let (status, _) = send(heartbeat, beat("x", "database", None), Some(TOKEN)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    for body in [gateway, beat("worker-1", "worker", None)] {
        assert_eq!(
            send(heartbeat, body, Some(TOKEN)).await.0,
            StatusCode::NO_CONTENT
        );
    }

    // The instance lists itself; gateways come first, then APIs, then workers.
    let status = wait_for(|| async {
        let (_, status) = app.get("/v1/nodes").await;
        (status["nodes"].as_array().unwrap().len() == 3).then_some(status)
    })
    .await;
    let nodes: Vec<(&str, &str, &str)> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["role"].as_str().unwrap(),
                n["id"].as_str().unwrap(),
                n["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        [
            ("gateway", "gw-1", "up"),
            ("api", "http://api-1.test:9210", "up"),
            ("worker", "worker-1", "up")
        ]
    );
    assert_eq!(status["queue"]["queued"], 0);
    let (_, endpoints) = app.get("/v1/endpoints").await;
    assert_eq!(
        endpoints,
        json!({ "gateways": ["http://gw-1.test:9100"], "apis": ["http://api-1.test:9210"] })
    );

    // A node that leaves is no longer handed out; an unknown one is a 404.
    let leave = "/v1/nodes/leave";
    assert_eq!(
        send(leave, json!({"id": "gw-1"}).to_string(), Some(TOKEN))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        send(leave, json!({"id": "nope"}).to_string(), Some(TOKEN))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (_, endpoints) = app.get("/v1/endpoints").await;
    assert_eq!(endpoints["gateways"], json!([]));
    let (_, status) = app.get("/v1/nodes").await;
    assert_eq!(status["nodes"][0]["state"], "left");

    // On shutdown the instance says goodbye too.
    let data = app.stop().await;
    let store = SqliteStore::open(data.path().join("faafo.db"))
        .await
        .unwrap();
    let nodes = faafo_store::Store::nodes(&store).await.unwrap();
    let api = nodes
        .iter()
        .find(|n| n.beat.id == "http://api-1.test:9210")
        .unwrap();
    assert!(api.left);
}

#[tokio::test]
async fn a_stale_upload_is_refused_before_anything_is_stored() {
    // The lease is checked before the body is read or stored. (Should the fractal fail
    // between that check and the completion, the handler removes the image again; that
    // window is too narrow to hit from a test.)
    let app = TestApp::start_with(|config| {
        config.lease = Duration::from_millis(100);
        config.sweep_interval = Duration::from_millis(10);
        config.max_attempts = 1;
    })
    .await;
    let created = app.create(spec()).await;
    let stale = app.lease().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.worker.get(created.uuid).await.unwrap().state != faafo_core::FractalState::Failed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fractal never failed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let png = render(&stale);
    let (status, body) = raw_upload(&app, &stale, png.bytes, &png.checksum).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    // The lease was granted here, but its term had come: the store was asked.
    assert_eq!(lease_checks(&app).await, (0, 1));
    let uuid = created.uuid.to_string();
    let image = app
        ._dir
        .path()
        .join("images/fractals")
        .join(&uuid[..2])
        .join(format!("{uuid}.png"));
    assert!(!image.exists(), "{} was left behind", image.display());
    app.stop().await;
}

/// `/openapi.json` is an OpenAPI 3.1 description, and every operation it lists is served:
/// sent to the router, none falls through to "no such resource" or "method not allowed".
/// (The router is built from the same annotations, so nothing is served undescribed.)
#[tokio::test]
async fn the_description_lists_the_served_routes() {
    let app = TestApp::start().await;
    let (status, description) = app.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(description["openapi"], "3.1.0");
    let paths = description["paths"].as_object().expect("paths");
    let mut operations = 0;
    for (path, item) in paths {
        let concrete = path
            .replace("{uuid}", &Uuid::new_v4().to_string())
            .replace("{page}", "1");
        for method in item.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = app
                .http
                .request(method.clone(), app.url(&concrete))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(
                !body.contains("no such resource"),
                "{method} {path} is described but not served"
            );
            operations += 1;
        }
    }
    // The v1 API, images, the worker protocol, membership, probes, health, the gallery
    // and the status page.
    for path in [
        "/v1/fractal",
        "/v1/fractal/{uuid}",
        "/fractal/{uuid}",
        "/v1/worker/lease",
        "/v1/worker/tasks/{uuid}/image",
        "/v1/nodes/heartbeat",
        "/readyz",
        "/view/{uuid}",
        "/status",
        "/v1/probes",
        "/openapi.json",
    ] {
        assert!(paths.contains_key(path), "{path} is not described");
    }
    assert_eq!(operations, 29, "{:?}", paths.keys().collect::<Vec<_>>());
    let create = &paths["/v1/fractal"]["post"];
    assert!(create["responses"]["429"]["headers"]["Retry-After"].is_object());
    assert_eq!(
        create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/CreateFractal"
    );
}

/// Probes report their rounds with the worker token; bad reports are refused with what
/// was wrong, and what was recorded shows on the status page.
#[tokio::test]
async fn probe_reports_need_the_token_are_checked_and_reach_the_status_page() {
    let app = TestApp::start().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let report = |outcomes: Value| json!({"probe": "probe-x", "outcomes": outcomes}).to_string();
    let send = |body: String, token: Option<&str>| {
        let request = app.http.post(app.url("/v1/probes")).body(body);
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        async move { request.send().await.unwrap() }
    };
    let good = report(json!([
        {"finished_at_ms": now - 2000, "ok": true, "total_ms": 31.5},
        {"finished_at_ms": now - 1000, "ok": false, "total_ms": 1000.0, "failed_step": "render"},
    ]));
    assert_eq!(
        send(good.clone(), None).await.status(),
        StatusCode::UNAUTHORIZED
    );

    for (bad, says) in [
        (
            report(json!([{"finished_at_ms": now, "ok": true, "total_ms": -1.0}])),
            "total_ms",
        ),
        (
            report(
                json!([{"finished_at_ms": now, "ok": false, "total_ms": 1.0, "failed_step": "x".repeat(21)}]),
            ),
            "failed_step",
        ),
        (
            json!({"probe": "", "outcomes": []}).to_string(),
            "probe name",
        ),
        (
            json!({"probe": "p", "outcomes": [], "extra": 1}).to_string(),
            "extra",
        ),
    ] {
        let answer = send(bad.clone(), Some(TOKEN)).await;
        assert_eq!(answer.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        let text = answer.text().await.unwrap();
        assert!(text.contains(says), "{bad}: {text}");
    }

    assert_eq!(
        send(good, Some(TOKEN)).await.status(),
        StatusCode::NO_CONTENT
    );
    let page = app.http.get(app.url("/status")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"data-colour="red""#), "{html}");
    assert!(html.contains("FAILED at render"), "{html}");
    assert!(html.contains("50.00% of 2 rounds"), "{html}");
    assert_eq!(html.matches(r#"class="probe-ok""#).count(), 1, "{html}");
    app.stop().await;
}
