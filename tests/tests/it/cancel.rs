//! Cancellation: a queued run ends at once; a running one is flagged, its worker is told on its
//! next heartbeat, stops it and the run ends `cancelled`.

use std::time::Duration;

use aiki_tests::TestEnv;
use aiki_worker::Context;
use serde_json::json;

#[tokio::test]
async fn cancelling_a_queued_run_ends_it_at_once() {
    let env = TestEnv::new().await;
    let client = &env.client;
    let run = client
        .start_run("later", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let cancelled = client.cancel(&run.id, "not needed").await.unwrap();
    assert_eq!(cancelled.status, aiki::RunStatus::Cancelled);
    assert!(matches!(
        run.result::<()>(Duration::ZERO).await,
        Err(aiki::Error::RunCancelled { .. })
    ));
    // Cancelling again is fine (idempotent), and the history ends with the cancellation.
    assert_eq!(
        client.cancel(&run.id, "").await.unwrap().status,
        aiki::RunStatus::Cancelled
    );
    let history = client.history(&run.id).await.unwrap();
    let last = history.last().unwrap();
    assert_eq!(last.r#type, aiki_proto::v1::EventType::RunCancelled as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_run_stops_it_on_its_worker() {
    let env = TestEnv::new().await;
    let client = &env.client;
    let run = client
        .start_run("forever", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel::<()>();
    use aiki_tests::OnDrop;
    let builder = aiki_worker::WorkerBuilder::new(env.url())
        .register("forever", move |_ctx: Context, _: serde_json::Value| {
            let started_tx = started_tx.clone();
            let guard = OnDrop(dropped_tx.clone());
            async move {
                let _guard = guard;
                let _ = started_tx.send(());
                std::future::pending::<()>().await;
                Ok(())
            }
        })
        .register(
            "quick",
            |_ctx: Context, input: serde_json::Value| async move { Ok(input) },
        );
    let mut worker = env.worker(builder).await;
    started.recv().await.unwrap();

    let flagged = client.cancel(&run.id, "user asked").await.unwrap();
    assert_eq!(flagged.status, aiki::RunStatus::Running);
    assert!(flagged.cancel_requested);
    tokio::time::timeout(Duration::from_secs(5), dropped.recv())
        .await
        .expect("the worker stopped the run");
    let ended = client.wait(&run.id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ended.status, aiki::RunStatus::Cancelled);

    // A finished run cannot be cancelled.
    let done = client
        .start_run("quick", &json!(7), aiki::StartOptions::default())
        .await
        .unwrap();
    assert_eq!(done.result::<i32>(Duration::from_secs(10)).await.unwrap(), 7);
    let err = client.cancel(&done.id, "").await.unwrap_err();
    assert!(
        matches!(&err, aiki::Error::FailedPrecondition(m) if m.contains("already completed")),
        "{err:?}"
    );
    worker.stop().await;
}

/// A cancellation moves a whole tree of runs; every run it moved wakes its own waiters at once,
/// not only the run named. The server here re-checks a waiter only once a minute: only the
/// wake-up can end the wait on the child in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_parent_wakes_the_waiters_of_its_children() {
    let env = TestEnv::with_config(|c| {
        c.recheck_interval = Duration::from_secs(60);
        // No reaper statement takes the waiter's pooled connection meanwhile (see below).
        c.reaper_interval = Duration::from_secs(3600);
    })
    .await;
    let mut wf = env.server.workflows().await;
    let parent = aiki_tests::start_id(&mut wf, aiki_tests::start_req("parent", json!({}))).await;
    let mut child = aiki_tests::start_req("child", json!({}));
    child.parent_run_id = parent.clone();
    let child = aiki_tests::start_id(&mut wf, child).await;
    let waiting = {
        let client = env.client.clone();
        let child = child.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let status = client.wait(&child, Duration::from_secs(50)).await.unwrap().status;
            (status, started.elapsed())
        })
    };
    // The waiter has read the child (queued) and waits: its connection has run the read.
    let get = include_str!("../../../server/src/store/sql/runs/get.sql");
    let pg = env.db.connect().await;
    aiki_tests::eventually(Duration::from_secs(10), "the waiter read the child", || async {
        pg.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = $1",
            &[&get],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            > 0
    })
    .await;
    assert!(!waiting.is_finished(), "the child had not ended");
    env.client.cancel(&parent, "changed my mind").await.unwrap();
    let (status, waited) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the child's waiter was woken")
        .unwrap();
    assert_eq!(status, aiki::RunStatus::Cancelled);
    assert!(waited < Duration::from_secs(20), "woken, not re-checked: {waited:?}");
}
