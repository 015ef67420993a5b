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

/// Makes `url`'s server refuse writes by default (as a hot standby does) or accept them.
async fn set_read_only(url: &str, read_only: bool) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let value = if read_only { "on" } else { "off" };
    client
        .batch_execute(&format!(
            "ALTER SYSTEM SET default_transaction_read_only = {value}"
        ))
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
}

/// Replaces the port of a URL of `server` by a list of both servers' hosts.
fn multi_host(first: &PostgresServer, second: &PostgresServer, database_url: &str) -> String {
    let database = database_url.rsplit('/').next().unwrap();
    format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{database}?target_session_attrs=read-write",
        first.port(),
        second.port()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multi_host_url_finds_the_writable_server_and_follows_a_new_primary() {
    // Two servers stand in for a primary and a standby. There is no replication here: this
    // tests how faafo picks and re-picks its server, not PostgreSQL's failover.
    let dir = tempfile::tempdir().unwrap();
    let standby = PostgresServer::start();
    let mut primary = PostgresServer::start();
    let on_standby = standby.create_database().await;
    let database = on_standby.rsplit('/').next().unwrap().to_owned();
    // The same database and schema on both, as replication would have it.
    let on_primary = primary.url(&database);
    {
        let (client, connection) =
            tokio_postgres::connect(&primary.url("postgres"), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
    }
    for url in [&on_standby, &on_primary] {
        faafo_store::PostgresStore::connect(url, faafo_store::Wakeups::PollOnly)
            .await
            .unwrap();
    }
    set_read_only(&standby.url("postgres"), true).await;

    // The standby is listed first; faafo must skip it for the writable server.
    let url = multi_host(&standby, &primary, &on_primary);
    let api = spawn_api_on(dir.path(), "api", &url, &[]);
    let client = client(api.url());
    let before = client.create(&small_fractal()).await.unwrap();
    let (direct, connection) = tokio_postgres::connect(&on_primary, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows: i64 = direct
        .query_one(
            "SELECT count(*) FROM fractals WHERE uuid = $1",
            &[&before.uuid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the create went to the writable server");

    // Failover: the primary goes away and the standby is promoted.
    primary.stop();
    set_read_only(&standby.url("postgres"), false).await;
    let after = wait_for("creates to succeed on the new primary", LONG, || async {
        client.create(&small_fractal()).await.ok()
    })
    .await;
    let (promoted, connection) = tokio_postgres::connect(&on_standby, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows: i64 = promoted
        .query_one(
            "SELECT count(*) FROM fractals WHERE uuid = $1",
            &[&after.uuid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows, 1,
        "after the failover, writes go to the promoted server, without a restart"
    );
    let (status, _, _) = status_of(&format!("{}/readyz", api.url())).await;
    assert_eq!(status, 200);
}

/// An API started while its PostgreSQL is down (a failover in progress, a database
/// restarting) waits for it instead of exiting, then serves.
#[tokio::test]
async fn an_api_started_before_its_database_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = PostgresServer::start();
    let database = server.create_database().await;
    server.stop();
    let log = dir.path().join("api.log");
    let resumer = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("PostgreSQL not ready; trying again")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the API never said it waits"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server.resume();
        server
    });
    let api = spawn_api_on(dir.path(), "api", &database, &[]);
    let _server = resumer.join().unwrap();
    let view = client(api.url()).create(&small_fractal()).await.unwrap();
    assert_eq!(view.state, FractalState::Queued);
}
