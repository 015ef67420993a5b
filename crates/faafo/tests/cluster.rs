//! `faafo cluster` under fire, with real processes: random SIGKILLs every 2 s under load,
//! and a rolling restart of every API instance under load. In both, every client
//! operation must succeed (after its retries) and every fractal must be rendered once.

mod common;

use std::time::{Duration, Instant};

use common::load::{LoadRun, assert_all_rendered_once, tiny_fractal};
use common::{
    client, done_and_intact, faafo_output, run_faafo, small_fractal, spawn_cluster, wait_for,
    wait_for_state,
};
use faafo_client::{Client, RetryPolicy};
use faafo_core::FractalState;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_kills_lose_nothing_and_fail_no_request() {
    let dir = tempfile::tempdir().unwrap();
    // Short leases, so that tasks held by killed workers come back within seconds.
    let cluster = spawn_cluster(dir.path(), 2, 2, 3, &["--lease-ms", "2000"]);
    let gateways = cluster.url().to_owned();
    assert_eq!(gateways.split(',').count(), 2, "{gateways}");
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();

    // A client given one gateway learns the other from the membership.
    let one = Client::new(gateways.split(',').next().unwrap(), RetryPolicy::default()).unwrap();
    let found = wait_for(
        "both gateways in /v1/endpoints",
        Duration::from_secs(20),
        || async {
            let found = one.discover().await.ok()?;
            (found.gateways.len() == 2 && found.apis.len() == 2).then_some(found)
        },
    )
    .await;
    assert_eq!(one.endpoints().len(), 2, "{found:?}");

    let load = LoadRun::start(&gateways);
    let started = Instant::now();
    let chaos = run_faafo(&[
        "cluster",
        "chaos",
        "--data-dir",
        data,
        "--duration",
        "40s",
        "--interval",
        "2s",
    ])
    .await;
    let chaos_time = started.elapsed();
    let kills = chaos.lines().filter(|l| l.contains("killed")).count();
    println!("{chaos}");
    let (client, created) = load
        .finish(&format!(
            "chaos: {kills} kills in {:.0} s",
            chaos_time.as_secs_f64()
        ))
        .await;
    assert!(kills >= 10, "too few kills:\n{chaos}");
    assert!(
        created.len() >= 20,
        "too little load: {} creates",
        created.len()
    );
    assert_all_rendered_once(&client, &created).await;

    // The supervisor restarted every member it killed.
    let status = run_faafo(&["--json", "cluster", "status", "--data-dir", data]).await;
    let members: serde_json::Value = serde_json::from_str(&status).unwrap();
    let members = members.as_array().unwrap();
    // 2 gateways, 2 APIs, 3 workers and the probe.
    assert_eq!(members.len(), 8);
    let restarts: u64 = members
        .iter()
        .map(|m| m["restarts"].as_u64().unwrap())
        .sum();
    assert!(restarts >= kills as u64, "{status}");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_of_every_api_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = spawn_cluster(dir.path(), 2, 2, 2, &[]);
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let pids = |status: &str| -> Vec<(String, u64)> {
        let members: serde_json::Value = serde_json::from_str(status).unwrap();
        members
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "api")
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_owned(),
                    m["pid"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let before = pids(&run_faafo(&["--json", "cluster", "status", "--data-dir", data]).await);
    assert_eq!(before.len(), 2);

    let load = LoadRun::start(cluster.url());
    // Let the load reach both instances before the first one drains.
    wait_for("load to start", Duration::from_secs(20), || async {
        (load.load.created().len() >= 10).then_some(())
    })
    .await;
    let started = Instant::now();
    let restart = run_faafo(&["cluster", "restart", "api", "--rolling", "--data-dir", data]).await;
    let restart_time = started.elapsed();
    println!("{restart}");
    let (client, created) = load
        .finish(&format!(
            "rolling restart of 2 APIs in {:.1} s",
            restart_time.as_secs_f64()
        ))
        .await;
    for name in ["api-1", "api-2"] {
        assert!(
            restart.contains(&format!("{name}: back in service")),
            "{restart}"
        );
    }
    let after = pids(&run_faafo(&["--json", "cluster", "status", "--data-dir", data]).await);
    for ((name, old), (_, new)) in before.iter().zip(&after) {
        assert_ne!(old, new, "{name} was not restarted");
    }
    assert_all_rendered_once(&client, &created).await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_stop_start_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = spawn_cluster(dir.path(), 1, 1, 1, &[]);
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let gateway = cluster.url().to_owned();
    let backends = |gateway: String| async move {
        let stats: serde_json::Value = reqwest::get(format!("{gateway}/__stats.json"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let mut up: Vec<String> = stats["backends"]
            .as_array()?
            .iter()
            .filter(|b| b["state"] == "up")
            .map(|b| b["url"].as_str().unwrap().to_owned())
            .collect();
        up.sort();
        Some(up)
    };

    // A new API instance is found by the running gateway, without a restart.
    let scaled = run_faafo(&["cluster", "scale", "api=2", "worker=2", "--data-dir", data]).await;
    assert!(
        scaled.contains("api-2 is up") && scaled.contains("worker-2 is up"),
        "{scaled}"
    );
    wait_for(
        "the gateway to use 2 APIs",
        Duration::from_secs(20),
        || async { backends(gateway.clone()).await.filter(|up| up.len() == 2) },
    )
    .await;

    // `faafo status` lists every node through the gateway.
    wait_for(
        "every node in faafo status",
        Duration::from_secs(20),
        || async {
            let status = run_faafo(&["--endpoint-url", &gateway, "status"]).await;
            let up = |role: &str| status.matches(&format!("| UP    | {role}")).count();
            (up("gateway ") == 1 && up("api     ") == 2 && up("worker  ") == 2).then_some(())
        },
    )
    .await;

    // The cluster's probe makes fractals through the gateway and says so.
    wait_for(
        "the probe to report a successful round",
        Duration::from_secs(30),
        || async {
            let table = run_faafo(&["cluster", "status", "--data-dir", data]).await;
            table
                .lines()
                .any(|line| {
                    line.starts_with("| probe-1") && line.contains("users' fractals are made")
                })
                .then_some(())
        },
    )
    .await;

    // A stopped member stays stopped and leaves the gateway; started, it comes back.
    run_faafo(&["cluster", "stop", "api-2", "--data-dir", data]).await;
    wait_for(
        "the gateway to drop api-2",
        Duration::from_secs(20),
        || async { backends(gateway.clone()).await.filter(|up| up.len() == 1) },
    )
    .await;
    let table = run_faafo(&["cluster", "status", "--data-dir", data]).await;
    assert!(table.contains("| api-2     | stopped"), "{table}");
    let client = Client::new(&gateway, RetryPolicy::default()).unwrap();
    let view = client.create(&tiny_fractal()).await.unwrap();
    wait_for_state(
        &client,
        view.uuid,
        FractalState::Done,
        Duration::from_secs(30),
    )
    .await;
    run_faafo(&["cluster", "start", "api", "--data-dir", data]).await;
    wait_for(
        "the gateway to use 2 APIs again",
        Duration::from_secs(20),
        || async { backends(gateway.clone()).await.filter(|up| up.len() == 2) },
    )
    .await;

    // Scaled down, the instance is gone from the supervisor and from the gateway.
    run_faafo(&["cluster", "scale", "api=1", "--data-dir", data]).await;
    wait_for(
        "the gateway to use 1 API",
        Duration::from_secs(20),
        || async { backends(gateway.clone()).await.filter(|up| up.len() == 1) },
    )
    .await;
    let table = run_faafo(&["cluster", "status", "--data-dir", data]).await;
    assert!(!table.contains("api-2"), "{table}");

    // Mistakes get a clear message and a non-zero exit.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_faafo"))
        .args(["cluster", "stop", "api-9", "--data-dir", data])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no member or group \"api-9\""), "{stderr}");

    // `down` stops everything, and the supervisor exits cleanly.
    run_faafo(&["cluster", "down", "--data-dir", data]).await;
    let mut cluster = cluster;
    assert!(cluster.wait_exit(Duration::from_secs(60)).success());
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_faafo"))
        .args(["cluster", "status", "--data-dir", data])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no cluster is running"));
}

/// Seed 001's "the system would do this itself": a burst of 200 tasks with the workers
/// autoscaled 1..6 brings them to 6 within seconds and back to 1 once the queue has
/// been idle; every task is done. The same burst with one worker, for comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn autoscaled_workers_follow_a_burst_up_and_back_down() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = spawn_cluster(
        dir.path(),
        1,
        1,
        1,
        &["--autoscale", "worker=1..6", "--scale-down-after", "3"],
    );
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let client = Client::new(cluster.url(), RetryPolicy::default()).unwrap();
    let workers = || async {
        let status = run_faafo(&["--json", "cluster", "status", "--data-dir", data]).await;
        let members: serde_json::Value = serde_json::from_str(&status).unwrap();
        members
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "worker" && m["state"] == "running")
            .count()
    };
    assert_eq!(workers().await, 1);

    let (started, created) = burst(&client).await;
    let scaled_up = wait_for("6 workers", Duration::from_secs(10), || async {
        (workers().await == 6).then(|| started.elapsed())
    })
    .await;
    let autoscaled = all_done(&client, created, started).await;
    let idle = Instant::now();
    // Stopped workers finish their tasks first, then leave the supervisor's list.
    wait_for("back to 1 worker", Duration::from_secs(30), || async {
        let status = run_faafo(&["cluster", "status", "--data-dir", data]).await;
        (status.contains("autoscaling workers 1..6: 1 now, target 1") && workers().await == 1)
            .then_some(())
    })
    .await;
    let scaled_down = idle.elapsed();

    // Manual scaling is refused while the queue decides; off, one worker does it all.
    let refused = common::faafo_output(&["cluster", "scale", "worker=3", "--data-dir", data]).await;
    assert!(
        !refused.0.success() && refused.2.contains("follow the queue"),
        "{refused:?}"
    );
    run_faafo(&["cluster", "autoscale", "off", "--data-dir", data]).await;
    let (started, created) = burst(&client).await;
    let single = all_done(&client, created, started).await;
    assert_eq!(workers().await, 1);
    println!(
        "200 tasks: 6 workers {:.1} s after the burst began; drained in {:.1} s autoscaled \
         (1..6) against {:.1} s with 1 worker; back to 1 worker {:.1} s after the queue emptied \
         (scale-down delay 3 s)",
        scaled_up.as_secs_f64(),
        autoscaled.as_secs_f64(),
        single.as_secs_f64(),
        scaled_down.as_secs_f64()
    );
}

/// A render of some tens of milliseconds on both cores of a fast machine: long enough for
/// a backlog to outlast the autoscaler's first look at the queue (at 256x256 a fast CPU
/// rendered all 200 in well under a second, and the backlog was gone before it was seen).
fn burst_task() -> faafo_core::wire::CreateFractal {
    faafo_core::wire::CreateFractal {
        uuid: Some(uuid::Uuid::new_v4()),
        width: 1024,
        height: 1024,
        iterations: 1500,
        xa: -1.0,
        xb: 1.0,
        ya: -1.0,
        yb: 1.0,
        cx: Some(-0.8),
        cy: Some(0.156),
    }
}

/// 200 creates at once; when they began and what they made.
async fn burst(client: &Client) -> (Instant, Vec<uuid::Uuid>) {
    let requests: Vec<_> = (0..200).map(|_| burst_task()).collect();
    let started = Instant::now();
    let created = futures::future::join_all(requests.iter().map(|request| client.create(request)))
        .await
        .into_iter()
        .map(|view| view.expect("every create succeeds").uuid)
        .collect();
    (started, created)
}

/// Waits until every fractal in `created` is done; the time since `started`.
async fn all_done(client: &Client, created: Vec<uuid::Uuid>, started: Instant) -> Duration {
    for uuid in created {
        wait_for_state(client, uuid, FractalState::Done, Duration::from_secs(180)).await;
    }
    started.elapsed()
}

/// `cluster up --config FILE` gives each role its table; `cluster reload` checks a changed
/// file and has the members re-read it: the APIs take a new limit without a restart, and
/// an invalid file changes nothing and makes `cluster reload` fail saying why.
#[tokio::test]
async fn cluster_reload_applies_the_members_settings_and_refuses_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, "[api]\nmax-width = 100\n").unwrap();
    let cluster = spawn_cluster(dir.path(), 1, 2, 1, &["--config", config.to_str().unwrap()]);
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let client = client(cluster.url());
    let wide = faafo_core::wire::CreateFractal {
        width: 200,
        height: 20,
        ..small_fractal()
    };
    let status_of_create = || async {
        match client.create(&wide).await {
            Ok(view) => (201, Some(view)),
            Err(error) => (error.status().map_or(0, |s| s.as_u16()), None),
        }
    };
    assert_eq!(
        status_of_create().await.0,
        422,
        "[api] max-width = 100 applies"
    );
    let pids_before = member_pids(data).await;

    std::fs::write(
        &config,
        "[api]\nmax-width = 300\n[worker]\nlog-level = \"debug\"\n",
    )
    .unwrap();
    let said = run_faafo(&["cluster", "reload", "--data-dir", data]).await;
    assert!(
        said.contains("api-1") && said.contains("api-2") && said.contains("worker-1"),
        "{said}"
    );
    assert!(
        !said.contains("gateway-1"),
        "the gateways' settings did not change: {said}"
    );
    // Each API applies it as it reads the file: until then, a create may meet the old limit.
    let view = wait_for(
        "both APIs on the new limit",
        Duration::from_secs(10),
        || async {
            let mut made = None;
            for _ in 0..4 {
                made = Some(status_of_create().await.1?);
            }
            made
        },
    )
    .await;
    done_and_intact(&client, view.uuid).await;
    assert_eq!(
        member_pids(data).await,
        pids_before,
        "nothing was restarted"
    );

    std::fs::write(&config, "[api]\nmax-width = \"lots\"\n").unwrap();
    let (status, _, stderr) = faafo_output(&["cluster", "reload", "--data-dir", data]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("[api]") && stderr.contains("lots") && stderr.contains("nothing changed"),
        "{stderr}"
    );
    std::fs::write(&config, "[probe]\ninterval = 5\n").unwrap();
    let (status, _, stderr) = faafo_output(&["cluster", "reload", "--data-dir", data]).await;
    assert!(!status.success());
    assert!(stderr.contains("[api], [gateway] and [worker]"), "{stderr}");
    assert_eq!(
        status_of_create().await.0,
        201,
        "the limit before the broken files"
    );
    assert_eq!(member_pids(data).await, pids_before);
}

/// Each member's name and pid, from `cluster status --json`.
async fn member_pids(data: &str) -> Vec<(String, Option<u64>)> {
    let status = run_faafo(&["--json", "cluster", "status", "--data-dir", data]).await;
    let members: Vec<serde_json::Value> = serde_json::from_str(&status).unwrap();
    members
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_owned(), m["pid"].as_u64()))
        .collect()
}
