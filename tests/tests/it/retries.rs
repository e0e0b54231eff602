//! Retries honour the run's backoff and end `failed` with the last error; a non-retryable
//! failure ends the run at once.

use std::time::{Duration, Instant, SystemTime};

use aiki_proto::v1::{FailRunRequest, GetRunRequest, RetryPolicy, RunError, RunStatus, get_run_request};
use aiki_tests::{RawWorker, TestDb, TestEnv, TestServer, start_req};
use aiki_worker::{Context, WorkflowError};
use serde_json::json;

fn fail(run_id: &str, token: &str, message: &str, non_retryable: bool) -> FailRunRequest {
    FailRunRequest {
        namespace: String::new(),
        run_id: run_id.into(),
        lease_token: token.into(),
        error: Some(RunError {
            r#type: "Boom".into(),
            message: message.into(),
            details: None,
        }),
        non_retryable,
        retry_after: None,
    }
}

#[tokio::test]
async fn retries_wait_for_their_backoff_then_fail_with_the_last_error() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let mut req = start_req("flaky", json!({}));
    req.retry_policy = Some(RetryPolicy {
        max_attempts: 3,
        initial_interval: Some(aiki_proto::duration_to_proto(Duration::from_millis(400))),
        max_interval: Some(aiki_proto::duration_to_proto(Duration::from_secs(10))),
        backoff_coefficient: 2.0,
        non_retryable_error_types: vec![],
    });
    let id = wf.start_run(req).await.unwrap().into_inner().run.unwrap().id;
    let w = RawWorker::register(&server, &["default"]).await;

    let mut lease = w.poll(1, Duration::ZERO).await.pop().unwrap();
    for (attempt, backoff) in [(1u32, Duration::from_millis(400)), (2, Duration::from_millis(800))] {
        assert_eq!(lease.attempt, attempt);
        let failed_at = Instant::now();
        let resp = w
            .client
            .clone()
            .fail_run(fail(
                &id,
                &lease.lease_token,
                &format!("attempt {attempt} failed"),
                false,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status, RunStatus::Queued as i32, "a retry is scheduled");
        let retry_at = SystemTime::try_from(resp.retry_at.unwrap()).unwrap();
        let wait = retry_at.duration_since(SystemTime::now()).unwrap_or_default();
        assert!(
            wait <= backoff.mul_f64(1.2),
            "backoff {wait:?} within jitter of {backoff:?}"
        );
        // Not leasable before its time...
        assert!(
            w.poll(1, Duration::ZERO).await.is_empty(),
            "not leased during the backoff"
        );
        // ...and leased, by a timer wake-up, once it has passed.
        lease = w
            .poll(1, Duration::from_secs(10))
            .await
            .pop()
            .expect("leased after the backoff");
        let waited = failed_at.elapsed();
        assert!(
            waited >= backoff,
            "attempt {} leased after {waited:?}, before its backoff {backoff:?}",
            attempt + 1
        );
        assert!(
            waited < backoff.mul_f64(1.2) + Duration::from_secs(3),
            "woken promptly: {waited:?}"
        );
    }
    assert_eq!(lease.attempt, 3);
    let resp = w
        .client
        .clone()
        .fail_run(fail(&id, &lease.lease_token, "attempt 3 failed", false))
        .await
        .unwrap();
    assert_eq!(resp.into_inner().status, RunStatus::Failed as i32);
    let run = wf
        .get_run(GetRunRequest {
            namespace: String::new(),
            r#ref: Some(get_run_request::Ref::RunId(id)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.status, RunStatus::Failed as i32);
    assert_eq!(run.error.unwrap().message, "attempt 3 failed");
    assert!(run.finished_at.is_some());
}

#[tokio::test]
async fn non_retryable_failures_end_the_run_at_once() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let w = RawWorker::register(&server, &["default"]).await;

    // Flagged by the worker.
    let id = aiki_tests::start_id(&mut wf, start_req("x", json!(1))).await;
    let lease = w.poll(1, Duration::ZERO).await.pop().unwrap();
    let resp = w
        .client
        .clone()
        .fail_run(fail(&id, &lease.lease_token, "bad card", true))
        .await
        .unwrap();
    assert_eq!(resp.into_inner().status, RunStatus::Failed as i32);

    // Listed as a non-retryable type in the run's policy.
    let mut req = start_req("x", json!(2));
    req.retry_policy = Some(RetryPolicy {
        non_retryable_error_types: vec!["Boom".into()],
        ..Default::default()
    });
    let id = wf.start_run(req).await.unwrap().into_inner().run.unwrap().id;
    let lease = w.poll(1, Duration::ZERO).await.pop().unwrap();
    let resp = w
        .client
        .clone()
        .fail_run(fail(&id, &lease.lease_token, "boom", false))
        .await
        .unwrap();
    assert_eq!(resp.into_inner().status, RunStatus::Failed as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runtime_retries_a_failing_workflow() {
    let env = TestEnv::new().await;
    let client = &env.client;
    let opts = aiki::StartOptions {
        retry: Some(aiki::RetryPolicy {
            max_attempts: Some(3),
            initial_interval: Some(Duration::from_millis(50)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let ok = client
        .start_run("third-time-lucky", &json!({}), opts.clone())
        .await
        .unwrap();
    let builder = aiki_worker::WorkerBuilder::new(env.url())
        .register("third-time-lucky", |ctx: Context, _: serde_json::Value| async move {
            if ctx.attempt() < 3 {
                return Err(WorkflowError::new("Flaky", format!("attempt {}", ctx.attempt())));
            }
            Ok(ctx.attempt())
        })
        .register("hopeless", |_ctx: Context, _: serde_json::Value| async move {
            Err::<(), _>(WorkflowError::new("Declined", "card declined").non_retryable())
        });
    let mut worker = env.worker(builder).await;
    assert_eq!(ok.result::<u32>(Duration::from_secs(20)).await.unwrap(), 3);
    let bad = client.start_run("hopeless", &json!({}), opts).await.unwrap();
    match bad.result::<()>(Duration::from_secs(20)).await {
        Err(aiki::Error::RunFailed { error, .. }) => {
            assert_eq!(error.kind, "Declined");
            assert_eq!(error.message, "card declined");
        }
        other => panic!("expected RunFailed, got {other:?}"),
    }
    assert_eq!(
        bad.get().await.unwrap().attempt,
        1,
        "no retry of a non-retryable failure"
    );
    worker.stop().await;
}

#[tokio::test]
async fn duplicate_reports_succeed_and_apply_once() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let id = aiki_tests::start_id(&mut wf, start_req("dup", json!({}))).await;
    let w = RawWorker::register(&server, &["default"]).await;
    let lease = w.poll(1, Duration::ZERO).await.pop().unwrap();

    // The same task reported twice (a retry after a lost response): the first result stays.
    let record = |output: serde_json::Value| aiki_proto::v1::RecordTaskRequest {
        namespace: String::new(),
        run_id: id.clone(),
        lease_token: lease.lease_token.clone(),
        task: Some(aiki_tests::task_output("charge#1#0", "charge", 0, output)),
    };
    let first = w
        .client
        .clone()
        .record_task(record(json!("ch_1")))
        .await
        .unwrap()
        .into_inner();
    let again = w
        .client
        .clone()
        .record_task(record(json!("ch_2")))
        .await
        .unwrap()
        .into_inner();
    assert!(first.recorded && !again.recorded);
    assert_eq!(
        again.task, first.task,
        "the recorded result is returned, not the new one"
    );

    // The same failure reported twice: one retry scheduled, one attempt consumed.
    let a = w
        .client
        .clone()
        .fail_run(fail(&id, &lease.lease_token, "boom", false))
        .await
        .unwrap()
        .into_inner();
    let b = w
        .client
        .clone()
        .fail_run(fail(&id, &lease.lease_token, "boom", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (a.status, b.status),
        (RunStatus::Queued as i32, RunStatus::Queued as i32)
    );
    let pg = db.connect().await;
    let row = pg
        .query_one(
            "SELECT attempt, (SELECT count(*) FROM run_events WHERE type = 'run_retry_scheduled'), \
             (SELECT count(*) FROM task_results) FROM runs",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i32>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)),
        (2, 1, 1)
    );
    // But another report under that ended lease is refused.
    let complete = aiki_proto::v1::CompleteRunRequest {
        namespace: String::new(),
        run_id: id.clone(),
        lease_token: lease.lease_token.clone(),
        output: None,
        ..Default::default()
    };
    let err = w.client.clone().complete_run(complete).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}
