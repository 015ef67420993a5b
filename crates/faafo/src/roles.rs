//! Wiring of the long-running roles: `api`, `worker`, and `up` (both in one process).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use faafo_api::{ApiConfig, Images};
use faafo_client::{Client, RetryPolicy};
use faafo_core::WorkerToken;
use faafo_store::{PostgresOptions, PostgresStore, SqliteStore, Store, Wakeups};
use faafo_worker::WorkerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::{ApiArgs, Cli, Command, GatewayArgs, UpArgs, WorkerArgs};

pub async fn api(args: ApiArgs, ca: Option<Vec<u8>>) -> anyhow::Result<()> {
    let fixed = args_view(&args);
    let wakeups = if args.poll_only {
        Wakeups::PollOnly
    } else {
        Wakeups::ListenNotify
    };
    let mut options = PostgresOptions::new(wakeups);
    options.patroni = args.patroni;
    options.ca_pem = ca;
    let store = open_store(&args.database_url, options).await?;
    let images = Images::open(&args.object_store)
        .await
        .context("opening the object store")?;
    let listener = bind(args.bind).await?;
    let tls = server_tls(&args.tls)?;
    let shutdown = shutdown_on_signal();
    let mut config = args.tuning.config(WorkerToken::new(args.worker_token));
    let bound = listener.local_addr()?;
    config.advertise_url = Some(advertised_url(bound, tls.is_some(), args.advertise_url)?);
    config.drain_delay = std::time::Duration::from_millis(args.drain_delay_ms);
    announce(bound, tls.is_some(), "faafo api")?;
    let (reread, updates) = tokio::sync::watch::channel(Ok(config.clone()));
    let read = |cli: Cli| match cli.command {
        Command::Api(args) => Ok((
            args_view(&args),
            args.config.log_level.clone(),
            args.tuning.config(WorkerToken::new(args.worker_token)),
        )),
        _ => Err("the command line no longer names faafo api".to_owned()),
    };
    tokio::spawn(reload_on_hangup(fixed, read, reread, shutdown.clone()));
    let served = match tls {
        Some(tls) => {
            let listener = crate::tls::TlsListener::new(listener, tls)?;
            faafo_api::serve_reloading(listener, store, images, config, updates, shutdown).await
        }
        None => {
            faafo_api::serve_reloading(listener, store, images, config, updates, shutdown).await
        }
    };
    served.context("serving HTTP")
}

/// The settings of `faafo api` that only a restart changes, as text to compare.
fn args_view(args: &ApiArgs) -> Vec<(&'static str, String)> {
    vec![
        ("bind", args.bind.to_string()),
        ("tls-cert", format!("{:?}", args.tls.tls_cert)),
        ("tls-key", format!("{:?}", args.tls.tls_key)),
        ("database-url", args.database_url.clone()),
        ("object-store", args.object_store.clone()),
        ("patroni", args.patroni.join(",")),
        ("poll-only", args.poll_only.to_string()),
        ("advertise-url", format!("{:?}", args.advertise_url)),
        ("drain-delay-ms", args.drain_delay_ms.to_string()),
    ]
}

/// What a reload reads for one role: the settings only a restart changes (to compare),
/// the log level, and the role's new settings.
type Reading<T> = (Vec<(&'static str, String)>, Option<String>, T);

/// On SIGHUP, reads the command line and its configuration file again; `read` takes the
/// role's part of it. The new settings, or why there are none, go to `reread`; settings
/// only a restart changes are named, and the log level is set.
async fn reload_on_hangup<T: Send + Sync + 'static>(
    fixed: Vec<(&'static str, String)>,
    read: impl Fn(Cli) -> Result<Reading<T>, String> + Send + 'static,
    reread: tokio::sync::watch::Sender<Result<T, String>>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: the configuration cannot be reloaded");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = hangups.recv() => if got.is_none() { return },
        }
        tracing::info!("SIGHUP: reading the configuration again");
        let parsed = match crate::config_file::parse_from(std::env::args_os().collect()) {
            Ok(crate::config_file::Parsed::Run(cli)) => read(*cli),
            Ok(crate::config_file::Parsed::Printed) => {
                Err("--print-config is on the command line".to_owned())
            }
            Err(crate::config_file::Failure::Config(error)) => Err(format!("{error:#}")),
            Err(crate::config_file::Failure::Clap(error)) => {
                Err(error.render().to_string().trim().to_owned())
            }
        };
        let update = parsed.map(|(now, log_level, settings)| {
            let restart: Vec<&str> = fixed
                .iter()
                .zip(&now)
                .filter(|(before, after)| before.1 != after.1)
                .map(|(before, _)| before.0)
                .collect();
            if !restart.is_empty() {
                tracing::warn!(settings = %restart.join(", "), "changed, but only a restart applies them");
            }
            if let Err(error) = crate::logging::set_level(log_level.as_deref()) {
                tracing::warn!(%error, "the log level was not changed");
            }
            settings
        });
        if reread.send(update).is_err() {
            // The server has stopped.
            return;
        }
    }
}

/// The server's TLS configuration, when --tls-cert and --tls-key are given.
fn server_tls(args: &crate::cli::TlsArgs) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(crate::tls::server_config(cert, key)?)),
        _ => Ok(None),
    }
}

pub async fn worker(endpoints: &str, ca: Option<&[u8]>, args: WorkerArgs) -> anyhow::Result<()> {
    let token = WorkerToken::new(args.worker_token.clone());
    let client = worker_client(endpoints, token.clone(), ca)?;
    let shutdown = shutdown_on_signal();
    let started = WorkerSettings {
        endpoints: endpoints.to_owned(),
        token,
    };
    let (reread, updates) = tokio::sync::watch::channel(Ok(started.clone()));
    let read = |cli: Cli| match cli.command {
        Command::Worker(args) => Ok((
            worker_view(&args),
            args.config.log_level.clone(),
            WorkerSettings {
                endpoints: cli.endpoint_url,
                token: WorkerToken::new(args.worker_token),
            },
        )),
        _ => Err("the command line no longer names faafo worker".to_owned()),
    };
    tokio::spawn(reload_on_hangup(
        worker_view(&args),
        read,
        reread,
        shutdown.clone(),
    ));
    tokio::spawn(follow_worker_reloads(Arc::clone(&client), started, updates));
    let config = WorkerConfig::new(args.name.unwrap_or_else(faafo_worker::default_name));
    faafo_worker::run(client, config, shutdown).await;
    Ok(())
}

/// What a reload may change in a running worker.
#[derive(Clone)]
struct WorkerSettings {
    endpoints: String,
    token: WorkerToken,
}

/// The settings of `faafo worker` that only a restart changes, as text to compare.
fn worker_view(args: &WorkerArgs) -> Vec<(&'static str, String)> {
    vec![("name", format!("{:?}", args.name))]
}

/// Points the worker's client at the endpoints and token each reload brings.
async fn follow_worker_reloads(
    client: Arc<Client>,
    mut current: WorkerSettings,
    mut updates: tokio::sync::watch::Receiver<Result<WorkerSettings, String>>,
) {
    while updates.changed().await.is_ok() {
        let reread = updates.borrow_and_update().clone();
        let new = match reread {
            Ok(new) => new,
            Err(error) => {
                tracing::error!(%error, "configuration not reloaded: nothing changed");
                continue;
            }
        };
        let mut changes = Vec::new();
        if new.endpoints != current.endpoints {
            if let Err(error) = client.set_endpoints(&new.endpoints) {
                tracing::error!(%error, "configuration not reloaded: nothing changed");
                continue;
            }
            changes.push(format!(
                "endpoint-url {} -> {}",
                current.endpoints, new.endpoints
            ));
        }
        if new.token.expose() != current.token.expose() {
            client.set_worker_token(new.token.clone());
            changes.push("worker token replaced".to_owned());
        }
        if changes.is_empty() {
            tracing::info!("configuration reloaded: nothing changed");
        } else {
            tracing::info!(changes = %changes.join("; "), "configuration reloaded");
        }
        current = new;
    }
}

/// The settings of `faafo gateway` that only a restart changes, as text to compare.
fn gateway_view(args: &GatewayArgs) -> Vec<(&'static str, String)> {
    vec![
        ("bind", args.bind.to_string()),
        ("tls-cert", format!("{:?}", args.tls.tls_cert)),
        ("tls-key", format!("{:?}", args.tls.tls_key)),
        ("admin-token", format!("{}", args.admin_token.is_some())),
        ("discover", args.discover.to_string()),
        ("worker-token", format!("{}", args.worker_token.is_some())),
        ("advertise-url", format!("{:?}", args.advertise_url)),
    ]
}

fn gateway_settings(args: &GatewayArgs) -> faafo_gateway::GatewaySettings {
    faafo_gateway::GatewaySettings {
        backends: args.backends.clone(),
        check_interval: std::time::Duration::from_millis(args.check_interval_ms),
    }
}

pub async fn gateway(args: GatewayArgs, ca: Option<Vec<u8>>) -> anyhow::Result<()> {
    let fixed = gateway_view(&args);
    let (reread, updates) = tokio::sync::watch::channel(Ok(gateway_settings(&args)));
    let listener = bind(args.bind).await?;
    let tls = server_tls(&args.tls)?;
    let bound = listener.local_addr()?;
    let config = faafo_gateway::GatewayConfig {
        check_interval: std::time::Duration::from_millis(args.check_interval_ms),
        admin_token: args.admin_token,
        advertise_url: Some(advertised_url(bound, tls.is_some(), args.advertise_url)?),
        member_token: args.worker_token,
        discover_interval: args.discover.then_some(std::time::Duration::from_secs(1)),
        backend_tls: Some(crate::tls::client_config(ca.as_deref())?),
        ca_pem: ca,
        ..faafo_gateway::GatewayConfig::default()
    };
    announce(bound, tls.is_some(), "faafo gateway")?;
    let shutdown = shutdown_on_signal();
    let read = |cli: Cli| match cli.command {
        Command::Gateway(args) => Ok((
            gateway_view(&args),
            args.config.log_level.clone(),
            gateway_settings(&args),
        )),
        _ => Err("the command line no longer names faafo gateway".to_owned()),
    };
    tokio::spawn(reload_on_hangup(fixed, read, reread, shutdown.clone()));
    let backends = args.backends;
    faafo_gateway::serve_reloading(listener, tls, backends, config, updates, shutdown)
        .await
        .context("serving HTTP")
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let shutdown = shutdown_on_signal();
    let backing = Backing::embedded(&args.data_dir).await?;
    let tls = server_tls(&args.tls)?;
    let https = tls.is_some();
    // The workers live in this process: a reload keeps their token.
    let token = generated_token();
    let config = args.tuning.config(token.clone());
    let (reread, updates) = tokio::sync::watch::channel(Ok(config.clone()));
    let reread_token = token.clone();
    let read = move |cli: Cli| match cli.command {
        Command::Up(args) => Ok((
            up_view(&args),
            args.config.log_level.clone(),
            args.tuning.config(reread_token.clone()),
        )),
        _ => Err("the command line no longer names faafo up".to_owned()),
    };
    tokio::spawn(reload_on_hangup(
        up_view(&args),
        read,
        reread,
        shutdown.clone(),
    ));
    let service = LocalService::start(
        args.bind,
        tls,
        backing,
        workers,
        config,
        Some(updates),
        shutdown,
    )
    .await?;
    if args.probe_interval > 0.0 {
        let client = Client::new(&service.workers_url, RetryPolicy::default())
            .context("the probe's client")?
            .with_worker_token(token);
        tokio::spawn(crate::probe::in_process(
            client,
            std::time::Duration::from_secs_f64(args.probe_interval),
            service.shutdown.clone(),
        ));
    }
    announce(service.listener_address, https, "faafo is up")?;
    println!(
        "data in {}, {workers} worker(s); Ctrl-C stops",
        args.data_dir.display()
    );
    service.wait().await
}

/// The settings of `faafo up` that only a restart changes, as text to compare.
fn up_view(args: &UpArgs) -> Vec<(&'static str, String)> {
    vec![
        ("bind", args.bind.to_string()),
        ("data-dir", args.data_dir.display().to_string()),
        ("workers", format!("{:?}", args.workers)),
        ("probe-interval", args.probe_interval.to_string()),
        ("tls-cert", format!("{:?}", args.tls.tls_cert)),
        ("tls-key", format!("{:?}", args.tls.tls_key)),
    ]
}

/// Where a local service keeps its state.
#[derive(Debug)]
pub struct Backing {
    pub store: Arc<dyn Store>,
    pub images: Images,
}

impl Backing {
    /// The embedded default: SQLite and an image directory under `data_dir`.
    pub async fn embedded(data_dir: &Path) -> anyhow::Result<Backing> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let data_dir = data_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", data_dir.display()))?;
        let store = Arc::new(
            SqliteStore::open(data_dir.join("faafo.db"))
                .await
                .context("opening the database")?,
        );
        let images = Images::open(&format!("file://{}", data_dir.join("images").display()))
            .await
            .context("opening the image directory")?;
        Ok(Backing { store, images })
    }
}

/// The API and its workers in one process: what `faafo up` and the benchmarks run.
#[derive(Debug)]
pub struct LocalService {
    pub listener_address: SocketAddr,
    /// Where this process's own workers (and probe) reach the API: plain HTTP on loopback.
    pub workers_url: String,
    api: tokio::task::JoinHandle<std::io::Result<()>>,
    api_shutdown: CancellationToken,
    workers: TaskTracker,
    shutdown: CancellationToken,
}

impl LocalService {
    /// Starts serving, over HTTPS with `tls`; `shutdown` stops the workers first (they
    /// give back unfinished tasks through the API), then the API.
    pub async fn start(
        bind_address: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        backing: Backing,
        workers: usize,
        config: ApiConfig,
        reloads: Option<tokio::sync::watch::Receiver<faafo_api::reload::Reread>>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<LocalService> {
        let Backing { store, images } = backing;
        let listener = bind(bind_address).await?;
        let listener_address = listener.local_addr()?;
        let token = config.worker_token.clone();
        let mut config = config;
        config.advertise_url = Some(advertised_url(listener_address, tls.is_some(), None)?);
        let api_shutdown = CancellationToken::new();
        // Without reloads, the sender goes at once and the settings stay as started.
        let updates = reloads.unwrap_or_else(|| tokio::sync::watch::channel(Ok(config.clone())).1);
        let (api, workers_url) = match tls {
            None => {
                let api = tokio::spawn(faafo_api::serve_reloading(
                    listener,
                    store,
                    images,
                    config,
                    updates,
                    api_shutdown.clone(),
                ));
                (api, format!("http://{listener_address}"))
            }
            Some(tls) => {
                // The workers of this process come in on loopback, in plain HTTP: the
                // certificate is for the names the world uses.
                let loopback = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
                let workers_url = format!("http://{}", loopback.local_addr()?);
                let listener = crate::tls::BothListeners {
                    first: crate::tls::TlsListener::new(listener, tls)?,
                    second: loopback,
                };
                let api = tokio::spawn(faafo_api::serve_reloading(
                    listener,
                    store,
                    images,
                    config,
                    updates,
                    api_shutdown.clone(),
                ));
                (api, workers_url)
            }
        };

        let client = worker_client(&workers_url, token, None)?;
        let tracker = TaskTracker::new();
        let host = faafo_worker::host_name();
        for index in 1..=workers {
            let config = WorkerConfig::new(format!("{host}-up-{index}"));
            tracker.spawn(faafo_worker::run(
                Arc::clone(&client),
                config,
                shutdown.clone(),
            ));
        }
        tracker.close();
        Ok(LocalService {
            listener_address,
            workers_url,
            api,
            api_shutdown,
            workers: tracker,
            shutdown,
        })
    }

    /// Runs until `shutdown`, then stops the workers (they give back unfinished tasks
    /// through the API) and then the API.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            ended = &mut self.api => {
                self.shutdown.cancel();
                self.workers.wait().await;
                ended.context("the API task panicked")?.context("serving HTTP")?;
                bail!("the API stopped unexpectedly");
            }
        }
        self.workers.wait().await;
        self.api_shutdown.cancel();
        self.api
            .await
            .context("the API task panicked")?
            .context("serving HTTP")
    }
}

/// A worker's client: `ca`, the PEM of `--ca-cert`, is trusted besides the system's roots.
fn worker_client(
    endpoints: &str,
    token: WorkerToken,
    ca: Option<&[u8]>,
) -> anyhow::Result<Arc<Client>> {
    let mut client = Client::new(endpoints, RetryPolicy::default()).context("--endpoint-url")?;
    if let Some(pem) = ca {
        client = client.with_root_certificates(pem).context("--ca-cert")?;
    }
    Ok(Arc::new(client.with_worker_token(token)))
}

/// A fresh secret for workers that live in this process.
fn generated_token() -> WorkerToken {
    WorkerToken::new(format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    ))
}

/// Opens the store a `--database-url` names: `sqlite://PATH` or `postgres://...`.
/// How long an API waits at start for PostgreSQL to take writes before it gives up
/// (and its supervisor starts it again).
const STORE_WAIT_AT_START: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn open_store(url: &str, options: PostgresOptions) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // A failover in progress (a leader still promoting answers "does not allow
        // writes") passes in seconds: wait it out rather than exit at start.
        let deadline = std::time::Instant::now() + STORE_WAIT_AT_START;
        let mut pause = std::time::Duration::from_millis(250);
        loop {
            match PostgresStore::connect_with(url, options.clone()).await {
                Ok(store) => return Ok(Arc::new(store)),
                Err(error @ faafo_store::StoreError::Unavailable(_))
                    if std::time::Instant::now() + pause < deadline =>
                {
                    tracing::warn!(error = %format!("{:#}", anyhow::Error::from(error)), "PostgreSQL not ready; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(2));
                }
                Err(error) => return Err(error).context("connecting to PostgreSQL"),
            }
        }
    }
    if !options.patroni.is_empty() {
        bail!("--patroni needs a postgres:// --database-url");
    }
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"));
    let Some(path) = path.filter(|p| !p.is_empty()) else {
        bail!(
            "unsupported --database-url {url:?}: expected sqlite:///path/to/faafo.db or postgres://user@host[,host2]/db"
        );
    };
    if let Some(parent) = Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let store = SqliteStore::open(path)
        .await
        .with_context(|| format!("opening the database {path}"))?;
    Ok(Arc::new(store))
}

/// The URL a process lists itself under: the one given, else the bound address, with
/// this host's name in place of an unspecified (every-interface) address.
fn advertised_url(bound: SocketAddr, tls: bool, given: Option<String>) -> anyhow::Result<String> {
    if let Some(url) = given {
        let url = url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&url)
            .with_context(|| format!("--advertise-url {url:?} is not a URL"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            bail!("--advertise-url {url:?}: expected http://host:port");
        }
        return Ok(url);
    }
    let scheme = if tls { "https" } else { "http" };
    if bound.ip().is_unspecified() {
        return Ok(format!(
            "{scheme}://{}:{}",
            faafo_worker::host_name(),
            bound.port()
        ));
    }
    Ok(format!("{scheme}://{bound}"))
}

/// Listens on `address`. The sockets it accepts inherit TCP_NODELAY from it (Linux): an
/// answer written in two parts (headers, then a streamed body) otherwise waited for the
/// client's delayed ACK, 40 ms for an image on a reused connection.
async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = match address {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.set_nodelay(true)?;
        socket.bind(address)?;
        socket.listen(1024)
    };
    listen().with_context(|| {
        format!("cannot listen on {address} (is another faafo running? pass --bind)")
    })
}

/// Prints the address actually bound (port 0 picks one), first thing on stdout.
pub(crate) fn announce(address: SocketAddr, tls: bool, what: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let scheme = if tls { "https" } else { "http" };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{what}: listening on {scheme}://{address}")?;
    stdout.flush()?;
    Ok(())
}

/// Cancelled on SIGINT or SIGTERM.
pub(crate) fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let interrupt = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut terminate =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(signal) => signal,
                    Err(error) => {
                        tracing::error!(%error, "cannot listen for SIGTERM");
                        let _ = interrupt.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = interrupt.await;
        tracing::info!("shutting down");
        cancel.cancel();
    });
    token
}
