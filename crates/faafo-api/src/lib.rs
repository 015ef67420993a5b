//! The faafo HTTP API: the v1 fractal API (compatible with the original faafo), the PNG
//! images, the worker protocol, and `/healthz`, `/readyz`, `/metrics`.
//!
//! The server is stateless: everything durable is in the [`Store`] and the [`Images`]
//! object store, so any number of API processes can serve the same data.

mod clients;
mod error;
mod finished;
mod granted;
mod images;
mod json;
mod membership;
mod metrics;
mod openapi;
mod queue;
mod routes;

use std::sync::Arc;
use std::time::Duration;

use faafo_core::{Limits, WorkerToken};
use faafo_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod reload;

pub use clients::{ClientPolicy, IpNet};
pub use error::ApiError;
pub use images::{Images, ImagesError, Rendition};
use metrics::Metrics;
use queue::WorkSignal;

/// Settings of one API process.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub worker_token: WorkerToken,
    /// How long a lease lasts without a heartbeat.
    pub lease: Duration,
    /// Leases a task may be given before it is failed.
    pub max_attempts: u32,
    pub limits: Limits,
    /// Largest PNG a worker may upload.
    pub max_upload_bytes: usize,
    /// How often expired leases are looked for.
    pub sweep_interval: Duration,
    /// How often a waiting lease request looks at the queue when no wake-up arrives
    /// (work created by another API process sends no wake-up here).
    pub poll_interval: Duration,
    /// The longest a lease request may wait for work.
    pub max_lease_wait: Duration,
    /// The URL clients reach this instance at. With one, the instance lists itself in
    /// the membership (`/v1/nodes`, `/v1/endpoints`) while it runs.
    pub advertise_url: Option<String>,
    /// On shutdown, how long to keep serving after `/readyz` turns 503, so that load
    /// balancers see it and stop sending requests before the listener closes.
    pub drain_delay: Duration,
    /// Who clients are (API keys, trusted proxies) and their limits.
    pub clients: ClientPolicy,
    /// Storage servers (Swift's object servers, or anything answering
    /// `GET /healthcheck`) the status page checks and shows: `http://host:port`.
    pub storage_nodes: Vec<String>,
}

impl ApiConfig {
    pub fn new(worker_token: WorkerToken) -> Self {
        ApiConfig {
            worker_token,
            lease: Duration::from_secs(10),
            max_attempts: 5,
            limits: Limits::default(),
            max_upload_bytes: 512 << 20,
            sweep_interval: Duration::from_millis(500),
            poll_interval: Duration::from_millis(250),
            max_lease_wait: Duration::from_secs(30),
            advertise_url: None,
            drain_delay: Duration::ZERO,
            clients: ClientPolicy::default(),
            storage_nodes: Vec::new(),
        }
    }
}

/// Everything a request handler can reach.
#[derive(Debug)]
pub(crate) struct AppState {
    store: Arc<dyn Store>,
    images: Images,
    /// Swapped whole by a reload ([`reload`]); read with [`AppState::config`].
    config: std::sync::RwLock<Arc<ApiConfig>>,
    /// Worker tokens a reload replaced, each accepted until its instant.
    retired_tokens: std::sync::Mutex<Vec<(faafo_core::WorkerToken, std::time::Instant)>>,
    metrics: Metrics,
    work: WorkSignal,
    /// Whether the object store answered its last probe (and why not), kept fresh in the
    /// background so that `/readyz` answers at once even when the store is slow.
    object_store_health: tokio::sync::watch::Sender<Result<(), String>>,
    /// Cancelled when the process begins to shut down: `/readyz` turns 503, the instance
    /// leaves the membership, and lease requests are sent elsewhere.
    shutdown: CancellationToken,
    /// Creates per client, when `config.clients.create_rate` limits them.
    create_rate: Option<clients::RateLimiter>,
    /// Done and failed fractals' JSON, served without asking the store.
    finished: finished::FinishedFractals,
    /// Leases granted here, so that uploads under them skip the store's lease read.
    granted: granted::GrantedLeases,
}

impl AppState {
    /// The settings now in force.
    fn config(&self) -> Arc<ApiConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Serves the API on `listener` until `shutdown` is cancelled; then drains: `/readyz`
/// answers 503 at once, requests are still served for `drain_delay` (load balancers
/// notice in that time), then the listener closes and the requests in flight finish.
pub async fn serve<L>(
    listener: L,
    store: Arc<dyn Store>,
    images: Images,
    config: ApiConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    // Plain TCP, or TLS (the binary's `TlsListener`).
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    let (_unchanging, updates) = tokio::sync::watch::channel(Ok(config.clone()));
    serve_reloading(listener, store, images, config, updates, shutdown).await
}

/// [`serve`], applying each configuration `updates` brings (see [`reload`]).
pub async fn serve_reloading<L>(
    listener: L,
    store: Arc<dyn Store>,
    images: Images,
    config: ApiConfig,
    updates: tokio::sync::watch::Receiver<reload::Reread>,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    let config_rate = config.clients.create_rate;
    let state = Arc::new(AppState {
        finished: finished::FinishedFractals::new(store.deletions()),
        granted: granted::GrantedLeases::new(store.deletions()),
        store,
        images,
        config: std::sync::RwLock::new(Arc::new(config)),
        retired_tokens: std::sync::Mutex::new(Vec::new()),
        metrics: Metrics::new(),
        work: WorkSignal::default(),
        // Opening the object store wrote to it: it answered a moment ago.
        object_store_health: tokio::sync::watch::Sender::new(Ok(())),
        shutdown: shutdown.clone(),
        create_rate: config_rate.map(clients::RateLimiter::new),
    });
    let background = TaskTracker::new();
    background.spawn(routes::health::watch_object_store(Arc::clone(&state)));
    background.spawn(queue::sweep_expired_leases(Arc::clone(&state)));
    if let Some(hints) = state.store.work_hints() {
        background.spawn(queue::forward_store_hints(Arc::clone(&state), hints));
    }
    background.spawn(reload::follow(Arc::clone(&state), updates));
    if let Some(address) = state.config().advertise_url.clone() {
        background.spawn(membership::announce(Arc::clone(&state), address));
    }
    let app = routes::router(Arc::clone(&state));
    let drain_delay = state.config().drain_delay;
    let drained = async move {
        shutdown.cancelled().await;
        tracing::info!(?drain_delay, "draining");
        tokio::time::sleep(drain_delay).await;
    };
    // The peer's address identifies clients that send no API key.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|_| {});
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(drained)
        .await;
    background.close();
    background.wait().await;
    result
}
