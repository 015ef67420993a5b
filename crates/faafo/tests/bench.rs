//! `faafo bench` runs end to end and its `--json` carries the figures (their values are
//! the machine's: checked only for being measured, never for speed).

mod common;

use common::*;
use serde_json::Value;

fn figure(report: &Value, path: &str) -> f64 {
    report
        .pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no figure {path} in {report:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_queue_reports_json() {
    let stdout = run_faafo(&[
        "bench",
        "queue",
        "--json",
        "--tasks",
        "40",
        "--workers",
        "1,2",
        "--latency-samples",
        "5",
        "--rounds",
        "2",
    ])
    .await;
    let report: Value = serde_json::from_str(&stdout).expect("one JSON object");
    for workers in ["workers_1", "workers_2"] {
        assert!(figure(&report, &format!("/{workers}/tasks_per_s")) > 0.0);
        let p50 = figure(&report, &format!("/{workers}/pickup_p50_ms"));
        let p99 = figure(&report, &format!("/{workers}/pickup_p99_ms"));
        assert!(0.0 < p50 && p50 <= p99, "{report:#}");
    }
    assert_eq!(report["store"], "sqlite (temporary file)");
    assert_eq!(report["rounds"], 2);
}

/// Needs wrk and haproxy (test.sh installs both).
#[tokio::test(flavor = "multi_thread")]
async fn bench_http_measures_every_tier_beside_haproxy() {
    let stdout = run_faafo(&[
        "bench",
        "http",
        "--json",
        "--duration",
        "1",
        "--fractals",
        "12",
        "--connections",
        "4",
        "--rounds",
        "2",
    ])
    .await;
    let report: Value = serde_json::from_str(&stdout).expect("one JSON object");
    for tier in [
        "one_fractal",
        "list",
        "gateway",
        "haproxy_fixed_answer",
        "haproxy_balancer",
    ] {
        assert!(
            figure(&report, &format!("/{tier}/requests_per_s")) > 0.0,
            "{tier}"
        );
        assert!(figure(&report, &format!("/{tier}/p99_ms")) > 0.0, "{tier}");
    }
    assert!(figure(&report, "/one_fractal/share_of_haproxy_fixed_answer") > 0.0);
    assert!(figure(&report, "/gateway/share_of_haproxy_balancer") > 0.0);
    assert!(figure(&report, "/gateway/p99_relative_to_haproxy") > 0.0);
    assert_eq!(report["rounds"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_render_reports_each_engine_against_the_ceiling() {
    let stdout = run_faafo(&[
        "bench",
        "render",
        "--json",
        "--tasks",
        "2",
        "--skip-large",
        "--rounds",
        "2",
    ])
    .await;
    let report: Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(report["rounds"], 2);
    assert!(figure(&report, "/ceiling_lane_iterations_per_s") > 0.0);
    for case in ["typical", "heavy"] {
        for engine in ["scalar", "simd"] {
            assert!(figure(&report, &format!("/{case}/{engine}/mpixel_per_s")) > 0.0);
            // No upper bound: in a debug build the ceiling loop itself is unoptimized.
            assert!(figure(&report, &format!("/{case}/{engine}/share_of_ceiling")) > 0.0);
        }
    }
}
