//! Server configuration: defaults, overridden by an optional TOML file, overridden by
//! environment variables (`AIKI_*`), overridden by flags.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// The server's settings. Every field can be set in the TOML file under the same name.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// PostgreSQL connection string (URL or key=value form), with libpq's `sslmode` and
    /// `sslrootcert` (see [`crate::database`]).
    pub database_url: String,
    /// Largest number of pooled database connections.
    pub pool_size: usize,
    /// Apply pending migrations at start (under an advisory lock, so replicas may race).
    pub migrate: bool,
    /// How long a lease lasts after a poll or a heartbeat.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often workers are told to heartbeat (must be well below `lease_ttl`).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// The longest a poll may wait for work.
    #[serde(with = "humantime_serde")]
    pub max_poll_wait: Duration,
    /// A run whose lease expires more often than this ends `failed`: the detector of a run that
    /// crashes every worker that takes it. High enough that restarts of a worker fleet, each of
    /// which can cost a run a lease, do not trip it.
    pub max_lease_expirations: u32,
    /// How often the reaper looks for expired leases.
    #[serde(with = "humantime_serde")]
    pub reaper_interval: Duration,
    /// Largest accepted payload (input, output, task result, error details), as JSON bytes.
    pub max_payload_bytes: usize,
    /// Retry policy of runs that do not set their own.
    pub default_retry: RetryDefaults,
    /// How long shutdown waits for in-flight calls before it stops anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How often `GetRunResult` and `WatchRun` re-read a run they wait for, to see changes made
    /// through other server replicas (changes made through this one wake them at once).
    #[serde(with = "humantime_serde")]
    pub recheck_interval: Duration,
    /// Shortest time between two ready notifications of one queue sent by batches of single
    /// starts; the ones in between go in one deferred notification at the end of the window
    /// (other replicas' pollers learn of such a run up to this late; see `store::notices`).
    #[serde(with = "humantime_serde")]
    pub notify_window: Duration,
    /// A worker not heard from for this long (and holding no lease) is forgotten: `ListWorkers`
    /// stops listing it. One that comes back registers again.
    #[serde(with = "humantime_serde")]
    pub worker_retention: Duration,
    /// Most client connections open at once; past it a new connection is closed at once (clients
    /// retry). Lowered at start to what the process' open-file limit allows.
    pub max_client_connections: usize,
    /// A connection that has not completed its TLS handshake (with TLS) and sent the HTTP/2
    /// preface within this is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How often an HTTP/2 ping checks that a connection's peer is still there.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    /// A connection whose peer does not answer a ping within this is closed.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
    /// Most calls in progress at once on one connection (HTTP/2 streams); a client's further
    /// calls wait for one to end.
    pub max_concurrent_streams: u32,
    /// A stream (`WatchRun`) whose client does not take its next message within this is ended
    /// with an error, and what it held is freed.
    #[serde(with = "humantime_serde")]
    pub slow_reader_timeout: Duration,
    /// PEM file with the server's certificate chain; with `tls_key`, the gRPC port speaks TLS
    /// only. Both files are re-read when they change, without a restart.
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM file with the CAs that sign client certificates: clients must then present one
    /// (mutual TLS). Needs `tls_cert` and `tls_key`.
    pub tls_client_ca: Option<PathBuf>,
    /// Every request must carry an API key (`authorization: Bearer <key>`), health checks
    /// excepted. Without it every caller may do everything: only on a loopback address, or
    /// with `insecure`.
    pub auth: bool,
    /// The bootstrap admin key: an admin of every namespace, to make the first keys with
    /// (`aiki keys create`). At least 32 characters; best given by the environment
    /// (`AIKI_ADMIN_KEY`) rather than written in a file.
    pub admin_key: Option<Secret>,
    /// Requests per second an API key may make when it sets no limit of its own (0: no
    /// limit). Past it, requests are refused with `RESOURCE_EXHAUSTED` and a retry delay.
    pub key_rate_limit: u32,
    /// Allow listening on a non-loopback address without TLS or without API keys: the server
    /// refuses to otherwise.
    pub insecure: bool,
}

/// A setting that is a secret: never shown in logs or debug output.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The server-wide default retry policy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryDefaults {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    /// Upper bound of the delay.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Growth of the delay per attempt.
    pub backoff_coefficient: f64,
}

impl Default for RetryDefaults {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(300),
            backoff_coefficient: 2.0,
        }
    }
}

/// The default database URL: a local PostgreSQL with the role `aiki` that `aiki dev` creates.
pub const DEFAULT_DATABASE_URL: &str = "postgres://aiki:aiki@127.0.0.1:5432/aiki";

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            pool_size: 16,
            migrate: true,
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            max_poll_wait: Duration::from_secs(60),
            max_lease_expirations: 10,
            reaper_interval: Duration::from_secs(1),
            max_payload_bytes: 2 * 1024 * 1024,
            default_retry: RetryDefaults::default(),
            shutdown_grace: Duration::from_secs(30),
            recheck_interval: Duration::from_millis(500),
            notify_window: Duration::from_millis(5),
            worker_retention: Duration::from_secs(7 * 86_400),
            max_client_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1000,
            slow_reader_timeout: Duration::from_secs(30),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            auth: true,
            admin_key: None,
            key_rate_limit: 10_000,
            insecure: false,
        }
    }
}

impl Config {
    /// Settings for tests: a given database, short leases, a quick reaper, a small pool.
    pub fn for_test(database_url: &str) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: database_url.to_owned(),
            pool_size: 8,
            lease_ttl: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(500),
            reaper_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(5),
            // On loopback; the tests of authentication turn it on.
            auth: false,
            ..Self::default()
        }
    }

    /// Checks the settings that must agree with each other.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.pool_size >= 2, "pool_size must be at least 2");
        anyhow::ensure!(
            self.tls_key.is_none() || self.tls_cert.is_some(),
            "tls_key is set but tls_cert is not: TLS needs both"
        );
        anyhow::ensure!(
            self.tls_cert.is_none() || self.tls_key.is_some(),
            "tls_cert is set but tls_key is not: TLS needs both"
        );
        anyhow::ensure!(
            self.tls_client_ca.is_none() || self.tls_cert.is_some(),
            "tls_client_ca is set but tls_cert and tls_key are not: client certificates need TLS"
        );
        if let Some(key) = &self.admin_key {
            anyhow::ensure!(
                key.0.chars().count() >= 32,
                "admin_key must be at least 32 characters long (e.g. `openssl rand -hex 32`)"
            );
            anyhow::ensure!(
                key.0.chars().all(|c| c.is_ascii_graphic()),
                "admin_key must be printable ASCII without spaces: it is sent in a header"
            );
        }
        anyhow::ensure!(
            self.heartbeat_interval < self.lease_ttl,
            "heartbeat_interval ({:?}) must be shorter than lease_ttl ({:?})",
            self.heartbeat_interval,
            self.lease_ttl
        );
        anyhow::ensure!(!self.reaper_interval.is_zero(), "reaper_interval must be positive");
        anyhow::ensure!(
            self.worker_retention >= self.lease_ttl,
            "worker_retention ({:?}) must be at least lease_ttl ({:?}): a worker is gone only once its leases could have expired",
            self.worker_retention,
            self.lease_ttl
        );
        anyhow::ensure!(!self.recheck_interval.is_zero(), "recheck_interval must be positive");
        anyhow::ensure!(
            self.notify_window <= Duration::from_secs(10),
            "notify_window ({:?}) must be at most 10s: other replicas' pollers wait for it",
            self.notify_window
        );
        anyhow::ensure!(
            self.max_client_connections >= 1,
            "max_client_connections must be at least 1"
        );
        anyhow::ensure!(!self.handshake_timeout.is_zero(), "handshake_timeout must be positive");
        anyhow::ensure!(
            !self.http2_keepalive_interval.is_zero() && !self.http2_keepalive_timeout.is_zero(),
            "http2_keepalive_interval and http2_keepalive_timeout must be positive"
        );
        anyhow::ensure!(
            self.max_concurrent_streams >= 10,
            "max_concurrent_streams must be at least 10: a worker polls, heartbeats and reports at once"
        );
        anyhow::ensure!(
            !self.slow_reader_timeout.is_zero(),
            "slow_reader_timeout must be positive"
        );
        anyhow::ensure!(
            self.max_payload_bytes >= 1024,
            "max_payload_bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.default_retry.max_attempts >= 1,
            "default_retry.max_attempts must be at least 1"
        );
        anyhow::ensure!(
            (1.0..=100.0).contains(&self.default_retry.backoff_coefficient),
            "default_retry.backoff_coefficient must be between 1 and 100"
        );
        Ok(())
    }
}

/// Command-line flags of `aiki-server`; each also reads an `AIKI_*` environment variable.
#[derive(Debug, clap::Parser)]
#[command(name = "aiki-server", version = aiki_proto::VERSION, about = "Aiki's gRPC server")]
pub struct Args {
    /// TOML file with any of the settings below (flags and environment win over it).
    #[arg(long, env = "AIKI_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long, env = "AIKI_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// PostgreSQL URL [default: postgres://aiki:aiki@127.0.0.1:5432/aiki].
    #[arg(long, env = "AIKI_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Largest number of database connections [default: 16].
    #[arg(long, env = "AIKI_POOL_SIZE")]
    pub pool_size: Option<usize>,
    /// Do not apply migrations at start (run `aiki migrate` instead).
    #[arg(long, env = "AIKI_NO_MIGRATE")]
    pub no_migrate: bool,
    /// Lease duration, e.g. "30s" [default: 30s].
    #[arg(long, env = "AIKI_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// Heartbeat interval told to workers [default: 10s].
    #[arg(long, env = "AIKI_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Longest poll wait [default: 60s].
    #[arg(long, env = "AIKI_MAX_POLL_WAIT", value_parser = humantime::parse_duration)]
    pub max_poll_wait: Option<Duration>,
    /// Lease expirations after which a run fails [default: 3].
    #[arg(long, env = "AIKI_MAX_LEASE_EXPIRATIONS")]
    pub max_lease_expirations: Option<u32>,
    /// Reaper period [default: 1s].
    #[arg(long, env = "AIKI_REAPER_INTERVAL", value_parser = humantime::parse_duration)]
    pub reaper_interval: Option<Duration>,
    /// Largest payload in bytes [default: 2097152].
    #[arg(long, env = "AIKI_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Grace period for in-flight calls at shutdown [default: 30s].
    #[arg(long, env = "AIKI_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// How often result and watch waiters re-read their run [default: 500ms].
    #[arg(long, env = "AIKI_RECHECK_INTERVAL", value_parser = humantime::parse_duration)]
    pub recheck_interval: Option<Duration>,
    /// Shortest time between two ready notifications of one queue from single starts [default: 5ms].
    #[arg(long, env = "AIKI_NOTIFY_WINDOW", value_parser = humantime::parse_duration)]
    pub notify_window: Option<Duration>,
    /// Forget workers not heard from for this long [default: 7days].
    #[arg(long, env = "AIKI_WORKER_RETENTION", value_parser = humantime::parse_duration)]
    pub worker_retention: Option<Duration>,
    /// Most client connections open at once [default: 10000].
    #[arg(long, env = "AIKI_MAX_CLIENT_CONNECTIONS")]
    pub max_client_connections: Option<usize>,
    /// Close connections without a TLS handshake and HTTP/2 preface within this [default: 10s].
    #[arg(long, env = "AIKI_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// How often to ping each connection's peer [default: 30s].
    #[arg(long, env = "AIKI_HTTP2_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Option<Duration>,
    /// Close a connection whose peer does not answer a ping within this [default: 10s].
    #[arg(long, env = "AIKI_HTTP2_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Option<Duration>,
    /// Most calls in progress at once on one connection [default: 1000].
    #[arg(long, env = "AIKI_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// End a stream whose client does not take its next message within this [default: 30s].
    #[arg(long, env = "AIKI_SLOW_READER_TIMEOUT", value_parser = humantime::parse_duration)]
    pub slow_reader_timeout: Option<Duration>,
    /// PEM certificate chain of the server; with --tls-key, serve TLS only.
    #[arg(long, env = "AIKI_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "AIKI_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates that sign client certificates: require and verify them (mTLS).
    #[arg(long, env = "AIKI_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Take requests without an API key: every caller may do everything (loopback only,
    /// unless --insecure).
    #[arg(long, env = "AIKI_NO_AUTH")]
    pub no_auth: bool,
    /// The bootstrap admin key (at least 32 characters), to make the first API keys with.
    #[arg(long, env = "AIKI_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Requests per second of an API key without a limit of its own; 0: none [default: 10000].
    #[arg(long, env = "AIKI_KEY_RATE_LIMIT")]
    pub key_rate_limit: Option<u32>,
    /// Listen on a non-loopback address without TLS or without API keys, on purpose.
    #[arg(long, env = "AIKI_INSECURE")]
    pub insecure: bool,
}

impl Args {
    /// Builds the configuration: defaults < file < environment/flags.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))?
            }
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            listen,
            database_url,
            pool_size,
            lease_ttl,
            heartbeat_interval,
            max_poll_wait
        );
        set!(
            max_lease_expirations,
            reaper_interval,
            max_payload_bytes,
            shutdown_grace,
            recheck_interval,
            notify_window,
            worker_retention,
            key_rate_limit
        );
        if let Some(v) = self.admin_key {
            c.admin_key = Some(Secret(v));
        }
        if self.no_auth {
            c.auth = false;
        }
        if self.insecure {
            c.insecure = true;
        }
        set!(
            max_client_connections,
            handshake_timeout,
            http2_keepalive_interval,
            http2_keepalive_timeout,
            max_concurrent_streams,
            slow_reader_timeout
        );
        if let Some(v) = self.tls_cert {
            c.tls_cert = Some(v);
        }
        if let Some(v) = self.tls_key {
            c.tls_key = Some(v);
        }
        if let Some(v) = self.tls_client_ca {
            c.tls_client_ca = Some(v);
        }
        if self.no_migrate {
            c.migrate = false;
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys of a TOML table, nested ones as `table.key`.
    fn keys(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in t {
            match v.as_table() {
                Some(inner) => keys(inner, &format!("{prefix}{k}."), out),
                None => out.push(format!("{prefix}{k}")),
            }
        }
    }

    #[test]
    fn the_example_configuration_has_every_key_at_its_default() {
        let text = include_str!("../../deploy/aiki-server.toml");
        let example: Config = toml::from_str(text).expect("the example loads");
        example.validate().expect("the example is valid");
        let (mut listed, mut all) = (Vec::new(), Vec::new());
        keys(&toml::from_str(text).unwrap(), "", &mut listed);
        keys(&toml::Table::try_from(Config::default()).unwrap(), "", &mut all);
        listed.sort();
        all.sort();
        assert_eq!(
            listed, all,
            "the example names every setting with a default, and only those"
        );
        // The settings without a default (TLS) are there too, commented out.
        let every = Config {
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            tls_client_ca: Some("a".into()),
            admin_key: Some(Secret("k".into())),
            ..Config::default()
        };
        let mut optional = Vec::new();
        keys(&toml::Table::try_from(every).unwrap(), "", &mut optional);
        for key in optional.iter().filter(|k| !all.contains(k)) {
            assert!(text.contains(&format!("# {key} = ")), "the example does not show {key}");
        }
        assert_eq!(
            toml::Table::try_from(&example).unwrap(),
            toml::Table::try_from(Config::default()).unwrap(),
            "the example gives the defaults"
        );
    }
    use clap::Parser;

    #[test]
    fn flags_override_file() {
        let dir = std::env::temp_dir().join(format!("aiki-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("server.toml");
        std::fs::write(
            &file,
            "lease_ttl = \"45s\"\npool_size = 4\n[default_retry]\nmax_attempts = 7\n",
        )
        .unwrap();
        let args = Args::parse_from(["aiki-server", "--config", file.to_str().unwrap(), "--pool-size", "9"]);
        let c = args.into_config().unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(45));
        assert_eq!(c.pool_size, 9);
        assert_eq!(c.default_retry.max_attempts, 7);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_unknown_keys_and_bad_combinations() {
        assert!(toml::from_str::<Config>("lease_tll = \"4s\"").is_err());
        let c = Config {
            heartbeat_interval: Duration::from_secs(60),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let key_only = Config {
            tls_key: Some("server.key".into()),
            ..Config::default()
        };
        assert!(key_only.validate().unwrap_err().to_string().contains("tls_cert"));
        let ca_only = Config {
            tls_client_ca: Some("clients.pem".into()),
            ..Config::default()
        };
        assert!(ca_only.validate().unwrap_err().to_string().contains("tls_client_ca"));
    }
}
