//! `faafo bench queue`: end-to-end throughput of tiny tasks and pickup latency, through
//! the real API (HTTP), on SQLite or PostgreSQL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use faafo_api::{ApiConfig, Images};
use faafo_client::{Client, LeaseOutcome, RetryPolicy, Upload};
use faafo_core::WorkerToken;
use faafo_core::wire::{CreateFractal, LeaseGrant};
use faafo_render::{Engine, render_png};
use faafo_store::PostgresOptions;
use faafo_store::Wakeups;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bench_report::{Report, median};
use crate::roles::{Backing, LocalService, open_store};

#[derive(Debug, Args)]
pub struct QueueBenchArgs {
    /// The store to measure (default: a temporary SQLite file). A PostgreSQL database
    /// should be empty or disposable: the benchmark adds rows to it.
    #[arg(long)]
    database_url: Option<String>,
    /// Tiny tasks per throughput run.
    #[arg(long, default_value_t = 2000)]
    tasks: u32,
    /// Worker counts to measure, comma-separated.
    #[arg(long, default_value = "1,4", value_delimiter = ',')]
    workers: Vec<usize>,
    /// Tasks created one at a time, every worker parked in a lease request, for the
    /// pickup latency.
    #[arg(long, default_value_t = 300)]
    latency_samples: u32,
    /// Where the images (and the default SQLite file) go. Default: /dev/shm when it
    /// exists, so the figures measure the queue rather than the disk's file creation.
    #[arg(long)]
    scratch_dir: Option<std::path::PathBuf>,
    /// API instances on the one store: with 2, tasks are created through the first and
    /// the workers wait on the second, so every pickup is a wake-up that crosses API
    /// processes (as behind `faafo cluster`'s gateways).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    instances: u8,
    /// Rounds: each measures every worker count once, in turn, and the figures are the
    /// rounds' medians (identical runs on PostgreSQL differ by 15-20% here).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
}

const TOKEN: &str = "queue-bench";

pub async fn run(args: QueueBenchArgs, report: &mut Report) -> anyhow::Result<()> {
    let store_name = match &args.database_url {
        Some(url) if url.starts_with("postgres") => "postgresql",
        Some(_) => "sqlite",
        None => "sqlite (temporary file)",
    };
    let scratch_root = args.scratch_dir.clone().unwrap_or_else(|| {
        let shm = std::path::PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    report.say(format!(
        "faafo bench queue: {store_name}, tiny tasks (8x8 pixels, 1 iteration), through the HTTP API in this process"
    ));
    report.say(format!(
        "  images (and a default SQLite file) under {}",
        scratch_root.display()
    ));
    report.say(
        "  tasks/s: create -> lease -> upload -> done; pickup: idle workers, create sent -> lease received; medians of the rounds\n  workers   tasks/s   pickup p50 / p99        tasks/s of each round",
    );
    if args.instances > 1 {
        report.say("  tasks created through one API instance, workers waiting on another");
    }
    report.figure("store", store_name);
    report.figure("instances", args.instances);
    report.figure("rounds", args.rounds);
    // Per worker count, what each round measured.
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); args.workers.len()];
    for _ in 0..args.rounds {
        for (&workers, measured) in args.workers.iter().zip(&mut rounds) {
            measured.push(measure(&args, &scratch_root, workers).await?);
        }
    }
    for (&workers, measured) in args.workers.iter().zip(&rounds) {
        let figure =
            |pick: fn(&Round) -> f64| median(&measured.iter().map(pick).collect::<Vec<_>>());
        let throughput = figure(|round| round.tasks_per_s);
        let (p50, p99) = (
            figure(|round| round.pickup_p50.as_secs_f64() * 1e3),
            figure(|round| round.pickup_p99.as_secs_f64() * 1e3),
        );
        let each: Vec<String> = measured
            .iter()
            .map(|round| format!("{:.0}", round.tasks_per_s))
            .collect();
        report.say(format!(
            "  {workers:>7}  {throughput:>8.0}  {p50:>6.2} ms / {p99:>6.2} ms   {}",
            each.join(" ")
        ));
        let at = |figure: &str| format!("workers_{workers}.{figure}");
        report.figure(&at("tasks_per_s"), throughput);
        report.figure(&at("pickup_p50_ms"), p50);
        report.figure(&at("pickup_p99_ms"), p99);
    }
    Ok(())
}

/// What one round measured for one worker count.
#[derive(Debug, Clone, Copy)]
struct Round {
    tasks_per_s: f64,
    pickup_p50: Duration,
    pickup_p99: Duration,
}

/// One round for one worker count: a fresh store (a new SQLite file; the same PostgreSQL
/// database), API instances and workers.
async fn measure(
    args: &QueueBenchArgs,
    scratch_root: &std::path::Path,
    workers: usize,
) -> anyhow::Result<Round> {
    let scratch = tempfile::tempdir_in(scratch_root)?;
    let url = match &args.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", scratch.path().join("faafo.db").display()),
    };
    let shutdown = CancellationToken::new();
    let mut services = Vec::new();
    for _ in 0..args.instances {
        // Each instance with a store of its own, as separate processes would have.
        let store = open_store(&url, PostgresOptions::new(Wakeups::ListenNotify)).await?;
        let images = Images::open(&format!(
            "file://{}",
            scratch.path().join("images").display()
        ))
        .await?;
        let bind: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        services.push(
            LocalService::start(
                bind,
                None,
                Backing { store, images },
                0,
                ApiConfig::new(WorkerToken::new(TOKEN)),
                None,
                shutdown.clone(),
            )
            .await?,
        );
    }
    let endpoint = |service: &LocalService| format!("http://{}", service.listener_address);
    let creates = endpoint(&services[0]);
    let leases = endpoint(services.last().expect("one instance at least"));
    let bench = Bench::start(&creates, &leases, workers)?;

    let throughput = bench.throughput(args.tasks).await?;
    let (p50, p99) = bench.pickup_latency(args.latency_samples).await?;
    bench.stop().await;
    shutdown.cancel();
    for service in services {
        service.wait().await?;
    }
    Ok(Round {
        tasks_per_s: throughput,
        pickup_p50: p50,
        pickup_p99: p99,
    })
}

/// Bench workers: lease, render the tiny PNG, upload, report.
struct Bench {
    /// Creates tasks.
    client: Arc<Client>,
    /// The API instance the workers wait on, and how many there are.
    lease_endpoint: String,
    worker_count: usize,
    leases: tokio::sync::Mutex<mpsc::UnboundedReceiver<(Uuid, Instant)>>,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Bench {
    fn start(creates: &str, lease_endpoint: &str, worker_count: usize) -> anyhow::Result<Bench> {
        let client = Arc::new(Client::new(creates, RetryPolicy::default())?);
        let worker_client = Arc::new(
            Client::new(lease_endpoint, RetryPolicy::default())?
                .with_worker_token(WorkerToken::new(TOKEN)),
        );
        let (sender, leases) = mpsc::unbounded_channel();
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..worker_count)
            .map(|index| {
                let (client, sender, done, stop) = (
                    Arc::clone(&worker_client),
                    sender.clone(),
                    Arc::clone(&done),
                    Arc::clone(&stop),
                );
                tokio::spawn(async move {
                    let name = format!("bench-{index}");
                    // As faafo's worker does: the next task comes with the upload's answer
                    // when one is queued, else from a long poll.
                    let mut next = None;
                    while !stop.load(Ordering::Relaxed) {
                        let grant = match next.take() {
                            Some(grant) => grant,
                            None => match client.lease(&name, Duration::from_millis(500)).await? {
                                Some(grant) => grant,
                                None => continue,
                            },
                        };
                        let _ = sender.send((grant.uuid, Instant::now()));
                        next = finish(&client, &grant, &name).await?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        Ok(Bench {
            client,
            lease_endpoint: lease_endpoint.to_owned(),
            worker_count,
            leases: tokio::sync::Mutex::new(leases),
            done,
            stop,
            workers,
        })
    }

    /// Creates `tasks` tasks from 8 concurrent creators and waits until all are done.
    async fn throughput(&self, tasks: u32) -> anyhow::Result<f64> {
        let start_count = self.done.load(Ordering::Relaxed);
        let started = Instant::now();
        let creators: Vec<_> = (0..8)
            .map(|creator| {
                let client = Arc::clone(&self.client);
                tokio::spawn(async move {
                    for _ in (creator..tasks).step_by(8) {
                        client.create(&tiny_task()).await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for creator in creators {
            creator.await.context("creator panicked")??;
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.done.load(Ordering::Relaxed) - start_count < u64::from(tasks) {
            if Instant::now() > deadline {
                bail!("tasks did not finish within 5 minutes");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = started.elapsed();
        // Drain the lease log of this phase.
        let mut leases = self.leases.lock().await;
        while leases.try_recv().is_ok() {}
        Ok(f64::from(tasks) / elapsed.as_secs_f64())
    }

    /// Creates tasks one at a time and times each until a worker holds it.
    async fn pickup_latency(&self, samples: u32) -> anyhow::Result<(Duration, Duration)> {
        let mut leases = self.leases.lock().await;
        let mut early: HashMap<Uuid, Instant> = HashMap::new();
        let mut latencies = Vec::with_capacity(samples as usize);
        for _ in 0..samples {
            self.all_workers_parked().await?;
            let task = tiny_task();
            let uuid = task.uuid.expect("tiny tasks carry a uuid");
            let sent = Instant::now();
            self.client.create(&task).await?;
            let leased = loop {
                if let Some(at) = early.remove(&uuid) {
                    break at;
                }
                let (leased, at) = tokio::time::timeout(Duration::from_secs(30), leases.recv())
                    .await
                    .context("no worker took the task within 30 s")?
                    .context("the workers stopped")?;
                if leased == uuid {
                    break at;
                }
                early.insert(leased, at);
            };
            latencies.push(leased.saturating_duration_since(sent));
        }
        latencies.sort();
        let percentile = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
        Ok((percentile(0.50), percentile(0.99)))
    }

    /// Waits until every worker is parked in a lease request, so that a pickup measures
    /// a wake-up rather than a worker coming back from its previous task.
    async fn all_workers_parked(&self) -> anyhow::Result<()> {
        let metrics = format!("{}/metrics", self.lease_endpoint);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let page = reqwest::get(&metrics).await?.text().await?;
            let waiting = page.lines().find_map(|line| {
                line.strip_prefix("faafo_lease_requests_waiting ")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            });
            if waiting.is_some_and(|n| n >= self.worker_count as f64) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the workers were not all waiting for work within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            if let Ok(Err(error)) = worker.await {
                tracing::warn!(%error, "bench worker failed");
            }
        }
    }
}

fn tiny_task() -> CreateFractal {
    CreateFractal {
        uuid: Some(Uuid::new_v4()),
        width: 8,
        height: 8,
        iterations: 1,
        xa: -2.0,
        xb: 2.0,
        ya: -2.0,
        yb: 2.0,
        cx: Some(0.0),
        cy: Some(0.0),
    }
}

/// Renders and uploads a task; returns the next one if the upload's answer brought it.
async fn finish(
    client: &Client,
    grant: &LeaseGrant,
    name: &str,
) -> anyhow::Result<Option<LeaseGrant>> {
    let params = grant.render_params();
    let started = Instant::now();
    let png = render_png(&params, Engine::Auto, &AtomicBool::new(false))?;
    let upload = Upload {
        uuid: grant.uuid,
        lease_token: grant.lease_token,
        png: Bytes::from(png.bytes),
        checksum: &png.checksum,
        duration: started.elapsed(),
        generated_by: name,
    };
    match client.upload_and_take_next(&upload).await? {
        (LeaseOutcome::Held, next) => Ok(next),
        (LeaseOutcome::Lost(why), _) => bail!("upload refused: {why}"),
    }
}
