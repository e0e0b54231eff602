//! API keys: every request is authenticated (health checks excepted), each role can do exactly
//! what its table says in the namespaces of its key, a worker id is bound to the key that
//! registered it, a revoked key is refused within a second on every replica, and a key that
//! asks too often is told when to come back.

use std::time::{Duration, Instant};

use aiki::{ApiKey, AuthChannel};
use aiki_proto::v1::{
    self, CancelRunRequest, CompleteRunRequest, CreateApiKeyRequest, FailRunRequest, GetRunHistoryRequest,
    GetRunRequest, GetRunResultRequest, HeartbeatRequest, ListApiKeysRequest, ListQueuesRequest, ListRunsRequest,
    ListWorkersRequest, ListWorkflowsRequest, PauseRunRequest, PollTasksRequest, RecordTaskRequest,
    RegisterWorkerRequest, ReleaseRunRequest, ReportRequest, ResumeRunRequest, RevokeApiKeyRequest, RunReport,
    SendEventRequest, StartRunsRequest, SuspendRunRequest, WakeRunRequest, WatchRunRequest, WorkflowRef,
    admin_service_client::AdminServiceClient, get_run_request, report_result, run_report, send_event_request,
    worker_service_client::WorkerServiceClient, workflow_service_client::WorkflowServiceClient,
};
use aiki_tests::{Config, TestDb, TestServer, aiki_cli, start_req, task_output};
use serde_json::json;
use tonic::{Code, Status};

/// The bootstrap admin key of these tests' servers.
const ADMIN: &str = "test-bootstrap-admin-key-0123456789abcdef";

fn keyed_config(db: &TestDb) -> Config {
    Config {
        auth: true,
        admin_key: Some(aiki_server::config::Secret(ADMIN.into())),
        ..Config::for_test(&db.url)
    }
}

/// The three services' clients, sending `key` (none if empty).
#[derive(Clone)]
struct Clients {
    workflows: WorkflowServiceClient<AuthChannel>,
    workers: WorkerServiceClient<AuthChannel>,
    admin: AdminServiceClient<AuthChannel>,
}

async fn clients(server: &TestServer, key: &str) -> Clients {
    let channel = server.channel().await;
    let key = ApiKey::new(key).unwrap();
    Clients {
        workflows: WorkflowServiceClient::with_interceptor(channel.clone(), key.clone()),
        workers: WorkerServiceClient::with_interceptor(channel.clone(), key.clone()),
        admin: AdminServiceClient::with_interceptor(channel, key),
    }
}

/// Makes a key through the bootstrap admin; answers its secret and its id.
async fn make_key(server: &TestServer, role: &str, namespaces: &[&str], rate_limit: u32) -> (String, String) {
    let resp = clients(server, ADMIN)
        .await
        .admin
        .create_api_key(CreateApiKeyRequest {
            name: format!("{role} of {}", namespaces.join(",")),
            role: role.into(),
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            rate_limit,
        })
        .await
        .expect("create a key")
        .into_inner();
    (resp.secret, resp.key.unwrap().id)
}

fn code<T>(r: Result<tonic::Response<T>, Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Every RPC of the three services, by name, each called once in namespace `ns` with a request
/// that passes the checks of the message alone (so that what answers is authorization, or what
/// comes after it). Answers the code of each.
async fn call_every_rpc(c: &Clients, ns: &str) -> Vec<(&'static str, Code)> {
    let ns = ns.to_owned();
    let id = uuid::Uuid::now_v7().to_string();
    let token = uuid::Uuid::new_v4().to_string();
    let (mut wf, mut wk, mut ad) = (c.workflows.clone(), c.workers.clone(), c.admin.clone());
    let mut start = start_req("wf", json!({}));
    start.namespace = ns.clone();
    let mut child = start.clone();
    child.parent_run_id = uuid::Uuid::now_v7().to_string();
    let complete = CompleteRunRequest {
        namespace: ns.clone(),
        run_id: id.clone(),
        lease_token: token.clone(),
        output: Some(aiki_proto::json_to_value(&json!(1))),
        tasks: Vec::new(),
    };
    let mut out = vec![
        ("StartRun", code(wf.start_run(start.clone()).await)),
        ("StartRun(child)", code(wf.start_run(child).await)),
        (
            "StartRuns",
            code(wf.start_runs(StartRunsRequest { runs: vec![start] }).await),
        ),
        (
            "GetRun",
            code(
                wf.get_run(GetRunRequest {
                    namespace: ns.clone(),
                    r#ref: Some(get_run_request::Ref::RunId(id.clone())),
                })
                .await,
            ),
        ),
        (
            "GetRunResult",
            code(
                wf.get_run_result(GetRunResultRequest {
                    namespace: ns.clone(),
                    run_id: id.clone(),
                    timeout: None,
                })
                .await,
            ),
        ),
        (
            "ListRuns",
            code(
                wf.list_runs(ListRunsRequest {
                    namespace: ns.clone(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "CancelRun",
            code(
                wf.cancel_run(CancelRunRequest {
                    namespace: ns.clone(),
                    run_id: id.clone(),
                    reason: String::new(),
                })
                .await,
            ),
        ),
        (
            "PauseRun",
            code(
                wf.pause_run(PauseRunRequest {
                    namespace: ns.clone(),
                    run_id: id.clone(),
                    reason: String::new(),
                })
                .await,
            ),
        ),
        (
            "ResumeRun",
            code(
                wf.resume_run(ResumeRunRequest {
                    namespace: ns.clone(),
                    run_id: id.clone(),
                })
                .await,
            ),
        ),
        (
            "WakeRun",
            code(
                wf.wake_run(WakeRunRequest {
                    namespace: ns.clone(),
                    run_id: id.clone(),
                })
                .await,
            ),
        ),
        (
            "SendEvent",
            code(
                wf.send_event(SendEventRequest {
                    namespace: ns.clone(),
                    r#ref: Some(send_event_request::Ref::RunId(id.clone())),
                    name: "e".into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "GetRunHistory",
            code(
                wf.get_run_history(GetRunHistoryRequest {
                    namespace: ns.clone(),
                    run_id: id.clone(),
                    after_seq: 0,
                })
                .await,
            ),
        ),
    ];
    let watch = match wf
        .watch_run(WatchRunRequest {
            namespace: ns.clone(),
            run_id: id.clone(),
            after_seq: 0,
        })
        .await
    {
        Err(s) => s.code(),
        Ok(stream) => match stream.into_inner().message().await {
            Err(s) => s.code(),
            Ok(_) => Code::Ok,
        },
    };
    out.push(("WatchRun", watch));
    out.extend([
        (
            "RegisterWorker",
            code(
                wk.register_worker(RegisterWorkerRequest {
                    namespace: ns.clone(),
                    identity: "w".into(),
                    host: "h".into(),
                    workflows: vec![WorkflowRef {
                        name: "wf".into(),
                        version: String::new(),
                    }],
                    queues: vec!["default".into()],
                    slots: 1,
                })
                .await,
            ),
        ),
        (
            "PollTasks",
            code(
                wk.poll_tasks(PollTasksRequest {
                    namespace: ns.clone(),
                    worker_id: id.clone(),
                    queues: Vec::new(),
                    max_runs: 1,
                    wait: None,
                })
                .await,
            ),
        ),
        (
            "Heartbeat",
            code(
                wk.heartbeat(HeartbeatRequest {
                    namespace: ns.clone(),
                    worker_id: id.clone(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "RecordTask",
            code(
                wk.record_task(RecordTaskRequest {
                    namespace: ns.clone(),
                    run_id: id.clone(),
                    lease_token: token.clone(),
                    task: Some(task_output("k", "t", 0, json!(1))),
                })
                .await,
            ),
        ),
        ("CompleteRun", code(wk.complete_run(complete.clone()).await)),
        (
            "FailRun",
            code(
                wk.fail_run(FailRunRequest {
                    namespace: ns.clone(),
                    run_id: id.clone(),
                    lease_token: token.clone(),
                    error: Some(v1::RunError {
                        r#type: "E".into(),
                        message: "m".into(),
                        details: None,
                    }),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "ReleaseRun",
            code(
                wk.release_run(ReleaseRunRequest {
                    namespace: ns.clone(),
                    run_id: id.clone(),
                    lease_token: token.clone(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "SuspendRun",
            code(
                wk.suspend_run(SuspendRunRequest {
                    namespace: ns.clone(),
                    run_id: id.clone(),
                    lease_token: token.clone(),
                    wait_key: "sleep:s#0".into(),
                    wait_name: "s".into(),
                    wait_seq: 0,
                    sleep: Some(aiki_proto::duration_to_proto(Duration::from_secs(1))),
                    ..Default::default()
                })
                .await,
            ),
        ),
    ]);
    // A batch of reports answers each report's refusal in its result.
    let report = match wk
        .report(ReportRequest {
            reports: vec![RunReport {
                report: Some(run_report::Report::CompleteRun(complete)),
            }],
        })
        .await
    {
        Err(s) => s.code(),
        Ok(r) => match r.into_inner().results.pop().and_then(|r| r.result) {
            Some(report_result::Result::Error(e)) => Code::from_i32(e.code),
            _ => Code::Ok,
        },
    };
    out.push(("Report", report));
    out.extend([
        (
            "ListWorkers",
            code(ad.list_workers(ListWorkersRequest { namespace: ns.clone() }).await),
        ),
        (
            "ListQueues",
            code(ad.list_queues(ListQueuesRequest { namespace: ns.clone() }).await),
        ),
        (
            "ListWorkflows",
            code(ad.list_workflows(ListWorkflowsRequest { namespace: ns.clone() }).await),
        ),
        (
            "CreateApiKey",
            code(
                ad.create_api_key(CreateApiKeyRequest {
                    name: "made in a test".into(),
                    role: "read".into(),
                    namespaces: vec![ns.clone()],
                    rate_limit: 0,
                })
                .await,
            ),
        ),
        (
            "ListApiKeys",
            code(ad.list_api_keys(ListApiKeysRequest { include_revoked: false }).await),
        ),
        (
            "RevokeApiKey",
            code(ad.revoke_api_key(RevokeApiKeyRequest { id: id.clone() }).await),
        ),
    ]);
    out
}

/// Checks that `answers` name every method of the three services, as the protocol's
/// descriptor lists them: a new RPC cannot be left out of these tests.
fn assert_every_rpc(answers: &[(&str, Code)]) {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(aiki_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut methods: Vec<String> = set
        .file
        .iter()
        .flat_map(|f| &f.service)
        .filter(|s| ["WorkflowService", "WorkerService", "AdminService"].contains(&s.name()))
        .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
        .collect();
    let mut called: Vec<String> = answers
        .iter()
        .map(|(rpc, _)| rpc.trim_end_matches("(child)").to_owned())
        .collect();
    methods.sort();
    called.sort();
    called.dedup();
    assert_eq!(called, methods, "every RPC is called");
}

/// The role table, as the README states it: the RPCs each role may call.
fn allowed(role: &str, rpc: &str) -> bool {
    const READ: &[&str] = &["GetRun", "GetRunResult", "ListRuns", "GetRunHistory", "WatchRun"];
    const CLIENT: &[&str] = &[
        "StartRun",
        "StartRun(child)",
        "StartRuns",
        "CancelRun",
        "PauseRun",
        "ResumeRun",
        "WakeRun",
        "SendEvent",
    ];
    const WORKER: &[&str] = &[
        "RegisterWorker",
        "PollTasks",
        "Heartbeat",
        "RecordTask",
        "CompleteRun",
        "FailRun",
        "ReleaseRun",
        "SuspendRun",
        "Report",
        "StartRun(child)",
    ];
    match role {
        "read" => READ.contains(&rpc),
        "client" => READ.contains(&rpc) || CLIENT.contains(&rpc),
        "worker" => WORKER.contains(&rpc),
        "admin" => true,
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_refuses_a_request_without_a_valid_key_but_health() {
    let db = TestDb::new().await;
    let server = TestServer::start_with(keyed_config(&db)).await;
    let bogus = format!("aiki_{}{}", uuid::Uuid::new_v4().simple(), "ab".repeat(32));
    for key in ["", "not-a-key", bogus.as_str()] {
        let answers = call_every_rpc(&clients(&server, key).await, "default").await;
        assert_every_rpc(&answers);
        for (rpc, code) in answers {
            assert_eq!(code, Code::Unauthenticated, "{rpc} with key {key:?}");
        }
    }
    // The message says what to do.
    let err = clients(&server, "")
        .await
        .workflows
        .list_runs(ListRunsRequest::default())
        .await
        .unwrap_err();
    assert!(err.message().contains("authorization: Bearer"), "{}", err.message());
    // Reflection too.
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let refused = match reflection.server_reflection_info(futures::stream::iter([req])).await {
        Err(s) => s.code(),
        Ok(s) => s
            .into_inner()
            .message()
            .await
            .err()
            .map(|s| s.code())
            .unwrap_or(Code::Ok),
    };
    assert_eq!(refused, Code::Unauthenticated, "reflection");
    // Health checks need no key: load balancers and orchestrators ask without one.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "aiki.v1.WorkflowService".into(),
        })
        .await
        .expect("health without a key")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_can_do_exactly_what_its_table_says() {
    let db = TestDb::new().await;
    let server = TestServer::start_with(keyed_config(&db)).await;
    for role in ["read", "client", "worker", "admin"] {
        let (key, _) = make_key(&server, role, &["team-a"], 0).await;
        let answers = call_every_rpc(&clients(&server, &key).await, "team-a").await;
        assert_every_rpc(&answers);
        for (rpc, code) in answers {
            if allowed(role, rpc) {
                assert!(
                    !matches!(code, Code::PermissionDenied | Code::Unauthenticated | Code::Internal),
                    "role {role} may call {rpc}, got {code:?}"
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "role {role} may not call {rpc}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_one_namespace_can_neither_touch_nor_see_another() {
    let db = TestDb::new().await;
    let server = TestServer::start_with(keyed_config(&db)).await;
    let (key_a, _) = make_key(&server, "admin", &["a"], 0).await;
    let (key_b, _) = make_key(&server, "client", &["b"], 0).await;
    // A run of B.
    let mut req = start_req("wf", json!({"secret": "of b"}));
    req.namespace = "b".into();
    req.idempotency_key = "b-run".into();
    let b = clients(&server, &key_b).await;
    let run_b = b
        .workflows
        .clone()
        .start_run(req)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .id;
    let a = clients(&server, &key_a).await;
    // Every RPC in namespace B is denied to A's key (even an admin of A's).
    for (rpc, code) in call_every_rpc(&a, "b").await {
        if rpc == "ListApiKeys" || rpc == "RevokeApiKey" {
            continue; // not about a namespace (checked below)
        }
        assert_eq!(code, Code::PermissionDenied, "{rpc} in b with a key of a");
    }
    // A run of B that exists and one that does not get the same answer: nothing leaks.
    let denied = |id: &str| {
        let mut wf = a.workflows.clone();
        let id = id.to_owned();
        async move {
            wf.get_run(GetRunRequest {
                namespace: "b".into(),
                r#ref: Some(get_run_request::Ref::RunId(id)),
            })
            .await
            .unwrap_err()
        }
    };
    let (real, made_up) = (denied(&run_b).await, denied(&uuid::Uuid::now_v7().to_string()).await);
    assert_eq!(real.code(), made_up.code());
    assert_eq!(
        real.message(),
        made_up.message(),
        "the same words whether the run exists or not"
    );
    // By idempotency key too.
    let by_key = a
        .workflows
        .clone()
        .get_run(GetRunRequest {
            namespace: "b".into(),
            r#ref: Some(get_run_request::Ref::IdempotencyKey("b-run".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(by_key.code(), Code::PermissionDenied);
    // In its own namespace, A finds no trace of B's run.
    let in_a = a
        .workflows
        .clone()
        .get_run(GetRunRequest {
            namespace: "a".into(),
            r#ref: Some(get_run_request::Ref::RunId(run_b.clone())),
        })
        .await
        .unwrap_err();
    assert_eq!(in_a.code(), Code::NotFound);
    let listed = a
        .workflows
        .clone()
        .list_runs(ListRunsRequest {
            namespace: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert!(listed.is_empty(), "A lists none of B's runs");
    // A's admin cannot make keys for B, nor revoke B's.
    let (_, id_b) = make_key(&server, "read", &["b"], 0).await;
    let made = a
        .admin
        .clone()
        .create_api_key(CreateApiKeyRequest {
            name: "for b".into(),
            role: "admin".into(),
            namespaces: vec!["b".into()],
            rate_limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(made.code(), Code::PermissionDenied);
    let revoked = a
        .admin
        .clone()
        .revoke_api_key(RevokeApiKeyRequest { id: id_b.clone() })
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), Code::NotFound, "as if it did not exist");
    let keys = a
        .admin
        .clone()
        .list_api_keys(ListApiKeysRequest { include_revoked: true })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(keys.iter().all(|k| k.namespaces.contains(&"a".to_string())), "{keys:?}");
    assert!(keys.iter().all(|k| k.id != id_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_worker_id_and_lease_token_are_useless_to_another_worker_key() {
    let db = TestDb::new().await;
    let server = TestServer::start_with(keyed_config(&db)).await;
    let (client_key, _) = make_key(&server, "client", &["default"], 0).await;
    let (owner_key, owner_key_id) = make_key(&server, "worker", &["default"], 0).await;
    let (thief_key, _) = make_key(&server, "worker", &["default"], 0).await;
    let client = clients(&server, &client_key).await;
    let mut req = start_req("wf", json!({"n": 1}));
    req.idempotency_key = "stolen".into();
    let run_id = client
        .workflows
        .clone()
        .start_run(req)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .id;
    let owner = clients(&server, &owner_key).await;
    let register = RegisterWorkerRequest {
        namespace: String::new(),
        identity: "owner".into(),
        host: "h".into(),
        workflows: vec![WorkflowRef {
            name: "wf".into(),
            version: String::new(),
        }],
        queues: vec!["default".into()],
        slots: 1,
    };
    let worker_id = owner
        .workers
        .clone()
        .register_worker(register.clone())
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    // The worker is listed with the key it is bound to.
    let listed = clients(&server, ADMIN)
        .await
        .admin
        .list_workers(ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(listed[0].api_key_id, owner_key_id);
    let poll = |c: &Clients, worker: &str| {
        let mut wk = c.workers.clone();
        let req = PollTasksRequest {
            namespace: String::new(),
            worker_id: worker.to_owned(),
            queues: Vec::new(),
            max_runs: 1,
            wait: Some(aiki_proto::duration_to_proto(Duration::from_secs(5))),
        };
        async move { wk.poll_tasks(req).await }
    };
    let thief = clients(&server, &thief_key).await;
    // Before the owner polls, the thief tries to poll as the owner's worker: denied, and it
    // leases nothing.
    let stolen_poll = poll(&thief, &worker_id).await.unwrap_err();
    assert_eq!(stolen_poll.code(), Code::PermissionDenied, "{}", stolen_poll.message());
    let lease = poll(&owner, &worker_id)
        .await
        .unwrap()
        .into_inner()
        .runs
        .pop()
        .expect("the run");
    assert_eq!(lease.run_id, run_id);
    // With the worker id and the lease token (as if read from a log), everything is denied.
    let beat = thief
        .workers
        .clone()
        .heartbeat(HeartbeatRequest {
            namespace: String::new(),
            worker_id: worker_id.clone(),
            leases: vec![v1::Lease {
                run_id: run_id.clone(),
                lease_token: lease.lease_token.clone(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(beat.code(), Code::PermissionDenied);
    let forged = CompleteRunRequest {
        namespace: String::new(),
        run_id: run_id.clone(),
        lease_token: lease.lease_token.clone(),
        output: Some(aiki_proto::json_to_value(&json!("forged"))),
        tasks: Vec::new(),
    };
    let complete = thief.workers.clone().complete_run(forged.clone()).await.unwrap_err();
    assert_eq!(complete.code(), Code::PermissionDenied, "{}", complete.message());
    let record = thief
        .workers
        .clone()
        .record_task(RecordTaskRequest {
            namespace: String::new(),
            run_id: run_id.clone(),
            lease_token: lease.lease_token.clone(),
            task: Some(task_output("k", "t", 0, json!("forged"))),
        })
        .await
        .unwrap_err();
    assert_eq!(record.code(), Code::PermissionDenied);
    let fail = thief
        .workers
        .clone()
        .fail_run(FailRunRequest {
            namespace: String::new(),
            run_id: run_id.clone(),
            lease_token: lease.lease_token.clone(),
            error: Some(v1::RunError {
                r#type: "Forged".into(),
                message: "m".into(),
                details: None,
            }),
            non_retryable: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(fail.code(), Code::PermissionDenied);
    let batch = thief
        .workers
        .clone()
        .report(ReportRequest {
            reports: vec![RunReport {
                report: Some(run_report::Report::CompleteRun(forged)),
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(
        matches!(&batch[0].result, Some(report_result::Result::Error(e)) if e.code == Code::PermissionDenied as i32),
        "{batch:?}"
    );
    // A worker key starts children only of the runs its own workers hold.
    let child = |c: &Clients, key: &str| {
        let mut wf = c.workflows.clone();
        let mut req = start_req("wf", json!({}));
        req.parent_run_id = run_id.clone();
        req.idempotency_key = key.to_owned();
        async move { wf.start_run(req).await }
    };
    let foreign = child(&thief, "thief's child").await.unwrap_err();
    assert_eq!(foreign.code(), Code::PermissionDenied, "{}", foreign.message());
    child(&owner, "owner's child")
        .await
        .expect("a child of a run its worker holds");
    // The real worker's heartbeat and report still count, and its output is the result.
    let held = owner
        .workers
        .clone()
        .heartbeat(HeartbeatRequest {
            namespace: String::new(),
            worker_id: worker_id.clone(),
            leases: vec![v1::Lease {
                run_id: run_id.clone(),
                lease_token: lease.lease_token.clone(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(held.lost_run_ids.is_empty());
    owner
        .workers
        .clone()
        .complete_run(CompleteRunRequest {
            namespace: String::new(),
            run_id: run_id.clone(),
            lease_token: lease.lease_token,
            output: Some(aiki_proto::json_to_value(&json!("real"))),
            tasks: Vec::new(),
        })
        .await
        .unwrap();
    let run = client
        .workflows
        .clone()
        .get_run(GetRunRequest {
            namespace: String::new(),
            r#ref: Some(get_run_request::Ref::RunId(run_id)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        aiki_proto::value_to_json(run.output.as_ref().unwrap()).unwrap(),
        json!("real")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_within_a_second_by_every_replica() {
    let db = TestDb::new().await;
    let one = TestServer::start_with(keyed_config(&db)).await;
    let two = TestServer::start_with(keyed_config(&db)).await;
    let (key, id) = make_key(&one, "read", &["default"], 0).await;
    let (c1, c2) = (clients(&one, &key).await, clients(&two, &key).await);
    let list = |c: &Clients| {
        let mut wf = c.workflows.clone();
        async move { code(wf.list_runs(ListRunsRequest::default()).await) }
    };
    // Both replicas know the key (and cache it).
    assert_eq!(list(&c1).await, Code::Ok);
    assert_eq!(list(&c2).await, Code::Ok);
    clients(&one, ADMIN)
        .await
        .admin
        .revoke_api_key(RevokeApiKeyRequest { id })
        .await
        .unwrap();
    let revoked = Instant::now();
    // The replica it was revoked through refuses it at once.
    assert_eq!(list(&c1).await, Code::Unauthenticated);
    // The other within a second.
    loop {
        match list(&c2).await {
            Code::Unauthenticated => break,
            Code::Ok => assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "the other replica still took the key after {:?}",
                revoked.elapsed()
            ),
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = c2
        .workflows
        .clone()
        .list_runs(ListRunsRequest::default())
        .await
        .unwrap_err();
    assert!(err.message().contains("revoked"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_is_told_when_to_retry() {
    let db = TestDb::new().await;
    let server = TestServer::start_with(keyed_config(&db)).await;
    let (key, _) = make_key(&server, "read", &["default"], 5).await;
    let c = clients(&server, &key).await;
    let mut refused = None;
    for _ in 0..50 {
        if let Err(s) = c.workflows.clone().list_runs(ListRunsRequest::default()).await {
            refused = Some(s);
            break;
        }
    }
    let refused = refused.expect("50 requests at once exceed 5 a second");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("retry in"), "{}", refused.message());
    let pushback: u64 = refused
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("the retry delay")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&pushback), "{pushback}");
    // After the delay, the key is served again; another key was never limited.
    tokio::time::sleep(Duration::from_millis(pushback + 10)).await;
    assert_eq!(
        code(c.workflows.clone().list_runs(ListRunsRequest::default()).await),
        Code::Ok
    );
    let other = clients(&server, ADMIN).await;
    for _ in 0..50 {
        assert_eq!(
            code(other.workflows.clone().list_runs(ListRunsRequest::default()).await),
            Code::Ok
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refuses_a_public_address_without_tls_and_keys_unless_told_it_is_on_purpose() {
    let db = TestDb::new().await;
    let serve = |config: Config| async move {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(aiki_server::serve(config, listener, stop.clone()));
        // A server that starts runs until stopped; one that refuses returns at once.
        match tokio::time::timeout(Duration::from_secs(3), task).await {
            Ok(done) => Some(done.unwrap().unwrap_err().to_string()),
            Err(_) => {
                stop.cancel();
                None
            }
        }
    };
    let plain = serve(keyed_config(&db)).await.expect("refused without TLS");
    assert!(plain.contains("without TLS") && plain.contains("--insecure"), "{plain}");
    let insecure = Config {
        insecure: true,
        ..keyed_config(&db)
    };
    assert_eq!(serve(insecure).await, None, "--insecure starts it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_makes_lists_and_revokes_keys_and_the_sdk_and_worker_use_them() {
    let db = TestDb::new().await;
    let server = TestServer::start_with(keyed_config(&db)).await;
    let admin = ["--api-key", ADMIN];
    let (ok, secret, err) = aiki_cli(
        &server,
        &[&admin[..], &["keys", "create", "--role", "client", "-n", "shop"]].concat(),
    )
    .await;
    assert!(ok, "{err}");
    let secret = secret.trim().to_owned();
    assert!(secret.starts_with("aiki_") && secret.len() == 101, "{secret}");
    assert!(err.contains("not shown again"), "{err}");
    let (ok, worker_key, err) = aiki_cli(
        &server,
        &[
            &admin[..],
            &["keys", "create", "--role", "worker", "-n", "shop", "--name", "fleet"],
        ]
        .concat(),
    )
    .await;
    assert!(ok, "{err}");
    let worker_key = worker_key.trim().to_owned();
    let (ok, listed, err) = aiki_cli(&server, &[&admin[..], &["keys", "list", "-o", "json"]].concat()).await;
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["client key for shop", "fleet"]);
    assert!(
        !listed.to_string().contains(&secret[40..]),
        "the list never shows a secret"
    );
    // The CLI without a key is told how to give one.
    let (ok, _, err) = aiki_cli(&server, &["run", "list"]).await;
    assert!(!ok && err.contains("AIKI_API_KEY"), "{err}");
    // The worker runtime with the worker key, the SDK with the client key: a run end to end,
    // with a child started from the workflow.
    let worker = aiki_tests::TestWorker::start(
        aiki_worker::WorkerBuilder::new(server.url())
            .namespace("shop")
            .api_key(&worker_key)
            .unwrap()
            .register("child", |_ctx, n: u64| async move { Ok(n * 2) })
            .register("parent", |ctx, n: u64| async move {
                let child = ctx.start_child("child", &n, Default::default()).await?;
                let doubled: u64 = child
                    .result()
                    .await?
                    .map_err(|e| aiki_worker::WorkflowError::new("Child", e.message))?;
                Ok(doubled)
            }),
    )
    .await;
    let client = server
        .client()
        .await
        .with_api_key(&secret)
        .unwrap()
        .with_namespace("shop");
    let run = client.start_run("parent", &21, Default::default()).await.unwrap();
    let out: u64 = run.result(Duration::from_secs(30)).await.unwrap();
    assert_eq!(out, 42);
    // Revoked through the CLI, the client's key stops working.
    let id = listed[0]["id"].as_str().unwrap();
    let (ok, _, err) = aiki_cli(&server, &[&admin[..], &["keys", "revoke", id]].concat()).await;
    assert!(ok, "{err}");
    match client.start_run("parent", &1, Default::default()).await {
        Err(aiki::Error::Unauthenticated(m)) => assert!(m.contains("revoked"), "{m}"),
        other => panic!("a revoked key must be refused, got {other:?}"),
    }
    drop(worker);
}

/// The (type, name of the key that did it) of each event of a run's history.
async fn actors(c: &Clients, run_id: &str) -> Vec<(String, String)> {
    c.workflows
        .clone()
        .get_run_history(GetRunHistoryRequest {
            namespace: String::new(),
            run_id: run_id.to_owned(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| {
            let kind = v1::EventType::try_from(e.r#type).unwrap().as_str_name().to_lowercase();
            (kind.trim_start_matches("event_type_").to_owned(), e.actor_key_name)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_says_which_key_did_what() {
    let db = TestDb::new().await;
    let server = TestServer::start_with(keyed_config(&db)).await;
    let client_key = clients(&server, &make_key(&server, "client", &["default"], 0).await.0).await;
    let worker_key = clients(&server, &make_key(&server, "worker", &["default"], 0).await.0).await;
    let (c, w) = ("client of default", "worker of default");
    let start = |key: &str| {
        let mut wf = client_key.workflows.clone();
        let mut req = start_req("wf", json!({}));
        req.idempotency_key = key.to_owned();
        async move { wf.start_run(req).await.unwrap().into_inner().run.unwrap().id }
    };
    let worker_id = worker_key
        .workers
        .clone()
        .register_worker(RegisterWorkerRequest {
            namespace: String::new(),
            identity: "w".into(),
            host: "h".into(),
            workflows: vec![WorkflowRef {
                name: "wf".into(),
                version: String::new(),
            }],
            queues: vec!["default".into()],
            slots: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let lease = || {
        let mut wk = worker_key.workers.clone();
        let worker_id = worker_id.clone();
        async move {
            wk.poll_tasks(PollTasksRequest {
                namespace: String::new(),
                worker_id,
                queues: Vec::new(),
                max_runs: 1,
                wait: Some(aiki_proto::duration_to_proto(Duration::from_secs(5))),
            })
            .await
            .unwrap()
            .into_inner()
            .runs
            .pop()
            .expect("a run")
        }
    };
    // Started by the client, leased, checkpointed and completed by the worker.
    let done = start("done").await;
    let l = lease().await;
    worker_key
        .workers
        .clone()
        .record_task(RecordTaskRequest {
            namespace: String::new(),
            run_id: done.clone(),
            lease_token: l.lease_token.clone(),
            task: Some(task_output("t#0", "t", 0, json!(1))),
        })
        .await
        .unwrap();
    worker_key
        .workers
        .clone()
        .complete_run(CompleteRunRequest {
            namespace: String::new(),
            run_id: done.clone(),
            lease_token: l.lease_token,
            output: Some(aiki_proto::json_to_value(&json!(2))),
            tasks: vec![task_output("u#0", "u", 1, json!(3))],
        })
        .await
        .unwrap();
    let own = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        actors(&client_key, &done).await,
        own(&[
            ("run_created", c),
            ("run_leased", w),
            ("task_recorded", w),
            ("task_recorded", w),
            ("run_completed", w)
        ])
    );
    // Suspended by the worker for an event; the event sent and the run woken by the client;
    // then failed by the worker, paused, resumed and cancelled by the client.
    let waits = start("waits").await;
    let l = lease().await;
    worker_key
        .workers
        .clone()
        .suspend_run(SuspendRunRequest {
            namespace: String::new(),
            run_id: waits.clone(),
            lease_token: l.lease_token,
            wait_key: "event:go#0".into(),
            wait_name: "go".into(),
            wait_seq: 0,
            event: "go".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    client_key
        .workflows
        .clone()
        .send_event(SendEventRequest {
            namespace: String::new(),
            r#ref: Some(send_event_request::Ref::RunId(waits.clone())),
            name: "go".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let l = lease().await;
    worker_key
        .workers
        .clone()
        .fail_run(FailRunRequest {
            namespace: String::new(),
            run_id: waits.clone(),
            lease_token: l.lease_token,
            error: Some(v1::RunError {
                r#type: "E".into(),
                message: "again".into(),
                details: None,
            }),
            retry_after: Some(aiki_proto::duration_to_proto(Duration::from_secs(3600))),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut wf = client_key.workflows.clone();
    wf.pause_run(PauseRunRequest {
        namespace: String::new(),
        run_id: waits.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    wf.resume_run(ResumeRunRequest {
        namespace: String::new(),
        run_id: waits.clone(),
    })
    .await
    .unwrap();
    wf.cancel_run(CancelRunRequest {
        namespace: String::new(),
        run_id: waits.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let history = actors(&client_key, &waits).await;
    let by = |kind: &str| -> Vec<&str> {
        history
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    assert_eq!(by("run_created"), [c]);
    assert_eq!(by("run_leased"), [w, w]);
    assert_eq!(by("run_suspended"), [w], "{history:?}");
    assert_eq!(by("event_received"), [c]);
    assert_eq!(by("run_woken"), [c]);
    assert_eq!(by("run_retry_scheduled"), [w], "{history:?}");
    assert_eq!(by("run_paused"), [c]);
    assert_eq!(by("run_resumed"), [c]);
    assert_eq!(by("run_cancelled"), [c]);
    // The id is there too, and the bootstrap key is named.
    let mut req = start_req("wf", json!({}));
    req.idempotency_key = "by-admin".into();
    let admin = clients(&server, ADMIN).await;
    let id = admin
        .workflows
        .clone()
        .start_run(req)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .id;
    let events = admin
        .workflows
        .clone()
        .get_run_history(GetRunHistoryRequest {
            namespace: String::new(),
            run_id: id,
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events[0].actor_key_name, "bootstrap admin");
    assert_eq!(events[0].actor_key_id, uuid::Uuid::nil().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_keys_cannot_take_the_pool_from_the_others() {
    let db = TestDb::new().await;
    let server = TestServer::start_with(keyed_config(&db)).await;
    // The bootstrap admin key is checked without the database: its calls need a connection
    // only for their own work.
    let admin = clients(&server, ADMIN).await;
    // The database is slow to answer reads of keys: they wait for a lock held meanwhile.
    let mut pg = db.connect().await;
    let slow = pg.transaction().await.unwrap();
    slow.batch_execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // 300 callers at a time, each with a key of the right shape that no one made: each one is
    // a read of the database, which no rate limit counts (they name no key).
    let stop = tokio_util::sync::CancellationToken::new();
    let channel = server.channel().await;
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let (channel, stop) = (channel.clone(), stop.clone());
        flood.spawn(async move {
            let mut codes = Vec::new();
            while !stop.is_cancelled() {
                let made_up = format!("aiki_{}{}", uuid::Uuid::new_v4().simple(), "cd".repeat(32));
                let mut wf = WorkflowServiceClient::with_interceptor(channel.clone(), ApiKey::new(&made_up).unwrap());
                codes.push(code(wf.list_runs(ListRunsRequest::default()).await));
            }
            codes
        });
    }
    let watcher = db.connect().await;
    let stuck = || async {
        watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    aiki_tests::eventually(Duration::from_secs(10), "reads of made-up keys wait", || async {
        stuck().await >= 1
    })
    .await;
    // Meanwhile the others are served promptly, again and again, and the reads of keys hold
    // at most their share of the pool: the tests' pool of 8 lends them one connection, and
    // one more to the loop that re-reads the cached keys.
    let mut most = 0;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(
            code(admin.workflows.clone().list_runs(ListRunsRequest::default()).await),
            Code::Ok
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a call waited {:?} behind made-up keys",
            started.elapsed()
        );
        most = most.max(stuck().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(most <= 2, "{most} connections waited on reads of keys");
    slow.commit().await.unwrap();
    stop.cancel();
    let mut answered = 0;
    while let Some(codes) = flood.join_next().await {
        for c in codes.unwrap() {
            assert!(matches!(c, Code::Unauthenticated | Code::Unavailable), "{c:?}");
            answered += 1;
        }
    }
    assert!(answered >= 300, "every made-up key was answered: {answered}");
}
