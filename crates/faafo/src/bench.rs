//! `faafo bench`: measurements that print figures (never asserted in tests).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use faafo_client::{Client, RetryPolicy};
use faafo_core::FractalState;
use faafo_core::wire::CreateFractal;
use tokio_util::sync::CancellationToken;

use crate::bench_report::Report;
use crate::roles::LocalService;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// End to end through `faafo up` in this process: create tasks, wait until all are done.
    E2e(E2eArgs),
    /// The renderer: the typical task mix, a heavy case and 9999x9999, scalar against SIMD.
    Render(RenderBenchArgs),
    /// The queue: tiny tasks end to end (tasks/s) and pickup latency, on SQLite or PostgreSQL.
    Queue(crate::queue_bench::QueueBenchArgs),
    /// The HTTP tiers under wrk: one fractal, the list, and the gateway, each beside
    /// haproxy doing the same on this machine (needs wrk; haproxy for the comparisons).
    Http(crate::http_bench::HttpBenchArgs),
}

#[derive(Debug, Args)]
pub struct RenderBenchArgs {
    /// Tasks in the typical mix.
    #[arg(long, default_value_t = 40)]
    tasks: u32,
    /// Seed of the typical mix.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Skip the 9999x9999 case (it takes a few seconds per engine).
    #[arg(long)]
    skip_large: bool,
    /// Rounds: each measures the ceiling and every case once, and the figures are the
    /// rounds' medians (on a shared machine one run's share of the ceiling moved by half).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
}

#[derive(Debug, Args)]
pub struct E2eArgs {
    /// Fractals to create and wait for.
    #[arg(long, default_value_t = 20)]
    tasks: u32,
    /// Width of each, in pixels.
    #[arg(long, default_value_t = 512)]
    width: u32,
    /// Height of each, in pixels.
    #[arg(long, default_value_t = 512)]
    height: u32,
    /// Iterations of each.
    #[arg(long, default_value_t = 256)]
    iterations: u32,
    /// Workers (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Seed of the random windows, so runs are comparable.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl BenchCommand {
    /// Runs the benchmark; with `json`, prints its figures as one JSON object.
    pub async fn run(self, json: bool) -> anyhow::Result<()> {
        let mut report = Report::new(json);
        match self {
            BenchCommand::E2e(args) => e2e(args, &mut report).await?,
            BenchCommand::Render(args) => crate::render_bench::run(&args.into(), &mut report)?,
            BenchCommand::Queue(args) => crate::queue_bench::run(args, &mut report).await?,
            BenchCommand::Http(args) => crate::http_bench::run(args, &mut report).await?,
        }
        report.finish()
    }
}

async fn e2e(args: E2eArgs, report: &mut Report) -> anyhow::Result<()> {
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let data = tempfile::tempdir().context("creating a scratch directory")?;
    let shutdown = CancellationToken::new();
    let config = faafo_api::ApiConfig::new(faafo_core::WorkerToken::new("bench"));
    let bind: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let backing = crate::roles::Backing::embedded(data.path()).await?;
    let service =
        LocalService::start(bind, None, backing, workers, config, None, shutdown.clone()).await?;
    let client = Client::new(
        &format!("http://{}", service.listener_address),
        RetryPolicy::default(),
    )?;

    let mut windows = OriginalWindows::new(args.seed);
    let started = Instant::now();
    let mut uuids = Vec::new();
    for _ in 0..args.tasks {
        let (xa, xb, ya, yb) = windows.next();
        let request = CreateFractal {
            uuid: Some(uuid::Uuid::new_v4()),
            width: args.width,
            height: args.height,
            iterations: args.iterations,
            xa,
            xb,
            ya,
            yb,
            cx: None,
            cy: None,
        };
        uuids.push(client.create(&request).await?.uuid);
    }
    let created = started.elapsed();
    let durations = loop {
        let page = client.list_page(1, 100).await?;
        let finished: Vec<_> = page
            .objects
            .iter()
            .filter(|f| f.state.is_finished())
            .collect();
        if let Some(failed) = finished.iter().find(|f| f.state == FractalState::Failed) {
            bail!(
                "fractal {} failed: {}",
                failed.uuid,
                failed.error.as_deref().unwrap_or("?")
            );
        }
        if finished.len() == uuids.len() {
            break finished
                .iter()
                .filter_map(|f| f.duration)
                .collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let wall = started.elapsed();
    shutdown.cancel();
    service.wait().await?;

    let mean = durations.iter().sum::<f64>() / durations.len() as f64;
    let max = durations.iter().copied().fold(0.0, f64::max);
    let throughput = f64::from(args.tasks) / wall.as_secs_f64();
    report.say(format!(
        "faafo bench e2e: {} tasks of {}x{}, {} iterations, {workers} worker(s), windows as the original client picks them",
        args.tasks, args.width, args.height, args.iterations
    ));
    report.say(format!(
        "  all done after      {:.3} s  (creates took {:.3} s)",
        wall.as_secs_f64(),
        created.as_secs_f64()
    ));
    report.say(format!("  throughput          {throughput:.1} tasks/s"));
    report.say(format!(
        "  render per task     mean {mean:.3} s, max {max:.3} s (reported by workers)"
    ));
    report.figure("workers", workers);
    report.figure("all_done_s", wall.as_secs_f64());
    report.figure("creates_s", created.as_secs_f64());
    report.figure("tasks_per_s", throughput);
    report.figure("render_mean_s", mean);
    report.figure("render_max_s", max);
    Ok(())
}

impl From<RenderBenchArgs> for crate::render_bench::Options {
    fn from(args: RenderBenchArgs) -> Self {
        crate::render_bench::Options {
            tasks: args.tasks,
            seed: args.seed,
            large: !args.skip_large,
            rounds: args.rounds,
        }
    }
}

/// Windows in the original client's default ranges: xa in [-4, -1], xb in [1, 4],
/// ya in [-3, -0.5], yb in [0.5, 3], from a seeded generator.
pub struct OriginalWindows(u64);

impl OriginalWindows {
    pub fn new(seed: u64) -> Self {
        OriginalWindows(seed)
    }

    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        low + (high - low) * ((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }

    pub fn next(&mut self) -> (f64, f64, f64, f64) {
        (
            self.uniform(-4.0, -1.0),
            self.uniform(1.0, 4.0),
            self.uniform(-3.0, -0.5),
            self.uniform(0.5, 3.0),
        )
    }
}
