//! Waiting polls are woken by new work (in-process and through LISTEN/NOTIFY across replicas)
//! and by timers for delayed runs, not by polling the database; a poll that skipped a run
//! locked by another transaction looks again by itself.

use std::time::{Duration, Instant};

use aiki_tests::{RawWorker, TestDb, TestServer, start_req};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_poll_returns_promptly_after_a_start() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let w = RawWorker::register(&server, &["default"]).await;
    let poll = tokio::spawn(async move { w.poll(1, Duration::from_secs(30)).await });
    // The poll finds the queue empty and waits.
    db.until_claimed().await;
    assert!(!poll.is_finished(), "the poll answered with nothing to lease");
    let started = Instant::now();
    server
        .workflows()
        .await
        .start_run(start_req("wake", json!({})))
        .await
        .unwrap();
    let runs = poll.await.unwrap();
    assert_eq!(runs.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "woken {:?} after the start",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_one_replica_wakes_a_poll_on_another() {
    let db = TestDb::new().await;
    let a = TestServer::start(&db).await;
    let b = TestServer::start(&db).await;
    let w = RawWorker::register(&a, &["default"]).await;
    let mut wf = b.workflows().await;
    let poll = tokio::spawn(async move { w.poll(1, Duration::from_secs(30)).await });
    // The poll finds the queue empty and waits.
    db.until_claimed().await;
    assert!(!poll.is_finished(), "the poll answered with nothing to lease");
    let started = Instant::now();
    wf.start_run(start_req("wake", json!({}))).await.unwrap();
    let runs = poll.await.unwrap();
    assert_eq!(runs.len(), 1);
    // Far below the poll's 30 s wait: woken, not found by a later look.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "woken through NOTIFY in {:?}",
        started.elapsed()
    );
}

/// A start on one replica within the notify window of the one before (see
/// `store::notices`) sends no notification of its own: one deferred notification at the end
/// of the window wakes the poll waiting on the other replica, not its 30 s wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_within_the_notify_window_wakes_a_poll_on_another_replica_at_its_end() {
    let db = TestDb::new().await;
    let window = Duration::from_secs(2);
    // `a` serves the poll. Its reaper stays idle, so that nothing else takes the poll's pooled
    // connection while the test looks at what it ran last.
    let mut quiet = aiki_tests::Config::for_test(&db.url);
    quiet.reaper_interval = Duration::from_secs(600);
    let a = TestServer::start_with(quiet).await;
    let mut config = aiki_tests::Config::for_test(&db.url);
    config.notify_window = window;
    let b = TestServer::start_with(config).await;
    let w = RawWorker::register(&a, &["default"]).await;
    let mut wf = b.workflows().await;
    // The first start notifies at once and opens the window; it is leased straight away.
    let first = Instant::now();
    wf.start_run(start_req("first", json!({}))).await.unwrap();
    let leased = w.poll(1, Duration::ZERO).await;
    assert_eq!(leased.len(), 1);
    // Completed, so that no lease expiry (and the reaper's notification) wakes anything later.
    w.client
        .clone()
        .complete_run(aiki_proto::v1::CompleteRunRequest {
            namespace: String::new(),
            run_id: leased[0].run_id.clone(),
            lease_token: leased[0].lease_token.clone(),
            output: None,
            tasks: Vec::new(),
        })
        .await
        .unwrap();
    // A poll finds the queue empty and waits: the check for skipped runs that follows its
    // empty claim shows as its connection's last statement (nothing else in this test runs it).
    let poll = tokio::spawn(async move { w.poll(1, Duration::from_secs(30)).await });
    let watcher = db.connect().await;
    let skipped = include_str!("../../../server/src/store/sql/leases/claim_skipped.sql");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND left(query, 200) = left($1, 200)",
                &[&skipped],
            )
            .await
            .unwrap()
            .get(0);
        if seen > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "timed out waiting until the poll has looked");
        tokio::task::yield_now().await;
    }
    assert!(!poll.is_finished(), "the poll answered with nothing to lease");
    // Within the window: this start's notification is deferred to the window's end.
    wf.start_run(start_req("second", json!({}))).await.unwrap();
    assert!(first.elapsed() < window, "the second start came within the window");
    let runs = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("woken by the deferred notification, well before the poll's 30 s wait")
        .unwrap();
    assert_eq!(runs.len(), 1);
    assert!(
        first.elapsed() >= window,
        "woken at the end of the window, by the deferred notification ({:?})",
        first.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_run_wakes_its_poller_when_due() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let w = RawWorker::register(&server, &["default"]).await;
    let mut req = start_req("later", json!({}));
    req.delay = Some(aiki_proto::duration_to_proto(Duration::from_secs(1)));
    let started = Instant::now();
    server.workflows().await.start_run(req).await.unwrap();
    assert!(
        w.poll(1, Duration::ZERO).await.is_empty(),
        "not visible before its delay"
    );
    let runs = w.poll(1, Duration::from_secs(10)).await;
    assert_eq!(runs.len(), 1);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "leased after {waited:?}, before its delay"
    );
    assert!(
        waited < Duration::from_secs(4),
        "woken by a timer, {waited:?} after the start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_locked_when_the_poll_looked_is_leased_once_the_lock_goes() {
    // A claim skips rows that other transactions hold locked, and such a transaction need not
    // send any wake-up when it ends (a heartbeat that rechecked a lease ended meanwhile keeps
    // the row locked, for one). The poll must look again by itself.
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let w = RawWorker::register(&server, &["default"]).await;
    let run = server
        .workflows()
        .await
        .start_run(start_req("locked", json!({})))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let id: uuid::Uuid = run.id.parse().unwrap();
    let locker = db.connect().await;
    locker.batch_execute("BEGIN").await.unwrap();
    locker
        .execute("SELECT 1 FROM runs WHERE id = $1 FOR NO KEY UPDATE", &[&id])
        .await
        .unwrap();
    let poll = tokio::spawn(async move { w.poll(1, Duration::from_secs(30)).await });
    // Wait until the poll's claim has looked and skipped the run.
    db.until_claimed().await;
    assert!(!poll.is_finished(), "the poll leased a run whose row was locked");
    // The lock goes without any wake-up.
    let released = Instant::now();
    locker.batch_execute("COMMIT").await.unwrap();
    let runs = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the poll found the run once its row was unlocked")
        .unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].run_id, run.id);
    assert!(
        released.elapsed() < Duration::from_secs(2),
        "leased {:?} after the lock went",
        released.elapsed()
    );
}

/// The database builds every ready notification's payload (`aiki_ready_payload`), for the
/// server's statements and the child-end trigger alike; every replica's listener reads it back
/// as the queue and the delay it was built from.
#[tokio::test]
async fn the_listener_reads_back_the_queue_and_delay_of_a_ready_payload() {
    let db = TestDb::new().await;
    let pg = db.connect().await;
    for (ns, queue, ms) in [
        ("default", "default", 0i64),
        ("billing-eu", "q\u{e9}", 1500),
        ("a", "b", 86_400_000),
    ] {
        let payload: String = pg
            .query_one("SELECT aiki_ready_payload($1, $2, $3)", &[&ns, &queue, &ms])
            .await
            .unwrap()
            .get(0);
        let (key, delay) = aiki_server::wake::parse_ready(&payload).expect("a well-formed payload");
        assert_eq!(key, (ns.to_owned(), queue.to_owned()));
        assert_eq!(delay, Some(Duration::from_millis(ms as u64)));
    }
}
