//! End to end with the real binaries as processes: `aiki-server`, `aiki-worker` and `aiki`
//! talking gRPC over loopback to each other and to a real PostgreSQL. Also runs every command
//! of the README's quickstart, and the SDK example, against them.

use std::{path::Path, process::Stdio, sync::Arc, time::Duration};

use aiki_tests::{TestDb, bin, eventually};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::Mutex,
};

/// A child process whose output lines are collected as they come. Dropped while it runs (a
/// failed test), it gets SIGTERM, so that it shuts down by itself, stopping whatever it
/// started (`aiki dev`'s server and worker) too.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: Arc<tokio::sync::Notify>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info")
            .spawn()
            .expect("spawn");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let new_line = Arc::new(tokio::sync::Notify::new());
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for reader in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(stderr),
        ] {
            let lines = lines.clone();
            let new_line = new_line.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(reader).lines();
                while let Ok(Some(line)) = r.next_line().await {
                    lines.lock().await.push(line);
                    new_line.notify_waiters();
                }
            });
        }
        Self { child, lines, new_line }
    }

    /// Waits for a line containing `needle` and returns it.
    async fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.new_line.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(l) = self.lines.lock().await.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "no line with {needle:?} within {timeout:?}; output:\n{}",
                    self.lines.lock().await.join("\n")
                );
            }
        }
    }

    fn signal_term(&self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    async fn terminate(mut self) {
        assert!(self.child.id().is_some(), "still running before SIGTERM");
        self.signal_term();
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits")
            .unwrap();
        assert!(
            status.success(),
            "clean exit after SIGTERM, got {status}; output:\n{}",
            self.lines.lock().await.join("\n")
        );
    }
}

/// Starts `aiki-server` on a free loopback port; returns it and its address.
async fn server(db: &TestDb) -> (Proc, String) {
    let p = Proc::spawn(
        Command::new(bin("aiki-server"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--lease-ttl",
                "5s",
                "--heartbeat-interval",
                "1s",
                "--no-auth",
            ])
            .env("AIKI_DATABASE_URL", &db.url),
    );
    let line = p.wait_for("aiki-server listening", Duration::from_secs(30)).await;
    let addr = line
        .split("addr=")
        .nth(1)
        .expect("addr in the log line")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    (p, addr)
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal_term();
        }
    }
}

fn worker(config: &Path, addr: &str) -> Proc {
    Proc::spawn(
        Command::new(bin("aiki-worker"))
            .arg("--config")
            .arg(config)
            .args(["--server", &format!("http://{addr}")]),
    )
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn aiki(addr: &str, args: &[&str]) -> Out {
    let out = Command::new(bin("aiki"))
        .args(args)
        .env("AIKI_SERVER", format!("http://{addr}"))
        .output()
        .await
        .expect("run aiki");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("aiki-test-{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_worker_and_cli_processes_run_a_workflow() {
    let db = TestDb::new().await;
    let (server, addr) = server(&db).await;

    // Two starts with one key: one run.
    let start = [
        "run",
        "start",
        "echo",
        "--input",
        r#"{"x":1}"#,
        "--key",
        "k1",
        "--output",
        "json",
    ];
    let a = aiki(&addr, &start).await;
    assert_eq!(a.code, 0, "{}", a.stderr);
    let b = aiki(&addr, &start).await;
    assert_eq!(b.code, 0, "{}", b.stderr);
    let a: serde_json::Value = serde_json::from_str(&a.stdout).unwrap();
    let b: serde_json::Value = serde_json::from_str(&b.stdout).unwrap();
    assert_eq!(a["id"], b["id"]);
    assert_eq!(
        (a["created"].as_bool(), b["created"].as_bool()),
        (Some(true), Some(false))
    );
    let id = a["id"].as_str().unwrap().to_owned();
    let pg = db.connect().await;
    let n: i64 = pg.query_one("SELECT count(*) FROM runs", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);

    // A worker process runs it with a command.
    let dir = temp_dir("e2e");
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        r#"
slots = 2
shutdown_grace = "5s"
[workflows.echo]
command = ["cat"]
timeout = "10s"
[workflows.broken]
command = ["sh", "-c", "echo the disk is full >&2; exit 3"]
non_retryable_exit_codes = [3]
"#,
    )
    .unwrap();
    let worker = worker(&config, &addr);

    let result = aiki(&addr, &["run", "result", &id, "--wait", "30"]).await;
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&result.stdout).unwrap(),
        serde_json::json!({"x": 1})
    );
    let history = aiki(&addr, &["run", "history", &id]).await;
    assert_eq!(history.code, 0);
    for event in ["run_created", "run_leased", "task_recorded", "run_completed"] {
        assert!(
            history.stdout.contains(event),
            "{event} missing from:\n{}",
            history.stdout
        );
    }

    // A failing command: its stderr is the run's error, and the CLI says so with exit code 3.
    let failed = aiki(&addr, &["run", "start", "broken", "--wait", "30"]).await;
    assert_eq!(failed.code, 3, "stdout: {} stderr: {}", failed.stdout, failed.stderr);
    assert!(failed.stdout.contains("the disk is full"), "{}", failed.stdout);

    // Clear errors for mistakes.
    let missing = aiki(&addr, &["run", "get", &uuid::Uuid::now_v7().to_string()]).await;
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("not found"), "{}", missing.stderr);
    let bad = aiki(&addr, &["run", "start", "echo", "--input", "{oops"]).await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("not valid JSON"), "{}", bad.stderr);

    let workers = aiki(&addr, &["workers", "--output", "json"]).await;
    let workers: serde_json::Value = serde_json::from_str(&workers.stdout).unwrap();
    assert_eq!(workers.as_array().unwrap().len(), 1);

    worker.terminate().await;
    server.terminate().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A process's state, parent and process group, from `/proc/PID/stat`; `None` once it is reaped.
fn stat(pid: i32) -> Option<(char, i32, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: state, ppid, pgrp.
    let mut fields = text.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// The processes of process group `group` that still run: zombies, dead already, are not.
fn running_in_group(group: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| stat(*pid).is_some_and(|(state, _, pgrp)| pgrp == group && state != 'Z'))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_commands_die_with_it_and_its_run_is_executed_again() {
    let db = TestDb::new().await;
    let (server, addr) = server(&db).await;
    let dir = temp_dir("kill9");
    let config = dir.join("worker.toml");
    // The first execution starts a grandchild and waits for it; the second one is done at once.
    let script = "if [ -e started ]; then echo '{\"again\":true}'; exit 0; fi; touch started; \
                  sleep 300 & echo $! > grandchild.pid; echo $$ > command.pid; wait";
    std::fs::write(
        &config,
        format!(
            "[workflows.hang]\ncommand = [\"sh\", \"-c\", {script:?}]\ncwd = {:?}\ntimeout = \"60s\"\n",
            dir.display().to_string()
        ),
    )
    .unwrap();
    let mut first = worker(&config, &addr);
    let start = aiki(&addr, &["run", "start", "hang", "--output", "json"]).await;
    assert_eq!(start.code, 0, "{}", start.stderr);
    let start: serde_json::Value = serde_json::from_str(&start.stdout).unwrap();
    let id = start["id"].as_str().unwrap().to_owned();
    let pid = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
    };
    eventually(
        Duration::from_secs(30),
        "the command and its grandchild run",
        || async { pid("command.pid").is_some() && pid("grandchild.pid").is_some() },
    )
    .await;
    let (command, grandchild) = (pid("command.pid").unwrap(), pid("grandchild.pid").unwrap());
    // The command's parent is its guard, which leads the group and is the worker's child.
    let (_, guard, group) = stat(command).unwrap();
    assert_eq!(guard, group, "the guard leads the command's group");
    assert_eq!(stat(guard).map(|s| s.1), first.child.id().map(|p| p as i32));
    let mut members = running_in_group(group);
    members.sort();
    let mut expected = vec![guard, command, grandchild];
    expected.sort();
    assert_eq!(members, expected);

    let killed = std::time::Instant::now();
    first.child.start_kill().unwrap();
    loop {
        let left = running_in_group(group);
        if left.is_empty() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "a second after the worker's SIGKILL its command's group still runs: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = first.child.wait().await.unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));

    // A worker started again finds nothing of its predecessor's, and executes the run again
    // once its lease has expired.
    let second = worker(&config, &addr);
    second.wait_for("worker registered", Duration::from_secs(30)).await;
    assert_eq!(running_in_group(group), Vec::<i32>::new());
    for pid in [guard, command, grandchild] {
        assert!(stat(pid).is_none_or(|(state, ..)| state == 'Z'), "{pid} still runs");
    }
    let result = aiki(&addr, &["run", "result", &id, "--wait", "60"]).await;
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&result.stdout).unwrap(),
        serde_json::json!({"again": true})
    );
    let history = aiki(&addr, &["run", "history", &id]).await;
    assert!(history.stdout.contains("lease_expired"), "{}", history.stdout);

    second.terminate().await;
    server.terminate().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_executable_was_removed_still_starts_guarded_commands() {
    let db = TestDb::new().await;
    let (server, addr) = server(&db).await;
    let dir = temp_dir("removed");
    let config = dir.join("worker.toml");
    std::fs::write(&config, "[workflows.echo]\ncommand = [\"cat\"]\n").unwrap();
    // A deploy that installs a new binary while the old worker drains: the running image is
    // the guard still.
    let exe = dir.join("aiki-worker");
    std::fs::copy(bin("aiki-worker"), &exe).unwrap();
    let worker = Proc::spawn(
        Command::new(&exe)
            .arg("--config")
            .arg(&config)
            .args(["--server", &format!("http://{addr}")]),
    );
    worker.wait_for("worker registered", Duration::from_secs(30)).await;
    std::fs::remove_file(&exe).unwrap();
    let start = aiki(
        &addr,
        &["run", "start", "echo", "--input", r#"{"x":1}"#, "--output", "json"],
    )
    .await;
    assert_eq!(start.code, 0, "{}", start.stderr);
    let start: serde_json::Value = serde_json::from_str(&start.stdout).unwrap();
    let result = aiki(&addr, &["run", "result", start["id"].as_str().unwrap(), "--wait", "30"]).await;
    assert_eq!(result.code, 0, "{}", result.stderr);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&result.stdout).unwrap(),
        serde_json::json!({"x": 1})
    );
    worker.terminate().await;
    server.terminate().await;
    let _ = std::fs::remove_dir_all(dir);
}

fn quickstart_commands(readme: &str) -> Vec<String> {
    let start = readme.find("## Quickstart").expect("a Quickstart section");
    let end = readme[start..]
        .find("### The Rust SDK")
        .map(|e| start + e)
        .unwrap_or(readme.len());
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in readme[start..end].lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh && !l.is_empty() => commands.push(l.to_owned()),
            _ => {}
        }
    }
    commands
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_quickstart_command_works() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("worker/examples/quickstart.rs")).unwrap();
    let hello = std::fs::read_to_string(root.join("worker/examples/hello.toml")).unwrap();
    assert!(
        readme.contains(&example),
        "README shows worker/examples/quickstart.rs as it is"
    );
    assert!(
        readme.contains(&hello),
        "README shows worker/examples/hello.toml as it is"
    );

    let db = TestDb::new().await;
    let (server, addr) = server(&db).await;
    let worker = worker(&root.join("worker/examples/hello.toml"), &addr);

    let bin_dir = bin("aiki").parent().unwrap().to_path_buf();
    let home_bin = std::env::var("HOME")
        .map(|h| format!("{h}/.cargo/bin"))
        .unwrap_or_default();
    let path = format!(
        "{}:{home_bin}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let commands = quickstart_commands(&readme);
    assert!(commands.len() >= 20, "found the quickstart's commands: {commands:?}");
    for command in commands {
        assert!(
            command.starts_with("aiki ") || command.starts_with("grpcurl "),
            "quickstart commands are aiki or grpcurl commands: {command}"
        );
        let command = command.replace("localhost:7070", &addr);
        let out = Command::new("sh")
            .arg("-c")
            .arg(&command)
            .env("PATH", &path)
            .env("AIKI_SERVER", format!("http://{addr}"))
            .env("AIKI_DATABASE_URL", &db.url)
            .output()
            .await
            .expect("sh");
        assert!(
            out.status.success(),
            "`{command}` failed ({}):\n{}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            if command.starts_with("grpcurl") {
                "\n(grpcurl: `cargo install --locked grpcurl-rs`)"
            } else {
                ""
            }
        );
    }
    let pg = db.connect().await;
    let statuses: Vec<(String, String)> = pg
        .query(
            "SELECT idempotency_key, status FROM runs WHERE idempotency_key IS NOT NULL ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        statuses,
        [
            ("hello-grace".to_owned(), "completed".to_owned()),
            ("hello-later".to_owned(), "cancelled".to_owned()),
            ("hello-linus".to_owned(), "completed".to_owned()),
        ]
    );

    // The SDK example, as built by `cargo test` (examples are built with the tests).
    let example = bin_dir.join("examples").join("quickstart");
    assert!(example.exists(), "{} not built", example.display());
    let out = Command::new(example)
        .env("AIKI_SERVER", format!("http://{addr}"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "example failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#"charge: "ch_4200""#), "{stdout}");

    // The durable example: a child run, an event, a wait that times out.
    let trial = std::fs::read_to_string(root.join("worker/examples/trial.rs")).unwrap();
    assert!(
        readme.contains(&trial),
        "README shows worker/examples/trial.rs as it is"
    );
    let out = Command::new(bin_dir.join("examples").join("trial"))
        .env("AIKI_SERVER", format!("http://{addr}"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "example failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ada: subscribed, paid 900 cents"), "{stdout}");
    assert!(stdout.contains("bob: trial ended without payment"), "{stdout}");

    worker.terminate().await;
    server.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiki_dev_starts_the_whole_stack() {
    let db = TestDb::new().await;
    // `aiki dev` takes a fixed address; find a free port for it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!("http://127.0.0.1:{port}");
    let dev = Proc::spawn(Command::new(bin("aiki")).args(["dev", "--server", &server, "--database-url", &db.url]));
    dev.wait_for("Press Ctrl-C", Duration::from_secs(90)).await;
    let line = dev.wait_for("completed with output", Duration::from_secs(1)).await;
    assert!(line.contains(r#""greeting":"hello""#), "{line}");
    let workers = aiki(&format!("127.0.0.1:{port}"), &["workers", "--output", "json"]).await;
    let workers: serde_json::Value = serde_json::from_str(&workers.stdout).unwrap();
    assert_eq!(
        workers.as_array().map(Vec::len),
        Some(1),
        "the dev worker is registered"
    );
    dev.terminate().await;
}

/// Every binary reads its log level from one variable, `AIKI_LOG` (before `RUST_LOG`), and a
/// server that starts on a database it migrated before logs no notice of the database's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_log_variable_and_a_quiet_second_start() {
    let db = TestDb::new().await;
    let (first, _) = server(&db).await;
    first.terminate().await;
    // `Proc::spawn` sets RUST_LOG=info: AIKI_LOG wins over it.
    let quiet = Proc::spawn(
        Command::new(bin("aiki-server"))
            .args(["--listen", "127.0.0.1:0", "--no-auth"])
            .env("AIKI_DATABASE_URL", &db.url)
            .env("AIKI_LOG", "info,aiki_server=debug"),
    );
    // A debug line of the server's: AIKI_LOG is honoured.
    quiet
        .wait_for("listening for ready notifications", Duration::from_secs(30))
        .await;
    let lines = quiet.lines.lock().await.clone();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("NOTICE") || l.contains("already exists")),
        "no notice of the database's at a second start:\n{}",
        lines.join("\n")
    );
    quiet.terminate().await;
}

/// `aiki dev` with a database URL on a port where nothing listens, while the local cluster
/// runs already: a cluster that runs is no failure, and the message names the port at fault,
/// at once.
#[tokio::test]
async fn aiki_dev_names_the_port_when_the_running_cluster_is_elsewhere() {
    let started = std::time::Instant::now();
    let out = Command::new(bin("aiki"))
        .args([
            "dev",
            "postgres",
            "--database-url",
            "postgres://aiki:aiki@127.0.0.1:5999/aiki",
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if root {
        assert!(stderr.contains("nothing answers at 127.0.0.1:5999"), "{stderr}");
        assert!(!stderr.contains("run as root"), "said to run as root to root: {stderr}");
    } else {
        // Without root the cluster may not be startable at all: the message says which.
        assert!(
            stderr.contains("127.0.0.1:5999") || stderr.contains("run as root"),
            "{stderr}"
        );
    }
}

/// A second `aiki dev` on an address that is taken stops at once with one message: no server,
/// worker or run of its own, no "Aiki is running", and no folder left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_aiki_dev_on_a_taken_address_stops_with_one_message() {
    let db = TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let child = Command::new(bin("aiki"))
        .args(["--server", &format!("http://{addr}"), "dev", "--database-url", &db.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("it stops by itself")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
    assert!(!stdout.contains("Aiki is running"), "{stdout}");
    assert!(!stdout.contains("started run"), "{stdout}");
    let folder = std::env::temp_dir().join(format!("aiki-dev-{pid}"));
    assert!(!folder.exists(), "{} left behind", folder.display());
}

/// A start of a workflow no live worker serves (a typo, or no worker up) says so at once, and
/// a wait that times out says why the run still waits; a served workflow starts quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_a_workflow_nobody_serves_warns() {
    let env = aiki_tests::TestEnv::new().await;
    let _worker = env
        .worker(
            aiki_worker::WorkerBuilder::new(env.url())
                .register("hello", |_ctx: aiki_worker::Context, v: serde_json::Value| async move {
                    Ok(v)
                }),
        )
        .await;
    let (ok, _, stderr) = aiki_tests::aiki_cli(&env.server, &["run", "start", "helo"]).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning: no live worker serves workflow \"helo\" on queue \"default\""),
        "{stderr}"
    );
    let (ok, _, stderr) = aiki_tests::aiki_cli(&env.server, &["run", "start", "helo", "--wait", "1"]).await;
    assert!(!ok);
    assert!(
        stderr.contains("is still queued after 1s: no live worker serves workflow \"helo\""),
        "{stderr}"
    );
    let (ok, _, stderr) = aiki_tests::aiki_cli(&env.server, &["run", "start", "hello", "--wait", "30"]).await;
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// `aiki workers` lists the live workers; one that stopped heartbeating is gone: hidden, and
/// said to be, unless `--all` asks for it, and marked so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiki_workers_hides_gone_workers_unless_asked() {
    let env = aiki_tests::TestEnv::new().await;
    let _live = env
        .worker(
            aiki_worker::WorkerBuilder::new(env.url())
                .identity("the-live-one")
                .register("hello", |_ctx: aiki_worker::Context, v: serde_json::Value| async move {
                    Ok(v)
                }),
        )
        .await;
    // Registers and never heartbeats: gone once the lease time (2 s in tests) has passed.
    let gone = aiki_tests::RawWorker::register(&env.server, &["default"]).await;
    eventually(
        Duration::from_secs(20),
        "the raw worker is gone and the other live",
        || async {
            let workers = env.client.workers().await.unwrap();
            workers.iter().any(|w| w.id == gone.id && !w.live)
                && workers.iter().any(|w| w.identity == "the-live-one" && w.live)
        },
    )
    .await;
    let (ok, stdout, stderr) = aiki_tests::aiki_cli(&env.server, &["workers"]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("the-live-one") && stdout.contains("live"), "{stdout}");
    assert!(!stdout.contains(&gone.id), "{stdout}");
    assert!(stderr.contains("1 gone worker(s) not shown"), "{stderr}");
    let (ok, stdout, _) = aiki_tests::aiki_cli(&env.server, &["workers", "--all"]).await;
    assert!(ok);
    let line = stdout
        .lines()
        .find(|l| l.contains(&gone.id))
        .expect("listed with --all");
    assert!(line.contains("gone"), "{line}");
    let (ok, stdout, _) = aiki_tests::aiki_cli(&env.server, &["workers", "--all", "-o", "json"]).await;
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == gone.id.as_str())
        .unwrap();
    assert_eq!(entry["live"], false);
}

/// Every binary's `--version` names the commit it was built from; the CLI prints completion
/// scripts for bash, zsh and fish, and its man page.
#[tokio::test]
async fn versions_name_the_commit_and_the_cli_prints_completions_and_its_man_page() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    for name in ["aiki", "aiki-server", "aiki-worker"] {
        let out = Command::new(bin(name)).arg("--version").output().await.unwrap();
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        assert!(version.contains(&format!("(commit {commit})")), "{name}: {version}");
    }
    for (shell, marker) in [
        ("bash", "complete -F _aiki"),
        ("zsh", "#compdef aiki"),
        ("fish", "complete -c aiki"),
    ] {
        let out = Command::new(bin("aiki"))
            .args(["completion", shell])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{shell}");
        assert!(String::from_utf8_lossy(&out.stdout).contains(marker), "{shell}");
    }
    let out = Command::new(bin("aiki")).arg("man").output().await.unwrap();
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        page.contains(".TH aiki 1") && page.contains("durable workflows"),
        "{page}"
    );
}

/// The LICENSE file is the license the manifest declares.
#[test]
fn the_license_file_is_the_one_the_manifest_names() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("license = \"Apache-2.0\""),
        "the workspace's license changed"
    );
    let license = std::fs::read_to_string(root.join("LICENSE")).unwrap();
    assert!(license.contains("Apache License") && license.contains("Version 2.0, January 2004"));
}

/// The systemd units of `deploy/` are valid: `systemd-analyze verify` (where it exists) finds
/// nothing to say about them, with their commands pointed at the binaries just built.
#[test]
fn the_deploy_units_verify() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = std::env::temp_dir().join(format!("aiki-units-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut units = Vec::new();
    for name in ["aiki-server", "aiki-worker"] {
        let text = std::fs::read_to_string(root.join(format!("deploy/{name}.service"))).unwrap();
        // Every line is blank, a comment, a section or a setting.
        for line in text.lines() {
            let line = line.trim();
            assert!(
                line.is_empty()
                    || line.starts_with('#')
                    || (line.starts_with('[') && line.ends_with(']'))
                    || line.contains('='),
                "{name}.service: {line:?}"
            );
        }
        assert!(
            text.contains("NoNewPrivileges=yes") && text.contains("ProtectSystem=strict"),
            "{name}: hardened"
        );
        let unit = dir.join(format!("{name}.service"));
        let local = text.replace(&format!("/usr/local/bin/{name}"), &bin(name).display().to_string());
        std::fs::write(&unit, local).unwrap();
        units.push(unit);
    }
    match std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
    {
        Ok(out) => {
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && said.trim().is_empty(),
                "systemd-analyze verify: {said}"
            );
        }
        Err(e) => eprintln!("systemd-analyze is not installed ({e}); checked the units' syntax only"),
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The protocol is plain gRPC: the Python example (stubs generated from the .proto file)
/// starts a run, waits for it and prints its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_starts_a_run_and_reads_its_result() {
    let env = aiki_tests::TestEnv::new().await;
    let _worker = env
        .worker(aiki_worker::WorkerBuilder::new(env.url()).register(
            "greet",
            |_ctx: aiki_worker::Context, input: serde_json::Value| async move {
                Ok(serde_json::json!({"greeting": format!("Hello, {}", input["name"].as_str().unwrap_or("?"))}))
            },
        ))
        .await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("python3")
        .arg(root.join("examples/python/start_and_wait.py"))
        .args([
            "--server",
            &env.server.addr.to_string(),
            "greet",
            r#"{"name":"Python"}"#,
        ])
        .output()
        .await
        .expect("python3 runs (tests/run.sh installs grpcio and grpcio-tools)");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let output: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(output, serde_json::json!({"greeting": "Hello, Python"}));
    assert!(stderr.contains("started run"), "{stderr}");
}

/// A worker not heard from for the retention is forgotten: no longer listed, even with
/// `--all`; a live one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_gone_for_the_retention_are_forgotten() {
    let env = aiki_tests::TestEnv::with_config(|c| c.worker_retention = Duration::from_secs(3)).await;
    let _live = env
        .worker(
            aiki_worker::WorkerBuilder::new(env.url())
                .identity("stays")
                .register("hello", |_ctx: aiki_worker::Context, v: serde_json::Value| async move {
                    Ok(v)
                }),
        )
        .await;
    let silent = aiki_tests::RawWorker::register(&env.server, &["default"]).await;
    assert!(env.client.workers().await.unwrap().iter().any(|w| w.id == silent.id));
    eventually(Duration::from_secs(30), "the silent worker is forgotten", || async {
        !env.client.workers().await.unwrap().iter().any(|w| w.id == silent.id)
    })
    .await;
    let workers = env.client.workers().await.unwrap();
    assert!(workers.iter().any(|w| w.identity == "stays" && w.live), "{workers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiki_dev_tls_serves_mutual_tls_and_prints_how_to_connect() {
    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let dev = Proc::spawn(Command::new(bin("aiki")).args([
        "dev",
        "--tls",
        "--server",
        &format!("http://{listen}"),
        "--database-url",
        &db.url,
    ]));
    dev.wait_for("Press Ctrl-C", Duration::from_secs(90)).await;
    let line = dev.wait_for("completed with output", Duration::from_secs(1)).await;
    assert!(
        line.contains(r#""greeting":"hello""#),
        "the dev worker ran over TLS: {line}"
    );
    let grpcurl = dev.wait_for("grpcurl -cacert", Duration::from_secs(1)).await;
    assert!(grpcurl.contains(&listen), "{grpcurl}");
    // `export AIKI_SERVER=https://... AIKI_TLS_CA=... AIKI_TLS_CERT=... AIKI_TLS_KEY=...`
    let export = dev.wait_for("export AIKI_SERVER=", Duration::from_secs(1)).await;
    let vars: Vec<(String, String)> = export
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(vars.len(), 4, "{export}");
    assert_eq!(vars[0].1, format!("https://{listen}"));

    let run = |vars: Vec<(String, String)>| async move {
        Command::new(bin("aiki"))
            .args(["workers", "--output", "json"])
            .env_remove("AIKI_TLS_CERT")
            .env_remove("AIKI_TLS_KEY")
            .envs(vars)
            .output()
            .await
            .expect("run aiki")
    };
    let out = run(vars.clone()).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let workers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        workers.as_array().map(Vec::len),
        Some(1),
        "the dev worker is registered"
    );
    // Without the client certificate the server refuses the CLI.
    let out = run(vars[..2].to_vec()).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unavailable"), "{err}");
    dev.terminate().await;
}

/// `--server host:port` (the form grpcurl takes) means plain HTTP/2; an address where nothing
/// listens is named in the error, with the likely cause and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_address_without_a_scheme_works_and_a_refused_one_is_explained() {
    let env = aiki_tests::TestEnv::new().await;
    let out = Command::new(bin("aiki"))
        .args(["--server", &env.server.addr.to_string(), "queues"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(bin("aiki"))
        .args(["--server", &nobody.to_string(), "queues"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot connect to http://{nobody}"))
            && stderr.contains("is a server running there? (`aiki dev` starts one)")
            && stderr.contains("http:// was assumed"),
        "{stderr}"
    );
}

/// `aiki-worker` started before its server waits for it, saying so, instead of exiting; once
/// the server is up it registers and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiki_worker_waits_for_a_server_that_is_not_up_yet() {
    let db = TestDb::new().await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = temp_dir("wait");
    let config = dir.join("worker.toml");
    std::fs::write(&config, "[workflows.echo]\ncommand = [\"cat\"]\n").unwrap();
    let mut w = worker(&config, &addr.to_string());
    w.wait_for("waiting for the server", Duration::from_secs(30)).await;
    assert!(matches!(w.child.try_wait(), Ok(None)), "the worker is still running");
    // The server comes up on that address.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(aiki_server::serve(
        aiki_tests::Config::for_test(&db.url),
        listener,
        stop.clone(),
    ));
    w.wait_for("worker registered", Duration::from_secs(30)).await;
    let client = aiki::Client::connect(format!("http://{addr}")).await.unwrap();
    let run = client
        .start_run(
            "echo",
            &serde_json::json!({"late": true}),
            aiki::StartOptions::default(),
        )
        .await
        .unwrap();
    let out: serde_json::Value = run.result(Duration::from_secs(30)).await.unwrap();
    assert_eq!(out, serde_json::json!({"late": true}));
    w.terminate().await;
    stop.cancel();
    served.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// An address where nothing listens: a command of the CLI says so and exits 1 at once, rather
/// than retrying for seconds.
#[tokio::test]
async fn a_refused_connection_fails_the_cli_within_a_second() {
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(bin("aiki"))
        .args(["--server", &format!("http://{nobody}"), "workers"])
        .env_remove("AIKI_TLS_CA")
        .env_remove("AIKI_TLS_CERT")
        .env_remove("AIKI_TLS_KEY")
        .output()
        .await
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot connect to http://{nobody}"))
            && stderr.contains("is a server running there? (`aiki dev` starts one)"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// `Client::connect` to an address where nothing listens, or to a host name that does not
/// resolve, is `Unavailable` at once, with the likely cause.
#[tokio::test]
async fn client_connect_where_nothing_listens_fails_within_a_second() {
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = std::time::Instant::now();
    let err = aiki::Client::connect(format!("http://{nobody}")).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(&err, aiki::Error::Unavailable(m)
            if m.contains(&format!("cannot connect to http://{nobody}")) && m.contains("is a server running there?")),
        "{err}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // `.invalid` never resolves (RFC 6761); how long the resolver takes to say so is its own.
    let err = aiki::Client::connect("http://aiki-test.invalid:7070")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, aiki::Error::Unavailable(m) if m.contains("dns error") && m.contains("is the host name right?")),
        "{err}"
    );
}
