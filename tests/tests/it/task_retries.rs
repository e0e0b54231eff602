//! Per-task retry policies (`ctx.task_with`): short delays are waited inline, long ones suspend
//! the run, and a task whose attempts are spent fails with its failure checkpointed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use aiki::{RetryPolicy, RunStatus, StartOptions};
use aiki_tests::{TestEnv, TestServer, history_types};
use aiki_worker::{Context, TaskOptions, WorkflowError};
use serde_json::{Value, json};

/// "flaky" runs one task that fails its first `fails` calls, with a retry policy of
/// `attempts` attempts and a first delay of `delay_ms`, waited inline up to 300 ms.
fn worker(server: &TestServer, calls: Arc<AtomicU32>) -> aiki_worker::WorkerBuilder {
    aiki_worker::WorkerBuilder::new(server.url()).register("flaky", move |ctx: Context, input: Value| {
        let calls = calls.clone();
        async move {
            let opts = TaskOptions {
                retry: RetryPolicy {
                    max_attempts: input["attempts"].as_u64().map(|n| n as u32),
                    initial_interval: Some(Duration::from_millis(input["delay_ms"].as_u64().unwrap_or(10))),
                    ..RetryPolicy::default()
                },
                inline_retry_limit: Duration::from_millis(300),
            };
            let fails = input["fails"].as_u64().unwrap_or(0) as u32;
            let out: u32 = ctx
                .task_with("call", (), opts, |()| {
                    let calls = calls.clone();
                    async move {
                        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                        if n <= fails {
                            Err(WorkflowError::new("Flaky", format!("call {n} failed")))
                        } else {
                            Ok(n)
                        }
                    }
                })
                .await?;
            Ok(out)
        }
    })
}

async fn run(input: Value) -> (u32, aiki::Run, Vec<String>) {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let calls = Arc::new(AtomicU32::new(0));
    let builder = worker(server, calls.clone());
    let mut w = env.worker(builder).await;
    let handle = client
        .start_run("flaky", &input, StartOptions::default())
        .await
        .unwrap();
    let ended = client.wait(&handle.id, Duration::from_secs(15)).await.unwrap();
    let history = history_types(server, &handle.id).await;
    w.stop().await;
    (calls.load(Ordering::SeqCst), ended, history)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_retry_delays_are_waited_inline() {
    let (calls, run, history) = run(json!({"fails": 2, "attempts": 5, "delay_ms": 20})).await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.output, Some(json!(3)));
    assert_eq!(calls, 3);
    assert_eq!(run.attempt, 1, "the run itself was not retried");
    assert_eq!(history, ["run_created", "run_leased", "task_recorded", "run_completed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retry_delay_suspends_the_run() {
    let (calls, run, history) = run(json!({"fails": 1, "attempts": 3, "delay_ms": 800})).await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.output, Some(json!(2)));
    assert_eq!(calls, 2);
    assert_eq!(run.attempt, 1);
    for kind in ["run_suspended", "run_woken"] {
        assert_eq!(history.iter().filter(|t| *t == kind).count(), 1, "{history:?}");
    }
    // The wait's step and the task: two checkpoints.
    assert_eq!(
        history.iter().filter(|t| *t == "task_recorded").count(),
        2,
        "{history:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_out_of_attempts_fails_the_run_with_its_failure_checkpointed() {
    let (calls, run, history) = run(json!({"fails": 100, "attempts": 2, "delay_ms": 10})).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(
        calls, 2,
        "two attempts, and the run's own policy does not start them again"
    );
    let error = run.error.unwrap();
    assert_eq!(
        (error.kind.as_str(), error.message.as_str()),
        ("Flaky", "call 2 failed")
    );
    assert_eq!(history, ["run_created", "run_leased", "task_recorded", "run_failed"]);
}
