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
    assert_eq!(succeeded(&faafo(url, &["--json", "list"])), "[]\n");

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

    let json = succeeded(&faafo(url, &["--json", "list"]));
    let listed: Vec<FractalView> = serde_json::from_str(&json).unwrap();
    assert_eq!(listed.len(), 3);
    // Streamed a page at a time, laid out as one pretty-printed array.
    assert_eq!(json, serde_json::to_string_pretty(&listed).unwrap() + "\n");
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

/// `faafo ... | head`: when the reader goes away, faafo stops without a word, with the
/// status a shell gives a command stopped by SIGPIPE.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_faafo"))
        .args(["render", "--width", "300", "--height", "300", "-o", "-"])
        .env("RUST_LOG", "warn")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("faafo runs");
    assert_eq!(output.status.code(), Some(141), "{}", stderr(&output));
    assert_eq!(stderr(&output), "");
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

/// Settings from a TOML file under the flags and the environment; `--print-config` says
/// where each comes from and hides secrets; a wrong file is refused with its name and key.
#[test]
fn a_configuration_file_sits_under_flags_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("api.toml");
    std::fs::write(
        &config,
        "max-width = 2000\nmax-height = 1500\nlease-ms = 4000\nworker-token = \"file-secret-123\"\n\
         trusted-proxies = [\"10.0.0.0/8\", \"127.0.0.1\"]\npoll-only = true\n",
    )
    .unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_faafo"))
            .args(args)
            .envs(env.iter().copied())
            .env_remove("FAAFO_WORKER_TOKEN")
            .output()
            .expect("faafo runs")
    };
    let printed = succeeded(&run(
        &[
            "api",
            "--config",
            config.to_str().unwrap(),
            "--database-url",
            "sqlite:///tmp/unused.db",
            "--object-store",
            "file:///tmp/unused",
            "--lease-ms",
            "7000",
            "--print-config",
        ],
        &[("FAAFO_MAX_HEIGHT", "300")],
    ));
    let line = |key: &str| {
        printed
            .lines()
            .find(|line| line.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{printed}"))
            .to_owned()
    };
    assert!(
        line("max-width").contains("2000")
            && line("max-width").contains("from the configuration file")
    );
    assert!(
        line("max-height").contains("300") && line("max-height").contains("from the environment")
    );
    assert!(
        line("lease-ms").contains("7000") && line("lease-ms").contains("from the command line")
    );
    assert!(line("max-attempts").contains("from the default"));
    assert!(line("trusted-proxies").contains(r#"["10.0.0.0/8", "127.0.0.1"]"#));
    assert!(line("poll-only").contains("true"));
    assert!(line("worker-token").contains("(hidden)"));
    assert!(!printed.contains("file-secret-123"), "{printed}");
    // A server's settings, not a client's.
    assert!(
        !printed.contains("endpoint-url") && !printed.contains("json ="),
        "{printed}"
    );

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "max-widht = 3\n").unwrap();
    let refused = run(&["api", "--config", typo.to_str().unwrap()], &[]);
    assert_eq!(refused.status.code(), Some(2));
    let message = stderr(&refused);
    assert!(
        message.contains("typo.toml")
            && message.contains("`max-widht` is not a setting of faafo api"),
        "{message}"
    );

    let wrong = dir.path().join("wrong.toml");
    std::fs::write(&wrong, "max-width = \"lots\"\n").unwrap();
    let refused = run(
        &[
            "api",
            "--config",
            wrong.to_str().unwrap(),
            "--database-url",
            "x",
            "--object-store",
            "y",
            "--worker-token",
            "t",
        ],
        &[],
    );
    assert_eq!(refused.status.code(), Some(2));
    let message = stderr(&refused);
    assert!(
        message.contains("--max-width") && message.contains("wrong.toml"),
        "{message}"
    );
}

/// An API and a worker that take everything from their files serve a fractal, and the
/// API applies the file's limits.
#[tokio::test]
async fn roles_run_from_their_configuration_files() {
    let dir = tempfile::tempdir().unwrap();
    let api_config = dir.path().join("api.toml");
    std::fs::write(
        &api_config,
        format!(
            "bind = \"127.0.0.1:0\"\ndatabase-url = \"sqlite://{}\"\nobject-store = \"file://{}\"\n\
             worker-token = \"{TOKEN}\"\nmax-width = 100\n",
            dir.path().join("faafo.db").display(),
            dir.path().join("images").display()
        ),
    )
    .unwrap();
    let api = Process::spawn_server(
        dir.path(),
        "api",
        &["api", "--config", api_config.to_str().unwrap()],
    );
    let worker_config = dir.path().join("worker.toml");
    std::fs::write(
        &worker_config,
        format!(
            "endpoint-url = \"{}\"\nworker-token = \"{TOKEN}\"\nname = \"from-file\"\n",
            api.url()
        ),
    )
    .unwrap();
    let _worker = Process::spawn(
        dir.path(),
        "worker",
        &["worker", "--config", worker_config.to_str().unwrap()],
    );

    let too_wide = faafo(
        api.url(),
        &[
            "create",
            "--width",
            "200",
            "--height",
            "50",
            "--iterations",
            "10",
            "--tasks",
            "1",
        ],
    );
    assert!(!too_wide.status.success());
    assert!(stderr(&too_wide).contains("100"), "{}", stderr(&too_wide));

    let client = client(api.url());
    let view = client.create(&small_fractal_of(80, 60)).await.unwrap();
    let done = wait_for_state(
        &client,
        view.uuid,
        FractalState::Done,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        done.generated_by
            .as_deref()
            .unwrap_or_default()
            .contains("from-file"),
        "{done:?}"
    );
}

fn small_fractal_of(width: u32, height: u32) -> faafo_core::wire::CreateFractal {
    faafo_core::wire::CreateFractal {
        width,
        height,
        ..small_fractal()
    }
}

/// SIGHUP reloads `faafo api`'s configuration file: limits, the log level and the worker
/// token change at once (the old token still accepted during the rotation), settings that
/// need a restart are named, and a broken file changes nothing and is counted.
#[tokio::test]
async fn sighup_reloads_what_can_change_and_a_broken_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("api.toml");
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "bind = \"127.0.0.1:0\"\ndatabase-url = \"sqlite://{}\"\nobject-store = \"file://{}\"\n{extra}",
                dir.path().join("faafo.db").display(),
                dir.path().join("images").display()
            ),
        )
        .unwrap()
    };
    write("worker-token = \"token-a\"\nmax-width = 100\nlog-level = \"info\"\n");
    let api = Process::spawn_server(
        dir.path(),
        "api",
        &["api", "--config", config.to_str().unwrap()],
    );
    let http = reqwest::Client::new();
    let create = |width: u32| {
        let request = serde_json::json!({"width": width, "height": 10, "iterations": 5,
            "xa": -1.0, "xb": 1.0, "ya": -1.0, "yb": 1.0});
        let (http, url) = (http.clone(), format!("{}/v1/fractal", api.url()));
        async move {
            http.post(url)
                .json(&request)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let lease_with = |token: &'static str| {
        let (http, url) = (http.clone(), format!("{}/v1/worker/lease", api.url()));
        async move {
            http.post(url)
                .bearer_auth(token)
                .json(&serde_json::json!({"worker": "w", "wait_ms": 0}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let metrics = format!("{}/metrics", api.url());
    let reloads = |outcome: &str| {
        let name = format!("faafo_config_reloads_total{{outcome=\"{outcome}\"}}");
        let metrics = metrics.clone();
        async move { scrape(&metrics, &name).await }
    };
    assert_eq!(create(200).await, 422);

    write(
        "worker-token = \"token-b\"\nmax-width = 300\nlog-level = \"debug\"\ndrain-delay-ms = 5\n",
    );
    api.hangup();
    wait_for("the reload applied", Duration::from_secs(10), || async {
        (reloads("applied").await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(create(200).await, 201, "the new limit");
    // 200 with a task or 204 without: either way the token was taken.
    assert!(
        [200, 204].contains(&lease_with("token-b").await),
        "the new token"
    );
    assert!(
        [200, 204].contains(&lease_with("token-a").await),
        "the old token, during the rotation"
    );
    assert_eq!(lease_with("token-c").await, 401);
    let log = api.log_text();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(log.contains("worker token rotated"), "{log}");
    assert!(
        log.contains("max_width: 100") && log.contains("max_width: 300"),
        "{log}"
    );
    assert!(
        log.contains("drain-delay-ms") && log.contains("only a restart"),
        "{log}"
    );
    assert!(log.contains("DEBUG"), "debug lines after the reload: {log}");

    write("worker-token = \"token-b\"\nmax-width = \"lots\"\n");
    api.hangup();
    wait_for(
        "the failed reload counted",
        Duration::from_secs(10),
        || async { (reloads("failed").await == Some(1.0)).then_some(()) },
    )
    .await;
    assert_eq!(create(250).await, 201, "the limit before the broken file");
    assert!(api.log_text().contains("configuration not reloaded"));
}

/// SIGHUP reloads `faafo worker`: a rotated worker token and new endpoints apply to the
/// running worker (it renders for an API that knows only the new token), and a broken
/// file changes nothing.
#[tokio::test]
async fn sighup_gives_a_worker_new_endpoints_and_a_new_token() {
    let dir = tempfile::tempdir().unwrap();
    let api_with = |name: &str, token: &str| {
        Process::spawn_server(
            dir.path(),
            name,
            &[
                "api",
                "--bind",
                "127.0.0.1:0",
                "--database-url",
                &format!(
                    "sqlite://{}",
                    dir.path().join(format!("{name}.db")).display()
                ),
                "--object-store",
                &format!("file://{}", dir.path().join(name).display()),
                "--worker-token",
                token,
                // A worker's lease request held here ends within a second, so that a
                // worker sent elsewhere moves at once.
                "--max-lease-wait-ms",
                "1000",
            ],
        )
    };
    let old_api = api_with("old-api", "token-a");
    let new_api = api_with("new-api", "token-b");
    let config = dir.path().join("worker.toml");
    let write = |endpoint: &str, token: &str| {
        std::fs::write(
            &config,
            format!("endpoint-url = \"{endpoint}\"\nworker-token = \"{token}\"\nname = \"w1\"\n"),
        )
        .unwrap()
    };
    write(old_api.url(), "token-a");
    let worker = Process::spawn(
        dir.path(),
        "worker",
        &["worker", "--config", config.to_str().unwrap()],
    );
    let made = |api: &Process| {
        let client = client(api.url());
        async move {
            let view = client.create(&small_fractal()).await.unwrap();
            done_and_intact(&client, view.uuid).await
        }
    };
    assert_eq!(made(&old_api).await.generated_by.as_deref(), Some("w1"));

    write(new_api.url(), "token-b");
    worker.hangup();
    wait_for("the worker's reload", Duration::from_secs(10), || async {
        let log = worker.log_text();
        (log.contains("configuration reloaded") && log.contains("worker token replaced"))
            .then_some(())
    })
    .await;
    assert!(worker.log_text().contains(new_api.url()));
    let done = made(&new_api).await;
    assert_eq!(done.generated_by.as_deref(), Some("w1"));

    std::fs::write(&config, "worker-token = [\"not\", \"text\"]\n").unwrap();
    worker.hangup();
    wait_for("the failed reload", Duration::from_secs(10), || async {
        worker
            .log_text()
            .contains("configuration not reloaded")
            .then_some(())
    })
    .await;
    assert_eq!(
        made(&new_api).await.generated_by.as_deref(),
        Some("w1"),
        "the worker goes on as before"
    );
}

/// SIGHUP reloads `faafo up` too: its API takes the new limits and its own workers go on
/// rendering; the worker count is named as needing a restart.
#[tokio::test]
async fn sighup_reloads_faafo_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("up.toml");
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "bind = \"127.0.0.1:0\"\ndata-dir = \"{}\"\n{extra}",
                dir.path().join("data").display()
            ),
        )
        .unwrap()
    };
    write("workers = 1\nmax-width = 100\n");
    let up = Process::spawn_server(
        dir.path(),
        "up",
        &["up", "--config", config.to_str().unwrap()],
    );
    let client = client(up.url());
    let wide = small_fractal_of(200, 20);
    match client.create(&wide).await {
        Err(error) => assert_eq!(error.status().map(|s| s.as_u16()), Some(422)),
        Ok(view) => panic!("created past the limit: {view:?}"),
    }
    write("workers = 3\nmax-width = 300\n");
    up.hangup();
    wait_for("the reload", Duration::from_secs(10), || async {
        up.log_text()
            .contains("configuration reloaded")
            .then_some(())
    })
    .await;
    let log = up.log_text();
    assert!(
        log.contains("workers") && log.contains("only a restart"),
        "{log}"
    );
    let view = client.create(&wide).await.unwrap();
    done_and_intact(&client, view.uuid).await;
}
