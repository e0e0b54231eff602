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
