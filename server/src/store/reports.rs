//! Worker reports, applied many per transaction (group commit): task checkpoints, completions,
//! and the ends of leases (failures, releases, suspensions, timeouts).

use super::*;

impl Store {
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
}

/// A validated worker report, for [`Store::apply_reports`].
#[derive(Debug, Clone)]
pub enum Report {
    /// `RecordTask`.
    Record {
        namespace: String,
        id: Uuid,
        token: Uuid,
        key: Option<Uuid>,
        task: NewTask,
    },
    /// `CompleteRun`, with the task results it checkpoints.
    Complete {
        namespace: String,
        id: Uuid,
        token: Uuid,
        key: Option<Uuid>,
        output: Json,
        tasks: Vec<NewTask>,
    },
    /// `FailRun` or `ReleaseRun`.
    End {
        namespace: String,
        id: Uuid,
        token: Uuid,
        key: Option<Uuid>,
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

/// A locked run's (open lease's token, attempt, lease owner, the owner's API key).
pub(super) type LeaseRow = (Option<Uuid>, i32, Option<Uuid>, Option<Uuid>);

/// A `CompleteRun` report of a batch.
pub(super) struct Completion<'a> {
    report: usize,
    namespace: &'a str,
    id: Uuid,
    token: Uuid,
    key: Option<Uuid>,
    output: &'a Json,
    tasks: &'a [NewTask],
}

/// Task results to record in one statement (`sql/reports/tasks_record.sql`), as its column arrays.
#[derive(Default)]
pub(super) struct TaskRows<'a> {
    ns: Vec<&'a str>,
    ids: Vec<Uuid>,
    keys: Vec<&'a str>,
    names: Vec<&'a str>,
    seqs: Vec<i32>,
    outputs: Vec<Option<&'a Json>>,
    errors: Vec<Option<&'a Json>>,
    attempts: Vec<i32>,
    owners: Vec<Option<Uuid>>,
    keys_of_leases: Vec<Option<Uuid>>,
}

impl<'a> TaskRows<'a> {
    /// Adds the result of `task` of run `id`, recorded under `attempt` by worker `owner` of API
    /// key `key`.
    fn push(&mut self, ns: &'a str, id: Uuid, task: &'a NewTask, attempt: i32, owner: Option<Uuid>, key: Option<Uuid>) {
        self.ns.push(ns);
        self.ids.push(id);
        self.keys.push(&task.key);
        self.names.push(&task.name);
        self.seqs.push(task.seq as i32);
        self.outputs.push(task.output.as_ref());
        self.errors.push(task.error.as_ref());
        self.attempts.push(attempt);
        self.owners.push(owner);
        self.keys_of_leases.push(key);
    }

    /// Inserts the rows (a task already recorded is kept): answers the (run, key, namespace)
    /// of each one recorded now.
    async fn insert(&self, tx: &Transaction<'_>) -> Result<Vec<(Uuid, String, String)>> {
        let stmt = tx.prepare_cached(sql!("reports/tasks_record")).await?;
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
                    &self.keys_of_leases,
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
pub(super) async fn apply_in(tx: &Transaction<'_>, reports: &[Report]) -> Result<Vec<Result<Applied>>> {
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
        let stmt = tx.prepare_cached(sql!("reports/lock_runs")).await?;
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
                        r.get("lease_key"),
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
                key,
                task,
            } = &reports[i]
            else {
                continue;
            };
            let Ok(at) = leases.binary_search_by(|(n, i, _)| (n.as_str(), *i).cmp(&(namespace.as_str(), *id))) else {
                continue;
            };
            let (Some(current), attempt, owner, lease_key) = &leases[at].2 else {
                continue;
            };
            // Another key's report is refused one by one below, with the reason.
            if current != token || key.is_some_and(|k| Some(k) != *lease_key) {
                continue;
            }
            live.push(i);
            rows.push(namespace, *id, task, *attempt, *owner, *lease_key);
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
    // results they carry go on the completed rows (see `sql/reports/complete.sql`).
    let mut completes: Vec<Completion<'_>> = reports
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Report::Complete {
                namespace,
                id,
                token,
                key,
                output,
                tasks,
            } => Some(Completion {
                report: i,
                namespace,
                id: *id,
                token: *token,
                key: *key,
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
        let keys: Vec<Option<Uuid>> = completes.iter().map(|c| c.key).collect();
        let stmt = tx.prepare_cached(sql!("reports/complete")).await?;
        for row in tx
            .query(&stmt, &[&ns, &ids, &tokens, &outputs, &tasks, &counts, &keys])
            .await?
        {
            let ord: i64 = row.get("ord");
            out[completes[ord as usize - 1].report] = Some(Ok(Applied::Completed(true)));
        }
    }

    // Everything else, one by one, in the order received.
    let mut notify: Vec<Ready> = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        let answer = match r {
            Report::Record {
                namespace,
                id,
                token,
                key,
                task,
            } => record_one(tx, namespace, *id, *token, *key, task)
                .await
                .map(Applied::Recorded),
            Report::Complete {
                namespace,
                id,
                token,
                key,
                ..
            } => refusal(tx, namespace, *id, *token, *key, Some("complete"))
                .await
                .map(|()| Applied::Completed(false)),
            Report::End {
                namespace,
                id,
                token,
                key,
                end,
            } => {
                let ended = end_one(tx, namespace, *id, *token, *key, end).await;
                if let Ok(Some((run, delay))) = &ended
                    && RunStatus::from_proto(run.status) == Some(RunStatus::Queued)
                {
                    notify.push(Ready::new(namespace, &run.queue, *delay));
                }
                ended.map(|e| Applied::Ended(e.map(|(run, delay)| (Box::new(run), delay))))
            }
        };
        match answer {
            // Refusals are answers; any other error comes from a statement that failed and
            // aborted the transaction: the whole batch fails.
            Err(e)
                if !matches!(
                    e,
                    Error::NotFound(_) | Error::FailedPrecondition(_) | Error::PermissionDenied(_)
                ) =>
            {
                return Err(e);
            }
            answer => out[i] = Some(answer),
        }
    }
    notify_ready(tx, notify).await?;
    Ok(out
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Error::Internal("report left unanswered".into()))))
        .collect())
}

/// Records one task result (see `sql/reports/task_record.sql`): `None` when this call recorded it, or
/// the result an earlier call recorded.
pub(super) async fn record_one(
    tx: &Transaction<'_>,
    namespace: &str,
    id: Uuid,
    token: Uuid,
    key: Option<Uuid>,
    task: &NewTask,
) -> Result<Option<TaskResult>> {
    let stmt = tx.prepare_cached(sql!("reports/task_record")).await?;
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
                &key,
            ],
        )
        .await?;
    let lease_ok: bool = row.get("lease_ok");
    let recorded: bool = row.get("recorded");
    if !lease_ok {
        refusal(tx, namespace, id, token, key, None).await?;
    }
    if recorded {
        return Ok(None);
    }
    // Recorded before: the earlier result is the one that counts.
    let stmt = tx.prepare_cached(sql!("reports/task_get")).await?;
    let row = tx
        .query_opt(&stmt, &[&namespace, &id, &task.key])
        .await?
        .ok_or_else(|| Error::Unavailable("task record vanished; retry".into()))?;
    Ok(Some(task_from_row(&row)?))
}

/// Ends the lease `token` of a running run by failure or release, deciding retry, failure or
/// cancellation. Returns the updated run and, if it is queued again, how long until it is
/// visible; or `None` for a duplicate report. The caller sends the NOTIFY.
pub(super) async fn end_one(
    tx: &Transaction<'_>,
    namespace: &str,
    id: Uuid,
    token: Uuid,
    key: Option<Uuid>,
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
            &tx.prepare_cached(sql!("reports/lock_lease")).await?,
            &[&namespace, &id, &token, &key],
        )
        .await?;
    let Some(row) = locked else {
        return refusal(tx, namespace, id, token, key, Some(kind)).await.map(|()| None);
    };
    let attempt: i32 = row.get("attempt");
    let owner: Option<Uuid> = row.get("lease_owner");
    // The reports under a lease are its worker's key's: the events they write say so.
    let lease_key: Option<Uuid> = row.get("lease_key");
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
                .query_opt(&tx.prepare_cached(sql!("runs/get")).await?, &[&namespace, child])
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
        tx.query_opt(
            &tx.prepare_cached(sql!("reports/cancel_reason")).await?,
            &[&namespace, &id],
        )
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
                RunStatus::Cancelled,
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
                    RunStatus::Failed,
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
                    RunStatus::Queued,
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
                RunStatus::Queued,
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
                RunStatus::Suspended,
                previous,
                attempt,
                wait.deadline().unwrap_or_default(),
                "run_suspended",
                details,
            )
        }
    };
    // A run that would be queued again is paused instead if that was asked.
    let next = if next == RunStatus::Queued && pause_requested {
        RunStatus::Paused
    } else {
        next
    };
    let updated = tx
        .query_one(
            &tx.prepare_cached(sql!("reports/end_lease")).await?,
            &[&namespace, &id, &next, &error, &kind, &next_attempt, &ms(delay)],
        )
        .await?;
    let insert = tx.prepare_cached(sql!("history/insert")).await?;
    tx.execute(
        &insert,
        &[&namespace, &id, &event, &attempt, &owner, &details, &lease_key],
    )
    .await?;
    if next == RunStatus::Paused {
        tx.execute(
            &insert,
            &[
                &namespace,
                &id,
                &"run_paused",
                &attempt,
                &owner,
                &None::<Json>,
                &lease_key,
            ],
        )
        .await?;
    }
    if let (LeaseEnd::Suspend { key, name, seq, wait }, RunStatus::Suspended) = (end, next) {
        let (event, child_id) = match wait {
            Wait::Sleep(_) => (None, None),
            Wait::Event { name, .. } => (Some(name.as_str()), None),
            Wait::Child(c) => (None, Some(*c)),
        };
        let updated = tx
            .query_one(
                &tx.prepare_cached(sql!("waits/suspend")).await?,
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

/// Called when a report under `token` did not apply: `Ok(())` if it duplicates the report
/// (`kind`) that already ended this lease, else the error that explains the refusal.
pub(super) async fn refusal(
    client: &impl GenericClient,
    namespace: &str,
    id: Uuid,
    token: Uuid,
    key: Option<Uuid>,
    kind: Option<&str>,
) -> Result<()> {
    let stmt = client.prepare_cached(sql!("runs/get")).await?;
    let row = client
        .query_opt(&stmt, &[&namespace, &id])
        .await?
        .ok_or_else(|| not_found(id))?;
    let status: String = row.get("status");
    let row_token: Option<Uuid> = row.get("lease_token");
    let lease_end: Option<String> = row.get("lease_end");
    if row_token == Some(token) && key.is_some() && key != row.get::<_, Option<Uuid>>("lease_key") {
        return Err(Error::PermissionDenied(format!(
            "the lease on run {id} belongs to a worker of another API key; this report was not applied"
        )));
    }
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
