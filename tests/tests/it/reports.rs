//! Batched reports: `Report` answers each report on its own, and concurrent reports are
//! committed together without mixing up their answers.

use std::time::Duration;

use aiki_proto::v1::{
    CompleteRunRequest, FailRunRequest, HeartbeatRequest, Lease, RecordTaskRequest, ReleaseRunRequest, ReportRequest,
    RunError, RunReport, RunStatus, StartRunsRequest, report_result, run_report,
};
use aiki_tests::{RawWorker, TestDb, TestServer, history_types, start_req, task_output};
use futures::StreamExt;
use serde_json::json;
use tonic::Code;

fn record(run_id: &str, token: &str, key: &str, out: serde_json::Value) -> run_report::Report {
    run_report::Report::RecordTask(RecordTaskRequest {
        namespace: String::new(),
        run_id: run_id.into(),
        lease_token: token.into(),
        task: Some(task_output(key, "step", 0, out)),
    })
}

fn complete(run_id: &str, token: &str, out: serde_json::Value) -> run_report::Report {
    run_report::Report::CompleteRun(CompleteRunRequest {
        namespace: String::new(),
        run_id: run_id.into(),
        lease_token: token.into(),
        output: Some(aiki_proto::json_to_value(&out)),
        ..Default::default()
    })
}

fn reports(items: Vec<run_report::Report>) -> ReportRequest {
    ReportRequest {
        reports: items.into_iter().map(|r| RunReport { report: Some(r) }).collect(),
    }
}

#[tokio::test]
async fn one_call_carries_reports_of_every_kind_each_answered_on_its_own() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let runs = (0..5).map(|i| start_req("mixed", json!({"i": i}))).collect();
    wf.start_runs(StartRunsRequest { runs }).await.unwrap();
    let w = RawWorker::register(&server, &["default"]).await;
    let leased = w.poll(5, Duration::from_secs(5)).await;
    assert_eq!(leased.len(), 5);
    let (a, b, c, d, e) = (&leased[0], &leased[1], &leased[2], &leased[3], &leased[4]);

    let resp = w
        .client
        .clone()
        .report(reports(vec![
            record(&a.run_id, &a.lease_token, "k#1#0", json!("a-step")),
            complete(&b.run_id, &b.lease_token, json!({"b": true})),
            run_report::Report::FailRun(FailRunRequest {
                namespace: String::new(),
                run_id: c.run_id.clone(),
                lease_token: c.lease_token.clone(),
                error: Some(RunError {
                    r#type: "Boom".into(),
                    message: "no".into(),
                    details: None,
                }),
                non_retryable: true,
                retry_after: None,
            }),
            run_report::Report::ReleaseRun(ReleaseRunRequest {
                namespace: String::new(),
                run_id: d.run_id.clone(),
                lease_token: d.lease_token.clone(),
                reason: "not now".into(),
                delay: None,
            }),
            // A token that is not the lease: refused, the others still apply.
            complete(&e.run_id, &uuid::Uuid::new_v4().to_string(), json!(null)),
            // Malformed: refused with INVALID_ARGUMENT, on its own.
            complete("not-a-uuid", &e.lease_token, json!(null)),
        ]))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(resp.len(), 6, "one answer per report");
    let kinds: Vec<_> = resp.iter().map(|r| r.result.clone().unwrap()).collect();
    match &kinds[0] {
        report_result::Result::RecordTask(r) => assert!(r.recorded),
        other => panic!("record answered with {other:?}"),
    }
    assert!(matches!(kinds[1], report_result::Result::CompleteRun(_)));
    match &kinds[2] {
        report_result::Result::FailRun(r) => assert_eq!(r.status, RunStatus::Failed as i32),
        other => panic!("fail answered with {other:?}"),
    }
    match &kinds[3] {
        report_result::Result::ReleaseRun(r) => assert_eq!(r.status, RunStatus::Queued as i32),
        other => panic!("release answered with {other:?}"),
    }
    match &kinds[4] {
        report_result::Result::Error(err) => {
            assert_eq!(err.code, Code::FailedPrecondition as i32, "{}", err.message);
            assert!(err.message.contains("not the current lease"), "{}", err.message);
        }
        other => panic!("stale token answered with {other:?}"),
    }
    match &kinds[5] {
        report_result::Result::Error(err) => {
            assert_eq!(err.code, Code::InvalidArgument as i32, "{}", err.message);
            assert!(err.message.contains("run_id"), "{}", err.message);
        }
        other => panic!("bad id answered with {other:?}"),
    }

    let status = |id: &str| {
        let db = &db;
        let id: uuid::Uuid = id.parse().unwrap();
        async move {
            let pg = db.connect().await;
            let s: String = pg
                .query_one("SELECT status FROM runs WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            s
        }
    };
    assert_eq!(status(&a.run_id).await, "running");
    assert_eq!(status(&b.run_id).await, "completed");
    assert_eq!(status(&c.run_id).await, "failed");
    assert_eq!(status(&d.run_id).await, "queued");
    assert_eq!(
        status(&e.run_id).await,
        "running",
        "the refused reports changed nothing"
    );
    assert_eq!(
        history_types(&server, &a.run_id).await,
        ["run_created", "run_leased", "task_recorded"]
    );

    // The call itself is refused only when malformed as a whole.
    let err = w.client.clone().report(reports(vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let too_many = (0..1001)
        .map(|_| complete(&e.run_id, &e.lease_token, json!(null)))
        .collect();
    let err = w.client.clone().report(reports(too_many)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("1 to 1000"), "{}", err.message());
    let empty = ReportRequest {
        reports: vec![RunReport { report: None }],
    };
    let answer = w.client.clone().report(empty).await.unwrap().into_inner().results;
    assert!(
        matches!(&answer[0].result, Some(report_result::Result::Error(e)) if e.code == Code::InvalidArgument as i32)
    );
}

#[tokio::test]
async fn duplicates_in_one_call_apply_once_and_agree() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    wf.start_run(start_req("dup", json!({}))).await.unwrap();
    let w = RawWorker::register(&server, &["default"]).await;
    let run = w.poll(1, Duration::from_secs(5)).await.remove(0);
    let (id, token) = (&run.run_id, &run.lease_token);

    // The same task twice, then a different result under the same key: one record, and every
    // answer gives the first result.
    let resp = w
        .client
        .clone()
        .report(reports(vec![
            record(id, token, "k#1#0", json!(1)),
            record(id, token, "k#1#0", json!(1)),
            record(id, token, "k#1#0", json!(2)),
        ]))
        .await
        .unwrap()
        .into_inner()
        .results;
    let answers: Vec<_> = resp
        .into_iter()
        .map(|r| match r.result {
            Some(report_result::Result::RecordTask(t)) => (t.recorded, t.task.unwrap()),
            other => panic!("record answered with {other:?}"),
        })
        .collect();
    assert_eq!(answers.iter().filter(|(recorded, _)| *recorded).count(), 1);
    assert!(answers[0].0, "the first of the duplicates is the one recorded");
    for (_, task) in &answers {
        assert_eq!(task, &task_output("k#1#0", "step", 0, json!(1)));
    }

    // The same completion twice: both succeed, the run completes once.
    let resp = w
        .client
        .clone()
        .report(reports(vec![
            complete(id, token, json!("done")),
            complete(id, token, json!("done")),
        ]))
        .await
        .unwrap()
        .into_inner()
        .results;
    for r in &resp {
        assert!(matches!(r.result, Some(report_result::Result::CompleteRun(_))), "{r:?}");
    }
    assert_eq!(
        history_types(&server, id).await,
        ["run_created", "run_leased", "task_recorded", "run_completed"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reports_of_many_runs_are_committed_together_without_mixing_answers() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let runs = (0..400).map(|i| start_req("many", json!({"i": i}))).collect();
    wf.start_runs(StartRunsRequest { runs }).await.unwrap();
    let w = RawWorker::register(&server, &["default"]).await;
    let mut leased = Vec::new();
    while leased.len() < 400 {
        leased.extend(w.poll(400, Duration::from_secs(5)).await);
    }

    // Every run reports its task and then its completion, all runs at once, half of them
    // through unary calls and half through single-report `Report` calls.
    let tasks = leased.iter().enumerate().map(|(i, run)| {
        let mut client = w.client.clone();
        let (id, token) = (run.run_id.clone(), run.lease_token.clone());
        async move {
            let key = format!("step#{i}#0");
            let recorded = if i % 2 == 0 {
                client
                    .record_task(RecordTaskRequest {
                        namespace: String::new(),
                        run_id: id.clone(),
                        lease_token: token.clone(),
                        task: Some(task_output(&key, "step", 0, json!(i))),
                    })
                    .await
                    .unwrap()
                    .into_inner()
            } else {
                match client
                    .report(reports(vec![record(&id, &token, &key, json!(i))]))
                    .await
                    .unwrap()
                    .into_inner()
                    .results
                    .remove(0)
                    .result
                {
                    Some(report_result::Result::RecordTask(r)) => r,
                    other => panic!("record answered with {other:?}"),
                }
            };
            assert!(recorded.recorded);
            assert_eq!(recorded.task.unwrap().key, key, "an answer of another run's report");
            client
                .complete_run(CompleteRunRequest {
                    namespace: String::new(),
                    run_id: id,
                    lease_token: token,
                    output: Some(aiki_proto::json_to_value(&json!(i))),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    });
    futures::future::join_all(tasks).await;

    let pg = db.connect().await;
    let row = pg
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'completed'),
                    count(*) FILTER (WHERE output = input->'i'),
                    (SELECT count(*) FROM task_results),
                    (SELECT count(*) FROM run_history WHERE type = 'run_completed')
             FROM runs",
            &[],
        )
        .await
        .unwrap();
    let counts: (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        counts,
        (400, 400, 400, 400),
        "completed, right output, tasks, completion events"
    );
    // Task i is recorded on the run whose input is i.
    let mismatched: i64 = pg
        .query_one(
            "SELECT count(*) FROM task_results t JOIN runs r ON r.id = t.run_id WHERE t.output <> r.input->'i'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(mismatched, 0);
}

fn complete_with(
    run_id: &str,
    token: &str,
    out: serde_json::Value,
    tasks: Vec<aiki_proto::v1::TaskResult>,
) -> CompleteRunRequest {
    CompleteRunRequest {
        namespace: String::new(),
        run_id: run_id.into(),
        lease_token: token.into(),
        output: Some(aiki_proto::json_to_value(&out)),
        tasks,
    }
}

/// The recorded (task key, output) of a run, by key.
async fn recorded_tasks(db: &TestDb, run_id: &str) -> Vec<(String, serde_json::Value)> {
    db.pairs_of_run(
        "SELECT task_key, output FROM task_results WHERE run_id = $1 ORDER BY task_key",
        run_id,
    )
    .await
}

/// A completion that carries task results records them in its own transaction, before the
/// completion in the history; a duplicate of it applies nothing more; under a stale lease it
/// records nothing; a bad task result refuses the whole completion and changes nothing.
#[tokio::test]
async fn a_completion_checkpoints_the_task_results_it_carries() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let runs = (0..3).map(|i| start_req("carry", json!({"i": i}))).collect();
    wf.start_runs(StartRunsRequest { runs }).await.unwrap();
    let w = RawWorker::register(&server, &["default"]).await;
    let leased = w.poll(3, Duration::from_secs(5)).await;
    assert_eq!(leased.len(), 3);
    let (a, b, c) = (&leased[0], &leased[1], &leased[2]);
    let mut client = w.client.clone();

    // A: one task recorded on its own, then two more carried by the completion; the carried
    // copy of the first keeps the result recorded first.
    client
        .record_task(RecordTaskRequest {
            namespace: String::new(),
            run_id: a.run_id.clone(),
            lease_token: a.lease_token.clone(),
            task: Some(task_output("one#h#0", "one", 0, json!("first"))),
        })
        .await
        .unwrap();
    let carried = vec![
        task_output("one#h#0", "one", 0, json!("again")),
        task_output("two#h#0", "two", 1, json!(2)),
        task_output("three#h#0", "three", 2, json!({"n": 3})),
    ];
    let done = complete_with(&a.run_id, &a.lease_token, json!("a done"), carried);
    client.complete_run(done.clone()).await.unwrap();
    let expected = vec![
        ("one#h#0".to_owned(), json!("first")),
        ("three#h#0".to_owned(), json!({"n": 3})),
        ("two#h#0".to_owned(), json!(2)),
    ];
    assert_eq!(recorded_tasks(&db, &a.run_id).await, expected);
    let history = [
        "run_created",
        "run_leased",
        "task_recorded",
        "task_recorded",
        "task_recorded",
        "run_completed",
    ];
    assert_eq!(history_types(&server, &a.run_id).await, history);
    // The same completion again (a retry after a lost answer): acknowledged, nothing applied.
    client.complete_run(done).await.unwrap();
    assert_eq!(recorded_tasks(&db, &a.run_id).await, expected);
    assert_eq!(history_types(&server, &a.run_id).await, history);

    // B: a token that is not the lease records nothing and completes nothing.
    let stale = complete_with(
        &b.run_id,
        &uuid::Uuid::new_v4().to_string(),
        json!(null),
        vec![task_output("x#h#0", "x", 0, json!(1))],
    );
    let err = client.complete_run(stale).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(recorded_tasks(&db, &b.run_id).await.is_empty());

    // C: a task result without a key refuses the completion as a whole.
    let bad = complete_with(
        &c.run_id,
        &c.lease_token,
        json!(null),
        vec![
            task_output("ok#h#0", "ok", 0, json!(1)),
            task_output("", "nameless", 1, json!(2)),
        ],
    );
    let err = client.complete_run(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("tasks[1]: task.key"), "{}", err.message());
    assert!(recorded_tasks(&db, &c.run_id).await.is_empty());
    for run in [b, c] {
        let got = wf
            .get_run(aiki_proto::v1::GetRunRequest {
                namespace: String::new(),
                r#ref: Some(aiki_proto::v1::get_run_request::Ref::RunId(run.run_id.clone())),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.status, RunStatus::Running as i32, "run {} still leased", run.run_id);
    }
    // C's lease still holds: a good completion goes through.
    client
        .complete_run(complete_with(
            &c.run_id,
            &c.lease_token,
            json!("c done"),
            vec![task_output("ok#h#0", "ok", 0, json!(1))],
        ))
        .await
        .unwrap();
    assert_eq!(
        recorded_tasks(&db, &c.run_id).await,
        vec![("ok#h#0".to_owned(), json!(1))]
    );
}

/// A heartbeat names every lease of its worker while the worker's completions of those runs are
/// being committed. Both lock the runs they change: if they took the locks in different orders
/// they could deadlock, and PostgreSQL would abort one (a heartbeat failing with an internal
/// error, or a second of every report waiting for the deadlock check). The heartbeats here name
/// the leases in no particular order, the completions go in batches in key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_racing_completions_of_the_same_runs_neither_deadlock_nor_fail() {
    const RUNS: usize = 2000;
    let db = TestDb::new().await;
    // Leases that outlast any wait here: a report refused because its lease expired would hide
    // what this test is about.
    let mut config = aiki_tests::Config::for_test(&db.url);
    config.lease_ttl = Duration::from_secs(60);
    let server = TestServer::start_with(config).await;
    let mut wf = server.workflows().await;
    for _ in 0..RUNS / 1000 {
        let runs = (0..1000).map(|i| start_req("raced", json!({"i": i}))).collect();
        wf.start_runs(StartRunsRequest { runs }).await.unwrap();
    }
    let w = RawWorker::register(&server, &["default"]).await;
    let mut leased = Vec::new();
    while leased.len() < RUNS {
        leased.extend(w.poll(1000, Duration::from_secs(5)).await);
    }
    leased.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    let mut named: Vec<Lease> = leased
        .iter()
        .map(|r| Lease {
            run_id: r.run_id.clone(),
            lease_token: r.lease_token.clone(),
        })
        .collect();
    // In no order: the worker sends them as its map of leases iterates.
    let shuffle = std::collections::hash_map::RandomState::new();
    named.sort_by_cached_key(|l| std::hash::BuildHasher::hash_one(&shuffle, &l.run_id));

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let heartbeats = {
        let (mut client, worker_id, done) = (w.client.clone(), w.id.clone(), done.clone());
        tokio::spawn(async move {
            let mut sent = 0;
            // At least a few heartbeats, and then as many as the completions take.
            while sent < 3 || !done.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = client
                    .heartbeat(HeartbeatRequest {
                        namespace: String::new(),
                        worker_id: worker_id.clone(),
                        leases: named.clone(),
                    })
                    .await;
                if let Err(status) = answer {
                    panic!("heartbeat {sent} failed while completions ran: {status:?}");
                }
                sent += 1;
            }
            sent
        })
    };
    // Completions in batches of 100, eight calls at a time. Each call is timed only for the
    // failure message: a deadlock shows as a call that waited for PostgreSQL's check (1 s).
    let calls = leased.chunks(100).map(|batch| {
        let mut client = w.client.clone();
        let items: Vec<_> = batch
            .iter()
            .map(|r| complete(&r.run_id, &r.lease_token, json!(1)))
            .collect();
        async move {
            let started = std::time::Instant::now();
            let answers = client.report(reports(items)).await.unwrap().into_inner().results;
            assert!(
                answers
                    .iter()
                    .all(|a| matches!(a.result, Some(report_result::Result::CompleteRun(_)))),
                "a completion was refused: {answers:?}"
            );
            started.elapsed()
        }
    });
    let slowest = futures::stream::iter(calls)
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .max()
        .unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = heartbeats.await.expect("every heartbeat succeeded");
    assert!(sent >= 3);

    // The server's sessions flush their statistics as they end: stop it and wait for them.
    server.stop().await;
    let pg = db.connect().await;
    aiki_tests::eventually(Duration::from_secs(30), "the server's sessions to end", || {
        let pg = &pg;
        async move {
            let others: i64 = pg
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            others == 0
        }
    })
    .await;
    let completed: i64 = pg
        .query_one("SELECT count(*) FROM runs WHERE status = 'completed'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(completed, RUNS as i64);
    let deadlocks: i64 = pg
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        deadlocks, 0,
        "PostgreSQL found deadlocks (the slowest report call took {slowest:?})"
    );
}
