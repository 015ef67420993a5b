//! Durable state of faafo: fractal records and their render queue.
//!
//! The queue is the fractal table itself: a fractal is inserted `queued`, so there is no
//! moment when a fractal exists without its task or the reverse. Workers claim tasks with
//! a lease (token and expiry) and every later write must present the token (fencing).
//!
//! Claims are fair between clients: each task gets a *rank* when it is queued, its
//! client's next (one past its latest task's) but never below the lowest rank still
//! queued, and claims take the lowest rank, oldest first. So every client with queued work
//! gets one task per round, and a client's backlog delays another client's first task by
//! about one task per worker (start-time fair queueing with the queue as its clock).
//!
//! [`Store`] is what the API serves from; [`SqliteStore`] is the embedded default and
//! [`PostgresStore`] the one for several hosts. The store also keeps the membership list:
//! which gateways, APIs and workers are alive.

pub mod patroni;
mod postgres;
pub mod postgres_tls;
mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use faafo_core::fractal::RenderResult;
use faafo_core::node::ProbeOutcome;
use faafo_core::{Fractal, FractalSpec, FractalState, LeaseToken, NodeBeat};
use uuid::Uuid;

pub use postgres::{PostgresOptions, PostgresStore, Wakeups};
pub use sqlite::SqliteStore;

/// A fractal about to be stored.
#[derive(Debug, Clone)]
pub struct NewFractal {
    pub uuid: Uuid,
    pub spec: FractalSpec,
    pub max_attempts: u32,
    /// Who asked (an API key's digest or an address): the unit of fair queueing.
    pub client: String,
    /// Refuse the create if the client's unfinished work (width × height × iterations,
    /// queued or running) would exceed this.
    pub max_queued_work: Option<f64>,
}

/// What a create did.
#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    Created(Fractal),
    /// A fractal with this uuid already existed; the caller decides whether it is the same.
    Existing(Fractal),
    /// Nothing was stored: the client's unfinished work is `queued_work` and this one
    /// would take it past `NewFractal::max_queued_work`.
    OverQuota {
        queued_work: f64,
    },
}

/// A task handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub fractal: Fractal,
    pub token: LeaseToken,
}

/// One page of the fractal list.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub fractals: Vec<Fractal>,
    /// All fractals, not just this page.
    pub total: u64,
    /// Where the page after this one starts, or `None` when this page ends the list.
    pub next: Option<ListCursor>,
}

impl Page {
    /// The rows a store fetches for a page of `limit`: one more, which only tells that
    /// another page follows (see [`Page::from_rows`]).
    fn rows_to_fetch(limit: u64) -> i64 {
        limit.saturating_add(1).min(i64::MAX as u64) as i64
    }

    /// The page made of `rows` (each fractal with its row id), fetched with
    /// [`Page::rows_to_fetch`]: a row past `limit` only tells that another page follows.
    fn from_rows(mut rows: Vec<(Fractal, i64)>, limit: u64, total: u64) -> Page {
        let more = rows.len() as u64 > limit;
        rows.truncate(limit as usize);
        let next = match rows.last() {
            Some(&(_, id)) if more => Some(ListCursor(id)),
            _ => None,
        };
        Page {
            fractals: rows.into_iter().map(|(fractal, _)| fractal).collect(),
            total,
            next,
        }
    }
}

/// Where a page of the list starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListStart {
    /// After this many fractals (page numbers). The store reads every fractal it skips,
    /// and a fractal deleted from an earlier page shifts the later ones back by one.
    Offset(u64),
    /// Right after the fractal a page ended with (its `next`): an index lookup however
    /// deep into the list, and fractals created or deleted elsewhere move nothing.
    After(ListCursor),
}

impl ListStart {
    /// Whether the page starts after a cursor, and the list statement's `from` (see
    /// [`list_clauses`]): the offset, or the cursor's id.
    fn bound(self) -> (bool, i64) {
        match self {
            ListStart::Offset(offset) => (false, offset.min(i64::MAX as u64) as i64),
            ListStart::After(cursor) => (true, cursor.0),
        }
    }
}

/// A place in the list: the row id of the fractal a page ended with, which stays in the
/// list's order even once that fractal is deleted. Clients see it as an opaque string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCursor(i64);

impl std::fmt::Display for ListCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for ListCursor {
    type Err = NotACursor;

    /// What [`Display`](std::fmt::Display) wrote: a row id, digits only.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(NotACursor);
        }
        text.parse().map(ListCursor).map_err(|_| NotACursor)
    }
}

/// A string that no page gave as its `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a list cursor")]
pub struct NotACursor;

/// Which end of the creation order a list starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListOrder {
    OldestFirst,
    NewestFirst,
}

/// The end of a statement that lists fractals in `order`: at most `limit` rows (a
/// placeholder), after `from` of them or, `by_cursor`, after the one whose id is `from`.
/// A cursor is compared in the order's direction, so that the primary key finds its place
/// at once.
fn list_clauses(order: ListOrder, by_cursor: bool, [limit, from]: [&str; 2]) -> String {
    let (direction, past) = match order {
        ListOrder::OldestFirst => ("ASC", ">"),
        ListOrder::NewestFirst => ("DESC", "<"),
    };
    if by_cursor {
        format!("WHERE id {past} {from} ORDER BY id {direction} LIMIT {limit}")
    } else {
        format!("ORDER BY id {direction} LIMIT {limit} OFFSET {from}")
    }
}

/// What a sweep of expired leases did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpiredLeases {
    /// Tasks put back in the queue for another worker.
    pub requeued: u64,
    /// Tasks that used up their attempts and are now `failed`.
    pub failed: u64,
}

/// The queue's shape, for metrics and status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    pub by_state: Vec<(FractalState, u64)>,
    /// Age of the oldest task still waiting for a worker.
    pub oldest_queued_age: Option<Duration>,
}

impl QueueStats {
    /// The counts as the stores keep them: queued and running rows counted through their
    /// indexes, every fractal and the failed ones from tallies; the rest are done.
    pub(crate) fn from_counts(
        queued: u64,
        running: u64,
        all: u64,
        failed: u64,
        oldest_queued_age: Option<Duration>,
    ) -> QueueStats {
        let done = all.saturating_sub(queued + running + failed);
        QueueStats {
            by_state: vec![
                (FractalState::Queued, queued),
                (FractalState::Running, running),
                (FractalState::Done, done),
                (FractalState::Failed, failed),
            ],
            oldest_queued_age,
        }
    }

    /// Every state's count, in the order of [`FractalState::ALL`].
    pub fn counts(&self) -> [u64; 4] {
        FractalState::ALL.map(|state| self.count(state))
    }

    pub fn count(&self, state: FractalState) -> u64 {
        self.by_state
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n)
    }
}

/// A node as the store last heard of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// What it said in its last heartbeat.
    pub beat: NodeBeat,
    /// Time since that heartbeat, by the store's clock.
    pub since_heard: Duration,
    /// It said goodbye on a clean shutdown.
    pub left: bool,
}

/// Why a store operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the operation; retrying later may work.
    #[error("the store is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No fractal has this uuid (any more).
    #[error("no fractal {0}")]
    NotFound(Uuid),
    /// The caller's lease is no longer valid: it expired and the task moved on, or the
    /// task finished or was deleted. The write was refused.
    #[error("the lease on fractal {uuid} is no longer held by this token (the fractal is {state})")]
    LeaseLost { uuid: Uuid, state: FractalState },
    /// Stored data does not parse; a bug or outside tampering.
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// The database URL or a file it names is wrong; only opening a store says this.
    #[error("the database URL is invalid")]
    InvalidUrl(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The durable record of fractals and their queue. Implementations must make each
/// method atomic and must apply the fencing rule to every lease-holder write.
#[async_trait]
pub trait Store: std::fmt::Debug + Send + Sync + 'static {
    /// Inserts a queued fractal, or returns the one that already has this uuid.
    async fn create(&self, new: NewFractal) -> Result<CreateOutcome, StoreError>;

    async fn get(&self, uuid: Uuid) -> Result<Option<Fractal>, StoreError>;

    /// At most `limit` fractals in creation order (or its reverse), from `start`.
    async fn list(
        &self,
        order: ListOrder,
        start: ListStart,
        limit: u64,
    ) -> Result<Page, StoreError>;

    /// Removes a fractal, cancelling its task; returns what was removed.
    async fn delete(&self, uuid: Uuid) -> Result<Option<Fractal>, StoreError>;

    /// Gives the oldest queued task to `worker` for `lease`, counting an attempt.
    async fn claim(&self, worker: &str, lease: Duration) -> Result<Option<Lease>, StoreError>;

    /// Extends a held lease by `lease` from now.
    async fn renew(&self, uuid: Uuid, token: LeaseToken, lease: Duration)
    -> Result<(), StoreError>;

    /// The fractal `token` holds the lease on; fails unless it still does.
    async fn leased(&self, uuid: Uuid, token: LeaseToken) -> Result<Fractal, StoreError>;

    /// Marks a leased task done with its result.
    async fn complete(
        &self,
        uuid: Uuid,
        token: LeaseToken,
        result: RenderResult,
    ) -> Result<Fractal, StoreError> {
        Ok(self.complete_and_claim(uuid, token, result, None).await?.0)
    }

    /// Marks a leased task done with its result and, when `next` names a worker and a
    /// lease, gives that worker the next queued task (as [`Store::claim`] would) in the
    /// same transaction: one commit for both, and no claim unless the completion holds.
    async fn complete_and_claim(
        &self,
        uuid: Uuid,
        token: LeaseToken,
        result: RenderResult,
        next: Option<(&str, Duration)>,
    ) -> Result<(Fractal, Option<Lease>), StoreError>;

    /// Marks a leased task failed for good: rendering it cannot succeed.
    async fn fail(&self, uuid: Uuid, token: LeaseToken, reason: &str) -> Result<(), StoreError>;

    /// Gives a leased task back to the queue without counting the attempt (a worker that
    /// is shutting down).
    async fn release(&self, uuid: Uuid, token: LeaseToken) -> Result<(), StoreError>;

    /// Returns tasks whose lease expired to the queue, or fails those out of attempts.
    async fn expire_leases(&self) -> Result<ExpiredLeases, StoreError>;

    async fn stats(&self) -> Result<QueueStats, StoreError>;

    /// Records that a node is alive (membership), and forgets nodes not heard from for
    /// [`faafo_core::node::FORGET_AFTER`].
    async fn node_heartbeat(&self, beat: &NodeBeat) -> Result<(), StoreError>;

    /// Records that a node shut down cleanly; false if the store never heard of it.
    async fn node_left(&self, id: &str) -> Result<bool, StoreError>;

    /// Every node the store remembers, by role and id.
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;

    /// Succeeds when the store can serve requests.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Records probe rounds (a round already recorded is not doubled) and forgets rounds
    /// older than [`PROBE_HISTORY`].
    async fn record_probes(&self, probe: &str, outcomes: &[ProbeOutcome])
    -> Result<(), StoreError>;

    /// Every probe's rounds that ended since `since_ms` (Unix milliseconds), oldest first.
    async fn probe_history(&self, since_ms: i64)
    -> Result<Vec<(String, ProbeOutcome)>, StoreError>;

    /// The members of a replicated database and their roles, for stores that know them;
    /// empty otherwise, or when nobody answers.
    async fn database_members(&self) -> Vec<faafo_core::node::DatabaseMemberView> {
        Vec::new()
    }

    /// Tasks another process may have created, for stores that can tell. A hint only:
    /// waiters must still poll.
    fn work_hints(&self) -> Option<std::sync::Arc<WorkHints>> {
        None
    }

    /// The deletions this process has heard of, made through it or any other process, for
    /// stores that hear of them all; see [`Deletions`].
    fn deletions(&self) -> Option<std::sync::Arc<Deletions>> {
        None
    }
}

/// A count of the deletions a process has heard of, so that it may keep finished
/// fractals in memory: a done fractal never changes, it can only go away. A copy read
/// while the count was `n` is good as long as the count is still `n`.
///
/// A store bumps the count after each of its own deletes commits, and when it hears of
/// one made by another process (SQLite: at its next look at the file, within
/// milliseconds; PostgreSQL: a NOTIFY). While it cannot hear (its LISTEN connection is
/// down), [`Deletions::current`] is `None`, and nothing may be served from memory.
#[derive(Debug)]
pub struct Deletions {
    count: std::sync::atomic::AtomicU64,
    listening: std::sync::atomic::AtomicBool,
}

impl Deletions {
    pub fn new(listening: bool) -> Self {
        Deletions {
            count: std::sync::atomic::AtomicU64::new(0),
            listening: std::sync::atomic::AtomicBool::new(listening),
        }
    }

    /// The count now, or `None` when deletions elsewhere might go unheard.
    pub fn current(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        // The count first: a count read while listening is one nothing was missed before.
        let count = self.count.load(Ordering::Acquire);
        self.listening.load(Ordering::Acquire).then_some(count)
    }

    /// A delete happened, or may have: every copy read before now is suspect.
    pub fn heard(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Whether deletions made elsewhere are being heard; either change also counts as a
    /// deletion, as some may have been missed around it.
    pub fn set_listening(&self, listening: bool) {
        self.listening
            .store(listening, std::sync::atomic::Ordering::Release);
        self.heard();
    }
}

/// A count of tasks that may have appeared, added to by whoever learns of them and taken
/// by one consumer, so that a batch of tasks wakes as many waiters and a task added
/// between two takes is never missed. A hint only: waiters still poll.
#[derive(Debug, Default)]
pub struct WorkHints {
    pending: std::sync::atomic::AtomicU64,
    added: tokio::sync::Notify,
}

impl WorkHints {
    pub fn add(&self, tasks: u64) {
        if tasks > 0 {
            self.pending
                .fetch_add(tasks, std::sync::atomic::Ordering::AcqRel);
            // Kept as a permit when the consumer is not waiting yet.
            self.added.notify_one();
        }
    }

    /// Waits until tasks were added, and takes them all.
    pub async fn take(&self) -> u64 {
        loop {
            let tasks = self.pending.swap(0, std::sync::atomic::Ordering::AcqRel);
            if tasks > 0 {
                return tasks;
            }
            self.added.notified().await;
        }
    }
}

/// How long probe rounds are kept.
pub const PROBE_HISTORY: Duration = Duration::from_secs(24 * 3600);

/// A membership row, as both backends read it.
pub(crate) fn node_record(
    id: String,
    role: &str,
    address: Option<String>,
    version: String,
    load: i64,
    since_heard_ms: i64,
    left: bool,
) -> Result<NodeRecord, StoreError> {
    let role = role
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("node {id}: {e}")))?;
    Ok(NodeRecord {
        beat: NodeBeat {
            id,
            role,
            address,
            version,
            load: load.max(0) as u64,
        },
        since_heard: Duration::from_millis(since_heard_ms.max(0) as u64),
        left,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_hints_count_every_task_added_before_or_during_a_take() {
        let hints = std::sync::Arc::new(WorkHints::default());
        hints.add(2);
        hints.add(0);
        hints.add(3);
        assert_eq!(hints.take().await, 5);
        // Taken: nothing is left.
        assert!(
            tokio::time::timeout(Duration::ZERO, hints.take())
                .await
                .is_err()
        );
        let adder = std::sync::Arc::clone(&hints);
        let waiting = tokio::spawn(async move { hints.take().await });
        adder.add(1);
        let taken = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("a take waiting when a task is added returns")
            .unwrap();
        assert_eq!(taken, 1);
    }
}
