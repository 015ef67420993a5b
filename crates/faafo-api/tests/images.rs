//! The object store behaviour the API relies on, on both backends: a directory, and S3
//! on a real replicated OpenStack Swift (4 storage nodes, 3 replicas), also with a
//! storage node dead.

use bytes::Bytes;
use faafo_api::{Images, ImagesError, Rendition};
use faafo_testkit::SwiftCluster;
use futures::TryStreamExt;
use uuid::Uuid;

async fn read_all(images: &Images, uuid: Uuid, range: Option<std::ops::Range<u64>>) -> Vec<u8> {
    let stream = images.stream(uuid, Rendition::Full, range).await.unwrap();
    let chunks: Vec<Bytes> = stream.bytes.try_collect().await.unwrap();
    chunks.concat()
}

/// Put, get, stream, ranges, overwrite, delete, missing and probe.
async fn behaves(images: &Images) {
    let uuid = Uuid::new_v4();
    // Larger than one network read, so streaming really streams.
    let png: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    images
        .put(uuid, Rendition::Full, Bytes::from(png.clone()))
        .await
        .unwrap();
    assert_eq!(images.get(uuid, Rendition::Full).await.unwrap(), png);
    assert_eq!(read_all(images, uuid, None).await, png);

    let stream = images
        .stream(uuid, Rendition::Full, Some(1000..2000))
        .await
        .unwrap();
    assert_eq!(
        (stream.range.clone(), stream.size),
        (1000..2000, png.len() as u64)
    );
    let part: Vec<Bytes> = stream.bytes.try_collect().await.unwrap();
    assert_eq!(part.concat(), &png[1000..2000]);
    let tail = read_all(images, uuid, Some(299_990..300_000)).await;
    assert_eq!(tail, &png[299_990..]);

    // The same bytes again (a redelivered task) are harmless.
    images
        .put(uuid, Rendition::Full, Bytes::from(png.clone()))
        .await
        .unwrap();
    assert_eq!(images.get(uuid, Rendition::Full).await.unwrap(), png);

    // The preview is a separate object of the same fractal.
    assert!(matches!(
        images.get(uuid, Rendition::Preview).await,
        Err(ImagesError::Missing(u, Rendition::Preview)) if u == uuid
    ));
    let preview = Bytes::from_static(b"a small picture");
    images
        .put(uuid, Rendition::Preview, preview.clone())
        .await
        .unwrap();
    assert_eq!(images.get(uuid, Rendition::Preview).await.unwrap(), preview);
    assert_eq!(images.get(uuid, Rendition::Full).await.unwrap(), png);

    // A delete takes both.
    images.delete(uuid).await.unwrap();
    for rendition in [Rendition::Full, Rendition::Preview] {
        // Swift is eventually consistent: with a node down or just back, a replica that
        // missed the delete may still answer for a moment (faafo never asks: the record
        // goes first).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !matches!(images.get(uuid, rendition).await, Err(ImagesError::Missing(u, r)) if u == uuid && r == rendition)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the {rendition} of {uuid} still there 60 s after its delete"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    assert!(matches!(
        images.stream(uuid, Rendition::Full, None).await,
        Err(ImagesError::Missing(..))
    ));
    // Deleting what is gone is not an error.
    images.delete(uuid).await.unwrap();
    images.probe().await.unwrap();
}

#[tokio::test]
async fn a_directory_behaves() {
    let dir = tempfile::tempdir().unwrap();
    let images = Images::open(&format!("file://{}", dir.path().display()))
        .await
        .unwrap();
    behaves(&images).await;
}

#[test]
fn s3_on_replicated_swift_behaves_with_a_storage_node_dead() {
    for (key, value) in SwiftCluster::credentials() {
        // SAFETY: no other thread runs yet (the runtime is built below).
        unsafe { std::env::set_var(key, value) };
    }
    let mut swift = SwiftCluster::start(4);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The bucket does not exist yet: opening creates it.
    let url = swift.object_store_url("faafo-test");
    let images = runtime.block_on(Images::open(&url)).unwrap();
    runtime.block_on(behaves(&images));
    // A prefix keeps another deployment's images apart in the same bucket.
    let prefixed = runtime
        .block_on(Images::open(
            &url.replace("faafo-test?", "faafo-test/staging?"),
        ))
        .unwrap();
    runtime.block_on(behaves(&prefixed));

    // Images written before a node dies are all still there while it is down, and new
    // ones can be written and read.
    let before: Vec<(Uuid, Bytes)> = (0..20)
        .map(|i| (Uuid::new_v4(), Bytes::from(vec![i as u8; 5000 + i])))
        .collect();
    runtime.block_on(async {
        for (uuid, png) in &before {
            images
                .put(*uuid, Rendition::Full, png.clone())
                .await
                .unwrap();
        }
    });
    swift.kill_node(1);
    runtime.block_on(async {
        for (uuid, png) in &before {
            assert_eq!(&images.get(*uuid, Rendition::Full).await.unwrap(), png);
        }
        behaves(&images).await;
    });
    swift.start_node(1);
    runtime.block_on(behaves(&images));
}

#[test]
fn bad_urls_and_a_dead_store_are_clear_errors() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (url, needle) in [
        ("ftp://x", "unsupported object store URL"),
        ("file://relative", "unsupported object store URL"),
        ("s3://", "no bucket"),
        ("s3://b?endpoint=ftp://x", "must be http:// or https://"),
        ("s3://b?colour=blue", "unknown parameter \"colour\""),
    ] {
        let error = runtime.block_on(Images::open(url)).unwrap_err().to_string();
        assert!(error.contains(needle), "{url}: {error}");
    }
    // Nothing listens on port 9 of this loopback address.
    let error = runtime
        .block_on(Images::open("s3://b?endpoint=http://127.0.0.1:9"))
        .unwrap_err();
    assert!(matches!(error, ImagesError::Unavailable(_)), "{error:?}");
}
