//! What the CLI prints: tables and text for people, or JSON for scripts (`--output json`).

use std::time::SystemTime;

use aiki::{EventSent, HistoryEvent, Queue, Run, RunHandle, RunPage, RunStatus, Worker, WorkflowVersion};
use aiki_proto::v1::EventType;
use comfy_table::{Table, presets::NOTHING};
use serde_json::{Value, json};

pub struct Output {
    pub json: bool,
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default()
}

fn age(t: &Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| {
            format!(
                "{} ago",
                humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
            )
        })
        .unwrap_or_default()
}

fn compact(v: &Value, max: usize) -> String {
    let s = v.to_string();
    if s.chars().count() > max {
        format!("{}…", s.chars().take(max).collect::<String>())
    } else {
        s
    }
}

fn json_ts(t: &Option<prost_types::Timestamp>) -> Value {
    match ts(t) {
        s if s.is_empty() => Value::Null,
        s => Value::String(s),
    }
}

fn run_json(r: &Run) -> Value {
    let raw = &r.raw;
    json!({
        "id": r.id,
        "workflow": r.workflow,
        "version": r.version,
        "queue": r.queue,
        "status": r.status.as_str(),
        "input": r.input,
        "output": r.output,
        "error": r.error,
        "idempotency_key": r.idempotency_key,
        "priority": raw.priority,
        "attempt": r.attempt,
        "max_attempts": raw.retry_policy.as_ref().map(|p| p.max_attempts),
        "lease_expirations": raw.lease_expirations,
        "cancel_requested": r.cancel_requested,
        "pause_requested": r.pause_requested,
        "worker_id": (!raw.worker_id.is_empty()).then_some(&raw.worker_id),
        "created_at": json_ts(&raw.created_at),
        "visible_at": json_ts(&raw.visible_at),
        "started_at": json_ts(&raw.started_at),
        "finished_at": json_ts(&raw.finished_at),
        "wake_at": json_ts(&raw.wake_at),
        "wait_event": (!raw.wait_event.is_empty()).then_some(&raw.wait_event),
        "wait_child_run_id": (!raw.wait_child_run_id.is_empty()).then_some(&raw.wait_child_run_id),
        "parent_run_id": r.parent_run_id,
        "timeouts": {
            "execution_ms": ms(&raw.execution_timeout),
            "attempt_ms": ms(&raw.attempt_timeout),
            "schedule_to_start_ms": ms(&raw.schedule_to_start_timeout),
            "heartbeat_ms": ms(&raw.heartbeat_timeout),
        },
    })
}

fn ms(d: &Option<prost_types::Duration>) -> Option<u64> {
    d.as_ref()
        .and_then(aiki_proto::duration_from_proto)
        .map(|d| d.as_millis() as u64)
}

fn event_json(e: &HistoryEvent) -> Value {
    json!({
        "seq": e.seq,
        "type": EventType::try_from(e.r#type).unwrap_or(EventType::Unspecified).as_str(),
        "at": json_ts(&e.at),
        "attempt": e.attempt,
        "worker_id": (!e.worker_id.is_empty()).then_some(&e.worker_id),
        "details": e.details.as_ref().and_then(|d| aiki_proto::value_to_json(d).ok()),
    })
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    t
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

impl Output {
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    pub fn started(&self, h: &RunHandle) {
        if self.json {
            let mut v = run_json(&h.run);
            v["created"] = json!(h.created);
            print_json(&v);
        } else if h.created {
            println!("started run {} ({}, queue {})", h.id, h.run.workflow, h.run.queue);
        } else {
            println!(
                "run {} already exists for this key ({}, {})",
                h.id,
                h.run.workflow,
                h.run.status.as_str()
            );
        }
    }

    /// A run, with its children (the first page of them).
    pub fn run(&self, r: &Run, children: &[Run]) {
        if self.json {
            let mut v = run_json(r);
            v["children"] = children
                .iter()
                .map(|c| json!({"id": c.id, "workflow": c.workflow, "status": c.status.as_str()}))
                .collect();
            return print_json(&v);
        }
        let raw = &r.raw;
        let mut t = Table::new();
        t.load_preset(NOTHING);
        let mut row = |k: &str, v: String| {
            if !v.is_empty() {
                t.add_row(vec![k.to_owned(), v]);
            }
        };
        row("id", r.id.clone());
        row("workflow", r.workflow.clone());
        row("version", r.version.clone());
        row("queue", r.queue.clone());
        row(
            "status",
            r.status.as_str().to_owned()
                + if r.cancel_requested && !r.status.is_terminal() {
                    " (cancel requested)"
                } else if r.pause_requested {
                    " (pause requested)"
                } else {
                    ""
                },
        );
        row("key", r.idempotency_key.clone().unwrap_or_default());
        let max = raw.retry_policy.as_ref().map(|p| p.max_attempts).unwrap_or(0);
        row("attempt", format!("{} of {max}", r.attempt));
        row("priority", raw.priority.to_string());
        row("worker", raw.worker_id.clone());
        row("created", ts(&raw.created_at));
        if r.status == RunStatus::Queued {
            row("visible at", ts(&raw.visible_at));
        }
        row("started", ts(&raw.started_at));
        row("finished", ts(&raw.finished_at));
        if r.status == RunStatus::Suspended {
            let waits = if !raw.wait_event.is_empty() {
                format!("event {:?}", raw.wait_event)
            } else if !raw.wait_child_run_id.is_empty() {
                format!("child run {}", raw.wait_child_run_id)
            } else {
                "a timer".to_owned()
            };
            row("waiting for", waits);
            row("wakes at", ts(&raw.wake_at));
        }
        row("parent", r.parent_run_id.clone().unwrap_or_default());
        let timeouts: Vec<String> = [
            ("execution", &raw.execution_timeout),
            ("attempt", &raw.attempt_timeout),
            ("schedule-to-start", &raw.schedule_to_start_timeout),
            ("heartbeat", &raw.heartbeat_timeout),
        ]
        .iter()
        .filter_map(|(what, d)| {
            let d = d.as_ref().and_then(aiki_proto::duration_from_proto)?;
            Some(format!("{what} {}", humantime::format_duration(d)))
        })
        .collect();
        row("timeouts", timeouts.join(", "));
        row(
            "children",
            children
                .iter()
                .map(|c| format!("{} {} {}", c.id, c.workflow, c.status.as_str()))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        row("input", compact(&r.input, 200));
        row("output", r.output.as_ref().map(|o| compact(o, 200)).unwrap_or_default());
        row("error", r.error.as_ref().map(|e| e.to_string()).unwrap_or_default());
        println!("{t}");
    }

    pub fn result(&self, r: &Run) {
        if self.json {
            return print_json(&json!({
                "id": r.id, "status": r.status.as_str(), "output": r.output, "error": r.error,
            }));
        }
        match r.status {
            RunStatus::Completed => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(r.output.as_ref().unwrap_or(&Value::Null)).unwrap_or_default()
                )
            }
            s if s.is_terminal() => {
                let e = r.error.as_ref().map(|e| e.to_string()).unwrap_or_default();
                println!("run {} {}: {e}", r.id, s.as_str());
            }
            s => println!("run {} is {}", r.id, s.as_str()),
        }
    }

    pub fn runs(&self, page: &RunPage) {
        if self.json {
            return print_json(&json!({
                "runs": page.runs.iter().map(run_json).collect::<Vec<_>>(),
                "next_page_token": page.next_page_token,
            }));
        }
        let mut t = table(&["ID", "WORKFLOW", "QUEUE", "STATUS", "ATTEMPT", "CREATED", "KEY"]);
        for r in &page.runs {
            t.add_row(vec![
                r.id.clone(),
                r.workflow.clone(),
                r.queue.clone(),
                r.status.as_str().to_owned(),
                r.attempt.to_string(),
                ts(&r.raw.created_at),
                r.idempotency_key.clone().unwrap_or_default(),
            ]);
        }
        println!("{t}");
        if let Some(tok) = &page.next_page_token {
            println!("\nmore: --page-token {tok}");
        }
    }

    pub fn cancelled(&self, r: &Run) {
        if self.json {
            return print_json(&run_json(r));
        }
        match r.status {
            RunStatus::Cancelled => println!("run {} cancelled", r.id),
            _ => println!(
                "cancellation of run {} requested; its worker stops it at its next heartbeat",
                r.id
            ),
        }
    }

    pub fn paused(&self, r: &Run) {
        if self.json {
            return print_json(&run_json(r));
        }
        match r.status {
            RunStatus::Paused => println!("run {} paused", r.id),
            _ => println!(
                "pause of run {} requested; its worker releases it at its next heartbeat",
                r.id
            ),
        }
    }

    pub fn resumed(&self, r: &Run) {
        if self.json {
            return print_json(&run_json(r));
        }
        println!("run {} is {}", r.id, r.status.as_str());
    }

    pub fn event_sent(&self, name: &str, sent: &EventSent) {
        if self.json {
            return print_json(&json!({
                "stored": sent.stored,
                "delivered": sent.delivered,
                "run": sent.run.as_ref().map(run_json),
            }));
        }
        let id = sent.run.as_ref().map(|r| r.id.as_str()).unwrap_or_default();
        if !sent.stored {
            println!("run {id} already has an event with this key; nothing sent");
        } else if sent.delivered {
            println!("event {name:?} delivered to run {id}; it is queued again");
        } else {
            println!("event {name:?} kept for run {id} until it waits for it");
        }
    }

    pub fn history(&self, events: &[HistoryEvent]) {
        if self.json {
            return print_json(&Value::Array(events.iter().map(event_json).collect()));
        }
        let mut t = table(&["SEQ", "AT", "EVENT", "ATTEMPT", "DETAILS"]);
        for e in events {
            let v = event_json(e);
            t.add_row(vec![
                e.seq.to_string(),
                ts(&e.at),
                v["type"].as_str().unwrap_or("").to_owned(),
                e.attempt.to_string(),
                v.get("details")
                    .filter(|d| !d.is_null())
                    .map(|d| compact(d, 120))
                    .unwrap_or_default(),
            ]);
        }
        println!("{t}");
    }

    pub fn event(&self, e: &HistoryEvent) {
        let v = event_json(e);
        if self.json {
            println!("{}", v);
        } else {
            let details = v
                .get("details")
                .filter(|d| !d.is_null())
                .map(|d| compact(d, 120))
                .unwrap_or_default();
            println!(
                "{}  {:<20} attempt {}  {details}",
                ts(&e.at),
                v["type"].as_str().unwrap_or(""),
                e.attempt
            );
        }
    }

    pub fn run_end(&self, r: &Run) {
        if !self.json {
            println!("run {} {}", r.id, r.status.as_str());
        }
    }

    pub fn workers(&self, workers: &[Worker]) {
        if self.json {
            return print_json(&Value::Array(
                workers
                    .iter()
                    .map(|w| {
                        json!({
                            "id": w.id, "identity": w.identity, "host": w.host, "queues": w.queues,
                            "workflows": w.workflows.iter().map(|f| &f.name).collect::<Vec<_>>(),
                            "slots": w.slots, "leases_held": w.leases_held, "live": w.live,
                            "registered_at": json_ts(&w.registered_at), "last_heartbeat_at": json_ts(&w.last_heartbeat_at),
                        })
                    })
                    .collect(),
            ));
        }
        let mut t = table(&[
            "ID",
            "STATE",
            "IDENTITY",
            "QUEUES",
            "WORKFLOWS",
            "SLOTS",
            "LEASES",
            "LAST HEARTBEAT",
        ]);
        for w in workers {
            t.add_row(vec![
                w.id.clone(),
                if w.live { "live" } else { "gone" }.to_owned(),
                w.identity.clone(),
                w.queues.join(","),
                w.workflows
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                w.slots.to_string(),
                w.leases_held.to_string(),
                age(&w.last_heartbeat_at),
            ]);
        }
        println!("{t}");
    }

    fn key_json(k: &aiki::proto::v1::ApiKey) -> Value {
        json!({
            "id": k.id, "name": k.name, "role": k.role, "namespaces": k.namespaces,
            "rate_limit": k.rate_limit, "created_at": json_ts(&k.created_at), "created_by": k.created_by,
            "revoked_at": json_ts(&k.revoked_at),
        })
    }

    pub fn key_created(&self, k: &aiki::proto::v1::ApiKey, secret: &str) {
        if self.json {
            let mut v = Self::key_json(k);
            v["secret"] = json!(secret);
            return print_json(&v);
        }
        println!("{secret}");
        eprintln!(
            "API key {} ({}), role {} in {}: keep it now, it is not shown again.\nUse it with --api-key or AIKI_API_KEY.",
            k.id,
            k.name,
            k.role,
            k.namespaces.join(",")
        );
    }

    pub fn keys(&self, keys: &[aiki::proto::v1::ApiKey]) {
        if self.json {
            return print_json(&Value::Array(keys.iter().map(Self::key_json).collect()));
        }
        let mut t = table(&[
            "ID",
            "NAME",
            "ROLE",
            "NAMESPACES",
            "RATE LIMIT",
            "CREATED",
            "CREATED BY",
            "STATE",
        ]);
        for k in keys {
            t.add_row(vec![
                k.id.clone(),
                k.name.clone(),
                k.role.clone(),
                k.namespaces.join(","),
                if k.rate_limit == 0 {
                    "server's".to_owned()
                } else {
                    format!("{}/s", k.rate_limit)
                },
                age(&k.created_at),
                k.created_by.clone(),
                if k.revoked_at.is_some() { "revoked" } else { "active" }.to_owned(),
            ]);
        }
        println!("{t}");
    }

    pub fn key_revoked(&self, k: &aiki::proto::v1::ApiKey) {
        if self.json {
            return print_json(&Self::key_json(k));
        }
        println!("API key {} ({}) revoked", k.id, k.name);
    }

    pub fn queues(&self, queues: &[Queue]) {
        let oldest = |q: &Queue| {
            q.oldest_ready_age
                .as_ref()
                .and_then(aiki_proto::duration_from_proto)
                .map(|d| humantime::format_duration(std::time::Duration::from_millis(d.as_millis() as u64)).to_string())
        };
        if self.json {
            return print_json(&Value::Array(
                queues
                    .iter()
                    .map(|q| {
                        json!({
                            "name": q.name, "ready": q.ready, "delayed": q.delayed, "running": q.running,
                            "suspended": q.suspended, "completed": q.completed, "failed": q.failed,
                            "cancelled": q.cancelled, "paused": q.paused,
                            "unserved": q.unserved.iter().map(|u| json!({
                                "workflow": u.workflow, "version": u.version, "count": u.count, "reason": u.reason,
                            })).collect::<Vec<_>>(),
                            "oldest_ready_age_ms": q.oldest_ready_age.as_ref().and_then(aiki_proto::duration_from_proto).map(|d| d.as_millis() as u64),
                        })
                    })
                    .collect(),
            ));
        }
        let mut t = table(&[
            "QUEUE",
            "READY",
            "DELAYED",
            "RUNNING",
            "SUSPENDED",
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "PAUSED",
            "OLDEST READY",
        ]);
        for q in queues {
            t.add_row(vec![
                q.name.clone(),
                q.ready.to_string(),
                q.delayed.to_string(),
                q.running.to_string(),
                q.suspended.to_string(),
                q.completed.to_string(),
                q.failed.to_string(),
                q.cancelled.to_string(),
                q.paused.to_string(),
                oldest(q).unwrap_or_else(|| "-".into()),
            ]);
        }
        println!("{t}");
        for q in queues {
            for u in &q.unserved {
                println!("{} queued run(s) wait: {}", u.count, u.reason);
            }
        }
    }

    pub fn workflows(&self, workflows: &[WorkflowVersion]) {
        if self.json {
            return print_json(&Value::Array(
                workflows
                    .iter()
                    .map(|w| {
                        json!({
                            "workflow": w.workflow, "version": w.version, "latest": w.latest,
                            "registered_at": json_ts(&w.registered_at), "last_seen_at": json_ts(&w.last_seen_at),
                            "worker_ids": w.worker_ids, "workers": w.worker_identities,
                        })
                    })
                    .collect(),
            ));
        }
        let mut t = table(&["WORKFLOW", "VERSION", "LATEST", "WORKERS", "REGISTERED"]);
        for w in workflows {
            t.add_row(vec![
                w.workflow.clone(),
                if w.version.is_empty() {
                    "-".into()
                } else {
                    w.version.clone()
                },
                if w.latest { "yes".into() } else { String::new() },
                if w.worker_identities.is_empty() {
                    "none live".into()
                } else {
                    w.worker_identities.join(", ")
                },
                age(&w.registered_at),
            ]);
        }
        println!("{t}");
    }

    pub fn migrated(&self, applied: &[&str]) {
        if self.json {
            print_json(&json!({"applied": applied}));
        } else if applied.is_empty() {
            println!("database is up to date");
        } else {
            println!("applied migrations: {}", applied.join(", "));
        }
    }
}
