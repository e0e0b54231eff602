//! Commands under the `aiki-worker` executable as their guard (`command::guard`), without a
//! server: they behave as commands started directly, and the guard itself refuses to start a
//! command for a worker already gone and leaves alone a SIGTERM while its worker lives.
//! `tests/tests/binaries.rs` kills a real worker under its commands.

use std::{
    collections::BTreeMap,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use aiki_worker::command::{
    CommandSpec, Runner,
    guard::{ARG, Guard},
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// A runner with this package's `aiki-worker` as the guard.
fn guarded() -> Runner {
    Runner::guarded(Guard::new(env!("CARGO_BIN_EXE_aiki-worker")))
}

fn spec(cmd: &[&str]) -> CommandSpec {
    CommandSpec {
        command: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_secs(10),
        env: BTreeMap::new(),
        cwd: None,
        non_retryable_exit_codes: vec![3],
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aiki-guard-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether `pid` runs: it exists and is not a zombie.
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

#[tokio::test]
async fn a_guarded_command_behaves_as_a_direct_one() {
    let dir = temp_dir("same");
    let mut with_env = spec(&[
        "sh",
        "-c",
        r#"printf '{"env":"%s","run":"%s","attempt":%s,"cwd":"%s"}' "$GREETING" "$AIKI_RUN_ID" "$AIKI_ATTEMPT" "$(pwd)""#,
    ]);
    with_env.env.insert("GREETING".into(), "hello".into());
    with_env.cwd = Some(dir.clone());
    let mut missing_cwd = spec(&["cat"]);
    missing_cwd.cwd = Some(dir.join("missing"));
    let cases = [
        spec(&["cat"]),
        spec(&["true"]),
        with_env,
        // What the command leaves in the background is waited for while it holds stdout.
        spec(&["sh", "-c", r#"(sleep 0.2; echo '{"late":true}') & exit 0"#]),
        spec(&["sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' ' '; echo 1"]),
        spec(&["sh", "-c", "echo nope >&2; exit 2"]),
        spec(&["sh", "-c", "echo no retry >&2; exit 3"]),
        spec(&["sh", "-c", "echo killed >&2; kill -9 $$"]),
        spec(&["sh", "-c", "kill -TERM $$"]),
        // The command's signal mask and ignored signals are not the guard's.
        spec(&["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]),
        spec(&["sh", "-c", "echo not json"]),
        spec(&["no-such-program-aiki"]),
        missing_cwd,
    ];
    for case in cases {
        let input = serde_json::json!({"a": 1});
        let direct = Runner::new().exec(&case, "r1", 2, input.clone()).await;
        let guarded = guarded().exec(&case, "r1", 2, input).await;
        let view = |r: Result<serde_json::Value, aiki_worker::WorkflowError>| {
            r.map_err(|e| (e.kind, e.message, e.details, e.non_retryable))
        };
        assert_eq!(view(guarded), view(direct), "{:?}", case.command);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_guarded_command_that_times_out_takes_what_it_started_with_it() {
    let dir = temp_dir("timeout");
    let pidfile = dir.join("grandchild.pid");
    let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
    let mut s = spec(&["sh", "-c", &script]);
    s.timeout = Duration::from_secs(2);
    let e = guarded().exec(&s, "r", 1, serde_json::Value::Null).await.unwrap_err();
    assert_eq!(e.kind, "Timeout");
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while running(&pid) {
        assert!(std::time::Instant::now() < deadline, "the grandchild {pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_guard_whose_worker_is_gone_starts_nothing() {
    let dir = temp_dir("orphan");
    let marker = dir.join("ran");
    // Its parent is this test, not the process it is told is its worker.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_aiki-worker"))
        .args([ARG, "1", "touch"])
        .arg(&marker)
        .process_group(0)
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(9), "{status}");
    assert!(!marker.exists(), "the command ran");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_guard_leaves_a_sigterm_alone_while_its_worker_lives() {
    let mut guard = tokio::process::Command::new(env!("CARGO_BIN_EXE_aiki-worker"))
        .args([ARG, &std::process::id().to_string()])
        .args(["sh", "-c", "echo ready; read line; echo \"$line\""])
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = guard.id().unwrap();
    let mut stdout = tokio::io::BufReader::new(guard.stdout.take().unwrap());
    // The command has started, so the guard catches SIGTERM.
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), stdout.read_line(&mut line))
        .await
        .expect("the command starts")
        .unwrap();
    assert_eq!(line, "+ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // No longer pending: the guard has taken it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let pending = status
            .lines()
            .filter(|l| l.starts_with("ShdPnd:") || l.starts_with("SigPnd:"))
            .any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|m| !m.trim_start_matches('0').is_empty())
            });
        if !pending {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "SIGTERM still pending");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut stdin = guard.stdin.take().unwrap();
    stdin.write_all(b"still here\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), stdout.read_to_string(&mut out))
        .await
        .expect("the command ends")
        .unwrap();
    let status = guard.wait().await.unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(out, "still here\n");
}
