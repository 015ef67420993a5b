//! The status page (`/status`): is the service usable, at a glance. Every node with its
//! state, the database's members, the queue, and the probes' last hour (availability and
//! latency, drawn server-side as SVG). Probes report their rounds with `POST /v1/probes`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use faafo_core::node::{ClusterStatus, Liveness, ProbeOutcome, ProbeReports};
use faafo_core::wire::ErrorBody;

use super::authorize_member;
use super::gallery::render;
use crate::{ApiError, AppState, json, membership};

/// The span the page shows.
const WINDOW: Duration = Duration::from_secs(3600);
/// A probe silent for this long no longer counts as watching.
const STALE_AFTER: Duration = Duration::from_secs(300);

/// `POST /v1/probes`: a probe's rounds, kept for the status page.
#[utoipa::path(post, path = "/v1/probes", tag = "membership",
    summary = "Report probe rounds (faafo probe)",
    request_body = ProbeReports,
    security(("worker_token" = [])),
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong worker token", body = ErrorBody),
        (status = 422, description = "A wrong field", body = ErrorBody),
        (status = 503, description = "The store is unavailable; retry", body = ErrorBody),
    ))]
pub async fn report(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    authorize_member(&state, &headers)?;
    let reports: ProbeReports = json::read_json(body).await?;
    ApiError::check_name("probe", &reports.probe)?;
    if reports.outcomes.len() > 1000 {
        return Err(ApiError::invalid(
            "outcomes",
            "at most 1000 outcomes at a time",
        ));
    }
    for outcome in &reports.outcomes {
        if !outcome.total_ms.is_finite() || outcome.total_ms < 0.0 {
            return Err(ApiError::invalid(
                "total_ms",
                "total_ms must be a finite duration",
            ));
        }
        if outcome
            .failed_step
            .as_ref()
            .is_some_and(|s| s.chars().count() > 20)
        {
            return Err(ApiError::invalid(
                "failed_step",
                "failed_step is at most 20 characters",
            ));
        }
    }
    state
        .store
        .record_probes(&reports.probe, &reports.outcomes)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /status`.
#[utoipa::path(get, path = "/status", tag = "gallery",
    summary = "The status page: nodes, database, queue and the probes' last hour",
    responses((status = 200, description = "HTML", content_type = "text/html", body = String), (status = 503, description = "The store is unavailable", content_type = "text/html", body = String)))]
pub async fn page(State(state): State<Arc<AppState>>) -> Response {
    let now_ms = faafo_core::unix_millis();
    let since = now_ms - WINDOW.as_millis() as i64;
    let config = state.config();
    let (cluster, history, storage) = tokio::join!(
        membership::cluster_status(&state),
        state.store.probe_history(since),
        storage_rows(&config.storage_nodes)
    );
    let (cluster, history) = match (cluster, history.map_err(ApiError::from)) {
        (Ok(cluster), Ok(history)) => (cluster, history),
        (Err(error), _) | (_, Err(error)) => {
            let page = StatusPage::unavailable(&error.to_string());
            return (error.status(), render(&page)).into_response();
        }
    };
    render(&StatusPage::new(&cluster, &history, storage, now_ms)).into_response()
}

/// How long the page waits for a storage node's health check.
const STORAGE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Each storage node's `GET /healthcheck`, all at once.
async fn storage_rows(nodes: &[String]) -> Vec<StorageRow> {
    if nodes.is_empty() {
        return Vec::new();
    }
    // One client for every page drawn: building one loads the TLS roots.
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let http = HTTP.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(STORAGE_CHECK_TIMEOUT)
            .build()
            .unwrap_or_default()
    });
    futures::future::join_all(nodes.iter().map(|node| async move {
        let answer = http.get(format!("{node}/healthcheck")).send().await;
        let (up, detail) = match answer {
            Ok(answer) if answer.status().is_success() => (true, "healthcheck OK".to_owned()),
            Ok(answer) => (false, format!("healthcheck answered {}", answer.status())),
            Err(error) if error.is_timeout() => (
                false,
                format!("no answer within {} s", STORAGE_CHECK_TIMEOUT.as_secs()),
            ),
            Err(_) => (false, "unreachable".to_owned()),
        };
        StorageRow {
            address: node.clone(),
            state: if up { "UP" } else { "DOWN" },
            colour: if up { "green" } else { "red" },
            detail,
        }
    }))
    .await
}

/// Green, yellow or red, with the sentence that says why.
struct Verdict {
    colour: &'static str,
    headline: String,
}

struct NodeRow {
    role: String,
    id: String,
    address: String,
    state: &'static str,
    colour: &'static str,
    version: String,
    last_seen: String,
}

struct StorageRow {
    address: String,
    state: &'static str,
    colour: &'static str,
    detail: String,
}

struct DatabaseRow {
    name: String,
    role: String,
    state: String,
    address: String,
    lag: String,
    colour: &'static str,
}

#[derive(Template)]
#[template(path = "status.html")]
struct StatusPage {
    verdict: Verdict,
    nodes: Vec<NodeRow>,
    database: Vec<DatabaseRow>,
    storage: Vec<StorageRow>,
    queue: Vec<(&'static str, String)>,
    probe_summary: Vec<String>,
    plot: String,
}

impl StatusPage {
    fn unavailable(reason: &str) -> StatusPage {
        StatusPage {
            verdict: Verdict {
                colour: "red",
                headline: format!("The store is unavailable: {reason}"),
            },
            nodes: Vec::new(),
            database: Vec::new(),
            storage: Vec::new(),
            queue: Vec::new(),
            probe_summary: Vec::new(),
            plot: String::new(),
        }
    }

    fn new(
        cluster: &ClusterStatus,
        history: &[(String, ProbeOutcome)],
        storage: Vec<StorageRow>,
        now_ms: i64,
    ) -> StatusPage {
        let probes = ProbeStats::of(history, now_ms);
        let nodes: Vec<NodeRow> = cluster
            .nodes
            .iter()
            .map(|node| {
                let (state, colour) = match node.state {
                    Liveness::Up => ("UP", "green"),
                    Liveness::Down => ("DOWN", "red"),
                    Liveness::Left => ("LEFT", "grey"),
                };
                NodeRow {
                    role: node.role.to_string(),
                    id: node.id.clone(),
                    address: node.address.clone().unwrap_or_else(|| "-".into()),
                    state,
                    colour,
                    version: node.version.clone(),
                    last_seen: format!("{:.1} s ago", node.last_seen_s),
                }
            })
            .collect();
        let database: Vec<DatabaseRow> = cluster
            .database
            .iter()
            .map(|member| DatabaseRow {
                name: member.name.clone(),
                role: member.role.clone(),
                state: member.state.clone(),
                address: member.address.clone().unwrap_or_else(|| "-".into()),
                lag: member
                    .lag_bytes
                    .map_or_else(|| "-".into(), |bytes| format!("{bytes} bytes")),
                colour: match member.state.as_str() {
                    "running" | "streaming" => "green",
                    "starting" => "yellow",
                    _ => "red",
                },
            })
            .collect();
        let queue = &cluster.queue;
        let queue_rows = vec![
            ("Queued", queue.queued.to_string()),
            ("Running", queue.running.to_string()),
            ("Done", queue.done.to_string()),
            ("Failed", queue.failed.to_string()),
            (
                "Oldest queued",
                queue
                    .oldest_queued_age_s
                    .map_or_else(|| "-".into(), |age| format!("{age:.0} s")),
            ),
        ];
        // A node that left said goodbye (stopped or scaled down): shown, not counted as down.
        let down = nodes.iter().filter(|n| n.state == "DOWN").count();
        let data_nodes_unhealthy = database.iter().filter(|m| m.colour != "green").count()
            + storage.iter().filter(|n| n.colour != "green").count();
        let has_leader = cluster.database.is_empty()
            || cluster
                .database
                .iter()
                .any(|m| m.role == "leader" && m.state == "running");
        let verdict = verdict(
            &probes,
            down,
            data_nodes_unhealthy,
            has_leader,
            queue.oldest_queued_age_s,
        );
        StatusPage {
            verdict,
            nodes,
            database,
            storage,
            queue: queue_rows,
            probe_summary: probes.summary(now_ms),
            plot: plot(history, now_ms),
        }
    }
}

/// What the probes' last hour says.
struct ProbeStats {
    rounds: usize,
    ok: usize,
    latest: Option<(String, ProbeOutcome)>,
    /// No round in the last [`STALE_AFTER`].
    stale: bool,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

impl ProbeStats {
    fn of(history: &[(String, ProbeOutcome)], now_ms: i64) -> ProbeStats {
        let mut latencies: Vec<f64> = history
            .iter()
            .filter(|(_, o)| o.ok)
            .map(|(_, o)| o.total_ms)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let quantile = |q: f64| {
            (!latencies.is_empty())
                .then(|| latencies[((latencies.len() - 1) as f64 * q).round() as usize])
        };
        ProbeStats {
            rounds: history.len(),
            ok: latencies.len(),
            latest: history.last().cloned(),
            stale: history
                .last()
                .is_none_or(|(_, o)| now_ms - o.finished_at_ms > STALE_AFTER.as_millis() as i64),
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
        }
    }

    fn availability(&self) -> Option<f64> {
        (self.rounds > 0).then(|| self.ok as f64 / self.rounds as f64)
    }

    fn summary(&self, now_ms: i64) -> Vec<String> {
        let Some((probe, latest)) = &self.latest else {
            return vec!["No probe has reported in the last hour: run `faafo probe --worker-token ...` (or `faafo up --probe-interval 60`; faafo cluster up runs one).".into()];
        };
        let ago = (now_ms - latest.finished_at_ms).max(0) as f64 / 1e3;
        let mut lines = vec![if latest.ok {
            format!(
                "Latest round: ok in {:.0} ms, {ago:.0} s ago ({probe}).",
                latest.total_ms
            )
        } else {
            format!(
                "Latest round: FAILED at {}, {ago:.0} s ago ({probe}).",
                latest.failed_step.as_deref().unwrap_or("an unknown step")
            )
        }];
        if let Some(availability) = self.availability() {
            lines.push(format!(
                "Last hour: {:.2}% of {} rounds made, fetched and verified their fractal.",
                availability * 100.0,
                self.rounds
            ));
        }
        if let (Some(p50), Some(p99)) = (self.p50_ms, self.p99_ms) {
            lines.push(format!("Round time: p50 {p50:.0} ms, p99 {p99:.0} ms."));
        }
        lines
    }
}

fn verdict(
    probes: &ProbeStats,
    nodes_down: usize,
    database_unhealthy: usize,
    has_leader: bool,
    oldest_queued_s: Option<f64>,
) -> Verdict {
    let latest_failed = probes.latest.as_ref().is_some_and(|(_, o)| !o.ok);
    let (colour, headline) = if !has_leader {
        (
            "red",
            "The database has no leader: creates fail until one is elected.".to_owned(),
        )
    } else if latest_failed {
        (
            "red",
            "Users' fractals are not being made: the latest probe failed.".to_owned(),
        )
    } else if probes.latest.is_some() && probes.stale {
        (
            "yellow",
            "No probe has reported for 5 minutes: nobody knows whether users' fractals are made."
                .to_owned(),
        )
    } else if nodes_down > 0 || database_unhealthy > 0 {
        (
            "yellow",
            format!(
                "Usable, with {} down: the others carry the load.",
                plural(nodes_down + database_unhealthy, "node")
            ),
        )
    } else if probes.availability().is_some_and(|a| a < 0.99) {
        (
            "yellow",
            "Usable now, but probes failed in the last hour.".to_owned(),
        )
    } else if oldest_queued_s.is_some_and(|age| age > 300.0) {
        (
            "yellow",
            "Usable, but renders wait over 5 minutes for a worker.".to_owned(),
        )
    } else {
        let made = if probes.latest.is_some() {
            "users' fractals are made, "
        } else {
            ""
        };
        ("green", format!("All good: {made}every node is up."))
    };
    Verdict { colour, headline }
}

fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// The probes' last hour as SVG: a dot per successful round at its latency, a red bar per
/// failed one, time running left to right to now.
fn plot(history: &[(String, ProbeOutcome)], now_ms: i64) -> String {
    const WIDTH: f64 = 720.0;
    const HEIGHT: f64 = 160.0;
    const LEFT: f64 = 48.0;
    const BOTTOM: f64 = 20.0;
    let (plot_w, plot_h) = (WIDTH - LEFT - 8.0, HEIGHT - BOTTOM - 8.0);
    let start = now_ms - WINDOW.as_millis() as i64;
    let slowest = history
        .iter()
        .filter(|(_, o)| o.ok)
        .map(|(_, o)| o.total_ms)
        .fold(0.0, f64::max);
    let top_ms = nice_ceiling(slowest.max(10.0));
    let x = |at: i64| LEFT + (at - start) as f64 / WINDOW.as_millis() as f64 * plot_w;
    let y = |ms: f64| 8.0 + plot_h * (1.0 - (ms / top_ms).min(1.0));
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg class="probe-plot" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="Probe rounds over the last hour: latency of each successful round, failed rounds in red">"##
    );
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="8" width="{plot_w}" height="{plot_h}" fill="#f7f7f7" stroke="#ccc"/>"##
    );
    for (ms, label) in [
        (top_ms, format_ms(top_ms)),
        (top_ms / 2.0, format_ms(top_ms / 2.0)),
        (0.0, "0".into()),
    ] {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end" fill="#555">{label}</text>"##,
            LEFT + plot_w,
            LEFT - 4.0,
            y(ms) + 4.0,
            y = y(ms)
        );
    }
    for (minutes, anchor) in [(60, "start"), (30, "middle"), (0, "end")] {
        let label = if minutes == 0 {
            "now".to_owned()
        } else {
            format!("-{minutes} min")
        };
        let at = now_ms - minutes * 60_000;
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{}" font-size="11" text-anchor="{anchor}" fill="#555">{label}</text>"##,
            x(at),
            HEIGHT - 4.0
        );
    }
    for (_, outcome) in history {
        let cx = x(outcome.finished_at_ms);
        if outcome.ok {
            let _ = write!(
                svg,
                r##"<circle class="probe-ok" cx="{cx:.1}" cy="{:.1}" r="2.5" fill="#2e9d4a"/>"##,
                y(outcome.total_ms)
            );
        } else {
            let _ = write!(
                svg,
                r##"<rect class="probe-failed" x="{:.1}" y="8" width="3" height="{plot_h}" fill="#d33"><title>failed at {}</title></rect>"##,
                cx - 1.5,
                step_name(outcome.failed_step.as_deref().unwrap_or("?"))
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// 1, 2 or 5 times a power of ten, at least `ms`.
fn nice_ceiling(ms: f64) -> f64 {
    let power = 10f64.powf(ms.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|step| step * power)
        .find(|&value| value >= ms)
        .unwrap_or(10.0 * power)
}

fn format_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{} s", ms / 1000.0)
    } else {
        format!("{ms} ms")
    }
}

/// The plot is inserted unescaped; the only text in it from outside is a step name, kept
/// to the characters step names have.
fn step_name(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(ago_s: i64, ok: bool, ms: f64, now: i64) -> (String, ProbeOutcome) {
        (
            "probe-1".into(),
            ProbeOutcome {
                finished_at_ms: now - ago_s * 1000,
                ok,
                total_ms: ms,
                failed_step: (!ok).then(|| "render\"><script>".to_owned()),
            },
        )
    }

    #[test]
    fn the_plot_has_a_dot_per_success_and_a_bar_per_failure_inside_the_frame() {
        let now = 10_000_000_000;
        let history = [
            round(3500, true, 30.0, now),
            round(1800, false, 0.0, now),
            round(5, true, 80.0, now),
        ];
        let svg = plot(&history, now);
        assert_eq!(svg.matches("class=\"probe-ok\"").count(), 2);
        assert_eq!(svg.matches("class=\"probe-failed\"").count(), 1);
        assert!(
            svg.contains(">100 ms<"),
            "the scale reaches the slowest round: {svg}"
        );
        assert!(!svg.contains("<script>"), "outside text is escaped: {svg}");
        // The newest round is near the right edge, the oldest near the left.
        let dots: Vec<f64> = svg
            .split("class=\"probe-ok\" cx=\"")
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap().parse().unwrap())
            .collect();
        assert!(dots[0] < 80.0 && dots[1] > 700.0, "{dots:?}");
    }

    #[test]
    fn the_verdict_is_red_when_the_latest_probe_failed_and_yellow_with_a_node_down() {
        let now = 10_000_000_000;
        let failing = ProbeStats::of(
            &[round(60, true, 30.0, now), round(5, false, 0.0, now)],
            now,
        );
        assert_eq!(verdict(&failing, 0, 0, true, None).colour, "red");
        let fine = ProbeStats::of(&[round(5, true, 30.0, now)], now);
        assert_eq!(verdict(&fine, 0, 0, true, None).colour, "green");
        assert_eq!(verdict(&fine, 1, 0, true, None).colour, "yellow");
        assert_eq!(verdict(&fine, 0, 0, false, None).colour, "red");
        // Without a probe the nodes decide; a probe gone silent is news.
        let none = ProbeStats::of(&[], now);
        assert_eq!(verdict(&none, 0, 0, true, None).colour, "green");
        let silent = ProbeStats::of(&[round(600, true, 30.0, now)], now);
        assert_eq!(verdict(&silent, 0, 0, true, None).colour, "yellow");
    }

    #[test]
    fn scales_are_round_numbers() {
        assert_eq!(nice_ceiling(37.0), 50.0);
        assert_eq!(nice_ceiling(120.0), 200.0);
        assert_eq!(nice_ceiling(10.0), 10.0);
    }
}
