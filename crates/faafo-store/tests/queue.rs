//! Behaviour every store must have, run against a real SQLite file and a real PostgreSQL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faafo_core::fractal::RenderResult;
use faafo_core::node::ProbeOutcome;
use faafo_core::wire::CreateFractal;
use faafo_core::{FractalSpec, FractalState, LeaseToken, Limits};
use faafo_store::{
    CreateOutcome, ListCursor, ListOrder, ListStart, NewFractal, Page, PostgresStore, SqliteStore,
    Store, StoreError, Wakeups,
};
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

/// A store under test, and what it needs to stay alive.
struct TestStore {
    store: Arc<dyn Store>,
    backend: Backend,
}

enum Backend {
    Sqlite(tempfile::TempDir),
    /// The server is kept only so that it lives as long as the test.
    Postgres {
        _server: faafo_testkit::PostgresServer,
        url: String,
    },
}

impl TestStore {
    async fn sqlite() -> TestStore {
        Self::open_on(Backend::Sqlite(tempfile::tempdir().unwrap())).await
    }

    async fn postgres() -> TestStore {
        let server = faafo_testkit::PostgresServer::start();
        let url = server.create_database().await;
        Self::open_on(Backend::Postgres {
            _server: server,
            url,
        })
        .await
    }

    async fn open_on(backend: Backend) -> TestStore {
        TestStore {
            store: open(&backend).await,
            backend,
        }
    }

    /// A second handle on the same data, as a second API process would have.
    async fn reopen(&self) -> Arc<dyn Store> {
        open(&self.backend).await
    }
}

async fn open(backend: &Backend) -> Arc<dyn Store> {
    match backend {
        Backend::Sqlite(dir) => Arc::new(
            SqliteStore::open(dir.path().join("faafo.db"))
                .await
                .unwrap(),
        ),
        Backend::Postgres { url, .. } => Arc::new(
            PostgresStore::connect(url, Wakeups::ListenNotify)
                .await
                .unwrap(),
        ),
    }
}

/// Runs each named test against SQLite and against PostgreSQL.
macro_rules! on_every_store {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $test() {
                super::$test(super::TestStore::sqlite().await).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $test() {
                super::$test(super::TestStore::postgres().await).await
            })*
        }
    };
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
        client: "ip:192.0.2.1".into(),
        max_queued_work: None,
    }
}

/// A fractal of `client`'s (16 x 8 x 32 = 4096 units of work).
fn fractal_of(client: &str, max_queued_work: Option<f64>) -> NewFractal {
    NewFractal {
        client: client.into(),
        max_queued_work,
        ..new_fractal(5)
    }
}

async fn create_for(store: &dyn Store, client: &str) -> Uuid {
    match store.create(fractal_of(client, None)).await.unwrap() {
        CreateOutcome::Created(fractal) => fractal.uuid,
        other => panic!("not created: {other:?}"),
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
        other => panic!("a fresh fractal was not created: {other:?}"),
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

async fn create_is_idempotent_by_uuid(t: TestStore) {
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

async fn list_is_oldest_first_with_a_total(t: TestStore) {
    let mut uuids = Vec::new();
    for _ in 0..5 {
        uuids.push(create(&*t.store, 5).await);
    }
    let page = t
        .store
        .list(ListOrder::OldestFirst, ListStart::Offset(1), 3)
        .await
        .unwrap();
    assert_eq!(page.total, 5);
    assert_eq!(
        page.fractals.iter().map(|f| f.uuid).collect::<Vec<_>>(),
        uuids[1..4]
    );
    let newest = t
        .store
        .list(ListOrder::NewestFirst, ListStart::Offset(0), 2)
        .await
        .unwrap();
    assert_eq!(
        newest.fractals.iter().map(|f| f.uuid).collect::<Vec<_>>(),
        [uuids[4], uuids[3]]
    );
    // Past the end: no fractal, and still the total.
    let past = t
        .store
        .list(ListOrder::OldestFirst, ListStart::Offset(10), 3)
        .await
        .unwrap();
    assert_eq!((past.fractals.len(), past.total, past.next), (0, 5, None));
}

/// A walk by cursor goes on from where the page before ended, in either order, even
/// once the fractals around that place are deleted; the last page has no cursor.
async fn a_walk_by_cursor_neither_skips_nor_repeats_across_deletions(t: TestStore) {
    let mut uuids = Vec::new();
    for _ in 0..7 {
        uuids.push(create(&*t.store, 5).await);
    }
    let listed = |page: &Page| page.fractals.iter().map(|f| f.uuid).collect::<Vec<_>>();
    let first = t
        .store
        .list(ListOrder::OldestFirst, ListStart::Offset(0), 3)
        .await
        .unwrap();
    assert_eq!(listed(&first), uuids[0..3]);
    // The cursor's own fractal and the one after it go.
    for gone in [uuids[2], uuids[3]] {
        t.store.delete(gone).await.unwrap().unwrap();
    }
    let after = ListStart::After(first.next.expect("a page of 3 out of 7 has a next"));
    let second = t
        .store
        .list(ListOrder::OldestFirst, after, 3)
        .await
        .unwrap();
    assert_eq!(listed(&second), uuids[4..7]);
    assert_eq!(second.total, 5);
    assert_eq!(second.next, None, "the list ends with this page");

    let mut newest_first = Vec::new();
    let mut start = ListStart::Offset(0);
    loop {
        let page = t
            .store
            .list(ListOrder::NewestFirst, start, 2)
            .await
            .unwrap();
        newest_first.extend(listed(&page));
        match page.next {
            Some(cursor) => start = ListStart::After(cursor),
            None => break,
        }
    }
    assert_eq!(
        newest_first,
        [uuids[6], uuids[5], uuids[4], uuids[1], uuids[0]]
    );
}

/// A cursor is the string the store gave, and nothing else parses as one.
#[test]
fn a_cursor_reads_back_from_its_text_alone() {
    for text in ["0", "17", "9223372036854775807"] {
        let cursor: ListCursor = text.parse().unwrap();
        assert_eq!(cursor.to_string(), text);
    }
    for text in ["", "-1", "+1", " 1", "1.5", "x", "9223372036854775808"] {
        assert!(text.parse::<ListCursor>().is_err(), "{text:?} parsed");
    }
}

async fn claim_gives_the_oldest_task_once(t: TestStore) {
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

async fn complete_records_the_result_and_only_the_holder_may(t: TestStore) {
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
    let held = t.store.leased(uuid, lease.token).await.unwrap();
    assert_eq!((held.uuid, held.state), (uuid, FractalState::Running));
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

/// A completion can lease the worker its next task in the same transaction: the one a
/// claim would give, only when the completion holds, and none when nothing is queued.
async fn a_completion_can_claim_the_next_task_with_it(t: TestStore) {
    let store = &*t.store;
    let first = create(store, 5).await;
    let second = create(store, 5).await;
    let lease = store.claim("w1", LEASE).await.unwrap().unwrap();
    assert_eq!(lease.fractal.uuid, first);

    // A lost lease: refused as a plain completion is, and the queued task stays queued.
    let stranger = LeaseToken::generate();
    assert!(matches!(
        store
            .complete_and_claim(first, stranger, result(), Some(("w1", LEASE)))
            .await,
        Err(StoreError::LeaseLost {
            state: FractalState::Running,
            ..
        })
    ));
    assert_eq!(
        store.get(second).await.unwrap().unwrap().state,
        FractalState::Queued
    );

    let (done, next) = store
        .complete_and_claim(first, lease.token, result(), Some(("w1", LEASE)))
        .await
        .unwrap();
    assert_eq!((done.uuid, done.state), (first, FractalState::Done));
    assert_eq!(done.result, Some(result()));
    let next = next.expect("the queued task comes with the completion");
    assert_eq!(
        (next.fractal.uuid, next.fractal.state, next.fractal.attempts),
        (second, FractalState::Running, 1)
    );
    // The new lease is a real one: its holder may renew it, and no one else may claim it.
    store.renew(second, next.token, LEASE).await.unwrap();
    assert!(store.claim("w2", LEASE).await.unwrap().is_none());

    let (done, none) = store
        .complete_and_claim(second, next.token, result(), Some(("w1", LEASE)))
        .await
        .unwrap();
    assert_eq!(done.state, FractalState::Done);
    assert!(none.is_none(), "nothing was queued, yet {none:?}");
}

async fn an_expired_lease_goes_to_another_worker_and_fences_the_first(t: TestStore) {
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

async fn a_task_out_of_attempts_fails_with_the_reason(t: TestStore) {
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

async fn fail_and_release(t: TestStore) {
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

async fn delete_cancels_a_running_task(t: TestStore) {
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

async fn stats_count_states_and_the_oldest_queued(t: TestStore) {
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

    // The age is the oldest queued task's, not the newest's.
    let aged = Duration::from_millis(50);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while t.store.stats().await.unwrap().oldest_queued_age < Some(aged) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue never aged"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    create(&*t.store, 5).await;
    let stats = t.store.stats().await.unwrap();
    assert_eq!(stats.count(FractalState::Queued), 2);
    assert!(stats.oldest_queued_age >= Some(aged), "{stats:?}");
    t.store.ping().await.unwrap();
}

async fn two_handles_on_one_store_never_claim_the_same_task(t: TestStore) {
    // Two API processes sharing one database.
    let other = t.reopen().await;
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

async fn nodes_are_remembered_updated_and_marked_when_they_leave(t: TestStore) {
    use faafo_core::{NodeBeat, NodeRole};
    assert!(t.store.nodes().await.unwrap().is_empty());
    let worker = NodeBeat {
        id: "host-7".into(),
        role: NodeRole::Worker,
        address: None,
        version: "0.1.0".into(),
        load: 3,
    };
    let api = NodeBeat {
        id: "http://127.0.0.1:9210".into(),
        role: NodeRole::Api,
        address: Some("http://127.0.0.1:9210".into()),
        version: "0.1.0".into(),
        load: 10,
    };
    t.store.node_heartbeat(&worker).await.unwrap();
    t.store.node_heartbeat(&api).await.unwrap();
    // A second process sees the same membership, and a later beat replaces the first.
    let other = t.reopen().await;
    let worker = NodeBeat { load: 4, ..worker };
    other.node_heartbeat(&worker).await.unwrap();
    let nodes = t.store.nodes().await.unwrap();
    let beats: Vec<&NodeBeat> = nodes.iter().map(|n| &n.beat).collect();
    assert_eq!(beats, [&api, &worker], "ordered by role, then id");
    assert!(
        nodes
            .iter()
            .all(|n| !n.left && n.since_heard < Duration::from_secs(5))
    );

    assert!(t.store.node_left(&api.id).await.unwrap());
    assert!(!t.store.node_left("never-seen").await.unwrap());
    let nodes = t.store.nodes().await.unwrap();
    assert!(nodes[0].left && !nodes[1].left);
    // A restarted member takes over its entry and is no longer gone.
    t.store.node_heartbeat(&api).await.unwrap();
    assert!(t.store.nodes().await.unwrap().iter().all(|n| !n.left));
}

/// A client's backlog does not hold up another client: claims take turns between the
/// clients with queued work, oldest first within each.
async fn claims_take_turns_between_clients(t: TestStore) {
    let store = &*t.store;
    let mut backlog = Vec::new();
    for _ in 0..6 {
        backlog.push(create_for(store, "key:busy").await);
    }
    // Two of the backlog are taken before the others arrive.
    for expected in &backlog[..2] {
        let lease = store.claim("w", LEASE).await.unwrap().unwrap();
        assert_eq!(lease.fractal.uuid, *expected);
    }
    let single = create_for(store, "ip:198.51.100.7").await;
    let pair = [
        create_for(store, "ip:203.0.113.9").await,
        create_for(store, "ip:203.0.113.9").await,
    ];
    let mut order = Vec::new();
    while let Some(lease) = store.claim("w", LEASE).await.unwrap() {
        order.push(lease.fractal.uuid);
    }
    // One round: the busy client's next, then each newcomer's first; then the next round.
    assert_eq!(
        order,
        [
            backlog[2], single, pair[0], backlog[3], pair[1], backlog[4], backlog[5]
        ]
    );
}

/// Past its quota a client's create stores nothing and says how much it has queued;
/// others are not affected, and finished or deleted work frees the room.
async fn a_quota_refuses_creates_past_the_clients_unfinished_work(t: TestStore) {
    let store = &*t.store;
    let quota = Some(2.5 * 4096.0);
    for _ in 0..2 {
        let outcome = store.create(fractal_of("key:a", quota)).await.unwrap();
        assert!(matches!(outcome, CreateOutcome::Created(_)), "{outcome:?}");
    }
    let refused = fractal_of("key:a", quota);
    match store.create(refused.clone()).await.unwrap() {
        CreateOutcome::OverQuota { queued_work } => assert_eq!(queued_work, 2.0 * 4096.0),
        other => panic!("created past the quota: {other:?}"),
    }
    assert!(store.get(refused.uuid).await.unwrap().is_none());
    let other = store.create(fractal_of("key:b", quota)).await.unwrap();
    assert!(matches!(other, CreateOutcome::Created(_)), "{other:?}");
    // A running task still counts; a finished one does not.
    let lease = store.claim("w", LEASE).await.unwrap().unwrap();
    assert!(matches!(
        store.create(fractal_of("key:a", quota)).await.unwrap(),
        CreateOutcome::OverQuota { .. }
    ));
    store
        .complete(lease.fractal.uuid, lease.token, result())
        .await
        .unwrap();
    let after = fractal_of("key:a", quota);
    let created = store.create(after.clone()).await.unwrap();
    assert!(matches!(created, CreateOutcome::Created(_)), "{created:?}");
    // A deleted task frees its room too, and the count stays exact.
    store.delete(after.uuid).await.unwrap();
    let again = store.create(fractal_of("key:a", quota)).await.unwrap();
    assert!(matches!(again, CreateOutcome::Created(_)), "{again:?}");
    match store.create(fractal_of("key:a", quota)).await.unwrap() {
        CreateOutcome::OverQuota { queued_work } => assert_eq!(queued_work, 2.0 * 4096.0),
        other => panic!("created past the quota: {other:?}"),
    }
}

/// Probe rounds come back oldest first, a round reported twice is kept once, and rounds
/// past the history's length are forgotten.
async fn probe_rounds_are_kept_once_in_order_for_a_day(t: TestStore) {
    let store = &*t.store;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let round = |ago_ms: i64, ok: bool| ProbeOutcome {
        finished_at_ms: now - ago_ms,
        ok,
        total_ms: 12.5,
        failed_step: (!ok).then(|| "render".to_owned()),
    };
    let day_ms = faafo_store::PROBE_HISTORY.as_millis() as i64;
    store
        .record_probes(
            "probe-a",
            &[round(day_ms + 60_000, true), round(2_000, false)],
        )
        .await
        .unwrap();
    // Sent again after a lost answer, with a newer one.
    store
        .record_probes("probe-a", &[round(2_000, false), round(1_000, true)])
        .await
        .unwrap();
    store
        .record_probes("probe-b", &[round(1_500, true)])
        .await
        .unwrap();

    let history = store.probe_history(now - 2 * day_ms).await.unwrap();
    let seen: Vec<(&str, i64, bool)> = history
        .iter()
        .map(|(probe, o)| (probe.as_str(), now - o.finished_at_ms, o.ok))
        .collect();
    assert_eq!(
        seen,
        [
            ("probe-a", 2_000, false),
            ("probe-b", 1_500, true),
            ("probe-a", 1_000, true)
        ]
    );
    assert_eq!(history[0].1.failed_step.as_deref(), Some("render"));
    assert_eq!(history[0].1.total_ms, 12.5);
    assert_eq!(store.probe_history(now - 1_200).await.unwrap().len(), 1);
}

/// Waits (up to 10 s) until the deletion count is known and differs from `before`.
async fn count_moves_from(deletions: &faafo_store::Deletions, before: Option<u64>) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match deletions.current() {
            Some(now) if Some(now) != before => return now,
            _ if std::time::Instant::now() > deadline => {
                panic!("the deletion count stayed at {before:?} for 10 s")
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The state counts and the list's total (kept by tallies, not counted on each call) agree
/// with the fractals themselves through every change: creates, claims, completions,
/// failures (by a worker and by the lease sweep), releases and deletes in every state,
/// through two handles (two API processes).
async fn counts_follow_every_change_of_state(t: TestStore) {
    let other = t.reopen().await;
    let handles = [Arc::clone(&t.store), other];
    // The lease sweep fails a task out of attempts once its lease of 1 ms runs out.
    let single_attempt = create(&*t.store, 1).await;
    let lease = t
        .store
        .claim("w2", Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.fractal.uuid, single_attempt);
    expire_until(&*t.store, |expired| expired.failed == 1).await;
    for index in 0..10 {
        create(&*handles[index % 2], 5).await;
    }
    for round in 0..3 {
        let store = &handles[round % 2];
        let lease = store.claim("w1", LEASE).await.unwrap().unwrap();
        store
            .complete(lease.fractal.uuid, lease.token, result())
            .await
            .unwrap();
    }
    for store in &handles {
        let lease = store.claim("w1", LEASE).await.unwrap().unwrap();
        store
            .fail(lease.fractal.uuid, lease.token, "bad")
            .await
            .unwrap();
    }
    let released = t.store.claim("w1", LEASE).await.unwrap().unwrap();
    t.store
        .release(released.fractal.uuid, released.token)
        .await
        .unwrap();
    for store in &handles {
        store.claim("w1", LEASE).await.unwrap().unwrap();
    }
    assert_counts_match_the_fractals(&handles).await;

    // One deleted in each state, through either handle.
    let page = t
        .store
        .list(ListOrder::OldestFirst, ListStart::Offset(0), 100)
        .await
        .unwrap();
    for (index, state) in FractalState::ALL.into_iter().enumerate() {
        let victim = page
            .fractals
            .iter()
            .find(|fractal| fractal.state == state)
            .unwrap_or_else(|| panic!("no {state:?} fractal: {:?}", page.fractals));
        handles[index % 2]
            .delete(victim.uuid)
            .await
            .unwrap()
            .unwrap();
    }
    assert_counts_match_the_fractals(&handles).await;
}

/// Asserts that every handle's state counts and list total are those of the fractals
/// the list shows.
async fn assert_counts_match_the_fractals(handles: &[Arc<dyn Store>]) {
    for store in handles {
        let page = store
            .list(ListOrder::OldestFirst, ListStart::Offset(0), 1000)
            .await
            .unwrap();
        let stats = store.stats().await.unwrap();
        let truth = FractalState::ALL.map(|state| {
            page.fractals
                .iter()
                .filter(|fractal| fractal.state == state)
                .count() as u64
        });
        assert_eq!(stats.counts(), truth);
        assert_eq!(page.total, page.fractals.len() as u64);
        assert!(
            truth.iter().all(|&count| count > 0),
            "every state occurs: {truth:?}"
        );
    }
}

async fn deletions_through_any_handle_are_heard(t: TestStore) {
    let other = t.reopen().await;
    let deletions = t.store.deletions().expect("both stores hear deletions");
    // PostgreSQL hears once its LISTEN connection is up.
    let start = count_moves_from(&deletions, None).await;
    let (mine, theirs, kept) = (
        create(&*t.store, 1).await,
        create(&*t.store, 1).await,
        create(&*t.store, 1).await,
    );
    // Creating and finishing work is not a deletion.
    let lease = t.store.claim("w", LEASE).await.unwrap().unwrap();
    t.store
        .complete(lease.fractal.uuid, lease.token, result())
        .await
        .unwrap();
    assert_eq!(deletions.current(), Some(start));

    // This handle's own delete counts before it returns.
    t.store.delete(mine).await.unwrap().unwrap();
    let after_mine = deletions.current().expect("still listening");
    assert_ne!(after_mine, start);
    // Another handle's, once heard.
    other.delete(theirs).await.unwrap().unwrap();
    count_moves_from(&deletions, Some(after_mine)).await;
    assert!(t.store.get(kept).await.unwrap().is_some());
}

/// Creates sent at once, some of them twice with the same uuid (a client retrying while
/// its first attempt is still in flight): each uuid is created exactly once, and every
/// other attempt gets that same fractal back.
async fn creates_at_once_are_each_created_once(t: TestStore) {
    let store = &t.store;
    let news: Vec<NewFractal> = (0..48)
        .map(|i| fractal_of(&format!("key:{}", i % 4), None))
        .collect();
    // Every sixth is sent a second time, beside the first.
    let attempts: Vec<NewFractal> = news.iter().chain(news.iter().step_by(6)).cloned().collect();
    let outcomes = futures::future::join_all(attempts.iter().map(|new| {
        let store = Arc::clone(store);
        let new = new.clone();
        async move { store.create(new).await.unwrap() }
    }))
    .await;
    let mut created = std::collections::HashMap::new();
    for outcome in &outcomes {
        if let CreateOutcome::Created(fractal) = outcome {
            assert!(
                created.insert(fractal.uuid, fractal.clone()).is_none(),
                "{} created twice",
                fractal.uuid
            );
        }
    }
    assert_eq!(created.len(), news.len(), "every uuid created once");
    for (attempt, outcome) in attempts.iter().zip(&outcomes) {
        let fractal = match outcome {
            CreateOutcome::Created(fractal) | CreateOutcome::Existing(fractal) => fractal,
            other => panic!("{other:?}"),
        };
        assert_eq!(fractal.uuid, attempt.uuid);
        assert_eq!(fractal, &created[&attempt.uuid]);
        assert_eq!(fractal.spec, attempt.spec);
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.count(FractalState::Queued), news.len() as u64);
    let page = store
        .list(ListOrder::OldestFirst, ListStart::Offset(0), 100)
        .await
        .unwrap();
    assert_eq!(page.total, news.len() as u64);
}

/// Creates that arrive at once are queued as if they had come one after another, in
/// the order they were sent: each client's next create takes the turn after its last
/// queued task, and a newcomer's the turn at the queue's head.
async fn creates_that_arrive_at_once_take_turns_as_one_after_another(t: TestStore) {
    let store = &t.store;
    let mut client_of = std::collections::HashMap::new();
    for _ in 0..3 {
        client_of.insert(create_for(&**store, "many").await, "many");
    }
    // The head of the queue moves to the third turn.
    for _ in 0..2 {
        store.claim("w", LEASE).await.unwrap().unwrap();
    }
    let news: Vec<NewFractal> = [("many", 3), ("some", 3), ("one", 1)]
        .iter()
        .flat_map(|&(client, count)| (0..count).map(move |_| fractal_of(client, None)))
        .collect();
    futures::future::join_all(news.iter().map(|new| {
        let store = Arc::clone(store);
        let new = new.clone();
        async move { store.create(new).await.unwrap() }
    }))
    .await;
    client_of.extend(news.iter().map(|new| (new.uuid, new.client.as_str())));
    let mut order = Vec::new();
    while let Some(lease) = store.claim("w", LEASE).await.unwrap() {
        order.push(client_of[&lease.fractal.uuid]);
    }
    // Turn 3: the third of "many", the first of "some" and "one" (newcomers join at the
    // head); then a turn for each of the others' next, in the order they were created.
    assert_eq!(
        order,
        [
            "many", "some", "one", "many", "some", "many", "some", "many"
        ]
    );
}

/// Completions sent at once, each asking for its worker's next task: every one holds,
/// and the next tasks they get are the oldest queued ones, each given to one worker only.
async fn completions_at_once_each_hold_and_claim_distinct_next_tasks(t: TestStore) {
    let store = &t.store;
    let mut queued = Vec::new();
    for _ in 0..20 {
        queued.push(create(&**store, 5).await);
    }
    let mut leases = Vec::new();
    for _ in 0..8 {
        leases.push(store.claim("w", LEASE).await.unwrap().unwrap());
    }
    let mut done = HashSet::new();
    let mut given = HashSet::new();
    let mut rounds = Vec::new();
    while !leases.is_empty() {
        let outcomes = futures::future::join_all(leases.drain(..).enumerate().map(|(i, lease)| {
            let store = Arc::clone(store);
            async move {
                let worker = format!("w{i}");
                let outcome = store
                    .complete_and_claim(
                        lease.fractal.uuid,
                        lease.token,
                        result(),
                        Some((&worker, LEASE)),
                    )
                    .await
                    .unwrap();
                (lease.fractal.uuid, outcome)
            }
        }))
        .await;
        let mut round = HashSet::new();
        for (uuid, (fractal, next)) in outcomes {
            assert_eq!((fractal.uuid, fractal.state), (uuid, FractalState::Done));
            assert!(done.insert(uuid), "{uuid} completed twice");
            if let Some(next) = next {
                assert_eq!(next.fractal.state, FractalState::Running);
                assert!(
                    given.insert(next.fractal.uuid),
                    "{} given twice",
                    next.fractal.uuid
                );
                round.insert(next.fractal.uuid);
                leases.push(next);
            }
        }
        rounds.push(round);
    }
    assert_eq!(done.len(), queued.len(), "every task done");
    // The first eight were claimed alone; each round of completions then took the
    // oldest queued tasks: eight, then the last four.
    let oldest = |range: std::ops::Range<usize>| queued[range].iter().copied().collect();
    assert_eq!(rounds, [oldest(8..16), oldest(16..20), HashSet::new()]);
    assert_eq!(store.stats().await.unwrap().count(FractalState::Done), 20);
}

/// A completion whose lease moved on is refused, alone, when others go with it.
async fn a_stale_completion_sent_with_others_is_refused_alone(t: TestStore) {
    let store = &t.store;
    let mut leases = Vec::new();
    for _ in 0..6 {
        create(&**store, 5).await;
        leases.push(store.claim("w", LEASE).await.unwrap().unwrap());
    }
    for _ in 0..6 {
        create(&**store, 5).await;
    }
    let stale = leases[2].fractal.uuid;
    let outcomes = futures::future::join_all(leases.iter().enumerate().map(|(i, lease)| {
        let store = Arc::clone(store);
        let token = if i == 2 {
            LeaseToken::generate()
        } else {
            lease.token
        };
        let uuid = lease.fractal.uuid;
        async move {
            let worker = format!("w{i}");
            let outcome = store
                .complete_and_claim(uuid, token, result(), Some((&worker, LEASE)))
                .await;
            (uuid, outcome)
        }
    }))
    .await;
    for (uuid, outcome) in outcomes {
        if uuid == stale {
            assert!(
                matches!(
                    outcome,
                    Err(StoreError::LeaseLost {
                        state: FractalState::Running,
                        ..
                    })
                ),
                "{outcome:?}"
            );
        } else {
            let (done, next) = outcome.unwrap();
            assert_eq!(done.state, FractalState::Done);
            assert!(next.is_some(), "the queue had a task for each");
        }
    }
    assert_eq!(
        store.get(stale).await.unwrap().unwrap().state,
        FractalState::Running
    );
    // The refused completion claimed nothing: one of the six is still queued.
    let stats = store.stats().await.unwrap();
    assert_eq!(
        [
            stats.count(FractalState::Queued),
            stats.count(FractalState::Running)
        ],
        [1, 6]
    );
}

on_every_store!(
    completions_at_once_each_hold_and_claim_distinct_next_tasks,
    a_stale_completion_sent_with_others_is_refused_alone,
    creates_at_once_are_each_created_once,
    creates_that_arrive_at_once_take_turns_as_one_after_another,
    deletions_through_any_handle_are_heard,
    probe_rounds_are_kept_once_in_order_for_a_day,
    claims_take_turns_between_clients,
    a_quota_refuses_creates_past_the_clients_unfinished_work,
    nodes_are_remembered_updated_and_marked_when_they_leave,
    create_is_idempotent_by_uuid,
    list_is_oldest_first_with_a_total,
    a_walk_by_cursor_neither_skips_nor_repeats_across_deletions,
    claim_gives_the_oldest_task_once,
    complete_records_the_result_and_only_the_holder_may,
    a_completion_can_claim_the_next_task_with_it,
    an_expired_lease_goes_to_another_worker_and_fences_the_first,
    a_task_out_of_attempts_fails_with_the_reason,
    fail_and_release,
    delete_cancels_a_running_task,
    stats_count_states_and_the_oldest_queued,
    counts_follow_every_change_of_state,
    two_handles_on_one_store_never_claim_the_same_task,
);

/// Several API processes started at once on a new file (as `faafo cluster up` starts
/// them) all open it: the ones that find it locked while another migrates wait their turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_stores_opening_a_new_sqlite_file_at_once_all_succeed() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faafo.db");
        let opens: Vec<_> = (0..6)
            .map(|_| tokio::spawn(SqliteStore::open(path.clone())))
            .collect();
        for open in opens {
            open.await.unwrap().expect("every store opens");
        }
    }
}

/// A store hears of work another store on the same SQLite file (another API process)
/// created: its commit watcher turns the other connection's commit into a hint.
#[tokio::test]
async fn a_sqlite_store_hears_of_work_created_through_another() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("faafo.db");
    let creator = SqliteStore::open(&path).await.unwrap();
    let waiter = SqliteStore::open(&path).await.unwrap();
    let hints = waiter.work_hints().expect("SQLite stores give hints");
    for _ in 0..3 {
        // Hints of earlier commits (the claims) are not the one this round waits for.
        let _ = tokio::time::timeout(Duration::ZERO, hints.take()).await;
        let uuid = create(&creator, 3).await;
        tokio::time::timeout(Duration::from_secs(10), hints.take())
            .await
            .expect("a hint within 10 s of the other store's create");
        let lease = waiter.claim("w", Duration::from_secs(10)).await.unwrap();
        assert_eq!(lease.map(|l| l.fractal.uuid), Some(uuid));
    }
}

/// Waits (up to 10 s) for hints and returns how many tasks they stand for.
async fn hinted(hints: &faafo_store::WorkHints) -> u64 {
    tokio::time::timeout(Duration::from_secs(10), hints.take())
        .await
        .expect("a hint within 10 s")
}

/// PostgreSQL: the tasks one process queues wake as many waiters in another, and do not
/// come back to wake the process that queued them (its routes woke its own waiters).
#[tokio::test(flavor = "multi_thread")]
async fn postgres_announces_new_tasks_to_the_other_processes_only() {
    let t = TestStore::postgres().await;
    let other = t.reopen().await;
    let mine = t.store.work_hints().expect("PostgreSQL stores give hints");
    let theirs = other.work_hints().expect("PostgreSQL stores give hints");
    // Each wakes one waiter once it listens, for work it may have missed before.
    assert_eq!(hinted(&mine).await, 1);
    assert_eq!(hinted(&theirs).await, 1);
    let deletions = t
        .store
        .deletions()
        .expect("PostgreSQL stores hear deletions");
    let listening = count_moves_from(&deletions, None).await;

    let mut created = Vec::new();
    for _ in 0..3 {
        created.push(create(&*t.store, 1).await);
    }
    let mut heard = 0;
    while heard < 3 {
        heard += hinted(&theirs).await;
    }
    assert_eq!(heard, 3, "one wake-up per task");

    // Notifications arrive in commit order: once this deletion is heard, the store's own
    // announcements (sent before it) have come back to it too.
    other.delete(created[0]).await.unwrap().unwrap();
    count_moves_from(&deletions, Some(listening)).await;
    assert!(
        tokio::time::timeout(Duration::ZERO, mine.take())
            .await
            .is_err(),
        "a store's own announcements woke it"
    );
}

/// PostgreSQL: creates sent at once go to the database together, several in one
/// statement and commit (the rows of one statement share their inserting transaction).
#[tokio::test(flavor = "multi_thread")]
async fn postgres_inserts_creates_sent_at_once_together() {
    let t = TestStore::postgres().await;
    let creates = 64;
    futures::future::join_all((0..creates).map(|_| {
        let store = Arc::clone(&t.store);
        async move { store.create(new_fractal(5)).await.unwrap() }
    }))
    .await;
    let Backend::Postgres { url, .. } = &t.backend else {
        unreachable!()
    };
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT xmin::text) FROM fractals",
            &[],
        )
        .await
        .unwrap();
    let (rows, transactions): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(rows, creates);
    assert!(
        transactions <= creates / 4,
        "{creates} creates sent at once took {transactions} transactions"
    );
}

/// PostgreSQL: a create the server refuses (here a client name PostgreSQL cannot store)
/// fails alone; the creates that went in its batch are stored as if it had not been there.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_refused_create_does_not_fail_its_batch() {
    let t = TestStore::postgres().await;
    let refused = fractal_of("key:\0", None);
    let good: Vec<NewFractal> = (0..31).map(|_| new_fractal(5)).collect();
    let outcomes = futures::future::join_all(std::iter::once(&refused).chain(&good).map(|new| {
        let store = Arc::clone(&t.store);
        let new = new.clone();
        async move { store.create(new).await }
    }))
    .await;
    assert!(
        matches!(outcomes[0], Err(StoreError::Unavailable(_))),
        "{:?}",
        outcomes[0]
    );
    for (new, outcome) in good.iter().zip(&outcomes[1..]) {
        match outcome {
            Ok(CreateOutcome::Created(fractal)) => assert_eq!(fractal.uuid, new.uuid),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        t.store.stats().await.unwrap().count(FractalState::Queued),
        good.len() as u64
    );
}
