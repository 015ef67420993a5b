//! Choosing a backend, forwarding, retrying, and checking health.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::uri::PathAndQuery;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::GatewayConfig;
use crate::backend::{Backend, BackendState};
use crate::stats::{self, Metrics};
use crate::upstream::{Target, Upstream};
use http_body_util::Full;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid backend URL {0:?}: expected http://host:port or https://host:port")]
    InvalidBackend(String),
    #[error("backend {0:?} is https://, but this gateway has no TLS settings for its backends")]
    NoBackendTls(String),
    #[error("cannot build the HTTP client")]
    Client(#[from] reqwest::Error),
}

#[derive(Debug)]
pub struct Gateway {
    pub(crate) config: GatewayConfig,
    /// `config.check_interval`, or what a reload set, in milliseconds.
    check_interval_ms: std::sync::atomic::AtomicU64,
    /// The backends the configuration names (not those discovery added).
    configured: std::sync::Mutex<Vec<String>>,
    backends: RwLock<Vec<Arc<Backend>>>,
    pub(crate) http: reqwest::Client,
    next: AtomicUsize,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
}

/// Headers that describe one hop, not the request: never forwarded.
/// (Names, not strings: a string is parsed into a name at each lookup.)
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

impl Gateway {
    pub fn new(
        config: GatewayConfig,
        shutdown: CancellationToken,
    ) -> Result<Gateway, GatewayError> {
        let mut http = reqwest::Client::builder()
            .connect_timeout(config.check_timeout)
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &config.ca_pem {
            http = http.tls_certs_merge(reqwest::Certificate::from_pem_bundle(pem)?);
        }
        let http = http.build()?;
        Ok(Gateway {
            check_interval_ms: std::sync::atomic::AtomicU64::new(
                config.check_interval.as_millis() as u64
            ),
            configured: std::sync::Mutex::new(Vec::new()),
            config,
            backends: RwLock::new(Vec::new()),
            http,
            next: AtomicUsize::new(0),
            metrics: Metrics::new(),
            shutdown,
        })
    }

    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds a backend (if new) and starts checking it.
    pub fn add_backend(self: &Arc<Self>, url: &str) -> Result<(), GatewayError> {
        let url = url.trim().trim_end_matches('/').to_owned();
        let target = self.target(&url)?;
        let backend = {
            let mut backends = self.backends.write().unwrap_or_else(|p| p.into_inner());
            if backends.iter().any(|b| b.url == url) {
                return Ok(());
            }
            let backend = Arc::new(Backend::new(url, target, self.config.rise));
            backends.push(Arc::clone(&backend));
            backend
        };
        tracing::info!(backend = %backend.url, "backend added");
        tokio::spawn(check_health(Arc::clone(self), backend));
        Ok(())
    }

    /// Where proxied requests for the backend at `url` go, if this gateway can reach it.
    fn target(&self, url: &str) -> Result<Target, GatewayError> {
        let target = Target::parse(url).ok_or_else(|| GatewayError::InvalidBackend(url.into()))?;
        if target.is_https() && self.config.backend_tls.is_none() {
            // Its health checks would pass while every request to it failed.
            return Err(GatewayError::NoBackendTls(url.into()));
        }
        Ok(target)
    }

    /// Removes a backend; true if it was there.
    pub fn remove_backend(&self, url: &str) -> bool {
        let url = url.trim().trim_end_matches('/');
        let mut backends = self.backends.write().unwrap_or_else(|p| p.into_inner());
        let before = backends.len();
        backends.retain(|backend| {
            let keep = backend.url != url;
            if !keep {
                backend.removed.cancel();
            }
            keep
        });
        before != backends.len()
    }

    /// How often backends are checked now.
    pub(crate) fn check_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.check_interval_ms.load(Ordering::Relaxed))
    }

    /// Starts with the configured backends.
    pub fn configure_backends(self: &Arc<Self>, urls: &[String]) -> Result<(), GatewayError> {
        for url in urls {
            self.add_backend(url)?;
        }
        *self.configured.lock().unwrap_or_else(|p| p.into_inner()) = urls
            .iter()
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .collect();
        Ok(())
    }

    /// Applies settings read again: backends the configuration added or dropped, and the
    /// check interval. Says what changed; a wrong backend URL changes nothing.
    pub fn reload(
        self: &Arc<Self>,
        settings: &crate::GatewaySettings,
    ) -> Result<Vec<String>, GatewayError> {
        let wanted: Vec<String> = settings
            .backends
            .iter()
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .collect();
        for url in &wanted {
            self.target(url)?;
        }
        let mut changes = Vec::new();
        let before = std::mem::replace(
            &mut *self.configured.lock().unwrap_or_else(|p| p.into_inner()),
            wanted.clone(),
        );
        for url in wanted.iter().filter(|u| !before.contains(u)) {
            self.add_backend(url)?;
            changes.push(format!("backend {url} added"));
        }
        for url in before.iter().filter(|u| !wanted.contains(u)) {
            if self.remove_backend(url) {
                changes.push(format!("backend {url} removed"));
            }
        }
        let interval = settings.check_interval.as_millis() as u64;
        let old = self.check_interval_ms.swap(interval, Ordering::Relaxed);
        if old != interval {
            changes.push(format!("check interval {old} ms -> {interval} ms"));
        }
        Ok(changes)
    }

    pub fn stop_checks(&self) {
        for backend in self.backends() {
            backend.removed.cancel();
        }
    }

    /// The up backend with the fewest requests in flight, not yet tried; ties go round robin.
    pub(crate) fn pick(&self, tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
        // Read in place: cloning the list would touch every backend's count, which all
        // serving threads share, on every request.
        let backends = self.backends.read().unwrap_or_else(|p| p.into_inner());
        if backends.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..backends.len())
            .map(|offset| &backends[(start + offset) % backends.len()])
            .filter(|b| b.state() == BackendState::Up && !tried.iter().any(|t| Arc::ptr_eq(t, b)))
            .min_by_key(|b| b.outstanding())
            .cloned()
    }
}

/// Whether `path` is one of the gateway's own pages rather than a backend's.
pub(crate) fn is_own_path(path: &str) -> bool {
    path.starts_with("/__") || path == "/metrics"
}

/// The gateway's own pages ([`is_own_path`]) for one serving thread, whose backend
/// connections are `upstream`; other paths are forwarded.
pub(crate) fn router(gateway: Arc<Gateway>, upstream: Arc<Upstream>) -> Router {
    let forward = move |State(gateway), ConnectInfo(peer), request: Request| {
        forward(gateway, Arc::clone(&upstream), peer, request)
    };
    Router::new()
        .route("/__stats", get(stats::page))
        .route("/__stats.json", get(stats::json))
        .route("/__backends", post(add).delete(remove))
        .route("/__gateway/healthz", get(|| async { "alive" }))
        .route("/metrics", get(stats::metrics))
        .fallback(forward)
        .with_state(gateway)
}

fn error(status: StatusCode, message: String) -> Response {
    let mut response = (status, axum::Json(json!({ "message": message }))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

/// The client's address, as the `X-Forwarded-For` the backends are sent: made once per
/// connection.
#[derive(Debug, Clone)]
pub(crate) struct Peer(Option<HeaderValue>);

impl Peer {
    pub(crate) fn new(address: SocketAddr) -> Peer {
        Peer(HeaderValue::from_str(&address.ip().to_string()).ok())
    }
}

/// Forwards a request to a backend, trying others when that is safe.
pub(crate) async fn forward<B>(
    gateway: Arc<Gateway>,
    upstream: Arc<Upstream>,
    peer: Peer,
    request: axum::http::Request<B>,
) -> Response
where
    B: hyper::body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    gateway.metrics.requests.inc();
    let (mut parts, body) = request.into_parts();
    let limit = gateway.config.max_body_bytes;
    let body =
        match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)).await {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body larger than {limit} bytes, or broken"),
                );
            }
        };
    let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    outgoing(&mut parts, &peer);
    // The backends that failed this request; empty (and unallocated) on the usual path.
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    let mut last_failure = String::from("no backend is up");
    loop {
        let Some(backend) = gateway.pick(&tried) else {
            gateway.metrics.unavailable.inc();
            let tried: Vec<&str> = tried.iter().map(|b| b.url.as_str()).collect();
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no backend could serve the request (tried {tried:?}): {last_failure}"),
            );
        };
        let started = Instant::now();
        let in_flight = backend.begin();
        let outcome = upstream
            .send(
                &backend,
                attempt(&parts, &body),
                gateway.config.check_timeout,
                gateway.config.request_timeout,
            )
            .await;
        drop(in_flight);
        match outcome {
            Ok(response)
                if safe
                    && matches!(
                        response.status(),
                        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                    ) =>
            {
                backend.finished(started.elapsed(), true);
                last_failure = format!("{} answered {}", backend.url, response.status());
                gateway.metrics.retries.inc();
                tried.push(backend);
            }
            Ok(response) => {
                backend.finished(started.elapsed(), response.status().is_server_error());
                gateway.metrics.count(&backend.url, response.status());
                return relay(response);
            }
            Err(failure) => {
                backend.finished(started.elapsed(), true);
                last_failure = format!("{}: {failure}", backend.url);
                if failure.is_connect() {
                    // Refused: the request never arrived; any method may go elsewhere.
                    backend.mark_down();
                } else if !safe {
                    gateway.metrics.count(&backend.url, StatusCode::BAD_GATEWAY);
                    return error(
                        StatusCode::BAD_GATEWAY,
                        format!("the backend failed mid-request: {last_failure}"),
                    );
                }
                gateway.metrics.retries.inc();
                tried.push(backend);
            }
        }
    }
}

/// The request as it goes to a backend: hop-by-hop headers gone, the client's address
/// added, the path in origin form.
fn outgoing(parts: &mut axum::http::request::Parts, peer: &Peer) {
    strip_hop_by_hop(&mut parts.headers);
    if let Some(address) = &peer.0 {
        parts
            .headers
            .append(HeaderName::from_static("x-forwarded-for"), address.clone());
    }
    let mut origin_form = axum::http::uri::Parts::default();
    origin_form.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    if let Ok(uri) = axum::http::Uri::from_parts(origin_form) {
        parts.uri = uri;
    }
}

/// One attempt's copy of the request.
fn attempt(parts: &axum::http::request::Parts, body: &bytes::Bytes) -> Request<Full<bytes::Bytes>> {
    let mut request = Request::new(Full::new(body.clone()));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.headers_mut() = parts.headers.clone();
    request
}

/// Hands a backend's answer to the client, its hop-by-hop headers gone.
fn relay(mut response: Response) -> Response {
    strip_hop_by_hop(response.headers_mut());
    response
}

/// Removes the [`HOP_BY_HOP`] headers. Most messages carry none, and one pass over the
/// few names present costs less than looking up all eight.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        for name in HOP_BY_HOP {
            headers.remove(name);
        }
    }
}

/// Checks `/readyz` of one backend until it is removed or the gateway stops.
async fn check_health(gateway: Arc<Gateway>, backend: Arc<Backend>) {
    let config = &gateway.config;
    let mut first = true;
    loop {
        // The first check at once; then at the interval in force (a reload may change it).
        let pause = if first {
            std::time::Duration::ZERO
        } else {
            gateway.check_interval()
        };
        first = false;
        tokio::select! {
            _ = backend.removed.cancelled() => return,
            _ = gateway.shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        let answer = gateway
            .http
            .get(format!("{}/readyz", backend.url))
            .timeout(config.check_timeout)
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => backend.check_passed(config.rise),
            Ok(response) => backend.check_failed(
                config.fall,
                false,
                format!("/readyz answered {}", response.status()),
            ),
            Err(failure) => {
                backend.check_failed(config.fall, failure.is_connect(), failure.to_string())
            }
        }
        gateway
            .metrics
            .set_up(&backend.url, backend.state() == BackendState::Up);
    }
}

#[derive(Debug, serde::Deserialize)]
struct BackendChange {
    url: String,
}

/// Checks the admin token and reads `{"url": ...}`; the error is the answer to give.
fn admin_change(
    gateway: &Gateway,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<BackendChange, (StatusCode, String)> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match (&gateway.config.admin_token, presented) {
        (Some(expected), Some(token)) if expected == token => {}
        (None, _) => {
            return Err((
                StatusCode::FORBIDDEN,
                "backends cannot be changed: the gateway has no --admin-token".into(),
            ));
        }
        _ => {
            return Err((
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin token".into(),
            ));
        }
    }
    serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("expected {{\"url\": \"http://host:port\"}}: {e}"),
        )
    })
}

async fn add(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let change = match admin_change(&gateway, &headers, &body) {
        Ok(change) => change,
        Err((status, message)) => return error(status, message),
    };
    match gateway.add_backend(&change.url) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    }
}

async fn remove(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let change = match admin_change(&gateway, &headers, &body) {
        Ok(change) => change,
        Err((status, message)) => return error(status, message),
    };
    if gateway.remove_backend(&change.url) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, format!("no backend {}", change.url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(backend_tls: Option<Arc<rustls::ClientConfig>>) -> Arc<Gateway> {
        let config = GatewayConfig {
            backend_tls,
            ..GatewayConfig::default()
        };
        Arc::new(Gateway::new(config, CancellationToken::new()).unwrap())
    }

    #[tokio::test]
    async fn an_https_backend_needs_the_gateways_tls_settings() {
        let plain = gateway(None);
        assert!(matches!(
            plain.add_backend("https://api.example:8443"),
            Err(GatewayError::NoBackendTls(url)) if url == "https://api.example:8443"
        ));
        assert!(matches!(
            plain.reload(&crate::GatewaySettings {
                backends: vec![
                    "http://127.0.0.1:9".into(),
                    "https://api.example:8443".into()
                ],
                check_interval: std::time::Duration::from_secs(1),
            }),
            Err(GatewayError::NoBackendTls(_))
        ));
        assert!(
            plain.backends().is_empty(),
            "a refused reload changes nothing"
        );
        plain.add_backend("http://127.0.0.1:9").unwrap();

        let roots = rustls::RootCertStore::empty();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let secure = gateway(Some(Arc::new(tls)));
        secure.add_backend("https://api.example:8443").unwrap();
        assert_eq!(secure.backends().len(), 1);
    }
}
