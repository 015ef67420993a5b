//! Real processes killed at the worst moments: nothing is lost.

mod common;

use std::time::Duration;

use common::*;
use faafo_core::FractalState;
use faafo_core::wire::CreateFractal;

const LONG: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_render_is_replaced_and_the_fractal_completes() {
    let dir = tempfile::tempdir().unwrap();
    let api = spawn_api(
        dir.path(),
        "api",
        &["--lease-ms", "1000", "--sweep-interval-ms", "50"],
    );
    let client = client(api.url());
    let mut first = spawn_worker(dir.path(), "first-worker", api.url());
    let uuid = client.create(&slow_fractal(10_000)).await.unwrap().uuid;

    let running = wait_for_state(&client, uuid, FractalState::Running, LONG).await;
    assert_eq!(running.attempts, 1);
    first.kill9();

    let _second = spawn_worker(dir.path(), "second-worker", api.url());
    let done = wait_for_state(&client, uuid, FractalState::Done, LONG).await;
    assert_eq!(
        done.attempts, 2,
        "the killed attempt and the one that finished"
    );
    assert_eq!(done.generated_by.as_deref(), Some("second-worker"));
    verify_image(&client, &done).await;
    assert!(metric(api.url(), "faafo_lease_expiries_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_killed_while_a_worker_holds_a_lease_does_not_stop_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    // Two API processes on one SQLite file and one image directory.
    let mut apis = [
        spawn_api(dir.path(), "api-1", &[]),
        spawn_api(dir.path(), "api-2", &[]),
    ];
    let both = format!("{},{}", apis[0].url(), apis[1].url());
    let _worker = spawn_worker(dir.path(), "worker", &both);
    let client = client(&both);
    let uuid = client.create(&slow_fractal(8_000)).await.unwrap().uuid;
    wait_for_state(&client, uuid, FractalState::Running, LONG).await;

    // Kill the API that handed out the lease, while the render is in progress.
    let granted = [
        metric(apis[0].url(), "faafo_leases_granted_total").await,
        metric(apis[1].url(), "faafo_leases_granted_total").await,
    ];
    let (killed, survivor) = if granted[0] == 1 { (0, 1) } else { (1, 0) };
    assert_eq!(granted[killed], 1, "one API granted the lease: {granted:?}");
    apis[killed].kill9();

    let survivor = common::client(apis[survivor].url());
    let done = wait_for_state(&survivor, uuid, FractalState::Done, LONG).await;
    assert_eq!(
        done.attempts, 1,
        "the worker kept its lease through the other API"
    );
    verify_image(&survivor, &done).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_on_the_same_data_dir_keeps_every_record_and_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = spawn_up(dir.path(), "up", 2);
    let client = client(up.url());
    let mut uuids = Vec::new();
    for _ in 0..6 {
        uuids.push(client.create(&small_fractal()).await.unwrap().uuid);
    }
    let mut before = Vec::new();
    for uuid in &uuids {
        before.push(wait_for_state(&client, *uuid, FractalState::Done, LONG).await);
    }
    up.kill9();

    let again = spawn_up(dir.path(), "up-again", 2);
    let client = common::client(again.url());
    let page = client.list_page(1, 100).await.unwrap();
    assert_eq!(page.num_results, 6);
    assert_eq!(page.objects, before, "every record is as it was");
    for view in &page.objects {
        verify_image(&client, view).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_gives_unfinished_work_back_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = spawn_up(dir.path(), "up", 1);
    let client = client(up.url());
    // About 10^11 iterations: far longer than the shutdown grace period on any machine.
    let endless = CreateFractal {
        width: 1000,
        height: 1000,
        ..slow_fractal(100_000)
    };
    let uuid = client.create(&endless).await.unwrap().uuid;
    wait_for_state(&client, uuid, FractalState::Running, LONG).await;
    up.terminate();
    let status = up.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        up.log_text()
    );

    let idle = spawn_up(dir.path(), "up-idle", 0);
    let view = common::client(idle.url()).get(uuid).await.unwrap();
    assert_eq!(
        (view.state, view.attempts),
        (FractalState::Queued, 0),
        "the task was given back, not lost"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_worker_takes_each_next_task_with_its_upload() {
    let dir = tempfile::tempdir().unwrap();
    let api = spawn_api(dir.path(), "api", &[]);
    let client = client(api.url());
    let mut uuids = Vec::new();
    for _ in 0..8 {
        uuids.push(
            client
                .create(&common::load::tiny_fractal())
                .await
                .unwrap()
                .uuid,
        );
    }
    let _worker = spawn_worker(dir.path(), "worker", api.url());
    for uuid in &uuids {
        let done = wait_for_state(&client, *uuid, FractalState::Done, LONG).await;
        verify_image(&client, &done).await;
    }
    // Eight tasks handed out, one of them by a lease request: the others came with the
    // answers to the uploads before them.
    assert_eq!(metric(api.url(), "faafo_leases_granted_total").await, 8);
    let leased_by_request = metric(
        api.url(),
        r#"faafo_http_requests_total{method="POST",route="/v1/worker/lease",status="200"}"#,
    )
    .await;
    assert_eq!(leased_by_request, 1);
}
