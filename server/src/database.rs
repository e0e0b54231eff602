//! The way to PostgreSQL: a database URL (or key=value string) with libpq's `sslmode` and
//! `sslrootcert`, turned into a connection config and the rustls connector every connection
//! of the server, the CLI and the migrations uses.
//!
//! tokio-postgres knows `sslmode` `disable`, `prefer` and `require` only, and no
//! `sslrootcert`: both are taken out of the string here and applied by the connector, with
//! libpq's meanings:
//!
//! | `sslmode`     | encrypted             | certificate checked                                |
//! |---------------|-----------------------|----------------------------------------------------|
//! | `disable`     | no                    | -                                                  |
//! | `prefer`      | if the server offers  | no                                                 |
//! | `require`     | yes                   | only if a root file is there (then as `verify-ca`) |
//! | `verify-ca`   | yes                   | signed by a root                                   |
//! | `verify-full` | yes                   | signed by a root, and names the host               |
//!
//! The roots: `sslrootcert=PATH` (PEM), else `~/.postgresql/root.crt` if it exists, else (for
//! `verify-*`) the platform's store, which is what managed services' certificates chain to;
//! `sslrootcert=system` asks for the platform's store and, as in libpq, `verify-full`.
//!
//! One departure from libpq: without an `sslmode`, a database whose hosts are all loopback
//! addresses (or `localhost`, or a Unix socket) is reached in plain text rather than with
//! `prefer`. TLS there protects nothing and costs each connection's commits CPU; an explicit
//! `sslmode=prefer` (or stricter) still asks for it.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
};

use anyhow::{Context, bail};
use tokio_postgres::{Client, Socket, config::SslMode, tls::MakeTlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    server::ParsedCertificate,
};

/// A connection's driver: spawn it, or poll it for notifications.
pub type Connection = tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// libpq's `sslmode`, all five that tokio-postgres and rustls can honour (`allow` is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "disable" => Mode::Disable,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            "allow" => bail!("sslmode=allow is not supported: use prefer (TLS when the server offers it) or disable"),
            other => bail!("unknown sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full"),
        })
    }
}

/// Where the trusted roots come from, for messages.
#[derive(Debug, Clone)]
enum Roots {
    File(PathBuf),
    System,
}

impl fmt::Display for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Roots::File(p) => write!(f, "the CA in sslrootcert {}", p.display()),
            Roots::System => f.write_str("the platform's root certificates (set sslrootcert to name a CA)"),
        }
    }
}

/// A database to connect to: the connection config and the TLS every connection uses.
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    mode: Mode,
    /// `sslrootcert` as given.
    rootcert: Option<String>,
    /// The roots the server's certificate is checked against, if it is.
    roots: Option<Roots>,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio-postgres' Debug hides the password.
        f.debug_struct("Database")
            .field("config", &self.config)
            .field("sslmode", &self.mode)
            .field("roots", &self.roots)
            .finish()
    }
}

impl Database {
    /// Parses a URL (`postgres://…?sslmode=verify-full&sslrootcert=ca.pem`) or a key=value
    /// string, and loads the roots its `sslmode` needs. Errors never hold the password.
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let (rest, ssl) = take_ssl_params(url)?;
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| anyhow::anyhow!("{e}"))?;
        let rootcert = ssl.rootcert.as_deref();
        let mode = match (&ssl.mode, rootcert) {
            (Some(m), _) => m.parse()?,
            (None, Some("system")) => Mode::VerifyFull,
            (None, _) => Mode::Prefer,
        };
        if rootcert == Some("system") && mode != Mode::VerifyFull {
            bail!(
                "sslrootcert=system needs sslmode=verify-full (the platform's roots vouch for host names, so the name must be checked)"
            );
        }
        let roots = match (mode, rootcert) {
            (Mode::Disable | Mode::Prefer, _) => None,
            (_, Some("system")) => Some(Roots::System),
            (_, Some(path)) => Some(Roots::File(PathBuf::from(path))),
            (_, None) => match default_root_file() {
                Some(path) => Some(Roots::File(path)),
                None if mode == Mode::Require => None,
                None => Some(Roots::System),
            },
        };
        let provider = crate::tls::provider();
        let verifier: Arc<dyn ServerCertVerifier> = match &roots {
            None => Arc::new(ChainCheck {
                roots: None,
                provider: provider.clone(),
            }),
            Some(r) => {
                let store = Arc::new(load_roots(r)?);
                if mode == Mode::VerifyFull {
                    rustls::client::WebPkiServerVerifier::builder_with_provider(store, provider.clone())
                        .build()
                        .context("cannot check server certificates")?
                } else {
                    Arc::new(ChainCheck {
                        roots: Some(store),
                        provider: provider.clone(),
                    })
                }
            }
        };
        let mut tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // As libpq 17: PostgreSQL 17 requires it of `sslnegotiation=direct`; older servers
        // ignore it.
        tls.alpn_protocols = vec![b"postgresql".to_vec()];
        config.ssl_mode(match mode {
            Mode::Disable => SslMode::Disable,
            // Without an sslmode, a database on this machine is reached in plain text: TLS
            // over loopback or a socket protects nothing and costs every commit CPU.
            Mode::Prefer if ssl.mode.is_none() && only_local_hosts(&config) => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(tls),
            mode,
            rootcert: ssl.rootcert.clone(),
            roots,
        })
    }

    /// Whether connections use TLS when the server offers it (`prefer`) but would go without.
    pub fn is_plain(&self) -> bool {
        self.config.get_ssl_mode() == SslMode::Disable
    }

    /// The connection config (host, user, database…).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// Changes the connection config (e.g. another database on the same server).
    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    /// The TLS connector, for a pool.
    pub fn tls(&self) -> MakeRustlsConnect {
        self.tls.clone()
    }

    /// The `sslmode` in force.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// `sslrootcert` as given, if it was.
    pub fn rootcert(&self) -> Option<&str> {
        self.rootcert.as_deref()
    }

    /// Opens one connection; the error says what went wrong (see [`Database::explain`]).
    pub async fn connect(&self) -> Result<(Client, Connection), ConnectError> {
        self.config
            .connect(self.tls.clone())
            .await
            .map_err(|error| ConnectError {
                message: self.explain(&error),
                error,
            })
    }

    /// What a failed connection means for the user: TLS refused by the server, a certificate
    /// not trusted or not for this host, plaintext refused… tokio-postgres' errors never hold
    /// the password, and neither does this.
    pub fn explain(&self, e: &tokio_postgres::Error) -> String {
        let mode = self.mode.name();
        if let Some(tls) = rustls_error(e) {
            let host = self.hosts();
            return match tls {
                rustls::Error::InvalidCertificate(
                    c @ (rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }),
                ) => format!(
                    "the server's certificate is not valid for the host name {host} ({c}); with sslmode=verify-full, connect by a name the certificate holds (or use sslmode=verify-ca)"
                ),
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
                ) => {
                    let roots = self
                        .roots
                        .as_ref()
                        .map_or_else(|| "no root".to_owned(), ToString::to_string);
                    format!("the server's certificate is not trusted (sslmode={mode}): it is not signed by {roots}")
                }
                rustls::Error::InvalidCertificate(c) => {
                    format!("the server's certificate was refused (sslmode={mode}): {c}")
                }
                other => format!("the TLS handshake with {host} failed (sslmode={mode}): {other}"),
            };
        }
        if e.as_db_error().is_none() && chain(e).any(|c| c.to_string().contains("server does not support TLS")) {
            return format!(
                "the server refused TLS, which sslmode={mode} requires: enable ssl on the server, or use sslmode=prefer or disable"
            );
        }
        if let Some(db) = e.as_db_error()
            && self.mode == Mode::Disable
            && *db.code() == tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return format!(
                "{db} (if the server accepts encrypted connections only, set sslmode=require or verify-full)"
            );
        }
        match e.as_db_error() {
            Some(db) => db.to_string(),
            None => e.to_string(),
        }
    }

    fn hosts(&self) -> String {
        let names: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        if names.is_empty() {
            "localhost".to_owned()
        } else {
            names.join(",")
        }
    }
}

/// A failed connection: what it means (`Display`) and tokio-postgres' error.
#[derive(Debug)]
pub struct ConnectError {
    message: String,
    pub error: tokio_postgres::Error,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConnectError {}

/// The error and its sources.
fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// The rustls error under a failed handshake. tokio-rustls wraps it in an `io::Error`, whose
/// `source` skips it, hence `get_ref`.
fn rustls_error(e: &tokio_postgres::Error) -> Option<&rustls::Error> {
    chain(e).find_map(|c| {
        c.downcast_ref::<rustls::Error>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        })
    })
}

/// libpq's default root file, if it exists.
fn default_root_file() -> Option<PathBuf> {
    let path = Path::new(&std::env::var_os("HOME")?).join(".postgresql/root.crt");
    path.is_file().then_some(path)
}

fn load_roots(roots: &Roots) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("cannot read sslrootcert {}", path.display()))?;
            if certs.is_empty() {
                bail!("sslrootcert {} holds no PEM certificate", path.display());
            }
            for c in certs {
                store
                    .add(c)
                    .with_context(|| format!("invalid CA certificate in sslrootcert {}", path.display()))?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                bail!(
                    "no root certificates found on this system ({}): install the ca-certificates package, or set sslrootcert to the database's CA",
                    if why.is_empty() {
                        "none installed".to_owned()
                    } else {
                        why.join("; ")
                    }
                );
            }
        }
    }
    Ok(store)
}

/// The libpq params this module handles itself.
#[derive(Debug, Default)]
struct SslParams {
    mode: Option<String>,
    rootcert: Option<String>,
}

const OURS: [&str; 2] = ["sslmode", "sslrootcert"];

/// Takes `sslmode` and `sslrootcert` out of a URL's query or a key=value string; the rest
/// is left as written.
fn take_ssl_params(s: &str) -> anyhow::Result<(String, SslParams)> {
    let mut params = SslParams::default();
    let mut keep = |key: &str, value: String| match key {
        "sslmode" => params.mode = Some(value),
        "sslrootcert" => params.rootcert = Some(value),
        _ => {}
    };
    let rest = match ["postgres://", "postgresql://"].iter().find(|p| s.starts_with(*p)) {
        Some(prefix) => {
            // As tokio-postgres: the credentials end at the first '@', the query starts at the
            // first '?' after them.
            let after = &s[prefix.len()..];
            let auth = after.find('@').map_or(0, |at| at + 1);
            match after[auth..].find('?') {
                None => s.to_owned(),
                Some(q) => {
                    let query_at = prefix.len() + auth + q;
                    let mut kept = Vec::new();
                    for pair in s[query_at + 1..].split('&') {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        let key = decode(k)?;
                        if OURS.contains(&key.as_str()) {
                            keep(&key, decode(v)?);
                        } else {
                            kept.push(pair);
                        }
                    }
                    let base = &s[..query_at];
                    if kept.is_empty() {
                        base.to_owned()
                    } else {
                        format!("{base}?{}", kept.join("&"))
                    }
                }
            }
        }
        None => {
            let mut out = String::with_capacity(s.len());
            let mut from = 0;
            for (start, end, key, value) in key_values(s)? {
                if OURS.contains(&key) {
                    out.push_str(&s[from..start]);
                    from = end;
                    keep(key, value);
                }
            }
            out.push_str(&s[from..]);
            out
        }
    };
    Ok((rest, params))
}

fn decode(s: &str) -> anyhow::Result<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .context("invalid percent-encoding in the database URL's parameters")
}

/// The parameters of a key=value string, as tokio-postgres (and libpq) read them: each with
/// its byte span, key and unquoted value.
fn key_values(s: &str) -> anyhow::Result<Vec<(usize, usize, &str, String)>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i == b.len() {
            return Ok(out);
        }
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = &s[start..i];
        i = skip_ws(i);
        if b.get(i) != Some(&b'=') {
            bail!("invalid connection string: expected '=' after {key:?}");
        }
        i = skip_ws(i + 1);
        let mut value = Vec::new();
        let quoted = b.get(i) == Some(&b'\'');
        if quoted {
            i += 1;
        }
        loop {
            match b.get(i) {
                None if quoted => bail!("invalid connection string: unterminated quoted value of {key:?}"),
                None => break,
                Some(b'\'') if quoted => {
                    i += 1;
                    break;
                }
                Some(c) if !quoted && c.is_ascii_whitespace() => break,
                Some(b'\\') => {
                    if let Some(&c) = b.get(i + 1) {
                        value.push(c);
                    }
                    i += 2;
                }
                Some(&c) => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        let end = i.min(b.len());
        out.push((start, end, key, String::from_utf8_lossy(&value).into_owned()));
    }
}

/// Whether every host of `config` is this machine: a loopback address, `localhost`, or a Unix
/// socket.
fn only_local_hosts(config: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|h| match h {
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            Host::Unix(_) => true,
        })
}

/// `prefer` and `require` without a root (`roots` none): encrypted, the certificate not
/// checked (libpq's meaning). `verify-ca` (and `require` with a root file): the certificate
/// chains to a root; its names are not looked at. The handshake's signatures are checked
/// either way.
#[derive(Debug)]
struct ChainCheck {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> (String, Option<String>, Option<String>) {
        let (rest, p) = take_ssl_params(s).unwrap();
        (rest, p.mode, p.rootcert)
    }

    #[test]
    fn ssl_params_leave_the_url() {
        assert_eq!(
            split("postgres://u:p@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem"),
            (
                "postgres://u:p@h:5432/db?application_name=x".into(),
                Some("verify-full".into()),
                Some("/etc/ca.pem".into())
            )
        );
        assert_eq!(
            split("postgresql://h/db?sslmode=require"),
            ("postgresql://h/db".into(), Some("require".into()), None)
        );
        // A '?' in the password is not the query.
        assert_eq!(
            split("postgres://u:p?x@h/db?sslmode=disable"),
            ("postgres://u:p?x@h/db".into(), Some("disable".into()), None)
        );
        assert_eq!(split("postgres://h/db"), ("postgres://h/db".into(), None, None));
    }

    #[test]
    fn ssl_params_leave_a_key_value_string() {
        assert_eq!(
            split("host=h sslmode = verify-ca  user=u sslrootcert='/a b/c\\'s.pem' dbname=d"),
            (
                "host=h   user=u  dbname=d".into(),
                Some("verify-ca".into()),
                Some("/a b/c's.pem".into())
            )
        );
        assert!(take_ssl_params("host=h sslrootcert='/x").is_err());
    }

    #[test]
    fn modes_and_roots_follow_libpq() {
        let db = |url: &str| Database::new(url);
        assert_eq!(db("postgres://h/d").unwrap().mode(), Mode::Prefer);
        // Without an sslmode, a local database goes without TLS; a remote one prefers it.
        assert!(db("postgres://127.0.0.1/d").unwrap().is_plain());
        assert!(db("postgres://localhost:5433/d").unwrap().is_plain());
        assert!(db("host=/run/postgresql dbname=d").unwrap().is_plain());
        assert!(!db("postgres://db.internal/d").unwrap().is_plain());
        assert!(!db("postgres://127.0.0.1/d?sslmode=prefer").unwrap().is_plain());
        assert_eq!(
            db("postgres://h/d?sslmode=disable").unwrap().config().get_ssl_mode(),
            SslMode::Disable
        );
        let e = db("host=h sslmode=verify-ca sslrootcert=system")
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify-full"), "{e}");
        let e = db("postgres://u:secret@h/d?sslmode=allow").unwrap_err().to_string();
        assert!(e.contains("allow") && !e.contains("secret"), "{e}");
        let e = db("postgres://u:secret@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem").unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("/nonexistent/ca.pem") && !e.contains("secret"), "{e}");
    }
}
