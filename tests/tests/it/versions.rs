//! Versions: workers register (workflow, version); a run is pinned at start to the version it
//! names or to the newest registered; a worker leases only runs of versions it serves, so a
//! new version rolls out while runs of the old one finish on old workers.

use std::time::Duration;

use aiki::{RunStatus, StartOptions};
use aiki_proto::v1::{RegisterWorkerRequest, WorkflowRef};
use aiki_tests::{TestDb, TestEnv, TestServer, TestWorker, aiki_cli, eventually, start_req};
use aiki_worker::Context;
use serde_json::{Value, json};
use tonic::Code;

/// A worker of version `version` serving "greet", which answers with its version.
async fn greeter(server: &TestServer, version: &str) -> TestWorker {
    let v = version.to_owned();
    let builder = aiki_worker::WorkerBuilder::new(server.url())
        .identity(format!("greeter-{version}"))
        .version(version)
        .register("greet", move |_ctx: Context, input: Value| {
            let v = v.clone();
            async move { Ok(json!({"served_by": v, "input": input})) }
        });
    let worker = TestWorker::start(builder).await;
    let client = server.client().await;
    let me = format!("greeter-{version}");
    eventually(Duration::from_secs(10), "the worker registered", || async {
        client.workers().await.unwrap().iter().any(|w| w.identity == me)
    })
    .await;
    worker
}

async fn greet(client: &aiki::Client, opts: StartOptions) -> aiki::RunHandle {
    client.start_run("greet", &json!({}), opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_rolls_out_while_old_runs_finish_on_old_workers() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;

    // Before any version is registered, a run is unpinned.
    let early = greet(client, StartOptions::default()).await;
    assert_eq!(early.run.version, "");
    let mut v1 = greeter(server, "v1").await;
    let out: Value = early.result(Duration::from_secs(10)).await.unwrap();
    assert_eq!(out["served_by"], "v1", "any version serves an unpinned run");
    let a = greet(client, StartOptions::default()).await;
    assert_eq!(a.run.version, "v1", "pinned to the newest registered version");
    let out: Value = a.result(Duration::from_secs(10)).await.unwrap();
    assert_eq!(out["served_by"], "v1");

    let mut v2 = greeter(server, "v2").await;
    let b = greet(client, StartOptions::default()).await;
    assert_eq!(b.run.version, "v2", "the new version is the newest");
    let old = greet(
        client,
        StartOptions {
            version: Some("v1".into()),
            ..StartOptions::default()
        },
    )
    .await;
    let out: Value = b.result(Duration::from_secs(10)).await.unwrap();
    assert_eq!(out["served_by"], "v2");
    let out: Value = old.result(Duration::from_secs(10)).await.unwrap();
    assert_eq!(out["served_by"], "v1", "a v1 run finishes on the v1 worker");

    // Without a v2 worker, a v2 run waits, and ListQueues says why.
    v2.stop().await;
    let d = greet(client, StartOptions::default()).await;
    assert_eq!(d.run.version, "v2");
    eventually(
        Duration::from_secs(10),
        "ListQueues explains the waiting run",
        || async {
            let queues = client.queues().await.unwrap();
            let q = queues.iter().find(|q| q.name == "default").unwrap();
            q.unserved.len() == 1
                && q.unserved[0].count == 1
                && q.unserved[0].version == "v2"
                && q.unserved[0].reason.contains("version \"v2\" of workflow \"greet\"")
        },
    )
    .await;
    assert_eq!(client.get(&d.id).await.unwrap().status, RunStatus::Queued);
    let (ok, out, err) = aiki_cli(server, &["queues"]).await;
    assert!(
        ok && out.contains("1 queued run(s) wait: no live worker serves version \"v2\""),
        "{out}{err}"
    );
    let (ok, out, err) = aiki_cli(server, &["workflows", "-o", "json"]).await;
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let summary: Vec<(String, bool, Value)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["version"].as_str().unwrap().to_owned(),
                w["latest"].as_bool().unwrap(),
                w["workers"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("v2".to_owned(), true, json!([])),
            ("v1".to_owned(), false, json!(["greeter-v1"])),
        ]
    );
    let (ok, out, _) = aiki_cli(server, &["workflows"]).await;
    assert!(ok && out.contains("greeter-v1") && out.contains("none live"), "{out}");

    // A v2 worker comes back: the run goes through.
    let mut v2 = greeter(server, "v2").await;
    let out: Value = d.result(Duration::from_secs(10)).await.unwrap();
    assert_eq!(out["served_by"], "v2");
    assert!(client.queues().await.unwrap().iter().all(|q| q.unserved.is_empty()));
    for worker in [&mut v1, &mut v2] {
        worker.stop().await;
    }
}

#[tokio::test]
async fn unknown_versions_are_refused_and_change_nothing() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let mut wf = server.workflows().await;
    let pinned = |v: &str| aiki_proto::v1::StartRunRequest {
        version: v.into(),
        ..start_req("greet", json!({}))
    };
    let err = wf.start_run(pinned("v1")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("no registered version"), "{}", err.message());

    let mut workers = server.workers().await;
    let register = |name: &str, version: &str| RegisterWorkerRequest {
        workflows: vec![WorkflowRef {
            name: name.into(),
            version: version.into(),
        }],
        queues: vec!["default".into()],
        slots: 1,
        ..Default::default()
    };
    workers.register_worker(register("greet", "v1")).await.unwrap();
    let err = wf.start_run(pinned("v9")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("registered: v1"), "{}", err.message());
    let err = wf.start_run(pinned(&"v".repeat(65))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = workers.register_worker(register("*", "v1")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let pg = db.connect().await;
    let n: i64 = pg.query_one("SELECT count(*) FROM runs", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "nothing was started");
    // A pinned start of a registered version works.
    let run = wf.start_run(pinned("v1")).await.unwrap().into_inner().run.unwrap();
    assert_eq!(run.version, "v1");
}
