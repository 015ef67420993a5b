//! `faafo gateway` in front of real `faafo api` processes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use faafo_core::FractalState;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

fn spawn_gateway(dir: &std::path::Path, backends: &[&str]) -> Process {
    let mut args = vec![
        "gateway",
        "--bind",
        "127.0.0.1:0",
        "--admin-token",
        "admin-secret",
    ];
    for backend in backends {
        args.extend(["--backend", backend]);
    }
    Process::spawn_server(dir, "gateway", &args)
}

async fn backend_states(gateway: &str) -> Vec<(String, String)> {
    let stats: Value = reqwest::get(format!("{gateway}/__stats.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["url"].as_str().unwrap().to_owned(),
                b["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn wait_until_state(gateway: &str, backend: &str, state: &str) {
    wait_for(&format!("{backend} to be {state}"), LONG, || async {
        backend_states(gateway)
            .await
            .iter()
            .any(|(url, s)| url == backend && s == state)
            .then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_api_leaves_rotation_and_clients_see_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut apis = [
        spawn_api(dir.path(), "api-1", &[]),
        spawn_api(dir.path(), "api-2", &[]),
    ];
    let gateway = spawn_gateway(dir.path(), &[apis[0].url(), apis[1].url()]);
    for api in &apis {
        wait_until_state(gateway.url(), api.url(), "up").await;
    }
    let _worker = spawn_worker(dir.path(), "worker", gateway.url());
    let client = client(gateway.url());
    let created = client.create(&small_fractal()).await.unwrap();
    let done = wait_for_state(&client, created.uuid, FractalState::Done, LONG).await;
    verify_image(&client, &done).await;

    // Kill one API, then keep reading through the gateway with a plain HTTP client (no
    // retries of its own): every answer must still be a success.
    let killed = apis[0].url().to_owned();
    apis[0].kill9();
    let killed_at = Instant::now();
    let http = reqwest::Client::new();
    for _ in 0..50 {
        let response = http
            .get(format!("{}/v1/fractal/{}", gateway.url(), created.uuid))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    wait_until_state(gateway.url(), &killed, "down").await;
    println!(
        "the killed API was out of rotation {:?} after the kill",
        killed_at.elapsed()
    );
    let survivor = apis[1].url().to_owned();
    assert!(
        backend_states(gateway.url())
            .await
            .contains(&(survivor, "up".to_owned()))
    );

    // Creates keep working too, and the page shows who is up.
    let again = client.create(&small_fractal()).await.unwrap();
    wait_for_state(&client, again.uuid, FractalState::Done, LONG).await;
    let page = reqwest::get(format!("{}/__stats", gateway.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&killed) && page.contains("DOWN") && page.contains("UP"),
        "{page}"
    );
    let metrics = reqwest::get(format!("{}/metrics", gateway.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("faafo_gateway_backend_up"), "{metrics}");
}

/// SIGTERM: the gateway stops taking connections at once, and a request already in flight
/// (a worker's long poll) still gets its answer through it before it exits.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_gateway_answers_the_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let api = spawn_api(dir.path(), "api", &[]);
    let mut gateway = spawn_gateway(dir.path(), &[api.url()]);
    wait_until_state(gateway.url(), api.url(), "up").await;
    let long_poll = reqwest::Client::new()
        .post(format!("{}/v1/worker/lease", gateway.url()))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "worker": "late-worker", "wait_ms": 25_000 }))
        .send();
    let long_poll = tokio::spawn(long_poll);
    wait_for("the long poll in flight", LONG, || async {
        let stats: Value = reqwest::get(format!("{}/__stats.json", gateway.url()))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (stats["backends"][0]["outstanding"] == 1).then_some(())
    })
    .await;

    gateway.terminate();
    let address = gateway.url().trim_start_matches("http://").to_owned();
    wait_for("the gateway to stop accepting", LONG, || async {
        tokio::net::TcpStream::connect(&address)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // Work appears; the long poll, still open through the stopping gateway, takes it.
    let created = client(api.url()).create(&small_fractal()).await.unwrap();
    let answer = long_poll.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    let grant: Value = answer.json().await.unwrap();
    assert_eq!(grant["uuid"], created.uuid.to_string(), "{grant}");
    let status = gateway.wait_exit(LONG);
    assert!(status.success(), "{status:?}\n{}", gateway.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn backends_are_added_and_removed_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let api = spawn_api(dir.path(), "api", &[]);
    let gateway = spawn_gateway(dir.path(), &[]);
    let http = reqwest::Client::new();
    let (status, _) = get(&http, &format!("{}/v1/fractal", gateway.url())).await;
    assert_eq!(status, 503, "no backend yet");

    let change = serde_json::json!({ "url": api.url() }).to_string();
    let unauthorized = http
        .post(format!("{}/__backends", gateway.url()))
        .body(change.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let added = http
        .post(format!("{}/__backends", gateway.url()))
        .bearer_auth("admin-secret")
        .body(change.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 204);
    wait_until_state(gateway.url(), api.url(), "up").await;
    assert_eq!(
        get(&http, &format!("{}/v1/fractal", gateway.url())).await.0,
        200
    );

    let removed = http
        .delete(format!("{}/__backends", gateway.url()))
        .bearer_auth("admin-secret")
        .body(change)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);
    assert!(backend_states(gateway.url()).await.is_empty());
    let bad = http
        .post(format!("{}/__backends", gateway.url()))
        .bearer_auth("admin-secret")
        .body(r#"{"url": "not a url"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, String) {
    let response = http.get(url).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// SIGHUP has a gateway read its configuration file again: the backends it names and the
/// check interval change while it serves; a broken file changes nothing and is counted.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_changes_the_backends_and_a_broken_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let first = spawn_api(dir.path(), "api-1", &[]);
    let second = spawn_api(dir.path(), "api-2", &[]);
    let config = dir.path().join("gateway.toml");
    let write = |text: String| std::fs::write(&config, text).unwrap();
    write(format!(
        "bind = \"127.0.0.1:0\"\nbackend = [\"{}\"]\ncheck-interval-ms = 250\n",
        first.url()
    ));
    let gateway = Process::spawn_server(
        dir.path(),
        "gateway",
        &["gateway", "--config", config.to_str().unwrap()],
    );
    wait_until_state(gateway.url(), first.url(), "up").await;
    let metrics = format!("{}/metrics", gateway.url());
    let reloads = |outcome: &str| {
        let name = format!("faafo_gateway_config_reloads_total{{outcome=\"{outcome}\"}}");
        let metrics = metrics.clone();
        async move { scrape(&metrics, &name).await }
    };

    write(format!(
        "bind = \"127.0.0.1:0\"\nbackend = [\"{}\"]\ncheck-interval-ms = 100\n",
        second.url()
    ));
    gateway.hangup();
    wait_until_state(gateway.url(), second.url(), "up").await;
    wait_for("the first backend gone", LONG, || async {
        let states = backend_states(gateway.url()).await;
        (states.len() == 1).then_some(())
    })
    .await;
    assert_eq!(reloads("applied").await, Some(1.0));
    let log = gateway.log_text();
    assert!(log.contains("check interval 250 ms -> 100 ms"), "{log}");
    client(gateway.url())
        .create(&small_fractal())
        .await
        .expect("served through the new backend");

    write("backend = [\"not a url\"]\n".to_owned());
    gateway.hangup();
    wait_for("the failed reload counted", LONG, || async {
        (reloads("failed").await == Some(1.0)).then_some(())
    })
    .await;
    let states = backend_states(gateway.url()).await;
    assert_eq!(states, [(second.url().to_owned(), "up".to_owned())]);
}
