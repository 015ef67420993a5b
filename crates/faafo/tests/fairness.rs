//! Seed 001's load test, as a test: one client fires 500 creates at once while another
//! asks for one small fractal. The first gets only 201s and 429s (its create rate and
//! its quota of queued work, each named), nothing it was promised is lost, and the second
//! client's fractal is rendered after at most a task or two of the first's backlog
//! instead of after all of it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use faafo_core::FractalState;
use faafo_core::wire::{CreateFractal, FractalView};
use futures::StreamExt;

/// Every pixel inside the set: each render runs all its iterations, so they all cost the
/// same (256 x 256 x 10000).
fn heavy() -> CreateFractal {
    CreateFractal {
        uuid: None,
        width: 256,
        height: 256,
        iterations: 10000,
        xa: -0.5,
        xb: 0.5,
        ya: -0.5,
        yb: 0.5,
        cx: Some(0.0),
        cy: Some(0.0),
    }
}

const HEAVY_WORK: f64 = 256.0 * 256.0 * 10000.0;

async fn create_as(
    http: &reqwest::Client,
    api: &str,
    key: &str,
    request: &CreateFractal,
) -> reqwest::Response {
    http.post(format!("{api}/v1/fractal"))
        .bearer_auth(key)
        .json(request)
        .send()
        .await
        .expect("an answer, not a timeout or a refused connection")
}

fn timestamp(text: &str) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(text).expect("RFC 3339")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_from_one_client_neither_breaks_the_service_nor_starves_another() {
    let dir = tempfile::tempdir().unwrap();
    let quota = (40.0 * HEAVY_WORK).to_string();
    let api = spawn_api(
        dir.path(),
        "api",
        &["--create-rate", "50", "--max-queued-work", &quota],
    );
    let _worker = spawn_worker(dir.path(), "worker", api.url());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // 500 creates at once from the first client.
    let started = Instant::now();
    let answers: Vec<(u16, Option<String>, String)> = futures::stream::iter(0..500)
        .map(|_| {
            let (http, api) = (&http, api.url());
            async move {
                let answer = create_as(http, api, "client-a", &heavy()).await;
                let status = answer.status().as_u16();
                let retry_after = answer
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                (status, retry_after, answer.text().await.unwrap())
            }
        })
        .buffer_unordered(500)
        .collect()
        .await;
    let flood_time = started.elapsed();
    let mut accepted = Vec::new();
    let (mut by_rate, mut by_quota) = (0, 0);
    for (status, retry_after, body) in &answers {
        match status {
            201 => accepted.push(serde_json::from_str::<FractalView>(body).unwrap().uuid),
            429 => {
                let seconds: u64 = retry_after
                    .as_deref()
                    .expect("Retry-After")
                    .parse()
                    .unwrap();
                assert!(seconds >= 1, "{body}");
                if body.contains("--create-rate") {
                    by_rate += 1;
                } else {
                    assert!(body.contains("--max-queued-work"), "{body}");
                    by_quota += 1;
                }
            }
            other => panic!("answered {other} to a create: {body}"),
        }
    }
    println!(
        "500 concurrent creates from one client in {:.2} s: {} created (201), {by_rate} refused by the create rate, {by_quota} by the queued-work quota (429), 0 errors",
        flood_time.as_secs_f64(),
        accepted.len()
    );
    assert!(by_rate > 0 && by_quota > 0, "both limits were reached");

    // The second client's one small fractal, while the first's backlog waits.
    let client = client(api.url());
    let queued_ahead = client.cluster_status().await.unwrap().queue.queued;
    let small = create_as(&http, api.url(), "client-b", &small_fractal()).await;
    assert_eq!(small.status(), 201);
    let small: FractalView = small.json().await.unwrap();
    let waited = Instant::now();
    let done = wait_for_state(
        &client,
        small.uuid,
        FractalState::Done,
        Duration::from_secs(60),
    )
    .await;
    let waited = waited.elapsed();
    let (created, finished) = (
        timestamp(&small.created_at),
        timestamp(done.finished_at.as_deref().unwrap()),
    );

    // Every fractal the first client was promised is made; count how many of them were
    // finished while the second client waited.
    let mut finished_meanwhile = 0;
    let mut render_seconds = 0.0;
    for uuid in &accepted {
        let view =
            wait_for_state(&client, *uuid, FractalState::Done, Duration::from_secs(300)).await;
        verify_image(&client, &view).await;
        render_seconds += view.duration.unwrap_or_default();
        let at = timestamp(view.finished_at.as_deref().unwrap());
        if at > created && at < finished {
            finished_meanwhile += 1;
        }
    }
    let fifo = render_seconds / accepted.len() as f64 * queued_ahead as f64;
    println!(
        "the second client's fractal was done in {:.2} s, after {finished_meanwhile} of the {queued_ahead} tasks queued ahead of it (first in, first out: after all {queued_ahead}, about {fifo:.1} s of rendering)",
        waited.as_secs_f64()
    );
    // One worker: the task it was rendering, and the first client's task of the round
    // the second client's joined.
    assert!(
        finished_meanwhile <= 2,
        "{finished_meanwhile} of the first client's tasks went first"
    );
    assert!(
        queued_ahead >= 10,
        "the backlog was only {queued_ahead} deep"
    );
    let listed = client.list_page(1, 100).await.unwrap().num_results as usize;
    assert_eq!(
        listed,
        accepted.len() + 1,
        "nothing but the acknowledged creates"
    );
}
