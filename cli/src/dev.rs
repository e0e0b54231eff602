//! `aiki dev`: the whole local stack in one command, and `aiki dev postgres`: just make sure a
//! local PostgreSQL is running and reachable with the default URL.
//!
//! For a local database URL (host 127.0.0.1 or localhost) PostgreSQL is started with
//! `pg_ctlcluster` if it is installed but down, installed with `apt-get` if it is missing
//! (as root), and the URL's role and database are created if they do not exist.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use aiki::{Client, StartOptions};
use aiki_server::database::{ConnectError, Database};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tokio::process::{Child, Command};

#[derive(Debug, Args)]
pub struct DevArgs {
    #[command(subcommand)]
    what: Option<DevWhat>,
    /// PostgreSQL URL of the dev database.
    #[arg(long, env = "AIKI_DATABASE_URL", default_value = aiki_server::config::DEFAULT_DATABASE_URL, global = true)]
    database_url: String,
    /// Address the server listens on [default: the --server address].
    #[arg(long)]
    listen: Option<String>,
    /// Start no worker.
    #[arg(long)]
    no_worker: bool,
    /// Serve TLS with client certificates: make a local CA, a server certificate and a client
    /// certificate in the dev folder, and print how to use them.
    #[arg(long)]
    tls: bool,
}

/// The dev stack's certificates, made by [`DevTls::create`].
pub(crate) struct DevTls {
    pub(crate) ca: PathBuf,
    pub(crate) server_cert: PathBuf,
    pub(crate) server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// The variables a TLS setting may come in through, which the dev children must not inherit
/// from a shell set up for another server.
pub(crate) const TLS_VARS: [&str; 4] = ["AIKI_TLS_CERT", "AIKI_TLS_KEY", "AIKI_TLS_CLIENT_CA", "AIKI_TLS_CA"];

impl DevTls {
    /// A CA, a certificate of `host` (and localhost, 127.0.0.1) for the server and one for
    /// clients, all signed by the CA, written as PEM files into `dir`.
    pub(crate) fn create(dir: &Path, host: &str) -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        std::fs::create_dir_all(dir)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "aiki dev CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if !names.iter().any(|n| n == host) {
            names.push(host.to_owned());
        }
        let issue = |name: &str, usage: ExtendedKeyUsagePurpose| -> anyhow::Result<(String, String)> {
            let mut params = CertificateParams::new(names.clone())?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate()?;
            Ok((params.signed_by(&key, &ca)?.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = issue("aiki dev server", ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_cert, client_key) = issue("aiki dev client", ExtendedKeyUsagePurpose::ClientAuth)?;
        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            Ok(path)
        };
        Ok(Self {
            ca: write("ca.pem", &ca.pem())?,
            server_cert: write("server.pem", &server_cert)?,
            server_key: write("server.key", &server_key)?,
            client_cert: write("client.pem", &client_cert)?,
            client_key: write("client.key", &client_key)?,
        })
    }

    fn client_options(&self) -> anyhow::Result<aiki::TlsOptions> {
        Ok(aiki::TlsOptions::from_files(
            Some(&self.ca),
            Some(&self.client_cert),
            Some(&self.client_key),
        )?)
    }
}

#[derive(Debug, Subcommand)]
enum DevWhat {
    /// Only make sure PostgreSQL runs and the database exists; print its URL.
    #[command(after_help = crate::examples::DEV_POSTGRES)]
    Postgres,
}

pub async fn run(args: &DevArgs, server: &str) -> anyhow::Result<()> {
    ensure_postgres(&args.database_url).await?;
    if let Some(DevWhat::Postgres) = args.what {
        println!("{}", args.database_url);
        return Ok(());
    }
    let listen = match &args.listen {
        Some(l) => l.clone(),
        None => server
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned(),
    };
    // A second `aiki dev`, or any other server, on the address: one clear message, before
    // anything is started.
    if let Err(e) = std::net::TcpListener::bind(&listen) {
        bail!(
            "cannot listen on {listen}: {e}; is `aiki dev` (or another server) running there already? \
             Stop it, or give another address: aiki --server http://127.0.0.1:7071 dev"
        );
    }
    let dir = TempDir::new(std::env::temp_dir().join(format!("aiki-dev-{}", std::process::id())))?;
    let dir = &dir.0;
    let (server, tls) = if args.tls {
        let host = listen.rsplit_once(':').map_or(listen.as_str(), |(h, _)| h);
        let tls = DevTls::create(&dir.join("tls"), host.trim_start_matches('[').trim_end_matches(']'))?;
        (format!("https://{listen}"), Some(tls))
    } else {
        (server.to_owned(), None)
    };
    let server = server.as_str();
    let client_tls = match &tls {
        Some(t) => t.client_options()?,
        None => aiki::TlsOptions::default(),
    };

    // From here on a signal stops the children in order (they run in process groups of their
    // own, so Ctrl-C reaches only this process).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signalled = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    tokio::pin!(signalled);

    let mut children: Vec<(&str, Child)> = Vec::new();
    let setup = async {
        let server_bin = sibling("aiki-server")?;
        let mut command = Command::new(&server_bin);
        for var in TLS_VARS {
            command.env_remove(var);
        }
        if let Some(tls) = &tls {
            command
                .env("AIKI_TLS_CERT", &tls.server_cert)
                .env("AIKI_TLS_KEY", &tls.server_key)
                .env("AIKI_TLS_CLIENT_CA", &tls.ca);
        }
        // A local stack on a loopback address: no API keys, so that `aiki` works as it is.
        let child = command
            .env("AIKI_DATABASE_URL", &args.database_url)
            .env("AIKI_LISTEN", &listen)
            .env("AIKI_NO_AUTH", "true")
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", server_bin.display()))?;
        children.push(("aiki-server", child));
        let client = wait_for_server(server, &client_tls, &mut children[0].1).await?;

        if !args.no_worker {
            let config = dir.join("worker.toml");
            std::fs::write(&config, WORKER_TOML)?;
            let worker_bin = sibling("aiki-worker")?;
            let mut command = Command::new(&worker_bin);
            for var in TLS_VARS {
                command.env_remove(var);
            }
            if let Some(tls) = &tls {
                command
                    .arg("--tls-ca")
                    .arg(&tls.ca)
                    .arg("--tls-cert")
                    .arg(&tls.client_cert)
                    .arg("--tls-key")
                    .arg(&tls.client_key);
            }
            let child = command
                .arg("--config")
                .arg(&config)
                .arg("--server")
                .arg(server)
                .stdin(Stdio::null())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {}", worker_bin.display()))?;
            children.push(("aiki-worker", child));
            println!("worker config: {}", config.display());

            let input = serde_json::json!({"name": "Ada"});
            let run = client.start_run("hello", &input, StartOptions::default()).await?;
            println!("started run {} of workflow hello with input {input}", run.id);
            let out: serde_json::Value = run.result(Duration::from_secs(60)).await?;
            println!("run {} completed with output {out}", run.id);
        }
        println!();
        println!(
            "Aiki is running: server {server}, database {}",
            aiki_server::redact(&args.database_url)
        );
        println!("Try, in another terminal:");
        if let Some(bin_dir) = dir_of_this_binary_if_not_on_path() {
            println!("  export PATH={}:$PATH", bin_dir.display());
        }
        if let Some(tls) = &tls {
            println!(
                "  export AIKI_SERVER={server} AIKI_TLS_CA={} AIKI_TLS_CERT={} AIKI_TLS_KEY={}",
                tls.ca.display(),
                tls.client_cert.display(),
                tls.client_key.display()
            );
        }
        println!("  aiki run start hello --input '{{\"name\":\"Grace\"}}' --key hello-grace --wait");
        println!("  aiki run list");
        println!("  aiki workers");
        if let Some(tls) = &tls {
            println!(
                "  grpcurl -cacert {} -cert {} -key {} {listen} list",
                tls.ca.display(),
                tls.client_cert.display(),
                tls.client_key.display()
            );
        }
        println!("Press Ctrl-C to stop.");
        anyhow::Ok(())
    };
    let result = tokio::select! {
        r = setup => Some(r),
        _ = &mut signalled => None,
    };
    match result {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            stop(children).await;
            return Err(e);
        }
        None => {
            println!("stopping…");
            stop(children).await;
            return Ok(());
        }
    }
    let exited = async {
        loop {
            for (name, c) in children.iter_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return (name.to_string(), status);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = &mut signalled => {}
        (name, status) = exited => {
            stop(children).await;
            bail!("{name} exited unexpectedly ({status})");
        }
    }
    println!("stopping…");
    stop(children).await;
    Ok(())
}

/// A folder of this run's files, removed when dropped, however `aiki dev` ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(path: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The dev worker's workflows: `hello` greets whoever its input names.
const WORKER_TOML: &str = include_str!("../../worker/examples/hello.toml");

/// Stops children in reverse order of start: SIGTERM, then kill after 10 s.
pub(crate) async fn stop(children: Vec<(&str, Child)>) {
    for (name, mut c) in children.into_iter().rev() {
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(10), c.wait()).await.is_err() {
            tracing::warn!(name, "did not stop within 10s; killing");
            let _ = c.kill().await;
        }
    }
}

pub(crate) async fn wait_for_server(server: &str, tls: &aiki::TlsOptions, child: &mut Child) -> anyhow::Result<Client> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("aiki-server exited during start ({status}); see its log above");
        }
        let connect = tokio::time::timeout(Duration::from_secs(2), Client::connect_with(server.to_owned(), tls));
        // Up once it answers: with a list, or by asking for a key.
        if let Ok(Ok(client)) = connect.await
            && matches!(client.queues().await, Ok(_) | Err(aiki::Error::Unauthenticated(_)))
        {
            return Ok(client);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("aiki-server did not answer at {server} within 60s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A binary of this workspace next to the running `aiki` (e.g. target/debug/aiki-server).
pub(crate) fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if path.exists() {
        return Ok(path);
    }
    bail!(
        "{} not found next to {}; build it first with `cargo build --workspace`",
        name,
        exe.display()
    )
}

fn is_local(pg: &tokio_postgres::Config) -> bool {
    pg.get_hosts().iter().all(|h| match h {
        tokio_postgres::config::Host::Tcp(h) => h == "127.0.0.1" || h == "localhost" || h == "::1",
        tokio_postgres::config::Host::Unix(_) => true,
    })
}

async fn try_connect(db: &Database) -> Result<tokio_postgres::Client, ConnectError> {
    let (client, conn) = db.connect().await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Makes sure the database of `url` is reachable: starts or installs a local PostgreSQL and
/// creates the role and database if needed.
pub async fn ensure_postgres(url: &str) -> anyhow::Result<()> {
    let db = Database::new(url).with_context(|| format!("invalid database URL {}", aiki_server::redact(url)))?;
    let pg = db.config();
    let first = match try_connect(&db).await {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    if !is_local(pg) {
        bail!("cannot connect to {}: {first}", aiki_server::redact(url));
    }
    let user = pg.get_user().unwrap_or("postgres").to_owned();
    let dbname = pg.get_dbname().unwrap_or(&user).to_owned();
    let password = pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned());
    let mut admin = db.clone();
    admin.config_mut().dbname("postgres");

    if let Err(e) = try_connect(&admin).await {
        let refused = e.error.as_db_error().is_none();
        if refused {
            start_postgres(pg.get_ports().first().copied().unwrap_or(5432)).await?;
        }
        // Reachable now; create the role if the server does not know it.
        if try_connect(&admin).await.is_err() {
            let pw = password
                .as_deref()
                .map(|p| format!(" PASSWORD '{}'", p.replace('\'', "''")))
                .unwrap_or_default();
            let ident = format!("\"{}\"", user.replace('"', "\"\""));
            let sql = format!(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{r}') THEN CREATE ROLE {ident} LOGIN CREATEDB{pw}; ELSE ALTER ROLE {ident} LOGIN CREATEDB{pw}; END IF; \
                 IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'pg_checkpoint') THEN GRANT pg_checkpoint TO {ident}; END IF; END $$;",
                r = user.replace('\'', "''"),
            );
            psql_as_postgres(&sql).await?;
        }
    }
    let client = try_connect(&admin).await.with_context(|| {
        format!(
            "cannot connect to {} even after setting it up",
            aiki_server::redact(url)
        )
    })?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&dbname])
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE DATABASE \"{}\"", dbname.replace('"', "\"\"")))
            .await
            .with_context(|| format!("cannot create database {dbname}"))?;
        eprintln!("created database {dbname}");
    }
    Ok(())
}

/// `""` as root, else `sudo -n ` (which must not ask for a password).
fn as_root() -> &'static str {
    if nix::unistd::geteuid().is_root() {
        ""
    } else {
        "sudo -n "
    }
}

async fn start_postgres(port: u16) -> anyhow::Result<()> {
    let root = as_root();
    if which("pg_ctlcluster").is_none() {
        eprintln!("PostgreSQL is not installed; installing it with apt-get…");
        sh(&format!(
            "{root}apt-get update -qq && DEBIAN_FRONTEND=noninteractive {root}apt-get install -y -qq postgresql"
        ))
        .await
        .context("cannot install PostgreSQL: run as root (or with password-less sudo), or install it yourself")?;
    }
    let versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .context("no /etc/postgresql: PostgreSQL does not look installed")?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("main").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if versions.is_empty() {
        bail!("no PostgreSQL cluster found under /etc/postgresql");
    }
    let mut failures = Vec::new();
    let mut started = false;
    for v in &versions {
        eprintln!("starting PostgreSQL {v}…");
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("{root}pg_ctlcluster --skip-systemctl-redirect {v} main start"))
            .status()
            .await?;
        match status.code() {
            Some(0) => started = true,
            // 2: the cluster is running already. Fine: the connection check below counts.
            Some(2) => {}
            _ => failures.push(format!("PostgreSQL {v}: pg_ctlcluster {status}")),
        }
    }
    if failures.len() == versions.len() {
        let hint = if root.is_empty() {
            "see PostgreSQL's log under /var/log/postgresql"
        } else {
            "run as root (or with password-less sudo), or start it yourself"
        };
        bail!("cannot start PostgreSQL ({}); {hint}", failures.join("; "));
    }
    // A cluster that has just started takes a few seconds; one that ran already answers now
    // or listens on another port.
    let tries = if started { 60 } else { 4 };
    let port = port.to_string();
    for _ in 0..tries {
        if Command::new("pg_isready")
            .args(["-q", "-h", "127.0.0.1", "-p", &port])
            .status()
            .await
            .is_ok_and(|s| s.success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let clusters = Command::new("pg_lsclusters")
        .arg("-h")
        .output()
        .await
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let ports: Vec<&str> = clusters.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    bail!(
        "PostgreSQL runs, but nothing answers at 127.0.0.1:{port}, the port of the database URL{}",
        if ports.is_empty() {
            String::new()
        } else {
            format!(
                " (the local clusters listen on {}): give --database-url that port",
                ports.join(", ")
            )
        }
    )
}

async fn psql_as_postgres(sql: &str) -> anyhow::Result<()> {
    let runner = if nix::unistd::geteuid().is_root() && which("runuser").is_some() {
        "runuser -u postgres --"
    } else {
        "sudo -n -u postgres"
    };
    let quoted = sql.replace('\'', "'\\''");
    sh(&format!("cd / && {runner} psql -v ON_ERROR_STOP=1 -q -c '{quoted}'")).await
}

async fn sh(script: &str) -> anyhow::Result<()> {
    let status = Command::new("sh").arg("-c").arg(script).status().await?;
    if !status.success() {
        bail!("`{script}` failed ({status})");
    }
    Ok(())
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(cmd))
        .find(|p| Path::new(p).exists())
}

/// The folder of the running `aiki`, if running `aiki` from the PATH would not find it.
fn dir_of_this_binary_if_not_on_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.to_path_buf();
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.canonicalize().ok() == dir.canonicalize().ok()));
    (!on_path).then_some(dir)
}
