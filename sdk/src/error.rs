//! The SDK's typed errors.

use tonic::{Code, Status};

/// Why a workflow run failed or ended, as the server recorded it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunError {
    /// A short class, e.g. `ExitStatus`, `Timeout`, `LeaseExpired`, `Cancelled`.
    pub kind: String,
    /// For people.
    pub message: String,
    /// Anything else.
    pub details: Option<serde_json::Value>,
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.kind, self.message)
        }
    }
}

impl From<&aiki_proto::v1::RunError> for RunError {
    fn from(e: &aiki_proto::v1::RunError) -> Self {
        Self {
            kind: e.r#type.clone(),
            message: e.message.clone(),
            details: e.details.as_ref().and_then(|d| aiki_proto::value_to_json(d).ok()),
        }
    }
}

/// Everything the client can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request was malformed (bad name, payload, duration...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The run (or worker) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The idempotency key names a run started with another input.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The request does not fit the run's state (e.g. cancelling a completed run).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A payload is over the server's limit, or the caller made too many requests (the
    /// message says when to retry).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The server requires an API key and got none, or one it does not know or that was
    /// revoked (see `Client::with_api_key`).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The API key may not do this, or not in this namespace.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The server could not be reached: nothing to connect to at its address (said at once,
    /// with the likely cause), or unavailable through the retries. A TLS failure (a server
    /// certificate that does not verify, a client certificate the server refuses) is not
    /// retried; its message begins with `TLS: `.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The run did not end within the time given.
    #[error("timed out waiting for run {run_id}")]
    Timeout { run_id: String },
    /// The run ended `failed`.
    #[error("run {run_id} failed: {error}")]
    RunFailed { run_id: String, error: RunError },
    /// The run ended `cancelled`.
    #[error("run {run_id} was cancelled")]
    RunCancelled { run_id: String },
    /// An input or output did not (de)serialize.
    #[error("serialization: {0}")]
    Serde(#[from] serde_json::Error),
    /// Any other status from the server.
    #[error("server error: {0}")]
    Server(Status),
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        let m = s.message().to_owned();
        let source = std::error::Error::source(&s);
        match s.code() {
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(m),
            Code::NotFound => Error::NotFound(m),
            Code::AlreadyExists => Error::AlreadyExists(m),
            Code::FailedPrecondition => Error::FailedPrecondition(m),
            Code::ResourceExhausted => Error::ResourceExhausted(m),
            Code::Unauthenticated => Error::Unauthenticated(m),
            Code::PermissionDenied => Error::PermissionDenied(m),
            Code::Unavailable => Error::Unavailable(m),
            // A connection the server's TLS refused (say, for want of a client certificate)
            // surfaces as a failed call rather than a failed connect.
            _ if source.is_some_and(is_tls_failure) => {
                Error::Unavailable(format!("{TLS_PREFIX}{}", crate::client::chain(source.unwrap_or(&s))))
            }
            // The connection failed under the call (a reset, a broken pipe, a connection closed
            // by the server, as when it refuses a client certificate before the client read
            // why): the server never answered, which is what `Unavailable` means.
            _ if source.is_some_and(|e| e.is::<tonic::transport::Error>()) => Error::Unavailable(format!(
                "the connection failed: {}",
                crate::client::chain(source.unwrap_or(&s))
            )),
            _ => Error::Server(s),
        }
    }
}

/// How the message of an `Error::Unavailable` that is a TLS failure begins.
pub(crate) const TLS_PREFIX: &str = "TLS: ";

/// Whether `e` or one of its causes is a TLS error. tokio-rustls wraps those in `io::Error`s
/// of kind `InvalidData` (whose `source` skips the wrapped error); after a failed call, h2 has
/// rebuilt that `io::Error` from its kind and text, so the TLS alert is known by its words.
pub(crate) fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.is::<tokio_rustls::rustls::Error>() {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::InvalidData
        {
            match io.get_ref() {
                Some(inner) if is_tls_failure(inner) => return true,
                Some(inner) => {
                    let text = inner.to_string();
                    if text.contains("fatal alert") || text.contains("peer certificate") {
                        return true;
                    }
                }
                None => {}
            }
        }
        source = s.source();
    }
    false
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
