//! Prometheus metrics of one API process.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use faafo_core::FractalState;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::AppState;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    pub render_seconds: HistogramVec,
    pub leases_granted: IntCounter,
    pub lease_expiries: IntCounter,
    /// Lease requests parked waiting for work: idle worker capacity.
    pub lease_waiters: IntGauge,
    fractals: IntGaugeVec,
    queue_depth: IntGauge,
    oldest_queued_seconds: prometheus::Gauge,
    /// Creates refused by a client limit, by limit.
    limited: IntCounterVec,
    /// Uploads' lease checks, by what answered.
    lease_checks: IntCounterVec,
    /// Configuration reloads, by outcome.
    reloads: IntCounterVec,
    /// Every request answered, for the membership heartbeat's load figure.
    served: std::sync::atomic::AtomicU64,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("faafo".into()), None)
            .expect("static metric prefix is valid");
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["method", "route", "status"],
        )
        .expect("static metric definition");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["method", "route"],
        )
        .expect("static metric definition");
        let render_seconds = HistogramVec::new(
            HistogramOpts::new("render_duration_seconds", "Render time reported by workers")
                .buckets(prometheus::exponential_buckets(0.001, 2.5, 14).expect("static buckets")),
            &["worker"],
        )
        .expect("static metric definition");
        let leases_granted =
            IntCounter::new("leases_granted_total", "Tasks handed to workers").expect("static");
        let lease_expiries = IntCounter::new(
            "lease_expiries_total",
            "Leases that expired without a result",
        )
        .expect("static");
        let lease_waiters = IntGauge::new(
            "lease_requests_waiting",
            "Lease requests waiting for work (idle workers)",
        )
        .expect("static");
        let fractals = IntGaugeVec::new(Opts::new("fractals", "Fractals by state"), &["state"])
            .expect("static metric definition");
        let queue_depth =
            IntGauge::new("queue_depth", "Tasks waiting for a worker").expect("static");
        let oldest_queued_seconds = prometheus::Gauge::new(
            "queue_oldest_age_seconds",
            "Age of the oldest task waiting for a worker",
        )
        .expect("static");
        let limited = IntCounterVec::new(
            Opts::new(
                "creates_limited_total",
                "Creates refused with 429 by a client limit (create_rate, max_queued_work)",
            ),
            &["limit"],
        )
        .expect("static metric definition");
        let lease_checks = IntCounterVec::new(
            Opts::new(
                "upload_lease_checks_total",
                "Uploads' lease checks, by what answered: memory (a lease this process granted) or the store",
            ),
            &["answered_by"],
        )
        .expect("static metric definition");
        let reloads = IntCounterVec::new(
            Opts::new(
                "config_reloads_total",
                "Configuration reloads (SIGHUP), by outcome: applied, or failed (nothing changed)",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reloads.clone()),
            Box::new(request_seconds.clone()),
            Box::new(render_seconds.clone()),
            Box::new(leases_granted.clone()),
            Box::new(lease_expiries.clone()),
            Box::new(lease_waiters.clone()),
            Box::new(fractals.clone()),
            Box::new(queue_depth.clone()),
            Box::new(oldest_queued_seconds.clone()),
            Box::new(limited.clone()),
            Box::new(lease_checks.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        // Both limits' series exist from the start, so that rates and alerts see zeros.
        for limit in ["create_rate", "max_queued_work"] {
            limited.with_label_values(&[limit]);
        }
        for outcome in ["applied", "failed"] {
            reloads.with_label_values(&[outcome]);
        }
        for answer in ["memory", "store"] {
            lease_checks.with_label_values(&[answer]);
        }
        Metrics {
            registry,
            requests,
            request_seconds,
            render_seconds,
            leases_granted,
            lease_expiries,
            lease_waiters,
            fractals,
            queue_depth,
            oldest_queued_seconds,
            limited,
            lease_checks,
            reloads,
            served: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A configuration reload, applied or failed.
    pub fn record_reload(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "failed" };
        self.reloads.with_label_values(&[outcome]).inc();
    }

    /// A create refused by the client limit `limit`.
    pub fn record_limited(&self, limit: &str) {
        self.limited.with_label_values(&[limit]).inc();
    }

    /// An upload's lease check, answered from memory or by the store.
    pub fn record_lease_check(&self, from_memory: bool) {
        let answer = if from_memory { "memory" } else { "store" };
        self.lease_checks.with_label_values(&[answer]).inc();
    }

    /// Requests answered since the process started.
    pub fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the queue gauges from a fresh look at the store.
    pub fn set_queue(&self, stats: &faafo_store::QueueStats) {
        for state in FractalState::ALL {
            self.fractals
                .with_label_values(&[state.as_str()])
                .set(stats.count(state) as i64);
        }
        self.queue_depth
            .set(stats.count(FractalState::Queued) as i64);
        self.oldest_queued_seconds
            .set(stats.oldest_queued_age.map_or(0.0, |age| age.as_secs_f64()));
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("writing to a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

/// Counts and times every request by its route pattern (not its path, which would
/// make one series per fractal).
pub async fn track_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_owned();
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics
        .served
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    metrics
        .requests
        .with_label_values(&[&method, &route, response.status().as_str()])
        .inc();
    metrics
        .request_seconds
        .with_label_values(&[&method, &route])
        .observe(started.elapsed().as_secs_f64());
    response
}
