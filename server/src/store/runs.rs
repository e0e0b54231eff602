//! Runs and their starts: inserting (deduplicated by idempotency key or request id, pinned to a
//! version, under a parent), reading, listing, cancelling, pausing and resuming.

use super::*;

impl Store {
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

    /// Whether run `id` exists (`None`: it does not) and the key of the worker holding its
    /// open lease, if any.
    #[instrument(name = "store.run.lease_key", skip_all)]
    pub async fn run_lease_key(&self, namespace: &str, id: Uuid) -> Result<Option<Option<Uuid>>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("runs/lease_key")).await?;
        Ok(client
            .query_opt(&stmt, &[&namespace, &id])
            .await?
            .map(|r| r.get("lease_key")))
    }

    /// A run by id.
    #[instrument(name = "store.run.get", skip_all)]
    pub async fn get_run(&self, namespace: &str, id: Uuid) -> Result<Option<Run>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("runs/get")).await?;
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
        let stmt = client.prepare_cached(sql!("runs/get_by_key")).await?;
        client
            .query_opt(&stmt, &[&namespace, &key])
            .await?
            .as_ref()
            .map(run_from_row)
            .transpose()
    }

    /// Runs matching `filter`, newest first: at most `f.limit`, and no more than fit in
    /// `max_bytes` of inputs, outputs and errors (the first always). Answers whether more follow.
    #[instrument(name = "store.runs.list", skip_all)]
    pub async fn list_runs(&self, namespace: &str, f: &RunFilter, max_bytes: usize) -> Result<(Vec<Run>, bool)> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("runs/list")).await?;
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
                    &(max_bytes as i64),
                ],
            )
            .await?;
        let more = page_is_cut(&rows, f.limit);
        Ok((runs_from_rows(&rows)?, more))
    }

    /// Cancels a run: at once if queued, suspended or paused, by request if running; and, in
    /// the same transaction, every run it started (children, grandchildren...) that has not
    /// ended. Idempotent.
    #[instrument(name = "store.run.cancel", skip_all)]
    pub async fn cancel_run(
        &self,
        namespace: &str,
        id: Uuid,
        reason: &str,
        actor: Option<Uuid>,
    ) -> Result<(Run, Vec<Moved>)> {
        let mut client = self.pool.get().await?;
        let mut tries = 0;
        loop {
            tries += 1;
            let tx = client.transaction().await?;
            set_actor(&tx, actor).await?;
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
    pub async fn pause_run(
        &self,
        namespace: &str,
        id: Uuid,
        reason: &str,
        actor: Option<Uuid>,
    ) -> Result<(Run, Moved)> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        set_actor(&tx, actor).await?;
        let row = lock_run(&tx, namespace, id).await?;
        let status: RunStatus = row.get("status");
        let requested: bool = row.get("pause_requested");
        let cancelling: bool = row.get("cancel_requested");
        let now = match status {
            RunStatus::Queued => true,
            RunStatus::Running if !requested && !cancelling => false,
            RunStatus::Running | RunStatus::Paused => return Ok((run_from_row(&row)?, Moved::of_row(&row, None))),
            other => {
                return Err(Error::FailedPrecondition(format!(
                    "run {id} is {other}; only a queued or running run can be paused"
                )));
            }
        };
        let row = tx
            .query_one(&tx.prepare_cached(sql!("runs/pause")).await?, &[&namespace, &id, &now])
            .await?;
        let kind = if now { "run_paused" } else { "pause_requested" };
        let attempt: i32 = row.get("attempt");
        tx.execute(
            &tx.prepare_cached(sql!("history/insert")).await?,
            &[
                &namespace,
                &id,
                &kind,
                &attempt,
                &None::<Uuid>,
                &json!({"reason": reason}),
                &None::<Uuid>,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok((run_from_row(&row)?, Moved::of_row(&row, None)))
    }

    /// Resumes a paused run (queued again, visible when it would have been) or withdraws a
    /// pause request not yet taken effect. Resuming a run that is not paused changes nothing.
    #[instrument(name = "store.run.resume", skip_all)]
    pub async fn resume_run(&self, namespace: &str, id: Uuid, actor: Option<Uuid>) -> Result<(Run, Moved)> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        set_actor(&tx, actor).await?;
        let row = lock_run(&tx, namespace, id).await?;
        let status: RunStatus = row.get("status");
        let requested: bool = row.get("pause_requested");
        match status {
            RunStatus::Paused => {}
            RunStatus::Running if requested => {}
            RunStatus::Queued | RunStatus::Running | RunStatus::Suspended => {
                wake_if_queued(&tx, &row).await?;
                tx.commit().await?;
                return Ok((run_from_row(&row)?, Moved::of_row(&row, None)));
            }
            other => {
                return Err(Error::FailedPrecondition(format!(
                    "run {id} is {other}; only a paused run (or one asked to pause) can be resumed"
                )));
            }
        }
        let row = tx
            .query_one(&tx.prepare_cached(sql!("runs/resume")).await?, &[&namespace, &id])
            .await?;
        let attempt: i32 = row.get("attempt");
        let details = json!({"pause_withdrawn": status == RunStatus::Running});
        tx.execute(
            &tx.prepare_cached(sql!("history/insert")).await?,
            &[
                &namespace,
                &id,
                &"run_resumed",
                &attempt,
                &None::<Uuid>,
                &details,
                &None::<Uuid>,
            ],
        )
        .await?;
        let queued = if status == RunStatus::Paused {
            let delay = Duration::from_millis(row.get::<_, i64>("delay_ms").max(0) as u64);
            let queue: String = row.get("queue");
            notify_ready(&tx, vec![Ready::new(namespace, &queue, delay)]).await?;
            Some(delay)
        } else {
            None
        };
        tx.commit().await?;
        Ok((run_from_row(&row)?, Moved::of_row(&row, queued)))
    }
}

/// The ready notifications of `runs`, once per queue: those of runs
/// ready at once, and those of runs with a delay.
pub(super) fn ready_payloads(runs: &[NewRun]) -> (Vec<Ready>, Vec<Ready>) {
    let (mut ready, mut delayed) = (Vec::new(), Vec::new());
    for r in runs {
        let p = Ready::new(&r.namespace, &r.queue, r.delay);
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
pub(super) async fn start_in(
    tx: &impl GenericClient,
    runs: &[NewRun],
    atomic: bool,
    (mut refused, parents): Parents,
    cache: &VersionCache,
    wake: Vec<Ready>,
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
    let mut created_by = Vec::with_capacity(n);
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
        created_by.push(r.created_by);
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
    let stmt = tx.prepare_cached(sql!("runs/insert")).await?;
    let (wake_namespaces, wake_queues, wake_delays) = ready_arrays(&wake);
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
                &wake_namespaces,
                &wake_queues,
                &wake_delays,
                &created_by,
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
                    &tx.prepare_cached(sql!("history/insert")).await?,
                    &[
                        &r.namespace,
                        &parent,
                        &"child_started",
                        &attempt,
                        &None::<Uuid>,
                        &details,
                        &r.created_by,
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
                &tx.prepare_cached(sql!("runs/by_dedupe")).await?,
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
pub(super) async fn pin_versions(
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
        let stmt = tx.prepare_cached(sql!("workers/versions_of")).await?;
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
pub(super) type Parents = (HashMap<usize, Error>, HashMap<(String, Uuid), i32>);

/// Locks the parents of the runs that have one (see `sql/runs/lock_parents.sql`).
pub(super) async fn lock_parents(tx: &Transaction<'_>, runs: &[NewRun]) -> Result<Parents> {
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
        .query(&tx.prepare_cached(sql!("runs/lock_parents")).await?, &[&pns, &pids])
        .await?;
    let mut open = HashMap::new();
    let mut state = HashMap::new();
    for row in &rows {
        wake_if_queued(tx, row).await?;
        let key: (String, Uuid) = (row.get("namespace"), row.get("id"));
        let status: RunStatus = row.get("status");
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
            Some((status, _)) if status.is_terminal() => {
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

/// Cancels run `id` and then its descendants, level by level (see [`Store::cancel_run`]).
pub(super) async fn cancel_tree(
    tx: &Transaction<'_>,
    namespace: &str,
    id: Uuid,
    reason: &str,
) -> Result<(Run, Vec<Moved>)> {
    let root = cancel_in(tx, namespace, id, reason).await?;
    let mut moved = vec![Moved::of_row(&root, None)];
    let why = format!("its parent run {id} was cancelled");
    let stmt = tx.prepare_cached(sql!("runs/children")).await?;
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
                Ok(row) => moved.push(Moved::of_row(&row, None)),
                // Ended already: nothing to cancel.
                Err(Error::FailedPrecondition(_)) => {}
                Err(e) => return Err(e),
            }
        }
        level = children;
    }
    Ok((run_from_row(&root)?, moved))
}

/// Cancels one run: at once if queued, suspended or paused, by request if running.
pub(super) async fn cancel_in(
    tx: &Transaction<'_>,
    namespace: &str,
    id: Uuid,
    reason: &str,
) -> Result<tokio_postgres::Row> {
    let row = lock_run(tx, namespace, id).await?;
    let status: RunStatus = row.get("status");
    let requested: bool = row.get("cancel_requested");
    let now = match status {
        RunStatus::Queued | RunStatus::Suspended | RunStatus::Paused => true,
        RunStatus::Running if !requested => false,
        RunStatus::Running | RunStatus::Cancelled => return Ok(row),
        done => {
            return Err(Error::FailedPrecondition(format!(
                "run {id} already {done}; only a queued, suspended, paused or running run can be cancelled"
            )));
        }
    };
    let error = json!({"type": "Cancelled", "message": if reason.is_empty() { "cancelled" } else { reason }});
    let row = tx
        .query_one(
            &tx.prepare_cached(sql!("runs/cancel")).await?,
            &[&namespace, &id, &now, &error],
        )
        .await?;
    let kind = if now { "run_cancelled" } else { "cancel_requested" };
    let attempt: i32 = row.get("attempt");
    let details = json!({"reason": reason});
    tx.execute(
        &tx.prepare_cached(sql!("history/insert")).await?,
        &[&namespace, &id, &kind, &attempt, &None::<Uuid>, &details, &None::<Uuid>],
    )
    .await?;
    Ok(row)
}
