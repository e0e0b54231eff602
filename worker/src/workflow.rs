//! The workflow API that worker code uses: [`Context::task`] runs a step at most once per run
//! by checkpointing its result on the server before the workflow's next step (see
//! [`Context::flush`]).
//!
//! A task's key is its name, a hash of its input, and how many times that (name, input) pair
//! has already occurred in this execution, so loops work (a failed task gives its occurrence
//! back, so a retry loop in the workflow keeps its keys). Each recorded task also keeps its
//! position in the execution; a re-execution that replays recorded tasks in another order has
//! changed its code, and fails with a non-determinism error instead of silently mixing results.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use aiki::{Client, RetryPolicy, RunError, StartOptions};
use aiki_proto::v1::{RecordTaskRequest, TaskResult, task_result};
use backon::{ExponentialBuilder, Retryable};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::reporter::Reporter;

/// How a workflow (or one of its tasks) failed.
///
/// Any `std::error::Error` converts into it with `?`. By default a failure is retried by the
/// run's retry policy; [`WorkflowError::non_retryable`] ends the run at once.
#[derive(Debug, Clone)]
pub struct WorkflowError {
    /// A short class, e.g. "PaymentDeclined". Listed in a retry policy's
    /// `non_retryable_error_types`, it ends the run at once.
    pub kind: String,
    pub message: String,
    pub details: Option<serde_json::Value>,
    pub non_retryable: bool,
    /// Retry no sooner than this (instead of the policy's backoff).
    pub retry_after: Option<Duration>,
    pub(crate) lease_lost: bool,
    /// Set by [`Context::sleep`]: not a failure, the run gives its lease back to sleep.
    pub(crate) suspension: Option<Box<Suspension>>,
}

/// Where a run waits, and for what (see [`Context::sleep`], [`Context::wait_event`],
/// [`ChildRun::result`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspension {
    /// The wait's key, name and position among the run's durable steps.
    pub key: String,
    pub name: String,
    pub seq: u32,
    pub wait: WaitFor,
}

/// What a suspended run waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitFor {
    /// The end of a sleep.
    Sleep(Duration),
    /// An event of this name, for at most `timeout` (`None`: no limit).
    Event { name: String, timeout: Option<Duration> },
    /// The end of this child run.
    Child { run_id: String },
}

impl WorkflowError {
    /// A retryable error of class `kind`.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
            details: None,
            non_retryable: false,
            retry_after: None,
            lease_lost: false,
            suspension: None,
        }
    }

    /// Ends the run at once, whatever the retry policy.
    pub fn non_retryable(mut self) -> Self {
        self.non_retryable = true;
        self
    }

    /// Attaches details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Asks for the retry no sooner than `delay`.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// True when the worker lost the run's lease: nothing about the run may be reported.
    pub fn is_lease_lost(&self) -> bool {
        self.lease_lost
    }

    /// The wait this "error" stands for, when a workflow returns from [`Context::sleep`] (or
    /// another wait) with `?`: the worker suspends the run instead of failing it.
    pub fn suspension(&self) -> Option<&Suspension> {
        self.suspension.as_deref()
    }

    /// The error as the protocol carries it (a failure report, a recorded task failure).
    /// Details that could not be stored (nested deeper than
    /// [`aiki_proto::MAX_PAYLOAD_DEPTH`]) are replaced by a note saying why, so that the
    /// failure itself is always reported.
    pub fn to_proto(&self) -> aiki_proto::v1::RunError {
        let details = self
            .details
            .as_ref()
            .map(|d| match aiki_proto::check_depth("error details", d) {
                Ok(()) => aiki_proto::json_to_value(d),
                Err(e) => aiki_proto::json_to_value(&serde_json::json!({ "dropped": e.to_string() })),
            });
        aiki_proto::v1::RunError {
            r#type: self.kind.clone(),
            message: self.message.clone(),
            details,
        }
    }

    pub(crate) fn lease_lost(message: impl Into<String>) -> Self {
        Self {
            lease_lost: true,
            ..Self::new("LeaseLost", message)
        }
    }
}

impl std::fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for WorkflowError {
    fn from(e: E) -> Self {
        Self::new(short_type_name::<E>(), e.to_string())
    }
}

fn short_type_name<E>() -> String {
    let full = std::any::type_name::<E>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base).to_owned()
}

/// The lease a workflow execution runs under.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub(crate) namespace: String,
    pub(crate) run_id: String,
    pub(crate) lease_token: String,
    pub(crate) workflow: String,
    pub(crate) attempt: u32,
    /// The run's queue: its children's, unless they name another.
    pub(crate) queue: String,
}

#[derive(Debug, Default)]
struct Progress {
    /// Recorded results by key.
    recorded: HashMap<String, TaskResult>,
    /// Occurrences of (name, input hash) so far in this execution.
    seen: HashMap<(String, String), u32>,
    /// Tasks started so far in this execution.
    next_seq: u32,
    /// The recorded position of the last task replayed in this execution.
    last_replayed: Option<u32>,
    /// Results of tasks this execution ran that are not yet checkpointed, in the order they
    /// ran (see [`Context::flush`]).
    unsent: Vec<TaskResult>,
}

/// A durable step begun by [`Context::begin_step`].
struct Step {
    key: String,
    /// This step's occurrence among the steps of the same identity.
    n: u32,
    seq: u32,
    recorded: Option<TaskResult>,
}

/// What a workflow function gets: its run's identity and the checkpointed task API.
#[derive(Debug, Clone)]
pub struct Context {
    lease: Arc<Lease>,
    reporter: Reporter,
    progress: Arc<Mutex<Progress>>,
    /// Held while unsent task results are being checkpointed (see [`Context::flush`]).
    flushing: Arc<tokio::sync::Mutex<()>>,
    /// Starts child runs.
    client: Option<Arc<Client>>,
}

impl Context {
    /// A context for one execution of a leased run, with the task results recorded so far;
    /// task results are checkpointed through `reporter`.
    pub(crate) fn new(lease: Lease, reporter: Reporter, recorded: Vec<TaskResult>) -> Self {
        let recorded = recorded.into_iter().map(|t| (t.key.clone(), t)).collect();
        Self {
            lease: Arc::new(lease),
            reporter,
            progress: Arc::new(Mutex::new(Progress {
                recorded,
                ..Progress::default()
            })),
            flushing: Arc::default(),
            client: None,
        }
    }

    /// The same context, with a client to start child runs through ([`Context::start_child`]),
    /// shared by many contexts (a worker's executions): nothing is copied per context.
    pub(crate) fn with_shared_client(mut self, client: Arc<Client>) -> Self {
        self.client = Some(client);
        self
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.lease.run_id
    }

    /// The attempt, from 1.
    pub fn attempt(&self) -> u32 {
        self.lease.attempt
    }

    /// The workflow's name.
    pub fn workflow(&self) -> &str {
        &self.lease.workflow
    }

    /// Runs `f(input)` once per run: if this task already completed in an earlier execution,
    /// returns its recorded output without calling `f`; otherwise calls `f` and checkpoints its
    /// output on the server before the workflow's next step can have an effect (before the
    /// next task runs, a child starts, the run waits, or with the run's completion: see
    /// [`Context::flush`]). It returns the output as recorded, so the first execution and a
    /// re-execution see the same value. A failing `f` is not recorded: the error goes
    /// back to the workflow (and, with `?`, fails the attempt, to be retried by policy).
    pub async fn task<I, O, E, F, Fut>(&self, name: &str, input: I, f: F) -> Result<O, WorkflowError>
    where
        I: Serialize,
        O: Serialize + DeserializeOwned,
        E: Into<WorkflowError>,
        F: FnOnce(I) -> Fut,
        Fut: Future<Output = Result<O, E>>,
    {
        let hash = input_hash(&input)
            .map_err(|e| WorkflowError::new("Serialization", format!("task {name:?} input: {e}")).non_retryable())?;
        let Step { key, n, seq, recorded } = self.begin_step("task", name, (name.to_owned(), hash.clone()), |n| {
            task_key(name, &hash, n)
        })?;
        if let Some(t) = recorded {
            return decode(name, t);
        }
        self.flush().await?;
        let output = match f(input).await {
            Ok(output) => output,
            Err(e) => {
                // A failed task is not recorded: give back its occurrence and position, so
                // that the same call made again (a retry loop in the workflow) gets the same
                // key, and later tasks keep their positions.
                let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(count) = p.seen.get_mut(&(name.to_owned(), hash)).filter(|c| **c == n + 1) {
                    *count = n;
                }
                if p.next_seq == seq + 1 {
                    p.next_seq = seq;
                }
                return Err(e.into());
            }
        };
        let value = task_output(name, &output)?;
        self.defer(TaskResult {
            key,
            name: name.to_owned(),
            seq,
            result: Some(task_result::Result::Output(aiki_proto::json_to_value(&value))),
        });
        // What a re-execution will get back: the output as recorded.
        from_recorded(name, value)
    }

    /// [`Context::task`] with a retry policy of its own: a failing `f` is called again after
    /// the policy's backoff, up to its attempts. A delay up to `opts.inline_retry_limit` is
    /// waited inline (the run keeps its worker); a longer one suspends the run like
    /// [`Context::sleep`] (propagate the error with `?`), and the retry happens when it wakes,
    /// on any worker. Once the attempts are spent, or for a non-retryable error, the failure
    /// is checkpointed like an output: a re-executed run gets the same error back without
    /// calling `f`, and the error ends the run rather than being retried by the run's policy.
    pub async fn task_with<I, O, E, F, Fut>(
        &self,
        name: &str,
        input: I,
        opts: TaskOptions,
        f: F,
    ) -> Result<O, WorkflowError>
    where
        I: Serialize + Clone,
        O: Serialize + DeserializeOwned,
        E: Into<WorkflowError>,
        F: Fn(I) -> Fut,
        Fut: Future<Output = Result<O, E>>,
    {
        let hash = input_hash(&input)
            .map_err(|e| WorkflowError::new("Serialization", format!("task {name:?} input: {e}")).non_retryable())?;
        let Step { key, seq, recorded, .. } = self.begin_step("task", name, (name.to_owned(), hash.clone()), |n| {
            task_key(name, &hash, n)
        })?;
        if let Some(t) = recorded {
            return decode(name, t);
        }
        self.flush().await?;
        let policy = opts.resolved();
        let retry_step = |attempt: u32| (format!("retry:{key}"), attempt.to_string());
        let mut attempt = 1;
        loop {
            // An earlier execution slept before attempt `m`: go past that sleep.
            if let Some(m) = self.slept_before(&key, attempt) {
                self.begin_step("retry sleep", name, retry_step(m), |_| retry_key(&key, m))?;
                attempt = m;
                continue;
            }
            let e: WorkflowError = match f(input.clone()).await {
                Ok(output) => {
                    let value = task_output(name, &output)?;
                    self.defer(TaskResult {
                        key: key.clone(),
                        name: name.to_owned(),
                        seq,
                        result: Some(task_result::Result::Output(aiki_proto::json_to_value(&value))),
                    });
                    return from_recorded(name, value);
                }
                Err(e) => e.into(),
            };
            if e.is_lease_lost() || e.suspension().is_some() {
                return Err(e);
            }
            let give_up =
                e.non_retryable || attempt >= policy.max_attempts || policy.non_retryable_error_types.contains(&e.kind);
            if give_up {
                self.defer(TaskResult {
                    key: key.clone(),
                    name: name.to_owned(),
                    seq,
                    result: Some(task_result::Result::Error(e.to_proto())),
                });
                return Err(e.non_retryable());
            }
            let delay = e.retry_after.unwrap_or_else(|| policy.backoff(attempt));
            attempt += 1;
            if delay <= opts.inline_retry_limit {
                tokio::time::sleep(delay).await;
                continue;
            }
            let Step {
                key: sleep_key,
                seq: sleep_seq,
                ..
            } = self.begin_step("retry sleep", name, retry_step(attempt), |_| retry_key(&key, attempt))?;
            return Err(suspend(
                sleep_key,
                name,
                sleep_seq,
                WaitFor::Sleep(delay),
                format!("task {name:?} failed ({e}); attempt {attempt} in {delay:?}"),
            ));
        }
    }

    /// The attempt of task `key` after `attempt` that an earlier execution slept before, if
    /// any (its retry sleep is recorded).
    fn slept_before(&self, key: &str, attempt: u32) -> Option<u32> {
        let prefix = format!("retry:{key}@");
        let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.recorded
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix)?.parse::<u32>().ok())
            .filter(|m| *m > attempt)
            .min()
    }

    /// Sleeps durably for `duration`: the run gives its lease (and its worker slot) back and
    /// is executed again when the sleep ends, on any worker; there this call returns at once,
    /// like a completed task. Propagate its error with `?`: it is how the run suspends.
    /// `name` tells sleeps apart in the history, and must be stable across executions.
    pub async fn sleep(&self, name: &str, duration: Duration) -> Result<(), WorkflowError> {
        let Step { key, seq, recorded, .. } =
            self.begin_step("sleep", name, (format!("sleep:{name}"), String::new()), |n| {
                format!("sleep:{name}#{n}")
            })?;
        if recorded.is_some() {
            return Ok(());
        }
        Err(suspend(
            key,
            name,
            seq,
            WaitFor::Sleep(duration),
            format!("sleeping {name:?} for {duration:?}"),
        ))
    }

    /// Waits durably for an event `name` sent to this run (`Client::send_event`,
    /// `aiki run event`), for at most `timeout` (`None`: no limit). Returns its payload, or
    /// `None` if the wait timed out (or was ended by `WakeRun`). Events sent before the run
    /// waits are kept for it; events of one name are received one per wait, in the order sent.
    ///
    /// Like [`Context::sleep`], the run gives its worker back while it waits: propagate the
    /// error with `?`. `name` must be stable across executions.
    pub async fn wait_event<T: DeserializeOwned>(
        &self,
        name: &str,
        timeout: impl Into<Option<Duration>>,
    ) -> Result<Option<T>, WorkflowError> {
        let timeout = timeout.into();
        let Step { key, seq, recorded, .. } =
            self.begin_step("event wait", name, (format!("event:{name}"), String::new()), |n| {
                format!("event:{name}#{n}")
            })?;
        let Some(t) = recorded else {
            return Err(suspend(
                key,
                name,
                seq,
                WaitFor::Event {
                    name: name.to_owned(),
                    timeout,
                },
                format!("waiting for event {name:?}"),
            ));
        };
        let outcome: serde_json::Value = decode(name, t)?;
        if outcome.get("timeout").and_then(serde_json::Value::as_bool) == Some(true) {
            return Ok(None);
        }
        let payload = outcome.get("event").cloned().unwrap_or_default();
        serde_json::from_value(payload).map(Some).map_err(|e| {
            WorkflowError::new(
                "Serialization",
                format!("the payload of event {name:?} does not fit the type asked for: {e}"),
            )
            .non_retryable()
        })
    }

    /// Starts `workflow` as a child run of this run, and returns at once; wait for its end
    /// with [`ChildRun::result`]. Its idempotency key is derived from this run and the call's
    /// occurrence (the n-th child of `workflow` started by this run), so a re-executed run
    /// gets the child it started before instead of starting another; a key given in `opts`
    /// replaces the derived one. The child goes to this run's queue unless `opts` names
    /// another. Cancelling this run cancels the child.
    pub async fn start_child<I: Serialize>(
        &self,
        workflow: &str,
        input: &I,
        mut opts: StartOptions,
    ) -> Result<ChildRun, WorkflowError> {
        let client = self.client.as_ref().ok_or_else(|| {
            WorkflowError::new(
                "NoClient",
                "this context cannot start child runs: it was built without a client",
            )
            .non_retryable()
        })?;
        let n = {
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            let count = p.seen.entry((format!("child:{workflow}"), String::new())).or_insert(0);
            *count += 1;
            *count - 1
        };
        if opts.idempotency_key.is_none() {
            opts.idempotency_key = Some(format!("{}/{workflow}#{n}", self.lease.run_id));
        }
        opts.return_existing = true;
        if opts.queue.is_none() && !self.lease.queue.is_empty() {
            opts.queue = Some(self.lease.queue.clone());
        }
        opts.parent_run_id = Some(self.lease.run_id.clone());
        self.flush().await?;
        let client = Client::clone(client).with_namespace(self.lease.namespace.clone());
        let handle = client.start_run(workflow, input, opts).await.map_err(|e| {
            let retryable = matches!(e, aiki::Error::Unavailable(_) | aiki::Error::Server(_));
            let e = WorkflowError::new("ChildStart", format!("could not start child {workflow:?}: {e}"));
            if retryable { e } else { e.non_retryable() }
        })?;
        Ok(ChildRun {
            ctx: self.clone(),
            run_id: handle.id,
            workflow: workflow.to_owned(),
        })
    }

    /// Starts a durable step (a task or a sleep): counts this occurrence of `ident`, takes the
    /// next position, and gives back what an earlier execution recorded under its key
    /// (`key_of(occurrence)`). Recorded steps must replay in the order they were recorded in.
    fn begin_step(
        &self,
        what: &str,
        name: &str,
        ident: (String, String),
        key_of: impl FnOnce(u32) -> String,
    ) -> Result<Step, WorkflowError> {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let count = p.seen.entry(ident).or_insert(0);
        let n = *count;
        *count += 1;
        let key = key_of(n);
        let seq = p.next_seq;
        p.next_seq += 1;
        let recorded = p.recorded.get(&key).cloned();
        if let Some(t) = &recorded {
            if p.last_replayed.is_some_and(|last| t.seq <= last) {
                return Err(WorkflowError::new(
                    "NonDeterminism",
                    format!(
                        "{what} {name:?} (key {key}) was recorded as {what} #{} of this run, before {what} #{}, \
                         but now runs after it: the workflow's code changed the order of its {what}s",
                        t.seq,
                        p.last_replayed.unwrap_or_default()
                    ),
                )
                .non_retryable());
            }
            p.last_replayed = Some(t.seq);
            // Later steps go after it, even if this execution skipped steps an earlier one
            // made (the retry sleeps of a task that has since been recorded).
            p.next_seq = p.next_seq.max(t.seq + 1);
        }
        Ok(Step { key, n, seq, recorded })
    }

    /// Keeps the result of a task this execution ran, to be checkpointed by the next
    /// [`Context::flush`] or with the run's completion. Not in `recorded`: this execution has
    /// moved past its key, so nothing looks it up there.
    fn defer(&self, task: TaskResult) {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unsent
            .push(task);
    }

    /// Checkpoints the results of the tasks this execution ran that are not checkpointed yet.
    ///
    /// A task's result is kept in the execution until the next step could have an effect the
    /// task must not be repeated after: the next task runs, a child run starts, or the run
    /// suspends, fails or is released (the worker runtime flushes before those reports). The
    /// results left at the end travel with `CompleteRun` and are
    /// committed in the completion's transaction: a one-task run costs one transaction after
    /// its lease instead of two. What runs between a task and the next step is workflow code,
    /// deterministic by the model, so a crash in between only makes the re-execution run the
    /// task again, as a crash just before its checkpoint would. An `Err` is the reason the
    /// execution must stop (the lease is lost, or the server refused a result).
    pub async fn flush(&self) -> Result<(), WorkflowError> {
        // A result leaves `unsent` only once it is committed, so a step that finds nothing
        // unsent has nothing to wait for; otherwise it waits for any flush under way (steps
        // running concurrently in one workflow), then sends what is still unsent, in order.
        if self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unsent
            .is_empty()
        {
            return Ok(());
        }
        let _flushing = self.flushing.lock().await;
        loop {
            let next = {
                let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                match p.unsent.first() {
                    Some(t) => t.clone(),
                    None => return Ok(()),
                }
            };
            self.record(next).await?;
            // Only a flush removes (one at a time), and results are only added at the end.
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            if !p.unsent.is_empty() {
                p.unsent.remove(0);
            }
        }
    }

    /// Takes the task results that are not checkpointed yet, for the runtime to send with the
    /// run's completion (`CompleteRunRequest.tasks`).
    pub(crate) fn take_unsent(&self) -> Vec<TaskResult> {
        std::mem::take(&mut self.progress.lock().unwrap_or_else(|e| e.into_inner()).unsent)
    }

    async fn record(&self, task: TaskResult) -> Result<(), WorkflowError> {
        let req = RecordTaskRequest {
            namespace: self.lease.namespace.clone(),
            run_id: self.lease.run_id.clone(),
            lease_token: self.lease.lease_token.clone(),
            task: Some(task),
        };
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(10)
            .with_jitter();
        let resp = (|| async { self.reporter.record_task(req.clone()).await })
            .retry(policy)
            .when(|s| matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled))
            .await;
        match resp {
            Ok(_) => Ok(()),
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => {
                Err(WorkflowError::lease_lost(s.message().to_owned()))
            }
            Err(s) => Err(WorkflowError::new(
                "RecordTask",
                format!("could not checkpoint task: {}", s.message()),
            )),
        }
    }
}

/// A task's key: `{name}#{input hash}#{occurrence}`, built without the formatting machinery
/// (`format!` took about 1,200 instructions per task).
fn task_key(name: &str, hash: &str, n: u32) -> String {
    let n = n.to_string();
    let mut key = String::with_capacity(name.len() + hash.len() + n.len() + 2);
    key.push_str(name);
    key.push('#');
    key.push_str(hash);
    key.push('#');
    key.push_str(&n);
    key
}

/// The key of the sleep before attempt `attempt` of task `key`.
fn retry_key(key: &str, attempt: u32) -> String {
    format!("retry:{key}@{attempt}")
}

/// How [`Context::task_with`] runs a task.
#[derive(Debug, Clone)]
pub struct TaskOptions {
    /// Unset fields: 3 attempts, 1 s first delay, doubling, at most 60 s.
    pub retry: RetryPolicy,
    /// Retry delays up to this are waited inline; longer ones suspend the run (default 5 s).
    pub inline_retry_limit: Duration,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            inline_retry_limit: Duration::from_secs(5),
        }
    }
}

impl TaskOptions {
    /// Options with this retry policy.
    pub fn retry(retry: RetryPolicy) -> Self {
        Self {
            retry,
            ..Self::default()
        }
    }

    fn resolved(&self) -> ResolvedRetry {
        let r = &self.retry;
        ResolvedRetry {
            max_attempts: r.max_attempts.unwrap_or(3).max(1),
            initial: r.initial_interval.unwrap_or(Duration::from_secs(1)),
            max: r.max_interval.unwrap_or(Duration::from_secs(60)),
            coefficient: r.backoff_coefficient.unwrap_or(2.0).max(1.0),
            non_retryable_error_types: r.non_retryable_error_types.clone(),
        }
    }
}

struct ResolvedRetry {
    max_attempts: u32,
    initial: Duration,
    max: Duration,
    coefficient: f64,
    non_retryable_error_types: Vec<String>,
}

impl ResolvedRetry {
    /// The delay after failed attempt `attempt`: initial × coefficient^(attempt−1), capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = f64::from(attempt.saturating_sub(1).min(64));
        let secs = self.initial.as_secs_f64() * self.coefficient.powf(exp);
        Duration::from_secs_f64(secs.min(self.max.as_secs_f64()).max(0.0))
    }
}

/// A child run started by [`Context::start_child`].
#[derive(Debug, Clone)]
pub struct ChildRun {
    ctx: Context,
    run_id: String,
    workflow: String,
}

impl ChildRun {
    /// The child's run id.
    pub fn id(&self) -> &str {
        &self.run_id
    }

    /// Waits durably for the child to end: its output, or how it failed (or was cancelled) as
    /// the inner `Err`. The parent gives its worker back while it waits, like
    /// [`Context::sleep`]: propagate the outer error with `?`.
    pub async fn result<T: DeserializeOwned>(&self) -> Result<Result<T, RunError>, WorkflowError> {
        let id = &self.run_id;
        let Step { key, seq, recorded, .. } = self.ctx.begin_step(
            "child wait",
            &self.workflow,
            (format!("child:{id}"), String::new()),
            |n| format!("child:{id}#{n}"),
        )?;
        let Some(t) = recorded else {
            return Err(suspend(
                key,
                &self.workflow,
                seq,
                WaitFor::Child { run_id: id.clone() },
                format!("waiting for child run {id}"),
            ));
        };
        let outcome: serde_json::Value = decode(&self.workflow, t)?;
        let status = outcome.get("status").and_then(serde_json::Value::as_str).unwrap_or("");
        if status == "completed" {
            let output = outcome.get("output").cloned().unwrap_or_default();
            return serde_json::from_value(output).map(Ok).map_err(|e| {
                WorkflowError::new(
                    "Serialization",
                    format!("the output of child run {id} does not fit the type asked for: {e}"),
                )
                .non_retryable()
            });
        }
        let error = outcome.get("error").cloned().unwrap_or_default();
        let text = |k: &str| {
            error
                .get(k)
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        Ok(Err(RunError {
            kind: match text("type") {
                k if k.is_empty() => status.to_owned(),
                k => k,
            },
            message: text("message"),
            details: error.get("details").filter(|d| !d.is_null()).cloned(),
        }))
    }
}

/// The "error" a wait returns to suspend the run.
fn suspend(key: String, name: &str, seq: u32, wait: WaitFor, message: String) -> WorkflowError {
    WorkflowError {
        suspension: Some(Box::new(Suspension {
            key,
            name: name.to_owned(),
            seq,
            wait,
        })),
        ..WorkflowError::new("Suspended", message)
    }
}

/// A task's output as JSON. One that cannot be recorded fails the attempt non-retryably: the
/// task would produce it again.
fn task_output<O: Serialize>(name: &str, output: &O) -> Result<serde_json::Value, WorkflowError> {
    let value = serde_json::to_value(output)
        .map_err(|e| WorkflowError::new("Serialization", format!("task {name:?} output: {e}")).non_retryable())?;
    aiki_proto::check_depth(&format!("task {name:?} output"), &value)
        .map_err(|e| WorkflowError::new("PayloadTooDeep", e.to_string()).non_retryable())?;
    Ok(value)
}

fn decode<O: DeserializeOwned>(name: &str, t: TaskResult) -> Result<O, WorkflowError> {
    match t.result {
        Some(task_result::Result::Output(v)) => {
            let json = aiki_proto::value_to_json(&v)
                .map_err(|e| WorkflowError::new("Serialization", format!("task {name:?}: {e}")))?;
            from_recorded(name, json)
        }
        // A recorded failure is final: retrying the run would only get it back again.
        Some(task_result::Result::Error(e)) => Err(WorkflowError {
            details: e.details.as_ref().and_then(|d| aiki_proto::value_to_json(d).ok()),
            ..WorkflowError::new(e.r#type, e.message).non_retryable()
        }),
        None => Err(WorkflowError::new(
            "Protocol",
            format!("task {name:?} has no recorded result"),
        )),
    }
}

/// A task's output from its recorded JSON.
fn from_recorded<O: DeserializeOwned>(name: &str, json: serde_json::Value) -> Result<O, WorkflowError> {
    serde_json::from_value(json).map_err(|e| {
        WorkflowError::new(
            "Serialization",
            format!("recorded output of task {name:?} does not fit: {e}"),
        )
        .non_retryable()
    })
}

/// The hash of a task's input in its key: of its JSON through `serde_json::Value`, whose maps
/// are sorted, so the same input always hashes the same, even when it holds a `HashMap`.
fn input_hash<I: Serialize>(input: &I) -> Result<String, serde_json::Error> {
    let json = serde_json::to_vec(&serde_json::to_value(input)?)?;
    // The first 8 bytes of the digest, in lowercase hex (formatting the whole digest with
    // `{:x}` and cutting it took about 670 instructions per task).
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(&json);
    let mut hex = String::with_capacity(16);
    for b in &digest[..8] {
        hex.push(DIGITS[usize::from(b >> 4)].into());
        hex.push(DIGITS[usize::from(b & 0xf)].into());
    }
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("boom")]
    struct Boom;

    #[test]
    fn std_errors_convert_with_their_type_name() {
        let e: WorkflowError = Boom.into();
        assert_eq!(e.kind, "Boom");
        assert!(!e.non_retryable);
    }

    #[test]
    fn task_keys_are_name_hash_and_occurrence() {
        // Pinned: recorded runs find their tasks by these keys.
        assert_eq!(task_key("charge", "708747538ba81fd6", 0), "charge#708747538ba81fd6#0");
        assert_eq!(task_key("a#b", "00", 4_000_000_000), "a#b#00#4000000000");
    }

    #[test]
    fn input_hashes_do_not_depend_on_map_order() {
        let pairs: Vec<(String, u32)> = (0..50).map(|i| (format!("k{i}"), i)).collect();
        let hashed: std::collections::HashMap<_, _> = pairs.iter().cloned().collect();
        let sorted: std::collections::BTreeMap<_, _> = pairs.iter().cloned().collect();
        assert_eq!(input_hash(&hashed).unwrap(), input_hash(&sorted).unwrap());
        // Pinned: a change here changes every task key, and recorded runs would run tasks again.
        assert_eq!(
            input_hash(&serde_json::json!({"b": 1, "a": [true]})).unwrap(),
            "708747538ba81fd6"
        );
    }
}
