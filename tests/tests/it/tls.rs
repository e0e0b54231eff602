//! TLS on the gRPC port, with certificates made here: the SDK, a worker and the CLI over TLS;
//! clients refused for a CA that does not sign the server's certificate, for an expired
//! server certificate, and, under mutual TLS, for a missing or foreign client certificate;
//! the server taking a new certificate without a restart; and `aiki bench` against a server
//! that requires client certificates.

use std::time::Duration;

use aiki::{Client, TlsOptions};
use aiki_tests::{Ca, Config, Files, TestDb, TestServer, TestWorker, aiki_cli, eventually};
use aiki_worker::{Context, WorkerBuilder};
use serde_json::json;

/// A test server on `db` serving `cert`/`key`, requiring client certificates of `client_ca`
/// when given; its own clients connect with `tls`.
async fn server(
    db: &TestDb,
    files: &Files,
    (cert, key): &(String, String),
    client_ca: Option<&Ca>,
    tls: TlsOptions,
) -> TestServer {
    let mut config = Config::for_test(&db.url);
    config.tls_cert = Some(files.write("server.pem", cert));
    config.tls_key = Some(files.write("server.key", key));
    config.tls_client_ca = client_ca.map(|ca| files.write("clients.pem", &ca.pem()));
    TestServer::start_tls(config, tls).await
}

async fn run_count(client: &Client) -> usize {
    client.list(&aiki::ListFilter::default()).await.unwrap().runs.len()
}

/// A client of `url` with `tls` that tries to start a run: the error it meets, connecting or
/// starting.
async fn refused(url: &str, tls: &TlsOptions) -> aiki::Error {
    let attempt = async {
        let client = Client::connect_with(url, tls).await?;
        client
            .start_run("double", &json!(1), aiki::StartOptions::default())
            .await
    };
    match attempt.await {
        Ok(run) => panic!("a refused client started run {}", run.id),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_and_worker_run_a_workflow_over_tls() {
    let db = TestDb::new().await;
    let files = Files::new("workflow");
    let ca = Ca::new("aiki test CA");
    let server = server(&db, &files, &ca.issue(true, false), None, ca.trust()).await;
    assert!(server.url().starts_with("https://"));

    let client = server.client().await;
    let run = client
        .start_run("double", &json!(21), aiki::StartOptions::default())
        .await
        .unwrap();
    let worker = WorkerBuilder::new(server.url())
        .tls(ca.trust())
        .register("double", |_ctx: Context, n: u64| async move { Ok(n * 2) });
    let mut worker = TestWorker::start(worker).await;
    let out: u64 = run.result(Duration::from_secs(20)).await.unwrap();
    assert_eq!(out, 42);
    worker.stop().await;

    // Plain HTTP/2 to the TLS port gets nowhere: the client reads the TLS alert as a malformed
    // HTTP/2 frame, a connection failed under the call.
    let e = refused(&format!("http://{}", server.addr), &TlsOptions::default()).await;
    assert!(matches!(e, aiki::Error::Unavailable(_)), "{e:?}");
    assert_eq!(run_count(&client).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_another_ca_is_refused() {
    let db = TestDb::new().await;
    let files = Files::new("wrong-ca");
    let ca = Ca::new("aiki test CA");
    let server = server(&db, &files, &ca.issue(true, false), None, ca.trust()).await;

    let other = Ca::new("another CA");
    let e = refused(&server.url(), &other.trust()).await;
    assert!(matches!(&e, aiki::Error::Unavailable(m) if m.contains("TLS")), "{e:?}");
    // Without a CA the system's roots are trusted, which do not sign the test certificate.
    let e = refused(&server.url(), &TlsOptions::default()).await;
    assert!(matches!(e, aiki::Error::Unavailable(_)), "{e:?}");
    assert_eq!(run_count(&server.client().await).await, 0, "nothing was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_is_refused() {
    let db = TestDb::new().await;
    let files = Files::new("expired");
    let ca = Ca::new("aiki test CA");
    let mut config = Config::for_test(&db.url);
    let (cert, key) = ca.issue(true, true);
    config.tls_cert = Some(files.write("server.pem", &cert));
    config.tls_key = Some(files.write("server.key", &key));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(aiki_server::serve(config, listener, stop.clone()));

    let e = refused(&url, &ca.trust()).await;
    assert!(
        matches!(&e, aiki::Error::Unavailable(m) if m.contains("TLS") && m.to_lowercase().contains("expired")),
        "{e:?}"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    let pg = db.connect().await;
    let runs: i64 = pg.query_one("SELECT count(*) FROM runs", &[]).await.unwrap().get(0);
    assert_eq!(runs, 0, "nothing was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_takes_only_clients_with_a_certificate_of_the_client_ca() {
    let db = TestDb::new().await;
    let files = Files::new("mtls");
    let ca = Ca::new("aiki test CA");
    let clients = Ca::new("aiki clients CA");
    let (cert, key) = clients.issue(false, false);
    let good = TlsOptions {
        ca: Some(ca.pem().into_bytes()),
        cert: Some(cert.into_bytes()),
        key: Some(key.into_bytes()),
    };
    let server = server(&db, &files, &ca.issue(true, false), Some(&clients), good.clone()).await;

    // Under TLS 1.3 the server refuses a client certificate after the client's side of the
    // handshake: the client meets the refusal on its first call, as the TLS alert or, when
    // its request went out first, as a connection closed under it.
    let e = refused(&server.url(), &ca.trust()).await;
    assert!(matches!(e, aiki::Error::Unavailable(_)), "no client certificate: {e:?}");
    let (cert, key) = Ca::new("a stranger's CA").issue(false, false);
    let stranger = TlsOptions {
        ca: Some(ca.pem().into_bytes()),
        cert: Some(cert.into_bytes()),
        key: Some(key.into_bytes()),
    };
    let e = refused(&server.url(), &stranger).await;
    assert!(
        matches!(e, aiki::Error::Unavailable(_)),
        "a foreign client certificate: {e:?}"
    );

    let client = Client::connect_with(server.url(), &good).await.unwrap();
    assert_eq!(
        run_count(&client).await,
        0,
        "nothing was started by the refused clients"
    );
    let run = client
        .start_run("double", &json!(4), aiki::StartOptions::default())
        .await
        .unwrap();
    let worker = WorkerBuilder::new(server.url())
        .tls(good.clone())
        .register("double", |_ctx: Context, n: u64| async move { Ok(n * 2) });
    let mut worker = TestWorker::start(worker).await;
    let out: u64 = run.result(Duration::from_secs(20)).await.unwrap();
    assert_eq!(out, 8);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_a_run_over_tls() {
    let db = TestDb::new().await;
    let files = Files::new("cli");
    let ca = Ca::new("aiki test CA");
    let server = server(&db, &files, &ca.issue(true, false), None, ca.trust()).await;
    let run = server
        .client()
        .await
        .start_run("double", &json!(3), aiki::StartOptions::key("over-tls"))
        .await
        .unwrap();
    let ca_file = files.write("ca.pem", &ca.pem());

    let (ok, out, err) = aiki_cli(
        &server,
        &[
            "--tls-ca",
            ca_file.to_str().unwrap(),
            "-o",
            "json",
            "run",
            "get",
            &run.id,
        ],
    )
    .await;
    assert!(ok, "aiki run get over TLS failed: {err}");
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["id"], run.id.as_str(), "{out}");

    // Without the CA the server's certificate is not trusted.
    let (ok, _, err) = aiki_cli(&server, &["run", "get", &run.id]).await;
    assert!(!ok);
    assert!(err.contains("TLS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let db = TestDb::new().await;
    let files = Files::new("reload");
    let old_ca = Ca::new("old CA");
    let server = server(&db, &files, &old_ca.issue(true, false), None, old_ca.trust()).await;
    let before = server.client().await;

    // A broken pair is not taken: the old certificate stays in use.
    files.write("server.key", "not a key");
    let new_ca = Ca::new("new CA");
    let (cert, key) = new_ca.issue(true, false);
    files.write("server.pem", &cert);
    Client::connect_with(server.url(), &old_ca.trust())
        .await
        .expect("the old certificate is still served");

    files.write("server.key", &key);
    eventually(
        Duration::from_secs(10),
        "new connections see the new certificate",
        || async { Client::connect_with(server.url(), &new_ca.trust()).await.is_ok() },
    )
    .await;
    let e = refused(&server.url(), &old_ca.trust()).await;
    assert!(matches!(e, aiki::Error::Unavailable(_)), "{e:?}");
    // The connection made before the change goes on working.
    assert_eq!(run_count(&before).await, 0);
}

/// The README's Security section, run as it is written: the server started with its TLS pair
/// and bootstrap key on a public address, then the operator's commands over TLS with keys,
/// grpcurl included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_security_commands_run_over_tls_with_keys() {
    let blocks = aiki_tests::readme_blocks("### API keys and roles");
    assert_eq!(
        blocks.len(),
        2,
        "a block for the server, one for the operator: {blocks:?}"
    );
    let db = TestDb::new().await;
    let files = Files::new("readme-security");
    let ca = Ca::new("readme CA");
    let (cert, key) = ca.issue(true, false);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    files.write("ca.pem", &ca.pem());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin_dir = aiki_tests::bin("aiki").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}:{}",
        bin_dir.display(),
        std::env::var("HOME")
            .map(|h| format!("{h}/.cargo/bin"))
            .unwrap_or_default(),
        std::env::var("PATH").unwrap_or_default()
    );

    // The server line: environment assignments, then the command and its arguments.
    let [server_line] = &blocks[0][..] else {
        panic!("one server command: {:?}", blocks[0]);
    };
    let line = server_line.replace("7070", &port.to_string());
    let mut words = line.split_whitespace().peekable();
    let mut server = tokio::process::Command::new(bin_dir.join("aiki-server"));
    while let Some(assignment) = words.next_if(|w| w.contains('=')) {
        let (k, v) = assignment.split_once('=').unwrap();
        server.env(k, v);
    }
    assert_eq!(words.next(), Some("aiki-server"));
    let _server = server
        .args(words)
        .current_dir(&files.0)
        .env("AIKI_DATABASE_URL", &db.url)
        .env_remove("AIKI_API_KEY")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start aiki-server");
    let url = format!("https://localhost:{port}");
    eventually(Duration::from_secs(30), "the server answers over TLS", || async {
        match Client::connect_with(url.clone(), &ca.trust()).await {
            Ok(c) => matches!(c.queues().await, Err(aiki::Error::Unauthenticated(_))),
            Err(_) => false,
        }
    })
    .await;

    // The operator's commands, as one script.
    let script =
        format!("set -e\n{}", blocks[1].join("\n")).replace("aiki.internal:7070", &format!("localhost:{port}"));
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(&files.0)
        .env("PATH", &path)
        .output()
        .await
        .expect("sh");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the README's commands failed ({}):\n{script}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("checkout") && stdout.contains("billing-workers"),
        "{stdout}"
    );
    assert!(stdout.contains("revoked"), "the temporary key is revoked: {stdout}");
    // grpcurl's answer over TLS with the key: the namespace's (empty) list of runs.
    assert!(stdout.trim_end().ends_with('}'), "{stdout}");
}

/// `aiki bench --server https://…` reaches a server that requires client certificates with the
/// global `--tls-ca`, `--tls-cert` and `--tls-key`, for its own clients and for its workers
/// (the drain completes every run, so the workers got them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reaches_a_mutual_tls_server_with_the_tls_flags() {
    let db = TestDb::new().await;
    let files = Files::new("bench");
    let ca = Ca::new("aiki test CA");
    let clients = Ca::new("aiki clients CA");
    let (cert, key) = clients.issue(false, false);
    let good = TlsOptions {
        ca: Some(ca.pem().into_bytes()),
        cert: Some(cert.clone().into_bytes()),
        key: Some(key.clone().into_bytes()),
    };
    let server = server(&db, &files, &ca.issue(true, false), Some(&clients), good).await;
    let ca_file = files.write("ca.pem", &ca.pem());
    let cert_file = files.write("client.pem", &cert);
    let key_file = files.write("client.key", &key);
    let url = server.url();
    let args = [
        "--server",
        url.as_str(),
        "--tls-ca",
        ca_file.to_str().unwrap(),
        "--tls-cert",
        cert_file.to_str().unwrap(),
        "--tls-key",
        key_file.to_str().unwrap(),
        "bench",
        "--runs",
        "100",
        "--warmup",
        "0",
        "--phases",
        "enqueue-batch,drain",
        "--output",
        "json",
    ];
    let (status, stdout, stderr) = crate::bench::aiki(&args, Duration::from_secs(120)).await;
    assert!(
        status.success(),
        "aiki bench over mutual TLS failed ({status}); stderr:\n{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(report["parameters"]["tls"], true, "{report:#}");
    assert_eq!(report["drain_completed"], 100, "{report:#}");
}
