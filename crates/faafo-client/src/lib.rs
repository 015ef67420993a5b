//! The faafo HTTP client, used by the CLI and by workers alike.
//!
//! It knows several endpoints. It starts at a random one, sticks to one that works, and
//! when a request fails to connect, times out, or gets 502/503/504, it moves to the next
//! with jittered backoff, within a bounded total time. Every call it makes is safe to
//! repeat: reads, deletes, creates keyed by a client-chosen uuid, and worker calls fenced
//! by a lease token.
//!
//! With discovery on, it also asks the deployment where its other endpoints are
//! (`GET /v1/endpoints`) now and then, so a client given one address learns the others.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use faafo_core::node::{ClusterStatus, Endpoints};
use faafo_core::wire::{
    CreateFractal, ErrorBody, FailTask, FractalPage, FractalView, ImageTaken, LeaseGrant,
    LeaseHeld, LeaseRequest, upload_headers,
};
use faafo_core::{NodeBeat, WorkerToken};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// How hard to try before giving up.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// The most time one call may take across all its attempts.
    pub total: Duration,
    /// Per attempt, unless a call says otherwise (a long poll waits longer).
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// First pause after every endpoint has failed once; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// A failover of the database's leader takes up to about 30 s (Patroni's leader key
/// lives 20 s, then an election, and perhaps a pg_rewind before a synchronous standby is
/// back): a call started when it began still succeeds within [`RetryPolicy::default`]'s
/// total.
pub const DEFAULT_TOTAL: Duration = Duration::from_secs(60);

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            total: DEFAULT_TOTAL,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint URL {url:?}: {reason}")]
    InvalidEndpoint { url: String, reason: String },
    /// No endpoint gave an answer in the time allowed.
    #[error("no endpoint answered within {waited:?} (tried {}): {last_error}", tried.join(", "))]
    Unreachable {
        tried: Vec<String>,
        waited: Duration,
        last_error: String,
    },
    /// The API answered with an error.
    #[error("{message} (HTTP {status})")]
    Api { status: StatusCode, message: String },
    /// No endpoint's TLS certificate is trusted.
    #[error(
        "the TLS certificate of {endpoint} is not trusted ({reason}): give the CA that signed it with --ca-cert (or FAAFO_CA_CERT)"
    )]
    UntrustedCertificate { endpoint: String, reason: String },
    /// The API answered with something this client does not understand.
    #[error("unexpected answer from {endpoint}: {reason}")]
    Protocol { endpoint: String, reason: String },
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A complete answer: the body is read inside the retry loop, so a connection cut in the
/// middle of a body is retried like any other.
#[derive(Debug)]
struct Reply {
    endpoint: String,
    status: StatusCode,
    body: Bytes,
    /// Whether an earlier attempt may have reached the server before failing, so that
    /// this answer may describe the effect of that attempt rather than its own.
    maybe_repeated: bool,
}

/// What a worker learns from a heartbeat, upload, fail or release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    Held,
    /// The lease is gone (expired and moved on, or the fractal finished or was deleted):
    /// stop working on the task.
    Lost(String),
}

/// How often a client with discovery on asks for the deployment's endpoints.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(10);

/// Fractals per page when a [`ListWalk`] walks the list: the API's largest page.
const LIST_ALL_PAGE: u64 = 100;

/// Every fractal, oldest first, a page at a time, so that a long list need not be held in
/// memory. The walk goes by cursor: each page costs the API one index lookup however long
/// the list is, and fractals created or deleted during the walk neither skip nor repeat
/// any. Behind an endpoint of a release from before cursors it goes on by page number.
#[derive(Debug)]
pub struct ListWalk<'a> {
    client: &'a Client,
    position: WalkPosition,
    /// Fractals given so far.
    listed: u64,
}

#[derive(Debug, PartialEq)]
enum WalkPosition {
    Start,
    After(String),
    PageNumber(u64),
    Done,
}

impl WalkPosition {
    /// Where the walk goes after `answer`, the answer at this position once `listed`
    /// fractals were given, and whether the answer's fractals are given.
    ///
    /// An API from before cursors shows itself: it gives no `next` on a first page of
    /// several, and it ignores `after` (as flask-restless ignores unknown parameters), so
    /// it answers a cursor with page 1 again. That answer is dropped and the walk goes on
    /// by page number after the pages given, which were all full ones.
    fn after(&self, answer: &FractalPage, listed: u64) -> (WalkPosition, bool) {
        let next = match (self, &answer.next) {
            (WalkPosition::After(_), _) if answer.page != 0 => {
                return (WalkPosition::PageNumber(listed / LIST_ALL_PAGE + 1), false);
            }
            (WalkPosition::PageNumber(page), _) if *page < answer.total_pages => {
                WalkPosition::PageNumber(page + 1)
            }
            (WalkPosition::PageNumber(_), _) => WalkPosition::Done,
            (_, Some(cursor)) => WalkPosition::After(cursor.clone()),
            (WalkPosition::Start, None) if answer.total_pages > 1 => WalkPosition::PageNumber(2),
            (_, None) => WalkPosition::Done,
        };
        (next, true)
    }
}

impl ListWalk<'_> {
    /// The next page's fractals, or `None` once the list is done.
    pub async fn next_page(&mut self) -> Result<Option<Vec<FractalView>>, ClientError> {
        loop {
            let answer = match &self.position {
                WalkPosition::Done => return Ok(None),
                WalkPosition::Start => self.client.list_page(1, LIST_ALL_PAGE).await?,
                WalkPosition::After(cursor) => {
                    self.client.list_after(cursor, LIST_ALL_PAGE).await?
                }
                WalkPosition::PageNumber(page) => {
                    self.client.list_page(*page, LIST_ALL_PAGE).await?
                }
            };
            let (next, given) = self.position.after(&answer, self.listed);
            self.position = next;
            if given {
                self.listed += answer.objects.len() as u64;
                return Ok(Some(answer.objects));
            }
        }
    }
}

#[derive(Debug)]
pub struct Client {
    /// The endpoints given at construction: always kept, whatever discovery says.
    seeds: RwLock<Vec<String>>,
    /// The seeds and, with discovery, the endpoints the deployment listed last.
    endpoints: RwLock<Vec<String>>,
    current: AtomicUsize,
    http: reqwest::Client,
    policy: RetryPolicy,
    /// Replaced when a worker's configuration is reloaded (a token rotation).
    worker_token: RwLock<Option<WorkerToken>>,
    /// Names this client to the API (`Authorization: Bearer`), for its limits and fair share.
    api_key: Option<String>,
    /// When discovery last ran; `None` while discovery is off.
    discovered_at: Option<Mutex<Option<Instant>>>,
    /// Attempts that failed and were tried again, over the client's life.
    retries: AtomicU64,
}

impl Client {
    /// A client for the comma-separated `endpoints` (`http://host:port`, a path prefix is
    /// allowed).
    pub fn new(endpoints: &str, policy: RetryPolicy) -> Result<Client, ClientError> {
        let endpoints = parse_endpoints(endpoints)?;
        let http = http_client(&policy, Vec::new()).map_err(|e| ClientError::InvalidEndpoint {
            url: endpoints.join(","),
            reason: e.to_string(),
        })?;
        let start = rand::random_range(0..endpoints.len());
        Ok(Client {
            seeds: RwLock::new(endpoints.clone()),
            endpoints: RwLock::new(endpoints),
            current: AtomicUsize::new(start),
            http,
            policy,
            worker_token: RwLock::new(None),
            api_key: None,
            discovered_at: None,
            retries: AtomicU64::new(0),
        })
    }

    /// Learns the deployment's other endpoints from `GET /v1/endpoints` before the first
    /// call and every few seconds after: its gateways when it has any, else its API
    /// instances. The endpoints given at construction are always kept.
    pub fn with_discovery(mut self) -> Client {
        self.discovered_at = Some(Mutex::new(None));
        self
    }

    /// Trusts the certificates in `pem` (a CA, or a server's own certificate) besides the
    /// system's roots, for `https://` endpoints.
    pub fn with_root_certificates(mut self, pem: &[u8]) -> Result<Client, ClientError> {
        let invalid = |reason: String| ClientError::InvalidEndpoint {
            url: self.seeds().join(","),
            reason,
        };
        let roots = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| invalid(format!("the CA certificates: {e}")))?;
        self.http = http_client(&self.policy, roots).map_err(|e| invalid(e.to_string()))?;
        Ok(self)
    }

    /// Sends `token` with the worker protocol's calls.
    pub fn with_worker_token(self, token: WorkerToken) -> Client {
        self.set_worker_token(token);
        self
    }

    /// From now on, sends `token` with the worker protocol's calls (a rotation: calls
    /// already sent finish with the old one).
    pub fn set_worker_token(&self, token: WorkerToken) {
        *self.worker_token.write().unwrap_or_else(|p| p.into_inner()) = Some(token);
    }

    /// From now on, calls go to the comma-separated `endpoints` (and, with discovery,
    /// those the deployment lists); a call under way finishes where it is.
    pub fn set_endpoints(&self, endpoints: &str) -> Result<(), ClientError> {
        let endpoints = parse_endpoints(endpoints)?;
        let current = self.current_endpoint();
        *self.seeds.write().unwrap_or_else(|p| p.into_inner()) = endpoints.clone();
        let position = endpoints
            .iter()
            .position(|url| *url == current)
            .unwrap_or(0);
        let mut known = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        self.current.store(position, Ordering::Relaxed);
        *known = endpoints;
        Ok(())
    }

    /// The endpoints given at construction, or at the latest [`Client::set_endpoints`].
    fn seeds(&self) -> Vec<String> {
        self.seeds.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sends `key` with every call but the worker protocol's: the service counts this
    /// client's creates and queued work by it, not by its address.
    pub fn with_api_key(mut self, key: String) -> Client {
        self.api_key = Some(key);
        self
    }

    /// The endpoints calls may go to now.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The endpoint the next call starts at.
    pub fn current_endpoint(&self) -> String {
        let endpoints = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
        endpoints[self.current.load(Ordering::Relaxed) % endpoints.len()].clone()
    }

    /// Attempts that failed (refused, timed out, 502/503/504) and were made again,
    /// here or on another endpoint, since the client was made.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Asks the deployment where its gateways and API instances are, and uses them from
    /// now on (with the endpoints given at construction).
    pub async fn discover(&self) -> Result<Endpoints, ClientError> {
        let reply = self
            .send(Method::GET, "/v1/endpoints", Body::Empty, None)
            .await?;
        let found: Endpoints = decode(expect_success(reply)?)?;
        self.adopt(&found);
        Ok(found)
    }

    /// Replaces the endpoint list, staying on the current endpoint if it is still listed.
    fn adopt(&self, found: &Endpoints) {
        let preferred = if found.gateways.is_empty() {
            &found.apis
        } else {
            &found.gateways
        };
        let mut next = self.seeds();
        for url in preferred {
            let url = url.trim_end_matches('/');
            if parse_endpoints(url).is_ok() && !next.iter().any(|known| known == url) {
                next.push(url.to_owned());
            }
        }
        let current = self.current_endpoint();
        let mut endpoints = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        if *endpoints != next {
            tracing::debug!(endpoints = ?next, "endpoints discovered");
            let position = next.iter().position(|url| *url == current).unwrap_or(0);
            self.current.store(position, Ordering::Relaxed);
            *endpoints = next;
        }
    }

    /// Runs discovery when it is on and due. Failures are ignored: the known endpoints
    /// still work, and an API without discovery answers 404.
    async fn discover_if_due(&self) {
        let Some(discovered_at) = &self.discovered_at else {
            return;
        };
        {
            let mut last = discovered_at.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < DISCOVERY_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let endpoint = self.current_endpoint();
        // A short limit: this runs before a real call, which must not wait behind it
        // for a whole request timeout when the endpoint hangs.
        let limit = Some(self.policy.connect_timeout);
        match self
            .attempt(
                &Method::GET,
                &endpoint,
                "/v1/endpoints",
                &Body::Empty,
                limit,
            )
            .await
        {
            Ok((status, body, _)) if status.is_success() => {
                match serde_json::from_slice::<Endpoints>(&body) {
                    Ok(found) => self.adopt(&found),
                    Err(error) => tracing::debug!(%endpoint, %error, "unreadable endpoint list"),
                }
            }
            Ok((status, _, _)) => tracing::debug!(%endpoint, %status, "no endpoint list"),
            Err(error) => tracing::debug!(%endpoint, error = %describe(&error), "no endpoint list"),
        }
    }

    /// The deployment's nodes and queue (`GET /v1/nodes`).
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        let reply = self
            .send(Method::GET, "/v1/nodes", Body::Empty, None)
            .await?;
        decode(expect_success(reply)?)
    }

    /// Announces a gateway or worker in the membership (needs the worker token).
    pub async fn node_heartbeat(&self, beat: &NodeBeat) -> Result<(), ClientError> {
        let body = Bytes::from(serde_json::to_vec(beat).expect("serializes"));
        let reply = self
            .send(Method::POST, "/v1/nodes/heartbeat", Body::Json(body), None)
            .await?;
        expect_success(reply).map(|_| ())
    }

    /// Reports a probe's rounds for the status page (needs the worker token).
    pub async fn report_probes(
        &self,
        reports: &faafo_core::node::ProbeReports,
    ) -> Result<(), ClientError> {
        let body = Bytes::from(serde_json::to_vec(reports).expect("serializes"));
        let reply = self
            .send(Method::POST, "/v1/probes", Body::Json(body), None)
            .await?;
        expect_success(reply).map(|_| ())
    }

    /// Says a node is shutting down cleanly (needs the worker token).
    pub async fn node_leave(&self, id: &str) -> Result<(), ClientError> {
        let body =
            Bytes::from(serde_json::to_vec(&serde_json::json!({ "id": id })).expect("serializes"));
        let reply = self
            .send(Method::POST, "/v1/nodes/leave", Body::Json(body), None)
            .await?;
        expect_success(reply).map(|_| ())
    }

    pub async fn create(&self, request: &CreateFractal) -> Result<FractalView, ClientError> {
        let body = Bytes::from(serde_json::to_vec(request).expect("a fractal request serializes"));
        let reply = self
            .send(Method::POST, "/v1/fractal", Body::Json(body), None)
            .await?;
        decode(expect_success(reply)?)
    }

    pub async fn get(&self, uuid: Uuid) -> Result<FractalView, ClientError> {
        let reply = self
            .send(
                Method::GET,
                &format!("/v1/fractal/{uuid}"),
                Body::Empty,
                None,
            )
            .await?;
        decode(expect_success(reply)?)
    }

    pub async fn list_page(&self, page: u64, per_page: u64) -> Result<FractalPage, ClientError> {
        self.list_at(&format!("page={page}"), per_page).await
    }

    /// The page after the one whose `next` is `cursor`.
    pub async fn list_after(
        &self,
        cursor: &str,
        per_page: u64,
    ) -> Result<FractalPage, ClientError> {
        let cursor: String = url::form_urlencoded::byte_serialize(cursor.as_bytes()).collect();
        self.list_at(&format!("after={cursor}"), per_page).await
    }

    async fn list_at(&self, start: &str, per_page: u64) -> Result<FractalPage, ClientError> {
        let path = format!("/v1/fractal?{start}&results_per_page={per_page}");
        decode(expect_success(
            self.send(Method::GET, &path, Body::Empty, None).await?,
        )?)
    }

    /// Every fractal, oldest first (see [`ListWalk`]).
    pub async fn list_all(&self) -> Result<Vec<FractalView>, ClientError> {
        let mut all = Vec::new();
        let mut walk = self.list_walk();
        while let Some(mut page) = walk.next_page().await? {
            all.append(&mut page);
        }
        Ok(all)
    }

    /// A walk of the whole list, a page at a time (see [`ListWalk`]).
    pub fn list_walk(&self) -> ListWalk<'_> {
        ListWalk {
            client: self,
            position: WalkPosition::Start,
            listed: 0,
        }
    }

    /// Deletes a fractal. A 404 after an attempt that may have gone through counts as done.
    pub async fn delete(&self, uuid: Uuid) -> Result<(), ClientError> {
        let reply = self
            .send(
                Method::DELETE,
                &format!("/v1/fractal/{uuid}"),
                Body::Empty,
                None,
            )
            .await?;
        if reply.status == StatusCode::NOT_FOUND && reply.maybe_repeated {
            return Ok(());
        }
        expect_success(reply).map(|_| ())
    }

    /// The PNG of a done fractal.
    pub async fn image(&self, uuid: Uuid) -> Result<Bytes, ClientError> {
        let reply = self
            .send(Method::GET, &format!("/fractal/{uuid}"), Body::Empty, None)
            .await?;
        Ok(expect_success(reply)?.body)
    }

    /// Asks for one task, waiting up to `wait` for one to appear.
    pub async fn lease(
        &self,
        worker: &str,
        wait: Duration,
    ) -> Result<Option<LeaseGrant>, ClientError> {
        let request = LeaseRequest {
            worker: worker.to_owned(),
            wait_ms: i64::try_from(wait.as_millis()).unwrap_or(i64::MAX),
        };
        let body = Bytes::from(serde_json::to_vec(&request).expect("serializes"));
        let timeout = wait + self.policy.request_timeout;
        let reply = self
            .send(
                Method::POST,
                "/v1/worker/lease",
                Body::Json(body),
                Some(timeout),
            )
            .await?;
        if reply.status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        decode(expect_success(reply)?).map(Some)
    }

    pub async fn heartbeat(
        &self,
        uuid: Uuid,
        lease_token: Uuid,
    ) -> Result<LeaseOutcome, ClientError> {
        self.lease_call(
            &format!("/v1/worker/tasks/{uuid}/heartbeat"),
            &LeaseHeld { lease_token },
        )
        .await
    }

    pub async fn release(
        &self,
        uuid: Uuid,
        lease_token: Uuid,
    ) -> Result<LeaseOutcome, ClientError> {
        self.lease_call(
            &format!("/v1/worker/tasks/{uuid}/release"),
            &LeaseHeld { lease_token },
        )
        .await
    }

    pub async fn fail(
        &self,
        uuid: Uuid,
        lease_token: Uuid,
        error: &str,
    ) -> Result<LeaseOutcome, ClientError> {
        let failure = FailTask {
            lease_token,
            error: error.to_owned(),
        };
        self.lease_call(&format!("/v1/worker/tasks/{uuid}/fail"), &failure)
            .await
    }

    /// Uploads a finished PNG. [`LeaseOutcome::Lost`] means the server refused it because
    /// the lease moved on.
    pub async fn upload(&self, upload: &Upload<'_>) -> Result<LeaseOutcome, ClientError> {
        let reply = self.send_image(upload, false).await?;
        lease_outcome(reply)
    }

    /// Uploads a task's image and, in the same request, leases the worker's next task
    /// if one is queued (without waiting for one).
    pub async fn upload_and_take_next(
        &self,
        upload: &Upload<'_>,
    ) -> Result<(LeaseOutcome, Option<LeaseGrant>), ClientError> {
        let reply = self.send_image(upload, true).await?;
        if !reply.status.is_success() {
            return lease_outcome(reply).map(|outcome| (outcome, None));
        }
        let taken: ImageTaken = decode(reply)?;
        Ok((LeaseOutcome::Held, taken.next_task))
    }

    async fn send_image(&self, upload: &Upload<'_>, take_next: bool) -> Result<Reply, ClientError> {
        let path = format!("/v1/worker/tasks/{}/image", upload.uuid);
        let mut headers = upload.headers();
        if take_next {
            headers.push((upload_headers::TAKE_NEXT, "1".to_owned()));
        }
        let body = Body::Png {
            png: upload.png.clone(),
            headers,
        };
        let timeout = self.policy.request_timeout.max(Duration::from_secs(60));
        self.send(Method::PUT, &path, body, Some(timeout)).await
    }

    /// Uploads the small preview of a task's image; send it before the image, whose
    /// upload ends the lease.
    pub async fn upload_preview(
        &self,
        uuid: Uuid,
        lease_token: Uuid,
        png: Bytes,
        checksum: &str,
    ) -> Result<LeaseOutcome, ClientError> {
        let path = format!("/v1/worker/tasks/{uuid}/preview");
        let body = Body::Png {
            png,
            headers: vec![
                (upload_headers::LEASE_TOKEN, lease_token.to_string()),
                (upload_headers::CHECKSUM, checksum.to_owned()),
            ],
        };
        lease_outcome(self.send(Method::PUT, &path, body, None).await?)
    }

    async fn lease_call<T: serde::Serialize>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<LeaseOutcome, ClientError> {
        let body = Bytes::from(serde_json::to_vec(body).expect("serializes"));
        lease_outcome(
            self.send(Method::POST, path, Body::Json(body), None)
                .await?,
        )
    }

    /// Sends one call, failing over across endpoints until an endpoint answers with
    /// something other than 502/503/504 or the time is up.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Body,
        timeout: Option<Duration>,
    ) -> Result<Reply, ClientError> {
        self.discover_if_due().await;
        let started = Instant::now();
        let mut tried: Vec<String> = Vec::new();
        let mut backoff = self.policy.initial_backoff;
        let mut maybe_sent = false;
        let mut failures_in_round = 0;
        let mut untrusted = 0;
        loop {
            let (index, endpoint, count) = {
                let endpoints = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
                let index = self.current.load(Ordering::Relaxed) % endpoints.len();
                (index, endpoints[index].clone(), endpoints.len())
            };
            let endpoint = &endpoint;
            let last_error = match self.attempt(&method, endpoint, path, &body, timeout).await {
                // Over one of this client's limits: nothing was done; wait as told (if
                // the time allows) and ask again.
                Ok((status, body, retry_after)) if status == StatusCode::TOO_MANY_REQUESTS => {
                    let pause = jittered(retry_after.unwrap_or(Duration::from_secs(1)));
                    if started.elapsed() + pause >= self.policy.total {
                        return Ok(Reply {
                            endpoint: endpoint.clone(),
                            status,
                            body,
                            maybe_repeated: maybe_sent,
                        });
                    }
                    tracing::debug!(%endpoint, ?pause, "limited (429); waiting as told");
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Ok((status, body, _)) if !is_retryable(status) => {
                    return Ok(Reply {
                        endpoint: endpoint.clone(),
                        status,
                        body,
                        maybe_repeated: maybe_sent,
                    });
                }
                Ok((status, body, _)) => {
                    maybe_sent = true;
                    format!("{endpoint} answered {status}: {}", error_message(&body))
                }
                Err(error) => {
                    if let Some(reason) = untrusted_certificate(&error) {
                        untrusted += 1;
                        // Every endpoint refused for its certificate: a setting to fix,
                        // not an outage to wait out.
                        if untrusted >= count {
                            return Err(ClientError::UntrustedCertificate {
                                endpoint: endpoint.clone(),
                                reason,
                            });
                        }
                    }
                    // Only a refused connection proves the request never arrived.
                    maybe_sent |= !error.is_connect();
                    format!("{endpoint}: {}", describe(&error))
                }
            };
            if !tried.contains(endpoint) {
                tried.push(endpoint.clone());
            }
            tracing::debug!(%endpoint, error = %last_error, "request failed; trying the next endpoint");
            // Move on from the failed endpoint, unless another call already has.
            let _ = self.current.compare_exchange(
                index,
                (index + 1) % count,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            failures_in_round += 1;
            let pause = if failures_in_round >= count {
                failures_in_round = 0;
                let pause = jittered(backoff);
                backoff = (backoff * 2).min(self.policy.max_backoff);
                pause
            } else {
                jittered(Duration::from_millis(10))
            };
            let waited = started.elapsed();
            if waited + pause >= self.policy.total {
                return Err(ClientError::Unreachable {
                    tried,
                    waited,
                    last_error,
                });
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(pause).await;
        }
    }

    async fn attempt(
        &self,
        method: &Method,
        endpoint: &str,
        path: &str,
        body: &Body,
        timeout: Option<Duration>,
    ) -> Result<(StatusCode, Bytes, Option<Duration>), reqwest::Error> {
        let mut request = self
            .http
            .request(method.clone(), format!("{endpoint}{path}"))
            .timeout(timeout.unwrap_or(self.policy.request_timeout));
        let worker_token = self
            .worker_token
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(token) = worker_token {
            request = request.bearer_auth(token.expose());
        } else if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        request = match body {
            Body::Empty => request,
            Body::Json(json) => request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json.clone()),
            Body::Png { png, headers } => {
                let mut request = request
                    .header(reqwest::header::CONTENT_TYPE, "image/png")
                    .body(png.clone());
                for (name, value) in headers {
                    request = request.header(*name, value);
                }
                request
            }
        };
        let response = request.send().await?;
        let status = response.status();
        // Seconds only (the HTTP-date form is not sent by faafo).
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.bytes().await?;
        Ok((status, body, retry_after))
    }
}

/// A finished render, ready to upload.
#[derive(Debug, Clone)]
pub struct Upload<'a> {
    pub uuid: Uuid,
    pub lease_token: Uuid,
    pub png: Bytes,
    pub checksum: &'a str,
    pub duration: Duration,
    pub generated_by: &'a str,
}

impl Upload<'_> {
    fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            (upload_headers::LEASE_TOKEN, self.lease_token.to_string()),
            (upload_headers::CHECKSUM, self.checksum.to_owned()),
            (
                upload_headers::DURATION,
                format!("{:.6}", self.duration.as_secs_f64()),
            ),
            (upload_headers::GENERATED_BY, self.generated_by.to_owned()),
        ]
    }
}

#[derive(Debug)]
enum Body {
    Empty,
    Json(Bytes),
    Png {
        png: Bytes,
        headers: Vec<(&'static str, String)>,
    },
}

fn http_client(
    policy: &RetryPolicy,
    roots: Vec<reqwest::Certificate>,
) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(policy.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .tls_certs_merge(roots)
        .build()
}

/// Whether the TLS handshake failed on the server's certificate: retrying cannot help.
fn untrusted_certificate(error: &reqwest::Error) -> Option<String> {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(error) = source {
        let text = error.to_string();
        if text.contains("invalid peer certificate") {
            return Some(text);
        }
        source = error.source();
    }
    None
}

fn parse_endpoints(list: &str) -> Result<Vec<String>, ClientError> {
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            let parsed = reqwest::Url::parse(url).map_err(|e| ClientError::InvalidEndpoint {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                return Err(ClientError::InvalidEndpoint {
                    url: url.to_owned(),
                    reason: "expected http://host:port".into(),
                });
            }
            Ok(url.trim_end_matches('/').to_owned())
        })
        .collect::<Result<_, _>>()?;
    if endpoints.is_empty() {
        return Err(ClientError::InvalidEndpoint {
            url: list.to_owned(),
            reason: "no endpoint given".into(),
        });
    }
    Ok(endpoints)
}

fn is_retryable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Up to half again as long, so that many clients do not retry in step.
fn jittered(pause: Duration) -> Duration {
    pause + pause.mul_f64(rand::random_range(0.0..0.5))
}

fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_connect() {
        "connection failed"
    } else if error.is_timeout() {
        "timed out"
    } else {
        "request failed"
    };
    match std::error::Error::source(error) {
        Some(cause) => format!("{kind}: {}", faafo_core::error_chain(cause)),
        None => kind.to_owned(),
    }
}

fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => error.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

fn expect_success(reply: Reply) -> Result<Reply, ClientError> {
    if reply.status.is_success() {
        Ok(reply)
    } else {
        Err(ClientError::Api {
            status: reply.status,
            message: error_message(&reply.body),
        })
    }
}

fn lease_outcome(reply: Reply) -> Result<LeaseOutcome, ClientError> {
    match reply.status {
        status if status.is_success() => Ok(LeaseOutcome::Held),
        StatusCode::CONFLICT | StatusCode::NOT_FOUND => {
            Ok(LeaseOutcome::Lost(error_message(&reply.body)))
        }
        _ => expect_success(reply).map(|_| LeaseOutcome::Held),
    }
}

fn decode<T: DeserializeOwned>(reply: Reply) -> Result<T, ClientError> {
    serde_json::from_slice(&reply.body).map_err(|e| ClientError::Protocol {
        endpoint: reply.endpoint.clone(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_parsed_and_checked() {
        let endpoints = parse_endpoints("http://a:1/, http://b:2").unwrap();
        assert_eq!(endpoints, ["http://a:1", "http://b:2"]);
        assert!(matches!(
            parse_endpoints(""),
            Err(ClientError::InvalidEndpoint { .. })
        ));
        assert!(matches!(
            parse_endpoints("ftp://a"),
            Err(ClientError::InvalidEndpoint { .. })
        ));
        assert!(matches!(
            parse_endpoints("not a url"),
            Err(ClientError::InvalidEndpoint { .. })
        ));
    }

    #[test]
    fn discovery_prefers_gateways_and_keeps_the_given_endpoints() {
        let client = Client::new("http://seed:1", RetryPolicy::default()).unwrap();
        let found = |gateways: &[&str], apis: &[&str]| Endpoints {
            gateways: gateways.iter().map(|s| s.to_string()).collect(),
            apis: apis.iter().map(|s| s.to_string()).collect(),
        };
        client.adopt(&found(
            &["http://g1:9100/", "http://g2:9101"],
            &["http://a1:9210"],
        ));
        assert_eq!(
            client.endpoints(),
            ["http://seed:1", "http://g1:9100", "http://g2:9101"]
        );
        assert_eq!(
            client.current_endpoint(),
            "http://seed:1",
            "stays where it was"
        );
        client.adopt(&found(
            &[],
            &["http://a1:9210", "not a url", "http://seed:1"],
        ));
        assert_eq!(client.endpoints(), ["http://seed:1", "http://a1:9210"]);
        client.adopt(&found(&[], &[]));
        assert_eq!(client.endpoints(), ["http://seed:1"]);
    }

    #[tokio::test]
    async fn unreachable_endpoints_are_named_and_the_wait_is_bounded() {
        // Port 9 on loopback: nothing listens, connections are refused at once.
        let policy = RetryPolicy {
            total: Duration::from_millis(300),
            ..RetryPolicy::default()
        };
        let client = Client::new("http://127.0.0.1:9,http://127.0.0.2:9", policy).unwrap();
        let started = Instant::now();
        let error = client.get(Uuid::nil()).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let ClientError::Unreachable { tried, .. } = &error else {
            panic!("{error:?}")
        };
        assert_eq!(tried.len(), 2);
        assert!(error.to_string().contains("http://127.0.0.1:9"), "{error}");
    }

    fn answer(page: u64, total_pages: u64, next: Option<&str>) -> FractalPage {
        FractalPage {
            num_results: total_pages * 100,
            objects: Vec::new(),
            page,
            total_pages,
            next: next.map(str::to_owned),
        }
    }

    #[test]
    fn a_walk_follows_cursors_to_the_end() {
        let after = |cursor: &str| WalkPosition::After(cursor.to_owned());
        assert_eq!(
            WalkPosition::Start.after(&answer(1, 3, Some("100")), 0),
            (after("100"), true)
        );
        assert_eq!(
            after("100").after(&answer(0, 3, Some("200")), 100),
            (after("200"), true)
        );
        assert_eq!(
            after("200").after(&answer(0, 3, None), 200),
            (WalkPosition::Done, true)
        );
        for total_pages in [0, 1] {
            assert_eq!(
                WalkPosition::Start.after(&answer(1, total_pages, None), 0),
                (WalkPosition::Done, true)
            );
        }
    }

    /// Answers as a release from before cursors gives them: never a `next`, and page 1
    /// again for a request by cursor, as it ignores `after`.
    #[test]
    fn behind_an_older_api_the_walk_goes_on_by_page_number() {
        // Its first page: kept, then page 2.
        assert_eq!(
            WalkPosition::Start.after(&answer(1, 3, None), 0),
            (WalkPosition::PageNumber(2), true)
        );
        // Page 1 again for a cursor, after 300 fractals from newer APIs: dropped, and
        // the walk goes on at page 4.
        assert_eq!(
            WalkPosition::After("300".to_owned()).after(&answer(1, 5, None), 300),
            (WalkPosition::PageNumber(4), false)
        );
        // By page number to the last page, whatever the answers carry.
        assert_eq!(
            WalkPosition::PageNumber(4).after(&answer(4, 5, Some("400")), 300),
            (WalkPosition::PageNumber(5), true)
        );
        assert_eq!(
            WalkPosition::PageNumber(5).after(&answer(5, 5, None), 400),
            (WalkPosition::Done, true)
        );
    }
}
