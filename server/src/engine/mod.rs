//! The engine: every operation of Aiki, defined once, on domain types, for a [`Caller`].
//!
//! **Architecture Invariant:** the engine is the only module that knows the caller and the
//! rules. A surface (the gRPC services today; HTTP later) only decodes a request into the
//! engine's types ([`requests`]), calls one operation and encodes its answer; the store only
//! stores. Every operation starts by authorizing its caller for its [`Op`] in its namespace.
//!
//! - [`runs`]: start, get, wait for the result, list, cancel, pause, resume, wake, send an
//!   event, read the history;
//! - [`watch`]: watch a run's history, one reader per watched run for all its watchers;
//! - [`workers`]: register, poll (the long poll and the sizing of claims), heartbeat, and the
//!   reports (task checkpoints, completions, failures, releases, suspensions);
//! - [`admin`]: workers, queues and workflows, for operators;
//! - [`keys`]: API keys.

pub mod admin;
pub mod keys;
pub mod requests;
pub mod runs;
pub mod watch;
pub mod workers;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    auth::{Key, Keys, Role},
    commit::{Committer, Reports, Starts},
    config::Config,
    error::{Error, Result},
    status::RunStatus,
    store::Store,
    wake::Wakers,
};

/// Who makes a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A caller of a server that does not authenticate (`auth = false`): it may do everything.
    Anonymous,
    /// A caller authenticated by an API key: it may do what the key's role allows, in the
    /// key's namespaces.
    Key(Arc<Key>),
}

impl Caller {
    /// The caller's key id, if it has a key.
    pub fn key_id(&self) -> Option<Uuid> {
        match self {
            Caller::Anonymous => None,
            Caller::Key(k) => Some(k.id),
        }
    }
}

/// Every operation, as authorization names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    StartRun,
    /// A start of a child run (it names its parent): what a workflow does from a worker.
    StartChild,
    GetRun,
    ListRuns,
    GetHistory,
    CancelRun,
    PauseRun,
    ResumeRun,
    WakeRun,
    SendEvent,
    RegisterWorker,
    PollTasks,
    Heartbeat,
    Report,
    ListWorkers,
    ListQueues,
    ListWorkflows,
    /// Create, list and revoke API keys.
    ManageKeys,
}

impl Op {
    /// What the operation does, for messages ("may not start runs").
    pub fn describe(self) -> &'static str {
        match self {
            Op::StartRun => "start runs",
            Op::StartChild => "start child runs",
            Op::GetRun => "read runs",
            Op::ListRuns => "list runs",
            Op::GetHistory => "read run histories",
            Op::CancelRun => "cancel runs",
            Op::PauseRun => "pause runs",
            Op::ResumeRun => "resume runs",
            Op::WakeRun => "wake runs",
            Op::SendEvent => "send events",
            Op::RegisterWorker => "register workers",
            Op::PollTasks => "poll for runs",
            Op::Heartbeat => "heartbeat leases",
            Op::Report => "report on leases",
            Op::ListWorkers => "list workers",
            Op::ListQueues => "list queues",
            Op::ListWorkflows => "list workflows",
            Op::ManageKeys => "manage API keys",
        }
    }
}

/// The engine of one server: the store, the group committers, the wake-ups and the settings.
#[derive(Debug)]
pub struct Engine {
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
    /// Lists that scan (runs, queues, workers, workflows) take one of these first: they may
    /// hold at most a quarter of the pool, so that no burst of them keeps polls, reports and
    /// reads of single runs from the database.
    pub scans: tokio::sync::Semaphore,
    /// The API keys: authentication, and each key's request rate.
    pub keys: Arc<Keys>,
    /// The runs being watched, each with the one reader its watchers share.
    pub watches: watch::Tails,
}

/// How long a list waits for its turn before it is refused (`RESOURCE_EXHAUSTED`).
const SCAN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Engine {
    /// Checks that `caller` may do `op` in `namespace`. Every operation asks first, before it
    /// reads anything: a key denied a namespace learns nothing of what is in it.
    pub fn authorize(&self, caller: &Caller, op: Op, namespace: &str) -> Result<()> {
        let Caller::Key(key) = caller else {
            return Ok(());
        };
        if !key.role.allows(op) {
            return Err(Error::PermissionDenied(format!(
                "API key {} has the role {}, which may not {}; that needs the role {} or admin",
                key.label(),
                key.role,
                op.describe(),
                Role::least_for(op)
            )));
        }
        if !key.covers(namespace) {
            return Err(Error::PermissionDenied(format!(
                "API key {} may not {} in namespace {}: it is for {}",
                key.label(),
                op.describe(),
                crate::validate::quote(namespace),
                key.namespaces.join(", ")
            )));
        }
        Ok(())
    }

    /// Checks that `caller` may act as worker `worker`, registered by the key `registered_by`:
    /// a worker id is bound to the key that registered it.
    pub fn authorize_worker(&self, caller: &Caller, worker: Uuid, registered_by: Option<Uuid>) -> Result<()> {
        match caller {
            Caller::Key(key) if Some(key.id) != registered_by => Err(Error::PermissionDenied(format!(
                "worker {worker} was registered with another API key; API key {} may act only as workers it registered",
                key.label()
            ))),
            _ => Ok(()),
        }
    }

    /// The permits of the lists that scan, for a pool of `pool_size` connections.
    pub fn scan_permits(pool_size: usize) -> usize {
        (pool_size / 4).max(1)
    }

    /// Waits for a turn to run a list that scans (see [`Engine::scans`]).
    pub(crate) async fn scan_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        match tokio::time::timeout(SCAN_WAIT, self.scans.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Error::Unavailable("the server is shutting down".into())),
            Err(_) => Err(Error::ResourceExhausted(format!(
                "too many lists of runs, queues, workers or workflows at once on this server: none \
                 could start within {}s; retry later or list less often",
                SCAN_WAIT.as_secs()
            ))),
        }
    }

    /// A run changed: wake its result and history waiters on this server.
    pub(crate) fn run_changed(&self, id: Uuid) {
        self.wakers.runs.wake(&id);
    }

    /// A run changed to `status` on `queue`: wake its waiters and, if it is queued (visible
    /// after `visible_in`), its queue's pollers.
    pub(crate) fn moved(
        &self,
        namespace: &str,
        id: Uuid,
        queue: &str,
        status: RunStatus,
        visible_in: Option<std::time::Duration>,
    ) {
        self.wakers.moved(&crate::store::Moved {
            namespace: namespace.to_owned(),
            id,
            queue: queue.to_owned(),
            status,
            visible_in,
        });
    }
}
