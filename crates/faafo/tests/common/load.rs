//! Continuous client load for fault tests: creates with client-chosen uuids, reads of
//! each created fractal, of the previous one's image (checked against its checksum) and
//! of the list, over and over, through a client that retries and fails over. Every operation's outcome and every acknowledged create is recorded,
//! so a test can assert that nothing failed and nothing acknowledged was lost.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faafo_client::{Client, RetryPolicy};
use faafo_core::FractalState;
use faafo_core::wire::CreateFractal;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{verify_image, wait_for_state};

/// What the load generators did.
#[derive(Default)]
pub struct Load {
    operations: AtomicU64,
    /// Image downloads, each checked against the fractal's checksum.
    images: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// Every acknowledged create, with when the acknowledgement arrived.
    created: Mutex<Vec<(Instant, Uuid)>>,
}

impl Load {
    fn record<T>(&self, what: &str, result: Result<T, faafo_client::ClientError>) -> Option<T> {
        self.operations.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.failures
                    .lock()
                    .unwrap()
                    .push(format!("{what}: {error}"));
                None
            }
        }
    }

    /// Downloads the image of `uuid` if it is done, and checks it against the record;
    /// says whether it was done.
    async fn read_image(&self, client: &Client, uuid: Uuid) -> bool {
        let Some(view) = self.record("get", client.get(uuid).await) else {
            return false;
        };
        if view.state != FractalState::Done {
            return false;
        }
        if let Some(png) = self.record("image", client.image(uuid).await) {
            self.images.fetch_add(1, Ordering::Relaxed);
            let checksum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&png));
            if Some(&checksum) != view.checksum.as_ref() {
                self.failures.lock().unwrap().push(format!(
                    "image of {uuid}: checksum {checksum}, record {:?}",
                    view.checksum
                ));
            }
        }
        true
    }

    /// Whether any operation has failed so far.
    pub fn failed(&self) -> bool {
        !self.failures.lock().unwrap().is_empty()
    }

    pub fn created(&self) -> Vec<Uuid> {
        self.created
            .lock()
            .unwrap()
            .iter()
            .map(|(_, u)| *u)
            .collect()
    }

    /// The longest time without an acknowledged create from `since` until the next
    /// acknowledgement after `since + window` (or now): how long writes were unavailable.
    pub fn write_gap(&self, since: Instant) -> Duration {
        let acks: Vec<Instant> = self
            .created
            .lock()
            .unwrap()
            .iter()
            .map(|(at, _)| *at)
            .filter(|at| *at >= since)
            .collect();
        let mut longest = Duration::ZERO;
        let mut previous = since;
        for at in acks.iter().copied().chain(std::iter::once(Instant::now())) {
            longest = longest.max(at.saturating_duration_since(previous));
            previous = at;
        }
        longest
    }
}

/// Two load generators, each creating a fractal, reading it back and reading the first
/// page of the list, over and over, through a client of every given endpoint.
pub struct LoadRun {
    pub client: Arc<Client>,
    pub load: Arc<Load>,
    stop: CancellationToken,
    generators: Vec<tokio::task::JoinHandle<()>>,
}

impl LoadRun {
    pub fn start(endpoints: &str) -> LoadRun {
        Self::start_paced(endpoints, Duration::ZERO)
    }

    /// Like [`LoadRun::start`], each generator pausing `pause` between rounds: a bounded
    /// rate, so that a slow backing store is not buried under a backlog.
    pub fn start_paced(endpoints: &str, pause: Duration) -> LoadRun {
        Self::start_with(endpoints, pause, None)
    }

    /// Like [`LoadRun::start_paced`], trusting the certificates `ca` (PEM) for `https://`
    /// endpoints.
    pub fn start_with(endpoints: &str, pause: Duration, ca: Option<&[u8]>) -> LoadRun {
        // The default policy outlasts a failover of the database's leader.
        let mut client = Client::new(endpoints, RetryPolicy::default()).unwrap();
        if let Some(pem) = ca {
            client = client.with_root_certificates(pem).unwrap();
        }
        let client = Arc::new(client.with_discovery());
        let load = Arc::new(Load::default());
        let stop = CancellationToken::new();
        let generators = (0..2)
            .map(|_| {
                let (client, load, stop) = (Arc::clone(&client), Arc::clone(&load), stop.clone());
                tokio::spawn(async move {
                    // Created, image not read yet: oldest first.
                    let mut unread = std::collections::VecDeque::new();
                    while !stop.is_cancelled() {
                        let request = tiny_fractal();
                        let uuid = request.uuid.unwrap();
                        if let Some(view) = load.record("create", client.create(&request).await) {
                            assert_eq!(view.uuid, uuid);
                            load.created.lock().unwrap().push((Instant::now(), uuid));
                            load.record("get", client.get(uuid).await);
                        }
                        unread.push_back(uuid);
                        if let Some(&oldest) = unread.front()
                            && load.read_image(&client, oldest).await
                        {
                            unread.pop_front();
                        }
                        load.record("list", client.list_page(1, 5).await);
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        LoadRun {
            client,
            load,
            stop,
            generators,
        }
    }

    /// Waits until the load has made `creates` more creates than it had.
    pub async fn wait_for_creates(&self, creates: usize) {
        let target = self.load.created().len() + creates;
        super::wait_for("the load to go on", Duration::from_secs(60), || async {
            (self.load.created().len() >= target).then_some(())
        })
        .await;
    }

    /// Stops the generators; prints and returns what they did, failing on any failure.
    pub async fn finish(self, what: &str) -> (Arc<Client>, Vec<Uuid>) {
        self.stop.cancel();
        for generator in self.generators {
            generator.await.unwrap();
        }
        let created = self.load.created();
        let failures = self.load.failures.lock().unwrap().clone();
        println!(
            "{what}: {} operations ({} creates, {} image reads), {} client retries, {} failures",
            self.load.operations.load(Ordering::Relaxed),
            created.len(),
            self.load.images.load(Ordering::Relaxed),
            self.client.retries(),
            failures.len()
        );
        assert!(failures.is_empty(), "failed operations: {failures:#?}");
        (self.client, created)
    }
}

pub fn tiny_fractal() -> CreateFractal {
    CreateFractal {
        width: 64,
        height: 48,
        iterations: 64,
        ..super::small_fractal()
    }
}

/// Every fractal created is done with a verified image, and the list holds each exactly
/// once and nothing else. Returns how many were rendered more than once.
pub async fn assert_all_rendered_once(client: &Client, created: &[Uuid]) -> usize {
    let rerendered = assert_rendered(client, created).await;
    assert_listed_once(client, created).await;
    rerendered
}

/// Every fractal in `created` is done with a verified image. Returns how many were
/// rendered more than once.
pub async fn assert_rendered(client: &Client, created: &[Uuid]) -> usize {
    let mut rerendered = 0;
    for &uuid in created {
        let view = wait_for_state(client, uuid, FractalState::Done, Duration::from_secs(120)).await;
        verify_image(client, &view).await;
        if view.attempts > 1 {
            rerendered += 1;
        }
    }
    rerendered
}

/// Downloads and checks the image of every fractal of `created` that is done now (without
/// waiting for the others); returns how many.
pub async fn verify_done_images(client: &Client, created: &[Uuid]) -> usize {
    let mut verified = 0;
    for &uuid in created {
        let view = client.get(uuid).await.unwrap();
        if view.state == FractalState::Done {
            verify_image(client, &view).await;
            verified += 1;
        }
    }
    verified
}

/// The list holds every fractal of `created` exactly once, and nothing else for long: a
/// cluster's probe has a fractal of its own for part of each round (it deletes it), so
/// one the test did not create may be listed for a moment, never for 20 s.
pub async fn assert_listed_once(client: &Client, created: &[Uuid]) {
    let created: HashSet<Uuid> = created.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed: Vec<Uuid> = client
            .list_all()
            .await
            .unwrap()
            .iter()
            .map(|f| f.uuid)
            .collect();
        let unique: HashSet<Uuid> = listed.iter().copied().collect();
        assert_eq!(unique.len(), listed.len(), "a fractal is listed twice");
        let missing: Vec<_> = created.difference(&unique).collect();
        assert!(missing.is_empty(), "created but not listed: {missing:?}");
        let strangers: Vec<_> = unique.difference(&created).collect();
        if strangers.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "listed for 20 s, never created by the test: {strangers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
