//! `faafo api` on a real PostgreSQL, with the database cut off and restarted under it.

mod common;

use std::time::Duration;

use common::*;
use faafo_core::FractalState;
use faafo_testkit::{PostgresServer, TcpProxy};

const LONG: Duration = Duration::from_secs(90);

async fn status_of(url: &str) -> (u16, String, Option<String>) {
    let response = reqwest::get(url).await.expect("the API answers");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, response.text().await.unwrap(), retry_after)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_serves_everything_from_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let server = PostgresServer::start();
    let database = server.create_database().await;
    let api = spawn_api_on(dir.path(), "api", &database, &[]);
    let _worker = spawn_worker(dir.path(), "worker", api.url());
    let client = client(api.url());
    let mut uuids = Vec::new();
    for _ in 0..5 {
        uuids.push(client.create(&small_fractal()).await.unwrap().uuid);
    }
    for uuid in uuids {
        let done = wait_for_state(&client, uuid, FractalState::Done, LONG).await;
        verify_image(&client, &done).await;
    }
    assert_eq!(client.list_page(1, 100).await.unwrap().num_results, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_database_gives_503_and_the_api_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = PostgresServer::start();
    let database = server.create_database().await;
    let proxy = TcpProxy::start(format!("127.0.0.1:{}", server.port()).parse().unwrap()).await;
    let through_proxy = database.replace(
        &format!(":{}/", server.port()),
        &format!(":{}/", proxy.address().port()),
    );
    let api = spawn_api_on(
        dir.path(),
        "api",
        &through_proxy,
        &["--lease-ms", "1000", "--sweep-interval-ms", "50"],
    );
    let _worker = spawn_worker(dir.path(), "worker", api.url());
    let client = client(api.url());
    let uuid = client.create(&slow_fractal(10_000)).await.unwrap().uuid;
    wait_for_state(&client, uuid, FractalState::Running, LONG).await;

    proxy.cut();
    let (status, body, retry_after) = status_of(&format!("{}/v1/fractal/{uuid}", api.url())).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store is unavailable"), "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    let (status, body, _) = status_of(&format!("{}/readyz", api.url())).await;
    assert_eq!(status, 503);
    assert!(
        body.contains("\"store\"") && !body.contains("\"store\":\"ok\""),
        "{body}"
    );
    // The outage lasts until the worker's lease has expired by the database's clock
    // (asked directly, not through the proxy).
    let (direct, connection) = tokio_postgres::connect(&database, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    wait_for("the lease to expire during the outage", LONG, || async {
        let row = direct
            .query_one(
                "SELECT lease_expires_at < faafo_now_ms() FROM fractals WHERE uuid = $1",
                &[&uuid],
            )
            .await
            .unwrap();
        row.get::<_, Option<bool>>(0).unwrap_or(false).then_some(())
    })
    .await;

    proxy.restore();
    let done = wait_for_state(&client, uuid, FractalState::Done, LONG).await;
    verify_image(&client, &done).await;
    let (status, _, _) = status_of(&format!("{}/readyz", api.url())).await;
    assert_eq!(status, 200, "ready again without a restart");
    let accepted = metric(api.url(), "faafo_http_requests_total{method=\"PUT\",route=\"/v1/worker/tasks/{uuid}/image\",status=\"200\"}").await;
    assert_eq!(accepted, 1, "the fractal was completed exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_postgres_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = PostgresServer::start();
    let database = server.create_database().await;
    let api = spawn_api_on(
        dir.path(),
        "api",
        &database,
        &["--lease-ms", "2000", "--sweep-interval-ms", "100"],
    );
    let _workers = [
        spawn_worker(dir.path(), "worker-1", api.url()),
        spawn_worker(dir.path(), "worker-2", api.url()),
    ];
    let client = client(api.url());
    let mut uuids = Vec::new();
    for _ in 0..12 {
        let mut fractal = small_fractal();
        fractal.width = 700;
        fractal.height = 700;
        fractal.iterations = 2000;
        uuids.push(client.create(&fractal).await.unwrap().uuid);
    }
    wait_for("some fractals to finish", LONG, || async {
        let page = client.list_page(1, 100).await.ok()?;
        page.objects
            .iter()
            .any(|f| f.state == FractalState::Done)
            .then_some(())
    })
    .await;

    server.stop();
    let (status, _, _) = status_of(&format!("{}/v1/fractal", api.url())).await;
    assert_eq!(status, 503);
    server.resume();

    for uuid in uuids {
        let done = wait_for_state(&client, uuid, FractalState::Done, LONG).await;
        verify_image(&client, &done).await;
    }
}
