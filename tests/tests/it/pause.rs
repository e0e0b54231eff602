//! Pause and resume: a paused run is not leased until resumed; a running run pauses when its
//! worker, told on its next heartbeat, releases it, and resumes without repeating a task.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use aiki::RunStatus;
use aiki_tests::{RawWorker, TestEnv, bin, eventually, history_types};
use aiki_worker::{Context, WorkflowError};
use serde_json::json;
use tonic::Code;

#[tokio::test]
async fn a_paused_queued_run_is_not_leased_until_resumed() {
    let env = TestEnv::new().await;
    let db = &env.db;
    let server = &env.server;
    let client = &env.client;
    let run = client
        .start_run("later", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let paused = client.pause(&run.id, "deploy freeze").await.unwrap();
    assert_eq!(paused.status, RunStatus::Paused);
    assert_eq!(
        client.pause(&run.id, "").await.unwrap().status,
        RunStatus::Paused,
        "idempotent"
    );

    let w = RawWorker::register(server, &["default"]).await;
    assert!(
        w.poll(10, Duration::from_millis(300)).await.is_empty(),
        "a paused run is not leased"
    );
    let queues = client.queues().await.unwrap();
    assert_eq!((queues[0].paused, queues[0].ready), (1, 0), "{queues:?}");

    // Resuming wakes a waiting poll at once: once the poll has claimed (and found nothing),
    // it waits up to 30 s, far longer than the answer is waited for below (on a loaded
    // machine, seeing its claim can take seconds).
    let since = db.clock().await;
    let poll = tokio::spawn({
        let w = w.clone();
        async move { w.poll(10, Duration::from_secs(30)).await }
    });
    db.until_claimed_since(Some(since)).await;
    assert!(!poll.is_finished(), "the poll answered with nothing to lease");
    let resumed = client.resume(&run.id).await.unwrap();
    assert_eq!(resumed.status, RunStatus::Queued);
    let leased = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].run_id, run.id);
    assert_eq!(
        history_types(server, &run.id).await,
        ["run_created", "run_paused", "run_resumed", "run_leased"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_run_pauses_on_its_worker_and_resumes_without_repeating_a_task() {
    let env = TestEnv::new().await;
    let client = &env.client;
    let run = client
        .start_run("two-steps", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let first_steps = Arc::new(AtomicU32::new(0));
    let executions = Arc::new(AtomicU32::new(0));
    let (at_gate_tx, mut at_gate) = tokio::sync::mpsc::unbounded_channel();
    let gate_open = Arc::new(tokio::sync::Notify::new());
    let builder = aiki_worker::WorkerBuilder::new(env.url())
        .register("two-steps", {
            let (first_steps, executions, gate_open) = (first_steps.clone(), executions.clone(), gate_open.clone());
            move |ctx: Context, _: serde_json::Value| {
                let (first_steps, executions, gate_open) = (first_steps.clone(), executions.clone(), gate_open.clone());
                let at_gate_tx = at_gate_tx.clone();
                async move {
                    let execution = executions.fetch_add(1, Ordering::SeqCst) + 1;
                    let a: u32 = ctx
                        .task("first", (), |()| async {
                            Ok::<_, WorkflowError>(first_steps.fetch_add(1, Ordering::SeqCst) + 1)
                        })
                        .await?;
                    // The first execution waits here until it is stopped; later ones go on.
                    if execution == 1 {
                        let _ = at_gate_tx.send(());
                        gate_open.notified().await;
                    }
                    let b: u32 = ctx.task("second", (), |()| async { Ok::<_, WorkflowError>(2) }).await?;
                    Ok(json!({"a": a, "b": b}))
                }
            }
        })
        .register("probe", |_ctx: Context, _: serde_json::Value| async {
            Ok(json!("probed"))
        });
    let mut worker = env.worker(builder).await;
    tokio::time::timeout(Duration::from_secs(10), at_gate.recv())
        .await
        .unwrap();

    let asked = client.pause(&run.id, "hold on").await.unwrap();
    assert_eq!(asked.status, RunStatus::Running);
    assert!(asked.pause_requested);
    eventually(
        Duration::from_secs(10),
        "the worker released the run, now paused",
        || async { client.get(&run.id).await.unwrap().status == RunStatus::Paused },
    )
    .await;
    // Paused: the worker does not lease it again. A run started after the pause, on the same
    // queue, is leased and completed: the worker has polled since, and the paused run, older,
    // would have come first had it been ready.
    let probe = client
        .start_run("probe", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let probed: serde_json::Value = probe.result(Duration::from_secs(20)).await.unwrap();
    assert_eq!(probed, json!("probed"));
    assert_eq!(client.get(&run.id).await.unwrap().status, RunStatus::Paused);
    assert_eq!(executions.load(Ordering::SeqCst), 1);

    client.resume(&run.id).await.unwrap();
    let out: serde_json::Value = run.result(Duration::from_secs(20)).await.unwrap();
    assert_eq!(out, json!({"a": 1, "b": 2}));
    assert_eq!(
        first_steps.load(Ordering::SeqCst),
        1,
        "the checkpointed task did not run again"
    );
    assert_eq!(executions.load(Ordering::SeqCst), 2);
    let history = history_types(&env.server, &run.id).await;
    let pause_events: Vec<&str> = history
        .iter()
        .map(String::as_str)
        .filter(|t| ["pause_requested", "lease_released", "run_paused", "run_resumed"].contains(t))
        .collect();
    assert_eq!(
        pause_events,
        ["pause_requested", "lease_released", "run_paused", "run_resumed"],
        "{history:?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn pause_and_resume_refuse_what_they_cannot_do_and_change_nothing() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let run = client
        .start_run("x", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();

    // Resuming a run that is not paused changes nothing.
    assert_eq!(client.resume(&run.id).await.unwrap().status, RunStatus::Queued);
    // A paused run can be cancelled, and then neither paused nor resumed.
    client.pause(&run.id, "").await.unwrap();
    assert_eq!(client.cancel(&run.id, "").await.unwrap().status, RunStatus::Cancelled);
    let mut wf = server.workflows().await;
    for err in [
        wf.pause_run(aiki_proto::v1::PauseRunRequest {
            run_id: run.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        wf.resume_run(aiki_proto::v1::ResumeRunRequest {
            run_id: run.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("cancelled"), "{}", err.message());
    }
    let err = wf
        .pause_run(aiki_proto::v1::PauseRunRequest {
            run_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = wf
        .resume_run(aiki_proto::v1::ResumeRunRequest {
            run_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        history_types(server, &run.id).await,
        ["run_created", "run_paused", "run_cancelled"]
    );
}

#[tokio::test]
async fn the_cli_pauses_and_resumes() {
    let env = TestEnv::new().await;
    let client = &env.client;
    let run = client
        .start_run("x", &json!({}), aiki::StartOptions::key("cli-pause"))
        .await
        .unwrap();
    let url = env.url();
    let aiki = |args: &'static [&'static str]| {
        let url = url.clone();
        async move {
            let out = tokio::process::Command::new(bin("aiki"))
                .args(["--server", &url])
                .args(args)
                .output()
                .await
                .expect("run aiki");
            assert!(
                out.status.success(),
                "aiki {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    assert_eq!(
        aiki(&["run", "pause", "--key", "cli-pause", "--reason", "wait"])
            .await
            .trim(),
        format!("run {} paused", run.id)
    );
    assert_eq!(client.get(&run.id).await.unwrap().status, RunStatus::Paused);
    assert!(aiki(&["run", "get", "--key", "cli-pause"]).await.contains("paused"));
    assert_eq!(
        aiki(&["run", "resume", "--key", "cli-pause"]).await.trim(),
        format!("run {} is queued", run.id)
    );
    assert_eq!(client.get(&run.id).await.unwrap().status, RunStatus::Queued);
}

#[tokio::test]
async fn a_run_asked_to_pause_whose_lease_expires_is_paused_not_queued() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let run = client
        .start_run("x", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let w = RawWorker::register(server, &["default"]).await;
    assert_eq!(w.poll(1, Duration::from_secs(5)).await.len(), 1);
    assert!(client.pause(&run.id, "").await.unwrap().pause_requested);
    // No heartbeat: the lease expires (2 s in tests) and the reaper ends it.
    eventually(Duration::from_secs(15), "the reaper paused the run", || async {
        client.get(&run.id).await.unwrap().status == RunStatus::Paused
    })
    .await;
    assert!(!client.get(&run.id).await.unwrap().pause_requested);
    assert!(w.poll(1, Duration::from_millis(300)).await.is_empty());
    assert_eq!(
        history_types(server, &run.id).await,
        [
            "run_created",
            "run_leased",
            "pause_requested",
            "lease_expired",
            "run_paused"
        ]
    );
}
