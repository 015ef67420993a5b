//! The CLI as a user runs it, against real `faafo up` and `faafo api` processes.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use faafo_core::FractalState;
use faafo_core::wire::FractalView;
use sha2::{Digest, Sha256};

fn faafo(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_faafo"))
        .arg("--endpoint-url")
        .arg(endpoint)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("faafo runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn succeeded(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(output),
        stderr(output)
    );
    stdout(output)
}

fn up(dir: &Path) -> Process {
    spawn_up(dir, "up", 2)
}

#[test]
fn create_wait_list_show_get_delete() {
    let dir = tempfile::tempdir().unwrap();
    let up = up(dir.path());
    let url = up.url();

    let created = succeeded(&faafo(
        url,
        &[
            "create", "--tasks", "3", "--width", "200", "--height", "150", "--wait",
        ],
    ));
    assert_eq!(
        created
            .lines()
            .filter(|l| l.contains("200 x 150 pixels") && l.contains(" bytes"))
            .count(),
        3,
        "{created}"
    );

    let listed: Vec<FractalView> =
        serde_json::from_str(&succeeded(&faafo(url, &["--json", "list"]))).unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|f| f.state == FractalState::Done));
    let table = succeeded(&faafo(url, &["list"]));
    assert!(table.starts_with("+---"), "{table}");
    assert!(
        table.contains("| UUID ")
            && table.contains("| Dimensions ")
            && table.contains("| Filesize ")
    );
    for fractal in &listed {
        assert!(table.contains(&fractal.uuid.to_string()));
    }

    let uuid = listed[0].uuid.to_string();
    let shown = succeeded(&faafo(url, &["show", &uuid]));
    for row in [
        "| uuid ",
        "| duration ",
        " seconds",
        "| dimensions ",
        "| checksum ",
        "| generated_by ",
        "| state ",
    ] {
        assert!(shown.contains(row), "missing {row:?} in\n{shown}");
    }
    let as_json: FractalView =
        serde_json::from_str(&succeeded(&faafo(url, &["--json", "show", &uuid]))).unwrap();
    assert_eq!(as_json, listed[0]);

    let file = dir.path().join("image.png");
    let saved = succeeded(&faafo(url, &["get", &uuid, "-o", file.to_str().unwrap()]));
    assert!(saved.contains("verified"), "{saved}");
    let png = std::fs::read(&file).unwrap();
    assert_eq!(Some(hex::encode(Sha256::digest(&png))), listed[0].checksum);

    succeeded(&faafo(url, &["delete", &uuid]));
    let gone = faafo(url, &["show", &uuid]);
    assert_eq!(gone.status.code(), Some(1));
    assert_eq!(
        stderr(&gone).lines().count(),
        1,
        "one line: {}",
        stderr(&gone)
    );
    assert!(stderr(&gone).contains(&format!("no fractal {uuid}")));
    assert_eq!(faafo(url, &["delete", &uuid]).status.code(), Some(1));
    assert_eq!(faafo(url, &["get", &uuid]).status.code(), Some(1));
}

#[test]
fn create_with_a_chosen_constant() {
    let dir = tempfile::tempdir().unwrap();
    let up = up(dir.path());
    let created: Vec<FractalView> = serde_json::from_str(&succeeded(&faafo(
        up.url(),
        &[
            "--json",
            "create",
            "--tasks",
            "2",
            "--width",
            "64",
            "--height",
            "48",
            "--cx=-0.8",
            "--cy",
            "0.156",
        ],
    )))
    .unwrap();
    assert_eq!(created.len(), 2);
    for fractal in &created {
        assert_eq!((fractal.cx, fractal.cy), (-0.8, 0.156), "{fractal:?}");
    }
}

#[test]
fn the_seed_command_lines_run_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    let up = up(dir.path());
    // `faafo create --height 9999 --width 9999 --tasks 5`, pointed at this service.
    let created: Vec<FractalView> = serde_json::from_str(&succeeded(&faafo(
        up.url(),
        &[
            "--json", "create", "--height", "9999", "--width", "9999", "--tasks", "5",
        ],
    )))
    .unwrap();
    assert_eq!(created.len(), 5);
    assert!(created.iter().all(|f| (f.width, f.height) == (9999, 9999)));
    // `faafo --endpoint-url http://IP create`: random fractals in the original's ranges.
    let random: Vec<FractalView> =
        serde_json::from_str(&succeeded(&faafo(up.url(), &["--json", "create"]))).unwrap();
    assert!((1..=10).contains(&random.len()));
    // Big renders are not needed for the rest: deleting cancels them.
    for fractal in created.iter().chain(&random) {
        succeeded(&faafo(up.url(), &["delete", &fractal.uuid.to_string()]));
    }
    assert!(
        succeeded(&faafo(up.url(), &["list"])).lines().count() == 4,
        "an empty table is left"
    );
}

#[test]
fn errors_are_one_clear_line_and_a_nonzero_exit() {
    // Nothing listens on port 9 of these loopback addresses.
    let nowhere = "http://127.0.0.1:9,http://127.0.0.2:9";
    let unreachable = faafo(nowhere, &["--timeout", "1", "list"]);
    assert_eq!(unreachable.status.code(), Some(1));
    let message = stderr(&unreachable);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.contains("http://127.0.0.1:9") && message.contains("http://127.0.0.2:9"),
        "{message}"
    );

    // Invalid flags are refused before any request: the endpoint is never tried.
    for (args, needle) in [
        (
            &["create", "--min-width", "900", "--max-width", "100"][..],
            "--min-width (900) is greater than --max-width (100)",
        ),
        (&["create", "--xa", "1", "--xb", "1"][..], "no width"),
        (
            &["create", "--yb", "inf"][..],
            "--yb must be a finite number",
        ),
        (
            &["create", "--cx", "NaN", "--cy", "0.1"][..],
            "--cx must be a finite number",
        ),
    ] {
        let output = faafo(nowhere, args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&output).contains(needle),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            !stderr(&output).contains("127.0.0.1:9"),
            "no request was made: {}",
            stderr(&output)
        );
    }
    for args in [
        &["create", "--width", "0"][..],
        &["create", "--tasks", "many"][..],
        &["show", "not-a-uuid"][..],
        &["create", "--cx", "0.3"][..],
        &["create", "--cy", "0.3"][..],
    ] {
        let output = faafo(nowhere, args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: usage errors exit 2"
        );
    }
    assert_eq!(faafo("not a url", &["list"]).status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn create_wait_survives_an_api_killed_mid_run_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let mut apis = [
        spawn_api(dir.path(), "api-1", &[]),
        spawn_api(dir.path(), "api-2", &[]),
    ];
    let both = format!("{},{}", apis[0].url(), apis[1].url());
    let _worker = spawn_worker(dir.path(), "worker", &both);

    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_faafo"))
        .args([
            "--endpoint-url",
            &both,
            "--json",
            "create",
            "--tasks",
            "20",
            "--width",
            "600",
            "--height",
            "600",
        ])
        .args(["--iterations", "3000", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // Once the run is under way, kill the API the CLI is talking to (the one that took
    // its creates).
    let created = "faafo_http_requests_total{method=\"POST\",route=\"/v1/fractal\",status=\"201\"}";
    let counts = wait_for(
        "the CLI to create fractals",
        Duration::from_secs(60),
        || async {
            let counts = [
                metric(apis[0].url(), created).await,
                metric(apis[1].url(), created).await,
            ];
            (counts[0] + counts[1] >= 1).then_some(counts)
        },
    )
    .await;
    let victim = if counts[0] >= counts[1] { 0 } else { 1 };
    apis[victim].kill9();
    assert!(
        cli.try_wait().unwrap().is_none(),
        "the API died while the CLI was still at work"
    );

    let output = tokio::task::spawn_blocking(move || cli.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let finished: Vec<FractalView> = serde_json::from_str(&succeeded(&output)).unwrap();
    assert_eq!(finished.len(), 20);
    assert!(finished.iter().all(|f| f.state == FractalState::Done));

    let survivor = client(apis[1 - victim].url());
    let page = survivor.list_page(1, 100).await.unwrap();
    assert_eq!(page.num_results, 20, "no create was duplicated or lost");
    let uuids: HashSet<_> = page.objects.iter().map(|f| f.uuid).collect();
    assert_eq!(uuids, finished.iter().map(|f| f.uuid).collect());
    for fractal in &page.objects {
        verify_image(&survivor, fractal).await;
    }
}
