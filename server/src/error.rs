//! The server's error type and its one mapping to `tonic::Status`.

use tonic::{Code, Status};

/// Everything a request can fail with. User mistakes carry a message a person can act on;
/// faults of the server or the database are `Unavailable` or `Internal`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Too many requests of one caller: `RESOURCE_EXHAUSTED`, with the delay after which a
    /// retry may pass (also in the `grpc-retry-pushback-ms` trailer, gRPC's retry pushback).
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: std::time::Duration,
    },
    /// No credentials, or credentials the server does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// A known caller not allowed to do this.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The error about the part `part` of a request (`runs[3]`, `tasks[0]`): a mistake in it
    /// names it; other errors stay as they are.
    pub fn within(self, part: &str) -> Self {
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{part}: {m}")),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(format!("{part}: {m}")),
            e => e,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        match e.code() {
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
                Error::AlreadyExists(format!("already exists: {}", db_message(&e)))
            }
            Some(c)
                if *c == SqlState::INVALID_TEXT_REPRESENTATION
                    || *c == SqlState::CHECK_VIOLATION
                    || *c == SqlState::UNTRANSLATABLE_CHARACTER
                    || *c == SqlState::CHARACTER_NOT_IN_REPERTOIRE =>
            {
                Error::InvalidArgument(db_message(&e))
            }
            Some(c)
                if *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::ADMIN_SHUTDOWN
                    || *c == SqlState::CANNOT_CONNECT_NOW
                    || *c == SqlState::TOO_MANY_CONNECTIONS =>
            {
                Error::Unavailable(format!("database busy, retry: {}", db_message(&e)))
            }
            Some(_) => Error::Internal(format!("database error: {}", db_message(&e))),
            None => Error::Unavailable(format!("database unreachable: {e}")),
        }
    }
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => Error::Unavailable(format!("database pool: {other}")),
        }
    }
}

impl Error {
    /// The error's code: the one vocabulary every surface uses, as a gRPC code here and as an
    /// HTTP status through [`Error::http_status`].
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) | Error::RateLimited { .. } => Code::ResourceExhausted,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// The HTTP status of the error's code, as Google's API design maps gRPC codes.
    pub fn http_status(&self) -> u16 {
        match self.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::Unauthenticated => 401,
            Code::PermissionDenied => 403,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::ResourceExhausted => 429,
            Code::Unavailable => 503,
            _ => 500,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        if matches!(code, Code::Internal | Code::Unavailable) {
            tracing::warn!(error = %e, "request failed");
        }
        let mut status = Status::new(code, e.to_string());
        if let Error::RateLimited { retry_after, .. } = &e
            && let Ok(v) = retry_after.as_millis().to_string().parse()
        {
            status.metadata_mut().insert("grpc-retry-pushback-ms", v);
        }
        status
    }
}

/// Rewrites the transport's answer to a request it could not decode (bytes that are not the
/// method's message, bad UTF-8 in a string, a frame cut short, nesting past the decoder's
/// limit) from `INTERNAL` to `INVALID_ARGUMENT`: the fault is the caller's. The transport
/// answers these before any handler runs, so this is a layer around every service; a
/// handler's own `INTERNAL` (a real server fault) never carries these messages.
pub fn undecodable_is_invalid_argument(
    mut resp: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    const UNDECODABLE: [&str; 4] = [
        "failed to decode Protobuf message",
        "Unexpected EOF decoding stream",
        "Missing request message",
        "protocol error: received message with",
    ];
    let headers = resp.headers_mut();
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"13") {
        return resp;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return resp;
    };
    let m = status.message();
    if !UNDECODABLE.iter().any(|p| m.starts_with(p)) {
        return resp;
    }
    let hint = if m.contains("recursion limit") {
        format!(
            "; payloads may nest at most {} levels of arrays and objects",
            aiki_proto::MAX_PAYLOAD_DEPTH
        )
    } else {
        String::new()
    };
    let refused = Status::invalid_argument(format!(
        "the request is not a valid message of the method's type ({m}){hint}"
    ));
    headers.remove("grpc-status-details-bin");
    if refused.add_header(headers).is_err() {
        tracing::warn!(message = m, "could not rewrite the status of an undecodable request");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_code_maps_to_grpc_and_http() {
        let cases = [
            (Error::InvalidArgument("x".into()), Code::InvalidArgument, 400),
            (Error::NotFound("x".into()), Code::NotFound, 404),
            (Error::AlreadyExists("x".into()), Code::AlreadyExists, 409),
            (Error::FailedPrecondition("x".into()), Code::FailedPrecondition, 400),
            (Error::ResourceExhausted("x".into()), Code::ResourceExhausted, 429),
            (Error::Unauthenticated("x".into()), Code::Unauthenticated, 401),
            (Error::PermissionDenied("x".into()), Code::PermissionDenied, 403),
            (Error::Unavailable("x".into()), Code::Unavailable, 503),
            (Error::Internal("x".into()), Code::Internal, 500),
        ];
        for (e, code, http) in cases {
            assert_eq!((e.code(), e.http_status()), (code, http), "{e:?}");
            assert_eq!(Status::from(e).code(), code);
        }
        let limited = Status::from(Error::RateLimited {
            message: "slow down".into(),
            retry_after: std::time::Duration::from_millis(250),
        });
        assert_eq!(limited.code(), Code::ResourceExhausted);
        assert_eq!(limited.metadata().get("grpc-retry-pushback-ms").unwrap(), "250");
    }
}
