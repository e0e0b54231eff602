//! Run timeouts: each kind fires, is recorded in the run's history, and ends the run (execution,
//! schedule-to-start) or the attempt, which the retry policy retries (attempt, heartbeat).

use std::time::Duration;

use aiki::{RetryPolicy, RunStatus, StartOptions, Timeouts};
use aiki_proto::v1::CompleteRunRequest;
use aiki_tests::{RawWorker, TestDb, TestEnv, TestServer, eventually, history_types};
use serde_json::json;
use tonic::Code;

fn opts(timeouts: Timeouts, max_attempts: u32) -> StartOptions {
    StartOptions {
        timeouts,
        retry: Some(RetryPolicy {
            max_attempts: Some(max_attempts),
            initial_interval: Some(Duration::from_millis(50)),
            ..RetryPolicy::default()
        }),
        ..StartOptions::default()
    }
}

async fn ends_with(client: &aiki::Client, id: &str, status: RunStatus, error_type: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("run {id} ends {status:?}"),
        || async {
            let run = client.get(id).await.unwrap();
            run.status == status && run.error.as_ref().is_some_and(|e| e.kind == error_type)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_timeout_ends_the_run_whatever_its_state() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let execution = Timeouts {
        execution: Some(Duration::from_millis(600)),
        ..Timeouts::default()
    };
    // One waits in a queue nobody serves, one runs (its worker holds it and heartbeats).
    let queued = client
        .start_run(
            "slow",
            &json!({}),
            StartOptions {
                queue: Some("nobody".into()),
                ..opts(execution.clone(), 3)
            },
        )
        .await
        .unwrap();
    let running = client.start_run("slow", &json!({}), opts(execution, 3)).await.unwrap();
    assert_eq!(
        running.run.raw.execution_timeout,
        Some(aiki_proto::duration_to_proto(Duration::from_millis(600)))
    );
    let w = RawWorker::register(server, &["default"]).await;
    let lease = w.poll(1, Duration::from_secs(5)).await.remove(0);
    assert_eq!(lease.run_id, running.id);

    ends_with(client, &queued.id, RunStatus::Failed, "ExecutionTimeout").await;
    ends_with(client, &running.id, RunStatus::Failed, "ExecutionTimeout").await;
    for id in [&queued.id, &running.id] {
        let history = history_types(server, id).await;
        assert_eq!(
            &history[history.len() - 2..],
            ["timed_out", "run_failed"],
            "{history:?}"
        );
    }
    // The worker's lease ended with the run: its late report is refused.
    let err = w
        .client
        .clone()
        .complete_run(CompleteRunRequest {
            run_id: running.id.clone(),
            lease_token: lease.lease_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(client.get(&running.id).await.unwrap().status, RunStatus::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_timeout_fails_the_attempt_and_the_policy_retries_it() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let run = client
        .start_run(
            "slow",
            &json!({}),
            opts(
                Timeouts {
                    attempt: Some(Duration::from_millis(300)),
                    ..Timeouts::default()
                },
                2,
            ),
        )
        .await
        .unwrap();
    let w = RawWorker::register(server, &["default"]).await;
    let first = w.poll(1, Duration::from_secs(5)).await.remove(0);
    assert_eq!(first.attempt, 1);
    // The worker sits on it; the attempt times out and the run is leased again.
    let second = w.poll(1, Duration::from_secs(10)).await.remove(0);
    assert_eq!((second.run_id.as_str(), second.attempt), (run.id.as_str(), 2));
    ends_with(client, &run.id, RunStatus::Failed, "AttemptTimeout").await;
    let history = history_types(server, &run.id).await;
    assert_eq!(
        history,
        [
            "run_created",
            "run_leased",
            "timed_out",
            "run_retry_scheduled",
            "run_leased",
            "timed_out",
            "run_failed"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_to_start_timeout_ends_a_run_left_waiting_in_its_queue() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let schedule = Timeouts {
        schedule_to_start: Some(Duration::from_millis(400)),
        ..Timeouts::default()
    };
    let waiting = client
        .start_run(
            "x",
            &json!({}),
            StartOptions {
                queue: Some("nobody".into()),
                ..opts(schedule.clone(), 3)
            },
        )
        .await
        .unwrap();
    let leased = client.start_run("x", &json!({}), opts(schedule, 3)).await.unwrap();
    let w = RawWorker::register(server, &["default"]).await;
    assert_eq!(w.poll(1, Duration::from_secs(5)).await.remove(0).run_id, leased.id);

    ends_with(client, &waiting.id, RunStatus::Failed, "ScheduleToStartTimeout").await;
    let history = history_types(server, &waiting.id).await;
    assert_eq!(history, ["run_created", "timed_out", "run_failed"]);
    // The leased one started in time: its timeout no longer applies.
    assert_eq!(client.get(&leased.id).await.unwrap().status, RunStatus::Running);
    assert!(
        !history_types(server, &leased.id)
            .await
            .contains(&"timed_out".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_timeout_shortens_the_lease_and_fails_the_attempt() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let heartbeat = Duration::from_secs(1);
    let run = client
        .start_run(
            "x",
            &json!({}),
            opts(
                Timeouts {
                    heartbeat: Some(heartbeat),
                    ..Timeouts::default()
                },
                1,
            ),
        )
        .await
        .unwrap();
    let w = RawWorker::register(server, &["default"]).await;
    let lease = w.poll(1, Duration::from_secs(5)).await.remove(0);
    // The lease lasts the heartbeat timeout (1 s), not the server's lease time (2 s).
    let expires = std::time::SystemTime::try_from(lease.lease_expires_at.unwrap()).unwrap();
    let left = expires.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    assert!(left <= heartbeat, "lease for {left:?}");
    // No heartbeat: the attempt fails, and with one attempt allowed, the run.
    ends_with(client, &run.id, RunStatus::Failed, "HeartbeatTimeout").await;
    let history = history_types(server, &run.id).await;
    assert_eq!(history, ["run_created", "run_leased", "timed_out", "run_failed"]);
    let expirations = client.get(&run.id).await.unwrap().raw.lease_expirations;
    assert_eq!(
        expirations, 0,
        "a heartbeat timeout is a failed attempt, not a lost lease"
    );
}

#[tokio::test]
async fn bad_timeouts_are_refused() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let with = |f: &dyn Fn(&mut aiki_proto::v1::StartRunRequest)| {
        let mut r = aiki_tests::start_req("x", json!({}));
        f(&mut r);
        r
    };
    let d = |ms: i64| {
        Some(prost_types::Duration {
            seconds: ms / 1000,
            nanos: (ms % 1000) as i32 * 1_000_000,
        })
    };
    for req in [
        with(&|r| r.heartbeat_timeout = d(100)),
        with(&|r| r.execution_timeout = d(-1000)),
        with(&|r| r.attempt_timeout = d(400 * 86_400_000)),
    ] {
        let err = wf.start_run(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    let pg = db.connect().await;
    let n: i64 = pg.query_one("SELECT count(*) FROM runs", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
}
