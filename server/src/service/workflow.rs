//! `aiki.v1.WorkflowService`: starting runs and reading them.

use std::{pin::Pin, sync::Arc, time::Duration};

use aiki_proto::v1::{
    CancelRunRequest, ConflictPolicy, GetRunHistoryRequest, GetRunHistoryResponse, GetRunRequest, GetRunResultRequest,
    GetRunResultResponse, HistoryEvent, ListRunsRequest, ListRunsResponse, PauseRunRequest, ResumeRunRequest, Run,
    SendEventRequest, SendEventResponse, StartRunRequest, StartRunResponse, StartRunsRequest, StartRunsResponse,
    WakeRunRequest, WatchRunRequest, get_run_request, send_event_request, workflow_service_server::WorkflowService,
};
use futures::Stream;
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use super::{Shared, run_changed};
use crate::{
    error::{Error, Result},
    status::RunStatus,
    store::{NewRun, RetryPolicy, RunFilter, RunRef, Timeouts},
    validate,
};

/// Longest `GetRunResult` wait.
const MAX_RESULT_WAIT: Duration = Duration::from_secs(600);
/// Most events in one `GetRunHistory` answer or one read of `WatchRun`.
const HISTORY_PAGE: i64 = 1000;
/// Most runs in one `StartRuns`.
const MAX_BATCH: usize = 1000;

#[derive(Debug, Clone)]
pub struct WorkflowSvc(pub Arc<Shared>);

impl WorkflowSvc {
    fn new_run(&self, r: &StartRunRequest) -> Result<NewRun> {
        let c = &self.0.config;
        let namespace = validate::namespace(&r.namespace)?;
        let workflow = validate::name("workflow", &r.workflow, 128)?;
        let version = validate::opt_name("version", &r.version, 64)?.unwrap_or_default();
        let queue = validate::opt_name("queue", &r.queue, 128)?.unwrap_or_else(|| "default".to_owned());
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
        let input = validate::payload("input", r.input.as_ref(), c.max_payload_bytes)?;
        let delay = validate::duration("delay", r.delay.as_ref(), Duration::from_secs(366 * 86_400))?;
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
        let d = &c.default_retry;
        let retry = match &r.retry_policy {
            None => RetryPolicy {
                max_attempts: d.max_attempts,
                initial_interval: d.initial_interval,
                max_interval: d.max_interval,
                backoff_coefficient: d.backoff_coefficient,
                non_retryable_error_types: Vec::new(),
            },
            Some(p) => {
                let day = Duration::from_secs(86_400);
                let initial = validate::duration("retry_policy.initial_interval", p.initial_interval.as_ref(), day)?;
                let max = validate::duration("retry_policy.max_interval", p.max_interval.as_ref(), day)?;
                let coefficient = if p.backoff_coefficient == 0.0 {
                    d.backoff_coefficient
                } else {
                    p.backoff_coefficient
                };
                if !(1.0..=100.0).contains(&coefficient) {
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
                let initial = if p.initial_interval.is_none() {
                    d.initial_interval
                } else {
                    initial
                };
                let max = if p.max_interval.is_none() {
                    d.max_interval.max(initial)
                } else {
                    max
                };
                if max < initial {
                    return Err(Error::InvalidArgument(
                        "retry_policy.max_interval must not be shorter than initial_interval".into(),
                    ));
                }
                for t in &p.non_retryable_error_types {
                    validate::name("retry_policy.non_retryable_error_types entry", t, 128)?;
                }
                RetryPolicy {
                    max_attempts: if p.max_attempts == 0 {
                        d.max_attempts
                    } else {
                        p.max_attempts
                    },
                    initial_interval: initial,
                    max_interval: max,
                    backoff_coefficient: coefficient,
                    non_retryable_error_types: p.non_retryable_error_types.clone(),
                }
            }
        };
        Ok(NewRun {
            namespace,
            id,
            id_from_request,
            workflow,
            version,
            queue,
            priority: r.priority,
            input,
            idempotency_key,
            request_id,
            return_existing,
            delay,
            retry,
            parent: match r.parent_run_id.as_str() {
                "" => None,
                p => Some(validate::uuid("parent_run_id", p)?),
            },
            timeouts: self.timeouts(r)?,
        })
    }

    /// A start's timeouts: each optional (unset or zero: none), at most a year; a heartbeat
    /// timeout leaves room for two heartbeats.
    fn timeouts(&self, r: &StartRunRequest) -> Result<Timeouts> {
        let year = Duration::from_secs(366 * 86_400);
        let one = |what: &str, d: Option<&prost_types::Duration>| -> Result<Option<Duration>> {
            Ok(Some(validate::duration(what, d, year)?).filter(|d| !d.is_zero()))
        };
        let t = Timeouts {
            execution: one("execution_timeout", r.execution_timeout.as_ref())?,
            attempt: one("attempt_timeout", r.attempt_timeout.as_ref())?,
            schedule_to_start: one("schedule_to_start_timeout", r.schedule_to_start_timeout.as_ref())?,
            heartbeat: one("heartbeat_timeout", r.heartbeat_timeout.as_ref())?,
        };
        let floor = self.0.config.heartbeat_interval * 2;
        if let Some(h) = t.heartbeat
            && h < floor
        {
            return Err(Error::InvalidArgument(format!(
                "heartbeat_timeout must be at least {floor:?}, twice the server's heartbeat interval, got {h:?}"
            )));
        }
        Ok(t)
    }

    /// Starts the runs of one `StartRuns` call: all of them, or none.
    async fn start(&self, runs: Vec<NewRun>) -> Result<Vec<StartRunResponse>> {
        let started = self.0.store.start_runs(&runs, true).await?;
        runs.iter()
            .zip(started)
            .map(|(new, answer)| {
                answer.map(|(run, created)| self.started(&new.namespace, &new.queue, new.delay, run, created))
            })
            .collect()
    }

    /// Wakes the pollers of a created run's queue and builds the answer. A created run's input
    /// is what the caller just sent: not sent back.
    fn started(&self, namespace: &str, queue: &str, delay: Duration, mut run: Run, created: bool) -> StartRunResponse {
        if created {
            self.0
                .wakers
                .queue_ready((namespace.to_owned(), queue.to_owned()), Some(delay));
            run.input = None;
        }
        StartRunResponse {
            run: Some(run),
            created,
        }
    }

    async fn get(&self, namespace: &str, id: Uuid) -> Result<Run> {
        self.0
            .store
            .get_run(namespace, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("run {id} not found")))
    }
}

/// A reason kept in a run's history (cancel, pause): at most 1024 characters.
fn reason(text: &str) -> Result<String> {
    if text.chars().count() > 1024 {
        return Err(Error::InvalidArgument("reason must be at most 1024 characters".into()));
    }
    Ok(validate::text(text, 1024))
}

/// Waits until `notify` fires, `recheck_interval` passes, `deadline` comes or the server shuts down.
async fn wait_change(
    shared: &Shared,
    notified: Pin<&mut tokio::sync::futures::Notified<'_>>,
    deadline: tokio::time::Instant,
) {
    tokio::select! {
        _ = notified => {}
        _ = tokio::time::sleep(shared.config.recheck_interval) => {}
        _ = tokio::time::sleep_until(deadline) => {}
        _ = shared.shutdown.cancelled() => {}
    }
}

#[tonic::async_trait]
impl WorkflowService for WorkflowSvc {
    #[instrument(name = "rpc.StartRun", skip_all, fields(workflow = %req.get_ref().workflow))]
    async fn start_run(&self, req: Request<StartRunRequest>) -> Result<Response<StartRunResponse>, Status> {
        let bytes = req.get_ref().encoded_len();
        let new = self.new_run(req.get_ref())?;
        // Coalesced with other single starts arriving at the same time into one transaction.
        let (namespace, queue, delay) = (new.namespace.clone(), new.queue.clone(), new.delay);
        let (run, created) = self.0.starter.apply(new, bytes).await?;
        Ok(Response::new(self.started(&namespace, &queue, delay, run, created)))
    }

    #[instrument(name = "rpc.StartRuns", skip_all, fields(count = req.get_ref().runs.len()))]
    async fn start_runs(&self, req: Request<StartRunsRequest>) -> Result<Response<StartRunsResponse>, Status> {
        let req = req.into_inner();
        if req.runs.is_empty() || req.runs.len() > MAX_BATCH {
            return Err(Error::InvalidArgument(format!(
                "StartRuns takes 1 to {MAX_BATCH} runs, got {}",
                req.runs.len()
            ))
            .into());
        }
        let runs = req
            .runs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                self.new_run(r).map_err(|e| match e {
                    Error::InvalidArgument(m) => Error::InvalidArgument(format!("runs[{i}]: {m}")),
                    Error::ResourceExhausted(m) => Error::ResourceExhausted(format!("runs[{i}]: {m}")),
                    e => e,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Response::new(StartRunsResponse {
            results: self.start(runs).await?,
        }))
    }

    #[instrument(name = "rpc.GetRun", skip_all)]
    async fn get_run(&self, req: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let run = match req.r#ref {
            Some(get_run_request::Ref::RunId(id)) => self.get(&ns, validate::uuid("run_id", &id)?).await?,
            Some(get_run_request::Ref::IdempotencyKey(key)) => {
                let key = validate::name("idempotency_key", &key, 255)?;
                self.0
                    .store
                    .get_run_by_key(&ns, &key)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("no run has idempotency key {key:?}")))?
            }
            None => {
                return Err(Error::InvalidArgument("give run_id or idempotency_key".into()).into());
            }
        };
        Ok(Response::new(run))
    }

    #[instrument(name = "rpc.GetRunResult", skip_all)]
    async fn get_run_result(
        &self,
        req: Request<GetRunResultRequest>,
    ) -> Result<Response<GetRunResultResponse>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let id = validate::uuid("run_id", &req.run_id)?;
        let timeout = validate::duration("timeout", req.timeout.as_ref(), MAX_RESULT_WAIT)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let notify = self.0.wakers.runs.subscribe(&id);
        let result = async {
            loop {
                let notified = notify.notify().notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let run = self.get(&ns, id).await?;
                let done = status_of_run(&run).is_some_and(RunStatus::is_terminal);
                if done || tokio::time::Instant::now() >= deadline || self.0.shutdown.is_cancelled() {
                    return Ok(GetRunResultResponse { run: Some(run), done });
                }
                wait_change(&self.0, notified, deadline).await;
            }
        }
        .await;
        result.map(Response::new).map_err(|e: Error| e.into())
    }

    #[instrument(name = "rpc.ListRuns", skip_all)]
    async fn list_runs(&self, req: Request<ListRunsRequest>) -> Result<Response<ListRunsResponse>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let limit = match req.page_size {
            0 => 100,
            n @ 1..=1000 => n,
            n => {
                return Err(Error::InvalidArgument(format!("page_size must be 1 to 1000, got {n}")).into());
            }
        };
        let statuses = req
            .statuses
            .iter()
            .map(|s| {
                crate::status::RunStatus::from_proto(*s)
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
        let filter = RunFilter {
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
        };
        let runs = self.0.store.list_runs(&ns, &filter).await?;
        let next_page_token = if runs.len() == limit as usize {
            runs.last().map(|r| r.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListRunsResponse { runs, next_page_token }))
    }

    #[instrument(name = "rpc.CancelRun", skip_all)]
    async fn cancel_run(&self, req: Request<CancelRunRequest>) -> Result<Response<Run>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let id = validate::uuid("run_id", &req.run_id)?;
        let run = self.0.store.cancel_run(&ns, id, &reason(&req.reason)?).await?;
        run_changed(&self.0, id);
        Ok(Response::new(run))
    }

    #[instrument(name = "rpc.PauseRun", skip_all)]
    async fn pause_run(&self, req: Request<PauseRunRequest>) -> Result<Response<Run>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let id = validate::uuid("run_id", &req.run_id)?;
        let run = self.0.store.pause_run(&ns, id, &reason(&req.reason)?).await?;
        run_changed(&self.0, id);
        Ok(Response::new(run))
    }

    #[instrument(name = "rpc.WakeRun", skip_all)]
    async fn wake_run(&self, req: Request<WakeRunRequest>) -> Result<Response<Run>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let id = validate::uuid("run_id", &req.run_id)?;
        let run = self.0.store.wake_run(&ns, id).await?;
        run_changed(&self.0, id);
        if status_of_run(&run) == Some(RunStatus::Queued) {
            self.0.wakers.queue_ready((ns, run.queue.clone()), None);
        }
        Ok(Response::new(run))
    }

    #[instrument(name = "rpc.SendEvent", skip_all)]
    async fn send_event(&self, req: Request<SendEventRequest>) -> Result<Response<SendEventResponse>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let target = match &req.r#ref {
            Some(send_event_request::Ref::RunId(id)) => RunRef::Id(validate::uuid("run_id", id)?),
            Some(send_event_request::Ref::IdempotencyKey(k)) => RunRef::Key(validate::name("idempotency_key", k, 255)?),
            None => return Err(Error::InvalidArgument("give run_id or idempotency_key".into()).into()),
        };
        let name = validate::name("event name", &req.name, 255)?;
        let event_key = validate::opt_name("event_key", &req.event_key, 255)?;
        let payload = validate::payload("payload", req.payload.as_ref(), self.0.config.max_payload_bytes)?;
        let (stored, delivered, run) = self
            .0
            .store
            .send_event(&ns, &target, &name, &payload, event_key.as_deref())
            .await?;
        if let Ok(id) = Uuid::parse_str(&run.id) {
            run_changed(&self.0, id);
        }
        if delivered && status_of_run(&run) == Some(RunStatus::Queued) {
            self.0.wakers.queue_ready((ns, run.queue.clone()), None);
        }
        Ok(Response::new(SendEventResponse {
            stored,
            delivered,
            run: Some(run),
        }))
    }

    #[instrument(name = "rpc.ResumeRun", skip_all)]
    async fn resume_run(&self, req: Request<ResumeRunRequest>) -> Result<Response<Run>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let id = validate::uuid("run_id", &req.run_id)?;
        let (run, queued) = self.0.store.resume_run(&ns, id).await?;
        run_changed(&self.0, id);
        if let Some(delay) = queued {
            self.0.wakers.queue_ready((ns, run.queue.clone()), Some(delay));
        }
        Ok(Response::new(run))
    }

    #[instrument(name = "rpc.GetRunHistory", skip_all)]
    async fn get_run_history(
        &self,
        req: Request<GetRunHistoryRequest>,
    ) -> Result<Response<GetRunHistoryResponse>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let id = validate::uuid("run_id", &req.run_id)?;
        let events = self.0.store.history(&ns, id, req.after_seq, HISTORY_PAGE).await?;
        if events.is_empty() && req.after_seq <= 0 {
            self.get(&ns, id).await?;
        }
        let more = events.len() as i64 == HISTORY_PAGE;
        Ok(Response::new(GetRunHistoryResponse { events, more }))
    }

    type WatchRunStream = Pin<Box<dyn Stream<Item = Result<HistoryEvent, Status>> + Send + 'static>>;

    #[instrument(name = "rpc.WatchRun", skip_all)]
    async fn watch_run(&self, req: Request<WatchRunRequest>) -> Result<Response<Self::WatchRunStream>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let id = validate::uuid("run_id", &req.run_id)?;
        self.get(&ns, id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let shared = self.0.clone();
        let mut after = req.after_seq;
        tokio::spawn(async move {
            let notify = shared.wakers.runs.subscribe(&id);
            let result: Result<()> = async {
                loop {
                    let notified = notify.notify().notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    // Read the status first: events written before a terminal status are then
                    // all visible to the history read that follows.
                    let run = shared.store.get_run(&ns, id).await?;
                    let events = shared.store.history(&ns, id, after, HISTORY_PAGE).await?;
                    let more = events.len() as i64 == HISTORY_PAGE;
                    for e in events {
                        after = e.seq;
                        if tx.send(Ok(e)).await.is_err() {
                            return Ok(());
                        }
                    }
                    let ended = run.is_none_or(|r| status_of_run(&r).is_some_and(RunStatus::is_terminal));
                    if (ended && !more) || shared.shutdown.is_cancelled() {
                        return Ok(());
                    }
                    if !more {
                        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
                        tokio::select! {
                            _ = wait_change(&shared, notified, far) => {}
                            // The client went away: stop reading for it.
                            _ = tx.closed() => return Ok(()),
                        }
                    }
                }
            }
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

fn status_of_run(run: &Run) -> Option<RunStatus> {
    RunStatus::from_proto(run.status)
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
