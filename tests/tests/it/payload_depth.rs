//! Payloads nested past `aiki_proto::MAX_PAYLOAD_DEPTH` are refused at every edge with a reason
//! that names the limit, and a run that produces one ends `failed` at once, after one execution,
//! instead of looping through lease expiries.

use std::time::Duration;

use aiki_proto::MAX_PAYLOAD_DEPTH;
use aiki_tests::{TestDb, TestEnv, TestServer, aiki_cli, bin, eventually, history_types};
use aiki_worker::{Context, WorkerBuilder, WorkflowError};
use serde_json::json;

/// `depth` arrays inside each other around `1`.
fn nested(depth: usize) -> serde_json::Value {
    (0..depth).fold(json!(1), |v, _| serde_json::Value::Array(vec![v]))
}

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("aiki-depth-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits for run `id` to end and answers it.
async fn ended(client: &aiki::Client, id: &str) -> aiki::Run {
    eventually(Duration::from_secs(20), "the run ended", || async {
        client.get(id).await.unwrap().status.is_terminal()
    })
    .await;
    client.get(id).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_printing_json_60_deep_fails_its_run_at_once_after_one_execution() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db).await;
    let dir = temp_dir();
    let count = dir.join("executions");
    let deep = serde_json::to_string(&nested(60)).unwrap();
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[workflows.deep]\ncommand = [\"sh\", \"-c\", \"echo x >> {count}; printf '%s' '{deep}'\"]\n",
            count = count.display()
        ),
    )
    .unwrap();
    let _worker = tokio::process::Command::new(bin("aiki-worker"))
        .arg("--config")
        .arg(&config)
        .args(["--server", &server.url()])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = server.client().await;
    let run = client
        .start_run("deep", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let run = ended(&client, &run.id).await;

    assert_eq!(run.status, aiki::RunStatus::Failed);
    let error = run.error.expect("a reason");
    assert_eq!(error.kind, "PayloadTooDeep", "{error}");
    assert!(
        error.message.contains("60 levels deep") && error.message.contains("at most 32 levels"),
        "{error}"
    );
    let executions = std::fs::read_to_string(&count).unwrap();
    assert_eq!(executions.lines().count(), 1, "the command ran once");
    let history = history_types(&server, &run.id).await;
    assert!(!history.iter().any(|t| t == "lease_expired"), "{history:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_and_error_details_past_the_limit_end_the_attempt_with_the_reason() {
    let env = TestEnv::new().await;
    let builder = WorkerBuilder::new(env.url())
        .register(
            "deep-output",
            |_ctx: Context, depth: usize| async move { Ok(nested(depth)) },
        )
        .register("deep-details", |_ctx: Context, depth: usize| async move {
            Err::<(), _>(
                WorkflowError::new("Declined", "no")
                    .with_details(nested(depth))
                    .non_retryable(),
            )
        });
    let mut worker = env.worker(builder).await;
    let client = &env.client;
    let start = |workflow: &'static str, depth: usize| {
        let client = client.clone();
        async move {
            client
                .start_run(workflow, &depth, aiki::StartOptions::default())
                .await
                .unwrap()
                .id
        }
    };

    // At the limit, an output is stored and read back whole.
    let at_limit = start("deep-output", MAX_PAYLOAD_DEPTH).await;
    let run = ended(client, &at_limit).await;
    assert_eq!(run.status, aiki::RunStatus::Completed);
    assert_eq!(run.output, Some(nested(MAX_PAYLOAD_DEPTH)));

    // Past it, the run fails at once, not retried.
    let past = start("deep-output", MAX_PAYLOAD_DEPTH + 1).await;
    let run = ended(client, &past).await;
    assert_eq!(run.status, aiki::RunStatus::Failed);
    let error = run.error.unwrap();
    assert_eq!(error.kind, "PayloadTooDeep");
    assert!(error.message.contains("the workflow's output"), "{error}");
    assert_eq!(run.attempt, 1);

    // A failure whose details cannot be stored is still reported, with a note for the details.
    let details = start("deep-details", 40).await;
    let run = ended(client, &details).await;
    assert_eq!(run.status, aiki::RunStatus::Failed);
    let error = run.error.unwrap();
    assert_eq!(error.kind, "Declined");
    let note = error.details.unwrap();
    assert!(
        note["dropped"].as_str().unwrap().contains("at most 32 levels"),
        "{note}"
    );

    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_and_event_data_past_the_limit_are_refused_by_the_sdk_and_the_cli() {
    let env = TestEnv::new().await;
    let server = &env.server;
    let client = &env.client;
    let e = client
        .start_run("w", &nested(60), aiki::StartOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, aiki::Error::InvalidArgument(m) if m.contains("input nests arrays and objects 60 levels deep")),
        "{e}"
    );

    let dir = temp_dir();
    let file = dir.join("d60.json");
    std::fs::write(&file, serde_json::to_string(&nested(60)).unwrap()).unwrap();
    let input = format!("@{}", file.display());
    let (ok, _, stderr) = aiki_cli(server, &["run", "start", "echo", "--input", &input]).await;
    assert!(!ok);
    assert!(
        stderr.contains("--input nests arrays and objects 60 levels deep") && stderr.contains("at most 32 levels"),
        "{stderr}"
    );
    let run = client
        .start_run("w", &json!({}), aiki::StartOptions::default())
        .await
        .unwrap();
    let (ok, _, stderr) = aiki_cli(server, &["run", "event", &run.id, "go", "--data", &input]).await;
    assert!(!ok);
    assert!(
        stderr.contains("--data nests arrays and objects 60 levels deep"),
        "{stderr}"
    );
    let (ok, _, stderr) = aiki_cli(server, &["run", "event", &run.id, "go", "--data", "{bad"]).await;
    assert!(!ok);
    assert!(stderr.contains("--data is not valid JSON"), "{stderr}");

    let n: i64 = env
        .db
        .connect()
        .await
        .query_one("SELECT count(*) FROM runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "only the valid start made a run");
    let _ = std::fs::remove_dir_all(dir);
}
