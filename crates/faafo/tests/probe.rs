//! `faafo probe`, the synthetic user, against real services: a probe that passes leaves
//! nothing behind, one that cannot finish names its step and exits 1, and a running probe
//! reports on /metrics what a monitor alerts on, including the service going away.

mod common;

use std::time::Duration;

use common::*;

async fn fractals_left(endpoint: &str) -> u64 {
    client(endpoint).list_page(1, 10).await.unwrap().num_results
}

#[tokio::test]
async fn a_probe_checks_a_fractal_end_to_end_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let up = spawn_up(dir.path(), "up", 1);
    let (status, stdout, stderr) =
        faafo_output(&["--endpoint-url", up.url(), "--json", "probe", "--once"]).await;
    assert!(status.success(), "{status}: {stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report["ok"], true, "{report}");
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| step[0].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["create", "render", "download", "verify", "delete"],
        "{report}"
    );
    assert_eq!(fractals_left(up.url()).await, 0, "the probe cleans up");

    let (status, stdout, _) = faafo_output(&["--endpoint-url", up.url(), "probe", "--once"]).await;
    assert!(status.success());
    assert!(
        stdout.contains(" ok in ") && stdout.contains("verify"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_probe_that_cannot_finish_names_the_step_exits_1_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    // An API with no worker: the fractal is accepted and never rendered.
    let api = spawn_api(dir.path(), "api", &[]);
    let (status, stdout, stderr) = faafo_output(&[
        "--endpoint-url",
        api.url(),
        "probe",
        "--once",
        "--deadline",
        "1",
    ])
    .await;
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("FAILED at render: not done within 1 s (still queued)"),
        "{stdout}"
    );
    assert!(stderr.contains("the probe failed"), "{stderr}");
    assert_eq!(fractals_left(api.url()).await, 0, "the probe cleans up");

    // Nothing answers at all: the create fails, within the client's timeout.
    let (status, stdout, _) = faafo_output(&[
        "--endpoint-url",
        "http://127.0.0.1:9",
        "--timeout",
        "1",
        "probe",
        "--once",
    ])
    .await;
    assert_eq!(status.code(), Some(1));
    assert!(stdout.contains("FAILED at create"), "{stdout}");
}

#[tokio::test]
async fn a_running_probe_reports_successes_and_the_service_going_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = spawn_up(dir.path(), "up", 1);
    let probe = Process::spawn_server(
        dir.path(),
        "probe",
        &[
            "--endpoint-url",
            up.url(),
            "--timeout",
            "1",
            "probe",
            "--interval",
            "0.1",
            "--bind",
            "127.0.0.1:0",
        ],
    );
    let metrics = format!("{}/metrics", probe.url());
    let page = || async { reqwest::get(&metrics).await.ok()?.text().await.ok() };

    let healthy = wait_for(
        "three successful probes",
        Duration::from_secs(30),
        || async {
            let page = page().await?;
            (sample(&page, r#"faafo_probe_runs_total{outcome="ok"}"#)? >= 3.0).then_some(page)
        },
    )
    .await;
    assert_eq!(
        sample(&healthy, "faafo_probe_success"),
        Some(1.0),
        "{healthy}"
    );
    assert!(sample(&healthy, "faafo_probe_last_success_timestamp_seconds").unwrap() > 1e9);
    assert!(
        sample(
            &healthy,
            r#"faafo_probe_step_duration_seconds_count{step="verify"}"#
        )
        .unwrap()
            >= 3.0,
        "{healthy}"
    );
    assert_eq!(
        sample(&healthy, r#"faafo_probe_runs_total{outcome="failed"}"#),
        Some(0.0),
        "{healthy}"
    );

    up.kill9();
    // The probe in flight may fail at any step; the ones after fail at their create.
    let down = wait_for(
        "a probe failing at its create",
        Duration::from_secs(30),
        || async {
            let page = page().await?;
            (sample(&page, r#"faafo_probe_failures_total{step="create"}"#)? >= 1.0).then_some(page)
        },
    )
    .await;
    assert_eq!(sample(&down, "faafo_probe_success"), Some(0.0), "{down}");
}

/// `faafo up` runs a probe of its own: its status page shows the users' view (rounds that
/// made, fetched and verified their fractal), and the probe's fractals are deleted.
#[tokio::test]
async fn faafo_up_probes_itself_and_its_status_page_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up = Process::spawn_server(
        dir.path(),
        "up",
        &[
            "up",
            "--bind",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--workers",
            "1",
            "--probe-interval",
            "0.2",
        ],
    );
    let page = wait_for(
        "two probe rounds on /status",
        Duration::from_secs(30),
        || async {
            let page = reqwest::get(format!("{}/status", up.url()))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (page.contains("Latest round: ok")
                && page.contains("100.00% of")
                && !page.contains("of 1 rounds"))
            .then_some(page)
        },
    )
    .await;
    assert!(page.contains("verdict-green"), "{page}");
    assert!(page.contains("fractals are made"), "{page}");
    assert!(page.contains("-up-probe"), "the probe is named: {page}");
    // Every round deletes its fractal: at most the one of a round under way is there.
    assert!(
        fractals_left(up.url()).await <= 1,
        "the probe deletes its fractals"
    );
}
