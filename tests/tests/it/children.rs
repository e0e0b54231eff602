//! Child runs: a parent starts children with keys derived from itself, waits for each without
//! holding a worker, sees each result or error, and takes its unfinished descendants with it
//! when it is cancelled.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use aiki::{ListFilter, RunStatus, StartOptions};
use aiki_proto::v1::SuspendRunRequest;
use aiki_tests::{RawWorker, TestEnv, TestServer, aiki_cli, eventually, history_types, start_req};
use aiki_worker::{Context, WorkflowError};
use serde_json::{Value, json};
use tonic::Code;

/// "family" starts three "child" runs (the second fails), then waits for each and returns
/// what it saw. "child" returns its input's n times 10, or fails for `fail`. "tree" starts a
/// "waiter" that starts a "leaf" that waits for an event forever, and a "busy" child that
/// runs until stopped, then waits for the waiter. `starts` counts start_child calls.
fn family_worker(server: &TestServer, starts: Arc<AtomicU32>) -> aiki_worker::WorkerBuilder {
    let s1 = starts.clone();
    aiki_worker::WorkerBuilder::new(server.url())
        .slots(8)
        .register("family", move |ctx: Context, _: Value| {
            let starts = s1.clone();
            async move {
                let mut children = Vec::new();
                for (n, fail) in [(0, false), (1, true), (2, false)] {
                    starts.fetch_add(1, Ordering::SeqCst);
                    children.push(
                        ctx.start_child("child", &json!({"n": n, "fail": fail}), StartOptions::default())
                            .await?,
                    );
                }
                let mut seen = Vec::new();
                for child in &children {
                    seen.push(match child.result::<u64>().await? {
                        Ok(v) => json!(v),
                        Err(e) => json!({"failed": e.kind, "message": e.message}),
                    });
                }
                Ok(seen)
            }
        })
        .register("child", |ctx: Context, input: Value| async move {
            if input["fail"] == json!(true) {
                return Err(WorkflowError::new("Boom", "the child failed").non_retryable());
            }
            let n = input["n"].as_u64().unwrap_or(0);
            ctx.task("work", n, |n| async move { Ok::<_, WorkflowError>(n * 10) })
                .await
        })
        .register("tree", |ctx: Context, _: Value| async move {
            let waiter = ctx.start_child("waiter", &json!({}), StartOptions::default()).await?;
            ctx.start_child("busy", &json!({}), StartOptions::default()).await?;
            waiter
                .result::<Value>()
                .await?
                .map_err(|e| WorkflowError::new(e.kind, e.message))
        })
        .register("waiter", |ctx: Context, _: Value| async move {
            let leaf = ctx.start_child("leaf", &json!({}), StartOptions::default()).await?;
            leaf.result::<Value>()
                .await?
                .map_err(|e| WorkflowError::new(e.kind, e.message))
        })
        .register("leaf", |ctx: Context, _: Value| async move {
            ctx.wait_event::<Value>("never", None).await
        })
        .register("busy", |_ctx: Context, _: Value| async move {
            std::future::pending::<()>().await;
            Ok(())
        })
}

async fn children_of(client: &aiki::Client, id: &str) -> Vec<aiki::Run> {
    client
        .list(&ListFilter {
            parent_run_id: Some(id.to_owned()),
            ..ListFilter::default()
        })
        .await
        .unwrap()
        .runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_sees_each_childs_result_and_never_starts_a_child_twice() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let starts = Arc::new(AtomicU32::new(0));
    let builder = family_worker(server, starts.clone());
    let mut worker = env.worker(builder).await;

    let parent = client
        .start_run("family", &json!({}), StartOptions::key("family-1"))
        .await
        .unwrap();
    let seen: Vec<Value> = parent.result(Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        seen,
        [
            json!(0),
            json!({"failed": "Boom", "message": "the child failed"}),
            json!(20)
        ]
    );
    // The parent ran again after each wait, and each time asked for its three children.
    assert!(
        starts.load(Ordering::SeqCst) > 3,
        "the parent was re-executed mid-way ({} starts)",
        starts.load(Ordering::SeqCst)
    );
    let children = children_of(client, &parent.id).await;
    assert_eq!(children.len(), 3, "each child started once");
    for c in &children {
        assert_eq!(c.parent_run_id.as_deref(), Some(parent.id.as_str()));
        assert!(c.idempotency_key.as_deref().unwrap().starts_with(&parent.id));
    }
    let history = history_types(server, &parent.id).await;
    assert_eq!(
        history.iter().filter(|t| *t == "child_started").count(),
        3,
        "{history:?}"
    );
    assert_eq!(history.iter().filter(|t| *t == "child_ended").count(), 3, "{history:?}");

    // `aiki run get` shows the children, and each child's parent.
    let (ok, out, err) = aiki_cli(server, &["run", "get", &parent.id, "-o", "json"]).await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["children"].as_array().map(Vec::len), Some(3), "{v}");
    let (ok, out, _) = aiki_cli(server, &["run", "get", &children[0].id]).await;
    assert!(
        ok && out
            .lines()
            .any(|l| l.trim_start().starts_with("parent") && l.contains(&parent.id)),
        "{out}"
    );
    let (ok, out, _) = aiki_cli(server, &["run", "get", "--key", "family-1"]).await;
    assert!(ok && out.contains("children"), "{out}");
    let rows = out
        .lines()
        .filter(|l| {
            // "<id> child <status>", the rest of the line being the label column.
            let t: Vec<&str> = l.split_whitespace().collect();
            t.len() >= 3 && t[t.len() - 2] == "child" && uuid::Uuid::parse_str(t[t.len() - 3]).is_ok()
        })
        .count();
    assert_eq!(rows, 3, "{out}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_parent_cancels_its_unfinished_descendants() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let builder = family_worker(server, Arc::new(AtomicU32::new(0)));
    let mut worker = env.worker(builder).await;

    let tree = client
        .start_run("tree", &json!({}), StartOptions::default())
        .await
        .unwrap();
    // tree waits for waiter, which waits for leaf, which waits for an event; busy runs.
    let pg = env.db.connect().await;
    eventually(Duration::from_secs(15), "the tree is in place", || async {
        let rows = pg
            .query("SELECT workflow, status FROM runs ORDER BY workflow", &[])
            .await
            .unwrap();
        let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        got == [
            ("busy".to_owned(), "running".to_owned()),
            ("leaf".to_owned(), "suspended".to_owned()),
            ("tree".to_owned(), "suspended".to_owned()),
            ("waiter".to_owned(), "suspended".to_owned()),
        ]
    })
    .await;
    let cancelled = client.cancel(&tree.id, "no longer needed").await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled, "a waiting parent ends at once");
    // The suspended descendants end at once; the running child when its worker stops it.
    eventually(Duration::from_secs(10), "every descendant is cancelled", || async {
        let n: i64 = pg
            .query_one("SELECT count(*) FROM runs WHERE status <> 'cancelled'", &[])
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
    let children = children_of(client, &tree.id).await;
    assert_eq!(children.len(), 2);
    for c in &children {
        let err = c.error.clone().unwrap();
        assert_eq!(err.kind, "Cancelled");
        assert!(err.message.contains(&tree.id), "{err:?}");
    }
    let leaf: String = pg
        .query_one("SELECT id::text FROM runs WHERE workflow = 'leaf'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history_types(server, &leaf).await.last().unwrap(), "run_cancelled");
    // Cancelling again changes nothing.
    assert_eq!(client.cancel(&tree.id, "").await.unwrap().status, RunStatus::Cancelled);
    worker.stop().await;
}

#[tokio::test]
async fn bad_child_starts_and_waits_are_refused_and_change_nothing() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let mut wf = server.workflows().await;
    let with_parent = |parent: &str| aiki_proto::v1::StartRunRequest {
        parent_run_id: parent.into(),
        ..start_req("child", json!({}))
    };
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        wf.start_run(with_parent(&unknown)).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        wf.start_run(with_parent("nope")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let done = client
        .start_run("x", &json!({}), StartOptions::default())
        .await
        .unwrap();
    client.cancel(&done.id, "").await.unwrap();
    let err = wf.start_run(with_parent(&done.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("cancelled"), "{}", err.message());
    // In a batch, the whole batch is refused.
    let err = wf
        .start_runs(aiki_proto::v1::StartRunsRequest {
            runs: vec![start_req("x", json!(1)), with_parent(&unknown)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let pg = env.db.connect().await;
    let n: i64 = pg.query_one("SELECT count(*) FROM runs", &[]).await.unwrap().get(0);
    assert_eq!(n, 1, "nothing was started");

    // A run may only wait for its own children.
    let a = wf
        .start_run(start_req("a", json!({})))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .id;
    let stranger = client
        .start_run(
            "b",
            &json!({}),
            StartOptions {
                queue: Some("elsewhere".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let w = RawWorker::register(server, &["default"]).await;
    let run = w.poll(1, Duration::from_secs(5)).await.remove(0);
    assert_eq!(run.run_id, a);
    let err = w
        .client
        .clone()
        .suspend_run(SuspendRunRequest {
            run_id: a.clone(),
            lease_token: run.lease_token.clone(),
            wait_key: "child:x#0".into(),
            wait_name: "b".into(),
            child_run_id: stranger.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(client.get(&a).await.unwrap().status, RunStatus::Running);
    // WakeRun cannot end a wait for a child.
    let child = wf.start_run(with_parent(&a)).await.unwrap().into_inner().run.unwrap();
    assert_eq!(child.parent_run_id, a);
    let resp = w
        .client
        .clone()
        .suspend_run(SuspendRunRequest {
            run_id: a.clone(),
            lease_token: run.lease_token.clone(),
            wait_key: format!("child:{}#0", child.id),
            wait_name: "child".into(),
            child_run_id: child.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status, aiki_proto::v1::RunStatus::Suspended as i32);
    let err = client.wake(&a).await.unwrap_err();
    assert!(
        matches!(&err, aiki::Error::FailedPrecondition(m) if m.contains(&child.id)),
        "{err:?}"
    );
    // The child's end wakes the parent with the child's outcome.
    client.cancel(&child.id, "stop").await.unwrap();
    let again = w.poll(10, Duration::from_secs(5)).await;
    let again = again
        .iter()
        .find(|r| r.run_id == a)
        .expect("the parent is leased again");
    let step = again
        .tasks
        .iter()
        .find(|t| t.key == format!("child:{}#0", child.id))
        .expect("the wait is recorded");
    let Some(aiki_proto::v1::task_result::Result::Output(v)) = &step.result else {
        panic!("no output")
    };
    let v = aiki_proto::value_to_json(v).unwrap();
    assert_eq!(v["status"], json!("cancelled"));
    assert_eq!(v["error"]["message"], json!("stop"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_queued_while_its_children_end_is_not_left_waiting() {
    // A child's end locks its parent's row (to write the parent's history). A parent queued
    // again at that moment (its first child had already ended) is skipped by a claim running
    // meanwhile; unless the child's end wakes the pollers again, the parent waits for the
    // worker's next poll, 30 s later. One family at a time, so that nothing else wakes them;
    // without that wake-up about one family in five was left waiting.
    let env = TestEnv::new().await;
    let builder = family_worker(&env.server, Arc::new(AtomicU32::new(0))).poll_wait(Duration::from_secs(30));
    let mut worker = env.worker(builder).await;
    for i in 0..10 {
        let parent = env
            .client
            .start_run("family", &json!({"i": i}), StartOptions::default())
            .await
            .unwrap();
        let seen: Vec<Value> = parent
            .result(Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("family {i} was left waiting: {e}"));
        assert_eq!(seen.len(), 3);
    }
    worker.stop().await;
}
