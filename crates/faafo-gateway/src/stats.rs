//! `/__stats` (a page like haproxy's), `/__stats.json` and `/metrics`.

use std::fmt::Write;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use serde_json::json;

use crate::backend::BackendState;
use crate::proxy::Gateway;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    responses: IntCounterVec,
    backend_up: IntGaugeVec,
    pub requests: IntCounter,
    pub retries: IntCounter,
    pub unavailable: IntCounter,
    reloads: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("faafo_gateway".into()), None).expect("static prefix");
        let responses = IntCounterVec::new(
            Opts::new("responses_total", "Answers relayed, by backend and status"),
            &["backend", "status"],
        )
        .expect("static metric");
        let backend_up = IntGaugeVec::new(
            Opts::new("backend_up", "1 when the backend is in rotation"),
            &["backend"],
        )
        .expect("static metric");
        let requests = IntCounter::new("requests_total", "Requests received for backends")
            .expect("static metric");
        let retries = IntCounter::new("retries_total", "Requests sent again to another backend")
            .expect("static metric");
        let unavailable =
            IntCounter::new("unavailable_total", "Requests no backend could serve (503)")
                .expect("static metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "config_reloads_total",
                "Configuration reloads (SIGHUP), by outcome: applied, or failed (nothing changed)",
            ),
            &["outcome"],
        )
        .expect("static metric");
        for outcome in ["applied", "failed"] {
            reloads.with_label_values(&[outcome]);
        }
        for collector in [
            Box::new(reloads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(responses.clone()),
            Box::new(backend_up.clone()),
            Box::new(requests.clone()),
            Box::new(retries.clone()),
            Box::new(unavailable.clone()),
        ] {
            registry.register(collector).expect("registered once");
        }
        Metrics {
            registry,
            responses,
            backend_up,
            requests,
            retries,
            unavailable,
            reloads,
        }
    }

    /// A configuration reload, applied or failed.
    pub fn record_reload(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "failed" };
        self.reloads.with_label_values(&[outcome]).inc();
    }

    pub fn count(&self, backend: &str, status: StatusCode) {
        self.responses
            .with_label_values(&[backend, status.as_str()])
            .inc();
    }

    pub fn set_up(&self, backend: &str, up: bool) {
        self.backend_up
            .with_label_values(&[backend])
            .set(i64::from(up));
    }
}

pub async fn json(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    let backends: Vec<_> = gateway.backends().iter().map(|b| b.stats()).collect();
    Json(json!({ "backends": backends }))
}

pub async fn metrics(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    let mut buffer = Vec::new();
    TextEncoder::new()
        .encode(&gateway.metrics.registry.gather(), &mut buffer)
        .expect("writing to a Vec");
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        buffer,
    )
}

pub async fn page(State(gateway): State<Arc<Gateway>>) -> Html<String> {
    let mut rows = String::new();
    for stats in gateway.backends().iter().map(|b| b.stats()) {
        let (class, state) = match stats.state {
            BackendState::Up => ("up", "UP"),
            BackendState::Down => ("down", "DOWN"),
        };
        let _ = write!(
            rows,
            "<tr class=\"{class}\"><td>{}</td><td>{state}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{} / {}</td><td>{}</td></tr>",
            escape(&stats.url),
            stats.outstanding,
            stats.requests,
            stats.errors,
            stats.mean_latency_ms,
            stats.checks_ok,
            stats.checks_failed,
            escape(stats.last_error.as_deref().unwrap_or("")),
        );
    }
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>faafo gateway</title><style>\
         body{{font-family:system-ui,sans-serif;margin:1rem;background:#f6f4ef;color:#23211d}}\
         table{{border-collapse:collapse;width:100%}}td,th{{border:1px solid #d8d2c4;padding:.35rem .6rem;text-align:left}}\
         th{{background:#23211d;color:#f6f4ef}}tr.up td:nth-child(2){{background:#b9e3b0}}tr.down td:nth-child(2){{background:#f1b4ab}}\
         </style></head><body><h1>faafo gateway</h1><p>Backends, checked every {} ms (down after {} failed checks or a refused \
         connection, up after {} good ones). Refreshes every 2 s.</p><table><tr><th>Backend</th><th>State</th><th>In flight</th>\
         <th>Requests</th><th>Errors</th><th>Mean latency (ms)</th><th>Checks ok / failed</th><th>Last error</th></tr>{rows}</table>\
         <p><a href=\"/__stats.json\">JSON</a> · <a href=\"/metrics\">metrics</a></p></body></html>",
        gateway.check_interval().as_millis(),
        gateway.config.fall,
        gateway.config.rise,
    ))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
