//! `aiki-worker`: runs the workflows of a TOML file as commands (see `aiki_worker::command`).

use std::{ffi::OsStr, path::PathBuf, sync::Arc};

use aiki_worker::{
    WorkerBuilder,
    command::{self, guard},
};
use clap::Parser;
use tokio_util::sync::CancellationToken;

// Every run allocates many small, short-lived objects on several threads; under load glibc's
// allocator spent a third of the process's time in malloc, free and its arena locks (perf),
// where mimalloc does not contend.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs Aiki workflows defined as commands in a TOML file.
#[derive(Debug, Parser)]
#[command(name = "aiki-worker", version = aiki_proto::VERSION)]
struct Args {
    /// The configuration file (see README: "aiki-worker").
    #[arg(long, short, env = "AIKI_WORKER_CONFIG")]
    config: PathBuf,
    /// Server address; overrides the file's `server`.
    #[arg(long, env = "AIKI_SERVER")]
    server: Option<String>,
    /// PEM CA certificates for an https:// server; overrides the file's `tls_ca`.
    #[arg(long, env = "AIKI_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate (mutual TLS); overrides the file's `tls_cert`.
    #[arg(long, env = "AIKI_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the client certificate; overrides the file's `tls_key`.
    #[arg(long, env = "AIKI_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// API key of the `worker` role, for a server that requires keys. Not read from the file:
    /// give it by the environment.
    #[arg(long, env = "AIKI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os();
    // Started again by itself as a command's guard (see `command::guard`): that and nothing
    // else, before any runtime, logging or argument parsing.
    if args.nth(1).as_deref() == Some(OsStr::new(guard::ARG)) {
        guard::main(args);
    }
    serve()
}

#[tokio::main]
async fn serve() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // One variable for every binary: AIKI_LOG, else RUST_LOG, else "info".
            tracing_subscriber::EnvFilter::try_from_env("AIKI_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aiki-worker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.config.display()))?;
    let mut config = command::Config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    if let Some(server) = args.server {
        config.server = server;
    }
    config.tls_ca = args.tls_ca.or(config.tls_ca);
    config.tls_cert = args.tls_cert.or(config.tls_cert);
    config.tls_key = args.tls_key.or(config.tls_key);
    let tls = aiki::TlsOptions::from_files(
        config.tls_ca.as_deref(),
        config.tls_cert.as_deref(),
        config.tls_key.as_deref(),
    )?;
    let mut builder = WorkerBuilder::new(&config.server)
        .namespace(&config.namespace)
        .slots(config.slots)
        .shutdown_grace(config.shutdown_grace)
        .tls(tls)
        .api_key(args.api_key.as_deref().unwrap_or_default())?;
    if let Some(identity) = &config.identity {
        builder = builder.identity(identity);
    }
    if let Some(version) = &config.version {
        builder = builder.version(version);
    }
    for q in &config.queues {
        builder = builder.queue(q);
    }
    let runner = Arc::new(command::Runner::guarded(guard::Guard::this_executable()?));
    for (name, spec) in config.workflows {
        let spec = Arc::new(spec);
        let runner = runner.clone();
        builder = builder.register(name, move |ctx, input: serde_json::Value| {
            let (spec, runner) = (spec.clone(), runner.clone());
            async move { runner.run(&spec, ctx, input).await }
        });
    }
    let worker = builder.build().await?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received; draining");
        signal.cancel();
    });
    worker.run(shutdown).await?;
    Ok(())
}
