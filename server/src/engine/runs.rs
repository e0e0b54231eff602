//! Operations on runs: start, read, wait, list, cancel, pause, resume, wake, events, history.

use std::{pin::Pin, sync::Arc, time::Duration};

use aiki_proto::v1::{HistoryEvent, Run};
use uuid::Uuid;

use super::{
    Caller, Engine, Op,
    requests::{AwaitResult, ListRuns, RunId, RunSelector, SendEvent, StartRun, WithReason},
};
use crate::{
    error::{Error, Result},
    status::RunStatus,
    store::{NewRun, RetryPolicy, RunRef},
    validate,
};

/// Most events in one history answer or one read of a watch.
pub const HISTORY_PAGE: i64 = 1000;
/// A history page or a page of runs holds no more than this many bytes of payloads (event
/// details; inputs, outputs and errors), past its first item: an answer stays under the 4 MB
/// that gRPC clients accept by default, whatever the runs hold.
pub const PAGE_BYTES: usize = 2 * 1024 * 1024;

/// A started run (or the one its idempotency key or request id already named).
#[derive(Debug, Clone)]
pub struct Started {
    /// A created run's input is what the caller just sent: left out.
    pub run: Run,
    pub created: bool,
}

/// A page of runs, and the token of the next page (empty: the last).
#[derive(Debug, Clone)]
pub struct RunPage {
    pub runs: Vec<Run>,
    pub next_page_token: String,
}

/// What sending an event did.
#[derive(Debug, Clone)]
pub struct EventSent {
    /// False for a duplicate of an event key.
    pub stored: bool,
    /// The run was waiting for it and got it at once.
    pub delivered: bool,
    pub run: Run,
}

impl Engine {
    /// The run a start asks for, with the server's settings applied: the payload limit, the
    /// default retry policy, the floor of a heartbeat timeout.
    fn new_run(&self, s: StartRun) -> Result<NewRun> {
        let c = &self.config;
        validate::payload_size("input", &s.input, c.max_payload_bytes)?;
        let d = &c.default_retry;
        let retry = match s.retry {
            None => RetryPolicy {
                max_attempts: d.max_attempts,
                initial_interval: d.initial_interval,
                max_interval: d.max_interval,
                backoff_coefficient: d.backoff_coefficient,
                non_retryable_error_types: Vec::new(),
            },
            Some(p) => {
                let initial = p.initial_interval.unwrap_or(d.initial_interval);
                let max = p.max_interval.unwrap_or_else(|| d.max_interval.max(initial));
                if max < initial {
                    return Err(Error::InvalidArgument(
                        "retry_policy.max_interval must not be shorter than initial_interval".into(),
                    ));
                }
                RetryPolicy {
                    max_attempts: if p.max_attempts == 0 {
                        d.max_attempts
                    } else {
                        p.max_attempts
                    },
                    initial_interval: initial,
                    max_interval: max,
                    backoff_coefficient: if p.backoff_coefficient == 0.0 {
                        d.backoff_coefficient
                    } else {
                        p.backoff_coefficient
                    },
                    non_retryable_error_types: p.non_retryable_error_types,
                }
            }
        };
        let floor = c.heartbeat_interval * 2;
        if let Some(h) = s.timeouts.heartbeat
            && h < floor
        {
            return Err(Error::InvalidArgument(format!(
                "heartbeat_timeout must be at least {floor:?}, twice the server's heartbeat interval, got {h:?}"
            )));
        }
        Ok(NewRun {
            namespace: s.namespace,
            id: s.id,
            id_from_request: s.id_from_request,
            workflow: s.workflow,
            version: s.version,
            queue: s.queue,
            priority: s.priority,
            input: s.input,
            idempotency_key: s.idempotency_key,
            request_id: s.request_id,
            return_existing: s.return_existing,
            delay: s.delay,
            retry,
            parent: s.parent,
            timeouts: s.timeouts,
            created_by: None,
        })
    }

    /// Wakes the pollers of a created run's queue and builds the answer.
    fn started(&self, namespace: &str, queue: &str, delay: Duration, mut run: Run, created: bool) -> Started {
        if created {
            self.wakers
                .queue_ready((namespace.to_owned(), queue.to_owned()), Some(delay));
            run.input = None;
        }
        Started { run, created }
    }

    /// Starts one run, coalesced with other single starts arriving at the same time into one
    /// transaction. `bytes`: the request's size, which the coalescing weighs.
    pub async fn start(&self, caller: &Caller, start: StartRun, bytes: usize) -> Result<Started> {
        self.authorize(caller, start_op(&start), &start.namespace)?;
        self.authorize_child(caller, &start).await?;
        let mut new = self.new_run(start)?;
        new.created_by = caller.key_id();
        let (namespace, queue, delay) = (new.namespace.clone(), new.queue.clone(), new.delay);
        let (run, created) = self.starter.apply(new, bytes).await?;
        Ok(self.started(&namespace, &queue, delay, run, created))
    }

    /// Starts many runs: all of them, or none.
    pub async fn start_many(&self, caller: &Caller, starts: Vec<StartRun>) -> Result<Vec<Started>> {
        for s in &starts {
            self.authorize(caller, start_op(s), &s.namespace)?;
            self.authorize_child(caller, s).await?;
        }
        let runs = starts
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let mut new = self.new_run(s).map_err(|e| e.within(&format!("runs[{i}]")))?;
                new.created_by = caller.key_id();
                Ok(new)
            })
            .collect::<Result<Vec<_>>>()?;
        let started = self.store.start_runs(&runs, true).await?;
        runs.iter()
            .zip(started)
            .map(|(new, answer)| {
                answer.map(|(run, created)| self.started(&new.namespace, &new.queue, new.delay, run, created))
            })
            .collect()
    }

    /// A key that may start only child runs (the worker role) starts children of the runs its
    /// workers hold, and of no other run.
    async fn authorize_child(&self, caller: &Caller, start: &StartRun) -> Result<()> {
        let (Caller::Key(key), Some(parent)) = (caller, start.parent) else {
            return Ok(());
        };
        if key.role.allows(Op::StartRun) {
            return Ok(());
        }
        match self.store.run_lease_key(&start.namespace, parent).await? {
            None => Err(Error::NotFound(format!("parent run {parent} not found"))),
            Some(holder) if holder == Some(key.id) => Ok(()),
            Some(_) => Err(Error::PermissionDenied(format!(
                "API key {} starts child runs only of runs its workers hold, and run {parent} is not one",
                key.label()
            ))),
        }
    }

    async fn run(&self, namespace: &str, id: Uuid) -> Result<Run> {
        self.store
            .get_run(namespace, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("run {id} not found")))
    }

    /// A run, by id or idempotency key.
    pub async fn get(&self, caller: &Caller, sel: RunSelector) -> Result<Run> {
        self.authorize(caller, Op::GetRun, &sel.namespace)?;
        match sel.run {
            RunRef::Id(id) => self.run(&sel.namespace, id).await,
            RunRef::Key(key) => self
                .store
                .get_run_by_key(&sel.namespace, &key)
                .await?
                .ok_or_else(|| Error::NotFound(format!("no run has idempotency key {key:?}"))),
        }
    }

    /// The run once it has ended, or as it is when the wait is over; and whether it ended.
    pub async fn result(&self, caller: &Caller, req: AwaitResult) -> Result<(Run, bool)> {
        let RunId { namespace, id } = req.run;
        self.authorize(caller, Op::GetRun, &namespace)?;
        let deadline = tokio::time::Instant::now() + req.timeout;
        let notify = self.wakers.runs.subscribe(&id);
        loop {
            let notified = notify.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let run = self.run(&namespace, id).await?;
            let done = RunStatus::from_proto(run.status).is_some_and(RunStatus::is_terminal);
            if done || tokio::time::Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return Ok((run, done));
            }
            self.wait_change(notified, deadline).await;
        }
    }

    /// Waits until `notified` fires, `recheck_interval` passes, `deadline` comes or the server
    /// shuts down: run waiters of other replicas are not notified, they look again.
    pub(super) async fn wait_change(
        &self,
        notified: Pin<&mut tokio::sync::futures::Notified<'_>>,
        deadline: tokio::time::Instant,
    ) {
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(self.config.recheck_interval) => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }

    /// A page of runs, newest first.
    pub async fn list(&self, caller: &Caller, req: ListRuns) -> Result<RunPage> {
        self.authorize(caller, Op::ListRuns, &req.namespace)?;
        let _turn = self.scan_turn().await?;
        let (runs, more) = self.store.list_runs(&req.namespace, &req.filter, PAGE_BYTES).await?;
        let next_page_token = if more {
            runs.last().map(|r| r.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(RunPage { runs, next_page_token })
    }

    /// Cancels a run and every descendant that has not ended.
    pub async fn cancel(&self, caller: &Caller, req: WithReason) -> Result<Run> {
        let RunId { namespace, id } = req.run;
        self.authorize(caller, Op::CancelRun, &namespace)?;
        let (run, moved) = self
            .store
            .cancel_run(&namespace, id, &req.reason, caller.key_id())
            .await?;
        moved.iter().for_each(|m| self.wakers.moved(m));
        Ok(run)
    }

    /// Pauses a run: a queued one at once, a running one when its worker releases it.
    pub async fn pause(&self, caller: &Caller, req: WithReason) -> Result<Run> {
        let RunId { namespace, id } = req.run;
        self.authorize(caller, Op::PauseRun, &namespace)?;
        let (run, moved) = self
            .store
            .pause_run(&namespace, id, &req.reason, caller.key_id())
            .await?;
        self.wakers.moved(&moved);
        Ok(run)
    }

    /// Resumes a paused run, or withdraws a pause not yet taken effect.
    pub async fn resume(&self, caller: &Caller, req: RunId) -> Result<Run> {
        self.authorize(caller, Op::ResumeRun, &req.namespace)?;
        let (run, moved) = self.store.resume_run(&req.namespace, req.id, caller.key_id()).await?;
        self.wakers.moved(&moved);
        Ok(run)
    }

    /// Ends a suspended run's wait now.
    pub async fn wake(&self, caller: &Caller, req: RunId) -> Result<Run> {
        self.authorize(caller, Op::WakeRun, &req.namespace)?;
        let (run, moved) = self.store.wake_run(&req.namespace, req.id, caller.key_id()).await?;
        self.wakers.moved(&moved);
        Ok(run)
    }

    /// Stores an event in a run's inbox; a run waiting for it gets it at once.
    pub async fn send_event(&self, caller: &Caller, req: SendEvent) -> Result<EventSent> {
        self.authorize(caller, Op::SendEvent, &req.namespace)?;
        validate::payload_size("payload", &req.payload, self.config.max_payload_bytes)?;
        let (stored, delivered, run, moved) = self
            .store
            .send_event(
                &req.namespace,
                &req.run,
                &req.name,
                &req.payload,
                req.event_key.as_deref(),
                caller.key_id(),
            )
            .await?;
        self.wakers.moved(&moved);
        Ok(EventSent { stored, delivered, run })
    }

    /// A page of a run's history after `after_seq`, and whether more follows.
    pub async fn history(&self, caller: &Caller, req: RunId, after_seq: i64) -> Result<(Vec<HistoryEvent>, bool)> {
        self.authorize(caller, Op::GetHistory, &req.namespace)?;
        let (events, more) = self
            .store
            .history(&req.namespace, req.id, after_seq, HISTORY_PAGE, PAGE_BYTES)
            .await?;
        if events.is_empty() && after_seq <= 0 {
            // No event at all: is there such a run?
            self.run(&req.namespace, req.id).await?;
        }
        Ok((events, more))
    }

    /// A run's history after `after_seq` as it is written, until the run ends (or the server
    /// shuts down, or the client goes away or reads too slowly); see [`super::watch`].
    pub async fn watch(self: &Arc<Self>, caller: &Caller, req: RunId, after_seq: i64) -> Result<super::watch::Watch> {
        self.authorize(caller, Op::GetHistory, &req.namespace)?;
        let RunId { namespace, id } = req;
        self.run(&namespace, id).await?;
        Ok(self.watch_events(namespace, id, after_seq))
    }
}

/// What a start asks for: a child's start (it names its parent) is what workflows do.
fn start_op(start: &StartRun) -> Op {
    if start.parent.is_some() {
        Op::StartChild
    } else {
        Op::StartRun
    }
}
