//! `faafo probe`: a synthetic user. Each round creates a small fractal under a fresh uuid,
//! waits until it is done, downloads the image, checks it against the record's sha256 and
//! against a local render of the same record (a check no outside monitor can make), and
//! deletes it. Each step is timed; the outcome goes to the log, to `/metrics` (`--bind`),
//! or, with `--once`, to stdout and the exit status.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use clap::Args;
use faafo_client::Client;
use faafo_core::FractalState;
use faafo_core::node::{ProbeOutcome, ProbeReports};
use faafo_core::wire::{CreateFractal, FractalView};
use faafo_render::{JuliaParams, Kernel, PALETTE, column_coordinates, decode_indexed, render_rows};
use prometheus::{Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client_cli::Output;

#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArgs,
    /// Seconds between the starts of two probes.
    #[arg(long, default_value_t = 30.0, value_parser = crate::cli::positive_seconds)]
    pub interval: f64,
    /// Run one probe, print its steps and exit: 0 when it succeeded, 1 when it did not.
    #[arg(long)]
    pub once: bool,
    /// Serve the probe's metrics at /metrics on this address (port 0 picks one).
    #[arg(long, conflicts_with = "once")]
    pub bind: Option<SocketAddr>,
    /// Seconds one probe may take from its create to its image before it counts as failed.
    #[arg(long, default_value_t = DEFAULT_DEADLINE_S, value_parser = crate::cli::positive_seconds)]
    pub deadline: f64,
    /// Width and height of the probe's fractal: small, so that probing costs the service
    /// little.
    #[arg(long, default_value_t = DEFAULT_SIZE, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub size: u32,
    /// Iterations of the probe's fractal.
    #[arg(long, default_value_t = DEFAULT_ITERATIONS, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub iterations: u32,
    /// With the deployment's worker token, the probe reports each round to the service,
    /// whose status page (/status) plots the last hour. Rounds it could not report (the
    /// service was down) go with the next report.
    #[arg(long, env = "FAAFO_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// The probe's name on the status page (default: host name and process id).
    #[arg(long)]
    pub name: Option<String>,
}

/// A probe's defaults: a round may take a minute; its fractal is small and quick.
const DEFAULT_DEADLINE_S: f64 = 60.0;
const DEFAULT_SIZE: u32 = 64;
const DEFAULT_ITERATIONS: u32 = 64;

/// Rounds kept for a report while the service cannot take them (an hour at 10 s).
const UNREPORTED_MAX: usize = 360;

/// The steps of one probe, in order.
const STEPS: [&str; 5] = ["create", "render", "download", "verify", "delete"];

/// How one probe went: each finished step's time, and the step that failed, if one did.
#[derive(Debug, Serialize)]
pub struct ProbeReport {
    pub uuid: Uuid,
    pub ok: bool,
    /// Seconds, per step finished.
    pub steps: Vec<(String, f64)>,
    pub total_seconds: f64,
    /// When it ended, in milliseconds since the Unix epoch.
    pub finished_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProbeReport {
    /// The round as the service keeps it.
    fn outcome(&self) -> ProbeOutcome {
        ProbeOutcome {
            finished_at_ms: self.finished_at_ms,
            ok: self.ok,
            total_ms: self.total_seconds * 1e3,
            failed_step: self.failed_step.clone(),
        }
    }

    fn summary(&self) -> String {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(step, seconds)| format!("{step} {:.1} ms", seconds * 1e3))
            .collect();
        match (&self.failed_step, &self.error) {
            (Some(step), Some(error)) => format!(
                "probe {} FAILED at {step}: {error} (after {})",
                self.uuid,
                if steps.is_empty() {
                    "nothing".to_owned()
                } else {
                    steps.join(", ")
                }
            ),
            _ => format!(
                "probe {} ok in {:.1} ms: {}",
                self.uuid,
                self.total_seconds * 1e3,
                steps.join(", ")
            ),
        }
    }
}

pub async fn run(client: Client, args: ProbeArgs, output: &Output) -> anyhow::Result<()> {
    let reporting = args.worker_token.is_some() && !args.once;
    let client = match args.worker_token {
        Some(token) => client.with_worker_token(faafo_core::WorkerToken::new(token)),
        None => client,
    };
    let name = args
        .name
        .unwrap_or_else(|| format!("probe-{}", faafo_worker::default_name()));
    let prober = Prober {
        client,
        deadline: Duration::from_secs_f64(args.deadline),
        size: args.size,
        iterations: args.iterations,
    };
    if args.once {
        let report = prober.probe().await;
        if output.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("{}", report.summary());
        }
        if !report.ok {
            bail!("the probe failed");
        }
        return Ok(());
    }
    let metrics = Arc::new(ProbeMetrics::new());
    let shutdown = crate::roles::shutdown_on_signal();
    let server = match args.bind {
        Some(address) => {
            Some(serve_metrics(address, Arc::clone(&metrics), shutdown.clone()).await?)
        }
        None => None,
    };
    let interval = Duration::from_secs_f64(args.interval);
    keep_probing(
        &prober,
        &name,
        interval,
        reporting,
        Some(&metrics),
        &shutdown,
    )
    .await;
    if let Some(server) = server {
        server.await.context("the metrics server")??;
    }
    Ok(())
}

/// The probe `faafo up` runs in its own process: a round every `interval` through the
/// service's own listener, reported to it with the workers' token, so that its status page
/// has the users' view. Runs until `shutdown`.
pub async fn in_process(client: Client, interval: Duration, shutdown: CancellationToken) {
    let prober = Prober {
        client,
        deadline: Duration::from_secs_f64(DEFAULT_DEADLINE_S),
        size: DEFAULT_SIZE,
        iterations: DEFAULT_ITERATIONS,
    };
    let name = format!("{}-up-probe", faafo_worker::host_name());
    // Its rounds go to the status page; it serves no metrics of its own.
    keep_probing(&prober, &name, interval, true, None, &shutdown).await;
}

/// A round every `interval` until `shutdown`: each goes to the log and to `metrics` (when
/// served), and
/// with `reporting` to the service (rounds it could not take go with the next report).
async fn keep_probing(
    prober: &Prober,
    name: &str,
    interval: Duration,
    reporting: bool,
    metrics: Option<&ProbeMetrics>,
    shutdown: &CancellationToken,
) {
    let mut unreported: Vec<ProbeOutcome> = Vec::new();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let report = tokio::select! {
            _ = shutdown.cancelled() => break,
            report = prober.probe() => report,
        };
        if let Some(metrics) = metrics {
            metrics.record(&report);
        }
        if report.ok {
            tracing::info!("{}", report.summary());
        } else {
            tracing::warn!("{}", report.summary());
        }
        if reporting {
            unreported.push(report.outcome());
            if unreported.len() > UNREPORTED_MAX {
                unreported.remove(0);
            }
            let reports = ProbeReports {
                probe: name.to_owned(),
                outcomes: unreported.clone(),
            };
            match prober.client.report_probes(&reports).await {
                Ok(()) => unreported.clear(),
                Err(error) => {
                    tracing::debug!(%error, pending = unreported.len(), "round not reported yet")
                }
            }
        }
    }
}

struct Prober {
    client: Client,
    deadline: Duration,
    size: u32,
    iterations: u32,
}

impl Prober {
    /// One probe, start to end. Whatever happens, the probe's fractal is deleted.
    async fn probe(&self) -> ProbeReport {
        let uuid = Uuid::new_v4();
        let started = Instant::now();
        let mut steps = Vec::new();
        let outcome = self.steps(uuid, &mut steps).await;
        let (failed_step, error) = match outcome {
            Ok(()) => (None, None),
            Err((step, error)) => {
                // Best effort: the fractal may not exist, or the service may be down.
                let _ = self.client.delete(uuid).await;
                (Some(step.to_owned()), Some(format!("{error:#}")))
            }
        };
        ProbeReport {
            uuid,
            ok: failed_step.is_none(),
            steps,
            total_seconds: started.elapsed().as_secs_f64(),
            finished_at_ms: faafo_core::unix_millis(),
            failed_step,
            error,
        }
    }

    async fn steps(
        &self,
        uuid: Uuid,
        steps: &mut Vec<(String, f64)>,
    ) -> Result<(), (&'static str, anyhow::Error)> {
        let deadline = Instant::now() + self.deadline;
        let [create, render, download, verify, delete] = STEPS;
        let mut timed = Timer { steps };

        let request = CreateFractal {
            uuid: Some(uuid),
            width: self.size,
            height: self.size,
            iterations: self.iterations,
            xa: -1.5,
            xb: 1.5,
            ya: -1.5,
            yb: 1.5,
            cx: None,
            cy: None,
        };
        timed
            .step(create, self.client.create(&request))
            .await
            .map_err(|e| (create, e.into()))?;
        let done = timed
            .step(render, self.wait_until_done(uuid, deadline))
            .await
            .map_err(|e| (render, e))?;
        let image = timed
            .step(download, self.client.image(uuid))
            .await
            .map_err(|e| (download, e.into()))?;
        timed
            .step(verify, async { check_image(&done, &image) })
            .await
            .map_err(|e| (verify, e))?;
        timed
            .step(delete, self.client.delete(uuid))
            .await
            .map_err(|e| (delete, e.into()))?;
        Ok(())
    }

    /// Polls the fractal until it is done, briefly at first and less often after.
    async fn wait_until_done(&self, uuid: Uuid, deadline: Instant) -> anyhow::Result<FractalView> {
        let mut pause = Duration::from_millis(20);
        loop {
            let view = self.client.get(uuid).await?;
            match view.state {
                FractalState::Done => return Ok(view),
                FractalState::Failed => bail!(
                    "the service gave up on it: {}",
                    view.error.as_deref().unwrap_or("no reason given")
                ),
                _ if Instant::now() + pause > deadline => bail!(
                    "not done within {:.0} s (still {})",
                    self.deadline.as_secs_f64(),
                    view.state
                ),
                _ => tokio::time::sleep(pause).await,
            }
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }
}

/// Records how long each step took.
struct Timer<'a> {
    steps: &'a mut Vec<(String, f64)>,
}

impl Timer<'_> {
    async fn step<T, E>(
        &mut self,
        name: &str,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = work.await?;
        self.steps
            .push((name.to_owned(), started.elapsed().as_secs_f64()));
        Ok(result)
    }
}

/// The image must match the record's checksum and hold, pixel for pixel, what the
/// reference renderer makes of the record. (Pixels, not bytes: another release's encoder
/// may write the same pixels differently, and the probe must not fail while the workers
/// and it run different releases.)
fn check_image(view: &FractalView, image: &[u8]) -> anyhow::Result<()> {
    let checksum = hex::encode(Sha256::digest(image));
    let recorded = view
        .checksum
        .as_deref()
        .ok_or_else(|| anyhow!("the done fractal has no checksum"))?;
    if checksum != recorded {
        bail!("the image's sha256 is {checksum}, the record says {recorded}");
    }
    let params = JuliaParams {
        width: view.width,
        height: view.height,
        iterations: view.iterations,
        xa: view.xa,
        xb: view.xb,
        ya: view.ya,
        yb: view.yb,
        cx: view.cx,
        cy: view.cy,
    };
    let decoded = decode_indexed(image).context("decoding the image")?;
    if (decoded.width, decoded.height) != (params.width, params.height) {
        bail!(
            "the image is {}x{}, its record {}x{}",
            decoded.width,
            decoded.height,
            params.width,
            params.height
        );
    }
    if decoded.palette != PALETTE {
        bail!("the image's palette is not faafo's 32 colours");
    }
    let mut reference = vec![0; decoded.indices.len()];
    render_rows(
        &params,
        Kernel::Scalar,
        &column_coordinates(&params),
        0,
        &mut reference,
    );
    if let Some(pixel) = reference
        .iter()
        .zip(&decoded.indices)
        .position(|(a, b)| a != b)
    {
        let width = params.width as usize;
        bail!(
            "the image differs from the reference render of its record, first at pixel ({}, {}) (sha256 {checksum})",
            pixel % width,
            pixel / width
        );
    }
    Ok(())
}

/// What `/metrics` of a running probe shows.
struct ProbeMetrics {
    registry: Registry,
    probes: IntCounterVec,
    failures: IntCounterVec,
    step_seconds: HistogramVec,
    success: Gauge,
    last_success: Gauge,
}

impl ProbeMetrics {
    fn new() -> ProbeMetrics {
        let registry =
            Registry::new_custom(Some("faafo_probe".into()), None).expect("static prefix");
        let probes = IntCounterVec::new(
            Opts::new("runs_total", "Probes run, by outcome (ok, failed)"),
            &["outcome"],
        )
        .expect("static metric");
        let failures = IntCounterVec::new(
            Opts::new("failures_total", "Failed probes, by the step that failed"),
            &["step"],
        )
        .expect("static metric");
        let step_seconds = HistogramVec::new(
            HistogramOpts::new(
                "step_duration_seconds",
                "Time of each step of the probes that reached it, and of whole successful probes (step=total)",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 16).expect("static buckets")),
            &["step"],
        )
        .expect("static metric");
        let success = Gauge::new("success", "1 when the latest probe succeeded, else 0")
            .expect("static metric");
        let last_success = Gauge::new(
            "last_success_timestamp_seconds",
            "When the latest successful probe ended (Unix time)",
        )
        .expect("static metric");
        for collector in [
            Box::new(probes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(step_seconds.clone()),
            Box::new(success.clone()),
            Box::new(last_success.clone()),
        ] {
            registry.register(collector).expect("registered once");
        }
        // Every series exists from the start, so that rates and alerts see zeros.
        for outcome in ["ok", "failed"] {
            probes.with_label_values(&[outcome]);
        }
        for step in STEPS {
            failures.with_label_values(&[step]);
        }
        ProbeMetrics {
            registry,
            probes,
            failures,
            step_seconds,
            success,
            last_success,
        }
    }

    fn record(&self, report: &ProbeReport) {
        for (step, seconds) in &report.steps {
            self.step_seconds
                .with_label_values(&[step.as_str()])
                .observe(*seconds);
        }
        match &report.failed_step {
            None => {
                self.probes.with_label_values(&["ok"]).inc();
                self.step_seconds
                    .with_label_values(&["total"])
                    .observe(report.total_seconds);
                self.success.set(1.0);
                self.last_success.set(report.finished_at_ms as f64 / 1e3);
            }
            Some(step) => {
                self.probes.with_label_values(&["failed"]).inc();
                self.failures.with_label_values(&[step.as_str()]).inc();
                self.success.set(0.0);
            }
        }
    }
}

async fn serve_metrics(
    address: SocketAddr,
    metrics: Arc<ProbeMetrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    crate::roles::announce(listener.local_addr()?, false, "faafo probe")?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
    Ok(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }))
}

async fn metrics_text(State(metrics): State<Arc<ProbeMetrics>>) -> impl IntoResponse {
    let mut body = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    // Encoding our own registry into memory cannot fail.
    let _ = encoder.encode(&metrics.registry.gather(), &mut body);
    (
        [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
        body,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use faafo_render::{Engine, render_png};

    use super::*;

    fn view_of(params: &JuliaParams, checksum: &str) -> FractalView {
        FractalView {
            uuid: Uuid::new_v4(),
            width: params.width,
            height: params.height,
            iterations: params.iterations,
            xa: params.xa,
            xb: params.xb,
            ya: params.ya,
            yb: params.yb,
            checksum: Some(checksum.to_owned()),
            size: None,
            duration: None,
            generated_by: None,
            url: None,
            cx: params.cx,
            cy: params.cy,
            state: FractalState::Done,
            attempts: 1,
            created_at: String::new(),
            finished_at: None,
            error: None,
        }
    }

    fn params(iterations: u32) -> JuliaParams {
        JuliaParams {
            width: 40,
            height: 30,
            iterations,
            xa: -1.5,
            xb: 1.5,
            ya: -1.5,
            yb: 1.5,
            cx: -0.8,
            cy: 0.156,
        }
    }

    /// The same pixels as faafo renders them, written with another PNG filter.
    fn encoded_otherwise(params: &JuliaParams) -> Vec<u8> {
        let pixels = decode_indexed(&rendered(params).bytes).unwrap().indices;
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, params.width, params.height);
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_palette(&PALETTE[..]);
        encoder.set_filter(png::Filter::Paeth);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&pixels).unwrap();
        writer.finish().unwrap();
        bytes
    }

    fn rendered(params: &JuliaParams) -> faafo_render::RenderedPng {
        render_png(params, Engine::Auto, &AtomicBool::new(false)).unwrap()
    }

    #[test]
    fn the_image_of_the_record_passes() {
        let image = rendered(&params(64));
        check_image(&view_of(&params(64), &image.checksum), &image.bytes).unwrap();
    }

    #[test]
    fn an_image_that_does_not_match_its_checksum_fails() {
        let image = rendered(&params(64));
        let error = check_image(&view_of(&params(64), &"0".repeat(64)), &image.bytes)
            .unwrap_err()
            .to_string();
        assert!(error.contains("the record says 000"), "{error}");
    }

    /// Another release of the workers may encode the same pixels into other bytes.
    #[test]
    fn the_pixels_of_the_record_in_other_bytes_pass() {
        let otherwise = encoded_otherwise(&params(64));
        assert_ne!(otherwise, rendered(&params(64)).bytes);
        let checksum = hex::encode(Sha256::digest(&otherwise));
        check_image(&view_of(&params(64), &checksum), &otherwise).unwrap();
    }

    #[test]
    fn an_image_that_is_not_an_indexed_png_fails() {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, 40, 30);
        encoder.set_color(png::ColorType::Grayscale);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[0; 40 * 30]).unwrap();
        writer.finish().unwrap();
        let checksum = hex::encode(Sha256::digest(&bytes));
        let error = format!(
            "{:#}",
            check_image(&view_of(&params(64), &checksum), &bytes).unwrap_err()
        );
        assert!(error.contains("not an 8-bit PNG with a palette"), "{error}");
    }

    /// The checksum matches the bytes, but the bytes are not this record's fractal: what
    /// a worker rendering wrongly (or an image stored under the wrong record) looks like.
    #[test]
    fn an_image_of_another_fractal_fails_even_with_its_own_checksum() {
        let other = rendered(&params(65));
        let error = check_image(&view_of(&params(64), &other.checksum), &other.bytes)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("differs from the reference render"),
            "{error}"
        );
    }
}
