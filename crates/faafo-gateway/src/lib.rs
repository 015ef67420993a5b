//! `faafo gateway`: a health-checked HTTP load balancer in front of faafo API instances.
//!
//! Backends are checked actively (`GET /readyz`) and passively (a refused connection marks
//! a backend down at once). Requests go to the up backend with the fewest requests in
//! flight. A request that never reached a backend is retried on another one; safe methods
//! (GET, HEAD, OPTIONS) are also retried on 502/503 and on a broken connection. Backends
//! can be added and removed while running (`/__backends`, with the admin token) or follow
//! the membership the API keeps (`/v1/endpoints`), and `/__stats`, `/__stats.json` and
//! `/metrics` show who is up.

mod backend;
mod membership;
mod proxy;
mod serving;
mod stats;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use backend::{Backend, BackendState};

/// Settings of one gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How often each backend's `/readyz` is checked.
    pub check_interval: Duration,
    pub check_timeout: Duration,
    /// Failed checks in a row that mark a backend down (a refused connection does at once).
    pub fall: u32,
    /// Good checks in a row that bring a down backend back.
    pub rise: u32,
    /// Longest a backend may take to start answering a proxied request (lease long polls
    /// wait up to 30 s); the answer's body then streams to the client as it comes.
    pub request_timeout: Duration,
    /// Largest request body the gateway buffers (it must, to retry elsewhere).
    pub max_body_bytes: usize,
    /// Token for adding and removing backends; without one, the admin calls are refused.
    pub admin_token: Option<String>,
    /// The URL clients reach this gateway at. With `member_token`, the gateway announces
    /// itself in the membership, so clients discover it in `/v1/endpoints`.
    pub advertise_url: Option<String>,
    /// The worker token, which members of the deployment present to the API.
    pub member_token: Option<String>,
    /// Follow the API instances the membership lists (asking this often), adding and
    /// removing backends to match; the configured backends are only the first contact.
    pub discover_interval: Option<Duration>,
    /// Certificates (PEM) trusted besides the system's, for `https://` backends' checks.
    pub ca_pem: Option<Vec<u8>>,
    /// How proxied requests reach `https://` backends (the same trust as `ca_pem`); without
    /// it, adding one is refused (`GatewayError::NoBackendTls`).
    pub backend_tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            check_interval: Duration::from_millis(250),
            check_timeout: Duration::from_secs(1),
            fall: 2,
            rise: 2,
            request_timeout: Duration::from_secs(60),
            max_body_bytes: 512 << 20,
            admin_token: None,
            advertise_url: None,
            member_token: None,
            discover_interval: None,
            ca_pem: None,
            backend_tls: None,
        }
    }
}

/// What a reload (SIGHUP) may change in a running gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySettings {
    pub backends: Vec<String>,
    pub check_interval: Duration,
}

/// Settings read again, or why there are none.
pub type Reread = Result<GatewaySettings, String>;

/// Serves the gateway on `listener` (over TLS with `tls`) until `shutdown`, then finishes
/// the requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    backends: Vec<String>,
    config: GatewayConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let first = GatewaySettings {
        backends: backends.clone(),
        check_interval: config.check_interval,
    };
    let (_unchanging, updates) = tokio::sync::watch::channel(Ok(first));
    serve_reloading(listener, tls, backends, config, updates, shutdown).await
}

/// [`serve`], applying each set of settings `updates` brings.
pub async fn serve_reloading(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    backends: Vec<String>,
    config: GatewayConfig,
    updates: tokio::sync::watch::Receiver<Reread>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let gateway =
        Arc::new(proxy::Gateway::new(config, shutdown.clone()).map_err(std::io::Error::other)?);
    gateway
        .configure_backends(&backends)
        .map_err(std::io::Error::other)?;
    tokio::spawn(follow_reloads(Arc::clone(&gateway), updates));
    if let (Some(address), Some(token)) = (
        gateway.config.advertise_url.clone(),
        gateway.config.member_token.clone(),
    ) {
        tokio::spawn(membership::announce(Arc::clone(&gateway), address, token));
    }
    if let Some(interval) = gateway.config.discover_interval {
        tokio::spawn(membership::follow(Arc::clone(&gateway), interval));
    }
    let result = serving::serve(listener, tls, Arc::clone(&gateway), shutdown).await;
    gateway.stop_checks();
    result
}

/// Applies each set of settings sent on `updates` until shutdown.
async fn follow_reloads(
    gateway: Arc<proxy::Gateway>,
    mut updates: tokio::sync::watch::Receiver<Reread>,
) {
    loop {
        tokio::select! {
            _ = gateway.shutdown.cancelled() => return,
            changed = updates.changed() => if changed.is_err() { return },
        }
        let reread = updates.borrow_and_update().clone();
        let applied =
            reread.and_then(|settings| gateway.reload(&settings).map_err(|e| e.to_string()));
        match applied {
            Ok(changes) => {
                gateway.metrics.record_reload(true);
                tracing::info!(changes = %changes.join("; "), "configuration reloaded");
            }
            Err(error) => {
                gateway.metrics.record_reload(false);
                tracing::error!(%error, "configuration not reloaded: nothing changed");
            }
        }
    }
}
