//! `aiki.v1.AdminService`: workers and queues, for operators.

use std::sync::Arc;

use aiki_proto::v1::{
    ListQueuesRequest, ListQueuesResponse, ListWorkersRequest, ListWorkersResponse, ListWorkflowsRequest,
    ListWorkflowsResponse, admin_service_server::AdminService,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::Shared;
use crate::validate;

#[derive(Debug, Clone)]
pub struct AdminSvc(pub Arc<Shared>);

#[tonic::async_trait]
impl AdminService for AdminSvc {
    #[instrument(name = "rpc.ListWorkers", skip_all)]
    async fn list_workers(&self, req: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        let ns = validate::namespace(&req.get_ref().namespace)?;
        Ok(Response::new(ListWorkersResponse {
            workers: self.0.store.list_workers(&ns).await?,
        }))
    }

    #[instrument(name = "rpc.ListQueues", skip_all)]
    async fn list_queues(&self, req: Request<ListQueuesRequest>) -> Result<Response<ListQueuesResponse>, Status> {
        let ns = validate::namespace(&req.get_ref().namespace)?;
        Ok(Response::new(ListQueuesResponse {
            queues: self.0.store.list_queues(&ns, self.0.config.lease_ttl).await?,
        }))
    }

    #[instrument(name = "rpc.ListWorkflows", skip_all)]
    async fn list_workflows(
        &self,
        req: Request<ListWorkflowsRequest>,
    ) -> Result<Response<ListWorkflowsResponse>, Status> {
        let ns = validate::namespace(&req.get_ref().namespace)?;
        Ok(Response::new(ListWorkflowsResponse {
            workflows: self.0.store.list_workflows(&ns, self.0.config.lease_ttl).await?,
        }))
    }
}
