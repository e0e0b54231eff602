//! The gRPC surface: `WorkflowService`, `WorkerService`, `AdminService`. Each method decodes
//! its request into the engine's types (`engine::requests`), calls one engine operation for
//! the request's caller, and encodes the answer; errors become a `tonic::Status` through
//! `From<Error>`. No rule of Aiki lives here.

pub mod admin;
pub mod worker;
pub mod workflow;

use tonic::{Request, Status};

use crate::engine::Caller;

/// Who makes `req`, as the authentication layer (`auth::AuthLayer`) found it. A request that
/// did not pass that layer has no caller, and is refused.
pub(crate) fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("the request was not authenticated; this is a bug of the server"))
}
