//! Starting runs is idempotent: by idempotency key (one atomic statement, whatever the race)
//! and, without a key, by the client's request id.

use std::collections::HashSet;

use aiki_proto::v1::{ConflictPolicy, GetRunRequest, StartRunsRequest, get_run_request};
use aiki_tests::{TestDb, TestEnv, TestServer, start_req};
use serde_json::json;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_starts_with_one_key_make_one_run() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let client = server.workflows().await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let mut c = client.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = start_req("order", json!({"order": 42}));
            req.idempotency_key = "order-42".into();
            barrier.wait().await;
            c.start_run(req).await.map(|r| r.into_inner())
        }));
    }
    let mut ids = HashSet::new();
    let mut created = 0;
    for t in tasks {
        let resp = t
            .await
            .unwrap()
            .expect("every caller gets the run, no error from the race");
        ids.insert(resp.run.unwrap().id);
        created += usize::from(resp.created);
    }
    assert_eq!(ids.len(), 1, "every caller gets the same run id");
    assert_eq!(created, 1, "exactly one caller created it");
    let pg = db.connect().await;
    let n: i64 = pg.query_one("SELECT count(*) FROM runs", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    let id = ids.iter().next().unwrap();
    let created = aiki_tests::history_types(&server, id)
        .await
        .iter()
        .filter(|t| *t == "run_created")
        .count();
    assert_eq!(created, 1, "one creation event");
}

#[tokio::test]
async fn same_key_other_input_is_already_exists_unless_return_existing() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut c = server.workflows().await;
    let mut first = start_req("order", json!({"order": 1}));
    first.idempotency_key = "k".into();
    let run = c.start_run(first.clone()).await.unwrap().into_inner().run.unwrap();

    let mut other = start_req("order", json!({"order": 2}));
    other.idempotency_key = "k".into();
    let err = c.start_run(other.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().contains(&run.id),
        "the message names the existing run: {}",
        err.message()
    );

    other.conflict_policy = ConflictPolicy::ReturnExisting as i32;
    let resp = c.start_run(other).await.unwrap().into_inner();
    assert!(!resp.created);
    assert_eq!(resp.run.unwrap().id, run.id);

    // The same start again returns the run whatever its state, and it can be found by key.
    let again = c.start_run(first).await.unwrap().into_inner();
    assert!(!again.created);
    let by_key = c
        .get_run(GetRunRequest {
            namespace: String::new(),
            r#ref: Some(get_run_request::Ref::IdempotencyKey("k".into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_key.id, run.id);
}

#[tokio::test]
async fn a_retried_start_without_key_is_deduplicated_by_request_id() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut c = server.workflows().await;
    let mut req = start_req("email", json!({"to": "a@example.com"}));
    req.request_id = uuid::Uuid::new_v4().to_string();
    let a = c.start_run(req.clone()).await.unwrap().into_inner();
    let b = c.start_run(req.clone()).await.unwrap().into_inner();
    assert!(a.created && !b.created);
    assert_eq!(a.run.unwrap().id, b.run.unwrap().id);
    req.request_id = uuid::Uuid::new_v4().to_string();
    assert!(
        c.start_run(req).await.unwrap().into_inner().created,
        "another request is another run"
    );
}

/// A request id that is a UUIDv7, as the SDK sends, is the run's id: retries of the start
/// (single or batched, and racing each other) make one run, and the same request id with
/// another input is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_uuid_v7_request_id_is_the_run_id_and_dedupes_racing_retries() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let client = server.workflows().await;
    let request = uuid::Uuid::now_v7().to_string();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(100));
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut c = client.clone();
        let barrier = barrier.clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = start_req("email", json!({"to": "a@example.com"}));
            req.request_id = request;
            barrier.wait().await;
            if i % 2 == 0 {
                c.start_run(req).await.map(|r| r.into_inner())
            } else {
                let mut batch = c.start_runs(StartRunsRequest { runs: vec![req] }).await?.into_inner();
                Ok(batch.results.remove(0))
            }
        }));
    }
    let mut created = 0;
    for t in tasks {
        let resp = t
            .await
            .unwrap()
            .expect("every retry gets the run, no error from the race");
        assert_eq!(resp.run.unwrap().id, request, "the run's id is the request id");
        created += usize::from(resp.created);
    }
    assert_eq!(created, 1, "exactly one start created it");
    let pg = db.connect().await;
    let n: i64 = pg.query_one("SELECT count(*) FROM runs", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);

    let mut c = client.clone();
    let mut other = start_req("email", json!({"to": "b@example.com"}));
    other.request_id = request.clone();
    let err = c.start_run(other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains(&request), "{}", err.message());
    // A request id of another form is kept as it is, and dedupes just the same.
    let mut plain = start_req("email", json!({"to": "c@example.com"}));
    plain.request_id = "retry-me-1".into();
    let a = c.start_run(plain.clone()).await.unwrap().into_inner();
    let b = c.start_run(plain).await.unwrap().into_inner();
    assert!(a.created && !b.created);
    assert_eq!(a.run.unwrap().id, b.run.unwrap().id);
}

#[tokio::test]
async fn start_runs_is_one_transaction() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut c = server.workflows().await;
    let runs: Vec<_> = (0..100).map(|i| start_req("batch", json!({"i": i}))).collect();
    let resp = c.start_runs(StartRunsRequest { runs }).await.unwrap().into_inner();
    assert_eq!(resp.results.len(), 100);
    assert!(resp.results.iter().all(|r| r.created));
    let pg = db.connect().await;
    for i in [0usize, 7, 99] {
        let id = uuid::Uuid::parse_str(&resp.results[i].run.as_ref().unwrap().id).unwrap();
        let input: serde_json::Value = pg
            .query_one("SELECT input FROM runs WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(input, json!({"i": i}), "results come back in request order");
    }
    assert!(
        resp.results[0].run.as_ref().unwrap().input.is_none(),
        "a created run's input is not sent back"
    );

    // A batch with one conflicting entry inserts nothing.
    let mut keyed = start_req("batch", json!({"x": 1}));
    keyed.idempotency_key = "batch-key".into();
    c.start_run(keyed.clone()).await.unwrap();
    let mut clash = keyed.clone();
    clash.input = Some(aiki_proto::json_to_value(&json!({"x": 2})));
    let runs = vec![start_req("batch", json!({"new": 1})), clash];
    let err = c.start_runs(StartRunsRequest { runs }).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let n: i64 = pg.query_one("SELECT count(*) FROM runs", &[]).await.unwrap().get(0);
    assert_eq!(n, 101, "the failed batch left nothing behind");
}

#[tokio::test]
async fn sdk_start_run_reports_created_and_finds_by_key() {
    let env = TestEnv::new().await;
    let client = &env.client;
    let a = client
        .start_run("greet", &json!({"n": 1}), aiki::StartOptions::key("greet-1"))
        .await
        .unwrap();
    let b = client
        .start_run("greet", &json!({"n": 1}), aiki::StartOptions::key("greet-1"))
        .await
        .unwrap();
    assert!(a.created && !b.created);
    assert_eq!(a.id, b.id);
    let err = client
        .start_run("greet", &json!({"n": 2}), aiki::StartOptions::key("greet-1"))
        .await
        .unwrap_err();
    assert!(matches!(err, aiki::Error::AlreadyExists(_)), "{err:?}");
    assert_eq!(client.get_by_key("greet-1").await.unwrap().id, a.id);
}

/// Single starts arriving together share a transaction: one refused start (a key taken with
/// another input) must not refuse or undo the others, and each caller gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_single_starts_get_their_own_answers() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let client = server.workflows().await;
    let mut first = start_req("order", json!({"order": 1}));
    first.idempotency_key = "taken".into();
    let taken = client
        .clone()
        .start_run(first)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .id;

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(300));
    let mut tasks = Vec::new();
    for i in 0..300 {
        let mut c = client.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = start_req("order", json!({"order": i}));
            // Every tenth reuses the taken key with another input; the rest have keys of their own.
            req.idempotency_key = if i % 10 == 0 {
                "taken".into()
            } else {
                format!("own-{i}")
            };
            barrier.wait().await;
            (i, c.start_run(req).await.map(|r| r.into_inner()))
        }));
    }
    let mut refused = 0;
    for t in tasks {
        let (i, answer) = t.await.unwrap();
        if i % 10 == 0 {
            let err = answer.expect_err("a taken key with another input is refused");
            assert_eq!(err.code(), Code::AlreadyExists);
            assert!(err.message().contains(&taken), "{}", err.message());
            assert!(!err.message().contains("entry"), "{}", err.message());
            refused += 1;
        } else {
            let resp = answer.expect("a start with its own key succeeds");
            assert!(resp.created);
            let run = resp.run.unwrap();
            assert_eq!(
                run.idempotency_key,
                format!("own-{i}"),
                "an answer meant for another caller"
            );
        }
    }
    assert_eq!(refused, 30);
    let pg = db.connect().await;
    let n: i64 = pg.query_one("SELECT count(*) FROM runs", &[]).await.unwrap().get(0);
    assert_eq!(n, 271, "the taken key's run and 270 new ones");
    let ids: Vec<uuid::Uuid> = pg
        .query("SELECT id FROM runs", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in ids {
        assert_eq!(
            aiki_tests::history_types(&server, &id.to_string()).await,
            ["run_created"],
            "one creation event per run, nothing else"
        );
    }
}
