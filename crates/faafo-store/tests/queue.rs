//! Behaviour every store must have, run against a real SQLite file.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faafo_core::fractal::RenderResult;
use faafo_core::wire::CreateFractal;
use faafo_core::{FractalSpec, FractalState, LeaseToken, Limits};
use faafo_store::{CreateOutcome, ListOrder, NewFractal, SqliteStore, Store, StoreError};
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

struct TestStore {
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("faafo.db"))
        .await
        .unwrap();
    TestStore {
        store: Arc::new(store),
        _dir: dir,
    }
}

fn new_fractal(max_attempts: u32) -> NewFractal {
    let request = CreateFractal {
        uuid: None,
        width: 16,
        height: 8,
        iterations: 32,
        xa: -2.0,
        xb: 2.0,
        ya: -1.0,
        yb: 1.0,
        cx: Some(-0.8),
        cy: Some(0.156),
    };
    NewFractal {
        uuid: Uuid::new_v4(),
        spec: FractalSpec::parse(&request, &Limits::default(), 0).unwrap(),
        max_attempts,
    }
}

fn result() -> RenderResult {
    RenderResult {
        checksum: "ab".repeat(32),
        size: 123,
        duration: 0.5,
        generated_by: "w1".into(),
    }
}

async fn create(store: &dyn Store, max_attempts: u32) -> Uuid {
    match store.create(new_fractal(max_attempts)).await.unwrap() {
        CreateOutcome::Created(fractal) => fractal.uuid,
        CreateOutcome::Existing(_) => panic!("a fresh uuid already existed"),
    }
}

/// Sweeps until a lease of 1 ms has expired, within a bounded time.
async fn expire_until(store: &dyn Store, mut done: impl FnMut(faafo_store::ExpiredLeases) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if done(store.expire_leases().await.unwrap()) {
            return;
        }
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn create_is_idempotent_by_uuid() {
    let t = sqlite().await;
    let new = new_fractal(5);
    let CreateOutcome::Created(created) = t.store.create(new.clone()).await.unwrap() else {
        panic!("not created")
    };
    assert_eq!(created.state, FractalState::Queued);
    assert_eq!(created.attempts, 0);
    let again = t.store.create(new.clone()).await.unwrap();
    assert_eq!(again, CreateOutcome::Existing(created.clone()));
    assert_eq!(t.store.get(new.uuid).await.unwrap(), Some(created));
    assert_eq!(t.store.get(Uuid::new_v4()).await.unwrap(), None);
}

#[tokio::test]
async fn list_is_oldest_first_with_a_total() {
    let t = sqlite().await;
    let mut uuids = Vec::new();
    for _ in 0..5 {
        uuids.push(create(&*t.store, 5).await);
    }
    let page = t.store.list(ListOrder::OldestFirst, 1, 3).await.unwrap();
    assert_eq!(page.total, 5);
    assert_eq!(
        page.fractals.iter().map(|f| f.uuid).collect::<Vec<_>>(),
        uuids[1..4]
    );
    let newest = t.store.list(ListOrder::NewestFirst, 0, 2).await.unwrap();
    assert_eq!(
        newest.fractals.iter().map(|f| f.uuid).collect::<Vec<_>>(),
        [uuids[4], uuids[3]]
    );
    assert!(
        t.store
            .list(ListOrder::OldestFirst, 10, 3)
            .await
            .unwrap()
            .fractals
            .is_empty()
    );
}

#[tokio::test]
async fn claim_gives_the_oldest_task_once() {
    let t = sqlite().await;
    let first = create(&*t.store, 5).await;
    let second = create(&*t.store, 5).await;
    let a = t.store.claim("w1", LEASE).await.unwrap().unwrap();
    let b = t.store.claim("w2", LEASE).await.unwrap().unwrap();
    assert_eq!((a.fractal.uuid, b.fractal.uuid), (first, second));
    assert_eq!(
        (a.fractal.state, a.fractal.attempts),
        (FractalState::Running, 1)
    );
    assert!(t.store.claim("w3", LEASE).await.unwrap().is_none());
}

#[tokio::test]
async fn complete_records_the_result_and_only_the_holder_may() {
    let t = sqlite().await;
    let uuid = create(&*t.store, 5).await;
    let lease = t.store.claim("w1", LEASE).await.unwrap().unwrap();
    let stranger = LeaseToken::generate();
    assert!(matches!(
        t.store.complete(uuid, stranger, result()).await,
        Err(StoreError::LeaseLost {
            state: FractalState::Running,
            ..
        })
    ));
    assert!(matches!(
        t.store.renew(uuid, stranger, LEASE).await,
        Err(StoreError::LeaseLost { .. })
    ));
    t.store.check_lease(uuid, lease.token).await.unwrap();
    t.store.renew(uuid, lease.token, LEASE).await.unwrap();
    let done = t.store.complete(uuid, lease.token, result()).await.unwrap();
    assert_eq!(done.state, FractalState::Done);
    assert_eq!(done.result, Some(result()));
    assert!(done.finished_at_ms.is_some());
    // Done is final: the same token cannot write again.
    assert!(matches!(
        t.store.complete(uuid, lease.token, result()).await,
        Err(StoreError::LeaseLost {
            state: FractalState::Done,
            ..
        })
    ));
}

#[tokio::test]
async fn an_expired_lease_goes_to_another_worker_and_fences_the_first() {
    let t = sqlite().await;
    let uuid = create(&*t.store, 5).await;
    let first = t
        .store
        .claim("w1", Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap();
    expire_until(&*t.store, |swept| swept.requeued == 1).await;
    let second = t.store.claim("w2", LEASE).await.unwrap().unwrap();
    assert_eq!((second.fractal.uuid, second.fractal.attempts), (uuid, 2));
    // The first worker wakes up late: every write it tries is refused.
    assert!(matches!(
        t.store.renew(uuid, first.token, LEASE).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        t.store.complete(uuid, first.token, result()).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        t.store.fail(uuid, first.token, "late").await,
        Err(StoreError::LeaseLost { .. })
    ));
    t.store
        .complete(uuid, second.token, result())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_task_out_of_attempts_fails_with_the_reason() {
    let t = sqlite().await;
    let uuid = create(&*t.store, 2).await;
    for attempt in 1..=2 {
        let lease = t
            .store
            .claim("w1", Duration::from_millis(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lease.fractal.attempts, attempt);
        expire_until(&*t.store, |swept| swept.requeued + swept.failed == 1).await;
    }
    let failed = t.store.get(uuid).await.unwrap().unwrap();
    assert_eq!(failed.state, FractalState::Failed);
    let error = failed.error.unwrap();
    assert!(
        error.contains("gave up after 2 attempts") && error.contains("w1"),
        "{error}"
    );
    assert!(t.store.claim("w2", LEASE).await.unwrap().is_none());
}

#[tokio::test]
async fn fail_and_release() {
    let t = sqlite().await;
    let failing = create(&*t.store, 5).await;
    let lease = t.store.claim("w1", LEASE).await.unwrap().unwrap();
    t.store
        .fail(failing, lease.token, "out of memory")
        .await
        .unwrap();
    let failed = t.store.get(failing).await.unwrap().unwrap();
    assert_eq!(
        (failed.state, failed.error.as_deref()),
        (FractalState::Failed, Some("out of memory"))
    );

    let released = create(&*t.store, 5).await;
    let lease = t.store.claim("w1", LEASE).await.unwrap().unwrap();
    t.store.release(released, lease.token).await.unwrap();
    let queued = t.store.get(released).await.unwrap().unwrap();
    assert_eq!((queued.state, queued.attempts), (FractalState::Queued, 0));
    assert!(matches!(
        t.store.release(released, lease.token).await,
        Err(StoreError::LeaseLost { .. })
    ));
}

#[tokio::test]
async fn delete_cancels_a_running_task() {
    let t = sqlite().await;
    let uuid = create(&*t.store, 5).await;
    let lease = t.store.claim("w1", LEASE).await.unwrap().unwrap();
    assert_eq!(
        t.store.delete(uuid).await.unwrap().map(|f| f.uuid),
        Some(uuid)
    );
    assert!(matches!(
        t.store.complete(uuid, lease.token, result()).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        t.store.renew(uuid, lease.token, LEASE).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(t.store.delete(uuid).await.unwrap(), None);
}

#[tokio::test]
async fn stats_count_states_and_the_oldest_queued() {
    let t = sqlite().await;
    for _ in 0..3 {
        create(&*t.store, 5).await;
    }
    let lease = t.store.claim("w1", LEASE).await.unwrap().unwrap();
    t.store
        .complete(lease.fractal.uuid, lease.token, result())
        .await
        .unwrap();
    t.store.claim("w1", LEASE).await.unwrap().unwrap();
    let stats = t.store.stats().await.unwrap();
    assert_eq!(
        [
            FractalState::Queued,
            FractalState::Running,
            FractalState::Done,
            FractalState::Failed
        ]
        .map(|s| stats.count(s)),
        [1, 1, 1, 0]
    );
    assert!(stats.oldest_queued_age.is_some());
    t.store.ping().await.unwrap();
}

#[tokio::test]
async fn two_handles_on_one_file_never_claim_the_same_task() {
    // Two API processes sharing the SQLite file, as `faafo api` allows on one host.
    let t = sqlite().await;
    let other: Arc<dyn Store> = Arc::new(
        SqliteStore::open(t._dir.path().join("faafo.db"))
            .await
            .unwrap(),
    );
    for _ in 0..40 {
        create(&*t.store, 5).await;
    }
    let mut claims = Vec::new();
    for store in [Arc::clone(&t.store), other] {
        claims.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(lease) = store.claim("w", LEASE).await.unwrap() {
                got.push(lease.fractal.uuid);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for claim in claims {
        all.extend(claim.await.unwrap());
    }
    assert_eq!(all.len(), 40);
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 40);
}
