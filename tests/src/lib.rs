//! Test support: a fresh PostgreSQL database per test (cloned from a migrated template), an
//! in-process server on a loopback port, raw protocol clients, and the workspace's binaries.
//!
//! A test of the client or the worker runtime starts from a [`TestEnv`] (a database, a server
//! on it and an SDK client) and runs its workflows on a [`TestWorker`] (`env.worker(builder)`),
//! which stops with the test. A test that speaks the raw protocol, or needs something special
//! (several servers, a server it restarts, no server at all), builds what it needs from the
//! parts: [`TestDb`], [`TestServer`], [`RawWorker`].
//!
//! The admin URL comes from `AIKI_TEST_DATABASE_URL` (default
//! `postgres://aiki:aiki@127.0.0.1:5432/postgres`, the role `aiki dev postgres` creates).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use aiki_proto::v1::{
    LeasedRun, PollTasksRequest, RegisterWorkerRequest, StartRunRequest, WorkflowRef,
    worker_service_client::WorkerServiceClient, workflow_service_client::WorkflowServiceClient,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use aiki_server::Config;
use aiki_server::database::Database;

/// The admin connection string.
pub fn admin_url() -> String {
    std::env::var("AIKI_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://aiki:aiki@127.0.0.1:5432/postgres".into())
}

/// The tests' PostgreSQL, as the server would connect to it (`sslmode` included).
fn admin_database() -> Database {
    Database::new(&admin_url()).expect("valid AIKI_TEST_DATABASE_URL")
}

/// The connection string (key=value form) of database `db` on the tests' PostgreSQL.
pub fn url_for(db: &str) -> String {
    let database = admin_database();
    let pg = database.config();
    // Rebuild as key=value: works for any URL form.
    let mut parts = vec![format!("dbname={db}")];
    if let Some(u) = pg.get_user() {
        parts.push(format!("user={u}"));
    }
    if let Some(p) = pg.get_password() {
        parts.push(format!("password={}", String::from_utf8_lossy(p)));
    }
    for h in pg.get_hosts() {
        match h {
            tokio_postgres::config::Host::Tcp(h) => parts.push(format!("host={h}")),
            tokio_postgres::config::Host::Unix(p) => parts.push(format!("host={}", p.display())),
        }
    }
    if let Some(port) = pg.get_ports().first() {
        parts.push(format!("port={port}"));
    }
    parts.push(format!("sslmode={}", database.mode()));
    if let Some(root) = database.rootcert() {
        parts.push(format!(
            "sslrootcert='{}'",
            root.replace('\\', "\\\\").replace('\'', "\\'")
        ));
    }
    parts.join(" ")
}

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = admin_database().connect().await.unwrap_or_else(|e| {
        panic!(
            "cannot connect to {}: {e}; run `cargo run -p aiki-cli -- dev postgres` first",
            aiki_server::redact(&admin_url())
        )
    });
    tokio::spawn(conn);
    client
}

/// The template's name: changes whenever the migrations change.
fn template_name() -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for (v, name, sql) in aiki_server::store::MIGRATIONS {
        for b in format!("{v}{name}{sql}").bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("aiki_tmpl_{:012x}", h & 0xffff_ffff_ffff)
}

/// A database of its own for one test, dropped (with FORCE) when this is dropped.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Clones the migrated template into a new database.
    pub async fn new() -> Self {
        let tmpl = template_name();
        let client = admin().await;
        // One creator at a time, across test processes: the template must have no other
        // session while it is cloned.
        client
            .execute("SELECT pg_advisory_lock(7307100)", &[])
            .await
            .expect("lock");
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&tmpl])
            .await
            .expect("query")
            .is_some();
        if !exists {
            let building = format!("{tmpl}_build");
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
                .await
                .expect("drop");
            client
                .batch_execute(&format!("CREATE DATABASE {building}"))
                .await
                .expect("create template");
            aiki_server::migrate(&url_for(&building))
                .await
                .expect("migrate template");
            client
                .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {tmpl}"))
                .await
                .expect("rename");
        }
        let name = format!("aiki_t_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {tmpl}"))
            .await
            .expect("create test db");
        client
            .execute("SELECT pg_advisory_unlock(7307100)", &[])
            .await
            .expect("unlock");
        let url = url_for(&name);
        Self { name, url }
    }

    /// A new database with no schema at all (for migration tests).
    pub async fn empty() -> Self {
        let name = format!("aiki_t_{}", uuid::Uuid::new_v4().simple());
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test db");
        let url = url_for(&name);
        Self { name, url }
    }

    /// A connection to this database, for assertions on stored rows.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, conn) = Database::new(&self.url)
            .expect("a valid URL")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.name));
        tokio::spawn(conn);
        client
    }

    /// The two columns of each row `sql` selects about run `run_id` (its `$1`).
    pub async fn pairs_of_run<A, B>(&self, sql: &str, run_id: &str) -> Vec<(A, B)>
    where
        A: for<'a> tokio_postgres::types::FromSql<'a>,
        B: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        let id: uuid::Uuid = run_id.parse().expect("a run id");
        self.connect()
            .await
            .query(sql, &[&id])
            .await
            .expect("query")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop from a thread of its own: this may run inside or outside a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let client = admin().await;
                if let Err(e) = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                {
                    eprintln!("could not drop test database {name}: {e}");
                }
            });
        })
        .join();
    }
}

/// A server running in this process on a loopback port.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// With TLS: what [`TestServer::client`] and [`TestServer::channel`] connect with.
    tls: Option<aiki::TlsOptions>,
}

impl TestServer {
    /// Starts a server on `db` with [`Config::for_test`].
    pub async fn start(db: &TestDb) -> Self {
        Self::start_with(Config::for_test(&db.url)).await
    }

    /// Starts a server with `config` (its `listen` is ignored: a free loopback port is used).
    pub async fn start_with(config: Config) -> Self {
        Self::start_inner(config, None).await
    }

    /// Starts a server whose `config` sets `tls_cert` and `tls_key`; its URL is then
    /// `https://127.0.0.1:PORT`, and its own clients connect with `tls`.
    pub async fn start_tls(config: Config, tls: aiki::TlsOptions) -> Self {
        assert!(config.tls_cert.is_some(), "start_tls needs a config with TLS");
        Self::start_inner(config, Some(tls)).await
    }

    async fn start_inner(config: Config, tls: Option<aiki::TlsOptions>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(aiki_server::serve(config, listener, shutdown.clone()));
        let server = Self {
            addr,
            shutdown,
            task: Some(task),
            tls,
        };
        // Ready when it answers (a server that requires API keys answers that it does).
        let client = server.client().await;
        for _ in 0..200 {
            if matches!(client.queues().await, Ok(_) | Err(aiki::Error::Unauthenticated(_))) {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("test server did not come up");
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// An SDK client.
    pub async fn client(&self) -> aiki::Client {
        aiki::Client::connect_with(self.url(), &self.tls.clone().unwrap_or_default())
            .await
            .expect("connect")
    }

    /// A raw channel.
    pub async fn channel(&self) -> Channel {
        aiki::connect_channel_with(self.url(), &self.tls.clone().unwrap_or_default())
            .await
            .expect("channel")
    }

    pub async fn workflows(&self) -> WorkflowServiceClient<Channel> {
        WorkflowServiceClient::new(self.channel().await)
    }

    pub async fn workers(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::new(self.channel().await)
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server result");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One test's environment: a database of its own, a server on it running in this process, and
/// an SDK client of that server. Dropped, it stops the server and drops the database.
#[derive(Debug)]
pub struct TestEnv {
    /// A client of [`TestEnv::server`].
    pub client: aiki::Client,
    pub server: TestServer,
    pub db: TestDb,
}

impl TestEnv {
    /// A fresh database and a server on it with [`Config::for_test`].
    pub async fn new() -> Self {
        Self::with_config(|_| {}).await
    }

    /// [`TestEnv::new`], with the server's [`Config::for_test`] changed by `change` first.
    pub async fn with_config(change: impl FnOnce(&mut Config)) -> Self {
        let db = TestDb::new().await;
        let mut config = Config::for_test(&db.url);
        change(&mut config);
        let server = TestServer::start_with(config).await;
        let client = server.client().await;
        Self { client, server, db }
    }

    /// The server's address, for a [`aiki_worker::WorkerBuilder`] or another client.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Builds `builder` (a worker of this environment's server, see [`TestEnv::url`]) and runs
    /// it until the returned guard is stopped or dropped.
    pub async fn worker(&self, builder: aiki_worker::WorkerBuilder) -> TestWorker {
        TestWorker::start(builder).await
    }
}

/// A worker running in this process, on a task of its own. [`TestWorker::stop`] shuts it down
/// (it drains as on SIGTERM) and checks that it ended cleanly. Dropped, it is shut down too,
/// and waited for on a multi-threaded runtime unless the test is failing. It dereferences to
/// the [`aiki_worker::Worker`], whose counters stay readable after it stops.
#[derive(Debug)]
pub struct TestWorker {
    worker: aiki_worker::Worker,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), aiki::Error>>>,
}

impl TestWorker {
    /// Builds `builder` and runs the worker.
    pub async fn start(builder: aiki_worker::WorkerBuilder) -> Self {
        let worker = builder.build().await.expect("build the worker");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.clone().run(shutdown.clone()));
        Self {
            worker,
            shutdown,
            task: Some(task),
        }
    }

    /// Shuts the worker down and waits until it has: what it was going to report has been
    /// sent. Panics if the worker ended with an error.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("worker task").expect("worker result");
        }
    }
}

impl std::ops::Deref for TestWorker {
    type Target = aiki_worker::Worker;

    fn deref(&self) -> &Self::Target {
        &self.worker
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let Some(task) = self.task.take() else {
            return;
        };
        // Waiting blocks this thread, which a single-threaded runtime needs to run the worker;
        // a failing test should not wait for the worker's drain either.
        let multi_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_threaded && !std::thread::panicking() {
            let _ = tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(task));
        }
    }
}

/// A worker speaking the raw protocol: registers, then polls, reports, heartbeats by hand.
#[derive(Debug, Clone)]
pub struct RawWorker {
    pub id: String,
    pub client: WorkerServiceClient<Channel>,
}

impl RawWorker {
    pub async fn register(server: &TestServer, queues: &[&str]) -> Self {
        let mut client = server.workers().await;
        let id = client
            .register_worker(RegisterWorkerRequest {
                namespace: String::new(),
                identity: "raw-test-worker".into(),
                host: "test".into(),
                workflows: vec![WorkflowRef {
                    name: "*".into(),
                    version: String::new(),
                }],
                queues: queues.iter().map(|q| q.to_string()).collect(),
                slots: 100,
            })
            .await
            .expect("register")
            .into_inner()
            .worker_id;
        Self { id, client }
    }

    /// Polls once, waiting up to `wait`.
    pub async fn poll(&self, max: u32, wait: Duration) -> Vec<LeasedRun> {
        self.client
            .clone()
            .poll_tasks(PollTasksRequest {
                namespace: String::new(),
                worker_id: self.id.clone(),
                queues: Vec::new(),
                max_runs: max,
                wait: Some(aiki_proto::duration_to_proto(wait)),
            })
            .await
            .expect("poll")
            .into_inner()
            .runs
    }
}

/// A plain StartRun request.
pub fn start_req(workflow: &str, input: serde_json::Value) -> StartRunRequest {
    StartRunRequest {
        workflow: workflow.into(),
        input: Some(aiki_proto::json_to_value(&input)),
        ..Default::default()
    }
}

/// A binary of this workspace (built by `cargo test --workspace`), e.g. "aiki".
pub fn bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        // target/debug/deps/test-xxxx → target/debug
        exe.parent().and_then(|p| p.parent()).expect("target dir").to_path_buf()
    });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` (or `cargo test --workspace`)",
        path.display()
    );
    path
}

/// Waits until `check` is true, polling every 20 ms, up to `timeout`; panics with `what`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestDb {
    /// Waits until a poll has claimed from this database (the claim finished, or the check
    /// for skipped runs that follows a short claim has begun): a poll that found nothing is
    /// then waiting for a wake-up.
    pub async fn until_claimed(&self) {
        self.until_claimed_since(None).await
    }

    /// The database's clock, for [`TestDb::until_claimed_since`].
    pub async fn clock(&self) -> std::time::SystemTime {
        self.connect()
            .await
            .query_one("SELECT clock_timestamp()", &[])
            .await
            .expect("clock_timestamp()")
            .get(0)
    }

    /// [`TestDb::until_claimed`], counting only statements that began at `since` (the
    /// database's [`TestDb::clock`]) or later: an earlier poll's claim, still shown by its idle
    /// connection, does not count. A poll subscribes to wake-ups before it claims, so once its
    /// claim has begun a wake-up reaches it.
    pub async fn until_claimed_since(&self, since: Option<std::time::SystemTime>) {
        let claim = include_str!("../../server/src/store/sql/leases/claim.sql");
        let skipped = include_str!("../../server/src/store/sql/leases/claim_skipped.sql");
        let watcher = self.connect().await;
        // Looked for without a pause: the poll's connection shows the claim only until the
        // pool lends it to another statement (the reaper's, every 100 ms in tests).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let seen: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database()
                       AND ((left(query, 200) = left($1, 200) AND state = 'idle')
                            OR left(query, 200) = left($2, 200))
                       AND ($3::timestamptz IS NULL OR query_start >= $3)",
                    &[&claim, &skipped, &since],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            if seen > 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until a poll has claimed"
            );
            tokio::task::yield_now().await;
        }
    }
}

/// A shared counter map, for side effects: how many times each key ran.
pub type Counts = Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

/// Starts a run with the raw client and returns its id.
pub async fn start_id(client: &mut WorkflowServiceClient<Channel>, req: StartRunRequest) -> String {
    client
        .start_run(req)
        .await
        .expect("start")
        .into_inner()
        .run
        .expect("run")
        .id
}

/// A task result with an output, as a worker reports it.
pub fn task_output(key: &str, name: &str, seq: u32, output: serde_json::Value) -> aiki_proto::v1::TaskResult {
    aiki_proto::v1::TaskResult {
        key: key.into(),
        name: name.into(),
        seq,
        result: Some(aiki_proto::v1::task_result::Result::Output(aiki_proto::json_to_value(
            &output,
        ))),
    }
}

/// Sends `()` when dropped: tells a test that a workflow's execution was stopped.
#[derive(Debug)]
pub struct OnDrop(pub tokio::sync::mpsc::UnboundedSender<()>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// The types of a run's history events, in order, as `GetRunHistory` gives them.
pub async fn history_types(server: &TestServer, run_id: &str) -> Vec<String> {
    let mut wf = server.workflows().await;
    let (mut out, mut after) = (Vec::new(), 0);
    loop {
        let page = wf
            .get_run_history(aiki_proto::v1::GetRunHistoryRequest {
                namespace: String::new(),
                run_id: run_id.to_owned(),
                after_seq: after,
            })
            .await
            .expect("history")
            .into_inner();
        for e in &page.events {
            let kind = aiki_proto::v1::EventType::try_from(e.r#type).unwrap_or(aiki_proto::v1::EventType::Unspecified);
            out.push(kind.as_str().to_owned());
            after = e.seq;
        }
        if !page.more {
            return out;
        }
    }
}

/// A certificate authority made for one test (TLS on the gRPC port, or PostgreSQL's).
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `127.0.0.1` and `localhost` (server) or a client, and its key, as PEM.
    pub fn issue(&self, server: bool, expired: bool) -> (String, String) {
        self.issue_for(&["127.0.0.1", "localhost"], server, expired)
    }

    /// [`Ca::issue`], for the host names (or addresses) `names`.
    pub fn issue_for(&self, names: &[&str], server: bool, expired: bool) -> (String, String) {
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, if server { "aiki server" } else { "aiki client" });
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Client options trusting this CA, with no client certificate.
    pub fn trust(&self) -> aiki::TlsOptions {
        aiki::TlsOptions {
            ca: Some(self.pem().into_bytes()),
            ..aiki::TlsOptions::default()
        }
    }
}

/// A folder of PEM files, removed when dropped.
pub struct Files(pub PathBuf);

impl Files {
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("aiki-tls-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the `aiki` CLI against `server` with `args`; answers (success, stdout, stderr).
pub async fn aiki_cli(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(bin("aiki"))
        .args(["--server", &server.url()])
        .args(args)
        .output()
        .await
        .expect("run aiki");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `sh` blocks of the README's section `heading` (up to the next heading), each as its
/// lines, comments left out.
pub fn readme_blocks(heading: &str) -> Vec<Vec<String>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme.find(heading).expect("the README has the section");
    let rest = &readme[start + heading.len()..];
    let end = rest.find("\n#").unwrap_or(rest.len());
    let (mut blocks, mut block) = (Vec::new(), None::<Vec<String>>);
    for line in rest[..end].lines() {
        match (line.trim(), &mut block) {
            ("```sh", None) => block = Some(Vec::new()),
            ("```", Some(_)) => blocks.push(block.take().unwrap()),
            (l, Some(b)) if !l.is_empty() && !l.starts_with('#') => b.push(l.to_owned()),
            _ => {}
        }
    }
    blocks
}
