//! What operators read: workers, queues and workflows of a namespace.

use aiki_proto::v1::{Queue, Worker, WorkflowVersion};

use super::{Caller, Engine, Op};
use crate::{error::Result, validate};

impl Engine {
    /// The workers of a namespace, most recently seen first.
    pub async fn list_workers(&self, caller: &Caller, namespace: &str) -> Result<Vec<Worker>> {
        let ns = validate::namespace(namespace)?;
        self.authorize(caller, Op::ListWorkers, &ns)?;
        let _turn = self.scan_turn().await?;
        self.store.list_workers(&ns, self.config.lease_ttl).await
    }

    /// The queues of a namespace: counts by status and the runs nobody serves.
    pub async fn list_queues(&self, caller: &Caller, namespace: &str) -> Result<Vec<Queue>> {
        let ns = validate::namespace(namespace)?;
        self.authorize(caller, Op::ListQueues, &ns)?;
        let _turn = self.scan_turn().await?;
        self.store.list_queues(&ns, self.config.lease_ttl).await
    }

    /// The workflow versions of a namespace and who serves them.
    pub async fn list_workflows(&self, caller: &Caller, namespace: &str) -> Result<Vec<WorkflowVersion>> {
        let ns = validate::namespace(namespace)?;
        self.authorize(caller, Op::ListWorkflows, &ns)?;
        let _turn = self.scan_turn().await?;
        self.store.list_workflows(&ns, self.config.lease_ttl).await
    }
}
