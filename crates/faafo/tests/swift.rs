//! Images on S3, on a real replicated OpenStack Swift (4 storage nodes, 3 replicas): a
//! `faafo api` and a worker under continuous creates and image reads while a whole
//! storage node dies and comes back, and while the S3 proxy is down.

mod common;

use std::time::{Duration, Instant};

use common::load::{LoadRun, assert_all_rendered_once};
use common::{spawn_api_with, spawn_worker, wait_for};
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

    // The proxy dies: the API says the object store is unavailable (and why) and takes
    // no image, but loses nothing; once it is back, the API is ready again without a
    // restart and the renders held back meanwhile complete.
    let http = reqwest::Client::new();
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
