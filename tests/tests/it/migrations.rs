//! Upgrading a database: runs written by an earlier schema keep their history, and the
//! upgraded schema serves new runs.

use std::time::Duration;

use aiki_proto::v1::StartRunRequest;
use aiki_tests::{RawWorker, TestDb, TestServer, history_types, start_req, task_output};
use serde_json::json;

#[tokio::test]
async fn runs_from_before_an_upgrade_keep_their_history() {
    let db = TestDb::empty().await;
    let pg = db.connect().await;
    // The database as the first schema left it: a run that was created, leased, checkpointed
    // a task and completed, with one event row for each.
    let (version, name, init) = aiki_server::store::MIGRATIONS[0];
    pg.batch_execute(init).await.unwrap();
    pg.batch_execute(
        "CREATE TABLE aiki_migrations (version integer PRIMARY KEY, name text NOT NULL,
                                       applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .unwrap();
    pg.execute(
        "INSERT INTO aiki_migrations (version, name) VALUES ($1, $2)",
        &[&version, &name],
    )
    .await
    .unwrap();
    let old = uuid::Uuid::now_v7();
    let (worker, token) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    pg.execute(
        "INSERT INTO runs (namespace, id, workflow, queue, status, input, output, max_attempts,
                           initial_interval_ms, max_interval_ms, backoff_coefficient, lease_owner,
                           lease_token, lease_end, started_at, finished_at)
         VALUES ('default', $1, 'old', 'default', 'completed', '{}', '\"done\"', 3, 1000, 60000, 2,
                 $2, $3, 'complete', now(), now())",
        &[&old, &worker, &token],
    )
    .await
    .unwrap();
    pg.execute(
        "INSERT INTO run_tasks (namespace, run_id, task_key, name, seq, output, attempt)
         VALUES ('default', $1, 'step#0#0', 'step', 0, '1', 1)",
        &[&old],
    )
    .await
    .unwrap();
    for kind in ["run_created", "run_leased", "task_recorded", "run_completed"] {
        pg.execute(
            "INSERT INTO run_events (namespace, run_id, type, attempt) VALUES ('default', $1, $2, 1)",
            &[&old, &kind],
        )
        .await
        .unwrap();
    }

    let applied = aiki_server::migrate(&db.url).await.expect("upgrade");
    assert_eq!(applied.len(), aiki_server::store::MIGRATIONS.len() - 1, "{applied:?}");

    let server = TestServer::start(&db).await;
    assert_eq!(
        history_types(&server, &old.to_string()).await,
        ["run_created", "run_leased", "task_recorded", "run_completed"],
        "each event of the old run once, in order"
    );

    // A new run on the upgraded schema: its creation and its task are read from their rows.
    let mut wf = server.workflows().await;
    let new = wf
        .start_run(StartRunRequest {
            ..start_req("new", json!({}))
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .id;
    let w = RawWorker::register(&server, &["default"]).await;
    let run = w.poll(1, Duration::from_secs(5)).await.remove(0);
    assert_eq!(run.run_id, new);
    w.client
        .clone()
        .record_task(aiki_proto::v1::RecordTaskRequest {
            namespace: String::new(),
            run_id: new.clone(),
            lease_token: run.lease_token.clone(),
            task: Some(task_output("step#1#0", "step", 0, json!(1))),
        })
        .await
        .unwrap();
    assert_eq!(
        history_types(&server, &new).await,
        ["run_created", "run_leased", "task_recorded"]
    );
}
