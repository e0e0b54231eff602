//! The guard: a small process between the worker and a command that kills the command's whole
//! process group when the worker dies, however it dies (SIGKILL included).
//!
//! A command runs in its own process group, which the worker kills when the attempt ends. A
//! worker that dies ends nothing: without the guard its commands would go on, side effects and
//! all, while their runs are leased again and executed elsewhere. Linux ties a process to its
//! parent with the parent-death signal (`PR_SET_PDEATHSIG`), but a command can only be given one
//! between fork and exec (`CommandExt::pre_exec`), which needs `unsafe` code, forbidden in this
//! workspace. So the worker starts its own executable in guard mode instead
//! (`aiki-worker __guard WORKER_PID PROGRAM ARGS…`, see [`main`]), as the leader of a new
//! process group, and the guard:
//!
//! 1. catches SIGTERM and asks for SIGTERM when its parent dies;
//! 2. checks that its parent is still `WORKER_PID` (the worker may have died before step 1, and
//!    then no signal comes);
//! 3. starts the command in its own group: stdin inherited, stdout and stderr through pipes it
//!    copies to its own;
//! 4. on SIGTERM once its parent is gone, kills its whole group with SIGKILL, itself included
//!    (a SIGTERM while the worker lives, from a service manager stopping every process of the
//!    service say, is left alone: the worker decides when its attempts end);
//! 5. once the command has exited and its stdout and stderr are closed, exits the same way: the
//!    same exit code, or killed by a signal (SIGKILL) if a signal killed the command.
//!
//! The guard copies stdout and stderr instead of handing the worker's pipes to the command so
//! that it lives as long as the worker waits for them: whatever the command left running in the
//! background with them open stays guarded. The guard's stdout begins with one byte, so that the
//! worker can tell a command that could not be started (a `Spawn` error, as without a guard)
//! from one that failed: `+` followed by the command's stdout, or `!` followed by the error.
//!
//! The parent-death signal is Linux's; elsewhere the guard only checks its parent at start.

use std::{
    ffi::OsString,
    path::PathBuf,
    process::{ExitStatus, Stdio},
};

use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::{Pid, getpgrp, getpid, getppid},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    signal::unix::{SignalKind, signal},
};

/// The first argument that turns the `aiki-worker` executable into a guard.
pub const ARG: &str = "__guard";

/// The first byte of a guard's stdout when the command started; the command's stdout follows.
const STARTED: u8 = b'+';
/// The first byte of a guard's stdout when the command could not be started; the error follows.
const NOT_STARTED: u8 = b'!';

/// The program that guards commands: an executable that calls [`main`] when its first argument
/// is [`ARG`], as `aiki-worker` does.
#[derive(Debug, Clone)]
pub struct Guard {
    program: PathBuf,
}

impl Guard {
    /// `program` as the guard.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
        }
    }

    /// The running executable as the guard. On Linux that is `/proc/self/exe`, which names the
    /// running image even after its file was replaced or removed (a deploy that installs a new
    /// binary while this worker drains); elsewhere [`std::env::current_exe`].
    pub fn this_executable() -> std::io::Result<Self> {
        if cfg!(target_os = "linux") {
            Ok(Self::new("/proc/self/exe"))
        } else {
            std::env::current_exe().map(Self::new)
        }
    }

    /// A command that starts `command` (program and arguments) under this guard, on behalf of
    /// the calling process. Start it as the leader of a new process group.
    pub(crate) fn command(&self, command: &[String]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.program);
        // What `ps` shows, rather than `/proc/self/exe`.
        cmd.arg0("aiki-worker")
            .arg(ARG)
            .arg(std::process::id().to_string())
            .args(command);
        cmd
    }
}

/// What a guard's stdout says: the command's stdout, or why the command could not be started.
pub(crate) fn command_stdout(mut stdout: Vec<u8>) -> Result<Vec<u8>, String> {
    match stdout.first() {
        Some(&STARTED) => {
            stdout.remove(0);
            Ok(stdout)
        }
        Some(&NOT_STARTED) => Err(String::from_utf8_lossy(&stdout[1..]).into_owned()),
        // A guard killed before it could say (the attempt's end, or the worker's) leaves nothing.
        _ => Ok(stdout),
    }
}

/// Runs this process as a guard (see the module's documentation), given the arguments after
/// [`ARG`]: the worker's pid, then the command's program and arguments. Never returns.
pub fn main(mut args: impl Iterator<Item = OsString>) -> ! {
    let parent = args.next().and_then(|a| a.to_str()?.parse::<i32>().ok());
    let program = args.next();
    let (Some(parent), Some(program)) = (parent, program) else {
        eprintln!("aiki-worker {ARG}: expected the worker's pid, then a program and its arguments");
        std::process::exit(2);
    };
    // Killing its group must never hit anyone else's: the worker starts it as a group leader.
    if getpgrp() != getpid() {
        eprintln!("aiki-worker {ARG}: must be started as the leader of a new process group");
        std::process::exit(2);
    }
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        kill_group();
    };
    let status = runtime.block_on(guard(Pid::from_raw(parent), program, args.collect()));
    match status.code() {
        Some(code) => std::process::exit(code),
        // Killed by a signal: so is the guard, for the worker to see the same.
        None => {
            let _ = kill(getpid(), Signal::SIGKILL);
            std::process::abort();
        }
    }
}

/// Starts the command and returns how it ended once its stdout and stderr are closed too;
/// kills the group once `parent` is gone.
async fn guard(parent: Pid, program: OsString, args: Vec<OsString>) -> ExitStatus {
    // SIGTERM is caught, not blocked: the command would inherit a signal mask, while exec
    // resets a caught signal to its default.
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        kill_group();
    };
    #[cfg(target_os = "linux")]
    if nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).is_err() {
        kill_group();
    }
    // Reparented already: the worker died before the death signal was asked for.
    if getppid() != parent {
        kill_group();
    }
    let watch = async {
        loop {
            term.recv().await;
            // The kernel reparents a process before it sends it the parent-death signal. The
            // signal also comes when only the thread that started the guard exits; the guard is
            // then the child of another of the worker's threads, and gets it again when that
            // one exits.
            if getppid() != parent {
                kill_group();
            }
        }
    };
    tokio::select! {
        never = watch => never,
        status = run(program, args) => status,
    }
}

/// Runs the command, stdin inherited, stdout and stderr copied to the guard's own.
async fn run(program: OsString, args: Vec<OsString>) -> ExitStatus {
    let mut out = tokio::io::stdout();
    let spawned = tokio::process::Command::new(&program)
        .args(args)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = out.write_all(&[NOT_STARTED]).await;
            let _ = out.write_all(e.to_string().as_bytes()).await;
            let _ = out.flush().await;
            std::process::exit(127);
        }
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        kill_group();
    };
    let copy_stdout = async {
        if out.write_all(&[STARTED]).await.is_ok() {
            copy(stdout, out).await;
        }
    };
    let ((), (), status) = tokio::join!(copy_stdout, copy(stderr, tokio::io::stderr()), child.wait());
    let Ok(status) = status else {
        kill_group();
    };
    status
}

/// Copies `from` to `to` until `from` ends or `to` fails (the worker no longer reads: the
/// attempt has ended, and the group is being killed).
async fn copy(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.flush().await;
}

/// Kills the guard's process group, the guard included.
fn kill_group() -> ! {
    let _ = killpg(getpgrp(), Signal::SIGKILL);
    // Not reached: the signal is delivered before `killpg` returns to this process.
    std::process::abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_byte_of_the_guards_stdout_says_whether_the_command_started() {
        assert_eq!(command_stdout(b"+{\"a\":1}".to_vec()), Ok(b"{\"a\":1}".to_vec()));
        assert_eq!(command_stdout(b"+".to_vec()), Ok(Vec::new()));
        assert_eq!(
            command_stdout(b"!No such file or directory (os error 2)".to_vec()),
            Err("No such file or directory (os error 2)".to_owned())
        );
        assert_eq!(command_stdout(Vec::new()), Ok(Vec::new()));
    }

    #[test]
    fn the_guard_command_names_the_worker_and_the_command() {
        let cmd = Guard::new("/bin/guard").command(&["sh".into(), "-c".into(), "exit 3".into()]);
        let cmd = cmd.as_std();
        assert_eq!(cmd.get_program(), "/bin/guard");
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap().to_owned()).collect();
        assert_eq!(args, [ARG, &std::process::id().to_string(), "sh", "-c", "exit 3"]);
    }
}
