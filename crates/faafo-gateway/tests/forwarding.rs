//! What a proxied request carries to the backend, and what the gateway refuses itself.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::{any, get};
use faafo_gateway::GatewayConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The largest body this test's gateway forwards.
const LIMIT: usize = 1024;

/// A backend that is always ready and answers `/echo` with what it was sent: the
/// `X-Forwarded-For` header, then the body's length.
async fn echoing_backend() -> String {
    let echo = |headers: HeaderMap, body: Bytes| async move {
        let forwarded = headers
            .get("x-forwarded-for")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        format!("{forwarded} {}", body.len())
    };
    let app = Router::new()
        .route("/readyz", get(|| async { "ready" }))
        .route("/echo", any(echo));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A gateway in front of `backend`, once the backend is in rotation.
async fn gateway(backend: String, shutdown: &CancellationToken) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = GatewayConfig {
        check_interval: Duration::from_millis(50),
        max_body_bytes: LIMIT,
        ..GatewayConfig::default()
    };
    tokio::spawn(faafo_gateway::serve(
        listener,
        None,
        vec![backend],
        config,
        shutdown.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = reqwest::get(format!("{url}/echo")).await;
        if answer.is_ok_and(|answer| answer.status().is_success()) {
            return url;
        }
        assert!(Instant::now() < deadline, "the backend never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn requests_carry_the_clients_address_and_bodies_over_the_limit_are_refused() {
    let shutdown = CancellationToken::new();
    let gateway = gateway(echoing_backend().await, &shutdown).await;
    let client = reqwest::Client::new();

    let answer = client.get(format!("{gateway}/echo")).send().await.unwrap();
    assert_eq!(answer.text().await.unwrap(), "127.0.0.1 0");
    let answer = client
        .put(format!("{gateway}/echo"))
        .body(vec![7u8; LIMIT])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), format!("127.0.0.1 {LIMIT}"));

    let refused = client
        .put(format!("{gateway}/echo"))
        .body(vec![7u8; LIMIT + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 413);
    let message = refused.text().await.unwrap();
    assert!(
        message.contains(&format!("larger than {LIMIT} bytes")),
        "{message}"
    );

    // The gateway's own pages are not forwarded.
    let own = client
        .get(format!("{gateway}/__gateway/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(own.text().await.unwrap(), "alive");
    shutdown.cancel();
}
