//! Images on S3, on a real replicated OpenStack Swift (4 storage nodes, 3 replicas): a
//! `faafo api` and a worker under continuous creates and image reads while a whole
//! storage node dies and comes back, and while the S3 proxy is down; and `faafo cluster
//! --swift-nodes 4` serving every image while each storage node in turn is dead.

mod common;

use std::time::{Duration, Instant};

use common::load::{LoadRun, assert_all_rendered_once, verify_done_images};
use common::{run_faafo, spawn_api_with, spawn_cluster, spawn_worker, wait_for};
use faafo_core::FractalState;
use faafo_testkit::SwiftCluster;

#[test]
fn images_survive_a_dead_storage_node_and_a_dead_proxy() {
    for (key, value) in SwiftCluster::credentials() {
        // SAFETY: no other thread runs yet (the runtime is built below); the children
        // inherit the credentials, as `faafo api` would from its unit's environment.
        unsafe { std::env::set_var(key, value) };
    }
    let started = Instant::now();
    let mut swift = SwiftCluster::start(4);
    println!(
        "Swift: 4 storage nodes and a proxy up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("faafo.db").display());
    let api = spawn_api_with(
        dir.path(),
        "api",
        &database,
        &swift.object_store_url("faafo"),
        &["--lease-ms", "3000"],
    );
    let _worker = spawn_worker(dir.path(), "worker", api.url());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let mut created = Vec::new();

    // A storage node dies under load, and comes back.
    let load = LoadRun::start(api.url());
    runtime.block_on(load.wait_for_creates(20));
    swift.kill_node(1);
    runtime.block_on(load.wait_for_creates(40));
    swift.start_node(1);
    runtime.block_on(load.wait_for_creates(20));
    let (client, made) = runtime.block_on(load.finish("storage node swift-2 killed, then back"));
    created.extend(made);
    runtime.block_on(assert_all_rendered_once(&client, &created));

    // A preview lives in the store beside its image, and goes with it.
    let http = reqwest::Client::new();
    runtime.block_on(async {
        let large = faafo_core::wire::CreateFractal {
            width: 600,
            height: 400,
            ..common::load::tiny_fractal()
        };
        let uuid = client.create(&large).await.unwrap().uuid;
        common::wait_for_state(&client, uuid, FractalState::Done, Duration::from_secs(60)).await;
        let preview = format!("{}/fractal/{uuid}/preview", api.url());
        let answer = http.get(&preview).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        let png = answer.bytes().await.unwrap();
        assert_eq!(faafo_render::png_dimensions(&png).unwrap(), (512, 341));
        client.delete(uuid).await.unwrap();
        assert_eq!(http.get(&preview).send().await.unwrap().status(), 404);
    });

    // The proxy dies: the API says the object store is unavailable (and why) and takes
    // no image, but loses nothing; once it is back, the API is ready again without a
    // restart and the renders held back meanwhile complete.
    let readyz = |http: &reqwest::Client| {
        let request = http.get(format!("{}/readyz", api.url())).send();
        async move {
            let answer = request.await.ok()?;
            Some((answer.status().as_u16(), answer.text().await.ok()?))
        }
    };
    swift.kill_proxy();
    let reason = runtime.block_on(wait_for(
        "/readyz to name the object store",
        Duration::from_secs(30),
        || async {
            readyz(&http)
                .await
                .filter(|(status, text)| *status == 503 && text.contains("object_store"))
        },
    ));
    println!("proxy down: /readyz {reason:?}");
    let during = runtime.block_on(async {
        let view = client.create(&common::load::tiny_fractal()).await.unwrap();
        let image = http
            .get(format!("{}/fractal/{}", api.url(), view.uuid))
            .send()
            .await
            .unwrap();
        // Not rendered yet (the upload cannot land): 404 with Retry-After, or 503.
        assert!(
            matches!(image.status().as_u16(), 404 | 503),
            "{}",
            image.status()
        );
        view.uuid
    });
    created.push(during);
    swift.start_proxy();
    runtime.block_on(wait_for(
        "/readyz to be 200 again",
        Duration::from_secs(30),
        || async { readyz(&http).await.filter(|(status, _)| *status == 200) },
    ));
    let rerendered = runtime.block_on(assert_all_rendered_once(&client, &created));
    println!(
        "{} fractals, every image intact (lost 0), {rerendered} re-rendered",
        created.len()
    );
}

/// One member of `cluster status --json`.
#[derive(Debug, serde::Deserialize)]
struct Member {
    name: String,
    role: String,
    url: Option<String>,
    health: String,
}

async fn members(data: &str) -> Vec<Member> {
    let status = run_faafo(&["--json", "cluster", "status", "--data-dir", data]).await;
    serde_json::from_str(&status).unwrap()
}

async fn all_healthy(data: &str) {
    wait_for("every member healthy", Duration::from_secs(90), || async {
        members(data)
            .await
            .iter()
            .filter(|m| m.role.starts_with("swift") || m.role == "api")
            .all(|m| m.health == "healthy" || m.health == "listening" || m.health == "ready")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_serves_every_image_while_any_one_storage_node_is_dead() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let cluster = spawn_cluster(
        dir.path(),
        2,
        2,
        2,
        &[
            "--swift-nodes",
            "4",
            "--swift-port",
            "0",
            "--lease-ms",
            "3000",
        ],
    );
    println!(
        "cluster with 4 Swift storage nodes up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    // Paced: 2 cores run 4 storage nodes (32 processes), 2 proxies and faafo here.
    let load = LoadRun::start_paced(cluster.url(), Duration::from_millis(100));
    load.wait_for_creates(20).await;
    let gateway = cluster.url().split(',').next().unwrap().to_owned();
    assert_eq!(storage_on_the_status_page(&gateway).await, (4, 0));
    for node in 1..=4 {
        let name = format!("swift-{node}");
        run_faafo(&["cluster", "kill", "--stay-down", &name, "--data-dir", data]).await;
        if node == 1 {
            wait_for(
                "the status page to show one storage node down",
                Duration::from_secs(30),
                || async { (storage_on_the_status_page(&gateway).await == (3, 1)).then_some(()) },
            )
            .await;
        }
        // Every image made so far reads back intact, and new ones are made.
        let phase = Instant::now();
        let verified = verify_done_images(&load.client, &load.load.created()).await;
        println!(
            "{name} dead: {verified} images read back intact in {:.1} s",
            phase.elapsed().as_secs_f64()
        );
        load.wait_for_creates(10).await;
        run_faafo(&["cluster", "start", &name, "--data-dir", data]).await;
        all_healthy(data).await;
    }

    // A dead proxy takes only its API out of rotation: the gateways send to the other.
    let api_1 = members(data)
        .await
        .into_iter()
        .find(|m| m.name == "api-1")
        .and_then(|m| m.url)
        .unwrap();
    run_faafo(&[
        "cluster",
        "kill",
        "--stay-down",
        "swift-proxy-1",
        "--data-dir",
        data,
    ])
    .await;
    wait_for(
        "api-1 to say its object store is down",
        Duration::from_secs(30),
        || async {
            let answer = reqwest::get(format!("{api_1}/readyz")).await.ok()?;
            (answer.status() == 503 && answer.text().await.ok()?.contains("object_store"))
                .then_some(())
        },
    )
    .await;
    load.wait_for_creates(20).await;
    run_faafo(&["cluster", "start", "swift-proxy-1", "--data-dir", data]).await;
    all_healthy(data).await;
    load.wait_for_creates(10).await;

    let (client, created) = load
        .finish("4 storage nodes killed one by one, a proxy killed")
        .await;
    let rerendered = assert_all_rendered_once(&client, &created).await;
    println!(
        "{} fractals, every image intact (lost 0), {rerendered} re-rendered",
        created.len()
    );
    drop(cluster);
}

/// The storage nodes `/status` shows up and down, and that its verdict is not green with
/// one down.
async fn storage_on_the_status_page(gateway: &str) -> (usize, usize) {
    let page = reqwest::get(format!("{gateway}/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let storage = page
        .split("id=\"storage\"")
        .nth(1)
        .and_then(|rest| rest.split("</table>").next())
        .unwrap_or_else(|| panic!("no storage table: {page}"));
    let (up, down) = (
        storage.matches("pill-green").count(),
        storage.matches("pill-red").count(),
    );
    if down > 0 {
        assert!(
            !page.contains("verdict-green"),
            "green with a node down: {page}"
        );
    }
    (up, down)
}
