//! `aiki bench`: measures Aiki's throughput and start latency, and the server's memory.
//!
//! By default it brings up a stack of its own: PostgreSQL (through [`dev::ensure_postgres`]), a
//! database that it drops and creates again (`aiki_bench`), one `aiki-server` on a free
//! loopback port, and `--workers` worker processes. The workers are this very binary running
//! the hidden `aiki bench-worker` command on the worker runtime ([`aiki_worker`]); they serve
//! one workflow, `bench.noop`, whose body records one durable task and returns the time it
//! started. With `--server` it uses a running server instead (and still starts its workers).
//! With `--tls` its own server serves TLS with a certificate of a CA made for the bench, and
//! the clients and workers connect over `https://` trusting that CA, so that the figures can be
//! compared with a plain run; a server given with `--server https://…` is reached with the
//! global `--tls-ca`, `--tls-cert` and `--tls-key`. Everything a connection needs is in
//! [`Access`], which the bench hands to its own clients and, as flags, to its workers.
//!
//! The phases, in order (`--phases` picks some):
//!
//! 1. `enqueue-single`: `--runs` single `StartRun` calls, `--in-flight` at a time, over a few
//!    connections, into a queue no worker serves. Figure: runs per second of the whole phase.
//! 2. `enqueue-batch`: the same number of runs through `StartRuns`, `--batch-size` runs per
//!    call and `--batch-in-flight` calls at a time, into queue `bench`. Figure: runs per second.
//!    These runs are the work of the drain.
//! 3. `drain`: `--workers` processes with `--slots` slots each work the queued runs off. The
//!    workers connect first and start together on a signal; the clock runs from that signal
//!    until the workers have had all `--runs` completions acknowledged by the server (so
//!    committed). The bench follows the counts the workers print rather than querying the
//!    database, and checks afterwards, untimed, that the server counts them all completed.
//!    With `--backlog M`, M more runs (of workflow `bench.backlog`, the same body) are queued
//!    (unmeasured) before phase 2 at a lower priority: they are leased only after the measured
//!    runs, so the drain works against a table and index holding M more ready runs, and the
//!    rate counts the measured runs only. With `--checkpoint`, PostgreSQL checkpoints
//!    (untimed) before the workers start: writing a million runs sets off a checkpoint that
//!    would otherwise run during the drain (each page's first change after it starts is logged
//!    whole), so the drain would measure the backlog's writing rather than its claiming.
//!    Figure: runs completed per second, end to end (poll, lease, one checkpointed task,
//!    completion).
//! 4. `latency`: with the workers idle, `StartRun` calls are offered at `--rate` per second for
//!    `--latency-secs`, paced by a timer that catches up on missed ticks (so the offered rate
//!    holds), each with the time just before the call as input. Once all completed, each run's
//!    start latency is the time its workflow body started minus that time (same clock: the
//!    workers run on this machine). Figures: p50, p95, p99 and max in milliseconds.
//!
//! Memory: the server's peak resident set over the whole bench (`VmHWM` of `/proc/<pid>/status`
//! at the end, or the highest `VmRSS` sampled every 50 ms if higher: the kernel updates
//! `VmHWM` lazily), and the peak of `VmRSS` sampled during the drain; with `--server`, only if
//! `--server-pid` is given. The workers' peak is reported too.
//!
//! A phase that makes no progress for `--stall-timeout` aborts the bench with a message saying
//! what it waited for. At the end the workers and the server are stopped (SIGTERM, then a kill
//! after 10 s) and the database is dropped, unless `--keep`.

use std::{
    ffi::OsString,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aiki::{Client, ListFilter, RunStatus, StartOptions};
use aiki_worker::{Context as WorkflowContext, WorkflowError};
use anyhow::{Context, anyhow, bail};
use clap::{Args, ValueEnum};
use comfy_table::{Table, presets::NOTHING};
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
};

use crate::dev;

/// The one workflow of the bench workers.
const WORKFLOW: &str = "bench.noop";
/// The workflow of the backlog's runs: the same body, counted apart from the measured runs.
const BACKLOG_WORKFLOW: &str = "bench.backlog";
/// Queue of `enqueue-single`: no worker serves it.
const QUEUE_SINGLE: &str = "bench-single";
/// Queue of `enqueue-batch` and `drain` (and of the backlog).
const QUEUE_DRAIN: &str = "bench";
/// Queue of `latency`.
const QUEUE_LATENCY: &str = "bench-latency";
/// Priority of the measured runs; the backlog has a lower one.
const PRIORITY: i32 = 0;
const BACKLOG_PRIORITY: i32 = -1;
/// How often queue depths (and the server's memory) are read while runs are worked off.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// How often a worker says how many drain runs it has completed (when the count changed): the
/// drain's clock stops on the line that brings the total to `--runs`, so this is its precision.
const REPORT_EVERY: Duration = Duration::from_millis(5);
/// How long workers and the server may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Most runs `StartRuns` takes in one call.
const MAX_BATCH: usize = 1000;

/// The phases of `aiki bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    /// Single StartRun calls, --in-flight at a time.
    EnqueueSingle,
    /// StartRuns calls of --batch-size runs.
    EnqueueBatch,
    /// Workers work off the queued runs, end to end.
    Drain,
    /// Start latency at an offered rate.
    Latency,
}

impl Phase {
    const ALL: [Phase; 4] = [Phase::EnqueueSingle, Phase::EnqueueBatch, Phase::Drain, Phase::Latency];

    fn name(self) -> &'static str {
        match self {
            Phase::EnqueueSingle => "enqueue-single",
            Phase::EnqueueBatch => "enqueue-batch",
            Phase::Drain => "drain",
            Phase::Latency => "latency",
        }
    }
}

/// `aiki bench`: see the module docs (and `aiki bench --help`).
#[derive(Debug, Args)]
#[command(after_long_help = format!("{AFTER_HELP}\n\n{}", crate::examples::BENCH), next_display_order = 100)]
pub struct BenchArgs {
    /// Runs per phase: StartRun calls of enqueue-single, runs of enqueue-batch and of the drain.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// StartRun calls at a time in enqueue-single.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    in_flight: u64,
    /// Runs per StartRuns call (enqueue-batch, backlog).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=MAX_BATCH as u64))]
    batch_size: u64,
    /// StartRuns calls at a time.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
    batch_in_flight: u64,
    /// Runs started (half in single calls, half in batches) before anything is measured, so
    /// that the server's connections are open and its statements prepared; 0 skips the warm-up.
    #[arg(long, default_value_t = 10_000)]
    warmup: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    workers: u64,
    /// Slots (runs executing at once) per worker. A one-task run spends most of its life
    /// waiting for its two group commits, so a worker keeps many in flight.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    slots: u64,
    /// Most runs a worker leases per poll (1 to 1000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1000))]
    poll_batch: u32,
    /// Extra runs queued, at a lower priority, in the drained queue before the drain.
    #[arg(long, default_value_t = 0)]
    backlog: u64,
    /// Before the drain (untimed), have PostgreSQL write out every page the enqueue phases
    /// dirtied (CHECKPOINT), so that the drain does not pay for that writing as well as its
    /// own: with a deep --backlog, the checkpoint of the backlog's pages otherwise runs during
    /// the drain. Needs the bench's own database (not --server) and a role that may checkpoint.
    #[arg(long)]
    checkpoint: bool,
    /// Runs per second offered in the latency phase.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rate: u64,
    /// Seconds the latency phase offers runs for.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    latency_secs: u64,
    /// Phases to run (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "enqueue-single,enqueue-batch,drain,latency"
    )]
    phases: Vec<Phase>,
    /// PostgreSQL URL of the bench database, which is DROPPED and created again; its name must
    /// contain "bench" [default: the dev database URL with database aiki_bench].
    #[arg(long, env = "AIKI_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// With --server: the server's process id, to read its memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Keep the bench database and the processes' logs.
    #[arg(long)]
    keep: bool,
    /// Abort a phase that makes no progress for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    stall_timeout: Duration,
    /// Serve the bench's own server over TLS, with a certificate of a CA made for the bench,
    /// and connect the clients and workers over https:// trusting it. With --server, give an
    /// https:// address and --tls-ca (--tls-cert, --tls-key) instead.
    #[arg(long)]
    tls: bool,
    /// Require API keys on the bench's own server: its clients send a key of the admin role
    /// (they also list queues and workers), its workers one of the worker role, each made
    /// through a bootstrap admin key. With --server, the global --api-key is sent instead.
    #[arg(long)]
    api_keys: bool,
}

const AFTER_HELP: &str = "\
Without --server, aiki bench starts PostgreSQL if needed, drops and creates the bench database,
and starts one aiki-server (found next to this binary) on a free loopback port. With --server
ADDR (or AIKI_SERVER) it uses that server. Either way it starts --workers worker processes
(`aiki bench-worker`) serving the workflow bench.noop, and works in namespaces of its own
(bench-<time>-<pid>, or --namespace). With --tls its own server serves TLS (a CA and a
certificate made for the bench) and every connection is https://; a --server https://… is
reached with --tls-ca, --tls-cert and --tls-key.

Phases:
  enqueue-single  --runs StartRun calls, --in-flight at a time           -> runs/s
  enqueue-batch   --runs runs in StartRuns calls of --batch-size          -> runs/s
  drain           workers work those runs off, from their start signal
                  until all are completed (with --backlog M: M more runs
                  queued at a lower priority stay in the queue meanwhile) -> runs/s
  latency         --rate StartRun calls per second for --latency-secs;
                  start latency = workflow body start - just before call -> p50/p95/p99/max ms
The server's peak RSS (over the bench, and during the drain) is reported when its pid is known.

Build in release mode for figures that mean something:
  cargo build --release -p aiki-cli -p aiki-server && target/release/aiki bench";

/// Where `aiki bench` works, from the global flags.
#[derive(Debug, Clone)]
pub struct Target {
    /// A running server to use (the global --server, when given); `None`: start one.
    pub server: Option<Access>,
    /// Base namespace (the global --namespace unless it is the default).
    pub namespace: Option<String>,
}

/// What a connection to the server needs: its address and the TLS files, the same for the
/// bench's own clients and for its worker processes (which get it as the global flags of
/// `aiki`). A setting that every connection needs belongs here.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The server's address.
    pub server: String,
    /// PEM CA certificates the server's certificate must chain to.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The API key of the bench's clients.
    pub api_key: Option<String>,
    /// The API key of its workers (`api_key` if none), given to them by the environment
    /// (`AIKI_API_KEY`), never on their command line.
    pub worker_api_key: Option<String>,
}

impl Access {
    /// The TLS settings of a connection, read from the files.
    fn tls(&self) -> anyhow::Result<aiki::TlsOptions> {
        Ok(aiki::TlsOptions::from_files(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
        )?)
    }

    /// A client in `namespace`.
    async fn client(&self, namespace: &str) -> anyhow::Result<Client> {
        let client = Client::connect_with(self.server.clone(), &self.tls()?)
            .await
            .with_context(|| format!("cannot connect to {}", self.server))?;
        Ok(client
            .with_api_key(self.api_key.as_deref().unwrap_or_default())?
            .with_namespace(namespace.to_owned()))
    }

    /// The global flags of `aiki` that give a child process this access.
    fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--server".into(), self.server.clone().into()];
        for (flag, file) in [
            ("--tls-ca", &self.tls_ca),
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
        ] {
            if let Some(file) = file {
                args.extend([flag.into(), file.clone().into_os_string()]);
            }
        }
        args
    }
}

/// The hidden `aiki bench-worker`: a worker process of `aiki bench`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// A queue to serve (repeatable).
    #[arg(long = "queue", required = true)]
    queues: Vec<String>,
    /// Runs executing at once.
    #[arg(long, default_value_t = 1000)]
    slots: usize,
    /// Most runs leased per poll.
    #[arg(long, default_value_t = 1000)]
    poll_batch: u32,
}

/// Runs `aiki bench-worker`: connects, prints `ready`, waits for a `go` line on stdin, then
/// works until SIGTERM or until stdin closes (the bench went away), and drains. Meanwhile it
/// prints `drained <n>` whenever the count of `bench.noop` runs it has completed (their
/// completion acknowledged, so committed) changes (every 5 ms at most), so that the bench
/// follows the drain without querying the database.
pub async fn worker(access: &Access, namespace: &str, args: &WorkerArgs) -> anyhow::Result<()> {
    let server = &access.server;
    let mut builder = aiki_worker::WorkerBuilder::new(server)
        .tls(access.tls()?)
        .api_key(access.api_key.as_deref().unwrap_or_default())?
        .namespace(namespace)
        .slots(args.slots)
        .poll_batch(args.poll_batch);
    for q in &args.queues {
        builder = builder.queue(q);
    }
    let worker = builder
        .register(WORKFLOW, noop)
        .register(BACKLOG_WORKFLOW, noop)
        .build()
        .await
        .with_context(|| format!("cannot connect to {server}"))?;
    // Stdin lines, read on a thread of its own: a blocking read that the end of the process
    // need not wait for (`None`: end of input).
    let (tx, mut stdin) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(Some(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(None);
    });
    println!("ready");
    match stdin.recv().await {
        Some(Some(line)) if line.trim() == "go" => {}
        // The bench is gone, or changed its mind.
        _ => return Ok(()),
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = stop.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            // End of stdin: the bench exited without stopping us.
            _ = async { while let Some(Some(_)) = stdin.recv().await {} } => {}
        }
        signal.cancel();
    });
    let reporting = stop.clone();
    let counts = worker.clone();
    tokio::spawn(async move {
        let mut last = 0;
        let mut tick = tokio::time::interval(REPORT_EVERY);
        while !reporting.is_cancelled() {
            tick.tick().await;
            let n = counts.completed(WORKFLOW);
            if n != last {
                last = n;
                println!("drained {n}");
            }
        }
    });
    worker.run(stop).await?;
    Ok(())
}

/// `bench.noop` (and `bench.backlog`): one durable task, and the time (unix µs) the body
/// started.
async fn noop(ctx: WorkflowContext, _input: Value) -> Result<Value, WorkflowError> {
    let started_us = unix_micros();
    ctx.task("noop", (), |()| async { Ok::<(), WorkflowError>(()) }).await?;
    Ok(json!({ "started_us": started_us }))
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Runs `aiki bench` and prints its figures (a table, or one JSON object with `json`).
pub async fn run(args: &BenchArgs, target: &Target, json: bool) -> anyhow::Result<()> {
    if args.server_pid.is_some() && target.server.is_none() {
        bail!("--server-pid is for a server given with --server; without it aiki bench starts its own");
    }
    if args.checkpoint && target.server.is_some() {
        bail!(CHECKPOINT_NEEDS_OWN_DATABASE);
    }
    if args.tls && target.server.is_some() {
        bail!(
            "--tls has the bench start its own server with TLS; for a server given with --server, give its \
             https:// address and --tls-ca (and --tls-cert, --tls-key) instead"
        );
    }
    let phases: Vec<Phase> = Phase::ALL.into_iter().filter(|p| args.phases.contains(p)).collect();
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| format!("bench-{}-{}", unix_micros() / 1_000_000, std::process::id()));
    let logs = std::env::temp_dir().join(format!("aiki-bench-{}", std::process::id()));
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut stack = Stack {
        logs,
        server: None,
        workers: Vec::new(),
        progress: Arc::default(),
        database: None,
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = bench(args, target, &phases, &namespace, &mut stack) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow!("terminated")),
    };
    // The logs help with a failure; the database is dropped anyway (unless --keep).
    let cleanup = stack.shutdown(args.keep, args.keep || result.is_err()).await;
    let report = result?;
    cleanup?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report.json(args, &phases))?);
    } else {
        print!("{}", report.table(args));
    }
    Ok(())
}

/// What `aiki bench` started, to stop it at the end whatever happens.
struct Stack {
    /// The processes' logs.
    logs: PathBuf,
    server: Option<Proc>,
    workers: Vec<Proc>,
    /// Woken by every `drained` line of a worker.
    progress: Arc<tokio::sync::Notify>,
    /// The bench database, to drop at the end.
    database: Option<Database>,
}

/// A child process of the bench, its log file, and (workers) its stdin and the count of drain
/// runs it says it executed.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
    stdin: Option<ChildStdin>,
    drained: Arc<AtomicU64>,
}

impl Proc {
    /// An error if the process has exited.
    fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited unexpectedly ({status}); the end of its log ({}):\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// Peak resident set size, in KiB.
    fn peak_kib(&self) -> Option<u64> {
        self.child.id().and_then(|pid| proc_status_kib(pid, "VmHWM"))
    }
}

impl Stack {
    /// Drain runs the workers executed.
    fn drained(&self) -> u64 {
        self.workers.iter().map(|w| w.drained.load(Ordering::Relaxed)).sum()
    }

    /// An error if a process of the stack has exited.
    fn check(&mut self) -> anyhow::Result<()> {
        self.server
            .iter_mut()
            .chain(self.workers.iter_mut())
            .try_for_each(Proc::check)
    }

    /// Stops workers, then the server, then drops the database (unless `keep_database`) and
    /// removes the logs (unless `keep_logs`: then it says where they are).
    async fn shutdown(mut self, keep_database: bool, keep_logs: bool) -> anyhow::Result<()> {
        let procs: Vec<Proc> = self.server.take().into_iter().chain(self.workers.drain(..)).collect();
        let keep_logs = keep_logs && !procs.is_empty();
        // dev::stop stops in reverse order: workers first, so they hand back nothing to a
        // server that is gone.
        dev::stop(procs.into_iter().map(|p| (p.name, p.child)).collect()).await;
        let mut result = Ok(());
        if let Some(db) = self.database.take() {
            if keep_database {
                eprintln!("kept database {}", db.name);
            } else {
                result = db.remove().await;
            }
        }
        if keep_logs {
            eprintln!("logs of the server and workers: {}", self.logs.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.logs);
        }
        result
    }
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Samples a process's `VmRSS` every [`SAMPLE_EVERY`] in a task of its own, keeping the
/// highest; stops when dropped.
struct RssPeak {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let max = peak.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tick.tick().await;
                if let Some(rss) = proc_status_kib(pid, "VmRSS") {
                    max.fetch_max(rss, Ordering::Relaxed);
                }
            }
        });
        Self { peak, task }
    }

    /// The highest sample in KiB, if any.
    fn peak_kib(&self) -> Option<u64> {
        Some(self.peak.load(Ordering::Relaxed)).filter(|&k| k > 0)
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A field of `/proc/<pid>/status` in KiB (e.g. `VmHWM`, `VmRSS`).
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The database URL of the bench: the dev one with database `aiki_bench`.
fn default_database_url() -> String {
    let base = aiki_server::config::DEFAULT_DATABASE_URL;
    let (server, _db) = base.rsplit_once('/').unwrap_or((base, ""));
    format!("{server}/aiki_bench")
}

/// "name on host:port", for the report (a URL could hold a password).
fn describe_database(url: &str, name: &str) -> String {
    let Ok(pg) = tokio_postgres::Config::from_str(url) else {
        return name.to_owned();
    };
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("{name} on {host}:{port}")
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn connect_pg(db: &aiki_server::database::Database) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = db.connect().await.with_context(|| {
        format!(
            "cannot connect to database {:?}",
            db.config().get_dbname().unwrap_or_default()
        )
    })?;
    tokio::spawn(conn);
    Ok(client)
}

/// The bench database, and a session on the maintenance database that holds an advisory lock
/// on its name for as long as the bench runs, so that two benches never share (and drop) one
/// database.
struct Database {
    name: String,
    session: tokio_postgres::Client,
}

impl Database {
    /// Makes sure PostgreSQL runs, takes the lock, then drops and creates the database of `url`.
    ///
    /// When the maintenance database (`postgres`) cannot be reached with the URL's role,
    /// [`dev::ensure_postgres`] starts (or installs) a local PostgreSQL and creates the role.
    async fn recreate(url: &str) -> anyhow::Result<Self> {
        let pg = aiki_server::database::Database::new(url).context("invalid --database-url")?;
        let name = pg
            .config()
            .get_dbname()
            .ok_or_else(|| anyhow!("--database-url names no database"))?
            .to_owned();
        if !name.contains("bench") {
            bail!(
                "refusing to use database {name:?}: aiki bench drops and creates its database again, \
                 so its name must contain \"bench\" (e.g. aiki_bench)"
            );
        }
        let mut admin = pg.clone();
        admin.config_mut().dbname("postgres");
        let session = match connect_pg(&admin).await {
            Ok(session) => session,
            Err(_) => {
                dev::ensure_postgres(url).await?;
                connect_pg(&admin).await?
            }
        };
        let locked: bool = session
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext($1))",
                &[&format!("aiki bench {name}")],
            )
            .await
            .context("cannot take the bench's advisory lock")?
            .get(0);
        if !locked {
            bail!(
                "another aiki bench is using database {name}; wait for it to end, or give --database-url \
                 with another database"
            );
        }
        let db = Self { name, session };
        db.remove().await?;
        db.session
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&db.name)))
            .await
            .with_context(|| format!("cannot create database {}", db.name))?;
        Ok(db)
    }

    /// Drops the database, closing its sessions.
    async fn remove(&self) -> anyhow::Result<()> {
        self.session
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&self.name)
            ))
            .await
            .with_context(|| format!("cannot drop database {}", self.name))
    }
}

const CHECKPOINT_NEEDS_OWN_DATABASE: &str =
    "--checkpoint needs the bench's own database: it cannot be used with --server";

/// `--checkpoint`: a CHECKPOINT of the bench's PostgreSQL, so that the pages written so far are
/// on disk before the drain starts.
async fn checkpoint(stack: &Stack) -> anyhow::Result<()> {
    let Some(db) = &stack.database else {
        bail!(CHECKPOINT_NEEDS_OWN_DATABASE);
    };
    let pb = bar(1, "checkpoint");
    db.session.batch_execute("CHECKPOINT").await.context(
        "CHECKPOINT failed: the role of --database-url must be a superuser or a member of \
             pg_checkpoint (GRANT pg_checkpoint TO that role)",
    )?;
    finish(
        &pb,
        "checkpoint",
        format!("checkpoint done in {:.1} s", pb.elapsed().as_secs_f64()),
    );
    Ok(())
}

/// Starts `aiki-server` on a free loopback port with the bench database, with `tls` over TLS
/// (certificates made in the logs' folder); returns how to reach it.
async fn start_server(stack: &mut Stack, database_url: &str, tls: bool, api_keys: bool) -> anyhow::Result<Access> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free port")?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let bin = dev::sibling("aiki-server")?;
    let log = stack.logs.join("aiki-server.log");
    let file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut command = Command::new(&bin);
    // The server's TLS is the bench's choice, whatever the shell says.
    for var in dev::TLS_VARS {
        command.env_remove(var);
    }
    let mut access = if tls {
        let certs = dev::DevTls::create(&stack.logs.join("tls"), "127.0.0.1")?;
        command
            .arg("--tls-cert")
            .arg(&certs.server_cert)
            .arg("--tls-key")
            .arg(&certs.server_key);
        Access {
            server: format!("https://{listen}"),
            tls_ca: Some(certs.ca),
            ..Access::default()
        }
    } else {
        Access {
            server: format!("http://{listen}"),
            ..Access::default()
        }
    };
    command
        .arg("--listen")
        .arg(&listen)
        .arg("--database-url")
        .arg(database_url)
        .env_remove("AIKI_ADMIN_KEY")
        .env_remove("AIKI_NO_AUTH")
        .env_remove("AIKI_KEY_RATE_LIMIT");
    let admin_key = aiki_server::auth::new_secret().token;
    if api_keys {
        // Given by the environment: argv is visible to every user of the machine.
        command.env("AIKI_ADMIN_KEY", &admin_key);
    } else {
        command.arg("--no-auth");
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let server = stack.server.insert(Proc {
        name: "aiki-server",
        child,
        log: log.clone(),
        stdin: None,
        drained: Arc::default(),
    });
    let admin = dev::wait_for_server(&access.server, &access.tls()?, &mut server.child)
        .await
        .map_err(|e| anyhow!("{e:#}\nthe end of its log ({}):\n{}", log.display(), tail(&log, 20)))?;
    if api_keys {
        // Keys as an application and a worker fleet would hold them, with a rate far above
        // what the bench asks (the limiter is still on every request's path).
        let admin = admin.with_api_key(&admin_key)?;
        let every = ["*".to_owned()];
        let (_, client_key) = admin
            .create_api_key("bench clients", "admin", &every, 10_000_000)
            .await
            .context("cannot make the bench's client key")?;
        let (_, worker_key) = admin
            .create_api_key("bench workers", "worker", &every, 10_000_000)
            .await
            .context("cannot make the bench's worker key")?;
        access.api_key = Some(client_key);
        access.worker_api_key = Some(worker_key);
    }
    Ok(access)
}

/// Starts the worker processes, serving `queues`, and waits until each has connected (they then
/// wait for `go`).
async fn start_workers(
    stack: &mut Stack,
    args: &BenchArgs,
    access: &Access,
    namespace: &str,
    queues: &[&str],
) -> anyhow::Result<()> {
    let server = &access.server;
    let exe = std::env::current_exe().context("cannot find the aiki binary")?;
    let mut outputs = Vec::new();
    for i in 0..args.workers {
        let log = stack.logs.join(format!("bench-worker-{i}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(&exe);
        // The worker connects as `access` says, whatever the shell says.
        for var in dev::TLS_VARS {
            command.env_remove(var);
        }
        command.env_remove("AIKI_API_KEY");
        if let Some(key) = access.worker_api_key.as_ref().or(access.api_key.as_ref()) {
            command.env("AIKI_API_KEY", key);
        }
        let mut child = command
            .args(access.args())
            .args(["--namespace", namespace, "bench-worker"])
            .args(queues.iter().flat_map(|q| ["--queue", q]))
            .arg("--slots")
            .arg(args.slots.to_string())
            .arg("--poll-batch")
            .arg(args.poll_batch.to_string())
            .env("AIKI_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(file)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} bench-worker", exe.display()))?;
        outputs.push(BufReader::new(child.stdout.take().context("worker stdout")?).lines());
        let stdin = child.stdin.take();
        stack.workers.push(Proc {
            name: "aiki bench-worker",
            child,
            log,
            stdin,
            drained: Arc::default(),
        });
    }
    for (i, (proc, mut lines)) in stack.workers.iter_mut().zip(outputs).enumerate() {
        let ready = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        match ready {
            Ok(Ok(Some(line))) if line.trim() == "ready" => {
                let drained = proc.drained.clone();
                let progress = stack.progress.clone();
                tokio::spawn(async move {
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Some(n) = line.strip_prefix("drained ").and_then(|n| n.parse().ok()) {
                            drained.store(n, Ordering::Relaxed);
                            progress.notify_one();
                        }
                    }
                });
            }
            Ok(_) => {
                // Gone before saying it was ready: its log says why.
                let _ = tokio::time::timeout(Duration::from_secs(5), proc.child.wait()).await;
                proc.check()?;
                bail!(
                    "worker {i} did not start; its log ({}):\n{}",
                    proc.log.display(),
                    tail(&proc.log, 20)
                );
            }
            Err(_) => bail!(
                "worker {i} did not connect to {server} within {START_TIMEOUT:?}; its log: {}",
                proc.log.display()
            ),
        }
    }
    Ok(())
}

/// Tells every worker to start working.
async fn go(stack: &mut Stack) -> anyhow::Result<()> {
    for w in &mut stack.workers {
        if let Some(stdin) = w.stdin.as_mut() {
            stdin.write_all(b"go\n").await.context("cannot signal a worker")?;
            stdin.flush().await?;
        }
    }
    Ok(())
}

/// Fails when `progress` has not moved for `limit`.
struct Stall {
    limit: Duration,
    last: u64,
    since: Instant,
}

impl Stall {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            last: 0,
            since: Instant::now(),
        }
    }

    fn check(&mut self, progress: u64, what: impl FnOnce() -> String) -> anyhow::Result<()> {
        if progress != self.last {
            self.last = progress;
            self.since = Instant::now();
        } else if self.since.elapsed() >= self.limit {
            bail!(
                "stalled: no progress for {} while {}",
                humantime::format_duration(self.limit),
                what()
            );
        }
        Ok(())
    }
}

/// Runs `work`, failing it if `progress` stops moving for `limit`.
async fn guarded<T>(
    limit: Duration,
    progress: &AtomicU64,
    what: impl Fn(u64) -> String,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::pin!(work);
    let mut stall = Stall::new(limit);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = tick.tick() => {
                let n = progress.load(Ordering::Relaxed);
                stall.check(n, || what(n))?;
            }
        }
    }
}

/// A progress bar on stderr when it is a terminal; a hidden one otherwise.
fn bar(len: u64, label: &str) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{prefix:>14.bold} {wide_bar:.cyan/blue} {human_pos:>7}/{human_len:7} {rate:>9} {elapsed:>4} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .with_key("rate", |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = write!(w, "{:.0}/s", s.per_sec());
    })
    .progress_chars("█▉▊▋▌▍▎▏ ");
    let pb = ProgressBar::new(len).with_style(style).with_prefix(label.to_owned());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Ends a phase's bar with its summary (or prints the summary when there is no bar).
fn finish(pb: &ProgressBar, label: &str, summary: String) {
    if pb.is_hidden() {
        eprintln!("{label}: {summary}");
    } else {
        pb.finish_with_message(summary);
    }
}

/// Runs per second over `secs`.
fn per_sec(runs: u64, secs: f64) -> f64 {
    if secs > 0.0 { runs as f64 / secs } else { 0.0 }
}

/// Clients over a few connections (one HTTP/2 connection per 32 calls in flight, up to 8):
/// one connection does not become the bottleneck, and each carries enough calls that its writes
/// coalesce (64 single starts in flight here: about 11,000 runs/s over 1 or 2 connections,
/// 10,300 over 4, 8,900 over 8).
async fn clients(access: &Access, namespace: &str, in_flight: u64) -> anyhow::Result<Vec<Client>> {
    let n = in_flight.div_ceil(32).clamp(1, 8);
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(access.client(namespace).await?);
    }
    Ok(clients)
}

/// A throughput figure: runs over seconds.
#[derive(Debug, Clone, Copy)]
struct Rate {
    runs: u64,
    secs: f64,
}

impl Rate {
    fn per_sec(&self) -> f64 {
        per_sec(self.runs, self.secs)
    }
}

/// Phase 1: `runs` StartRun calls, `in_flight` at a time. Returns the rate and the runs' ids.
async fn enqueue_single(args: &BenchArgs, clients: &[Client]) -> anyhow::Result<(Rate, Vec<String>)> {
    let label = Phase::EnqueueSingle.name();
    let pb = bar(args.runs, label);
    let done = AtomicU64::new(0);
    let opts = StartOptions {
        queue: Some(QUEUE_SINGLE.into()),
        priority: PRIORITY,
        ..StartOptions::default()
    };
    let started = Instant::now();
    let calls = futures::stream::iter(0..args.runs)
        .map(|i| {
            let client = &clients[i as usize % clients.len()];
            let (opts, done, pb) = (opts.clone(), &done, &pb);
            async move {
                let run = client
                    .start_run(WORKFLOW, &(), opts)
                    .await
                    .with_context(|| format!("StartRun call {} of {label}", i + 1))?;
                done.fetch_add(1, Ordering::Relaxed);
                pb.inc(1);
                anyhow::Ok(run.id)
            }
        })
        .buffer_unordered(args.in_flight as usize)
        .try_collect::<Vec<String>>();
    let what = |n| {
        format!(
            "{label} waited for StartRun answers ({n} of {} runs started)",
            args.runs
        )
    };
    let ids = guarded(args.stall_timeout, &done, what, calls).await?;
    let rate = Rate {
        runs: args.runs,
        secs: started.elapsed().as_secs_f64(),
    };
    finish(&pb, label, summary(rate));
    Ok((rate, ids))
}

/// Before measuring: half of `--warmup` runs through single StartRun calls, half through
/// StartRuns batches, in a namespace of their own and a queue no worker serves (they stay
/// queued). Returns their ids.
async fn warm_up(args: &BenchArgs, clients: &[Client]) -> anyhow::Result<Vec<String>> {
    let opts = StartOptions {
        queue: Some(QUEUE_SINGLE.into()),
        ..StartOptions::default()
    };
    let singles = args.warmup / 2;
    let mut ids: Vec<String> = futures::stream::iter(0..singles)
        .map(|i| {
            let (client, opts) = (&clients[i as usize % clients.len()], opts.clone());
            async move {
                let run = client
                    .start_run(WORKFLOW, &(), opts)
                    .await
                    .context("warm-up StartRun")?;
                anyhow::Ok(run.id)
            }
        })
        .buffer_unordered(args.in_flight as usize)
        .try_collect()
        .await?;
    // Batches go `--batch-in-flight` at a time, as in the measured phase, so that every
    // connection the server uses for them has its statements prepared.
    let batch: Vec<(&str, (), StartOptions)> = (0..args.batch_size.min(args.warmup - singles))
        .map(|_| (WORKFLOW, (), opts.clone()))
        .collect();
    let left = args.warmup - singles;
    let sizes: Vec<usize> = (0..left.div_ceil(batch.len().max(1) as u64))
        .map(|i| (left - i * batch.len() as u64).min(batch.len() as u64) as usize)
        .collect();
    let batches: Vec<Vec<String>> = futures::stream::iter(sizes)
        .map(|n| {
            let batch = &batch[..n];
            async move {
                let runs = clients[0].start_runs(batch).await.context("warm-up StartRuns")?;
                anyhow::Ok(runs.into_iter().map(|r| r.id).collect::<Vec<_>>())
            }
        })
        .buffer_unordered(args.batch_in_flight as usize)
        .try_collect()
        .await?;
    ids.extend(batches.into_iter().flatten());
    Ok(ids)
}

fn summary(rate: Rate) -> String {
    format!("{} runs in {:.2} s: {:.0} runs/s", rate.runs, rate.secs, rate.per_sec())
}

/// Starts `runs` runs with `input` on queue `bench` through StartRuns calls of `--batch-size`,
/// `--batch-in-flight` at a time (phase 2, and the backlog). Returns the rate and, with
/// `keep_ids`, the runs' ids.
async fn enqueue_batches(
    args: &BenchArgs,
    client: &Client,
    label: &str,
    (workflow, runs, input, priority): (&str, u64, &Value, i32),
    keep_ids: bool,
) -> anyhow::Result<(Rate, Vec<String>)> {
    let pb = bar(runs, label);
    let done = AtomicU64::new(0);
    let opts = StartOptions {
        queue: Some(QUEUE_DRAIN.into()),
        priority,
        ..StartOptions::default()
    };
    let size = args.batch_size;
    let started = Instant::now();
    let calls = futures::stream::iter((0..runs).step_by(size as usize))
        .map(|first| {
            let batch: Vec<(&str, &Value, StartOptions)> = (first..(first + size).min(runs))
                .map(|_| (workflow, input, opts.clone()))
                .collect();
            let (done, pb) = (&done, &pb);
            async move {
                let handles = client
                    .start_runs(&batch)
                    .await
                    .with_context(|| format!("StartRuns call of {label} (runs {} to {})", first + 1, first + size))?;
                done.fetch_add(batch.len() as u64, Ordering::Relaxed);
                pb.inc(batch.len() as u64);
                anyhow::Ok(if keep_ids {
                    handles.into_iter().map(|h| h.id).collect()
                } else {
                    Vec::new()
                })
            }
        })
        .buffer_unordered(args.batch_in_flight as usize)
        .try_concat();
    let what = |n| format!("{label} waited for StartRuns answers ({n} of {runs} runs started)");
    let ids = guarded(args.stall_timeout, &done, what, calls).await?;
    let rate = Rate {
        runs,
        secs: started.elapsed().as_secs_f64(),
    };
    finish(&pb, label, summary(rate));
    Ok((rate, ids))
}

/// What the drain measured.
#[derive(Debug, Clone, Copy)]
struct Drain {
    rate: Rate,
    /// Runs of the drained queue completed when the clock stopped.
    completed: u64,
    /// Peak of the server's VmRSS sampled during the drain, in KiB.
    peak_rss_kib: Option<u64>,
}

/// Counts of one queue.
fn queue_counts(queues: &[aiki::Queue], name: &str) -> aiki::Queue {
    queues.iter().find(|q| q.name == name).cloned().unwrap_or_default()
}

/// Polls the depths of `queue` (`every` so often) until `target` runs are completed; fails if
/// a run failed or was cancelled, if a process of the stack exited, or if the count stalls.
/// Returns the completed count.
async fn wait_completed(
    client: &Client,
    stack: &mut Stack,
    (queue, target): (&str, u64),
    stall_limit: Duration,
    pb: &ProgressBar,
    every: Duration,
) -> anyhow::Result<u64> {
    let mut stall = Stall::new(stall_limit);
    loop {
        stack.check()?;
        let queues = client.queues().await.context("ListQueues")?;
        let q = queue_counts(&queues, queue);
        pb.set_position(q.completed.min(target));
        if q.failed + q.cancelled > 0 {
            let example = failed_example(client, queue).await;
            bail!(
                "{} runs of queue {queue} failed and {} were cancelled (e.g. {example}); the workers' logs are in {}",
                q.failed,
                q.cancelled,
                stack.logs.display()
            );
        }
        if q.completed >= target {
            return Ok(q.completed);
        }
        stall.check(q.completed, || {
            format!("waiting for {target} completed runs of queue {queue} ({})", depths(&q))
        })?;
        tokio::time::sleep(every).await;
    }
}

/// A queue's counts, for messages.
fn depths(q: &aiki::Queue) -> String {
    format!(
        "{} completed, {} running, {} ready, {} delayed, {} failed, {} cancelled",
        q.completed, q.running, q.ready, q.delayed, q.failed, q.cancelled
    )
}

/// A failed run's error, for a message.
async fn failed_example(client: &Client, queue: &str) -> String {
    let filter = ListFilter {
        queue: Some(queue.to_owned()),
        statuses: vec![RunStatus::Failed],
        page_size: 1,
        ..ListFilter::default()
    };
    match client.list(&filter).await {
        Ok(page) => match page.runs.first() {
            Some(run) => match &run.error {
                Some(e) => format!("run {}: {}: {}", run.id, e.kind, e.message),
                None => format!("run {}", run.id),
            },
            None => "none failed".into(),
        },
        Err(e) => format!("cannot list them: {e}"),
    }
}

/// Phase 3: signals the workers to start and measures until the server counts `--runs` runs
/// of queue `bench` completed. While the runs are worked off, the bench follows the counts the
/// workers print (so that it puts no load of its own on the database), and samples the
/// server's memory; once the workers have executed every run, it reads the queue's depths
/// every 5 ms until the last completions are counted, and stops the clock.
async fn drain(args: &BenchArgs, client: &Client, stack: &mut Stack, server_pid: Option<u32>) -> anyhow::Result<Drain> {
    let label = Phase::Drain.name();
    let pb = bar(args.runs, label);
    let mut peak: Option<u64> = None;
    let mut sample = || {
        if let Some(rss) = server_pid.and_then(|pid| proc_status_kib(pid, "VmRSS")) {
            peak = Some(peak.map_or(rss, |p| p.max(rss)));
        }
    };
    let started = Instant::now();
    go(stack).await?;
    let mut stall = Stall::new(args.stall_timeout);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    let progress = stack.progress.clone();
    loop {
        // Woken by each count a worker prints, so that the clock stops when the last one comes.
        tokio::select! {
            _ = tick.tick() => sample(),
            _ = progress.notified() => {}
        }
        stack.check()?;
        let executed = stack.drained();
        pb.set_position(executed.min(args.runs));
        if executed >= args.runs {
            break;
        }
        if let Err(e) = stall.check(executed, || {
            format!(
                "{label} waited for the workers ({executed} of {} runs executed)",
                args.runs
            )
        }) {
            let state = match client.queues().await {
                Ok(queues) => depths(&queue_counts(&queues, QUEUE_DRAIN)),
                Err(e) => format!("ListQueues failed: {e}"),
            };
            return Err(e.context(format!(
                "queue {QUEUE_DRAIN}: {state}; the workers' logs are in {}",
                stack.logs.display()
            )));
        }
    }
    // Every completion is acknowledged, so committed: the clock stops here. What the server
    // says is checked after, untimed (its count reads every run of the namespace, a backlog's
    // too, and would otherwise weigh on the figure of a drain behind a deep queue).
    let rate = Rate {
        runs: args.runs,
        secs: started.elapsed().as_secs_f64(),
    };
    let completed = wait_completed(
        client,
        stack,
        (QUEUE_DRAIN, args.runs),
        args.stall_timeout,
        &pb,
        Duration::from_millis(5),
    )
    .await
    .with_context(|| format!("{label} failed"))?;
    sample();
    // Check that every worker took part: a drain done by fewer workers than asked would be a
    // wrong figure.
    let workers = client.workers().await.context("ListWorkers")?;
    if (workers.len() as u64) < args.workers {
        bail!(
            "{label}: only {} of {} workers registered; their logs are in {}",
            workers.len(),
            args.workers,
            stack.logs.display()
        );
    }
    finish(&pb, label, summary(rate));
    Ok(Drain {
        rate,
        completed,
        peak_rss_kib: peak,
    })
}

/// What the latency phase measured, in milliseconds.
#[derive(Debug, Clone)]
struct Latency {
    runs: u64,
    /// The rate the calls were actually offered at.
    offered_per_sec: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

/// The nearest-rank percentile `q` (0 to 1) of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Phase 4: offers `--rate` StartRun calls per second for `--latency-secs`, waits for all runs
/// to complete, then reads every run back and computes start latencies.
async fn latency(args: &BenchArgs, clients: &[Client], stack: &mut Stack) -> anyhow::Result<Latency> {
    let label = Phase::Latency.name();
    let total = args.rate * args.latency_secs;
    let pb = bar(total, label);
    let client = &clients[0];
    let opts = StartOptions {
        queue: Some(QUEUE_LATENCY.into()),
        priority: PRIORITY,
        ..StartOptions::default()
    };
    // Offer: one call per tick, each in a task of its own so that a slow answer does not delay
    // the next call; missed ticks fire at once (Burst) to keep the offered rate.
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let answered = Arc::new(AtomicU64::new(0));
    let mut calls = tokio::task::JoinSet::new();
    let started = Instant::now();
    pb.set_message("offering StartRun calls");
    for i in 0..total {
        interval.tick().await;
        pb.set_position(i + 1);
        let client = clients[i as usize % clients.len()].clone();
        let (opts, answered) = (opts.clone(), answered.clone());
        calls.spawn(async move {
            let input = json!({ "enqueued_us": unix_micros() });
            client
                .start_run(WORKFLOW, &input, opts)
                .await
                .with_context(|| format!("StartRun call {} of {label}", i + 1))?;
            answered.fetch_add(1, Ordering::Relaxed);
            anyhow::Ok(())
        });
        // Reap finished calls as we go, so an error surfaces early.
        while let Some(r) = calls.try_join_next() {
            r??;
        }
    }
    let offered_per_sec = per_sec(total, started.elapsed().as_secs_f64());
    let what = |n| format!("{label} waited for StartRun answers ({n} of {total} answered)");
    guarded(args.stall_timeout, &answered, what, async {
        while let Some(r) = calls.join_next().await {
            r??;
        }
        Ok(())
    })
    .await?;
    pb.set_message("waiting for the runs to complete");
    wait_completed(
        client,
        stack,
        (QUEUE_LATENCY, total),
        args.stall_timeout,
        &pb,
        SAMPLE_EVERY,
    )
    .await
    .with_context(|| format!("{label} failed"))?;

    pb.set_message("reading the runs back");
    let mut millis = Vec::with_capacity(total as usize);
    let mut filter = ListFilter {
        queue: Some(QUEUE_LATENCY.into()),
        statuses: vec![RunStatus::Completed],
        page_size: 1000,
        ..ListFilter::default()
    };
    loop {
        let page = client.list(&filter).await.context("ListRuns")?;
        for run in &page.runs {
            let enqueued = run.input.get("enqueued_us").and_then(Value::as_i64);
            let started = run
                .output
                .as_ref()
                .and_then(|o| o.get("started_us"))
                .and_then(Value::as_i64);
            match (enqueued, started) {
                (Some(e), Some(s)) => millis.push((s - e) as f64 / 1000.0),
                _ => bail!(
                    "run {} of {label} lacks its times (input {}, output {:?})",
                    run.id,
                    run.input,
                    run.output
                ),
            }
        }
        match page.next_page_token {
            Some(token) => filter.page_token = Some(token),
            None => break,
        }
    }
    if millis.len() as u64 != total {
        bail!("{label}: {total} runs were started but {} were read back", millis.len());
    }
    millis.sort_by(f64::total_cmp);
    let l = Latency {
        runs: total,
        offered_per_sec,
        p50: percentile(&millis, 0.50),
        p95: percentile(&millis, 0.95),
        p99: percentile(&millis, 0.99),
        max: millis.last().copied().unwrap_or_default(),
    };
    finish(
        &pb,
        label,
        format!(
            "{total} runs at {offered_per_sec:.0}/s: start latency p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.p50, l.p95, l.p99, l.max
        ),
    );
    Ok(l)
}

/// Cancels runs the bench left queued on a server it did not start (a run that has ended
/// meanwhile is fine).
async fn cancel_leftovers(client: &Client, ids: &[String], in_flight: u64) -> anyhow::Result<()> {
    let pb = bar(ids.len() as u64, "cleanup");
    let progress = &pb;
    futures::stream::iter(ids)
        .map(|id| async move {
            match client.cancel(id, "aiki bench: left queued").await {
                Ok(_) | Err(aiki::Error::FailedPrecondition(_)) => {}
                Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot cancel run {id}"))),
            }
            progress.inc(1);
            anyhow::Ok(())
        })
        .buffer_unordered(in_flight as usize)
        .try_collect::<()>()
        .await?;
    finish(&pb, "cleanup", format!("cancelled the {} runs left queued", ids.len()));
    Ok(())
}

/// Everything measured.
#[derive(Debug, Default)]
struct Report {
    server: String,
    own_server: bool,
    namespace: String,
    database: Option<String>,
    enqueue_single: Option<Rate>,
    enqueue_batch: Option<Rate>,
    drain: Option<Drain>,
    latency: Option<Latency>,
    /// Peak RSS of the server (VmHWM at the end, or the highest sample), in KiB.
    server_peak_kib: Option<u64>,
    /// Highest VmHWM of the workers at the end, in KiB.
    worker_peak_kib: Option<u64>,
}

/// The phases, in order; returns what they measured.
async fn bench(
    args: &BenchArgs,
    target: &Target,
    phases: &[Phase],
    namespace: &str,
    stack: &mut Stack,
) -> anyhow::Result<Report> {
    let has = |p| phases.contains(&p);
    let mut report = Report {
        namespace: namespace.to_owned(),
        ..Report::default()
    };
    let (access, server_pid) = match &target.server {
        Some(access) => (access.clone(), args.server_pid),
        None => {
            let url = args.database_url.clone().unwrap_or_else(default_database_url);
            let db = Database::recreate(&url).await?;
            report.database = Some(describe_database(&url, &db.name));
            stack.database = Some(db);
            let access = start_server(stack, &url, args.tls, args.api_keys).await?;
            let pid = stack.server.as_ref().and_then(|s| s.child.id());
            eprintln!(
                "aiki-server listening on {} (pid {})",
                access.server,
                pid.unwrap_or_default()
            );
            (access, pid)
        }
    };
    report.server = access.server.clone();
    report.own_server = target.server.is_none();
    let server_rss = server_pid.map(RssPeak::start);
    let single_ns = format!("{namespace}-single");
    let single_clients = clients(&access, &single_ns, args.in_flight).await?;
    let client = single_clients[0].clone().with_namespace(namespace.to_owned());
    // The counts the phases wait on are per queue: runs of an earlier bench would skew them.
    for (c, ns) in [(&client, namespace), (&single_clients[0], single_ns.as_str())] {
        if !c.queues().await.context("ListQueues")?.is_empty() {
            bail!(
                "namespace {ns} already holds runs; aiki bench needs namespaces of its own (give another --namespace)"
            );
        }
    }
    let mut leftovers: Vec<(Client, Vec<String>)> = Vec::new();

    if args.warmup > 0 {
        let ns = format!("{namespace}-warmup");
        let ids = warm_up(args, &clients(&access, &ns, args.in_flight).await?).await?;
        leftovers.push((client.clone().with_namespace(ns), ids));
    }
    if has(Phase::EnqueueSingle) {
        let (rate, ids) = enqueue_single(args, &single_clients).await?;
        report.enqueue_single = Some(rate);
        leftovers.push((single_clients[0].clone(), ids));
    }
    if has(Phase::Drain) && args.backlog > 0 {
        let backlog = (BACKLOG_WORKFLOW, args.backlog, &Value::Null, BACKLOG_PRIORITY);
        enqueue_batches(args, &client, "backlog", backlog, false).await?;
    }
    if has(Phase::EnqueueBatch) || has(Phase::Drain) {
        let label = if has(Phase::EnqueueBatch) {
            "enqueue-batch"
        } else {
            "enqueue"
        };
        let keep_ids = !report.own_server && !has(Phase::Drain);
        let runs = (WORKFLOW, args.runs, &json!({ "drain": true }), PRIORITY);
        let (rate, ids) = enqueue_batches(args, &client, label, runs, keep_ids).await?;
        if has(Phase::EnqueueBatch) {
            report.enqueue_batch = Some(rate);
        }
        leftovers.push((client.clone(), ids));
    }
    if has(Phase::Drain) || has(Phase::Latency) {
        // Without the drain, runs of enqueue-batch stay queued: the workers leave their queue.
        let queues: Vec<&str> = [(QUEUE_DRAIN, has(Phase::Drain)), (QUEUE_LATENCY, has(Phase::Latency))]
            .into_iter()
            .filter_map(|(q, serve)| serve.then_some(q))
            .collect();
        if args.checkpoint && has(Phase::Drain) {
            checkpoint(stack).await?;
        }
        start_workers(stack, args, &access, namespace, &queues).await?;
        if has(Phase::Drain) {
            report.drain = Some(drain(args, &client, stack, server_pid).await?);
            // Let the backlog go too, so that it leaves nothing behind and does not keep the
            // workers busy during the latency phase.
            if args.backlog > 0 && (has(Phase::Latency) || !report.own_server) {
                let pb = bar(args.runs + args.backlog, "backlog");
                let n = args.runs + args.backlog;
                wait_completed(&client, stack, (QUEUE_DRAIN, n), args.stall_timeout, &pb, SAMPLE_EVERY)
                    .await
                    .context("draining the backlog failed")?;
                finish(&pb, "backlog", format!("{} backlog runs completed", args.backlog));
            }
        } else {
            go(stack).await?;
        }
        if has(Phase::Latency) {
            let clients: Vec<Client> = single_clients
                .iter()
                .map(|c| c.clone().with_namespace(namespace.to_owned()))
                .collect();
            report.latency = Some(latency(args, &clients, stack).await?);
        }
    }
    report.server_peak_kib = [
        server_pid.and_then(|pid| proc_status_kib(pid, "VmHWM")),
        server_rss.as_ref().and_then(RssPeak::peak_kib),
        report.drain.and_then(|d| d.peak_rss_kib),
    ]
    .into_iter()
    .flatten()
    .max();
    report.worker_peak_kib = stack.workers.iter().filter_map(Proc::peak_kib).max();
    if !report.own_server {
        let ids: Vec<(Client, Vec<String>)> = leftovers.into_iter().filter(|(_, ids)| !ids.is_empty()).collect();
        for (client, ids) in ids {
            // The figures stand even if this fails.
            if let Err(e) = cancel_leftovers(&client, &ids, args.in_flight).await {
                eprintln!("aiki bench: runs were left queued in namespace {namespace}: {e:#}");
            }
        }
    }
    Ok(report)
}

/// `x` rounded to `digits` decimals.
fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// KiB to MiB, rounded to 0.1.
fn mib(kib: u64) -> f64 {
    round(kib as f64 / 1024.0, 1)
}

/// An integer with thousands separators: 12345.6 → "12,346".
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn build_profile() -> &'static str {
    if cfg!(debug_assertions) { "debug" } else { "release" }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Report {
    /// One JSON object: every figure (null when its phase did not run or it is unknown), the
    /// durations, and the parameters.
    fn json(&self, args: &BenchArgs, phases: &[Phase]) -> Value {
        let rate = |r: Option<Rate>| r.map(|r| round(r.per_sec(), 1));
        let secs = |r: Option<Rate>| r.map(|r| round(r.secs, 3));
        json!({
            "enqueue_single_runs_per_sec": rate(self.enqueue_single),
            "enqueue_batch_runs_per_sec": rate(self.enqueue_batch),
            "drain_runs_per_sec": rate(self.drain.map(|d| d.rate)),
            "drain_runs": self.drain.map(|d| d.rate.runs),
            "drain_completed": self.drain.map(|d| d.completed),
            "latency_ms": self.latency.as_ref().map(|l| json!({
                "p50": round(l.p50, 3),
                "p95": round(l.p95, 3),
                "p99": round(l.p99, 3),
                "max": round(l.max, 3),
            })),
            "latency_runs": self.latency.as_ref().map(|l| l.runs),
            "latency_offered_runs_per_sec": self.latency.as_ref().map(|l| round(l.offered_per_sec, 1)),
            "server_peak_rss_mb": self.server_peak_kib.map(mib),
            "server_drain_peak_rss_mb": self.drain.and_then(|d| d.peak_rss_kib).map(mib),
            "worker_peak_rss_mb": self.worker_peak_kib.map(mib),
            "seconds": {
                "enqueue_single": secs(self.enqueue_single),
                "enqueue_batch": secs(self.enqueue_batch),
                "drain": secs(self.drain.map(|d| d.rate)),
            },
            "parameters": {
                "phases": phases.iter().map(|p| p.name()).collect::<Vec<_>>(),
                "runs": args.runs,
                "warmup": args.warmup,
                "in_flight": args.in_flight,
                "batch_size": args.batch_size,
                "batch_in_flight": args.batch_in_flight,
                "workers": args.workers,
                "slots": args.slots,
                "poll_batch": args.poll_batch,
                "backlog": args.backlog,
                "checkpoint": args.checkpoint,
                "rate": args.rate,
                "latency_secs": args.latency_secs,
                "server": self.server,
                "own_server": self.own_server,
                "tls": self.server.starts_with("https://"),
                "api_keys": args.api_keys,
                "database": self.database,
                "namespace": self.namespace,
                "build": build_profile(),
                "version": env!("CARGO_PKG_VERSION"),
                "cpus": cpus(),
            },
        })
    }

    /// A table for people, with the parameters below it.
    fn table(&self, args: &BenchArgs) -> String {
        let mut t = Table::new();
        t.load_preset(NOTHING).set_header(["PHASE", "RESULT", "HOW"]);
        let runs_per_sec = |r: Rate| format!("{} runs/s", thousands(r.per_sec()));
        if let Some(r) = self.enqueue_single {
            t.add_row([
                "enqueue-single".into(),
                runs_per_sec(r),
                format!(
                    "{} StartRun calls, {} in flight, {:.2} s",
                    r.runs, args.in_flight, r.secs
                ),
            ]);
        }
        if let Some(r) = self.enqueue_batch {
            t.add_row([
                "enqueue-batch".into(),
                runs_per_sec(r),
                format!(
                    "{} runs in StartRuns calls of {}, {} in flight, {:.2} s",
                    r.runs, args.batch_size, args.batch_in_flight, r.secs
                ),
            ]);
        }
        if let Some(d) = self.drain {
            let backlog = match args.backlog {
                0 => String::new(),
                n => format!(", {n} more queued at a lower priority"),
            };
            let checkpoint = if args.checkpoint { ", after a checkpoint" } else { "" };
            t.add_row([
                "drain".into(),
                runs_per_sec(d.rate),
                format!(
                    "{} runs, {} worker(s) × {} slots, poll batch {}{backlog}{checkpoint}, {:.2} s",
                    d.rate.runs, args.workers, args.slots, args.poll_batch, d.rate.secs
                ),
            ]);
        }
        if let Some(l) = &self.latency {
            let how = format!("start latency, {} runs offered at {:.0}/s", l.runs, l.offered_per_sec);
            for (i, (name, v)) in [("p50", l.p50), ("p95", l.p95), ("p99", l.p99), ("max", l.max)]
                .into_iter()
                .enumerate()
            {
                let how = if i == 0 { how.clone() } else { String::new() };
                t.add_row([format!("latency {name}"), format!("{v:.2} ms"), how]);
            }
        }
        let during_drain = self
            .drain
            .and_then(|d| d.peak_rss_kib)
            .map(|k| format!("; {:.1} MiB peak during the drain", mib(k)))
            .unwrap_or_default();
        t.add_row([
            "server memory".into(),
            match self.server_peak_kib {
                Some(k) => format!("{:.1} MiB", mib(k)),
                None => "unknown".into(),
            },
            match self.server_peak_kib {
                Some(_) => format!("peak RSS over the bench{during_drain}"),
                None => "give --server-pid to read it".into(),
            },
        ]);
        if let Some(k) = self.worker_peak_kib {
            t.add_row([
                "worker memory".into(),
                format!("{:.1} MiB", mib(k)),
                "peak RSS of the largest worker process".into(),
            ]);
        }
        let mut out = format!("{t}\n\n");
        let server = if self.own_server {
            format!(
                "aiki-server at {} started by the bench, database {}",
                self.server,
                self.database.as_deref().unwrap_or("?")
            )
        } else {
            format!("aiki-server at {}", self.server)
        };
        let _ = writeln!(
            out,
            "aiki {} ({} build), {} CPUs; {server}; namespace {}",
            env!("CARGO_PKG_VERSION"),
            build_profile(),
            cpus(),
            self.namespace
        );
        if cfg!(debug_assertions) {
            let _ = writeln!(
                out,
                "this is a debug build: build with --release for figures worth quoting"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 50.0);
        assert_eq!(percentile(&v, 0.95), 95.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.5), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn default_database_is_aiki_bench_on_the_dev_server() {
        let url = default_database_url();
        let pg = tokio_postgres::Config::from_str(&url).unwrap();
        let dev = tokio_postgres::Config::from_str(aiki_server::config::DEFAULT_DATABASE_URL).unwrap();
        assert_eq!(pg.get_dbname(), Some("aiki_bench"));
        assert_eq!(pg.get_hosts(), dev.get_hosts());
        assert_eq!(pg.get_ports(), dev.get_ports());
        assert_eq!(pg.get_user(), dev.get_user());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.8), "1,234,568");
    }
}
