//! The gRPC surface: `WorkflowService`, `WorkerService`, `AdminService`. Each method decodes
//! its request into the engine's types (`engine::requests`), calls one engine operation for
//! the request's caller, and encodes the answer; errors become a `tonic::Status` through
//! `From<Error>`. No rule of Aiki lives here.

pub mod admin;
pub mod worker;
pub mod workflow;

use tonic::Request;

use crate::engine::Caller;

/// Who makes `req`. Every caller is anonymous until authentication exists.
pub(crate) fn caller<T>(_req: &Request<T>) -> Caller {
    Caller::Anonymous
}
