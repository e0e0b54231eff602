//! `aiki`: the command line of Aiki.
//!
//! Exit codes: 0 success; 1 an error (message on stderr); 2 a usage error; 3 the run ended
//! `failed` or `cancelled` (`run result`, `run start --wait`); 4 the wait timed out.

mod bench;
mod dev;
mod examples;
mod output;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use aiki::{Client, ListFilter, RunStatus, StartOptions};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum, parser::ValueSource};
use futures::StreamExt;
use output::Output;

// Every run allocates many small, short-lived objects on several threads; under load glibc's
// allocator spent a third of the process's time in malloc, free and its arena locks (perf),
// where mimalloc does not contend.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "aiki",
    version = aiki_proto::VERSION,
    about = "Aiki: durable workflows on PostgreSQL",
    propagate_version = true
)]
struct Cli {
    /// Server address.
    #[arg(long, global = true, env = "AIKI_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    /// PEM CA certificates an https:// server's certificate must chain to [default: the
    /// system's roots].
    #[arg(long, global = true, env = "AIKI_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (mutual TLS).
    #[arg(long, global = true, env = "AIKI_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "AIKI_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// API key, for a server that requires keys (as `aiki keys create` printed it).
    #[arg(long, global = true, env = "AIKI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Namespace.
    #[arg(long, short = 'n', global = true, env = "AIKI_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
    /// Whether --server was given (flag or environment) rather than defaulted.
    #[arg(skip)]
    server_given: bool,
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Make an API key for the namespace of --namespace (and those of --also) with a role;
    /// prints the key once.
    #[command(after_help = examples::KEYS_CREATE)]
    Create {
        /// What the key may do: read (get, list, history, watch, results); client (read, and
        /// start, cancel, pause, resume, wake, send events); worker (register, poll,
        /// heartbeat, report, start children); admin (everything, and keys).
        #[arg(long, value_parser = ["read", "client", "worker", "admin"])]
        role: String,
        /// A name people recognise the key by [default: ROLE key for NAMESPACE].
        #[arg(long)]
        name: Option<String>,
        /// More namespaces the key is for (comma-separated); `*` means every namespace.
        #[arg(long, value_delimiter = ',')]
        also: Vec<String>,
        /// Requests per second the key may make [default: the server's key_rate_limit].
        #[arg(long, default_value_t = 0)]
        rate_limit: u32,
    },
    /// The keys you administer (never their secrets).
    #[command(after_help = examples::KEYS_LIST)]
    List {
        /// Revoked keys too.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a key: every server refuses it within a second.
    #[command(after_help = examples::KEYS_REVOKE)]
    Revoke {
        /// The key's id (see `aiki keys list`), or the key itself.
        id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Tables and text for people.
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start, inspect, wait for and cancel runs.
    #[command(subcommand, after_help = examples::RUN)]
    Run(RunCmd),
    /// Live workers (a heartbeat within the lease time), their last heartbeat and the leases
    /// they hold; `--all` lists the gone ones too.
    #[command(after_help = examples::WORKERS)]
    Workers {
        /// Also the workers that are gone (no heartbeat within the lease time).
        #[arg(long)]
        all: bool,
    },
    /// Queue depths per state, the age of the oldest ready run, and why runs wait.
    #[command(after_help = examples::QUEUES)]
    Queues,
    /// Registered workflow versions and the live workers serving each.
    #[command(after_help = examples::WORKFLOWS)]
    Workflows,
    /// Make, list and revoke API keys (needs an admin key).
    #[command(subcommand, after_help = examples::KEYS)]
    Keys(KeysCmd),
    /// Apply database migrations.
    #[command(after_help = examples::MIGRATE)]
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "AIKI_DATABASE_URL", default_value = aiki_server::config::DEFAULT_DATABASE_URL)]
        database_url: String,
    },
    /// Run the whole local stack: PostgreSQL (started or installed if missing), a server, a
    /// worker, and a first workflow.
    #[command(after_help = examples::DEV)]
    Dev(dev::DevArgs),
    /// Print a completion script for a shell.
    #[command(after_help = examples::COMPLETION)]
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(after_help = examples::MAN)]
    Man,
    /// Measure throughput, start latency and server memory: starts its own server (or uses
    /// --server) and workers, and prints the figures.
    #[command(after_help = examples::BENCH)]
    Bench(bench::BenchArgs),
    /// A worker process of `aiki bench`.
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
}

#[derive(Debug, Subcommand)]
enum RunCmd {
    /// Start a run.
    #[command(after_help = examples::RUN_START)]
    Start(StartArgs),
    /// Show a run.
    #[command(after_help = examples::RUN_GET)]
    Get(RunRef),
    /// Print a run's output; with --wait, wait up to SECS for it to end.
    #[command(after_help = examples::RUN_RESULT)]
    Result {
        #[command(flatten)]
        run: RunRef,
        /// Seconds to wait for the run to end.
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// List runs, newest first.
    #[command(after_help = examples::RUN_LIST)]
    List(ListArgs),
    /// Cancel a run.
    #[command(after_help = examples::RUN_CANCEL)]
    Cancel {
        #[command(flatten)]
        run: RunRef,
        /// Why (kept in the history).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Pause a run: a queued run at once, a running one when its worker releases it. A paused
    /// run is not leased until resumed.
    #[command(after_help = examples::RUN_PAUSE)]
    Pause {
        #[command(flatten)]
        run: RunRef,
        /// Why (kept in the history).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume a paused run (queued again).
    #[command(after_help = examples::RUN_RESUME)]
    Resume(RunRef),
    /// End a suspended run's wait now (queued again at once): a sleep ends, a wait for an event
    /// times out.
    #[command(after_help = examples::RUN_WAKE)]
    Wake(RunRef),
    /// Send an event to a run; it receives it from `ctx.wait_event` (now if it waits for it,
    /// else when it does).
    ///
    /// `aiki run event ID NAME --data JSON`, or `aiki run event --key KEY NAME --data JSON`.
    #[command(after_help = examples::RUN_EVENT)]
    Event {
        /// Run id, then the event's name (with --key: only the event's name).
        #[arg(value_name = "ID NAME", num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// Idempotency key of the run (instead of its id).
        #[arg(long)]
        key: Option<String>,
        /// Payload as JSON, or @FILE to read it from a file (@- for stdin).
        #[arg(long, short, default_value = "null")]
        data: String,
        /// Event key: sending the same key again stores nothing.
        #[arg(long)]
        event_key: Option<String>,
    },
    /// Print a run's history.
    #[command(after_help = examples::RUN_HISTORY)]
    History(RunRef),
    /// Follow a run's history live until it ends. With `--output json`, one JSON object per
    /// event and line (JSON Lines), printed as the event happens.
    #[command(after_help = examples::RUN_WATCH)]
    Watch(RunRef),
}

/// A run, by id or by idempotency key.
#[derive(Debug, Args)]
struct RunRef {
    /// Run id.
    #[arg(required_unless_present = "key", conflicts_with = "key")]
    id: Option<String>,
    /// Idempotency key of the run (instead of its id).
    #[arg(long)]
    key: Option<String>,
}

impl RunRef {
    /// The run's id, looking the key up if needed.
    async fn id(&self, client: &Client) -> anyhow::Result<String> {
        match (&self.id, &self.key) {
            (Some(id), _) => Ok(id.clone()),
            (None, Some(key)) => Ok(client.get_by_key(key).await?.id),
            (None, None) => anyhow::bail!("give a run id or --key"),
        }
    }
}

#[derive(Debug, Args)]
struct StartArgs {
    /// Workflow name.
    workflow: String,
    /// Input as JSON, or @FILE to read it from a file (@- for stdin).
    #[arg(long, short, default_value = "null")]
    input: String,
    /// Idempotency key: a second start with it returns the first run.
    #[arg(long)]
    key: Option<String>,
    /// With --key: return the existing run even if its input differs.
    #[arg(long)]
    return_existing: bool,
    /// Queue.
    #[arg(long)]
    queue: Option<String>,
    /// Workflow version (one a worker registered); default: the newest registered.
    #[arg(long = "workflow-version", value_name = "VERSION")]
    workflow_version: Option<String>,
    /// Priority, -1000 to 1000 (higher first).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i32,
    /// Delay before the run may start, e.g. 30s or 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Attempts in all (retry policy).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// End the run (failed) if it has not ended this long after its start, e.g. 1h.
    #[arg(long, value_parser = humantime::parse_duration)]
    execution_timeout: Option<Duration>,
    /// Fail an attempt (retried by policy) that lasts longer than this.
    #[arg(long, value_parser = humantime::parse_duration)]
    attempt_timeout: Option<Duration>,
    /// End the run (failed) if it waits ready in its queue longer than this.
    #[arg(long, value_parser = humantime::parse_duration)]
    schedule_to_start_timeout: Option<Duration>,
    /// Fail an attempt (retried by policy) whose worker does not heartbeat within this.
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_timeout: Option<Duration>,
    /// Wait for the run to end and print its output (up to SECS, default 60).
    #[arg(long, num_args = 0..=1, default_missing_value = "60")]
    wait: Option<u64>,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only this workflow.
    #[arg(long)]
    workflow: Option<String>,
    /// Only these states (repeatable): queued, running, suspended, completed, failed, cancelled.
    #[arg(long)]
    status: Vec<String>,
    /// Only this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only runs created within this long, e.g. 1h.
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Page size (1 to 1000).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Continue from a previous page.
    #[arg(long)]
    page_token: Option<String>,
    /// Only the children of this run.
    #[arg(long)]
    parent: Option<String>,
}

/// An error with its exit code.
struct Exit(u8, anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Exit {
    fn from(e: E) -> Self {
        Exit(1, e.into())
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.server_given = matches
        .value_source("server")
        .is_some_and(|s| s != ValueSource::DefaultValue);
    let quiet = matches!(
        cli.command,
        Command::Run(_) | Command::Workers { .. } | Command::Queues | Command::Workflows | Command::Bench(_)
    );
    tracing_subscriber::fmt()
        .with_env_filter(
            // One variable for every binary: AIKI_LOG, else RUST_LOG.
            tracing_subscriber::EnvFilter::try_from_env("AIKI_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| if quiet { "warn".into() } else { "info".into() }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A bench worker runs on one thread: its runs are no-ops, so its work is handing runs and
    // reports between tasks, and on a thread pool most of that went to waking other threads
    // and freeing memory allocated on another thread (perf: a drain of 100,000 runs took
    // 1.75 s of the worker's CPU on two threads, 1.0 s on one). The bench scales with
    // `--workers` processes instead. The bench's own client is the same kind of load (64
    // StartRun calls in flight, each little work): on one thread, 30,000 single starts ran at
    // 18,928-20,272 runs/s against 15,315-19,517 on the pool, alternated four times.
    let runtime = match cli.command {
        Command::BenchWorker(_) | Command::Bench(_) => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        _ => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aiki: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit(code, e)) => {
            eprintln!("aiki: {e:#}");
            ExitCode::from(code)
        }
    }
}

impl Cli {
    /// The server and TLS flags, for `aiki bench` and its workers.
    fn access(&self) -> bench::Access {
        bench::Access {
            server: self.server.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            api_key: self.api_key.clone(),
            worker_api_key: None,
        }
    }
}

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let tls = aiki::TlsOptions::from_files(cli.tls_ca.as_deref(), cli.tls_cert.as_deref(), cli.tls_key.as_deref())?;
    Ok(Client::connect_with(cli.server.clone(), &tls)
        .await?
        .with_api_key(cli.api_key.as_deref().unwrap_or_default())?
        .with_namespace(cli.namespace.clone()))
}

/// Writes `bytes` to stdout; a reader that closed the pipe early (`| head`) is no error.
fn print_bytes(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// The JSON value of flag `flag` (`--input`, `--data`): inline, `@file`, or `@-` for stdin.
/// Refused here, with the flag named, if it is not JSON or nests deeper than the server takes.
fn read_json(flag: &str, arg: &str) -> anyhow::Result<serde_json::Value> {
    let text = match arg.strip_prefix('@') {
        Some("-") => std::io::read_to_string(std::io::stdin())?,
        Some(path) => std::fs::read_to_string(PathBuf::from(path))
            .map_err(|e| anyhow::anyhow!("{flag}: cannot read {path}: {e}"))?,
        None => arg.to_owned(),
    };
    let json = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{flag} is not valid JSON: {e}"))?;
    aiki_proto::check_depth(flag, &json)?;
    Ok(json)
}

fn parse_status(s: &str) -> anyhow::Result<RunStatus> {
    RunStatus::parse(&s.to_ascii_lowercase()).ok_or_else(|| {
        anyhow::anyhow!("unknown status {s:?}; use queued, running, suspended, completed, failed or cancelled")
    })
}

async fn run(cli: Cli) -> Result<(), Exit> {
    let out = Output::new(cli.output == Format::Json);
    match &cli.command {
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "aiki", &mut script);
            Ok(print_bytes(&script)?)
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut page)?;
            Ok(print_bytes(&page)?)
        }
        Command::Migrate { database_url } => {
            let applied = aiki_server::migrate(database_url).await?;
            out.migrated(&applied);
            Ok(())
        }
        Command::Dev(args) => Ok(dev::run(args, &cli.server).await?),
        Command::Bench(args) => {
            let target = bench::Target {
                server: cli.server_given.then(|| cli.access()),
                namespace: (cli.namespace != "default").then(|| cli.namespace.clone()),
            };
            Ok(bench::run(args, &target, out.json).await?)
        }
        Command::BenchWorker(args) => Ok(bench::worker(&cli.access(), &cli.namespace, args).await?),
        Command::Workers { all } => {
            let workers = connect(&cli).await?.workers().await?;
            let gone = workers.iter().filter(|w| !w.live).count();
            let shown: Vec<_> = workers.into_iter().filter(|w| *all || w.live).collect();
            out.workers(&shown);
            if !all && gone > 0 && !out.json {
                eprintln!("{gone} gone worker(s) not shown (no heartbeat within the lease time); --all shows them");
            }
            Ok(())
        }
        Command::Queues => {
            out.queues(&connect(&cli).await?.queues().await?);
            Ok(())
        }
        Command::Workflows => {
            out.workflows(&connect(&cli).await?.workflows().await?);
            Ok(())
        }
        Command::Run(cmd) => run_cmd(&cli, cmd, &out).await,
        Command::Keys(cmd) => keys_cmd(&cli, cmd, &out).await,
    }
}

async fn keys_cmd(cli: &Cli, cmd: &KeysCmd, out: &Output) -> Result<(), Exit> {
    let client = connect(cli).await?;
    match cmd {
        KeysCmd::Create {
            role,
            name,
            also,
            rate_limit,
        } => {
            let mut namespaces = vec![cli.namespace.clone()];
            namespaces.extend(
                also.iter()
                    .filter(|n| !namespaces.contains(n))
                    .cloned()
                    .collect::<Vec<_>>(),
            );
            let name = name
                .clone()
                .unwrap_or_else(|| format!("{role} key for {}", namespaces.join(",")));
            let (key, secret) = client.create_api_key(&name, role, &namespaces, *rate_limit).await?;
            out.key_created(&key, &secret);
        }
        KeysCmd::List { all } => out.keys(&client.api_keys(*all).await?),
        KeysCmd::Revoke { id } => {
            // The key itself names its id (its first 32 hex digits): only the id is sent.
            let id = match aiki_server::auth::parse(id.trim()) {
                Some((key_id, _)) => key_id.to_string(),
                None => id.clone(),
            };
            out.key_revoked(&client.revoke_api_key(&id).await?)
        }
    }
    Ok(())
}

async fn run_cmd(cli: &Cli, cmd: &RunCmd, out: &Output) -> Result<(), Exit> {
    let client = connect(cli).await?;
    match cmd {
        RunCmd::Start(a) => {
            let input = read_json("--input", &a.input)?;
            let opts = StartOptions {
                idempotency_key: a.key.clone(),
                return_existing: a.return_existing,
                queue: a.queue.clone(),
                version: a.workflow_version.clone(),
                timeouts: aiki::Timeouts {
                    execution: a.execution_timeout,
                    attempt: a.attempt_timeout,
                    schedule_to_start: a.schedule_to_start_timeout,
                    heartbeat: a.heartbeat_timeout,
                },
                priority: a.priority,
                delay: a.delay,
                retry: a.max_attempts.map(|n| aiki::RetryPolicy {
                    max_attempts: Some(n),
                    ..Default::default()
                }),
                ..StartOptions::default()
            };
            let handle = client.start_run(&a.workflow, &input, opts).await?;
            // A typo in the workflow's name, or no worker up: say so now rather than let the run
            // wait in silence.
            if handle.run.status == RunStatus::Queued
                && let Some(reason) = unserved(&client, &handle.run).await
            {
                eprintln!("warning: {reason}; the run waits until one does (see `aiki workers`, `aiki queues`)");
            }
            match a.wait {
                None => {
                    out.started(&handle);
                    Ok(())
                }
                Some(secs) => {
                    if !out.json {
                        eprintln!(
                            "{} run {}; waiting…",
                            if handle.created { "started" } else { "found existing" },
                            handle.id
                        );
                    }
                    wait_and_print(&client, &handle.id, secs, out).await
                }
            }
        }
        RunCmd::Get(r) => {
            let run = match (&r.id, &r.key) {
                (None, Some(key)) => client.get_by_key(key).await?,
                _ => client.get(&r.id(&client).await?).await?,
            };
            let children = client
                .list(&ListFilter {
                    parent_run_id: Some(run.id.clone()),
                    page_size: 100,
                    ..ListFilter::default()
                })
                .await?;
            out.run(&run, &children.runs);
            Ok(())
        }
        RunCmd::Result { run, wait } => wait_and_print(&client, &run.id(&client).await?, *wait, out).await,
        RunCmd::List(a) => {
            let filter = ListFilter {
                workflow: a.workflow.clone(),
                statuses: a
                    .status
                    .iter()
                    .map(|s| parse_status(s))
                    .collect::<anyhow::Result<_>>()?,
                queue: a.queue.clone(),
                created_after: a.since.map(|d| std::time::SystemTime::now() - d),
                created_before: None,
                page_size: a.limit,
                page_token: a.page_token.clone(),
                parent_run_id: a.parent.clone(),
            };
            out.runs(&client.list(&filter).await?);
            Ok(())
        }
        RunCmd::Cancel { run, reason } => {
            out.cancelled(&client.cancel(&run.id(&client).await?, reason).await?);
            Ok(())
        }
        RunCmd::Pause { run, reason } => {
            out.paused(&client.pause(&run.id(&client).await?, reason).await?);
            Ok(())
        }
        RunCmd::Resume(r) => {
            out.resumed(&client.resume(&r.id(&client).await?).await?);
            Ok(())
        }
        RunCmd::Wake(r) => {
            out.resumed(&client.wake(&r.id(&client).await?).await?);
            Ok(())
        }
        RunCmd::Event {
            args,
            key,
            data,
            event_key,
        } => {
            let payload = read_json("--data", data)?;
            let event_key = event_key.as_deref();
            let sent = match (key, args.as_slice()) {
                (Some(key), [name]) => client.send_event_by_key(key, name, &payload, event_key).await?,
                (None, [id, name]) => client.send_event(id, name, &payload, event_key).await?,
                (Some(_), _) => return Err(Exit(2, anyhow::anyhow!("with --key, give only the event's name"))),
                (None, _) => return Err(Exit(2, anyhow::anyhow!("give the run id and the event's name"))),
            };
            let name = args.last().map(String::as_str).unwrap_or_default();
            out.event_sent(name, &sent);
            Ok(())
        }
        RunCmd::History(r) => {
            out.history(&client.history(&r.id(&client).await?).await?);
            Ok(())
        }
        RunCmd::Watch(r) => {
            let id = &r.id(&client).await?;
            let mut stream = client.watch(id).await?;
            while let Some(event) = stream.next().await {
                out.event(&event?);
            }
            out.run_end(&client.get(id).await?);
            Ok(())
        }
    }
}

/// Why no worker takes `run`, if its queue says that no live worker serves its workflow (and
/// version). Best effort: `None` also when the queues cannot be read.
async fn unserved(client: &Client, run: &aiki::Run) -> Option<String> {
    let queues = client.queues().await.ok()?;
    queues
        .iter()
        .filter(|q| q.name == run.queue)
        .flat_map(|q| &q.unserved)
        .find(|u| u.workflow == run.workflow && (u.version.is_empty() || u.version == run.version))
        .map(|u| u.reason.clone())
}

async fn wait_and_print(client: &Client, id: &str, secs: u64, out: &Output) -> Result<(), Exit> {
    let run = match client.wait(id, Duration::from_secs(secs)).await {
        Ok(run) => run,
        Err(aiki::Error::Timeout { .. }) => {
            let run = client.get(id).await?;
            out.result(&run);
            let why = match run.status {
                RunStatus::Queued => unserved(client, &run)
                    .await
                    .map(|reason| format!(": {reason}"))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            return Err(Exit(
                4,
                anyhow::anyhow!("run {id} is still {} after {secs}s{why}", run.status.as_str()),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    out.result(&run);
    match run.status {
        RunStatus::Completed => Ok(()),
        status => Err(Exit(3, anyhow::anyhow!("run {id} {}", status.as_str()))),
    }
}
