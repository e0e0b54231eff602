//! Durable sleep at the protocol level: a suspended run holds no lease, wakes by timer (also
//! after a server restart) or early through WakeRun, and finds the step it slept at recorded.

use std::time::{Duration, Instant};

use aiki_proto::v1::{RunStatus, SuspendRunRequest, WakeRunRequest};
use aiki_tests::{RawWorker, TestDb, TestEnv, TestServer, history_types, start_req};
use aiki_worker::{Context, WorkflowError};
use serde_json::json;
use tonic::Code;

fn suspend(run_id: &str, token: &str, sleep: Duration) -> SuspendRunRequest {
    SuspendRunRequest {
        namespace: String::new(),
        run_id: run_id.into(),
        lease_token: token.into(),
        wait_key: "sleep:nap#0".into(),
        wait_name: "nap".into(),
        wait_seq: 1,
        sleep: Some(aiki_proto::duration_to_proto(sleep)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_run_holds_no_lease_and_wakes_on_time_with_its_step_recorded() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let id = wf
        .start_run(start_req("napper", json!({})))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .id;
    let w = RawWorker::register(&server, &["default"]).await;
    let run = w.poll(1, Duration::from_secs(5)).await.remove(0);

    let sleep = Duration::from_secs(1);
    let suspended_at = Instant::now();
    let resp = w
        .client
        .clone()
        .suspend_run(suspend(&id, &run.lease_token, sleep))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status, RunStatus::Suspended as i32);
    assert!(resp.wake_at.is_some());
    // A duplicate of the report (a retry after a lost answer) is acknowledged again.
    let again = w
        .client
        .clone()
        .suspend_run(suspend(&id, &run.lease_token, sleep))
        .await
        .unwrap();
    assert_eq!(again.into_inner().status, RunStatus::Suspended as i32);
    assert!(
        w.poll(1, Duration::from_millis(300)).await.is_empty(),
        "a sleeping run is not leased"
    );
    let got = wf
        .get_run(aiki_proto::v1::GetRunRequest {
            namespace: String::new(),
            r#ref: Some(aiki_proto::v1::get_run_request::Ref::RunId(id.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status, RunStatus::Suspended as i32);
    assert!(got.wake_at.is_some() && got.worker_id.is_empty());

    let woken = w.poll(1, Duration::from_secs(10)).await;
    let waited = suspended_at.elapsed();
    assert_eq!(woken.len(), 1);
    assert!(
        waited >= sleep,
        "woke after {waited:?}, before its sleep of {sleep:?} ended"
    );
    assert!(
        waited < sleep + Duration::from_millis(800),
        "woke {waited:?} after a sleep of {sleep:?}"
    );
    let step = woken[0]
        .tasks
        .iter()
        .find(|t| t.key == "sleep:nap#0")
        .expect("the sleep is recorded");
    assert_eq!((step.name.as_str(), step.seq), ("nap", 1));

    let history = history_types(&server, &id).await;
    assert_eq!(&history[..3], ["run_created", "run_leased", "run_suspended"]);
    assert_eq!(
        history.iter().filter(|t| *t == "run_suspended").count(),
        1,
        "{history:?}"
    );
    assert!(history.contains(&"run_woken".to_owned()), "{history:?}");
    assert_eq!(history.last().unwrap(), "run_leased");
}

#[tokio::test]
async fn wake_run_ends_a_sleep_early_and_refuses_what_does_not_sleep() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let id = wf
        .start_run(start_req("napper", json!({})))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .id;
    let w = RawWorker::register(&server, &["default"]).await;
    let run = w.poll(1, Duration::from_secs(5)).await.remove(0);

    // Bad input changes nothing: the run stays leased.
    let mut bad = suspend(&id, &run.lease_token, Duration::from_secs(1));
    bad.sleep = Some(prost_types::Duration { seconds: -5, nanos: 0 });
    let err = w.client.clone().suspend_run(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut bad = suspend(&id, &run.lease_token, Duration::from_secs(1));
    bad.wait_key = String::new();
    assert_eq!(
        w.client.clone().suspend_run(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let wake = |run_id: &str| WakeRunRequest {
        namespace: String::new(),
        run_id: run_id.into(),
    };
    let err = wf.wake_run(wake(&id)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a running run does not sleep");
    assert!(err.message().contains("running"), "{}", err.message());

    w.client
        .clone()
        .suspend_run(suspend(&id, &run.lease_token, Duration::from_secs(3600)))
        .await
        .unwrap();
    let woken = wf.wake_run(wake(&id)).await.unwrap().into_inner();
    assert_eq!(woken.status, RunStatus::Queued as i32);
    let again = w.poll(1, Duration::from_secs(5)).await;
    assert_eq!(again.len(), 1, "woken early, leased at once");
    assert!(again[0].tasks.iter().any(|t| t.key == "sleep:nap#0"));

    assert_eq!(
        wf.wake_run(wake(&uuid::Uuid::now_v7().to_string()))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        wf.wake_run(wake("zzz")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_sleeping_through_a_server_restart_still_wake() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            wf.start_run(start_req("napper", json!({"i": i})))
                .await
                .unwrap()
                .into_inner()
                .run
                .unwrap()
                .id,
        );
    }
    let w = RawWorker::register(&server, &["default"]).await;
    let mut leased = Vec::new();
    while leased.len() < 3 {
        leased.extend(w.poll(3, Duration::from_secs(5)).await);
    }
    for r in &leased {
        w.client
            .clone()
            .suspend_run(suspend(&r.run_id, &r.lease_token, Duration::from_millis(1500)))
            .await
            .unwrap();
    }
    server.stop().await;

    let server = TestServer::start(&db).await;
    let w = RawWorker::register(&server, &["default"]).await;
    let mut woken = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while woken.len() < 3 && Instant::now() < deadline {
        woken.extend(w.poll(3, Duration::from_secs(2)).await.into_iter().map(|r| r.run_id));
    }
    woken.sort();
    ids.sort();
    assert_eq!(woken, ids, "every sleeping run woke on the new server");
}

/// A workflow that checkpoints a step, sleeps, then checkpoints another, counting how often
/// each step's body ran.
fn sleeper(
    server: &TestServer,
    slots: usize,
    before: std::sync::Arc<std::sync::atomic::AtomicU32>,
    sleep: Duration,
) -> aiki_worker::WorkerBuilder {
    use std::sync::atomic::Ordering;
    aiki_worker::WorkerBuilder::new(server.url())
        .slots(slots)
        .register("sleeper", move |ctx: Context, _: serde_json::Value| {
            let before = before.clone();
            async move {
                ctx.task("before", (), |()| async {
                    before.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, WorkflowError>(())
                })
                .await?;
                ctx.sleep("nap", sleep).await?;
                let after: String = ctx
                    .task("after", (), |()| async { Ok::<_, WorkflowError>("awake".to_owned()) })
                    .await?;
                Ok(after)
            }
        })
        .register(
            "quick",
            |_ctx: Context, input: serde_json::Value| async move { Ok(input) },
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_sleeps_through_its_worker_being_killed_and_no_step_runs_twice() {
    use std::sync::{Arc, atomic::Ordering};
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let run = client
        .start_run("sleeper", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let before = Arc::new(std::sync::atomic::AtomicU32::new(0));

    let first = sleeper(server, 4, before.clone(), Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let first = tokio::spawn(first.run(tokio_util::sync::CancellationToken::new()));
    aiki_tests::eventually(Duration::from_secs(10), "the run sleeps", || async {
        client.get(&run.id).await.unwrap().status == aiki::RunStatus::Suspended
    })
    .await;
    let started = Instant::now();
    first.abort(); // killed: no drain, no goodbye
    let _ = first.await;

    let builder = sleeper(server, 4, before.clone(), Duration::from_secs(2));
    let mut worker = env.worker(builder).await;
    let out: String = run.result(Duration::from_secs(20)).await.unwrap();
    assert_eq!(out, "awake");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "completed after its sleep"
    );
    assert_eq!(before.load(Ordering::SeqCst), 1, "the step before the sleep ran once");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sleeping_runs_hold_no_worker_slot() {
    use std::sync::Arc;
    let env = TestEnv::new().await;
    let client = &env.client;
    let sleepers: Vec<_> = (0..1000)
        .map(|i| ("sleeper", json!({"i": i}), aiki::StartOptions::default()))
        .collect();
    client.start_runs(&sleepers).await.unwrap();
    let before = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let builder = sleeper(&env.server, 4, before.clone(), Duration::from_secs(3600));
    let mut worker = env.worker(builder).await;
    let pg = env.db.connect().await;
    aiki_tests::eventually(Duration::from_secs(60), "all 1000 runs sleep", || async {
        let n: i64 = pg
            .query_one("SELECT count(*) FROM runs WHERE status = 'suspended'", &[])
            .await
            .unwrap()
            .get(0);
        n == 1000
    })
    .await;
    // The worker's 4 slots are free: other runs go through while the thousand sleep.
    for i in 0..20 {
        let run = client
            .start_run("quick", &json!(i), aiki::StartOptions::default())
            .await
            .unwrap();
        let out: serde_json::Value = run.result(Duration::from_secs(10)).await.unwrap();
        assert_eq!(out, json!(i));
    }
    let suspended: i64 = pg
        .query_one("SELECT count(*) FROM runs WHERE status = 'suspended'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(suspended, 1000, "still asleep");
    worker.stop().await;
}
