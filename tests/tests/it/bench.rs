//! `aiki bench` end to end: a smoke run with tiny figures, where the bench starts its own
//! server and worker processes on a database of its own on the tests' PostgreSQL, and prints
//! every figure as one JSON object.

use std::{process::Stdio, time::Duration};

use aiki_tests::{admin_url, bin, url_for};
use serde_json::Value;
use tokio::process::Command;

/// Runs `aiki` with `args`; on timeout sends SIGTERM (so that the bench stops what it started)
/// and fails. Returns the exit status, stdout and stderr.
pub(crate) async fn aiki(args: &[&str], timeout: Duration) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(bin("aiki"))
        .args(args)
        .env_remove("AIKI_SERVER")
        .env_remove("AIKI_NAMESPACE")
        .env_remove("AIKI_BENCH_DATABASE_URL")
        .env_remove("AIKI_TLS_CA")
        .env_remove("AIKI_TLS_CERT")
        .env_remove("AIKI_TLS_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn aiki");
    let pid = child.id().expect("pid");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let read = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
        tokio::spawn(async move {
            let mut s = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut r, &mut s).await;
            s
        })
    };
    let (out, err) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status.expect("wait"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
            panic!(
                "aiki {} did not finish within {timeout:?}; stderr:\n{}",
                args.join(" "),
                err.await.unwrap_or_default()
            );
        }
    };
    (status, out.await.expect("stdout"), err.await.expect("stderr"))
}

async fn database_exists(name: &str) -> bool {
    let (client, conn) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to the tests' PostgreSQL");
    tokio::spawn(conn);
    client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("query")
        .is_some()
}

fn positive(report: &Value, path: &[&str]) -> f64 {
    let v = path.iter().fold(report, |v, k| &v[k]);
    let n = v
        .as_f64()
        .unwrap_or_else(|| panic!("{} is not a number in {report:#}", path.join(".")));
    assert!(n > 0.0, "{} is {n}, not positive, in {report:#}", path.join("."));
    n
}

#[tokio::test]
async fn smoke_run_reports_every_figure_and_cleans_up() {
    let db = format!("aiki_bench_t_{}", uuid::Uuid::new_v4().simple());
    let url = url_for(&db);
    let args = [
        "bench",
        "--runs",
        "200",
        "--rate",
        "100",
        "--latency-secs",
        "2",
        "--warmup",
        "100",
        "--output",
        "json",
        "--database-url",
        &url,
    ];
    let (status, stdout, stderr) = aiki(&args, Duration::from_secs(120)).await;
    assert!(status.success(), "aiki bench failed ({status}); stderr:\n{stderr}");
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{stdout}\nstderr:\n{stderr}"));

    for figure in [
        "enqueue_single_runs_per_sec",
        "enqueue_batch_runs_per_sec",
        "drain_runs_per_sec",
        "server_peak_rss_mb",
        "server_drain_peak_rss_mb",
        "worker_peak_rss_mb",
        "latency_offered_runs_per_sec",
    ] {
        positive(&report, &[figure]);
    }
    let p: Vec<f64> = ["p50", "p95", "p99", "max"]
        .iter()
        .map(|q| positive(&report, &["latency_ms", q]))
        .collect();
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "percentiles out of order: {p:?}");

    assert_eq!(report["drain_runs"], 200, "{report:#}");
    assert_eq!(
        report["drain_completed"], 200,
        "the drain completed every run: {report:#}"
    );
    assert_eq!(report["latency_runs"], 200, "100 runs/s for 2 s: {report:#}");
    let params = &report["parameters"];
    assert_eq!(params["runs"], 200);
    assert_eq!(params["workers"], 1);
    assert_eq!(params["own_server"], true);

    assert!(!database_exists(&db).await, "the bench dropped its database {db}");
}

/// `--tls --api-keys`: the bench's own server serves TLS only and requires keys, and its
/// clients and workers reach it over https:// with theirs (the drain and the latency phase
/// complete every run, so the workers did), with every figure; `--tls` is refused with a
/// server of someone else's.
#[tokio::test]
async fn tls_bench_with_keys_serves_and_connects_over_https() {
    assert_refused(
        &["bench", "--tls", "--server", "http://127.0.0.1:9"],
        "--tls has the bench start its own server with TLS",
    )
    .await;

    let db = format!("aiki_bench_t_{}", uuid::Uuid::new_v4().simple());
    let url = url_for(&db);
    let args = [
        "bench",
        "--tls",
        "--api-keys",
        "--runs",
        "200",
        "--rate",
        "100",
        "--latency-secs",
        "2",
        "--warmup",
        "100",
        "--output",
        "json",
        "--database-url",
        &url,
    ];
    let (status, stdout, stderr) = aiki(&args, Duration::from_secs(120)).await;
    assert!(
        status.success(),
        "aiki bench --tls failed ({status}); stderr:\n{stderr}"
    );
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{stdout}\nstderr:\n{stderr}"));
    let params = &report["parameters"];
    assert_eq!(params["tls"], true, "{report:#}");
    assert_eq!(params["api_keys"], true, "{report:#}");
    assert!(
        params["server"]
            .as_str()
            .is_some_and(|s| s.starts_with("https://127.0.0.1:")),
        "{report:#}"
    );
    for figure in [
        "enqueue_single_runs_per_sec",
        "enqueue_batch_runs_per_sec",
        "drain_runs_per_sec",
    ] {
        positive(&report, &[figure]);
    }
    positive(&report, &["latency_ms", "p50"]);
    assert_eq!(report["drain_completed"], 200, "{report:#}");
    assert_eq!(report["latency_runs"], 200, "{report:#}");
    assert!(!database_exists(&db).await, "the bench dropped its database {db}");
}

/// Runs `aiki` with `args` and asserts that it exits with status 1, saying `why` on stderr.
async fn assert_refused(args: &[&str], why: &str) {
    let (status, _, stderr) = aiki(args, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains(why), "says why it refuses; stderr:\n{stderr}");
}

#[tokio::test]
async fn refuses_a_database_not_named_for_benchmarks() {
    assert_refused(
        &["bench", "--runs", "1", "--database-url", &url_for("aiki_precious")],
        "must contain \"bench\"",
    )
    .await;
}

/// `--checkpoint` has PostgreSQL checkpoint after the enqueue and before the drain (untimed),
/// and is refused with a server of someone else's, whose database the bench does not own.
#[tokio::test]
async fn checkpoint_comes_before_the_drain_and_needs_the_bench_database() {
    assert_refused(
        &["bench", "--checkpoint", "--server", "http://127.0.0.1:9"],
        "--checkpoint needs the bench's own database",
    )
    .await;

    let db = format!("aiki_bench_t_{}", uuid::Uuid::new_v4().simple());
    let url = url_for(&db);
    let args = [
        "bench",
        "--runs",
        "100",
        "--warmup",
        "0",
        "--phases",
        "drain",
        "--checkpoint",
        "--output",
        "json",
        "--database-url",
        &url,
    ];
    let (status, stdout, stderr) = aiki(&args, Duration::from_secs(120)).await;
    assert!(status.success(), "aiki bench failed ({status}); stderr:\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(report["parameters"]["checkpoint"], true, "{report:#}");
    assert_eq!(report["drain_completed"], 100, "{report:#}");
    let at = |what: &str| {
        stderr
            .find(what)
            .unwrap_or_else(|| panic!("stderr says {what:?}:\n{stderr}"))
    };
    let (enqueued, checkpointed, drained) = (at("enqueue: "), at("checkpoint: checkpoint done"), at("drain: "));
    assert!(
        enqueued < checkpointed && checkpointed < drained,
        "the checkpoint comes after the enqueue and before the drain; stderr:\n{stderr}"
    );
    assert!(!database_exists(&db).await, "the bench dropped its database {db}");
}

/// The `aiki bench` commands of the README's Performance section, scaled down: each runs with
/// its own flags, but with 200 runs (and a backlog of 500 if it asks for one), a short latency
/// phase and a database of its own, and must complete every run it drains.
#[tokio::test]
async fn readme_bench_commands_run_scaled_down() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme.find("## Performance").expect("a Performance section");
    let end = readme[start + 1..]
        .find("\n## ")
        .map_or(readme.len(), |e| start + 1 + e);
    let commands: Vec<&str> = readme[start..end]
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("target/release/aiki bench"))
        .collect();
    assert!(
        !commands.is_empty(),
        "the Performance section shows how to run the bench"
    );
    for command in commands {
        let mut args: Vec<String> = Vec::new();
        let mut words = command.split_whitespace().skip(1);
        while let Some(w) = words.next() {
            match w {
                "--runs" | "--backlog" | "--rate" | "--latency-secs" | "--warmup" => {
                    let small = match w {
                        "--runs" => "200",
                        "--backlog" => "500",
                        "--rate" => "100",
                        "--latency-secs" => "2",
                        _ => "100",
                    };
                    words.next().expect("a value");
                    args.extend([w.to_owned(), small.to_owned()]);
                }
                "--output" | "--database-url" => {
                    words.next();
                }
                w => args.push(w.to_owned()),
            }
        }
        for (flag, value) in [
            ("--runs", "200"),
            ("--rate", "100"),
            ("--latency-secs", "2"),
            ("--warmup", "100"),
        ] {
            if !args.iter().any(|a| a == flag) {
                args.extend([flag.to_owned(), value.to_owned()]);
            }
        }
        let db = format!("aiki_bench_t_{}", uuid::Uuid::new_v4().simple());
        args.extend(["--output".into(), "json".into(), "--database-url".into(), url_for(&db)]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, stdout, stderr) = aiki(&args, Duration::from_secs(180)).await;
        assert!(status.success(), "`{command}` (as {args:?}) failed; stderr:\n{stderr}");
        let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
        // With a backlog, runs of the backlog may complete too.
        if let Some(done) = report.get("drain_completed").and_then(Value::as_u64) {
            let runs = report["drain_runs"].as_u64().expect("drain_runs");
            assert!(done >= runs, "`{command}` drained every run: {report:#}");
        }
        assert!(!database_exists(&db).await, "the bench dropped its database {db}");
    }
}
