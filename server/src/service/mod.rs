//! The gRPC services. Each method validates its request, calls the store, wakes local waiters
//! and maps errors to `tonic::Status` through `From<Error>`.

pub mod admin;
pub mod worker;
pub mod workflow;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::{
    commit::{Committer, Reports, Starts},
    config::Config,
    store::Store,
    wake::Wakers,
};

/// What every service shares.
#[derive(Debug)]
pub struct Shared {
    pub store: Store,
    /// Applies worker reports, coalescing concurrent ones into one transaction.
    pub committer: Committer<Reports>,
    /// Starts runs of single `StartRun` calls, coalescing concurrent ones likewise.
    pub starter: Committer<Starts>,
    /// When runs suspended through this server wake (see `wake::sleepers`).
    pub sleepers: tokio::sync::mpsc::UnboundedSender<std::time::Instant>,
    pub config: Config,
    pub wakers: Arc<Wakers>,
    /// Cancelled when the server shuts down: long polls and watches return early.
    pub shutdown: CancellationToken,
}

/// A state change of a run: wake the run's own waiters.
pub(crate) fn run_changed(shared: &Shared, id: uuid::Uuid) {
    shared.wakers.runs.wake(&id);
}
