//! Rows → protocol messages.

use std::time::{Duration, SystemTime};

use aiki_proto::{
    json_to_value,
    v1::{self, HistoryEvent, LeasedRun, Queue, Run, RunError, TaskResult, Worker, WorkflowRef, task_result},
};
use prost_types::Timestamp;
use serde_json::Value as Json;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{RetryPolicy, RunStatus};
use crate::error::{Error, Result};

pub(super) fn ts(t: SystemTime) -> Timestamp {
    t.into()
}

fn opt_ts(row: &Row, col: &str) -> Option<Timestamp> {
    row.get::<_, Option<SystemTime>>(col).map(ts)
}

/// A stored error (`{type, message, details}`) as the protocol's `RunError`.
pub fn error_from_json(j: &Json) -> RunError {
    RunError {
        r#type: j.get("type").and_then(Json::as_str).unwrap_or("").to_owned(),
        message: j.get("message").and_then(Json::as_str).unwrap_or("").to_owned(),
        details: j.get("details").filter(|d| !d.is_null()).map(json_to_value),
    }
}

/// Declares a struct of where each named column sits in a statement's rows, found once per
/// answer: reading a column by name scans the row's columns, which for a run (thirty-odd
/// columns, many rows per batch) was a tenth of the server's time in a batched start.
macro_rules! columns {
    ($(#[$doc:meta])* $name:ident { $($col:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name {
            $($col: Option<usize>,)*
        }

        impl $name {
            /// The positions in the rows of one statement's answer (any of its rows).
            pub fn of(row: &Row) -> Self {
                let cols = row.columns();
                let at = |name: &str| cols.iter().position(|c| c.name() == name);
                Self { $($col: at(stringify!($col)),)* }
            }
        }
    };
}

columns! {
    /// Positions of the columns [`run_from_row_at`] reads.
    RunCols {
        id, namespace, workflow, version, queue, status, input, output, error, idempotency_key,
        priority, attempt, max_attempts, initial_interval_ms, max_interval_ms,
        backoff_coefficient, non_retryable_error_types, lease_expirations, cancel_requested,
        lease_owner, created_at, updated_at, visible_at, started_at, finished_at,
        lease_expires_at, pause_requested, wake_at, parent_id, wait_event, wait_child,
        execution_deadline, attempt_timeout_ms, schedule_timeout_ms, heartbeat_timeout_ms,
    }
}

/// The value of a column the statement must select: a missing one (a bug in its SQL) or one
/// of another type is an internal error.
fn need<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, at: Option<usize>, name: &str) -> Result<T> {
    let i = at.ok_or_else(|| Error::Internal(format!("the statement selects no column {name}")))?;
    row.try_get(i)
        .map_err(|e| Error::Internal(format!("column {name}: {e}")))
}

/// The value of a column the statement may leave out (`None` then, or when NULL).
fn opt<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, at: Option<usize>) -> Option<T> {
    at.and_then(|i| row.try_get::<_, Option<T>>(i).ok().flatten())
}

pub fn retry_from_row(row: &Row) -> Result<RetryPolicy> {
    retry_at(row, &RunCols::of(row))
}

fn retry_at(row: &Row, c: &RunCols) -> Result<RetryPolicy> {
    Ok(RetryPolicy {
        max_attempts: need::<i32>(row, c.max_attempts, "max_attempts")?.max(1) as u32,
        initial_interval: Duration::from_millis(
            need::<i64>(row, c.initial_interval_ms, "initial_interval_ms")?.max(0) as u64
        ),
        max_interval: Duration::from_millis(need::<i64>(row, c.max_interval_ms, "max_interval_ms")?.max(0) as u64),
        backoff_coefficient: need(row, c.backoff_coefficient, "backoff_coefficient")?,
        non_retryable_error_types: need(row, c.non_retryable_error_types, "non_retryable_error_types")?,
    })
}

/// A run from a row of any statement that selects the run's columns (see [`run_from_row_at`]
/// for many rows of one statement).
pub fn run_from_row(row: &Row) -> Result<Run> {
    run_from_row_at(row, &RunCols::of(row))
}

/// The runs of many rows of one statement, its column positions found once.
pub fn runs_from_rows(rows: &[Row]) -> Result<Vec<Run>> {
    let Some(cols) = rows.first().map(RunCols::of) else {
        return Ok(Vec::new());
    };
    rows.iter().map(|r| run_from_row_at(r, &cols)).collect()
}

/// [`run_from_row`] with the positions of the statement's columns found once.
fn run_from_row_at(row: &Row, c: &RunCols) -> Result<Run> {
    let retry = retry_at(row, c)?;
    let status = need::<RunStatus>(row, c.status, "status")?.to_proto();
    let owner: Option<Uuid> = opt(row, c.lease_owner);
    let ts_of = |at: Option<usize>| opt::<SystemTime>(row, at).map(ts);
    let ms_of = |at: Option<usize>| {
        opt::<i64>(row, at).map(|ms| aiki_proto::duration_to_proto(Duration::from_millis(ms.max(0) as u64)))
    };
    let uuid_of = |at: Option<usize>| opt::<Uuid>(row, at).map(|u| u.to_string()).unwrap_or_default();
    let created: Option<SystemTime> = opt(row, c.created_at);
    Ok(Run {
        id: need::<Uuid>(row, c.id, "id")?.to_string(),
        namespace: need(row, c.namespace, "namespace")?,
        workflow: need(row, c.workflow, "workflow")?,
        version: need(row, c.version, "version")?,
        queue: need(row, c.queue, "queue")?,
        status: status as i32,
        // Left out (NULL) where the caller has it already: a created run's input.
        input: opt::<Json>(row, c.input).as_ref().map(json_to_value),
        output: opt::<Json>(row, c.output).as_ref().map(json_to_value),
        error: opt::<Json>(row, c.error).as_ref().map(error_from_json),
        idempotency_key: opt::<String>(row, c.idempotency_key).unwrap_or_default(),
        priority: need(row, c.priority, "priority")?,
        attempt: need::<i32>(row, c.attempt, "attempt")?.max(0) as u32,
        retry_policy: Some(v1::RetryPolicy {
            max_attempts: retry.max_attempts,
            initial_interval: Some(aiki_proto::duration_to_proto(retry.initial_interval)),
            max_interval: Some(aiki_proto::duration_to_proto(retry.max_interval)),
            backoff_coefficient: retry.backoff_coefficient,
            non_retryable_error_types: retry.non_retryable_error_types,
        }),
        lease_expirations: need::<i32>(row, c.lease_expirations, "lease_expirations")?.max(0) as u32,
        cancel_requested: need(row, c.cancel_requested, "cancel_requested")?,
        worker_id: match (status, owner) {
            (v1::RunStatus::Running, Some(o)) => o.to_string(),
            _ => String::new(),
        },
        created_at: created.map(ts),
        updated_at: ts_of(c.updated_at),
        visible_at: ts_of(c.visible_at),
        started_at: ts_of(c.started_at),
        finished_at: ts_of(c.finished_at),
        lease_expires_at: ts_of(c.lease_expires_at),
        pause_requested: opt(row, c.pause_requested).unwrap_or(false),
        wake_at: ts_of(c.wake_at),
        parent_run_id: uuid_of(c.parent_id),
        wait_event: opt::<String>(row, c.wait_event).unwrap_or_default(),
        wait_child_run_id: uuid_of(c.wait_child),
        execution_timeout: match (opt::<SystemTime>(row, c.execution_deadline), created) {
            (Some(deadline), Some(created)) => deadline.duration_since(created).ok().map(aiki_proto::duration_to_proto),
            _ => None,
        },
        attempt_timeout: ms_of(c.attempt_timeout_ms),
        schedule_to_start_timeout: ms_of(c.schedule_timeout_ms),
        heartbeat_timeout: ms_of(c.heartbeat_timeout_ms),
    })
}

columns! {
    /// Positions of the columns [`leased_from_row_at`] reads.
    LeasedCols { id, workflow, version, queue, input, attempt, lease_token, lease_expires_at, fresh }
}

/// The leased runs of a claim's rows, its column positions found once (by name, a claim of
/// 1,000 runs spent a tenth of the server's time of a drain looking columns up), and the ids of
/// those that were leased before: only those can have recorded tasks.
pub fn leased_from_rows(rows: &[Row]) -> Result<(Vec<LeasedRun>, Vec<Uuid>)> {
    let Some(c) = rows.first().map(LeasedCols::of) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut runs = Vec::with_capacity(rows.len());
    let mut leased_before = Vec::new();
    for row in rows {
        if !need::<bool>(row, c.fresh, "fresh")? {
            leased_before.push(need(row, c.id, "id")?);
        }
        runs.push(leased_from_row_at(row, &c)?);
    }
    Ok((runs, leased_before))
}

fn leased_from_row_at(row: &Row, c: &LeasedCols) -> Result<LeasedRun> {
    Ok(LeasedRun {
        run_id: need::<Uuid>(row, c.id, "id")?.to_string(),
        workflow: need(row, c.workflow, "workflow")?,
        version: need(row, c.version, "version")?,
        queue: need(row, c.queue, "queue")?,
        input: opt::<Json>(row, c.input).as_ref().map(json_to_value),
        attempt: need::<i32>(row, c.attempt, "attempt")?.max(0) as u32,
        lease_token: opt::<Uuid>(row, c.lease_token)
            .map(|t| t.to_string())
            .unwrap_or_default(),
        lease_expires_at: opt::<SystemTime>(row, c.lease_expires_at).map(ts),
        tasks: Vec::new(),
    })
}

pub fn task_from_row(row: &Row) -> Result<TaskResult> {
    let output: Option<Json> = row.get("output");
    let error: Option<Json> = row.get("error");
    let result = match (error, output) {
        (Some(e), _) => task_result::Result::Error(error_from_json(&e)),
        (None, o) => task_result::Result::Output(json_to_value(&o.unwrap_or(Json::Null))),
    };
    Ok(TaskResult {
        key: row.get("task_key"),
        name: row.get("name"),
        seq: row.get::<_, i32>("seq").max(0) as u32,
        result: Some(result),
    })
}

pub fn event_from_row(row: &Row) -> Result<HistoryEvent> {
    let kind: &str = row.get("type");
    Ok(HistoryEvent {
        run_id: row.get::<_, Uuid>("run_id").to_string(),
        seq: row.get("seq"),
        r#type: v1::EventType::parse(kind).unwrap_or(v1::EventType::Unspecified) as i32,
        at: opt_ts(row, "at"),
        attempt: row.get::<_, i32>("attempt").max(0) as u32,
        worker_id: row
            .get::<_, Option<Uuid>>("worker_id")
            .map(|w| w.to_string())
            .unwrap_or_default(),
        details: row.get::<_, Option<Json>>("details").as_ref().map(json_to_value),
        actor_key_id: row
            .get::<_, Option<Uuid>>("actor")
            .map(|k| k.to_string())
            .unwrap_or_default(),
        actor_key_name: match row.get::<_, Option<Uuid>>("actor") {
            Some(k) if k == crate::auth::BOOTSTRAP_ID => "bootstrap admin".to_owned(),
            _ => row.get::<_, Option<String>>("actor_name").unwrap_or_default(),
        },
    })
}

pub fn worker_from_row(row: &Row) -> Result<Worker> {
    let workflows: Json = row.get("workflows");
    let workflows = workflows
        .as_array()
        .map(|a| {
            a.iter()
                .map(|w| WorkflowRef {
                    name: w.get("name").and_then(Json::as_str).unwrap_or("").to_owned(),
                    version: w.get("version").and_then(Json::as_str).unwrap_or("").to_owned(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Worker {
        id: row.get::<_, Uuid>("id").to_string(),
        identity: row.get("identity"),
        host: row.get("host"),
        workflows,
        queues: row.get("queues"),
        slots: row.get::<_, i32>("slots").max(0) as u32,
        registered_at: opt_ts(row, "registered_at"),
        last_heartbeat_at: opt_ts(row, "last_heartbeat_at"),
        leases_held: row.get::<_, i64>("leases_held").max(0) as u32,
        live: row.get("live"),
        api_key_id: row
            .get::<_, Option<Uuid>>("key_id")
            .map(|k| k.to_string())
            .unwrap_or_default(),
    })
}

/// An `api_keys` row as the protocol shows it (never its digest).
pub fn api_key_from_row(row: &Row) -> Result<aiki_proto::v1::ApiKey> {
    Ok(aiki_proto::v1::ApiKey {
        id: row.get::<_, Uuid>("id").to_string(),
        name: row.get("name"),
        role: row.get("role"),
        namespaces: row.get("namespaces"),
        rate_limit: row.get::<_, i32>("rate_limit").max(0) as u32,
        created_at: opt_ts(row, "created_at"),
        created_by: row.get("created_by"),
        revoked_at: opt_ts(row, "revoked_at"),
    })
}

pub fn queue_from_row(row: &Row) -> Queue {
    let n = |c: &str| row.get::<_, i64>(c).max(0) as u64;
    Queue {
        name: row.get("queue"),
        ready: n("ready"),
        delayed: n("delayed"),
        // Counted per status: each column is named as its status is stored.
        running: n(RunStatus::Running.as_sql()),
        suspended: n(RunStatus::Suspended.as_sql()),
        completed: n(RunStatus::Completed.as_sql()),
        failed: n(RunStatus::Failed.as_sql()),
        cancelled: n(RunStatus::Cancelled.as_sql()),
        paused: n(RunStatus::Paused.as_sql()),
        oldest_ready_age: row
            .get::<_, Option<f64>>("oldest_ready_secs")
            .map(|s| aiki_proto::duration_to_proto(Duration::from_secs_f64(s.max(0.0)))),
        unserved: Vec::new(),
    }
}
