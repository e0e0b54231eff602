//! TLS to PostgreSQL: a cluster of the test's own that accepts encrypted connections only
//! (`hostssl`), with a certificate of a test CA for `localhost`. A server with
//! `sslmode=require` migrates, starts and runs a workflow with every session encrypted; the
//! certificate is checked as `verify-ca` and `verify-full` say; plaintext, a foreign CA, a
//! host name the certificate does not hold and a server without TLS are refused with a message
//! that names the cause and never the password.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aiki::Client;
use aiki_server::database::Database;
use aiki_tests::{Ca, Config, Files, TestServer, TestWorker, bin, eventually};
use aiki_worker::{Context, WorkerBuilder};
use serde_json::json;

/// The cluster's superuser password: it must appear in no message.
const PASSWORD: &str = "pg-tls-Secret-4b1e";

/// A PostgreSQL cluster of one test, in a folder of its own, on a free loopback port;
/// stopped (immediately: it holds nothing worth a checkpoint) and removed when dropped.
struct Cluster {
    pg_ctl: PathBuf,
    data: PathBuf,
    port: u16,
    // Last: removed after the cluster has stopped.
    files: Files,
}

/// The newest installed PostgreSQL's server programs (initdb and pg_ctl are not on the PATH
/// on Debian).
fn pg_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|v| root.join(v.to_string()).join("bin/initdb").exists())
        .max()
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server programs under {}: run `aiki dev postgres` (tests/run.sh does)",
                root.display()
            )
        });
    root.join(newest.to_string()).join("bin")
}

/// `program`, run as the `postgres` user when we are root (PostgreSQL refuses to run as root).
fn as_postgres(program: &Path, dir: &Path) -> Command {
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    // A folder the postgres user can enter.
    cmd.current_dir(dir);
    cmd
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// Creates and starts a cluster serving TLS with `cert` (certificate and key, PEM).
    fn start(name: &str, (cert, key): &(String, String)) -> Self {
        let bin = pg_bin();
        let files = Files::new(&format!("pg-{name}"));
        let dir = files.0.clone();
        let data = dir.join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        files.write("server.crt", cert);
        let key = files.write("server.key", key);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        files.write("pw", PASSWORD);
        let chown = || {
            if nix::unistd::geteuid().is_root() {
                let mut c = Command::new("chown");
                c.args(["-R", "postgres:postgres"]).arg(&dir);
                run(c, "chown");
            }
        };
        chown();
        let mut initdb = as_postgres(&bin.join("initdb"), &dir);
        initdb
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", dir.join("pw").display()))
            .arg("-D")
            .arg(&data);
        run(initdb, "initdb");
        // Encrypted connections only, with a password.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostssl all all ::1/128 scram-sha-256\n",
        )
        .unwrap();
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n\
             fsync = off\nshared_buffers = 16MB\nmax_connections = 40\n",
            dir = dir.display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        chown();
        let cluster = Self {
            pg_ctl: bin.join("pg_ctl"),
            data,
            port,
            files,
        };
        let mut start = as_postgres(&cluster.pg_ctl, &dir);
        start
            .args(["-w", "-t", "60", "-l"])
            .arg(dir.join("log"))
            .arg("-D")
            .arg(&cluster.data)
            .arg("start");
        let out = start.output().expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl start failed ({}); the cluster's log:\n{}",
            out.status,
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        cluster
    }

    /// The URL of the cluster's `postgres` database at `host` with `params` (`sslmode=…`).
    fn url(&self, host: &str, params: &str) -> String {
        format!("postgres://postgres:{PASSWORD}@{host}:{}/postgres?{params}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut stop = as_postgres(&self.pg_ctl, &self.files.0);
        stop.args(["-w", "-m", "immediate", "-D"]).arg(&self.data).arg("stop");
        match stop.output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("cannot run pg_ctl stop: {e}"),
        }
    }
}

/// `aiki migrate --database-url url`: `Ok` or the error it printed.
fn migrate(url: &str) -> Result<(), String> {
    let out = Command::new(bin("aiki"))
        .args(["migrate", "--database-url", url])
        .output()
        .expect("run aiki");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains(PASSWORD), "the password is printed: {stderr}");
    if out.status.success() { Ok(()) } else { Err(stderr) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_a_tls_only_database_migrates_and_runs_a_workflow() {
    let ca = Ca::new("aiki test database CA");
    let cluster = Cluster::start("e2e", &ca.issue_for(&["localhost"], true, false));
    let url = cluster.url("127.0.0.1", "sslmode=require");

    migrate(&url).expect("aiki migrate over TLS");
    let server = TestServer::start_with(Config::for_test(&url)).await;
    let client: Client = server.client().await;
    let run = client
        .start_run("double", &json!(21), aiki::StartOptions::default())
        .await
        .unwrap();
    let worker = WorkerBuilder::new(server.url()).register("double", |_ctx: Context, n: u64| async move { Ok(n * 2) });
    let mut worker = TestWorker::start(worker).await;
    let out: u64 = run.result(Duration::from_secs(30)).await.unwrap();
    assert_eq!(out, 42);
    worker.stop().await;

    // Every session of the server is encrypted, the notification listener's included.
    let (pg, conn) = Database::new(&url).unwrap().connect().await.unwrap();
    tokio::spawn(conn);
    let sessions = "SELECT count(*), bool_and(s.ssl), bool_or(a.query ILIKE 'LISTEN%') \
                    FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'aiki-server'";
    let pg = &pg;
    let listening = || async move {
        let row = pg.query_one(sessions, &[]).await.unwrap();
        row.get::<_, Option<bool>>(2) == Some(true)
    };
    eventually(Duration::from_secs(10), "the listener has subscribed", listening).await;
    let row = pg.query_one(sessions, &[]).await.unwrap();
    let (count, all_ssl): (i64, Option<bool>) = (row.get(0), row.get(1));
    assert!(count >= 2, "the pool and the listener are connected: {count}");
    assert_eq!(all_ssl, Some(true), "every session of the server uses TLS");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_checked_as_sslmode_asks() {
    let ca = Ca::new("aiki test database CA");
    // The certificate names localhost, not 127.0.0.1.
    let cluster = Cluster::start("verify", &ca.issue_for(&["localhost"], true, false));
    let root = cluster.files.write("root.pem", &ca.pem());
    let other = cluster.files.write("other.pem", &Ca::new("another CA").pem());
    let with_root = |mode: &str, root: &Path| format!("sslmode={mode}&sslrootcert={}", root.display());

    // The right CA and the host name the certificate holds.
    migrate(&cluster.url("localhost", &with_root("verify-full", &root))).expect("verify-full");
    // verify-ca does not look at the name.
    migrate(&cluster.url("127.0.0.1", &with_root("verify-ca", &root))).expect("verify-ca");

    let e = migrate(&cluster.url("127.0.0.1", &with_root("verify-full", &root))).unwrap_err();
    assert!(
        e.contains("not valid for the host name 127.0.0.1") && e.contains("localhost"),
        "a host name mismatch says so: {e}"
    );
    let e = migrate(&cluster.url("localhost", &with_root("verify-full", &other))).unwrap_err();
    assert!(
        e.contains("certificate is not trusted") && e.contains(&other.display().to_string()),
        "a foreign CA says so: {e}"
    );
    let e = migrate(&cluster.url("127.0.0.1", "sslmode=disable")).unwrap_err();
    assert!(
        e.contains("no encryption") && e.contains("set sslmode=require"),
        "plaintext refused by the server says what to do: {e}"
    );
    // Without a root, verify-full trusts the platform's roots, which do not sign a test CA.
    let e = migrate(&cluster.url("localhost", "sslmode=verify-full")).unwrap_err();
    assert!(
        e.contains("certificate is not trusted") || e.contains("no root certificates"),
        "{e}"
    );

    // The server refuses to start on a certificate it cannot trust, and says why.
    let out = tokio::process::Command::new(bin("aiki-server"))
        .args(["--listen", "127.0.0.1:0"])
        .env(
            "AIKI_DATABASE_URL",
            cluster.url("localhost", &with_root("verify-full", &other)),
        )
        .output()
        .await
        .expect("run aiki-server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot reach PostgreSQL at postgres://postgres:***@localhost")
            && stderr.contains("certificate is not trusted"),
        "{stderr}"
    );
    assert!(!stderr.contains(PASSWORD), "the password is printed: {stderr}");

    // A server that stops offering TLS is refused by sslmode=require.
    let (pg, conn) = Database::new(&cluster.url("localhost", &with_root("verify-full", &root)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tokio::spawn(conn);
    pg.batch_execute("ALTER SYSTEM SET ssl = off").await.unwrap();
    pg.query_one("SELECT pg_reload_conf()", &[]).await.unwrap();
    let require = cluster.url("127.0.0.1", "sslmode=require");
    let refused = Database::new(&require).unwrap();
    let refused = &refused;
    eventually(
        Duration::from_secs(10),
        "the server has stopped offering TLS",
        || async move { refused.connect().await.is_err() },
    )
    .await;
    let e = migrate(&require).unwrap_err();
    assert!(
        e.contains("the server refused TLS, which sslmode=require requires"),
        "{e}"
    );
}

/// The README's commands for a PostgreSQL that requires TLS, run as written against this
/// test's cluster (its address, role and password in place of the example's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_commands_reach_a_database_that_requires_tls() {
    let ca = Ca::new("aiki test database CA");
    let cluster = Cluster::start("readme", &ca.issue_for(&["localhost"], true, false));
    cluster.files.write("db-ca.pem", &ca.pem());
    let blocks = aiki_tests::readme_blocks("## TLS to PostgreSQL");
    let [block] = &blocks[..] else {
        panic!("one block of commands: {blocks:?}");
    };
    let [migrate, server] = &block[..] else {
        panic!("aiki migrate, then aiki-server: {block:?}");
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ours = |line: &str| {
        line.replace(
            "postgres://aiki:secret@db.example.com:5432/aiki",
            &format!("postgres://postgres:{PASSWORD}@localhost:{}/postgres", cluster.port),
        )
        .replace("7070", &port.to_string())
    };
    let bin_dir = bin("aiki").parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("sh")
        .arg("-c")
        .arg(ours(migrate))
        .current_dir(&cluster.files.0)
        .env("PATH", &path)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "`{migrate}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The server line: its environment, then the command.
    let line = ours(server);
    let (assignment, command) = line.split_once("' ").expect("VAR='…' aiki-server …");
    let (name, value) = assignment.split_once("='").unwrap();
    let mut words = command.split_whitespace();
    assert_eq!(words.next(), Some("aiki-server"));
    let _server = tokio::process::Command::new(bin_dir.join("aiki-server"))
        .args(words)
        .env(name, value)
        .current_dir(&cluster.files.0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start aiki-server");
    let url = format!("http://127.0.0.1:{port}");
    // It serves (and asks for keys, as a server does by default) once it has reached the
    // database over TLS.
    eventually(Duration::from_secs(30), "the server answers", || async {
        match Client::connect(url.clone()).await {
            Ok(c) => matches!(c.queues().await, Err(aiki::Error::Unauthenticated(_))),
            Err(_) => false,
        }
    })
    .await;
}
