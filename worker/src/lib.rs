//! Aiki's worker runtime: what a process that executes workflows links (the `aiki` crate is
//! the client, for applications that start runs and read their results).
//!
//! - The workflow API: a workflow is an async function of a [`Context`] and its input that
//!   returns its output or a [`WorkflowError`]. [`Context::task`] checkpoints each step so
//!   that a re-executed run never repeats a completed one ([`Context::task_with`] retries a
//!   task by its own [`TaskOptions`]); [`Context::sleep`], [`Context::wait_event`] and
//!   [`ChildRun::result`] (of a child started by [`Context::start_child`]) wait durably,
//!   giving the worker back ([`Suspension`], [`WaitFor`]).
//! - The runtime: [`WorkerBuilder`] registers workflow functions and builds a [`Worker`];
//!   [`Worker::run`] serves them until shut down.
//!
//! A [`Worker`] registers with the server, long-polls its queues for runs while it has free
//! slots, executes each leased run's workflow function with a [`Context`], heartbeats
//! every lease it holds in one call, and reports the outcome under the lease token (batched:
//! the reports of all its executions travel many per `Report` call).
//!
//! - A run whose lease is lost (the heartbeat says so, a report is refused, or heartbeats have
//!   failed for longer than the lease lasts) is stopped at once and never reported. A run whose
//!   workflow has returned is past stopping: its final report is sent, and its answer decides
//!   ([`Worker::completed`], [`Worker::lost`]).
//! - A run whose cancellation is requested is stopped and released; the server ends it.
//! - When the server is away, polls, heartbeats and reports retry with backoff; a worker the
//!   server no longer knows registers again.
//! - On shutdown the worker stops polling, lets running runs finish for a grace period, then
//!   stops and releases the rest so another worker can take them at once.
//!
//! [`command`] holds the workflows of the `aiki-worker` binary: commands fed JSON on stdin.

pub mod command;
mod reporter;
mod workflow;

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aiki::AuthChannel;
use aiki_proto::v1::{
    self, CompleteRunRequest, FailRunRequest, HeartbeatRequest, LeasedRun, PollTasksRequest, RegisterWorkerRequest,
    ReleaseRunRequest, WorkflowRef, worker_service_client::WorkerServiceClient,
};
use backon::{ExponentialBuilder, Retryable};
use futures::FutureExt;
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

pub use crate::workflow::{ChildRun, Context, Suspension, TaskOptions, WaitFor, WorkflowError};
use crate::{reporter::Reporter, workflow::Lease};

/// The maps an execution looks up (workflows, leases, counts): keyed by names and run ids that
/// come from this worker's own code and its server, so a fast hash needs no defence against
/// chosen keys (SipHash was about 1,000 instructions of each run's execution).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The most runs the server leases in one poll.
const MAX_POLL_BATCH: u32 = 1000;
/// Polls a worker keeps on their way. With two, the claim of the next batch overlaps the answer
/// to the last one: in a drain, a claim of 1,000 runs took 32 ms of a 43 ms poll cycle, so with
/// one poll at a time the claims were what bounded the drain.
const POLLS_IN_FLIGHT: usize = 2;

/// A poll's answer and the slots it asked runs for (those left over go back when dropped).
struct Polled {
    runs: Vec<LeasedRun>,
    permits: OwnedSemaphorePermit,
    polled_at: Instant,
}

/// Slots for the next poll: with no poll on its way, as soon as one is free, and as many more
/// as are free then (up to `batch`); beside one on its way, a whole batch, so that the second
/// poll does not go out for a handful of runs each time one ends. `None`: the worker is closing.
async fn free_slots(slots: &Arc<Semaphore>, batch: u32, alone: bool) -> Option<OwnedSemaphorePermit> {
    if !alone {
        return slots.clone().acquire_many_owned(batch).await.ok();
    }
    let mut permits = slots.clone().acquire_owned().await.ok()?;
    let more = (slots.available_permits() as u32).min(batch - 1);
    if more > 0
        && let Ok(p) = slots.clone().try_acquire_many_owned(more)
    {
        permits.merge(p);
    }
    Some(permits)
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler =
    Arc<dyn Fn(Context, serde_json::Value) -> BoxFuture<Result<serde_json::Value, WorkflowError>> + Send + Sync>;

/// Builds a [`Worker`].
pub struct WorkerBuilder {
    server: String,
    namespace: String,
    identity: String,
    queues: Vec<String>,
    slots: usize,
    poll_batch: u32,
    poll_wait: Duration,
    shutdown_grace: Duration,
    workflows: FastMap<String, Handler>,
    version: String,
    tls: aiki::TlsOptions,
    api_key: aiki::ApiKey,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("server", &self.server)
            .field("queues", &self.queues)
            .field("slots", &self.slots)
            .field("workflows", &self.workflows.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl WorkerBuilder {
    /// A worker of server `server` (e.g. `http://127.0.0.1:7070`), on queue "default", with 4
    /// slots.
    pub fn new(server: impl Into<String>) -> Self {
        let host = hostname();
        Self {
            server: server.into(),
            namespace: "default".into(),
            identity: format!("{host}:{}", std::process::id()),
            queues: Vec::new(),
            slots: 4,
            poll_batch: 0,
            poll_wait: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            workflows: FastMap::default(),
            version: String::new(),
            tls: aiki::TlsOptions::default(),
            api_key: aiki::ApiKey::default(),
        }
    }

    /// The namespace to work in (default "default").
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    /// A name for people (default host:pid).
    pub fn identity(mut self, id: impl Into<String>) -> Self {
        self.identity = id.into();
        self
    }

    /// Adds a queue to serve (default: only "default").
    pub fn queue(mut self, q: impl Into<String>) -> Self {
        self.queues.push(q.into());
        self
    }

    /// How many runs may execute at once (default 4).
    pub fn slots(mut self, n: usize) -> Self {
        self.slots = n.max(1);
        self
    }

    /// Most runs leased by one poll (default: all free slots).
    pub fn poll_batch(mut self, n: u32) -> Self {
        self.poll_batch = n;
        self
    }

    /// How long one poll waits for work (capped by the server).
    pub fn poll_wait(mut self, d: Duration) -> Self {
        self.poll_wait = d;
        self
    }

    /// The version of the workflow code this worker runs (default: none). Every workflow it
    /// registers is registered with it: the worker leases runs pinned to this version, and
    /// unpinned ones. Runs started without a version are pinned to the newest version
    /// registered, so a new version rolls out while runs of the old one finish on old workers.
    pub fn version(mut self, v: impl Into<String>) -> Self {
        self.version = v.into();
        self
    }

    /// How long shutdown lets running runs finish before releasing them (default 30 s).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = d;
        self
    }

    /// Registers workflow `name`: `f(ctx, input)` returns the run's output.
    pub fn register<I, O, F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(Context, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let handler: Handler = Arc::new(move |ctx, input| {
            let f = f.clone();
            Box::pin(async move {
                let input: I = serde_json::from_value(input).map_err(|e| {
                    WorkflowError::new(
                        "InvalidInput",
                        format!("the run's input does not fit the workflow: {e}"),
                    )
                    .non_retryable()
                })?;
                let out = f(ctx, input).await?;
                serde_json::to_value(out)
                    .map_err(|e| WorkflowError::new("Serialization", format!("workflow output: {e}")).non_retryable())
            })
        });
        self.workflows.insert(name.into(), handler);
        self
    }

    /// TLS settings for an `https://` server: the CA to trust instead of the system's roots,
    /// and a client certificate for servers that require one.
    pub fn tls(mut self, tls: aiki::TlsOptions) -> Self {
        self.tls = tls;
        self
    }

    /// The API key to send with every request (a key of the `worker` role, as `aiki keys
    /// create --role worker` printed it), for servers that require keys. The workers it
    /// registers are bound to it: no other key may act as them.
    pub fn api_key(mut self, key: &str) -> Result<Self, aiki::Error> {
        self.api_key = aiki::ApiKey::new(key)?;
        Ok(self)
    }

    /// Connects and builds the worker. A server that is away is waited for, as long as it
    /// takes (a line is logged at each try); a refused certificate or a bad address is an error.
    pub async fn build(mut self) -> Result<Worker, aiki::Error> {
        if self.queues.is_empty() {
            self.queues.push("default".into());
        }
        // A server that is away (not started yet, restarting) is waited for, with backoff and a
        // line saying so; a certificate refused (`TLS: …`) or a bad address is an error at once.
        let channel = (|| async { aiki::connect_channel_with(self.server.clone(), &self.tls).await })
            .retry(backoff())
            .when(|e| matches!(e, aiki::Error::Unavailable(m) if !m.starts_with("TLS: ")))
            .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "waiting for the server"))
            .await?;
        let runs = Arc::new(aiki::Client::from_channel(channel.clone()).with_api_key_of(&self.api_key));
        let client = WorkerServiceClient::with_interceptor(channel, self.api_key.clone())
            .max_decoding_message_size(256 * 1024 * 1024);
        Ok(Worker {
            inner: Arc::new(Inner {
                completed: self.workflows.keys().map(|w| (w.clone(), AtomicU64::new(0))).collect(),
                runs,
                client: client.clone(),
                reporter: Reporter::new(client),
                cfg: self,
                worker_id: Mutex::new(String::new()),
                registering: tokio::sync::Mutex::new(()),
                leases: Mutex::new(FastMap::default()),
                settings: Mutex::new(Settings::default()),
                lost: AtomicU64::new(0),
            }),
        })
    }
}

#[derive(Debug, Clone)]
struct Settings {
    lease_ttl: Duration,
    heartbeat_interval: Duration,
    max_poll_wait: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            max_poll_wait: Duration::from_secs(30),
        }
    }
}

/// Where an execution is: still running its workflow, stopped (its lease lost, or the run to be
/// released), or reporting how it ended. The first move away from `RUNNING` wins, so a run is
/// either stopped or reported, never both: a heartbeat that says a lease is lost cannot undo a
/// report already on its way, whose answer settles the run.
mod phase {
    pub const RUNNING: u8 = 0;
    /// The lease was lost: stop and report nothing.
    pub const LOST: u8 = 1;
    /// The run's cancellation or pause was requested: stop and release it.
    pub const CANCELLED: u8 = 2;
    /// The workflow returned: its final report is (about to be) on its way.
    pub const REPORTING: u8 = 3;
}

struct Held {
    token: String,
    /// When the poll that leased the run was sent.
    leased_at: Instant,
    /// Stops the execution: cancelled when the lease is lost or the run is to be cancelled.
    stop: CancellationToken,
    /// The execution's [`phase`].
    phase: Arc<AtomicU8>,
    /// Closed when the execution has ended, whatever way: its sender is dropped with it (a
    /// oneshot costs an execution less than a cancellation token and its drop guard).
    finished: tokio::sync::oneshot::Receiver<()>,
}

struct Inner {
    cfg: WorkerBuilder,
    client: WorkerServiceClient<AuthChannel>,
    /// Starts child runs for workflow code (`Context::start_child`).
    runs: Arc<aiki::Client>,
    /// Sends task results, completions, failures and releases, many per call.
    reporter: Reporter,
    worker_id: Mutex<String>,
    /// Held while registering again (see [`Inner::register_again`]).
    registering: tokio::sync::Mutex<()>,
    leases: Mutex<FastMap<String, Held>>,
    settings: Mutex<Settings>,
    /// Runs completed, by workflow (the registered ones, fixed at build).
    completed: FastMap<String, AtomicU64>,
    /// Executions that ended because their lease was lost.
    lost: AtomicU64,
}

/// A running worker; see the crate docs.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("worker_id", &self.worker_id()).finish()
    }
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

/// A refusal that sending the same report again cannot change: the report itself is wrong
/// (too large, too deep, not valid). The attempt fails with the reason instead.
fn refused_for_good(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
    )
}

fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Internal
    )
}

impl Worker {
    /// The id the server gave this worker (empty before it registered).
    pub fn worker_id(&self) -> String {
        self.inner.worker_id.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many runs this worker holds right now.
    pub fn held(&self) -> usize {
        self.inner.leases.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// How many runs of `workflow` this worker has completed: their `CompleteRun` was
    /// acknowledged, so the completion is committed.
    pub fn completed(&self, workflow: &str) -> u64 {
        self.inner
            .completed
            .get(workflow)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// How many executions this worker stopped, or whose report the server refused, because
    /// the run's lease was lost (it expired, or the run was leased to another worker): those
    /// runs were not reported by this worker. A lease that ended by this worker's own report is
    /// never counted here, whatever a heartbeat sent meanwhile said.
    pub fn lost(&self) -> u64 {
        self.inner.lost.load(Ordering::Relaxed)
    }

    /// Runs until `shutdown` is cancelled, then drains (see the crate docs) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), aiki::Error> {
        let inner = self.inner.clone();
        let registered = tokio::select! {
            r = inner.register() => r,
            _ = shutdown.cancelled() => return Ok(()),
        };
        registered?;
        let slots = Arc::new(Semaphore::new(inner.cfg.slots));
        let stop_heartbeat = CancellationToken::new();
        // Heartbeats stop with this future, also when it is dropped: a worker that is gone must
        // not keep its leases alive.
        let _heartbeat_guard = stop_heartbeat.clone().drop_guard();
        let heartbeat = tokio::spawn(inner.clone().heartbeat_loop(stop_heartbeat.clone()));
        let mut running = tokio::task::JoinSet::new();

        let batch = match inner.cfg.poll_batch {
            0 => inner.cfg.slots as u32,
            n => n,
        }
        .min(MAX_POLL_BATCH)
        .min(inner.cfg.slots as u32)
        .max(1);
        // Polls on their way, each with the slots it asked runs for.
        let mut polls: tokio::task::JoinSet<Polled> = tokio::task::JoinSet::new();
        loop {
            let (alone, room) = (polls.is_empty(), polls.len() < POLLS_IN_FLIGHT);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(polled) = polls.join_next() => {
                    let Ok(Polled { runs, mut permits, polled_at }) = polled else { continue };
                    for run in runs {
                        let Some(permit) = permits.split(1) else {
                            // The server never leases more than asked; release anything extra.
                            inner
                                .release(&run.run_id, &run.lease_token, "worker had no free slot", Duration::ZERO)
                                .await;
                            continue;
                        };
                        let inner = inner.clone();
                        running.spawn(async move {
                            inner.execute(run, polled_at).await;
                            drop(permit);
                        });
                    }
                }
                permits = free_slots(&slots, batch, alone), if room => {
                    let Some(permits) = permits else { break };
                    let (inner, shutdown) = (inner.clone(), shutdown.clone());
                    polls.spawn(async move {
                        let polled_at = Instant::now();
                        let runs = match inner.poll(permits.num_permits() as u32).await {
                            Ok(runs) => runs,
                            Err(e) => {
                                tracing::warn!(error = %e, "poll failed");
                                tokio::select! {
                                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                                    _ = shutdown.cancelled() => {}
                                }
                                Vec::new()
                            }
                        };
                        Polled { runs, permits, polled_at }
                    });
                }
            }
            while running.try_join_next().is_some() {}
        }
        // A poll cut short may have leased runs that nobody will execute: they expire.
        polls.abort_all();
        while polls.join_next().await.is_some() {}

        // Drain: let running runs finish for the grace period, then stop and release them.
        tracing::info!(held = self.held(), "worker stopping: no more polls");
        let drained = tokio::time::timeout(inner.cfg.shutdown_grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            let held: Vec<(String, String)> = {
                let leases = inner.leases.lock().unwrap_or_else(|e| e.into_inner());
                leases.iter().map(|(id, h)| (id.clone(), h.token.clone())).collect()
            };
            running.abort_all();
            while running.join_next().await.is_some() {}
            futures::future::join_all(
                held.iter()
                    .map(|(id, token)| inner.release(id, token, "worker shut down", Duration::ZERO)),
            )
            .await;
        }
        stop_heartbeat.cancel();
        let _ = heartbeat.await;
        tracing::info!("worker stopped");
        Ok(())
    }
}

impl Inner {
    fn worker_id(&self) -> String {
        self.worker_id.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn register(&self) -> Result<(), aiki::Error> {
        let req = RegisterWorkerRequest {
            namespace: self.cfg.namespace.clone(),
            identity: self.cfg.identity.clone(),
            host: hostname(),
            workflows: self
                .cfg
                .workflows
                .keys()
                .map(|n| WorkflowRef {
                    name: n.clone(),
                    version: self.cfg.version.clone(),
                })
                .collect(),
            queues: self.cfg.queues.clone(),
            slots: self.cfg.slots as u32,
        };
        let resp = (|| async { self.client.clone().register_worker(req.clone()).await })
            .retry(backoff())
            .when(transient)
            .notify(|e, d| tracing::warn!(error = %e.message(), retry_in = ?d, "cannot register; retrying"))
            .await
            .map_err(aiki::Error::from)?
            .into_inner();
        let d = |d: Option<aiki_proto::prost_types::Duration>, dflt| {
            d.as_ref().and_then(aiki_proto::duration_from_proto).unwrap_or(dflt)
        };
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = Settings {
            lease_ttl: d(resp.lease_ttl, Duration::from_secs(30)),
            heartbeat_interval: d(resp.heartbeat_interval, Duration::from_secs(10)),
            max_poll_wait: d(resp.max_poll_wait, Duration::from_secs(30)),
        };
        tracing::info!(worker_id = %resp.worker_id, queues = ?self.cfg.queues, "worker registered");
        *self.worker_id.lock().unwrap_or_else(|e| e.into_inner()) = resp.worker_id;
        Ok(())
    }

    /// Registers again after a call made as worker `used` was told the server does not know
    /// it, unless another call (a poll, the heartbeat) has done so meanwhile: once, however
    /// many calls were told.
    async fn register_again(&self, used: &str) -> Result<(), aiki::Error> {
        let _registering = self.registering.lock().await;
        if self.worker_id() != used {
            return Ok(());
        }
        tracing::warn!("the server does not know this worker; registering again");
        self.register().await
    }

    fn settings(&self) -> Settings {
        self.settings.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn poll(&self, max: u32) -> Result<Vec<LeasedRun>, Status> {
        let wait = self.cfg.poll_wait.min(self.settings().max_poll_wait);
        let worker_id = self.worker_id();
        let req = PollTasksRequest {
            namespace: self.cfg.namespace.clone(),
            worker_id: worker_id.clone(),
            queues: self.cfg.queues.clone(),
            max_runs: max,
            wait: Some(aiki_proto::duration_to_proto(wait)),
        };
        match self.client.clone().poll_tasks(req).await {
            Ok(r) => Ok(r.into_inner().runs),
            Err(s) if s.code() == Code::NotFound => {
                self.register_again(&worker_id)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                Ok(Vec::new())
            }
            Err(s) => Err(s),
        }
    }

    async fn execute(self: &Arc<Self>, run: LeasedRun, leased_at: Instant) {
        let stop = CancellationToken::new();
        let phase = Arc::new(AtomicU8::new(phase::RUNNING));
        let (_finished, finished) = tokio::sync::oneshot::channel::<()>();
        let held = Held {
            token: run.lease_token.clone(),
            leased_at,
            stop: stop.clone(),
            phase: phase.clone(),
            finished,
        };
        let previous = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(run.run_id.clone(), held);
        if let Some(previous) = previous {
            // This worker leased the run again after losing the earlier lease (before its
            // heartbeat said so): the earlier execution must not go on beside this one.
            tracing::warn!(run_id = %run.run_id, "run leased again; stopping the earlier execution");
            let _ = previous
                .phase
                .compare_exchange(phase::RUNNING, phase::LOST, Ordering::SeqCst, Ordering::SeqCst);
            previous.stop.cancel();
            // Its sender never sends: the answer is that it was dropped.
            let _ = previous.finished.await;
        }
        let Some(handler) = self.cfg.workflows.get(&run.workflow).cloned() else {
            tracing::warn!(run_id = %run.run_id, workflow = %run.workflow, "no handler for this workflow; releasing the run");
            Box::pin(self.release(
                &run.run_id,
                &run.lease_token,
                &format!("worker has no workflow {:?}", run.workflow),
                Duration::from_secs(5),
            ))
            .await;
            self.forget(&run.run_id, &run.lease_token);
            return;
        };
        let input = run
            .input
            .as_ref()
            .and_then(|v| aiki_proto::value_to_json(v).ok())
            .unwrap_or(serde_json::Value::Null);
        let ctx = Context::new(
            Lease {
                namespace: self.cfg.namespace.clone(),
                run_id: run.run_id.clone(),
                lease_token: run.lease_token.clone(),
                workflow: run.workflow.clone(),
                attempt: run.attempt,
                queue: run.queue.clone(),
            },
            self.reporter.clone(),
            run.tasks.clone(),
        )
        .with_shared_client(self.runs.clone());
        let progress = ctx.clone();
        let execution = std::panic::AssertUnwindSafe(handler(ctx, input)).catch_unwind();
        let outcome = tokio::select! {
            r = execution => Some(r.unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "the workflow panicked".to_owned());
                Err(WorkflowError::new("Panic", message))
            })),
            _ = stop.cancelled() => None,
        };
        // The workflow's outcome is reported only if no stop came first (see `phase`).
        let outcome = outcome.filter(|_| {
            phase
                .compare_exchange(phase::RUNNING, phase::REPORTING, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        // An output the server would refuse is not sent: the attempt fails with the reason (and
        // is not retried: the workflow would produce it again).
        let outcome = outcome.map(|r| {
            r.and_then(
                |output| match aiki_proto::check_depth("the workflow's output", &output) {
                    Ok(()) => Ok(output),
                    Err(too_deep) => Err(WorkflowError::new("PayloadTooDeep", too_deep.to_string()).non_retryable()),
                },
            )
        });
        match outcome {
            None if phase.load(Ordering::SeqCst) == phase::CANCELLED => {
                tracing::info!(run_id = %run.run_id, "run cancelled or paused; releasing it");
                // Boxed, like the other rare endings, so that the future every execution
                // carries (and moves) stays small.
                Box::pin(async {
                    // Tasks that ran before the stop are kept, so that a resumed run does not
                    // repeat them.
                    if let Err(e) = progress.flush().await {
                        tracing::warn!(run_id = %run.run_id, error = %e, "could not checkpoint the tasks run so far");
                    }
                    self.release(
                        &run.run_id,
                        &run.lease_token,
                        "stopped at the server's request (cancel or pause)",
                        Duration::ZERO,
                    )
                    .await;
                })
                .await;
            }
            None => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(run_id = %run.run_id, "lease lost; run stopped and not reported")
            }
            Some(Err(e)) if e.is_lease_lost() => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(run_id = %run.run_id, error = %e.message, "lease lost; run stopped and not reported")
            }
            Some(Ok(output)) => {
                let req = CompleteRunRequest {
                    namespace: self.cfg.namespace.clone(),
                    run_id: run.run_id.clone(),
                    lease_token: run.lease_token.clone(),
                    output: Some(aiki_proto::json_to_value(&output)),
                    // The last checkpoints, committed with the completion.
                    tasks: progress.take_unsent(),
                };
                // Boxed too: the report and its retry state are most of what an execution
                // would otherwise carry from its start, and every spawn moves that.
                let sent = Box::pin(self.report(&run.run_id, || {
                    let req = req.clone();
                    async move { self.reporter.complete_run(req).await.map(|_| ()) }
                }))
                .await;
                if sent.is_ok()
                    && let Some(n) = self.completed.get(&run.workflow)
                {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                if let Err(s) = sent
                    && refused_for_good(&s)
                {
                    // The output itself was refused (too large, not storable): retrying the
                    // run would produce it again, so end the run with the reason.
                    let e = WorkflowError::new(
                        "OutputRefused",
                        format!("the server refused the output: {}", s.message()),
                    )
                    .non_retryable();
                    Box::pin(self.fail(&run, &e)).await;
                }
            }
            Some(Err(e)) => Box::pin(self.end_attempt(&run, &progress, e)).await,
        }
        self.forget(&run.run_id, &run.lease_token);
    }

    /// Ends an execution that returned an error: a suspension or a failed attempt, after
    /// checkpointing the tasks it ran.
    async fn end_attempt(&self, run: &LeasedRun, progress: &Context, e: WorkflowError) {
        match (e.suspension(), progress.flush().await) {
            (_, Err(lost)) if lost.is_lease_lost() => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(run_id = %run.run_id, error = %lost.message, "lease lost; run stopped and not reported")
            }
            (_, Err(refused)) => {
                tracing::info!(run_id = %run.run_id, error = %refused, "a task result was refused; the attempt fails");
                self.fail(run, &refused).await;
            }
            (Some(s), Ok(())) => {
                let mut req = v1::SuspendRunRequest {
                    namespace: self.cfg.namespace.clone(),
                    run_id: run.run_id.clone(),
                    lease_token: run.lease_token.clone(),
                    wait_key: s.key.clone(),
                    wait_name: s.name.clone(),
                    wait_seq: s.seq,
                    ..Default::default()
                };
                match &s.wait {
                    WaitFor::Sleep(d) => req.sleep = Some(aiki_proto::duration_to_proto(*d)),
                    WaitFor::Event { name, timeout } => {
                        req.event = name.clone();
                        req.sleep = timeout.map(aiki_proto::duration_to_proto);
                    }
                    WaitFor::Child { run_id } => req.child_run_id = run_id.clone(),
                }
                tracing::debug!(run_id = %run.run_id, wait = ?s.wait, "run waits; suspending it");
                let sent = self
                    .report(&run.run_id, || {
                        let req = req.clone();
                        async move { self.reporter.suspend_run(req).await.map(|_| ()) }
                    })
                    .await;
                if let Err(refused) = sent
                    && refused_for_good(&refused)
                {
                    // The workflow would ask for the same wait again.
                    let e = WorkflowError::new(
                        "WaitRefused",
                        format!("the server refused the run's wait: {}", refused.message()),
                    )
                    .non_retryable();
                    self.fail(run, &e).await;
                }
            }
            (None, Ok(())) => {
                tracing::info!(run_id = %run.run_id, error = %e, "run attempt failed");
                self.fail(run, &e).await;
            }
        }
    }

    async fn fail(&self, run: &LeasedRun, e: &WorkflowError) {
        let refused = match self.fail_once(run, e).await {
            Err(s) if refused_for_good(&s) => s,
            _ => return,
        };
        // The failure report itself was refused: report a plain one (no details, no retry hint)
        // that says why, so that the run ends (or is retried) now rather than when its lease
        // expires.
        let plain = WorkflowError::new(
            e.kind.clone(),
            format!(
                "{} (the failure's report was refused: {})",
                e.message,
                refused.message()
            ),
        );
        let plain = if e.non_retryable { plain.non_retryable() } else { plain };
        let _ = self.fail_once(run, &plain).await;
    }

    async fn fail_once(&self, run: &LeasedRun, e: &WorkflowError) -> Result<(), Status> {
        let req = FailRunRequest {
            namespace: self.cfg.namespace.clone(),
            run_id: run.run_id.clone(),
            lease_token: run.lease_token.clone(),
            error: Some(e.to_proto()),
            non_retryable: e.non_retryable,
            retry_after: e.retry_after.map(aiki_proto::duration_to_proto),
        };
        self.report(&run.run_id, || {
            let req = req.clone();
            async move { self.reporter.fail_run(req).await.map(|_| ()) }
        })
        .await
    }

    /// Sends a final report, retrying transient failures for about a minute. A report that
    /// cannot be sent is given up: the lease then expires and the run is executed again
    /// elsewhere. Nothing else cuts it short (a heartbeat saying the lease is lost included):
    /// its answer says whether it was applied, and a report under a lost lease is refused.
    async fn report<F, Fut>(&self, run_id: &str, send: F) -> Result<(), Status>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), Status>>,
    {
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(15)
            .with_jitter();
        let result = send.retry(policy).when(transient).await;
        match &result {
            Ok(()) => {}
            Err(s) if s.code() == Code::FailedPrecondition => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(run_id, reason = s.message(), "report refused: lease lost");
            }
            Err(s) => tracing::error!(run_id, error = %s, "report failed"),
        }
        result
    }

    async fn release(&self, run_id: &str, token: &str, reason: &str, delay: Duration) {
        let req = ReleaseRunRequest {
            namespace: self.cfg.namespace.clone(),
            run_id: run_id.to_owned(),
            lease_token: token.to_owned(),
            reason: reason.to_owned(),
            delay: Some(aiki_proto::duration_to_proto(delay)),
        };
        let policy = ExponentialBuilder::default().with_max_times(3).with_jitter();
        let call = || async {
            tokio::time::timeout(Duration::from_secs(5), self.reporter.release_run(req.clone()))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("release timed out")))
        };
        if let Err(s) = call.retry(policy).when(transient).await {
            tracing::warn!(run_id, error = %s.message(), "release failed; the lease will expire instead");
        }
    }

    /// Drops the record of a lease, unless the run has been leased to this worker again since.
    fn forget(&self, run_id: &str, token: &str) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if leases.get(run_id).is_some_and(|h| h.token == token) {
            leases.remove(run_id);
        }
    }

    /// Stops the executions named, as lost (report nothing) or cancelled (release). Answers
    /// the runs it stopped: those still held under the lease named and still running their
    /// workflow (one whose final report is on its way is settled by that report's answer).
    fn stop(&self, leases: &[(String, String)], cancelled: bool) -> Vec<String> {
        let to = if cancelled { phase::CANCELLED } else { phase::LOST };
        let held = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let mut stopped = Vec::new();
        for (id, token) in leases {
            // Only the execution under the lease named: the run may have been leased to this
            // worker again since.
            if let Some(h) = held.get(id).filter(|h| &h.token == token)
                && h.phase
                    .compare_exchange(phase::RUNNING, to, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                h.stop.cancel();
                stopped.push(id.clone());
            }
        }
        stopped
    }

    async fn heartbeat_loop(self: Arc<Self>, stop: CancellationToken) {
        // When the last heartbeat that succeeded was sent: every lease held then was extended
        // to at least that moment plus the lease's duration.
        let mut last_ok = Instant::now();
        loop {
            let s = self.settings();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(s.heartbeat_interval) => {}
            }
            let sent: Vec<(String, String)> = {
                let held = self.leases.lock().unwrap_or_else(|e| e.into_inner());
                held.iter().map(|(id, h)| (id.clone(), h.token.clone())).collect()
            };
            let worker_id = self.worker_id();
            let req = HeartbeatRequest {
                namespace: self.cfg.namespace.clone(),
                worker_id: worker_id.clone(),
                leases: sent
                    .iter()
                    .map(|(id, t)| v1::Lease {
                        run_id: id.clone(),
                        lease_token: t.clone(),
                    })
                    .collect(),
            };
            let sent_at = Instant::now();
            let resp = tokio::time::timeout(
                s.heartbeat_interval.max(Duration::from_secs(1)),
                self.client.clone().heartbeat(req),
            )
            .await;
            let named = |ids: &[String]| -> Vec<(String, String)> {
                sent.iter().filter(|(id, _)| ids.contains(id)).cloned().collect()
            };
            match resp {
                Ok(Ok(r)) => {
                    last_ok = sent_at;
                    let r = r.into_inner();
                    // A lease that ended while the heartbeat was under way is not lost.
                    let lost = self.stop(&named(&r.lost_run_ids), false);
                    if !lost.is_empty() {
                        tracing::warn!(runs = ?lost, "leases lost");
                    }
                    // Cancelled and paused runs alike are stopped and released; the server
                    // decides what the release does.
                    if !r.cancel_run_ids.is_empty() {
                        self.stop(&named(&r.cancel_run_ids), true);
                    }
                    if !r.pause_run_ids.is_empty() {
                        self.stop(&named(&r.pause_run_ids), true);
                    }
                }
                Ok(Err(st)) if st.code() == Code::NotFound => {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = self.register_again(&worker_id) => {}
                    }
                }
                Ok(Err(st)) => tracing::warn!(error = %st.message(), "heartbeat failed"),
                Err(_) => tracing::warn!("heartbeat timed out"),
            }
            // A lease not extended for (nearly) its whole duration may already belong to
            // another worker: stop the run rather than risk running it twice at once.
            let margin = s.heartbeat_interval / 2;
            let expiring: Vec<(String, String)> = {
                let held = self.leases.lock().unwrap_or_else(|e| e.into_inner());
                held.iter()
                    .filter(|(_, h)| h.leased_at.max(last_ok) + s.lease_ttl.saturating_sub(margin) <= Instant::now())
                    .map(|(id, h)| (id.clone(), h.token.clone()))
                    .collect()
            };
            if !expiring.is_empty() {
                tracing::warn!(
                    runs = expiring.len(),
                    "leases could not be extended in time; stopping those runs"
                );
                self.stop(&expiring, false);
            }
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
