//! The store: every SQL statement of Aiki, and the only code that talks to PostgreSQL.
//!
//! Each statement lives in its own file under `sql/`, is loaded with `include_str!`, prepared
//! once per connection (`prepare_cached`) and always run with bound parameters. Hot paths
//! (claim, heartbeat, record, complete) are single statements; rarer transitions (fail,
//! release, cancel) lock the run row, decide in Rust and write in one transaction. Every state
//! change writes its history event in the same transaction.

/// The text of `sql/NAME.sql`.
macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!("sql/", $name, ".sql"))
    };
}

mod migrate;
mod notices;
mod rows;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use aiki_proto::v1::{
    HistoryEvent, LeasedRun, Queue, Run, RunStatus, TaskResult, UnservedRuns, Worker, WorkflowVersion,
};
use deadpool_postgres::{GenericClient, Pool, Transaction};
use serde_json::{Value as Json, json};
use tokio_postgres::types::Json as PgJson;
use tracing::instrument;
use uuid::Uuid;

pub use migrate::{MIGRATIONS, migrate};
use rows::*;

use crate::error::{Error, Result};

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
/// `final_tasks` (see `sql/runs_complete.sql`).
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
    pub statuses: Vec<String>,
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

/// A run a background statement moved: its lease expired (reaper), or its sleep ended.
#[derive(Debug, Clone)]
pub struct MovedRun {
    pub namespace: String,
    pub id: Uuid,
    pub queue: String,
    pub status: String,
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

/// Worker registrations read so far. A registration never changes (`RegisterWorker` always
/// inserts a worker with a new id) and is never deleted, so what was read once stays true, on
/// every server: a poll needs no statement to learn what its worker serves (at 1,000 runs/s a
/// worker polls about as often).
/// Keyed by worker id alone (ids are unique across namespaces), each with its namespace.
#[derive(Default)]
struct RegistrationCache {
    entries: std::sync::Mutex<HashMap<Uuid, (String, Arc<Registration>)>>,
}

/// Most registrations kept; when full, the cache starts again empty.
const MAX_REGISTRATIONS: usize = 10_000;

/// How long the versions of a workflow are taken from memory before the database is asked
/// again. A version registered through another server is the newest for this server's starts
/// at most this late; registrations through this server are seen at once, and a start naming
/// a version not in memory always asks the database.
const VERSION_CACHE_TTL: Duration = Duration::from_secs(1);

/// A workflow's registered versions, newest first, and when they were read.
type Versions = (std::time::Instant, Vec<String>);

/// Registered versions by (namespace, workflow).
#[derive(Debug, Default)]
struct VersionCache {
    entries: std::sync::Mutex<HashMap<(String, String), Versions>>,
}

impl VersionCache {
    fn get(&self, namespace: &str, workflow: &str) -> Option<Vec<String>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&(namespace.to_owned(), workflow.to_owned()))
            .filter(|(at, _)| at.elapsed() < VERSION_CACHE_TTL)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, namespace: &str, workflow: &str, versions: Vec<String>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() > 10_000 {
            entries.retain(|_, (at, _)| at.elapsed() < VERSION_CACHE_TTL);
        }
        entries.insert(
            (namespace.to_owned(), workflow.to_owned()),
            (std::time::Instant::now(), versions),
        );
    }

    fn forget(&self, namespace: &str, workflow: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&(namespace.to_owned(), workflow.to_owned()));
    }
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
    pub fn new(mut pg: tokio_postgres::Config, size: usize, notify_window: Duration) -> Result<Self> {
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
            tokio_postgres::NoTls,
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

    /// Inserts runs in one transaction, deduplicating by idempotency key or request id, and
    /// wakes the pollers of their queues (NOTIFY in the same transaction). Answers each run:
    /// the run and whether this call created it, or why it cannot start. With `atomic`, one
    /// refused run refuses them all and nothing is inserted; without, the others start.
    #[instrument(name = "store.runs.start", skip_all, fields(count = runs.len()))]
    pub async fn start_runs(&self, runs: &[NewRun], atomic: bool) -> Result<Vec<Result<(Run, bool)>>> {
        let mut client = self.pool.get().await?;
        if !atomic && runs.iter().all(|r| r.parent.is_none()) {
            // Nothing has to commit with the insert (no parent to lock, no event of a parent
            // to write, no refusal to roll back): its one statement is its own transaction, a
            // round trip where BEGIN, INSERT and COMMIT took three (a batch of single starts
            // took 2.2 ms, of which the BEGIN and the COMMIT's round trips were most). Its
            // ready notifications are limited per queue (see `notices`): such batches come one
            // after another under a stream of single starts.
            // A delay is relative to the statement that sends it: those go with their batch.
            let (ready, delayed) = ready_payloads(runs);
            let (mut send, later) = self.notices.admit(ready, std::time::Instant::now());
            send.extend(delayed);
            let out = start_in(&client, runs, atomic, Parents::default(), &self.versions, send).await?;
            drop(client);
            // Committed: what this batch did not send goes with the next deferred send.
            for (payload, due) in self.notices.after_commit(later, std::time::Instant::now()) {
                let store = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(due.into()).await;
                    store.notices.sending(&payload, std::time::Instant::now());
                    if let Err(e) = store.notify(payload).await {
                        // Pollers of other replicas look again when their wait ends.
                        tracing::warn!(error = %e, "could not send a deferred ready notification");
                    }
                });
            }
            return Ok(out);
        }
        let tx = client.transaction().await?;
        let parents = lock_parents(&tx, runs).await?;
        let (mut wake, delayed) = ready_payloads(runs);
        wake.extend(delayed);
        let mut out = start_in(&tx, runs, atomic, parents, &self.versions, wake).await?;
        if atomic && let Some(i) = out.iter().position(Result::is_err) {
            return Err(out
                .swap_remove(i)
                .err()
                .unwrap_or_else(|| Error::Internal("no error".into())));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Sends one ready notification (`wake::ready_payload`) in a statement of its own.
    async fn notify(&self, payload: String) -> Result<()> {
        notify_ready(&self.pool.get().await?, vec![payload]).await
    }

    /// A run by id.
    #[instrument(name = "store.run.get", skip_all)]
    pub async fn get_run(&self, namespace: &str, id: Uuid) -> Result<Option<Run>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("run_get")).await?;
        client
            .query_opt(&stmt, &[&namespace, &id])
            .await?
            .as_ref()
            .map(run_from_row)
            .transpose()
    }

    /// A run by idempotency key.
    #[instrument(name = "store.run.get_by_key", skip_all)]
    pub async fn get_run_by_key(&self, namespace: &str, key: &str) -> Result<Option<Run>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("run_get_by_key")).await?;
        client
            .query_opt(&stmt, &[&namespace, &key])
            .await?
            .as_ref()
            .map(run_from_row)
            .transpose()
    }

    /// Runs matching `filter`, newest first.
    #[instrument(name = "store.runs.list", skip_all)]
    pub async fn list_runs(&self, namespace: &str, f: &RunFilter) -> Result<Vec<Run>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("run_list")).await?;
        let rows = client
            .query(
                &stmt,
                &[
                    &namespace,
                    &f.workflow,
                    &f.statuses,
                    &f.queue,
                    &f.created_after,
                    &f.created_before,
                    &f.cursor,
                    &f.limit,
                    &f.parent,
                ],
            )
            .await?;
        runs_from_rows(&rows)
    }

    /// Cancels a run: at once if queued, suspended or paused, by request if running; and, in
    /// the same transaction, every run it started (children, grandchildren...) that has not
    /// ended. Idempotent.
    #[instrument(name = "store.run.cancel", skip_all)]
    pub async fn cancel_run(&self, namespace: &str, id: Uuid, reason: &str) -> Result<Run> {
        let mut client = self.pool.get().await?;
        let mut tries = 0;
        loop {
            tries += 1;
            let tx = client.transaction().await?;
            match cancel_tree(&tx, namespace, id, reason).await {
                Ok(run) => {
                    tx.commit().await?;
                    return Ok(run);
                }
                // A deadlock with a child ending at the same moment (it locks the child, then
                // its parent): rolled back, so do it again.
                Err(Error::Unavailable(why)) if tries < 3 => {
                    tracing::debug!(why, tries, "cancellation rolled back; doing it again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Pauses a run: a queued one at once, a running one once its worker releases it (it is
    /// asked to at its next heartbeat). Pausing a paused run, or asking twice, changes nothing.
    #[instrument(name = "store.run.pause", skip_all)]
    pub async fn pause_run(&self, namespace: &str, id: Uuid, reason: &str) -> Result<Run> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = lock_run(&tx, namespace, id).await?;
        let status: String = row.get("status");
        let requested: bool = row.get("pause_requested");
        let cancelling: bool = row.get("cancel_requested");
        let now = match status.as_str() {
            "queued" => true,
            "running" if !requested && !cancelling => false,
            "running" | "paused" => return run_from_row(&row),
            other => {
                return Err(Error::FailedPrecondition(format!(
                    "run {id} is {other}; only a queued or running run can be paused"
                )));
            }
        };
        let row = tx
            .query_one(&tx.prepare_cached(sql!("run_pause")).await?, &[&namespace, &id, &now])
            .await?;
        let kind = if now { "run_paused" } else { "pause_requested" };
        let attempt: i32 = row.get("attempt");
        tx.execute(
            &tx.prepare_cached(sql!("event_insert")).await?,
            &[
                &namespace,
                &id,
                &kind,
                &attempt,
                &None::<Uuid>,
                &json!({"reason": reason}),
            ],
        )
        .await?;
        tx.commit().await?;
        run_from_row(&row)
    }

    /// Resumes a paused run (queued again; answers how long until it is visible) or withdraws
    /// a pause request not yet taken effect. Resuming a run that is not paused changes nothing.
    #[instrument(name = "store.run.resume", skip_all)]
    pub async fn resume_run(&self, namespace: &str, id: Uuid) -> Result<(Run, Option<Duration>)> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = lock_run(&tx, namespace, id).await?;
        let status: String = row.get("status");
        let requested: bool = row.get("pause_requested");
        match status.as_str() {
            "paused" => {}
            "running" if requested => {}
            "queued" | "running" | "suspended" => {
                wake_if_queued(&tx, &row).await?;
                tx.commit().await?;
                return Ok((run_from_row(&row)?, None));
            }
            other => {
                return Err(Error::FailedPrecondition(format!(
                    "run {id} is {other}; only a paused run (or one asked to pause) can be resumed"
                )));
            }
        }
        let row = tx
            .query_one(&tx.prepare_cached(sql!("run_resume")).await?, &[&namespace, &id])
            .await?;
        let attempt: i32 = row.get("attempt");
        let details = json!({"pause_withdrawn": status == "running"});
        tx.execute(
            &tx.prepare_cached(sql!("event_insert")).await?,
            &[&namespace, &id, &"run_resumed", &attempt, &None::<Uuid>, &details],
        )
        .await?;
        let queued = if status == "paused" {
            let delay = Duration::from_millis(row.get::<_, i64>("delay_ms").max(0) as u64);
            let queue: String = row.get("queue");
            notify_ready(&tx, vec![crate::wake::ready_payload(namespace, &queue, delay)]).await?;
            Some(delay)
        } else {
            None
        };
        tx.commit().await?;
        Ok((run_from_row(&row)?, queued))
    }

    /// History events of a run after `after_seq`, oldest first, at most `limit`.
    #[instrument(name = "store.run.history", skip_all)]
    pub async fn history(&self, namespace: &str, id: Uuid, after_seq: i64, limit: i64) -> Result<Vec<HistoryEvent>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("events_list")).await?;
        let rows = client.query(&stmt, &[&namespace, &id, &after_seq, &limit]).await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Registers a worker serving `workflows` (name, version) on `queues`, records the
    /// versions it brings, and returns its id.
    #[instrument(name = "store.worker.register", skip_all)]
    pub async fn register_worker(
        &self,
        namespace: &str,
        identity: &str,
        host: &str,
        workflows: &[(String, String)],
        queues: &[String],
        slots: u32,
    ) -> Result<Uuid> {
        let id = Uuid::now_v7();
        let json = Json::Array(
            workflows
                .iter()
                .map(|(name, version)| json!({"name": name, "version": version}))
                .collect(),
        );
        let (names, versions): (Vec<&str>, Vec<&str>) = workflows
            .iter()
            .filter(|(name, _)| name != "*")
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .unzip();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            &tx.prepare_cached(sql!("worker_register")).await?,
            &[&namespace, &id, &identity, &host, &json, &queues, &(slots as i32)],
        )
        .await?;
        tx.execute(
            &tx.prepare_cached(sql!("versions_register")).await?,
            &[&namespace, &names, &versions],
        )
        .await?;
        tx.commit().await?;
        for (name, _) in workflows {
            self.versions.forget(namespace, name);
        }
        Ok(id)
    }

    /// What a worker registered, or `None` if it is unknown.
    #[instrument(name = "store.worker.registration", skip_all)]
    pub async fn worker_registration(&self, namespace: &str, id: Uuid) -> Result<Option<Arc<Registration>>> {
        if let Some((ns, r)) = self
            .registrations
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            && ns == namespace
        {
            return Ok(Some(r.clone()));
        }
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("worker_queues")).await?;
        let Some(row) = client.query_opt(&stmt, &[&namespace, &id]).await? else {
            return Ok(None);
        };
        let workflows: Json = row.get("workflows");
        let (mut names, mut pinned) = (Vec::new(), Vec::new());
        for w in workflows.as_array().into_iter().flatten() {
            let name = w.get("name").and_then(Json::as_str).unwrap_or_default();
            let version = w.get("version").and_then(Json::as_str).unwrap_or_default();
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
            if !version.is_empty() {
                pinned.push(format!("{name}\n{version}"));
            }
        }
        let registration = Arc::new(Registration {
            queues: row.get("queues"),
            workflows: names,
            versions: pinned,
        });
        let mut entries = self.registrations.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_REGISTRATIONS {
            entries.clear();
        }
        entries.insert(id, (namespace.to_owned(), registration.clone()));
        Ok(Some(registration))
    }

    /// Registered workflow versions, with the workers that heartbeat within `live` serving
    /// each; the newest version of each workflow is marked `latest`.
    #[instrument(name = "store.workflows.list", skip_all)]
    pub async fn list_workflows(&self, namespace: &str, live: Duration) -> Result<Vec<WorkflowVersion>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("workflows_list")).await?;
        let mut out: Vec<WorkflowVersion> = Vec::new();
        for row in client.query(&stmt, &[&namespace, &ms(live)]).await? {
            let workflow: String = row.get("workflow");
            let version: String = row.get("version");
            // Rows come newest first within a workflow: the first pinned version is the latest.
            let latest = !version.is_empty() && !out.iter().any(|w| w.workflow == workflow && !w.version.is_empty());
            let ids: Vec<Uuid> = row.get("worker_ids");
            out.push(WorkflowVersion {
                workflow,
                version,
                latest,
                registered_at: Some(row.get::<_, SystemTime>("registered_at").into()),
                last_seen_at: Some(row.get::<_, SystemTime>("last_seen_at").into()),
                worker_ids: ids.iter().map(Uuid::to_string).collect(),
                worker_identities: row.get("identities"),
            });
        }
        Ok(out)
    }

    /// Leases up to `max` ready runs of one queue to `worker` for `ttl`, with the task results
    /// recorded so far.
    #[instrument(name = "store.run.claim", skip_all, fields(queue, max))]
    pub async fn claim(
        &self,
        namespace: &str,
        queue: &str,
        max: u32,
        worker: Uuid,
        ttl: Duration,
        served: &Registration,
    ) -> Result<Vec<LeasedRun>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("claim")).await?;
        let rows = client
            .query(
                &stmt,
                &[
                    &namespace,
                    &queue,
                    &(max as i64),
                    &worker,
                    &ms(ttl),
                    &served.workflows,
                    &served.versions,
                ],
            )
            .await?;
        // Only runs leased before can have recorded tasks: `ids` names them.
        let (mut runs, ids) = leased_from_rows(&rows)?;
        if !ids.is_empty() {
            let stmt = client.prepare_cached(sql!("tasks_of_runs")).await?;
            let at: std::collections::HashMap<String, usize> =
                runs.iter().enumerate().map(|(i, l)| (l.run_id.clone(), i)).collect();
            for row in client.query(&stmt, &[&namespace, &ids]).await? {
                let run_id: Uuid = row.get("run_id");
                if let Some(&i) = at.get(&run_id.to_string()) {
                    runs[i].tasks.push(task_from_row(&row)?);
                }
            }
        }
        Ok(runs)
    }

    /// Whether queue `queue` holds a ready run that a worker serving `served` could take; see
    /// `sql/claim_skipped.sql`. Asked by a poll whose claims leased nothing.
    #[instrument(name = "store.queue.ready_left", skip_all, fields(queue))]
    pub async fn ready_left(&self, namespace: &str, queue: &str, served: &Registration) -> Result<bool> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("claim_skipped")).await?;
        let row = client
            .query_one(&stmt, &[&namespace, &queue, &served.workflows, &served.versions])
            .await?;
        Ok(row.get(0))
    }

    /// Extends the leases a worker names; see `sql/heartbeat.sql`.
    #[instrument(name = "store.worker.heartbeat", skip_all, fields(leases = ids.len()))]
    pub async fn heartbeat(
        &self,
        namespace: &str,
        worker: Uuid,
        ids: &[Uuid],
        tokens: &[Uuid],
        ttl: Duration,
    ) -> Result<HeartbeatOutcome> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("heartbeat")).await?;
        let row = client
            .query_one(&stmt, &[&namespace, &worker, &ids, &tokens, &ms(ttl)])
            .await?;
        Ok(HeartbeatOutcome {
            worker_known: row.get("worker_known"),
            held: row.get("held"),
            ended: row.get("ended"),
            cancel: row.get("cancel"),
            pause: row.get("pause"),
            expires: row.get("expires"),
        })
    }

    /// Applies worker reports in one transaction (group commit): task results and completions
    /// of many runs by one statement each, failures and releases one by one. Returns one answer
    /// per report, in order. `Err` means the transaction failed as a whole and nothing was
    /// applied: the caller may apply the reports one at a time to find the culprit.
    #[instrument(name = "store.reports.apply", skip_all, fields(count = reports.len()))]
    pub async fn apply_reports(&self, reports: &[Report]) -> Result<Vec<Result<Applied>>> {
        let mut client = self.pool.get().await?;
        let mut tries = 0;
        loop {
            tries += 1;
            let tx = client.transaction().await?;
            match apply_in(&tx, reports).await {
                Ok(out) => {
                    tx.commit().await?;
                    return Ok(out);
                }
                // A deadlock or serialization failure between concurrent batches: the
                // transaction was rolled back, so apply it again.
                Err(Error::Unavailable(why)) if tries < 3 => {
                    tracing::debug!(why, tries, "report batch rolled back; applying it again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Ends up to `limit` expired leases (see `sql/leases_expire.sql`).
    #[instrument(name = "store.leases.expire", skip_all)]
    pub async fn expire_leases(&self, limit: i64, max_expirations: u32) -> Result<Vec<MovedRun>> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let stmt = tx.prepare_cached(sql!("leases_expire")).await?;
        let rows = tx.query(&stmt, &[&limit, &(max_expirations as i32)]).await?;
        let expired = moved_runs(&tx, &rows).await?;
        tx.commit().await?;
        Ok(expired)
    }

    /// Workers of a namespace, most recently seen first.
    #[instrument(name = "store.workers.list", skip_all)]
    pub async fn list_workers(&self, namespace: &str) -> Result<Vec<Worker>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("workers_list")).await?;
        client
            .query(&stmt, &[&namespace])
            .await?
            .iter()
            .map(worker_from_row)
            .collect()
    }

    /// Depth per state of every queue of a namespace, and which queued runs no worker that
    /// heartbeat within `live` can lease.
    #[instrument(name = "store.queues.list", skip_all)]
    pub async fn list_queues(&self, namespace: &str, live: Duration) -> Result<Vec<Queue>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("queues_list")).await?;
        let mut queues: Vec<Queue> = client
            .query(&stmt, &[&namespace])
            .await?
            .iter()
            .map(queue_from_row)
            .collect();
        let stmt = client.prepare_cached(sql!("queues_unserved")).await?;
        for row in client.query(&stmt, &[&namespace, &ms(live)]).await? {
            let queue: String = row.get("queue");
            let workflow: String = row.get("workflow");
            let version: String = row.get("version");
            let reason = match (version.as_str(), row.get::<_, bool>("other_versions")) {
                ("", _) => format!("no live worker serves workflow {workflow:?} on queue {queue:?}"),
                (v, true) => format!(
                    "no live worker serves version {v:?} of workflow {workflow:?} on queue {queue:?} \
                     (live workers serve other versions)"
                ),
                (v, false) => {
                    format!("no live worker serves workflow {workflow:?} (version {v:?}) on queue {queue:?}")
                }
            };
            if let Some(q) = queues.iter_mut().find(|q| q.name == queue) {
                q.unserved.push(UnservedRuns {
                    workflow,
                    version,
                    count: row.get::<_, i64>("n").max(0) as u64,
                    reason,
                });
            }
        }
        Ok(queues)
    }

    /// Applies the run timeouts that have passed, up to `limit` runs of each kind, in one
    /// transaction: execution and schedule-to-start timeouts end the run `failed`; attempt and
    /// heartbeat timeouts fail the attempt, which the retry policy may retry. Each writes a
    /// `timed_out` event. Answers the runs moved.
    #[instrument(name = "store.runs.time_out", skip_all)]
    pub async fn time_out_runs(&self, limit: i64) -> Result<Vec<MovedRun>> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut moved = Vec::new();
        for (kind, stmt, error_type) in [
            ("execution", sql!("runs_execution_timeout"), "ExecutionTimeout"),
            (
                "schedule_to_start",
                sql!("runs_schedule_timeout"),
                "ScheduleToStartTimeout",
            ),
        ] {
            for row in tx.query(&tx.prepare_cached(stmt).await?, &[&limit]).await? {
                let (ns, id): (String, Uuid) = (row.get("namespace"), row.get("id"));
                let error = json!({"type": error_type, "message": timeout_message(kind)});
                let Some(run) = tx
                    .query_opt(&tx.prepare_cached(sql!("run_time_out")).await?, &[&ns, &id, &error])
                    .await?
                else {
                    continue;
                };
                let attempt: i32 = run.get("attempt");
                let owner: Option<Uuid> = run.get("lease_owner");
                let insert = tx.prepare_cached(sql!("event_insert")).await?;
                tx.execute(
                    &insert,
                    &[&ns, &id, &"timed_out", &attempt, &owner, &json!({"timeout": kind})],
                )
                .await?;
                tx.execute(&insert, &[&ns, &id, &"run_failed", &attempt, &owner, &error])
                    .await?;
                moved.push(MovedRun {
                    namespace: ns,
                    id,
                    queue: run.get("queue"),
                    status: "failed".into(),
                });
            }
        }
        for (kind, stmt, error_type) in [
            ("attempt", sql!("runs_attempt_timeout"), "AttemptTimeout"),
            ("heartbeat", sql!("runs_heartbeat_timeout"), "HeartbeatTimeout"),
        ] {
            for row in tx.query(&tx.prepare_cached(stmt).await?, &[&limit]).await? {
                let (ns, id, token): (String, Uuid, Uuid) =
                    (row.get("namespace"), row.get("id"), row.get("lease_token"));
                let error = json!({"type": error_type, "message": timeout_message(kind)});
                let locked = tx
                    .query_opt(&tx.prepare_cached(sql!("run_get")).await?, &[&ns, &id])
                    .await?;
                let (attempt, owner) = match &locked {
                    Some(r) => (r.get::<_, i32>("attempt"), r.get::<_, Option<Uuid>>("lease_owner")),
                    None => continue,
                };
                tx.execute(
                    &tx.prepare_cached(sql!("event_insert")).await?,
                    &[&ns, &id, &"timed_out", &attempt, &owner, &json!({"timeout": kind})],
                )
                .await?;
                if let Some((run, delay)) = end_one(&tx, &ns, id, token, &LeaseEnd::Timeout { error }).await? {
                    let status = status_of_run(&run);
                    if status == "queued" {
                        notify_ready(&tx, vec![crate::wake::ready_payload(&ns, &run.queue, delay)]).await?;
                    }
                    moved.push(MovedRun {
                        namespace: ns,
                        id,
                        queue: run.queue,
                        status: status.into(),
                    });
                }
            }
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// Wakes up to `limit` suspended runs whose wake time has come (see
    /// `sql/runs_wake_due.sql`), with one NOTIFY per queue that got runs back.
    #[instrument(name = "store.runs.wake_due", skip_all)]
    pub async fn wake_due(&self, limit: i64) -> Result<Vec<MovedRun>> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let stmt = tx.prepare_cached(sql!("runs_wake_due")).await?;
        let rows = tx.query(&stmt, &[&limit]).await?;
        let woken = moved_runs(&tx, &rows).await?;
        tx.commit().await?;
        Ok(woken)
    }

    /// Ends a suspended run's wait now (`WakeRun`): a sleep ends, a wait for an event times
    /// out. A wait for a child cannot be ended so.
    #[instrument(name = "store.run.wake", skip_all)]
    pub async fn wake_run(&self, namespace: &str, id: Uuid) -> Result<Run> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = lock_run(&tx, namespace, id).await?;
        let status: String = row.get("status");
        if status != "suspended" {
            wake_if_queued(&tx, &row).await?;
            tx.commit().await?;
            return Err(Error::FailedPrecondition(format!(
                "run {id} is {status}; only a suspended run can be woken"
            )));
        }
        if let Some(child) = row.get::<_, Option<Uuid>>("wait_child") {
            return Err(Error::FailedPrecondition(format!(
                "run {id} waits for its child run {child} and wakes when that run ends; cancel the child to end the wait"
            )));
        }
        let (output, details) = match row.get::<_, Option<String>>("wait_event") {
            Some(event) => (
                json!({"timeout": true, "early": true}),
                json!({"event": event, "timeout": true, "early": true}),
            ),
            None => (json!({"woke": true, "early": true}), json!({"early": true})),
        };
        let row = end_wait(&tx, namespace, id, &output, &details).await?;
        tx.commit().await?;
        run_from_row(&row)
    }

    /// Sends an event to a run (by id or idempotency key): stored in its inbox (unless its
    /// event key was sent before), and handed to the run at once if it waits for an event of
    /// that name. Answers (stored, delivered, the run as it is now).
    #[instrument(name = "store.run.send_event", skip_all)]
    pub async fn send_event(
        &self,
        namespace: &str,
        target: &RunRef,
        name: &str,
        payload: &Json,
        event_key: Option<&str>,
    ) -> Result<(bool, bool, Run)> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = match target {
            RunRef::Id(id) => lock_run(&tx, namespace, *id).await?,
            RunRef::Key(key) => tx
                .query_opt(
                    &tx.prepare_cached(sql!("run_get_by_key_for_update")).await?,
                    &[&namespace, key],
                )
                .await?
                .ok_or_else(|| Error::NotFound(format!("no run has idempotency key {key:?}")))?,
        };
        let id: Uuid = row.get("id");
        let status: String = row.get("status");
        let duplicate = match event_key {
            Some(key) => tx
                .query_one(
                    &tx.prepare_cached(sql!("inbox_has_key")).await?,
                    &[&namespace, &id, &key],
                )
                .await?
                .get::<_, bool>(0),
            None => false,
        };
        if duplicate {
            wake_if_queued(&tx, &row).await?;
            tx.commit().await?;
            return Ok((false, false, run_from_row(&row)?));
        }
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            return Err(Error::FailedPrecondition(format!(
                "run {id} is {status}; events can only be sent to a run that has not ended"
            )));
        }
        let seq: i64 = tx
            .query_one(
                &tx.prepare_cached(sql!("inbox_insert")).await?,
                &[&namespace, &id, &name, payload, &event_key],
            )
            .await?
            .get(0);
        let attempt: i32 = row.get("attempt");
        tx.execute(
            &tx.prepare_cached(sql!("event_insert")).await?,
            &[
                &namespace,
                &id,
                &"event_received",
                &attempt,
                &None::<Uuid>,
                &json!({"name": name, "key": event_key, "seq": seq}),
            ],
        )
        .await?;
        let waiting = status == "suspended" && row.get::<_, Option<String>>("wait_event").as_deref() == Some(name);
        let mut run = row;
        if waiting {
            let key: String = run.get("wait_key");
            let (output, details) = take_event(&tx, namespace, id, name, &key)
                .await?
                .ok_or_else(|| Error::Internal("the event just stored is not pending".into()))?;
            run = end_wait(&tx, namespace, id, &output, &details).await?;
        } else {
            wake_if_queued(&tx, &run).await?;
        }
        tx.commit().await?;
        Ok((true, waiting, run_from_row(&run)?))
    }

    /// How long until the earliest wake time of a suspended run (zero if overdue), if any.
    #[instrument(name = "store.runs.next_wake", skip_all)]
    pub async fn next_wake(&self) -> Result<Option<Duration>> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(&client.prepare_cached(sql!("next_wake")).await?, &[])
            .await?;
        Ok(row
            .get::<_, Option<i64>>(0)
            .map(|ms| Duration::from_millis(ms.max(0) as u64)))
    }

    /// The earliest future visibility of each queue (to arm timers at start).
    #[instrument(name = "store.queues.next_visible", skip_all)]
    pub async fn next_visible(&self) -> Result<Vec<(String, String, Duration)>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("next_visible")).await?;
        Ok(client
            .query(&stmt, &[])
            .await?
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    Duration::from_millis(r.get::<_, i64>(2).max(0) as u64),
                )
            })
            .collect())
    }

    /// Runs `SELECT 1`: is the database reachable?
    #[instrument(name = "store.ping", skip_all)]
    pub async fn ping(&self) -> Result<()> {
        let client = self.pool.get().await?;
        client.simple_query(sql!("ping")).await?;
        Ok(())
    }
}

/// Statements of the dedicated connections (reaper lock, notification listener), which live
/// outside the pool because what they hold dies with their session.
pub mod session {
    use tokio_postgres::Client;

    /// Takes the session advisory lock `key` if nobody holds it.
    pub async fn try_lock(client: &Client, key: i64) -> Result<bool, tokio_postgres::Error> {
        Ok(client.query_one(sql!("reaper_lock"), &[&key]).await?.get(0))
    }

    /// Subscribes the session to ready-queue notifications.
    pub async fn listen_ready(client: &Client) -> Result<(), tokio_postgres::Error> {
        client.batch_execute(sql!("listen_ready")).await
    }

    /// Is the session's connection still answering?
    pub async fn ping(client: &Client) -> Result<(), tokio_postgres::Error> {
        client.simple_query(sql!("ping")).await.map(|_| ())
    }
}

/// What a worker registered: its queues, the workflows whose unpinned runs it serves (`*`:
/// all), and the versions whose pinned runs it serves ("workflow\nversion").
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub queues: Vec<String>,
    pub workflows: Vec<String>,
    pub versions: Vec<String>,
}

/// A run named by id or by idempotency key.
#[derive(Debug, Clone)]
pub enum RunRef {
    Id(Uuid),
    Key(String),
}

/// A validated worker report, for [`Store::apply_reports`].
#[derive(Debug, Clone)]
pub enum Report {
    /// `RecordTask`.
    Record {
        namespace: String,
        id: Uuid,
        token: Uuid,
        task: NewTask,
    },
    /// `CompleteRun`, with the task results it checkpoints.
    Complete {
        namespace: String,
        id: Uuid,
        token: Uuid,
        output: Json,
        tasks: Vec<NewTask>,
    },
    /// `FailRun` or `ReleaseRun`.
    End {
        namespace: String,
        id: Uuid,
        token: Uuid,
        end: LeaseEnd,
    },
}

/// What one applied report did.
#[derive(Debug, Clone)]
pub enum Applied {
    /// `None`: this report recorded the task; else the result an earlier report recorded.
    Recorded(Option<TaskResult>),
    /// Whether this report completed the run (`false`: it duplicates the one that did).
    Completed(bool),
    /// The run as the lease's end left it and, if it is queued again, how long until it is
    /// visible; `None` for a duplicate of the report that ended the lease.
    Ended(Option<(Box<Run>, Duration)>),
}

/// The ready notifications of `runs` (`wake::ready_payload`), once per queue: those of runs
/// ready at once, and those of runs with a delay.
fn ready_payloads(runs: &[NewRun]) -> (Vec<String>, Vec<String>) {
    let (mut ready, mut delayed) = (Vec::new(), Vec::new());
    for r in runs {
        let p = crate::wake::ready_payload(&r.namespace, &r.queue, r.delay);
        let to = if r.delay.is_zero() { &mut ready } else { &mut delayed };
        if !to.contains(&p) {
            to.push(p);
        }
    }
    (ready, delayed)
}

/// The body of [`Store::start_runs`]: one statement inserts every run whose key is free, then
/// each run whose key is taken is answered with the run holding it (or refused). The statement
/// sends the ready notifications `wake` when it commits.
async fn start_in(
    tx: &impl GenericClient,
    runs: &[NewRun],
    atomic: bool,
    (mut refused, parents): Parents,
    cache: &VersionCache,
    wake: Vec<String>,
) -> Result<Vec<Result<(Run, bool)>>> {
    // Insert in key order, so that two batches sharing keys take their locks in the same
    // order and cannot deadlock; answer in request order.
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by_key(|&i| {
        let r = &runs[i];
        (r.idempotency_key.as_deref(), r.request_id.as_deref(), r.id)
    });
    let pinned = pin_versions(tx, runs, &mut refused, cache).await?;
    if atomic && let Some(i) = order.iter().find(|i| refused.contains_key(i)) {
        return Ok(vec![Err(refused
            .remove(i)
            .unwrap_or_else(|| Error::Internal("no error".into())))]);
    }
    let n = runs.len();
    let (mut ns, mut ids, mut workflows, mut versions, mut queues, mut priorities, mut inputs) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut keys, mut request_ids, mut attempts, mut initials, mut maxes, mut coefficients, mut types, mut delays) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut parent_ids = Vec::with_capacity(n);
    let (mut execution, mut attempt, mut schedule, mut heartbeat) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for &i in &order {
        if refused.contains_key(&i) {
            continue;
        }
        let r = &runs[i];
        parent_ids.push(r.parent);
        execution.push(r.timeouts.execution.map(ms));
        attempt.push(r.timeouts.attempt.map(ms));
        schedule.push(r.timeouts.schedule_to_start.map(ms));
        heartbeat.push(r.timeouts.heartbeat.map(ms));
        ns.push(r.namespace.as_str());
        ids.push(r.id);
        workflows.push(r.workflow.as_str());
        versions.push(pinned[i].as_str());
        queues.push(r.queue.as_str());
        priorities.push(r.priority);
        inputs.push(&r.input);
        keys.push(r.idempotency_key.as_deref());
        request_ids.push(r.request_id.as_deref());
        attempts.push(r.retry.max_attempts as i32);
        initials.push(ms(r.retry.initial_interval));
        maxes.push(ms(r.retry.max_interval));
        coefficients.push(r.retry.backoff_coefficient);
        types.push(json!(r.retry.non_retryable_error_types));
        delays.push(ms(r.delay));
    }
    let stmt = tx.prepare_cached(sql!("runs_insert")).await?;
    let rows = tx
        .query(
            &stmt,
            &[
                &ns,
                &ids,
                &workflows,
                &versions,
                &queues,
                &priorities,
                &inputs,
                &keys,
                &request_ids,
                &attempts,
                &initials,
                &maxes,
                &coefficients,
                &types,
                &delays,
                &parent_ids,
                &execution,
                &attempt,
                &schedule,
                &heartbeat,
                &wake,
            ],
        )
        .await?;
    let mut created = std::collections::HashMap::with_capacity(rows.len());
    for (row, run) in rows.iter().zip(runs_from_rows(&rows)?) {
        created.insert(row.get::<_, Uuid>("id"), run);
    }
    let mut out: Vec<Option<Result<(Run, bool)>>> = runs.iter().map(|_| None).collect();
    for i in order {
        let r = &runs[i];
        if let Some(e) = refused.remove(&i) {
            out[i] = Some(Err(e));
            continue;
        }
        if let Some(run) = created.remove(&r.id) {
            if let Some(parent) = r.parent {
                let attempt = parents.get(&(r.namespace.clone(), parent)).copied().unwrap_or(0);
                let details = json!({"child": r.id, "workflow": r.workflow});
                tx.execute(
                    &tx.prepare_cached(sql!("event_insert")).await?,
                    &[
                        &r.namespace,
                        &parent,
                        &"child_started",
                        &attempt,
                        &None::<Uuid>,
                        &details,
                    ],
                )
                .await?;
            }
            out[i] = Some(Ok((run, true)));
            continue;
        }
        // Taken: the conflicting insert has committed (ON CONFLICT waited for it), so this
        // statement, with its new snapshot, sees the run.
        let existing = tx
            .query_opt(
                &tx.prepare_cached(sql!("run_by_dedupe")).await?,
                &[
                    &r.namespace,
                    &r.idempotency_key,
                    &r.request_id,
                    &r.workflow,
                    &r.input,
                    &r.id_from_request.then_some(r.id),
                ],
            )
            .await?;
        let answer = match existing {
            None => Err(Error::Unavailable(
                "the run holding this idempotency key was removed concurrently; retry".into(),
            )),
            Some(existing) if !existing.get::<_, bool>("same_start") && !r.return_existing => {
                let what = match &r.idempotency_key {
                    Some(k) => format!("idempotency key {k:?}"),
                    None if r.id_from_request => format!("request id \"{}\"", r.id),
                    None => format!("request id {:?}", r.request_id.as_deref().unwrap_or("")),
                };
                let id: Uuid = existing.get("id");
                let at = if atomic && runs.len() > 1 {
                    format!(" (entry {i})")
                } else {
                    String::new()
                };
                Err(Error::AlreadyExists(format!(
                    "{what}{at} already started run {id} with a different workflow or input; \
                     use another key, or conflict policy RETURN_EXISTING to get that run"
                )))
            }
            Some(existing) => run_from_row(&existing).map(|run| (run, false)),
        };
        if atomic && answer.is_err() {
            return Ok(vec![answer]);
        }
        out[i] = Some(answer);
    }
    Ok(out
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Error::Internal("run left unanswered".into()))))
        .collect())
}

/// The version each run is pinned to: the one it names, which must be registered, or its
/// workflow's newest registered version, or none (''). Runs naming an unknown version are
/// refused (in `refused`, by position).
async fn pin_versions(
    tx: &impl GenericClient,
    runs: &[NewRun],
    refused: &mut HashMap<usize, Error>,
    cache: &VersionCache,
) -> Result<Vec<String>> {
    // Newest first, per (namespace, workflow): from memory when fresh and enough (a named
    // version missing from memory may have just been registered elsewhere: ask).
    let mut known: HashMap<(&str, &str), Vec<String>> = HashMap::new();
    let mut ask: HashMap<&str, Vec<&str>> = HashMap::new();
    for r in runs {
        let key = (r.namespace.as_str(), r.workflow.as_str());
        if known.contains_key(&key) || ask.get(key.0).is_some_and(|w| w.contains(&key.1)) {
            continue;
        }
        match cache.get(key.0, key.1) {
            Some(v) if r.version.is_empty() || v.contains(&r.version) => {
                known.insert(key, v);
            }
            _ => ask.entry(key.0).or_default().push(key.1),
        }
    }
    if !ask.is_empty() {
        let stmt = tx.prepare_cached(sql!("versions_of")).await?;
        for (ns, workflows) in &ask {
            let mut found: HashMap<String, Vec<String>> = HashMap::new();
            for row in tx.query(&stmt, &[ns, workflows]).await? {
                found.entry(row.get("workflow")).or_default().push(row.get("version"));
            }
            for w in workflows {
                let versions = found.remove(*w).unwrap_or_default();
                cache.put(ns, w, versions.clone());
                known.insert((ns, w), versions);
            }
        }
    }
    let mut pinned = Vec::with_capacity(runs.len());
    for (i, r) in runs.iter().enumerate() {
        let versions = known
            .get(&(r.namespace.as_str(), r.workflow.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        if r.version.is_empty() {
            pinned.push(versions.first().cloned().unwrap_or_default());
        } else if versions.contains(&r.version) {
            pinned.push(r.version.clone());
        } else {
            let known = match versions {
                [] => "it has no registered version".to_owned(),
                v => format!("registered: {}", v.join(", ")),
            };
            refused.insert(
                i,
                Error::NotFound(format!(
                    "version {:?} of workflow {:?} is not registered: no worker has served it ({known})",
                    r.version, r.workflow
                )),
            );
            pinned.push(String::new());
        }
    }
    Ok(pinned)
}

/// What [`lock_parents`] answers: the refusal of each run (by position) whose parent is missing
/// or cannot take children, and each parent's current attempt.
type Parents = (HashMap<usize, Error>, HashMap<(String, Uuid), i32>);

/// Locks the parents of the runs that have one (see `sql/runs_parents_lock.sql`).
async fn lock_parents(tx: &Transaction<'_>, runs: &[NewRun]) -> Result<Parents> {
    let mut refused = HashMap::new();
    let mut wanted: Vec<(&str, Uuid)> = runs
        .iter()
        .filter_map(|r| r.parent.map(|p| (r.namespace.as_str(), p)))
        .collect();
    if wanted.is_empty() {
        return Ok((refused, HashMap::new()));
    }
    wanted.sort_unstable();
    wanted.dedup();
    let (pns, pids): (Vec<&str>, Vec<Uuid>) = wanted.into_iter().unzip();
    let rows = tx
        .query(&tx.prepare_cached(sql!("runs_parents_lock")).await?, &[&pns, &pids])
        .await?;
    let mut open = HashMap::new();
    let mut state = HashMap::new();
    for row in &rows {
        wake_if_queued(tx, row).await?;
        let key: (String, Uuid) = (row.get("namespace"), row.get("id"));
        let status: String = row.get("status");
        let cancelling: bool = row.get("cancel_requested");
        open.insert(key.clone(), row.get::<_, i32>("attempt"));
        state.insert(key, (status, cancelling));
    }
    for (i, r) in runs.iter().enumerate() {
        let Some(p) = r.parent else { continue };
        match state.get(&(r.namespace.clone(), p)) {
            None => {
                refused.insert(i, Error::NotFound(format!("parent run {p} not found")));
            }
            Some((status, _)) if matches!(status.as_str(), "completed" | "failed" | "cancelled") => {
                refused.insert(
                    i,
                    Error::FailedPrecondition(format!(
                        "parent run {p} is {status}; a run that has ended cannot start children"
                    )),
                );
            }
            Some((_, true)) => {
                refused.insert(
                    i,
                    Error::FailedPrecondition(format!("parent run {p} is being cancelled; it cannot start children")),
                );
            }
            Some(_) => {}
        }
    }
    Ok((refused, open))
}

/// A locked run's (open lease's token, attempt, lease owner).
type LeaseRow = (Option<Uuid>, i32, Option<Uuid>);

/// A `CompleteRun` report of a batch.
struct Completion<'a> {
    report: usize,
    namespace: &'a str,
    id: Uuid,
    token: Uuid,
    output: &'a Json,
    tasks: &'a [NewTask],
}

/// Task results to record in one statement (`sql/tasks_record.sql`), as its column arrays.
#[derive(Default)]
struct TaskRows<'a> {
    ns: Vec<&'a str>,
    ids: Vec<Uuid>,
    keys: Vec<&'a str>,
    names: Vec<&'a str>,
    seqs: Vec<i32>,
    outputs: Vec<Option<&'a Json>>,
    errors: Vec<Option<&'a Json>>,
    attempts: Vec<i32>,
    owners: Vec<Option<Uuid>>,
}

impl<'a> TaskRows<'a> {
    /// Adds the result of `task` of run `id`, recorded under `attempt` by worker `owner`.
    fn push(&mut self, ns: &'a str, id: Uuid, task: &'a NewTask, attempt: i32, owner: Option<Uuid>) {
        self.ns.push(ns);
        self.ids.push(id);
        self.keys.push(&task.key);
        self.names.push(&task.name);
        self.seqs.push(task.seq as i32);
        self.outputs.push(task.output.as_ref());
        self.errors.push(task.error.as_ref());
        self.attempts.push(attempt);
        self.owners.push(owner);
    }

    /// Inserts the rows (a task already recorded is kept): answers the (run, key, namespace)
    /// of each one recorded now.
    async fn insert(&self, tx: &Transaction<'_>) -> Result<Vec<(Uuid, String, String)>> {
        let stmt = tx.prepare_cached(sql!("tasks_record")).await?;
        let rows = tx
            .query(
                &stmt,
                &[
                    &self.ns,
                    &self.ids,
                    &self.keys,
                    &self.names,
                    &self.seqs,
                    &self.outputs,
                    &self.errors,
                    &self.attempts,
                    &self.owners,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("run_id"), r.get("task_key"), r.get("namespace")))
            .collect())
    }
}

/// The body of [`Store::apply_reports`]: set-based statements first (their answers tell which
/// reports applied), then every other report one by one, then one NOTIFY per queue woken.
async fn apply_in(tx: &Transaction<'_>, reports: &[Report]) -> Result<Vec<Result<Applied>>> {
    let mut out: Vec<Option<Result<Applied>>> = reports.iter().map(|_| None).collect();

    // Task results: the first report of each (run, key); later ones are answered one by one.
    let mut seen = std::collections::HashSet::new();
    let records: Vec<usize> = reports
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Report::Record {
                namespace, id, task, ..
            } if seen.insert((namespace.as_str(), *id, task.key.as_str())) => Some(i),
            _ => None,
        })
        .collect();
    if !records.is_empty() {
        // Lock the runs and read their leases first; then insert the results of those whose
        // lease holds, with nothing left for the planner to join.
        let mut runs: Vec<(&str, Uuid)> = records
            .iter()
            .filter_map(|&i| match &reports[i] {
                Report::Record { namespace, id, .. } => Some((namespace.as_str(), *id)),
                _ => None,
            })
            .collect();
        runs.sort_unstable();
        runs.dedup();
        let (ns, ids): (Vec<&str>, Vec<Uuid>) = runs.into_iter().unzip();
        let stmt = tx.prepare_cached(sql!("runs_lock")).await?;
        // Sorted by run, looked up without building an owned key per report.
        let mut leases: Vec<(String, Uuid, LeaseRow)> = tx
            .query(&stmt, &[&ns, &ids])
            .await?
            .iter()
            .map(|r| {
                (
                    r.get("namespace"),
                    r.get("id"),
                    (
                        r.get::<_, Option<Uuid>>("lease_token")
                            .filter(|_| r.get::<_, bool>("open")),
                        r.get("attempt"),
                        r.get("lease_owner"),
                    ),
                )
            })
            .collect();
        leases.sort_unstable_by(|a, b| (a.0.as_str(), a.1).cmp(&(b.0.as_str(), b.1)));
        let mut live = Vec::new();
        let mut rows = TaskRows::default();
        for &i in &records {
            let Report::Record {
                namespace,
                id,
                token,
                task,
            } = &reports[i]
            else {
                continue;
            };
            let Ok(at) = leases.binary_search_by(|(n, i, _)| (n.as_str(), *i).cmp(&(namespace.as_str(), *id))) else {
                continue;
            };
            let (Some(current), attempt, owner) = &leases[at].2 else {
                continue;
            };
            if current != token {
                continue;
            }
            live.push(i);
            rows.push(namespace, *id, task, *attempt, *owner);
        }
        if !live.is_empty() {
            let mut recorded = rows.insert(tx).await?;
            recorded.sort_unstable();
            for i in live {
                if let Report::Record {
                    namespace, id, task, ..
                } = &reports[i]
                    && recorded
                        .binary_search_by(|(r, k, n)| {
                            (*r, k.as_str(), n.as_str()).cmp(&(*id, task.key.as_str(), namespace.as_str()))
                        })
                        .is_ok()
                {
                    out[i] = Some(Ok(Applied::Recorded(None)));
                }
            }
        }
    }

    // Completions, in run order so that concurrent batches lock rows in one order; the task
    // results they carry go on the completed rows (see `sql/runs_complete.sql`).
    let mut completes: Vec<Completion<'_>> = reports
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Report::Complete {
                namespace,
                id,
                token,
                output,
                tasks,
            } => Some(Completion {
                report: i,
                namespace,
                id: *id,
                token: *token,
                output,
                tasks,
            }),
            _ => None,
        })
        .collect();
    if !completes.is_empty() {
        completes.sort_unstable_by(|a, b| (a.namespace, a.id).cmp(&(b.namespace, b.id)));
        let ns: Vec<&str> = completes.iter().map(|c| c.namespace).collect();
        let ids: Vec<Uuid> = completes.iter().map(|c| c.id).collect();
        let tokens: Vec<Uuid> = completes.iter().map(|c| c.token).collect();
        let outputs: Vec<&Json> = completes.iter().map(|c| c.output).collect();
        // The results each completion carries, as its row keeps them; none is NULL.
        let tasks: Vec<Option<PgJson<&[NewTask]>>> = completes
            .iter()
            .map(|c| (!c.tasks.is_empty()).then_some(PgJson(c.tasks)))
            .collect();
        // A completion carries at most 1,000 results (checked when it came in).
        let counts: Vec<i32> = completes.iter().map(|c| c.tasks.len() as i32).collect();
        let stmt = tx.prepare_cached(sql!("runs_complete")).await?;
        for row in tx
            .query(&stmt, &[&ns, &ids, &tokens, &outputs, &tasks, &counts])
            .await?
        {
            let ord: i64 = row.get("ord");
            out[completes[ord as usize - 1].report] = Some(Ok(Applied::Completed(true)));
        }
    }

    // Everything else, one by one, in the order received.
    let mut notify: Vec<String> = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        let answer = match r {
            Report::Record {
                namespace,
                id,
                token,
                task,
            } => record_one(tx, namespace, *id, *token, task)
                .await
                .map(Applied::Recorded),
            Report::Complete {
                namespace, id, token, ..
            } => refusal(tx, namespace, *id, *token, Some("complete"))
                .await
                .map(|()| Applied::Completed(false)),
            Report::End {
                namespace,
                id,
                token,
                end,
            } => {
                let ended = end_one(tx, namespace, *id, *token, end).await;
                if let Ok(Some((run, delay))) = &ended
                    && run.status == RunStatus::Queued as i32
                {
                    notify.push(crate::wake::ready_payload(namespace, &run.queue, *delay));
                }
                ended.map(|e| Applied::Ended(e.map(|(run, delay)| (Box::new(run), delay))))
            }
        };
        match answer {
            // Refusals are answers; any other error comes from a statement that failed and
            // aborted the transaction: the whole batch fails.
            Err(e) if !matches!(e, Error::NotFound(_) | Error::FailedPrecondition(_)) => return Err(e),
            answer => out[i] = Some(answer),
        }
    }
    notify_ready(tx, notify).await?;
    Ok(out
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Error::Internal("report left unanswered".into()))))
        .collect())
}

/// Records one task result (see `sql/task_record.sql`): `None` when this call recorded it, or
/// the result an earlier call recorded.
async fn record_one(
    tx: &Transaction<'_>,
    namespace: &str,
    id: Uuid,
    token: Uuid,
    task: &NewTask,
) -> Result<Option<TaskResult>> {
    let stmt = tx.prepare_cached(sql!("task_record")).await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &namespace,
                &id,
                &token,
                &task.key,
                &task.name,
                &(task.seq as i32),
                &task.output,
                &task.error,
            ],
        )
        .await?;
    let lease_ok: bool = row.get("lease_ok");
    let recorded: bool = row.get("recorded");
    if !lease_ok {
        refusal(tx, namespace, id, token, None).await?;
    }
    if recorded {
        return Ok(None);
    }
    // Recorded before: the earlier result is the one that counts.
    let stmt = tx.prepare_cached(sql!("task_get")).await?;
    let row = tx
        .query_opt(&stmt, &[&namespace, &id, &task.key])
        .await?
        .ok_or_else(|| Error::Unavailable("task record vanished; retry".into()))?;
    Ok(Some(task_from_row(&row)?))
}

/// Ends the lease `token` of a running run by failure or release, deciding retry, failure or
/// cancellation. Returns the updated run and, if it is queued again, how long until it is
/// visible; or `None` for a duplicate report. The caller sends the NOTIFY.
async fn end_one(
    tx: &Transaction<'_>,
    namespace: &str,
    id: Uuid,
    token: Uuid,
    end: &LeaseEnd,
) -> Result<Option<(Run, Duration)>> {
    let kind = match end {
        LeaseEnd::Fail { .. } => "fail",
        LeaseEnd::Timeout { .. } => "timeout",
        LeaseEnd::Release { .. } => "release",
        LeaseEnd::Suspend { .. } => "suspend",
    };
    let locked = tx
        .query_opt(
            &tx.prepare_cached(sql!("run_lock_lease")).await?,
            &[&namespace, &id, &token],
        )
        .await?;
    let Some(row) = locked else {
        return refusal(tx, namespace, id, token, Some(kind)).await.map(|()| None);
    };
    let attempt: i32 = row.get("attempt");
    let owner: Option<Uuid> = row.get("lease_owner");
    let cancel_requested: bool = row.get("cancel_requested");
    let pause_requested: bool = row.get("pause_requested");
    let policy = retry_from_row(&row)?;
    // A wait for a child: the child must be this run's. Checked before anything is written.
    let child = match end {
        LeaseEnd::Suspend {
            wait: Wait::Child(child),
            ..
        } => {
            let row = tx
                .query_opt(&tx.prepare_cached(sql!("run_get")).await?, &[&namespace, child])
                .await?
                .ok_or_else(|| Error::NotFound(format!("child run {child} not found")))?;
            if row.get::<_, Option<Uuid>>("parent_id") != Some(id) {
                return Err(Error::FailedPrecondition(format!(
                    "run {child} is not a child of run {id}; a run can only wait for its own children"
                )));
            }
            Some(row)
        }
        _ => None,
    };
    let reason = if cancel_requested {
        tx.query_opt(&tx.prepare_cached(sql!("cancel_reason")).await?, &[&namespace, &id])
            .await?
            .and_then(|r| r.get::<_, Option<String>>(0))
            .filter(|r| !r.is_empty())
    } else {
        None
    };
    let (next, error, next_attempt, delay, event, details) = match end {
        _ if cancel_requested => {
            let message = reason.unwrap_or_else(|| "cancelled at the request of a client".to_owned());
            let error = json!({"type": "Cancelled", "message": message});
            (
                "cancelled",
                Some(error.clone()),
                attempt,
                Duration::ZERO,
                "run_cancelled",
                error,
            )
        }
        LeaseEnd::Fail { .. } | LeaseEnd::Timeout { .. } => {
            let (error, non_retryable, retry_after) = match end {
                LeaseEnd::Fail {
                    error,
                    non_retryable,
                    retry_after,
                } => (error, *non_retryable, *retry_after),
                LeaseEnd::Timeout { error } => (error, false, None),
                _ => return Err(Error::Internal("not a failure".into())),
            };
            let etype = error.get("type").and_then(Json::as_str).unwrap_or("");
            let give_up = non_retryable
                || attempt as u32 >= policy.max_attempts
                || policy.non_retryable_error_types.iter().any(|t| t == etype);
            if give_up {
                (
                    "failed",
                    Some(error.clone()),
                    attempt,
                    Duration::ZERO,
                    "run_failed",
                    error.clone(),
                )
            } else {
                let delay = retry_after.unwrap_or_else(|| policy.backoff(attempt as u32, rand::random()));
                let details = json!({"error": error, "retry_in_ms": ms(delay)});
                (
                    "queued",
                    Some(error.clone()),
                    attempt + 1,
                    delay,
                    "run_retry_scheduled",
                    details,
                )
            }
        }
        LeaseEnd::Release { reason, delay } => {
            let previous: Option<Json> = row.get("error");
            (
                "queued",
                previous,
                attempt,
                *delay,
                "lease_released",
                json!({"reason": reason, "delay_ms": ms(*delay)}),
            )
        }
        LeaseEnd::Suspend { key, name, wait, .. } => {
            let previous: Option<Json> = row.get("error");
            let mut details = json!({"key": key, "step": name});
            match wait {
                Wait::Sleep(d) => details["sleep_ms"] = json!(ms(*d)),
                Wait::Event { name, timeout } => {
                    details["event"] = json!(name);
                    details["timeout_ms"] = json!(timeout.map(ms));
                }
                Wait::Child(child) => details["child"] = json!(child),
            }
            (
                "suspended",
                previous,
                attempt,
                wait.deadline().unwrap_or_default(),
                "run_suspended",
                details,
            )
        }
    };
    // A run that would be queued again is paused instead if that was asked.
    let next = if next == "queued" && pause_requested {
        "paused"
    } else {
        next
    };
    let updated = tx
        .query_one(
            &tx.prepare_cached(sql!("run_end_lease")).await?,
            &[&namespace, &id, &next, &error, &kind, &next_attempt, &ms(delay)],
        )
        .await?;
    let insert = tx.prepare_cached(sql!("event_insert")).await?;
    tx.execute(&insert, &[&namespace, &id, &event, &attempt, &owner, &details])
        .await?;
    if next == "paused" {
        tx.execute(
            &insert,
            &[&namespace, &id, &"run_paused", &attempt, &owner, &None::<Json>],
        )
        .await?;
    }
    if let (LeaseEnd::Suspend { key, name, seq, wait }, "suspended") = (end, next) {
        let (event, child_id) = match wait {
            Wait::Sleep(_) => (None, None),
            Wait::Event { name, .. } => (Some(name.as_str()), None),
            Wait::Child(c) => (None, Some(*c)),
        };
        let updated = tx
            .query_one(
                &tx.prepare_cached(sql!("run_suspend")).await?,
                &[
                    &namespace,
                    &id,
                    &wait.deadline().map(ms),
                    key,
                    name,
                    &(*seq as i32),
                    &event,
                    &child_id,
                ],
            )
            .await?;
        // What the run waits for may be here already: a buffered event, a child that ended.
        let ready = match (event, &child) {
            (Some(event), _) => take_event(tx, namespace, id, event, key).await?,
            (None, Some(child)) => child_outcome(child),
            _ => None,
        };
        if let Some((output, details)) = ready {
            let woke = end_wait(tx, namespace, id, &output, &details).await?;
            return Ok(Some((run_from_row(&woke)?, Duration::ZERO)));
        }
        return Ok(Some((run_from_row(&updated)?, wait.deadline().unwrap_or_default())));
    }
    Ok(Some((run_from_row(&updated)?, delay)))
}

/// Cancels run `id` and then its descendants, level by level (see [`Store::cancel_run`]).
async fn cancel_tree(tx: &Transaction<'_>, namespace: &str, id: Uuid, reason: &str) -> Result<Run> {
    let root = cancel_in(tx, namespace, id, reason).await?;
    let why = format!("its parent run {id} was cancelled");
    let stmt = tx.prepare_cached(sql!("runs_children")).await?;
    let mut level = vec![id];
    while !level.is_empty() {
        let children: Vec<Uuid> = tx
            .query(&stmt, &[&namespace, &level])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for &child in &children {
            match cancel_in(tx, namespace, child, &why).await {
                // Ended already: nothing to cancel.
                Ok(_) | Err(Error::FailedPrecondition(_)) => {}
                Err(e) => return Err(e),
            }
        }
        level = children;
    }
    run_from_row(&root)
}

/// Cancels one run: at once if queued, suspended or paused, by request if running.
async fn cancel_in(tx: &Transaction<'_>, namespace: &str, id: Uuid, reason: &str) -> Result<tokio_postgres::Row> {
    let row = lock_run(tx, namespace, id).await?;
    let status: String = row.get("status");
    let requested: bool = row.get("cancel_requested");
    let now = match status.as_str() {
        "queued" | "suspended" | "paused" => true,
        "running" if !requested => false,
        "running" | "cancelled" => return Ok(row),
        done => {
            return Err(Error::FailedPrecondition(format!(
                "run {id} already {done}; only a queued, suspended, paused or running run can be cancelled"
            )));
        }
    };
    let error = json!({"type": "Cancelled", "message": if reason.is_empty() { "cancelled" } else { reason }});
    let row = tx
        .query_one(
            &tx.prepare_cached(sql!("run_cancel")).await?,
            &[&namespace, &id, &now, &error],
        )
        .await?;
    let kind = if now { "run_cancelled" } else { "cancel_requested" };
    let attempt: i32 = row.get("attempt");
    let details = json!({"reason": reason});
    tx.execute(
        &tx.prepare_cached(sql!("event_insert")).await?,
        &[&namespace, &id, &kind, &attempt, &None::<Uuid>, &details],
    )
    .await?;
    Ok(row)
}

/// Hands the oldest pending event `event` of a run to its wait step `key`: the step's recorded
/// output and the `run_woken` details, if one was pending.
async fn take_event(
    tx: &Transaction<'_>,
    namespace: &str,
    id: Uuid,
    event: &str,
    key: &str,
) -> Result<Option<(Json, Json)>> {
    let row = tx
        .query_opt(
            &tx.prepare_cached(sql!("inbox_take")).await?,
            &[&namespace, &id, &event, &key],
        )
        .await?;
    Ok(row.map(|r| {
        let seq: i64 = r.get("seq");
        let payload: Json = r.get("payload");
        (
            json!({"event": payload, "seq": seq}),
            json!({"event": event, "seq": seq}),
        )
    }))
}

/// A child run's outcome as its parent's wait step records it, if the child has ended.
fn child_outcome(child: &tokio_postgres::Row) -> Option<(Json, Json)> {
    let status: String = child.get("status");
    if !matches!(status.as_str(), "completed" | "failed" | "cancelled") {
        return None;
    }
    let id: Uuid = child.get("id");
    let output: Option<Json> = child.get("output");
    let error: Option<Json> = child.get("error");
    Some((
        json!({"child": id, "status": status, "output": output, "error": error}),
        json!({"child": id, "status": status}),
    ))
}

/// Ends the wait of suspended run `id` (see `sql/run_wake.sql`): its step is recorded with
/// `output`, and it is queued again. Answers the run's row.
async fn end_wait(
    tx: &Transaction<'_>,
    namespace: &str,
    id: Uuid,
    output: &Json,
    details: &Json,
) -> Result<tokio_postgres::Row> {
    let row = tx
        .query_opt(
            &tx.prepare_cached(sql!("run_wake")).await?,
            &[&namespace, &id, output, details],
        )
        .await?
        .ok_or_else(|| Error::Internal(format!("run {id} was not suspended")))?;
    let status: String = row.get("status");
    if status == "queued" {
        let queue: String = row.get("queue");
        notify_ready(tx, vec![crate::wake::ready_payload(namespace, &queue, Duration::ZERO)]).await?;
    }
    Ok(row)
}

/// Called when a report under `token` did not apply: `Ok(())` if it duplicates the report
/// (`kind`) that already ended this lease, else the error that explains the refusal.
async fn refusal(
    client: &impl GenericClient,
    namespace: &str,
    id: Uuid,
    token: Uuid,
    kind: Option<&str>,
) -> Result<()> {
    let stmt = client.prepare_cached(sql!("run_get")).await?;
    let row = client
        .query_opt(&stmt, &[&namespace, &id])
        .await?
        .ok_or_else(|| not_found(id))?;
    let status: String = row.get("status");
    let row_token: Option<Uuid> = row.get("lease_token");
    let lease_end: Option<String> = row.get("lease_end");
    if row_token == Some(token) && kind.is_some() && lease_end.as_deref() == kind {
        return Ok(());
    }
    if row_token == Some(token) {
        let how = match lease_end.as_deref() {
            Some("expire") => "expired",
            Some("complete") => "ended with CompleteRun",
            Some("fail") => "ended with FailRun",
            Some("release") => "ended with ReleaseRun",
            _ => "ended",
        };
        return Err(Error::FailedPrecondition(format!(
            "the lease on run {id} has {how}; the run is {status} and this report was not applied"
        )));
    }
    Err(Error::FailedPrecondition(format!(
        "lease token {token} is not the current lease of run {id} (the run is {status}); \
         another worker holds or held it, and this report was not applied"
    )))
}

/// Called when a statement locked a run's row without moving the run: if it is queued, claims
/// that ran meanwhile skipped it (`SKIP LOCKED`), so its queue's pollers are woken when `tx`
/// commits, to look again.
async fn wake_if_queued(tx: &Transaction<'_>, row: &tokio_postgres::Row) -> Result<()> {
    if row.get::<_, String>("status") == "queued" {
        let (namespace, queue): (String, String) = (row.get("namespace"), row.get("queue"));
        notify_ready(tx, vec![crate::wake::ready_payload(&namespace, &queue, Duration::ZERO)]).await?;
    }
    Ok(())
}

/// Wakes the pollers of the queues named by `payloads` (see `wake::ready_payload`) when `tx`
/// commits (at once outside a transaction): one NOTIFY per distinct payload.
async fn notify_ready(tx: &impl GenericClient, payloads: Vec<String>) -> Result<()> {
    let mut sent: Vec<String> = Vec::new();
    for payload in payloads {
        if !sent.contains(&payload) {
            tx.execute(&tx.prepare_cached(sql!("notify_ready")).await?, &[&payload])
                .await?;
            sent.push(payload);
        }
    }
    Ok(())
}

/// The runs a statement moved (the reaper's expiry, the wake-up of sleepers), from its rows
/// of (namespace, id, queue, status); wakes the pollers of the queues that got runs back.
async fn moved_runs(tx: &Transaction<'_>, rows: &[tokio_postgres::Row]) -> Result<Vec<MovedRun>> {
    let moved: Vec<MovedRun> = rows
        .iter()
        .map(|r| MovedRun {
            namespace: r.get(0),
            id: r.get(1),
            queue: r.get(2),
            status: r.get(3),
        })
        .collect();
    let payloads = moved
        .iter()
        .filter(|m| m.status == "queued")
        .map(|m| crate::wake::ready_payload(&m.namespace, &m.queue, Duration::ZERO))
        .collect();
    notify_ready(tx, payloads).await?;
    Ok(moved)
}

/// Locks run (`namespace`, `id`) until `tx` ends and reads it.
async fn lock_run(tx: &Transaction<'_>, namespace: &str, id: Uuid) -> Result<tokio_postgres::Row> {
    tx.query_opt(
        &tx.prepare_cached(sql!("run_get_for_update")).await?,
        &[&namespace, &id],
    )
    .await?
    .ok_or_else(|| not_found(id))
}

fn not_found(id: Uuid) -> Error {
    Error::NotFound(format!("run {id} not found"))
}

/// What a timeout of `kind` did, for the run's error.
fn timeout_message(kind: &str) -> &'static str {
    match kind {
        "execution" => "the run did not end within its execution timeout",
        "schedule_to_start" => "the run waited in its queue longer than its schedule-to-start timeout",
        "attempt" => "the attempt did not end within its attempt timeout",
        _ => "the worker did not heartbeat within the run's heartbeat timeout",
    }
}

/// A run's status as stored ("queued", ...).
fn status_of_run(run: &Run) -> &'static str {
    RunStatus::try_from(run.status)
        .unwrap_or(RunStatus::Unspecified)
        .as_str()
}

/// The run's status as the enum.
pub fn status_of(s: &str) -> RunStatus {
    RunStatus::parse(s).unwrap_or(RunStatus::Unspecified)
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
