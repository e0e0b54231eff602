//! The lease protocol: registration, the long poll, heartbeats, and the reports a worker makes
//! under a lease.

use std::{collections::HashSet, time::Duration};

use aiki_proto::v1::{LeasedRun, Run, TaskResult};
use futures::future::select_all;
use serde_json::{Value as Json, json};
use uuid::Uuid;

use super::{
    Caller, Engine, Op,
    requests::{
        Complete, ErrorReport, Fail, Heartbeat, Poll, Record, Register, Release, Suspend, TaskOutcome, TaskReport,
    },
};
use crate::{
    error::{Error, Result},
    status::RunStatus,
    store::{Applied, LeaseEnd, NewTask, NewWorker, Registration, Report},
    validate,
};

/// Most runs leased by a poll's first claim statement; later ones are sized by what the first
/// runs weighed.
const FIRST_CLAIM_CHUNK: u32 = 16;
/// A poll stops leasing more runs once its answer is this large.
const REPLY_BUDGET: usize = 16 * 1024 * 1024;
/// How soon a poll that skipped a locked ready run looks again, first and at most. Such a lock
/// is held by a short transaction (a claim, a report batch, a heartbeat), so the first pause
/// is short; it doubles while the run stays locked.
const RELOOK_MIN: Duration = Duration::from_millis(5);
const RELOOK_MAX: Duration = Duration::from_millis(500);

/// What a heartbeat found, by run.
#[derive(Debug, Clone)]
pub struct HeartbeatAnswer {
    /// Leases this worker no longer holds: stop the runs, report nothing.
    pub lost: Vec<Uuid>,
    /// Leases that ended by this worker's own report: not lost.
    pub ended: Vec<Uuid>,
    /// Runs to stop and release: cancelled.
    pub cancel: Vec<Uuid>,
    /// Runs to stop and release: paused.
    pub pause: Vec<Uuid>,
    /// When the leases extended now expire.
    pub expires: std::time::SystemTime,
}

impl Engine {
    /// Registers a worker; answers its id.
    pub async fn register(&self, caller: &Caller, req: Register) -> Result<Uuid> {
        self.authorize(caller, Op::RegisterWorker, &req.namespace)?;
        let id = self
            .store
            .register_worker(&NewWorker {
                namespace: &req.namespace,
                identity: &req.identity,
                host: &req.host,
                workflows: &req.workflows,
                queues: &req.queues,
                slots: req.slots,
                key: caller.key_id(),
            })
            .await?;
        tracing::info!(worker_id = %id, identity = req.identity, key_id = ?caller.key_id(), "worker registered");
        Ok(id)
    }

    /// Leases up to `max_runs` ready runs to the worker; if none is ready, waits for one (up to
    /// the poll's wait, at most `max_poll_wait`).
    pub async fn poll(&self, caller: &Caller, req: Poll) -> Result<Vec<LeasedRun>> {
        self.authorize(caller, Op::PollTasks, &req.namespace)?;
        let Poll {
            namespace: ns,
            worker,
            queues,
            max_runs,
            wait,
        } = req;
        let wait = wait.min(self.config.max_poll_wait);
        let registered = self
            .store
            .worker_registration(&ns, worker)
            .await?
            .ok_or_else(|| unregistered(worker))?;
        self.authorize_worker(caller, worker, registered.key)?;
        let queues = if queues.is_empty() {
            registered.queues.clone()
        } else {
            if let Some(q) = queues.iter().find(|q| !registered.queues.contains(q)) {
                return Err(Error::InvalidArgument(format!(
                    "queue {q:?} was not given at registration; a worker polls only queues it registered ({})",
                    registered.queues.join(", ")
                )));
            }
            queues
        };
        let deadline = tokio::time::Instant::now() + wait;
        let subscriptions: Vec<_> = queues
            .iter()
            .map(|q| self.wakers.queues.subscribe(&(ns.clone(), q.clone())))
            .collect();
        let mut relook = RELOOK_MIN;
        loop {
            // Register for wake-ups before looking, so that a run started in between is not missed.
            let mut waits: Vec<_> = subscriptions.iter().map(|s| Box::pin(s.notify().notified())).collect();
            for w in &mut waits {
                w.as_mut().enable();
            }
            let (runs, skipped) = self.claim_any(&ns, &queues, max_runs, worker, &registered).await?;
            if !runs.is_empty() || tokio::time::Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return Ok(runs);
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
                _ = self.shutdown.cancelled() => {}
            }
        }
    }

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
        let mut out = Vec::with_capacity(max.min(super::requests::MAX_POLL_BATCH) as usize);
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
                    n => ((REPLY_BUDGET.saturating_sub(size)) / (size / n).max(1))
                        .clamp(1, super::requests::MAX_POLL_BATCH as usize) as u32,
                };
                let want = (max - out.len() as u32).min(chunk);
                if want == 0 || size >= REPLY_BUDGET {
                    break 'queues;
                }
                match self
                    .store
                    .claim(ns, q, want, worker, self.config.lease_ttl, served)
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
                if self.store.ready_left(ns, q, served).await? {
                    return Ok((out, true));
                }
            }
        }
        for r in &out {
            if let Ok(id) = Uuid::parse_str(&r.run_id) {
                self.run_changed(id);
            }
        }
        Ok((out, false))
    }

    /// Extends the leases a worker names and says which were lost, ended by its own report,
    /// or are to be cancelled or paused.
    pub async fn heartbeat(&self, caller: &Caller, req: Heartbeat) -> Result<HeartbeatAnswer> {
        self.authorize(caller, Op::Heartbeat, &req.namespace)?;
        if let Caller::Key(_) = caller {
            let registered = self
                .store
                .worker_registration(&req.namespace, req.worker)
                .await?
                .ok_or_else(|| unregistered(req.worker))?;
            self.authorize_worker(caller, req.worker, registered.key)?;
        }
        let out = self
            .store
            .heartbeat(&req.namespace, req.worker, &req.ids, &req.tokens, self.config.lease_ttl)
            .await?;
        if !out.worker_known {
            return Err(unregistered(req.worker));
        }
        // Lost: neither held nor ended by this worker's own report (which its answer settles).
        let answered: HashSet<&Uuid> = out.held.iter().chain(&out.ended).collect();
        let lost = req.ids.iter().filter(|id| !answered.contains(id)).copied().collect();
        Ok(HeartbeatAnswer {
            lost,
            ended: out.ended,
            cancel: out.cancel,
            pause: out.pause,
            expires: out.expires,
        })
    }

    /// A reported error made storable: details over the payload limit, or not storable, are
    /// replaced by a note, so that a failure is always reported.
    fn error_json(&self, e: &ErrorReport) -> Json {
        let details = match validate::payload("error.details", e.details.as_ref(), self.config.max_payload_bytes) {
            Ok(d) => d,
            Err(problem) => json!({"dropped": problem.to_string()}),
        };
        json!({"type": e.r#type, "message": e.message, "details": details})
    }

    /// A reported task result, checked against the payload limit.
    fn new_task(&self, task: TaskReport) -> Result<NewTask> {
        let (output, error) = match task.result {
            TaskOutcome::Output(o) => {
                validate::payload_size("task.output", &o, self.config.max_payload_bytes)?;
                (Some(o), None)
            }
            TaskOutcome::Error(e) => (None, Some(self.error_json(&e))),
        };
        Ok(NewTask {
            key: task.key,
            name: task.name,
            seq: task.seq,
            output,
            error,
        })
    }

    /// Checkpoints a task result. Answers the result as recorded (the first one counts) and
    /// whether this report recorded it.
    pub async fn record(
        &self,
        caller: &Caller,
        req: Record,
        task: TaskResult,
        bytes: usize,
    ) -> Result<(TaskResult, bool)> {
        let lease = req.lease;
        self.authorize(caller, Op::Report, &lease.namespace)?;
        let report = Report::Record {
            namespace: lease.namespace,
            id: lease.id,
            token: lease.token,
            key: caller.key_id(),
            task: self.new_task(req.task)?,
        };
        match self.committer.apply(report, bytes).await? {
            Applied::Recorded(None) => {
                self.run_changed(lease.id);
                Ok((task, true))
            }
            Applied::Recorded(Some(earlier)) => Ok((earlier, false)),
            other => Err(Error::Internal(format!("unexpected answer to RecordTask: {other:?}"))),
        }
    }

    /// Completes a run with its output and the task results not checkpointed yet.
    pub async fn complete(&self, caller: &Caller, req: Complete, bytes: usize) -> Result<()> {
        let lease = req.lease;
        self.authorize(caller, Op::Report, &lease.namespace)?;
        validate::payload_size("output", &req.output, self.config.max_payload_bytes)?;
        let tasks = req
            .tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| self.new_task(t).map_err(|e| e.within(&format!("tasks[{i}]"))))
            .collect::<Result<Vec<_>>>()?;
        let report = Report::Complete {
            namespace: lease.namespace,
            id: lease.id,
            token: lease.token,
            key: caller.key_id(),
            output: req.output,
            tasks,
        };
        match self.committer.apply(report, bytes).await? {
            Applied::Completed(true) => self.run_changed(lease.id),
            Applied::Completed(false) => {}
            other => return Err(Error::Internal(format!("unexpected answer to CompleteRun: {other:?}"))),
        }
        Ok(())
    }

    /// Fails an attempt: the run is retried by its policy, or ends.
    pub async fn fail(&self, caller: &Caller, req: Fail, bytes: usize) -> Result<Run> {
        let end = LeaseEnd::Fail {
            error: self.error_json(&req.error),
            non_retryable: req.non_retryable,
            retry_after: req.retry_after,
        };
        self.end_lease(caller, req.lease, end, bytes).await
    }

    /// Gives a run back: it is queued again (keeping its place, without a delay).
    pub async fn release(&self, caller: &Caller, req: Release, bytes: usize) -> Result<Run> {
        let end = LeaseEnd::Release {
            reason: req.reason,
            delay: req.delay,
        };
        self.end_lease(caller, req.lease, end, bytes).await
    }

    /// Suspends a run at a step until its wait ends (a sleep, an event, a child).
    pub async fn suspend(&self, caller: &Caller, req: Suspend, bytes: usize) -> Result<Run> {
        let deadline = req.wait.deadline();
        let end = LeaseEnd::Suspend {
            key: req.key,
            name: req.name,
            seq: req.seq,
            wait: req.wait,
        };
        let run = self.end_lease(caller, req.lease, end, bytes).await?;
        if RunStatus::from_proto(run.status) == Some(RunStatus::Suspended)
            && let Some(d) = deadline
        {
            let _ = self.sleepers.send(std::time::Instant::now() + d);
        }
        Ok(run)
    }

    /// Ends a lease (failure, release, suspension); wakes the run's waiters and, if it is
    /// queued again, its queue's pollers (now or when its retry is due). A duplicate report
    /// gets the run as it is.
    async fn end_lease(
        &self,
        caller: &Caller,
        lease: super::requests::LeaseRef,
        end: LeaseEnd,
        bytes: usize,
    ) -> Result<Run> {
        self.authorize(caller, Op::Report, &lease.namespace)?;
        let report = Report::End {
            namespace: lease.namespace.clone(),
            id: lease.id,
            token: lease.token,
            key: caller.key_id(),
            end,
        };
        let Applied::Ended(ended) = self.committer.apply(report, bytes).await? else {
            return Err(Error::Internal("unexpected answer to a lease's end".into()));
        };
        let Some((run, delay)) = ended else {
            return self
                .store
                .get_run(&lease.namespace, lease.id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("run {} not found", lease.id)));
        };
        if let Some(status) = RunStatus::from_proto(run.status) {
            self.moved(&run.namespace, lease.id, &run.queue, status, Some(delay));
        }
        Ok(*run)
    }
}

/// The answer to a call naming a worker that is not registered (or was forgotten).
fn unregistered(worker: Uuid) -> Error {
    Error::NotFound(format!("worker {worker} is not registered; call RegisterWorker first"))
}
