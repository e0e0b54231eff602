//! Waits and timers: runs that sleep, wait for an event or a child, and the timeouts the reaper
//! applies; waking them early or on time.

use super::*;

impl Store {
    /// Applies the run timeouts that have passed, up to `limit` runs of each kind, in one
    /// transaction: execution and schedule-to-start timeouts end the run `failed`; attempt and
    /// heartbeat timeouts fail the attempt, which the retry policy may retry. Each writes a
    /// `timed_out` event. Answers the runs moved.
    #[instrument(name = "store.runs.time_out", skip_all)]
    pub async fn time_out_runs(&self, limit: i64) -> Result<Vec<Moved>> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut moved = Vec::new();
        for (kind, stmt, error_type) in [
            ("execution", sql!("waits/execution_timeouts"), "ExecutionTimeout"),
            (
                "schedule_to_start",
                sql!("waits/schedule_timeouts"),
                "ScheduleToStartTimeout",
            ),
        ] {
            for row in tx.query(&tx.prepare_cached(stmt).await?, &[&limit]).await? {
                let (ns, id): (String, Uuid) = (row.get("namespace"), row.get("id"));
                let error = json!({"type": error_type, "message": timeout_message(kind)});
                let Some(run) = tx
                    .query_opt(&tx.prepare_cached(sql!("waits/time_out")).await?, &[&ns, &id, &error])
                    .await?
                else {
                    continue;
                };
                let attempt: i32 = run.get("attempt");
                let owner: Option<Uuid> = run.get("lease_owner");
                let insert = tx.prepare_cached(sql!("history/insert")).await?;
                tx.execute(
                    &insert,
                    &[
                        &ns,
                        &id,
                        &"timed_out",
                        &attempt,
                        &owner,
                        &json!({"timeout": kind}),
                        &None::<Uuid>,
                    ],
                )
                .await?;
                tx.execute(
                    &insert,
                    &[&ns, &id, &"run_failed", &attempt, &owner, &error, &None::<Uuid>],
                )
                .await?;
                moved.push(Moved {
                    namespace: ns,
                    id,
                    queue: run.get("queue"),
                    status: RunStatus::Failed,
                    visible_in: None,
                });
            }
        }
        for (kind, stmt, error_type) in [
            ("attempt", sql!("waits/attempt_timeouts"), "AttemptTimeout"),
            ("heartbeat", sql!("waits/heartbeat_timeouts"), "HeartbeatTimeout"),
        ] {
            for row in tx.query(&tx.prepare_cached(stmt).await?, &[&limit]).await? {
                let (ns, id, token): (String, Uuid, Uuid) =
                    (row.get("namespace"), row.get("id"), row.get("lease_token"));
                let error = json!({"type": error_type, "message": timeout_message(kind)});
                let locked = tx
                    .query_opt(&tx.prepare_cached(sql!("runs/get")).await?, &[&ns, &id])
                    .await?;
                let (attempt, owner) = match &locked {
                    Some(r) => (r.get::<_, i32>("attempt"), r.get::<_, Option<Uuid>>("lease_owner")),
                    None => continue,
                };
                tx.execute(
                    &tx.prepare_cached(sql!("history/insert")).await?,
                    &[
                        &ns,
                        &id,
                        &"timed_out",
                        &attempt,
                        &owner,
                        &json!({"timeout": kind}),
                        &None::<Uuid>,
                    ],
                )
                .await?;
                if let Some((run, delay)) = end_one(&tx, &ns, id, token, None, &LeaseEnd::Timeout { error }).await? {
                    let status = RunStatus::from_proto(run.status)
                        .ok_or_else(|| Error::Internal(format!("run {id} has no status")))?;
                    if status == RunStatus::Queued {
                        notify_ready(&tx, vec![Ready::new(&ns, &run.queue, delay)]).await?;
                    }
                    moved.push(Moved {
                        namespace: ns,
                        id,
                        queue: run.queue,
                        status,
                        visible_in: Some(delay),
                    });
                }
            }
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// Wakes up to `limit` suspended runs whose wake time has come (see
    /// `sql/waits/wake_due.sql`), with one NOTIFY per queue that got runs back.
    #[instrument(name = "store.runs.wake_due", skip_all)]
    pub async fn wake_due(&self, limit: i64) -> Result<Vec<Moved>> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let stmt = tx.prepare_cached(sql!("waits/wake_due")).await?;
        let rows = tx.query(&stmt, &[&limit]).await?;
        let woken = moved_runs(&tx, &rows).await?;
        tx.commit().await?;
        Ok(woken)
    }

    /// Ends a suspended run's wait now (`WakeRun`): a sleep ends, a wait for an event times
    /// out. A wait for a child cannot be ended so.
    #[instrument(name = "store.run.wake", skip_all)]
    pub async fn wake_run(&self, namespace: &str, id: Uuid, actor: Option<Uuid>) -> Result<(Run, Moved)> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        set_actor(&tx, actor).await?;
        let row = lock_run(&tx, namespace, id).await?;
        let status: RunStatus = row.get("status");
        if status != RunStatus::Suspended {
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
        Ok((run_from_row(&row)?, Moved::of_row(&row, None)))
    }

    /// Sends an event to a run (by id or idempotency key): stored in its inbox (unless its
    /// event key was sent before), and handed to the run at once if it waits for an event of
    /// that name. Answers (stored, delivered, the run as it is now, what moved).
    #[instrument(name = "store.run.send_event", skip_all)]
    pub async fn send_event(
        &self,
        namespace: &str,
        target: &RunRef,
        name: &str,
        payload: &Json,
        event_key: Option<&str>,
        actor: Option<Uuid>,
    ) -> Result<(bool, bool, Run, Moved)> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        set_actor(&tx, actor).await?;
        let row = match target {
            RunRef::Id(id) => lock_run(&tx, namespace, *id).await?,
            RunRef::Key(key) => tx
                .query_opt(
                    &tx.prepare_cached(sql!("runs/get_by_key_for_update")).await?,
                    &[&namespace, key],
                )
                .await?
                .ok_or_else(|| Error::NotFound(format!("no run has idempotency key {key:?}")))?,
        };
        let id: Uuid = row.get("id");
        let status: RunStatus = row.get("status");
        let duplicate = match event_key {
            Some(key) => tx
                .query_one(
                    &tx.prepare_cached(sql!("waits/inbox_has_key")).await?,
                    &[&namespace, &id, &key],
                )
                .await?
                .get::<_, bool>(0),
            None => false,
        };
        if duplicate {
            wake_if_queued(&tx, &row).await?;
            tx.commit().await?;
            return Ok((false, false, run_from_row(&row)?, Moved::of_row(&row, None)));
        }
        if status.is_terminal() {
            return Err(Error::FailedPrecondition(format!(
                "run {id} is {status}; events can only be sent to a run that has not ended"
            )));
        }
        let seq: i64 = tx
            .query_one(
                &tx.prepare_cached(sql!("waits/inbox_insert")).await?,
                &[&namespace, &id, &name, payload, &event_key],
            )
            .await?
            .get(0);
        let attempt: i32 = row.get("attempt");
        tx.execute(
            &tx.prepare_cached(sql!("history/insert")).await?,
            &[
                &namespace,
                &id,
                &"event_received",
                &attempt,
                &None::<Uuid>,
                &json!({"name": name, "key": event_key, "seq": seq}),
                &None::<Uuid>,
            ],
        )
        .await?;
        let waiting =
            status == RunStatus::Suspended && row.get::<_, Option<String>>("wait_event").as_deref() == Some(name);
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
        Ok((true, waiting, run_from_row(&run)?, Moved::of_row(&run, None)))
    }

    /// How long until the earliest wake time of a suspended run (zero if overdue), if any.
    #[instrument(name = "store.runs.next_wake", skip_all)]
    pub async fn next_wake(&self) -> Result<Option<Duration>> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(&client.prepare_cached(sql!("waits/next_wake")).await?, &[])
            .await?;
        Ok(row
            .get::<_, Option<i64>>(0)
            .map(|ms| Duration::from_millis(ms.max(0) as u64)))
    }

    /// The earliest future visibility of each queue (to arm timers at start).
    #[instrument(name = "store.queues.next_visible", skip_all)]
    pub async fn next_visible(&self) -> Result<Vec<(String, String, Duration)>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("waits/next_visible")).await?;
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
}

/// Hands the oldest pending event `event` of a run to its wait step `key`: the step's recorded
/// output and the `run_woken` details, if one was pending.
pub(super) async fn take_event(
    tx: &Transaction<'_>,
    namespace: &str,
    id: Uuid,
    event: &str,
    key: &str,
) -> Result<Option<(Json, Json)>> {
    let row = tx
        .query_opt(
            &tx.prepare_cached(sql!("waits/inbox_take")).await?,
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
pub(super) fn child_outcome(child: &tokio_postgres::Row) -> Option<(Json, Json)> {
    let status: RunStatus = child.get("status");
    if !status.is_terminal() {
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

/// Ends the wait of suspended run `id` (see `sql/waits/wake.sql`): its step is recorded with
/// `output`, and it is queued again. Answers the run's row.
pub(super) async fn end_wait(
    tx: &Transaction<'_>,
    namespace: &str,
    id: Uuid,
    output: &Json,
    details: &Json,
) -> Result<tokio_postgres::Row> {
    let row = tx
        .query_opt(
            &tx.prepare_cached(sql!("waits/wake")).await?,
            &[&namespace, &id, output, details],
        )
        .await?
        .ok_or_else(|| Error::Internal(format!("run {id} was not suspended")))?;
    if row.get::<_, RunStatus>("status") == RunStatus::Queued {
        let queue: String = row.get("queue");
        notify_ready(tx, vec![Ready::new(namespace, &queue, Duration::ZERO)]).await?;
    }
    Ok(row)
}

/// What a timeout of `kind` did, for the run's error.
pub(super) fn timeout_message(kind: &str) -> &'static str {
    match kind {
        "execution" => "the run did not end within its execution timeout",
        "schedule_to_start" => "the run waited in its queue longer than its schedule-to-start timeout",
        "attempt" => "the attempt did not end within its attempt timeout",
        _ => "the worker did not heartbeat within the run's heartbeat timeout",
    }
}
