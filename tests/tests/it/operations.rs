//! What operators see and rely on: listing and watching runs, workers and queues, graceful
//! shutdown, the single reaper, migrations racing, and the claim's use of its index.

use std::time::{Duration, Instant};

use aiki::{ListFilter, RunStatus};
use aiki_proto::v1::{EventType, StartRunsRequest};
use aiki_tests::{RawWorker, TestDb, TestEnv, TestServer, start_req};
use futures::StreamExt;
use serde_json::json;

#[tokio::test]
async fn list_runs_filters_and_pages() {
    let env = TestEnv::new().await;
    let client = &env.client;
    let mut wf = env.server.workflows().await;
    let runs = (0..25)
        .map(|i| start_req(if i % 5 == 0 { "rare" } else { "common" }, json!(i)))
        .collect();
    wf.start_runs(StartRunsRequest { runs }).await.unwrap();
    let cancelled = client
        .start_run("rare", &json!("x"), aiki::StartOptions::default())
        .await
        .unwrap();
    client.cancel(&cancelled.id, "").await.unwrap();

    // Pages of 10, newest first, no run twice.
    let mut seen = Vec::new();
    let mut token = None;
    loop {
        let page = client
            .list(&ListFilter {
                page_size: 10,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap();
        seen.extend(page.runs.iter().map(|r| r.id.clone()));
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(seen.len(), 26);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");
    assert_eq!(seen[0], cancelled.id);

    let rare = client
        .list(&ListFilter {
            workflow: Some("rare".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rare.runs.len(), 6);
    let only_cancelled = client
        .list(&ListFilter {
            statuses: vec![RunStatus::Cancelled],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(only_cancelled.runs.len(), 1);
    let future = client
        .list(&ListFilter {
            created_after: Some(std::time::SystemTime::now() + Duration::from_secs(60)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(future.runs.is_empty(), "the time filter applies");
    let past = client
        .list(&ListFilter {
            created_before: Some(std::time::SystemTime::now() + Duration::from_secs(60)),
            created_after: Some(std::time::SystemTime::now() - Duration::from_secs(600)),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(past.runs.len(), 26);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_events_live_until_the_run_ends() {
    // Re-reads so rare that only the in-process wake-up can deliver events in time.
    let env = TestEnv::with_config(|config| config.recheck_interval = Duration::from_secs(60)).await;
    let client = &env.client;
    let run = client
        .start_run("watched", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let mut stream = client.watch(&run.id).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.r#type, EventType::RunCreated as i32);

    let w = RawWorker::register(&env.server, &["default"]).await;
    let lease = w.poll(1, Duration::ZERO).await.pop().unwrap();
    assert_eq!(
        stream.next().await.unwrap().unwrap().r#type,
        EventType::RunLeased as i32
    );
    w.client
        .clone()
        .complete_run(aiki_proto::v1::CompleteRunRequest {
            namespace: String::new(),
            run_id: run.id.clone(),
            lease_token: lease.lease_token,
            output: None,
            ..Default::default()
        })
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        stream.next().await.unwrap().unwrap().r#type,
        EventType::RunCompleted as i32
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "pushed, not found by a slow re-check"
    );
    assert!(stream.next().await.is_none(), "the stream ends with the run");
}

#[tokio::test]
async fn workers_and_queues_report_what_is_happening() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let mut wf = server.workflows().await;
    let runs = (0..5).map(|i| start_req("q", json!(i))).collect();
    wf.start_runs(StartRunsRequest { runs }).await.unwrap();
    let mut later = start_req("q", json!("later"));
    later.delay = Some(aiki_proto::duration_to_proto(Duration::from_secs(3600)));
    wf.start_run(later).await.unwrap();
    let mut other = start_req("q", json!("other"));
    other.queue = "emails".into();
    wf.start_run(other).await.unwrap();

    let w = RawWorker::register(server, &["default"]).await;
    assert_eq!(w.poll(2, Duration::ZERO).await.len(), 2);

    let workers = client.workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].id, w.id);
    assert_eq!(workers[0].leases_held, 2);
    assert!(workers[0].last_heartbeat_at.is_some());

    let queues = client.queues().await.unwrap();
    let default = queues.iter().find(|q| q.name == "default").unwrap();
    assert_eq!((default.ready, default.delayed, default.running), (3, 1, 2));
    assert!(default.oldest_ready_age.is_some());
    let emails = queues.iter().find(|q| q.name == "emails").unwrap();
    assert_eq!(emails.ready, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_waiting_polls_and_stops_the_server() {
    let db = TestDb::new().await;
    let mut config = aiki_tests::Config::for_test(&db.url);
    config.shutdown_grace = Duration::from_secs(60);
    let server = TestServer::start_with(config).await;
    let w = RawWorker::register(&server, &["default"]).await;
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let runs = w.poll(1, Duration::from_secs(30)).await;
        (runs, started.elapsed())
    });
    // The poll finds the queue empty and waits.
    db.until_claimed().await;
    assert!(!poll.is_finished(), "the poll answered with nothing to lease");
    let stopping = Instant::now();
    server.stop().await;
    let (runs, waited) = poll.await.unwrap();
    assert!(runs.is_empty());
    assert!(
        waited < Duration::from_secs(5),
        "the waiting poll ended with the shutdown"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "stopped without waiting for the poll's timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reaper_per_database_and_another_takes_over() {
    let db = TestDb::new().await;
    let pg = db.connect().await;
    let reapers = || async {
        let n: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n
    };
    // `a` starts alone, so `a` is the reaper.
    let a = TestServer::start(&db).await;
    aiki_tests::eventually(Duration::from_secs(5), "a reaper is elected", || async {
        reapers().await == 1
    })
    .await;
    let b = TestServer::start(&db).await;
    // `b` has tried too: each server keeps the session it tries the lock on, so both show the
    // lock statement as their last.
    let lock_statement = include_str!("../../../server/src/store/sql/session/reaper_lock.sql");
    aiki_tests::eventually(Duration::from_secs(5), "the second server tried the lock", || async {
        let tried: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = $1",
                &[&lock_statement],
            )
            .await
            .unwrap()
            .get(0);
        tried == 2
    })
    .await;
    assert_eq!(reapers().await, 1, "the second server does not reap too");

    // The leader stops; expired leases are still reaped, by `b`.
    a.stop().await;
    let mut wf = b.workflows().await;
    wf.start_run(start_req("r", json!({}))).await.unwrap();
    let w = RawWorker::register(&b, &["default"]).await;
    assert_eq!(w.poll(1, Duration::ZERO).await.len(), 1);
    // The lease (2 s in tests) expires and the run is leased again.
    assert_eq!(
        w.poll(1, Duration::from_secs(10)).await.len(),
        1,
        "reaped after the leader stopped"
    );
    assert_eq!(reapers().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_apply_once() {
    let db = TestDb::new().await;
    let pg = db.connect().await;
    pg.batch_execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        .await
        .unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { aiki_server::migrate(&url).await })
        })
        .collect();
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap().expect("every migrator succeeds").len();
    }
    assert_eq!(
        applied,
        aiki_server::store::MIGRATIONS.len(),
        "each migration applied by exactly one"
    );
    let n: i64 = pg
        .query_one("SELECT count(*) FROM aiki_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, aiki_server::store::MIGRATIONS.len());
}

/// A server whose queue holds `thousands` × 1,000 runs, analyzed, and a connection that plans
/// as the server does: once, for the statement's shape (see `Store::new`).
async fn analyzed_queue(thousands: usize) -> (TestDb, TestServer, tokio_postgres::Client) {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    for _ in 0..thousands {
        let runs = (0..1000).map(|i| start_req("bulk", json!(i))).collect();
        wf.start_runs(StartRunsRequest { runs }).await.unwrap();
    }
    let pg = db.connect().await;
    pg.batch_execute("ANALYZE runs; SET plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    (db, server, pg)
}

/// The text of an `EXPLAIN (FORMAT TEXT)` answer.
fn plan_text(rows: &[tokio_postgres::Row]) -> String {
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_claim_walks_its_partial_index_without_sorting_the_queue() {
    let (_db, _server, pg) = analyzed_queue(10).await;
    let claim = include_str!("../../../server/src/store/sql/leases/claim.sql");
    let explain = format!("EXPLAIN (FORMAT TEXT) {claim}");
    let worker = uuid::Uuid::now_v7();
    let rows = pg
        .query(
            &explain,
            &[
                &"default",
                &"default",
                &10i64,
                &worker,
                &30_000i64,
                &vec!["bulk"],
                &Vec::<String>::new(),
                &Some(uuid::Uuid::new_v4()),
            ],
        )
        .await
        .unwrap();
    let plan = plan_text(&rows);
    assert!(plan.contains("runs_ready"), "the claim uses the ready index:\n{plan}");
    assert!(
        plan.contains("Index Cond: ((hashtextextended("),
        "the claim descends the ready index by its hashed queue key:\n{plan}"
    );
    assert!(!plan.contains("Sort"), "the claim does not sort the queue:\n{plan}");
}

#[tokio::test]
async fn a_completion_of_a_thousand_runs_finds_them_by_key_not_by_scanning() {
    // A custom plan for a batch of 1,000 against a young table of 50,000 rows chose a hash join
    // over a scan of the whole table; the server's connections plan once, generically.
    let (_db, _server, pg) = analyzed_queue(50).await;
    let ids: Vec<uuid::Uuid> = pg
        .query("SELECT id FROM runs LIMIT 1000", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let n = ids.len();
    let complete = include_str!("../../../server/src/store/sql/reports/complete.sql");
    pg.batch_execute(&format!(
        "PREPARE complete(text[], uuid[], uuid[], jsonb[], jsonb[], int[], uuid[]) AS {complete}"
    ))
    .await
    .unwrap();
    // Arrays of 1,000, as a busy server completes them (a custom plan would be made for them).
    let list = |items: Vec<String>| format!("'{{{}}}'", items.join(","));
    let args = [
        list(vec!["default".to_owned(); n]),
        list(ids.iter().map(ToString::to_string).collect()),
        list(vec![uuid::Uuid::now_v7().to_string(); n]),
        list(vec!["null".to_owned(); n]),
        list(vec!["NULL".to_owned(); n]),
        list(vec!["0".to_owned(); n]),
        list(vec![uuid::Uuid::new_v4().to_string(); n]),
    ];
    let rows = pg
        .query(
            &format!("EXPLAIN (FORMAT TEXT) EXECUTE complete({})", args.join(", ")),
            &[],
        )
        .await
        .unwrap();
    let plan = plan_text(&rows);
    assert!(plan.contains("runs_pkey"), "runs found by key:\n{plan}");
    assert!(!plan.contains("Seq Scan on runs"), "no scan of every run:\n{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_answer_stays_near_its_size_budget() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    // 200 runs of about 1 MB each: one poll for all of them would answer 200 MB.
    let blob = "x".repeat(1024 * 1024);
    for chunk in 0..10 {
        let runs = (0..20)
            .map(|i| start_req("big", json!({"i": chunk * 20 + i, "blob": blob})))
            .collect();
        wf.start_runs(StartRunsRequest { runs }).await.unwrap();
    }
    let w = RawWorker::register(&server, &["default"]).await;
    let mut client = w.client.clone().max_decoding_message_size(512 * 1024 * 1024);
    let runs = client
        .poll_tasks(aiki_proto::v1::PollTasksRequest {
            namespace: String::new(),
            worker_id: w.id.clone(),
            queues: vec![],
            max_runs: 1000,
            wait: None,
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert!(!runs.is_empty());
    assert!(
        runs.len() < 200,
        "the answer was cut short of 200 MB ({} runs)",
        runs.len()
    );
    let pg = db.connect().await;
    let running: i64 = pg
        .query_one("SELECT count(*) FROM runs WHERE status = 'running'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(running as usize, runs.len(), "every run leased is in the answer");
}
