//! Recovery from crashed workers: a run whose lease expired keeps its place in its queue (it is
//! taken again before the backlog queued behind it), its schedule-to-start timeout counts from
//! when it was queued again, and restarts of a worker fleet do not fail healthy runs.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use aiki::{StartOptions, Timeouts};
use aiki_tests::{RawWorker, TestEnv, TestServer, eventually, history_types};
use aiki_worker::{Context, WorkerBuilder};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A worker of workflow "job" (which sleeps the milliseconds it is given) with `slots` slots,
/// running until its task is aborted (as a killed process: no release, no more heartbeats).
async fn job_worker(server: &TestServer, slots: usize, started: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    let worker = WorkerBuilder::new(server.url())
        .slots(slots)
        .register("job", move |_ctx: Context, ms: u64| {
            let started = started.clone();
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(ms)
            }
        })
        .build()
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = worker.run(CancellationToken::new()).await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_workers_runs_are_leased_again_ahead_of_the_backlog() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    // Ten long runs, then a backlog of 1,000 short ones behind them.
    let mut long = Vec::new();
    for _ in 0..10 {
        long.push(
            client
                .start_run("job", &600_000u64, StartOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    let started = Arc::new(AtomicUsize::new(0));
    let crashing = job_worker(server, 10, started.clone()).await;
    eventually(Duration::from_secs(10), "the ten long runs started", || async {
        started.load(Ordering::SeqCst) == 10
    })
    .await;
    let backlog: Vec<_> = (0..1000).map(|_| ("job", 200u64, StartOptions::default())).collect();
    client.start_runs(&backlog).await.unwrap();
    crashing.abort();
    let _ = crashing.await;

    // Another worker drains the backlog: at 20 runs at a time, 200 ms each, about 10 s of it.
    let _draining = job_worker(server, 20, Arc::new(AtomicUsize::new(0))).await;
    let pg = env.db.connect().await;
    let events = |id: &str| {
        let id: uuid::Uuid = id.parse().unwrap();
        let pg = &pg;
        async move {
            pg.query(
                "SELECT type, at FROM run_history WHERE run_id = $1 AND type IN ('lease_expired', 'run_leased')
                 ORDER BY seq",
                &[&id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, SystemTime>(1)))
            .collect::<Vec<_>>()
        }
    };
    for id in &long {
        eventually(Duration::from_secs(20), "the run was leased again", || async {
            events(id).await.len() >= 3
        })
        .await;
        let history = events(id).await;
        let kinds: Vec<&str> = history.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds[..3], ["run_leased", "lease_expired", "run_leased"], "{id}");
        let waited = history[2].1.duration_since(history[1].1).unwrap();
        assert!(
            waited < Duration::from_secs(1),
            "run {id} waited {waited:?} after its lease expired, behind the backlog"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_runs_schedule_to_start_timeout_counts_from_when_it_was_queued_again() {
    let env = TestEnv::new().await;
    let server = &env.server;
    // Shorter than the lease (2 s in tests): measured from the run's first readiness, it would
    // be over by the time the lease expires.
    let opts = StartOptions {
        timeouts: Timeouts {
            schedule_to_start: Some(Duration::from_millis(1500)),
            ..Timeouts::default()
        },
        ..StartOptions::default()
    };
    let run = env.client.start_run("job", &json!(1), opts).await.unwrap();
    let silent = RawWorker::register(server, &["default"]).await;
    assert_eq!(silent.poll(1, Duration::from_secs(5)).await.len(), 1);
    // The silent worker never heartbeats: the lease expires and another worker takes the run.
    let next = RawWorker::register(server, &["default"]).await;
    let leased = next.poll(1, Duration::from_secs(10)).await;
    assert_eq!(leased.len(), 1, "leased again, not timed out");
    assert_eq!(leased[0].run_id, run.id);
    let history = history_types(server, &run.id).await;
    assert!(!history.iter().any(|t| t == "timed_out"), "{history:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_restarted_one_by_one_five_times_fails_no_run() {
    let env = TestEnv::with_config(|config| {
        config.lease_ttl = Duration::from_millis(800);
        config.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    let server = &env.server;
    let client = &env.client;
    let started = Arc::new(AtomicUsize::new(0));
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(job_worker(server, 4, started.clone()).await);
    }
    // Runs of about a second flow in while each worker in turn is killed and started again.
    let stop = CancellationToken::new();
    let feeder = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            while !stop.is_cancelled() {
                let batch: Vec<_> = (0..4)
                    .map(|i| ("job", 700 + 100 * i, StartOptions::default()))
                    .collect();
                ids.extend(client.start_runs(&batch).await.unwrap().into_iter().map(|r| r.id));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            ids
        })
    };
    for _round in 0..5 {
        for slot in fleet.iter_mut() {
            tokio::time::sleep(Duration::from_millis(600)).await;
            slot.abort();
            let _ = (&mut *slot).await;
            *slot = job_worker(server, 4, started.clone()).await;
        }
    }
    stop.cancel();
    let ids = feeder.await.unwrap();
    let pg = env.db.connect().await;
    eventually(Duration::from_secs(120), "every run ended", || async {
        let open: i64 = pg
            .query_one(
                "SELECT count(*) FROM runs WHERE status NOT IN ('completed', 'failed', 'cancelled')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        open == 0
    })
    .await;
    let row = pg
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed'),
                    max(lease_expirations), count(*) FILTER (WHERE lease_expirations > 0)
             FROM runs",
            &[],
        )
        .await
        .unwrap();
    let (completed, failed, most, hit) = (
        row.get::<_, i64>(0),
        row.get::<_, i64>(1),
        row.get::<_, i32>(2),
        row.get::<_, i64>(3),
    );
    assert_eq!(
        failed, 0,
        "no run failed ({hit} runs lost a lease, one of them {most} times)"
    );
    assert_eq!(completed, ids.len() as i64);
    assert!(
        hit > 0,
        "the restarts cost runs their leases: the test exercised expiries"
    );
}
