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

use super::{RetryPolicy, status_of};
use crate::error::Result;

fn ts(t: SystemTime) -> Timestamp {
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

pub fn retry_from_row(row: &Row) -> RetryPolicy {
    RetryPolicy {
        max_attempts: row.get::<_, i32>("max_attempts").max(1) as u32,
        initial_interval: Duration::from_millis(row.get::<_, i64>("initial_interval_ms").max(0) as u64),
        max_interval: Duration::from_millis(row.get::<_, i64>("max_interval_ms").max(0) as u64),
        backoff_coefficient: row.get("backoff_coefficient"),
        non_retryable_error_types: row.get("non_retryable_error_types"),
    }
}

pub fn run_from_row(row: &Row) -> Result<Run> {
    let retry = retry_from_row(row);
    let status: &str = row.get("status");
    let status = status_of(status);
    let owner: Option<Uuid> = row.get("lease_owner");
    Ok(Run {
        id: row.get::<_, Uuid>("id").to_string(),
        namespace: row.get("namespace"),
        workflow: row.get("workflow"),
        version: row.get("version"),
        queue: row.get("queue"),
        status: status as i32,
        // Left out (NULL) where the caller has it already: a created run's input.
        input: row.get::<_, Option<Json>>("input").as_ref().map(json_to_value),
        output: row.get::<_, Option<Json>>("output").as_ref().map(json_to_value),
        error: row.get::<_, Option<Json>>("error").as_ref().map(error_from_json),
        idempotency_key: row.get::<_, Option<String>>("idempotency_key").unwrap_or_default(),
        priority: row.get("priority"),
        attempt: row.get::<_, i32>("attempt").max(0) as u32,
        retry_policy: Some(v1::RetryPolicy {
            max_attempts: retry.max_attempts,
            initial_interval: Some(aiki_proto::duration_to_proto(retry.initial_interval)),
            max_interval: Some(aiki_proto::duration_to_proto(retry.max_interval)),
            backoff_coefficient: retry.backoff_coefficient,
            non_retryable_error_types: retry.non_retryable_error_types,
        }),
        lease_expirations: row.get::<_, i32>("lease_expirations").max(0) as u32,
        cancel_requested: row.get("cancel_requested"),
        worker_id: match (status, owner) {
            (v1::RunStatus::Running, Some(o)) => o.to_string(),
            _ => String::new(),
        },
        created_at: opt_ts(row, "created_at"),
        updated_at: opt_ts(row, "updated_at"),
        visible_at: opt_ts(row, "visible_at"),
        started_at: opt_ts(row, "started_at"),
        finished_at: opt_ts(row, "finished_at"),
        lease_expires_at: opt_ts(row, "lease_expires_at"),
        pause_requested: row.try_get("pause_requested").unwrap_or(false),
        wake_at: row
            .try_get::<_, Option<SystemTime>>("wake_at")
            .ok()
            .flatten()
            .map(Into::into),
        parent_run_id: opt_uuid(row, "parent_id"),
        wait_event: row
            .try_get::<_, Option<String>>("wait_event")
            .ok()
            .flatten()
            .unwrap_or_default(),
        wait_child_run_id: opt_uuid(row, "wait_child"),
        execution_timeout: match (
            row.try_get::<_, Option<SystemTime>>("execution_deadline")
                .ok()
                .flatten(),
            row.try_get::<_, Option<SystemTime>>("created_at").ok().flatten(),
        ) {
            (Some(deadline), Some(created)) => deadline.duration_since(created).ok().map(aiki_proto::duration_to_proto),
            _ => None,
        },
        attempt_timeout: opt_ms(row, "attempt_timeout_ms"),
        schedule_to_start_timeout: opt_ms(row, "schedule_timeout_ms"),
        heartbeat_timeout: opt_ms(row, "heartbeat_timeout_ms"),
    })
}

/// An optional bigint column of milliseconds as a duration.
fn opt_ms(row: &Row, col: &str) -> Option<prost_types::Duration> {
    row.try_get::<_, Option<i64>>(col)
        .ok()
        .flatten()
        .map(|ms| aiki_proto::duration_to_proto(Duration::from_millis(ms.max(0) as u64)))
}

/// An optional uuid column as text ("" when NULL or not selected).
fn opt_uuid(row: &Row, col: &str) -> String {
    row.try_get::<_, Option<Uuid>>(col)
        .ok()
        .flatten()
        .map(|u| u.to_string())
        .unwrap_or_default()
}

pub fn leased_from_row(row: &Row) -> Result<LeasedRun> {
    Ok(LeasedRun {
        run_id: row.get::<_, Uuid>("id").to_string(),
        workflow: row.get("workflow"),
        version: row.get("version"),
        queue: row.get("queue"),
        // Left out (NULL) where the caller has it already: a created run's input.
        input: row.get::<_, Option<Json>>("input").as_ref().map(json_to_value),
        attempt: row.get::<_, i32>("attempt").max(0) as u32,
        lease_token: row
            .get::<_, Option<Uuid>>("lease_token")
            .map(|t| t.to_string())
            .unwrap_or_default(),
        lease_expires_at: opt_ts(row, "lease_expires_at"),
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
    })
}

pub fn queue_from_row(row: &Row) -> Queue {
    let n = |c: &str| row.get::<_, i64>(c).max(0) as u64;
    Queue {
        name: row.get("queue"),
        ready: n("ready"),
        delayed: n("delayed"),
        running: n("running"),
        suspended: n("suspended"),
        completed: n("completed"),
        failed: n("failed"),
        cancelled: n("cancelled"),
        paused: n("paused"),
        oldest_ready_age: row
            .get::<_, Option<f64>>("oldest_ready_secs")
            .map(|s| aiki_proto::duration_to_proto(Duration::from_secs_f64(s.max(0.0)))),
        unserved: Vec::new(),
    }
}
