//! Bad input gets the right status code, changes nothing, and the server keeps serving.

use std::time::Duration;

use aiki_proto::v1::{
    CancelRunRequest, CompleteRunRequest, FailRunRequest, GetRunHistoryRequest, GetRunRequest, GetRunResultRequest,
    HeartbeatRequest, Lease, ListRunsRequest, PollTasksRequest, RecordTaskRequest, RegisterWorkerRequest, RetryPolicy,
    StartRunRequest, StartRunsRequest, TaskResult, WatchRunRequest, get_run_request,
};
use aiki_tests::{RawWorker, TestDb, TestServer, start_req};
use prost_types::{Value, value::Kind};
use serde_json::json;
use tonic::Code;

fn check<T: std::fmt::Debug>(what: &str, r: Result<tonic::Response<T>, tonic::Status>, code: Code) {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            assert!(!s.message().is_empty(), "{what}: the error says what is wrong");
        }
    }
}

fn d(ms: u64) -> Option<prost_types::Duration> {
    Some(aiki_proto::duration_to_proto(Duration::from_millis(ms)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let w = RawWorker::register(&server, &["default"]).await;
    let mut wk = w.client.clone();
    let unknown = uuid::Uuid::now_v7().to_string();

    // Starting runs.
    check(
        "empty workflow",
        wf.start_run(start_req("", json!({}))).await,
        Code::InvalidArgument,
    );
    check(
        "overlong workflow",
        wf.start_run(start_req(&"w".repeat(129), json!({}))).await,
        Code::InvalidArgument,
    );
    check(
        "control characters",
        wf.start_run(start_req("a\nb", json!({}))).await,
        Code::InvalidArgument,
    );
    let mut nan = start_req("w", json!({}));
    nan.input = Some(Value {
        kind: Some(Kind::NumberValue(f64::NAN)),
    });
    check("NaN is not JSON", wf.start_run(nan).await, Code::InvalidArgument);
    let big = start_req("w", json!({"blob": "x".repeat(3 * 1024 * 1024)}));
    check("oversized input", wf.start_run(big).await, Code::ResourceExhausted);
    check(
        "NUL in a string",
        wf.start_run(start_req("w", json!({"s": "a\u{0}b"}))).await,
        Code::InvalidArgument,
    );
    let mut r = start_req("w", json!({}));
    r.priority = 5000;
    check("priority out of range", wf.start_run(r).await, Code::InvalidArgument);
    let mut r = start_req("w", json!({}));
    r.conflict_policy = 9;
    check("unknown conflict policy", wf.start_run(r).await, Code::InvalidArgument);
    let mut r = start_req("w", json!({}));
    r.delay = Some(prost_types::Duration { seconds: -5, nanos: 0 });
    check("negative delay", wf.start_run(r).await, Code::InvalidArgument);
    for (what, policy) in [
        (
            "coefficient below 1",
            RetryPolicy {
                backoff_coefficient: 0.5,
                ..Default::default()
            },
        ),
        (
            "too many attempts",
            RetryPolicy {
                max_attempts: 5000,
                ..Default::default()
            },
        ),
        (
            "max below initial",
            RetryPolicy {
                initial_interval: d(5000),
                max_interval: d(1000),
                ..Default::default()
            },
        ),
    ] {
        let mut r = start_req("w", json!({}));
        r.retry_policy = Some(policy);
        check(what, wf.start_run(r).await, Code::InvalidArgument);
    }
    check(
        "empty batch",
        wf.start_runs(StartRunsRequest { runs: vec![] }).await,
        Code::InvalidArgument,
    );
    let runs: Vec<StartRunRequest> = (0..1001).map(|i| start_req("w", json!(i))).collect();
    check(
        "batch too large",
        wf.start_runs(StartRunsRequest { runs }).await,
        Code::InvalidArgument,
    );
    let runs = vec![start_req("w", json!(1)), start_req("", json!(2))];
    check(
        "one bad entry",
        wf.start_runs(StartRunsRequest { runs }).await,
        Code::InvalidArgument,
    );

    // Reading runs.
    let get = |r| GetRunRequest {
        namespace: String::new(),
        r#ref: r,
    };
    check(
        "unknown run",
        wf.get_run(get(Some(get_run_request::Ref::RunId(unknown.clone()))))
            .await,
        Code::NotFound,
    );
    check(
        "not a uuid",
        wf.get_run(get(Some(get_run_request::Ref::RunId("42".into())))).await,
        Code::InvalidArgument,
    );
    check(
        "unknown key",
        wf.get_run(get(Some(get_run_request::Ref::IdempotencyKey("nope".into()))))
            .await,
        Code::NotFound,
    );
    check("no reference", wf.get_run(get(None)).await, Code::InvalidArgument);
    let res = GetRunResultRequest {
        namespace: String::new(),
        run_id: unknown.clone(),
        timeout: d(3_600_000),
    };
    check("wait too long", wf.get_run_result(res).await, Code::InvalidArgument);
    let res = GetRunResultRequest {
        namespace: String::new(),
        run_id: unknown.clone(),
        timeout: None,
    };
    check("result of unknown run", wf.get_run_result(res).await, Code::NotFound);
    let list = ListRunsRequest {
        page_size: 5000,
        ..Default::default()
    };
    check("page too large", wf.list_runs(list).await, Code::InvalidArgument);
    let list = ListRunsRequest {
        page_token: "garbage".into(),
        ..Default::default()
    };
    check("bad page token", wf.list_runs(list).await, Code::InvalidArgument);
    let list = ListRunsRequest {
        statuses: vec![99],
        ..Default::default()
    };
    check("unknown status", wf.list_runs(list).await, Code::InvalidArgument);
    let cancel = CancelRunRequest {
        namespace: String::new(),
        run_id: unknown.clone(),
        reason: String::new(),
    };
    check("cancel unknown run", wf.cancel_run(cancel).await, Code::NotFound);
    let hist = GetRunHistoryRequest {
        namespace: String::new(),
        run_id: unknown.clone(),
        after_seq: 0,
    };
    check("history of unknown run", wf.get_run_history(hist).await, Code::NotFound);
    let watch = WatchRunRequest {
        namespace: String::new(),
        run_id: unknown.clone(),
        after_seq: 0,
    };
    check(
        "watch unknown run",
        wf.watch_run(watch).await.map(|_| tonic::Response::new(())),
        Code::NotFound,
    );

    // The worker protocol.
    let reg = RegisterWorkerRequest {
        queues: vec![],
        slots: 1,
        ..Default::default()
    };
    check("no queues", wk.register_worker(reg).await, Code::InvalidArgument);
    let some_workflow = vec![aiki_proto::v1::WorkflowRef {
        name: "w".into(),
        version: String::new(),
    }];
    let reg = RegisterWorkerRequest {
        queues: vec!["q".into()],
        workflows: some_workflow.clone(),
        slots: 0,
        ..Default::default()
    };
    check("no slots", wk.register_worker(reg).await, Code::InvalidArgument);
    let reg = RegisterWorkerRequest {
        queues: vec!["q".into()],
        slots: 1,
        ..Default::default()
    };
    let e = wk.register_worker(reg).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "no workflows: {}", e.message());
    assert!(e.message().contains("1 to 1000 workflows"), "{}", e.message());
    let poll = |worker: &str, max| PollTasksRequest {
        namespace: String::new(),
        worker_id: worker.into(),
        queues: vec![],
        max_runs: max,
        wait: None,
    };
    check("unknown worker", wk.poll_tasks(poll(&unknown, 1)).await, Code::NotFound);
    check("max_runs 0", wk.poll_tasks(poll(&w.id, 0)).await, Code::InvalidArgument);
    let mut other_queue = poll(&w.id, 1);
    other_queue.queues = vec!["not-registered".into()];
    check(
        "a queue not registered",
        wk.poll_tasks(other_queue).await,
        Code::InvalidArgument,
    );
    let hb = HeartbeatRequest {
        namespace: String::new(),
        worker_id: w.id.clone(),
        leases: vec![Lease {
            run_id: unknown.clone(),
            lease_token: "not-a-token".into(),
        }],
    };
    check("malformed lease token", wk.heartbeat(hb).await, Code::InvalidArgument);

    // Reports under a wrong lease.
    let id = aiki_tests::start_id(&mut wf, start_req("w", json!({"ok": true}))).await;
    let lease = w.poll(1, Duration::ZERO).await.pop().unwrap();
    let wrong = uuid::Uuid::new_v4().to_string();
    let task = aiki_tests::task_output("k", "t", 0, json!(1));
    let record = |token: &str, task: Option<TaskResult>| RecordTaskRequest {
        namespace: String::new(),
        run_id: id.clone(),
        lease_token: token.into(),
        task,
    };
    check(
        "record under a wrong token",
        wk.record_task(record(&wrong, Some(task.clone()))).await,
        Code::FailedPrecondition,
    );
    check(
        "record without a task",
        wk.record_task(record(&lease.lease_token, None)).await,
        Code::InvalidArgument,
    );
    let mut no_result = task.clone();
    no_result.result = None;
    check(
        "record without a result",
        wk.record_task(record(&lease.lease_token, Some(no_result))).await,
        Code::InvalidArgument,
    );
    let complete = |run: &str, token: &str, output| CompleteRunRequest {
        namespace: String::new(),
        run_id: run.into(),
        lease_token: token.into(),
        output,
        ..Default::default()
    };
    check(
        "complete under a wrong token",
        wk.complete_run(complete(&id, &wrong, None)).await,
        Code::FailedPrecondition,
    );
    check(
        "complete an unknown run",
        wk.complete_run(complete(&unknown, &wrong, None)).await,
        Code::NotFound,
    );
    let huge = Some(aiki_proto::json_to_value(&json!("y".repeat(3 * 1024 * 1024))));
    check(
        "oversized output",
        wk.complete_run(complete(&id, &lease.lease_token, huge)).await,
        Code::ResourceExhausted,
    );
    let fail = FailRunRequest {
        run_id: id.clone(),
        lease_token: lease.lease_token.clone(),
        ..Default::default()
    };
    check("fail without an error", wk.fail_run(fail).await, Code::InvalidArgument);

    // Nothing changed, and the server still serves.
    let pg = db.connect().await;
    let n: i64 = pg.query_one("SELECT count(*) FROM runs", &[]).await.unwrap().get(0);
    assert_eq!(n, 1, "no bad start created a run");
    let tasks: i64 = pg
        .query_one("SELECT count(*) FROM task_results", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tasks, 0, "no refused report recorded a task");
    let status: String = pg.query_one("SELECT status FROM runs", &[]).await.unwrap().get(0);
    assert_eq!(status, "running", "the run is untouched by refused reports");
    wk.complete_run(complete(
        &id,
        &lease.lease_token,
        Some(aiki_proto::json_to_value(&json!("done"))),
    ))
    .await
    .expect("the real lease holder still completes");
    assert!(
        wf.start_run(start_req("w", json!({})))
            .await
            .unwrap()
            .into_inner()
            .created
    );
}

/// `depth` arrays inside each other around `1`.
fn nested(depth: usize) -> serde_json::Value {
    (0..depth).fold(json!(1), |v, _| serde_json::Value::Array(vec![v]))
}

/// Sends `message` (the bytes of a protobuf message, or anything else) as the one gRPC frame of
/// a call to `path`, declaring `declared` bytes in the frame's header; answers the call's status.
async fn raw_call(server: &TestServer, path: &str, message: &[u8], declared: u32) -> tonic::Status {
    let mut body = vec![0u8];
    body.extend_from_slice(&declared.to_be_bytes());
    body.extend_from_slice(message);
    let req = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://{}{path}", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(
            body,
        ))))
        .unwrap();
    let resp = tower::ServiceExt::oneshot(server.channel().await, req).await.unwrap();
    // A refusal is a trailers-only answer: the status is in the headers.
    tonic::Status::from_header_map(resp.headers()).expect("a status in the answer's headers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_too_deep_requests_are_invalid_argument() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let start = "/aiki.v1.WorkflowService/StartRun";

    let garbage = raw_call(&server, start, &[0xff; 16], 16).await;
    let bad_utf8 = raw_call(&server, start, &[0x12, 2, 0xff, 0xfe], 4).await;
    let truncated = raw_call(&server, start, b"abc", 100).await;
    for (what, status) in [
        ("garbage", garbage),
        ("bad UTF-8", bad_utf8),
        ("a truncated frame", truncated),
    ] {
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {}", status.message());
        assert!(
            status.message().starts_with("the request is not a valid message"),
            "{what}: {}",
            status.message()
        );
    }

    // Past the decoder's own limit (about 49 levels), and past Aiki's (32) but decodable: both
    // refused, both naming the limit.
    for depth in [60, aiki_proto::MAX_PAYLOAD_DEPTH + 1] {
        let e = wf.start_run(start_req("w", nested(depth))).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{depth} deep: {}", e.message());
        assert!(
            e.message().contains("at most 32 levels"),
            "{depth} deep: {}",
            e.message()
        );
    }
    wf.start_run(start_req("w", nested(aiki_proto::MAX_PAYLOAD_DEPTH)))
        .await
        .expect("a payload at the limit is taken");

    // Created before 1970 by way of negative nanos.
    let list = aiki_proto::v1::ListRunsRequest {
        created_after: Some(prost_types::Timestamp { seconds: 5, nanos: -1 }),
        ..Default::default()
    };
    let e = wf.list_runs(list).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("nanos"), "{}", e.message());

    // Nothing was stored but the one valid run, and the server still serves.
    let n: i64 = db
        .connect()
        .await
        .query_one("SELECT count(*) FROM runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// An error message quotes at most a short prefix of what the client sent: a 10 MB string in a
/// UUID field or in a poll's queues costs the server no 10 MB message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_quote_a_short_prefix_of_a_huge_input() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let w = RawWorker::register(&server, &["default"]).await;
    let huge = "x".repeat(10 * 1024 * 1024);
    let get = wf
        .get_run(GetRunRequest {
            namespace: String::new(),
            r#ref: Some(get_run_request::Ref::RunId(huge.clone())),
        })
        .await
        .unwrap_err();
    let poll = w
        .client
        .clone()
        .poll_tasks(PollTasksRequest {
            namespace: String::new(),
            worker_id: w.id.clone(),
            queues: vec![huge],
            max_runs: 1,
            wait: None,
        })
        .await
        .unwrap_err();
    for (what, e) in [("a UUID field", get), ("a poll's queue", poll)] {
        assert_eq!(e.code(), Code::InvalidArgument, "{what}");
        assert!(
            e.message().len() < 300,
            "{what}: a message of {} bytes",
            e.message().len()
        );
    }
}
