//! Events: a run waits for an event without holding a worker; events sent before it waits are
//! kept for it, events of one name are received in order, one per wait, a duplicate event key
//! is stored once, and a wait can time out.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use aiki::{RunStatus, StartOptions};
use aiki_proto::v1::{SendEventRequest, SuspendRunRequest, send_event_request};
use aiki_tests::{RawWorker, TestDb, TestEnv, TestServer, TestWorker, aiki_cli, eventually, history_types, start_req};
use aiki_worker::Context;
use serde_json::{Value, json};
use tonic::Code;

/// A worker serving "inbox": for each entry of its input's `waits` (a timeout in ms, or null
/// for none) it waits for a "ping" event and keeps what came ("timeout" when none did); an
/// entry "sleep" sleeps 1 s instead. It returns what it received. `waits` counts how many
/// times a wait was reached, across executions.
fn inbox_worker(server: &TestServer, reached: Arc<Mutex<u32>>) -> aiki_worker::WorkerBuilder {
    aiki_worker::WorkerBuilder::new(server.url())
        .slots(8)
        .register("inbox", move |ctx: Context, input: Value| {
            let reached = reached.clone();
            async move {
                let mut got = Vec::new();
                for wait in input["waits"].as_array().cloned().unwrap_or_default() {
                    if wait == "sleep" {
                        ctx.sleep("pause", Duration::from_secs(1)).await?;
                        continue;
                    }
                    *reached.lock().unwrap() += 1;
                    let timeout = wait.as_u64().map(Duration::from_millis);
                    let event: Option<Value> = ctx.wait_event("ping", timeout).await?;
                    got.push(event.unwrap_or_else(|| json!("timeout")));
                }
                Ok(got)
            }
        })
}

async fn waiting_for_event(client: &aiki::Client, id: &str) -> bool {
    let run = client.get(id).await.unwrap();
    run.status == RunStatus::Suspended && run.raw.wait_event == "ping"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_before_and_during_waits_arrive_in_order_and_a_duplicate_key_is_stored_once() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let run = client
        .start_run(
            "inbox",
            &json!({"waits": [60_000, 60_000, null, 60_000]}),
            StartOptions::key("inbox-1"),
        )
        .await
        .unwrap();

    // Before the run waits (no worker yet): kept, in order; the resend with the same key is not.
    let first = client
        .send_event(&run.id, "ping", &json!({"n": 1}), None)
        .await
        .unwrap();
    assert!(first.stored && !first.delivered);
    let second = client
        .send_event_by_key("inbox-1", "ping", &json!({"n": 2}), Some("second"))
        .await
        .unwrap();
    assert!(second.stored && !second.delivered);
    let resent = client
        .send_event(&run.id, "ping", &json!({"n": 2, "resent": true}), Some("second"))
        .await
        .unwrap();
    assert!(
        !resent.stored && !resent.delivered,
        "a duplicate event key is stored once"
    );
    // Another name is kept apart.
    client.send_event(&run.id, "other", &json!("x"), None).await.unwrap();

    let reached = Arc::new(Mutex::new(0));
    let builder = inbox_worker(server, reached.clone());
    let mut worker = env.worker(builder).await;

    // The first two waits take the kept events; the third waits, holding no lease.
    eventually(Duration::from_secs(10), "the run waits for its third event", || {
        waiting_for_event(client, &run.id)
    })
    .await;
    let waiting = client.get(&run.id).await.unwrap();
    assert!(
        waiting.raw.worker_id.is_empty() && waiting.raw.wake_at.is_none(),
        "no lease, no timeout"
    );
    // During the wait: delivered at once.
    let third = client
        .send_event(&run.id, "ping", &json!({"n": 3}), Some("third"))
        .await
        .unwrap();
    assert!(third.stored && third.delivered, "{third:?}");
    eventually(
        Duration::from_secs(10),
        "the run waits for its fourth event",
        || async { *reached.lock().unwrap() >= 4 && waiting_for_event(client, &run.id).await },
    )
    .await;
    client
        .send_event(&run.id, "ping", &json!({"n": 4}), None)
        .await
        .unwrap();

    let out: Vec<Value> = run.result(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        out,
        [json!({"n": 1}), json!({"n": 2}), json!({"n": 3}), json!({"n": 4})]
    );
    let history = history_types(server, &run.id).await;
    assert_eq!(
        history.iter().filter(|t| *t == "event_received").count(),
        5,
        "four pings and one other, the duplicate not: {history:?}"
    );
    assert!(
        history.iter().filter(|t| *t == "run_suspended").count() >= 2,
        "{history:?}"
    );
    assert!(history.iter().filter(|t| *t == "run_woken").count() >= 2, "{history:?}");

    // After the run ended: refused, and nothing is stored.
    let err = client
        .send_event(&run.id, "ping", &json!({"n": 5}), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, aiki::Error::FailedPrecondition(m) if m.contains("completed")),
        "{err:?}"
    );
    // A resend of an event the run had, after it ended, is still just a duplicate.
    let late = client
        .send_event(&run.id, "ping", &json!({"n": 3}), Some("third"))
        .await
        .unwrap();
    assert!(!late.stored);
    let pg = env.db.connect().await;
    let kept: i64 = pg
        .query_one("SELECT count(*) FROM run_inbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 5);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_times_out_and_an_event_sent_after_it_is_kept_for_the_next_wait() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let reached = Arc::new(Mutex::new(0));
    let builder = inbox_worker(server, reached.clone());
    let mut worker = env.worker(builder).await;

    let run = client
        .start_run(
            "inbox",
            &json!({"waits": [300, "sleep", 60_000]}),
            StartOptions::default(),
        )
        .await
        .unwrap();
    // The first wait times out; the run then sleeps. An event sent now, after that wait, is
    // not delivered (the run waits for a timer) but kept for the next wait.
    eventually(
        Duration::from_secs(10),
        "the run sleeps after its wait timed out",
        || async {
            let r = client.get(&run.id).await.unwrap();
            r.status == RunStatus::Suspended && r.raw.wait_event.is_empty()
        },
    )
    .await;
    let sent = client
        .send_event(&run.id, "ping", &json!({"late": true}), None)
        .await
        .unwrap();
    assert!(sent.stored && !sent.delivered, "{sent:?}");
    let out: Vec<Value> = run.result(Duration::from_secs(10)).await.unwrap();
    assert_eq!(out, [json!("timeout"), json!({"late": true})]);
    // Three suspensions: the wait that timed out, the sleep, and the wait that found the kept
    // event (and was queued again at once).
    let history = history_types(server, &run.id).await;
    assert_eq!(
        history.iter().filter(|t| *t == "run_suspended").count(),
        3,
        "{history:?}"
    );
    assert_eq!(history.iter().filter(|t| *t == "run_woken").count(), 3, "{history:?}");

    let mut history = client.history(&run.id).await.unwrap().into_iter().filter_map(|e| {
        let kind = aiki_proto::v1::EventType::try_from(e.r#type).ok()?;
        (kind == aiki_proto::v1::EventType::RunWoken).then(|| aiki_proto::value_to_json(e.details.as_ref()?).ok())?
    });
    assert_eq!(
        history.next(),
        Some(json!({"event": "ping", "timeout": true})),
        "the timeout is in the history"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_waiting_for_events_and_sleeping_through_a_server_restart_all_complete() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let client = server.client().await;
    let reached = Arc::new(Mutex::new(0));
    let mut worker = TestWorker::start(inbox_worker(&server, reached.clone())).await;
    let waits = [json!([null]), json!([1500]), json!(["sleep"])];
    let mut runs = Vec::new();
    for w in &waits {
        runs.push(
            client
                .start_run("inbox", &json!({"waits": w}), StartOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    let pg = db.connect().await;
    eventually(Duration::from_secs(10), "the three runs wait", || async {
        let n: i64 = pg
            .query_one("SELECT count(*) FROM runs WHERE status = 'suspended'", &[])
            .await
            .unwrap()
            .get(0);
        n == 3
    })
    .await;
    worker.stop().await;
    server.stop().await;

    let server = TestServer::start(&db).await;
    let client = server.client().await;
    let mut worker = TestWorker::start(inbox_worker(&server, reached.clone())).await;
    let sent = client
        .send_event(&runs[0], "ping", &json!("hello"), None)
        .await
        .unwrap();
    assert!(sent.delivered);
    let expected = [json!(["hello"]), json!(["timeout"]), json!([])];
    for (id, want) in runs.iter().zip(expected) {
        let run = client.wait(id, Duration::from_secs(15)).await.unwrap();
        assert_eq!(run.status, RunStatus::Completed, "{id}");
        assert_eq!(run.output, Some(want));
    }
    worker.stop().await;
}

#[tokio::test]
async fn bad_events_and_waits_are_refused_and_change_nothing() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let mut wf = server.workflows().await;
    let id = wf
        .start_run(start_req("waiter", json!({})))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .id;
    let send = |r: send_event_request::Ref, name: &str| SendEventRequest {
        namespace: String::new(),
        r#ref: Some(r),
        name: name.into(),
        payload: None,
        event_key: String::new(),
    };
    let unknown = uuid::Uuid::now_v7().to_string();
    for (req, code) in [
        (send(send_event_request::Ref::RunId(unknown), "e"), Code::NotFound),
        (
            send(send_event_request::Ref::IdempotencyKey("nobody".into()), "e"),
            Code::NotFound,
        ),
        (
            send(send_event_request::Ref::RunId("zzz".into()), "e"),
            Code::InvalidArgument,
        ),
        (
            send(send_event_request::Ref::RunId(id.clone()), ""),
            Code::InvalidArgument,
        ),
        (
            SendEventRequest {
                r#ref: None,
                ..send(send_event_request::Ref::RunId(id.clone()), "e")
            },
            Code::InvalidArgument,
        ),
        (
            SendEventRequest {
                payload: Some(aiki_proto::json_to_value(&json!("x".repeat(2 << 20)))),
                ..send(send_event_request::Ref::RunId(id.clone()), "e")
            },
            Code::ResourceExhausted,
        ),
    ] {
        let err = wf.send_event(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(!err.message().is_empty());
    }

    // Malformed waits: the run stays leased.
    let w = RawWorker::register(server, &["default"]).await;
    let run = w.poll(1, Duration::from_secs(5)).await.remove(0);
    let wait = |f: &dyn Fn(&mut SuspendRunRequest)| {
        let mut r = SuspendRunRequest {
            namespace: String::new(),
            run_id: id.clone(),
            lease_token: run.lease_token.clone(),
            wait_key: "event:e#0".into(),
            wait_name: "e".into(),
            wait_seq: 0,
            event: "e".into(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    for (req, code) in [
        (
            wait(&|r| r.sleep = Some(prost_types::Duration { seconds: -1, nanos: 0 })),
            Code::InvalidArgument,
        ),
        (
            wait(&|r| r.child_run_id = uuid::Uuid::now_v7().to_string()),
            Code::InvalidArgument,
        ),
        (wait(&|r| r.event = String::new()), Code::InvalidArgument),
        (
            wait(&|r| {
                r.event = String::new();
                r.child_run_id = id.clone();
            }),
            Code::InvalidArgument,
        ),
        (
            wait(&|r| {
                r.event = String::new();
                r.child_run_id = uuid::Uuid::now_v7().to_string();
            }),
            Code::NotFound,
        ),
    ] {
        let err = w.client.clone().suspend_run(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
    }
    assert_eq!(env.client.get(&id).await.unwrap().status, RunStatus::Running);
    let pg = env.db.connect().await;
    let kept: i64 = pg
        .query_one("SELECT count(*) FROM run_inbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 0);
    assert_eq!(history_types(server, &id).await, ["run_created", "run_leased"]);
}

#[tokio::test]
async fn the_cli_sends_events_and_wakes_a_waiting_run() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let mut wf = server.workflows().await;
    let id = wf
        .start_run(aiki_proto::v1::StartRunRequest {
            idempotency_key: "cli-events".into(),
            ..start_req("waiter", json!({}))
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .id;

    let (ok, out, err) = aiki_cli(server, &["run", "event", &id, "approved", "--data", r#"{"by":"ada"}"#]).await;
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        format!("event \"approved\" kept for run {id} until it waits for it")
    );
    let (ok, out, err) = aiki_cli(
        server,
        &[
            "run",
            "event",
            "--key",
            "cli-events",
            "approved",
            "--event-key",
            "a1",
            "-o",
            "json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["stored"].clone(), v["delivered"].clone()),
        (json!(true), json!(false))
    );
    let (ok, out, _) = aiki_cli(server, &["run", "event", &id, "approved", "--event-key", "a1"]).await;
    assert!(ok);
    assert!(out.contains("already has an event with this key"), "{out}");
    let (ok, _, err) = aiki_cli(server, &["run", "event", &id, "approved", "--data", "{nope"]).await;
    assert!(!ok && err.contains("--data"), "{err}");

    // A run waiting for an event with no timeout: `aiki run wake` ends the wait as a timeout.
    let w = RawWorker::register(server, &["default"]).await;
    let run = w.poll(1, Duration::from_secs(5)).await.remove(0);
    let suspended = w
        .client
        .clone()
        .suspend_run(SuspendRunRequest {
            run_id: id.clone(),
            lease_token: run.lease_token.clone(),
            wait_key: "event:never#0".into(),
            wait_name: "never".into(),
            event: "never".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(suspended.status, aiki_proto::v1::RunStatus::Suspended as i32);
    let (ok, out, _) = aiki_cli(server, &["run", "get", &id]).await;
    assert!(ok && out.contains("event \"never\""), "{out}");
    let (ok, out, err) = aiki_cli(server, &["run", "wake", &id]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("run {id} is queued"));
    let again = w.poll(1, Duration::from_secs(5)).await.remove(0);
    let step = again
        .tasks
        .iter()
        .find(|t| t.key == "event:never#0")
        .expect("the wait is recorded");
    let Some(aiki_proto::v1::task_result::Result::Output(v)) = &step.result else {
        panic!("no output")
    };
    assert_eq!(
        aiki_proto::value_to_json(v).unwrap(),
        json!({"timeout": true, "early": true})
    );
    assert_eq!(env.client.get(&id).await.unwrap().status, RunStatus::Running);
}
