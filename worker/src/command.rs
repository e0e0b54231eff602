//! Workflows defined as commands, for the `aiki-worker` binary.
//!
//! Each workflow runs one command as one checkpointed task: the run's input as JSON on stdin,
//! its output as JSON on stdout (empty stdout is `null`). A non-zero exit fails the attempt
//! with the command's stderr; exit codes listed in `non_retryable_exit_codes` end the run at
//! once. A command that outlives its `timeout` is killed and the attempt fails `Timeout`.
//!
//! A command runs in its own process group, killed whole when its attempt ends. A [`Runner`]
//! with a [`guard::Guard`] also has it killed when the worker process dies, however it dies;
//! the `aiki-worker` binary runs every command so.

pub mod guard;

use std::{collections::BTreeMap, path::PathBuf, process::Stdio, time::Duration};

use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::{Context, WorkflowError};

/// The `aiki-worker` configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Server address [default: http://127.0.0.1:7070].
    #[serde(default = "default_server")]
    pub server: String,
    /// Namespace [default: "default"].
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// A name for people [default: host:pid].
    #[serde(default)]
    pub identity: Option<String>,
    /// Queues to serve [default: ["default"]].
    #[serde(default = "default_queues")]
    pub queues: Vec<String>,
    /// Runs executed at once [default: 4].
    #[serde(default = "default_slots")]
    pub slots: usize,
    /// How long shutdown lets running commands finish before releasing them [default: 30s].
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The version of the workflows this worker serves [default: none]; see
    /// `WorkerBuilder::version`.
    #[serde(default)]
    pub version: Option<String>,
    /// PEM CA certificates an `https://` server's certificate must chain to [default: the
    /// system's roots]. Relative paths are relative to the working directory.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (mutual TLS); needs `tls_key`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Workflow name → command.
    pub workflows: BTreeMap<String, CommandSpec>,
}

/// One workflow's command.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Program and arguments, e.g. `["python3", "charge.py"]`.
    pub command: Vec<String>,
    /// Killed and failed after this long [default: 5m].
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory [default: the worker's].
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Exit codes that end the run at once instead of being retried.
    #[serde(default)]
    pub non_retryable_exit_codes: Vec<i32>,
}

fn default_server() -> String {
    "http://127.0.0.1:7070".into()
}
fn default_namespace() -> String {
    "default".into()
}
fn default_queues() -> Vec<String> {
    vec!["default".into()]
}
fn default_slots() -> usize {
    4
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_timeout() -> Duration {
    Duration::from_secs(300)
}

impl Config {
    /// Parses and checks a configuration file's text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let c: Config = toml::from_str(text)?;
        anyhow::ensure!(!c.workflows.is_empty(), "the config defines no [workflows.NAME] entry");
        for (name, w) in &c.workflows {
            anyhow::ensure!(!w.command.is_empty(), "workflows.{name}.command is empty");
            anyhow::ensure!(!w.timeout.is_zero(), "workflows.{name}.timeout must be positive");
        }
        anyhow::ensure!(c.slots >= 1, "slots must be at least 1");
        Ok(c)
    }
}

/// Sends SIGKILL to a process group when dropped.
struct GroupGuard(nix::unistd::Pid);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        // ESRCH (the group is gone already) is the common case.
        let _ = nix::sys::signal::killpg(self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Most bytes of stderr kept in an error.
const STDERR_LIMIT: usize = 8 * 1024;

/// How commands are started: directly, or under a [`guard::Guard`].
#[derive(Debug, Clone, Default)]
pub struct Runner {
    guard: Option<guard::Guard>,
}

impl Runner {
    /// Starts commands directly. A command is killed when its attempt ends, but it outlives a
    /// worker process that dies (SIGKILL, a crash) before the attempt ends.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts every command under `guard`, which kills the command's whole process group when
    /// this process dies, however it dies (see [`guard`]).
    pub fn guarded(guard: guard::Guard) -> Self {
        Self { guard: Some(guard) }
    }

    /// Runs `spec` for one run, as the task "command": a re-executed run whose command already
    /// succeeded gets the recorded output back without running it again.
    pub async fn run(
        &self,
        spec: &CommandSpec,
        ctx: Context,
        input: serde_json::Value,
    ) -> Result<serde_json::Value, WorkflowError> {
        let run_id = ctx.run_id().to_owned();
        let attempt = ctx.attempt();
        ctx.task("command", input, |input| self.exec(spec, &run_id, attempt, input))
            .await
    }

    /// Runs `spec` once with `input`, as attempt `attempt` of run `run_id`, without a
    /// checkpoint: what [`Runner::run`] records.
    pub async fn exec(
        &self,
        spec: &CommandSpec,
        run_id: &str,
        attempt: u32,
        input: serde_json::Value,
    ) -> Result<serde_json::Value, WorkflowError> {
        exec(spec, self.guard.as_ref(), run_id, attempt, input).await
    }
}

/// Runs `spec` for one run, as the task "command", started directly: [`Runner::run`] of
/// [`Runner::new`].
pub async fn run(
    spec: &CommandSpec,
    ctx: Context,
    input: serde_json::Value,
) -> Result<serde_json::Value, WorkflowError> {
    Runner::new().run(spec, ctx, input).await
}

async fn exec(
    spec: &CommandSpec,
    guard: Option<&guard::Guard>,
    run_id: &str,
    attempt: u32,
    input: serde_json::Value,
) -> Result<serde_json::Value, WorkflowError> {
    let cannot_start = |e: &dyn std::fmt::Display| {
        WorkflowError::new("Spawn", format!("cannot start {:?}: {e}", spec.command[0])).non_retryable()
    };
    let mut cmd = match guard {
        // The kernel sends the guard its parent-death signal when the thread that started it
        // exits, not the process: here a tokio runtime's worker thread, which lives as long as
        // the runtime. (The guard also checks that the worker process is gone before it acts.)
        Some(guard) => guard.command(&spec.command),
        None => {
            let mut cmd = tokio::process::Command::new(&spec.command[0]);
            cmd.args(&spec.command[1..]);
            cmd
        }
    };
    // The guard, if any, passes its environment, working directory and stdin to the command.
    cmd.envs(&spec.env)
        .env("AIKI_RUN_ID", run_id)
        .env("AIKI_ATTEMPT", attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that everything it starts can be stopped with it.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().map_err(|e| cannot_start(&e))?;
    // Kills the whole group when this attempt ends in any way: done, timed out, or dropped
    // because the lease was lost or the run cancelled.
    let _group = child.id().map(|pid| GroupGuard(nix::unistd::Pid::from_raw(pid as i32)));
    let stdin_bytes = serde_json::to_vec(&input).map_err(|e| WorkflowError::new("Serialization", e.to_string()))?;
    let mut stdin = child.stdin.take();
    let feed = async move {
        if let Some(stdin) = stdin.as_mut() {
            // A command that does not read its input is not an error.
            let _ = stdin.write_all(&stdin_bytes).await;
            let _ = stdin.shutdown().await;
        }
    };
    let run = async {
        let ((), out) = tokio::join!(feed, child.wait_with_output());
        out
    };
    let out = match tokio::time::timeout(spec.timeout, run).await {
        Ok(out) => out.map_err(|e| WorkflowError::new("Io", format!("waiting for the command: {e}")))?,
        Err(_) => {
            return Err(WorkflowError::new(
                "Timeout",
                format!(
                    "the command ran longer than {} and was killed",
                    humantime_serde::re::humantime::format_duration(spec.timeout)
                ),
            ));
        }
    };
    let stdout = match guard {
        Some(_) => guard::command_stdout(out.stdout).map_err(|e| cannot_start(&e))?,
        None => out.stdout,
    };
    if !out.status.success() {
        let code = out.status.code();
        // NUL cannot be stored in a JSON text; keep everything else.
        let mut stderr = String::from_utf8_lossy(&out.stderr).replace('\0', "\u{fffd}");
        if stderr.len() > STDERR_LIMIT {
            let cut = (0..=STDERR_LIMIT)
                .rev()
                .find(|i| stderr.is_char_boundary(*i))
                .unwrap_or(0);
            stderr.truncate(cut);
            stderr.push('…');
        }
        let what = match code {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_owned(),
        };
        let message = if stderr.trim().is_empty() {
            what.clone()
        } else {
            format!("{what}: {}", stderr.trim_end())
        };
        let err = WorkflowError::new("ExitStatus", message)
            .with_details(serde_json::json!({"exit_code": code, "stderr": stderr}));
        return Err(match code {
            Some(c) if spec.non_retryable_exit_codes.contains(&c) => err.non_retryable(),
            _ => err,
        });
    }
    let stdout = String::from_utf8_lossy(&stdout);
    if stdout.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(stdout.trim()).map_err(|e| {
        let head: String = stdout.chars().take(200).collect();
        WorkflowError::new(
            "InvalidOutput",
            format!("the command's stdout is not JSON ({e}): {head}"),
        )
        .non_retryable()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cmd: &[&str]) -> CommandSpec {
        CommandSpec {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_secs(5),
            env: BTreeMap::new(),
            cwd: None,
            non_retryable_exit_codes: vec![3],
        }
    }

    #[tokio::test]
    async fn stdin_to_stdout() {
        let out = Runner::new()
            .exec(&spec(&["cat"]), "r", 1, serde_json::json!({"a": 1}))
            .await
            .unwrap();
        assert_eq!(out, serde_json::json!({"a": 1}));
    }

    #[tokio::test]
    async fn failure_carries_stderr_and_exit_code() {
        let e = Runner::new()
            .exec(
                &spec(&["sh", "-c", "echo nope >&2; exit 2"]),
                "r",
                1,
                serde_json::Value::Null,
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, "ExitStatus");
        assert!(e.message.contains("nope"), "{}", e.message);
        assert_eq!(
            e.details.as_ref().and_then(|d| d.get("exit_code")),
            Some(&serde_json::json!(2))
        );
        assert!(!e.non_retryable);
        let e = Runner::new()
            .exec(&spec(&["sh", "-c", "exit 3"]), "r", 1, serde_json::Value::Null)
            .await
            .unwrap_err();
        assert!(e.non_retryable);
    }

    #[tokio::test]
    async fn timeout_kills() {
        let mut s = spec(&["sleep", "10"]);
        s.timeout = Duration::from_millis(100);
        let e = Runner::new()
            .exec(&s, "r", 1, serde_json::Value::Null)
            .await
            .unwrap_err();
        assert_eq!(e.kind, "Timeout");
    }

    #[tokio::test]
    async fn a_timed_out_command_takes_what_it_started_with_it() {
        let dir = std::env::temp_dir().join(format!("aiki-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("grandchild.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let mut s = spec(&["sh", "-c", &script]);
        s.timeout = Duration::from_secs(2);
        let e = Runner::new()
            .exec(&s, "r", 1, serde_json::Value::Null)
            .await
            .unwrap_err();
        assert_eq!(e.kind, "Timeout");
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
        // Gone, or a zombie waiting for its new parent to reap it: either way not running.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
            let running = state
                .as_deref()
                .and_then(|s| s.rsplit(')').next())
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'));
            if !running {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the grandchild {pid} still runs");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn config_defaults_and_errors() {
        let c = Config::parse("[workflows.echo]\ncommand = [\"cat\"]\n").unwrap();
        assert_eq!(c.queues, vec!["default"]);
        assert_eq!(c.workflows["echo"].timeout, Duration::from_secs(300));
        assert!(Config::parse("[workflows.echo]\ncommand = []\n").is_err());
        assert!(Config::parse("slots = 2\n").is_err());
    }
}
