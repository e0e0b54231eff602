//! Requests as the engine takes them: each built from its protocol message by a `TryFrom`
//! that checks everything the message alone can tell (names, ids, durations, the form of
//! payloads), with an error a person can act on. What depends on the server's settings (payload
//! sizes, default retry policy, the heartbeat floor) the engine checks when it takes the
//! request.

use std::time::Duration;

use aiki_proto::v1::{
    self, CancelRunRequest, CompleteRunRequest, ConflictPolicy, FailRunRequest, GetRunHistoryRequest, GetRunRequest,
    GetRunResultRequest, HeartbeatRequest, ListRunsRequest, PauseRunRequest, PollTasksRequest, RecordTaskRequest,
    RegisterWorkerRequest, ReleaseRunRequest, ResumeRunRequest, SendEventRequest, StartRunRequest, SuspendRunRequest,
    TaskResult, WakeRunRequest, WatchRunRequest, get_run_request, send_event_request, task_result,
};
use serde_json::Value as Json;
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    status::RunStatus,
    store::{RunFilter, RunRef, Timeouts, Wait},
    validate,
};

/// Longest delay, timeout or sleep anything may ask for.
const YEAR: Duration = Duration::from_secs(366 * 86_400);
const DAY: Duration = Duration::from_secs(86_400);
/// Most reports in one `Report` call, and task results in one completion.
pub const MAX_REPORTS: usize = 1000;
/// Most runs one poll may lease.
pub const MAX_POLL_BATCH: u32 = 1000;
/// Most leases one heartbeat may name.
pub const MAX_HEARTBEAT_LEASES: usize = 10_000;
/// Longest `GetRunResult` wait.
pub const MAX_RESULT_WAIT: Duration = Duration::from_secs(600);

/// A run named by id, in a namespace.
#[derive(Debug, Clone)]
pub struct RunId {
    pub namespace: String,
    pub id: Uuid,
}

impl RunId {
    fn new(namespace: &str, run_id: &str) -> Result<Self> {
        Ok(Self {
            namespace: validate::namespace(namespace)?,
            id: validate::uuid("run_id", run_id)?,
        })
    }
}

macro_rules! run_id_of {
    ($($message:ty),*) => {$(
        impl TryFrom<&$message> for RunId {
            type Error = Error;
            fn try_from(r: &$message) -> Result<Self> {
                RunId::new(&r.namespace, &r.run_id)
            }
        }
    )*};
}
run_id_of!(WakeRunRequest, ResumeRunRequest, GetRunHistoryRequest, WatchRunRequest);

/// A run named by id or by idempotency key, in a namespace.
#[derive(Debug, Clone)]
pub struct RunSelector {
    pub namespace: String,
    pub run: RunRef,
}

fn run_ref(id: Option<&str>, key: Option<&str>) -> Result<RunRef> {
    match (id, key) {
        (Some(id), _) => Ok(RunRef::Id(validate::uuid("run_id", id)?)),
        (None, Some(key)) => Ok(RunRef::Key(validate::name("idempotency_key", key, 255)?)),
        (None, None) => Err(Error::InvalidArgument("give run_id or idempotency_key".into())),
    }
}

impl TryFrom<&GetRunRequest> for RunSelector {
    type Error = Error;
    fn try_from(r: &GetRunRequest) -> Result<Self> {
        let (id, key) = match &r.r#ref {
            Some(get_run_request::Ref::RunId(id)) => (Some(id.as_str()), None),
            Some(get_run_request::Ref::IdempotencyKey(k)) => (None, Some(k.as_str())),
            None => (None, None),
        };
        Ok(Self {
            namespace: validate::namespace(&r.namespace)?,
            run: run_ref(id, key)?,
        })
    }
}

/// A wait for a run's result.
#[derive(Debug, Clone)]
pub struct AwaitResult {
    pub run: RunId,
    pub timeout: Duration,
}

impl TryFrom<&GetRunResultRequest> for AwaitResult {
    type Error = Error;
    fn try_from(r: &GetRunResultRequest) -> Result<Self> {
        Ok(Self {
            run: RunId::new(&r.namespace, &r.run_id)?,
            timeout: validate::duration("timeout", r.timeout.as_ref(), MAX_RESULT_WAIT)?,
        })
    }
}

/// A cancellation or a pause, with the reason kept in the run's history.
#[derive(Debug, Clone)]
pub struct WithReason {
    pub run: RunId,
    pub reason: String,
}

/// A reason kept in a run's history (cancel, pause): at most 1024 characters.
fn reason(text: &str) -> Result<String> {
    if text.chars().count() > 1024 {
        return Err(Error::InvalidArgument("reason must be at most 1024 characters".into()));
    }
    Ok(validate::text(text, 1024))
}

impl TryFrom<&CancelRunRequest> for WithReason {
    type Error = Error;
    fn try_from(r: &CancelRunRequest) -> Result<Self> {
        Ok(Self {
            run: RunId::new(&r.namespace, &r.run_id)?,
            reason: reason(&r.reason)?,
        })
    }
}

impl TryFrom<&PauseRunRequest> for WithReason {
    type Error = Error;
    fn try_from(r: &PauseRunRequest) -> Result<Self> {
        Ok(Self {
            run: RunId::new(&r.namespace, &r.run_id)?,
            reason: reason(&r.reason)?,
        })
    }
}

/// A page of runs.
#[derive(Debug, Clone)]
pub struct ListRuns {
    pub namespace: String,
    pub filter: RunFilter,
}

impl TryFrom<&ListRunsRequest> for ListRuns {
    type Error = Error;
    fn try_from(req: &ListRunsRequest) -> Result<Self> {
        let limit = match req.page_size {
            0 => 100,
            n @ 1..=1000 => n,
            n => return Err(Error::InvalidArgument(format!("page_size must be 1 to 1000, got {n}"))),
        };
        let statuses = req
            .statuses
            .iter()
            .map(|s| {
                RunStatus::from_proto(*s)
                    .ok_or_else(|| Error::InvalidArgument(format!("unknown status {s} in statuses")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bound = |t: &Option<prost_types::Timestamp>| -> Result<Option<Uuid>> {
            let Some(t) = t else { return Ok(None) };
            if !(0..1_000_000_000).contains(&t.nanos) {
                return Err(Error::InvalidArgument(format!(
                    "created_after/created_before: nanos must be 0 to 999999999, got {}",
                    t.nanos
                )));
            }
            // UUIDv7 holds 48 bits of milliseconds: up to the year 10889.
            let secs = u64::try_from(t.seconds)
                .ok()
                .filter(|s| *s < (1u64 << 48) / 1000)
                .ok_or_else(|| {
                    Error::InvalidArgument("created_after/created_before must be between 1970 and 10000".into())
                })?;
            let ts = uuid::Timestamp::from_unix(uuid::NoContext, secs, t.nanos as u32);
            Ok(Some(min_v7(Uuid::new_v7(ts))))
        };
        Ok(Self {
            namespace: validate::namespace(&req.namespace)?,
            filter: RunFilter {
                workflow: validate::opt_name("workflow", &req.workflow, 128)?,
                statuses,
                queue: validate::opt_name("queue", &req.queue, 128)?,
                created_after: bound(&req.created_after)?,
                created_before: bound(&req.created_before)?,
                cursor: match req.page_token.as_str() {
                    "" => None,
                    t => Some(validate::uuid("page_token", t)?),
                },
                limit: i64::from(limit),
                parent: match req.parent_run_id.as_str() {
                    "" => None,
                    p => Some(validate::uuid("parent_run_id", p)?),
                },
            },
        })
    }
}

/// The smallest UUIDv7 of a millisecond: `new_v7` fills random bits, which a range bound
/// must not have.
fn min_v7(u: Uuid) -> Uuid {
    let mut b = *u.as_bytes();
    b[6] &= 0xf0;
    b[7] = 0;
    b[8] &= 0xc0;
    b[9..].fill(0);
    Uuid::from_bytes(b)
}

/// An event for a run.
#[derive(Debug, Clone)]
pub struct SendEvent {
    pub namespace: String,
    pub run: RunRef,
    pub name: String,
    pub event_key: Option<String>,
    pub payload: Json,
}

impl TryFrom<&SendEventRequest> for SendEvent {
    type Error = Error;
    fn try_from(r: &SendEventRequest) -> Result<Self> {
        let (id, key) = match &r.r#ref {
            Some(send_event_request::Ref::RunId(id)) => (Some(id.as_str()), None),
            Some(send_event_request::Ref::IdempotencyKey(k)) => (None, Some(k.as_str())),
            None => (None, None),
        };
        Ok(Self {
            namespace: validate::namespace(&r.namespace)?,
            run: run_ref(id, key)?,
            name: validate::name("event name", &r.name, 255)?,
            event_key: validate::opt_name("event_key", &r.event_key, 255)?,
            payload: validate::payload_json("payload", r.payload.as_ref())?,
        })
    }
}

/// A retry policy as a start asks for it; what it leaves unset takes the server's defaults.
#[derive(Debug, Clone)]
pub struct RetrySpec {
    /// 0: the default.
    pub max_attempts: u32,
    pub initial_interval: Option<Duration>,
    pub max_interval: Option<Duration>,
    /// 0: the default; else 1 to 100.
    pub backoff_coefficient: f64,
    pub non_retryable_error_types: Vec<String>,
}

impl TryFrom<&v1::RetryPolicy> for RetrySpec {
    type Error = Error;
    fn try_from(p: &v1::RetryPolicy) -> Result<Self> {
        let initial = match &p.initial_interval {
            None => None,
            Some(d) => Some(validate::duration("retry_policy.initial_interval", Some(d), DAY)?),
        };
        let max = match &p.max_interval {
            None => None,
            Some(d) => Some(validate::duration("retry_policy.max_interval", Some(d), DAY)?),
        };
        if p.backoff_coefficient != 0.0 && !(1.0..=100.0).contains(&p.backoff_coefficient) {
            return Err(Error::InvalidArgument(format!(
                "retry_policy.backoff_coefficient must be between 1 and 100, got {}",
                p.backoff_coefficient
            )));
        }
        if p.max_attempts > 1000 {
            return Err(Error::InvalidArgument(format!(
                "retry_policy.max_attempts must be at most 1000, got {}",
                p.max_attempts
            )));
        }
        for t in &p.non_retryable_error_types {
            validate::name("retry_policy.non_retryable_error_types entry", t, 128)?;
        }
        Ok(Self {
            max_attempts: p.max_attempts,
            initial_interval: initial,
            max_interval: max,
            backoff_coefficient: p.backoff_coefficient,
            non_retryable_error_types: p.non_retryable_error_types.clone(),
        })
    }
}

/// A run to start.
#[derive(Debug, Clone)]
pub struct StartRun {
    pub namespace: String,
    pub id: Uuid,
    /// The id is the client's request id (a UUIDv7), which dedupes the start like a key.
    pub id_from_request: bool,
    pub workflow: String,
    pub version: String,
    pub queue: String,
    pub priority: i32,
    pub input: Json,
    pub idempotency_key: Option<String>,
    pub request_id: Option<String>,
    pub return_existing: bool,
    pub delay: Duration,
    /// `None`: the server's default policy.
    pub retry: Option<RetrySpec>,
    pub parent: Option<Uuid>,
    pub timeouts: Timeouts,
}

impl TryFrom<&StartRunRequest> for StartRun {
    type Error = Error;
    fn try_from(r: &StartRunRequest) -> Result<Self> {
        let idempotency_key = validate::opt_name("idempotency_key", &r.idempotency_key, 255)?;
        let request_id = match idempotency_key {
            Some(_) => None,
            None => validate::opt_name("request_id", &r.request_id, 255)?,
        };
        // A request id that is a UUIDv7 (the SDK sends those) becomes the run's id: the primary
        // key then deduplicates the retries, and no index of request ids is written (on the
        // insert, and again on every update of the run that is not HOT). Any other request id
        // is kept in its own column, deduplicated by its own unique index.
        let (id, request_id, id_from_request) = match request_id {
            Some(r) => match Uuid::parse_str(&r) {
                Ok(id) if id.get_version_num() == 7 => (id, None, true),
                _ => (Uuid::now_v7(), Some(r), false),
            },
            None => (Uuid::now_v7(), None, false),
        };
        if !(-1000..=1000).contains(&r.priority) {
            return Err(Error::InvalidArgument(format!(
                "priority must be between -1000 and 1000, got {}",
                r.priority
            )));
        }
        let return_existing = match ConflictPolicy::try_from(r.conflict_policy) {
            Ok(ConflictPolicy::ReturnExisting) => true,
            Ok(_) => false,
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "unknown conflict_policy {}",
                    r.conflict_policy
                )));
            }
        };
        let one = |what: &str, d: Option<&prost_types::Duration>| -> Result<Option<Duration>> {
            Ok(Some(validate::duration(what, d, YEAR)?).filter(|d| !d.is_zero()))
        };
        Ok(Self {
            namespace: validate::namespace(&r.namespace)?,
            id,
            id_from_request,
            workflow: validate::name("workflow", &r.workflow, 128)?,
            version: validate::opt_name("version", &r.version, 64)?.unwrap_or_default(),
            queue: validate::opt_name("queue", &r.queue, 128)?.unwrap_or_else(|| "default".to_owned()),
            priority: r.priority,
            input: validate::payload_json("input", r.input.as_ref())?,
            idempotency_key,
            request_id,
            return_existing,
            delay: validate::duration("delay", r.delay.as_ref(), YEAR)?,
            retry: r.retry_policy.as_ref().map(RetrySpec::try_from).transpose()?,
            parent: match r.parent_run_id.as_str() {
                "" => None,
                p => Some(validate::uuid("parent_run_id", p)?),
            },
            timeouts: Timeouts {
                execution: one("execution_timeout", r.execution_timeout.as_ref())?,
                attempt: one("attempt_timeout", r.attempt_timeout.as_ref())?,
                schedule_to_start: one("schedule_to_start_timeout", r.schedule_to_start_timeout.as_ref())?,
                heartbeat: one("heartbeat_timeout", r.heartbeat_timeout.as_ref())?,
            },
        })
    }
}

/// A worker's registration.
#[derive(Debug, Clone)]
pub struct Register {
    pub namespace: String,
    pub identity: String,
    pub host: String,
    pub queues: Vec<String>,
    /// (workflow, version); version '' for none.
    pub workflows: Vec<(String, String)>,
    pub slots: u32,
}

impl TryFrom<&RegisterWorkerRequest> for Register {
    type Error = Error;
    fn try_from(req: &RegisterWorkerRequest) -> Result<Self> {
        let namespace = validate::namespace(&req.namespace)?;
        let identity = validate::opt_name("identity", &req.identity, 255)?.unwrap_or_else(|| "worker".into());
        let host = validate::opt_name("host", &req.host, 255)?.unwrap_or_default();
        if req.queues.is_empty() || req.queues.len() > 100 {
            return Err(Error::InvalidArgument(format!(
                "a worker serves 1 to 100 queues, got {}",
                req.queues.len()
            )));
        }
        let queues = req
            .queues
            .iter()
            .map(|q| validate::name("queue", q, 128))
            .collect::<Result<Vec<_>>>()?;
        if req.workflows.is_empty() || req.workflows.len() > 1000 {
            return Err(Error::InvalidArgument(format!(
                "a worker serves 1 to 1000 workflows, got {} (name \"*\" serves every workflow)",
                req.workflows.len()
            )));
        }
        let mut workflows = Vec::new();
        for w in &req.workflows {
            let name = validate::name("workflow", &w.name, 128)?;
            let version = validate::opt_name("version", &w.version, 64)?.unwrap_or_default();
            if name == "*" && !version.is_empty() {
                return Err(Error::InvalidArgument(
                    "workflow \"*\" (every workflow) serves unpinned runs only: give it no version".into(),
                ));
            }
            workflows.push((name, version));
        }
        if req.slots == 0 || req.slots > 100_000 {
            return Err(Error::InvalidArgument(format!(
                "slots must be 1 to 100000, got {}",
                req.slots
            )));
        }
        Ok(Self {
            namespace,
            identity,
            host,
            queues,
            workflows,
            slots: req.slots,
        })
    }
}

/// A poll for work.
#[derive(Debug, Clone)]
pub struct Poll {
    pub namespace: String,
    pub worker: Uuid,
    /// Empty: every queue the worker registered.
    pub queues: Vec<String>,
    pub max_runs: u32,
    /// How long to wait for work (the server's `max_poll_wait` caps it).
    pub wait: Duration,
}

impl TryFrom<&PollTasksRequest> for Poll {
    type Error = Error;
    fn try_from(req: &PollTasksRequest) -> Result<Self> {
        if req.max_runs == 0 || req.max_runs > MAX_POLL_BATCH {
            return Err(Error::InvalidArgument(format!(
                "max_runs must be 1 to {MAX_POLL_BATCH}, got {}",
                req.max_runs
            )));
        }
        Ok(Self {
            namespace: validate::namespace(&req.namespace)?,
            worker: validate::uuid("worker_id", &req.worker_id)?,
            queues: if req.queues.len() > 100 {
                return Err(Error::InvalidArgument(format!(
                    "a poll names at most 100 queues, got {}",
                    req.queues.len()
                )));
            } else {
                req.queues
                    .iter()
                    .map(|q| validate::name("queue", q, 128))
                    .collect::<Result<Vec<_>>>()?
            },
            max_runs: req.max_runs,
            wait: validate::duration("wait", req.wait.as_ref(), Duration::from_secs(3600))?,
        })
    }
}

/// A heartbeat: the leases a worker holds.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub namespace: String,
    pub worker: Uuid,
    pub ids: Vec<Uuid>,
    pub tokens: Vec<Uuid>,
}

impl TryFrom<&HeartbeatRequest> for Heartbeat {
    type Error = Error;
    fn try_from(req: &HeartbeatRequest) -> Result<Self> {
        let namespace = validate::namespace(&req.namespace)?;
        let worker = validate::uuid("worker_id", &req.worker_id)?;
        if req.leases.len() > MAX_HEARTBEAT_LEASES {
            return Err(Error::InvalidArgument(format!(
                "a heartbeat names at most {MAX_HEARTBEAT_LEASES} leases"
            )));
        }
        let mut ids = Vec::with_capacity(req.leases.len());
        let mut tokens = Vec::with_capacity(req.leases.len());
        for l in &req.leases {
            ids.push(validate::uuid("leases.run_id", &l.run_id)?);
            tokens.push(validate::uuid("leases.lease_token", &l.lease_token)?);
        }
        Ok(Self {
            namespace,
            worker,
            ids,
            tokens,
        })
    }
}

/// The lease a report names: namespace, run and token.
#[derive(Debug, Clone)]
pub struct LeaseRef {
    pub namespace: String,
    pub id: Uuid,
    pub token: Uuid,
}

impl LeaseRef {
    fn new(namespace: &str, run_id: &str, token: &str) -> Result<Self> {
        Ok(Self {
            namespace: validate::namespace(namespace)?,
            id: validate::uuid("run_id", run_id)?,
            token: validate::uuid("lease_token", token)?,
        })
    }
}

/// A task result as reported, its payloads checked for form (their size is the engine's).
#[derive(Debug, Clone)]
pub struct TaskReport {
    pub key: String,
    pub name: String,
    pub seq: u32,
    pub result: TaskOutcome,
}

/// What a task produced.
#[derive(Debug, Clone)]
pub enum TaskOutcome {
    Output(Json),
    Error(ErrorReport),
}

impl TryFrom<&TaskResult> for TaskReport {
    type Error = Error;
    fn try_from(task: &TaskResult) -> Result<Self> {
        let result = match &task.result {
            Some(task_result::Result::Output(v)) => {
                TaskOutcome::Output(validate::payload_json("task.output", Some(v))?)
            }
            Some(task_result::Result::Error(e)) => TaskOutcome::Error(ErrorReport::from(e)),
            None => return Err(Error::InvalidArgument("task.output or task.error is required".into())),
        };
        if task.seq > i32::MAX as u32 {
            return Err(Error::InvalidArgument(format!("task.seq {} is too large", task.seq)));
        }
        Ok(Self {
            key: validate::name("task.key", &task.key, 512)?,
            name: validate::name("task.name", &task.name, 255)?,
            seq: task.seq,
            result,
        })
    }
}

/// An error as a worker reports it. A failure must always be reportable, so nothing in it is
/// refused: text is trimmed, and details that cannot be stored are replaced by a note (see
/// `Engine::error_json`).
#[derive(Debug, Clone)]
pub struct ErrorReport {
    pub r#type: String,
    pub message: String,
    pub details: Option<prost_types::Value>,
}

impl From<&v1::RunError> for ErrorReport {
    fn from(e: &v1::RunError) -> Self {
        Self {
            r#type: validate::text(&e.r#type, 128),
            message: validate::text(&e.message, 16 * 1024),
            details: e.details.clone(),
        }
    }
}

/// `RecordTask`.
#[derive(Debug, Clone)]
pub struct Record {
    pub lease: LeaseRef,
    pub task: TaskReport,
}

impl TryFrom<&RecordTaskRequest> for Record {
    type Error = Error;
    fn try_from(r: &RecordTaskRequest) -> Result<Self> {
        let lease = LeaseRef::new(&r.namespace, &r.run_id, &r.lease_token)?;
        let task = r
            .task
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("task is required".into()))?;
        Ok(Self {
            lease,
            task: TaskReport::try_from(task)?,
        })
    }
}

/// `CompleteRun`.
#[derive(Debug, Clone)]
pub struct Complete {
    pub lease: LeaseRef,
    pub output: Json,
    pub tasks: Vec<TaskReport>,
}

impl TryFrom<&CompleteRunRequest> for Complete {
    type Error = Error;
    fn try_from(r: &CompleteRunRequest) -> Result<Self> {
        let lease = LeaseRef::new(&r.namespace, &r.run_id, &r.lease_token)?;
        let output = validate::payload_json("output", r.output.as_ref())?;
        if r.tasks.len() > MAX_REPORTS {
            return Err(Error::InvalidArgument(format!(
                "a completion carries at most {MAX_REPORTS} task results, got {}",
                r.tasks.len()
            )));
        }
        let tasks = r
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| TaskReport::try_from(t).map_err(|e| e.within(&format!("tasks[{i}]"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { lease, output, tasks })
    }
}

/// `FailRun`.
#[derive(Debug, Clone)]
pub struct Fail {
    pub lease: LeaseRef,
    pub error: ErrorReport,
    pub non_retryable: bool,
    pub retry_after: Option<Duration>,
}

impl TryFrom<&FailRunRequest> for Fail {
    type Error = Error;
    fn try_from(r: &FailRunRequest) -> Result<Self> {
        Ok(Self {
            lease: LeaseRef::new(&r.namespace, &r.run_id, &r.lease_token)?,
            error: r
                .error
                .as_ref()
                .map(ErrorReport::from)
                .ok_or_else(|| Error::InvalidArgument("error is required".into()))?,
            non_retryable: r.non_retryable,
            retry_after: match &r.retry_after {
                None => None,
                Some(d) => Some(validate::duration("retry_after", Some(d), DAY)?),
            },
        })
    }
}

/// `ReleaseRun`.
#[derive(Debug, Clone)]
pub struct Release {
    pub lease: LeaseRef,
    pub reason: String,
    pub delay: Duration,
}

impl TryFrom<&ReleaseRunRequest> for Release {
    type Error = Error;
    fn try_from(r: &ReleaseRunRequest) -> Result<Self> {
        Ok(Self {
            lease: LeaseRef::new(&r.namespace, &r.run_id, &r.lease_token)?,
            reason: validate::text(&r.reason, 1024),
            delay: validate::duration("delay", r.delay.as_ref(), DAY)?,
        })
    }
}

/// `SuspendRun`: the run waits at a step.
#[derive(Debug, Clone)]
pub struct Suspend {
    pub lease: LeaseRef,
    pub key: String,
    pub name: String,
    pub seq: u32,
    pub wait: Wait,
}

impl TryFrom<&SuspendRunRequest> for Suspend {
    type Error = Error;
    fn try_from(req: &SuspendRunRequest) -> Result<Self> {
        let lease = LeaseRef::new(&req.namespace, &req.run_id, &req.lease_token)?;
        let wait = match (req.event.as_str(), req.child_run_id.as_str()) {
            ("", "") => {
                if req.sleep.is_none() {
                    return Err(Error::InvalidArgument(
                        "a suspension needs a sleep, an event or a child_run_id to wait for".into(),
                    ));
                }
                Wait::Sleep(validate::duration("sleep", req.sleep.as_ref(), YEAR)?)
            }
            (event, "") => Wait::Event {
                name: validate::name("event", event, 255)?,
                timeout: match &req.sleep {
                    None => None,
                    Some(d) => Some(validate::duration("sleep (the event's timeout)", Some(d), YEAR)?),
                },
            },
            ("", child) => {
                if req.sleep.is_some() {
                    return Err(Error::InvalidArgument(
                        "a wait for a child run has no timeout: leave sleep unset".into(),
                    ));
                }
                let child = validate::uuid("child_run_id", child)?;
                if child == lease.id {
                    return Err(Error::InvalidArgument("a run cannot wait for itself".into()));
                }
                Wait::Child(child)
            }
            _ => {
                return Err(Error::InvalidArgument(
                    "a suspension waits for an event or for a child run, not both".into(),
                ));
            }
        };
        if req.wait_seq > i32::MAX as u32 {
            return Err(Error::InvalidArgument(format!(
                "wait_seq {} is too large",
                req.wait_seq
            )));
        }
        Ok(Self {
            lease,
            key: validate::name("wait_key", &req.wait_key, 512)?,
            name: validate::name("wait_name", &req.wait_name, 255)?,
            seq: req.wait_seq,
            wait,
        })
    }
}
