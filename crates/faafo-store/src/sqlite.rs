//! The embedded store: one SQLite file in WAL mode.
//!
//! Several `faafo api` processes on one host may share the file: every write is an
//! `IMMEDIATE` transaction and waits for the others through SQLite's busy timeout.
//! `synchronous = NORMAL` keeps committed work across a killed process (the WAL is in
//! the OS page cache); only a power cut can lose the last commits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use faafo_core::fractal::RenderResult;
use faafo_core::node::FORGET_AFTER;
use faafo_core::{Fractal, FractalSpec, FractalState, LeaseToken, NodeBeat, Window};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use uuid::Uuid;

use faafo_core::node::ProbeOutcome;

use crate::{
    CreateOutcome, Deletions, ExpiredLeases, Lease, ListOrder, ListStart, NewFractal, NodeRecord,
    PROBE_HISTORY, Page, QueueStats, Store, StoreError, WorkHints, list_clauses, node_record,
};

/// Schema versions in order; `PRAGMA user_version` records how many have been applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE fractals (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid             TEXT    NOT NULL UNIQUE,
    width            INTEGER NOT NULL,
    height           INTEGER NOT NULL,
    iterations       INTEGER NOT NULL,
    xa               REAL    NOT NULL,
    xb               REAL    NOT NULL,
    ya               REAL    NOT NULL,
    yb               REAL    NOT NULL,
    cx               REAL    NOT NULL,
    cy               REAL    NOT NULL,
    seed             INTEGER,
    state            TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    lease_token      TEXT,
    lease_expires_at INTEGER,
    leased_by        TEXT,
    checksum         TEXT,
    size             INTEGER,
    duration         REAL,
    generated_by     TEXT,
    error            TEXT,
    created_at       INTEGER NOT NULL,
    finished_at      INTEGER
);
CREATE INDEX fractals_queued ON fractals (id) WHERE state = 'queued';
CREATE INDEX fractals_leased ON fractals (lease_expires_at) WHERE state = 'running';
CREATE INDEX fractals_state ON fractals (state);
"#,
    r#"
CREATE TABLE nodes (
    id        TEXT    PRIMARY KEY,
    role      TEXT    NOT NULL,
    address   TEXT,
    version   TEXT    NOT NULL,
    load      INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    left_at   INTEGER
);
"#,
    // Fair queueing (see the crate's documentation) and per-client quotas.
    r#"
ALTER TABLE fractals ADD COLUMN client TEXT NOT NULL DEFAULT '';
ALTER TABLE fractals ADD COLUMN fair_rank INTEGER NOT NULL DEFAULT 0;
-- Claims now go by rank; the oldest queued task is found through fractals_state, whose
-- entries are in row order within a state.
DROP INDEX fractals_queued;
CREATE INDEX fractals_fair_queue ON fractals (fair_rank, id) WHERE state = 'queued';
-- A client's next rank and, with fractals_leased for the few running rows, its
-- unfinished work. Queued rows only: a claim leaves it, a completion does not touch it.
CREATE INDEX fractals_client_queued ON fractals (client, fair_rank) WHERE state = 'queued';
"#,
    // Each client's latest rank and unfinished work live in a row of their own, kept by the
    // create and by triggers, rather than read from an index over its queued rows at every
    // create: that read took a third of a create's time, and the quota's sum grew with the
    // client's backlog. A client with nothing unfinished has no row.
    r#"
CREATE TABLE queue_clients (
    client          TEXT    PRIMARY KEY,
    last_rank       INTEGER NOT NULL,
    unfinished_work REAL    NOT NULL
) WITHOUT ROWID;
INSERT INTO queue_clients (client, last_rank, unfinished_work)
    SELECT client, coalesce(max(CASE WHEN state = 'queued' THEN fair_rank END), 0),
           sum(CAST(width AS REAL) * height * iterations)
    FROM fractals WHERE state IN ('queued', 'running') GROUP BY client;
DROP INDEX fractals_client_queued;
CREATE TRIGGER fractals_finished AFTER UPDATE OF state ON fractals
WHEN OLD.state IN ('queued', 'running') AND NEW.state NOT IN ('queued', 'running') BEGIN
    UPDATE queue_clients SET unfinished_work = unfinished_work - CAST(OLD.width AS REAL) * OLD.height * OLD.iterations
    WHERE client = OLD.client;
    DELETE FROM queue_clients WHERE client = OLD.client AND unfinished_work <= 0;
END;
CREATE TRIGGER fractals_deleted_unfinished AFTER DELETE ON fractals
WHEN OLD.state IN ('queued', 'running') BEGIN
    UPDATE queue_clients SET unfinished_work = unfinished_work - CAST(OLD.width AS REAL) * OLD.height * OLD.iterations
    WHERE client = OLD.client;
    DELETE FROM queue_clients WHERE client = OLD.client AND unfinished_work <= 0;
END;
"#,
    // The probes' rounds, for the status page.
    r#"
CREATE TABLE probe_rounds (
    probe       TEXT    NOT NULL,
    finished_at INTEGER NOT NULL,
    ok          INTEGER NOT NULL,
    total_ms    REAL    NOT NULL,
    failed_step TEXT,
    PRIMARY KEY (finished_at, probe)
) WITHOUT ROWID;
"#,
    // Counts kept by triggers: fractals (a list's total without a scan of the table), and
    // deletions where every process can read them (a process keeping done fractals in
    // memory drops them when the count moves; see `Deletions`).
    r#"
CREATE TABLE tallies (fractals INTEGER NOT NULL, deletions INTEGER NOT NULL);
INSERT INTO tallies (fractals, deletions) SELECT count(*), 0 FROM fractals;
CREATE TRIGGER fractals_inserted_counted AFTER INSERT ON fractals BEGIN
    UPDATE tallies SET fractals = fractals + 1;
END;
CREATE TRIGGER fractals_deleted_counted AFTER DELETE ON fractals BEGIN
    UPDATE tallies SET fractals = fractals - 1, deletions = deletions + 1;
END;
"#,
    // Failed fractals counted too, for the state counts without a scan of the table
    // (queued and running rows are counted through their own indexes, done ones by
    // difference).
    r#"
ALTER TABLE tallies ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
UPDATE tallies SET failed = (SELECT count(*) FROM fractals WHERE state = 'failed');
CREATE TRIGGER fractals_inserted_failed AFTER INSERT ON fractals
WHEN NEW.state = 'failed' BEGIN
    UPDATE tallies SET failed = failed + 1;
END;
CREATE TRIGGER fractals_failures_counted AFTER UPDATE OF state ON fractals
WHEN (OLD.state = 'failed') <> (NEW.state = 'failed') BEGIN
    UPDATE tallies SET failed = failed + (NEW.state = 'failed') - (OLD.state = 'failed');
END;
CREATE TRIGGER fractals_deleted_failed AFTER DELETE ON fractals
WHEN OLD.state = 'failed' BEGIN
    UPDATE tallies SET failed = failed - 1;
END;
"#,
    // The index of every row's state served only the state counts' oldest queued task,
    // and every create and change of state paid for it; the counts now find that task in
    // their read of fractals_fair_queue.
    r#"
DROP INDEX IF EXISTS fractals_state;
"#,
];

// The fair queue's statements name their indexes: without statistics SQLite picked the
// index on `state` (dropped since) and sorted every queued row on each claim, and it could
// pick another index of queued rows the same way. (A partial index is used only when the
// query repeats its condition.)

/// Takes the client's next rank (one past its latest, never below the lowest rank still
/// queued) and adds the new task's work to its unfinished work; returns both.
const TAKE_RANK: &str = "INSERT INTO queue_clients (client, last_rank, unfinished_work) VALUES (?1, \
    coalesce((SELECT fair_rank FROM fractals INDEXED BY fractals_fair_queue WHERE state = 'queued' \
              ORDER BY fair_rank, id LIMIT 1), 0), ?2) \
    ON CONFLICT (client) DO UPDATE SET last_rank = max(last_rank + 1, excluded.last_rank), \
    unfinished_work = unfinished_work + excluded.unfinished_work \
    RETURNING last_rank, unfinished_work";

const COLUMNS: &str = "uuid, width, height, iterations, xa, xb, ya, yb, cx, cy, seed, state, attempts, \
                       max_attempts, checksum, size, duration, generated_by, error, created_at, finished_at";

/// The SQLite store. Cloning shares the connection.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    connection: Arc<ConnectionThread>,
    path: PathBuf,
    /// Woken when another connection (another API process) commits.
    hints: Arc<WorkHints>,
    /// Bumped by this store's deletes, and by the watcher when the file's count moves.
    deletions: Arc<Deletions>,
    /// Stops the commit watcher when the last clone goes.
    _watcher: Arc<CommitWatcher>,
}

/// How often the commit watcher looks at the database's change counter: a worker parked
/// on one API process hears of work created through another within about this long (a
/// look is a read of SQLite's shared memory, a few microseconds).
const COMMIT_WATCH_INTERVAL: Duration = Duration::from_millis(2);

/// A thread with a connection of its own that reads `PRAGMA data_version`, which changes
/// when any other connection, in any process, commits, and passes that on as a hint; it
/// then reads the deletion count, so that deletions made elsewhere are heard.
#[derive(Debug)]
struct CommitWatcher {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl CommitWatcher {
    fn start(
        path: &Path,
        hints: Arc<WorkHints>,
        deletions: Arc<Deletions>,
    ) -> rusqlite::Result<CommitWatcher> {
        use std::sync::atomic::Ordering;
        let connection = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        connection.busy_timeout(Duration::from_secs(1))?;
        let version = |connection: &Connection| {
            connection.query_row("PRAGMA data_version", [], |row| row.get::<_, i64>(0))
        };
        let deletion_count = |connection: &Connection| {
            connection.query_row("SELECT deletions FROM tallies", [], |row| {
                row.get::<_, i64>(0)
            })
        };
        let mut seen = version(&connection)?;
        let mut deletions_seen = deletion_count(&connection)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("sqlite-commits".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(COMMIT_WATCH_INTERVAL);
                    // A failed read (the file locked for a moment) is tried again next time.
                    if let Ok(now) = version(&connection)
                        && now != seen
                    {
                        seen = now;
                        // A commit elsewhere: the watcher cannot tell how many tasks it made.
                        hints.add(1);
                        match deletion_count(&connection) {
                            Ok(count) if count == deletions_seen => {}
                            Ok(count) => {
                                deletions_seen = count;
                                deletions.heard();
                            }
                            // Unknown: assume the worst.
                            Err(_) => deletions.heard(),
                        }
                    }
                }
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(CommitWatcher { stop })
    }
}

impl Drop for CommitWatcher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Work for the connection's thread.
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The store's connection, on a thread of its own that runs the operations sent to it one
/// after another. They ran one at a time anyway (one connection); a thread that stays with
/// the connection takes the next operation while it is busy, where a blocking-pool thread
/// per operation, queued on a lock, slept and was woken for each.
#[derive(Debug)]
struct ConnectionThread {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl ConnectionThread {
    fn start(mut connection: Connection) -> std::io::Result<ConnectionThread> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        // Ends when the last clone of the store (the last sender) goes.
        std::thread::Builder::new()
            .name("sqlite".into())
            .spawn(move || {
                while let Ok(job) = queue.recv() {
                    job(&mut connection);
                }
            })?;
        Ok(ConnectionThread { jobs })
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let opened = path.clone();
        let hints = Arc::new(WorkHints::default());
        let watched = Arc::clone(&hints);
        let deletions = Arc::new(Deletions::new(true));
        let counted = Arc::clone(&deletions);
        let (connection, watcher) = tokio::task::spawn_blocking(move || {
            let connection = open_and_migrate_when_free(&opened).map_err(unavailable)?;
            // After the migration, so that the watcher opens a database in WAL mode.
            let watcher = CommitWatcher::start(&opened, watched, counted).map_err(unavailable)?;
            let connection = ConnectionThread::start(connection)
                .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
            Ok::<_, StoreError>((connection, watcher))
        })
        .await
        .map_err(|e| StoreError::Unavailable(Box::new(e)))??;
        Ok(SqliteStore {
            connection: Arc::new(connection),
            path,
            hints,
            deletions,
            _watcher: Arc::new(watcher),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `operation` on the connection, on its thread.
    async fn run<T, F>(&self, operation: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |connection| {
            // A panic leaves the connection itself usable (a transaction rolls back as it
            // unwinds), and the thread goes on with the next operation.
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| operation(connection)));
            let _ = reply.send(outcome);
        });
        let stopped = || StoreError::Unavailable("the SQLite connection's thread stopped".into());
        self.connection.jobs.send(job).map_err(|_| stopped())?;
        match answer.await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_panic)) => Err(StoreError::Unavailable(
                "a SQLite operation panicked".into(),
            )),
            Err(_) => Err(stopped()),
        }
    }
}

/// Opens as [`open_and_migrate`] does, trying again for a while when another process
/// holds the database: several API processes starting at once on a new file find it
/// locked while the first one turns on WAL and migrates (SQLite does not wait on its busy
/// handler for every lock those steps take).
fn open_and_migrate_when_free(path: &Path) -> rusqlite::Result<Connection> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut pause = Duration::from_millis(10);
    loop {
        match open_and_migrate(path) {
            Err(rusqlite::Error::SqliteFailure(error, _))
                if matches!(
                    error.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() + pause < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            opened => return opened,
        }
    }
}

fn open_and_migrate(path: &Path) -> rusqlite::Result<Connection> {
    let mut connection = Connection::open(path)?;
    connection.busy_timeout(Duration::from_secs(10))?;
    // Every statement the store runs stays prepared (rusqlite keeps 16 by default, fewer
    // than the store has, and the queue's were prepared again on every call).
    connection.set_prepared_statement_cache_capacity(64);
    // Plans never depend on bound values: otherwise SQLite compiles a statement with
    // `LIMIT ?` again on every call (the list spent a fifth of its time re-parsing).
    connection.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    // IMMEDIATE takes the write lock first, so two processes starting at once apply each
    // migration exactly once: the second waits, then sees the new version.
    let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    apply_migrations(&tx, MIGRATIONS)?;
    tx.commit()?;
    Ok(connection)
}

/// Applies those of `migrations` that `PRAGMA user_version` does not count as applied.
fn apply_migrations(connection: &Connection, migrations: &[&str]) -> rusqlite::Result<()> {
    let applied: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    for (version, migration) in (1i64..).zip(migrations).skip(applied as usize) {
        connection.execute_batch(migration)?;
        connection.pragma_update(None, "user_version", version)?;
    }
    Ok(())
}

fn unavailable(error: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(Box::new(error))
}

fn now_ms() -> i64 {
    faafo_core::unix_millis()
}

/// Up to `?1` fractals in `order`, each with the total and its id, from `?2` (see
/// [`list_clauses`]).
fn list_statement(order: ListOrder, by_cursor: bool) -> String {
    let clauses = list_clauses(order, by_cursor, ["?1", "?2"]);
    format!("SELECT {COLUMNS}, (SELECT fractals FROM tallies), id FROM fractals {clauses}")
}

fn fractal_from_row(row: &Row<'_>) -> rusqlite::Result<Fractal> {
    let conversion = |index: usize, message: String| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            message.into(),
        )
    };
    let uuid: String = row.get(0)?;
    let uuid = Uuid::parse_str(&uuid).map_err(|e| conversion(0, e.to_string()))?;
    let window = Window {
        xa: row.get(4)?,
        xb: row.get(5)?,
        ya: row.get(6)?,
        yb: row.get(7)?,
    };
    let seed: Option<i64> = row.get(10)?;
    let spec = FractalSpec::from_stored(
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        window,
        row.get(8)?,
        row.get(9)?,
        seed.map(|s| s as u64),
    );
    let state: String = row.get(11)?;
    let state: FractalState = state
        .parse()
        .map_err(|e: faafo_core::fractal::UnknownState| conversion(11, e.to_string()))?;
    let checksum: Option<String> = row.get(14)?;
    let result = match checksum {
        Some(checksum) => Some(RenderResult {
            checksum,
            size: row.get::<_, i64>(15)? as u64,
            duration: row.get(16)?,
            generated_by: row.get(17)?,
        }),
        None => None,
    };
    Ok(Fractal {
        uuid,
        spec,
        state,
        attempts: row.get(12)?,
        max_attempts: row.get(13)?,
        result,
        error: row.get(18)?,
        created_at_ms: row.get(19)?,
        finished_at_ms: row.get(20)?,
    })
}

fn select_fractal(connection: &Connection, uuid: Uuid) -> Result<Option<Fractal>, StoreError> {
    connection
        .prepare_cached(&format!("SELECT {COLUMNS} FROM fractals WHERE uuid = ?1"))
        .and_then(|mut statement| {
            statement
                .query_row([uuid.to_string()], fractal_from_row)
                .optional()
        })
        .map_err(unavailable)
}

/// Gives the next queued task (fairest rank first) to `worker` for `lease`.
fn claim_next(
    connection: &Connection,
    worker: &str,
    lease: Duration,
) -> Result<Option<Lease>, StoreError> {
    let token = LeaseToken::generate();
    let expires_at = now_ms() + lease.as_millis() as i64;
    let fractal = connection
        .prepare_cached(&format!(
            "UPDATE fractals SET state = 'running', attempts = attempts + 1, lease_token = ?1, \
             lease_expires_at = ?2, leased_by = ?3 \
             WHERE id = (SELECT id FROM fractals INDEXED BY fractals_fair_queue \
                         WHERE state = 'queued' ORDER BY fair_rank, id LIMIT 1) \
             RETURNING {COLUMNS}"
        ))
        .and_then(|mut statement| {
            statement
                .query_row(
                    params![token.to_string(), expires_at, worker],
                    fractal_from_row,
                )
                .optional()
        })
        .map_err(unavailable)?;
    Ok(fractal.map(|fractal| Lease { fractal, token }))
}

/// Explains why a fenced write changed no row: the fractal is gone, or its lease is
/// held by someone else or by no one.
fn lease_refusal(connection: &Connection, uuid: Uuid) -> StoreError {
    let state: rusqlite::Result<Option<String>> = connection
        .query_row(
            "SELECT state FROM fractals WHERE uuid = ?1",
            [uuid.to_string()],
            |row| row.get(0),
        )
        .optional();
    match state {
        Ok(None) => StoreError::NotFound(uuid),
        Ok(Some(state)) => match state.parse() {
            Ok(state) => StoreError::LeaseLost { uuid, state },
            Err(e) => StoreError::Corrupt(format!("fractal {uuid}: {e}")),
        },
        Err(e) => unavailable(e),
    }
}

/// Runs a write that only the lease holder may make; refuses it when the lease moved on.
fn fenced_write(
    connection: &Connection,
    uuid: Uuid,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<(), StoreError> {
    let changed = connection
        .prepare_cached(sql)
        .and_then(|mut s| s.execute(params))
        .map_err(unavailable)?;
    if changed == 0 {
        return Err(lease_refusal(connection, uuid));
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn work_hints(&self) -> Option<Arc<WorkHints>> {
        Some(Arc::clone(&self.hints))
    }

    fn deletions(&self) -> Option<Arc<Deletions>> {
        Some(Arc::clone(&self.deletions))
    }

    async fn create(&self, new: NewFractal) -> Result<CreateOutcome, StoreError> {
        self.run(move |connection| {
            let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(unavailable)?;
            if let Some(existing) = select_fractal(&tx, new.uuid)? {
                return Ok(CreateOutcome::Existing(existing));
            }
            let work = new.spec.work();
            let (rank, unfinished_work): (i64, f64) = tx
                .prepare_cached(TAKE_RANK)
                .and_then(|mut statement| {
                    statement.query_row(params![new.client, work], |row| Ok((row.get(0)?, row.get(1)?)))
                })
                .map_err(unavailable)?;
            if let Some(limit) = new.max_queued_work
                && unfinished_work > limit
            {
                // Dropping the transaction rolls the rank and the work back.
                return Ok(CreateOutcome::OverQuota { queued_work: unfinished_work - work });
            }
            let spec = &new.spec;
            let window = spec.window();
            let created = tx
                .prepare_cached(&format!(
                "INSERT INTO fractals (uuid, width, height, iterations, xa, xb, ya, yb, cx, cy, seed, state, \
                 max_attempts, created_at, client, fair_rank) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, \
                 'queued', ?12, ?13, ?14, ?15) RETURNING {COLUMNS}"
            ))
            .and_then(|mut statement| {
                statement.query_row(params![
                    new.uuid.to_string(),
                    spec.width(),
                    spec.height(),
                    spec.iterations(),
                    window.xa,
                    window.xb,
                    window.ya,
                    window.yb,
                    spec.cx(),
                    spec.cy(),
                    spec.seed().map(|s| s as i64),
                    new.max_attempts,
                    now_ms(),
                    new.client,
                    rank,
                ], fractal_from_row)
            })
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(CreateOutcome::Created(created))
        })
        .await
    }

    async fn get(&self, uuid: Uuid) -> Result<Option<Fractal>, StoreError> {
        self.run(move |connection| select_fractal(connection, uuid))
            .await
    }

    async fn list(
        &self,
        order: ListOrder,
        start: ListStart,
        limit: u64,
    ) -> Result<Page, StoreError> {
        let (by_cursor, from) = start.bound();
        self.run(move |connection| {
            // One statement, so the total and the page agree without a transaction.
            let mut total = None;
            let fetch = Page::rows_to_fetch(limit);
            let rows = connection
                .prepare_cached(&list_statement(order, by_cursor))
                .and_then(|mut statement| {
                    statement
                        .query_map(params![fetch, from], |row| {
                            total = Some(row.get::<_, i64>(21)?);
                            Ok((fractal_from_row(row)?, row.get::<_, i64>(22)?))
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(unavailable)?;
            let total = match total {
                Some(total) => total,
                // Past the last page: no row carried the total.
                None => connection
                    .prepare_cached("SELECT fractals FROM tallies")
                    .and_then(|mut statement| statement.query_row([], |row| row.get(0)))
                    .map_err(unavailable)?,
            };
            Ok(Page::from_rows(rows, limit, total.max(0) as u64))
        })
        .await
    }

    async fn delete(&self, uuid: Uuid) -> Result<Option<Fractal>, StoreError> {
        let deletions = Arc::clone(&self.deletions);
        self.run(move |connection| {
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let existing = select_fractal(&tx, uuid)?;
            if existing.is_some() {
                tx.execute("DELETE FROM fractals WHERE uuid = ?1", [uuid.to_string()])
                    .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)?;
            if existing.is_some() {
                deletions.heard();
            }
            Ok(existing)
        })
        .await
    }

    async fn claim(&self, worker: &str, lease: Duration) -> Result<Option<Lease>, StoreError> {
        let worker = worker.to_owned();
        self.run(move |connection| claim_next(connection, &worker, lease))
            .await
    }

    async fn renew(
        &self,
        uuid: Uuid,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.run(move |connection| {
            let expires_at = now_ms() + lease.as_millis() as i64;
            fenced_write(
                connection,
                uuid,
                "UPDATE fractals SET lease_expires_at = ?3 WHERE uuid = ?1 AND lease_token = ?2 AND state = 'running'",
                &[&uuid.to_string(), &token.to_string(), &expires_at],
            )
        })
        .await
    }

    async fn leased(&self, uuid: Uuid, token: LeaseToken) -> Result<Fractal, StoreError> {
        self.run(move |connection| {
            let held = connection
                .prepare_cached(&format!("SELECT {COLUMNS} FROM fractals WHERE uuid = ?1 AND lease_token = ?2 AND state = 'running'"))
                .and_then(|mut s| s.query_row([uuid.to_string(), token.to_string()], fractal_from_row).optional())
                .map_err(unavailable)?;
            held.ok_or_else(|| lease_refusal(connection, uuid))
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
        let next = next.map(|(worker, lease)| (worker.to_owned(), lease));
        self.run(move |connection| {
            let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(unavailable)?;
            let done = tx
                .prepare_cached(&format!(
                    "UPDATE fractals SET state = 'done', checksum = ?3, size = ?4, duration = ?5, generated_by = ?6, \
                     finished_at = ?7, error = NULL, lease_token = NULL, lease_expires_at = NULL \
                     WHERE uuid = ?1 AND lease_token = ?2 AND state = 'running' RETURNING {COLUMNS}"
                ))
                .and_then(|mut statement| {
                    statement
                        .query_row(
                            params![
                                uuid.to_string(),
                                token.to_string(),
                                result.checksum,
                                result.size as i64,
                                result.duration,
                                result.generated_by,
                                now_ms(),
                            ],
                            fractal_from_row,
                        )
                        .optional()
                })
                .map_err(unavailable)?;
            let Some(done) = done else {
                return Err(lease_refusal(&tx, uuid));
            };
            let claimed = match next {
                Some((worker, lease)) => claim_next(&tx, &worker, lease)?,
                None => None,
            };
            // One commit for the completion and the claim.
            tx.commit().map_err(unavailable)?;
            Ok((done, claimed))
        })
        .await
    }

    async fn fail(&self, uuid: Uuid, token: LeaseToken, reason: &str) -> Result<(), StoreError> {
        let reason = reason.to_owned();
        self.run(move |connection| {
            fenced_write(
                connection,
                uuid,
                "UPDATE fractals SET state = 'failed', error = ?3, finished_at = ?4, lease_token = NULL, \
                 lease_expires_at = NULL WHERE uuid = ?1 AND lease_token = ?2 AND state = 'running'",
                &[&uuid.to_string(), &token.to_string(), &reason, &now_ms()],
            )
        })
        .await
    }

    async fn release(&self, uuid: Uuid, token: LeaseToken) -> Result<(), StoreError> {
        self.run(move |connection| {
            fenced_write(
                connection,
                uuid,
                "UPDATE fractals SET state = 'queued', attempts = max(attempts - 1, 0), lease_token = NULL, \
                 lease_expires_at = NULL, leased_by = NULL WHERE uuid = ?1 AND lease_token = ?2 AND state = 'running'",
                &[&uuid.to_string(), &token.to_string()],
            )
        })
        .await
    }

    async fn expire_leases(&self) -> Result<ExpiredLeases, StoreError> {
        self.run(move |connection| {
            let now = now_ms();
            let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(unavailable)?;
            let failed = tx
                .execute(
                    "UPDATE fractals SET state = 'failed', finished_at = ?1, \
                     error = 'gave up after ' || attempts || ' attempts: the lease of worker ' || \
                             coalesce(leased_by, '?') || ' expired without a result', \
                     lease_token = NULL, lease_expires_at = NULL \
                     WHERE state = 'running' AND lease_expires_at < ?1 AND attempts >= max_attempts",
                    [now],
                )
                .map_err(unavailable)?;
            let requeued = tx
                .execute(
                    "UPDATE fractals SET state = 'queued', lease_token = NULL, lease_expires_at = NULL, leased_by = NULL \
                     WHERE state = 'running' AND lease_expires_at < ?1",
                    [now],
                )
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(ExpiredLeases { requeued: requeued as u64, failed: failed as u64 })
        })
        .await
    }

    async fn stats(&self) -> Result<QueueStats, StoreError> {
        self.run(move |connection| {
            // One statement, one snapshot: the counts add up. Queued and running rows
            // through their partial indexes, the rest from the tallies. The one read of
            // fractals_fair_queue counts the queued rows and finds the oldest (its key
            // holds the id).
            let mut statement = connection
                .prepare_cached(
                    "SELECT queued.count, \
                            (SELECT count(*) FROM fractals INDEXED BY fractals_leased \
                             WHERE state = 'running'), \
                            fractals, failed, \
                            (SELECT created_at FROM fractals WHERE id = queued.oldest) \
                     FROM (SELECT count(*) AS count, min(id) AS oldest \
                           FROM fractals INDEXED BY fractals_fair_queue WHERE state = 'queued') AS queued, \
                          tallies",
                )
                .map_err(unavailable)?;
            statement
                .query_row([], |row| {
                    let count = |column: usize| -> rusqlite::Result<u64> {
                        Ok(row.get::<_, i64>(column)?.max(0) as u64)
                    };
                    let oldest: Option<i64> = row.get(4)?;
                    Ok(QueueStats::from_counts(
                        count(0)?,
                        count(1)?,
                        count(2)?,
                        count(3)?,
                        oldest.map(|created| {
                            Duration::from_millis((now_ms() - created).max(0) as u64)
                        }),
                    ))
                })
                .map_err(unavailable)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|connection| {
            connection
                .query_row("SELECT 1", [], |_| Ok(()))
                .map_err(unavailable)
        })
        .await
    }

    async fn record_probes(
        &self,
        probe: &str,
        outcomes: &[ProbeOutcome],
    ) -> Result<(), StoreError> {
        let (probe, outcomes) = (probe.to_owned(), outcomes.to_vec());
        self.run(move |connection| {
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            for outcome in &outcomes {
                tx.prepare_cached(
                    "INSERT INTO probe_rounds (probe, finished_at, ok, total_ms, failed_step) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        probe,
                        outcome.finished_at_ms,
                        outcome.ok,
                        outcome.total_ms,
                        outcome.failed_step
                    ])
                })
                .map_err(unavailable)?;
            }
            tx.prepare_cached("DELETE FROM probe_rounds WHERE finished_at < ?1")
                .and_then(|mut s| s.execute([now_ms() - PROBE_HISTORY.as_millis() as i64]))
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn probe_history(
        &self,
        since_ms: i64,
    ) -> Result<Vec<(String, ProbeOutcome)>, StoreError> {
        self.run(move |connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT probe, finished_at, ok, total_ms, failed_step FROM probe_rounds \
                     WHERE finished_at >= ?1 ORDER BY finished_at",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map([since_ms], |row| {
                    Ok((
                        row.get(0)?,
                        ProbeOutcome {
                            finished_at_ms: row.get(1)?,
                            ok: row.get(2)?,
                            total_ms: row.get(3)?,
                            failed_step: row.get(4)?,
                        },
                    ))
                })
                .map_err(unavailable)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(unavailable)
        })
        .await
    }

    async fn node_heartbeat(&self, beat: &NodeBeat) -> Result<(), StoreError> {
        let beat = beat.clone();
        self.run(move |connection| {
            let now = now_ms();
            connection
                .prepare_cached(
                    "INSERT INTO nodes (id, role, address, version, load, last_seen, left_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL) ON CONFLICT (id) DO UPDATE SET \
                     role = excluded.role, address = excluded.address, version = excluded.version, \
                     load = excluded.load, last_seen = excluded.last_seen, left_at = NULL",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        beat.id,
                        beat.role.as_str(),
                        beat.address,
                        beat.version,
                        beat.load as i64,
                        now
                    ])
                })
                .map_err(unavailable)?;
            connection
                .prepare_cached("DELETE FROM nodes WHERE last_seen < ?1")
                .and_then(|mut s| s.execute([now - FORGET_AFTER.as_millis() as i64]))
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn node_left(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.run(move |connection| {
            connection
                .prepare_cached("UPDATE nodes SET left_at = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id, now_ms()]))
                .map(|changed| changed > 0)
                .map_err(unavailable)
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.run(|connection| {
            let now = now_ms();
            let mut statement = connection
                .prepare_cached(
                    "SELECT id, role, address, version, load, last_seen, left_at IS NOT NULL \
                     FROM nodes ORDER BY role, id",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Option<String>>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, i64>(4)?,
                        row.get::<_, i64>(5)?,
                        row.get::<_, bool>(6)?,
                    ))
                })
                .map_err(unavailable)?;
            rows.map(|row| {
                let (id, role, address, version, load, last_seen, left) =
                    row.map_err(unavailable)?;
                node_record(id, &role, address, version, load, now - last_seen, left)
            })
            .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_operation_that_panics_fails_alone_and_the_store_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("faafo.db"))
            .await
            .unwrap();
        let panicked = store
            .run(|_| -> Result<(), StoreError> { panic!("a bug in one operation") })
            .await;
        assert!(
            matches!(panicked, Err(StoreError::Unavailable(_))),
            "{panicked:?}"
        );
        // The same connection, on the same thread, answers the next operation.
        let stats = store.stats().await.unwrap();
        assert_eq!(stats.count(faafo_core::FractalState::Queued), 0);
    }

    /// A page after a cursor starts at the cursor's rowid, in either order, rather than
    /// stepping over the rows before it.
    #[test]
    fn a_page_after_a_cursor_is_found_by_its_rowid() {
        let mut connection = Connection::open_in_memory().unwrap();
        let tx = connection.transaction().unwrap();
        apply_migrations(&tx, MIGRATIONS).unwrap();
        tx.commit().unwrap();
        for order in [ListOrder::OldestFirst, ListOrder::NewestFirst] {
            let plan: Vec<String> = connection
                .prepare(&format!(
                    "EXPLAIN QUERY PLAN {}",
                    list_statement(order, true)
                ))
                .unwrap()
                .query_map(params![11, 5], |row| row.get::<_, String>(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let seek = if order == ListOrder::OldestFirst {
                "rowid>?"
            } else {
                "rowid<?"
            };
            assert!(
                plan.contains(&format!(
                    "SEARCH fractals USING INTEGER PRIMARY KEY ({seek})"
                )),
                "{order:?}: {plan:?}"
            );
            assert!(
                !plan.iter().any(|step| step.contains("TEMP B-TREE")),
                "{plan:?}"
            );
        }
    }

    /// A file made before failed fractals were counted, with fractals in every state,
    /// has them all counted once migrated.
    #[tokio::test]
    async fn the_failed_tally_starts_from_the_fractals_already_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faafo.db");
        {
            let mut connection = Connection::open(&path).unwrap();
            let tx = connection.transaction().unwrap();
            let failed_tally = MIGRATIONS
                .iter()
                .position(|sql| sql.contains("ADD COLUMN failed"))
                .unwrap();
            apply_migrations(&tx, &MIGRATIONS[..failed_tally]).unwrap();
            for (index, state) in [
                "queued", "queued", "running", "done", "done", "done", "failed", "failed",
            ]
            .into_iter()
            .enumerate()
            {
                tx.execute(
                    "INSERT INTO fractals (uuid, width, height, iterations, xa, xb, ya, yb, cx, cy, \
                     state, max_attempts, created_at) \
                     VALUES (?1, 8, 8, 8, -2, 2, -2, 2, 0, 0, ?2, 3, 0)",
                    (format!("00000000-0000-0000-0000-00000000000{index}"), state),
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }

        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.stats().await.unwrap().counts(), [2, 1, 3, 2]);
        let page = store
            .list(ListOrder::OldestFirst, ListStart::Offset(0), 1)
            .await
            .unwrap();
        assert_eq!(page.total, 8);
    }
}
