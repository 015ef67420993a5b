//! The faafo worker: takes render tasks from the API over HTTP and uploads the PNGs.
//!
//! A worker never touches the database or the object store; it needs only API endpoints
//! and the worker token. It claims a task only when it can start it at once, keeps the
//! lease alive while rendering, and when an upload fails it retries the upload (on
//! another endpoint) rather than rendering again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use faafo_client::{Client, ClientError, LeaseOutcome, Upload};
use faafo_core::node::{HEARTBEAT_INTERVAL, VERSION};
use faafo_core::wire::LeaseGrant;
use faafo_core::{NodeBeat, NodeRole};
use faafo_render::{Engine, RenderError, render_png};
use tokio_util::sync::CancellationToken;

/// Settings of one worker loop.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Recorded as `generated_by` on the fractals this worker renders.
    pub name: String,
    pub engine: Engine,
    /// How long one lease request waits on the server for work.
    pub lease_wait: Duration,
    /// On shutdown, how long a render in progress may go on before it is abandoned and
    /// its task given back.
    pub shutdown_grace: Duration,
}

impl WorkerConfig {
    pub fn new(name: impl Into<String>) -> Self {
        WorkerConfig {
            name: name.into(),
            engine: Engine::default(),
            lease_wait: Duration::from_secs(20),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// The name a worker gets when none is given: the host, as the original showed it, and
/// the process id, so that several workers on one host can be told apart.
pub fn default_name() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

pub fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Takes and renders tasks until `shutdown` is cancelled, announcing itself in the
/// membership meanwhile.
pub async fn run(client: Arc<Client>, config: WorkerConfig, shutdown: CancellationToken) {
    tracing::info!(worker = %config.name, endpoints = ?client.endpoints(), "worker started");
    let done = Arc::new(AtomicU64::new(0));
    let stop_announcing = CancellationToken::new();
    let announcer = tokio::spawn(announce(
        Arc::clone(&client),
        config.name.clone(),
        Arc::clone(&done),
        stop_announcing.clone(),
    ));
    let mut backoff = Duration::from_millis(100);
    // A task that came with the answer to the previous upload.
    let mut next: Option<LeaseGrant> = None;
    loop {
        let grant = match next.take() {
            Some(grant) if shutdown.is_cancelled() => {
                give_back(&client, &grant).await;
                break;
            }
            Some(grant) => Ok(Some(grant)),
            None => tokio::select! {
                _ = shutdown.cancelled() => break,
                grant = client.lease(&config.name, config.lease_wait) => grant,
            },
        };
        match grant {
            Ok(Some(grant)) => {
                backoff = Duration::from_millis(100);
                if let TaskEnd::Done { next: following } =
                    run_task(&client, &config, grant, &shutdown).await
                {
                    done.fetch_add(1, Ordering::Relaxed);
                    next = following;
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(worker = %config.name, error = %error, "cannot get work; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    stop_announcing.cancel();
    let _ = announcer.await;
    tracing::info!(worker = %config.name, "worker stopped");
}

/// Heartbeats into the membership until `stop`, then says goodbye. Best effort: an API
/// without membership (404) or a failed beat only costs this worker its entry.
async fn announce(
    client: Arc<Client>,
    name: String,
    done: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        let beat = NodeBeat {
            id: name.clone(),
            role: NodeRole::Worker,
            address: None,
            version: VERSION.to_owned(),
            load: done.load(Ordering::Relaxed),
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            result = client.node_heartbeat(&beat) => {
                if let Err(error) = result {
                    tracing::debug!(worker = %name, %error, "heartbeat not recorded");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
        }
    }
    let goodbye = tokio::time::timeout(Duration::from_secs(2), client.node_leave(&name));
    if let Ok(Err(error)) = goodbye.await {
        tracing::debug!(worker = %name, %error, "goodbye not recorded");
    }
}

/// How a task ended, for the log.
#[derive(Debug)]
enum TaskEnd {
    /// Delivered; the upload's answer may have brought the worker's next task.
    Done {
        next: Option<LeaseGrant>,
    },
    LeaseLost(String),
    Released,
    Failed(String),
}

async fn run_task(
    client: &Arc<Client>,
    config: &WorkerConfig,
    grant: LeaseGrant,
    shutdown: &CancellationToken,
) -> TaskEnd {
    let uuid = grant.uuid;
    tracing::info!(fractal.uuid = %uuid, attempt = grant.attempt, width = grant.width, height = grant.height, iterations = grant.iterations, "rendering");
    let cancel = Arc::new(AtomicBool::new(false));
    let lease_lost = CancellationToken::new();
    let heartbeat = tokio::spawn(keep_lease(
        Arc::clone(client),
        grant.clone(),
        Arc::clone(&cancel),
        lease_lost.clone(),
    ));

    let end = render_and_upload(client, config, &grant, &cancel, &lease_lost, shutdown).await;
    heartbeat.abort();
    match &end {
        TaskEnd::Done { .. } => tracing::info!(fractal.uuid = %uuid, "uploaded"),
        TaskEnd::LeaseLost(why) => {
            tracing::warn!(fractal.uuid = %uuid, reason = %why, "lease lost; task abandoned")
        }
        TaskEnd::Released => tracing::info!(fractal.uuid = %uuid, "shutting down; task given back"),
        TaskEnd::Failed(why) => {
            tracing::warn!(fractal.uuid = %uuid, reason = %why, "render failed; reported")
        }
    }
    end
}

async fn render_and_upload(
    client: &Client,
    config: &WorkerConfig,
    grant: &LeaseGrant,
    cancel: &Arc<AtomicBool>,
    lease_lost: &CancellationToken,
    shutdown: &CancellationToken,
) -> TaskEnd {
    let params = grant.render_params();
    let engine = config.engine;
    let render_cancel = Arc::clone(cancel);
    let mut render = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let png = render_png(&params, engine, &render_cancel)?;
        // The recorded duration is the image's alone, as it always was.
        let duration = started.elapsed();
        let preview = params
            .preview()
            .map(|preview| render_png(&preview, engine, &render_cancel))
            .transpose()?;
        Ok::<_, RenderError>((png, duration, preview))
    });
    let rendered = tokio::select! {
        result = &mut render => result,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(config.shutdown_grace).await } => {
            cancel.store(true, Ordering::Relaxed);
            let _ = render.await;
            return give_back(client, grant).await;
        }
    };
    let (png, duration, preview) = match rendered {
        Ok(Ok(rendered)) => rendered,
        Ok(Err(RenderError::Cancelled)) => return TaskEnd::LeaseLost(lost_reason(lease_lost)),
        Ok(Err(error)) => {
            return report_failure(
                client,
                grant,
                &format!("{error}: {:?}", std::error::Error::source(&error)),
            )
            .await;
        }
        Err(join_error) => {
            return report_failure(
                client,
                grant,
                &format!("the renderer crashed: {join_error}"),
            )
            .await;
        }
    };
    // The preview goes first: the image's upload ends the lease. Without one, the
    // gallery shows the image itself, so a refused preview costs no work.
    if let Some(preview) = preview {
        let bytes = Bytes::from(preview.bytes);
        let send = || async {
            let outcome = client
                .upload_preview(
                    grant.uuid,
                    grant.lease_token,
                    bytes.clone(),
                    &preview.checksum,
                )
                .await?;
            Ok((outcome, ()))
        };
        match deliver(grant, lease_lost, shutdown, send).await {
            Delivery::Held(()) => {}
            Delivery::Abandoned(why) => return TaskEnd::LeaseLost(why),
            Delivery::Lost(why) => {
                tracing::warn!(fractal.uuid = %grant.uuid, reason = %why, "preview not taken")
            }
            Delivery::Refused(error) => {
                tracing::warn!(fractal.uuid = %grant.uuid, %error, "preview refused")
            }
        }
    }
    let upload = Upload {
        uuid: grant.uuid,
        lease_token: grant.lease_token,
        png: Bytes::from(png.bytes),
        checksum: &png.checksum,
        duration,
        generated_by: &config.name,
    };
    // A worker that goes on takes its next task with the upload's answer: one request
    // per task instead of two when work is queued.
    let send = || async {
        if shutdown.is_cancelled() {
            return Ok((client.upload(&upload).await?, None));
        }
        client.upload_and_take_next(&upload).await
    };
    match deliver(grant, lease_lost, shutdown, send).await {
        Delivery::Held(next) => TaskEnd::Done { next },
        Delivery::Lost(why) => already_ours(client, grant, &png.checksum, why).await,
        Delivery::Refused(error) => {
            report_failure(client, grant, &format!("upload refused: {error}")).await
        }
        Delivery::Abandoned(why) => TaskEnd::LeaseLost(why),
    }
}

/// How an upload ended.
enum Delivery<T> {
    /// The server took it, and answered with this.
    Held(T),
    /// The server said the lease moved on.
    Lost(String),
    /// The server refused it for what it is.
    Refused(ClientError),
    /// Given up: the lease is known lost, or the worker is stopping.
    Abandoned(String),
}

/// Sends an upload until the server answers it. The client fails over within its own
/// time bound; beyond it, keep trying until the lease is known to be lost, so a rendered
/// image is not thrown away for an outage.
async fn deliver<Sent, T>(
    grant: &LeaseGrant,
    lease_lost: &CancellationToken,
    shutdown: &CancellationToken,
    send: impl Fn() -> Sent,
) -> Delivery<T>
where
    Sent: std::future::Future<Output = Result<(LeaseOutcome, T), ClientError>>,
{
    loop {
        if lease_lost.is_cancelled() {
            return Delivery::Abandoned(lost_reason(lease_lost));
        }
        match send().await {
            Ok((LeaseOutcome::Held, answer)) => return Delivery::Held(answer),
            Ok((LeaseOutcome::Lost(why), _)) => return Delivery::Lost(why),
            Err(error @ ClientError::Api { .. }) => return Delivery::Refused(error),
            Err(error) => {
                tracing::warn!(fractal.uuid = %grant.uuid, error = %error, "upload failed; retrying");
                if shutdown.is_cancelled() {
                    return Delivery::Abandoned("shutting down with the API unreachable".into());
                }
            }
        }
    }
}

/// A refused upload may be our own earlier attempt that went through before its answer
/// was lost: then the fractal is done with our checksum, and all is well.
async fn already_ours(client: &Client, grant: &LeaseGrant, checksum: &str, why: String) -> TaskEnd {
    match client.get(grant.uuid).await {
        Ok(view) if view.checksum.as_deref() == Some(checksum) => TaskEnd::Done { next: None },
        _ => TaskEnd::LeaseLost(why),
    }
}

async fn give_back(client: &Client, grant: &LeaseGrant) -> TaskEnd {
    match client.release(grant.uuid, grant.lease_token).await {
        Ok(LeaseOutcome::Held) => TaskEnd::Released,
        Ok(LeaseOutcome::Lost(why)) => TaskEnd::LeaseLost(why),
        // The lease will expire and the task go to another worker.
        Err(error) => TaskEnd::LeaseLost(format!("could not give the task back: {error}")),
    }
}

async fn report_failure(client: &Client, grant: &LeaseGrant, reason: &str) -> TaskEnd {
    match client.fail(grant.uuid, grant.lease_token, reason).await {
        Ok(LeaseOutcome::Held) => TaskEnd::Failed(reason.to_owned()),
        Ok(LeaseOutcome::Lost(why)) => TaskEnd::LeaseLost(why),
        Err(error) => {
            TaskEnd::LeaseLost(format!("could not report the failure ({reason}): {error}"))
        }
    }
}

fn lost_reason(lease_lost: &CancellationToken) -> String {
    if lease_lost.is_cancelled() {
        "the server took the lease back".into()
    } else {
        "cancelled".into()
    }
}

/// Renews the lease every third of its length; when the server says it is gone (the
/// fractal was deleted, or the lease expired and moved on), stops the render.
async fn keep_lease(
    client: Arc<Client>,
    grant: LeaseGrant,
    cancel: Arc<AtomicBool>,
    lease_lost: CancellationToken,
) {
    let period = Duration::from_millis(grant.lease_ms / 3).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(period).await;
        match client.heartbeat(grant.uuid, grant.lease_token).await {
            Ok(LeaseOutcome::Held) => {}
            Ok(LeaseOutcome::Lost(why)) => {
                tracing::warn!(fractal.uuid = %grant.uuid, reason = %why, "lease lost; stopping the render");
                lease_lost.cancel();
                cancel.store(true, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                tracing::warn!(fractal.uuid = %grant.uuid, error = %error, "heartbeat failed; will retry")
            }
        }
    }
}
