//! Leasing under contention: no run is handed to two workers, every run completes once; a
//! worker polls through any server for the queues it registered.

use std::{collections::HashMap, sync::Arc, time::Duration};

use aiki_proto::v1::{PollTasksRequest, StartRunsRequest};
use aiki_tests::{Counts, RawWorker, TestDb, TestEnv, TestServer, eventually, start_req};
use aiki_worker::{Context, WorkerBuilder};
use serde_json::json;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_workers_complete_two_thousand_runs_exactly_once() {
    // Leases long enough that a loaded machine cannot make one expire: a second execution
    // would then be the engine's fault, not the test's.
    let env = TestEnv::with_config(|config| {
        config.lease_ttl = Duration::from_secs(60);
        config.heartbeat_interval = Duration::from_secs(5);
    })
    .await;
    let mut wf = env.server.workflows().await;
    for chunk in 0..4 {
        let runs = (0..500)
            .map(|i| start_req("count", json!({"n": chunk * 500 + i})))
            .collect();
        wf.start_runs(StartRunsRequest { runs }).await.unwrap();
    }

    let executions: Counts = Arc::default();
    let mut workers = Vec::new();
    for w in 0..4 {
        let executions = executions.clone();
        let builder = WorkerBuilder::new(env.url())
            .identity(format!("w{w}"))
            .slots(16)
            .register("count", move |ctx: Context, input: serde_json::Value| {
                let executions = executions.clone();
                async move {
                    *executions.lock().unwrap().entry(ctx.run_id().to_owned()).or_default() += 1;
                    Ok(input)
                }
            });
        workers.push(env.worker(builder).await);
    }

    let pg = env.db.connect().await;
    eventually(Duration::from_secs(120), "all 2000 runs completed", || async {
        let n: i64 = pg
            .query_one("SELECT count(*) FROM runs WHERE status = 'completed'", &[])
            .await
            .unwrap()
            .get(0);
        n == 2000
    })
    .await;
    for w in &mut workers {
        w.stop().await;
    }

    {
        let executions = executions.lock().unwrap();
        assert_eq!(executions.len(), 2000, "every run executed");
        assert!(executions.values().all(|n| *n == 1), "no run executed twice");
    }

    // History: each run was leased once and completed once, by the worker that leased it.
    let rows = pg
        .query(
            "SELECT run_id, array_agg(type ORDER BY seq), array_agg(worker_id ORDER BY seq) \
             FROM run_history WHERE type IN ('run_leased', 'run_completed') GROUP BY run_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2000);
    let mut per_worker: HashMap<uuid::Uuid, usize> = HashMap::new();
    for r in rows {
        let types: Vec<String> = r.get(1);
        let workers: Vec<Option<uuid::Uuid>> = r.get(2);
        assert_eq!(
            types,
            ["run_leased", "run_completed"],
            "run {:?}",
            r.get::<_, uuid::Uuid>(0)
        );
        assert_eq!(workers[0], workers[1], "completed by the worker holding the lease");
        *per_worker.entry(workers[0].unwrap()).or_default() += 1;
    }
    assert!(per_worker.len() >= 2, "the work was shared: {per_worker:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_pollers_never_lease_a_run_twice() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let runs = (0..1000).map(|i| start_req("race", json!({"i": i}))).collect();
    wf.start_runs(StartRunsRequest { runs }).await.unwrap();

    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let w = RawWorker::register(&server, &["default"]).await;
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut got = Vec::new();
            loop {
                let runs = w.poll(37, Duration::ZERO).await;
                if runs.is_empty() {
                    return got;
                }
                got.extend(runs.into_iter().map(|r| r.run_id));
            }
        }));
    }
    let mut all = Vec::new();
    let mut pollers_with_work = 0;
    for t in tasks {
        let got = t.await.unwrap();
        pollers_with_work += usize::from(!got.is_empty());
        all.extend(got);
    }
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 1000, "every run leased");
    assert_eq!(unique.len(), 1000, "no run leased twice");
    assert!(pollers_with_work >= 2, "the pollers really raced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_polls_through_any_server_for_the_queues_it_registered() {
    // A server keeps the registrations it has read; one made through another server is read
    // from the database. Either way a poll serves exactly the queues registered.
    let db = TestDb::new().await;
    let a = TestServer::start(&db).await;
    let b = TestServer::start(&db).await;
    let on_a = RawWorker::register(&a, &["mine"]).await;
    let through_b = RawWorker {
        id: on_a.id.clone(),
        client: b.workers().await,
    };
    let mut wf = a.workflows().await;
    let mut mine = start_req("routed", json!({}));
    mine.queue = "mine".into();
    wf.start_run(mine).await.unwrap();
    wf.start_run(start_req("elsewhere", json!({}))).await.unwrap();

    let runs = through_b.poll(10, Duration::ZERO).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!((runs[0].workflow.as_str(), runs[0].queue.as_str()), ("routed", "mine"));
    // Again through b, now from its memory: the run of the default queue is not this worker's.
    assert!(through_b.poll(10, Duration::ZERO).await.is_empty());

    let poll = |w: &RawWorker, queues: Vec<String>| {
        let (mut client, id) = (w.client.clone(), w.id.clone());
        async move {
            client
                .poll_tasks(PollTasksRequest {
                    namespace: String::new(),
                    worker_id: id,
                    queues,
                    max_runs: 1,
                    wait: None,
                })
                .await
        }
    };
    for w in [&on_a, &through_b] {
        let err = poll(w, vec!["default".into()]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    // A worker nobody registered stays unknown to a server that keeps others.
    let stranger = RawWorker {
        id: uuid::Uuid::now_v7().to_string(),
        client: b.workers().await,
    };
    let err = poll(&stranger, Vec::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}
