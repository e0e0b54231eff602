//! Aiki's server: the gRPC services over a PostgreSQL store.
//!
//! - [`config`]: settings from defaults, a TOML file, the environment and flags.
//! - [`store`]: all SQL; the only module that talks to PostgreSQL.
//! - [`database`]: the database URL (with libpq's `sslmode` and `sslrootcert`) and the TLS
//!   of every connection to PostgreSQL.
//! - [`service`]: `WorkflowService`, `WorkerService`, `AdminService`.
//! - [`commit`]: group commit of worker reports (one transaction for many).
//! - [`wake`]: LISTEN/NOTIFY, in-process wake-ups and timers for waiting polls.
//! - [`engine`]: every operation, once, for a caller; the gRPC services only translate.
//! - [`background`]: the notification listener, the timers of suspended runs, and the reaper
//!   (expired leases, timeouts; one per database, by advisory lock).
//! - [`tls`]: TLS and client certificates on the gRPC port; the certificate reloads itself.
//! - [`auth`]: API keys: authentication of every request, the roles, request rates.
//! - [`conn`]: the port's connections: a cap, a handshake deadline, accept errors survived.
//!
//! [`serve`] runs everything on a bound listener until a shutdown token is cancelled.

pub mod auth;
pub mod background;
pub mod commit;
pub mod config;
pub mod conn;
pub mod database;
pub mod engine;
pub mod error;
pub mod service;
pub mod status;
pub mod store;
pub mod tls;
pub mod validate;
pub mod wake;

use std::{sync::Arc, time::Duration};

use aiki_proto::v1::{
    admin_service_server::AdminServiceServer, worker_service_server::WorkerServiceServer,
    workflow_service_server::WorkflowServiceServer,
};
use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use engine::Engine;
use service::{admin::AdminSvc, worker::WorkerSvc, workflow::WorkflowSvc};
use store::Store;

/// Largest gRPC message the server decodes (unless `max_payload_bytes` asks for more).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Parses a database URL (and its TLS settings) into the database to connect to, naming the
/// server in PostgreSQL's list of sessions.
pub fn pg_config(url: &str) -> anyhow::Result<database::Database> {
    let mut db = database::Database::new(url).with_context(|| format!("invalid database URL {}", redact(url)))?;
    db.config_mut().application_name("aiki-server");
    Ok(db)
}

/// Opens one connection to `db`, to fail early with a message that names the cause.
async fn check(db: &database::Database, url: &str) -> anyhow::Result<()> {
    let (client, conn) = db
        .connect()
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {}", redact(url)))?;
    // Without its client, the connection says goodbye and ends.
    drop(client);
    let _ = conn.await;
    Ok(())
}

/// Applies pending migrations to the database at `url`; returns the names applied.
pub async fn migrate(url: &str) -> anyhow::Result<Vec<&'static str>> {
    let db = pg_config(url)?;
    check(&db, url).await?;
    let store = Store::new(&db, 2, Duration::ZERO)?;
    Ok(store.migrate().await?)
}

/// Serves the API on `listener` until `shutdown` is cancelled, then stops taking work, lets
/// in-flight calls finish (up to `shutdown_grace`) and returns.
pub async fn serve(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    // Before the database: a TLS setting that cannot work should fail the start at once.
    let tls = tls::acceptor(&config)?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && !config.insecure {
        anyhow::ensure!(
            tls.is_some(),
            "refusing to listen on {addr} without TLS: set tls_cert and tls_key (see the README's \
             Security section), listen on a loopback address, or pass --insecure to do it on purpose"
        );
        anyhow::ensure!(
            config.auth,
            "refusing to listen on {addr} without API keys (auth = false): turn auth on, listen on a \
             loopback address, or pass --insecure to do it on purpose"
        );
    }
    let pg = pg_config(&config.database_url)?;
    check(&pg, &config.database_url).await?;
    let store = Store::new(&pg, config.pool_size, config.notify_window)?;
    if config.migrate {
        store.migrate().await.context("migrations failed")?;
    }
    // Background work stops with `inner`, after the gRPC server has drained.
    let inner = CancellationToken::new();
    let wakers = wake::Wakers::new(inner.clone());
    // A quarter of the pool commits reports, an eighth single starts; the rest serves polls,
    // batched starts and reads.
    let committer = commit::Committer::start(commit::Reports(store.clone()), (config.pool_size / 4).clamp(1, 8));
    let starter = commit::Committer::start(commit::Starts(store.clone()), (config.pool_size / 8).clamp(1, 4));
    let (sleepers, deadlines) = tokio::sync::mpsc::unbounded_channel();
    let keys = Arc::new(auth::Keys::new(
        store.clone(),
        config.auth,
        config.admin_key.as_ref().map(|k| k.0.as_str()),
        config.key_rate_limit,
        // An eighth of the pool, as single starts have: polls and reports keep the rest.
        (config.pool_size / 8).clamp(1, 4),
    ));
    if config.auth && config.admin_key.is_none() {
        tracing::info!("API keys are required; no bootstrap admin key is set (admin_key, AIKI_ADMIN_KEY)");
    }
    let engine = Arc::new(Engine {
        store,
        committer,
        starter,
        sleepers,
        config: config.clone(),
        wakers: wakers.clone(),
        shutdown: shutdown.clone(),
        scans: tokio::sync::Semaphore::new(Engine::scan_permits(config.pool_size)),
        keys: keys.clone(),
        watches: Default::default(),
    });
    let keys_task = tokio::spawn(keys.clone().refresh(inner.clone()));
    let listen_task = tokio::spawn(background::listener::listen(
        pg.clone(),
        engine.store.clone(),
        wakers.clone(),
        inner.clone(),
    ));
    let reaper_task = tokio::spawn(background::reaper::run(
        engine.store.clone(),
        wakers.clone(),
        background::reaper::Settings {
            interval: config.reaper_interval,
            max_lease_expirations: config.max_lease_expirations,
            worker_retention: config.worker_retention,
        },
        pg,
        inner.clone(),
    ));
    let sleepers_task = tokio::spawn(background::timers::sleepers(
        engine.store.clone(),
        wakers.clone(),
        deadlines,
        inner.clone(),
    ));

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WorkflowServiceServer<WorkflowSvc>>()
        .await;
    health_reporter.set_serving::<WorkerServiceServer<WorkerSvc>>().await;
    health_reporter.set_serving::<AdminServiceServer<AdminSvc>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(aiki_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(aiki_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // The transport refuses messages over this before decoding them (OUT_OF_RANGE); payloads
    // over `max_payload_bytes` inside smaller messages get RESOURCE_EXHAUSTED from validation.
    // A StartRuns batch may carry many payloads, hence the generous bound.
    let max_message = MAX_MESSAGE_BYTES.max(config.max_payload_bytes.saturating_mul(4));
    tracing::info!(%addr, tls = tls.is_some(), mutual_tls = config.tls_client_ca.is_some(), auth = config.auth, "aiki-server listening");
    let signal = {
        let shutdown = shutdown.clone();
        let reporter = health_reporter.clone();
        async move {
            shutdown.cancelled().await;
            reporter.set_not_serving::<WorkflowServiceServer<WorkflowSvc>>().await;
            reporter.set_not_serving::<WorkerServiceServer<WorkerSvc>>().await;
            reporter.set_not_serving::<AdminServiceServer<AdminSvc>>().await;
            tracing::info!("shutting down: no new calls; finishing in-flight ones");
        }
    };
    let limits = conn::Limits {
        max_connections: client_connections(&config),
        handshake_timeout: config.handshake_timeout,
    };
    // Per call, what a client does not read is bounded by HTTP/2 flow control: hyper buffers at
    // most 400 KB past the client's window, plus the one message being written.
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .max_concurrent_streams(config.max_concurrent_streams)
        .layer(tower::util::MapResponseLayer::new(
            error::undecodable_is_invalid_argument,
        ))
        .layer(auth::AuthLayer(keys))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(WorkflowServiceServer::new(WorkflowSvc(engine.clone())).max_decoding_message_size(max_message))
        .add_service(WorkerServiceServer::new(WorkerSvc(engine.clone())).max_decoding_message_size(max_message))
        .add_service(AdminServiceServer::new(AdminSvc(engine.clone())));
    let accepting = CancellationToken::new();
    let _stop_accepting = accepting.clone().drop_guard();
    let incoming = conn::incoming(listener, tls, limits, accepting.clone());
    let server = server.serve_with_incoming_shutdown(incoming, signal);
    let grace = config.shutdown_grace;
    let result = tokio::select! {
        r = server => r.map_err(anyhow::Error::from),
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("in-flight calls did not finish within the shutdown grace period");
            Ok(())
        }
    };
    inner.cancel();
    let _ = listen_task.await;
    let _ = reaper_task.await;
    let _ = sleepers_task.await;
    let _ = keys_task.await;
    tracing::info!("aiki-server stopped");
    result
}

/// `max_client_connections`, or fewer if the open-file limit cannot be raised to allow them.
fn client_connections(config: &Config) -> usize {
    let wanted = config.max_client_connections;
    match conn::file_limit_allows(wanted, config.pool_size) {
        Some(allowed) if allowed < wanted => {
            let allowed = allowed.max(1);
            tracing::warn!(
                max_client_connections = wanted,
                allowed,
                "the open-file limit allows fewer client connections than max_client_connections; \
                 raise it (LimitNOFILE, ulimit -n) to allow them all"
            );
            allowed
        }
        _ => wanted,
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
