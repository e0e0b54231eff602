//! Zombie workers are fenced: a worker that stops heartbeating loses its lease, another worker
//! gets the run, and the first worker's reports are refused.

use std::{sync::Arc, time::Duration};

use aiki_proto::v1::{
    CompleteRunRequest, EventType, GetRunResultRequest, HeartbeatRequest, Lease, RecordTaskRequest, RunStatus,
};
use aiki_tests::{Counts, RawWorker, TestDb, TestEnv, TestServer, start_req};
use aiki_worker::{Context, WorkerBuilder, WorkflowError};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::Code;

fn value(v: serde_json::Value) -> Option<prost_types::Value> {
    Some(aiki_proto::json_to_value(&v))
}

#[tokio::test]
async fn a_silent_worker_loses_its_lease_and_its_reports_are_refused() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let id = aiki_tests::start_id(&mut wf, start_req("pay", json!({}))).await;

    let a = RawWorker::register(&server, &["default"]).await;
    let leased_a = a.poll(1, Duration::ZERO).await.pop().expect("A gets the run");
    // A goes silent. B waits; the lease expires (2 s in tests), the reaper re-queues the run
    // and wakes B's poll.
    let b = RawWorker::register(&server, &["default"]).await;
    let leased_b = b
        .poll(1, Duration::from_secs(10))
        .await
        .pop()
        .expect("B gets the run after A's lease expired");
    assert_eq!(leased_b.run_id, id);
    assert_ne!(leased_b.lease_token, leased_a.lease_token);

    // A comes back: every report it makes is refused and changes nothing.
    let task = aiki_tests::task_output("charge#0#0", "charge", 0, json!("from A"));
    let err = a
        .client
        .clone()
        .record_task(RecordTaskRequest {
            namespace: String::new(),
            run_id: id.clone(),
            lease_token: leased_a.lease_token.clone(),
            task: Some(task),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = a
        .client
        .clone()
        .complete_run(CompleteRunRequest {
            namespace: String::new(),
            run_id: id.clone(),
            lease_token: leased_a.lease_token.clone(),
            output: value(json!("from A")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let hb = a
        .client
        .clone()
        .heartbeat(HeartbeatRequest {
            namespace: String::new(),
            worker_id: a.id.clone(),
            leases: vec![Lease {
                run_id: id.clone(),
                lease_token: leased_a.lease_token.clone(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        hb.lost_run_ids,
        vec![id.clone()],
        "A's heartbeat says the lease is lost"
    );

    // B completes; a duplicate of B's report succeeds and applies once.
    let complete = CompleteRunRequest {
        namespace: String::new(),
        run_id: id.clone(),
        lease_token: leased_b.lease_token.clone(),
        output: value(json!("from B")),
        ..Default::default()
    };
    b.client.clone().complete_run(complete.clone()).await.unwrap();
    b.client
        .clone()
        .complete_run(complete)
        .await
        .expect("a duplicate report succeeds");
    // A heartbeat naming a lease its holder's own report ended says so: not lost. A's lease,
    // taken over, is still lost.
    let heartbeat = |w: &RawWorker, token: &str| {
        let (mut client, worker_id) = (w.client.clone(), w.id.clone());
        let lease = Lease {
            run_id: id.clone(),
            lease_token: token.to_owned(),
        };
        async move {
            client
                .heartbeat(HeartbeatRequest {
                    namespace: String::new(),
                    worker_id,
                    leases: vec![lease],
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let hb = heartbeat(&b, &leased_b.lease_token).await;
    assert!(hb.lost_run_ids.is_empty(), "B's lease ended by its own report: {hb:?}");
    assert_eq!(hb.ended_run_ids, vec![id.clone()]);
    let hb = heartbeat(&a, &leased_a.lease_token).await;
    assert_eq!(hb.lost_run_ids, vec![id.clone()], "A's lease was taken over");
    assert!(hb.ended_run_ids.is_empty());
    let run = wf
        .get_run_result(GetRunResultRequest {
            namespace: String::new(),
            run_id: id.clone(),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(run.status, RunStatus::Completed as i32);
    assert_eq!(
        aiki_proto::value_to_json(run.output.as_ref().unwrap()).unwrap(),
        json!("from B")
    );
    assert_eq!(run.lease_expirations, 1);
    let pg = db.connect().await;
    let completed: i64 = pg
        .query_one("SELECT count(*) FROM run_history WHERE type = 'run_completed'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(completed, 1, "the duplicate applied once");
}

#[tokio::test]
async fn a_run_that_keeps_losing_its_lease_ends_failed() {
    let db = TestDb::new().await;
    let mut config = aiki_tests::Config::for_test(&db.url);
    config.lease_ttl = Duration::from_millis(300);
    config.heartbeat_interval = Duration::from_millis(100);
    config.max_lease_expirations = 2;
    let server = TestServer::start_with(config).await;
    let mut wf = server.workflows().await;
    let id = aiki_tests::start_id(&mut wf, start_req("crashy", json!({}))).await;
    let w = RawWorker::register(&server, &["default"]).await;
    for _ in 0..3 {
        assert_eq!(
            w.poll(1, Duration::from_secs(5)).await.len(),
            1,
            "leased again after expiry"
        );
    }
    let run = wf
        .get_run_result(GetRunResultRequest {
            namespace: String::new(),
            run_id: id,
            timeout: Some(aiki_proto::duration_to_proto(Duration::from_secs(5))),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(run.done);
    let run = run.run.unwrap();
    assert_eq!(run.status, RunStatus::Failed as i32);
    assert_eq!(run.error.unwrap().r#type, "LeaseExpired");
    assert_eq!(run.lease_expirations, 3);
}

/// A run of three tasks whose worker dies while task 3 runs, so after task 2 is checkpointed
/// (a task's result is checkpointed before the next task starts): the next worker runs only
/// task 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_executed_run_skips_recorded_tasks() {
    let env = TestEnv::new().await;
    let client = &env.client;
    let run = client
        .start_run("three", &json!({"x": 1}), aiki::StartOptions::default())
        .await
        .unwrap();

    let effects: Counts = Arc::default();
    let (in_three_tx, mut in_three) = tokio::sync::mpsc::unbounded_channel::<()>();
    let make_worker = |die_in_three: bool| {
        let effects = effects.clone();
        let in_three_tx = in_three_tx.clone();
        WorkerBuilder::new(env.url()).register("three", move |ctx: Context, input: serde_json::Value| {
            let effects = effects.clone();
            let in_three_tx = in_three_tx.clone();
            async move {
                let mut acc = Vec::new();
                for step in ["one", "two", "three"] {
                    let e = effects.clone();
                    let in_three_tx = in_three_tx.clone();
                    let out: String = ctx
                        .task(step, &input, |_| async move {
                            if step == "three" && die_in_three {
                                let _ = in_three_tx.send(());
                                // The worker dies here: task three never ends.
                                std::future::pending::<()>().await;
                            }
                            *e.lock().unwrap().entry(step.to_owned()).or_default() += 1;
                            Ok::<_, WorkflowError>(format!("{step} done"))
                        })
                        .await?;
                    acc.push(out);
                }
                Ok(acc)
            }
        })
    };

    let first = make_worker(true).build().await.unwrap();
    let first = tokio::spawn(first.run(CancellationToken::new()));
    in_three.recv().await.expect("task three started");
    let history = client.history(&run.id).await.unwrap();
    let recorded: Vec<_> = history
        .iter()
        .filter(|e| e.r#type == EventType::TaskRecorded as i32)
        .collect();
    assert_eq!(
        recorded.len(),
        2,
        "tasks one and two were checkpointed before task three started"
    );
    first.abort(); // the process is gone: no more heartbeats, no reports
    let _ = first.await;

    let mut second = env.worker(make_worker(false)).await;
    let out: Vec<String> = run.result(Duration::from_secs(30)).await.unwrap();
    assert_eq!(out, ["one done", "two done", "three done"]);
    second.stop().await;
    let effects = effects.lock().unwrap();
    assert_eq!(effects.get("one"), Some(&1), "task one ran once");
    assert_eq!(effects.get("two"), Some(&1), "task two ran once");
    assert_eq!(effects.get("three"), Some(&1), "task three ran once");
}
