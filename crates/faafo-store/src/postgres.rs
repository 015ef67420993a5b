//! The store on PostgreSQL, for many API processes on many hosts.
//!
//! Claims take the oldest queued row with `FOR UPDATE SKIP LOCKED`, so concurrent claims
//! never wait on each other. Every time comes from the database's clock, so API hosts
//! with skewed clocks agree on lease expiry. A URL may list several hosts with
//! `target_session_attrs=read-write`: new connections go to whichever accepts writes, and a
//! connection that fails is dropped rather than reused, so after a failover the pool
//! refills from the new primary. `LISTEN faafo_work` wakes waiting workers at once; it is
//! a hint, and polling remains the guarantee (and the only mechanism in poll-only mode, for
//! transaction-pooling proxies where LISTEN does not work).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use faafo_core::fractal::RenderResult;
use faafo_core::node::{FORGET_AFTER, ProbeOutcome};
use faafo_core::{Fractal, FractalSpec, FractalState, LeaseToken, NodeBeat, Window};
use std::sync::Mutex;

use tokio::sync::watch;
use tokio_postgres::Row;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::patroni::{self, Leader, PatroniFence};
use crate::postgres_tls::{self, PostgresTls};
use crate::{
    CreateOutcome, Deletions, ExpiredLeases, Lease, ListOrder, ListStart, NewFractal, NodeRecord,
    PROBE_HISTORY, Page, QueueStats, Store, StoreError, WorkHints, list_clauses, node_record,
};
use create_batches::CreateBatches;

mod create_batches;

/// Schema versions in order; `faafo_schema` records how many have been applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE FUNCTION faafo_now_ms() RETURNS bigint
    LANGUAGE sql VOLATILE AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;
CREATE TABLE fractals (
    id               bigserial PRIMARY KEY,
    uuid             uuid             NOT NULL UNIQUE,
    width            integer          NOT NULL,
    height           integer          NOT NULL,
    iterations       integer          NOT NULL,
    xa               double precision NOT NULL,
    xb               double precision NOT NULL,
    ya               double precision NOT NULL,
    yb               double precision NOT NULL,
    cx               double precision NOT NULL,
    cy               double precision NOT NULL,
    seed             bigint,
    state            text             NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts         integer          NOT NULL DEFAULT 0,
    max_attempts     integer          NOT NULL,
    lease_token      uuid,
    lease_expires_at bigint,
    leased_by        text,
    checksum         text,
    size             bigint,
    duration         double precision,
    generated_by     text,
    error            text,
    created_at       bigint           NOT NULL DEFAULT faafo_now_ms(),
    finished_at      bigint
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05);
-- Only work still to do is indexed for claims and sweeps: finished rows stay out of the hot path.
CREATE INDEX fractals_queued ON fractals (id) WHERE state = 'queued';
CREATE INDEX fractals_leased ON fractals (lease_expires_at) WHERE state = 'running';
"#,
    r#"
CREATE TABLE nodes (
    id        text   PRIMARY KEY,
    role      text   NOT NULL,
    address   text,
    version   text   NOT NULL,
    load      bigint NOT NULL,
    last_seen bigint NOT NULL,
    left_at   bigint
);
"#,
    // Fair queueing (see the crate's documentation) and per-client quotas.
    r#"
ALTER TABLE fractals ADD COLUMN client text NOT NULL DEFAULT '';
ALTER TABLE fractals ADD COLUMN fair_rank bigint NOT NULL DEFAULT 0;
CREATE INDEX fractals_fair_queue ON fractals (fair_rank, id) WHERE state = 'queued';
-- A client's next rank and, with fractals_leased for the few running rows, its
-- unfinished work. Queued rows only: a claim leaves it, a completion does not touch it.
CREATE INDEX fractals_client_queued ON fractals (client, fair_rank) WHERE state = 'queued';
"#,
    // The probes' rounds, for the status page.
    r#"
CREATE TABLE probe_rounds (
    probe       text             NOT NULL,
    finished_at bigint           NOT NULL,
    ok          boolean          NOT NULL,
    total_ms    double precision NOT NULL,
    failed_step text,
    PRIMARY KEY (finished_at, probe)
);
"#,
    // A lease token is held by a running row and by no other: the lease holder's writes
    // find their row by uuid and token alone (see `HELD`). Every write has kept to that
    // since the first schema; the updates only make sure that the constraint can be added.
    r#"
UPDATE fractals SET lease_token = NULL, lease_expires_at = NULL
    WHERE state <> 'running' AND lease_token IS NOT NULL;
UPDATE fractals SET state = 'queued', lease_expires_at = NULL, leased_by = NULL
    WHERE state = 'running' AND lease_token IS NULL;
ALTER TABLE fractals ADD CONSTRAINT fractals_token_while_running
    CHECK ((lease_token IS NOT NULL) = (state = 'running'));
"#,
    // Counts kept by triggers, so that a list's total and the state counts are not scans
    // of the whole table: every fractal, and the failed ones. (Queued and running rows
    // are counted through their own indexes, done ones by difference, so that neither a
    // claim nor a completion pays for a count.) Each server process adds to its own row
    // of the 64, so that concurrent writes do not wait on one row; a statement touches
    // one row only, so that they cannot deadlock. Inserts and deletes are counted once
    // per statement: a row updated once per inserted row would pile up versions in a
    // large transaction, each update slower than the last. The lock keeps writers out
    // between the first count and the triggers.
    r#"
LOCK TABLE fractals IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE fractal_tallies (
    slot     integer PRIMARY KEY,
    fractals bigint  NOT NULL,
    failed   bigint  NOT NULL
) WITH (fillfactor = 20);
INSERT INTO fractal_tallies (slot, fractals, failed)
    SELECT slot, 0, 0 FROM generate_series(0, 63) AS slot;
UPDATE fractal_tallies SET fractals = (SELECT count(*) FROM fractals),
                           failed = (SELECT count(*) FROM fractals WHERE state = 'failed')
    WHERE slot = 0;
CREATE FUNCTION fractals_tally() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_LEVEL = 'ROW' THEN
        -- A row's state changed to or from failed.
        UPDATE fractal_tallies
            SET failed = failed + (NEW.state = 'failed')::integer - (OLD.state = 'failed')::integer
            WHERE slot = pg_backend_pid() % 64;
    ELSIF TG_OP = 'INSERT' THEN
        UPDATE fractal_tallies AS tally
            SET fractals = tally.fractals + added.fractals, failed = tally.failed + added.failed
            FROM (SELECT count(*) AS fractals, count(*) FILTER (WHERE state = 'failed') AS failed
                  FROM added_fractals) AS added
            WHERE tally.slot = pg_backend_pid() % 64 AND added.fractals > 0;
    ELSE
        UPDATE fractal_tallies AS tally
            SET fractals = tally.fractals - removed.fractals, failed = tally.failed - removed.failed
            FROM (SELECT count(*) AS fractals, count(*) FILTER (WHERE state = 'failed') AS failed
                  FROM removed_fractals) AS removed
            WHERE tally.slot = pg_backend_pid() % 64 AND removed.fractals > 0;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER fractals_added AFTER INSERT ON fractals
    REFERENCING NEW TABLE AS added_fractals
    FOR EACH STATEMENT EXECUTE FUNCTION fractals_tally();
CREATE TRIGGER fractals_removed AFTER DELETE ON fractals
    REFERENCING OLD TABLE AS removed_fractals
    FOR EACH STATEMENT EXECUTE FUNCTION fractals_tally();
CREATE TRIGGER fractals_failures_counted AFTER UPDATE OF state ON fractals
    FOR EACH ROW WHEN ((OLD.state = 'failed') <> (NEW.state = 'failed'))
    EXECUTE FUNCTION fractals_tally();
"#,
    // A claim must read fractals_fair_queue in its order and stop at the first row it can
    // lock. Once autovacuum has analyzed a table while nothing was queued, PostgreSQL
    // expects one queued row, and every other index of queued rows then looked as cheap:
    // the claim read all the queued rows through one of them and sorted them, a cost
    // that grew with the backlog (3 ms a claim with 5,000 queued). fractals_queued is no
    // longer needed (the state counts find the oldest queued task in fractals_fair_queue);
    // `client IS NOT NULL`, always true, keeps the client index to statements that name a
    // client, which a claim does not.
    r#"
DROP INDEX IF EXISTS fractals_queued;
DROP INDEX IF EXISTS fractals_client_queued;
CREATE INDEX fractals_client_queued ON fractals (client, fair_rank)
    WHERE state = 'queued' AND client IS NOT NULL;
"#,
    // The failure count's trigger fires for the statements that name `error` rather than
    // `state`: a statement that makes a row failed says why, and claims and completions
    // do not touch `error`. Every claim and completion used to pay for the trigger: its
    // condition was read and prepared again for each statement, about 3% of the server's
    // time in the queue benchmark. Statements of earlier releases (whose completions
    // clear `error`) still fire it, and are still counted right.
    r#"
DROP TRIGGER fractals_failures_counted ON fractals;
CREATE TRIGGER fractals_failures_counted AFTER UPDATE OF error ON fractals
    FOR EACH ROW WHEN ((OLD.state = 'failed') <> (NEW.state = 'failed'))
    EXECUTE FUNCTION fractals_tally();
"#,
];

/// Every fractal and the failed ones (see the migration that adds `fractal_tallies`).
const TALLIES: &str = "SELECT sum(fractals)::bigint, sum(failed)::bigint FROM fractal_tallies";

/// Arbitrary, fixed: the advisory lock that serializes migrations across processes.
const MIGRATION_LOCK: i64 = 0x6661_6166_6f00;

/// Applies those of `migrations` that `faafo_schema` does not record as applied.
async fn apply_migrations(
    client: &impl tokio_postgres::GenericClient,
    migrations: &[&str],
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS faafo_schema (version integer NOT NULL)")
        .await?;
    let applied: i64 = client
        .query_one("SELECT count(*) FROM faafo_schema", &[])
        .await?
        .get(0);
    for (version, migration) in (1i32..).zip(migrations).skip(applied as usize) {
        client.batch_execute(migration).await?;
        client
            .execute(
                "INSERT INTO faafo_schema (version) VALUES ($1)",
                &[&version],
            )
            .await?;
    }
    Ok(())
}

/// A client's unfinished work (width × height × iterations), for its quota; `client` is
/// the parameter that holds the client.
fn unfinished_work(client: &str) -> String {
    format!(
        "SELECT coalesce((SELECT sum(width::float8 * height * iterations) FROM fractals \
                           WHERE client = {client} AND state = 'queued'), 0) \
              + coalesce((SELECT sum(width::float8 * height * iterations) FROM fractals \
                           WHERE state = 'running' AND client = {client}), 0)"
    )
}

/// The row whose lease `$2` holds, for fractal `$1`. The schema guarantees that only a
/// running row holds a token, so the clause need not say `state = 'running'`; saying it
/// would also make the partial index of running rows match, and PostgreSQL's plan for a
/// table without statistics yet (a new database, until autovacuum's first analyze) then
/// scans every running row instead of looking up the uuid.
const HELD: &str = "uuid = $1 AND lease_token = $2";

const COLUMNS: &str = "uuid, width, height, iterations, xa, xb, ya, yb, cx, cy, seed, state, attempts, \
                       max_attempts, checksum, size, duration, generated_by, error, created_at, finished_at";

/// The claim of the next queued task (fairest rank first), with the placeholders of its
/// lease token, lease length in milliseconds and worker, and `condition` added to the
/// choice of the task.
fn claim_statement([token, lease_ms, worker]: [&str; 3], condition: &str) -> String {
    format!(
        "UPDATE fractals SET state = 'running', attempts = attempts + 1, lease_token = {token}, \
         lease_expires_at = faafo_now_ms() + {lease_ms}, leased_by = {worker} \
         WHERE id = (SELECT id FROM fractals WHERE state = 'queued' {condition} ORDER BY fair_rank, id LIMIT 1 \
                     FOR UPDATE SKIP LOCKED) \
         RETURNING {COLUMNS}"
    )
}

/// Up to `$1` fractals in `order`, each with its id and the total, from `$2` (see
/// [`list_clauses`]). The total comes in the same statement, so that it agrees with the
/// page and costs no round trip of its own.
fn list_statement(order: ListOrder, by_cursor: bool) -> String {
    let clauses = list_clauses(order, by_cursor, ["$1", "$2"]);
    format!(
        "SELECT {COLUMNS}, id, (SELECT sum(fractals)::bigint FROM fractal_tallies) \
         FROM fractals {clauses}"
    )
}

/// The insert of a new task (`$1`-`$13`: its uuid, spec, attempts and client), which
/// returns its row, or none when the uuid exists (or, with `quota`, when the client's
/// unfinished work plus `$15` would exceed `$14`).
///
/// The rank: the client's next, but never below the lowest still queued. Both are read as
/// the first entry in an index's order rather than with max() and min(): for those, the
/// plan PostgreSQL makes before a table has statistics read every queued row of the
/// client index (273 buffers per insert with a queue of a few hundred) instead of one.
/// Under a quota the row is inserted only while the client's unfinished work leaves room
/// (creates of one client then take turns, see `create`). Without a quota the statement
/// has no condition at all: one that a bound value folds away (`$14 IS NULL OR ...`)
/// makes PostgreSQL plan the statement anew on every call, as its custom plans look
/// cheaper than the generic one, and that planning cost twice the insert itself.
fn create_statement(quota: bool) -> String {
    let quota_condition = if quota {
        format!("WHERE ({}) + $15 <= $14", unfinished_work("$13"))
    } else {
        String::new()
    };
    format!(
        "INSERT INTO fractals (uuid, width, height, iterations, xa, xb, ya, yb, cx, cy, \
         seed, state, max_attempts, client, fair_rank) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'queued', $12, $13, greatest(\
           (SELECT fair_rank + 1 FROM fractals WHERE client = $13 AND state = 'queued' \
              ORDER BY fair_rank DESC LIMIT 1), \
           (SELECT fair_rank FROM fractals WHERE state = 'queued' ORDER BY fair_rank, id LIMIT 1), 0) \
         {quota_condition} \
         ON CONFLICT (uuid) DO NOTHING RETURNING {COLUMNS}"
    )
}

/// The completion of the task `$1` by the holder of lease `$2`, with the result's
/// checksum, size, duration and worker (`$3`-`$6`). It leaves `error` alone, which only a
/// failure sets (see the trigger that counts failures).
fn completion_statement() -> String {
    format!(
        "UPDATE fractals SET state = 'done', checksum = $3, size = $4, duration = $5, generated_by = $6, \
         finished_at = faafo_now_ms(), lease_token = NULL, lease_expires_at = NULL \
         WHERE {HELD} RETURNING {COLUMNS}"
    )
}

/// [`completion_statement`] and the claim of the worker's next task (`$7`-`$9` as in
/// [`claim_statement`]) in one statement: the claim runs only if the completion changed a
/// row, and both commit together. The last column tells their rows apart.
fn completion_and_claim_statement() -> String {
    format!(
        "WITH done AS ({}), next AS ({}) \
         SELECT *, false FROM done UNION ALL SELECT *, true FROM next",
        completion_statement(),
        claim_statement(["$7", "$8", "$9"], "AND EXISTS (SELECT FROM done)")
    )
}

/// The state counts and the age of the oldest queued task, in one statement so that the
/// counts add up: queued and running rows through their partial indexes, the rest from
/// the tallies. One read of fractals_fair_queue counts the queued rows and finds the
/// oldest (its key holds the id), so that no other index of queued rows is needed.
fn stats_statement() -> String {
    format!(
        "SELECT queued.rows, (SELECT count(*) FROM fractals WHERE state = 'running'), tallies.*, \
                faafo_now_ms() - (SELECT created_at FROM fractals WHERE id = queued.oldest) \
         FROM (SELECT count(*) AS rows, min(id) AS oldest FROM fractals WHERE state = 'queued') AS queued, \
              ({TALLIES}) AS tallies"
    )
}

/// The notification channel that announces new work.
const CHANNEL: &str = "faafo_work";
/// Where deletes are announced, so that every process drops its copies (see `Deletions`).
const DELETIONS_CHANNEL: &str = "faafo_deleted";

/// Longest time one store operation may take before it counts as unavailable.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether to use LISTEN/NOTIFY wake-ups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeups {
    /// LISTEN on a dedicated connection, NOTIFY on every new task.
    ListenNotify,
    /// Polling only, for connection poolers in transaction mode.
    PollOnly,
}

/// How an API process reaches PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    pub wakeups: Wakeups,
    /// The REST APIs of the Patroni members (`http://host:8008`). When given, writes go
    /// only to the leader Patroni confirms (see [`crate::patroni`]), at the PostgreSQL
    /// address Patroni advertises for it, with the user, password and database of the URL.
    pub patroni: Vec<String>,
    /// PEM roots trusted besides the system's for `sslmode=verify-ca`/`verify-full` when
    /// the URL names no `sslrootcert` (faafo's `--ca-cert`).
    pub ca_pem: Option<Vec<u8>>,
}

impl PostgresOptions {
    pub fn new(wakeups: Wakeups) -> PostgresOptions {
        PostgresOptions {
            wakeups,
            patroni: Vec::new(),
            ca_pem: None,
        }
    }
}

#[derive(Debug)]
pub struct PostgresStore {
    /// Shared with the LISTEN task, which follows the same server.
    target: Arc<Target>,
    wakeups: Wakeups,
    /// Tasks other processes announced.
    hints: Arc<WorkHints>,
    /// Tasks this process made queued, for the LISTEN task to announce (see `listen`).
    announcements: Arc<WorkHints>,
    /// Heard through the LISTEN connection, and bumped by this store's own deletes.
    deletions: Arc<Deletions>,
    stop_listening: CancellationToken,
    /// Creates outside any quota go to the database in batches.
    creates: CreateBatches,
}

/// The connection pools of one server (or one URL).
#[derive(Debug)]
struct Pools {
    /// Durable writes and reads.
    durable: Pool,
    /// Lease bookkeeping (claim, renew, release, expiry) with `synchronous_commit = off`:
    /// a lease lost in a database crash only sends its task back to the queue, and fencing
    /// makes the old holder's writes fail. Creates and completions stay fully durable.
    lease: Pool,
}

impl Pools {
    fn new(config: &tokio_postgres::Config, tls: &PostgresTls) -> Result<Pools, StoreError> {
        let mut relaxed = config.clone();
        relaxed.options(format!(
            "{} -c synchronous_commit=off",
            config.get_options().unwrap_or_default()
        ));
        Ok(Pools {
            durable: build_pool(config.clone(), tls.clone())?,
            lease: build_pool(relaxed, tls.clone())?,
        })
    }

    fn close(&self) {
        self.durable.close();
        self.lease.close();
    }
}

/// Where connections go, and how (TLS or not).
#[derive(Debug)]
struct Target {
    route: Route,
    tls: PostgresTls,
}

#[derive(Debug)]
enum Route {
    /// The URL's hosts as libpq would choose among them.
    Url {
        config: tokio_postgres::Config,
        pools: Arc<Pools>,
    },
    /// The leader Patroni confirms: pools for each leader term, closed when it ends.
    Patroni {
        base: tokio_postgres::Config,
        fence: PatroniFence,
        current: Mutex<Option<(u64, Arc<Pools>)>>,
    },
}

/// A Patroni leader's term, and the channel that says when it ends.
type Term = (watch::Receiver<Leader>, u64);

/// What an operation holds while it runs: the pools, and what ends their use.
struct Checkout {
    pools: Arc<Pools>,
    term: Option<Term>,
}

impl Checkout {
    /// Resolves when these pools may no longer be used (never, for a plain URL).
    async fn ended(&self) {
        match &self.term {
            Some((leader, term)) => patroni::term_ended(leader.clone(), *term).await,
            None => futures::future::pending().await,
        }
    }
}

impl Target {
    fn connect_config(&self) -> Result<(tokio_postgres::Config, Option<Term>), StoreError> {
        match &self.route {
            Route::Url { config, .. } => Ok((config.clone(), None)),
            Route::Patroni { base, fence, .. } => match fence.current() {
                Leader::Confirmed {
                    host, port, term, ..
                } => Ok((
                    server_config(base, &host, port),
                    Some((fence.subscribe(), term)),
                )),
                Leader::Unknown(reason) => Err(unavailable(std::io::Error::other(reason))),
            },
        }
    }

    fn checkout(&self) -> Result<Checkout, StoreError> {
        match &self.route {
            Route::Url { pools, .. } => Ok(Checkout {
                pools: Arc::clone(pools),
                term: None,
            }),
            Route::Patroni {
                base,
                fence,
                current,
            } => {
                let (host, port, term) = match fence.current() {
                    Leader::Confirmed {
                        host, port, term, ..
                    } => (host, port, term),
                    Leader::Unknown(reason) => {
                        return Err(unavailable(std::io::Error::other(reason)));
                    }
                };
                let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
                let pools = match &*current {
                    Some((known, pools)) if *known == term => Arc::clone(pools),
                    _ => {
                        if let Some((_, old)) = current.take() {
                            // Idle connections go now; busy ones when returned.
                            old.close();
                        }
                        let pools =
                            Arc::new(Pools::new(&server_config(base, &host, port), &self.tls)?);
                        *current = Some((term, Arc::clone(&pools)));
                        pools
                    }
                };
                Ok(Checkout {
                    pools,
                    term: Some((fence.subscribe(), term)),
                })
            }
        }
    }
}

/// `base` (user, password, database, options, TLS) aimed at one server that must accept
/// writes.
fn server_config(base: &tokio_postgres::Config, host: &str, port: u16) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config.host(host).port(port);
    if let Some(user) = base.get_user() {
        config.user(user);
    }
    if let Some(password) = base.get_password() {
        config.password(password);
    }
    if let Some(dbname) = base.get_dbname() {
        config.dbname(dbname);
    }
    if let Some(options) = base.get_options() {
        config.options(options);
    }
    if let Some(name) = base.get_application_name() {
        config.application_name(name);
    }
    if let Some(timeout) = base.get_connect_timeout() {
        config.connect_timeout(*timeout);
    }
    config.keepalives_idle(base.get_keepalives_idle());
    config.ssl_mode(base.get_ssl_mode());
    config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    config
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.stop_listening.cancel();
    }
}

fn unavailable(error: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(error))
}

#[derive(Debug, thiserror::Error)]
#[error("the database did not answer within {0:?}")]
struct TimedOut(Duration);

#[derive(Debug, thiserror::Error)]
#[error(
    "the PostgreSQL leader changed or lost Patroni's confirmation during the operation; its outcome is unknown"
)]
struct LeaderLost;

impl PostgresStore {
    /// Connects to `url` (libpq URL syntax, several hosts allowed), applies migrations
    /// and, with [`Wakeups::ListenNotify`], starts listening for new work.
    pub async fn connect(url: &str, wakeups: Wakeups) -> Result<PostgresStore, StoreError> {
        Self::connect_with(url, PostgresOptions::new(wakeups)).await
    }

    /// [`Self::connect`], with the Patroni fence when `options.patroni` lists endpoints.
    pub async fn connect_with(
        url: &str,
        options: PostgresOptions,
    ) -> Result<PostgresStore, StoreError> {
        let (mut config, tls) = postgres_tls::parse_url(url, options.ca_pem.as_deref())
            .map_err(|e| StoreError::InvalidUrl(Box::new(e)))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.keepalives_idle(Duration::from_secs(10));
        config.application_name("faafo");
        let route = if options.patroni.is_empty() {
            Route::Url {
                pools: Arc::new(Pools::new(&config, &tls)?),
                config,
            }
        } else {
            let fence = PatroniFence::start(options.patroni)
                .map_err(|e| unavailable(std::io::Error::other(e)))?;
            // Migrations need the leader: give the cluster a moment to confirm one.
            fence.confirmed(Duration::from_secs(10)).await;
            Route::Patroni {
                base: config,
                fence,
                current: Mutex::new(None),
            }
        };
        let target = Arc::new(Target { route, tls });
        let store = PostgresStore {
            creates: CreateBatches::start(Arc::clone(&target)),
            target,
            wakeups: options.wakeups,
            hints: Arc::default(),
            announcements: Arc::default(),
            deletions: Arc::new(Deletions::new(false)),
            stop_listening: CancellationToken::new(),
        };
        store.migrate().await?;
        if store.wakeups == Wakeups::ListenNotify {
            tokio::spawn(listen(
                Arc::clone(&store.target),
                Arc::clone(&store.hints),
                Arc::clone(&store.announcements),
                Arc::clone(&store.deletions),
                store.stop_listening.clone(),
            ));
        }
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.run(|client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(unavailable)?;
                // Several API processes may start at once: one migrates, the others wait and see.
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                    .await
                    .map_err(unavailable)?;
                apply_migrations(&*tx, MIGRATIONS)
                    .await
                    .map_err(unavailable)?;
                tx.commit().await.map_err(unavailable)
            })
        })
        .await
    }

    /// Has the LISTEN task tell the other processes that `tasks` tasks were queued.
    fn announce(&self, tasks: u64) {
        if self.wakeups == Wakeups::ListenNotify {
            self.announcements.add(tasks);
        }
    }

    /// Runs `operation` with a durable connection; see [`Target::run_on`].
    async fn run<T, F>(&self, operation: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(&'c mut Object) -> futures::future::BoxFuture<'c, Result<T, StoreError>>,
    {
        self.target.run(operation).await
    }

    /// Runs `operation` with a lease-bookkeeping connection; see [`Target::run_on`].
    async fn run_lease<T, F>(&self, operation: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(&'c mut Object) -> futures::future::BoxFuture<'c, Result<T, StoreError>>,
    {
        self.target.run_on(|pools| &pools.lease, operation).await
    }
}

impl Target {
    /// Runs `operation` with a durable connection; see [`Self::run_on`].
    async fn run<T, F>(&self, operation: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(&'c mut Object) -> futures::future::BoxFuture<'c, Result<T, StoreError>>,
    {
        self.run_on(|pools| &pools.durable, operation).await
    }

    /// Runs `operation` with a connection from the chosen pool and a time limit. A
    /// connection that failed is dropped rather than returned to the pool: it may point at
    /// a server that is gone or is no longer the primary. Under Patroni, an operation still
    /// running when its leader's term ends is abandoned as unavailable: whether it
    /// committed is unknown, so it must not be reported as a success.
    async fn run_on<T, F>(
        &self,
        pool: impl FnOnce(&Pools) -> &Pool,
        operation: F,
    ) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(&'c mut Object) -> futures::future::BoxFuture<'c, Result<T, StoreError>>,
    {
        let checkout = self.checkout()?;
        let result = tokio::select! {
            result = tokio::time::timeout(OPERATION_TIMEOUT, async {
                let mut client = pool(&checkout.pools).get().await.map_err(unavailable)?;
                let result = operation(&mut client).await;
                if matches!(result, Err(StoreError::Unavailable(_))) {
                    drop(Object::take(client));
                }
                result
            }) => match result {
                Ok(result) => result,
                Err(_) => Err(unavailable(TimedOut(OPERATION_TIMEOUT))),
            },
            // Dropping the operation drops its connection with it.
            _ = checkout.ended() => Err(unavailable(LeaderLost)),
        };
        result
    }

    /// Inserts one fractal in a statement of its own: under a quota, or when its batch
    /// could not tell what became of it.
    async fn create_one(&self, new: NewFractal) -> Result<CreateOutcome, StoreError> {
        self.run(move |client| {
            Box::pin(async move {
                let spec = &new.spec;
                let window = spec.window();
                let insert = client
                    .prepare_cached(&create_statement(new.max_queued_work.is_some()))
                    .await
                    .map_err(unavailable)?;
                let (width, height, iterations, max_attempts) = (
                    spec.width() as i32,
                    spec.height() as i32,
                    spec.iterations() as i32,
                    new.max_attempts as i32,
                );
                let seed = spec.seed().map(|s| s as i64);
                let work = new.spec.work();
                let quota: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                    [&new.max_queued_work, &work];
                let parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 13] = [
                    &new.uuid,
                    &width,
                    &height,
                    &iterations,
                    &window.xa,
                    &window.xb,
                    &window.ya,
                    &window.yb,
                    &spec.cx(),
                    &spec.cy(),
                    &seed,
                    &max_attempts,
                    &new.client,
                ];
                // Under a quota, creates of one client take turns (an advisory lock on the
                // client), so that concurrent ones cannot all fit in the same room.
                let inserted = if new.max_queued_work.is_some() {
                    let parameters = [parameters.as_slice(), &quota].concat();
                    let tx = client.transaction().await.map_err(unavailable)?;
                    tx.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                        &[&new.client],
                    )
                    .await
                    .map_err(unavailable)?;
                    let inserted = tx
                        .query_opt(&insert, &parameters)
                        .await
                        .map_err(unavailable)?;
                    tx.commit().await.map_err(unavailable)?;
                    inserted
                } else {
                    client
                        .query_opt(&insert, &parameters)
                        .await
                        .map_err(unavailable)?
                };
                if let Some(row) = inserted {
                    return Ok(CreateOutcome::Created(fractal_from_row(&row)?));
                }
                let existing = client
                    .query_opt(
                        &format!("SELECT {COLUMNS} FROM fractals WHERE uuid = $1"),
                        &[&new.uuid],
                    )
                    .await
                    .map_err(unavailable)?;
                match existing {
                    Some(row) => Ok(CreateOutcome::Existing(fractal_from_row(&row)?)),
                    None => {
                        let queued_work: f64 = client
                            .query_one(&unfinished_work("$1"), &[&new.client])
                            .await
                            .map_err(unavailable)?
                            .get(0);
                        Ok(CreateOutcome::OverQuota { queued_work })
                    }
                }
            })
        })
        .await
    }
}

fn build_pool(config: tokio_postgres::Config, tls: PostgresTls) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(16)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(OPERATION_TIMEOUT))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(unavailable)
}

/// Keeps a LISTEN connection open to the current server (reconnecting after failures
/// and when the Patroni leader changes) and turns notifications into wake-ups and
/// deletions heard. Deletions are heard only while the connection listens.
///
/// The same connection announces this process's new tasks to the others, rather than a
/// NOTIFY in the transaction that queued them: PostgreSQL commits notifying transactions
/// one at a time (a lock held until the commit is flushed), which would take creates out
/// of group commit, a flush of the WAL each, and cost more than the insert. Announcements
/// made while one is in flight go together in the next (the payload is their count), and
/// this session commits them without waiting for the flush, as a lost hint costs only a
/// poll. Its own announcements come back to it and are skipped by the sender's process
/// id: the routes woke this process's waiters already.
async fn listen(
    target: Arc<Target>,
    hints: Arc<WorkHints>,
    announcements: Arc<WorkHints>,
    deletions: Arc<Deletions>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        if deletions.current().is_some() {
            deletions.set_listening(false);
        }
        match target.connect_config() {
            Ok((config, term)) => match config.connect(target.tls.clone()).await {
                Ok((client, mut connection)) => {
                    let ended = async {
                        match term {
                            Some((leader, term)) => patroni::term_ended(leader, term).await,
                            None => futures::future::pending().await,
                        }
                    };
                    tokio::pin!(ended);
                    let messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    // This session's backend, once known: the sender of its own announcements.
                    let own_pid = std::sync::atomic::AtomicI32::new(0);
                    let listening = async {
                        client
                            .batch_execute(&format!(
                                "SET synchronous_commit = off; LISTEN {CHANNEL}; LISTEN {DELETIONS_CHANNEL}"
                            ))
                            .await?;
                        let pid: i32 = client
                            .query_one("SELECT pg_backend_pid()", &[])
                            .await?
                            .get(0);
                        let announce = client
                            .prepare(&format!("SELECT pg_notify('{CHANNEL}', $1)"))
                            .await?;
                        Ok::<_, tokio_postgres::Error>((pid, announce))
                    };
                    tokio::pin!(messages);
                    let driven = async {
                        use futures::StreamExt;
                        while let Some(message) = messages.next().await {
                            match message {
                                Ok(tokio_postgres::AsyncMessage::Notification(note))
                                    if note.channel() == DELETIONS_CHANNEL =>
                                {
                                    deletions.heard()
                                }
                                Ok(tokio_postgres::AsyncMessage::Notification(note)) => {
                                    if note.process_id()
                                        != own_pid.load(std::sync::atomic::Ordering::Relaxed)
                                    {
                                        hints.add(announced_tasks(note.payload()))
                                    }
                                }
                                Ok(_) => {}
                                Err(error) => return error.to_string(),
                            }
                        }
                        "connection closed".to_owned()
                    };
                    tokio::pin!(driven);
                    // Drive the connection while LISTEN is sent, then keep driving it.
                    let listened = tokio::select! {
                        result = listening => result,
                        reason = &mut driven => { tracing::warn!(%reason, "LISTEN connection lost"); continue; }
                        _ = &mut ended => continue,
                        _ = stop.cancelled() => return,
                    };
                    match listened {
                        Err(error) => tracing::warn!(%error, "LISTEN failed"),
                        Ok((pid, announce)) => {
                            own_pid.store(pid, std::sync::atomic::Ordering::Relaxed);
                            backoff = Duration::from_millis(100);
                            // Anything created while we were not listening is found by polling;
                            // wake a waiter so that it looks now.
                            hints.add(1);
                            deletions.set_listening(true);
                            let announcing = async {
                                loop {
                                    let tasks = announcements.take().await.to_string();
                                    if let Err(error) = client.execute(&announce, &[&tasks]).await {
                                        return error;
                                    }
                                }
                            };
                            tokio::select! {
                                reason = &mut driven => tracing::warn!(%reason, "LISTEN connection lost"),
                                error = announcing => tracing::warn!(%error, "announcing new tasks failed"),
                                _ = &mut ended => continue,
                                _ = stop.cancelled() => return,
                            }
                        }
                    }
                }
                Err(error) => tracing::debug!(%error, "LISTEN connection failed; retrying"),
            },
            Err(error) => tracing::debug!(%error, "no server to LISTEN on; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The tasks a notification on the work channel stands for: the count faafo's processes
/// send, or one for any other payload (a plain `NOTIFY faafo_work`).
fn announced_tasks(payload: &str) -> u64 {
    payload
        .parse()
        .unwrap_or(1)
        .clamp(1, MAX_TASKS_PER_ANNOUNCEMENT)
}

/// Bounds the wake-ups one notification may cause.
const MAX_TASKS_PER_ANNOUNCEMENT: u64 = 1024;

fn fractal_from_row(row: &Row) -> Result<Fractal, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("fractal column {what} out of range"));
    let positive = |index: usize, what: &str| -> Result<u32, StoreError> {
        u32::try_from(row.get::<_, i32>(index)).map_err(|_| corrupt(what))
    };
    let window = Window {
        xa: row.get(4),
        xb: row.get(5),
        ya: row.get(6),
        yb: row.get(7),
    };
    let seed: Option<i64> = row.get(10);
    let spec = FractalSpec::from_stored(
        positive(1, "width")?,
        positive(2, "height")?,
        positive(3, "iterations")?,
        window,
        row.get(8),
        row.get(9),
        seed.map(|s| s as u64),
    );
    let state: &str = row.get(11);
    let state: FractalState = state
        .parse()
        .map_err(|e: faafo_core::fractal::UnknownState| StoreError::Corrupt(e.to_string()))?;
    let checksum: Option<String> = row.get(14);
    let result = checksum.map(|checksum| RenderResult {
        checksum,
        size: row.get::<_, Option<i64>>(15).unwrap_or_default() as u64,
        duration: row.get::<_, Option<f64>>(16).unwrap_or_default(),
        generated_by: row.get::<_, Option<String>>(17).unwrap_or_default(),
    });
    Ok(Fractal {
        uuid: row.get(0),
        spec,
        state,
        attempts: positive(12, "attempts")?,
        max_attempts: positive(13, "max_attempts")?,
        result,
        error: row.get(18),
        created_at_ms: row.get(19),
        finished_at_ms: row.get(20),
    })
}

/// Why a fenced write changed no row.
async fn lease_refusal(client: &Object, uuid: Uuid) -> StoreError {
    match client
        .query_opt("SELECT state FROM fractals WHERE uuid = $1", &[&uuid])
        .await
    {
        Ok(None) => StoreError::NotFound(uuid),
        Ok(Some(row)) => match row.get::<_, &str>(0).parse() {
            Ok(state) => StoreError::LeaseLost { uuid, state },
            Err(e) => StoreError::Corrupt(format!("fractal {uuid}: {e}")),
        },
        Err(e) => unavailable(e),
    }
}

/// Runs a write only the lease holder may make; refuses it when the lease moved on.
async fn fenced_write(
    client: &Object,
    uuid: Uuid,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(), StoreError> {
    let statement = client.prepare_cached(sql).await.map_err(unavailable)?;
    let changed = client
        .execute(&statement, params)
        .await
        .map_err(unavailable)?;
    if changed == 0 {
        return Err(lease_refusal(client, uuid).await);
    }
    Ok(())
}

fn millis(duration: Duration) -> i64 {
    duration.as_millis().min(i64::MAX as u128) as i64
}

#[async_trait]
impl Store for PostgresStore {
    async fn create(&self, new: NewFractal) -> Result<CreateOutcome, StoreError> {
        let outcome = if new.max_queued_work.is_some() {
            // A quota is checked in the insert's own statement, one client at a time.
            self.target.create_one(new).await?
        } else {
            self.creates.create(new).await?
        };
        if let CreateOutcome::Created(_) = outcome {
            self.announce(1);
        }
        Ok(outcome)
    }

    async fn get(&self, uuid: Uuid) -> Result<Option<Fractal>, StoreError> {
        self.run(move |client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(&format!("SELECT {COLUMNS} FROM fractals WHERE uuid = $1"))
                    .await
                    .map_err(unavailable)?;
                let row = client
                    .query_opt(&statement, &[&uuid])
                    .await
                    .map_err(unavailable)?;
                row.as_ref().map(fractal_from_row).transpose()
            })
        })
        .await
    }

    async fn list(
        &self,
        order: ListOrder,
        start: ListStart,
        limit: u64,
    ) -> Result<Page, StoreError> {
        let (by_cursor, from) = start.bound();
        self.run(move |client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(&list_statement(order, by_cursor))
                    .await
                    .map_err(unavailable)?;
                let fetch = Page::rows_to_fetch(limit);
                let rows = client
                    .query(&statement, &[&fetch, &from])
                    .await
                    .map_err(unavailable)?;
                let total = match rows.first() {
                    Some(row) => row.get::<_, Option<i64>>(22),
                    // Past the last page: no row carried the total.
                    None => client
                        .query_one(TALLIES, &[])
                        .await
                        .map_err(unavailable)?
                        .get::<_, Option<i64>>(0),
                }
                .unwrap_or(0);
                let rows = rows
                    .iter()
                    // The id and the total follow the 21 columns of COLUMNS.
                    .map(|row| Ok((fractal_from_row(row)?, row.get::<_, i64>(21))))
                    .collect::<Result<_, StoreError>>()?;
                Ok(Page::from_rows(rows, limit, total.max(0) as u64))
            })
        })
        .await
    }

    async fn delete(&self, uuid: Uuid) -> Result<Option<Fractal>, StoreError> {
        // The announcement rides on the delete: one statement, one commit.
        let announce = if self.wakeups == Wakeups::ListenNotify {
            format!(", pg_notify('{DELETIONS_CHANNEL}', uuid::text) IS NULL")
        } else {
            String::new()
        };
        let deleted = self
            .run(move |client| {
                Box::pin(async move {
                    let row = client
                        .query_opt(
                            &format!(
                                "DELETE FROM fractals WHERE uuid = $1 RETURNING {COLUMNS}{announce}"
                            ),
                            &[&uuid],
                        )
                        .await
                        .map_err(unavailable)?;
                    row.as_ref().map(fractal_from_row).transpose()
                })
            })
            .await?;
        if deleted.is_some() {
            self.deletions.heard();
        }
        Ok(deleted)
    }

    async fn claim(&self, worker: &str, lease: Duration) -> Result<Option<Lease>, StoreError> {
        let worker = worker.to_owned();
        self.run_lease(move |client| {
            Box::pin(async move {
                let token = LeaseToken::generate();
                let statement = client
                    .prepare_cached(&claim_statement(["$1", "$2", "$3"], ""))
                    .await
                    .map_err(unavailable)?;
                let row = client
                    .query_opt(&statement, &[&token.0, &millis(lease), &worker])
                    .await
                    .map_err(unavailable)?;
                row.as_ref()
                    .map(fractal_from_row)
                    .transpose()
                    .map(|fractal| fractal.map(|fractal| Lease { fractal, token }))
            })
        })
        .await
    }

    async fn renew(
        &self,
        uuid: Uuid,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.run_lease(move |client| {
            Box::pin(async move {
                fenced_write(
                    client,
                    uuid,
                    &format!(
                        "UPDATE fractals SET lease_expires_at = faafo_now_ms() + $3 \
                         WHERE {HELD}"
                    ),
                    &[&uuid, &token.0, &millis(lease)],
                )
                .await
            })
        })
        .await
    }

    async fn leased(&self, uuid: Uuid, token: LeaseToken) -> Result<Fractal, StoreError> {
        self.run(move |client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(&format!("SELECT {COLUMNS} FROM fractals WHERE {HELD}"))
                    .await
                    .map_err(unavailable)?;
                match client
                    .query_opt(&statement, &[&uuid, &token.0])
                    .await
                    .map_err(unavailable)?
                {
                    Some(row) => fractal_from_row(&row),
                    None => Err(lease_refusal(client, uuid).await),
                }
            })
        })
        .await
    }

    async fn complete_and_claim(
        &self,
        uuid: Uuid,
        token: LeaseToken,
        result: RenderResult,
        next: Option<(&str, Duration)>,
    ) -> Result<(Fractal, Option<Lease>), StoreError> {
        let next =
            next.map(|(worker, lease)| (worker.to_owned(), millis(lease), LeaseToken::generate()));
        self.run(move |client| {
            Box::pin(async move {
                let size = result.size as i64;
                let completion: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
                    &uuid,
                    &token.0,
                    &result.checksum,
                    &size,
                    &result.duration,
                    &result.generated_by,
                ];
                let next_token = next.as_ref().map(|(_, _, token)| *token);
                let rows = match &next {
                    None => {
                        let statement = client
                            .prepare_cached(&completion_statement())
                            .await
                            .map_err(unavailable)?;
                        client
                            .query(&statement, &completion)
                            .await
                            .map_err(unavailable)?
                    }
                    Some((worker, lease_ms, next_token)) => {
                        let statement = client
                            .prepare_cached(&completion_and_claim_statement())
                            .await
                            .map_err(unavailable)?;
                        let claim: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                            [&next_token.0, lease_ms, worker];
                        let parameters = [completion.as_slice(), &claim].concat();
                        client
                            .query(&statement, &parameters)
                            .await
                            .map_err(unavailable)?
                    }
                };
                let mut done = None;
                let mut claimed = None;
                for row in &rows {
                    let fractal = fractal_from_row(row)?;
                    if next_token.is_some() && row.get::<_, bool>(row.len() - 1) {
                        claimed = next_token.map(|token| Lease { fractal, token });
                    } else {
                        done = Some(fractal);
                    }
                }
                match done {
                    Some(done) => Ok((done, claimed)),
                    None => Err(lease_refusal(client, uuid).await),
                }
            })
        })
        .await
    }

    async fn fail(&self, uuid: Uuid, token: LeaseToken, reason: &str) -> Result<(), StoreError> {
        let reason = reason.to_owned();
        self.run(move |client| {
            Box::pin(async move {
                fenced_write(
                    client,
                    uuid,
                    &format!(
                        "UPDATE fractals SET state = 'failed', error = $3, finished_at = faafo_now_ms(), lease_token = NULL, \
                         lease_expires_at = NULL WHERE {HELD}"
                    ),
                    &[&uuid, &token.0, &reason],
                )
                .await
            })
        })
        .await
    }

    async fn release(&self, uuid: Uuid, token: LeaseToken) -> Result<(), StoreError> {
        self.run_lease(move |client| {
            Box::pin(async move {
                fenced_write(
                    client,
                    uuid,
                    &format!(
                        "UPDATE fractals SET state = 'queued', attempts = greatest(attempts - 1, 0), lease_token = NULL, \
                         lease_expires_at = NULL, leased_by = NULL WHERE {HELD}"
                    ),
                    &[&uuid, &token.0],
                )
                .await
            })
        })
        .await?;
        self.announce(1);
        Ok(())
    }

    async fn expire_leases(&self) -> Result<ExpiredLeases, StoreError> {
        let expired = self.run_lease(move |client| {
            Box::pin(async move {
                // One statement decides both outcomes, so a lease that expires while the
                // sweep runs cannot be requeued past its last attempt.
                let statement = client
                    .prepare_cached(
                        "UPDATE fractals SET \
                           state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
                           error = CASE WHEN attempts >= max_attempts \
                                   THEN 'gave up after ' || attempts || ' attempts: the lease of worker ' || \
                                        coalesce(leased_by, '?') || ' expired without a result' \
                                   ELSE error END, \
                           finished_at = CASE WHEN attempts >= max_attempts THEN faafo_now_ms() ELSE finished_at END, \
                           leased_by = CASE WHEN attempts >= max_attempts THEN leased_by END, \
                           lease_token = NULL, lease_expires_at = NULL \
                         WHERE state = 'running' AND lease_expires_at < faafo_now_ms() \
                         RETURNING state",
                    )
                    .await
                    .map_err(unavailable)?;
                let rows = client.query(&statement, &[]).await.map_err(unavailable)?;
                let failed = rows.iter().filter(|row| row.get::<_, &str>(0) == "failed").count() as u64;
                let requeued = rows.len() as u64 - failed;
                Ok(ExpiredLeases { requeued, failed })
            })
        })
        .await?;
        self.announce(expired.requeued);
        Ok(expired)
    }

    async fn stats(&self) -> Result<QueueStats, StoreError> {
        self.run(move |client| {
            Box::pin(async move {
                let row = client
                    .query_one(&stats_statement(), &[])
                    .await
                    .map_err(unavailable)?;
                let count =
                    |column: usize| row.get::<_, Option<i64>>(column).unwrap_or(0).max(0) as u64;
                let age: Option<i64> = row.get(4);
                Ok(QueueStats::from_counts(
                    count(0),
                    count(1),
                    count(2),
                    count(3),
                    age.map(|ms| Duration::from_millis(ms.max(0) as u64)),
                ))
            })
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|client| {
            Box::pin(async move {
                // A connection to a server that was demoted answers SELECT but cannot write.
                let read_only: String = client
                    .query_one("SHOW transaction_read_only", &[])
                    .await
                    .map_err(unavailable)?
                    .get(0);
                if read_only == "on" {
                    return Err(unavailable(std::io::Error::other(
                        "connected to a read-only server (not the primary)",
                    )));
                }
                Ok(())
            })
        })
        .await
    }

    // Membership is soft state, renewed every few seconds: it goes through the
    // `synchronous_commit = off` pool like the leases.
    async fn node_heartbeat(&self, beat: &NodeBeat) -> Result<(), StoreError> {
        let beat = beat.clone();
        self.run_lease(move |client| {
            Box::pin(async move {
                client
                    .execute(
                        "INSERT INTO nodes (id, role, address, version, load, last_seen, left_at) \
                         VALUES ($1, $2, $3, $4, $5, faafo_now_ms(), NULL) ON CONFLICT (id) DO UPDATE SET \
                         role = excluded.role, address = excluded.address, version = excluded.version, \
                         load = excluded.load, last_seen = excluded.last_seen, left_at = NULL",
                        &[&beat.id, &beat.role.as_str(), &beat.address, &beat.version, &(beat.load as i64)],
                    )
                    .await
                    .map_err(unavailable)?;
                client
                    .execute(
                        "DELETE FROM nodes WHERE last_seen < faafo_now_ms() - $1",
                        &[&(FORGET_AFTER.as_millis() as i64)],
                    )
                    .await
                    .map_err(unavailable)?;
                Ok(())
            })
        })
        .await
    }

    async fn node_left(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.run_lease(move |client| {
            Box::pin(async move {
                let changed = client
                    .execute(
                        "UPDATE nodes SET left_at = faafo_now_ms() WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(unavailable)?;
                Ok(changed > 0)
            })
        })
        .await
    }

    async fn record_probes(
        &self,
        probe: &str,
        outcomes: &[ProbeOutcome],
    ) -> Result<(), StoreError> {
        let (probe, outcomes) = (probe.to_owned(), outcomes.to_vec());
        let keep_ms = PROBE_HISTORY.as_millis() as i64;
        self.run_lease(move |client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(unavailable)?;
                for outcome in &outcomes {
                    tx.execute(
                        "INSERT INTO probe_rounds (probe, finished_at, ok, total_ms, failed_step) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                        &[
                            &probe,
                            &outcome.finished_at_ms,
                            &outcome.ok,
                            &outcome.total_ms,
                            &outcome.failed_step,
                        ],
                    )
                    .await
                    .map_err(unavailable)?;
                }
                tx.execute(
                    "DELETE FROM probe_rounds WHERE finished_at < faafo_now_ms() - $1",
                    &[&keep_ms],
                )
                .await
                .map_err(unavailable)?;
                tx.commit().await.map_err(unavailable)
            })
        })
        .await
    }

    async fn probe_history(
        &self,
        since_ms: i64,
    ) -> Result<Vec<(String, ProbeOutcome)>, StoreError> {
        self.run(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        "SELECT probe, finished_at, ok, total_ms, failed_step FROM probe_rounds \
                         WHERE finished_at >= $1 ORDER BY finished_at",
                        &[&since_ms],
                    )
                    .await
                    .map_err(unavailable)?;
                Ok(rows
                    .into_iter()
                    .map(|row| {
                        (
                            row.get(0),
                            ProbeOutcome {
                                finished_at_ms: row.get(1),
                                ok: row.get(2),
                                total_ms: row.get(3),
                                failed_step: row.get(4),
                            },
                        )
                    })
                    .collect())
            })
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.run(|client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        "SELECT id, role, address, version, load, faafo_now_ms() - last_seen, left_at IS NOT NULL \
                         FROM nodes ORDER BY role, id",
                        &[],
                    )
                    .await
                    .map_err(unavailable)?;
                rows.into_iter()
                    .map(|row| {
                        node_record(row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5), row.get(6))
                    })
                    .collect()
            })
        })
        .await
    }

    async fn database_members(&self) -> Vec<faafo_core::node::DatabaseMemberView> {
        match &self.target.route {
            Route::Patroni { fence, .. } => fence.members().await,
            Route::Url { .. } => Vec::new(),
        }
    }

    fn work_hints(&self) -> Option<Arc<WorkHints>> {
        (self.wakeups == Wakeups::ListenNotify).then(|| Arc::clone(&self.hints))
    }

    fn deletions(&self) -> Option<Arc<Deletions>> {
        (self.wakeups == Wakeups::ListenNotify).then(|| Arc::clone(&self.deletions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database made before the tallies, with fractals in every state, has them all
    /// counted once migrated.
    #[tokio::test]
    async fn the_tallies_start_from_the_fractals_already_there() {
        let server = faafo_testkit::PostgresServer::start();
        let url = server.create_database().await;
        let client = connect(&url).await;
        let tallies = MIGRATIONS
            .iter()
            .position(|sql| sql.contains("CREATE TABLE fractal_tallies"))
            .unwrap();
        apply_migrations(&client, &MIGRATIONS[..tallies])
            .await
            .unwrap();
        client
            .batch_execute(
                "INSERT INTO fractals (uuid, width, height, iterations, xa, xb, ya, yb, cx, cy, \
                 state, max_attempts, lease_token) \
                 SELECT gen_random_uuid(), 8, 8, 8, -2, 2, -2, 2, 0, 0, state, 3, \
                        CASE WHEN state = 'running' THEN gen_random_uuid() END \
                 FROM unnest(ARRAY['queued', 'queued', 'running', 'done', 'done', 'done', \
                                   'failed', 'failed']) AS state",
            )
            .await
            .unwrap();

        let store = PostgresStore::connect(&url, Wakeups::PollOnly)
            .await
            .unwrap();
        assert_eq!(store.stats().await.unwrap().counts(), [2, 1, 3, 2]);
        let page = store
            .list(ListOrder::OldestFirst, ListStart::Offset(0), 1)
            .await
            .unwrap();
        assert_eq!(page.total, 8);

        // Statements of several rows, and of none, as an operator's import or purge would.
        client
            .batch_execute(
                "INSERT INTO fractals (uuid, width, height, iterations, xa, xb, ya, yb, cx, cy, \
                 state, max_attempts) \
                 SELECT gen_random_uuid(), 8, 8, 8, -2, 2, -2, 2, 0, 0, state, 3 \
                 FROM unnest(ARRAY['done', 'failed', 'failed', 'queued']) AS state; \
                 INSERT INTO fractals (uuid, width, height, iterations, xa, xb, ya, yb, cx, cy, \
                 state, max_attempts) \
                 SELECT uuid, 8, 8, 8, -2, 2, -2, 2, 0, 0, 'failed', 3 FROM fractals \
                 ON CONFLICT (uuid) DO NOTHING; \
                 DELETE FROM fractals WHERE state IN ('done', 'failed') AND id % 2 = 0; \
                 DELETE FROM fractals WHERE false;",
            )
            .await
            .unwrap();
        let truth: Vec<i64> = client
            .query(
                "SELECT count(*) FILTER (WHERE state = s) FROM fractals, \
                 unnest(ARRAY['queued', 'running', 'done', 'failed']) WITH ORDINALITY AS s(s, n) \
                 GROUP BY n ORDER BY n",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let counted = store
            .stats()
            .await
            .unwrap()
            .counts()
            .map(|count| count as i64);
        assert_eq!(counted[..], truth[..]);
        let total = store
            .list(ListOrder::OldestFirst, ListStart::Offset(0), 1)
            .await
            .unwrap()
            .total;
        assert_eq!(total as i64, truth.iter().sum::<i64>());
    }

    /// A throwaway server with a new database, migrated by the store returned, and a
    /// client of its own on the database.
    async fn migrated_database() -> (
        faafo_testkit::PostgresServer,
        PostgresStore,
        tokio_postgres::Client,
    ) {
        let server = faafo_testkit::PostgresServer::start();
        let url = server.create_database().await;
        let store = PostgresStore::connect(&url, Wakeups::PollOnly)
            .await
            .unwrap();
        (server, store, connect(&url).await)
    }

    /// A plain client on the database at `url`, beside the store's pools.
    async fn connect(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// The plan PostgreSQL keeps for `sql` as a prepared statement, under the statistics
    /// the table has (none on a new database, before autovacuum's first analyze).
    async fn generic_plan(client: &tokio_postgres::Client, sql: &str) -> String {
        let parameters = (1..=15)
            .rev()
            .find(|n| sql.contains(&format!("${n}")))
            .unwrap_or(0);
        client.batch_execute("DEALLOCATE ALL").await.unwrap();
        client
            .batch_execute(&format!("PREPARE statement AS {sql}"))
            .await
            .unwrap();
        let arguments = match parameters {
            0 => String::new(),
            n => format!("({})", vec!["NULL"; n].join(", ")),
        };
        plan_text(client, &format!("EXPLAIN EXECUTE statement{arguments}")).await
    }

    /// The lines of the plan that `explain`, a batch with one EXPLAIN in it, prints.
    async fn plan_text(client: &tokio_postgres::Client, explain: &str) -> String {
        let messages = client.simple_query(explain).await.unwrap();
        messages
            .iter()
            .filter_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The statements every task runs find their rows through one index entry, whatever
    /// the table's statistics: a create reads one entry of each queue index, not every
    /// queued row, and a lease holder's writes look the uuid up rather than scan the
    /// running rows.
    #[tokio::test]
    async fn every_task_statement_looks_up_its_rows_on_a_new_table() {
        let (_server, _store, client) = migrated_database().await;
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .await
            .unwrap();

        // A table in use, not analyzed yet.
        let uuid: Uuid = client
            .query_one(
                "INSERT INTO fractals (uuid, width, height, iterations, xa, xb, ya, yb, cx, cy, \
                 state, max_attempts) \
                 VALUES (gen_random_uuid(), 8, 8, 8, -2, 2, -2, 2, 0, 0, 'queued', 3) RETURNING uuid",
                &[],
            )
            .await
            .unwrap()
            .get(0);

        queue_statements_read_the_queue_in_order(&client).await;
        let held = format!("SELECT {COLUMNS} FROM fractals WHERE {HELD}");
        for sql in [
            held,
            completion_statement(),
            completion_and_claim_statement(),
        ] {
            let plan = generic_plan(&client, &sql).await;
            assert!(
                plan.contains("Index Scan using fractals_uuid_key"),
                "{sql}\n{plan}"
            );
            assert!(!plan.contains("fractals_leased"), "{sql}\n{plan}");
        }

        // What lets those writes leave `state = 'running'` out: no other row holds a token.
        let error = client
            .execute(
                "UPDATE fractals SET lease_token = gen_random_uuid() WHERE uuid = $1",
                &[&uuid],
            )
            .await
            .unwrap_err();
        let constraint = error.as_db_error().and_then(|error| error.constraint());
        assert_eq!(
            constraint,
            Some("fractals_token_while_running"),
            "{error:?}"
        );
    }

    /// A batch of creates runs the plan PostgreSQL keeps for the statement, whatever the
    /// batch's length, rather than one planned for its values each time.
    #[tokio::test]
    async fn the_batch_insert_is_planned_once() {
        let (_server, _store, client) = migrated_database().await;
        client
            .batch_execute(&format!(
                "PREPARE batch AS {}",
                create_batches::batch_statement()
            ))
            .await
            .unwrap();
        for rows in 1..=10usize {
            let column = |value: &str| format!("ARRAY[{}]", vec![value; rows].join(", "));
            let arguments = [
                "gen_random_uuid()",
                "8",
                "8",
                "1",
                "-2",
                "2",
                "-2",
                "2",
                "0",
                "0",
                "NULL::int8",
                "3",
                "'client'",
            ]
            .map(column)
            .join(", ");
            client
                .batch_execute(&format!("EXECUTE batch({arguments})"))
                .await
                .unwrap();
        }
        let plans = client
            .query_one(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = 'batch'",
                &[],
            )
            .await
            .unwrap();
        let (generic, custom): (i64, i64) = (plans.get(0), plans.get(1));
        // PostgreSQL plans the first five executions for their values, to compare.
        assert_eq!((generic, custom), (5, 5));
    }

    /// Autovacuum analyzes a table whenever enough of it changed, often while nothing is
    /// queued; the statistics then say that no row is queued. Creates, claims and the
    /// state counts must still read the queue in its order rather than sort every queued
    /// row.
    #[tokio::test]
    async fn the_queue_is_read_in_order_after_an_analyze_found_none_queued() {
        let (_server, store, client) = migrated_database().await;
        analyzed_done_fractals(&client).await;
        queue_statements_read_the_queue_in_order(&client).await;

        // What that plan does with a backlog: the claim takes the first in fair order,
        // reading a handful of pages, not the 5,000 queued rows.
        client
            .batch_execute(
                "INSERT INTO fractals (uuid, width, height, iterations, xa, xb, ya, yb, cx, cy, \
                 state, max_attempts, fair_rank) \
                 SELECT gen_random_uuid(), 8, 8, 8, -2, 2, -2, 2, 0, 0, 'queued', 3, 5000 - rank \
                 FROM generate_series(1, 5000) AS rank",
            )
            .await
            .unwrap();
        let lease = store
            .claim("worker", Duration::from_secs(60))
            .await
            .unwrap()
            .expect("a queued fractal");
        let rank: i64 = client
            .query_one(
                "SELECT fair_rank FROM fractals WHERE uuid = $1",
                &[&lease.fractal.uuid],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(rank, 0);
        let plan = explain_analyze(
            &client,
            &claim_statement(["gen_random_uuid()", "60000", "'worker'"], ""),
        )
        .await;
        assert!(buffers_hit(&plan) < 50, "{plan}");
    }

    /// A page after a cursor starts at the cursor's place in the primary key, however
    /// deep into the list, where an offset reads every row it skips.
    #[tokio::test]
    async fn a_page_after_a_cursor_reads_its_own_rows_alone() {
        let (_server, _store, client) = migrated_database().await;
        analyzed_done_fractals(&client).await;
        let (first, last): (i64, i64) = {
            let row = client
                .query_one("SELECT min(id), max(id) FROM fractals", &[])
                .await
                .unwrap();
            (row.get(0), row.get(1))
        };
        for (order, from) in [
            (ListOrder::OldestFirst, last - 20),
            (ListOrder::NewestFirst, first + 20),
        ] {
            let plan = generic_plan(&client, &list_statement(order, true)).await;
            assert!(plan.contains("using fractals_pkey"), "{order:?}\n{plan}");
            assert!(!plan.contains("Sort"), "{order:?}\n{plan}");
            // The eleven rows of a page of ten, 20 rows from the far end.
            let run = format!("EXPLAIN (ANALYZE, BUFFERS) EXECUTE statement(11, {from})");
            let plan = plan_text(&client, &run).await;
            assert!(plan.contains("rows=11 "), "{order:?}\n{plan}");
            assert!(buffers_hit(&plan) < 20, "{order:?}\n{plan}");
        }
        // The same page by offset, for contrast: every row before it is read. (Planning
        // it prepares it as `statement`.)
        generic_plan(&client, &list_statement(ListOrder::OldestFirst, false)).await;
        let plan = plan_text(
            &client,
            "EXPLAIN (ANALYZE, BUFFERS) EXECUTE statement(11, 9980)",
        )
        .await;
        assert!(buffers_hit(&plan) > 100, "{plan}");
    }

    /// Fills the table with 10,000 done fractals and analyzes it, with autovacuum off so
    /// that those statistics stay, and has `client` plan every statement generically.
    async fn analyzed_done_fractals(client: &tokio_postgres::Client) {
        client
            .batch_execute(
                "INSERT INTO fractals (uuid, width, height, iterations, xa, xb, ya, yb, cx, cy, \
                 state, max_attempts) \
                 SELECT gen_random_uuid(), 8, 8, 8, -2, 2, -2, 2, 0, 0, 'done', 3 \
                 FROM generate_series(1, 10000); \
                 ANALYZE fractals; \
                 ALTER TABLE fractals SET (autovacuum_enabled = false); \
                 SET plan_cache_mode = force_generic_plan;",
            )
            .await
            .unwrap();
    }

    /// The shared buffers the top node of an `EXPLAIN (ANALYZE, BUFFERS)` hit.
    fn buffers_hit(plan: &str) -> u64 {
        plan.lines()
            .find_map(|line| line.trim().strip_prefix("Buffers: shared hit="))
            .and_then(|hits| hits.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no buffer counts in\n{plan}"))
    }

    /// Under the statistics `client`'s table has now: a create reads one entry of each
    /// queue index (the client's latest rank, the lowest rank), both statements that
    /// claim a task read fractals_fair_queue in its order, and the state counts read it
    /// once; none sorts.
    async fn queue_statements_read_the_queue_in_order(client: &tokio_postgres::Client) {
        for quota in [false, true] {
            let plan = generic_plan(client, &create_statement(quota)).await;
            assert_eq!(plan.matches("Limit").count(), 2, "{plan}");
            assert!(
                plan.contains("Index Only Scan Backward using fractals_client_queued"),
                "{plan}"
            );
            assert!(
                plan.contains("Index Only Scan using fractals_fair_queue"),
                "{plan}"
            );
        }
        for sql in [
            claim_statement(["$1", "$2", "$3"], ""),
            completion_and_claim_statement(),
        ] {
            let plan = generic_plan(client, &sql).await;
            assert!(
                plan.contains("Index Scan using fractals_fair_queue"),
                "{sql}\n{plan}"
            );
            assert!(!plan.contains("Sort"), "{sql}\n{plan}");
        }
        let plan = generic_plan(client, &stats_statement()).await;
        assert!(
            plan.contains("Index Only Scan using fractals_fair_queue"),
            "{plan}"
        );
        assert!(!plan.contains("Sort"), "{plan}");
    }

    /// `EXPLAIN (ANALYZE, BUFFERS)` of `sql`, rolled back.
    async fn explain_analyze(client: &tokio_postgres::Client, sql: &str) -> String {
        plan_text(
            client,
            &format!("BEGIN; EXPLAIN (ANALYZE, BUFFERS) {sql}; ROLLBACK"),
        )
        .await
    }
}
