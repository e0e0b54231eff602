//! The worker runtime: draining on shutdown, reconnecting to a restarted server (registering
//! again with one that does not know it), stopping a run whose lease is lost without reporting
//! it, and the replay rules of `ctx.task`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use aiki_tests::{Counts, TestDb, TestEnv, TestServer, TestWorker, eventually};
use aiki_worker::{Context, WorkerBuilder, WorkflowError};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_short_runs_and_releases_long_ones() {
    let env = TestEnv::new().await;
    let client = &env.client;
    let quick = client
        .start_run("slow", &json!(200), aiki::StartOptions::default())
        .await
        .unwrap();
    let long = client
        .start_run("slow", &json!(60_000), aiki::StartOptions::default())
        .await
        .unwrap();
    let running = Arc::new(AtomicUsize::new(0));
    let r = running.clone();
    let builder = WorkerBuilder::new(env.url())
        .slots(2)
        .shutdown_grace(Duration::from_secs(2))
        .register("slow", move |_ctx: Context, ms: u64| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(ms)
            }
        });
    let mut worker = env.worker(builder).await;
    eventually(Duration::from_secs(10), "both runs started", || async {
        running.load(Ordering::SeqCst) == 2
    })
    .await;
    worker.stop().await;

    assert_eq!(
        quick.get().await.unwrap().status,
        aiki::RunStatus::Completed,
        "finished within the grace period"
    );
    let long = long.get().await.unwrap();
    assert_eq!(long.status, aiki::RunStatus::Queued, "released for another worker");
    let history = client.history(&long.id).await.unwrap();
    assert_eq!(
        history.last().unwrap().r#type,
        aiki_proto::v1::EventType::LeaseReleased as i32
    );
}

/// Starts an `echo` run through the server at `url` and checks its result.
async fn echo_through(url: &str, value: &str) {
    let client = aiki::Client::connect(url.to_owned()).await.unwrap();
    let run = client
        .start_run("echo", &json!(value), aiki::StartOptions::default())
        .await
        .unwrap();
    assert_eq!(run.result::<String>(Duration::from_secs(20)).await.unwrap(), value);
}

/// A server on `addr` again (an earlier one listened there), on the database at `url`.
async fn serve_again(
    addr: std::net::SocketAddr,
    url: &str,
) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("rebind the same address");
    let stop = CancellationToken::new();
    let server = tokio::spawn(aiki_server::serve(
        aiki_tests::Config::for_test(url),
        listener,
        stop.clone(),
    ));
    (stop, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_when_the_server_comes_back() {
    let db = TestDb::new().await;
    let first = TestServer::start(&db).await;
    let addr = first.addr;
    let builder = WorkerBuilder::new(first.url())
        .poll_wait(Duration::from_secs(1))
        .register("echo", |_ctx: Context, v: serde_json::Value| async move { Ok(v) });
    let mut worker = TestWorker::start(builder).await;
    echo_through(&first.url(), "before").await;

    first.stop().await;
    // The server is away for a while; then one comes back on the same address.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (stop_second, second) = serve_again(addr, &db.url).await;
    echo_through(&format!("http://{addr}"), "after").await;

    worker.stop().await;
    stop_second.cancel();
    second.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_the_server_does_not_know_registers_again() {
    // The server comes back on another database, which has never heard of the worker: told so
    // by a poll or a heartbeat, the worker registers again, once (two polls are on their way and
    // the heartbeat goes on), and goes on serving.
    let db = TestDb::new().await;
    let first = TestServer::start(&db).await;
    let addr = first.addr;
    // Slots for two polls of a batch each, so that two are on their way.
    let builder = WorkerBuilder::new(first.url())
        .poll_wait(Duration::from_secs(1))
        .slots(20)
        .poll_batch(10)
        .register("echo", |_ctx: Context, v: serde_json::Value| async move { Ok(v) });
    let mut worker = TestWorker::start(builder).await;
    echo_through(&first.url(), "before").await;
    first.stop().await;

    let other = TestDb::new().await;
    let (stop_second, second) = serve_again(addr, &other.url).await;
    echo_through(&format!("http://{addr}"), "after").await;
    let workers: i64 = other
        .connect()
        .await
        .query_one("SELECT count(*) FROM workers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(workers, 1, "registered once on the new database");

    worker.stop().await;
    stop_second.cancel();
    second.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_lease_is_lost_is_stopped_and_never_reported() {
    // No reaper pass during the test: the expired lease keeps its token and the run stays
    // `running`, so any report the worker made would be accepted and would show in the history.
    let env = TestEnv::with_config(|config| config.reaper_interval = Duration::from_secs(3600)).await;
    let client = &env.client;
    let run = client
        .start_run("stuck", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let (stopped_tx, mut stopped) = tokio::sync::mpsc::unbounded_channel::<()>();
    use aiki_tests::OnDrop;
    let builder = WorkerBuilder::new(env.url()).register("stuck", move |_ctx: Context, _: serde_json::Value| {
        let started_tx = started_tx.clone();
        let guard = OnDrop(stopped_tx.clone());
        async move {
            let _guard = guard;
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
            Ok(())
        }
    });
    let mut worker = env.worker(builder).await;
    started.recv().await.unwrap();
    // The lease runs out, as when heartbeats are delayed past the expiry: the next heartbeat
    // tells the worker, which stops the run.
    let pg = env.db.connect().await;
    let id = uuid::Uuid::parse_str(&run.id).unwrap();
    pg.execute(
        "UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), stopped.recv())
        .await
        .expect("the run was stopped");
    // Once the worker has stopped, whatever it was going to report has been sent.
    worker.stop().await;
    let run = client.get(&run.id).await.unwrap();
    let events = aiki_tests::history_types(&env.server, &run.id).await;
    assert_eq!(
        events,
        ["run_created", "run_leased"],
        "the worker reported nothing about a run it lost"
    );
    assert_eq!(run.status, aiki::RunStatus::Running, "left for the reaper");
    assert_eq!(worker.lost(), 1, "the runtime counts the run as lost");
}

/// Heartbeats every 5 ms race the completions of 6,000 runs through 500 slots: a heartbeat that
/// names a run whose completion commits while the heartbeat waits for the run's row must not
/// make the runtime take the run for lost (and abandon its report).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_that_crosses_a_completion_does_not_lose_the_run() {
    const RUNS: usize = 6_000;
    let env = TestEnv::with_config(|config| config.heartbeat_interval = Duration::from_millis(5)).await;
    let starts: Vec<_> = (0..RUNS)
        .map(|i| ("quick", json!(i), aiki::StartOptions::default()))
        .collect();
    for chunk in starts.chunks(1000) {
        env.client.start_runs(chunk).await.unwrap();
    }
    let builder = WorkerBuilder::new(env.url())
        .slots(500)
        .register("quick", |_ctx: Context, i: u64| async move {
            // A little work, so that many leases are held (and heartbeated) at each instant.
            tokio::time::sleep(Duration::from_millis(i % 7)).await;
            Ok(i)
        });
    let mut worker = env.worker(builder).await;
    eventually(Duration::from_secs(120), "every run completed", || async {
        worker.completed("quick") + worker.lost() >= RUNS as u64
    })
    .await;
    worker.stop().await;
    assert_eq!(worker.lost(), 0, "no run was taken for lost");
    assert_eq!(worker.completed("quick"), RUNS as u64, "every completion was counted");
    let pg = env.db.connect().await;
    let row = pg
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE lease_expirations > 0)
             FROM runs",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), RUNS as i64, "every run completed");
    assert_eq!(row.get::<_, i64>(1), 0, "no lease expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_tasks_in_a_loop_replay_and_reordered_tasks_are_detected() {
    let env = TestEnv::new().await;
    let client = &env.client;
    let effects: Counts = Arc::default();
    let crash_once = Arc::new(AtomicUsize::new(0));
    let reorder = Arc::new(AtomicUsize::new(0));
    let (e, c, r) = (effects.clone(), crash_once.clone(), reorder.clone());
    let builder = WorkerBuilder::new(env.url())
        .register("loop", move |ctx: Context, _: serde_json::Value| {
            let (e, c) = (e.clone(), c.clone());
            async move {
                // A retry loop inside the workflow: the first call fails, the second succeeds.
                let mut tries = 0;
                let polled: i32 = loop {
                    tries += 1;
                    let e = e.clone();
                    let r = ctx
                        .task("poll", 7, |n: i32| async move {
                            *e.lock().unwrap().entry("poll".into()).or_default() += 1;
                            if tries == 1 {
                                Err(WorkflowError::new("NotYet", "not yet"))
                            } else {
                                Ok(n)
                            }
                        })
                        .await;
                    if let Ok(v) = r {
                        break v;
                    }
                };
                let mut total = polled - 7;
                for _ in 0..3 {
                    let e = e.clone();
                    // The same task with the same input, three times: three distinct tasks.
                    total += ctx
                        .task("add", 1, |n: i32| async move {
                            *e.lock().unwrap().entry("add".into()).or_default() += 1;
                            Ok::<_, WorkflowError>(n)
                        })
                        .await?;
                }
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(WorkflowError::new("Crash", "fail after the loop once"));
                }
                Ok(total)
            }
        })
        .register("reordered", move |ctx: Context, _: serde_json::Value| {
            let r = r.clone();
            async move {
                let first_time = r.fetch_add(1, Ordering::SeqCst) == 0;
                let order = if first_time { ["a", "b"] } else { ["b", "a"] };
                for name in order {
                    ctx.task(name, (), |_| async { Ok::<_, WorkflowError>(()) }).await?;
                }
                if first_time {
                    return Err(WorkflowError::new("Crash", "fail once"));
                }
                Ok(())
            }
        });
    let mut worker = env.worker(builder).await;
    let retry = aiki::StartOptions {
        retry: Some(aiki::RetryPolicy {
            initial_interval: Some(Duration::from_millis(10)),
            ..Default::default()
        }),
        ..Default::default()
    };

    let run = client.start_run("loop", &json!({}), retry.clone()).await.unwrap();
    assert_eq!(run.result::<i32>(Duration::from_secs(10)).await.unwrap(), 3);
    assert_eq!(
        effects.lock().unwrap().get("add"),
        Some(&3),
        "three tasks, each run once across two attempts"
    );
    assert_eq!(
        effects.lock().unwrap().get("poll"),
        Some(&2),
        "the retried task ran twice in the first attempt and was replayed, not rerun, in the second"
    );
    assert_eq!(run.get().await.unwrap().attempt, 2);

    let run = client.start_run("reordered", &json!({}), retry).await.unwrap();
    match run.result::<()>(Duration::from_secs(10)).await {
        Err(aiki::Error::RunFailed { error, .. }) => {
            assert_eq!(error.kind, "NonDeterminism");
            assert!(error.message.contains("order of its tasks"), "{}", error.message);
        }
        other => panic!("expected a non-determinism failure, got {other:?}"),
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_leases_a_run_again_stops_its_earlier_execution() {
    // Heartbeats so rare that the worker learns nothing from them during the test: only the
    // second lease can make it stop the first execution.
    let env = TestEnv::with_config(|config| {
        config.lease_ttl = Duration::from_secs(120);
        config.heartbeat_interval = Duration::from_secs(60);
    })
    .await;
    let run = env
        .client
        .start_run("stuck", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let live = Arc::new(AtomicUsize::new(0));
    let most_live = Arc::new(AtomicUsize::new(0));
    struct Live(Arc<AtomicUsize>);
    impl Drop for Live {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let (s, l, m) = (started.clone(), live.clone(), most_live.clone());
    let builder = WorkerBuilder::new(env.url())
        .shutdown_grace(Duration::from_millis(100))
        .register("stuck", move |_ctx: Context, _: serde_json::Value| {
            let (s, l, m) = (s.clone(), l.clone(), m.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                let now = l.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                let _live = Live(l);
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    let mut worker = env.worker(builder).await;
    eventually(Duration::from_secs(5), "the run started", || async {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    // The lease runs out; the reaper queues the run again and this same worker leases it again.
    let pg = env.db.connect().await;
    let id = uuid::Uuid::parse_str(&run.id).unwrap();
    pg.execute(
        "UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "the run started again", || async {
        started.load(Ordering::SeqCst) == 2
    })
    .await;
    eventually(Duration::from_secs(5), "one execution left", || async {
        live.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(
        most_live.load(Ordering::SeqCst),
        1,
        "never two executions of the run at once"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_workflow_fails_its_attempt_and_frees_its_slot() {
    let env = TestEnv::new().await;
    let client = &env.client;
    let builder = WorkerBuilder::new(env.url())
        .slots(1)
        .register("panics", |_ctx: Context, _: serde_json::Value| async move {
            if true {
                panic!("index out of bounds");
            }
            Ok(())
        })
        .register("fine", |_ctx: Context, v: serde_json::Value| async move { Ok(v) });
    let mut worker = env.worker(builder).await;
    let opts = aiki::StartOptions {
        retry: Some(aiki::RetryPolicy {
            max_attempts: Some(2),
            initial_interval: Some(Duration::from_millis(10)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bad = client.start_run("panics", &json!({}), opts).await.unwrap();
    match bad.result::<()>(Duration::from_secs(10)).await {
        Err(aiki::Error::RunFailed { error, .. }) => {
            assert_eq!(error.kind, "Panic");
            assert!(error.message.contains("index out of bounds"), "{}", error.message);
        }
        other => panic!("expected a failed run, got {other:?}"),
    }
    assert_eq!(
        bad.get().await.unwrap().attempt,
        2,
        "a panic is retried like any failure"
    );
    // The only slot is free again.
    let good = client
        .start_run("fine", &json!(5), aiki::StartOptions::default())
        .await
        .unwrap();
    assert_eq!(good.result::<i32>(Duration::from_secs(10)).await.unwrap(), 5);
    worker.stop().await;
}

/// When each task of a run is checkpointed, as `(task key, recorded in the transaction that
/// completed the run)`, in the order the tasks ran: `now()` is the transaction's start, so a
/// task recorded with the completion has the run's finish time.
async fn checkpoints(db: &TestDb, run_id: &str) -> Vec<(String, bool)> {
    db.pairs_of_run(
        "SELECT t.name, t.recorded_at = r.finished_at FROM task_results t JOIN runs r ON r.id = t.run_id \
         WHERE t.run_id = $1 ORDER BY t.seq",
        run_id,
    )
    .await
}

/// A task's result is checkpointed before the next task starts, and the last one travels with
/// the completion, committed in its transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_task_is_checkpointed_with_the_completion() {
    let env = TestEnv::new().await;
    let builder = WorkerBuilder::new(env.url()).register("two-steps", |ctx: Context, x: u64| async move {
        let a: u64 = ctx
            .task("one", x, |x| async move { Ok::<_, WorkflowError>(x + 1) })
            .await?;
        let b: u64 = ctx
            .task("two", a, |a| async move { Ok::<_, WorkflowError>(a * 10) })
            .await?;
        Ok(b)
    });
    let mut worker = env.worker(builder).await;
    let counts = worker.clone();
    let run = env
        .client
        .start_run("two-steps", &json!(4), aiki::StartOptions::default())
        .await
        .unwrap();
    let out: u64 = run.result(Duration::from_secs(10)).await.unwrap();
    assert_eq!(out, 50);
    eventually(Duration::from_secs(5), "the worker counts the completion", || async {
        counts.completed("two-steps") == 1
    })
    .await;
    assert_eq!(counts.completed("elsewhere"), 0, "a workflow it does not serve");
    assert_eq!(
        checkpoints(&env.db, &run.id).await,
        [("one".to_owned(), false), ("two".to_owned(), true)]
    );
    worker.stop().await;
}

/// The tasks that ran before an attempt failed are checkpointed before the failure is
/// reported: the retry does not run them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_before_a_failed_attempt_are_not_run_again() {
    let env = TestEnv::new().await;
    let effects: Counts = Arc::default();
    let e = effects.clone();
    let builder = WorkerBuilder::new(env.url()).register("flaky", move |ctx: Context, (): ()| {
        let e = e.clone();
        async move {
            let n: u32 = ctx
                .task("count", (), |()| async move {
                    *e.lock().unwrap().entry("count".to_owned()).or_default() += 1;
                    Ok::<_, WorkflowError>(7)
                })
                .await?;
            if ctx.attempt() == 1 {
                return Err(WorkflowError::new("Flaky", "first attempt fails"));
            }
            Ok(n)
        }
    });
    let mut worker = env.worker(builder).await;
    let options = aiki::StartOptions {
        retry: Some(aiki::RetryPolicy {
            max_attempts: Some(2),
            initial_interval: Some(Duration::from_millis(10)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let run = env.client.start_run("flaky", &(), options).await.unwrap();
    let out: u32 = run.result(Duration::from_secs(10)).await.unwrap();
    assert_eq!(out, 7);
    assert_eq!(run.get().await.unwrap().attempt, 2);
    assert_eq!(effects.lock().unwrap().get("count"), Some(&1), "the task ran once");
    worker.stop().await;
}

/// Tasks running concurrently in one workflow each wait for the results before them to be
/// checkpointed, and none is lost or recorded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tasks_are_checkpointed_once_each_in_order() {
    let env = TestEnv::new().await;
    let builder = WorkerBuilder::new(env.url()).register("fan-out", |ctx: Context, x: u64| async move {
        let a: u64 = ctx
            .task("a", x, |x| async move { Ok::<_, WorkflowError>(x + 1) })
            .await?;
        let (b, c) = futures::join!(
            ctx.task("b", a, |a| async move { Ok::<_, WorkflowError>(a * 2) }),
            ctx.task("c", a, |a| async move { Ok::<_, WorkflowError>(a * 3) }),
        );
        Ok(b? + c?)
    });
    let mut worker = env.worker(builder).await;
    let run = env
        .client
        .start_run("fan-out", &json!(1), aiki::StartOptions::default())
        .await
        .unwrap();
    let out: u64 = run.result(Duration::from_secs(10)).await.unwrap();
    assert_eq!(out, 10);
    let got = checkpoints(&env.db, &run.id).await;
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "each task recorded once, in order: {got:?}");
    assert!(!got[0].1, "a was committed before b and c ran: {got:?}");
    // A task that finished before the other's function started was checkpointed by that one;
    // the last to finish travels with the completion.
    assert!(
        got[1].1 || got[2].1,
        "the last result came with the completion: {got:?}"
    );
    worker.stop().await;
}
