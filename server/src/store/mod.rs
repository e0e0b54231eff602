//! The store: every SQL statement of Aiki, and the only code that talks to PostgreSQL.
//!
//! The code is split by what it stores, each part with its statements in its own folder,
//! one file per statement (`sql/<topic>/<verb>.sql`):
//! - `runs`: runs and their starts, reads, cancellation, pause and resume;
//! - `leases`: claims, heartbeats, expired leases;
//! - `reports`: task checkpoints, completions, failures, releases, suspensions;
//! - `waits`: sleeps, events, child waits, timers and timeouts;
//! - `workers`: workers and workflow versions; `keys`: API keys;
//! - `queues` and `history`: what operators read;
//! - `session` (below): statements of dedicated connections; `migrate`: the migrations.
//!
//! Each statement is loaded with `include_str!`, prepared once per connection
//! (`prepare_cached`) and always run with bound parameters. Hot paths
//! (claim, heartbeat, record, complete) are single statements; rarer transitions (fail,
//! release, cancel) lock the run row, decide in Rust and write in one transaction. Every state
//! change writes its history event in the same transaction.

/// The text of `sql/TOPIC/VERB.sql`.
macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("sql/", $name, ".sql"))
    };
}

mod history;
mod keys;
mod leases;
mod migrate;
mod notices;
mod queues;
mod reports;
mod rows;
mod runs;
mod waits;
mod workers;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use aiki_proto::v1::{HistoryEvent, LeasedRun, Queue, Run, TaskResult, UnservedRuns, Worker, WorkflowVersion};
use deadpool_postgres::{GenericClient, Pool, Transaction};
use serde_json::{Value as Json, json};
use tokio_postgres::types::Json as PgJson;
use tracing::instrument;
use uuid::Uuid;

pub use migrate::{MIGRATIONS, migrate};
use reports::*;
pub use reports::{Applied, Report};
use rows::*;
use waits::*;
use workers::*;
pub use workers::{NewWorker, Registration};

use crate::error::{Error, Result};
pub use crate::status::RunStatus;
use crate::wake::Ready;

/// A run to insert, already validated.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub namespace: String,
    pub id: Uuid,
    pub workflow: String,
    pub version: String,
    pub queue: String,
    pub priority: i32,
    pub input: Json,
    pub idempotency_key: Option<String>,
    pub request_id: Option<String>,
    /// The id is the client's request id (a UUIDv7), which dedupes the start like a key.
    pub id_from_request: bool,
    pub return_existing: bool,
    pub delay: Duration,
    pub retry: RetryPolicy,
    /// The run that starts this one as its child.
    pub parent: Option<Uuid>,
    pub timeouts: Timeouts,
    /// The API key that starts it.
    pub created_by: Option<Uuid>,
}

/// A run's timeouts (see `StartRunRequest`); `None`: no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub execution: Option<Duration>,
    pub attempt: Option<Duration>,
    pub schedule_to_start: Option<Duration>,
    pub heartbeat: Option<Duration>,
}

/// A run's retry policy with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_interval: Duration,
    pub max_interval: Duration,
    pub backoff_coefficient: f64,
    pub non_retryable_error_types: Vec<String>,
}

impl RetryPolicy {
    /// The delay before attempt `failed_attempt + 1`: `initial * coefficient^(n-1)`, capped at
    /// `max_interval`, plus up to 20% jitter so that runs failing together do not retry
    /// together.
    pub fn backoff(&self, failed_attempt: u32, jitter: f64) -> Duration {
        let exp = f64::from(failed_attempt.saturating_sub(1).min(64));
        let base = self.initial_interval.as_secs_f64() * self.backoff_coefficient.powf(exp);
        let capped = base.min(self.max_interval.as_secs_f64());
        Duration::from_secs_f64(capped * (1.0 + 0.2 * jitter.clamp(0.0, 1.0)))
    }
}

/// A task result reported by a worker. Serialized as an element of a completed run's
/// `final_tasks` (see `sql/reports/complete.sql`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewTask {
    pub key: String,
    pub name: String,
    pub seq: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Json>,
}

/// Filters of [`Store::list_runs`].
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub workflow: Option<String>,
    pub statuses: Vec<RunStatus>,
    pub queue: Option<String>,
    pub created_after: Option<Uuid>,
    pub created_before: Option<Uuid>,
    pub cursor: Option<Uuid>,
    pub limit: i64,
    pub parent: Option<Uuid>,
}

/// What a heartbeat found.
#[derive(Debug, Clone)]
pub struct HeartbeatOutcome {
    pub worker_known: bool,
    pub held: Vec<Uuid>,
    /// Named leases that ended by their holder's own report (complete, fail, suspend,
    /// release): not lost, whatever the heartbeat raced with.
    pub ended: Vec<Uuid>,
    pub cancel: Vec<Uuid>,
    pub pause: Vec<Uuid>,
    pub expires: SystemTime,
}

/// What a transition did to a run: where it is now, and when it becomes visible if it was
/// queued. Whoever must react (wake pollers and waiters, later count a metric) reads this one
/// value: see `Wakers::moved`.
#[derive(Debug, Clone)]
pub struct Moved {
    pub namespace: String,
    pub id: Uuid,
    pub queue: String,
    pub status: RunStatus,
    /// For a queued run: visible after this long (`None`: now).
    pub visible_in: Option<Duration>,
}

/// How a lease ends through a [`Report::End`].
#[derive(Debug, Clone)]
pub enum LeaseEnd {
    /// The attempt failed (`FailRun`).
    Fail {
        error: Json,
        non_retryable: bool,
        retry_after: Option<Duration>,
    },
    /// The worker gave the run back (`ReleaseRun`).
    Release { reason: String, delay: Duration },
    /// A timeout of the attempt passed (its lease, or the time between heartbeats): a failure
    /// the retry policy may retry.
    Timeout { error: Json },
    /// The run waits at step (`key`, `name`, `seq`) (`SuspendRun`).
    Suspend {
        key: String,
        name: String,
        seq: u32,
        wait: Wait,
    },
}

/// What a suspended run waits for.
#[derive(Debug, Clone)]
pub enum Wait {
    /// The end of a sleep.
    Sleep(Duration),
    /// An event of this name, for at most `timeout` (`None`: no limit).
    Event { name: String, timeout: Option<Duration> },
    /// The end of this child run.
    Child(Uuid),
}

impl Wait {
    /// How long until the run wakes by itself, if ever.
    pub fn deadline(&self) -> Option<Duration> {
        match self {
            Wait::Sleep(d) => Some(*d),
            Wait::Event { timeout, .. } => *timeout,
            Wait::Child(_) => None,
        }
    }
}

/// The store over a connection pool.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    versions: Arc<VersionCache>,
    registrations: Arc<RegistrationCache>,
    notices: Arc<notices::Notices>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("pool", &self.pool.status()).finish()
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Builds a pool of at most `size` connections (connections open lazily).
    /// Ready notifications of batches of single starts are limited to one per queue and
    /// `notify_window` (see `notices`).
    pub fn new(db: &crate::database::Database, size: usize, notify_window: Duration) -> Result<Self> {
        let mut pg = db.config().clone();
        // Every statement is planned once per connection for its shape, not again for the
        // batch in hand: PostgreSQL's first custom plans of a completion of 1,000 runs, against
        // a young table of 50,000 rows, chose a hash join over a sequential scan of the whole
        // table (40 ms where the index takes 13) and took 6 ms to plan, five times on every
        // connection.
        let options = match pg.get_options() {
            Some(o) if !o.is_empty() => format!("{o} -c plan_cache_mode=force_generic_plan"),
            _ => "-c plan_cache_mode=force_generic_plan".to_owned(),
        };
        pg.options(&options);
        let mgr = deadpool_postgres::Manager::from_config(
            pg,
            db.tls(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        // Bounded waits: with the database away or the pool exhausted, a request fails with
        // UNAVAILABLE instead of hanging.
        let pool = Pool::builder(mgr)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| Error::Internal(format!("cannot build the connection pool: {e}")))?;
        Ok(Self {
            pool,
            versions: Arc::default(),
            registrations: Arc::default(),
            notices: Arc::new(notices::Notices::new(notify_window)),
        })
    }

    /// Applies pending migrations.
    #[instrument(name = "store.migrate", skip_all)]
    pub async fn migrate(&self) -> Result<Vec<&'static str>> {
        let mut client = self.pool.get().await?;
        migrate(&mut client).await
    }

    /// Sends one ready notification in a statement of its own.
    async fn notify(&self, payload: Ready) -> Result<()> {
        notify_ready(&self.pool.get().await?, vec![payload]).await
    }

    /// Runs `SELECT 1`: is the database reachable?
    #[instrument(name = "store.ping", skip_all)]
    pub async fn ping(&self) -> Result<()> {
        let client = self.pool.get().await?;
        client.simple_query(sql!("session/ping")).await?;
        Ok(())
    }
}

/// Statements of the dedicated connections (reaper lock, notification listener), which live
/// outside the pool because what they hold dies with their session.
pub mod session {
    use tokio_postgres::Client;

    /// Takes the session advisory lock `key` if nobody holds it.
    pub async fn try_lock(client: &Client, key: i64) -> Result<bool, tokio_postgres::Error> {
        Ok(client.query_one(sql!("session/reaper_lock"), &[&key]).await?.get(0))
    }

    /// Subscribes the session to ready-queue notifications.
    pub async fn listen_ready(client: &Client) -> Result<(), tokio_postgres::Error> {
        client.batch_execute(sql!("session/listen_ready")).await
    }

    /// Is the session's connection still answering?
    pub async fn ping(client: &Client) -> Result<(), tokio_postgres::Error> {
        client.simple_query(sql!("session/ping")).await.map(|_| ())
    }
}

/// A run named by id or by idempotency key.
#[derive(Debug, Clone)]
pub enum RunRef {
    Id(Uuid),
    Key(String),
}

/// Called when a statement locked a run's row without moving the run: if it is queued, claims
/// that ran meanwhile skipped it (`SKIP LOCKED`), so its queue's pollers are woken when `tx`
/// commits, to look again.
async fn wake_if_queued(tx: &Transaction<'_>, row: &tokio_postgres::Row) -> Result<()> {
    if row.get::<_, RunStatus>("status") == RunStatus::Queued {
        let (namespace, queue): (String, String) = (row.get("namespace"), row.get("queue"));
        notify_ready(tx, vec![Ready::new(&namespace, &queue, Duration::ZERO)]).await?;
    }
    Ok(())
}

/// Wakes the pollers of the queues named by `payloads` when `tx` commits (at once outside a
/// transaction): one NOTIFY per distinct notification, all in one statement.
async fn notify_ready(tx: &impl GenericClient, payloads: Vec<Ready>) -> Result<()> {
    if payloads.is_empty() {
        return Ok(());
    }
    let (namespaces, queues, delays) = ready_arrays(&payloads);
    tx.execute(
        &tx.prepare_cached(sql!("runs/notify_ready")).await?,
        &[&namespaces, &queues, &delays],
    )
    .await?;
    Ok(())
}

/// Ready notifications as the arrays a statement takes: namespaces, queues, delays in ms.
fn ready_arrays(payloads: &[Ready]) -> (Vec<&str>, Vec<&str>, Vec<i64>) {
    let mut arrays = (
        Vec::with_capacity(payloads.len()),
        Vec::with_capacity(payloads.len()),
        Vec::with_capacity(payloads.len()),
    );
    for p in payloads {
        arrays.0.push(p.namespace.as_str());
        arrays.1.push(p.queue.as_str());
        arrays.2.push(p.delay_ms);
    }
    arrays
}

/// The runs a statement moved (the reaper's expiry, the wake-up of sleepers), from its rows
/// of (namespace, id, queue, status); wakes the pollers of the queues that got runs back.
async fn moved_runs(tx: &Transaction<'_>, rows: &[tokio_postgres::Row]) -> Result<Vec<Moved>> {
    let moved: Vec<Moved> = rows.iter().map(|r| Moved::of_row(r, None)).collect();
    let payloads = moved
        .iter()
        .filter(|m| m.status == RunStatus::Queued)
        .map(|m| Ready::new(&m.namespace, &m.queue, Duration::ZERO))
        .collect();
    notify_ready(tx, payloads).await?;
    Ok(moved)
}

impl Moved {
    /// What a statement that answered the run's row did to it.
    fn of_row(row: &tokio_postgres::Row, visible_in: Option<Duration>) -> Self {
        Self {
            namespace: row.get("namespace"),
            id: row.get("id"),
            queue: row.get("queue"),
            status: row.get("status"),
            visible_in,
        }
    }
}

/// Whether more rows follow a page read with a byte budget (`page_rows`: how many the page
/// could hold by number): the page was full by number, or the budget cut it.
fn page_is_cut(rows: &[tokio_postgres::Row], limit: i64) -> bool {
    rows.first()
        .map(|r| r.get::<_, i64>("page_rows"))
        .is_some_and(|page_rows| page_rows == limit || (rows.len() as i64) < page_rows)
}

/// Locks run (`namespace`, `id`) until `tx` ends and reads it.
async fn lock_run(tx: &Transaction<'_>, namespace: &str, id: Uuid) -> Result<tokio_postgres::Row> {
    tx.query_opt(
        &tx.prepare_cached(sql!("runs/get_for_update")).await?,
        &[&namespace, &id],
    )
    .await?
    .ok_or_else(|| not_found(id))
}

fn not_found(id: Uuid) -> Error {
    Error::NotFound(format!("run {id} not found"))
}

/// Makes `actor` the API key behind the history events and task results this transaction
/// writes through SQL functions and defaults (see `sql/session/set_actor.sql`).
pub(super) async fn set_actor(tx: &Transaction<'_>, actor: Option<Uuid>) -> Result<()> {
    if let Some(a) = actor {
        tx.execute(&tx.prepare_cached(sql!("session/set_actor")).await?, &[&a.to_string()])
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_up() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(10),
            backoff_coefficient: 2.0,
            non_retryable_error_types: vec![],
        };
        assert_eq!(p.backoff(1, 0.0), Duration::from_secs(1));
        assert_eq!(p.backoff(3, 0.0), Duration::from_secs(4));
        assert_eq!(p.backoff(30, 0.0), Duration::from_secs(10));
        assert_eq!(p.backoff(2, 1.0), Duration::from_secs_f64(2.4));
    }
}
