//! `aiki.v1.WorkerService`: the lease protocol.

use std::{sync::Arc, time::Duration};

use aiki_proto::v1::{
    CompleteRunRequest, CompleteRunResponse, FailRunRequest, FailRunResponse, HeartbeatRequest, HeartbeatResponse,
    LeasedRun, PollTasksRequest, PollTasksResponse, RecordTaskRequest, RecordTaskResponse, RegisterWorkerRequest,
    RegisterWorkerResponse, ReleaseRunRequest, ReleaseRunResponse, ReportError, ReportRequest, ReportResponse,
    ReportResult, RunStatus, SuspendRunRequest, SuspendRunResponse, TaskResult, report_result, run_report, task_result,
    worker_service_server::WorkerService,
};
use futures::future::select_all;
use prost::Message;
use serde_json::json;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use super::{Shared, run_changed};
use crate::{
    error::{Error, Result},
    store::{Applied, LeaseEnd, NewTask, Registration, Report, Wait},
    validate,
};

/// Most runs one poll may lease.
const MAX_POLL_BATCH: u32 = 1000;
/// Most runs leased by a poll's first claim statement; later ones are sized by what the first
/// runs weighed.
const FIRST_CLAIM_CHUNK: u32 = 16;
/// A poll stops leasing more runs once its answer is this large.
const REPLY_BUDGET: usize = 16 * 1024 * 1024;
/// Most reports in one `Report` call.
const MAX_REPORTS: usize = 1000;
/// Most leases one heartbeat may name.
const MAX_HEARTBEAT_LEASES: usize = 10_000;
/// How soon a poll that skipped a locked ready run looks again, first and at most. Such a lock
/// is held by a short transaction (a claim, a report batch, a heartbeat), so the first pause
/// is short; it doubles while the run stays locked.
const RELOOK_MIN: Duration = Duration::from_millis(5);
const RELOOK_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct WorkerSvc(pub Arc<Shared>);

/// A reported error made storable. A failure must always be reportable, so what cannot be
/// stored is trimmed or replaced rather than refused.
fn error_json(e: Option<&aiki_proto::v1::RunError>, max: usize) -> Result<serde_json::Value> {
    let e = e.ok_or_else(|| Error::InvalidArgument("error is required".into()))?;
    let details = match validate::payload("error.details", e.details.as_ref(), max) {
        Ok(d) => d,
        Err(problem) => json!({"dropped": problem.to_string()}),
    };
    Ok(json!({
        "type": validate::text(&e.r#type, 128),
        "message": validate::text(&e.message, 16 * 1024),
        "details": details,
    }))
}

impl WorkerSvc {
    /// Leases up to `max` ready runs of `queues`, starting at a random one. Answers them, and,
    /// when it leased none, whether a ready run was left all the same (its row locked by another
    /// transaction, or it became ready after the claim looked): the poll then looks again soon.
    async fn claim_any(
        &self,
        ns: &str,
        queues: &[String],
        max: u32,
        worker: Uuid,
        served: &Registration,
    ) -> Result<(Vec<LeasedRun>, bool)> {
        let mut out = Vec::with_capacity(max.min(MAX_POLL_BATCH) as usize);
        // Start at a different queue each time so that one busy queue does not starve the rest.
        let start = if queues.len() > 1 {
            rand::random_range(0..queues.len())
        } else {
            0
        };
        let mut size = 0;
        'queues: for i in 0..queues.len() {
            let q = &queues[(start + i) % queues.len()];
            loop {
                // Claimed in chunks sized by what the runs claimed so far weigh, so that the
                // answer stays near REPLY_BUDGET: every run carries its input and recorded tasks.
                let chunk = match out.len() {
                    0 => FIRST_CLAIM_CHUNK,
                    n => ((REPLY_BUDGET.saturating_sub(size)) / (size / n).max(1)).clamp(1, MAX_POLL_BATCH as usize)
                        as u32,
                };
                let want = (max - out.len() as u32).min(chunk);
                if want == 0 || size >= REPLY_BUDGET {
                    break 'queues;
                }
                match self
                    .0
                    .store
                    .claim(ns, q, want, worker, self.0.config.lease_ttl, served)
                    .await
                {
                    Ok(runs) => {
                        let got = runs.len() as u32;
                        size += runs.iter().map(prost::Message::encoded_len).sum::<usize>();
                        out.extend(runs);
                        if got < want {
                            break;
                        }
                    }
                    // Runs already leased by this poll must reach the worker: answer with them.
                    Err(e) if !out.is_empty() => {
                        tracing::warn!(error = %e, queue = %q, "claim failed; answering with the runs already leased");
                        break 'queues;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        // A claim skips the rows other transactions hold locked, and nothing may wake the
        // pollers when those locks go: a poll that leased nothing asks whether a ready run is
        // still there, so that it looks again soon. One that leased runs answers with them at
        // once, and the worker's next poll looks again: asking after every short claim cost
        // each lightly loaded poll a round trip before its answer.
        if out.is_empty() {
            for q in queues {
                if self.0.store.ready_left(ns, q, served).await? {
                    return Ok((out, true));
                }
            }
        }
        for r in &out {
            if let Ok(id) = Uuid::parse_str(&r.run_id) {
                run_changed(&self.0, id);
            }
        }
        Ok((out, false))
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerSvc {
    #[instrument(name = "rpc.RegisterWorker", skip_all, fields(identity = %req.get_ref().identity))]
    async fn register_worker(
        &self,
        req: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let identity = validate::opt_name("identity", &req.identity, 255)?.unwrap_or_else(|| "worker".into());
        let host = validate::opt_name("host", &req.host, 255)?.unwrap_or_default();
        if req.queues.is_empty() || req.queues.len() > 100 {
            return Err(
                Error::InvalidArgument(format!("a worker serves 1 to 100 queues, got {}", req.queues.len())).into(),
            );
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
            ))
            .into());
        }
        let mut workflows = Vec::new();
        for w in &req.workflows {
            let name = validate::name("workflow", &w.name, 128)?;
            let version = validate::opt_name("version", &w.version, 64)?.unwrap_or_default();
            if name == "*" && !version.is_empty() {
                return Err(Error::InvalidArgument(
                    "workflow \"*\" (every workflow) serves unpinned runs only: give it no version".into(),
                )
                .into());
            }
            workflows.push((name, version));
        }
        if req.slots == 0 || req.slots > 100_000 {
            return Err(Error::InvalidArgument(format!("slots must be 1 to 100000, got {}", req.slots)).into());
        }
        let id = self
            .0
            .store
            .register_worker(&ns, &identity, &host, &workflows, &queues, req.slots)
            .await?;
        tracing::info!(worker_id = %id, identity, "worker registered");
        let c = &self.0.config;
        Ok(Response::new(RegisterWorkerResponse {
            worker_id: id.to_string(),
            lease_ttl: Some(aiki_proto::duration_to_proto(c.lease_ttl)),
            heartbeat_interval: Some(aiki_proto::duration_to_proto(c.heartbeat_interval)),
            max_poll_wait: Some(aiki_proto::duration_to_proto(c.max_poll_wait)),
        }))
    }

    #[instrument(name = "rpc.PollTasks", skip_all, fields(max = req.get_ref().max_runs))]
    async fn poll_tasks(&self, req: Request<PollTasksRequest>) -> Result<Response<PollTasksResponse>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let worker = validate::uuid("worker_id", &req.worker_id)?;
        if req.max_runs == 0 || req.max_runs > MAX_POLL_BATCH {
            return Err(Error::InvalidArgument(format!(
                "max_runs must be 1 to {MAX_POLL_BATCH}, got {}",
                req.max_runs
            ))
            .into());
        }
        let wait =
            validate::duration("wait", req.wait.as_ref(), Duration::from_secs(3600))?.min(self.0.config.max_poll_wait);
        let registered =
            self.0.store.worker_registration(&ns, worker).await?.ok_or_else(|| {
                Error::NotFound(format!("worker {worker} is not registered; call RegisterWorker first"))
            })?;
        let queues = if req.queues.is_empty() {
            registered.queues.clone()
        } else {
            if let Some(q) = req.queues.iter().find(|q| !registered.queues.contains(q)) {
                return Err(Error::InvalidArgument(format!(
                    "queue {q:?} was not given at registration; a worker polls only queues it registered ({})",
                    registered.queues.join(", ")
                ))
                .into());
            }
            req.queues.clone()
        };
        let deadline = tokio::time::Instant::now() + wait;
        let subscriptions: Vec<_> = queues
            .iter()
            .map(|q| self.0.wakers.queues.subscribe(&(ns.clone(), q.clone())))
            .collect();
        let mut relook = RELOOK_MIN;
        loop {
            // Register for wake-ups before looking, so that a run started in between is not missed.
            let mut waits: Vec<_> = subscriptions.iter().map(|s| Box::pin(s.notify().notified())).collect();
            for w in &mut waits {
                w.as_mut().enable();
            }
            let (runs, skipped) = self.claim_any(&ns, &queues, req.max_runs, worker, &registered).await?;
            if !runs.is_empty() || tokio::time::Instant::now() >= deadline || self.0.shutdown.is_cancelled() {
                return Ok(Response::new(PollTasksResponse { runs }));
            }
            // A ready run was skipped (its row locked by another transaction): look again after
            // a short, growing pause, since no wake-up may come when that lock goes.
            let again = if skipped {
                let pause = relook;
                relook = (relook * 2).min(RELOOK_MAX);
                (tokio::time::Instant::now() + pause).min(deadline)
            } else {
                relook = RELOOK_MIN;
                deadline
            };
            tokio::select! {
                _ = select_all(waits) => {}
                _ = tokio::time::sleep_until(again) => {}
                _ = self.0.shutdown.cancelled() => {}
            }
        }
    }

    #[instrument(name = "rpc.Heartbeat", skip_all, fields(leases = req.get_ref().leases.len()))]
    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let req = req.into_inner();
        let ns = validate::namespace(&req.namespace)?;
        let worker = validate::uuid("worker_id", &req.worker_id)?;
        if req.leases.len() > MAX_HEARTBEAT_LEASES {
            return Err(
                Error::InvalidArgument(format!("a heartbeat names at most {MAX_HEARTBEAT_LEASES} leases")).into(),
            );
        }
        let mut ids = Vec::with_capacity(req.leases.len());
        let mut tokens = Vec::with_capacity(req.leases.len());
        for l in &req.leases {
            ids.push(validate::uuid("leases.run_id", &l.run_id)?);
            tokens.push(validate::uuid("leases.lease_token", &l.lease_token)?);
        }
        let out = self
            .0
            .store
            .heartbeat(&ns, worker, &ids, &tokens, self.0.config.lease_ttl)
            .await?;
        if !out.worker_known {
            return Err(
                Error::NotFound(format!("worker {worker} is not registered; call RegisterWorker first")).into(),
            );
        }
        // Lost: neither held nor ended by this worker's own report (which its answer settles).
        let answered: std::collections::HashSet<&Uuid> = out.held.iter().chain(&out.ended).collect();
        let lost_run_ids = ids
            .iter()
            .filter(|id| !answered.contains(id))
            .map(Uuid::to_string)
            .collect();
        Ok(Response::new(HeartbeatResponse {
            lost_run_ids,
            ended_run_ids: out.ended.iter().map(Uuid::to_string).collect(),
            cancel_run_ids: out.cancel.iter().map(Uuid::to_string).collect(),
            pause_run_ids: out.pause.iter().map(Uuid::to_string).collect(),
            lease_expires_at: Some(out.expires.into()),
        }))
    }

    #[instrument(name = "rpc.RecordTask", skip_all)]
    async fn record_task(&self, req: Request<RecordTaskRequest>) -> Result<Response<RecordTaskResponse>, Status> {
        Ok(Response::new(self.record(req.into_inner()).await?))
    }

    #[instrument(name = "rpc.CompleteRun", skip_all)]
    async fn complete_run(&self, req: Request<CompleteRunRequest>) -> Result<Response<CompleteRunResponse>, Status> {
        Ok(Response::new(self.complete(req.into_inner()).await?))
    }

    #[instrument(name = "rpc.FailRun", skip_all)]
    async fn fail_run(&self, req: Request<FailRunRequest>) -> Result<Response<FailRunResponse>, Status> {
        Ok(Response::new(self.fail(req.into_inner()).await?))
    }

    #[instrument(name = "rpc.ReleaseRun", skip_all)]
    async fn release_run(&self, req: Request<ReleaseRunRequest>) -> Result<Response<ReleaseRunResponse>, Status> {
        Ok(Response::new(self.release(req.into_inner()).await?))
    }

    #[instrument(name = "rpc.SuspendRun", skip_all)]
    async fn suspend_run(&self, req: Request<SuspendRunRequest>) -> Result<Response<SuspendRunResponse>, Status> {
        Ok(Response::new(self.suspend(req.into_inner()).await?))
    }

    #[instrument(name = "rpc.Report", skip_all, fields(reports = req.get_ref().reports.len()))]
    async fn report(&self, req: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        let req = req.into_inner();
        if req.reports.is_empty() || req.reports.len() > MAX_REPORTS {
            return Err(Error::InvalidArgument(format!(
                "a Report call carries 1 to {MAX_REPORTS} reports, got {}",
                req.reports.len()
            ))
            .into());
        }
        // All reports are queued for the committer at once, so they share its transactions.
        // The other kinds are boxed, so that the future of each report (a completion, nearly
        // always) stays small: join_all moves every one of them.
        let answers = futures::future::join_all(req.reports.into_iter().map(|r| async move {
            let answer = match r.report {
                Some(run_report::Report::CompleteRun(r)) => {
                    self.complete(r).await.map(report_result::Result::CompleteRun)
                }
                Some(run_report::Report::RecordTask(r)) => {
                    Box::pin(self.record(r)).await.map(report_result::Result::RecordTask)
                }
                Some(run_report::Report::FailRun(r)) => {
                    Box::pin(self.fail(r)).await.map(report_result::Result::FailRun)
                }
                Some(run_report::Report::ReleaseRun(r)) => {
                    Box::pin(self.release(r)).await.map(report_result::Result::ReleaseRun)
                }
                Some(run_report::Report::SuspendRun(r)) => {
                    Box::pin(self.suspend(r)).await.map(report_result::Result::SuspendRun)
                }
                None => Err(Error::InvalidArgument(
                    "a report must be one of record_task, complete_run, fail_run, release_run, suspend_run".into(),
                )),
            };
            let result = answer.unwrap_or_else(|e| {
                let status = Status::from(e);
                report_result::Result::Error(ReportError {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                })
            });
            ReportResult { result: Some(result) }
        }))
        .await;
        Ok(Response::new(ReportResponse { results: answers }))
    }
}

/// The lease a report names: namespace, run and token.
fn lease_of(namespace: &str, run_id: &str, token: &str) -> Result<(String, Uuid, Uuid)> {
    Ok((
        validate::namespace(namespace)?,
        validate::uuid("run_id", run_id)?,
        validate::uuid("lease_token", token)?,
    ))
}

/// `e`, about the `i`-th of a completion's task results.
fn in_tasks(i: usize, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("tasks[{i}]: {m}")),
        Error::ResourceExhausted(m) => Error::ResourceExhausted(format!("tasks[{i}]: {m}")),
        e => e,
    }
}

/// A task result to record, checked.
fn new_task(task: &TaskResult, max_payload: usize) -> Result<NewTask> {
    let (output, error) = match &task.result {
        Some(task_result::Result::Output(v)) => (Some(validate::payload("task.output", Some(v), max_payload)?), None),
        Some(task_result::Result::Error(e)) => (None, Some(error_json(Some(e), max_payload)?)),
        None => {
            return Err(Error::InvalidArgument("task.output or task.error is required".into()));
        }
    };
    if task.seq > i32::MAX as u32 {
        return Err(Error::InvalidArgument(format!("task.seq {} is too large", task.seq)));
    }
    Ok(NewTask {
        key: validate::name("task.key", &task.key, 512)?,
        name: validate::name("task.name", &task.name, 255)?,
        seq: task.seq,
        output,
        error,
    })
}

impl WorkerSvc {
    async fn suspend(&self, req: SuspendRunRequest) -> Result<SuspendRunResponse> {
        let bytes = req.encoded_len();
        let (ns, id, token) = lease_of(&req.namespace, &req.run_id, &req.lease_token)?;
        let limit = Duration::from_secs(366 * 86_400);
        let wait = match (req.event.as_str(), req.child_run_id.as_str()) {
            ("", "") => {
                if req.sleep.is_none() {
                    return Err(Error::InvalidArgument(
                        "a suspension needs a sleep, an event or a child_run_id to wait for".into(),
                    ));
                }
                Wait::Sleep(validate::duration("sleep", req.sleep.as_ref(), limit)?)
            }
            (event, "") => Wait::Event {
                name: validate::name("event", event, 255)?,
                timeout: match &req.sleep {
                    None => None,
                    Some(d) => Some(validate::duration("sleep (the event's timeout)", Some(d), limit)?),
                },
            },
            ("", child) => {
                if req.sleep.is_some() {
                    return Err(Error::InvalidArgument(
                        "a wait for a child run has no timeout: leave sleep unset".into(),
                    ));
                }
                let child = validate::uuid("child_run_id", child)?;
                if child == id {
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
        let deadline = wait.deadline();
        let end = LeaseEnd::Suspend {
            key: validate::name("wait_key", &req.wait_key, 512)?,
            name: validate::name("wait_name", &req.wait_name, 255)?,
            seq: req.wait_seq,
            wait,
        };
        let run = self.end_lease(ns, id, token, end, bytes).await?;
        if run.status == RunStatus::Suspended as i32
            && let Some(d) = deadline
        {
            let _ = self.0.sleepers.send(std::time::Instant::now() + d);
        }
        Ok(SuspendRunResponse {
            status: run.status,
            wake_at: run.wake_at,
        })
    }

    async fn record(&self, req: RecordTaskRequest) -> Result<RecordTaskResponse> {
        let bytes = req.encoded_len();
        let (namespace, id, token) = lease_of(&req.namespace, &req.run_id, &req.lease_token)?;
        let task = req
            .task
            .ok_or_else(|| Error::InvalidArgument("task is required".into()))?;
        let new = new_task(&task, self.0.config.max_payload_bytes)?;
        let report = Report::Record {
            namespace,
            id,
            token,
            task: new,
        };
        let (task, recorded) = match self.0.committer.apply(report, bytes).await? {
            Applied::Recorded(None) => {
                run_changed(&self.0, id);
                (task, true)
            }
            Applied::Recorded(Some(earlier)) => (earlier, false),
            other => return Err(Error::Internal(format!("unexpected answer to RecordTask: {other:?}"))),
        };
        Ok(RecordTaskResponse {
            task: Some(task),
            recorded,
        })
    }

    async fn complete(&self, req: CompleteRunRequest) -> Result<CompleteRunResponse> {
        let bytes = req.encoded_len();
        let (namespace, id, token) = lease_of(&req.namespace, &req.run_id, &req.lease_token)?;
        let max = self.0.config.max_payload_bytes;
        let output = validate::payload("output", req.output.as_ref(), max)?;
        if req.tasks.len() > MAX_REPORTS {
            return Err(Error::InvalidArgument(format!(
                "a completion carries at most {MAX_REPORTS} task results, got {}",
                req.tasks.len()
            )));
        }
        let tasks = req
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| new_task(t, max).map_err(|e| in_tasks(i, e)))
            .collect::<Result<Vec<_>>>()?;
        let report = Report::Complete {
            namespace,
            id,
            token,
            output,
            tasks,
        };
        match self.0.committer.apply(report, bytes).await? {
            Applied::Completed(true) => run_changed(&self.0, id),
            Applied::Completed(false) => {}
            other => return Err(Error::Internal(format!("unexpected answer to CompleteRun: {other:?}"))),
        }
        Ok(CompleteRunResponse {})
    }

    async fn fail(&self, req: FailRunRequest) -> Result<FailRunResponse> {
        let bytes = req.encoded_len();
        let (ns, id, token) = lease_of(&req.namespace, &req.run_id, &req.lease_token)?;
        let error = error_json(req.error.as_ref(), self.0.config.max_payload_bytes)?;
        let retry_after = match &req.retry_after {
            None => None,
            Some(d) => Some(validate::duration("retry_after", Some(d), Duration::from_secs(86_400))?),
        };
        let end = LeaseEnd::Fail {
            error,
            non_retryable: req.non_retryable,
            retry_after,
        };
        let run = self.end_lease(ns, id, token, end, bytes).await?;
        Ok(FailRunResponse {
            status: run.status,
            retry_at: if crate::status::RunStatus::from_proto(run.status) == Some(crate::status::RunStatus::Queued) {
                run.visible_at
            } else {
                None
            },
        })
    }

    async fn release(&self, req: ReleaseRunRequest) -> Result<ReleaseRunResponse> {
        let bytes = req.encoded_len();
        let (ns, id, token) = lease_of(&req.namespace, &req.run_id, &req.lease_token)?;
        let delay = validate::duration("delay", req.delay.as_ref(), Duration::from_secs(86_400))?;
        let reason = validate::text(&req.reason, 1024);
        let run = self
            .end_lease(ns, id, token, LeaseEnd::Release { reason, delay }, bytes)
            .await?;
        Ok(ReleaseRunResponse { status: run.status })
    }
}

impl WorkerSvc {
    /// Ends a lease by failure or release; wakes the run's waiters and, if it is queued again,
    /// its queue's pollers (now or when its retry is due). A duplicate report gets the run as
    /// it is.
    async fn end_lease(
        &self,
        namespace: String,
        id: Uuid,
        token: Uuid,
        end: LeaseEnd,
        bytes: usize,
    ) -> Result<aiki_proto::v1::Run> {
        let report = Report::End {
            namespace: namespace.clone(),
            id,
            token,
            end,
        };
        let Applied::Ended(ended) = self.0.committer.apply(report, bytes).await? else {
            return Err(Error::Internal("unexpected answer to a lease's end".into()));
        };
        let Some((run, delay)) = ended else {
            return self
                .0
                .store
                .get_run(&namespace, id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("run {id} not found")));
        };
        run_changed(&self.0, id);
        if crate::status::RunStatus::from_proto(run.status) == Some(crate::status::RunStatus::Queued) {
            self.0
                .wakers
                .queue_ready((run.namespace.clone(), run.queue.clone()), Some(delay));
        }
        Ok(*run)
    }
}
